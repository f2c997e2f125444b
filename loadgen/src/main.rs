//! `loadgen`: the HTTP/1.1 load generator behind `bench/run.sh`.
//!
//! * `rate`: closed loop. Each connection is one keep-alive HTTP/1.1 connection that sends its
//!   next request as soon as the previous answer is read. Requests that start after the warm-up
//!   and end before the deadline are counted and timed.
//! * `burst`: opens (and optionally primes) every connection first, then releases one request on
//!   each at the same instant and reports the time until the last answer.
//! * `ws-fanout`: many WebSocket listeners on one event, then the sale of its last unit; the
//!   time until every listener has read `sold_out` (see `ws_fanout.rs`).
//!
//! `--target a:1,b:2,…` spreads the connections of `rate` and `burst` round-robin over several
//! servers (the nodes of a cluster) and reports the answered requests per server.
//!
//! Each run prints one JSON object on stdout. The client is deliberately lean (hyper's low-level
//! HTTP/1 connection, no pooling layer, no TLS) because it shares the machine with the server.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

mod ws_fanout;

type Sender = SendRequest<Full<Bytes>>;

/// Latencies are recorded in microseconds, from 1 µs to 10 minutes, to 3 significant figures.
const HIST_MAX_MICROS: u64 = 600_000_000;

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "HTTP/1.1 load generator for the firstcome benchmarks"
)]
struct Cli {
    /// Client worker threads [default: one per core].
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Closed loop over keep-alive connections for a fixed time.
    Rate(RateArgs),
    /// One request per connection, all released at the same instant.
    Burst(BurstArgs),
    /// Many WebSocket listeners on one event; time from the last unit's 201 to each `sold_out`.
    WsFanout(ws_fanout::FanoutArgs),
}

/// What every request looks like.
#[derive(Debug, Args)]
struct TargetArgs {
    /// Full URL, e.g. http://127.0.0.1:8080/healthz (plain HTTP only).
    #[arg(long)]
    url: String,
    /// HTTP method [default: GET for `rate`, POST for `burst`].
    #[arg(long)]
    method: Option<String>,
    /// Request body, sent as application/json unless a Content-Type header is given.
    #[arg(long)]
    body: Option<String>,
    /// Give each request a new `X-User-Id: PREFIX-<connection>-<n>`.
    #[arg(long, value_name = "PREFIX")]
    distinct_users: Option<String>,
    /// With `--distinct-users`: identify each user with an HS256 JWT signed with this secret
    /// (`Authorization: Bearer`, `sub` = the user, valid for an hour) instead of `X-User-Id`.
    #[arg(long, requires = "distinct_users")]
    jwt_secret: Option<String>,
    /// Send this fixed `X-User-Id` on every request.
    #[arg(long, conflicts_with = "distinct_users")]
    user: Option<String>,
    /// Extra header `Name: value`; repeatable.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Name reported in the output [default: the subcommand].
    #[arg(long)]
    scenario: Option<String>,
    /// Spread the connections over these servers (`host:port` or `http://host:port`;
    /// comma-separated or repeated): connection i goes to the (i mod n)-th, with that server
    /// as its Host. Path, method and body come from `--url` [default: the server in `--url`].
    #[arg(long = "target", value_name = "HOST:PORT", value_delimiter = ',')]
    targets: Vec<String>,
}

#[derive(Debug, Args)]
struct RateArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 256)]
    connections: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// A URL fetched (GET, on its own connection) when measuring starts and when it ends; both
    /// JSON answers are included in the output as `probe_before` and `probe_after`.
    #[arg(long)]
    probe_url: Option<String>,
    /// Header for the probe requests `Name: value`; repeatable.
    #[arg(long = "probe-header", value_name = "NAME: VALUE")]
    probe_headers: Vec<String>,
    /// Pace the load: this many requests per second over all connections, each connection on
    /// its own schedule; latency then counts from the scheduled send, so a stalled server shows
    /// (no coordinated omission). 0 sends each request as soon as the previous answer is read.
    #[arg(long, default_value_t = 0.0)]
    rps: f64,
}

