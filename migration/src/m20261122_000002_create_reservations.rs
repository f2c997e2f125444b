use sea_orm_migration::prelude::*;

use crate::m20261122_000001_create_events::Events;
use crate::timestamp;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Reservations {
    Table,
    Id,
    EventId,
    UserId,
    Quantity,
    Status,
    IdempotencyKey,
    ExpiresAt,
    CreatedAt,
    UpdatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Reservations::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(Reservations::Id).uuid().not_null().primary_key())
                    .col(ColumnDef::new(Reservations::EventId).big_integer().not_null())
                    .col(ColumnDef::new(Reservations::UserId).string_len(128).not_null())
                    .col(ColumnDef::new(Reservations::Quantity).integer().not_null())
                    .col(ColumnDef::new(Reservations::Status).string_len(16).not_null())
                    .col(
                        ColumnDef::new(Reservations::IdempotencyKey)
                            .string_len(255)
                            .null(),
                    )
                    .col(timestamp(manager, Reservations::ExpiresAt).null())
                    .col(timestamp(manager, Reservations::CreatedAt).not_null())
                    .col(timestamp(manager, Reservations::UpdatedAt).not_null())
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_reservations_event")
                            .from(Reservations::Table, Reservations::EventId)
                            .to(Events::Table, Events::Id),
                    )
                    .to_owned(),
            )
            .await?;
        // why: one index serves both the per-event state rebuild (its prefix) and the uniqueness of
        // idempotency keys; NULL keys never collide. Every extra index slows the hot insert path.
        manager
            .create_index(
                Index::create()
                    .name("ux_reservations_event_user_key")
                    .table(Reservations::Table)
                    .col(Reservations::EventId)
                    .col(Reservations::UserId)
                    .col(Reservations::IdempotencyKey)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_reservations_user")
                    .table(Reservations::Table)
                    .col(Reservations::UserId)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Reservations::Table).to_owned())
            .await
    }
}
