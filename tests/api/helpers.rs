//! The harness every API test uses: a real `firstcome` process on port 0 with its own fresh
//! database ([`TestApp::spawn`]), a small typed client for the routes, direct SQL reads of what
//! is durable ([`TestDb::reservations`]), and the stampede driver with its exactness check.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Once};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, TimeDelta, Utc};
use reqwest::header::HeaderMap;
use reqwest::{Client, Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};
use sqlx::Connection;
use tokio::sync::{OnceCell, RwLock, RwLockReadGuard, RwLockWriteGuard};
use uuid::Uuid;

/// The admin bearer token every test server is started with.
pub const ADMIN_TOKEN: &str = "integration-test-admin-token";

/// How long a server may take to migrate and print its port.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound on any single HTTP exchange, so no test can hang on a stuck server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const DEFAULT_MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/";

/// Generates one `#[tokio::test]` per backend for each named scenario — an
/// `async fn(Backend) -> anyhow::Result<()>` in the calling module — inside modules `sqlite`,
/// `postgres` and `mysql`, so a test's name says where it ran and a filter on the scenario's
/// name runs it on all three.
macro_rules! on_every_backend {
    ($($scenario:ident),+ $(,)?) => {
        on_every_backend!(@one sqlite, Sqlite, $($scenario),+);
        on_every_backend!(@one postgres, Postgres, $($scenario),+);
        on_every_backend!(@one mysql, MySql, $($scenario),+);
    };
    (@one $module:ident, $backend:ident, $($scenario:ident),+) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() -> anyhow::Result<()> {
                    super::$scenario($crate::helpers::Backend::$backend).await
                }
            )+
        }
    };
}

/// Like [`on_every_backend!`], for a module whose scenarios do not all run everywhere: those in
/// `every` on SQLite, PostgreSQL and MySQL, those in `sqlite_and_postgres` on those two only
/// (the heavy ones). All land in the same `sqlite` / `postgres` / `mysql` modules, so a filter on
/// a backend or a scenario still selects them.
macro_rules! on_backends {
    (every: [$($every:ident),* $(,)?], sqlite_and_postgres: [$($two:ident),* $(,)?] $(,)?) => {
        mod sqlite {
            $(on_backends!(@test Sqlite, $every);)*
            $(on_backends!(@test Sqlite, $two);)*
        }
        mod postgres {
            $(on_backends!(@test Postgres, $every);)*
            $(on_backends!(@test Postgres, $two);)*
        }
        mod mysql {
            $(on_backends!(@test MySql, $every);)*
        }
    };
    (@test $backend:ident, $scenario:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $scenario() -> anyhow::Result<()> {
            super::$scenario($crate::helpers::Backend::$backend).await
        }
    };
}

// why: the machine has two cores. A stampede saturates both; a timing assertion (a hold must
// come back within 250 ms of its expiry) measured beside one would fail for reasons that have
// nothing to do with the server. Heavy tests exclude each other and every timing test; light
// tests run beside anything.
static MACHINE: LazyLock<RwLock<()>> = LazyLock::new(|| RwLock::new(()));

/// Taken by tests that load the whole machine (stampedes, kill -9 under load).
pub async fn exclusive_machine() -> RwLockWriteGuard<'static, ()> {
    MACHINE.write().await
}

/// Taken by tests that assert on timing: they never run beside a heavy test.
pub async fn quiet_machine() -> RwLockReadGuard<'static, ()> {
    MACHINE.read().await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MySql,
}

// ---------------------------------------------------------------------------------------------
// Databases
// ---------------------------------------------------------------------------------------------

enum Pool {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
    MySql(sqlx::MySqlPool),
}

/// One `reservations` row as the database holds it.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: Uuid,
    pub user_id: String,
    pub quantity: i64,
    pub status: String,
    pub idempotency_key: Option<String>,
}

impl Row {
    /// Still counts against stock.
    pub fn is_active(&self) -> bool {
        matches!(self.status.as_str(), "issued" | "redeemed" | "held" | "confirmed")
    }
}

/// One `bulk_grants` row as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRow {
    pub user_id: String,
    pub job_id: i64,
    /// `issued` or `revoked`.
    pub status: String,
}

/// Rows and units of `rows` that still count against stock.
pub fn active_units(rows: &[Row]) -> (usize, i64) {
    rows.iter()
        .filter(|r| r.is_active())
        .fold((0, 0), |(n, units), r| (n + 1, units + r.quantity))
}

/// A database of its own for one test: a SQLite file in a temporary directory, or a freshly
/// created PostgreSQL / MySQL database, dropped again when the test ends.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    /// Server URL and database name to drop at the end (PostgreSQL and MySQL).
    created: Option<(String, String)>,
    pool: OnceCell<Pool>,
    /// Holds the SQLite file and the server logs.
    dir: tempfile::TempDir,
}

