//! # firstcome
//!
//! A server for limited-inventory drops: N units, far more than N requests in the same second,
//! and exactly N issued, each acknowledged only once it is durable.
//!
//! # Architecture
//!
//! ```text
//! HTTP ─> http: observe (request id, latency) → drain → rate_limit → auth → parse into domain types
//!           │ ─msg─> actors::event::EventActor (one per event)
//!           │            │ decides from memory; takes units at once
//!           │            ├─WriteOp─> actors::persister::Persister
//!           │            │             │ group commit: one statement or transaction per batch
//!           │            │             └─> store ─> SQLite / PostgreSQL / MySQL
//!           │            └─publish─> actors::live (one broadcast channel per event)
//! WebSocket ─> http::live ────────────────┘ (snapshot, availability, sold_out, restocked, closed)
//!
//! Several nodes (REDIS_URL, PostgreSQL): cluster::ClusterEventActor takes the same messages;
//!   one gate call per batch ─> Redis ledger (Lua: stock, per-user, idempotency, holds)
//!   granted ─WriteOp::InsertFenced─> Persister (lands only under the current ledger generation)
//!   counts ─pub/sub─> the other nodes' actors ─> their WebSocket listeners
//! ```
//!
//! # Layout
//! - [`domain`]: newtypes and rules (ids, quantities, events, reservation states); no I/O.
//! - [`actors`]: the event actor (single writer per event), the persister (group commit) and
//!   the registry (starts event actors on first use, one arbiter per core).
//!   `actors::live` is each event's broadcaster for WebSocket listeners (`http::live`).
//! - [`http`]: actix-web routes; each only parses, sends a message and renders. Also the
//!   edge: `auth` (JWT or trusted header), `rate_limit` (governor), `observe` (request ids,
//!   `/metrics`), `docs` (`/openapi.json`, `/docs/`), `live` (the WebSocket route).
//! - [`cluster`]: several nodes: the Redis ledger (Lua scripts, rebuild, reconciliation), its
//!   event actor, and the pub/sub bridge between nodes.
//! - [`store`]: sea-orm queries and the batch writer, in domain terms.
//! - [`error`]: the table of error codes and the problem+json body.
//! - [`metrics`]: the Prometheus series and their names.
//! - [`sharded`]: the sharded hash map behind the maps that grow with every sale.
//! - [`shutdown`]: draining on SIGTERM/SIGINT before the server stops.
//! - [`config`], [`telemetry`], [`startup`]: settings, logging, wiring.

pub mod actors;
pub mod bulk;
pub mod cluster;
pub mod config;
pub mod domain;
pub mod error;
pub mod http;
pub mod metrics;
pub mod sharded;
pub mod shutdown;
pub mod startup;
pub mod store;
pub mod telemetry;
