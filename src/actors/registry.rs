//! # Registry: one event actor per event, started on first use
//!
//! HTTP handlers ask the registry for an event's actor address. The lookup is a lock-free map
//! read; only the first request for an event takes the slow path (check the event exists, start
//! its supervised actor on the next event arbiter). Hot events are spread round-robin over one
//! arbiter (thread) per core: by default the HTTP workers' own arbiters, so a request that lands
//! on its event's thread reaches the actor without a cross-thread wake-up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use actix::prelude::*;
use actix_rt::ArbiterHandle;
use sea_orm::DatabaseConnection;

use super::event::{Admission, EventActor, Lifecycle};
use super::live::{LiveChannel, LiveHub, LiveSettings};
use super::persister::PersisterAddr;
use crate::cluster::{Cluster, ClusterEventActor, RemoteCounts};
use crate::domain::EventId;
use crate::store;

/// An event's actor and what the HTTP edge checks before sending it a request.
#[derive(Clone)]
pub struct EventHandle {
    pub actor: EventAddr,
    pub admission: Arc<Admission>,
    /// The event's live broadcaster, for WebSocket sessions to subscribe to.
    pub live: Arc<LiveChannel>,
    /// Held by a bulk job across each chunk (see [`super::event::BulkBegin`]).
    pub bulk_fence: Arc<tokio::sync::Mutex<()>>,
}

/// The event's actor: an [`EventActor`] on one node, a [`ClusterEventActor`] with several. Both
/// take the same messages; an address (not a `Recipient`) keeps `try_send` exactly as actix
/// gives it for an `Addr`, with no boxed sender cloned per request.
#[derive(Clone)]
pub enum EventAddr {
    Local(Addr<EventActor>),
    Cluster(Addr<ClusterEventActor>),
}

impl EventAddr {
    /// The single-node actor; bulk issuance talks to it directly.
    pub fn local(&self) -> Option<&Addr<EventActor>> {
        match self {
            EventAddr::Local(addr) => Some(addr),
            EventAddr::Cluster(_) => None,
        }
    }

    pub fn try_send<M>(&self, msg: M) -> Result<(), SendError<M>>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        EventActor: Handler<M>,
        ClusterEventActor: Handler<M>,
    {
        match self {
            EventAddr::Local(addr) => addr.try_send(msg),
            EventAddr::Cluster(addr) => addr.try_send(msg),
        }
    }

    pub fn do_send<M>(&self, msg: M)
    where
        M: Message + Send + 'static,
        M::Result: Send,
        EventActor: Handler<M>,
        ClusterEventActor: Handler<M>,
    {
        match self {
            EventAddr::Local(addr) => addr.do_send(msg),
            EventAddr::Cluster(addr) => addr.do_send(msg),
        }
    }

    pub async fn send<M>(&self, msg: M) -> Result<M::Result, MailboxError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        EventActor: Handler<M>,
        ClusterEventActor: Handler<M>,
    {
        match self {
            EventAddr::Local(addr) => addr.send(msg).await,
            EventAddr::Cluster(addr) => addr.send(msg).await,
        }
    }
}

/// A point-in-time view of the event actors' queues.
#[derive(Debug, Default, Clone, Copy)]
pub struct QueueDepths {
    pub actors: usize,
    pub queued: usize,
    pub deepest: usize,
}

pub struct Registry {
    actors: papaya::HashMap<EventId, EventHandle>,
    /// Serializes actor creation so two first requests never start two actors for one event.
    creating: tokio::sync::Mutex<()>,
    arbiters: std::sync::RwLock<Vec<ArbiterHandle>>,
    next_arbiter: AtomicUsize,
    db: DatabaseConnection,
    persister: PersisterAddr,
    lifecycle: Arc<Lifecycle>,
    mailbox_capacity: usize,
    live: Arc<LiveHub>,
    cluster: Option<Arc<Cluster>>,
}

impl Registry {
    pub fn new(
        arbiters: Vec<ArbiterHandle>,
        db: DatabaseConnection,
        persister: PersisterAddr,
        mailbox_capacity: usize,
    ) -> Self {
        Self {
            actors: papaya::HashMap::new(),
            creating: tokio::sync::Mutex::new(()),
            arbiters: std::sync::RwLock::new(arbiters),
            next_arbiter: AtomicUsize::new(0),
            db,
            persister,
            lifecycle: Arc::default(),
            mailbox_capacity,
            live: Arc::new(LiveHub::new(LiveSettings::default())),
            cluster: None,
        }
    }

    /// Several nodes: event actors decide through the shared Redis ledger.
    pub fn with_cluster(mut self, cluster: Option<Arc<Cluster>>) -> Self {
        self.cluster = cluster;
        self
    }

