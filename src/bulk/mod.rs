//! # Bulk issuance: one coupon to a whole segment, as a background job
//!
//! An operator submits a list of users (an uploaded file, or a table column) for a coupon event.
//! The submission only stores the list and queues a job (`bulk_jobs`); the [`runner::BulkRunner`]
//! works through queued jobs one at a time, in chunks:
//!
//! ```text
//! source ──chunk of targets──> runner ──BulkBegin──> EventActor   (skips holders, takes units)
//!                                 │  <──BulkGrant───
//!                                 ├──one transaction: grants + events.bulk_issued + job progress
//!                                 └──BulkEnd(committed)─> EventActor   (counts them, releases the rest)
//! ```
//!
//! - **Exact with live claims.** The event actor stays the single writer of the event's stock: a
//!   chunk's units are taken in the actor (so a live claim can never be handed one), and live
//!   claims of the chunk's users wait for its outcome (so nobody gets both). Grants live in their
//!   own table (`bulk_grants`, primary key `(event_id, user_id)`): the actor keeps only their
//!   count, and looks a user's grant up (batched, off its turn) the first time that user claims
//!   live.
//! - **Resumable.** Each chunk commits its grants, the event's grant count and the job's cursor
//!   and totals in one transaction, so a restarted server resumes after the last committed chunk
//!   and nothing is issued twice (the primary key makes a replayed chunk harmless anyway).
//! - **Fast.** One statement per chunk on each backend (see [`write`]); the runner reads the next
//!   chunk while the actor and database handle the current one.

pub mod cli;
mod lock;
mod prepare;
pub mod runner;
pub mod source;
pub mod webhook;
mod write;

use std::path::PathBuf;

use anyhow::Context;
use chrono::{DateTime, Utc};
use entity::bulk_jobs;
use sea_orm::{
    ActiveModelTrait, ActiveValue, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, TryIntoModel,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::domain::EventId;

pub use lock::RunnerLock;
pub use runner::{BulkRunner, BulkSettings};
pub use source::{SourceDatabase, TableSource, UploadFormat};

/// Malformed lines kept in a job's result (all of them are counted).
pub const MAX_INVALID_KEPT: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// Where a job's targets come from, as stored in the job row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobSource {
    /// A file stored under the bulk directory at submission.
    Upload {
        path: PathBuf,
        format: UploadFormat,
        /// The CSV column holding user ids.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        column: Option<String>,
        bytes: u64,
        /// Stored by the server at submission, so removed when the job ends; `false` for a
        /// file the command line ran a job on directly.
        #[serde(default = "owned_by_server")]
        owned: bool,
        /// Once prepared (see [`prepare`]): the list the job reads, validated, sorted and
        /// without duplicates; the totals already count every line of the original.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prepared: Option<PreparedList>,
    },
    Table(TableSource),
}

impl JobSource {
    /// What the API shows: no server paths.
    fn view(&self) -> serde_json::Value {
        match self {
            JobSource::Upload {
                format,
                column,
                bytes,
                ..
            } => json!({"kind": "upload", "format": format, "column": column, "bytes": bytes}),
            JobSource::Table(table) => json!({
                "kind": "table", "table": table.table, "column": table.column, "database": table.database,
            }),
        }
    }
}

fn owned_by_server() -> bool {
    true
}

/// An upload's prepared list: one distinct valid user id per line, in byte order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedList {
    pub path: PathBuf,
    pub bytes: u64,
}

/// How far a job got; also what each chunk commits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Totals {
    /// Targets read (lines or rows; not the CSV header, not blank lines).
    pub read: u64,
    /// Grants inserted.
    pub issued: u64,
    /// Targets that already held the coupon (an earlier grant, a live reservation, or a
    /// duplicate in the same list).
    pub skipped: u64,
    /// Malformed lines.
    pub invalid: u64,
    /// Valid targets left without a unit because the stock ran out.
    pub unissued: u64,
}

/// One malformed line of a target list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InvalidLine {
    /// 1-based line number in the (decompressed) file, or row number for a table.
    pub line: u64,
    pub reason: String,
}

