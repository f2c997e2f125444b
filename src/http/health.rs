//! Liveness and readiness probes.

use actix_web::{HttpResponse, web};

use super::docs::Problem;
use super::{AppState, resource};
use crate::error::ApiError;
use crate::store;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/healthz").route(web::get().to(healthz)))
        .service(resource("/readyz").route(web::get().to(readyz)));
}

/// The process is up. No I/O: this is also the HTTP ceiling the benchmarks compare against.
#[utoipa::path(get, path = "/healthz", tag = "probes",
    responses((status = 200, description = "The process is up")))]
pub(super) async fn healthz() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(r#"{"status":"ok"}"#)
}

/// The database answers (and, with several nodes, Redis).
#[utoipa::path(get, path = "/readyz", tag = "probes", responses(
    (status = 200, description = "The database (and Redis, with several nodes) answers"),
    (status = 503, description = "The database or Redis does not answer", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    store::ping(&state.db)
        .await
        .map_err(|e| ApiError::unavailable(format!("{e:#}")))?;
    if let Some(cluster) = &state.cluster {
        cluster
            .ping()
            .await
            .map_err(|e| ApiError::unavailable(format!("{e:#}")))?;
    }
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(r#"{"status":"ready"}"#))
}
