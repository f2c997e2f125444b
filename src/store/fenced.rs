//! PostgreSQL statements of the several-node mode (see `crate::cluster`).
//!
//! With several nodes the Redis ledger decides, and these statements keep the record exact
//! whatever a node or Redis does:
//! - a node's insert lands only if the ledger generation it allocated under is still the
//!   event's current one ([`fenced_insert_statement`]), so an allocation made against a lost
//!   ledger can never commit after the ledger was rebuilt;
//! - status changes are conditional (`WHERE status = …`), so when nodes race on one reservation
//!   (a confirm against an expiry, two cancels) exactly one of them changes it;
//! - an allocation whose node went silent is *fenced*: a `cancelled` row with its id is inserted
//!   if none exists, so its own insert can no longer land, and whatever row now exists is the
//!   truth the ledger is brought to.

use anyhow::Context;
use chrono::{DateTime, Utc};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, Statement, TransactionTrait, Value,
};

use super::convert::reservation_from_row;
use super::queries::{EventState, load_event_state};
use crate::domain::{EventId, Reservation, ReservationId, ReservationStatus, UserId};

/// PostgreSQL's own bind limit is 65,535; statements stay small so they fit a few TCP segments.
const PARAMS_PER_STATEMENT: usize = 1024;

const RETURNING: &str = super::batch::RESERVATION_COLUMN_NAMES;

/// `$from, $from+1, …` for `count` parameters.
fn placeholders(from: usize, count: usize) -> String {
    (from..from + count)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The statement inserting `rows` of one event, allocated under ledger `generation`, with its
/// row count; it must insert all its rows (the caller checks), or the generation has moved on.
/// The rows travel as arrays, as in the persister's unfenced insert: one statement whatever the
/// row count.
pub fn fenced_insert_statement(
    event: EventId,
    generation: i64,
    rows: &[&Reservation],
) -> anyhow::Result<(Statement, usize)> {
    // why FOR SHARE: a ledger rebuild bumps the generation with an UPDATE of this row, which
    // waits for every insert holding the share lock and makes later ones see the new
    // generation; so no insert from the old generation lands after the rebuild read.
    let sql = format!(
        "WITH fence AS (SELECT 1 FROM events WHERE id = $1 AND ledger_generation = $2 FOR SHARE) \
         INSERT INTO reservations ({RETURNING}) {} WHERE EXISTS (SELECT 1 FROM fence)",
        super::batch::postgres_unnest(3)
    );
    let mut values = vec![event.get().into(), generation.into()];
    values.extend(super::batch::postgres_arrays(rows)?);
    Ok((
        Statement::from_sql_and_values(DbBackend::Postgres, sql, values),
        rows.len(),
    ))
}

/// The event's current ledger generation.
pub async fn ledger_generation(db: &DatabaseConnection, event: EventId) -> anyhow::Result<Option<i64>> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT ledger_generation FROM events WHERE id = $1",
            [event.get().into()],
        ))
        .await
        .context("reading the ledger generation")?;
    row.map(|r| r.try_get::<i64>("", "ledger_generation"))
        .transpose()
        .context("reading the ledger generation")
}

/// A rebuild in progress: the event row is locked (inserts wait) until [`Rebuild::finish`].
pub struct Rebuild {
    txn: DatabaseTransaction,
    pub generation: i64,
    pub state: EventState,
}

impl Rebuild {
    /// Bumps the generation and reads the state as of every insert that could still land.
    pub async fn start(db: &DatabaseConnection, event: EventId) -> anyhow::Result<Option<Rebuild>> {
        let txn = db.begin().await.context("beginning a ledger rebuild")?;
        let row = txn
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE events SET ledger_generation = ledger_generation + 1 WHERE id = $1 \
                 RETURNING ledger_generation",
                [event.get().into()],
            ))
            .await
            .context("bumping the ledger generation")?;
        let Some(row) = row else { return Ok(None) };
        let generation: i64 = row.try_get("", "ledger_generation")?;
        let Some(state) = load_event_state(&txn, event).await? else {
            return Ok(None);
        };
        Ok(Some(Rebuild {
            txn,
            generation,
            state,
        }))
    }

    /// Commits the new generation (call once the new ledger is written to Redis).
    pub async fn finish(self) -> anyhow::Result<()> {
        self.txn.commit().await.context("committing the ledger rebuild")
    }
}

