//! # Live notifications: one broadcaster per event
//!
//! The event actor owns a [`LivePublisher`] and calls [`LivePublisher::publish`] after commits
//! settle. That call never waits on a socket: it compares the event's counts with the last ones,
//! and only when a message is due serializes it **once** and hands it to a
//! `tokio::sync::broadcast` channel ([`LiveChannel`]), where every WebSocket session picks up
//! the same shared, reference-counted text. With nobody listening a publish costs a comparison
//! and, when the counts changed, one uncontended lock.
//!
//! What is sent (every message is one JSON object with `type`, a per-event `seq`, `event_id`,
//! `remaining`, `held`, `sold` and `status`):
//! - `snapshot`: to one client, on connect (its `seq` is the last one broadcast);
//! - `availability`: counts changed; coalesced to at most one per `ws_coalesce_ms` per event;
//! - `sold_out`: at once, when a commit lands and nothing remains with no claim in flight;
//! - `restocked`: at once, when units come back after a `sold_out` (cancel, expiry, more stock);
//! - `closed`: at once, when the event closes (admin or `closes_at`).
//!
//! Sessions subscribe under the same lock the publisher sends under, so a client's snapshot and
//! the broadcasts after it follow without gap or overlap: each next message has `seq + 1`.
//!
//! The [`LiveHub`] holds what all events share: the WebSocket settings, the count of open
//! sessions, and the shutdown signal behind [`LiveHub::close_all`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytestring::ByteString;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{Notify, broadcast, watch};

use crate::domain::{Event, EventId, EventStatus, Inventory};

/// Default coalescing interval of `availability` messages, per event.
pub const DEFAULT_COALESCE: Duration = Duration::from_millis(100);
/// Default messages kept per event for sessions that fall behind; a session further behind is
/// closed with 1013 (try again later) and re-syncs from a new snapshot.
pub const DEFAULT_CHANNEL_CAPACITY: usize = 64;
/// Default interval between the server's pings.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// Default silence (no pong, no message) after which a client counts as dead and is closed.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(15);
/// Default largest message a client may send (frame and reassembled continuation).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4096;

/// The WebSocket settings every event shares.
#[derive(Debug, Clone)]
pub struct LiveSettings {
    pub coalesce: Duration,
    pub channel_capacity: usize,
    pub heartbeat: Duration,
    pub client_timeout: Duration,
    pub max_message_bytes: usize,
    /// Origins (`scheme://host[:port]`, or `*`) allowed besides none and the server's own host.
    pub allowed_origins: Vec<String>,
}

impl LiveSettings {
    pub fn from_settings(settings: &crate::config::Settings) -> Self {
        Self {
            coalesce: Duration::from_millis(settings.ws_coalesce_ms),
            channel_capacity: settings.ws_channel_capacity.max(1),
            heartbeat: Duration::from_millis(settings.ws_heartbeat_ms.max(1)),
            client_timeout: Duration::from_millis(settings.ws_client_timeout_ms.max(1)),
            max_message_bytes: settings.ws_max_message_bytes,
            allowed_origins: settings.ws_allowed_origins.clone(),
        }
    }
}

impl Default for LiveSettings {
    fn default() -> Self {
        Self {
            coalesce: DEFAULT_COALESCE,
            channel_capacity: DEFAULT_CHANNEL_CAPACITY,
            heartbeat: DEFAULT_HEARTBEAT,
            client_timeout: DEFAULT_CLIENT_TIMEOUT,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            allowed_origins: Vec::new(),
        }
    }
}

/// What all live channels share: settings, open-session count, shutdown signal.
#[derive(Debug)]
pub struct LiveHub {
    settings: LiveSettings,
    shutdown: watch::Sender<bool>,
    sessions: AtomicUsize,
    drained: Notify,
}

impl LiveHub {
    pub fn new(settings: LiveSettings) -> Self {
        Self {
            settings,
            shutdown: watch::Sender::new(false),
            sessions: AtomicUsize::new(0),
            drained: Notify::new(),
        }
    }

    pub fn settings(&self) -> &LiveSettings {
        &self.settings
    }