/// A job as stored and as the API shows it.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub event_id: EventId,
    pub state: JobState,
    pub source: JobSource,
    pub cursor: Option<String>,
    pub totals: Totals,
    pub bytes_total: Option<u64>,
    pub bytes_read: u64,
    pub invalid_lines: Vec<InvalidLine>,
    pub stock_exhausted: bool,
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl Job {
    /// Targets per second since the job started (over its whole life, restarts included).
    pub fn rate(&self, now: DateTime<Utc>) -> Option<f64> {
        let started = self.started_at?;
        let end = self.finished_at.unwrap_or(now);
        let seconds = (end - started).num_milliseconds() as f64 / 1000.0;
        (seconds > 0.0).then(|| self.totals.read as f64 / seconds)
    }

    /// Seconds left at the pace so far, from the share of the upload (or table) consumed.
    pub fn eta_seconds(&self, now: DateTime<Utc>) -> Option<u64> {
        if self.state != JobState::Running {
            return None;
        }
        let total = self.bytes_total? as f64;
        let started = self.started_at?;
        let elapsed = (now - started).num_milliseconds() as f64 / 1000.0;
        let done = self.bytes_read as f64;
        if done <= 0.0 || elapsed <= 0.0 {
            return None;
        }
        Some((((total - done).max(0.0)) * elapsed / done).round() as u64)
    }

    /// The job's JSON, for the API and the webhooks.
    pub fn view(&self) -> serde_json::Value {
        let now = crate::domain::now();
        json!({
            "id": self.id,
            "event_id": self.event_id.get(),
            "state": self.state,
            "source": self.source.view(),
            "totals": self.totals,
            "invalid_lines": self.invalid_lines,
            "stock_exhausted": self.stock_exhausted,
            // Upload bytes (compressed, if gzip) or table rows: consumed by committed chunks, and in all.
            "progress": {"done": self.bytes_read, "total": self.bytes_total},
            "cancel_requested": self.cancel_requested,
            "rate_per_second": self.rate(now).map(|r| (r * 10.0).round() / 10.0),
            "eta_seconds": self.eta_seconds(now),
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
        })
    }

    /// One line for people (logs, Slack): state, totals and duration.
    pub fn summary(&self) -> String {
        let t = &self.totals;
        let seconds = self
            .started_at
            .map(|s| {
                (self.finished_at.unwrap_or_else(crate::domain::now) - s).num_milliseconds() as f64 / 1000.0
            })
            .unwrap_or(0.0);
        let mut line = format!(
            "firstcome bulk job {} (event {}) {}: {} issued, {} skipped, {} invalid, {} unissued of {} read in {:.1} s",
            self.id,
            self.event_id,
            self.state.as_str(),
            thousands(t.issued),
            thousands(t.skipped),
            thousands(t.invalid),
            thousands(t.unissued),
            thousands(t.read),
            seconds,
        );
        if let Some(error) = &self.error {
            line.push_str(": ");
            line.push_str(error);
        }
        line
    }
}

/// `10000000` → `10,000,000`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn counter(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn job_from_row(row: bulk_jobs::Model) -> anyhow::Result<Job> {
    Ok(Job {
        id: row.id,
        event_id: EventId::from_db(row.event_id),
        state: JobState::parse(&row.state)
            .with_context(|| format!("job {} has state {:?}", row.id, row.state))?,
        source: serde_json::from_str(&row.source)
            .with_context(|| format!("reading job {}'s source", row.id))?,
        cursor: row.resume_at,
        totals: Totals {
            read: counter(row.read_count),
            issued: counter(row.issued),
            skipped: counter(row.skipped),
            invalid: counter(row.invalid),
            unissued: counter(row.unissued),
        },
        bytes_total: row.bytes_total.map(counter),
        bytes_read: counter(row.bytes_read),
        invalid_lines: serde_json::from_str(&row.invalid_lines).unwrap_or_default(),
        stock_exhausted: row.stock_exhausted,
        error: row.error,
        cancel_requested: row.cancel_requested,
        created_at: row.created_at,
        started_at: row.started_at,
        finished_at: row.finished_at,
    })
}

