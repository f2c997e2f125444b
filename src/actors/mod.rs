//! The actors: one [`event::EventActor`] per event (single writer of its state), one
//! [`persister::Persister`] per database (group commit), and the [`registry::Registry`] that
//! starts event actors on first use and spreads them over the event arbiters.

pub mod event;
pub mod live;
pub mod persister;
pub mod registry;

pub use event::{Admission, EventActor, EventSnapshot, Refusal, Reply, Reserved, reply_channel};
pub use live::{LiveChannel, LiveHub, LiveSettings};
pub use persister::{Persister, PersisterStats, WriteGate};
pub use registry::{EventAddr, EventHandle, QueueDepths, Registry};