    /// Hands counts heard from another node to the event's actor, if it runs here.
    pub fn remote(&self, id: EventId, counts: RemoteCounts) {
        if let Some(EventHandle {
            actor: EventAddr::Cluster(addr),
            ..
        }) = self.actors.pin().get(&id)
        {
            addr.do_send(counts);
        }
    }

    /// Uses `hub` (its WebSocket settings) for the broadcasters of events started from now on.
    pub fn with_live(mut self, hub: Arc<LiveHub>) -> Self {
        self.live = hub;
        self
    }

    /// The WebSocket hub: settings, open sessions, and [`LiveHub::close_all`] for shutdown.
    pub fn live(&self) -> &Arc<LiveHub> {
        &self.live
    }

    /// Whether event `id`'s actor runs here and its admission gate says sold out at `now`.
    ///
    /// why not [`Registry::actor`]: a sold-out refusal needs only the gate, and cloning the
    /// whole handle (the actor's address and three shared pointers) for it, then dropping it, is
    /// a run of atomic counter updates that both HTTP workers contend on, for every refusal.
    pub fn sold_out(&self, id: EventId, now: chrono::DateTime<chrono::Utc>) -> bool {
        self.actors
            .pin()
            .get(&id)
            .is_some_and(|handle| handle.admission.sold_out(now))
    }

    /// The actor of event `id`, started if needed; `None` if no such event exists.
    pub async fn actor(&self, id: EventId) -> anyhow::Result<Option<EventHandle>> {
        if let Some(addr) = self.actors.pin().get(&id) {
            return Ok(Some(addr.clone()));
        }
        let _creating = self.creating.lock().await;
        if let Some(addr) = self.actors.pin().get(&id) {
            return Ok(Some(addr.clone()));
        }
        if store::find_event(&self.db, id).await?.is_none() {
            return Ok(None);
        }
        let arbiter = {
            let arbiters = self
                .arbiters
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let index = self.next_arbiter.fetch_add(1, Ordering::Relaxed);
            arbiters.get(index % arbiters.len().max(1)).cloned()
        };
        let admission = Arc::new(Admission::new(self.mailbox_capacity));
        let live = self.live.channel(id);
        let bulk_fence = Arc::new(tokio::sync::Mutex::new(()));
        let actor_fence = bulk_fence.clone();
        let (db, persister, lifecycle, actor_admission, actor_live) = (
            self.db.clone(),
            self.persister.clone(),
            self.lifecycle.clone(),
            admission.clone(),
            live.clone(),
        );
        let handle = match &self.cluster {
            None => {
                let start = move |_: &mut Context<EventActor>| {
                    EventActor::new(
                        id,
                        db,
                        persister,
                        lifecycle,
                        actor_admission,
                        actor_live,
                        actor_fence,
                    )
                };
                let addr = match arbiter {
                    Some(arbiter) => Supervisor::start_in_arbiter(&arbiter, start),
                    None => Supervisor::start(start),
                };
                EventHandle {
                    actor: EventAddr::Local(addr),
                    admission,
                    live,
                    bulk_fence,
                }
            }
            Some(cluster) => {
                let cluster = cluster.clone();
                let start = move |_: &mut Context<ClusterEventActor>| {
                    ClusterEventActor::new(id, db, persister, cluster, lifecycle, actor_admission, actor_live)
                };
                let addr = match arbiter {
                    Some(arbiter) => Supervisor::start_in_arbiter(&arbiter, start),
                    None => Supervisor::start(start),
                };
                EventHandle {
                    actor: EventAddr::Cluster(addr),
                    admission,
                    live,
                    bulk_fence,
                }
            }
        };
        self.actors.pin().insert(id, handle.clone());
        Ok(Some(handle))
    }

    /// Starts the actors of events with holds outstanding, so those holds expire on time even if
    /// no request touches their event. Waits (briefly) for the HTTP workers to register their
    /// arbiters first, so these actors are spread like any other.
    pub async fn start_actors_with_holds(&self, expected_arbiters: usize) -> anyhow::Result<()> {
        for _ in 0..500 {
            if self.arbiters.read().map_or(0, |a| a.len()) >= expected_arbiters {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        for id in store::events_with_holds(&self.db).await? {
            self.actor(id).await?;
        }
        Ok(())
    }

    /// Adds an arbiter that event actors may be placed on (an HTTP worker registers its own).
    pub fn add_arbiter(&self, arbiter: ArbiterHandle) {
        self.arbiters
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(arbiter);
    }

    /// Running actors, their queued requests in total, and the deepest queue (for `/metrics`).
    pub fn queue_depths(&self) -> QueueDepths {
        let actors = self.actors.pin();
        let mut depths = QueueDepths {
            actors: actors.len(),
            ..QueueDepths::default()
        };
        for handle in actors.values() {
            let queued = handle.admission.queued();
            depths.queued += queued;
            depths.deepest = depths.deepest.max(queued);
        }
        depths
    }

    pub fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }
}
