//! # ClusterEventActor: one event on one of several nodes
//!
//! The same role and messages as [`EventActor`](crate::actors::EventActor), with the decisions
//! made by the shared Redis ledger instead of local memory:
//! - reservation requests gather in the mailbox while one gate call is in flight; the next call
//!   takes them all, with the commit outcomes to report (one round trip per batch);
//! - granted requests go to the persister as generation-fenced inserts; the 201 waits for the
//!   commit, as on one node;
//! - confirm, cancel and expiry change the row conditionally in PostgreSQL (so racing nodes
//!   cannot both win) and then report the row to the ledger;
//! - a reconciliation tick settles allocations left silent by a dead node;
//! - counts reach other nodes' WebSocket listeners over pub/sub.
//!
//! It never awaits Redis or the database inside its turn: each call runs as a spawned future
//! whose result comes back as a turn of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actix::prelude::*;
use chrono::TimeDelta;
use sea_orm::DatabaseConnection;

use super::{Answer, Cluster, Counts, GateRequest, Report, Rules, Verdict};
use crate::actors::event::{
    Admission, Cancel, Confirm, EventSnapshot, Lifecycle, Listening, Refusal, Reply, Reserve, Reserved,
    Snapshot, UpdateEvent,
};
use crate::actors::live::{LiveChannel, LivePublisher};
use crate::actors::persister::{Committed, PersisterAddr, Submit, WriteAndWait};
use crate::domain::{Event, EventId, EventKind, Reservation, ReservationId, ReservationStatus};
use crate::store::{self, WriteOp};

/// Most requests one gate call carries; the rest wait for the next.
const MAX_GATE_BATCH: usize = 1_000;
/// How often the actor looks for allocations left silent by a dead node.
const RECONCILE_TICK: Duration = Duration::from_secs(1);
/// Longest wait between expiry checks (ticket events): a hold made on another node is only
/// learned of here through the ledger, so it is polled; one cheap call when nothing is due.
const EXPIRY_IDLE: Duration = Duration::from_millis(100);
/// How often, at most, this node tells the others about changed counts.
const PUBLISH_EVERY: Duration = Duration::from_millis(50);
/// Wait before trying again to reach a usable ledger.
const RETRY: Duration = Duration::from_millis(250);
/// How long a request waits for a usable ledger (the actor starting, a rebuild) before it is
/// answered 503.
const WAIT_FOR_LEDGER: Duration = Duration::from_secs(2);

/// Counts (and whether the event itself changed) from another node, over pub/sub.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct RemoteCounts {
    pub counts: Counts,
    pub event_changed: bool,
}

#[derive(Message)]
#[rtype(result = "()")]
struct FlushGate;

struct Request {
    id: ReservationId,
    msg: Reserve,
    since: std::time::Instant,
}

enum Phase {
    /// No usable ledger yet (starting, or Redis lost it): requests get 503.
    Waiting,
    Ready {
        event: Box<Event>,
        generation: i64,
    },
    Gone,
}

pub struct ClusterEventActor {
    id: EventId,
    db: DatabaseConnection,
    persister: PersisterAddr,
    cluster: Arc<Cluster>,
    lifecycle: Arc<Lifecycle>,
    admission: Arc<Admission>,
    live: LivePublisher,
    phase: Phase,
    /// True while a task is bringing the ledger back; at most one runs.
    recovering: bool,
    counts: Counts,
    gathering: Vec<Request>,
    reports: Vec<Report>,
    gate_busy: bool,
    gate_scheduled: bool,
    awaiting: HashMap<u64, (Reservation, Reply)>,
    next_seq: u64,
    notify: Option<Arc<Recipient<Committed>>>,
    expiry_timer: Option<SpawnHandle>,
    expiring: bool,
    live_timer: Option<SpawnHandle>,
    publish_timer: Option<SpawnHandle>,
    /// The counts other nodes last heard from this one.
    published: Option<Counts>,
    /// Event reads waiting for a usable ledger.
    snapshot_waiters: Vec<(std::time::Instant, SnapshotReply)>,
}

type SnapshotReply = tokio::sync::oneshot::Sender<Result<EventSnapshot, Refusal>>;

