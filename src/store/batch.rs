//! The persister's group commit: every write gathered since the last commit, applied atomically.
//!
//! New reservations, the hot path, go in as few statements as possible. On SQLite the rows travel
//! as one JSON parameter that SQLite unpacks itself (`jsonb_each`): the SQL text never changes, so
//! it is prepared once and cached, there is no bind limit to cut at, and building it costs one
//! `serde_json` call instead of nine bound values per row. PostgreSQL takes one array per column
//! in its binary format (`UNNEST`): eight parameters whatever the row count, so a batch is one
//! statement. MySQL gets multi-row `INSERT`s cut at its bind limit ([`Backend::bind_limit`]).
//!
//! A batch that is one statement runs as that statement alone, which the database commits
//! atomically; anything larger or mixed runs in one explicit transaction.

use std::collections::HashMap;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use entity::{events, reservations};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, IntoActiveModel, QueryFilter, QueryTrait,
    Statement, TransactionTrait, Value,
};

use super::convert::{event_to_row, reservation_to_row};
use super::{Backend, HeldConnection};
use crate::domain::{Event, Reservation, ReservationId, ReservationStatus};

/// One change an event actor has decided on and waits to see committed.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// A new reservation.
    Insert(Reservation),
    /// Several nodes (PostgreSQL): a new reservation whose units the Redis ledger allocated
    /// under `generation`; it lands only while that generation is current.
    InsertFenced {
        reservation: Reservation,
        generation: i64,
    },
    /// A reservation moves to `status` (confirm, cancel, expiry).
    SetStatus {
        id: ReservationId,
        status: ReservationStatus,
    },
    /// An admin changed the event.
    UpdateEvent(Event),
}

/// Columns in a `reservations` row: what one inserted row costs in bind parameters.
const RESERVATION_COLUMNS: usize = 9;

/// Rows arrive as a JSON array of arrays, in [`json_row`]'s order. `unhex` turns the id back into
/// the 16-byte blob sqlx stores for a `Uuid`; timestamps are the RFC 3339 text it stores.
///
/// why `jsonb_each`: it hands each row to the `->>` operators in SQLite's binary JSON, which they
/// read directly; `json_each` renders every row back to JSON text that each of the nine `->>`
/// then parses again.
const SQLITE_INSERT_JSON: &str = "INSERT INTO reservations \
    (id, event_id, user_id, quantity, status, idempotency_key, expires_at, created_at, updated_at) \
    SELECT unhex(value ->> 0), value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, \
    value ->> 6, value ->> 7, value ->> 7 FROM jsonb_each(?)";

/// The columns of a `reservations` row, in the order of a row's values: SQLite's JSON rows and
/// PostgreSQL's arrays alike.
pub(super) const RESERVATION_COLUMN_NAMES: &str =
    "id, event_id, user_id, quantity, status, idempotency_key, expires_at, created_at, updated_at";

/// PostgreSQL: the rows of one statement as one array per column ([`postgres_arrays`], bound as
/// parameters `$first` to `$first + 7`), zipped back into rows by `UNNEST`, as the values of
/// [`RESERVATION_COLUMN_NAMES`].
///
/// why arrays: sqlx sends them in PostgreSQL's binary format, so the server reads each id,
/// number and timestamp as it is stored, where JSON rows had it parse the text, then every value
/// again from text (`uuid_in`, `timestamptz_in`): about a quarter of its work per row. The text
/// is still the same whatever the row count, so each connection prepares it once.
///
/// The arrays hold no NULLs (sea-query binds `Vec<T>`, not `Vec<Option<T>>`): a reservation
/// without an idempotency key carries `''` and one without an expiry `'epoch'`, which no real
/// key (1–255 visible characters) or hold (created now, expiring later) can be.
pub(super) fn postgres_unnest(first: usize) -> String {
    let p = |offset: usize| first + offset;
    format!(
        "SELECT id, event_id, user_id, quantity, status, NULLIF(idempotency_key, ''), \
         NULLIF(expires_at, 'epoch'), created_at, created_at \
         FROM UNNEST(${}::uuid[], ${}::int8[], ${}::text[], ${}::int4[], ${}::text[], ${}::text[], \
         ${}::timestamptz[], ${}::timestamptz[]) \
         AS r(id, event_id, user_id, quantity, status, idempotency_key, expires_at, created_at)",
        p(0),
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6),
        p(7)
    )
}

