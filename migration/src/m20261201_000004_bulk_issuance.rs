use sea_orm_migration::prelude::*;

use crate::m20261122_000001_create_events::Events;
use crate::timestamp;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum BulkIssued {
    BulkIssued,
}

#[derive(DeriveIden)]
enum BulkJobs {
    Table,
    Id,
    EventId,
    State,
    Source,
    Cursor,
    ReadCount,
    Issued,
    Skipped,
    Invalid,
    Unissued,
    BytesTotal,
    BytesRead,
    InvalidLines,
    StockExhausted,
    Error,
    CancelRequested,
    CreatedAt,
    StartedAt,
    FinishedAt,
    UpdatedAt,
}

/// Bulk issuance: the job queue (`bulk_jobs`), the grants themselves (`bulk_grants`), and the
/// count of an event's active grants on its row (`events.bulk_issued`), kept in the same
/// transaction as every chunk so an event actor rebuilds its counts without reading the grants.
///
/// why a table of its own for grants: one event may receive tens of millions of them, written in
/// bulk. Its only index is the primary key `(event_id, user_id)`, which is also what skips users
/// who already hold the coupon. The reservations table has three indexes and holds rows the event
/// actor loads at start; neither fits ten million rows. There is no foreign key either (a per-row
/// check); events are never deleted. Revoking marks rows (`status`), with no index on it.
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Events::Table)
                    .add_column(
                        ColumnDef::new(BulkIssued::BulkIssued)
                            .big_integer()
                            .not_null()
                            .default(0),
                    )
                    .to_owned(),
            )
            .await?;
        let counter = |name: BulkJobs| {
            ColumnDef::new(name)
                .big_integer()
                .not_null()
                .default(0)
                .to_owned()
        };
        manager
            .create_table(
                Table::create()
                    .table(BulkJobs::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(BulkJobs::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(BulkJobs::EventId).big_integer().not_null())
                    .col(ColumnDef::new(BulkJobs::State).string_len(16).not_null())
                    .col(ColumnDef::new(BulkJobs::Source).text().not_null())
                    .col(ColumnDef::new(BulkJobs::Cursor).text().null())
                    .col(counter(BulkJobs::ReadCount))
                    .col(counter(BulkJobs::Issued))
                    .col(counter(BulkJobs::Skipped))
                    .col(counter(BulkJobs::Invalid))
                    .col(counter(BulkJobs::Unissued))
                    .col(ColumnDef::new(BulkJobs::BytesTotal).big_integer().null())
                    .col(counter(BulkJobs::BytesRead))
                    .col(ColumnDef::new(BulkJobs::InvalidLines).text().not_null())
                    .col(
                        ColumnDef::new(BulkJobs::StockExhausted)
                            .boolean()
                            .not_null()
                            .default(false),
                    )
                    .col(ColumnDef::new(BulkJobs::Error).text().null())
                    .col(
                        ColumnDef::new(BulkJobs::CancelRequested)
                            .boolean()
                            .not_null()
                            .default(false),
                    )
                    .col(timestamp(manager, BulkJobs::CreatedAt).not_null())
                    .col(timestamp(manager, BulkJobs::StartedAt).null())
                    .col(timestamp(manager, BulkJobs::FinishedAt).null())
                    .col(timestamp(manager, BulkJobs::UpdatedAt).not_null())
                    .to_owned(),
            )
            .await?;
        // Hand-written per backend: SQLite's `WITHOUT ROWID` stores the rows in the primary key's
        // B-tree itself (one structure to write instead of two), and MySQL needs a binary
        // collation so user ids differing only in case stay distinct users.
        let grants = match manager.get_database_backend() {
            sea_orm::DatabaseBackend::Sqlite => {
                "CREATE TABLE IF NOT EXISTS bulk_grants (event_id INTEGER NOT NULL, user_id TEXT NOT NULL, \
                 job_id INTEGER NOT NULL, status TEXT NOT NULL, created_at TEXT NOT NULL, \
                 PRIMARY KEY (event_id, user_id)) WITHOUT ROWID"
            }
            sea_orm::DatabaseBackend::Postgres => {
                "CREATE TABLE IF NOT EXISTS bulk_grants (event_id BIGINT NOT NULL, user_id VARCHAR(128) NOT NULL, \
                 job_id BIGINT NOT NULL, status VARCHAR(16) NOT NULL, created_at TIMESTAMPTZ NOT NULL, \
                 PRIMARY KEY (event_id, user_id))"
            }
            _ => {
                "CREATE TABLE IF NOT EXISTS bulk_grants (event_id BIGINT NOT NULL, \
                 user_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, \
                 job_id BIGINT NOT NULL, status VARCHAR(16) NOT NULL, created_at DATETIME(6) NOT NULL, \
                 PRIMARY KEY (event_id, user_id))"
            }
        };
        manager.get_connection().execute_unprepared(grants).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP TABLE IF EXISTS bulk_grants")
            .await?;
        manager
            .drop_table(Table::drop().table(BulkJobs::Table).if_exists().to_owned())
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Events::Table)
                    .drop_column(BulkIssued::BulkIssued)
                    .to_owned(),
            )
            .await
    }
}