impl ClusterEventActor {
    pub fn new(
        id: EventId,
        db: DatabaseConnection,
        persister: PersisterAddr,
        cluster: Arc<Cluster>,
        lifecycle: Arc<Lifecycle>,
        admission: Arc<Admission>,
        live: Arc<LiveChannel>,
    ) -> Self {
        Self {
            id,
            db,
            persister,
            cluster,
            lifecycle,
            admission,
            live: LivePublisher::new(live),
            phase: Phase::Waiting,
            recovering: false,
            counts: Counts::default(),
            gathering: Vec::new(),
            reports: Vec::new(),
            gate_busy: false,
            gate_scheduled: false,
            awaiting: HashMap::new(),
            next_seq: 0,
            notify: None,
            expiry_timer: None,
            expiring: false,
            live_timer: None,
            publish_timer: None,
            published: None,
            snapshot_waiters: Vec::new(),
        }
    }

    /// Reaches a ledger of the event's current generation (rebuilding it if needed), then serves.
    fn recover(&mut self, ctx: &mut Context<Self>) {
        if matches!(self.phase, Phase::Gone) || self.recovering {
            return;
        }
        self.recovering = true;
        if let Phase::Ready { event, .. } = std::mem::replace(&mut self.phase, Phase::Waiting) {
            // Keep nothing from the old ledger; the edge sends every claim here meanwhile.
            drop(event);
        }
        self.admission.publish_unknown();
        let (cluster, db, id) = (self.cluster.clone(), self.db.clone(), self.id);
        let work = async move {
            loop {
                match cluster.ensure_ledger(id).await {
                    Ok(Some(generation)) => match store::find_event(&db, id).await {
                        Ok(Some(event)) => match cluster.counts(id).await {
                            Ok(Some(counts)) => return Some((event, generation, counts)),
                            Ok(None) => {}
                            Err(error) => {
                                tracing::warn!(event = %id, error = format!("{error:#}"), "cannot read the ledger")
                            }
                        },
                        Ok(None) => return None,
                        Err(error) => {
                            tracing::warn!(event = %id, error = format!("{error:#}"), "cannot read the event")
                        }
                    },
                    Ok(None) => return None,
                    Err(error) => {
                        tracing::debug!(event = %id, error = format!("{error:#}"), "ledger not usable yet")
                    }
                }
                tokio::time::sleep(RETRY).await;
            }
        };
        ctx.spawn(work.into_actor(self).map(|found, act, ctx| {
            act.recovering = false;
            match found {
                None => {
                    act.phase = Phase::Gone;
                    for (_, waiter) in act.snapshot_waiters.drain(..) {
                        let _ = waiter.send(Err(Refusal::EventGone));
                    }
                }
                Some((event, generation, counts)) => {
                    for (_, waiter) in act.snapshot_waiters.drain(..) {
                        let _ = waiter.send(Ok(snapshot(&event, counts)));
                    }
                    tracing::debug!(event = %act.id, generation, "ledger ready");
                    act.phase = Phase::Ready {
                        event: Box::new(event),
                        generation,
                    };
                    act.counts = counts;
                    act.counts_changed(ctx);
                    act.arm_expiry(ctx, Duration::ZERO);
                    act.schedule_gate(ctx);
                }
            }
        }));
    }

    /// Answers 503 to requests that have waited too long for a usable ledger.
    fn answer_overdue(&mut self) {
        if self.ready().is_some() {
            return;
        }
        let waiters = std::mem::take(&mut self.snapshot_waiters);
        for (since, waiter) in waiters {
            if since.elapsed() >= WAIT_FOR_LEDGER {
                let _ = waiter.send(Err(Refusal::Unavailable));
            } else {
                self.snapshot_waiters.push((since, waiter));
            }
        }
        let refusal = self.refusal_when_not_ready();
        let (overdue, waiting): (Vec<Request>, Vec<Request>) = std::mem::take(&mut self.gathering)
            .into_iter()
            .partition(|r| matches!(self.phase, Phase::Gone) || r.since.elapsed() >= WAIT_FOR_LEDGER);
        self.gathering = waiting;
        for request in overdue {
            let _ = request.msg.reply.send(Err(refusal.clone()));
        }
    }

    /// Reacts to a ledger that refused a call: a missing one is rebuilt, a newer generation is
    /// adopted after checking PostgreSQL agrees.
    fn ledger_refused<T>(&mut self, answer: &Answer<T>, ctx: &mut Context<Self>) {
        match answer {
            Answer::Ok(..) => {}
            Answer::NoLedger => {
                tracing::warn!(event = %self.id, "the Redis ledger is missing; rebuilding before serving");
                self.recover(ctx);
            }
            Answer::Generation(found) => {
                tracing::info!(event = %self.id, found, "the ledger generation changed");
                self.recover(ctx);
            }
        }
    }

