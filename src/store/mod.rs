//! Persistence in domain terms: connecting with durable settings, migrations, and the few
//! queries the server needs. Everything here speaks `crate::domain` types; sea-orm models stay
//! inside this module.

mod batch;
mod connect;
mod convert;
mod fenced;
mod held;
mod queries;
mod user_index;

pub use batch::{WriteOp, apply_batch};
pub use connect::{Backend, connect, migrate};
pub use fenced::{Rebuild, Recorded, Tombstone, ledger_generation, settle, transition};
pub use held::HeldConnection;
pub use queries::{
    EventState, create_event, events_with_holds, find_event, find_reservation, granted_users,
    list_user_reservations, load_event_state, ping, user_reservations_by_id,
};
pub use user_index::UserIndex;
