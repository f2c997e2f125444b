//! # EventActor: the single writer of one event
//!
//! Owns the event's live state — remaining stock, held and sold counts, each user's active
//! quantity, the reservations that still count (with hold expiry), and idempotency results —
//! and applies every change in mailbox order, so there are no locks and no races.
//!
//! Talks to: HTTP handlers (through the [`Registry`](super::Registry)), which send it
//! [`Reserve`], [`Confirm`], [`Cancel`], [`Snapshot`] and [`UpdateEvent`]; and the
//! [`Persister`], which commits what it decides and answers with [`Committed`].
//!
//! Rules that keep the counts exact whatever fails:
//! - Units are *taken* at once (tentatively, before the commit), so concurrent requests never
//!   see stock that is already promised; they are *given back* (cancel, expiry) only after the
//!   release commits, so a failed release can never have been handed to someone else.
//! - The client's answer is sent after the commit (acknowledged = durable), and after the
//!   sold-out gate the HTTP edge reads reflects it.
//! - If a commit fails, or a handler panics, the actor re-reads its state from the database
//!   after a persister barrier (every earlier write has ended), so no tentative change survives
//!   and a commit whose outcome is unknown is settled by what the database holds.
//! - Refusals (sold out, closed, limit reached) are answered from memory, no database access.

use std::collections::{BTreeSet, HashSet as StdHashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, TimeDelta, Utc};
use sea_orm::DatabaseConnection;
use serde::Serialize;
use tokio::sync::oneshot;

use super::live::{LiveChannel, LivePublisher};
use super::persister::{Committed, PersisterAddr, Submit, WriteAndWait};
use crate::domain::{
    Event, EventId, EventKind, EventPatch, EventStatus, IdempotencyKey, Invalid, Inventory, Quantity,
    Reservation, ReservationId, ReservationStatus, UserId,
};
use crate::sharded::ShardedMap;
use crate::store::{self, EventState, WriteOp};

/// Maps keyed by client-chosen strings: foldhash is several times faster than SipHash and,
/// seeded per process, still resists crafted collisions.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = StdHashSet<K, foldhash::fast::RandomState>;

/// How often held tickets are checked for expiry; units come back within this plus one commit.
const EXPIRY_TICK: Duration = Duration::from_millis(20);
/// Wait before re-reading state after the database could not be read.
const RELOAD_BACKOFF: Duration = Duration::from_secs(1);
/// Most users looked up in one bulk-grant query (well under every backend's bind limit).
const GRANT_CHECK_BATCH: usize = 1_000;

/// Why an event actor refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("nothing is left")]
    SoldOut,
    #[error("only {remaining} units remain")]
    InsufficientStock { remaining: u64 },
    #[error("the per-user limit of {limit} is reached")]
    LimitReached { limit: u32 },
    #[error("the event opens at {0}")]
    NotOpen(DateTime<Utc>),
    #[error("the event is closed")]
    Closed,
    #[error("at most {max} units may be reserved in one request")]
    QuantityOverMax { max: u32 },
    #[error("the hold has expired")]
    HoldExpired,
    #[error("{0}")]
    InvalidState(String),
    #[error("the first request with this Idempotency-Key is still in progress")]
    KeyInFlight,
    #[error("this Idempotency-Key was first used with quantity {first_quantity}")]
    KeyReused { first_quantity: u32 },
    #[error("{0}")]
    InvalidPatch(Invalid),
    /// The reservation no longer counts against stock (cancelled, revoked or expired); the
    /// caller reads its final state from the database.
    #[error("the reservation has ended")]
    Ended,
    #[error("no such reservation")]
    UnknownReservation,
    #[error("the event no longer exists")]
    EventGone,
    #[error("the event's state cannot be committed or read right now")]
    Unavailable,
}

/// Where an event actor sends its answer about one reservation request: at once (refusals,
/// replays, no-op changes) or after the commit. Carried inside the message, so an accepted
/// request costs one hand-off back to its HTTP worker, not two.
pub type Reply = oneshot::Sender<Result<Reserved, Refusal>>;

/// A reply channel for one request, and its answer. A sender dropped unanswered (the actor
/// restarted mid-request) reads as `Unavailable`: nothing was acknowledged.
pub fn reply_channel() -> (Reply, impl Future<Output = Result<Reserved, Refusal>>) {
    let (reply, answer) = oneshot::channel();
    (
        reply,
        async move { answer.await.unwrap_or(Err(Refusal::Unavailable)) },
    )
}

fn answer(reply: Reply, result: Result<Reservation, Refusal>) {
    let _ = reply.send(result.map(|reservation| Reserved {
        reservation,
        replayed: false,
    }));
}

/// A reservation as answered, possibly the replay of the first answer to the same Idempotency-Key.
#[derive(Debug, Clone)]
pub struct Reserved {
    pub reservation: Reservation,
    pub replayed: bool,
}

/// The event with its live counts.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EventSnapshot {
    #[serde(flatten)]
    pub event: Event,
    pub remaining: u64,
    pub held: u64,
    pub sold: u64,
    pub status: EventStatus,
}

/// Reserve `quantity` units for `user`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reserve {
    pub user: UserId,
    pub quantity: Quantity,
    pub key: Option<IdempotencyKey>,
    pub reply: Reply,
}

/// Confirm a held ticket before it expires.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Confirm {
    pub id: ReservationId,
    pub user: UserId,
    pub reply: Reply,
}

/// Cancel a reservation; its units return to stock once the cancel commits.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Cancel {
    pub id: ReservationId,
    pub user: UserId,
    pub reply: Reply,
}

/// Hand the writes queued during this run of the mailbox to the persister.
#[derive(Message)]
#[rtype(result = "()")]
struct FlushWrites;

/// Read the event and its live counts.
#[derive(Message)]
#[rtype(result = "Result<EventSnapshot, Refusal>")]
pub struct Snapshot;

/// A WebSocket client has just subscribed to the event's live channel: re-arm the live timer,
/// so a window edge ahead (`closes_at`) is announced on time.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Listening;

/// Change stock, window or closed flag; answered after the change commits.
#[derive(Message)]
#[rtype(result = "Result<EventSnapshot, Refusal>")]
pub struct UpdateEvent(pub EventPatch);

/// A bulk job asks for units for a chunk of distinct users. The actor skips users who already
/// hold the coupon, takes one unit for each of the others while stock lasts, and makes the
/// chunk's users' live claims wait until [`BulkEnd`]. The grant carries the event's bulk fence,
/// which the job holds until its `BulkEnd` is sent.
#[derive(Message)]
#[rtype(result = "Result<BulkGrant, Refusal>")]
pub struct BulkBegin(pub Vec<UserId>);