/// Queues a job; its targets are already stored.
pub async fn create_job(db: &DatabaseConnection, event: EventId, source: &JobSource) -> anyhow::Result<Job> {
    let now = crate::domain::now();
    let bytes_total = match source {
        JobSource::Upload { bytes, .. } => Some(i64::try_from(*bytes).unwrap_or(i64::MAX)),
        JobSource::Table(_) => None,
    };
    let row = bulk_jobs::ActiveModel {
        id: ActiveValue::NotSet,
        event_id: ActiveValue::Set(event.get()),
        state: ActiveValue::Set(JobState::Queued.as_str().to_owned()),
        source: ActiveValue::Set(serde_json::to_string(source).context("encoding a job source")?),
        resume_at: ActiveValue::Set(None),
        read_count: ActiveValue::Set(0),
        issued: ActiveValue::Set(0),
        skipped: ActiveValue::Set(0),
        invalid: ActiveValue::Set(0),
        unissued: ActiveValue::Set(0),
        bytes_total: ActiveValue::Set(bytes_total),
        bytes_read: ActiveValue::Set(0),
        invalid_lines: ActiveValue::Set("[]".to_owned()),
        stock_exhausted: ActiveValue::Set(false),
        error: ActiveValue::Set(None),
        cancel_requested: ActiveValue::Set(false),
        created_at: ActiveValue::Set(now),
        started_at: ActiveValue::Set(None),
        finished_at: ActiveValue::Set(None),
        updated_at: ActiveValue::Set(now),
    };
    // why: the answer shows the job as it was queued. sea-orm's `insert` reads the row back
    // (MySQL has no RETURNING), and a runner that polled in between could already have started it.
    let id = bulk_jobs::Entity::insert(row.clone())
        .exec(db)
        .await
        .context("queueing a bulk job")?
        .last_insert_id;
    let mut row = row;
    row.id = ActiveValue::Set(id);
    job_from_row(row.try_into_model().context("reading back a queued bulk job")?)
}

pub async fn find_job(db: &DatabaseConnection, id: i64) -> anyhow::Result<Option<Job>> {
    bulk_jobs::Entity::find_by_id(id)
        .one(db)
        .await
        .context("reading a bulk job")?
        .map(job_from_row)
        .transpose()
}

/// Jobs newest first, optionally of one event.
pub async fn list_jobs(
    db: &DatabaseConnection,
    event: Option<EventId>,
    limit: u64,
) -> anyhow::Result<Vec<Job>> {
    let mut query = bulk_jobs::Entity::find().order_by_desc(bulk_jobs::Column::Id);
    if let Some(event) = event {
        query = query.filter(bulk_jobs::Column::EventId.eq(event.get()));
    }
    query
        .limit(limit)
        .all(db)
        .await
        .context("listing bulk jobs")?
        .into_iter()
        .map(job_from_row)
        .collect()
}

/// The next job to run: one left running by a stopped server first (it resumes), then the
/// oldest queued one. A row that cannot be read is failed with the reason, so it never blocks
/// the queue.
pub async fn next_job(db: &DatabaseConnection) -> anyhow::Result<Option<Job>> {
    for state in [JobState::Running, JobState::Queued] {
        loop {
            let row = bulk_jobs::Entity::find()
                .filter(bulk_jobs::Column::State.eq(state.as_str()))
                .order_by_asc(bulk_jobs::Column::Id)
                .one(db)
                .await
                .context("finding the next bulk job")?;
            let Some(row) = row else { break };
            let id = row.id;
            match job_from_row(row) {
                Ok(job) => return Ok(Some(job)),
                Err(error) => {
                    let reason = format!("the job's row cannot be read: {error:#}");
                    tracing::error!(job = id, reason, "failing an unreadable bulk job");
                    let now = crate::domain::now();
                    bulk_jobs::Entity::update_many()
                        .col_expr(bulk_jobs::Column::State, JobState::Failed.as_str().into())
                        .col_expr(bulk_jobs::Column::Error, Some(reason).into())
                        .col_expr(bulk_jobs::Column::FinishedAt, Some(now).into())
                        .col_expr(bulk_jobs::Column::UpdatedAt, now.into())
                        .filter(bulk_jobs::Column::Id.eq(id))
                        .exec(db)
                        .await
                        .context("failing an unreadable bulk job")?;
                }
            }
        }
    }
    Ok(None)
}

/// What a cancel request did.
pub enum CancelOutcome {
    /// The job was queued and is now cancelled, or was running and stops after its chunk.
    Done(Job),
    /// The job had already ended.
    AlreadyFinished(Job),
    NotFound,
}

