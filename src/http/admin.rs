//! Operator-only views.

use super::docs::Problem;
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use serde_json::json;
use std::sync::atomic::Ordering;

use super::extract::Admin;
use super::{AppState, json, resource};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/admin/stats").route(web::get().to(stats)));
}

/// Persister batching figures, event-actor restarts and rate-limit refusals, for operators and
/// the benchmark.
#[utoipa::path(get, path = "/v1/admin/stats", tag = "admin", security(("admin_token" = [])), responses(
    (status = 200, description = "Persister batching figures and event-actor restarts"),
    (status = 401, body = Problem, content_type = "application/problem+json"),
    (status = 403, body = Problem, content_type = "application/problem+json")))]
pub(super) async fn stats(_: Admin, state: web::Data<AppState>) -> HttpResponse {
    let lifecycle = state.registry.lifecycle();
    json(
        StatusCode::OK,
        &json!({
            "persister": state.persister_stats.view(),
            "event_actors": {
                "starts": lifecycle.starts.load(Ordering::Relaxed),
                "restarts": lifecycle.restarts.load(Ordering::Relaxed),
            },
            "rate_limits": state.rate_limits.as_ref().map(|limits| json!({
                "refused": limits.refused(),
                "keys": limits.keys(),
            })),
        }),
    )
}