impl TestDb {
    pub async fn create(backend: Backend) -> anyhow::Result<TestDb> {
        let dir = tempfile::tempdir().context("creating a temporary directory")?;
        let name = format!("fc_{}", Uuid::now_v7().simple());
        let (url, created) = match backend {
            Backend::Sqlite => {
                let path = dir.path().join("firstcome.db");
                (format!("sqlite://{}", path.display()), None)
            }
            Backend::Postgres | Backend::MySql => {
                let server = server_url(backend);
                let mut url = url::Url::parse(&server)
                    .with_context(|| format!("parsing the database server URL {server}"))?;
                url.set_path(&format!("/{name}"));
                run_on_server(backend, &server, &format!("CREATE DATABASE {name}"))
                    .await
                    .with_context(|| format!("creating database {name} on {server}"))?;
                (url.to_string(), Some((server, name)))
            }
        };
        Ok(TestDb {
            backend,
            url,
            created,
            pool: OnceCell::new(),
            dir,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A small pool of our own, opened on first use (after the server created the schema).
    async fn pool(&self) -> anyhow::Result<&Pool> {
        self.pool
            .get_or_try_init(|| async {
                let pool = match self.backend {
                    Backend::Sqlite => Pool::Sqlite(
                        sqlx::sqlite::SqlitePoolOptions::new()
                            .max_connections(2)
                            .connect(&self.url)
                            .await?,
                    ),
                    Backend::Postgres => Pool::Postgres(
                        sqlx::postgres::PgPoolOptions::new()
                            .max_connections(2)
                            .connect(&self.url)
                            .await?,
                    ),
                    Backend::MySql => Pool::MySql(
                        sqlx::mysql::MySqlPoolOptions::new()
                            .max_connections(2)
                            .connect(&self.url)
                            .await?,
                    ),
                };
                anyhow::Ok(pool)
            })
            .await
            .with_context(|| format!("opening a test pool on {}", self.url))
    }

    /// Every reservation row of `event_id`, read straight from the database.
    pub async fn reservations(&self, event_id: i64) -> anyhow::Result<Vec<Row>> {
        type Raw = (String, String, i32, String, Option<String>);
        let raw: Vec<Raw> = match self.pool().await? {
            Pool::Sqlite(pool) => {
                sqlx::query_as(
                    "SELECT lower(hex(id)), user_id, quantity, status, idempotency_key \
                     FROM reservations WHERE event_id = ?",
                )
                .bind(event_id)
                .fetch_all(pool)
                .await
            }
            Pool::Postgres(pool) => {
                sqlx::query_as(
                    "SELECT id::text, user_id, quantity, status, idempotency_key \
                     FROM reservations WHERE event_id = $1",
                )
                .bind(event_id)
                .fetch_all(pool)
                .await
            }
            Pool::MySql(pool) => {
                sqlx::query_as(
                    "SELECT CAST(lower(hex(id)) AS CHAR), user_id, quantity, status, \
                     idempotency_key FROM reservations WHERE event_id = ?",
                )
                .bind(event_id)
                .fetch_all(pool)
                .await
            }
        }
        .with_context(|| format!("reading the reservations of event {event_id}"))?;
        raw.into_iter()
            .map(|(id, user_id, quantity, status, idempotency_key)| {
                Ok(Row {
                    id: Uuid::parse_str(&id).with_context(|| format!("row id {id:?}"))?,
                    user_id,
                    quantity: i64::from(quantity),
                    status,
                    idempotency_key,
                })
            })
            .collect()
    }

    /// Runs one statement on the test's database behind the server's back (fault injection).
    pub async fn execute(&self, sql: &'static str) -> anyhow::Result<()> {
        match self.pool().await? {
            Pool::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
            Pool::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
            Pool::MySql(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
        }
        .with_context(|| format!("running {sql}"))
    }

    /// How many rows the `events` table holds.
    pub async fn event_count(&self) -> anyhow::Result<i64> {
        let sql = "SELECT count(*) FROM events";
        let count = match self.pool().await? {
            Pool::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
            Pool::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
            Pool::MySql(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        };
        count.context("counting events")
    }

    /// Runs statements built at run time (test fixtures such as a segment table) on the test's
    /// database.
    pub async fn execute_owned(&self, sql: String) -> anyhow::Result<()> {
        let what = sql.chars().take(120).collect::<String>();
        let sql = sqlx::AssertSqlSafe(sql);
        match self.pool().await? {
            Pool::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
            Pool::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
            Pool::MySql(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
        }
        .with_context(|| format!("running {what}…"))
    }

    /// Every `bulk_grants` row of `event_id`, read straight from the database.
    pub async fn grants(&self, event_id: i64) -> anyhow::Result<Vec<GrantRow>> {
        let sql = match self.backend {
            Backend::Postgres => "SELECT user_id, job_id, status FROM bulk_grants WHERE event_id = $1",
            _ => "SELECT user_id, job_id, status FROM bulk_grants WHERE event_id = ?",
        };
        let raw: Vec<(String, i64, String)> = match self.pool().await? {
            Pool::Sqlite(pool) => sqlx::query_as(sql).bind(event_id).fetch_all(pool).await,
            Pool::Postgres(pool) => sqlx::query_as(sql).bind(event_id).fetch_all(pool).await,
            Pool::MySql(pool) => sqlx::query_as(sql).bind(event_id).fetch_all(pool).await,
        }
        .with_context(|| format!("reading the bulk grants of event {event_id}"))?;
        Ok(raw
            .into_iter()
            .map(|(user_id, job_id, status)| GrantRow {
                user_id,
                job_id,
                status,
            })
            .collect())
    }

    /// How many `bulk_grants` rows of `event_id` have `status`, counted by the database (for
    /// lists too large to read back row by row).
    pub async fn grant_count(&self, event_id: i64, status: &str) -> anyhow::Result<i64> {
        let sql = match self.backend {
            Backend::Postgres => "SELECT count(*) FROM bulk_grants WHERE event_id = $1 AND status = $2",
            _ => "SELECT count(*) FROM bulk_grants WHERE event_id = ? AND status = ?",
        };
        let count = match self.pool().await? {
            Pool::Sqlite(pool) => {
                sqlx::query_scalar(sql)
                    .bind(event_id)
                    .bind(status)
                    .fetch_one(pool)
                    .await
            }
            Pool::Postgres(pool) => {
                sqlx::query_scalar(sql)
                    .bind(event_id)
                    .bind(status)
                    .fetch_one(pool)
                    .await
            }
            Pool::MySql(pool) => {
                sqlx::query_scalar(sql)
                    .bind(event_id)
                    .bind(status)
                    .fetch_one(pool)
                    .await
            }
        };
        count.with_context(|| format!("counting the {status} bulk grants of event {event_id}"))
    }

    /// `events.bulk_issued` of `event_id`: the server's own count of the event's issued grants.
    pub async fn bulk_issued(&self, event_id: i64) -> anyhow::Result<i64> {
        let sql = match self.backend {
            Backend::Postgres => "SELECT bulk_issued FROM events WHERE id = $1",
            _ => "SELECT bulk_issued FROM events WHERE id = ?",
        };
        let count = match self.pool().await? {
            Pool::Sqlite(pool) => sqlx::query_scalar(sql).bind(event_id).fetch_one(pool).await,
            Pool::Postgres(pool) => sqlx::query_scalar(sql).bind(event_id).fetch_one(pool).await,
            Pool::MySql(pool) => sqlx::query_scalar(sql).bind(event_id).fetch_one(pool).await,
        };
        count.with_context(|| format!("reading events.bulk_issued of event {event_id}"))
    }

    /// `events.ledger_generation` of `event_id` (PostgreSQL): how often its Redis ledger was built.
    pub async fn ledger_generation(&self, event_id: i64) -> anyhow::Result<i64> {
        let Pool::Postgres(pool) = self.pool().await? else {
            bail!("the Redis ledger runs on PostgreSQL only");
        };
        sqlx::query_scalar("SELECT ledger_generation FROM events WHERE id = $1")
            .bind(event_id)
            .fetch_one(pool)
            .await
            .with_context(|| format!("reading events.ledger_generation of event {event_id}"))
    }

    /// How many rows the `bulk_jobs` table holds.
    pub async fn job_count(&self) -> anyhow::Result<i64> {
        let sql = "SELECT count(*) FROM bulk_jobs";
        let count = match self.pool().await? {
            Pool::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
            Pool::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
            Pool::MySql(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        };
        count.context("counting bulk jobs")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((server, name)) = self.created.take() else {
            return;
        };
        let backend = self.backend;
        // why: Drop cannot await; a one-off runtime on its own thread drops the database.
        let dropping = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let sql = match backend {
                Backend::Postgres => format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                _ => format!("DROP DATABASE IF EXISTS {name}"),
            };
            runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), run_on_server(backend, &server, &sql)).await
            })??;
            anyhow::Ok(())
        });
        if let Ok(Err(error)) = dropping.join() {
            eprintln!("could not drop the test database: {error:#}");
        }
    }
}

fn server_url(backend: Backend) -> String {
    let (var, default) = match backend {
        Backend::Postgres => ("FIRSTCOME_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        _ => ("FIRSTCOME_TEST_MYSQL_URL", DEFAULT_MYSQL_URL),
    };
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

/// Runs one administrative statement (CREATE / DROP DATABASE) on a database server.
async fn run_on_server(backend: Backend, server: &str, sql: &str) -> anyhow::Result<()> {
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    match backend {
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(server).await?;
            sqlx::raw_sql(sql).execute(&mut conn).await?;
            conn.close().await?;
        }
        Backend::MySql => {
            let mut conn = sqlx::MySqlConnection::connect(server).await?;
            sqlx::raw_sql(sql).execute(&mut conn).await?;
            conn.close().await?;
        }
        Backend::Sqlite => {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------------------------

/// The server settings in the developer's environment, which must not leak into a test server
/// (an exported `REDIS_URL` would put every single-node test into several-node mode).
pub fn developer_settings() -> impl Iterator<Item = String> {
    std::env::vars().map(|(name, _)| name).filter(|name| {
        name.starts_with("FIRSTCOME_") && name != "FIRSTCOME_ADMIN_TOKEN"
            || name == "DATABASE_URL"
            || name == "REDIS_URL"
    })
}

/// `firstcome serve --database-url <database_url> <args>` with only the given settings (`env` on
/// top of the admin token), its output piped; killed when dropped. For tests that watch a
/// process start or refuse to; [`TestApp`] runs the servers the other tests talk to.
pub fn serve_command(database_url: &str, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_firstcome"));
    command
        .args(["serve", "--database-url", database_url])
        .args(args)
        .env("FIRSTCOME_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "info")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for name in developer_settings() {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    command
}

/// A running `firstcome serve`; killed (SIGKILL) and reaped when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    async fn start(database_url: &str, args: &[String], log: &Path) -> anyhow::Result<Server> {
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening the server log {}", log.display()))?;
        let mut command = Command::new(env!("CARGO_BIN_EXE_firstcome"));
        command
            .args(["serve", "--bind", "127.0.0.1:0", "--database-url", database_url])
            .args(args)
            .env("FIRSTCOME_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        for name in developer_settings() {
            command.env_remove(name);
        }
        // why: every test talks from 127.0.0.1, and the stampedes send up to 1,500 requests at
        // once; rate limits are off unless a test opts in with `--rate-limit true` (flags win
        // over the environment).
        command.env("FIRSTCOME_RATE_LIMIT", "false");
        let child = command.spawn().context("starting the firstcome binary")?;
        let mut server = Server { child, port: 0 };
        let stdout = server.child.stdout.take().context("no stdout pipe")?;
        let (first_line, line) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut first_line = Some(first_line);
            // why: keep reading until the process ends, so stdout can never fill and block it.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(tx) = first_line.take() {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match tokio::time::timeout(STARTUP_TIMEOUT, line).await {
            Ok(Ok(line)) => line,
            Ok(Err(_)) => bail!(
                "the server exited before listening; its log ends with:\n{}",
                log_tail(log, 30)
            ),
            Err(_) => bail!(
                "the server did not print its port within {STARTUP_TIMEOUT:?}; log:\n{}",
                log_tail(log, 30)
            ),
        };
        server.port = line
            .strip_prefix("firstcome listening on http://127.0.0.1:")
            .and_then(|port| port.trim().parse().ok())
            .with_context(|| format!("unexpected first stdout line {line:?}"))?;
        Ok(server)
    }

    /// SIGTERM, then waits (at most `within`) for the process to exit; its exit status.
    fn terminate(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("running kill -TERM")?;
        anyhow::ensure!(status.success(), "kill -TERM failed: {status}");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for the server")? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("the server did not exit within {within:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        // Child::kill is SIGKILL on Unix: kill -9, no chance to flush or finish anything.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a log file, for failure messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// The application under test
// ---------------------------------------------------------------------------------------------

/// A server on its own database (or on one several cluster nodes share), and a client for
/// it. Fields drop in order: the server is killed before its database is dropped.
pub struct TestApp {
    server: Option<Server>,
    pub db: Arc<TestDb>,
    /// How the server reaches `db`.
    database_url: String,
    pub client: Client,
    /// `http://127.0.0.1:<port>` of the current server process (it changes on restart).
    pub address: String,
    args: Vec<String>,
    log: PathBuf,
}

impl TestApp {
    /// A fresh database on `backend` and a server on it with default settings.
    pub async fn spawn(backend: Backend) -> anyhow::Result<TestApp> {
        TestApp::spawn_with(backend, &[]).await
    }

    /// Like [`TestApp::spawn`], with extra `serve` flags (kept across restarts).
    pub async fn spawn_with(backend: Backend, args: &[&str]) -> anyhow::Result<TestApp> {
        let db = Arc::new(TestDb::create(backend).await?);
        let log = db.dir().join("server.log");
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let database_url = db.url.clone();
        TestApp::spawn_on(db, database_url, args, log).await
    }

    /// A server on an existing database (shared with other servers) that it reaches at
    /// `database_url` (`db.url`, or the same database through a proxy), logging to `log`.
    pub async fn spawn_on(
        db: Arc<TestDb>,
        database_url: String,
        args: Vec<String>,
        log: PathBuf,
    ) -> anyhow::Result<TestApp> {
        remember_panics();
        let client = Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(20))
            .build()
            .context("building the HTTP client")?;
        let mut app = TestApp {
            server: None,
            db,
            database_url,
            client,
            address: String::new(),
            args,
            log,
        };
        app.start().await?;
        Ok(app)
    }

    /// Starts a server process on this app's database (after [`TestApp::kill`]).
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let server = Server::start(&self.database_url, &self.args, &self.log).await?;
        self.address = format!("http://127.0.0.1:{}", server.port);
        self.server = Some(server);
        Ok(())
    }

    /// Whether a server process was started and not killed or terminated since.
    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// kill -9 of the server process; requests in flight get no answer.
    pub fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.kill();
        }
    }

    /// SIGTERM: the server drains and exits; its exit status (within `within`).
    pub fn terminate(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let mut server = self.server.take().context("no server is running")?;
        server.terminate(within)
    }

    /// kill -9, then a new process on the same database (on a new port).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.start().await
    }

    /// The operating-system id of the current server process.
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(|server| server.child.id())
    }