/// What a chunk may insert.
#[derive(Debug, Default)]
pub struct BulkGrant {
    /// Users to insert grants for, one unit each already taken.
    pub insert: Vec<UserId>,
    /// Users skipped because they hold the coupon (a live reservation or a known grant).
    pub held: u64,
    /// Users left without a unit: stock ran out. They are in the chunk too (their live claims
    /// wait): units granted to users who turn out to hold a grant already go to them.
    pub unissued: Vec<UserId>,
    /// The actor's state generation, echoed in [`BulkEnd`].
    pub epoch: u64,
    /// The event's bulk fence, taken by the actor for this chunk: a reload waits for it, so it
    /// never reads the counts while the chunk's units are taken but not committed.
    pub fence: Option<tokio::sync::OwnedMutexGuard<()>>,
}

/// The outcome of a chunk: `Some` once its transaction committed, `None` if it rolled back
/// (every unit goes back).
#[derive(Message)]
#[rtype(result = "()")]
pub struct BulkEnd {
    pub epoch: u64,
    pub committed: Option<ChunkCommitted>,
}

/// What a committed chunk did.
#[derive(Debug, Default)]
pub struct ChunkCommitted {
    /// Rows inserted. The rest of the granted users already held a grant; their units go back.
    pub inserted: u64,
    /// The chunk's users still without a grant: stock ran out before them.
    pub unissued: Vec<UserId>,
}

/// Re-read the event's state from the database (after grants were revoked).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reload;

/// What the HTTP edge reads to turn a request away without sending its event actor a message:
/// the event is certainly sold out (published by the actor, its only writer), or the actor has
/// as many requests queued as it may.
///
/// why: once a drop sells out, the crowd keeps coming; answering those claims at the edge keeps
/// them out of the actor's mailbox. And a bounded queue answers 503 at once under overload
/// instead of letting latency and memory grow without limit (actix's own mailbox capacity does
/// not bound `try_send` from many short-lived addresses, so the bound is kept here).
#[derive(Debug)]
pub struct Admission {
    sold_out: AtomicBool,
    /// When the event closes (ms since the epoch), after which the answer is `closed` instead.
    closes_at_ms: AtomicI64,
    /// Requests handed to the actor and not yet taken from its mailbox.
    queued: AtomicUsize,
    max_queued: usize,
}

impl Admission {
    pub fn new(max_queued: usize) -> Self {
        Self {
            sold_out: AtomicBool::new(false),
            closes_at_ms: AtomicI64::new(i64::MAX),
            queued: AtomicUsize::new(0),
            max_queued: max_queued.max(1),
        }
    }

    /// True when a claim without an Idempotency-Key would be refused as sold out at `now`.
    pub fn sold_out(&self, now: DateTime<Utc>) -> bool {
        self.sold_out.load(Ordering::Acquire)
            && now.timestamp_millis() < self.closes_at_ms.load(Ordering::Acquire)
    }

    /// Takes a place in the actor's queue; false when the queue is full. A caller that then fails
    /// to send its message gives the place back with [`Admission::dequeued`].
    pub fn enqueue(&self) -> bool {
        let before = self.queued.fetch_add(1, Ordering::AcqRel);
        if before >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Requests handed to the actor and not yet taken from its mailbox.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// A queued request left the queue (the actor took it, or it was never sent).
    pub fn dequeued(&self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }

    fn publish(&self, ledger: Option<&Ledger>, now: DateTime<Utc>) {
        match ledger {
            Some(l) => self.publish_counts(&l.event, l.inventory(), now),
            None => self.publish_unknown(),
        }
    }

    /// Publishes what `event` with `inventory` means for claims at the edge.
    pub fn publish_counts(&self, event: &Event, inventory: Inventory, now: DateTime<Utc>) {
        let sold_out = inventory.remaining() == 0 && event.window(now).is_none();
        let closes_at = event.closes_at.map_or(i64::MAX, |at| at.timestamp_millis());
        self.closes_at_ms.store(closes_at, Ordering::Release);
        self.sold_out.store(sold_out, Ordering::Release);
    }

    /// The state is not known (loading, unavailable): every claim goes to the actor.
    pub fn publish_unknown(&self) {
        self.closes_at_ms.store(i64::MAX, Ordering::Release);
        self.sold_out.store(false, Ordering::Release);
    }
}

/// Counts actor starts, so restarts are visible in stats and tests.
#[derive(Debug, Default)]
pub struct Lifecycle {
    pub starts: AtomicU64,
    pub restarts: AtomicU64,
}

/// A reservation that still counts against stock.
struct Live {
    reservation: Reservation,
    /// Its insert has committed.
    committed: bool,
    /// A change to this status is waiting for its commit.
    changing: Option<ReservationStatus>,
}

enum KeyState {
    InFlight,
    /// The first answer, replayed to every retry.
    Done(Reservation),
}

/// The event's state, rebuilt from the database on every (re)start.
struct Ledger {
    event: Event,
    held: u64,
    sold: u64,
    per_user: ShardedMap<UserId, u32>,
    live: ShardedMap<ReservationId, Live>,
    /// Committed holds by expiry time.
    holds: BTreeSet<(DateTime<Utc>, ReservationId)>,
    keys: HashMap<(UserId, IdempotencyKey), KeyState>,
    /// Units held by committed bulk grants (each grant is one unit).
    bulk: u64,
    /// Users whose bulk-grant status is known (`true`: they hold one). Only consulted while the
    /// event has grants (`bulk > 0`); the grants themselves stay in the database.
    grants: HashMap<UserId, bool>,
    /// The bulk chunk being committed, if any: its units are taken, its users' claims wait.
    chunk: Option<BulkChunk>,
}

/// A chunk of bulk grants between [`BulkBegin`] and [`BulkEnd`].
struct BulkChunk {
    users: HashSet<UserId>,
    /// Units taken for it.
    units: u64,
}

enum Phase {
    Loading,
    Ready(Box<Ledger>),
    /// The event was not found in the database.
    Gone,
    /// The database could not be read; a reload is scheduled.
    Unavailable,
}

/// A write waiting for its commit, and who to tell.
struct Pending {
    /// The reload generation it was made in; older ones are already reflected in a reload.
    epoch: u64,
    /// The reservation as it will be once committed.
    reservation: Reservation,
    reply: Option<Reply>,
    kind: PendingKind,
}

enum PendingKind {
    Created { key: Option<IdempotencyKey> },
    Changed,
}

pub struct EventActor {
    id: EventId,
    db: DatabaseConnection,
    persister: PersisterAddr,
    lifecycle: Arc<Lifecycle>,
    phase: Phase,
    epoch: u64,
    next_seq: u64,
    pending: HashMap<u64, Pending>,
    expiry_timer: Option<SpawnHandle>,
    /// This actor's own address for commit outcomes, made once rather than per write.
    notify: Option<Arc<Recipient<Committed>>>,
    /// Writes decided in this run of the mailbox, handed to the persister together by
    /// [`FlushWrites`]: one cross-thread wake-up per run instead of one per request.
    outbox: Vec<(u64, WriteOp)>,
    admission: Arc<Admission>,
    /// The event's live broadcaster (WebSocket sessions), told after commits settle.
    live: LivePublisher,
    /// Set while a coalesced live message or a window edge is waiting.
    live_timer: Option<SpawnHandle>,
    /// Taken by this actor when it grants a bulk chunk and held by the job until the chunk's
    /// outcome is sent here; a reload takes it before reading, so it never reads the counts
    /// while a chunk's units are taken but not yet committed. Outlives restarts (the registry
    /// owns it).
    bulk_fence: Arc<tokio::sync::Mutex<()>>,
    /// Claims waiting for their user's bulk-grant status (a lookup, or a chunk in flight).
    /// Kept across reloads and replayed once the state is back.
    waiting: HashMap<UserId, Vec<Reserve>>,
    /// Users to look up in the next bulk-grant query, and those in the query in flight.
    to_check: Vec<UserId>,
    checking: HashSet<UserId>,
}

impl EventActor {
    pub fn new(
        id: EventId,
        db: DatabaseConnection,
        persister: PersisterAddr,
        lifecycle: Arc<Lifecycle>,
        admission: Arc<Admission>,
        live: Arc<LiveChannel>,
        bulk_fence: Arc<tokio::sync::Mutex<()>>,
    ) -> Self {
        Self {
            bulk_fence,
            waiting: HashMap::default(),
            to_check: Vec::new(),
            checking: HashSet::default(),
            id,
            db,
            persister,
            lifecycle,
            phase: Phase::Loading,
            epoch: 0,
            next_seq: 0,
            pending: HashMap::default(),
            expiry_timer: None,
            notify: None,
            outbox: Vec::new(),
            admission,
            live: LivePublisher::new(live),
            live_timer: None,
        }
    }