#[derive(Debug, Args)]
struct BurstArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Connections, each sending exactly one measured request.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Before the release, send one GET to this path on every connection (e.g. /healthz), so
    /// the server has fully accepted each connection before the clock starts.
    #[arg(long, value_name = "PATH")]
    prime: Option<String>,
    /// Milliseconds to pause between the last connection being ready and the release.
    #[arg(long, default_value_t = 200)]
    settle_ms: u64,
    /// Seconds a request may take before it counts as an error.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let report = runtime.block_on(async {
        match cli.command {
            Command::Rate(args) => rate(args).await,
            Command::Burst(args) => burst(args).await,
            Command::WsFanout(args) => ws_fanout::ws_fanout(args).await,
        }
    })?;
    println!("{report}");
    Ok(())
}

/// How `X-User-Id` is set.
#[derive(Debug, Clone)]
enum Users {
    None,
    Fixed(HeaderValue),
    Distinct(String),
    /// Distinct users, each as a bearer token signed with the key.
    DistinctJwt(String, jsonwebtoken::EncodingKey),
}

/// An HS256 token for `user`, valid for an hour from now.
fn user_token(user: &str, key: &jsonwebtoken::EncodingKey) -> anyhow::Result<HeaderValue> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs()
        + 3600;
    let claims = serde_json::json!({ "sub": user, "exp": exp });
    let token =
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, key).context("signing a token")?;
    HeaderValue::from_str(&format!("Bearer {token}")).context("a token header")
}

/// One server to connect to: its address and the Host header its requests carry.
#[derive(Debug)]
struct Server {
    addr: String,
    host: HeaderValue,
}

/// A parsed target: where to connect and how to build each request.
#[derive(Debug)]
struct Template {
    /// Connection i talks to `servers[i % servers.len()]`; never empty.
    servers: Vec<Server>,
    method: Method,
    path: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    users: Users,
}

const USER_HEADER: HeaderName = HeaderName::from_static("x-user-id");

impl Template {
    fn new(args: &TargetArgs, default_method: Method) -> anyhow::Result<Self> {
        let (addr, path, host) = split_url(&args.url)?;
        let servers = if args.targets.is_empty() {
            vec![Server { addr, host }]
        } else {
            args.targets
                .iter()
                .map(|t| parse_server(t))
                .collect::<anyhow::Result<Vec<_>>>()?
        };
        let method = match &args.method {
            Some(m) => Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .with_context(|| format!("bad method {m:?}"))?,
            None => default_method,
        };
        let mut headers = args
            .headers
            .iter()
            .map(|h| parse_header(h))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let body = Bytes::from(args.body.clone().unwrap_or_default());
        if !body.is_empty() && !headers.iter().any(|(name, _)| name == CONTENT_TYPE) {
            headers.push((CONTENT_TYPE, HeaderValue::from_static("application/json")));
        }
        let users = match (&args.distinct_users, &args.user) {
            (Some(prefix), _) => match &args.jwt_secret {
                Some(secret) => Users::DistinctJwt(
                    prefix.clone(),
                    jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).context("the JWT secret")?,
                ),
                None => Users::Distinct(prefix.clone()),
            },
            (None, Some(user)) => {
                Users::Fixed(HeaderValue::from_str(user).with_context(|| format!("bad user {user:?}"))?)
            }
            (None, None) => Users::None,
        };
        Ok(Self {
            servers,
            method,
            path,
            headers,
            body,
            users,
        })
    }

    /// The server connection `conn` talks to.
    fn server(&self, conn: usize) -> &Server {
        &self.servers[conn % self.servers.len()]
    }

    /// The `n`-th request on connection `conn`.
    fn build(&self, conn: usize, n: u64) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut builder = Request::builder()
            .method(self.method.clone())
            .uri(self.path.clone())
            .header(HOST, self.server(conn).host.clone());
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        match &self.users {
            Users::None => {}
            Users::Fixed(user) => builder = builder.header(USER_HEADER, user.clone()),
            Users::Distinct(prefix) => {
                builder = builder.header(USER_HEADER, format!("{prefix}-{conn}-{n}"));
            }
            Users::DistinctJwt(prefix, key) => {
                builder = builder.header(AUTHORIZATION, user_token(&format!("{prefix}-{conn}-{n}"), key)?);
            }
        }
        builder
            .body(Full::new(self.body.clone()))
            .context("building a request")
    }
}