    /// The server's log file (stderr of every process this app started).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path))
    }

    /// A request carrying the admin bearer token.
    pub fn admin(&self, method: Method, path: &str) -> RequestBuilder {
        self.request(method, path).bearer_auth(ADMIN_TOKEN)
    }

    /// A request made by user `user` (the `X-User-Id` header).
    pub fn as_user(&self, method: Method, path: &str, user: &str) -> RequestBuilder {
        self.request(method, path).header("x-user-id", user)
    }

    /// Creates an event from `spec`; anything but 201 is an error.
    pub async fn create_event(&self, spec: Value) -> anyhow::Result<i64> {
        let reply = send(self.admin(Method::POST, "/v1/events").json(&spec)).await?;
        if reply.status != StatusCode::CREATED {
            bail!("creating event {spec} answered {reply}");
        }
        reply.body["id"]
            .as_i64()
            .with_context(|| format!("no id in {reply}"))
    }

    /// A coupon event that is open now.
    pub async fn coupon_event(&self, stock: u64, per_user_limit: u32) -> anyhow::Result<i64> {
        self.create_event(json!({
            "name": "coupon drop", "kind": "coupon", "stock": stock,
            "per_user_limit": per_user_limit,
        }))
        .await
    }

    /// A ticket event that is open now.
    pub async fn ticket_event(
        &self,
        stock: u64,
        per_user_limit: u32,
        hold_seconds: u32,
    ) -> anyhow::Result<i64> {
        self.create_event(json!({
            "name": "ticket drop", "kind": "ticket", "stock": stock,
            "per_user_limit": per_user_limit, "hold_seconds": hold_seconds,
        }))
        .await
    }

    pub async fn get_event(&self, event_id: i64) -> anyhow::Result<Reply> {
        send(self.request(Method::GET, &format!("/v1/events/{event_id}"))).await
    }

    /// The event's live counts; fails unless it answers 200 and the counts add up to the stock.
    pub async fn counts(&self, event_id: i64) -> anyhow::Result<Counts> {
        let reply = self.get_event(event_id).await?;
        if reply.status != StatusCode::OK {
            bail!("GET event {event_id} answered {reply}");
        }
        Counts::parse(&reply)
    }

    pub async fn patch_event(&self, event_id: i64, patch: Value) -> anyhow::Result<Reply> {
        send(
            self.admin(Method::PATCH, &format!("/v1/events/{event_id}"))
                .json(&patch),
        )
        .await
    }

    /// `POST /v1/events/{id}/reservations` as `user`, with `{"quantity": q}` or no body.
    pub async fn reserve(
        &self,
        event_id: i64,
        user: &str,
        quantity: Option<i64>,
        key: Option<&str>,
    ) -> anyhow::Result<Reply> {
        let path = format!("/v1/events/{event_id}/reservations");
        let mut request = self.as_user(Method::POST, &path, user);
        if let Some(quantity) = quantity {
            request = request.json(&json!({ "quantity": quantity }));
        }
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        send(request).await
    }

    /// Reserves and fails unless the answer is 201; returns the reservation.
    pub async fn reserve_ok(
        &self,
        event_id: i64,
        user: &str,
        quantity: Option<i64>,
    ) -> anyhow::Result<Value> {
        let reply = self.reserve(event_id, user, quantity, None).await?;
        if reply.status != StatusCode::CREATED {
            bail!("reserving {quantity:?} of event {event_id} as {user} answered {reply}");
        }
        Ok(reply.body)
    }

    pub async fn get_reservation(&self, id: &str, user: &str) -> anyhow::Result<Reply> {
        send(self.as_user(Method::GET, &format!("/v1/reservations/{id}"), user)).await
    }

    pub async fn confirm(&self, id: &str, user: &str) -> anyhow::Result<Reply> {
        let path = format!("/v1/reservations/{id}/confirm");
        send(self.as_user(Method::POST, &path, user)).await
    }

    pub async fn cancel(&self, id: &str, user: &str) -> anyhow::Result<Reply> {
        let path = format!("/v1/reservations/{id}/cancel");
        send(self.as_user(Method::POST, &path, user)).await
    }

    pub async fn my_reservations(&self, user: &str) -> anyhow::Result<Reply> {
        send(self.as_user(Method::GET, "/v1/me/reservations", user)).await
    }

    /// `POST /v1/admin/events/{id}/bulk-issues{query}` with `body` as the upload, sent as
    /// `content_type` (`query` is `""` or starts with `?`).
    pub async fn submit_upload(
        &self,
        event_id: i64,
        content_type: &str,
        query: &str,
        body: impl Into<reqwest::Body>,
    ) -> anyhow::Result<Reply> {
        let path = format!("/v1/admin/events/{event_id}/bulk-issues{query}");
        send(
            self.admin(Method::POST, &path)
                .header("content-type", content_type)
                .body(body),
        )
        .await
    }

    /// `POST /v1/admin/events/{id}/bulk-issues` with the SQL source `{"source": source}`.
    pub async fn submit_table(&self, event_id: i64, source: Value) -> anyhow::Result<Reply> {
        let path = format!("/v1/admin/events/{event_id}/bulk-issues");
        send(self.admin(Method::POST, &path).json(&json!({ "source": source }))).await
    }

    /// The id of the job a submission created; fails unless it was accepted (202, a queued job
    /// and its `Location`).
    pub fn accepted_job(&self, reply: &Reply) -> anyhow::Result<i64> {
        if reply.status != StatusCode::ACCEPTED {
            bail!(
                "the bulk issue was not accepted: {reply}\nthe server log ends with:\n{}",
                log_tail(&self.log, 30)
            );
        }
        let id = reply.body["id"]
            .as_i64()
            .with_context(|| format!("no job id in {reply}"))?;
        let location = format!("/v1/admin/jobs/{id}");
        if reply.body["state"] != "queued" || reply.header("location") != Some(location.as_str()) {
            bail!("expected a queued job at Location {location}, got {reply}");
        }
        Ok(id)
    }

    /// Uploads `body` as `content_type` and returns the new job's id (see [`TestApp::accepted_job`]).
    pub async fn submit_upload_ok(
        &self,
        event_id: i64,
        content_type: &str,
        query: &str,
        body: impl Into<reqwest::Body>,
    ) -> anyhow::Result<i64> {
        let reply = self.submit_upload(event_id, content_type, query, body).await?;
        self.accepted_job(&reply)
    }

    /// `GET /v1/admin/jobs/{id}`.
    pub async fn job(&self, job_id: i64) -> anyhow::Result<Reply> {
        send(self.admin(Method::GET, &format!("/v1/admin/jobs/{job_id}"))).await
    }

    /// Reads job `job_id` every 20 ms until `done(job)` holds, and returns that job JSON; fails
    /// after `timeout`, or as soon as the job reaches a final state in which `done` does not hold.
    pub async fn poll_job(
        &self,
        job_id: i64,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let reply = self.job(job_id).await?;
            if reply.status != StatusCode::OK {
                bail!("GET job {job_id} answered {reply}");
            }
            if done(&reply.body) {
                return Ok(reply.body);
            }
            if is_final(&reply.body) {
                bail!("job {job_id} ended before the awaited moment: {reply}");
            }
            if Instant::now() > deadline {
                bail!(
                    "job {job_id} was not there within {timeout:?}: {reply}\nthe server log ends with:\n{}",
                    log_tail(&self.log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Reads job `job_id` until it is `succeeded`, `failed` or `cancelled` (at most `timeout`)
    /// and returns it.
    pub async fn wait_job(&self, job_id: i64, timeout: Duration) -> anyhow::Result<Value> {
        self.poll_job(job_id, timeout, is_final).await
    }

    /// `GET /v1/admin/jobs{query}`: the ids of the jobs listed, in the order given.
    pub async fn job_ids(&self, query: &str) -> anyhow::Result<Vec<i64>> {
        let reply = send(self.admin(Method::GET, &format!("/v1/admin/jobs{query}"))).await?;
        if reply.status != StatusCode::OK {
            bail!("GET /v1/admin/jobs{query} answered {reply}");
        }
        let jobs = reply.body["jobs"]
            .as_array()
            .with_context(|| format!("no jobs array in {reply}"))?;
        jobs.iter()
            .map(|job| {
                job["id"]
                    .as_i64()
                    .with_context(|| format!("a job without an id in {reply}"))
            })
            .collect()
    }
}

/// How late an expired hold's units may reappear: the server checks every 20 ms and then
/// commits; the rest is slack for a busy CI machine.
pub const EXPIRY_SLACK: TimeDelta = TimeDelta::milliseconds(250);

impl TestApp {
    /// Watches `event` every 20 ms until fewer than `held` units are held, and returns the
    /// counts then and when that was first seen. Fails if the units come back before
    /// `expires_at` (an answer received before it already shows them) or not within 2 s after.
    pub async fn watch_release(
        &self,
        event: i64,
        held: i64,
        expires_at: DateTime<Utc>,
    ) -> anyhow::Result<(Counts, DateTime<Utc>)> {
        loop {
            let counts = self.counts(event).await?;
            let seen_at = Utc::now();
            if counts.held < held {
                if seen_at < expires_at {
                    bail!(
                        "units came back {} ms before the hold expired: {counts:?}",
                        (expires_at - seen_at).num_milliseconds()
                    );
                }
                return Ok((counts, seen_at));
            }
            if seen_at > expires_at + TimeDelta::seconds(2) {
                bail!("the hold had not come back 2 s after it expired: {counts:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- end of the server log ---\n{}", log_tail(&self.log, 20));
            // why: a failure's output is often read from its end (CI keeps the tail), where the
            // server logs would otherwise bury the assertion that failed.
            if let Some(failure) = last_panic() {
                eprintln!("--- the test failed: {failure}");
            }
        }
    }
}

/// The last panic message of each thread, so [`TestApp`]'s drop can repeat it after the log.
static LAST_PANICS: LazyLock<Mutex<HashMap<ThreadId, String>>> = LazyLock::new(Mutex::default);

/// Installs (once) a panic hook that records each panic's message before the default hook
/// prints it.
fn remember_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(mut panics) = LAST_PANICS.lock() {
                panics.insert(std::thread::current().id(), info.to_string());
            }
            default(info);
        }));
    });
}

