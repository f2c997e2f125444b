//! `firstcome issue`: run a bulk issuance from the command line, with a progress bar.
//!
//! - Against a running server (`--server`, the default): the file is streamed as the upload,
//!   then the job is followed through `GET /v1/admin/jobs/{id}` until it ends.
//! - Straight against a database (`--database-url`): the job runs in this process, with its own
//!   event actor and persister, exactly as a server would run it. It takes the database's bulk
//!   runner lock, so it refuses to run while a server serves that database (the server's event
//!   actors must see every chunk; submit through the server instead).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::stream;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use tokio::io::AsyncReadExt;

use super::webhook::Notifier;
use super::{BulkRunner, BulkSettings, JobSource, RunnerLock, UploadFormat};
use crate::actors::{Persister, PersisterStats, Registry, WriteGate};
use crate::config::Settings;
use crate::domain::{EventId, EventKind};
use crate::store::{self, Backend};

const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    /// The coupon event whose coupon is issued.
    #[arg(long)]
    pub event: i64,
    /// The target list: one user id per line, or CSV with a header (see --format); may be gzip.
    #[arg(long)]
    pub targets: PathBuf,
    /// `csv` or `lines` [default: csv for *.csv and *.csv.gz, else lines].
    #[arg(long)]
    pub format: Option<String>,
    /// CSV: the header of the column holding user ids [default: user_id].
    #[arg(long)]
    pub column: Option<String>,
    /// The server to submit to [default: http://127.0.0.1:8080].
    #[arg(long, env = "FIRSTCOME_SERVER", conflicts_with = "database_url")]
    pub server: Option<String>,
    /// The server's admin token.
    #[arg(long, env = "FIRSTCOME_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Run the job in this process, straight against this database (only while no server
    /// serves it).
    #[arg(long)]
    pub database_url: Option<String>,
}

impl IssueArgs {
    fn format(&self) -> anyhow::Result<UploadFormat> {
        if let Some(raw) = &self.format {
            return UploadFormat::parse(raw)
                .with_context(|| format!("--format must be csv or lines, not {raw:?}"));
        }
        let name = self.targets.to_string_lossy().to_ascii_lowercase();
        Ok(if name.ends_with(".csv") || name.ends_with(".csv.gz") {
            UploadFormat::Csv
        } else {
            UploadFormat::Lines
        })
    }

    fn column(&self, format: UploadFormat) -> Option<String> {
        (format == UploadFormat::Csv).then(|| self.column.clone().unwrap_or_else(|| "user_id".to_owned()))
    }
}

