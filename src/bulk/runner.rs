//! The job runner: one background task per server that takes queued jobs one at a time (a job
//! left running by a stopped server first) and works through each in chunks.
//!
//! why one at a time: a bulk job is a long stream of writes. Run sequentially, it holds one
//! database connection and, between chunks, no lock at all, so the live reservation path always
//! has the rest of the pool and the database's write lock most of the time.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use anyhow::{Context, anyhow};
use sea_orm::{ConnectionTrait, DatabaseConnection};

use super::lock::RunnerLock;
use super::source::{self, Reader, TableReader};
use super::webhook::{JobEvent, JobEventKind, Notifier};
use super::write::{GrantTxn, Progress};
use super::{InvalidLine, Job, JobSource, JobState, MAX_INVALID_KEPT, SourceDatabase, Totals};
use crate::actors::event::{BulkBegin, BulkEnd, BulkGrant, ChunkCommitted, Reload};
use crate::actors::{EventActor, Refusal, Registry, WriteGate};
use crate::domain::{EventId, UserId};
use crate::store::Backend;

/// Attempts at one chunk before the job fails; a failed attempt rolled back entirely.
const CHUNK_ATTEMPTS: u32 = 4;
/// How long the runner sleeps when no job is queued and nobody woke it.
const IDLE_POLL: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct BulkSettings {
    /// Where uploads are stored until their job ends.
    pub dir: PathBuf,
    pub max_upload_bytes: u64,
    pub chunk_rows: usize,
    pub progress_every: Duration,
    pub source_url: Option<String>,
}

impl BulkSettings {
    pub fn from_settings(settings: &crate::config::Settings, backend: Backend) -> Self {
        // why these sizes: a live commit waits behind the chunk in progress. On SQLite a chunk
        // holds the whole database's write lock (10,000 rows: about 15 ms). On PostgreSQL a live
        // commit's WAL flush includes the chunk's WAL written before it: measured at 2,000 live
        // claims/s, 50,000-row chunks put live p99 at 300 ms, 25,000 at 15–23 ms with the same
        // job throughput, 10,000 at 13 ms with a third less.
        let default_chunk = match backend {
            Backend::Sqlite => 10_000,
            Backend::Postgres | Backend::MySql => 25_000,
        };
        Self {
            dir: settings.bulk_dir(),
            max_upload_bytes: settings.bulk_max_upload_bytes,
            chunk_rows: settings.bulk_chunk_rows.unwrap_or(default_chunk).max(1),
            progress_every: Duration::from_secs(settings.bulk_progress_secs.max(1)),
            source_url: settings.bulk_source_url.clone(),
        }
    }
}

pub struct BulkRunner {
    db: DatabaseConnection,
    backend: Backend,
    registry: Arc<Registry>,
    settings: BulkSettings,
    notifier: Notifier,
    /// The read-only source database, connected on first use.
    source_db: tokio::sync::OnceCell<DatabaseConnection>,
    wake: tokio::sync::Notify,
    several_nodes: bool,
    /// SQLite: taken around each chunk, shared with the persister (see [`WriteGate`]).
    write_gate: Option<WriteGate>,
}

/// How a job ended.
enum Ending {
    Finished,
    Cancelled,
    Failed(String),
}

impl BulkRunner {
    pub fn new(
        db: DatabaseConnection,
        backend: Backend,
        registry: Arc<Registry>,
        settings: BulkSettings,
        notifier: Notifier,
        several_nodes: bool,
        write_gate: Option<WriteGate>,
    ) -> Arc<Self> {
        Arc::new(Self {
            write_gate,
            db,
            backend,
            registry,
            settings,
            notifier,
            source_db: tokio::sync::OnceCell::new(),
            wake: tokio::sync::Notify::new(),
            several_nodes,
        })
    }

    pub fn settings(&self) -> &BulkSettings {
        &self.settings
    }

    /// Several nodes: bulk issuance is not offered (the Redis ledger does not take chunks).
    pub fn several_nodes(&self) -> bool {
        self.several_nodes
    }

    /// Waits (at most `within`) for the job events already sent to be delivered or given up;
    /// for shutdown.
    pub async fn flush_webhooks(&self, within: Duration) -> bool {
        self.notifier.flush(within).await
    }