/// Moves the caller's reservation `id` to `to` if its status is one of `from` (and, for a
/// confirm, its hold has not expired at `now`). `None`: nothing changed.
pub async fn transition(
    db: &DatabaseConnection,
    id: ReservationId,
    user: &UserId,
    from: &[ReservationStatus],
    to: ReservationStatus,
    unexpired_at: Option<DateTime<Utc>>,
) -> anyhow::Result<Option<Reservation>> {
    let now = crate::domain::now();
    let mut values: Vec<Value> = vec![
        to.as_str().to_owned().into(),
        now.into(),
        id.get().into(),
        user.as_str().to_owned().into(),
    ];
    let from_list = placeholders(values.len() + 1, from.len());
    values.extend(from.iter().map(|s| Value::from(s.as_str().to_owned())));
    let unexpired = match unexpired_at {
        Some(at) => {
            values.push(at.into());
            format!(" AND expires_at > ${}", values.len())
        }
        None => String::new(),
    };
    let sql = format!(
        "UPDATE reservations SET status = $1, updated_at = $2 \
         WHERE id = $3 AND user_id = $4 AND status IN ({from_list}){unexpired} RETURNING {RETURNING}"
    );
    let row = db
        .query_one_raw(Statement::from_sql_and_values(DbBackend::Postgres, sql, values))
        .await
        .with_context(|| format!("moving reservation {id} to {}", to.as_str()))?;
    row.map(|row| {
        use sea_orm::FromQueryResult;
        reservation_from_row(entity::reservations::Model::from_query_result(&row, "")?)
    })
    .transpose()
}

/// What the record says about one reservation the ledger asked about.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub id: ReservationId,
    pub status: ReservationStatus,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A silent allocation to fence: its id, event, user and units.
pub struct Tombstone {
    pub id: ReservationId,
    pub event: EventId,
    pub user: String,
    pub quantity: u32,
}

/// Settles reservations whose ledger entry may lag the record: fences `silent` allocations,
/// expires holds among `ids` that are past due, and returns what the record says of each.
pub async fn settle(
    db: &DatabaseConnection,
    silent: &[Tombstone],
    ids: &[ReservationId],
) -> anyhow::Result<Vec<Recorded>> {
    let now = crate::domain::now();
    let txn = db.begin().await.context("beginning a ledger settlement")?;
    for chunk in silent.chunks(PARAMS_PER_STATEMENT / 6) {
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 6);
        let mut tuples = Vec::with_capacity(chunk.len());
        for t in chunk {
            tuples.push(format!(
                "({}, 'cancelled', NULL, NULL, ${}, ${})",
                placeholders(values.len() + 1, 4),
                values.len() + 5,
                values.len() + 6
            ));
            values.extend([
                t.id.get().into(),
                t.event.get().into(),
                t.user.clone().into(),
                (t.quantity as i32).into(),
                now.into(),
                now.into(),
            ]);
        }
        let sql = format!(
            "INSERT INTO reservations ({RETURNING}) VALUES {} ON CONFLICT (id) DO NOTHING",
            tuples.join(", ")
        );
        txn.execute_raw(Statement::from_sql_and_values(DbBackend::Postgres, sql, values))
            .await
            .context("fencing silent allocations")?;
    }
    let mut recorded = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(PARAMS_PER_STATEMENT - 1) {
        let mut values: Vec<Value> = vec![now.into()];
        values.extend(chunk.iter().map(|id| Value::from(id.get())));
        let list = placeholders(2, chunk.len());
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "UPDATE reservations SET status = 'expired', updated_at = $1 \
                 WHERE id IN ({list}) AND status = 'held' AND expires_at <= $1"
            ),
            values.clone(),
        ))
        .await
        .context("expiring due holds")?;
        let rows = txn
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                format!(
                    "SELECT id, status, expires_at FROM reservations WHERE id IN ({})",
                    placeholders(1, chunk.len())
                ),
                values[1..].to_vec(),
            ))
            .await
            .context("reading settled reservations")?;
        for row in rows {
            let status: String = row.try_get("", "status")?;
            recorded.push(Recorded {
                id: ReservationId::from_db(row.try_get("", "id")?),
                status: ReservationStatus::parse(&status)
                    .with_context(|| format!("a reservation has status {status:?}"))?,
                expires_at: row.try_get("", "expires_at")?,
            });
        }
    }
    txn.commit().await.context("committing a ledger settlement")?;
    Ok(recorded)
}