    fn ready(&self) -> Option<(&Event, i64)> {
        match &self.phase {
            Phase::Ready { event, generation } => Some((event, *generation)),
            _ => None,
        }
    }

    fn refusal_when_not_ready(&self) -> Refusal {
        match self.phase {
            Phase::Gone => Refusal::EventGone,
            _ => Refusal::Unavailable,
        }
    }

    fn schedule_gate(&mut self, ctx: &mut Context<Self>) {
        if !self.gate_scheduled && !self.gate_busy {
            self.gate_scheduled = true;
            ctx.notify(FlushGate);
        }
    }

    /// Sends the gathered requests and reports to the ledger in one call.
    fn flush_gate(&mut self, ctx: &mut Context<Self>) {
        self.gate_scheduled = false;
        if self.gate_busy || (self.gathering.is_empty() && self.reports.is_empty()) {
            return;
        }
        // Without a ledger, requests wait (see `answer_overdue`).
        let Some((_, generation)) = self.ready() else {
            return;
        };
        self.gate_busy = true;
        let take = self.gathering.len().min(MAX_GATE_BATCH);
        let requests: Vec<Request> = self.gathering.drain(..take).collect();
        let reports = std::mem::take(&mut self.reports);
        let (cluster, id) = (self.cluster.clone(), self.id);
        let ask: Vec<(ReservationId, String, u32, Option<String>)> = requests
            .iter()
            .map(|r| {
                (
                    r.id,
                    r.msg.user.as_str().to_owned(),
                    r.msg.quantity.get(),
                    r.msg.key.as_ref().map(|k| k.as_str().to_owned()),
                )
            })
            .collect();
        let call = async move {
            let gate: Vec<GateRequest<'_>> = ask
                .iter()
                .map(|(id, user, quantity, key)| GateRequest {
                    id: *id,
                    user,
                    quantity: *quantity,
                    key: key.as_deref(),
                })
                .collect();
            let answer = cluster.gate(id, generation, &reports, &gate).await;
            (answer, reports)
        };
        ctx.spawn(call.into_actor(self).map(move |(answer, reports), act, ctx| {
            act.gate_busy = false;
            act.gated(answer, requests, reports, generation, ctx);
            act.schedule_gate(ctx);
        }));
    }

    fn gated(
        &mut self,
        answer: anyhow::Result<Answer<Vec<Verdict>>>,
        requests: Vec<Request>,
        reports: Vec<Report>,
        generation: i64,
        ctx: &mut Context<Self>,
    ) {
        let verdicts = match answer {
            Ok(Answer::Ok(counts, verdicts)) => {
                self.counts = counts;
                verdicts
            }
            Ok(refused) => {
                for request in requests {
                    let _ = request.msg.reply.send(Err(Refusal::Unavailable));
                }
                self.ledger_refused(&refused, ctx);
                return;
            }
            Err(error) => {
                // The call may or may not have allocated: settle those ids as a dead node's.
                tracing::warn!(event = %self.id, error = format!("{error:#}"), requests = requests.len(), "ledger call failed");
                let ids: Vec<ReservationId> = requests.iter().map(|r| r.id).collect();
                for request in requests {
                    let _ = request.msg.reply.send(Err(Refusal::Unavailable));
                }
                // Reports not delivered are delivered later (they are idempotent).
                self.reports.extend(reports);
                self.settle_soon(ids, ctx);
                return;
            }
        };
        let Some((event, _)) = self.ready() else {
            return;
        };
        let event = event.clone();
        let now = crate::domain::now();
        let mut writes = Vec::new();
        for (request, verdict) in requests.into_iter().zip(verdicts) {
            let Request { id, msg, .. } = request;
            let refusal = match verdict {
                Verdict::Granted => {
                    let status = ReservationStatus::initial(event.kind);
                    let reservation = Reservation {
                        id,
                        event_id: event.id,
                        user_id: msg.user,
                        quantity: msg.quantity.get(),
                        status,
                        expires_at: (status == ReservationStatus::Held)
                            .then(|| now + TimeDelta::seconds(i64::from(event.hold_seconds))),
                        created_at: now,
                        idempotency_key: msg.key,
                    };
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    writes.push((
                        seq,
                        WriteOp::InsertFenced {
                            reservation: reservation.clone(),
                            generation,
                        },
                    ));
                    self.awaiting.insert(seq, (reservation, msg.reply));
                    continue;
                }
                Verdict::Replay(first) => {
                    self.replay(first, event.kind, msg.reply, ctx);
                    continue;
                }
                Verdict::SoldOut => Refusal::SoldOut,
                Verdict::Insufficient(remaining) => Refusal::InsufficientStock { remaining },
                Verdict::LimitReached(limit) => Refusal::LimitReached { limit },
                Verdict::NotOpen => Refusal::NotOpen(event.opens_at.unwrap_or(now)),
                Verdict::Closed => Refusal::Closed,
                Verdict::OverMax(max) => Refusal::QuantityOverMax { max },
                Verdict::KeyInFlight => Refusal::KeyInFlight,
                Verdict::KeyReused(first_quantity) => Refusal::KeyReused { first_quantity },
            };
            let _ = msg.reply.send(Err(refusal));
        }
        if !writes.is_empty() {
            let notify = self
                .notify
                .get_or_insert_with(|| Arc::new(ctx.address().recipient()))
                .clone();
            self.persister.submit(Submit {
                event: self.id,
                writes,
                notify,
            });
        }
        self.counts_changed(ctx);
    }

