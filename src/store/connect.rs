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

    /// The most bind parameters we put in one statement: the driver's limit, and for a server
    /// over TCP also few enough that the statement leaves in one write.
    ///
    /// why: sqlx 0.9.0 does not set `TCP_NODELAY` (transact-rs/sqlx#4335, fixed upstream but not
    /// released). A statement sent in more than one write (over TLS, each record holds at most
    /// 16 KiB; in plain TCP, one segment holds 64 KiB on loopback) has its last write held back
    /// until the server's delayed ACK, about 40 ms. Measured on PostgreSQL with TLS: batches of
    /// 172+ rows took 46 or 92 ms instead of 2–8 ms, and a 20 KiB statement held every commit
    /// at 13 ms. At about 100 bytes per row of nine parameters, 1,024 parameters keep a
    /// statement near 11 KiB; rows with long ids are also cut by size (`batch::statement_runs`).
    pub fn params_per_statement(self) -> usize {
        match self {
            Self::Sqlite => self.bind_limit(),
            Self::Postgres | Self::MySql => 1_024,
        }
    }
}

/// Most bytes of bind parameters we put in one PostgreSQL or MySQL statement.
///
/// why: the same delayed-ACK stall as in [`Backend::params_per_statement`], by size rather than
/// count. User ids may hold 128 characters and idempotency keys 255, so 1,024 parameters of
/// those make a 40 KiB statement. 14 KiB leaves room in one 16 KiB TLS record for the rest of the
/// message; 113 reservation rows of short ids stay under it, so for those the count decides.
/// Measured with 110-character user ids (`bench/long_ids.sh`): 2,662 → 30,710 reservations/s.
pub const STATEMENT_BYTES: usize = 14 * 1024;

/// `items` cut into runs of at most `max_items` whose `bytes` add up to at most
/// [`STATEMENT_BYTES`] (at least one item each): the rows of one statement each.
pub fn statement_runs<'a, T>(
    items: &'a [T],
    max_items: usize,
    bytes: impl Fn(&T) -> usize + 'a,
) -> impl Iterator<Item = &'a [T]> + 'a {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (mut n, mut total) = (0, 0);
        while n < rest.len() && n < max_items.max(1) && (n == 0 || total + bytes(&rest[n]) <= STATEMENT_BYTES)
        {
            total += bytes(&rest[n]);
            n += 1;
        }
        let (run, tail) = rest.split_at(n);
        rest = tail;
        Some(run)
    })
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