/// `rows` as the eight arrays [`postgres_unnest`] unpacks.
pub(super) fn postgres_arrays(rows: &[&Reservation]) -> anyhow::Result<[Value; 8]> {
    let n = rows.len();
    let mut ids = Vec::with_capacity(n);
    let mut events = Vec::with_capacity(n);
    let mut users = Vec::with_capacity(n);
    let mut quantities = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut expiries = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    for r in rows {
        ids.push(r.id.get());
        events.push(r.event_id.get());
        users.push(r.user_id.as_str().to_owned());
        quantities.push(i32::try_from(r.quantity).with_context(|| format!("quantity {}", r.quantity))?);
        statuses.push(r.status.as_str().to_owned());
        keys.push(
            r.idempotency_key
                .as_ref()
                .map_or_else(String::new, |k| k.as_str().to_owned()),
        );
        expiries.push(r.expires_at.unwrap_or(DateTime::UNIX_EPOCH));
        created.push(r.created_at);
    }
    Ok([
        ids.into(),
        events.into(),
        users.into(),
        quantities.into(),
        statuses.into(),
        keys.into(),
        expiries.into(),
        created.into(),
    ])
}

/// Applies `ops` atomically, in order: inserts, then status changes, then event updates.
/// why that order is safe: an actor never changes a reservation before its insert committed, and
/// never submits two changes to one reservation at once.
///
/// A batch of plain inserts (the hot path) goes through `held` when there is one (PostgreSQL);
/// anything else through `db`. Both are the persister's, which runs one batch at a time, so the
/// two connections never commit out of order.
pub async fn apply_batch(
    db: &DatabaseConnection,
    held: Option<&HeldConnection>,
    backend: Backend,
    ops: &[WriteOp],
) -> anyhow::Result<()> {
    let now: DateTime<Utc> = crate::domain::now();
    let mut inserts = Vec::new();
    let mut fenced: HashMap<(i64, i64), Vec<&Reservation>> = HashMap::new();
    let mut status_changes: HashMap<ReservationStatus, Vec<uuid::Uuid>> = HashMap::new();
    let mut event_updates = Vec::new();
    for op in ops {
        match op {
            WriteOp::Insert(r) => inserts.push(r),
            WriteOp::InsertFenced {
                reservation,
                generation,
            } => fenced
                .entry((reservation.event_id.get(), *generation))
                .or_default()
                .push(reservation),
            WriteOp::SetStatus { id, status } => status_changes.entry(*status).or_default().push(id.get()),
            WriteOp::UpdateEvent(e) => event_updates.push(event_to_row(e).into_active_model()),
        }
    }
    let insert_statements = insert_statements(backend, &inserts)?;
    let mut fenced_statements: Vec<(Statement, usize)> = Vec::new();
    for (&(event, generation), rows) in &fenced {
        fenced_statements.push(super::fenced::fenced_insert_statement(
            crate::domain::EventId::from_db(event),
            generation,
            rows,
        )?);
    }

    if let Some(held) = held
        && status_changes.is_empty()
        && event_updates.is_empty()
        && fenced_statements.is_empty()
        && let [statement] = insert_statements.as_slice()
    {
        return held
            .run(statement)
            .await
            .with_context(|| format!("inserting {} reservations", inserts.len()));
    }
    // why: a batch that is a single statement (the hot path: only new reservations) is sent
    // alone; the database commits it atomically on its own. That saves the BEGIN and COMMIT
    // round trips, and SQLite then keeps no statement journal.
    if status_changes.is_empty()
        && event_updates.is_empty()
        && insert_statements.len() + fenced_statements.len() <= 1
    {
        for statement in insert_statements {
            execute_insert(db, statement, inserts.len()).await?;
        }
        for (statement, rows) in fenced_statements {
            execute_fenced(db, statement, rows).await?;
        }
        return Ok(());
    }

    let txn = db.begin().await.context("beginning a batch transaction")?;
    for statement in insert_statements {
        execute_insert(&txn, statement, inserts.len()).await?;
    }
    for (statement, rows) in fenced_statements {
        execute_fenced(&txn, statement, rows).await?;
    }
    for (status, ids) in status_changes {
        // Two parameters go to the SET clause.
        for chunk in ids.chunks(backend.bind_limit() - 2) {
            reservations::Entity::update_many()
                .col_expr(reservations::Column::Status, Expr::value(status.as_str()))
                .col_expr(reservations::Column::UpdatedAt, Expr::value(now))
                .filter(reservations::Column::Id.is_in(chunk.iter().copied()))
                .exec(&txn)
                .await
                .with_context(|| format!("marking {} reservations {}", chunk.len(), status.as_str()))?;
        }
    }
    for row in event_updates {
        events::Entity::update(row)
            .exec(&txn)
            .await
            .context("updating an event")?;
    }
    txn.commit().await.context("committing a batch")
}