    /// Answers a retry with the first answer to its Idempotency-Key, read from the record.
    fn replay(&mut self, first: ReservationId, kind: EventKind, reply: Reply, ctx: &mut Context<Self>) {
        let db = self.db.clone();
        let read = async move { store::find_reservation(&db, first).await };
        ctx.spawn(read.into_actor(self).map(move |found, _, _| {
            let answer = match found {
                Ok(Some(mut reservation)) => {
                    reservation.status = ReservationStatus::initial(kind);
                    Ok(Reserved {
                        reservation,
                        replayed: true,
                    })
                }
                _ => Err(Refusal::Unavailable),
            };
            let _ = reply.send(answer);
        }));
    }

    fn committed(&mut self, msg: Committed, ctx: &mut Context<Self>) {
        let mut failed = Vec::new();
        for seq in msg.seqs {
            let Some((reservation, reply)) = self.awaiting.remove(&seq) else {
                continue;
            };
            match &msg.outcome {
                Ok(()) => {
                    self.reports.push(Report {
                        id: reservation.id,
                        status: Some(reservation.status),
                        expires_ms: reservation.expires_at.map(|at| at.timestamp_millis()),
                    });
                    let _ = reply.send(Ok(Reserved {
                        reservation,
                        replayed: false,
                    }));
                }
                Err(_) => {
                    failed.push(reservation.id);
                    let _ = reply.send(Err(Refusal::Unavailable));
                }
            }
        }
        if !failed.is_empty() {
            self.settle_soon(failed, ctx);
        }
        self.schedule_gate(ctx);
    }