fn last_panic() -> Option<String> {
    let panics = LAST_PANICS.lock().ok()?;
    panics.get(&std::thread::current().id()).cloned()
}

/// An event's live counts as `GET /v1/events/{id}` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts {
    pub stock: i64,
    pub remaining: i64,
    pub held: i64,
    pub sold: i64,
    pub status: String,
}

impl Counts {
    /// The counts in an event's body; fails unless they add up to the stock, none negative.
    pub fn parse(reply: &Reply) -> anyhow::Result<Counts> {
        let number = |member: &str| {
            reply.body[member]
                .as_i64()
                .with_context(|| format!("no {member} in {reply}"))
        };
        let counts = Counts {
            stock: number("stock")?,
            remaining: number("remaining")?,
            held: number("held")?,
            sold: number("sold")?,
            status: reply.body["status"].as_str().unwrap_or_default().to_owned(),
        };
        if counts.remaining + counts.held + counts.sold != counts.stock
            || counts.remaining < 0
            || counts.held < 0
            || counts.sold < 0
        {
            bail!("conservation broken: {counts:?}");
        }
        Ok(counts)
    }
}

// ---------------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------------

/// An HTTP answer, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The body as JSON, or `Value::Null` when it is empty or not JSON.
    pub body: Value,
    pub text: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The problem's `code` member, if this is an error body.
    pub fn code(&self) -> Option<&str> {
        self.body["code"].as_str()
    }

    /// The `id` member as a string (reservations).
    pub fn id(&self) -> Option<&str> {
        self.body["id"].as_str()
    }

    /// Why this is not the RFC 9457 problem `status`/`code` it should be, if it is not.
    pub fn problem_mismatch(&self, status: u16, code: &str) -> Option<String> {
        let content_type = self.header("content-type").unwrap_or_default();
        let shape_ok = ["type", "title", "detail"]
            .iter()
            .all(|m| self.body[*m].is_string())
            && self.body["status"].as_u64() == Some(u64::from(self.status.as_u16()));
        (self.status.as_u16() != status
            || self.code() != Some(code)
            || content_type != "application/problem+json"
            || !shape_ok)
            .then(|| format!("expected {status} {code} as problem+json, got {self}"))
    }

    /// Panics unless this is the problem `status`/`code`.
    #[track_caller]
    pub fn assert_problem(&self, status: u16, code: &str) {
        if let Some(mismatch) = self.problem_mismatch(status, code) {
            panic!("{mismatch}");
        }
    }

    #[track_caller]
    pub fn assert_status(&self, status: u16) {
        assert_eq!(self.status.as_u16(), status, "expected {status}, got {self}");
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let content_type = self.header("content-type").unwrap_or("-");
        write!(f, "{} [{content_type}] {}", self.status, self.text)
    }
}