/// Cancels a queued job at once; asks a running one to stop after its current chunk.
pub async fn cancel_job(db: &DatabaseConnection, id: i64) -> anyhow::Result<CancelOutcome> {
    let Some(row) = bulk_jobs::Entity::find_by_id(id)
        .one(db)
        .await
        .context("reading a bulk job")?
    else {
        return Ok(CancelOutcome::NotFound);
    };
    let now = crate::domain::now();
    let state = JobState::parse(&row.state);
    let result = match state {
        Some(JobState::Queued) => {
            bulk_jobs::Entity::update_many()
                .col_expr(bulk_jobs::Column::State, JobState::Cancelled.as_str().into())
                .col_expr(bulk_jobs::Column::CancelRequested, true.into())
                .col_expr(bulk_jobs::Column::FinishedAt, Some(now).into())
                .col_expr(bulk_jobs::Column::UpdatedAt, now.into())
                .filter(bulk_jobs::Column::Id.eq(id))
                .filter(bulk_jobs::Column::State.eq(JobState::Queued.as_str()))
                .exec(db)
                .await
        }
        Some(JobState::Running) => {
            bulk_jobs::Entity::update_many()
                .col_expr(bulk_jobs::Column::CancelRequested, true.into())
                .col_expr(bulk_jobs::Column::UpdatedAt, now.into())
                .filter(bulk_jobs::Column::Id.eq(id))
                .exec(db)
                .await
        }
        _ => return Ok(CancelOutcome::AlreadyFinished(job_from_row(row)?)),
    };
    let changed = result.context("cancelling a bulk job")?.rows_affected;
    let job = find_job(db, id).await?.context("the cancelled job vanished")?;
    if changed == 0 && job.state.is_final() {
        // It ended between the read and the update.
        return Ok(CancelOutcome::AlreadyFinished(job));
    }
    Ok(CancelOutcome::Done(job))
}

/// Whether a cancel was requested for a running job.
pub(crate) async fn cancel_requested(db: &DatabaseConnection, id: i64) -> anyhow::Result<bool> {
    let flag: Option<bool> = bulk_jobs::Entity::find_by_id(id)
        .select_only()
        .column(bulk_jobs::Column::CancelRequested)
        .into_tuple()
        .one(db)
        .await
        .context("reading a job's cancel flag")?;
    Ok(flag.unwrap_or(true))
}

/// Moves a job to a new state, with its final error if any.
pub(crate) async fn set_job_state(
    db: &DatabaseConnection,
    job: &Job,
    state: JobState,
    error: Option<String>,
) -> anyhow::Result<Job> {
    let now = crate::domain::now();
    let mut row = bulk_jobs::ActiveModel {
        id: ActiveValue::Unchanged(job.id),
        ..Default::default()
    };
    row.state = ActiveValue::Set(state.as_str().to_owned());
    row.updated_at = ActiveValue::Set(now);
    if state == JobState::Running && job.started_at.is_none() {
        row.started_at = ActiveValue::Set(Some(now));
    }
    if state.is_final() {
        row.finished_at = ActiveValue::Set(Some(now));
    }
    if let Some(error) = error {
        row.error = ActiveValue::Set(Some(error));
    }
    if let Some(total) = job.bytes_total {
        row.bytes_total = ActiveValue::Set(Some(i64::try_from(total).unwrap_or(i64::MAX)));
    }
    row.update(db).await.context("updating a bulk job's state")?;
    find_job(db, job.id).await?.context("the bulk job vanished")
}

/// Records the end of an upload's prepare phase: the job now reads the prepared list, and its
/// totals count every line of the original.
pub(crate) async fn record_prepared(db: &DatabaseConnection, job: &Job) -> anyhow::Result<()> {
    let row = bulk_jobs::ActiveModel {
        id: ActiveValue::Unchanged(job.id),
        source: ActiveValue::Set(serde_json::to_string(&job.source).context("encoding a job source")?),
        resume_at: ActiveValue::Set(None),
        read_count: ActiveValue::Set(i64::try_from(job.totals.read).unwrap_or(i64::MAX)),
        skipped: ActiveValue::Set(i64::try_from(job.totals.skipped).unwrap_or(i64::MAX)),
        invalid: ActiveValue::Set(i64::try_from(job.totals.invalid).unwrap_or(i64::MAX)),
        invalid_lines: ActiveValue::Set(
            serde_json::to_string(&job.invalid_lines).context("encoding invalid lines")?,
        ),
        bytes_total: ActiveValue::Set(job.bytes_total.map(|b| i64::try_from(b).unwrap_or(i64::MAX))),
        bytes_read: ActiveValue::Set(0),
        updated_at: ActiveValue::Set(crate::domain::now()),
        ..Default::default()
    };
    row.update(db).await.context("recording a prepared upload")?;
    Ok(())
}

/// Records the size of a table source, for the ETA.
pub(crate) async fn set_bytes_total(db: &DatabaseConnection, id: i64, total: u64) -> anyhow::Result<()> {
    let row = bulk_jobs::ActiveModel {
        id: ActiveValue::Unchanged(id),
        bytes_total: ActiveValue::Set(Some(i64::try_from(total).unwrap_or(i64::MAX))),
        ..Default::default()
    };
    row.update(db).await.context("recording a job's size")?;
    Ok(())
}