/// `http://host:port/path?q` → (`host:port` to connect to, `/path?q`, Host header).
fn split_url(url: &str) -> anyhow::Result<(String, Uri, HeaderValue)> {
    let uri: Uri = url.parse().with_context(|| format!("bad URL {url:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("only http:// URLs are supported, not {url:?}");
    }
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow!("URL {url:?} has no host"))?;
    let addr = format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(80));
    let path: Uri = uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .context("bad path")?;
    let host = HeaderValue::from_str(authority.as_str()).context("bad host")?;
    Ok((addr, path, host))
}

/// `host:port` or `http://host:port[/…]` (any path is ignored) → the server to connect to.
fn parse_server(raw: &str) -> anyhow::Result<Server> {
    let url = if raw.contains("://") {
        raw.to_owned()
    } else {
        format!("http://{raw}")
    };
    let (addr, _, host) = split_url(&url).with_context(|| format!("bad --target {raw:?}"))?;
    Ok(Server { addr, host })
}

fn parse_header(raw: &str) -> anyhow::Result<(HeaderName, HeaderValue)> {
    let (name, value) = raw
        .split_once(':')
        .ok_or_else(|| anyhow!("header {raw:?} is not `Name: value`"))?;
    Ok((
        HeaderName::from_bytes(name.trim().as_bytes())
            .with_context(|| format!("bad header name in {raw:?}"))?,
        HeaderValue::from_str(value.trim()).with_context(|| format!("bad header value in {raw:?}"))?,
    ))
}

/// Opens one keep-alive HTTP/1.1 connection; its I/O runs on its own task.
async fn connect(addr: &str) -> anyhow::Result<Sender> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Sends one request and reads the whole answer.
async fn exchange(sender: &mut Sender, req: Request<Full<Bytes>>) -> anyhow::Result<(u16, Bytes)> {
    sender.ready().await?;
    let response = sender.send_request(req).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, HIST_MAX_MICROS, 3).map_err(|e| anyhow!("histogram: {e:?}"))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Microseconds as milliseconds (three decimals, so exact to the microsecond).
fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// Percentiles of a latency histogram, in milliseconds.
fn percentiles(hist: &Histogram<u64>, into: &mut Map<String, Value>, prefix: &str) {
    let empty = hist.is_empty();
    let at = |q: f64| {
        if empty { 0.0 } else { ms(hist.value_at_quantile(q)) }
    };
    into.insert(format!("{prefix}p50_ms"), json!(at(0.50)));
    into.insert(format!("{prefix}p90_ms"), json!(at(0.90)));
    into.insert(format!("{prefix}p99_ms"), json!(at(0.99)));
    into.insert(
        format!("{prefix}max_ms"),
        json!(if empty { 0.0 } else { ms(hist.max()) }),
    );
    into.insert(
        format!("{prefix}mean_ms"),
        json!(if empty {
            0.0
        } else {
            (hist.mean()).round() / 1000.0
        }),
    );
}

/// The first answer body seen for each non-2xx status, to tell refusals apart.
type Samples = BTreeMap<u16, String>;

/// Longest sample body kept, in bytes.
const SAMPLE_LEN: usize = 300;

fn keep_sample(samples: &mut Samples, code: u16, body: &[u8]) {
    if !(200..300).contains(&code) && !samples.contains_key(&code) {
        let text = String::from_utf8_lossy(&body[..body.len().min(SAMPLE_LEN)]).into_owned();
        samples.insert(code, text);
    }
}

fn samples_json(samples: &Samples) -> Value {
    Value::Object(
        samples
            .iter()
            .map(|(code, body)| (code.to_string(), json!(body)))
            .collect(),
    )
}

