//! sea-orm entities for firstcome's tables (the bulk grants table is written with hand-built
//! bulk statements only, in `src/bulk`, and has no entity).
//!
//! The server never hands these models to HTTP or to actors directly: `src/store` converts them
//! to and from the domain types, so validation happens once, at the edge.

pub mod bulk_jobs;
pub mod events;
pub mod reservations;
