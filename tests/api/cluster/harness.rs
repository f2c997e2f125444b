//! The several-node harness. [`Cluster`] runs N `firstcome` processes on one fresh PostgreSQL
//! database, gating through one Redis under a key prefix of the test's own (deleted again when
//! the cluster drops). [`TestRedis`] is a `redis-server` of the test's own that can be killed
//! (-9) and started again, empty, on the same port. [`DbProxy`] sits between one node and
//! PostgreSQL and can stop passing the database's answers on, so that node's allocations are
//! made in Redis but never acknowledged as committed.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use reqwest::Client;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use uuid::Uuid;

use crate::helpers::{Backend, Counts, TestApp, TestDb, log_tail, serve_command};

const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// How long a `redis-server` may take to answer PING after it was started.
const REDIS_STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server that should refuse to start may take to exit.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(30);
/// Keys deleted per `DEL` when a cluster cleans up.
const DEL_CHUNK: usize = 500;
/// Upper bound on one exchange of a stampede client.
const STAMPEDE_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The Redis most cluster tests share, each under its own prefix: `FIRSTCOME_TEST_REDIS_URL`,
/// or a local one.
pub fn shared_redis_url() -> String {
    std::env::var("FIRSTCOME_TEST_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned())
}

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

/// The Redis a cluster gates through, and the prefix every one of its keys starts with.
struct Gate {
    url: String,
    prefix: String,
}

/// N server processes on one PostgreSQL database. Fields drop in order, and [`Drop`] kills
/// every node before it deletes the cluster's Redis keys, so no node writes them again.
pub struct Cluster {
    /// The nodes in start order; a killed node keeps its slot (see [`TestApp::is_running`]).
    pub nodes: Vec<TestApp>,
    pub db: Arc<TestDb>,
    gate: Option<Gate>,
    /// The `serve` flags every node gets (after the Redis ones).
    args: Vec<String>,
    /// Round-robin position of [`Cluster::next`].
    turn: AtomicUsize,
    /// The client for stampedes (see [`Cluster::client`]).
    client: Client,
}

impl Cluster {
    /// `nodes` servers on a fresh PostgreSQL database, gating through the shared Redis under a
    /// fresh key prefix, each also given `args`.
    pub async fn on_shared_redis(nodes: usize, args: &[&str]) -> anyhow::Result<Cluster> {
        Cluster::start(nodes, Some(&shared_redis_url()), args).await
    }

    /// `nodes` servers on a fresh PostgreSQL database, gating through the Redis at `redis_url`
    /// under a fresh key prefix, or, with `None`, each through nothing but its own memory.
    pub async fn start(nodes: usize, redis_url: Option<&str>, args: &[&str]) -> anyhow::Result<Cluster> {
        let gate = match redis_url {
            Some(url) => {
                let pong = redis_cli_async(url, &["PING"]).await;
                if !pong.as_deref().is_ok_and(|reply| reply.trim() == "PONG") {
                    bail!("no Redis answers at {url} (set FIRSTCOME_TEST_REDIS_URL): {pong:?}");
                }
                Some(Gate {
                    url: url.to_owned(),
                    prefix: format!("t-{}", Uuid::now_v7().simple()),
                })
            }
            None => None,
        };
        let mut cluster = Cluster {
            nodes: Vec::with_capacity(nodes),
            db: Arc::new(TestDb::create(Backend::Postgres).await?),
            gate,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            turn: AtomicUsize::new(0),
            // why: a pool would keep the spare connections a burst opens; a debug-build node
            // that is busy for 5 s answers such an idle connection 408 and closes it, and the
            // next claim sent on it fails without ever having been read.
            client: Client::builder()
                .timeout(STAMPEDE_REQUEST_TIMEOUT)
                .pool_max_idle_per_host(0)
                .build()
                .context("building the stampede client")?,
        };
        // why: one after the other, so only the first node runs the migrations.
        for _ in 0..nodes {
            cluster.add_node(None).await?;
        }
        Ok(cluster)
    }

    /// Starts one more node with the cluster's flags, on the cluster's database, reached at
    /// `database_url` if given (the same database through a [`DbProxy`]); its index.
    pub async fn add_node(&mut self, database_url: Option<&str>) -> anyhow::Result<usize> {
        let index = self.nodes.len();
        let mut args = Vec::new();
        if let Some(gate) = &self.gate {
            args.extend(
                [
                    "--redis-url",
                    &gate.url,
                    "--redis-prefix",
                    &gate.prefix,
                    "--node-id",
                    &format!("node-{index}"),
                ]
                .map(str::to_owned),
            );
        }
        args.extend(self.args.iter().cloned());
        let database_url = database_url.unwrap_or(&self.db.url).to_owned();
        let log = self.db.dir().join(format!("node-{index}.log"));
        let node = TestApp::spawn_on(self.db.clone(), database_url, args, log)
            .await
            .with_context(|| format!("starting node {index}"))?;
        self.nodes.push(node);
        Ok(index)
    }

    /// Node `index` (running or not).
    pub fn node(&self, index: usize) -> &TestApp {
        &self.nodes[index]
    }

    /// The running nodes, one after the other: every call the next one.
    pub fn next(&self) -> anyhow::Result<&TestApp> {
        let running: Vec<&TestApp> = self.running().collect();
        anyhow::ensure!(!running.is_empty(), "no node is running");
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        Ok(running[turn % running.len()])
    }

    /// The nodes that are running, in index order.
    pub fn running(&self) -> impl Iterator<Item = &TestApp> {
        self.nodes.iter().filter(|node| node.is_running())
    }

    /// `http://127.0.0.1:<port>` of every running node, for [`crate::helpers::Stampede`].
    pub fn addresses(&self) -> Vec<String> {
        self.running().map(|node| node.address.clone()).collect()
    }

    /// A client for stampedes on any node: no idle connections are kept between requests.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// kill -9 of node `index`; its requests in flight get no answer.
    pub fn kill(&mut self, index: usize) {
        self.nodes[index].kill();
    }

    /// kill -9 of node `index` (if it runs), then a new process in its slot, with the same flags
    /// and database URL, on a new port.
    pub async fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        self.nodes[index]
            .restart()
            .await
            .with_context(|| format!("restarting node {index}"))
    }

    /// The live counts of `event` as each running node shows them (each read checks
    /// conservation), with the node's index.
    pub async fn counts_everywhere(&self, event: i64) -> anyhow::Result<Vec<(usize, Counts)>> {
        let mut all = Vec::new();
        for (index, node) in self.nodes.iter().enumerate() {
            if node.is_running() {
                let counts = node
                    .counts(event)
                    .await
                    .with_context(|| format!("reading event {event} on node {index}"))?;
                all.push((index, counts));
            }
        }
        Ok(all)
    }

    /// Every Redis key under this cluster's prefix (none without a Redis).
    pub async fn redis_keys(&self) -> anyhow::Result<Vec<String>> {
        let Some(gate) = &self.gate else {
            return Ok(Vec::new());
        };
        let (url, prefix) = (gate.url.clone(), gate.prefix.clone());
        tokio::task::spawn_blocking(move || scan(&url, &prefix))
            .await
            .context("scanning the Redis keys")?
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        if let Some(gate) = &self.gate
            && let Err(error) = delete_keys(&gate.url, &gate.prefix)
        {
            eprintln!("could not delete the Redis keys under {}: {error:#}", gate.prefix);
        }
    }
}

