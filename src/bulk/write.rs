//! One chunk's transaction: the grants, the event's grant count and the job's progress commit
//! together, so a restarted job resumes exactly after the last chunk that landed.
//!
//! Grants go in with the fastest statement each backend has, one per chunk, skipping users who
//! already have a grant row for the event (`rows_affected` is what was new):
//! - PostgreSQL: `INSERT … SELECT FROM UNNEST($4::text[])`, skipping ids a primary-key probe
//!   finds, each statement's ids as one array parameter.
//! - SQLite: `INSERT … SELECT FROM json_each(?) ON CONFLICT DO NOTHING`, the chunk as one JSON
//!   array (as the persister does for reservations): one parameter, so no bind limit to cut at,
//!   and one statement text, prepared once.
//! - MySQL: a multi-row `INSERT IGNORE`, one bind parameter per row.
//!
//! Over TCP (PostgreSQL, MySQL) a chunk goes as several statements of at most
//! [`STATEMENT_BYTES`] of user ids each (see there why).
//!   `IGNORE` only has duplicate keys to ignore: user ids are validated (≤ 128 visible ASCII
//!   characters) before they get here.
//!
//! These go through sqlx directly (sea-orm hands out its pools): sea-orm has no array parameter
//! for UNNEST without its `postgres-array` feature, and a chunk is three plain statements.

use anyhow::Context;
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, Statement, TransactionTrait};

use super::Totals;
use crate::domain::{EventId, UserId};
use crate::store::Backend;

/// What a chunk commits about its job.
pub(super) struct Progress<'a> {
    pub cursor: &'a str,
    pub totals: &'a Totals,
    pub bytes_read: u64,
    /// JSON array of the kept malformed lines.
    pub invalid_lines: &'a str,
    pub stock_exhausted: bool,
}

/// An open chunk transaction.
pub(super) enum GrantTxn {
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    MySql(sqlx::Transaction<'static, sqlx::MySql>),
}

const SQLITE_INSERT: &str = "INSERT INTO bulk_grants (event_id, user_id, job_id, status, created_at) \
    SELECT ?, value, ?, 'issued', ? FROM json_each(?) WHERE true ON CONFLICT DO NOTHING";
/// why a probe rather than `ON CONFLICT DO NOTHING`: measured on 1M sorted ids, PostgreSQL's
/// speculative insertion took 4.0 s, one index probe per id then a plain insert 2.0 s. It is
/// safe because nobody else inserts grants meanwhile: one job runs at a time per database (the
/// runner lock), and one statement never holds a user twice (a prepared upload has no
/// duplicates; the runner drops repeats within a chunk, and a repeat in a later statement finds
/// the earlier one inserted). Should that ever not hold, the primary key turns the duplicate into
/// an error and the chunk rolls back.
///
/// why `LATERAL … LIMIT 1` rather than `NOT EXISTS`: planned for an array of known length, `NOT
/// EXISTS` became a hash anti-join over a sequential scan of the whole grants table once it was
/// large, and single statements took seconds. A lateral subquery can only be a nested loop: one
/// primary-key probe per id, whatever the table's size.
const POSTGRES_INSERT: &str = "INSERT INTO bulk_grants (event_id, user_id, job_id, status, created_at) \
    SELECT $1, t.u, $2, 'issued', $3 FROM UNNEST($4::text[]) AS t(u) \
    LEFT JOIN LATERAL (SELECT 1 AS held FROM bulk_grants g WHERE g.event_id = $1 AND g.user_id = t.u LIMIT 1) h \
    ON true WHERE h.held IS NULL";
const COUNT_SQL: &str = "UPDATE events SET bulk_issued = bulk_issued + ? WHERE id = ?";
const POSTGRES_COUNT_SQL: &str = "UPDATE events SET bulk_issued = bulk_issued + $1 WHERE id = $2";
const PROGRESS_SQL: &str = "UPDATE bulk_jobs SET resume_at = ?, read_count = ?, issued = ?, skipped = ?, \
    invalid = ?, unissued = ?, bytes_read = ?, invalid_lines = ?, stock_exhausted = ?, updated_at = ? WHERE id = ?";
const POSTGRES_PROGRESS_SQL: &str = "UPDATE bulk_jobs SET resume_at = $1, read_count = $2, issued = $3, \
    skipped = $4, invalid = $5, unissued = $6, bytes_read = $7, invalid_lines = $8, stock_exhausted = $9, \
    updated_at = $10 WHERE id = $11";

/// `?` placeholders → PostgreSQL's `$1, $2, …` (the statements above hold no other `?`).
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// A grant row's bind-parameter bytes besides the user id (its length prefix and format code).
const GRANT_FIXED_BYTES: usize = 8;

/// Most bytes of user ids (with their per-value overhead) in one grant statement.
///
/// Measured on 25,000-row chunks: one statement 80–150 ms, 48 KiB statements about 70 ms each,
/// 12 KiB statements about 73 ms for the whole chunk, where the database itself needs about 50.
/// (Measured at 12 KiB with sqlx 0.9.0, whose sockets left Nagle's algorithm on; 14 KiB since.)
/// Re-measured on sqlx 0.9.1 (`TCP_NODELAY`), 1M users on PostgreSQL with live load, three runs
/// each: one statement per chunk took 4.9–5.9 s against 5.1–6.1 s, and the live p99 during the
/// job was 8.8–20.8 ms against 7.2–8.6 ms. No gain, so the cut stays.
const STATEMENT_BYTES: usize = 14 * 1024;

/// `users` cut into runs of at most [`STATEMENT_BYTES`] (at least one id each), in order.
fn by_payload(users: &[UserId]) -> impl Iterator<Item = &[UserId]> {
    let bytes = |u: &UserId| u.as_str().len() + GRANT_FIXED_BYTES;
    let mut rest = users;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (mut n, mut total) = (0, 0);
        while n < rest.len() && (n == 0 || total + bytes(&rest[n]) <= STATEMENT_BYTES) {
            total += bytes(&rest[n]);
            n += 1;
        }
        let (run, tail) = rest.split_at(n);
        rest = tail;
        Some(run)
    })
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

