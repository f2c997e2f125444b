//! PostgreSQL and MySQL: no foreign key from `reservations.event_id` to `events`.
//!
//! why: both check a foreign key once per inserted row, with a query that locks the parent row,
//! and every reservation of a drop points at the same hot event row. Measured on PostgreSQL at
//! 256 connections on one hot event (BENCHMARKS.md, "Reservations on PostgreSQL"): the check
//! cost the database 6–8 µs of CPU per reservation, about a quarter of its work per row. The
//! reference adds nothing the server does not already guarantee: only an event's actor inserts
//! its reservations, after loading the event from this database, and events are never deleted
//! (as for `bulk_grants`, which never had one). SQLite keeps its declared key: there the check
//! is a lookup of the event's rowid in the page cache, with no measurable cost.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const EVENT_FK: &str = "fk_reservations_event";

fn applies(manager: &SchemaManager) -> bool {
    manager.get_database_backend() != sea_orm::DatabaseBackend::Sqlite
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if !applies(manager) {
            return Ok(());
        }
        manager
            .drop_foreign_key(
                ForeignKey::drop()
                    .name(EVENT_FK)
                    .table(Alias::new("reservations"))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if !applies(manager) {
            return Ok(());
        }
        manager
            .create_foreign_key(
                ForeignKey::create()
                    .name(EVENT_FK)
                    .from(Alias::new("reservations"), Alias::new("event_id"))
                    .to(Alias::new("events"), Alias::new("id"))
                    .to_owned(),
            )
            .await
    }
}