/// Runs `redis-cli -u <url> <args>` and returns what it printed.
fn redis_cli(url: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("redis-cli")
        .arg("-u")
        .arg(url)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running redis-cli")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    // why: redis-cli exits 0 on an error reply and prints it like any other reply.
    if !output.status.success() || stdout.starts_with("ERR") {
        bail!(
            "redis-cli {args:?} failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(stdout)
}

async fn redis_cli_async(url: &str, args: &[&str]) -> anyhow::Result<String> {
    let (url, args): (String, Vec<String>) = (url.to_owned(), args.iter().map(|a| (*a).to_owned()).collect());
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        redis_cli(&url, &args)
    })
    .await
    .context("running redis-cli")?
}

/// Every key that starts with `prefix` (`SCAN MATCH prefix*`).
fn scan(url: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
    let pattern = format!("{prefix}*");
    let listed = redis_cli(url, &["--scan", "--pattern", &pattern])?;
    let mut keys: Vec<String> = listed
        .lines()
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect();
    // why: SCAN may return a key more than once.
    keys.sort_unstable();
    keys.dedup();
    Ok(keys)
}

fn delete_keys(url: &str, prefix: &str) -> anyhow::Result<()> {
    for chunk in scan(url, prefix)?.chunks(DEL_CHUNK) {
        let mut args = vec!["DEL"];
        args.extend(chunk.iter().map(String::as_str));
        redis_cli(url, &args)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A Redis of the test's own
// ---------------------------------------------------------------------------------------------

/// A `redis-server` child process on a free port, with no persistence: killed (-9) and started
/// again, it comes back empty on the same port. Killed when dropped.
pub struct TestRedis {
    child: Option<Child>,
    pub port: u16,
    /// Its working directory and log.
    dir: tempfile::TempDir,
}

impl TestRedis {
    pub async fn start() -> anyhow::Result<TestRedis> {
        // why: the kernel picks a free port; redis-server binds it again right after (a race
        // with another process is possible but not likely on a test machine).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .context("picking a free port")?
            .port();
        let mut redis = TestRedis {
            child: None,
            port,
            dir: tempfile::tempdir().context("creating a directory for redis-server")?,
        };
        redis.launch().await?;
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// kill -9: every connection drops, every key is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// kill -9 (if it runs), then a new, empty `redis-server` on the same port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.launch().await
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let log_path = self.log_path();
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        writeln!(log, "--- starting redis-server on port {} ---", self.port)?;
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("sharing the redis log")?)
            .stderr(log)
            .spawn()
            .context("starting redis-server")?;
        self.child = Some(child);
        let url = self.url();
        let deadline = Instant::now() + REDIS_STARTUP_TIMEOUT;
        loop {
            if redis_cli_async(&url, &["PING"])
                .await
                .is_ok_and(|reply| reply.trim() == "PONG")
            {
                return Ok(());
            }
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait().context("waiting for redis-server")?,
                None => None,
            };
            if let Some(status) = exited {
                bail!(
                    "redis-server exited with {status}; its log ends with:\n{}",
                    log_tail(&log_path, 20)
                );
            }
            if Instant::now() > deadline {
                bail!("redis-server did not answer PING within {REDIS_STARTUP_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// A proxy that stalls the database's answers
// ---------------------------------------------------------------------------------------------

/// A TCP proxy in front of the database server of `database_url`. While stalled it still passes
/// everything the node sends (a COMMIT may reach the database) but holds back every answer, so
/// the node never learns what committed. When the node's side of a connection closes (kill -9),
/// the proxy closes the database side, which rolls back whatever was left open. Stops when
/// dropped.
pub struct DbProxy {
    /// `database_url` with the proxy's port.
    pub url: String,
    stalled: watch::Sender<bool>,
    accepting: tokio::task::JoinHandle<()>,
}

impl DbProxy {
    pub async fn start(database_url: &str) -> anyhow::Result<DbProxy> {
        let mut url = url::Url::parse(database_url).with_context(|| format!("parsing {database_url}"))?;
        let target = format!(
            "{}:{}",
            url.host_str().context("no host in the database URL")?,
            url.port().unwrap_or(5432)
        );
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the proxy")?;
        let port = listener.local_addr()?.port();
        url.set_port(Some(port))
            .map_err(|()| anyhow::anyhow!("cannot set a port on {database_url}"))?;
        let (stalled, watching) = watch::channel(false);
        let accepting = tokio::spawn(async move {
            // why: dropping the set (when the proxy's task is aborted) aborts every connection.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((node, _)) = listener.accept().await {
                connections.spawn(relay(node, target.clone(), watching.clone()));
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(DbProxy {
            url: url.to_string(),
            stalled,
            accepting,
        })
    }

    /// From now on, hold back every answer of the database.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Pass the database's answers on again.
    pub fn resume(&self) {
        self.stalled.send_replace(false);
    }
}

impl Drop for DbProxy {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// One proxied connection: ends (closing both sides) as soon as either side is done.
async fn relay(node: TcpStream, target: String, mut stalled: watch::Receiver<bool>) {
    let Ok(database) = TcpStream::connect(&target).await else {
        return;
    };
    let (mut from_node, mut to_node) = node.into_split();
    let (mut from_database, mut to_database) = database.into_split();
    let requests = tokio::io::copy(&mut from_node, &mut to_database);
    let answers = async {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            let read = from_database.read(&mut buffer).await?;
            if read == 0 {
                return std::io::Result::Ok(());
            }
            stalled
                .wait_for(|stalled| !*stalled)
                .await
                .map_err(std::io::Error::other)?;
            to_node.write_all(&buffer[..read]).await?;
        }
    };
    tokio::select! {
        _ = requests => {}
        _ = answers => {}
    }
}

// ---------------------------------------------------------------------------------------------
// A server that must refuse to start
// ---------------------------------------------------------------------------------------------

/// Runs `firstcome serve` on `database_url` with `args` and `env`, expecting it to exit by
/// itself; its exit status and everything it printed (stdout, then stderr). An error if it
/// started listening instead, or did not exit in time.
pub async fn refused_start(
    database_url: &str,
    args: &[&str],
    env: &[(&str, &str)],
    dir: &Path,
) -> anyhow::Result<(ExitStatus, String)> {
    let args: Vec<&str> = ["--bind", "127.0.0.1:0"]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    let mut command = serve_command(database_url, &args, env);
    // why: should it start after all, a default path it writes lands in the test's directory.
    command.current_dir(dir);
    let mut child = command.spawn().context("starting the firstcome binary")?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let mut stderr = child.stderr.take().context("no stderr pipe")?;
    // why: both pipes are drained at once, so neither can fill up and block the process.
    let errors = tokio::spawn(async move {
        let mut errors = String::new();
        stderr.read_to_string(&mut errors).await.map(|_| errors)
    });
    let mut lines = BufReader::new(stdout).lines();
    let mut printed = String::new();
    let listening = tokio::time::timeout(REFUSAL_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if line.starts_with("firstcome listening on") {
                return std::io::Result::Ok(Some(line));
            }
            printed.push_str(&line);
            printed.push('\n');
        }
        Ok(None)
    })
    .await
    .context("the server neither exited nor listened in time")??;
    if listening.is_some() {
        child.kill().await.context("stopping the server")?;
    }
    let status = tokio::time::timeout(REFUSAL_TIMEOUT, child.wait())
        .await
        .context("the server closed its output but did not exit")??;
    printed.push_str(&errors.await.context("reading stderr")??);
    if let Some(listening) = listening {
        bail!("the server started ({listening:?}) instead of refusing; it printed:\n{printed}");
    }
    Ok((status, printed))
}