    /// A job was queued: look now rather than at the next poll.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The database a table source is read from; `None` when `source` is asked for but no
    /// `--bulk-source-url` is configured.
    pub async fn source_db(&self, which: SourceDatabase) -> anyhow::Result<Option<DatabaseConnection>> {
        match which {
            SourceDatabase::Server => Ok(Some(self.db.clone())),
            SourceDatabase::Source => {
                let Some(url) = &self.settings.source_url else {
                    return Ok(None);
                };
                let db = self
                    .source_db
                    .get_or_try_init(|| async {
                        sea_orm::Database::connect(url.as_str())
                            .await
                            .context("connecting to the bulk source database")
                    })
                    .await?;
                Ok(Some(db.clone()))
            }
        }
    }

    /// Starts the runner on the current actix system.
    pub fn spawn(self: &Arc<Self>) {
        let runner = self.clone();
        actix_rt::spawn(async move { runner.run_forever().await });
    }

    async fn run_forever(self: Arc<Self>) {
        let _lock = self.runner_lock().await;
        loop {
            match super::next_job(&self.db).await {
                Ok(Some(job)) => self.run(job).await,
                Ok(None) => {
                    let _ = tokio::time::timeout(IDLE_POLL, self.wake.notified()).await;
                }
                Err(error) => {
                    tracing::error!(error = format!("{error:#}"), "cannot read the bulk job queue");
                    tokio::time::sleep(IDLE_POLL).await;
                }
            }
        }
    }

    /// Waits until this process is the database's one job runner.
    async fn runner_lock(&self) -> RunnerLock {
        let mut told = false;
        loop {
            match RunnerLock::try_acquire(&self.db, self.backend).await {
                Ok(Some(lock)) => return lock,
                Ok(None) if !told => {
                    told = true;
                    tracing::warn!(
                        "another process runs the bulk jobs of this database; waiting for it to stop"
                    );
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::error!(error = format!("{error:#}"), "cannot take the bulk runner lock")
                }
            }
            tokio::time::sleep(IDLE_POLL).await;
        }
    }

    fn notify(&self, kind: JobEventKind, job: &Job) {
        self.notifier.send(JobEvent {
            kind,
            job: job.view(),
            summary: job.summary(),
        });
    }

