//! # Registry: one event actor per event, started on first use
//!
//! HTTP handlers ask the registry for an event's actor address. The lookup is a lock-free map
//! read; only the first request for an event takes the slow path (check the event exists, start
//! its supervised actor on the next event arbiter). Hot events are spread round-robin over one
//! arbiter (thread) per core.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use actix::prelude::*;
use actix_rt::ArbiterHandle;
use sea_orm::DatabaseConnection;

use super::event::{EventActor, Lifecycle};
use super::persister::Persister;
use crate::domain::EventId;
use crate::store;

pub struct Registry {
    actors: papaya::HashMap<EventId, Addr<EventActor>>,
    /// Serializes actor creation so two first requests never start two actors for one event.
    creating: tokio::sync::Mutex<()>,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: AtomicUsize,
    db: DatabaseConnection,
    persister: Addr<Persister>,
    lifecycle: Arc<Lifecycle>,
    mailbox_capacity: usize,
}

impl Registry {
    pub fn new(
        arbiters: Vec<ArbiterHandle>,
        db: DatabaseConnection,
        persister: Addr<Persister>,
        mailbox_capacity: usize,
    ) -> Self {
        Self {
            actors: papaya::HashMap::new(),
            creating: tokio::sync::Mutex::new(()),
            arbiters,
            next_arbiter: AtomicUsize::new(0),
            db,
            persister,
            lifecycle: Arc::default(),
            mailbox_capacity,
        }
    }

    /// The actor of event `id`, started if needed; `None` if no such event exists.
    pub async fn actor(&self, id: EventId) -> anyhow::Result<Option<Addr<EventActor>>> {
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
        let index = self.next_arbiter.fetch_add(1, Ordering::Relaxed) % self.arbiters.len().max(1);
        let (db, persister, lifecycle, capacity) = (
            self.db.clone(),
            self.persister.clone(),
            self.lifecycle.clone(),
            self.mailbox_capacity,
        );
        let start =
            move |_: &mut Context<EventActor>| EventActor::new(id, db, persister, lifecycle, capacity);
        let addr = match self.arbiters.get(index) {
            Some(arbiter) => Supervisor::start_in_arbiter(arbiter, start),
            None => Supervisor::start(start),
        };
        self.actors.pin().insert(id, addr.clone());
        Ok(Some(addr))
    }

    pub fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }
}
