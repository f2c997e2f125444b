//! Schema migrations, run at server start and by `firstcome migrate`.

pub use sea_orm_migration::prelude::*;

mod m20261122_000001_create_events;
mod m20261122_000002_create_reservations;
mod m20261201_000003_ledger_generation;
mod m20261201_000004_bulk_issuance;
mod m20261201_000005_sqlite_user_index;
mod m20261202_000006_reservations_event_fk;
mod m20261203_000007_postgres_user_hash_index;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261122_000001_create_events::Migration),
            Box::new(m20261122_000002_create_reservations::Migration),
            Box::new(m20261201_000003_ledger_generation::Migration),
            Box::new(m20261201_000004_bulk_issuance::Migration),
            Box::new(m20261201_000005_sqlite_user_index::Migration),
            Box::new(m20261202_000006_reservations_event_fk::Migration),
            Box::new(m20261203_000007_postgres_user_hash_index::Migration),
        ]
    }
}

/// A UTC timestamp column with microsecond precision on every backend.
///
/// why: MySQL's plain `TIMESTAMP` keeps whole seconds and ends in 2038; a hold restored after a
/// restart must expire at its exact instant, never earlier.
pub(crate) fn timestamp(manager: &SchemaManager, column: impl IntoIden) -> ColumnDef {
    let mut def = ColumnDef::new(column);
    match manager.get_database_backend() {
        sea_orm::DatabaseBackend::MySql => def.custom(Alias::new("DATETIME(6)")),
        _ => def.timestamp_with_time_zone(),
    };
    def
}