    /// Runs one job to its end and records how it ended (the command line's direct mode calls
    /// this itself, holding the runner lock).
    pub async fn run(&self, job: Job) {
        let resumed = job.state == JobState::Running;
        let mut job = match super::set_job_state(&self.db, &job, JobState::Running, None).await {
            Ok(job) => job,
            Err(error) => {
                tracing::error!(
                    job = job.id,
                    error = format!("{error:#}"),
                    "cannot start a bulk job"
                );
                tokio::time::sleep(IDLE_POLL).await;
                return;
            }
        };
        tracing::info!(job = job.id, event = %job.event_id, resumed, cursor = job.cursor, "bulk job started");
        self.notify(JobEventKind::Started, &job);
        let started = Instant::now();
        let ending = match self.execute(&mut job).await {
            Ok(ending) => ending,
            Err(error) => Ending::Failed(format!("{error:#}")),
        };
        let (state, error) = match ending {
            Ending::Finished if job.totals.read == 0 => (
                JobState::Failed,
                Some("the source holds no targets (an empty upload or table)".to_owned()),
            ),
            Ending::Finished => (JobState::Succeeded, None),
            Ending::Cancelled => (JobState::Cancelled, None),
            Ending::Failed(reason) => (JobState::Failed, Some(reason)),
        };
        // The progress of the last chunk is in the row already; this records only the ending.
        let finished = loop {
            match super::set_job_state(&self.db, &job, state, error.clone()).await {
                Ok(finished) => break finished,
                Err(e) => {
                    tracing::error!(
                        job = job.id,
                        error = format!("{e:#}"),
                        "cannot record a bulk job's end; retrying"
                    );
                    tokio::time::sleep(IDLE_POLL).await;
                }
            }
        };
        if let JobSource::Upload {
            path,
            owned,
            prepared,
            ..
        } = &finished.source
        {
            // The upload (unless it is the command line's own file) and the prepared list.
            let ours = prepared
                .iter()
                .map(|list| &list.path)
                .chain(owned.then_some(path));
            for file in ours {
                match tokio::fs::remove_file(file).await {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        tracing::warn!(job = finished.id, path = %file.display(), error = %e, "cannot remove a finished job's file");
                    }
                    _ => {}
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let t = &finished.totals;
        tracing::info!(
            job = finished.id,
            event = %finished.event_id,
            state = state.as_str(),
            read = t.read,
            issued = t.issued,
            skipped = t.skipped,
            invalid = t.invalid,
            unissued = t.unissued,
            seconds = format!("{elapsed:.2}"),
            per_second = (t.read as f64 / elapsed.max(1e-3)).round(),
            error = finished.error,
            "bulk job ended"
        );
        let kind = match state {
            JobState::Succeeded => JobEventKind::Succeeded,
            JobState::Cancelled => JobEventKind::Cancelled,
            _ => JobEventKind::Failed,
        };
        self.notify(kind, &finished);
    }

    async fn execute(&self, job: &mut Job) -> anyhow::Result<Ending> {
        if self.several_nodes {
            return Ok(Ending::Failed(
                "bulk issuance runs on one node; this server runs several (Redis)".into(),
            ));
        }
        let Some(handle) = self.registry.actor(job.event_id).await? else {
            return Ok(Ending::Failed(format!("event {} does not exist", job.event_id)));
        };
        let Some(actor) = handle.actor.local().cloned() else {
            return Ok(Ending::Failed("bulk issuance runs on one node".into()));
        };
        if let JobSource::Upload { prepared: None, .. } = &job.source {
            self.prepare(job).await?;
        }
        // A prepared list's lines are already counted (read, invalid, duplicates).
        let counted = matches!(
            job.source,
            JobSource::Upload {
                prepared: Some(_),
                ..
            }
        );
        let mut reader = match &job.source {
            JobSource::Upload {
                prepared: Some(list), ..
            } => {
                let skip = job
                    .cursor
                    .as_deref()
                    .map_or(Ok(0), str::parse::<u64>)
                    .unwrap_or(0);
                source::read_upload(
                    list.path.clone(),
                    super::UploadFormat::Lines,
                    None,
                    skip,
                    self.settings.chunk_rows,
                )
            }
            JobSource::Upload { prepared: None, .. } => {
                return Ok(Ending::Failed("the upload was not prepared".into()));
            }
            JobSource::Table(table) => {
                let Some(db) = self.source_db(table.database).await? else {
                    return Ok(Ending::Failed("no --bulk-source-url is configured".into()));
                };
                let reader = TableReader::new(
                    db,
                    table,
                    job.cursor.clone(),
                    job.totals.read,
                    self.settings.chunk_rows,
                )?;
                if job.bytes_total.is_none() {
                    let rows = reader.count().await?;
                    job.bytes_total = Some(rows);
                    super::set_bytes_total(&self.db, job.id, rows).await?;
                }
                Reader::Table(reader)
            }
        };
        let mut last_progress = Instant::now();
        loop {
            if super::cancel_requested(&self.db, job.id).await? {
                return Ok(Ending::Cancelled);
            }
            let piece = match reader.next().await {
                None => return Ok(Ending::Finished),
                Some(Err(error)) => return Ok(Ending::Failed(format!("{error:#}"))),
                Some(Ok(piece)) => piece,
            };
            let mut totals = job.totals.clone();
            if !counted {
                totals.read += piece.read();
                totals.invalid += piece.invalid;
            }
            let mut invalid_lines = job.invalid_lines.clone();
            let room = MAX_INVALID_KEPT.saturating_sub(invalid_lines.len());
            invalid_lines.extend(piece.invalid_kept.into_iter().take(room));
            // Duplicates inside one piece are skipped here; across pieces, by the primary key.
            let mut seen = HashSet::with_capacity(piece.users.len());
            let mut users = Vec::with_capacity(piece.users.len());
            for user in piece.users {
                if seen.insert(user.clone()) {
                    users.push(user);
                } else {
                    totals.skipped += 1;
                }
            }
            drop(seen);
            let chunk = Chunk {
                cursor: piece.cursor,
                bytes_read: piece.progress,
                invalid_lines,
            };
            let outcome = self.commit_chunk(&actor, job, users, totals, &chunk).await?;
            match outcome {
                Some((totals, exhausted)) => {
                    job.totals = totals;
                    job.stock_exhausted |= exhausted;
                    job.cursor = Some(chunk.cursor);
                    job.bytes_read = chunk.bytes_read;
                    job.invalid_lines = chunk.invalid_lines;
                }
                None => {
                    return Ok(Ending::Failed(
                        "a chunk failed after every retry; see the logs".into(),
                    ));
                }
            }
            if last_progress.elapsed() >= self.settings.progress_every {
                last_progress = Instant::now();
                let t = &job.totals;
                tracing::info!(
                    job = job.id,
                    read = t.read,
                    issued = t.issued,
                    skipped = t.skipped,
                    rate = job.rate(crate::domain::now()).map(|r| r.round()),
                    eta_seconds = job.eta_seconds(crate::domain::now()),
                    "bulk job progress"
                );
                self.notify(JobEventKind::Progress, job);
            }
        }
    }

    /// Validates, sorts and de-duplicates an upload (see [`super::prepare`]); the job then reads
    /// the prepared list. Redone from the start if the server stops before it is recorded.
    async fn prepare(&self, job: &mut Job) -> anyhow::Result<()> {
        let JobSource::Upload {
            path,
            format,
            column,
            owned,
            ..
        } = job.source.clone()
        else {
            return Ok(());
        };
        let started = Instant::now();
        tokio::fs::create_dir_all(&self.settings.dir)
            .await
            .with_context(|| format!("creating {}", self.settings.dir.display()))?;
        // Unique, not just the job id: servers on other databases may share this directory.
        let work = self
            .settings
            .dir
            .join(format!("job-{}-{}", job.id, uuid::Uuid::now_v7().simple()));
        let original = path.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            super::prepare::prepare(&original, format, column.as_deref(), &work)
        })
        .await
        .context("the prepare thread stopped")??;
        job.totals.read += prepared.read;
        job.totals.invalid += prepared.invalid;
        job.totals.skipped += prepared.duplicates;
        let room = MAX_INVALID_KEPT.saturating_sub(job.invalid_lines.len());
        job.invalid_lines
            .extend(prepared.invalid_kept.into_iter().take(room));
        if let JobSource::Upload { prepared: list, .. } = &mut job.source {
            *list = Some(super::PreparedList {
                path: prepared.sorted.clone(),
                bytes: prepared.sorted_bytes,
            });
        }
        job.cursor = None;
        job.bytes_total = Some(prepared.sorted_bytes);
        job.bytes_read = 0;
        super::record_prepared(&self.db, job).await?;
        if owned && let Err(e) = tokio::fs::remove_file(&path).await {
            tracing::warn!(job = job.id, error = %e, "cannot remove a prepared upload");
        }
        tracing::info!(
            job = job.id,
            read = prepared.read,
            distinct = prepared.targets,
            invalid = prepared.invalid,
            duplicates = prepared.duplicates,
            seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
            "bulk upload prepared"
        );
        Ok(())
    }

