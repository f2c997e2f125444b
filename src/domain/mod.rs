//! Domain types and rules: parsed once at the edge, so actors and persistence never see raw
//! strings or unchecked numbers. No actix and no sea-orm here.

mod event;
mod ids;
mod reservation;

pub use event::{Event, EventKind, EventPatch, EventSpec, EventStatus, Inventory};
pub use ids::{EventId, IdempotencyKey, ReservationId, UserId};
pub use reservation::{Quantity, Reservation, ReservationStatus};

/// The current time at the precision every backend stores (microseconds), so an answer rebuilt
/// from the database after a restart is identical to the one first sent.
pub fn now() -> chrono::DateTime<chrono::Utc> {
    use chrono::SubsecRound;
    chrono::Utc::now().trunc_subsecs(6)
}

/// Why a value from a client was refused; the message is shown to the client as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Invalid {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}