    /// A new broadcaster for event `event`, made by the registry with the event's actor.
    pub fn channel(&self, event: EventId) -> Arc<LiveChannel> {
        let (tx, _) = broadcast::channel(self.settings.channel_capacity.max(1));
        Arc::new(LiveChannel {
            event,
            coalesce: self.settings.coalesce,
            tx,
            latest: Mutex::new(None),
        })
    }

    /// Tells every open session to close with 1001 (going away) and refuses new ones. For
    /// graceful shutdown; [`LiveHub::drained`] waits until the sessions have ended.
    pub fn close_all(&self) {
        self.shutdown.send_replace(true);
    }

    pub fn is_closing(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves once [`LiveHub::close_all`] has been called.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Counts a session as open until the guard drops.
    pub fn session_started(self: &Arc<Self>) -> SessionGuard {
        self.sessions.fetch_add(1, Ordering::AcqRel);
        SessionGuard(self.clone())
    }

    /// Sessions open now.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Acquire)
    }

    /// Waits until no session is open, at most `within`; true if none is.
    pub async fn drained(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.drained.notified();
            if self.sessions() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.sessions() == 0;
            }
        }
    }
}

/// One open WebSocket session, counted in [`LiveHub::sessions`].
#[derive(Debug)]
pub struct SessionGuard(Arc<LiveHub>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.0.sessions.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.drained.notify_waiters();
        }
    }
}

/// One serialized message, shared by every session of the event.
#[derive(Debug, Clone)]
pub struct Frame {
    pub seq: u64,
    pub text: ByteString,
}

/// The counts a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveView {
    pub remaining: u64,
    pub held: u64,
    pub sold: u64,
    pub status: EventStatus,
}

/// The last broadcast `seq` and the newest counts, read by a subscribing session.
#[derive(Debug, Clone, Copy)]
struct Latest {
    seq: u64,
    view: LiveView,
}

/// The broadcaster of one event: the publisher (its actor) sends, sessions subscribe.
#[derive(Debug)]
pub struct LiveChannel {
    event: EventId,
    coalesce: Duration,
    tx: broadcast::Sender<Frame>,
    /// why: sending and subscribing under one lock makes a snapshot and the broadcasts after
    /// it contiguous in `seq`. The lock is only ever held for a send or a copy.
    latest: Mutex<Option<Latest>>,
}

impl LiveChannel {
    /// A `snapshot` message for a new client and the receiver for everything after it; `None`
    /// until the event's actor has loaded its state once.
    pub fn subscribe(&self) -> Option<(Frame, broadcast::Receiver<Frame>)> {
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        let current = (*latest)?;
        let rx = self.tx.subscribe();
        drop(latest);
        let frame = Frame {
            seq: current.seq,
            text: serialize(Kind::Snapshot, current.seq, self.event, current.view),
        };
        Some((frame, rx))
    }

    /// Sessions subscribed now.
    pub fn listeners(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// A message's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Snapshot,
    Availability,
    SoldOut,
    Restocked,
    Closed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Snapshot => "snapshot",
            Self::Availability => "availability",
            Self::SoldOut => "sold_out",
            Self::Restocked => "restocked",
            Self::Closed => "closed",
        }
    }
}

#[derive(Serialize)]
struct Wire {
    #[serde(rename = "type")]
    kind: &'static str,
    seq: u64,
    event_id: EventId,
    remaining: u64,
    held: u64,
    sold: u64,
    status: EventStatus,
}

fn serialize(kind: Kind, seq: u64, event: EventId, view: LiveView) -> ByteString {
    let wire = Wire {
        kind: kind.as_str(),
        seq,
        event_id: event,
        remaining: view.remaining,
        held: view.held,
        sold: view.sold,
        status: view.status,
    };
    // Serializing plain integers and enums cannot fail; an empty text would be the only outcome.
    ByteString::from(serde_json::to_string(&wire).unwrap_or_default())
}

/// What has been announced to clients: the state `sold_out`/`restocked`/`closed` move between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Announced {
    Available,
    SoldOut,
    Closed,
}