/// The answers to concurrent requests that share one `Idempotency-Key`: the reservation ids the
/// 201s carry, and how many 201s were originals rather than replays. Panics on any answer but a
/// 201 or `409 idempotency_in_flight`.
pub fn keyed_successes(replies: Vec<anyhow::Result<Reply>>) -> anyhow::Result<(HashSet<String>, usize)> {
    let mut ids = HashSet::new();
    let mut fresh = 0;
    for reply in replies {
        let reply = reply?;
        if reply.status == StatusCode::CREATED {
            ids.insert(reply.id().unwrap_or_default().to_owned());
            if reply.header("idempotent-replayed").is_none() {
                fresh += 1;
            }
        } else {
            reply.assert_problem(409, "idempotency_in_flight");
        }
    }
    Ok((ids, fresh))
}

/// Sends each `(description, request, status, code)` and lists those not refused with that status
/// and problem code, one line each.
pub async fn mismatches(
    cases: Vec<(&'static str, RequestBuilder, u16, &'static str)>,
) -> anyhow::Result<Vec<String>> {
    let mut failures = Vec::new();
    for (what, request, status, code) in cases {
        if let Some(mismatch) = send(request).await?.problem_mismatch(status, code) {
            failures.push(format!("{what}: {mismatch}"));
        }
    }
    Ok(failures)
}

