//! # Persister: group commit
//!
//! Owns the write side of the database. Event actors submit their decided changes here and
//! never await the database themselves. While one transaction is in flight, new writes queue;
//! when it ends, the next transaction takes everything queued (up to `max_batch`) at once. No
//! timer: a lone write waits for one commit, and under a stampede thousands share one.
//!
//! Each event actor hears the outcome of its writes in a batch as one [`Committed`] message, so
//! an actor with thousands of requests in flight is woken once per batch, not once per request.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use actix::prelude::*;
use sea_orm::DatabaseConnection;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::domain::EventId;
use crate::store::{self, Backend, UserIndex, WriteOp};

/// A batch could not be committed; none of its writes took effect (or, if the connection broke
/// during COMMIT, the outcome is unknown and the database must be re-read).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the batch was not committed: {0}")]
pub struct CommitFailed(pub String);

/// Writes an event actor has decided on, each with its sequence number; answered later by
/// [`Committed`] carrying those numbers.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Submit {
    pub event: EventId,
    pub writes: Vec<(u64, WriteOp)>,
    pub notify: Arc<Recipient<Committed>>,
}

/// To an event actor: the outcome of the writes it submitted that went into one batch.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Committed {
    pub seqs: Vec<u64>,
    pub outcome: Result<(), CommitFailed>,
}

/// Commits `op` (if any) after everything submitted before it, and resolves with the outcome of
/// its batch. With no op it is a barrier: once it resolves, every earlier write has ended.
#[derive(Message)]
#[rtype(result = "Result<(), CommitFailed>")]
pub struct WriteAndWait(pub Option<WriteOp>);

enum Waiter {
    Actor {
        event: EventId,
        seq: u64,
        notify: Arc<Recipient<Committed>>,
    },
    Caller(oneshot::Sender<Result<(), CommitFailed>>),
}

/// Running totals, read by the admin stats endpoint and the benchmark.
#[derive(Debug, Default)]
pub struct PersisterStats {
    batches: AtomicU64,
    writes: AtomicU64,
    commit_micros: AtomicU64,
    largest_batch: AtomicU64,
    failed_batches: AtomicU64,
}

#[derive(Debug, Serialize)]
pub struct PersisterStatsView {
    pub batches: u64,
    pub writes: u64,
    pub failed_batches: u64,
    pub largest_batch: u64,
    pub mean_batch: f64,
    pub mean_commit_ms: f64,
}

impl PersisterStats {
    pub fn view(&self) -> PersisterStatsView {
        let batches = self.batches.load(Ordering::Relaxed);
        let writes = self.writes.load(Ordering::Relaxed);
        let micros = self.commit_micros.load(Ordering::Relaxed);
        let per_batch = |total: u64| {
            if batches == 0 {
                0.0
            } else {
                total as f64 / batches as f64
            }
        };
        PersisterStatsView {
            batches,
            writes,
            failed_batches: self.failed_batches.load(Ordering::Relaxed),
            largest_batch: self.largest_batch.load(Ordering::Relaxed),
            mean_batch: per_batch(writes),
            mean_commit_ms: per_batch(micros) / 1000.0,
        }
    }
}

pub struct Persister {
    db: DatabaseConnection,
    backend: Backend,
    max_batch: usize,
    queue: VecDeque<(Option<WriteOp>, Waiter)>,
    committing: bool,
    stats: Arc<PersisterStats>,
    /// SQLite: shared with the bulk runner (see [`WriteGate`]).
    write_gate: Option<WriteGate>,
    /// SQLite: told of every committed insert before its client is (see [`UserIndex`]).
    user_index: Option<Arc<UserIndex>>,
}

/// SQLite lets one connection write at a time, and a writer that finds the database locked
/// sleeps and retries (the busy handler), with no queue: beside a bulk job that takes the lock
/// back-to-back for chunk after chunk, live commits waited hundreds of milliseconds. Writers of
/// this process take this FIFO mutex around each transaction instead, so a live commit waits
/// for at most the one chunk in progress.
pub type WriteGate = Arc<tokio::sync::Mutex<()>>;

impl Persister {
    /// Takes `gate` around every commit.
    pub fn with_write_gate(mut self, gate: Option<WriteGate>) -> Self {
        self.write_gate = gate;
        self
    }

