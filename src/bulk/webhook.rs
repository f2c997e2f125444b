//! # Webhooks: bulk-issuance job events, delivered in the background
//!
//! A bulk job tells operators what it is doing (`job.started`, `job.progress`, `job.succeeded`,
//! `job.failed`, `job.cancelled`) by POSTing to the targets configured with `--bulk-webhook`:
//! generic JSON (`{"event", "job", "sent_at"}`) or a Slack-compatible `{"text": ...}`.
//!
//! The job must never wait on a slow or dead receiver, so [`Notifier::send`] only enqueues. Each
//! target has its own worker task and bounded queue: a target that is down delays nobody but
//! itself, and one target's events arrive in the order they were sent (a worker holds the next
//! event until the current one is delivered or given up). Transient failures (connection
//! errors, timeouts, 408, 429, 5xx) are retried with exponential backoff, or after the
//! receiver's `Retry-After` (capped at the longest backoff); any other answer gives up at once,
//! since repeating the same request cannot change it. Every outcome is logged
//! and counted in [`crate::metrics::WEBHOOK_DELIVERIES_TOTAL`].
//!
//! Webhook URLs often are the credential (Slack's always are), so neither logs nor `Debug`
//! show a full URL: see [`WebhookTarget::redacted`].

use std::error::Error as StdError;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{SecondsFormat, Utc};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::{mpsc, watch};
use url::Url;

use crate::metrics::WEBHOOK_DELIVERIES_TOTAL;

/// Events waiting for one target. Progress events come every few seconds, so this is hours of
/// backlog for a target that is down; past it, new events for that target are dropped (and
/// logged) rather than making the job wait or memory grow.
const QUEUE_CAPACITY: usize = 1024;
/// How much of a refused response's body goes into the log line.
const LOGGED_BODY_BYTES: usize = 512;
const USER_AGENT: &str = concat!("firstcome/", env!("CARGO_PKG_VERSION"));
const SPEC_HELP: &str = "expected `URL`, `json=URL` or `slack=URL`";

/// What a target expects in the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookFormat {
    /// `{"event": "job.succeeded", "job": {...}, "sent_at": "<RFC 3339>"}`.
    Json,
    /// `{"text": "<one-line summary>"}`: Slack incoming webhooks and the chat tools that copy them.
    Slack,
}

impl WebhookFormat {
    fn prefix(self) -> &'static str {
        match self {
            WebhookFormat::Json => "json",
            WebhookFormat::Slack => "slack",
        }
    }
}

/// One place job events are POSTed to, parsed from `URL`, `json=URL` or `slack=URL`
/// (http or https only). Serialized back as `json=URL` / `slack=URL`, so it can live in the
/// settings (TOML file, environment, flags).
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookTarget {
    url: Url,
    format: WebhookFormat,
}

/// Why a `--bulk-webhook` value was refused. The value itself is not repeated: it may hold a
/// secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidWebhookTarget {
    #[error("empty webhook target: {SPEC_HELP}")]
    Empty,
    #[error("unknown webhook format `{0}`: {SPEC_HELP}")]
    UnknownFormat(String),
    #[error("the webhook URL does not parse ({0}): {SPEC_HELP}")]
    NotAUrl(url::ParseError),
    #[error("webhook URLs must be http or https, not `{0}`")]
    Scheme(String),
}

impl WebhookTarget {
    pub fn url(&self) -> &Url {
        &self.url
    }

    pub fn format(&self) -> WebhookFormat {
        self.format
    }

    /// The spec this target was parsed from, in canonical form (`json=URL` / `slack=URL`).
    /// Contains the full URL: for settings files, never for logs.
    pub fn spec(&self) -> String {
        format!("{}={}", self.format.prefix(), self.url)
    }

    /// The URL as logs show it: no credentials, query or fragment; for Slack targets no path
    /// either, since a Slack incoming-webhook path is the token.
    pub fn redacted(&self) -> String {
        let mut shown = self.url.origin().ascii_serialization();
        match self.format {
            WebhookFormat::Json => shown.push_str(self.url.path()),
            WebhookFormat::Slack => shown.push_str("/…"),
        }
        shown
    }
}

impl FromStr for WebhookTarget {
    type Err = InvalidWebhookTarget;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(InvalidWebhookTarget::Empty);
        }
        // why: a bare URL may hold `=` in its query, so `name=` is a format prefix only when the
        // name cannot be the start of a URL (no `:` or `/` before the `=`).
        let (format, url) = match spec.split_once('=') {
            Some((name, url)) if !name.contains([':', '/']) => {
                let format = if name.eq_ignore_ascii_case("json") {
                    WebhookFormat::Json
                } else if name.eq_ignore_ascii_case("slack") {
                    WebhookFormat::Slack
                } else {
                    return Err(InvalidWebhookTarget::UnknownFormat(name.to_owned()));
                };
                (format, url.trim())
            }
            _ => (WebhookFormat::Json, spec),
        };
        let url = Url::parse(url).map_err(InvalidWebhookTarget::NotAUrl)?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(InvalidWebhookTarget::Scheme(url.scheme().to_owned()));
        }
        Ok(WebhookTarget { url, format })
    }
}