macro_rules! bind_progress {
    ($query:expr, $p:expr, $job:expr, $now:expr) => {
        $query
            .bind($p.cursor)
            .bind(signed($p.totals.read))
            .bind(signed($p.totals.issued))
            .bind(signed($p.totals.skipped))
            .bind(signed($p.totals.invalid))
            .bind(signed($p.totals.unissued))
            .bind(signed($p.bytes_read))
            .bind($p.invalid_lines)
            .bind($p.stock_exhausted)
            .bind($now)
            .bind($job)
    };
}

impl GrantTxn {
    pub async fn begin(db: &DatabaseConnection, backend: Backend) -> anyhow::Result<GrantTxn> {
        Ok(match backend {
            Backend::Sqlite => GrantTxn::Sqlite(db.get_sqlite_connection_pool().begin().await?),
            Backend::Postgres => GrantTxn::Postgres(db.get_postgres_connection_pool().begin().await?),
            Backend::MySql => GrantTxn::MySql(db.get_mysql_connection_pool().begin().await?),
        })
    }

    /// Inserts a grant for each of `users` who has none; returns how many were new.
    pub async fn insert(&mut self, event: EventId, job: i64, users: &[UserId]) -> anyhow::Result<u64> {
        if users.is_empty() {
            return Ok(0);
        }
        let now: DateTime<Utc> = crate::domain::now();
        let inserted = match self {
            GrantTxn::Sqlite(txn) => {
                let list: Vec<&str> = users.iter().map(UserId::as_str).collect();
                let json = serde_json::to_string(&list).context("encoding a chunk")?;
                sqlx::query(SQLITE_INSERT)
                    .bind(event.get())
                    .bind(job)
                    .bind(now)
                    .bind(json)
                    .execute(&mut **txn)
                    .await?
                    .rows_affected()
            }
            GrantTxn::Postgres(txn) => {
                let mut inserted = 0;
                for run in by_payload(users) {
                    let list: Vec<&str> = run.iter().map(UserId::as_str).collect();
                    inserted += sqlx::query(POSTGRES_INSERT)
                        .bind(event.get())
                        .bind(job)
                        .bind(now)
                        .bind(list)
                        .execute(&mut **txn)
                        .await?
                        .rows_affected();
                }
                inserted
            }
            GrantTxn::MySql(txn) => {
                let mut inserted = 0;
                // One parameter per row; the constant columns are written into the text. Runs of
                // at most STATEMENT_BYTES are far below the bind limit.
                for part in by_payload(users) {
                    let row = format!("({}, ?, {job}, 'issued', UTC_TIMESTAMP(6))", event.get());
                    let mut sql = String::with_capacity(40 * part.len() + 100);
                    sql.push_str(
                        "INSERT IGNORE INTO bulk_grants (event_id, user_id, job_id, status, created_at) VALUES ",
                    );
                    for i in 0..part.len() {
                        if i > 0 {
                            sql.push(',');
                        }
                        sql.push_str(&row);
                    }
                    // Safe: the only values in the text are our own integers.
                    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                    for user in part {
                        query = query.bind(user.as_str());
                    }
                    inserted += query.execute(&mut **txn).await?.rows_affected();
                }
                inserted
            }
        };
        Ok(inserted)
    }