    /// Re-reads the state from the database once every earlier write has ended; the mailbox
    /// waits meanwhile.
    fn reload(&mut self, ctx: &mut Context<Self>) {
        // Decided writes go first, so the barrier below orders the read after them too.
        self.flush_writes(ctx);
        self.epoch += 1;
        self.phase = Phase::Loading;
        self.publish();
        let barrier = self.persister.send(WriteAndWait(None));
        let db = self.db.clone();
        let id = self.id;
        let fence = self.bulk_fence.clone();
        // Lookups in flight belong to the old state; their users are looked up again.
        self.checking.clear();
        self.to_check.clear();
        let load = async move {
            // The barrier's own outcome does not matter: it only orders the read after the writes.
            let _ = barrier.await;
            let _no_chunk_in_flight = fence.lock().await;
            store::load_event_state(&db, id).await
        };
        ctx.wait(
            load.into_actor(self)
                .map(|loaded, act, ctx| act.loaded(loaded, ctx)),
        );
    }

    fn loaded(&mut self, loaded: anyhow::Result<Option<EventState>>, ctx: &mut Context<Self>) {
        let state = match loaded {
            Ok(Some(state)) => state,
            Ok(None) => {
                self.phase = Phase::Gone;
                return;
            }
            Err(error) => {
                tracing::error!(event = %self.id, error = format!("{error:#}"), "cannot read event state; retrying");
                self.phase = Phase::Unavailable;
                ctx.run_later(RELOAD_BACKOFF, |act, ctx| act.reload(ctx));
                return;
            }
        };
        let now = crate::domain::now();
        let (ledger, overdue) = Ledger::rebuild(state, now);
        let is_ticket = ledger.event.kind == EventKind::Ticket;
        tracing::debug!(event = %self.id, held = ledger.held, sold = ledger.sold, "event state loaded");
        self.phase = Phase::Ready(Box::new(ledger));
        self.publish();
        self.publish_live(ctx);
        for reservation in overdue {
            self.submit(ctx, reservation, ReservationStatus::Expired, None);
        }
        if is_ticket && self.expiry_timer.is_none() {
            self.expiry_timer = Some(ctx.run_interval(EXPIRY_TICK, |act, ctx| act.expire_due(ctx)));
        }
        let waiting: Vec<Reserve> = self.waiting.drain().flat_map(|(_, claims)| claims).collect();
        for claim in waiting {
            self.reserve(claim, ctx);
        }
    }

    /// Tells the HTTP edge whether claims are certainly sold out now.
    fn publish(&self) {
        let ledger = match &self.phase {
            Phase::Ready(ledger) => Some(&**ledger),
            _ => None,
        };
        self.admission.publish(ledger, crate::domain::now());
    }

    /// Tells WebSocket listeners about the committed state; never waits. A coalesced message
    /// (or a window edge) that is due later is sent by a timer.
    fn publish_live(&mut self, ctx: &mut Context<Self>) {
        let Phase::Ready(ledger) = &self.phase else {
            return;
        };
        let inventory = ledger.inventory();
        // why: `sold_out` is announced once the last unit's commit has landed, not when it is
        // only taken; this scan runs only while nothing remains.
        let settled = inventory.remaining() > 0
            || !self
                .pending
                .values()
                .any(|p| p.epoch == self.epoch && matches!(p.kind, PendingKind::Created { .. }));
        let wake = self.live.publish(&ledger.event, inventory, settled);
        if let Some(after) = wake
            && self.live_timer.is_none()
        {
            self.live_timer = Some(ctx.run_later(after, |act, ctx| {
                act.live_timer = None;
                act.publish_live(ctx);
            }));
        }
    }

    fn ledger(&mut self) -> Result<&mut Ledger, Refusal> {
        match &mut self.phase {
            Phase::Ready(ledger) => Ok(ledger),
            Phase::Gone => Err(Refusal::EventGone),
            Phase::Loading | Phase::Unavailable => Err(Refusal::Unavailable),
        }
    }

    /// Queues a write for the persister; the answer follows in [`Committed`].
    fn send_write(&mut self, ctx: &mut Context<Self>, op: WriteOp, pending: Pending) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.insert(seq, pending);
        if self.outbox.is_empty() {
            // Runs once the messages already in the mailbox are handled.
            ctx.notify(FlushWrites);
        }
        self.outbox.push((seq, op));
    }

    /// Hands every queued write to the persister in one message.
    fn flush_writes(&mut self, ctx: &mut Context<Self>) {
        if self.outbox.is_empty() {
            return;
        }
        let notify = self
            .notify
            .get_or_insert_with(|| Arc::new(ctx.address().recipient()))
            .clone();
        let writes = std::mem::take(&mut self.outbox);
        self.persister.submit(Submit {
            event: self.id,
            writes,
            notify,
        });
    }