/// Sends each `(description, request)` and lists those not refused with `status` and `code`.
pub async fn refusals(
    cases: Vec<(&'static str, RequestBuilder)>,
    status: u16,
    code: &'static str,
) -> anyhow::Result<Vec<String>> {
    mismatches(
        cases
            .into_iter()
            .map(|(what, request)| (what, request, status, code))
            .collect(),
    )
    .await
}

pub async fn send(request: RequestBuilder) -> anyhow::Result<Reply> {
    let response = request.send().await.context("sending a request")?;
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.context("reading a response body")?;
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(Reply {
        status,
        headers,
        body,
        text,
    })
}

/// Parses an RFC 3339 timestamp member such as `expires_at`.
pub fn timestamp(value: &Value) -> anyhow::Result<DateTime<Utc>> {
    let raw = value.as_str().with_context(|| format!("{value} is no string"))?;
    Ok(DateTime::parse_from_rfc3339(raw)
        .with_context(|| format!("{raw:?} is no timestamp"))?
        .with_timezone(&Utc))
}

// ---------------------------------------------------------------------------------------------
// Stampedes
// ---------------------------------------------------------------------------------------------

/// A claim the server granted (201).
#[derive(Debug, Clone)]
pub struct Grant {
    pub user: String,
    pub id: Uuid,
}

/// How every request of a stampede ended.
#[derive(Debug, Default)]
pub struct Outcome {
    pub requests: usize,
    pub granted: Vec<Grant>,
    /// Every other HTTP answer, by `"<status> <code>"`.
    pub refused: BTreeMap<String, usize>,
    /// Requests that got no (complete) HTTP answer.
    pub unanswered: Vec<String>,
    /// The slowest answer, for the failure messages.
    pub slowest: Duration,
    /// The first reply of each kind of refusal, for assertions on its headers and body.
    pub refusal_samples: BTreeMap<String, Reply>,
    /// Clients that sent their claim again because the server never read it (only with
    /// [`Stampede::retrying_unread`]).
    pub retried: usize,
}

impl Outcome {
    pub fn refused(&self, key: &str) -> usize {
        self.refused.get(key).copied().unwrap_or(0)
    }
}

/// Many users claiming one unit each of one event, all released at the same instant.
pub struct Stampede {
    client: Client,
    /// The reservation URL on each server; user `i` claims through `urls[i % urls.len()]`.
    urls: Vec<String>,
    users: Vec<String>,
    /// Incremented as each request ends (answered or not), so a test can act mid-stampede.
    pub finished: Arc<AtomicUsize>,
    /// Whether a request the server provably never read is sent again (see [`Stampede::retrying_unread`]).
    retry_unread: bool,
}

/// How often one client of a [`Stampede::retrying_unread`] stampede sends its claim again.
const UNREAD_RETRIES: usize = 3;

/// Whether the server answered without having read the request: a `408 Request Timeout` (actix
/// sends it when no request head arrived within its client request timeout), or an answer that
/// came before the request was even sent (hyper's "unexpected message").
fn never_read(reply: &anyhow::Result<Reply>) -> bool {
    match reply {
        Ok(reply) => reply.status == StatusCode::REQUEST_TIMEOUT,
        Err(error) => format!("{error:#}").contains("received unexpected message from connection"),
    }
}

impl Stampede {
    /// `users` each send one `POST {address}/v1/events/{event_id}/reservations` with no body.
    pub fn new(client: &Client, address: &str, event_id: i64, users: Vec<String>) -> Stampede {
        Stampede::round_robin(client, &[address], event_id, users)
    }

    /// Like [`Stampede::new`] over several servers: user `i` claims through `addresses[i % n]`.
    pub fn round_robin<A: AsRef<str>>(
        client: &Client,
        addresses: &[A],
        event_id: i64,
        users: Vec<String>,
    ) -> Stampede {
        let urls = addresses
            .iter()
            .map(|address| format!("{}/v1/events/{event_id}/reservations", address.as_ref()))
            .collect();
        Stampede {
            client: client.clone(),
            urls,
            users,
            finished: Arc::default(),
            retry_unread: false,
        }
    }

    /// A client whose claim the server never read (see [`never_read`]) sends it again, up to
    /// `UNREAD_RETRIES` times; [`Outcome::retried`] counts those. For bursts larger than debug
    /// builds on this machine read within actix's 5 s client request timeout: such a claim had
    /// no effect, so sending it again changes nothing the stampede checks.
    pub fn retrying_unread(mut self) -> Stampede {
        self.retry_unread = true;
        self
    }

    /// `count` distinct user names starting with `prefix`.
    pub fn users(prefix: &str, count: usize) -> Vec<String> {
        (0..count).map(|i| format!("{prefix}-{i}")).collect()
    }

    pub async fn run(self) -> Outcome {
        let requests = self.users.len();
        // why: every request is built and parked first, then all are released together, so the
        // server sees one burst rather than a ramp.
        let start = Arc::new(tokio::sync::Barrier::new(requests));
        let tasks: Vec<_> = self
            .users
            .into_iter()
            .enumerate()
            .map(|(i, user)| {
                let (client, url, start, finished, retry_unread) = (
                    self.client.clone(),
                    self.urls[i % self.urls.len()].clone(),
                    start.clone(),
                    self.finished.clone(),
                    self.retry_unread,
                );
                tokio::spawn(async move {
                    let request = client.post(&url).header("x-user-id", &user);
                    start.wait().await;
                    let began = Instant::now();
                    let mut reply = send(request).await;
                    let mut retries = 0;
                    while retry_unread && retries < UNREAD_RETRIES && never_read(&reply) {
                        retries += 1;
                        reply = send(client.post(&url).header("x-user-id", &user)).await;
                    }
                    finished.fetch_add(1, Ordering::Relaxed);
                    (user, reply, began.elapsed(), retries)
                })
            })
            .collect();
        let mut outcome = Outcome {
            requests,
            ..Outcome::default()
        };
        for task in tasks {
            let (user, reply, took, retries) = match task.await {
                Ok(done) => done,
                Err(error) => {
                    outcome.unanswered.push(format!("task failed: {error}"));
                    continue;
                }
            };
            outcome.slowest = outcome.slowest.max(took);
            outcome.retried += usize::from(retries > 0);
            match reply {
                Ok(reply) if reply.status == StatusCode::CREATED => {
                    match reply.id().and_then(|id| Uuid::parse_str(id).ok()) {
                        Some(id) => outcome.granted.push(Grant { user, id }),
                        None => outcome
                            .unanswered
                            .push(format!("201 without a reservation id: {reply}")),
                    }
                }
                Ok(reply) => {
                    let key = format!("{} {}", reply.status.as_u16(), reply.code().unwrap_or("-"));
                    *outcome.refused.entry(key.clone()).or_default() += 1;
                    outcome.refusal_samples.entry(key).or_insert(reply);
                }
                Err(error) => outcome.unanswered.push(format!("{error:#}")),
            }
        }
        outcome
    }
}

/// Checks a stampede in which each client asked for one of `units` units: exactly `units`
/// granted, each with its own reservation id and to its own user, every other client told
/// `409 sold_out`, and every request answered. `Err` lists every violation found.
/// Every claim a stampede saw acknowledged (201) is in `rows`, issued to its user.
pub fn assert_acknowledged_are_durable(outcome: &Outcome, rows: &[Row]) {
    let by_id: std::collections::HashMap<_, _> = rows.iter().map(|r| (r.id, r)).collect();
    for grant in &outcome.granted {
        let row = by_id.get(&grant.id);
        assert!(
            row.is_some_and(|r| r.user_id == grant.user && r.status == "issued"),
            "acknowledged claim {} of {} is not in the database: {row:?}",
            grant.id,
            grant.user
        );
    }
}

pub fn check_exact(outcome: &Outcome, units: usize) -> Result<(), String> {
    let mut violations = Vec::new();
    let granted = outcome.granted.len();
    if granted > units {
        violations.push(format!("oversell: {granted} claims granted for {units} units"));
    }
    if granted < units && outcome.requests >= units {
        violations.push(format!(
            "undersell: only {granted} of {units} units granted to {} clients",
            outcome.requests
        ));
    }
    let ids: HashSet<Uuid> = outcome.granted.iter().map(|g| g.id).collect();
    if ids.len() != granted {
        violations.push(format!(
            "double issue: {granted} grants carry only {} distinct ids",
            ids.len()
        ));
    }
    let users: HashSet<&str> = outcome.granted.iter().map(|g| g.user.as_str()).collect();
    if users.len() != granted {
        violations.push(format!(
            "double issue: {granted} grants went to only {} users",
            users.len()
        ));
    }
    let sold_out = outcome.refused("409 sold_out");
    let expected = outcome.requests.saturating_sub(units);
    if sold_out != expected {
        violations.push(format!(
            "{sold_out} clients were told sold_out, expected {expected}"
        ));
    }
    for (answer, count) in &outcome.refused {
        if answer != "409 sold_out" {
            violations.push(format!("unexpected answer {count} × {answer}"));
        }
    }
    if let Some(first) = outcome.unanswered.first() {
        violations.push(format!(
            "{} requests got no answer, first: {first}",
            outcome.unanswered.len()
        ));
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations.join("; "))
    }
}