impl fmt::Debug for WebhookTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.format.prefix(), self.redacted())
    }
}

impl Serialize for WebhookTarget {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.spec())
    }
}

impl<'de> Deserialize<'de> for WebhookTarget {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spec = String::deserialize(deserializer)?;
        spec.parse().map_err(serde::de::Error::custom)
    }
}

/// What happened to a bulk job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum JobEventKind {
    #[serde(rename = "job.started")]
    Started,
    /// Sent every `--bulk-progress-secs` while the job runs.
    #[serde(rename = "job.progress")]
    Progress,
    #[serde(rename = "job.succeeded")]
    Succeeded,
    #[serde(rename = "job.failed")]
    Failed,
    #[serde(rename = "job.cancelled")]
    Cancelled,
}

impl JobEventKind {
    /// The `event` field of the generic body, e.g. `job.succeeded`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobEventKind::Started => "job.started",
            JobEventKind::Progress => "job.progress",
            JobEventKind::Succeeded => "job.succeeded",
            JobEventKind::Failed => "job.failed",
            JobEventKind::Cancelled => "job.cancelled",
        }
    }
}

/// One notification: the job as `GET /v1/admin/jobs/{id}` renders it, and a one-line summary
/// for people (Slack's `text`).
#[derive(Debug, Clone)]
pub struct JobEvent {
    pub kind: JobEventKind,
    pub job: serde_json::Value,
    pub summary: String,
}

impl JobEvent {
    fn job_id(&self) -> Option<i64> {
        self.job.get("id").and_then(serde_json::Value::as_i64)
    }

    fn body(&self, format: WebhookFormat) -> serde_json::Result<Vec<u8>> {
        match format {
            WebhookFormat::Json => serde_json::to_vec(&serde_json::json!({
                "event": self.kind.as_str(),
                "job": self.job,
                "sent_at": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            })),
            WebhookFormat::Slack => serde_json::to_vec(&serde_json::json!({ "text": self.summary })),
        }
    }
}

/// How hard to try before giving an event up. Public fields so tests can shrink them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per event, the first included (0 counts as 1).
    pub max_attempts: u32,
    /// Wait after the first failed attempt; doubled after each further one.
    pub initial_backoff: Duration,
    /// Longest wait between attempts, also the cap on a receiver's `Retry-After`.
    pub max_backoff: Duration,
    /// Time allowed for one attempt, from connecting to the end of the response body.
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    /// 6 attempts, waiting 0.5 s, 1 s, 2 s, 4 s, 8 s between them (doubling, capped at 30 s),
    /// 10 s per attempt.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.initial_backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// Hands job events to every configured target without waiting for any of them.
///
/// Cheap to clone (all clones feed the same workers). The workers stop once every clone is
/// dropped and their queues are drained.
#[derive(Clone, Default)]
pub struct Notifier {
    lanes: Arc<[Lane]>,
}

/// The sending side of one target's worker.
struct Lane {
    shown: String,
    tx: mpsc::Sender<Arc<JobEvent>>,
    /// Events accepted into the queue so far; [`Notifier::flush`] waits for `done` to reach it.
    queued: AtomicU64,
    tally: watch::Receiver<Tally>,
}

/// What a worker has finished, published after each event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tally {
    done: u64,
    delivered: u64,
    failed: u64,
}

impl Notifier {
    /// A notifier with no targets: every call is a no-op.
    pub fn none() -> Self {
        Notifier::default()
    }

    /// Starts one worker task per target on the current tokio runtime (the actix system's, in
    /// the server), sharing one HTTP client. Fails outside a runtime, or if the client cannot
    /// be built. With no targets nothing is started.
    pub fn new(targets: Vec<WebhookTarget>, policy: RetryPolicy) -> anyhow::Result<Self> {
        if targets.is_empty() {
            return Ok(Notifier::none());
        }
        let runtime = tokio::runtime::Handle::try_current()
            .context("webhook delivery needs a tokio runtime to run on")?;
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            // why: a redirected POST may silently become a GET elsewhere; a receiver that has
            // moved should be reconfigured, so 3xx is reported like any refusal.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("building the webhook HTTP client")?;
        let policy = Arc::new(policy);
        let lanes = targets
            .into_iter()
            .map(|target| {
                let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
                let (tally_tx, tally) = watch::channel(Tally::default());
                let shown = target.redacted();
                let worker = Worker {
                    client: client.clone(),
                    policy: policy.clone(),
                    shown: shown.clone(),
                    target,
                    tally: tally_tx,
                };
                runtime.spawn(worker.run(rx));
                Lane {
                    shown,
                    tx,
                    queued: AtomicU64::new(0),
                    tally,
                }
            })
            .collect();
        Ok(Notifier { lanes })
    }