fn status_json(status: &BTreeMap<u16, u64>) -> Value {
    Value::Object(
        status
            .iter()
            .map(|(code, n)| (code.to_string(), json!(n)))
            .collect(),
    )
}

/// The answered requests per server, in `--target` order.
fn targets_json(template: &Template, per_server: &[u64]) -> Value {
    Value::Array(
        template
            .servers
            .iter()
            .zip(per_server)
            .map(|(server, requests)| json!({ "target": server.addr, "requests": requests }))
            .collect(),
    )
}

/// GETs a JSON document (the server's stats) around the measurement, each time on a fresh
/// connection (an idle one would hit the server's keep-alive timeout).
struct Probe {
    addr: String,
    path: Uri,
    host: HeaderValue,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Probe {
    async fn fetch(&self) -> anyhow::Result<Value> {
        let mut builder = Request::get(self.path.clone()).header(HOST, self.host.clone());
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        let req = builder.body(Full::new(Bytes::new()))?;
        let mut sender = connect(&self.addr)
            .await
            .context("opening the probe connection")?;
        let (status, body) = exchange(&mut sender, req).await?;
        if status != 200 {
            bail!("probe answered {status}");
        }
        serde_json::from_slice(&body).context("the probe's answer is not JSON")
    }
}

/// What one connection of a `rate` run measured.
struct ConnTally {
    hist: Histogram<u64>,
    status: BTreeMap<u16, u64>,
    samples: Samples,
    errors: u64,
    reconnects: u64,
}

async fn rate(args: RateArgs) -> anyhow::Result<Value> {
    if args.connections == 0 || args.duration.is_nan() || args.duration <= 0.0 || args.warmup < 0.0 {
        bail!("need at least one connection, a positive duration and a non-negative warm-up");
    }
    let template = Arc::new(Template::new(&args.target, Method::GET)?);
    let probe = match &args.probe_url {
        Some(url) => {
            let (addr, path, host) = split_url(url)?;
            let headers = args
                .probe_headers
                .iter()
                .map(|h| parse_header(h))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Some(Probe {
                addr,
                path,
                host,
                headers,
            })
        }
        None => None,
    };

    // Connect everything before the clock starts.
    let mut senders = Vec::with_capacity(args.connections);
    for idx in 0..args.connections {
        senders.push(connect(&template.server(idx).addr).await?);
    }
    let begin = Instant::now();
    let measure_from = begin + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);

    let mut tasks = Vec::with_capacity(args.connections);
    for (idx, sender) in senders.into_iter().enumerate() {
        let template = template.clone();
        let interval = (args.rps > 0.0).then(|| Duration::from_secs_f64(args.connections as f64 / args.rps));
        tasks.push(tokio::spawn(rate_connection(
            idx,
            sender,
            template,
            measure_from,
            end,
            interval,
        )));
    }

    let mut probe_before = Value::Null;
    let mut probe_after = Value::Null;
    if let Some(probe) = probe {
        tokio::time::sleep_until(measure_from.into()).await;
        probe_before = probe.fetch().await?;
        tokio::time::sleep_until(end.into()).await;
        probe_after = probe.fetch().await?;
    }