    /// Settles `ids` (fence, read, report) now, retrying a few times; whatever is still unsettled
    /// stays pending for the reconciliation tick.
    fn settle_soon(&mut self, ids: Vec<ReservationId>, ctx: &mut Context<Self>) {
        let Some((_, generation)) = self.ready() else {
            return;
        };
        let (cluster, id) = (self.cluster.clone(), self.id);
        let work = async move {
            for attempt in 0..3 {
                match cluster.settle(id, generation, &ids).await {
                    Ok(answer) => return Some(answer),
                    Err(error) => {
                        tracing::warn!(event = %id, attempt, error = format!("{error:#}"), "cannot settle allocations yet")
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            None
        };
        ctx.spawn(work.into_actor(self).map(|answer, act, ctx| {
            if let Some(answer) = answer {
                act.take_counts(answer, ctx);
            }
        }));
    }

    /// Applies the counts of a ledger answer, or reacts to its refusal.
    fn take_counts<T>(&mut self, answer: Answer<T>, ctx: &mut Context<Self>) {
        match answer {
            Answer::Ok(counts, _) => {
                self.counts = counts;
                self.counts_changed(ctx);
            }
            refused => self.ledger_refused(&refused, ctx),
        }
    }

    /// Tells the edge, the local listeners and (throttled) the other nodes about new counts.
    fn counts_changed(&mut self, ctx: &mut Context<Self>) {
        let Some((event, _)) = self.ready() else { return };
        let event = event.clone();
        let now = crate::domain::now();
        self.admission
            .publish_counts(&event, self.counts.inventory(), now);
        self.publish_live(ctx);
        let last = self.published;
        let ended = |c: &Counts| c.inventory().remaining() == 0 && c.inflight == 0;
        let urgent = last.is_none_or(|p| ended(&self.counts) != ended(&p));
        if last == Some(self.counts) {
            return;
        }
        if urgent {
            self.publish_remote(false, ctx);
        } else if self.publish_timer.is_none() {
            self.publish_timer = Some(ctx.run_later(PUBLISH_EVERY, |act, ctx| {
                act.publish_timer = None;
                if act.published != Some(act.counts) {
                    act.publish_remote(false, ctx);
                }
            }));
        }
    }

    fn publish_remote(&mut self, event_changed: bool, ctx: &mut Context<Self>) {
        self.published = Some(self.counts);
        let message = super::bridge::encode(self.id, self.counts, event_changed);
        let cluster = self.cluster.clone();
        ctx.spawn(
            async move {
                if let Err(error) = cluster.publish(&message).await {
                    tracing::debug!(error = format!("{error:#}"), "cannot publish counts");
                }
            }
            .into_actor(self),
        );
    }

    fn publish_live(&mut self, ctx: &mut Context<Self>) {
        let Some((event, _)) = self.ready() else { return };
        let event = event.clone();
        let inventory = self.counts.inventory();
        // `sold_out` once no allocation anywhere is still waiting for its commit.
        let settled = inventory.remaining() > 0 || self.counts.inflight == 0;
        if let Some(after) = self.live.publish(&event, inventory, settled)
            && self.live_timer.is_none()
        {
            self.live_timer = Some(ctx.run_later(after, |act, ctx| {
                act.live_timer = None;
                act.publish_live(ctx);
            }));
        }
    }

    /// Checks for due holds at `after` (tickets only).
    fn arm_expiry(&mut self, ctx: &mut Context<Self>, after: Duration) {
        let Some((event, _)) = self.ready() else { return };
        if event.kind != EventKind::Ticket {
            return;
        }
        if let Some(timer) = self.expiry_timer.take() {
            ctx.cancel_future(timer);
        }
        self.expiry_timer = Some(ctx.run_later(after, |act, ctx| {
            act.expiry_timer = None;
            act.expire_due(ctx);
        }));
    }

    fn expire_due(&mut self, ctx: &mut Context<Self>) {
        let Some((_, generation)) = self.ready() else {
            return;
        };
        if self.expiring {
            return;
        }
        self.expiring = true;
        let (cluster, id) = (self.cluster.clone(), self.id);
        let work = async move {
            let claimed = cluster.claim_due(id, generation).await?;
            let (counts, ids) = match claimed {
                Answer::Ok(counts, ids) => (counts, ids),
                other => return Ok::<_, anyhow::Error>((other.map_refusal(), None)),
            };
            let next_due = counts.next_due_ms;
            if ids.is_empty() {
                return Ok((Answer::Ok(counts, 0), next_due));
            }
            let settled = cluster.settle(id, generation, &ids).await?;
            Ok((settled, next_due))
        };
        ctx.spawn(work.into_actor(self).map(|result, act, ctx| {
            act.expiring = false;
            let next_due = match result {
                Ok((answer, next_due)) => {
                    act.take_counts(answer, ctx);
                    next_due
                }
                Err(error) => {
                    tracing::warn!(event = %act.id, error = format!("{error:#}"), "cannot expire holds");
                    None
                }
            };
            let now = crate::domain::now().timestamp_millis();
            let wait = next_due
                .map(|due| Duration::from_millis(due.saturating_sub(now).max(0) as u64))
                .unwrap_or(EXPIRY_IDLE)
                .min(EXPIRY_IDLE);
            act.arm_expiry(ctx, wait);
        }));
    }

    fn reconcile(&mut self, ctx: &mut Context<Self>) {
        let Some((_, generation)) = self.ready() else {
            return;
        };
        let (cluster, id) = (self.cluster.clone(), self.id);
        ctx.spawn(
            async move { cluster.reconcile(id, generation).await }
                .into_actor(self)
                .map(|result, act, ctx| match result {
                    Ok(answer) => act.take_counts(answer, ctx),
                    Err(error) => {
                        tracing::debug!(event = %act.id, error = format!("{error:#}"), "reconciliation pass failed")
                    }
                }),
        );
    }

    /// Confirm or cancel: mark it pending, change the row conditionally, report the row.
    fn change(
        &mut self,
        id: ReservationId,
        user: crate::domain::UserId,
        confirm: bool,
        reply: Reply,
        ctx: &mut Context<Self>,
    ) {
        self.change_waiting(id, user, confirm, reply, std::time::Instant::now(), ctx);
    }

    /// A change that arrives while the ledger is being reached waits for it, like a reservation.
    fn change_waiting(
        &mut self,
        id: ReservationId,
        user: crate::domain::UserId,
        confirm: bool,
        reply: Reply,
        since: std::time::Instant,
        ctx: &mut Context<Self>,
    ) {
        let Some((event, generation)) = self.ready() else {
            if matches!(self.phase, Phase::Waiting) && since.elapsed() < WAIT_FOR_LEDGER {
                ctx.run_later(RETRY / 5, move |act, ctx| {
                    act.change_waiting(id, user, confirm, reply, since, ctx)
                });
            } else {
                let _ = reply.send(Err(self.refusal_when_not_ready()));
            }
            return;
        };
        let kind = event.kind;
        let (cluster, db, event_id) = (self.cluster.clone(), self.db.clone(), self.id);
        let work = async move {
            match cluster.intent(event_id, generation, &[id]).await? {
                Answer::Ok(..) => {}
                other => return Ok((Err(Refusal::Unavailable), other.map_refusal::<()>())),
            }
            let changed = if confirm {
                store::transition(
                    &db,
                    id,
                    &user,
                    &[ReservationStatus::Held],
                    ReservationStatus::Confirmed,
                    Some(crate::domain::now()),
                )
                .await?
            } else {
                store::transition(
                    &db,
                    id,
                    &user,
                    &[
                        ReservationStatus::Issued,
                        ReservationStatus::Held,
                        ReservationStatus::Confirmed,
                    ],
                    ReservationStatus::cancelled(kind),
                    None,
                )
                .await?
            };
            // The ledger learns the row's truth whichever way it went (and a due hold expires).
            let settled = cluster.settle(event_id, generation, &[id]).await?;
            let outcome = match changed {
                Some(reservation) => Ok(reservation),
                None => match store::find_reservation(&db, id).await? {
                    Some(current) if confirm && current.status == ReservationStatus::Confirmed => Ok(current),
                    _ => Err(Refusal::Ended),
                },
            };
            Ok::<_, anyhow::Error>((outcome, settled.map_refusal()))
        };
        ctx.spawn(work.into_actor(self).map(move |result, act, ctx| match result {
            Ok((outcome, answer)) => {
                // why first: this node's edge must not refuse a claim as sold out once the
                // client has heard that its cancel returned the unit.
                act.take_counts(answer, ctx);
                let _ = reply.send(outcome.map(|reservation| Reserved {
                    reservation,
                    replayed: false,
                }));
            }
            Err(error) => {
                tracing::warn!(event = %act.id, error = format!("{error:#}"), "cannot change a reservation");
                let _ = reply.send(Err(Refusal::Unavailable));
            }
        }));
    }
}

impl ClusterEventActor {
    /// After an update whose outcome is unknown: the ledger takes the rules the row now has.
    fn restore_rules(&mut self, ctx: &mut Context<Self>) {
        let Some((_, generation)) = self.ready() else {
            return;
        };
        let (cluster, db, id) = (self.cluster.clone(), self.db.clone(), self.id);
        let work = async move {
            let event = store::find_event(&db, id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("the event is gone"))?;
            cluster.set_rules(id, generation, &rules(&event)).await?;
            Ok::<_, anyhow::Error>(event)
        };
        ctx.spawn(work.into_actor(self).map(|result, act, ctx| match result {
            Ok(fresh) => {
                if let Phase::Ready { event, .. } = &mut act.phase {
                    **event = fresh;
                }
                act.publish_remote(true, ctx);
            }
            Err(error) => {
                tracing::error!(event = %act.id, error = format!("{error:#}"), "cannot restore the ledger's rules; rebuilding it");
                act.recover(ctx);
            }
        }));
    }
}

impl<T> Answer<T> {
    /// A refusal as an answer of another type (an `Ok` becomes one with no counts).
    fn map_refusal<U>(self) -> Answer<U>
    where
        U: Default,
    {
        match self {
            Answer::Ok(counts, _) => Answer::Ok(counts, U::default()),
            Answer::NoLedger => Answer::NoLedger,
            Answer::Generation(g) => Answer::Generation(g),
        }
    }
}

impl Actor for ClusterEventActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.lifecycle.starts.fetch_add(1, Ordering::Relaxed);
        ctx.run_interval(RECONCILE_TICK, |act, ctx| act.reconcile(ctx));
        ctx.run_interval(RETRY, |act, _| act.answer_overdue());
        self.recover(ctx);
    }
}

impl Supervised for ClusterEventActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.lifecycle.restarts.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(event = %self.id, "event actor restarting");
        self.recovering = false;
        self.gate_busy = false;
        self.gate_scheduled = false;
        self.expiring = false;
        self.expiry_timer = None;
        self.live_timer = None;
        self.publish_timer = None;
        self.phase = Phase::Waiting;
    }
}

