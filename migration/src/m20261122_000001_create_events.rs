use sea_orm_migration::prelude::*;

use crate::timestamp;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
pub(crate) enum Events {
    Table,
    Id,
    Name,
    Kind,
    Stock,
    PerUserLimit,
    MaxPerRequest,
    HoldSeconds,
    OpensAt,
    ClosesAt,
    Closed,
    CreatedAt,
    UpdatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Events::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Events::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Events::Name).string_len(200).not_null())
                    .col(ColumnDef::new(Events::Kind).string_len(16).not_null())
                    .col(ColumnDef::new(Events::Stock).big_integer().not_null())
                    .col(ColumnDef::new(Events::PerUserLimit).integer().not_null())
                    .col(ColumnDef::new(Events::MaxPerRequest).integer().not_null())
                    .col(ColumnDef::new(Events::HoldSeconds).integer().not_null())
                    .col(timestamp(manager, Events::OpensAt).null())
                    .col(timestamp(manager, Events::ClosesAt).null())
                    .col(ColumnDef::new(Events::Closed).boolean().not_null().default(false))
                    .col(timestamp(manager, Events::CreatedAt).not_null())
                    .col(timestamp(manager, Events::UpdatedAt).not_null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Events::Table).to_owned())
            .await
    }
}
