//! Opening the database with the settings correctness depends on.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use migration::{Migrator, MigratorTrait};
use sea_orm::{DatabaseConnection, SqlxMySqlConnector, SqlxPostgresConnector, SqlxSqliteConnector};
use sqlx::mysql::MySqlConnectOptions;
use sqlx::pool::PoolOptions;
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MySql,
}

impl Backend {
    pub fn of_url(url: &str) -> anyhow::Result<Self> {
        let scheme = url.split(':').next().unwrap_or_default();
        Ok(match scheme {
            "sqlite" => Self::Sqlite,
            "postgres" | "postgresql" => Self::Postgres,
            "mysql" | "mariadb" => Self::MySql,
            _ => bail!("unsupported database URL scheme {scheme:?}: use sqlite:, postgres: or mysql:"),
        })
    }

    /// sea-orm's name for this backend, for building statements.
    pub fn sea_orm(self) -> sea_orm::DatabaseBackend {
        match self {
            Self::Sqlite => sea_orm::DatabaseBackend::Sqlite,
            Self::Postgres => sea_orm::DatabaseBackend::Postgres,
            Self::MySql => sea_orm::DatabaseBackend::MySql,
        }
    }

    /// The most bind parameters one statement may carry on this backend.
    pub fn bind_limit(self) -> usize {
        match self {
            Self::Sqlite => 32_766,
            Self::Postgres | Self::MySql => 65_535,
        }
    }
}

/// How long a connection attempt or a wait for a pooled connection may take before the request
/// fails with 503 rather than hanging.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a pool on `url` with durable settings: SQLite in WAL mode with `synchronous=FULL` (sqlx
/// no longer sets the journal mode itself), PostgreSQL with `synchronous_commit=on`. MySQL's
/// durability is the server's `innodb_flush_log_at_trx_commit=1` (its default).
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<DatabaseConnection> {
    let db = match Backend::of_url(url)? {
        Backend::Sqlite => {
            let options = SqliteConnectOptions::from_str(url)
                .with_context(|| format!("parsing SQLite URL {url}"))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .foreign_keys(true)
                .busy_timeout(ACQUIRE_TIMEOUT)
                // why: 64 MiB of page cache per connection keeps the indexes of a large drop in
                // memory; the default 2 MiB makes every batch re-read index pages.
                .pragma("cache_size", "-65536")
                // why: a multi-row INSERT inside a transaction keeps a statement journal (to undo
                // just that statement on a constraint error). On disk, each batch wrote and
                // closed a temporary file: measured, a third of the SQLite thread's time.
                .pragma("temp_store", "memory")
                // why: a checkpoint every 1000 pages (the default) means one every few batches
                // under load, each with its own fsync; 16k pages (64 MiB of WAL) cuts that tenfold.
                .pragma("wal_autocheckpoint", "16384");
            if let Some(dir) = options
                .get_filename()
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating the database directory {}", dir.display()))?;
            }
            let pool = pool(max_connections)
                .connect_with(options)
                .await
                .context("opening the SQLite database")?;
            SqlxSqliteConnector::from_sqlx_sqlite_pool(pool)
        }
        Backend::Postgres => {
            let options = PgConnectOptions::from_str(url)
                .context("parsing the PostgreSQL URL")?
                .options([("synchronous_commit", "on")]);
            let pool = pool(max_connections)
                .connect_with(options)
                .await
                .context("connecting to PostgreSQL")?;
            SqlxPostgresConnector::from_sqlx_postgres_pool(pool)
        }
        Backend::MySql => {
            let options = MySqlConnectOptions::from_str(url).context("parsing the MySQL URL")?;
            let pool = pool(max_connections)
                .connect_with(options)
                .await
                .context("connecting to MySQL")?;
            SqlxMySqlConnector::from_sqlx_mysql_pool(pool)
        }
    };
    Ok(db)
}

fn pool<DB: sqlx::Database>(max_connections: u32) -> PoolOptions<DB> {
    PoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
}

/// Brings the schema up to date.
/// Runs the pending migrations. On PostgreSQL several nodes may start at once on one database,
/// so migrations run under a session advisory lock, held on a connection of its own: the first
/// node migrates, the others wait and then find nothing left to do.
pub async fn migrate(db: &DatabaseConnection) -> anyhow::Result<()> {
    /// The advisory lock key: "firstcome" in ASCII, shortened to fit 63 bits.
    const MIGRATION_LOCK: i64 = 0x6669_7273_7463_6f6d;
    if db.get_database_backend() != sea_orm::DatabaseBackend::Postgres {
        return Migrator::up(db, None)
            .await
            .context("running database migrations");
    }
    // Its own connection, not one of the pool's: a pool of one would leave none for migrating.
    let options = db.get_postgres_connection_pool().connect_options();
    let mut lock = sqlx::ConnectOptions::connect(&*options)
        .await
        .context("connecting for the migration lock")?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut lock)
        .await
        .context("taking the migration lock")?;
    let migrated = Migrator::up(db, None)
        .await
        .context("running database migrations");
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut lock)
        .await
        .context("releasing the migration lock");
    migrated.and(unlocked.map(|_| ()))
}
