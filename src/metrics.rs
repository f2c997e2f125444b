//! # Metrics: Prometheus text at `GET /metrics`
//!
//! Recorded with the `metrics` facade and rendered by `metrics-exporter-prometheus` (no HTTP
//! listener of its own: the route is ours). Every name is listed here, with what it counts, so
//! the set of series is visible in one place. Labels are low-cardinality by design: route
//! templates (not paths), outcomes from the error-code table, no event or user ids.
//!
//! Gauges that describe current state (actor queue depth, WebSocket clients) are set when
//! `/metrics` is scraped, so the hot path pays nothing for them.

use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use anyhow::Context;
use metrics::Counter;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Histogram: HTTP request latency, by `route` template, `method` and `status`.
pub const HTTP_REQUEST_SECONDS: &str = "firstcome_http_request_duration_seconds";
/// Counter: reservation requests by `outcome` (`created`, `replayed`, or the error code).
pub const RESERVATIONS_TOTAL: &str = "firstcome_reservations_total";
/// Histogram: writes per persister commit.
pub const PERSISTER_BATCH_WRITES: &str = "firstcome_persister_batch_writes";
/// Histogram: time from a batch's start to its commit.
pub const PERSISTER_COMMIT_SECONDS: &str = "firstcome_persister_commit_duration_seconds";
/// Counter: batches whose commit failed.
pub const PERSISTER_FAILED_BATCHES: &str = "firstcome_persister_failed_batches_total";
/// Gauge: requests queued in event actors' mailboxes, summed over events.
pub const ACTOR_QUEUE_DEPTH: &str = "firstcome_event_actor_queue_depth";
/// Gauge: the deepest single event actor queue.
pub const ACTOR_QUEUE_DEPTH_MAX: &str = "firstcome_event_actor_queue_depth_max";
/// Gauge: event actors running.
pub const EVENT_ACTORS: &str = "firstcome_event_actors";
/// Gauge: open WebSocket sessions (`/v1/events/{id}/live`).
pub const WS_CLIENTS: &str = "firstcome_websocket_clients";
/// Counter: requests refused with 429 by a rate limit.
pub const RATE_LIMITED_TOTAL: &str = "firstcome_rate_limited_requests_total";
/// Counter: requests shed with 503 because an event actor's queue was full.
pub const SHED_TOTAL: &str = "firstcome_shed_requests_total";

/// Counter: calls this node made to Redis (several nodes).
pub const REDIS_CALLS_TOTAL: &str = "firstcome_redis_calls_total";
/// Counter: ledgers rebuilt from the database by this node (several nodes).
pub const LEDGER_REBUILDS: &str = "firstcome_ledger_rebuilds_total";
/// Counter: silent allocations reconciled, by `outcome` (`released`, `kept`).
pub const RECONCILED: &str = "firstcome_reconciled_total";

/// Counter: bulk-job webhook deliveries by `outcome` (`delivered`, `retried` per failed attempt
/// that will be retried, `failed` per event given up).
pub const WEBHOOK_DELIVERIES_TOTAL: &str = "firstcome_webhook_deliveries_total";

/// Latency buckets in seconds: the hot path lives between 1 and 50 ms.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
];
/// How often histograms are compacted when nothing scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// One registered counter per reservation outcome.
static OUTCOMES: LazyLock<papaya::HashMap<&'static str, Counter>> = LazyLock::new(papaya::HashMap::new);

static REDIS_CALLS: LazyLock<Counter> = LazyLock::new(|| metrics::counter!(REDIS_CALLS_TOTAL));

/// Counts one call to Redis.
pub fn redis_call() {
    REDIS_CALLS.increment(1);
}

/// Counts one reservation request with `outcome`.
///
/// why a cache: `counter!` with a label builds and hashes a key on every call; the sold-out
/// refusal is the hottest path there is, so each outcome's handle is registered once and reused.
pub fn count_reservation(outcome: &'static str) {
    let outcomes = OUTCOMES.pin();
    let counter = outcomes.get_or_insert_with(
        outcome,
        || metrics::counter!(RESERVATIONS_TOTAL, "outcome" => outcome),
    );
    counter.increment(1);
}

/// Installs the process-wide recorder once and returns the handle that renders it.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .context("configuring latency buckets")?
        .set_buckets_for_metric(Matcher::Full(PERSISTER_BATCH_WRITES.into()), BATCH_BUCKETS)
        .context("configuring batch buckets")?
        .build_recorder();
    let handle = recorder.handle();
    // why: a second install in one process (tests that build several applications) keeps the
    // first recorder; its handle renders everything recorded since.
    if metrics::set_global_recorder(recorder).is_ok() {
        describe();
        let _ = HANDLE.set(handle.clone());
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                }
            })
            .context("starting the metrics upkeep thread")?;
    }
    Ok(HANDLE.get().cloned().unwrap_or(handle))
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        HTTP_REQUEST_SECONDS,
        Unit::Seconds,
        "HTTP request latency by route template, method and status"
    );
    describe_counter!(
        RESERVATIONS_TOTAL,
        "Reservation requests by outcome (created, replayed, or the error code)"
    );
    describe_histogram!(PERSISTER_BATCH_WRITES, Unit::Count, "Writes per persister commit");
    describe_histogram!(
        PERSISTER_COMMIT_SECONDS,
        Unit::Seconds,
        "Persister commit latency"
    );
    describe_counter!(PERSISTER_FAILED_BATCHES, "Persister batches whose commit failed");
    describe_gauge!(
        ACTOR_QUEUE_DEPTH,
        "Requests queued in event actors, summed over events"
    );
    describe_gauge!(ACTOR_QUEUE_DEPTH_MAX, "The deepest event actor queue");
    describe_gauge!(EVENT_ACTORS, "Event actors running");
    describe_gauge!(WS_CLIENTS, "Open WebSocket sessions");
    describe_counter!(RATE_LIMITED_TOTAL, "Requests refused with 429 by a rate limit");
    describe_counter!(
        SHED_TOTAL,
        "Requests shed with 503 because an event actor's queue was full"
    );
    describe_counter!(
        WEBHOOK_DELIVERIES_TOTAL,
        "Bulk-job webhook deliveries by outcome (delivered, retried, failed)"
    );
}