/// The actor's side of its event's broadcaster; owned by the actor, so no lock guards it.
#[derive(Debug)]
pub struct LivePublisher {
    channel: Arc<LiveChannel>,
    seq: u64,
    announced: Option<Announced>,
    view: Option<LiveView>,
    /// Counts changed since the last message.
    dirty: bool,
    last_availability: Option<Instant>,
}

impl LivePublisher {
    pub fn new(channel: Arc<LiveChannel>) -> Self {
        Self {
            channel,
            seq: 0,
            announced: None,
            view: None,
            dirty: false,
            last_availability: None,
        }
    }

    /// Publishes the event's committed state. `settled` is false while claims are in flight
    /// (taken, not yet committed), so `sold_out` waits for the last unit's commit. Returns when
    /// to call again: a coalesced `availability` is due then, or a window edge (`opens_at`,
    /// `closes_at`) is ahead while someone listens.
    pub fn publish(&mut self, event: &Event, inventory: Inventory, settled: bool) -> Option<Duration> {
        let now = crate::domain::now();
        let view = LiveView {
            remaining: inventory.remaining(),
            held: inventory.held,
            sold: inventory.sold,
            status: event.status(inventory, now),
        };
        let announced = match (view.status, self.announced) {
            (EventStatus::Closed, _) => Announced::Closed,
            (EventStatus::SoldOut, _) if settled => Announced::SoldOut,
            // Taken but not committed yet: nothing new to announce.
            (EventStatus::SoldOut, Some(before)) => before,
            _ => Announced::Available,
        };
        if self.view != Some(view) {
            self.view = Some(view);
            self.dirty = true;
            self.remember(view);
        }
        let kind = match (self.announced.replace(announced), announced) {
            (None, _) => None,
            (Some(before), after) if before == after => None,
            (_, Announced::Closed) => Some(Kind::Closed),
            (_, Announced::SoldOut) => Some(Kind::SoldOut),
            (Some(Announced::SoldOut), Announced::Available) => Some(Kind::Restocked),
            // Reopened after a close.
            (Some(_), Announced::Available) => Some(Kind::Availability),
        };
        let clock = Instant::now();
        if let Some(kind) = kind {
            self.emit(kind, view);
        } else if self.dirty {
            let due = self.last_availability.map_or(Duration::ZERO, |at| {
                (at + self.channel.coalesce).saturating_duration_since(clock)
            });
            if due.is_zero() {
                if self.emit(Kind::Availability, view) {
                    self.last_availability = Some(clock);
                }
            } else if self.channel.listeners() > 0 {
                return Some(due);
            } else {
                // Nobody to tell; a later subscriber gets the counts in its snapshot.
                self.dirty = false;
            }
        }
        self.next_edge(event, now)
    }

    /// While someone listens and a window edge is ahead, check again at least every
    /// coalescing interval, so `closed` (or `open`) follows the clock.
    fn next_edge(&self, event: &Event, now: DateTime<Utc>) -> Option<Duration> {
        if self.channel.listeners() == 0 || self.announced == Some(Announced::Closed) {
            return None;
        }
        let edge = [event.opens_at, event.closes_at]
            .into_iter()
            .flatten()
            .filter(|at| *at > now)
            .min()?;
        let until = (edge - now).to_std().unwrap_or_default() + Duration::from_millis(1);
        Some(until.min(self.channel.coalesce.max(Duration::from_millis(1))))
    }

    /// Stores the newest counts for snapshots.
    fn remember(&self, view: LiveView) {
        let mut latest = self.channel.latest.lock().unwrap_or_else(|p| p.into_inner());
        *latest = Some(Latest { seq: self.seq, view });
    }