    /// Starts a status change of a live reservation (confirm, cancel, expiry).
    fn submit(
        &mut self,
        ctx: &mut Context<Self>,
        mut reservation: Reservation,
        to: ReservationStatus,
        reply: Option<Reply>,
    ) {
        if let Ok(ledger) = self.ledger()
            && let Some(live) = ledger.live.get_mut(&reservation.id)
        {
            live.changing = Some(to);
            if let Some(at) = live.reservation.expires_at {
                ledger.holds.remove(&(at, reservation.id));
            }
        }
        reservation.status = to;
        let op = WriteOp::SetStatus {
            id: reservation.id,
            status: to,
        };
        let pending = Pending {
            epoch: self.epoch,
            reservation,
            reply,
            kind: PendingKind::Changed,
        };
        self.send_write(ctx, op, pending);
    }

    fn expire_due(&mut self, ctx: &mut Context<Self>) {
        let now = crate::domain::now();
        let Ok(ledger) = self.ledger() else { return };
        let mut due = Vec::new();
        while let Some(&(at, id)) = ledger.holds.first() {
            if at > now {
                break;
            }
            ledger.holds.pop_first();
            if let Some(live) = ledger.live.get(&id)
                && live.changing.is_none()
            {
                due.push(live.reservation.clone());
            }
        }
        for reservation in due {
            self.submit(ctx, reservation, ReservationStatus::Expired, None);
        }
    }

    fn reserve(&mut self, msg: Reserve, ctx: &mut Context<Self>) {
        let epoch = self.epoch;
        if !self.waiting.is_empty() && self.waiting.contains_key(&msg.user) {
            // Behind this user's earlier claims, in order.
            return self.defer(msg, ctx);
        }
        let ledger = match self.ledger() {
            Ok(ledger) => ledger,
            Err(refusal) => return answer(msg.reply, Err(refusal)),
        };
        if ledger.must_wait(&msg.user) {
            return self.defer(msg, ctx);
        }
        let now = crate::domain::now();
        let reservation = match ledger.take(&msg, now) {
            Ok(Taken::New(reservation)) => reservation,
            Ok(Taken::Replay(first)) => {
                let _ = msg.reply.send(Ok(Reserved {
                    reservation: first,
                    replayed: true,
                }));
                return;
            }
            Err(refusal) => return answer(msg.reply, Err(refusal)),
        };
        let pending = Pending {
            epoch,
            reservation: reservation.clone(),
            reply: Some(msg.reply),
            kind: PendingKind::Created { key: msg.key },
        };
        self.send_write(ctx, WriteOp::Insert(reservation), pending);
        self.publish();
    }

    /// Holds a claim until its user's bulk-grant status is known: looked up in the database, or
    /// settled by the chunk in flight that contains the user.
    fn defer(&mut self, msg: Reserve, ctx: &mut Context<Self>) {
        let user = msg.user.clone();
        self.waiting.entry(user.clone()).or_default().push(msg);
        let needs_lookup = match &self.phase {
            Phase::Ready(ledger) => {
                ledger.bulk > 0
                    && !ledger.grants.contains_key(&user)
                    && !ledger.chunk.as_ref().is_some_and(|c| c.users.contains(&user))
            }
            _ => false,
        };
        if needs_lookup && !self.checking.contains(&user) && !self.to_check.contains(&user) {
            self.to_check.push(user);
            self.check_grants(ctx);
        }
    }

    /// Looks up the queued users' bulk grants, one query at a time (the next batch gathers
    /// while one is in flight, as writes do for the persister).
    fn check_grants(&mut self, ctx: &mut Context<Self>) {
        if !self.checking.is_empty() || self.to_check.is_empty() {
            return;
        }
        let take = self.to_check.len().min(GRANT_CHECK_BATCH);
        let batch: Vec<UserId> = self.to_check.drain(..take).collect();
        self.checking.extend(batch.iter().cloned());
        let (db, id, epoch) = (self.db.clone(), self.id, self.epoch);
        let lookup = async move {
            let found = store::granted_users(&db, id, &batch).await;
            (batch, found)
        };
        ctx.spawn(lookup.into_actor(self).map(move |(batch, found), act, ctx| {
            act.guarded(ctx, (), |act, ctx| act.grants_checked(epoch, batch, found, ctx));
        }));
    }

    fn grants_checked(
        &mut self,
        epoch: u64,
        batch: Vec<UserId>,
        found: anyhow::Result<std::collections::HashSet<String>>,
        ctx: &mut Context<Self>,
    ) {
        if epoch != self.epoch {
            // A reload replays the waiting claims, which look their users up again.
            return;
        }
        for user in &batch {
            self.checking.remove(user);
        }
        match found {
            Ok(found) => {
                if let Phase::Ready(ledger) = &mut self.phase {
                    for user in &batch {
                        // A chunk that committed meanwhile already marked its users: keep that.
                        let holds = found.contains(user.as_str());
                        ledger.grants.entry(user.clone()).or_insert(holds);
                    }
                }
                for user in batch {
                    self.replay_waiting(&user, ctx);
                }
            }
            Err(error) => {
                tracing::warn!(event = %self.id, error = format!("{error:#}"), "cannot look up bulk grants");
                for user in batch {
                    for claim in self.waiting.remove(&user).unwrap_or_default() {
                        answer(claim.reply, Err(Refusal::Unavailable));
                    }
                }
            }
        }
        self.check_grants(ctx);
    }

    /// Runs the claims that waited for `user`, unless they must wait longer.
    fn replay_waiting(&mut self, user: &UserId, ctx: &mut Context<Self>) {
        if self.checking.contains(user) || self.to_check.contains(user) {
            return;
        }
        if let Phase::Ready(ledger) = &self.phase
            && ledger.chunk.as_ref().is_some_and(|c| c.users.contains(user))
        {
            return;
        }
        for claim in self.waiting.remove(user).unwrap_or_default() {
            self.reserve(claim, ctx);
        }
    }

    fn bulk_begin(&mut self, users: Vec<UserId>) -> Result<BulkGrant, Refusal> {
        let epoch = self.epoch;
        let ledger = self.ledger()?;
        if ledger.event.kind != EventKind::Coupon {
            return Err(Refusal::InvalidState("bulk issuance is for coupons".into()));
        }
        if ledger.chunk.is_some() {
            return Err(Refusal::InvalidState("a bulk chunk is already in flight".into()));
        }
        // Held only by a revocation in progress (a reload holds it inside this actor's own
        // wait, so never while a message is handled): the job retries.
        let Ok(fence) = self.bulk_fence.clone().try_lock_owned() else {
            return Err(Refusal::Unavailable);
        };
        let ledger = self.ledger()?;
        let mut grant = BulkGrant {
            epoch,
            fence: Some(fence),
            ..BulkGrant::default()
        };
        let mut remaining = ledger.inventory().remaining();
        for user in users {
            let holds_live = ledger.per_user.get(&user).is_some_and(|&units| units > 0);
            if holds_live || ledger.grants.get(&user) == Some(&true) {
                grant.held += 1;
            } else if remaining > 0 {
                remaining -= 1;
                grant.insert.push(user);
            } else {
                grant.unissued.push(user);
            }
        }
        let units = grant.insert.len() as u64;
        ledger.chunk = Some(BulkChunk {
            users: grant.insert.iter().chain(&grant.unissued).cloned().collect(),
            units,
        });
        self.publish();
        Ok(grant)
    }

