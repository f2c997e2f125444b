//! The several-node harness. [`Cluster`] runs N `firstcome` processes on one fresh PostgreSQL
//! database, gating through one Redis under a key prefix of the test's own (deleted again when
//! the cluster drops).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::Client;
use uuid::Uuid;

use crate::helpers::{Backend, Counts, TestApp, TestDb};

const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
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