    /// Queues `event` for every target and returns at once; it never waits on the network or on
    /// a full queue.
    pub fn send(&self, event: JobEvent) {
        let Some((last, rest)) = self.lanes.split_last() else {
            return;
        };
        let event = Arc::new(event);
        for lane in rest {
            lane.enqueue(event.clone());
        }
        last.enqueue(event);
    }

    /// Waits until every event queued before this call has been delivered or given up, for at
    /// most `within`. Returns whether it got there; used on shutdown and by tests.
    pub async fn flush(&self, within: Duration) -> bool {
        let all = async {
            for lane in self.lanes.iter() {
                let wanted = lane.queued.load(Ordering::Acquire);
                let mut tally = lane.tally.clone();
                // An error means the worker is gone: nothing more will be done either way.
                let _ = tally.wait_for(|tally| tally.done >= wanted).await;
            }
        };
        tokio::time::timeout(within, all).await.is_ok()
    }

    #[cfg(test)]
    fn tallies(&self) -> Vec<Tally> {
        self.lanes.iter().map(|lane| *lane.tally.borrow()).collect()
    }
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.lanes.iter().map(|lane| &lane.shown))
            .finish()
    }
}

impl Lane {
    fn enqueue(&self, event: Arc<JobEvent>) {
        match self.tx.try_send(event) {
            Ok(()) => {
                self.queued.fetch_add(1, Ordering::AcqRel);
            }
            // why drop: the job must not wait on a receiver; a queue this deep means the target
            // has been failing for a long time, and the newest event is only one more of many.
            Err(mpsc::error::TrySendError::Full(event)) => tracing::warn!(
                webhook = %self.shown,
                event = event.kind.as_str(),
                job_id = event.job_id(),
                capacity = QUEUE_CAPACITY,
                "webhook queue full; event dropped"
            ),
            Err(mpsc::error::TrySendError::Closed(event)) => tracing::warn!(
                webhook = %self.shown,
                event = event.kind.as_str(),
                job_id = event.job_id(),
                "webhook worker has stopped; event dropped"
            ),
        }
    }
}

/// Delivers one target's events, one at a time, in order.
struct Worker {
    client: reqwest::Client,
    policy: Arc<RetryPolicy>,
    target: WebhookTarget,
    shown: String,
    tally: watch::Sender<Tally>,
}

