//! Bulk issuance over HTTP: submit a job (an upload streamed to disk, or a table source), then
//! follow, list, cancel or revoke it. The work itself is [`crate::bulk::BulkRunner`]'s.

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use super::docs::Problem;
use super::extract::{Admin, event_id, required_json_body};
use super::{AppState, json, resource};
use crate::bulk::source::{TableRefusal, check_table};
use crate::bulk::{self, CancelOutcome, JobSource, JobState, TableSource, UploadFormat};
use crate::domain::{EventId, EventKind};
use crate::error::{ApiError, Code};
use crate::store;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/admin/events/{id}/bulk-issues").route(web::post().to(submit)))
        .service(resource("/v1/admin/jobs").route(web::get().to(list)))
        .service(resource("/v1/admin/jobs/{id}").route(web::get().to(read)))
        .service(resource("/v1/admin/jobs/{id}/cancel").route(web::post().to(cancel)))
        .service(resource("/v1/admin/jobs/{id}/revoke").route(web::post().to(revoke)));
}

#[derive(Debug, Deserialize)]
pub(super) struct SubmitQuery {
    /// `csv` or `lines`; overrides what the content type implies.
    format: Option<String>,
    /// CSV: the header naming the user column [default: user_id].
    column: Option<String>,
}

/// A SQL source: `{"source": {"table": "segment", "column": "user_id"}}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableRequest {
    source: TableSource,
}

fn invalid(detail: impl Into<std::borrow::Cow<'static, str>>) -> ApiError {
    ApiError::new(Code::InvalidBulkIssue, detail)
}