    fn bulk_end(&mut self, msg: BulkEnd, ctx: &mut Context<Self>) {
        if msg.epoch != self.epoch {
            // The state was re-read after this chunk's outcome (the fence orders it so).
            return;
        }
        let Phase::Ready(ledger) = &mut self.phase else {
            return;
        };
        let Some(chunk) = ledger.chunk.take() else {
            return;
        };
        if let Some(committed) = msg.committed {
            ledger.bulk += committed.inserted.min(chunk.units);
            // why: a user left unissued holds nothing; marking them would refuse their live
            // claims `limit_reached` until the actor reloads, even once stock comes back.
            let unissued: HashSet<&UserId> = committed.unissued.iter().collect();
            // Every other user of a committed chunk holds a grant now (inserted, or held already).
            for user in &chunk.users {
                if ledger.grants.contains_key(user) || self.waiting.contains_key(user) {
                    ledger.grants.insert(user.clone(), !unissued.contains(user));
                }
            }
        }
        for user in &chunk.users {
            if self.waiting.contains_key(user) {
                self.replay_waiting(user, ctx);
            }
        }
        self.publish();
        self.publish_live(ctx);
    }

    fn change(
        &mut self,
        id: ReservationId,
        user: &UserId,
        to: Change,
        reply: Reply,
        ctx: &mut Context<Self>,
    ) {
        let now = crate::domain::now();
        let ledger = match self.ledger() {
            Ok(ledger) => ledger,
            Err(refusal) => return answer(reply, Err(refusal)),
        };
        let kind = ledger.event.kind;
        let Some(live) = ledger.live.get(&id) else {
            return answer(reply, Err(Refusal::Ended));
        };
        let reservation = &live.reservation;
        if &reservation.user_id != user {
            return answer(reply, Err(Refusal::UnknownReservation));
        }
        if !live.committed || live.changing.is_some() {
            if live.changing == Some(ReservationStatus::Expired) {
                return answer(reply, Err(Refusal::HoldExpired));
            }
            return answer(
                reply,
                Err(Refusal::InvalidState(
                    "another change to this reservation is in progress".into(),
                )),
            );
        }
        let target = match to {
            Change::Confirm => match reservation.status {
                ReservationStatus::Confirmed => return answer(reply, Ok(reservation.clone())),
                ReservationStatus::Held if reservation.expires_at.is_some_and(|at| now >= at) => {
                    return answer(reply, Err(Refusal::HoldExpired));
                }
                ReservationStatus::Held => ReservationStatus::Confirmed,
                other => {
                    return answer(
                        reply,
                        Err(Refusal::InvalidState(format!(
                            "a reservation that is {} cannot be confirmed",
                            other.as_str()
                        ))),
                    );
                }
            },
            Change::Cancel => match reservation.status {
                ReservationStatus::Redeemed => {
                    return answer(
                        reply,
                        Err(Refusal::InvalidState(
                            "a redeemed coupon cannot be cancelled".into(),
                        )),
                    );
                }
                _ => ReservationStatus::cancelled(kind),
            },
        };
        let reservation = reservation.clone();
        self.submit(ctx, reservation, target, Some(reply));
    }

    fn committed(&mut self, msg: Committed, ctx: &mut Context<Self>) {
        let failed = msg.outcome.is_err();
        let mut reload = false;
        let mut answers = Vec::with_capacity(msg.seqs.len());
        for seq in msg.seqs {
            let Some(pending) = self.pending.remove(&seq) else {
                continue;
            };
            let current = pending.epoch == self.epoch;
            if failed {
                reload |= current;
                if let Some(reply) = pending.reply {
                    answers.push((reply, Err(Refusal::Unavailable)));
                }
                continue;
            }
            // A pending write from before a reload is already in the reloaded state.
            if current && let Ok(ledger) = self.ledger() {
                ledger.settle(&pending);
            }
            if let Some(reply) = pending.reply {
                answers.push((reply, Ok(pending.reservation)));
            }
        }
        // why: the edge's sold-out gate is brought up to date before anyone hears of the commit.
        // A client told its cancel succeeded (or its claim failed) may claim again at once, on
        // another thread, and must not be refused `sold_out` by the gate of the state before.
        if reload {
            self.reload(ctx);
        } else {
            self.publish();
            self.publish_live(ctx);
        }
        for (reply, result) in answers {
            answer(reply, result);
        }
    }

    fn snapshot(&mut self) -> Result<EventSnapshot, Refusal> {
        Ok(self.ledger()?.snapshot(crate::domain::now()))
    }

    /// Runs a handler body; a panic stops the actor so its supervisor restarts it and it
    /// rebuilds from the database rather than serving half-applied state.
    fn guarded<R>(
        &mut self,
        ctx: &mut Context<Self>,
        fallback: R,
        body: impl FnOnce(&mut Self, &mut Context<Self>) -> R,
    ) -> R {
        match catch_unwind(AssertUnwindSafe(|| body(self, ctx))) {
            Ok(result) => result,
            Err(_) => {
                tracing::error!(event = %self.id, "event actor panicked; restarting from the database");
                ctx.stop();
                fallback
            }
        }
    }
}

enum Change {
    Confirm,
    Cancel,
}

enum Taken {
    New(Reservation),
    Replay(Reservation),
}

impl Ledger {
    /// Builds the state from the database rows; also returns the holds already past their expiry,
    /// which count as expired and only need their rows marked.
    fn rebuild(state: EventState, now: DateTime<Utc>) -> (Ledger, Vec<Reservation>) {
        let mut ledger = Ledger {
            event: state.event,
            held: 0,
            sold: 0,
            per_user: ShardedMap::default(),
            live: ShardedMap::default(),
            holds: BTreeSet::new(),
            keys: HashMap::default(),
            bulk: state.bulk_issued,
            grants: HashMap::default(),
            chunk: None,
        };
        let mut overdue = Vec::new();
        for reservation in state.reservations {
            if let Some(key) = &reservation.idempotency_key {
                // The first answer was the reservation in its initial state.
                let mut first = reservation.clone();
                first.status = ReservationStatus::initial(ledger.event.kind);
                ledger
                    .keys
                    .insert((reservation.user_id.clone(), key.clone()), KeyState::Done(first));
            }
            // why: a hold past its expiry is expired by rule, whatever its row still says, so its
            // units are free at once; the write that marks it expired is bookkeeping, and a
            // later rebuild reaches the same conclusion if that write is lost.
            if reservation.status_at(now) == ReservationStatus::Expired
                && reservation.status == ReservationStatus::Held
            {
                overdue.push(reservation);
                continue;
            }
            if !reservation.status.is_active() {
                continue;
            }
            ledger.count(&reservation, true);
            if let (ReservationStatus::Held, Some(at)) = (reservation.status, reservation.expires_at) {
                ledger.holds.insert((at, reservation.id));
            }
            let live = Live {
                reservation,
                committed: true,
                changing: None,
            };
            ledger.live.insert(live.reservation.id, live);
        }
        (ledger, overdue)
    }