/// How one attempt ended.
enum Attempt {
    Delivered(StatusCode),
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    GiveUp(String),
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<Arc<JobEvent>>) {
        while let Some(event) = rx.recv().await {
            let delivered = self.deliver(&event).await;
            self.tally.send_modify(|tally| {
                tally.done += 1;
                if delivered {
                    tally.delivered += 1;
                } else {
                    tally.failed += 1;
                }
            });
        }
    }

    /// Tries `event` until it is delivered, refused, or out of attempts; true if delivered.
    async fn deliver(&self, event: &JobEvent) -> bool {
        let started = Instant::now();
        let max_attempts = self.policy.max_attempts.max(1);
        let kind = event.kind.as_str();
        let job_id = event.job_id();
        for attempt in 1..=max_attempts {
            let reason = match self.attempt(event).await {
                Attempt::Delivered(status) => {
                    metrics::counter!(WEBHOOK_DELIVERIES_TOTAL, "outcome" => "delivered").increment(1);
                    tracing::info!(
                        webhook = %self.shown, event = kind, job_id, attempts = attempt,
                        elapsed_ms = elapsed_ms(started), status = status.as_u16(),
                        "webhook delivered"
                    );
                    return true;
                }
                Attempt::GiveUp(reason) => reason,
                Attempt::Retry { reason, .. } if attempt == max_attempts => reason,
                Attempt::Retry { reason, retry_after } => {
                    let wait = retry_after.map_or_else(
                        || self.policy.backoff(attempt),
                        |asked| asked.min(self.policy.max_backoff),
                    );
                    metrics::counter!(WEBHOOK_DELIVERIES_TOTAL, "outcome" => "retried").increment(1);
                    tracing::warn!(
                        webhook = %self.shown, event = kind, job_id, attempts = attempt,
                        elapsed_ms = elapsed_ms(started), retry_in_ms = wait.as_millis() as u64,
                        %reason, "webhook attempt failed; will retry"
                    );
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            metrics::counter!(WEBHOOK_DELIVERIES_TOTAL, "outcome" => "failed").increment(1);
            tracing::error!(
                webhook = %self.shown, event = kind, job_id, attempts = attempt,
                elapsed_ms = elapsed_ms(started), %reason, "webhook given up"
            );
            return false;
        }
        false
    }

    async fn attempt(&self, event: &JobEvent) -> Attempt {
        let body = match event.body(self.target.format) {
            Ok(body) => body,
            Err(error) => return Attempt::GiveUp(format!("could not encode the body: {error}")),
        };
        let sent = self
            .client
            .post(self.target.url.clone())
            .timeout(self.policy.attempt_timeout)
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let mut response = match sent {
            Ok(response) => response,
            Err(error) => {
                return Attempt::Retry {
                    reason: transport_error(error, self.policy.attempt_timeout),
                    retry_after: None,
                };
            }
        };
        let status = response.status();
        let retry_after = retry_after(response.headers());
        // why read the body: a fully read response returns its connection to the pool, and a
        // refusal's first bytes (Slack's `invalid_payload`, say) tell the operator why.
        let mut head = Vec::new();
        while head.len() < LOGGED_BODY_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => head.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(error) if status.is_success() => {
                    // The receiver has answered 2xx: the event was taken, whatever the body.
                    tracing::debug!(webhook = %self.shown, error = %error.without_url(), "reading a 2xx body");
                    break;
                }
                Err(error) => {
                    return Attempt::Retry {
                        reason: transport_error(error, self.policy.attempt_timeout),
                        retry_after: None,
                    };
                }
            }
        }
        if status.is_success() {
            return Attempt::Delivered(status);
        }
        head.truncate(LOGGED_BODY_BYTES);
        let reason = format!("HTTP {status}: {}", String::from_utf8_lossy(&head).trim());
        if retryable(status) {
            Attempt::Retry { reason, retry_after }
        } else {
            Attempt::GiveUp(reason)
        }
    }
}

/// 408, 429 and 5xx may succeed later; any other non-2xx answer will not.
fn retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// `Retry-After` in seconds, honoured on any retryable answer (429, but 503 sends it too); the
/// HTTP-date form is ignored and the backoff applies instead.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(Duration::from_secs(seconds))
}