async fn execute_insert(db: &impl ConnectionTrait, statement: Statement, rows: usize) -> anyhow::Result<()> {
    db.execute_raw(statement)
        .await
        .with_context(|| format!("inserting {rows} reservations"))?;
    Ok(())
}

/// A fenced insert lands whole or not at all: fewer rows means the ledger was rebuilt since its
/// units were allocated, and the batch must fail.
async fn execute_fenced(db: &impl ConnectionTrait, statement: Statement, rows: usize) -> anyhow::Result<()> {
    let inserted = db
        .execute_raw(statement)
        .await
        .with_context(|| format!("inserting {rows} reservations"))?
        .rows_affected();
    anyhow::ensure!(
        inserted == rows as u64,
        "the ledger was rebuilt after these {rows} units were allocated; none of them is reserved"
    );
    Ok(())
}

/// The statements that insert `rows`: usually one.
fn insert_statements(backend: Backend, rows: &[&Reservation]) -> anyhow::Result<Vec<Statement>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let db_backend = backend.sea_orm();
    Ok(match backend {
        // One parameter whatever the row count: no bind limit to cut at.
        Backend::Sqlite => vec![Statement::from_sql_and_values(
            db_backend,
            SQLITE_INSERT_JSON,
            [json_array(rows)?.into()],
        )],
        Backend::Postgres => {
            let sql = format!(
                "INSERT INTO reservations ({RESERVATION_COLUMN_NAMES}) {}",
                postgres_unnest(1)
            );
            // Eight parameters whatever the row count: no bind limit to cut at.
            vec![Statement::from_sql_and_values(
                db_backend,
                sql,
                postgres_arrays(rows)?,
            )]
        }
        Backend::MySql => rows
            .chunks(backend.bind_limit() / RESERVATION_COLUMNS)
            .map(|chunk| {
                reservations::Entity::insert_many(
                    chunk.iter().map(|r| reservation_to_row(r).into_active_model()),
                )
                .build(db_backend)
            })
            .collect(),
    })
}

/// `rows` as one JSON array of [`json_row`]s, in order.
fn json_array(rows: &[&Reservation]) -> anyhow::Result<String> {
    let mut json = vec![b'['];
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            json.push(b',');
        }
        serde_json::to_writer(&mut json, &json_row(row)).context("encoding a reservation")?;
    }
    json.push(b']');
    String::from_utf8(json).context("serde_json wrote invalid UTF-8")
}

/// One reservation as a JSON array, serialized straight from the reservation: id (32 hex
/// digits), event, user, quantity, status, idempotency key, expiry, creation time (also its
/// first `updated_at`).
#[derive(serde::Serialize)]
struct JsonRow<'a>(
    uuid::fmt::Simple,
    i64,
    &'a str,
    u32,
    &'static str,
    Option<&'a str>,
    Option<String>,
    String,
);

fn json_row(r: &Reservation) -> JsonRow<'_> {
    JsonRow(
        r.id.get().simple(),
        r.event_id.get(),
        r.user_id.as_str(),
        r.quantity,
        r.status.as_str(),
        r.idempotency_key.as_ref().map(|k| k.as_str()),
        r.expires_at.map(timestamp),
        timestamp(r.created_at),
    )
}