    /// Whether `user`'s claim must wait for their bulk-grant status: a chunk in flight holds
    /// them, or the event has grants and theirs is not known yet. Free when the event has never
    /// had a bulk job (no lookup at all).
    fn must_wait(&self, user: &UserId) -> bool {
        self.chunk.as_ref().is_some_and(|c| c.users.contains(user))
            || (self.bulk > 0 && !self.grants.contains_key(user))
    }

    /// A bulk chunk in flight counts as sold: its units are promised.
    fn inventory(&self) -> Inventory {
        Inventory {
            stock: self.event.stock,
            held: self.held,
            sold: self.sold_units(),
        }
    }

    fn sold_units(&self) -> u64 {
        self.sold + self.bulk + self.chunk.as_ref().map_or(0, |c| c.units)
    }

    fn snapshot(&self, now: DateTime<Utc>) -> EventSnapshot {
        let inventory = self.inventory();
        EventSnapshot {
            event: self.event.clone(),
            remaining: inventory.remaining(),
            held: self.held,
            sold: inventory.sold,
            status: self.event.status(inventory, now),
        }
    }

    /// Adds (`true`) or removes a reservation's units from the counts.
    fn count(&mut self, r: &Reservation, add: bool) {
        let bucket = if r.status == ReservationStatus::Held {
            &mut self.held
        } else {
            &mut self.sold
        };
        let units = u64::from(r.quantity);
        let per_user = self.per_user.entry(r.user_id.clone()).or_insert(0);
        if add {
            *bucket += units;
            *per_user += r.quantity;
        } else {
            *bucket = bucket.saturating_sub(units);
            *per_user = per_user.saturating_sub(r.quantity);
            if *per_user == 0 {
                self.per_user.remove(&r.user_id);
            }
        }
    }

    /// Decides a reservation request and, if it is granted, takes the units at once.
    fn take(&mut self, msg: &Reserve, now: DateTime<Utc>) -> Result<Taken, Refusal> {
        let quantity = msg.quantity.get();
        if let Some(key) = &msg.key {
            match self.keys.get(&(msg.user.clone(), key.clone())) {
                Some(KeyState::InFlight) => return Err(Refusal::KeyInFlight),
                Some(KeyState::Done(first)) if first.quantity == quantity => {
                    return Ok(Taken::Replay(first.clone()));
                }
                Some(KeyState::Done(first)) => {
                    return Err(Refusal::KeyReused {
                        first_quantity: first.quantity,
                    });
                }
                None => {}
            }
        }
        match self.event.window(now) {
            Some(EventStatus::Closed) => return Err(Refusal::Closed),
            Some(_) => return Err(Refusal::NotOpen(self.event.opens_at.unwrap_or(now))),
            None => {}
        }
        if quantity > self.event.max_per_request {
            return Err(Refusal::QuantityOverMax {
                max: self.event.max_per_request,
            });
        }
        let granted = u32::from(self.bulk > 0 && self.grants.get(&msg.user) == Some(&true));
        let active = self.per_user.get(&msg.user).copied().unwrap_or(0) + granted;
        if active + quantity > self.event.per_user_limit {
            return Err(Refusal::LimitReached {
                limit: self.event.per_user_limit,
            });
        }
        let remaining = self.inventory().remaining();
        if remaining == 0 {
            return Err(Refusal::SoldOut);
        }
        if remaining < u64::from(quantity) {
            return Err(Refusal::InsufficientStock { remaining });
        }
        let status = ReservationStatus::initial(self.event.kind);
        let reservation = Reservation {
            id: ReservationId::new(),
            event_id: self.event.id,
            user_id: msg.user.clone(),
            quantity,
            status,
            expires_at: (status == ReservationStatus::Held)
                .then(|| now + TimeDelta::seconds(i64::from(self.event.hold_seconds))),
            created_at: now,
            idempotency_key: msg.key.clone(),
        };
        self.count(&reservation, true);
        self.live.insert(
            reservation.id,
            Live {
                reservation: reservation.clone(),
                committed: false,
                changing: None,
            },
        );
        if let Some(key) = &msg.key {
            self.keys
                .insert((msg.user.clone(), key.clone()), KeyState::InFlight);
        }
        Ok(Taken::New(reservation))
    }

    /// Applies a committed write to the counts.
    fn settle(&mut self, pending: &Pending) {
        let settled = &pending.reservation;
        match &pending.kind {
            PendingKind::Created { key } => {
                if let Some(live) = self.live.get_mut(&settled.id) {
                    live.committed = true;
                }
                if let Some(at) = settled.expires_at {
                    self.holds.insert((at, settled.id));
                }
                if let Some(key) = key {
                    self.keys.insert(
                        (settled.user_id.clone(), key.clone()),
                        KeyState::Done(settled.clone()),
                    );
                }
            }
            PendingKind::Changed => {
                let Some(live) = self.live.remove(&settled.id) else {
                    return;
                };
                self.count(&live.reservation, false);
                if settled.status.is_active() {
                    self.count(settled, true);
                    self.live.insert(
                        settled.id,
                        Live {
                            reservation: settled.clone(),
                            committed: true,
                            changing: None,
                        },
                    );
                }
            }
        }
    }
}

impl Actor for EventActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.lifecycle.starts.fetch_add(1, Ordering::Relaxed);
        self.reload(ctx);
    }
}

impl Supervised for EventActor {
    fn restarting(&mut self, ctx: &mut Context<Self>) {
        self.lifecycle.restarts.fetch_add(1, Ordering::Relaxed);
        // The restart dropped the scheduled flush; these writes are decided and awaited.
        self.flush_writes(ctx);
        // The context dropped its timers; `loaded` starts a new one.
        self.expiry_timer = None;
        self.live_timer = None;
        tracing::warn!(event = %self.id, "event actor restarting");
    }
}

impl Handler<Reserve> for EventActor {
    type Result = ();

    /// On a panic the reply is dropped unanswered: the caller reads `Unavailable`.
    fn handle(&mut self, msg: Reserve, ctx: &mut Context<Self>) {
        self.admission.dequeued();
        self.guarded(ctx, (), |act, ctx| act.reserve(msg, ctx));
    }
}

impl Handler<Confirm> for EventActor {
    type Result = ();