impl Handler<Reserve> for ClusterEventActor {
    type Result = ();

    fn handle(&mut self, msg: Reserve, ctx: &mut Context<Self>) {
        self.admission.dequeued();
        if matches!(self.phase, Phase::Gone) {
            let _ = msg.reply.send(Err(Refusal::EventGone));
            return;
        }
        self.gathering.push(Request {
            id: ReservationId::new(),
            msg,
            since: std::time::Instant::now(),
        });
        self.schedule_gate(ctx);
    }
}

impl Handler<FlushGate> for ClusterEventActor {
    type Result = ();

    fn handle(&mut self, _: FlushGate, ctx: &mut Context<Self>) {
        self.flush_gate(ctx);
    }
}

impl Handler<Committed> for ClusterEventActor {
    type Result = ();

    fn handle(&mut self, msg: Committed, ctx: &mut Context<Self>) {
        self.committed(msg, ctx);
    }
}

impl Handler<Confirm> for ClusterEventActor {
    type Result = ();

    fn handle(&mut self, msg: Confirm, ctx: &mut Context<Self>) {
        self.admission.dequeued();
        self.change(msg.id, msg.user, true, msg.reply, ctx);
    }
}

impl Handler<Cancel> for ClusterEventActor {
    type Result = ();

    fn handle(&mut self, msg: Cancel, ctx: &mut Context<Self>) {
        self.admission.dequeued();
        self.change(msg.id, msg.user, false, msg.reply, ctx);
    }
}