    let mut hist = histogram()?;
    let mut status = BTreeMap::new();
    let mut samples = Samples::new();
    let (mut errors, mut reconnects) = (0, 0);
    let mut per_server = vec![0u64; template.servers.len()];
    for (idx, task) in tasks.into_iter().enumerate() {
        let tally = task.await.context("a connection task panicked")??;
        per_server[idx % template.servers.len()] += tally.hist.len();
        hist.add(&tally.hist)
            .map_err(|e| anyhow!("merging histograms: {e:?}"))?;
        for (code, body) in tally.samples {
            samples.entry(code).or_insert(body);
        }
        for (code, n) in tally.status {
            *status.entry(code).or_insert(0) += n;
        }
        errors += tally.errors;
        reconnects += tally.reconnects;
    }
    let requests = hist.len();
    let mut out = Map::new();
    out.insert(
        "scenario".into(),
        json!(args.target.scenario.as_deref().unwrap_or("rate")),
    );
    out.insert("mode".into(), json!("rate"));
    out.insert("rps_target".into(), json!(args.rps));
    out.insert("url".into(), json!(args.target.url));
    out.insert("method".into(), json!(template.method.as_str()));
    out.insert("connections".into(), json!(args.connections));
    out.insert("seconds".into(), json!(args.duration));
    out.insert("warmup".into(), json!(args.warmup));
    out.insert("requests".into(), json!(requests));
    out.insert(
        "rps".into(),
        json!((requests as f64 / args.duration * 10.0).round() / 10.0),
    );
    out.insert("errors".into(), json!(errors));
    out.insert("reconnects".into(), json!(reconnects));
    out.insert("status".into(), status_json(&status));
    out.insert("samples".into(), samples_json(&samples));
    percentiles(&hist, &mut out, "");
    if !args.target.targets.is_empty() {
        out.insert("targets".into(), targets_json(&template, &per_server));
    }
    if args.probe_url.is_some() {
        out.insert("probe_before".into(), probe_before);
        out.insert("probe_after".into(), probe_after);
    }
    Ok(Value::Object(out))
}

