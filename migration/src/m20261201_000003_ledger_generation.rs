use sea_orm_migration::prelude::*;

use crate::m20261122_000001_create_events::Events;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum LedgerGeneration {
    LedgerGeneration,
}

/// Several nodes: the generation of an event's Redis ledger. A rebuild of the ledger bumps it,
/// and a node's insert only lands if the generation its units were allocated under is still
/// current, so an allocation made against a lost ledger can never commit.
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Events::Table)
                    .add_column(
                        ColumnDef::new(LedgerGeneration::LedgerGeneration)
                            .big_integer()
                            .not_null()
                            .default(0),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Events::Table)
                    .drop_column(LedgerGeneration::LedgerGeneration)
                    .to_owned(),
            )
            .await
    }
}