/// A timestamp exactly as sqlx writes a `DateTime<Utc>` to SQLite.
fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{EventId, UserId};

    #[test]
    fn a_json_row_has_the_columns_sqlite_unpacks_in_order() -> anyhow::Result<()> {
        let created = DateTime::parse_from_rfc3339("2026-12-01T08:00:00.123456Z")?.with_timezone(&Utc);
        let id = uuid::Uuid::parse_str("01a230bc-0f0a-7306-8732-23ddd8e4928b")?;
        let reservation = Reservation {
            id: ReservationId::from_db(id),
            event_id: EventId::from_db(7),
            user_id: UserId::parse("ana").map_err(|e| anyhow::anyhow!("{e}"))?,
            quantity: 2,
            status: ReservationStatus::Held,
            expires_at: None,
            created_at: created,
            idempotency_key: None,
        };
        let json = serde_json::to_string(&json_row(&reservation))?;
        assert_eq!(
            json,
            r#"["01a230bc0f0a7306873223ddd8e4928b",7,"ana",2,"held",null,null,"2026-12-01T08:00:00.123456+00:00"]"#
        );
        Ok(())
    }

    fn reservation(user: &str, key: Option<&str>) -> anyhow::Result<Reservation> {
        Ok(Reservation {
            id: ReservationId::default(),
            event_id: EventId::from_db(1),
            user_id: UserId::parse(user).map_err(|e| anyhow::anyhow!("{e}"))?,
            quantity: 1,
            status: ReservationStatus::Issued,
            expires_at: None,
            created_at: Utc::now(),
            idempotency_key: key
                .map(crate::domain::IdempotencyKey::parse)
                .transpose()
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        })
    }

    #[test]
    fn a_json_array_holds_every_row_once_in_order() -> anyhow::Result<()> {
        let rows: Vec<Reservation> = (0..300)
            .map(|i| reservation(&format!("user-{i}"), (i % 7 == 0).then_some("key-1")))
            .collect::<anyhow::Result<_>>()?;
        let rows: Vec<&Reservation> = rows.iter().collect();
        let parsed: Vec<serde_json::Value> = serde_json::from_str(&json_array(&rows)?)?;
        let ids: Vec<&str> = parsed
            .iter()
            .map(|row| row[0].as_str().unwrap_or_default())
            .collect();
        let expected: Vec<String> = rows.iter().map(|r| r.id.get().simple().to_string()).collect();
        assert_eq!(ids, expected);
        Ok(())
    }

    #[test]
    fn postgres_arrays_carry_one_value_per_row_and_sentinels_for_absent_ones() -> anyhow::Result<()> {
        let mut held = reservation("ana", Some("key-1"))?;
        let expiry = held.created_at + chrono::Duration::minutes(10);
        held.expires_at = Some(expiry);
        let issued = reservation("ben", None)?;
        let arrays = postgres_arrays(&[&held, &issued])?;
        let strings = |v: &Value| -> anyhow::Result<Vec<String>> {
            v.clone()
                .unwrap::<Option<Vec<String>>>()
                .ok_or_else(|| anyhow::anyhow!("a NULL array"))
        };
        assert_eq!(strings(&arrays[2])?, ["ana", "ben"]);
        assert_eq!(strings(&arrays[5])?, ["key-1", ""]);
        let expiries = arrays[6].clone().unwrap::<Option<Vec<DateTime<Utc>>>>();
        assert_eq!(expiries, Some(vec![expiry, DateTime::UNIX_EPOCH]));
        let sql = postgres_unnest(3);
        assert!(
            sql.contains("$3::uuid[]") && sql.contains("$10::timestamptz[]"),
            "{sql}"
        );
        Ok(())
    }

    #[test]
    fn a_batch_is_one_statement_except_where_mysql_reaches_its_bind_limit() -> anyhow::Result<()> {
        let (user, key) = ("u".repeat(128), "k".repeat(255));
        let rows: Vec<Reservation> = (0..10_000)
            .map(|_| reservation(&user, Some(&key)))
            .collect::<anyhow::Result<_>>()?;
        let rows: Vec<&Reservation> = rows.iter().collect();
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let statements = insert_statements(backend, &rows)?;
            assert_eq!(statements.len(), 1, "{backend:?}");
        }
        let per_statement = Backend::MySql.bind_limit() / RESERVATION_COLUMNS;
        let params: Vec<usize> = insert_statements(Backend::MySql, &rows)?
            .iter()
            .map(|s| s.values.as_ref().map_or(0, |v| v.0.len()))
            .collect();
        assert_eq!(
            params,
            [
                per_statement * RESERVATION_COLUMNS,
                (10_000 - per_statement) * RESERVATION_COLUMNS
            ]
        );
        assert!(params.iter().all(|&n| n <= Backend::MySql.bind_limit()));
        Ok(())
    }
}