impl Handler<Snapshot> for ClusterEventActor {
    type Result = ResponseActFuture<Self, Result<EventSnapshot, Refusal>>;

    /// Reads the global counts from the ledger, so every node shows the same numbers.
    fn handle(&mut self, _: Snapshot, _: &mut Context<Self>) -> Self::Result {
        let (cluster, id) = (self.cluster.clone(), self.id);
        let Some((event, _)) = self.ready() else {
            if matches!(self.phase, Phase::Gone) {
                return Box::pin(fut::ready(Err(Refusal::EventGone)));
            }
            // Starting or rebuilding: answered once the ledger is usable (see `answer_overdue`).
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.snapshot_waiters.push((std::time::Instant::now(), tx));
            return Box::pin(async move { rx.await.unwrap_or(Err(Refusal::Unavailable)) }.into_actor(self));
        };
        let event = event.clone();
        Box::pin(
            async move { cluster.counts(id).await }.into_actor(self).map(
                move |counts, act, ctx| match counts {
                    Ok(Some(counts)) => {
                        act.counts = Counts {
                            next_due_ms: act.counts.next_due_ms,
                            ..counts
                        };
                        act.counts_changed(ctx);
                        Ok(snapshot(&event, counts))
                    }
                    Ok(None) => {
                        act.recover(ctx);
                        Err(Refusal::Unavailable)
                    }
                    Err(_) => Err(Refusal::Unavailable),
                },
            ),
        )
    }
}

fn snapshot(event: &Event, counts: Counts) -> EventSnapshot {
    let mut event = event.clone();
    event.stock = counts.stock;
    let inventory = counts.inventory();
    EventSnapshot {
        remaining: inventory.remaining(),
        held: counts.held,
        sold: counts.sold,
        status: event.status(inventory, crate::domain::now()),
        event,
    }
}

impl Handler<Listening> for ClusterEventActor {
    type Result = ();

    fn handle(&mut self, _: Listening, ctx: &mut Context<Self>) {
        self.publish_live(ctx);
    }
}

impl Handler<RemoteCounts> for ClusterEventActor {
    type Result = ();

