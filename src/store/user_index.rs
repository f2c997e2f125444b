//! Which reservations each user holds, kept in memory on SQLite: what serves
//! `GET /v1/me/reservations` there instead of an index on `reservations(user_id)`.
//!
//! why: every other write of a reservation lands at the end of a B-tree (UUIDv7 ids, one event's
//! rows in time order), but a `user_id` index puts each new row on a random leaf page, and SQLite
//! writes every page a commit dirtied to the WAL again at every commit: about one 4 KiB frame
//! per reservation, whatever the batch size. Measured side by side on the hot path (256
//! connections, one hot event): 45k reservations/s and p99 15 ms with the index, 54–58k/s and
//! p99 8–10 ms without it (BENCHMARKS.md). PostgreSQL and MySQL keep the index: their pages are
//! written back by a checkpoint, not at every commit, and several nodes share them.
//!
//! The database stays the record. The map is rebuilt from it at start (one scan of `id, user_id`)
//! and the persister adds each committed insert before any client hears of it, so a user who got
//! a 201 finds the reservation here. Measured on 2 million reservations (`bench/user_index.sh`):
//! about 90 bytes of RSS each (180 MiB), and 1.3 s to load at start.
//!
//! Entries are keyed by a 64-bit hash of the user id with a per-process random seed; the query
//! that reads the rows also matches `user_id`, so a hash collision can never show one user
//! another's reservation (at worst, a colliding user's ids take some of the 100 places).

use std::borrow::Cow;
use std::hash::BuildHasher;
use std::sync::RwLock;

use anyhow::Context;
use sea_orm::DatabaseConnection;
use smallvec::SmallVec;
use uuid::Uuid;

use super::WriteOp;
use crate::domain::UserId;
use crate::sharded::ShardedMap;

/// Most users hold one reservation per drop, and most of them one in all: inline, no allocation.
type Reservations = SmallVec<[Uuid; 1]>;

pub struct UserIndex {
    seed: foldhash::fast::RandomState,
    /// Written once per committed batch by the persister, read by `GET /v1/me/reservations`; the
    /// claim path (handler → event actor) never touches it.
    /// Sharded: the persister grows it inside a commit, and a whole map doubling at once held
    /// that commit up (see [`ShardedMap`]).
    by_user: RwLock<ShardedMap<u64, Reservations>>,
}

impl UserIndex {
    /// Reads every reservation's id and user from the SQLite database behind `db`, a connection
    /// of its own (its page cache is shrunk for the scan).
    ///
    /// why: pages of 100,000 rows, each one JSON string that SQLite builds itself. Streamed row
    /// by row through sea-orm, 2 million reservations took 5.9 s to load; as pages, about 1 s.
    pub async fn load(db: &DatabaseConnection) -> anyhow::Result<Self> {
        const PAGE_ROWS: i64 = 100_000;
        const PAGE: &str = "SELECT max(r), json_group_array(json_array(hex(id), user_id)) \
            FROM (SELECT rowid AS r, id, user_id FROM reservations WHERE rowid > ?1 ORDER BY rowid LIMIT ?2)";
        /// One row of a page: the id as 32 hex digits, and the user id (escaped only if it holds a
        /// quote or a backslash).
        #[derive(serde::Deserialize)]
        struct Row<'a>(&'a str, #[serde(borrow)] Cow<'a, str>);

        let started = std::time::Instant::now();
        let pool = db.get_sqlite_connection_pool();
        // The scan reads each page once: a 64 MiB page cache would only stay behind in RSS.
        sqlx::query("PRAGMA cache_size = -2048")
            .execute(pool)
            .await
            .context("shrinking the user index loader's page cache")?;
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations")
            .fetch_one(pool)
            .await
            .context("counting reservations for the user index")?;
        let seed = foldhash::fast::RandomState::default();
        let mut by_user: ShardedMap<u64, Reservations> =
            ShardedMap::with_capacity(usize::try_from(count).unwrap_or(0));
        let (mut after, mut loaded) = (0i64, 0u64);
        loop {
            let (last, page): (Option<i64>, String) = sqlx::query_as(PAGE)
                .bind(after)
                .bind(PAGE_ROWS)
                .fetch_one(pool)
                .await
                .context("reading reservations for the user index")?;
            let Some(last) = last else { break };
            let rows: Vec<Row<'_>> = serde_json::from_str(&page).context("reading a page of reservations")?;
            for Row(id, user) in rows {
                let id = Uuid::try_parse(id).with_context(|| format!("reading reservation id {id:?}"))?;
                by_user.entry(seed.hash_one(&*user)).or_default().push(id);
                loaded += 1;
            }
            after = last;
        }
        tracing::info!(
            reservations = loaded,
            users = by_user.len(),
            millis = started.elapsed().as_millis() as u64,
            "user index loaded"
        );
        Ok(Self {
            seed,
            by_user: RwLock::new(by_user),
        })
    }

    /// Adds the reservations `ops` inserted; called once their commit succeeded.
    pub fn record(&self, ops: &[WriteOp]) {
        let mut inserted = ops
            .iter()
            .filter_map(|op| match op {
                WriteOp::Insert(r) => Some(r),
                WriteOp::InsertFenced { reservation, .. } => Some(reservation),
                WriteOp::SetStatus { .. } | WriteOp::UpdateEvent(_) => None,
            })
            .peekable();
        if inserted.peek().is_none() {
            return;
        }
        let mut by_user = self.write();
        for r in inserted {
            by_user
                .entry(self.seed.hash_one(r.user_id.as_str()))
                .or_default()
                .push(r.id.get());
        }
    }

    /// Ids of `user`'s reservations, newest first, at most `limit` (fewer only if another user's
    /// id hashes to the same 64 bits; the caller's query drops those).
    pub fn newest(&self, user: &UserId, limit: usize) -> Vec<Uuid> {
        let by_user = match self.by_user.read() {
            Ok(guard) => guard,
            // A writer panicked mid-insert: the map still holds whole entries.
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut ids: Vec<Uuid> = by_user
            .get(&self.seed.hash_one(user.as_str()))
            .map(|ids| ids.to_vec())
            .unwrap_or_default();
        // UUIDv7 ids sort by creation time.
        ids.sort_unstable_by(|a, b| b.cmp(a));
        ids.truncate(limit);
        ids
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, ShardedMap<u64, Reservations>> {
        match self.by_user.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}