/// The error and its causes, without the URL (it may hold a secret).
fn transport_error(error: reqwest::Error, timeout: Duration) -> String {
    if error.is_timeout() {
        return format!("timed out after {timeout:?}");
    }
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;

    use actix_web::dev::ServerHandle;
    use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
    use anyhow::{Context, anyhow};
    use serde_json::json;
    use tokio::sync::{Mutex, Notify};

    use super::*;

    /// Long enough for a loaded CI machine, short enough that a hang fails the test.
    const WAIT: Duration = Duration::from_secs(10);

    fn fast_policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(50),
            attempt_timeout: Duration::from_secs(5),
        }
    }

    fn event(kind: JobEventKind, job_id: i64) -> JobEvent {
        JobEvent {
            kind,
            job: json!({"id": job_id, "event_id": 5, "state": "running"}),
            summary: format!("firstcome bulk job {job_id} (event 5) {}", kind.as_str()),
        }
    }

    fn target(spec: &str) -> anyhow::Result<WebhookTarget> {
        spec.parse().map_err(|error| anyhow!("{spec}: {error}"))
    }

    /// What the receiver answers to one request.
    #[derive(Debug, Clone, Copy)]
    struct Reply {
        status: u16,
        retry_after: Option<&'static str>,
    }

    const OK: Reply = Reply {
        status: 200,
        retry_after: None,
    };

    fn status(status: u16) -> Reply {
        Reply {
            status,
            retry_after: None,
        }
    }

    /// One request as the receiver saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        at: Instant,
        path: String,
        content_type: Option<String>,
        user_agent: Option<String>,
        body: serde_json::Value,
    }

    struct Script {
        first: Mutex<VecDeque<Reply>>,
        then: Reply,
        seen: Mutex<Vec<Seen>>,
        arrived: Notify,
    }

    /// A real HTTP server on 127.0.0.1:0 that records every request and answers from a script:
    /// the replies in `first`, one per request, then `then` forever.
    struct Receiver {
        addr: SocketAddr,
        script: web::Data<Script>,
        server: ServerHandle,
    }

    async fn record(request: HttpRequest, body: web::Bytes, script: web::Data<Script>) -> HttpResponse {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        let seen = Seen {
            at: Instant::now(),
            path: request.path().to_owned(),
            content_type: header("content-type"),
            user_agent: header("user-agent"),
            body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        };
        script.seen.lock().await.push(seen);
        script.arrived.notify_waiters();
        let reply = script.first.lock().await.pop_front().unwrap_or(script.then);
        let mut response =
            HttpResponse::build(actix_web::http::StatusCode::from_u16(reply.status).unwrap_or_default());
        if let Some(seconds) = reply.retry_after {
            response.insert_header(("Retry-After", seconds));
        }
        response.body(format!("answer {}", reply.status))
    }

    impl Receiver {
        async fn start(first: Vec<Reply>, then: Reply) -> anyhow::Result<Self> {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let addr = listener.local_addr()?;
            let script = web::Data::new(Script {
                first: Mutex::new(first.into()),
                then,
                seen: Mutex::new(Vec::new()),
                arrived: Notify::new(),
            });
            let data = script.clone();
            let server =
                HttpServer::new(move || App::new().app_data(data.clone()).default_service(web::to(record)))
                    .workers(1)
                    .disable_signals()
                    .listen(listener)?
                    .run();
            let handle = server.handle();
            actix_rt::spawn(server);
            Ok(Receiver {
                addr,
                script,
                server: handle,
            })
        }

        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        async fn seen(&self) -> Vec<Seen> {
            self.script.seen.lock().await.clone()
        }

        /// Waits until at least `count` requests have arrived.
        async fn wait_for(&self, count: usize) -> anyhow::Result<Vec<Seen>> {
            tokio::time::timeout(WAIT, async {
                loop {
                    let arrived = self.script.arrived.notified();
                    let seen = self.seen().await;
                    if seen.len() >= count {
                        return seen;
                    }
                    arrived.await;
                }
            })
            .await
            .with_context(|| format!("waiting for {count} requests"))
        }

        async fn stop(self) {
            self.server.stop(false).await;
        }
    }

    /// What a raw TCP peer does with each connection it accepts.
    #[derive(Clone, Copy)]
    enum Misbehave {
        /// Close it at once, before any answer: a connection error.
        Hangup,
        /// Keep it open and never answer: a timeout.
        Silence,
    }

    /// A TCP listener that is no HTTP server; returns its address and a count of connections.
    async fn broken_peer(mode: Misbehave) -> anyhow::Result<(SocketAddr, Arc<AtomicUsize>)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                match mode {
                    Misbehave::Hangup => drop(stream),
                    Misbehave::Silence => held.push(stream),
                }
            }
        });
        Ok((addr, accepted))
    }

    #[test]
    fn targets_parse_from_a_bare_url_or_a_format_prefix() -> anyhow::Result<()> {
        let cases = [
            (
                "bare URL is generic JSON",
                "https://ops.example/hook",
                WebhookFormat::Json,
            ),
            (
                "json= prefix",
                "json=http://127.0.0.1:9000/h",
                WebhookFormat::Json,
            ),
            (
                "slack= prefix",
                "slack=https://hooks.slack.com/services/T/B/x",
                WebhookFormat::Slack,
            ),
            (
                "prefix case and spaces",
                "  Slack= https://chat.example/h ",
                WebhookFormat::Slack,
            ),
            (
                "`=` in a bare URL's query",
                "https://ops.example/h?token=abc",
                WebhookFormat::Json,
            ),
        ];
        for (description, spec, format) in cases {
            let parsed = target(spec).context(description)?;
            assert_eq!(parsed.format(), format, "{description}");
            assert!(parsed.url().scheme().starts_with("http"), "{description}");
        }
        assert_eq!(
            target("https://ops.example/h?token=abc")?.url().query(),
            Some("token=abc")
        );
        Ok(())
    }

    #[test]
    fn malformed_target_specs_are_refused_with_the_reason() {
        let cases = [
            ("empty", "", "empty webhook target"),
            (
                "unknown format",
                "teams=https://x.example/h",
                "unknown webhook format `teams`",
            ),
            ("not a URL", "ops.example/hook", "does not parse"),
            ("prefix without a URL", "slack=", "does not parse"),
            (
                "another scheme",
                "ftp://ops.example/hook",
                "http or https, not `ftp`",
            ),
            (
                "a prefixed file URL",
                "json=file:///etc/passwd",
                "http or https, not `file`",
            ),
        ];
        for (description, spec, expected) in cases {
            match spec.parse::<WebhookTarget>() {
                Ok(parsed) => panic!("{description}: {spec:?} parsed as {parsed:?}"),
                Err(error) => {
                    let message = error.to_string();
                    assert!(message.contains(expected), "{description}: {message}");
                    assert!(message.contains("json=URL") || message.contains("http or https"));
                }
            }
        }
    }

    #[test]
    fn targets_round_trip_through_serde_and_load_from_toml() -> anyhow::Result<()> {
        use figment::Figment;
        use figment::providers::{Format, Toml};

        #[derive(Deserialize)]
        struct Settings {
            bulk_webhooks: Vec<WebhookTarget>,
        }

        let targets = vec![
            target("https://ops.example/h?k=v")?,
            target("slack=https://hooks.slack.com/services/T/B/x")?,
        ];
        let json = serde_json::to_string(&targets)?;
        assert_eq!(
            json,
            r#"["json=https://ops.example/h?k=v","slack=https://hooks.slack.com/services/T/B/x"]"#
        );
        assert_eq!(serde_json::from_str::<Vec<WebhookTarget>>(&json)?, targets);

        let file = "bulk_webhooks = [\"https://ops.example/h?k=v\", \"slack=https://hooks.slack.com/services/T/B/x\"]";
        let loaded: Settings = Figment::from(Toml::string(file)).extract()?;
        assert_eq!(loaded.bulk_webhooks, targets);
        let bad: Result<Settings, _> =
            Figment::from(Toml::string("bulk_webhooks = [\"gopher://x\"]")).extract();
        assert!(bad.is_err(), "a bad spec in the file stops the load");
        Ok(())
    }

    #[test]
    fn debug_and_logs_never_show_credentials_queries_or_slack_paths() -> anyhow::Result<()> {
        let json = target("https://user:secret@ops.example:8443/hooks/bulk?token=abc#frag")?;
        assert_eq!(json.redacted(), "https://ops.example:8443/hooks/bulk");
        assert_eq!(format!("{json:?}"), "json=https://ops.example:8443/hooks/bulk");
        let slack = target("slack=https://hooks.slack.com/services/T000/B000/XXXX")?;
        assert_eq!(slack.redacted(), "https://hooks.slack.com/…");
        let notifier_debug = format!("{:?}", vec![json, slack]);
        for secret in ["secret", "token", "XXXX", "frag"] {
            assert!(!notifier_debug.contains(secret), "{secret} in {notifier_debug}");
        }
        Ok(())
    }

    #[test]
    fn backoff_doubles_from_half_a_second_and_stops_at_thirty() {
        let policy = RetryPolicy::default();
        let waits: Vec<_> = (1..=8)
            .map(|attempt| policy.backoff(attempt).as_millis())
            .collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        assert_eq!(policy.backoff(u32::MAX), Duration::from_secs(30));
        assert_eq!(policy.max_attempts, 6);
        assert_eq!(policy.attempt_timeout, Duration::from_secs(10));
    }

    #[test]
    fn event_kinds_are_named_job_dot_state() -> anyhow::Result<()> {
        use JobEventKind::*;
        for (kind, name) in [
            (Started, "job.started"),
            (Progress, "job.progress"),
            (Succeeded, "job.succeeded"),
            (Failed, "job.failed"),
            (Cancelled, "job.cancelled"),
        ] {
            assert_eq!(kind.as_str(), name);
            assert_eq!(serde_json::to_value(kind)?, json!(name));
        }
        Ok(())
    }

    #[actix_web::test]
    async fn a_json_target_receives_event_job_and_sent_at_with_json_headers() -> anyhow::Result<()> {
        // Arrange
        let receiver = Receiver::start(vec![], OK).await?;
        let notifier = Notifier::new(vec![target(&receiver.url("/hooks/bulk?k=v"))?], fast_policy(3))?;
        let before = Utc::now();

        // Act
        notifier.send(event(JobEventKind::Succeeded, 3));
        let flushed = notifier.flush(WAIT).await;

        // Assert
        assert!(flushed);
        let seen = receiver.seen().await;
        assert_eq!(seen.len(), 1);
        let request = &seen[0];
        assert_eq!(request.path, "/hooks/bulk");
        assert_eq!(request.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            request.user_agent.as_deref(),
            Some(concat!("firstcome/", env!("CARGO_PKG_VERSION")))
        );
        assert_eq!(request.body["event"], "job.succeeded");
        assert_eq!(
            request.body["job"],
            json!({"id": 3, "event_id": 5, "state": "running"})
        );
        let sent_at = request.body["sent_at"].as_str().context("sent_at is a string")?;
        let sent_at = chrono::DateTime::parse_from_rfc3339(sent_at)?;
        assert!(
            sent_at >= before - chrono::Duration::seconds(1),
            "{sent_at} is now"
        );
        assert_eq!(request.body.as_object().map(|body| body.len()), Some(3));
        assert_eq!(
            notifier.tallies(),
            [Tally {
                done: 1,
                delivered: 1,
                failed: 0
            }]
        );
        receiver.stop().await;
        Ok(())
    }

    #[actix_web::test]
    async fn a_slack_target_receives_only_the_summary_as_text() -> anyhow::Result<()> {
        let receiver = Receiver::start(vec![], OK).await?;
        let notifier = Notifier::new(
            vec![target(&format!("slack={}", receiver.url("/s")))?],
            fast_policy(3),
        )?;

        notifier.send(event(JobEventKind::Failed, 9));

        assert!(notifier.flush(WAIT).await);
        let seen = receiver.seen().await;
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0].body,
            json!({"text": "firstcome bulk job 9 (event 5) job.failed"})
        );
        assert_eq!(seen[0].content_type.as_deref(), Some("application/json"));
        receiver.stop().await;
        Ok(())
    }

    #[actix_web::test]
    async fn a_500_then_a_200_is_delivered_on_the_second_attempt() -> anyhow::Result<()> {
        let receiver = Receiver::start(vec![status(500)], OK).await?;
        let notifier = Notifier::new(vec![target(&receiver.url("/h"))?], fast_policy(3))?;

        notifier.send(event(JobEventKind::Started, 1));

        assert!(notifier.flush(WAIT).await);
        let seen = receiver.seen().await;
        assert_eq!(seen.len(), 2, "one failed attempt, one delivered");
        assert_eq!(seen[0].body["event"], seen[1].body["event"]);
        assert_eq!(notifier.tallies()[0].delivered, 1);
        receiver.stop().await;
        Ok(())
    }

    #[actix_web::test]
    async fn a_429_waits_as_long_as_retry_after_asks() -> anyhow::Result<()> {
        let receiver = Receiver::start(
            vec![Reply {
                status: 429,
                retry_after: Some("1"),
            }],
            OK,
        )
        .await?;
        let policy = RetryPolicy {
            max_backoff: Duration::from_secs(5),
            ..fast_policy(3)
        };
        let notifier = Notifier::new(vec![target(&receiver.url("/h"))?], policy)?;

        notifier.send(event(JobEventKind::Progress, 1));

        assert!(notifier.flush(WAIT).await);
        let seen = receiver.seen().await;
        assert_eq!(seen.len(), 2);
        let gap = seen[1].at.duration_since(seen[0].at);
        assert!(
            gap >= Duration::from_millis(950),
            "retried after {gap:?}, not the 1 s asked"
        );
        receiver.stop().await;
        Ok(())
    }

    #[actix_web::test]
    async fn retry_after_is_capped_at_the_max_backoff() -> anyhow::Result<()> {
        let receiver = Receiver::start(
            vec![Reply {
                status: 429,
                retry_after: Some("3600"),
            }],
            OK,
        )
        .await?;
        let notifier = Notifier::new(vec![target(&receiver.url("/h"))?], fast_policy(3))?;

        notifier.send(event(JobEventKind::Progress, 1));

        assert!(notifier.flush(WAIT).await, "an hour's Retry-After waits 50 ms");
        assert_eq!(receiver.seen().await.len(), 2);
        assert_eq!(notifier.tallies()[0].delivered, 1);
        receiver.stop().await;
        Ok(())
    }

    #[actix_web::test]
    async fn a_404_gives_up_after_one_attempt() -> anyhow::Result<()> {
        let receiver = Receiver::start(vec![], status(404)).await?;
        let notifier = Notifier::new(vec![target(&receiver.url("/gone"))?], fast_policy(5))?;

        notifier.send(event(JobEventKind::Succeeded, 1));

        assert!(notifier.flush(WAIT).await);
        assert_eq!(receiver.seen().await.len(), 1);
        assert_eq!(
            notifier.tallies(),
            [Tally {
                done: 1,
                delivered: 0,
                failed: 1
            }]
        );
        receiver.stop().await;
        Ok(())
    }

    #[actix_web::test]
    async fn a_5xx_to_the_last_attempt_gives_up_after_max_attempts() -> anyhow::Result<()> {
        let receiver = Receiver::start(vec![], status(503)).await?;
        let notifier = Notifier::new(vec![target(&receiver.url("/h"))?], fast_policy(4))?;

        notifier.send(event(JobEventKind::Succeeded, 1));

        assert!(notifier.flush(WAIT).await);
        assert_eq!(receiver.seen().await.len(), 4);
        assert_eq!(notifier.tallies()[0].failed, 1);
        receiver.stop().await;
        Ok(())
    }

    #[actix_web::test]
    async fn events_to_one_target_arrive_in_order_across_retries() -> anyhow::Result<()> {
        // The first two requests fail, so the first event is retried while the rest queue.
        let receiver = Receiver::start(vec![status(500), status(502)], OK).await?;
        let notifier = Notifier::new(vec![target(&receiver.url("/h"))?], fast_policy(4))?;
        let kinds = [
            JobEventKind::Started,
            JobEventKind::Progress,
            JobEventKind::Progress,
            JobEventKind::Progress,
            JobEventKind::Succeeded,
        ];

        for (id, kind) in (1..).zip(kinds) {
            notifier.send(event(kind, id));
        }

        assert!(notifier.flush(WAIT).await);
        let seen = receiver.seen().await;
        let order: Vec<_> = seen
            .iter()
            .map(|request| request.body["job"]["id"].clone())
            .collect();
        assert_eq!(order, [1, 1, 1, 2, 3, 4, 5].map(|id| json!(id)));
        assert_eq!(
            seen.last().map(|request| request.body["event"].clone()),
            Some(json!("job.succeeded"))
        );
        assert_eq!(notifier.tallies()[0].delivered, 5);
        receiver.stop().await;
        Ok(())
    }

    #[actix_web::test]
    async fn a_target_that_hangs_up_gives_up_after_max_attempts() -> anyhow::Result<()> {
        let (addr, accepted) = broken_peer(Misbehave::Hangup).await?;
        let notifier = Notifier::new(vec![target(&format!("http://{addr}/h"))?], fast_policy(3))?;

        notifier.send(event(JobEventKind::Started, 1));

        assert!(notifier.flush(WAIT).await);
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(notifier.tallies()[0].failed, 1);
        Ok(())
    }

    #[actix_web::test]
    async fn a_target_that_never_answers_times_out_and_is_retried() -> anyhow::Result<()> {
        let (addr, accepted) = broken_peer(Misbehave::Silence).await?;
        let policy = RetryPolicy {
            attempt_timeout: Duration::from_millis(100),
            ..fast_policy(2)
        };
        let notifier = Notifier::new(vec![target(&format!("http://{addr}/h"))?], policy)?;

        notifier.send(event(JobEventKind::Started, 1));

        assert!(notifier.flush(WAIT).await);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(notifier.tallies()[0].failed, 1);
        Ok(())
    }

    #[actix_web::test]
    async fn an_unreachable_target_is_given_up_without_blocking_send() -> anyhow::Result<()> {
        // A port that was just free: connections are refused.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(50),
            ..fast_policy(3)
        };
        let notifier = Notifier::new(vec![target(&format!("http://{addr}/h"))?], policy)?;

        for id in 0..10 {
            notifier.send(event(JobEventKind::Progress, id));
        }
        // Giving up the first event takes at least two 50 ms backoffs; send has returned long
        // before.
        let right_after_send = notifier.tallies()[0];

        assert_eq!(
            right_after_send.done, 0,
            "send returned before any delivery ended"
        );
        assert!(notifier.flush(WAIT).await);
        assert_eq!(
            notifier.tallies(),
            [Tally {
                done: 10,
                delivered: 0,
                failed: 10
            }]
        );
        Ok(())
    }

    #[actix_web::test]
    async fn a_failing_target_does_not_delay_another() -> anyhow::Result<()> {
        let (silent, _) = broken_peer(Misbehave::Silence).await?;
        let receiver = Receiver::start(vec![], OK).await?;
        let policy = RetryPolicy {
            attempt_timeout: WAIT,
            ..fast_policy(1)
        };
        let notifier = Notifier::new(
            vec![
                target(&format!("http://{silent}/h"))?,
                target(&receiver.url("/h"))?,
            ],
            policy,
        )?;

        notifier.send(event(JobEventKind::Started, 1));

        receiver.wait_for(1).await?;
        let tallies = notifier.tallies();
        assert_eq!(tallies[0].done, 0, "the silent target is still waiting");
        assert!(
            !notifier.flush(Duration::from_millis(10)).await,
            "flush reports the wait"
        );
        receiver.stop().await;
        Ok(())
    }

    #[actix_web::test]
    async fn a_notifier_without_targets_does_nothing() -> anyhow::Result<()> {
        let none = Notifier::none();
        let empty = Notifier::new(Vec::new(), RetryPolicy::default())?;

        none.send(event(JobEventKind::Started, 1));
        empty.send(event(JobEventKind::Started, 1));

        assert!(none.flush(Duration::ZERO).await);
        assert!(empty.flush(Duration::ZERO).await);
        assert!(none.tallies().is_empty() && empty.tallies().is_empty());
        Ok(())
    }

    #[test]
    fn a_notifier_with_targets_needs_a_runtime() -> anyhow::Result<()> {
        let made = Notifier::new(vec![target("http://127.0.0.1:9/h")?], RetryPolicy::default());
        let error = made.err().context("no runtime here")?;
        assert!(error.to_string().contains("tokio runtime"), "{error}");
        Ok(())
    }
}