/// `POST /v1/admin/events/{id}/bulk-issues`: queue a job; 202 with it once its targets are stored.
#[utoipa::path(post, path = "/v1/admin/events/{id}/bulk-issues", tag = "bulk", security(("admin_token" = [])),
    params(("id" = i64, Path, description = "Event id (a coupon)"),
        ("format" = Option<String>, Query, description = "`csv` or `lines` (overrides the content type)"),
        ("column" = Option<String>, Query, description = "CSV: the column of user ids [default: user_id]")),
    request_body(description = "text/csv (with a header), text/plain (one user id per line), either gzipped, \
        or application/json `{\"source\": {\"table\", \"column\", \"database\": \"server\"|\"source\"}}`"),
    responses(
    (status = 202, description = "The queued job; Location names it"),
    (status = 404, description = "event_not_found", body = Problem, content_type = "application/problem+json"),
    (status = 409, description = "bulk_unsupported: the server runs several nodes", body = Problem, content_type = "application/problem+json"),
    (status = 413, description = "payload_too_large", body = Problem, content_type = "application/problem+json"),
    (status = 415, description = "unsupported_media_type", body = Problem, content_type = "application/problem+json"),
    (status = 422, description = "invalid_bulk_issue: not a coupon, unknown table or column, bad format", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn submit(
    _: Admin,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<SubmitQuery>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = event_id(&path)?;
    let runner = &state.bulk;
    if runner.several_nodes() {
        return Err(ApiError::new(
            Code::BulkUnsupported,
            "Bulk issuance runs on a single node; this server runs several (Redis).",
        ));
    }
    let event = store::find_event(&state.db, id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or_else(|| ApiError::new(Code::EventNotFound, format!("No event has id {id}.")))?;
    if event.kind != EventKind::Coupon {
        return Err(invalid("Bulk issuance gives coupons; this event sells tickets."));
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<mime::Mime>().ok());
    let implied = match content_type
        .as_ref()
        .map(|m| (m.type_().as_str(), m.subtype().as_str()))
    {
        Some(("application", "json")) => None,
        Some(("text", "csv")) => Some(UploadFormat::Csv),
        Some(("text", "plain")) => Some(UploadFormat::Lines),
        Some(("application", "gzip" | "x-gzip" | "octet-stream")) => Some(UploadFormat::Lines),
        _ => {
            return Err(ApiError::new(
                Code::UnsupportedMediaType,
                "Send targets as text/csv, text/plain, application/gzip or application/octet-stream, \
                 or a table source as application/json.",
            ));
        }
    };
    let source = match implied {
        None => table_source(&req, payload, &state).await?,
        Some(implied) => {
            let format = match query.format.as_deref() {
                None => implied,
                Some(raw) => UploadFormat::parse(raw)
                    .ok_or_else(|| invalid(format!("format must be `csv` or `lines`, not {raw:?}.")))?,
            };
            let column = match format {
                UploadFormat::Csv => Some(query.column.clone().unwrap_or_else(|| "user_id".to_owned())),
                UploadFormat::Lines => None,
            };
            if column.as_deref().is_some_and(|c| c.trim().is_empty()) {
                return Err(invalid("column must name a CSV column."));
            }
            store_upload(&req, payload, &state, format, column).await?
        }
    };
    let job = bulk::create_job(&state.db, id, &source).await;
    let job = match job {
        Ok(job) => job,
        Err(error) => {
            if let JobSource::Upload { path, .. } = &source {
                let _ = tokio::fs::remove_file(path).await;
            }
            return Err(ApiError::unavailable(format!("{error:#}")));
        }
    };
    runner.wake();
    tracing::info!(job = job.id, event = %id, "bulk job queued");
    let mut response = json(StatusCode::ACCEPTED, &job.view());
    if let Ok(location) = header::HeaderValue::from_str(&format!("/v1/admin/jobs/{}", job.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

async fn table_source(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
) -> Result<JobSource, ApiError> {
    let request: TableRequest = required_json_body(req, payload, state.body_limit).await?;
    let mut table = request.source;
    let db = state
        .bulk
        .source_db(table.database)
        .await
        .map_err(|e| ApiError::unavailable(format!("{e:#}")))?
        .ok_or_else(|| {
            invalid("No source database is configured (--bulk-source-url); use \"database\": \"server\".")
        })?;
    match check_table(&db, &mut table).await {
        Ok(()) => Ok(JobSource::Table(table)),
        Err(TableRefusal::Invalid(why)) => Err(invalid(why)),
        Err(TableRefusal::Unavailable(error)) => Err(ApiError::unavailable(format!("{error:#}"))),
    }
}

/// Streams the body to a file under the bulk directory, refusing it past the size limit.
async fn store_upload(
    req: &HttpRequest,
    mut payload: web::Payload,
    state: &AppState,
    format: UploadFormat,
    column: Option<String>,
) -> Result<JobSource, ApiError> {
    let limit = state.bulk.settings().max_upload_bytes;
    let too_large = || {
        ApiError::new(
            Code::PayloadTooLarge,
            format!("An upload may hold at most {limit} bytes (--bulk-max-upload-bytes)."),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let dir = &state.bulk.settings().dir;
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| ApiError::unavailable(format!("creating {}: {e}", dir.display())))?;
    let path = dir.join(format!("upload-{}", uuid::Uuid::now_v7().simple()));
    let mut file = tokio::fs::File::create(&path)
        .await
        .map_err(|e| ApiError::unavailable(format!("creating {}: {e}", path.display())))?;
    let mut bytes = 0u64;
    let written: Result<(), ApiError> = async {
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::new(Code::BadRequest, format!("The upload could not be read: {e}."))
            })?;
            bytes += chunk.len() as u64;
            if bytes > limit {
                return Err(too_large());
            }
            file.write_all(&chunk)
                .await
                .map_err(|e| ApiError::unavailable(format!("writing {}: {e}", path.display())))?;
        }
        file.flush()
            .await
            .map_err(|e| ApiError::unavailable(format!("writing {}: {e}", path.display())))?;
        // The job row will point at this file: it must be on disk before the row commits.
        file.sync_all()
            .await
            .map_err(|e| ApiError::unavailable(format!("syncing {}: {e}", path.display())))
    }
    .await;
    if let Err(error) = written {
        drop(file);
        let _ = tokio::fs::remove_file(&path).await;
        return Err(error);
    }
    Ok(JobSource::Upload {
        path,
        format,
        column,
        bytes,
        owned: true,
        prepared: false,
    })
}

fn job_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::new(Code::JobNotFound, format!("No job has id {raw:?}.")))
}

async fn find(state: &AppState, id: i64) -> Result<bulk::Job, ApiError> {
    bulk::find_job(&state.db, id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or_else(|| ApiError::new(Code::JobNotFound, format!("No job has id {id}.")))
}

#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    limit: Option<u64>,
    event_id: Option<String>,
}

/// `GET /v1/admin/jobs`: jobs newest first.
#[utoipa::path(get, path = "/v1/admin/jobs", tag = "bulk", security(("admin_token" = [])),
    params(("limit" = Option<u64>, Query, description = "At most this many, up to 500 [default: 50]"),
        ("event_id" = Option<i64>, Query, description = "Only this event's jobs")),
    responses((status = 200, description = "`{\"jobs\": [...]}`, newest first")))]
