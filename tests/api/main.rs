//! The API test suite: one binary, one module per area. Every test starts a real `firstcome`
//! process on port 0 with its own database (see `helpers`), and most run on SQLite, PostgreSQL
//! and MySQL alike (`sqlite::…`, `postgres::…`, `mysql::…` in the test names).

// why: tests state their expectations with unwrap/expect where a failure is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod helpers;

mod bad_input;
mod events_admin;
mod holds;
mod idempotency;
mod limits;
mod negative_control;
mod ownership;
mod restart;
mod stampede;