    fn handle(&mut self, msg: RemoteCounts, ctx: &mut Context<Self>) {
        if msg.event_changed {
            // Another node changed the rules: re-read the event itself.
            let db = self.db.clone();
            let id = self.id;
            ctx.spawn(
                async move { store::find_event(&db, id).await }
                    .into_actor(self)
                    .map(|found, act, ctx| {
                        if let (Ok(Some(fresh)), Phase::Ready { event, .. }) = (found, &mut act.phase) {
                            **event = fresh;
                            act.counts_changed(ctx);
                        }
                    }),
            );
        }
        self.counts = Counts {
            next_due_ms: self.counts.next_due_ms,
            ..msg.counts
        };
        // Heard from another node: no need to repeat it.
        self.published = Some(self.counts);
        if self.ready().is_some() {
            let event = self.ready().map(|(e, _)| e.clone());
            if let Some(event) = event {
                self.admission
                    .publish_counts(&event, self.counts.inventory(), crate::domain::now());
            }
            self.publish_live(ctx);
        }
    }
}

impl Handler<UpdateEvent> for ClusterEventActor {
    type Result = AtomicResponse<Self, Result<EventSnapshot, Refusal>>;

    /// Atomic, like on one node. The ledger's stock is first lowered to the smaller of the old and
    /// new values (so no node allocates past either), then the row commits, then the new rules.
    fn handle(&mut self, msg: UpdateEvent, _: &mut Context<Self>) -> Self::Result {
        let Some((event, generation)) = self.ready() else {
            let refusal = self.refusal_when_not_ready();
            return AtomicResponse::new(Box::pin(fut::ready(Err(refusal))));
        };
        let current = event.clone();
        let (cluster, id, persister) = (self.cluster.clone(), self.id, self.persister.clone());
        let work = async move {
            let counts = cluster.counts(id).await?.ok_or(Refusal::Unavailable)?;
            let now = crate::domain::now();
            let next = current
                .patched(&msg.0, counts.inventory(), now)
                .map_err(Refusal::InvalidPatch)?;
            let interim = Rules {
                stock: next.stock.min(counts.stock),
                ..rules(&next)
            };
            match cluster.set_rules(id, generation, &interim).await? {
                Answer::Ok(_, Ok(())) => {}
                Answer::Ok(_, Err(taken)) => {
                    return Err(Refusal::InvalidPatch(crate::domain::Invalid(format!(
                        "stock cannot go below the {taken} units held or sold"
                    )))
                    .into());
                }
                _ => return Err(Refusal::Unavailable.into()),
            }
            persister
                .send(WriteAndWait(Some(WriteOp::UpdateEvent(next.clone()))))
                .await
                .map_err(|_| Refusal::Unavailable)?
                .map_err(|_| Refusal::Unavailable)?;
            match cluster.set_rules(id, generation, &rules(&next)).await? {
                Answer::Ok(counts, _) => Ok((next, counts)),
                _ => Err(Refusal::Unavailable.into()),
            }
        };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(
            |result: Result<(Event, Counts), UpdateFailed>, act, ctx| match result {
                Ok((next, counts)) => {
                    let snapshot = snapshot(&next, counts);
                    if let Phase::Ready { event, .. } = &mut act.phase {
                        **event = next;
                    }
                    act.counts = counts;
                    act.counts_changed(ctx);
                    act.publish_remote(true, ctx);
                    Ok(snapshot)
                }
                Err(UpdateFailed::Refused(refusal)) => Err(refusal),
                Err(UpdateFailed::Error(error)) => {
                    tracing::error!(event = %act.id, error = format!("{error:#}"), "event update failed");
                    act.restore_rules(ctx);
                    Err(Refusal::Unavailable)
                }
            },
        )))
    }
}

enum UpdateFailed {
    Refused(Refusal),
    Error(anyhow::Error),
}

impl From<Refusal> for UpdateFailed {
    fn from(refusal: Refusal) -> Self {
        UpdateFailed::Refused(refusal)
    }
}

impl From<anyhow::Error> for UpdateFailed {
    fn from(error: anyhow::Error) -> Self {
        UpdateFailed::Error(error)
    }
}

fn rules(event: &Event) -> Rules {
    Rules {
        stock: event.stock,
        per_user_limit: event.per_user_limit,
        max_per_request: event.max_per_request,
        opens_ms: event.opens_at.map(|at| at.timestamp_millis()),
        closes_ms: event.closes_at.map(|at| at.timestamp_millis()),
        closed: event.closed,
    }
}