    /// Adds the chunk's grants to the event's count, records the job's progress, and commits.
    pub async fn commit(
        self,
        event: EventId,
        job: i64,
        inserted: u64,
        progress: &Progress<'_>,
    ) -> anyhow::Result<()> {
        let now: DateTime<Utc> = crate::domain::now();
        // The same three steps on each backend; only the transaction's type and the
        // placeholder style differ.
        macro_rules! finish {
            ($txn:expr, $count:expr, $progress:expr) => {{
                let mut txn = $txn;
                sqlx::query($count)
                    .bind(signed(inserted))
                    .bind(event.get())
                    .execute(&mut *txn)
                    .await?;
                bind_progress!(sqlx::query($progress), progress, job, now)
                    .execute(&mut *txn)
                    .await?;
                txn.commit().await?;
            }};
        }
        match self {
            GrantTxn::Sqlite(txn) => finish!(txn, COUNT_SQL, PROGRESS_SQL),
            GrantTxn::Postgres(txn) => finish!(txn, POSTGRES_COUNT_SQL, POSTGRES_PROGRESS_SQL),
            GrantTxn::MySql(txn) => finish!(txn, COUNT_SQL, PROGRESS_SQL),
        }
        Ok(())
    }
}

/// Marks every active grant a job issued `revoked` and takes them off the event's count, in
/// one transaction; returns how many were revoked.
pub(super) async fn revoke(db: &DatabaseConnection, event: EventId, job: i64) -> anyhow::Result<u64> {
    let backend = db.get_database_backend();
    let sql = |s: &str| match backend {
        DatabaseBackend::Postgres => numbered(s),
        _ => s.to_owned(),
    };
    let txn = db.begin().await.context("starting a revocation")?;
    let revoked = txn
        .execute_raw(Statement::from_sql_and_values(
            backend,
            sql("UPDATE bulk_grants SET status = 'revoked' WHERE event_id = ? AND job_id = ? AND status = 'issued'"),
            [event.get().into(), job.into()],
        ))
        .await
        .context("revoking grants")?
        .rows_affected();
    txn.execute_raw(Statement::from_sql_and_values(
        backend,
        sql("UPDATE events SET bulk_issued = bulk_issued - ? WHERE id = ?"),
        [signed(revoked).into(), event.get().into()],
    ))
    .await
    .context("updating the event's grant count")?;
    txn.commit().await.context("committing a revocation")?;
    Ok(revoked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_cut_into_statements_of_bounded_payload_covering_every_user() -> anyhow::Result<()> {
        let users: Vec<UserId> = (0..10_000)
            .map(|i| UserId::parse(&format!("user-{i:08}")))
            .collect::<Result<_, _>>()?;

        let runs: Vec<&[UserId]> = by_payload(&users).collect();

        assert!(runs.len() > 1, "10,000 ids of 13 bytes do not fit one statement");
        assert!(runs.iter().all(|r| {
            r.iter()
                .map(|u| u.as_str().len() + GRANT_FIXED_BYTES)
                .sum::<usize>()
                <= STATEMENT_BYTES
        }));
        assert_eq!(runs.concat(), users, "every user once, in order");
        Ok(())
    }
}