    fn handle(&mut self, msg: Confirm, ctx: &mut Context<Self>) {
        self.admission.dequeued();
        let Confirm { id, user, reply } = msg;
        self.guarded(ctx, (), |act, ctx| {
            act.change(id, &user, Change::Confirm, reply, ctx)
        });
    }
}

impl Handler<Cancel> for EventActor {
    type Result = ();

    fn handle(&mut self, msg: Cancel, ctx: &mut Context<Self>) {
        self.admission.dequeued();
        let Cancel { id, user, reply } = msg;
        self.guarded(ctx, (), |act, ctx| {
            act.change(id, &user, Change::Cancel, reply, ctx)
        });
    }
}

impl Handler<Snapshot> for EventActor {
    type Result = Result<EventSnapshot, Refusal>;

    fn handle(&mut self, _: Snapshot, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, Err(Refusal::Unavailable), |act, _| act.snapshot())
    }
}

impl Handler<Listening> for EventActor {
    type Result = ();

    fn handle(&mut self, _: Listening, ctx: &mut Context<Self>) {
        self.guarded(ctx, (), |act, ctx| act.publish_live(ctx));
    }
}

impl Handler<FlushWrites> for EventActor {
    type Result = ();

    fn handle(&mut self, _: FlushWrites, ctx: &mut Context<Self>) {
        self.flush_writes(ctx);
    }
}

impl Handler<Committed> for EventActor {
    type Result = ();

    fn handle(&mut self, msg: Committed, ctx: &mut Context<Self>) {
        self.guarded(ctx, (), |act, ctx| act.committed(msg, ctx));
    }
}

impl Handler<UpdateEvent> for EventActor {
    type Result = AtomicResponse<Self, Result<EventSnapshot, Refusal>>;

    /// Atomic: the mailbox waits for this commit, so the checks made here (stock not below what
    /// is held or sold) still hold when it lands. Admin changes are rare; this costs one commit.
    fn handle(&mut self, msg: UpdateEvent, ctx: &mut Context<Self>) -> Self::Result {
        let now = crate::domain::now();
        let next = self.guarded(ctx, Err(Refusal::Unavailable), |act, _| {
            let ledger = act.ledger()?;
            ledger
                .event
                .patched(&msg.0, ledger.inventory(), now)
                .map_err(Refusal::InvalidPatch)
        });
        let next = match next {
            Ok(next) => next,
            Err(refusal) => return AtomicResponse::new(Box::pin(fut::ready(Err(refusal)))),
        };
        let write = self
            .persister
            .send(WriteAndWait(Some(WriteOp::UpdateEvent(next.clone()))));
        AtomicResponse::new(Box::pin(write.into_actor(self).map(
            move |outcome, act, ctx| match outcome {
                Ok(Ok(())) => {
                    let ledger = act.ledger()?;
                    ledger.event = next;
                    let snapshot = ledger.snapshot(crate::domain::now());
                    act.publish();
                    act.publish_live(ctx);
                    Ok(snapshot)
                }
                _ => {
                    act.reload(ctx);
                    Err(Refusal::Unavailable)
                }
            },
        )))
    }
}

impl Handler<BulkBegin> for EventActor {
    type Result = Result<BulkGrant, Refusal>;

    fn handle(&mut self, msg: BulkBegin, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, Err(Refusal::Unavailable), |act, _| act.bulk_begin(msg.0))
    }
}

impl Handler<BulkEnd> for EventActor {
    type Result = ();

    fn handle(&mut self, msg: BulkEnd, ctx: &mut Context<Self>) {
        self.guarded(ctx, (), |act, ctx| act.bulk_end(msg, ctx));
    }
}

impl Handler<Reload> for EventActor {
    type Result = ();

    fn handle(&mut self, _: Reload, ctx: &mut Context<Self>) {
        self.reload(ctx);
    }
}

#[cfg(test)]
#[derive(Message)]
#[rtype(result = "()")]
/// Test-only: makes the actor panic inside a handler.
pub struct Crash;

#[cfg(test)]
impl Handler<Crash> for EventActor {
    type Result = ();

