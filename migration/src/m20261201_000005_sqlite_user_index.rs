//! SQLite: no index on `reservations(user_id)`.
//!
//! why: with random user ids each new row lands on its own leaf page of that index, and SQLite
//! writes every dirtied page to the WAL again at each commit, about one 4 KiB frame per
//! reservation on the hot path. On SQLite the server keeps which reservations each user holds in
//! memory instead (`store::UserIndex`), rebuilt from the table at start. PostgreSQL and MySQL
//! keep the index: several nodes share it, and their pages are written back by a checkpoint,
//! not at every commit.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const USER_INDEX: &str = "ix_reservations_user";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != sea_orm::DatabaseBackend::Sqlite {
            return Ok(());
        }
        manager
            .drop_index(
                Index::drop()
                    .name(USER_INDEX)
                    .table(Alias::new("reservations"))
                    .if_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != sea_orm::DatabaseBackend::Sqlite {
            return Ok(());
        }
        manager
            .create_index(
                Index::create()
                    .name(USER_INDEX)
                    .table(Alias::new("reservations"))
                    .col(Alias::new("user_id"))
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }
}