// ---------------------------------------------------------------------------------------------
// Bulk jobs
// ---------------------------------------------------------------------------------------------

/// Whether a job JSON is in a final state.
pub fn is_final(job: &Value) -> bool {
    matches!(job["state"].as_str(), Some("succeeded" | "failed" | "cancelled"))
}

/// A bulk job's `totals`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub read: i64,
    pub issued: i64,
    pub skipped: i64,
    pub invalid: i64,
    pub unissued: i64,
}

impl Totals {
    /// The `totals` of a job JSON; fails if one is missing.
    pub fn of(job: &Value) -> anyhow::Result<Totals> {
        let number = |member: &str| {
            job["totals"][member]
                .as_i64()
                .with_context(|| format!("no totals.{member} in {job}"))
        };
        Ok(Totals {
            read: number("read")?,
            issued: number("issued")?,
            skipped: number("skipped")?,
            invalid: number("invalid")?,
            unissued: number("unissued")?,
        })
    }

    /// Whether every target read is accounted for once (true of a job that succeeded).
    pub fn adds_up(&self) -> bool {
        self.read == self.issued + self.skipped + self.invalid + self.unissued
    }
}

/// Writes `lines` to `path`, one per line.
pub fn write_lines(path: &Path, lines: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
    use std::io::Write;
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for line in lines {
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush().with_context(|| format!("writing {}", path.display()))
}

/// A request body that streams the file at `path` (no `Content-Length`: chunked).
pub async fn file_body(path: &Path) -> anyhow::Result<reqwest::Body> {
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    Ok(reqwest::Body::from(file))
}

/// `bytes`, gzip-compressed.
pub fn gzip(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?)
}

