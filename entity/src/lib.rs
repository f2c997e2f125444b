//! sea-orm entities for firstcome's two tables.
//!
//! The server never hands these models to HTTP or to actors directly: `src/store` converts them
//! to and from the domain types, so validation happens once, at the edge.

pub mod events;
pub mod reservations;