    /// Broadcasts one message; false when nobody listens (then nothing is serialized).
    fn emit(&mut self, kind: Kind, view: LiveView) -> bool {
        self.dirty = false;
        if self.channel.listeners() == 0 {
            return false;
        }
        let seq = self.seq + 1;
        let text = serialize(kind, seq, self.channel.event, view);
        let mut latest = self.channel.latest.lock().unwrap_or_else(|p| p.into_inner());
        self.seq = seq;
        *latest = Some(Latest { seq, view });
        // An error only means every receiver has just gone.
        let _ = self.channel.tx.send(Frame { seq, text });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::EventSpec;

    fn event(stock: u64) -> anyhow::Result<Event> {
        let spec: EventSpec = serde_json::from_value(serde_json::json!({
            "name": "live", "kind": "coupon", "stock": stock,
        }))?;
        Ok(spec.validate(crate::domain::now())?)
    }

    fn kinds(rx: &mut broadcast::Receiver<Frame>) -> anyhow::Result<Vec<(u64, String)>> {
        let mut seen = Vec::new();
        while let Ok(frame) = rx.try_recv() {
            let value: serde_json::Value = serde_json::from_str(&frame.text)?;
            seen.push((frame.seq, value["type"].as_str().unwrap_or_default().to_owned()));
        }
        Ok(seen)
    }

    fn counts(stock: u64, sold: u64) -> Inventory {
        Inventory { stock, held: 0, sold }
    }

    #[test]
    fn sold_out_waits_for_the_commit_and_restocked_follows_a_return() -> anyhow::Result<()> {
        // Arrange
        let hub = LiveHub::new(LiveSettings::default());
        let channel = hub.channel(EventId::from_db(1));
        let mut publisher = LivePublisher::new(channel.clone());
        let event = event(2)?;
        publisher.publish(&event, counts(2, 0), true);
        let (snapshot, mut rx) = channel
            .subscribe()
            .ok_or_else(|| anyhow::anyhow!("no snapshot"))?;

        // Act
        publisher.publish(&event, counts(2, 2), false);
        let before_commit = kinds(&mut rx)?;
        publisher.publish(&event, counts(2, 2), true);
        publisher.publish(&event, counts(2, 1), true);

        // Assert
        assert_eq!(snapshot.seq, 0);
        assert_eq!(before_commit, vec![(1, "availability".to_owned())]);
        assert_eq!(
            kinds(&mut rx)?,
            vec![(2, "sold_out".to_owned()), (3, "restocked".to_owned())]
        );
        Ok(())
    }

    #[test]
    fn availability_is_coalesced_and_nothing_is_serialized_without_listeners() -> anyhow::Result<()> {
        // Arrange
        let hub = LiveHub::new(LiveSettings::default());
        let channel = hub.channel(EventId::from_db(1));
        let mut publisher = LivePublisher::new(channel.clone());
        let event = event(100)?;
        for sold in 0..10 {
            assert_eq!(publisher.publish(&event, counts(100, sold), true), None);
        }
        assert_eq!(publisher.seq, 0, "no listener, no message");
        let (snapshot, mut rx) = channel
            .subscribe()
            .ok_or_else(|| anyhow::anyhow!("no snapshot"))?;
        assert!(snapshot.text.contains(r#""sold":9"#), "{}", &*snapshot.text);

        // Act: a burst of changes within one interval
        let mut wake = None;
        for sold in 10..20 {
            wake = publisher.publish(&event, counts(100, sold), true).or(wake);
        }

        // Assert: one message now, the rest waits for the timer
        assert_eq!(kinds(&mut rx)?, vec![(1, "availability".to_owned())]);
        assert!(wake.is_some_and(|d| d <= DEFAULT_COALESCE), "{wake:?}");
        Ok(())
    }

    #[test]
    fn a_receiver_that_falls_behind_the_capacity_learns_it_lagged() -> anyhow::Result<()> {
        let hub = LiveHub::new(LiveSettings {
            channel_capacity: 2,
            coalesce: Duration::ZERO,
            ..LiveSettings::default()
        });
        let channel = hub.channel(EventId::from_db(1));
        let mut publisher = LivePublisher::new(channel.clone());
        let event = event(100)?;
        publisher.publish(&event, counts(100, 0), true);
        let (_, mut rx) = channel
            .subscribe()
            .ok_or_else(|| anyhow::anyhow!("no snapshot"))?;
        for sold in 1..=5 {
            publisher.publish(&event, counts(100, sold), true);
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(3))
        ));
        Ok(())
    }
}