    /// Commits one chunk, retrying a failed attempt; returns the totals after it and whether
    /// stock ran out, or `None` when every attempt failed.
    async fn commit_chunk(
        &self,
        actor: &Addr<EventActor>,
        job: &Job,
        users: Vec<UserId>,
        totals: Totals,
        chunk: &Chunk,
    ) -> anyhow::Result<Option<(Totals, bool)>> {
        let invalid_json = serde_json::to_string(&chunk.invalid_lines).context("encoding invalid lines")?;
        for attempt in 1..=CHUNK_ATTEMPTS {
            let outcome = {
                let asked = Instant::now();
                let grant = match actor.send(BulkBegin(users.clone())).await {
                    Ok(Ok(grant)) => Ok(grant),
                    Ok(Err(Refusal::Unavailable)) | Err(_) => Err(anyhow!("the event actor is not ready")),
                    Ok(Err(refusal)) => return Err(anyhow!("the event refused bulk issuance: {refusal}")),
                };
                match grant {
                    Err(error) => Err(error),
                    Ok(mut grant) => {
                        // Held until the actor has been told the outcome (see `BulkBegin`).
                        let _fence = grant.fence.take();
                        let epoch = grant.epoch;
                        let granted = asked.elapsed();
                        let mut attempt = self.insert_chunk(job, grant, &totals, chunk, &invalid_json).await;
                        actor.do_send(BulkEnd {
                            epoch,
                            committed: attempt.as_mut().ok().map(|a| ChunkCommitted {
                                inserted: a.inserted,
                                unissued: std::mem::take(&mut a.unissued),
                            }),
                        });
                        if let Ok(done) = &attempt {
                            tracing::debug!(
                                job = job.id,
                                rows = done.inserted,
                                actor_ms = granted.as_secs_f64() * 1e3,
                                insert_ms = done.insert_time.as_secs_f64() * 1e3,
                                commit_ms = done.commit_time.as_secs_f64() * 1e3,
                                "bulk chunk committed"
                            );
                        }
                        attempt
                    }
                }
            };
            match outcome {
                Ok(done) => {
                    self.checkpoint().await;
                    return Ok(Some((done.totals, done.exhausted)));
                }
                Err(error) => {
                    tracing::warn!(
                        job = job.id,
                        attempt,
                        error = format!("{error:#}"),
                        "a bulk chunk failed and rolled back"
                    );
                    if attempt < CHUNK_ATTEMPTS {
                        tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
                    }
                }
            }
        }
        Ok(None)
    }

