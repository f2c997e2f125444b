//! # Several nodes: the Redis ledger
//!
//! With `REDIS_URL` set, every node serves every event. Each node still has one
//! [`ClusterEventActor`] per event, but the allocation authority is a ledger in Redis: Lua
//! scripts that apply a whole batch of the actor's requests atomically (stock, per-user counts,
//! idempotency keys, holds) in one round trip. PostgreSQL stays the record: a 2xx still waits
//! for the commit.
//!
//! Per event, under the hash tag `{ev:ID}` (so a Redis Cluster keeps them on one shard):
//! - `meta`: generation, stock, held, sold, allocations in flight, the rules (limit, window);
//! - `res`: every reservation that counts against stock, `new` until its row is known;
//! - `users`, `idem`: active units per user, and idempotency keys → first reservation;
//! - `pending`: reservations whose ledger entry may lag their row (new allocations, changes
//!   being written), by age: what reconciliation looks at;
//! - `holds`: held tickets by expiry.
//!
//! What keeps it exact when things fail:
//! - **A node dies between allocation and commit**: its `new` entries stay pending. After
//!   `reconcile_after`, any node running the event fences them in PostgreSQL (a `cancelled` row
//!   with the same id, so the original insert can no longer land) and brings the ledger to
//!   whatever row exists: released if it was the fence, kept if the insert had committed.
//! - **Redis loses the ledger** (restart, flush): scripts answer `NOLEDGER` and requests get 503.
//!   One node (a Redis lock) rebuilds it from PostgreSQL while holding the event row, after
//!   bumping the event's ledger generation; inserts check that generation, so an allocation made
//!   against the lost ledger can never commit afterwards.
//! - **Redis slow or down**: every call has a timeout and fails closed (503). A batch whose
//!   answer was lost is settled like a dead node's, at once.

mod actor;
mod bridge;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use sea_orm::DatabaseConnection;

pub use actor::{ClusterEventActor, RemoteCounts};
pub use bridge::spawn_bridge;

use crate::domain::{EventId, EventKind, Inventory, ReservationId, ReservationStatus};
use crate::store::{self, Rebuild, Tombstone};

/// How long a rebuild may hold the lock before another node may take over.
const REBUILD_LOCK_MS: u64 = 30_000;
/// Entries written per command while rebuilding a ledger.
const REBUILD_CHUNK: usize = 1_000;
/// The most pending entries one reconciliation pass settles.
const RECONCILE_BATCH: usize = 1_000;
const SEP: char = '\u{1f}';

macro_rules! ledger_script {
    ($file:literal) => {
        Script::new(concat!(include_str!("lua/common.lua"), include_str!($file)))
    };
}

struct Scripts {
    gate: Script,
    claim_due: Script,
    pending: Script,
    set_event: Script,
    unlock: Script,
    rate: Script,
}

/// What [`Cluster::ensure_ledger`] finds before it serves an event.
enum LedgerState {
    /// The event no longer exists.
    Gone,
    /// Redis holds a ledger of this, the event's current, generation.
    Usable(i64),
    /// No ledger, or one of an older generation: it must be rebuilt.
    Stale,
}

/// The global counts of one event, as the ledger last reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    pub stock: u64,
    pub held: u64,
    pub sold: u64,
    /// Allocations whose commit is not yet reported.
    pub inflight: u64,
    /// The earliest hold expiry (ms since the epoch), if any hold is outstanding.
    pub next_due_ms: Option<i64>,
}

impl Counts {
    pub fn inventory(&self) -> Inventory {
        Inventory {
            stock: self.stock,
            held: self.held,
            sold: self.sold,
        }
    }
}

/// A script's answer when the ledger is usable, or why it is not.
#[derive(Debug)]
pub enum Answer<T> {
    Ok(Counts, T),
    /// The ledger is missing (Redis restarted empty or was flushed).
    NoLedger,
    /// The ledger has another generation than the node allocates under.
    Generation(i64),
}

