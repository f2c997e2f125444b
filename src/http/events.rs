//! `/v1/events`: creating, reading and changing drops.

use super::docs::Problem;
use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};

use super::extract::{Admin, event_id, required_json_body};
use super::{AppState, json, resource};
use crate::actors::EventSnapshot;
use crate::actors::event::{Snapshot, UpdateEvent};
use crate::domain::{EventPatch, EventSpec, Inventory};
use crate::error::{ApiError, Code};
use crate::store;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/events").route(web::post().to(create)))
        .service(
            resource("/v1/events/{id}")
                .route(web::get().to(read))
                .route(web::patch().to(update)),
        );
}

#[utoipa::path(post, path = "/v1/events", tag = "events", security(("admin_token" = [])),
    request_body = EventSpec, responses(
    (status = 201, description = "The event, with its id", body = EventSnapshot),
    (status = 401, body = Problem, content_type = "application/problem+json"),
    (status = 403, body = Problem, content_type = "application/problem+json"),
    (status = 422, description = "invalid_event", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn create(
    _: Admin,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let spec: EventSpec = required_json_body(&req, payload, state.body_limit).await?;
    let now = crate::domain::now();
    let event = spec
        .validate(now)
        .map_err(|e| ApiError::new(Code::InvalidEvent, e.0))?;
    let event = store::create_event(&state.db, event)
        .await
        .map_err(ApiError::unavailable)?;
    let inventory = Inventory {
        stock: event.stock,
        held: 0,
        sold: 0,
    };
    let snapshot = EventSnapshot {
        status: event.status(inventory, now),
        remaining: event.stock,
        held: 0,
        sold: 0,
        event,
    };
    let mut response = json(StatusCode::CREATED, &snapshot);
    if let Ok(location) = header::HeaderValue::from_str(&format!("/v1/events/{}", snapshot.event.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

#[utoipa::path(get, path = "/v1/events/{id}", tag = "events",
    params(("id" = i64, Path, description = "Event id")), responses(
    (status = 200, description = "The event with live remaining, held, sold and status", body = EventSnapshot),
    (status = 404, description = "event_not_found", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn read(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let actor = super::reservations::event_actor(&state, event_id(&path)?).await?;
    let snapshot = actor.actor.send(Snapshot).await??;
    Ok(json(StatusCode::OK, &snapshot))
}

#[utoipa::path(patch, path = "/v1/events/{id}", tag = "events", security(("admin_token" = [])),
    params(("id" = i64, Path, description = "Event id")), request_body = EventPatch, responses(
    (status = 200, description = "The changed event", body = EventSnapshot),
    (status = 404, description = "event_not_found", body = Problem, content_type = "application/problem+json"),
    (status = 422, description = "invalid_event: e.g. stock below held + sold", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn update(
    _: Admin,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = event_id(&path)?;
    let patch: EventPatch = required_json_body(&req, payload, state.body_limit).await?;
    let actor = super::reservations::event_actor(&state, id).await?;
    let snapshot = actor.actor.send(UpdateEvent(patch)).await??;
    Ok(json(StatusCode::OK, &snapshot))
}