    /// SQLite: moves the chunk's pages from the WAL into the database file now, outside the
    /// write lock. why: left to SQLite's auto-checkpoint, the WAL fills to its threshold
    /// (`wal_autocheckpoint`, 64 MiB) every second or so of bulk writing, and whichever commit
    /// crosses it, often a live one, writes all of it back and syncs before answering: measured,
    /// live p99 went from 5 ms to over 100 ms. A passive checkpoint takes no write lock, so
    /// live commits go on meanwhile.
    async fn checkpoint(&self) {
        if self.backend != Backend::Sqlite {
            return;
        }
        if let Err(error) = self.db.execute_unprepared("PRAGMA wal_checkpoint(PASSIVE)").await {
            tracing::warn!(%error, "cannot checkpoint the WAL after a bulk chunk");
        }
    }

    /// The chunk's transaction. Units the actor granted to users who turn out to hold a grant
    /// already go, in the same transaction, to users left unissued for lack of stock, so the
    /// stock boundary is exact too.
    async fn insert_chunk(
        &self,
        job: &Job,
        grant: BulkGrant,
        before: &Totals,
        chunk: &Chunk,
        invalid_json: &str,
    ) -> anyhow::Result<Inserted> {
        let event: EventId = job.event_id;
        let _turn = match &self.write_gate {
            Some(gate) => Some(gate.lock().await),
            None => None,
        };
        let mut txn = GrantTxn::begin(&self.db, self.backend)
            .await
            .context("starting a chunk")?;
        let units = grant.insert.len() as u64;
        let mut attempted = units;
        let inserting = Instant::now();
        let mut inserted = txn
            .insert(event, job.id, &grant.insert)
            .await
            .context("inserting grants")?;
        let held = grant.held;
        let mut unissued = grant.unissued;
        // Units granted to users who held a grant already are spare: they go to the users the
        // actor left unissued (already in the chunk, so their live claims wait too).
        while inserted < units && !unissued.is_empty() {
            let spare = usize::try_from(units - inserted).unwrap_or(usize::MAX);
            let offered: Vec<UserId> = unissued.drain(..spare.min(unissued.len())).collect();
            attempted += offered.len() as u64;
            inserted += txn
                .insert(event, job.id, &offered)
                .await
                .context("inserting grants")?;
        }
        let mut totals = before.clone();
        totals.issued += inserted;
        totals.skipped += held + (attempted - inserted);
        totals.unissued += unissued.len() as u64;
        let exhausted = job.stock_exhausted || !unissued.is_empty();
        let insert_time = inserting.elapsed();
        let committing = Instant::now();
        let progress = Progress {
            cursor: &chunk.cursor,
            totals: &totals,
            bytes_read: chunk.bytes_read,
            invalid_lines: invalid_json,
            stock_exhausted: exhausted,
        };
        txn.commit(event, job.id, inserted, &progress)
            .await
            .context("committing a chunk")?;
        Ok(Inserted {
            inserted,
            unissued,
            totals,
            exhausted,
            insert_time,
            commit_time: committing.elapsed(),
        })
    }

    /// Revokes every grant a finished job issued; the event's actor re-reads its counts, so the
    /// units are back in stock once this returns.
    pub async fn revoke(&self, job: &Job) -> anyhow::Result<u64> {
        let handle = self.registry.actor(job.event_id).await?;
        let revoked = match &handle {
            Some(handle) => {
                let _fence = handle.bulk_fence.lock().await;
                super::write::revoke(&self.db, job.event_id, job.id).await?
            }
            None => super::write::revoke(&self.db, job.event_id, job.id).await?,
        };
        if let Some(actor) = handle.as_ref().and_then(|h| h.actor.local()) {
            actor.send(Reload).await.context("reloading the event actor")?;
        }
        tracing::info!(job = job.id, event = %job.event_id, revoked, "bulk grants revoked");
        Ok(revoked)
    }
}

/// What a chunk records besides its grants.
struct Chunk {
    cursor: String,
    bytes_read: u64,
    invalid_lines: Vec<InvalidLine>,
}

struct Inserted {
    inserted: u64,
    /// The chunk's users left without a grant (stock ran out), for the actor.
    unissued: Vec<UserId>,
    totals: Totals,
    exhausted: bool,
    insert_time: Duration,
    commit_time: Duration,
}