/// Runs the command; `Ok(true)` when the job succeeded.
pub async fn run(args: IssueArgs) -> anyhow::Result<bool> {
    let size = tokio::fs::metadata(&args.targets)
        .await
        .with_context(|| format!("reading {}", args.targets.display()))?
        .len();
    let bar = ProgressBar::new(size).with_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}")
            .context("the progress bar template")?,
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let job = match &args.database_url {
        Some(url) => run_direct(&args, url, size, &bar).await?,
        None => run_remote(&args, &bar).await?,
    };
    bar.finish_and_clear();
    println!("{}", summary(&job));
    if let Some(lines) = job["invalid_lines"].as_array().filter(|l| !l.is_empty()) {
        println!("first malformed lines:");
        for line in lines.iter().take(10) {
            println!(
                "  line {}: {}",
                line["line"],
                line["reason"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(job["state"] == "succeeded")
}

/// The final line: state, totals and duration, from the job's JSON.
fn summary(job: &Value) -> String {
    let t = &job["totals"];
    let mut line = format!(
        "job {} {}: {} read, {} issued, {} skipped, {} invalid, {} unissued",
        job["id"],
        job["state"].as_str().unwrap_or("?"),
        t["read"],
        t["issued"],
        t["skipped"],
        t["invalid"],
        t["unissued"],
    );
    if let Some(rate) = job["rate_per_second"].as_f64() {
        line.push_str(&format!(" ({rate:.0} targets/s)"));
    }
    if job["stock_exhausted"] == true {
        line.push_str("; the stock ran out");
    }
    if let Some(error) = job["error"].as_str() {
        line.push_str(&format!("; error: {error}"));
    }
    line
}

/// Shows a job's progress on the bar; true once it has ended.
fn show(bar: &ProgressBar, job: &Value) -> bool {
    if let Some(total) = job["progress"]["total"].as_u64() {
        bar.set_length(total);
    }
    bar.set_position(job["progress"]["done"].as_u64().unwrap_or(0));
    let t = &job["totals"];
    bar.set_message(format!(
        "{}: {} issued, {} skipped, {} invalid{}",
        job["state"].as_str().unwrap_or("?"),
        t["issued"],
        t["skipped"],
        t["invalid"],
        job["eta_seconds"]
            .as_u64()
            .map(|eta| format!(", ETA {eta} s"))
            .unwrap_or_default()
    ));
    matches!(job["state"].as_str(), Some("succeeded" | "failed" | "cancelled"))
}

async fn run_remote(args: &IssueArgs, bar: &ProgressBar) -> anyhow::Result<Value> {
    let server = args
        .server
        .as_deref()
        .unwrap_or("http://127.0.0.1:8080")
        .trim_end_matches('/');
    let token = args
        .admin_token
        .as_deref()
        .context("--admin-token (or FIRSTCOME_ADMIN_TOKEN) is needed to submit to a server")?;
    let format = args.format()?;
    let client = reqwest::Client::new();
    let file = tokio::fs::File::open(&args.targets)
        .await
        .with_context(|| format!("opening {}", args.targets.display()))?;
    // The file goes up in 256 KiB pieces, each moving the bar: the upload is never in memory.
    let uploaded = bar.clone();
    let body = stream::unfold(file, move |mut file| {
        let uploaded = uploaded.clone();
        async move {
            let mut buf = vec![0u8; 256 * 1024];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    uploaded.inc(n as u64);
                    Some((Ok::<_, std::io::Error>(buf), file))
                }
                Err(e) => Some((Err(e), file)),
            }
        }
    });
    bar.set_message("uploading");
    let mut request = client
        .post(format!("{server}/v1/admin/events/{}/bulk-issues", args.event))
        .bearer_auth(token)
        .header(
            reqwest::header::CONTENT_TYPE,
            match format {
                UploadFormat::Csv => "text/csv",
                UploadFormat::Lines => "text/plain",
            },
        )
        .query(&[(
            "format",
            match format {
                UploadFormat::Csv => "csv",
                UploadFormat::Lines => "lines",
            },
        )]);
    if let Some(column) = args.column(format) {
        request = request.query(&[("column", column)]);
    }
    let response = request
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .with_context(|| format!("submitting to {server}"))?;
    let status = response.status();
    let answer: Value = response.json().await.context("reading the server's answer")?;
    if status != reqwest::StatusCode::ACCEPTED {
        bail!(
            "the server refused the job ({status}): {}",
            answer["detail"].as_str().unwrap_or("no detail")
        );
    }
    let id = answer["id"]
        .as_i64()
        .context("the server's answer has no job id")?;
    bar.println(format!("job {id} queued on {server}"));
    loop {
        let job: Value = client
            .get(format!("{server}/v1/admin/jobs/{id}"))
            .bearer_auth(token)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("following job {id}"))?
            .json()
            .await
            .context("reading the job")?;
        if show(bar, &job) {
            return Ok(job);
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn run_direct(args: &IssueArgs, url: &str, size: u64, bar: &ProgressBar) -> anyhow::Result<Value> {
    let settings = Settings {
        database_url: url.to_owned(),
        ..Settings::default()
    };
    let backend = Backend::of_url(url)?;
    let db = store::connect(url, 4).await?;
    store::migrate(&db).await?;
    let Some(_lock) = RunnerLock::try_acquire(&db, backend).await? else {
        bail!(
            "a firstcome server (or another `firstcome issue`) runs the bulk jobs of this database; \
             submit through it with --server instead"
        );
    };
    let event = store::find_event(&db, EventId::from_db(args.event))
        .await?
        .with_context(|| format!("no event has id {}", args.event))?;
    if event.kind != EventKind::Coupon {
        bail!("event {} sells tickets; bulk issuance gives coupons", args.event);
    }
    let writer = store::connect(url, 1).await?;
    let write_gate = (backend == Backend::Sqlite).then(WriteGate::default);
    let persister = Persister::new(
        writer,
        backend,
        settings.max_batch,
        Arc::new(PersisterStats::default()),
    )
    .with_write_gate(write_gate.clone())
    .start_here();
    let registry = Arc::new(Registry::new(
        Vec::new(),
        db.clone(),
        persister,
        settings.mailbox_capacity,
    ));
    let runner = BulkRunner::new(
        db.clone(),
        backend,
        registry,
        BulkSettings::from_settings(&settings, backend),
        Notifier::none(),
        false,
        write_gate,
    );
    let format = args.format()?;
    let path = std::fs::canonicalize(&args.targets)
        .with_context(|| format!("resolving {}", args.targets.display()))?;
    let source = JobSource::Upload {
        path,
        format,
        column: args.column(format),
        bytes: size,
        owned: false,
        prepared: None,
    };
    let job = super::create_job(&db, event.id, &source).await?;
    let id = job.id;
    bar.println(format!(
        "job {id} running in this process on {}",
        crate::config::redact_password(url)
    ));
    let follow = async {
        loop {
            tokio::time::sleep(POLL).await;
            if let Ok(Some(job)) = super::find_job(&db, id).await
                && show(bar, &job.view())
            {
                return;
            }
        }
    };
    tokio::join!(runner.run(job), follow);
    let job = super::find_job(&db, id).await?.context("the job vanished")?;
    Ok(job.view())
}