/// What the ledger decided for one reservation request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Granted,
    /// The Idempotency-Key was first used for this reservation: replay it.
    Replay(ReservationId),
    SoldOut,
    Insufficient(u64),
    LimitReached(u32),
    NotOpen,
    Closed,
    OverMax(u32),
    KeyInFlight,
    KeyReused(u32),
}

/// One request as the gate script takes it.
pub struct GateRequest<'a> {
    pub id: ReservationId,
    pub user: &'a str,
    pub quantity: u32,
    pub key: Option<&'a str>,
}

/// What a node's own commit (or read) says a reservation now is.
#[derive(Debug, Clone)]
pub struct Report {
    pub id: ReservationId,
    /// `None`: no row exists (the allocation never committed).
    pub status: Option<ReservationStatus>,
    pub expires_ms: Option<i64>,
}

/// The event rules the ledger enforces.
pub struct Rules {
    pub stock: u64,
    pub per_user_limit: u32,
    pub max_per_request: u32,
    pub opens_ms: Option<i64>,
    pub closes_ms: Option<i64>,
    pub closed: bool,
}

/// The shared ledger and this node's connection to it.
pub struct Cluster {
    redis: ConnectionManager,
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    pub reconcile_after: Duration,
    pub node: String,
    db: DatabaseConnection,
    scripts: Scripts,
}