pub(super) async fn list(
    _: Admin,
    query: web::Query<ListQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let event: Option<EventId> = query.event_id.as_deref().map(event_id).transpose()?;
    let limit = query.limit.unwrap_or(50).clamp(1, 500);
    let jobs = bulk::list_jobs(&state.db, event, limit)
        .await
        .map_err(ApiError::unavailable)?;
    let views: Vec<_> = jobs.iter().map(bulk::Job::view).collect();
    Ok(json(StatusCode::OK, &json!({ "jobs": views })))
}

/// `GET /v1/admin/jobs/{id}`: state, totals, rate and ETA.
#[utoipa::path(get, path = "/v1/admin/jobs/{id}", tag = "bulk", security(("admin_token" = [])),
    params(("id" = i64, Path, description = "Job id")), responses(
    (status = 200, description = "The job"),
    (status = 404, description = "job_not_found", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn read(
    _: Admin,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let job = find(&state, job_id(&path)?).await?;
    Ok(json(StatusCode::OK, &job.view()))
}

/// `POST /v1/admin/jobs/{id}/cancel`: a queued job ends now, a running one after its chunk.
#[utoipa::path(post, path = "/v1/admin/jobs/{id}/cancel", tag = "bulk", security(("admin_token" = [])),
    params(("id" = i64, Path, description = "Job id")), responses(
    (status = 200, description = "The job: `cancelled`, or `running` with `cancel_requested`"),
    (status = 404, description = "job_not_found", body = Problem, content_type = "application/problem+json"),
    (status = 409, description = "invalid_state: the job has ended", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn cancel(
    _: Admin,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = job_id(&path)?;
    match bulk::cancel_job(&state.db, id)
        .await
        .map_err(ApiError::unavailable)?
    {
        CancelOutcome::Done(job) => {
            tracing::info!(job = id, state = job.state.as_str(), "bulk job cancel requested");
            Ok(json(StatusCode::OK, &job.view()))
        }
        CancelOutcome::AlreadyFinished(job) => Err(ApiError::new(
            Code::InvalidState,
            format!("Job {id} has already ended ({}).", job.state.as_str()),
        )),
        CancelOutcome::NotFound => Err(ApiError::new(Code::JobNotFound, format!("No job has id {id}."))),
    }
}

/// `POST /v1/admin/jobs/{id}/revoke`: every grant the job issued becomes `revoked`; the units
/// return to stock.
#[utoipa::path(post, path = "/v1/admin/jobs/{id}/revoke", tag = "bulk", security(("admin_token" = [])),
    params(("id" = i64, Path, description = "Job id")), responses(
    (status = 200, description = "`{\"revoked\": n, \"job\": {...}}`"),
    (status = 404, description = "job_not_found", body = Problem, content_type = "application/problem+json"),
    (status = 409, description = "invalid_state: the job has not ended", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn revoke(
    _: Admin,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let job = find(&state, job_id(&path)?).await?;
    if !job.state.is_final() || job.state == JobState::Queued {
        return Err(ApiError::new(
            Code::InvalidState,
            format!(
                "Job {} is {}; revoke it once it has ended (or cancel it first).",
                job.id,
                job.state.as_str()
            ),
        ));
    }
    let revoked = state
        .bulk
        .revoke(&job)
        .await
        .map_err(|e| ApiError::unavailable(format!("{e:#}")))?;
    Ok(json(
        StatusCode::OK,
        &json!({ "revoked": revoked, "job": job.view() }),
    ))
}