    fn handle(&mut self, _: Crash, ctx: &mut Context<Self>) {
        self.guarded(ctx, (), |_, _| panic!("test-triggered panic"));
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::ConnectionTrait;

    use super::*;
    use crate::actors::live::{LiveHub, LiveSettings};
    use crate::actors::persister::{Persister, PersisterStats};
    use crate::domain::EventSpec;
    use crate::store::Backend;

    struct Harness {
        _dir: tempfile::TempDir,
        db: DatabaseConnection,
        actor: Addr<EventActor>,
        lifecycle: Arc<Lifecycle>,
        /// What the actor publishes for the HTTP edge.
        admission: Arc<Admission>,
    }

    /// Where a harness runs its actors.
    #[derive(Clone, Copy, PartialEq)]
    enum Threads {
        /// On the test's own thread.
        Test,
        /// The event actor and the persister each on an arbiter of its own, as in the server,
        /// so the test's thread can watch what the actor publishes while the actor runs.
        Own,
    }

    /// A real SQLite database, a persister, and one supervised event actor.
    async fn harness(spec: &str) -> anyhow::Result<Harness> {
        harness_with(spec, Threads::Test).await
    }

    async fn harness_with(spec: &str, threads: Threads) -> anyhow::Result<Harness> {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        let db = store::connect(&url, 4).await?;
        store::migrate(&db).await?;
        let spec: EventSpec = serde_json::from_str(spec)?;
        let event = store::create_event(&db, spec.validate(crate::domain::now())?).await?;
        let new_persister = {
            let db = db.clone();
            move || Persister::new(db, Backend::Sqlite, 100, Arc::new(PersisterStats::default()))
        };
        let persister = match threads {
            Threads::Test => new_persister().start_here(),
            Threads::Own => Persister::start_on(&Arbiter::new().handle(), new_persister),
        };
        let lifecycle = Arc::new(Lifecycle::default());
        let admission = Arc::new(Admission::new(64));
        let new_actor = {
            let (db, lifecycle, admission) = (db.clone(), lifecycle.clone(), admission.clone());
            move |_: &mut Context<EventActor>| {
                EventActor::new(
                    event.id,
                    db,
                    persister,
                    lifecycle,
                    admission,
                    LiveHub::new(LiveSettings::default()).channel(event.id),
                    Arc::default(),
                )
            }
        };
        let actor = match threads {
            Threads::Test => Supervisor::start(new_actor),
            Threads::Own => Supervisor::start_in_arbiter(&Arbiter::new().handle(), new_actor),
        };
        Ok(Harness {
            _dir: dir,
            db,
            actor,
            lifecycle,
            admission,
        })
    }

    /// Claims one unit as `user` and waits for the answer.
    async fn claim(
        actor: &Addr<EventActor>,
        user: &str,
        key: Option<&str>,
    ) -> anyhow::Result<Result<Reserved, Refusal>> {
        let (reply, answer) = reply_channel();
        let key = key.map(IdempotencyKey::parse).transpose()?;
        actor
            .send(Reserve {
                user: UserId::parse(user)?,
                quantity: Quantity::ONE,
                key,
                reply,
            })
            .await?;
        Ok(answer.await)
    }

    #[actix_rt::test]
    async fn a_panic_in_a_handler_restarts_the_actor_with_its_state_intact() -> anyhow::Result<()> {
        // Arrange
        let h = harness(r#"{"name":"restart","kind":"coupon","stock":10}"#).await?;
        let first = claim(&h.actor, "alice", Some("k1")).await??;
        claim(&h.actor, "bob", None).await??;
        let before = h.actor.send(Snapshot).await??;

        // Act
        h.actor.send(Crash).await?;

        // Assert
        let after = h.actor.send(Snapshot).await??;
        assert_eq!(
            h.lifecycle.restarts.load(Ordering::Relaxed),
            1,
            "one supervised restart"
        );
        assert_eq!(h.lifecycle.starts.load(Ordering::Relaxed), 2, "started twice");
        assert_eq!(
            (after.remaining, after.held, after.sold),
            (before.remaining, before.held, before.sold)
        );
        assert_eq!((after.remaining, after.sold), (8, 2));
        let again = claim(&h.actor, "alice", None).await?;
        assert_eq!(
            again.err(),
            Some(Refusal::LimitReached { limit: 1 }),
            "per-user count survived"
        );
        let replay = claim(&h.actor, "alice", Some("k1")).await??;
        assert!(replay.replayed, "idempotency result survived");
        assert_eq!(
            replay.reservation, first.reservation,
            "the first answer, byte for byte"
        );
        Ok(())
    }

    #[actix_rt::test]
    async fn a_user_left_unissued_by_a_bulk_chunk_can_claim_once_stock_comes_back() -> anyhow::Result<()> {
        // Arrange: one unit for a chunk of two users, so `late` is left unissued; `late`'s live
        // claim arrives while the chunk is in flight and waits for it.
        let h = harness(r#"{"name":"bulk","kind":"coupon","stock":1}"#).await?;
        let (first, late) = (UserId::parse("first")?, UserId::parse("late")?);
        let mut grant = h
            .actor
            .send(BulkBegin(vec![first.clone(), late.clone()]))
            .await??;
        assert_eq!(
            (grant.insert.clone(), grant.unissued.clone()),
            (vec![first], vec![late.clone()])
        );
        let (reply, waiting) = reply_channel();
        let claim_during = Reserve {
            user: late.clone(),
            quantity: Quantity::ONE,
            key: None,
            reply,
        };
        h.actor.send(claim_during).await?;

        // Act: the chunk commits its one grant.
        drop(grant.fence.take());
        let committed = ChunkCommitted {
            inserted: 1,
            unissued: vec![late.clone()],
        };
        h.actor.do_send(BulkEnd {
            epoch: grant.epoch,
            committed: Some(committed),
        });
        let during = waiting.await;
        h.actor
            .send(UpdateEvent(EventPatch {
                stock: Some(2),
                ..EventPatch::default()
            }))
            .await??;
        let after = claim(&h.actor, "late", None).await?;

        // Assert
        assert_eq!(
            during.err(),
            Some(Refusal::SoldOut),
            "nothing was left for the waiting claim"
        );
        let after = after.map_err(|refusal| anyhow::anyhow!("refused once stock came back: {refusal}"))?;
        assert_eq!(after.reservation.user_id, late);
        let snapshot = h.actor.send(Snapshot).await??;
        assert_eq!((snapshot.remaining, snapshot.sold), (0, 2));
        Ok(())
    }

    #[actix_rt::test]
    async fn a_failed_commit_answers_unavailable_and_reverts_the_tentative_reservation() -> anyhow::Result<()>
    {
        // Arrange: the database itself refuses any batch carrying this user's row.
        let h = harness(r#"{"name":"fail","kind":"coupon","stock":3}"#).await?;
        h.db.execute_unprepared(
            "CREATE TRIGGER poison BEFORE INSERT ON reservations WHEN NEW.user_id = 'poison' \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
        )
        .await?;

        // Act
        let failed = claim(&h.actor, "poison", Some("retry-me")).await?;

        // Assert
        assert_eq!(failed.err(), Some(Refusal::Unavailable));
        let snapshot = h.actor.send(Snapshot).await??;
        assert_eq!((snapshot.remaining, snapshot.sold), (3, 0), "nothing stays taken");
        h.db.execute_unprepared("DROP TRIGGER poison").await?;
        let retried = claim(&h.actor, "poison", Some("retry-me")).await??;
        assert!(!retried.replayed, "the failed attempt left no idempotency record");
        let snapshot = h.actor.send(Snapshot).await??;
        assert_eq!((snapshot.remaining, snapshot.sold), (2, 1));
        Ok(())
    }

    /// Cancels of the only unit in [`a_cancel_is_answered_only_once_the_edge_would_let_a_claim_through`].
    const GATE_ROUNDS: usize = 200;

    /// Waits for `answer` by spinning, so the caller looks at what the actor published the
    /// instant the answer exists, before the actor's thread can do anything more.
    fn spin_for<T>(mut answer: oneshot::Receiver<T>) -> anyhow::Result<T> {
        loop {
            match answer.try_recv() {
                Ok(value) => return Ok(value),
                Err(oneshot::error::TryRecvError::Empty) => std::hint::spin_loop(),
                Err(oneshot::error::TryRecvError::Closed) => anyhow::bail!("the actor dropped the reply"),
            }
        }
    }

    #[actix_rt::test]
    async fn a_cancel_is_answered_only_once_the_edge_would_let_a_claim_through() -> anyhow::Result<()> {
        // Arrange: one unit; the actor on a thread of its own, as in the server.
        let h = harness_with(r#"{"name":"gate","kind":"coupon","stock":1}"#, Threads::Own).await?;
        for round in 0..GATE_ROUNDS {
            let taken = claim(&h.actor, &format!("user-{round}"), None)
                .await??
                .reservation;
            anyhow::ensure!(
                h.admission.sold_out(crate::domain::now()),
                "round {round}: the edge does not refuse claims with the only unit taken"
            );

            // Act: a client told its cancel succeeded may claim again at once.
            let (reply, answer) = oneshot::channel();
            h.actor.do_send(Cancel {
                id: taken.id,
                user: taken.user_id,
                reply,
            });
            let cancelled = spin_for(answer)?;
            let refused_at_the_edge = h.admission.sold_out(crate::domain::now());

            // Assert
            cancelled
                .map_err(|refusal| anyhow::anyhow!("round {round}: the cancel was refused: {refusal}"))?;
            assert!(
                !refused_at_the_edge,
                "round {round}: the cancel was answered while the edge still refused claims as sold out"
            );
        }
        Ok(())
    }
}