// ---------------------------------------------------------------------------------------------
// Webhook receivers
// ---------------------------------------------------------------------------------------------

/// One request a [`HookReceiver`] was sent, and how it answered.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub path: String,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    /// The body as JSON, or `Value::Null` when it is not JSON.
    pub body: Value,
    pub answered: u16,
}

impl Delivery {
    /// The `event` member of a generic JSON webhook body.
    pub fn event(&self) -> &str {
        self.body["event"].as_str().unwrap_or_default()
    }
}

/// A plain HTTP/1.1 server on 127.0.0.1:0 that records every request it is sent and answers
/// 500 to the first `failing` of them, 200 to the rest. Stops when dropped.
pub struct HookReceiver {
    pub port: u16,
    deliveries: Arc<tokio::sync::Mutex<Vec<Delivery>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HookReceiver {
    pub async fn start(failing: usize) -> anyhow::Result<HookReceiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a webhook receiver")?;
        let port = listener.local_addr()?.port();
        let deliveries = Arc::new(tokio::sync::Mutex::new(Vec::new()));
        let seen = Arc::new(AtomicUsize::new(0));
        let task = {
            let deliveries = deliveries.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (deliveries, seen) = (deliveries.clone(), seen.clone());
                    tokio::spawn(async move {
                        // why: a connection that breaks off mid-request is the sender's problem;
                        // what was recorded before stays recorded.
                        let _ = serve_hook_connection(stream, deliveries, seen, failing).await;
                    });
                }
            })
        };
        Ok(HookReceiver {
            port,
            deliveries,
            task,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every request received so far, in arrival order.
    pub async fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries.lock().await.clone()
    }

    /// Waits (at most `timeout`) until the requests received so far satisfy `done`, and returns
    /// them.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&[Delivery]) -> bool,
    ) -> anyhow::Result<Vec<Delivery>> {
        let deadline = Instant::now() + timeout;
        loop {
            let deliveries = self.deliveries().await;
            if done(&deliveries) {
                return Ok(deliveries);
            }
            if Instant::now() > deadline {
                let seen: Vec<String> = deliveries
                    .iter()
                    .map(|d| format!("{} {} -> {}", d.path, d.body, d.answered))
                    .collect();
                bail!("not received within {timeout:?}; received:\n{}", seen.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for HookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads HTTP/1.1 requests off one connection (keep-alive, `Content-Length` or chunked bodies)
/// until the peer closes it, recording and answering each.
async fn serve_hook_connection(
    stream: tokio::net::TcpStream,
    deliveries: Arc<tokio::sync::Mutex<Vec<Delivery>>>,
    seen: Arc<AtomicUsize>,
    failing: usize,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::io::BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if stream.read_line(&mut request_line).await? == 0 {
            return Ok(());
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        let mut headers = BTreeMap::new();
        loop {
            let mut line = String::new();
            if stream.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
            }
        }
        let mut body = Vec::new();
        if headers
            .get("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let mut size = String::new();
                stream.read_line(&mut size).await?;
                let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)?;
                let mut chunk = vec![0; size + 2];
                stream.read_exact(&mut chunk).await?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(length) = headers.get("content-length") {
            body = vec![0; length.parse()?];
            stream.read_exact(&mut body).await?;
        }
        let answered = if seen.fetch_add(1, Ordering::SeqCst) < failing {
            500
        } else {
            200
        };
        deliveries.lock().await.push(Delivery {
            path,
            headers,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            answered,
        });
        let reason = if answered == 200 {
            "OK"
        } else {
            "Internal Server Error"
        };
        let response = format!("HTTP/1.1 {answered} {reason}\r\ncontent-length: 0\r\n\r\n");
        stream.get_mut().write_all(response.as_bytes()).await?;
    }
}
