//! One job runner per database: whoever runs bulk jobs (a server, or `firstcome issue
//! --database-url`) first takes a lock the database itself arbitrates, and holds it while it
//! lives. A second server waits for it; the command line refuses to run beside a server, whose
//! event actors must see every chunk.
//!
//! - PostgreSQL: a session advisory lock, on a connection of its own.
//! - MySQL: `GET_LOCK`, on a connection of its own.
//! - SQLite: an exclusive lock on a file beside the database (`<file>-bulk.lock`).

use anyhow::Context;
use sea_orm::DatabaseConnection;
use sqlx::ConnectOptions;

use crate::store::Backend;

/// "fcbulk" in ASCII: the advisory-lock key of the job runner.
const ADVISORY_KEY: i64 = 0x0066_6362_756c_6b00;
const MYSQL_LOCK_NAME: &str = "firstcome_bulk_runner";

/// Held for as long as this process runs bulk jobs on the database.
pub enum RunnerLock {
    Postgres(sqlx::PgConnection),
    MySql(sqlx::MySqlConnection),
    Sqlite(std::fs::File),
}

impl RunnerLock {
    /// Takes the lock if nobody holds it; `None` if another process does.
    pub async fn try_acquire(
        db: &DatabaseConnection,
        backend: Backend,
    ) -> anyhow::Result<Option<RunnerLock>> {
        match backend {
            Backend::Postgres => {
                let options = db.get_postgres_connection_pool().connect_options();
                let mut conn = options
                    .connect()
                    .await
                    .context("connecting for the bulk runner lock")?;
                let (taken,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
                    .bind(ADVISORY_KEY)
                    .fetch_one(&mut conn)
                    .await
                    .context("taking the bulk runner lock")?;
                Ok(taken.then_some(RunnerLock::Postgres(conn)))
            }
            Backend::MySql => {
                let options = db.get_mysql_connection_pool().connect_options();
                let mut conn = options
                    .connect()
                    .await
                    .context("connecting for the bulk runner lock")?;
                let (taken,): (Option<i64>,) = sqlx::query_as("SELECT GET_LOCK(?, 0)")
                    .bind(MYSQL_LOCK_NAME)
                    .fetch_one(&mut conn)
                    .await
                    .context("taking the bulk runner lock")?;
                Ok((taken == Some(1)).then_some(RunnerLock::MySql(conn)))
            }
            Backend::Sqlite => {
                let options = db.get_sqlite_connection_pool().connect_options();
                let mut name = options.get_filename().as_os_str().to_owned();
                name.push("-bulk.lock");
                let path = std::path::PathBuf::from(name);
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .with_context(|| format!("opening the bulk runner lock {}", path.display()))?;
                match file.try_lock() {
                    Ok(()) => Ok(Some(RunnerLock::Sqlite(file))),
                    Err(std::fs::TryLockError::WouldBlock) => Ok(None),
                    Err(std::fs::TryLockError::Error(error)) => {
                        Err(anyhow::Error::new(error).context("locking the bulk runner lock file"))
                    }
                }
            }
        }
    }
}