/// One closed-loop connection: request, read the answer, repeat until `end`. Reconnects if the
/// connection breaks (and counts it).
async fn rate_connection(
    idx: usize,
    sender: Sender,
    template: Arc<Template>,
    measure_from: Instant,
    end: Instant,
    interval: Option<Duration>,
) -> anyhow::Result<ConnTally> {
    // Paced connections start spread over one interval, not all at once.
    let mut next = interval.map(|i| Instant::now() + i.mul_f64(idx as f64 % 97.0 / 97.0));
    let mut tally = ConnTally {
        hist: histogram()?,
        status: BTreeMap::new(),
        samples: Samples::new(),
        errors: 0,
        reconnects: 0,
    };
    let mut sender = Some(sender);
    let mut n: u64 = 0;
    loop {
        let started = Instant::now();
        if started >= end {
            break;
        }
        let current = match sender.as_mut() {
            Some(s) => s,
            None => match connect(&template.server(idx).addr).await {
                Ok(s) => {
                    tally.reconnects += 1;
                    sender.insert(s)
                }
                Err(_) => {
                    tally.errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let req = template.build(idx, n)?;
        n += 1;
        let started = match (next.as_mut(), interval) {
            (Some(at), Some(every)) => {
                tokio::time::sleep_until((*at).into()).await;
                let scheduled = *at;
                *at += every;
                scheduled
            }
            _ => Instant::now(),
        };
        if started >= end {
            break;
        }
        let outcome = exchange(current, req).await;
        let done = Instant::now();
        let counted = started >= measure_from && done <= end;
        match outcome {
            Ok((code, body)) => {
                if counted {
                    tally.hist.saturating_record(micros(done - started).max(1));
                    *tally.status.entry(code).or_insert(0) += 1;
                    keep_sample(&mut tally.samples, code, &body);
                }
            }
            Err(_) => {
                if counted {
                    tally.errors += 1;
                }
                sender = None;
            }
        }
    }
    Ok(tally)
}

/// What one client of a `burst` measured: status, latency from its own send, and time from the
/// release to its answer.
type BurstOutcome = anyhow::Result<(u16, Bytes, Duration, Duration)>;

async fn burst(args: BurstArgs) -> anyhow::Result<Value> {
    if args.clients == 0 {
        bail!("need at least one client");
    }
    let template = Arc::new(Template::new(&args.target, Method::POST)?);
    let prime = match &args.prime {
        Some(path) => Some(
            path.parse::<Uri>()
                .with_context(|| format!("bad prime path {path:?}"))?,
        ),
        None => None,
    };
    let timeout = Duration::from_secs_f64(args.timeout);
    let (release_tx, release_rx) = watch::channel::<Option<Instant>>(None);
    let (ready_tx, mut ready_rx) = mpsc::channel::<anyhow::Result<()>>(args.clients);

    let mut tasks = Vec::with_capacity(args.clients);
    for idx in 0..args.clients {
        let template = template.clone();
        let prime = prime.clone();
        let mut release = release_rx.clone();
        let ready = ready_tx.clone();
        tasks.push(tokio::spawn(async move {
            let setup = async {
                let mut sender = connect(&template.server(idx).addr).await?;
                if let Some(path) = prime {
                    let req = Request::get(path)
                        .header(HOST, template.server(idx).host.clone())
                        .body(Full::new(Bytes::new()))?;
                    exchange(&mut sender, req).await.context("priming")?;
                }
                let req = template.build(idx, 0)?;
                anyhow::Ok((sender, req))
            }
            .await;
            let (mut sender, req) = match setup {
                Ok(ok) => {
                    let _ = ready.send(Ok(())).await;
                    ok
                }
                Err(e) => {
                    let _ = ready.send(Err(anyhow!("{e:#}"))).await;
                    return None;
                }
            };
            drop(ready);
            let released_at = match release.wait_for(Option::is_some).await {
                Ok(at) => (*at)?,
                Err(_) => return None,
            };
            let started = Instant::now();
            let outcome: BurstOutcome = match tokio::time::timeout(timeout, exchange(&mut sender, req)).await
            {
                Ok(Ok((code, body))) => {
                    let done = Instant::now();
                    Ok((code, body, done - started, done - released_at))
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(anyhow!("timed out")),
            };
            Some(outcome)
        }));
    }
    drop(ready_tx);

    let connect_started = Instant::now();
    let mut connected = 0usize;
    let mut connect_errors = 0usize;
    let mut first_connect_error = None;
    while let Some(result) = ready_rx.recv().await {
        match result {
            Ok(()) => connected += 1,
            Err(e) => {
                connect_errors += 1;
                first_connect_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let connect_ms = ms(micros(connect_started.elapsed()));
    tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;

    let released_at = Instant::now();
    release_tx
        .send(Some(released_at))
        .map_err(|_| anyhow!("no client is waiting for the release"))?;

    let mut hist = histogram()?;
    let mut since_release = histogram()?;
    let mut status = BTreeMap::new();
    let mut samples = Samples::new();
    let mut errors = 0u64;
    let mut first_error = None;
    let mut all_answered = Duration::ZERO;
    let mut per_server = vec![0u64; template.servers.len()];
    for (idx, task) in tasks.into_iter().enumerate() {
        match task.await.context("a client task panicked")? {
            None => {}
            Some(Ok((code, body, latency, after_release))) => {
                per_server[idx % template.servers.len()] += 1;
                keep_sample(&mut samples, code, &body);
                hist.saturating_record(micros(latency).max(1));
                since_release.saturating_record(micros(after_release).max(1));
                *status.entry(code).or_insert(0) += 1;
                all_answered = all_answered.max(after_release);
            }
            Some(Err(e)) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let mut out = Map::new();
    out.insert(
        "scenario".into(),
        json!(args.target.scenario.as_deref().unwrap_or("burst")),
    );
    out.insert("mode".into(), json!("burst"));
    out.insert("url".into(), json!(args.target.url));
    out.insert("method".into(), json!(template.method.as_str()));
    out.insert("clients".into(), json!(args.clients));
    out.insert("connected".into(), json!(connected));
    out.insert("connect_errors".into(), json!(connect_errors));
    out.insert("connect_ms".into(), json!(connect_ms));
    out.insert("requests".into(), json!(hist.len()));
    out.insert("errors".into(), json!(errors));
    out.insert("status".into(), status_json(&status));
    out.insert("samples".into(), samples_json(&samples));
    out.insert("all_answered_ms".into(), json!(ms(micros(all_answered))));
    percentiles(&hist, &mut out, "");
    percentiles(&since_release, &mut out, "release_");
    if !args.target.targets.is_empty() {
        out.insert("targets".into(), targets_json(&template, &per_server));
    }
    if let Some(e) = first_connect_error {
        out.insert("first_connect_error".into(), json!(e));
    }
    if let Some(e) = first_error {
        out.insert("first_error".into(), json!(e));
    }
    // Keep the release channel alive until every client has been awaited.
    drop(release_tx);
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_address_path_and_host() -> anyhow::Result<()> {
        let (addr, path, host) = split_url("http://127.0.0.1:8080/v1/events/3/reservations")?;
        assert_eq!(addr, "127.0.0.1:8080");
        assert_eq!(path, "/v1/events/3/reservations");
        assert_eq!(host, "127.0.0.1:8080");
        let (addr, path, _) = split_url("http://localhost")?;
        assert_eq!(addr, "localhost:80");
        assert_eq!(path, "/");
        assert!(split_url("https://example.com/").is_err());
        Ok(())
    }

    #[test]
    fn distinct_users_and_json_bodies() -> anyhow::Result<()> {
        let args = TargetArgs {
            url: "http://127.0.0.1:1/x".into(),
            method: None,
            body: Some(r#"{"quantity":1}"#.into()),
            distinct_users: Some("u".into()),
            jwt_secret: None,
            user: None,
            headers: vec!["Authorization: Bearer t".into()],
            scenario: None,
            targets: Vec::new(),
        };
        let template = Template::new(&args, Method::POST)?;
        let req = template.build(7, 42)?;
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.headers()["x-user-id"], "u-7-42");
        assert_eq!(req.headers()["content-type"], "application/json");
        assert_eq!(req.headers()["authorization"], "Bearer t");
        assert_eq!(req.headers()["host"], "127.0.0.1:1");
        Ok(())
    }

    #[test]
    fn distinct_users_as_signed_tokens() -> anyhow::Result<()> {
        let secret = "a-test-secret-of-at-least-32-bytes!";
        let args = TargetArgs {
            url: "http://127.0.0.1:1/x".into(),
            method: None,
            body: None,
            distinct_users: Some("u".into()),
            jwt_secret: Some(secret.into()),
            user: None,
            headers: Vec::new(),
            scenario: None,
            targets: Vec::new(),
        };
        let req = Template::new(&args, Method::POST)?.build(3, 9)?;
        let header = req.headers()["authorization"].to_str()?;
        let token = header.strip_prefix("Bearer ").context("a bearer token")?;
        let key = jsonwebtoken::DecodingKey::from_secret(secret.as_bytes())?;
        let claims: serde_json::Value =
            jsonwebtoken::decode(token, &key, &jsonwebtoken::Validation::default())?.claims;
        assert_eq!(claims["sub"], "u-3-9");
        assert!(req.headers().get("x-user-id").is_none());
        Ok(())
    }

    #[test]
    fn connections_are_spread_round_robin_over_the_targets() -> anyhow::Result<()> {
        let cli = Cli::try_parse_from([
            "loadgen",
            "rate",
            "--url",
            "http://127.0.0.1:1/v1/events/4/reservations",
            "--target",
            "127.0.0.1:8081,http://127.0.0.1:8082",
            "--target",
            "localhost:8083",
        ])?;
        let Command::Rate(args) = cli.command else {
            bail!("expected the rate subcommand");
        };
        let template = Template::new(&args.target, Method::POST)?;
        let addrs: Vec<_> = (0..4).map(|conn| template.server(conn).addr.as_str()).collect();
        assert_eq!(
            addrs,
            [
                "127.0.0.1:8081",
                "127.0.0.1:8082",
                "localhost:8083",
                "127.0.0.1:8081"
            ]
        );
        let req = template.build(1, 0)?;
        assert_eq!(req.headers()["host"], "127.0.0.1:8082");
        assert_eq!(req.uri(), "/v1/events/4/reservations");
        assert!(parse_server("https://127.0.0.1:8081").is_err());
        assert!(parse_server("").is_err());
        Ok(())
    }

    #[test]
    fn without_targets_every_connection_goes_to_the_url() -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(["loadgen", "burst", "--url", "http://127.0.0.1:9/x"])?;
        let Command::Burst(args) = cli.command else {
            bail!("expected the burst subcommand");
        };
        let template = Template::new(&args.target, Method::POST)?;
        assert_eq!(template.servers.len(), 1);
        assert_eq!(template.server(5).addr, "127.0.0.1:9");
        Ok(())
    }
}
