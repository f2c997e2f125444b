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
        // why: only two secondary indexes, because each one is written on every reservation.
        // `event_id` rows arrive in time order (UUIDv7 ids), so this index only grows at its end;
        // it serves the event actor's state rebuild. Idempotency keys are unique per (event,
        // user) because the event actor is the single writer that checks them.
        manager
            .create_index(
                Index::create()
                    .name("ix_reservations_event")
                    .table(Reservations::Table)
                    .col(Reservations::EventId)
                    .to_owned(),
            )
            .await?;
        // Serves `GET /v1/me/reservations` (on PostgreSQL and MySQL; SQLite drops it in
        // m20261201_000005 and keeps a user index in memory).
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
