//! The API test suite: one binary, one module per area. Every test starts a real `firstcome`
//! process on port 0 with its own database (see `helpers`), and most run on SQLite, PostgreSQL
//! and MySQL alike (`sqlite::…`, `postgres::…`, `mysql::…` in the test names).
//!
//! - `stampede`: 1,500 clients for 1,000 units → exactly 1,000, durable, counts conserved.
//! - `limits`: per-user limits under concurrency, multi-unit requests, `max_per_request`.
//! - `idempotency`: replays, key reuse, concurrent requests with one key, key scope.
//! - `holds`: ticket holds expire on time (never early), confirm, cancel, coupons revoke.
//! - `restart`: identical state after kill -9 and restart; kill -9 in the middle of a stampede.
//! - `outage`: 503 + `Retry-After` while the database cannot commit, recovery after; PostgreSQL
//!   ending every session of the server.
//! - `bad_input`: malformed requests → problem+json, never a 500, nothing changed; limits.
//! - `events_admin`: admin auth, event validation, stock changes, closing, sales windows.
//! - `ownership`: someone else's reservation is a 404 and stays unchanged.
//! - `rate_limit`: 429 with Retry-After and RateLimit headers per user, per IP, per class.
//! - `shedding`: a full event mailbox answers 503 at once; shed claims leave nothing behind.
//! - `sold_out`: refusals at the edge after the last unit; keyed replays and restocks still work.
//! - `observe`: `/metrics`, `X-Request-Id` on answers and log lines, `/openapi.json` and `/docs/`.
//! - `shutdown`: SIGTERM mid-stampede drains (answers what is inside), exits 0, loses nothing.
//! - `auth`: JWT users (HS256, RS256, ES256), bad tokens → 401, admin by token or role claim,
//!   another user's token → 404, refusing trusted-header mode on a public address.
//! - `live`: the WebSocket notifications: snapshot, sold-out/restock/close pushes, coalescing,
//!   Origin, size and heartbeat limits.
//! - `negative_control`: the stampede check catches a check-then-decrement oversell.
//! - `cluster`: several nodes on one PostgreSQL database and one Redis: exactness, per-user
//!   limits, idempotency, holds and cancels across nodes; kill -9 of a node and loss of Redis
//!   mid-drop; cross-node WebSocket pushes; the same stampede without Redis oversells (negative
//!   control); Redis with SQLite or MySQL is refused. Needs `redis-server` and `redis-cli`, and
//!   a Redis on 127.0.0.1:6379 (`FIRSTCOME_TEST_REDIS_URL`).
//! - `bulk`: bulk issuance jobs: uploads (lines, CSV, gzip) and SQL sources grant exactly one
//!   coupon per distinct listed user; skips, stock exhaustion, malformed lines by line number;
//!   a million lines; kill -9 mid-job resumes; live claims beside a job never oversell; cancel,
//!   revoke, listing; bad submissions create no job; JSON and Slack webhooks with a retry.

#[macro_use]
mod helpers;

mod auth;
mod bad_input;
mod bulk;
mod cluster;
mod events_admin;
mod holds;
mod idempotency;
mod limits;
mod live;
mod negative_control;
mod observe;
mod outage;
mod ownership;
mod rate_limit;
mod restart;
mod shedding;
mod shutdown;
mod sold_out;
mod stampede;