impl Cluster {
    /// Connects to Redis; a Redis that does not answer at start stops the start, with its
    /// address in the error. Later outages only make requests fail with 503 until it is back.
    pub async fn connect(
        url: &str,
        prefix: String,
        timeout: Duration,
        reconcile_after: Duration,
        node: String,
        db: DatabaseConnection,
    ) -> anyhow::Result<Arc<Cluster>> {
        let client = redis::Client::open(url).context("parsing REDIS_URL")?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout))
            .set_number_of_retries(2);
        let redis = tokio::time::timeout(
            timeout * 5,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| anyhow!("Redis at {} did not answer", crate::config::redact_password(url)))?
        .with_context(|| format!("connecting to Redis at {}", crate::config::redact_password(url)))?;
        Ok(Arc::new(Cluster {
            redis,
            client,
            prefix,
            timeout,
            reconcile_after,
            node,
            db,
            scripts: Scripts {
                gate: ledger_script!("lua/gate.lua"),
                claim_due: ledger_script!("lua/claim_due.lua"),
                pending: ledger_script!("lua/pending.lua"),
                set_event: ledger_script!("lua/set_event.lua"),
                rate: Script::new(include_str!("lua/rate.lua")),
                unlock: Script::new(
                    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
                ),
            },
        }))
    }

    /// The pub/sub channel that carries counts between nodes.
    pub fn live_channel(&self) -> String {
        format!("{}:live", self.prefix)
    }

    /// The event's ledger keys, in the order every script takes them.
    fn keys(&self, event: EventId) -> [String; 6] {
        ["meta", "res", "users", "idem", "pending", "holds"]
            .map(|k| format!("{}:{{ev:{event}}}:{k}", self.prefix))
    }

    fn lock_key(&self, event: EventId) -> String {
        format!("{}:{{ev:{event}}}:lock", self.prefix)
    }

    /// Runs one Redis call within the timeout; a late answer is a failure (the caller fails
    /// closed and settles whatever the call may have done).
    async fn timed<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> anyhow::Result<T> {
        crate::metrics::redis_call();
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| anyhow!("Redis did not answer within {:?}", self.timeout))?
            .context("calling Redis")
    }

    async fn script(
        &self,
        script: &Script,
        event: EventId,
        args: Vec<String>,
    ) -> anyhow::Result<Vec<Option<String>>> {
        let mut invocation = script.prepare_invoke();
        for key in self.keys(event) {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        let mut redis = self.redis.clone();
        self.timed(invocation.invoke_async(&mut redis)).await
    }

    /// Applies `reports` and decides `requests` in one round trip.
    pub async fn gate(
        &self,
        event: EventId,
        generation: i64,
        reports: &[Report],
        requests: &[GateRequest<'_>],
    ) -> anyhow::Result<Answer<Vec<Verdict>>> {
        let mut args = Vec::with_capacity(4 + reports.len() * 3 + requests.len() * 4);
        args.push(generation.to_string());
        args.push(crate::domain::now().timestamp_millis().to_string());
        push_reports(&mut args, reports, true);
        args.push(requests.len().to_string());
        for r in requests {
            args.push(r.id.to_string());
            args.push(r.user.to_owned());
            args.push(r.quantity.to_string());
            args.push(r.key.unwrap_or("").to_owned());
        }
        let reply = self.script(&self.scripts.gate, event, args).await?;
        answer(reply, |rest| {
            anyhow::ensure!(
                rest.len() == requests.len(),
                "the ledger answered {} of {} requests",
                rest.len(),
                requests.len()
            );
            rest.iter().map(|v| verdict(v.as_deref().unwrap_or(""))).collect()
        })
    }

    /// Brings the ledger entries of `reports` to what their rows say.
    pub async fn report(
        &self,
        event: EventId,
        generation: i64,
        reports: &[Report],
    ) -> anyhow::Result<Answer<()>> {
        let mut args = vec![generation.to_string(), "settle".to_owned()];
        push_reports(&mut args, reports, false);
        let reply = self.script(&self.scripts.pending, event, args).await?;
        answer(reply, |_| Ok(()))
    }

    /// Marks reservations pending before a status change is written.
    pub async fn intent(
        &self,
        event: EventId,
        generation: i64,
        ids: &[ReservationId],
    ) -> anyhow::Result<Answer<()>> {
        let mut args = vec![generation.to_string(), "intent".to_owned()];
        args.extend(ids.iter().map(|id| id.to_string()));
        let reply = self.script(&self.scripts.pending, event, args).await?;
        answer(reply, |_| Ok(()))
    }

    /// Takes the holds due now off the expiry queue (they become pending).
    pub async fn claim_due(
        &self,
        event: EventId,
        generation: i64,
    ) -> anyhow::Result<Answer<Vec<ReservationId>>> {
        let args = vec![
            generation.to_string(),
            crate::domain::now().timestamp_millis().to_string(),
            RECONCILE_BATCH.to_string(),
        ];
        let reply = self.script(&self.scripts.claim_due, event, args).await?;
        answer(reply, |rest| {
            rest.iter().flatten().map(|id| parse_id(id)).collect()
        })
    }

    /// Pending entries older than `reconcile_after`, with their ledger entries.
    async fn stale(
        &self,
        event: EventId,
        generation: i64,
    ) -> anyhow::Result<Answer<Vec<(ReservationId, String)>>> {
        let older_than = crate::domain::now().timestamp_millis() - self.reconcile_after.as_millis() as i64;
        let args = vec![
            generation.to_string(),
            "stale".to_owned(),
            older_than.to_string(),
            RECONCILE_BATCH.to_string(),
        ];
        let reply = self.script(&self.scripts.pending, event, args).await?;
        answer(reply, |rest| {
            rest.chunks(2)
                .map(|pair| {
                    let id = pair.first().and_then(|v| v.as_deref()).unwrap_or("");
                    let entry = pair.get(1).and_then(|v| v.clone()).unwrap_or_default();
                    Ok((parse_id(id)?, entry))
                })
                .collect()
        })
    }

    /// Settles reservations whose ledger entries may lag their rows: fences the silent `new`
    /// ones in PostgreSQL, expires due holds, and reports each row's truth to the ledger.
    pub async fn settle(
        &self,
        event: EventId,
        generation: i64,
        ids: &[ReservationId],
    ) -> anyhow::Result<Answer<usize>> {
        if ids.is_empty() {
            return Ok(match self.report(event, generation, &[]).await? {
                Answer::Ok(counts, ()) => Answer::Ok(counts, 0),
                Answer::NoLedger => Answer::NoLedger,
                Answer::Generation(g) => Answer::Generation(g),
            });
        }
        let keys = self.keys(event);
        let mut redis = self.redis.clone();
        let fields: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
        let entries: Vec<Option<String>> = self
            .timed(
                redis::cmd("HMGET")
                    .arg(&keys[1])
                    .arg(&fields)
                    .query_async(&mut redis),
            )
            .await?;
        let entries: Vec<(ReservationId, String)> = ids
            .iter()
            .zip(entries)
            .map(|(id, entry)| (*id, entry.unwrap_or_default()))
            .collect();
        self.settle_entries(event, generation, &entries).await
    }

    async fn settle_entries(
        &self,
        event: EventId,
        generation: i64,
        entries: &[(ReservationId, String)],
    ) -> anyhow::Result<Answer<usize>> {
        let silent: Vec<Tombstone> = entries
            .iter()
            .filter_map(|(id, entry)| {
                let mut parts = entry.split(SEP);
                (parts.next() == Some("new")).then_some(())?;
                let quantity = parts.next()?.parse().ok()?;
                let user = parts.next()?.to_owned();
                Some(Tombstone {
                    id: *id,
                    event,
                    user,
                    quantity,
                })
            })
            .collect();
        let ids: Vec<ReservationId> = entries.iter().map(|(id, _)| *id).collect();
        let recorded = store::settle(&self.db, &silent, &ids).await?;
        let mut reports: Vec<Report> = ids
            .iter()
            .map(|id| Report {
                id: *id,
                status: None,
                expires_ms: None,
            })
            .collect();
        for row in recorded {
            if let Some(report) = reports.iter_mut().find(|r| r.id == row.id) {
                report.status = Some(row.status);
                report.expires_ms = row.expires_at.map(|at| at.timestamp_millis());
            }
        }
        let released = reports
            .iter()
            .filter(|r| !r.status.is_some_and(|s| s.is_active()))
            .count();
        Ok(match self.report(event, generation, &reports).await? {
            Answer::Ok(counts, ()) => Answer::Ok(counts, released),
            Answer::NoLedger => Answer::NoLedger,
            Answer::Generation(g) => Answer::Generation(g),
        })
    }

    /// One reconciliation pass: settles pending entries older than `reconcile_after`.
    pub async fn reconcile(&self, event: EventId, generation: i64) -> anyhow::Result<Answer<(usize, usize)>> {
        let stale = match self.stale(event, generation).await? {
            Answer::Ok(counts, stale) if stale.is_empty() => return Ok(Answer::Ok(counts, (0, 0))),
            Answer::Ok(_, stale) => stale,
            Answer::NoLedger => return Ok(Answer::NoLedger),
            Answer::Generation(g) => return Ok(Answer::Generation(g)),
        };
        let total = stale.len();
        Ok(match self.settle_entries(event, generation, &stale).await? {
            Answer::Ok(counts, released) => {
                metrics::counter!(crate::metrics::RECONCILED, "outcome" => "released")
                    .increment(released as u64);
                metrics::counter!(crate::metrics::RECONCILED, "outcome" => "kept")
                    .increment((total - released) as u64);
                tracing::info!(event = %event, released, kept = total - released, "reconciled silent allocations");
                Answer::Ok(counts, (released, total - released))
            }
            Answer::NoLedger => Answer::NoLedger,
            Answer::Generation(g) => Answer::Generation(g),
        })
    }

    /// Sets the event's rules; refused (`Err(held + sold)`) if the stock is below what is taken.
    pub async fn set_rules(
        &self,
        event: EventId,
        generation: i64,
        rules: &Rules,
    ) -> anyhow::Result<Answer<Result<(), u64>>> {
        let args = vec![
            generation.to_string(),
            rules.stock.to_string(),
            rules.per_user_limit.to_string(),
            rules.max_per_request.to_string(),
            rules.opens_ms.map(|v| v.to_string()).unwrap_or_default(),
            rules.closes_ms.map(|v| v.to_string()).unwrap_or_default(),
            if rules.closed { "1" } else { "0" }.to_owned(),
        ];
        let reply = self.script(&self.scripts.set_event, event, args).await?;
        if reply.first().and_then(|v| v.as_deref()) == Some("BELOW") {
            let taken = reply
                .get(1)
                .and_then(|v| v.as_deref())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            return Ok(Answer::Ok(Counts::default(), Err(taken)));
        }
        answer(reply, |_| Ok(Ok(())))
    }

    /// The global counts (a read: no generation check).
    pub async fn counts(&self, event: EventId) -> anyhow::Result<Option<Counts>> {
        let keys = self.keys(event);
        let mut redis = self.redis.clone();
        let values: Vec<Option<u64>> = self
            .timed(
                redis::cmd("HMGET")
                    .arg(&keys[0])
                    .arg(&["stock", "held", "sold", "inflight"])
                    .query_async(&mut redis),
            )
            .await?;
        Ok(match values.as_slice() {
            [Some(stock), Some(held), Some(sold), inflight] => Some(Counts {
                stock: *stock,
                held: *held,
                sold: *sold,
                inflight: inflight.unwrap_or(0),
                next_due_ms: None,
            }),
            _ => None,
        })
    }

    pub async fn publish(&self, message: &str) -> anyhow::Result<()> {
        let mut redis = self.redis.clone();
        let _: i64 = self.timed(redis.publish(self.live_channel(), message)).await?;
        Ok(())
    }

    /// Counts one request of `user` against the global quota `policy` (ms per unit, burst);
    /// `Some(wait)` when it must wait.
    pub async fn rate_check(
        &self,
        policy: &str,
        user: &str,
        emission_ms: f64,
        burst: u32,
    ) -> anyhow::Result<Option<Duration>> {
        let mut invocation = self.scripts.rate.prepare_invoke();
        invocation
            .key(format!("{}:rl:{policy}:{{{user}}}", self.prefix))
            .arg(emission_ms)
            .arg(burst);
        let mut redis = self.redis.clone();
        let wait: u64 = self.timed(invocation.invoke_async(&mut redis)).await?;
        Ok((wait > 0).then(|| Duration::from_millis(wait)))
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        let mut redis = self.redis.clone();
        let _: String = self.timed(redis::cmd("PING").query_async(&mut redis)).await?;
        Ok(())
    }

    /// Makes sure a ledger of the event's current generation exists, rebuilding it from
    /// PostgreSQL if needed (one node at a time). Returns that generation, or `None` if the event
    /// no longer exists.
    pub async fn ensure_ledger(&self, event: EventId) -> anyhow::Result<Option<i64>> {
        match self.ledger_state(event).await? {
            LedgerState::Gone => return Ok(None),
            LedgerState::Usable(generation) => return Ok(Some(generation)),
            LedgerState::Stale => {}
        }
        let lock = self.lock_key(event);
        let mut redis = self.redis.clone();
        let locked: bool = self
            .timed(
                redis::cmd("SET")
                    .arg(&lock)
                    .arg(&self.node)
                    .arg("NX")
                    .arg("PX")
                    .arg(REBUILD_LOCK_MS)
                    .query_async::<Option<String>>(&mut redis),
            )
            .await?
            .is_some();
        if !locked {
            bail!("another node is rebuilding the ledger of event {event}");
        }
        // why: another node may have rebuilt the ledger between the check above and taking the
        // lock. Rebuilding it again would bump the generation once more and fail every
        // allocation made under the first rebuild (503 for requests that did nothing wrong).
        let rebuilt = match self.ledger_state(event).await {
            Ok(LedgerState::Gone) => Ok(None),
            Ok(LedgerState::Usable(generation)) => Ok(Some(generation)),
            Ok(LedgerState::Stale) => self.rebuild(event).await,
            Err(error) => Err(error),
        };
        let mut invocation = self.scripts.unlock.prepare_invoke();
        invocation.key(&lock).arg(&self.node);
        let unlocked: anyhow::Result<i64> = self.timed(invocation.invoke_async(&mut redis)).await;
        if let Err(error) = unlocked {
            tracing::warn!(event = %event, error = format!("{error:#}"), "cannot release the rebuild lock; it expires by itself");
        }
        rebuilt
    }

    /// Whether Redis holds a ledger of the event's current generation.
    async fn ledger_state(&self, event: EventId) -> anyhow::Result<LedgerState> {
        let Some(generation) = store::ledger_generation(&self.db, event).await? else {
            return Ok(LedgerState::Gone);
        };
        if generation > 0 {
            match self.report(event, generation, &[]).await? {
                Answer::Ok(..) => return Ok(LedgerState::Usable(generation)),
                Answer::NoLedger | Answer::Generation(_) => {}
            }
        }
        Ok(LedgerState::Stale)
    }

    async fn rebuild(&self, event: EventId) -> anyhow::Result<Option<i64>> {
        let started = std::time::Instant::now();
        let Some(rebuild) = Rebuild::start(&self.db, event).await? else {
            return Ok(None);
        };
        let generation = rebuild.generation;
        let keys = self.keys(event);
        let mut redis = self.redis.clone();
        let _: i64 = self.timed(redis.del(&keys)).await?;
        let state = &rebuild.state;
        let kind = state.event.kind;
        let (mut held, mut sold) = (0u64, 0u64);
        let mut res = Vec::new();
        let mut users: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
        let mut idem = Vec::new();
        let mut holds = Vec::new();
        for r in &state.reservations {
            let key = r.idempotency_key.as_ref().map_or("", |k| k.as_str());
            if !key.is_empty() {
                idem.push((
                    format!("{}{SEP}{key}", r.user_id.as_str()),
                    format!("{}{SEP}{}", r.id, r.quantity),
                ));
            }
            if !r.status.is_active() {
                continue;
            }
            if r.status == ReservationStatus::Held {
                held += u64::from(r.quantity);
                if let Some(at) = r.expires_at {
                    holds.push((at.timestamp_millis(), r.id.to_string()));
                }
            } else {
                sold += u64::from(r.quantity);
            }
            *users.entry(r.user_id.as_str()).or_default() += r.quantity;
            res.push((
                r.id.to_string(),
                format!(
                    "{}{SEP}{}{SEP}{}{SEP}{key}",
                    r.status.as_str(),
                    r.quantity,
                    r.user_id.as_str()
                ),
            ));
        }
        for chunk in res.chunks(REBUILD_CHUNK) {
            let _: i64 = self
                .timed(redis.hset_multiple(&keys[1], chunk))
                .await
                .map(|()| 0)?;
        }
        let users: Vec<(&str, u32)> = users.into_iter().collect();
        for chunk in users.chunks(REBUILD_CHUNK) {
            let _: i64 = self
                .timed(redis.hset_multiple(&keys[2], chunk))
                .await
                .map(|()| 0)?;
        }
        for chunk in idem.chunks(REBUILD_CHUNK) {
            let _: i64 = self
                .timed(redis.hset_multiple(&keys[3], chunk))
                .await
                .map(|()| 0)?;
        }
        for chunk in holds.chunks(REBUILD_CHUNK) {
            let members: Vec<(i64, &str)> = chunk.iter().map(|(at, id)| (*at, id.as_str())).collect();
            let _: i64 = self.timed(redis.zadd_multiple(&keys[5], &members)).await?;
        }
        let e = &state.event;
        let meta: Vec<(&str, String)> = vec![
            ("stock", e.stock.to_string()),
            ("held", held.to_string()),
            ("sold", sold.to_string()),
            ("inflight", "0".into()),
            (
                "kind",
                match kind {
                    EventKind::Coupon => "coupon",
                    EventKind::Ticket => "ticket",
                }
                .into(),
            ),
            ("limit", e.per_user_limit.to_string()),
            ("maxreq", e.max_per_request.to_string()),
            (
                "opens",
                e.opens_at
                    .map(|at| at.timestamp_millis().to_string())
                    .unwrap_or_default(),
            ),
            (
                "closes",
                e.closes_at
                    .map(|at| at.timestamp_millis().to_string())
                    .unwrap_or_default(),
            ),
            ("closed", if e.closed { "1" } else { "0" }.into()),
            // Last: until this field exists, every script answers NOLEDGER.
            ("gen", generation.to_string()),
        ];
        let _: i64 = self
            .timed(redis.hset_multiple(&keys[0], &meta))
            .await
            .map(|()| 0)?;
        rebuild.finish().await?;
        metrics::counter!(crate::metrics::LEDGER_REBUILDS).increment(1);
        tracing::info!(
            event = %event,
            generation,
            reservations = res.len(),
            held,
            sold,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "ledger rebuilt from the database"
        );
        Ok(Some(generation))
    }

    pub fn client(&self) -> &redis::Client {
        &self.client
    }
}

fn push_reports(args: &mut Vec<String>, reports: &[Report], counted: bool) {
    if counted {
        args.push(reports.len().to_string());
    }
    for r in reports {
        args.push(r.id.to_string());
        args.push(r.status.map_or("gone", |s| s.as_str()).to_owned());
        args.push(r.expires_ms.map(|v| v.to_string()).unwrap_or_default());
    }
}

/// Reads `{ 'OK', stock, held, sold, inflight, next expiry, rest… }` or a refusal of the ledger.
fn answer<T>(
    reply: Vec<Option<String>>,
    rest: impl FnOnce(&[Option<String>]) -> anyhow::Result<T>,
) -> anyhow::Result<Answer<T>> {
    let field = |i: usize| reply.get(i).and_then(|v| v.as_deref());
    match field(0) {
        Some("OK") => {
            let number = |i: usize| field(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let counts = Counts {
                stock: number(1),
                held: number(2),
                sold: number(3),
                inflight: number(4),
                next_due_ms: field(5).and_then(|v| v.parse::<f64>().ok()).map(|v| v as i64),
            };
            let rest = rest(reply.get(6..).unwrap_or(&[]))?;
            Ok(Answer::Ok(counts, rest))
        }
        Some("NOLEDGER") => Ok(Answer::NoLedger),
        Some("GENERATION") => Ok(Answer::Generation(
            field(1).and_then(|v| v.parse().ok()).unwrap_or(0),
        )),
        other => Err(anyhow!("the ledger answered {other:?}")),
    }
}

fn verdict(raw: &str) -> anyhow::Result<Verdict> {
    let (code, value) = raw.split_once(':').unwrap_or((raw, ""));
    let number = || {
        value
            .parse::<u64>()
            .with_context(|| format!("the ledger answered {raw:?}"))
    };
    Ok(match code {
        "OK" => Verdict::Granted,
        "REPLAY" => Verdict::Replay(parse_id(value)?),
        "SOLD_OUT" => Verdict::SoldOut,
        "INSUFFICIENT" => Verdict::Insufficient(number()?),
        "LIMIT" => Verdict::LimitReached(number()? as u32),
        "NOT_OPEN" => Verdict::NotOpen,
        "CLOSED" => Verdict::Closed,
        "OVER_MAX" => Verdict::OverMax(number()? as u32),
        "IN_FLIGHT" => Verdict::KeyInFlight,
        "REUSED" => Verdict::KeyReused(number()? as u32),
        _ => bail!("the ledger answered {raw:?}"),
    })
}

fn parse_id(raw: &str) -> anyhow::Result<ReservationId> {
    let uuid = uuid::Uuid::parse_str(raw).with_context(|| format!("the ledger holds a bad id {raw:?}"))?;
    Ok(ReservationId::from_db(uuid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_verdict_the_gate_script_returns_is_understood() -> anyhow::Result<()> {
        assert_eq!(verdict("OK")?, Verdict::Granted);
        assert_eq!(verdict("INSUFFICIENT:3")?, Verdict::Insufficient(3));
        assert_eq!(verdict("LIMIT:1")?, Verdict::LimitReached(1));
        assert_eq!(verdict("REUSED:2")?, Verdict::KeyReused(2));
        assert!(verdict("WHAT").is_err());
        Ok(())
    }
}
