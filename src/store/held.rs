//! PostgreSQL: the persister's connection for inserts, held from one commit to the next.
//!
//! why not the pool: sqlx pings a pooled connection when it hands it out and again, always, when
//! it takes it back, and the pool of one connection cannot hand it out again before that second
//! ping is answered. Two extra round trips on every commit's critical path, each waiting for the
//! backend to be scheduled on a loaded machine. Measured side by side on the hot path
//! (BENCHMARKS.md, "The persister's inserts on a held connection"): 3–12% more reservations/s
//! in each of six pairs, and about 1.7 µs less server CPU per reservation.
//!
//! What the pings were for stays covered: a connection unused for [`IDLE_BEFORE_PING`] (so
//! possibly ended by a database restart meanwhile) is pinged first and replaced if dead, and a
//! connection whose statement failed is dropped, so the next commit opens a new one.

use std::time::{Duration, Instant};

use anyhow::Context;
use sea_orm::sea_query::Values;
use sea_orm::{DatabaseConnection, Statement};
use sea_query_sqlx::SqlxValues;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, Executor};
use tokio::sync::Mutex;

/// How long the connection may sit unused before a commit pings it first. Under load commits
/// follow one another with no gap, so none is pinged; at a trickle each one is.
const IDLE_BEFORE_PING: Duration = Duration::from_millis(1);

pub struct HeldConnection {
    options: PgConnectOptions,
    held: Mutex<Option<Held>>,
}

struct Held {
    connection: PgConnection,
    last_used: Instant,
}

impl HeldConnection {
    /// Connects like `db`'s pool, on first use.
    pub fn like(db: &DatabaseConnection) -> Self {
        Self {
            options: (*db.get_postgres_connection_pool().connect_options()).clone(),
            held: Mutex::new(None),
        }
    }

    /// Runs `statement`, which commits by itself: a batch of plain inserts is one statement.
    pub async fn run(&self, statement: &Statement) -> anyhow::Result<()> {
        let mut slot = self.held.lock().await;
        let held = match slot.take() {
            Some(held) if held.last_used.elapsed() < IDLE_BEFORE_PING => Some(held),
            Some(mut held) => held.connection.ping().await.ok().map(|()| held),
            None => None,
        };
        let mut held = match held {
            Some(held) => held,
            None => Held {
                connection: PgConnection::connect_with(&self.options)
                    .await
                    .context("connecting the persister to PostgreSQL")?,
                last_used: Instant::now(),
            },
        };
        // On an error the connection is dropped here: its state is unknown.
        held.connection
            .execute(query(statement))
            .await
            .context("inserting reservations")?;
        held.last_used = Instant::now();
        *slot = Some(held);
        Ok(())
    }
}

fn query(statement: &Statement) -> sqlx::query::Query<'_, sqlx::Postgres, SqlxValues> {
    let values = statement.values.clone().unwrap_or(Values(Vec::new()));
    sqlx::query_with(sqlx::AssertSqlSafe(statement.sql.as_str()), SqlxValues(values))
}