    /// Adds every committed insert to `index` before its waiters hear the outcome.
    pub fn with_user_index(mut self, index: Option<Arc<UserIndex>>) -> Self {
        self.user_index = index;
        self
    }

    pub fn new(
        db: DatabaseConnection,
        backend: Backend,
        max_batch: usize,
        stats: Arc<PersisterStats>,
    ) -> Self {
        Self {
            db,
            backend,
            max_batch: max_batch.max(1),
            queue: VecDeque::new(),
            committing: false,
            stats,
            write_gate: None,
            user_index: None,
        }
    }

    /// Starts the next transaction if none is in flight and anything is queued.
    fn commit_next(&mut self, ctx: &mut Context<Self>) {
        if self.committing || self.queue.is_empty() {
            return;
        }
        self.committing = true;
        let take = self.queue.len().min(self.max_batch);
        let mut ops = Vec::with_capacity(take);
        let mut waiters = Vec::with_capacity(take);
        for (op, waiter) in self.queue.drain(..take) {
            ops.extend(op);
            waiters.push(waiter);
        }
        let db = self.db.clone();
        let backend = self.backend;
        let started = Instant::now();
        let gate = self.write_gate.clone();
        let user_index = self.user_index.clone();
        let commit = async move {
            if ops.is_empty() {
                return Ok(ops.len());
            }
            let _turn = match &gate {
                Some(gate) => Some(gate.lock().await),
                None => None,
            };
            store::apply_batch(&db, backend, &ops).await?;
            if let Some(index) = &user_index {
                index.record(&ops);
            }
            anyhow::Ok(ops.len())
        };
        ctx.spawn(commit.into_actor(self).map(move |result, act, ctx| {
            let outcome = match result {
                Ok(writes) => {
                    act.record(writes, started);
                    Ok(())
                }
                Err(error) => {
                    act.stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(crate::metrics::PERSISTER_FAILED_BATCHES).increment(1);
                    tracing::error!(
                        error = format!("{error:#}"),
                        writes = waiters.len(),
                        "batch commit failed"
                    );
                    Err(CommitFailed(format!("{error:#}")))
                }
            };
            notify(waiters, &outcome);
            act.committing = false;
            act.commit_next(ctx);
        }));
    }

    fn record(&self, writes: usize, started: Instant) {
        let elapsed = started.elapsed();
        metrics::histogram!(crate::metrics::PERSISTER_BATCH_WRITES).record(writes as f64);
        metrics::histogram!(crate::metrics::PERSISTER_COMMIT_SECONDS).record(elapsed.as_secs_f64());
        let writes = writes as u64;
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.writes.fetch_add(writes, Ordering::Relaxed);
        self.stats
            .commit_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.stats.largest_batch.fetch_max(writes, Ordering::Relaxed);
    }
}

/// Tells every waiter of a batch its outcome: one message per event actor.
fn notify(waiters: Vec<Waiter>, outcome: &Result<(), CommitFailed>) {
    let mut by_event: HashMap<EventId, (Arc<Recipient<Committed>>, Vec<u64>)> = HashMap::new();
    for waiter in waiters {
        match waiter {
            Waiter::Actor { event, seq, notify } => by_event
                .entry(event)
                .or_insert_with(|| (notify, Vec::new()))
                .1
                .push(seq),
            Waiter::Caller(tx) => {
                let _ = tx.send(outcome.clone());
            }
        }
    }
    for (notify, seqs) in by_event.into_values() {
        notify.do_send(Committed {
            seqs,
            outcome: outcome.clone(),
        });
    }
}

impl Actor for Persister {
    type Context = Context<Self>;
}

impl Handler<Submit> for Persister {
    type Result = ();

    fn handle(&mut self, msg: Submit, ctx: &mut Context<Self>) {
        for (seq, op) in msg.writes {
            let waiter = Waiter::Actor {
                event: msg.event,
                seq,
                notify: msg.notify.clone(),
            };
            self.queue.push_back((Some(op), waiter));
        }
        self.commit_next(ctx);
    }
}

impl Handler<WriteAndWait> for Persister {
    type Result = ResponseFuture<Result<(), CommitFailed>>;

    fn handle(&mut self, msg: WriteAndWait, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.queue.push_back((msg.0, Waiter::Caller(tx)));
        self.commit_next(ctx);
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(CommitFailed("the persister stopped".into())))
        })
    }
}
