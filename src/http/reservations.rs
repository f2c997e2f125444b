//! Reservations: the hot `POST /v1/events/{id}/reservations`, and a user's own reads, confirms
//! and cancels. A user only ever sees their own reservations; anyone else's is a 404.

use super::docs::Problem;
use actix_web::http::StatusCode;
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::extract::{IdemKey, User, event_id, json_body, reservation_id};
use super::{AppState, json, resource};
use crate::actors::event::{Cancel, Confirm, Reserve};
use crate::actors::{EventActor, EventHandle, Refusal, Reply, reply_channel};
use crate::cluster::ClusterEventActor;
use crate::domain::{EventId, Quantity, Reservation, ReservationId, ReservationStatus, UserId};
use crate::error::{ApiError, Code};
use crate::store;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/events/{id}/reservations").route(web::post().to(reserve)))
        .service(resource("/v1/reservations/{id}").route(web::get().to(read)))
        .service(resource("/v1/reservations/{id}/confirm").route(web::post().to(confirm)))
        .service(resource("/v1/reservations/{id}/cancel").route(web::post().to(cancel)))
        .service(resource("/v1/me/reservations").route(web::get().to(mine)));
}

/// The reservation request body; an empty body means quantity 1.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ReserveBody {
    /// Units to reserve (default 1; at most the event's `max_per_request`).
    #[schema(minimum = 1)]
    quantity: Option<i64>,
}

pub(super) async fn event_actor(state: &AppState, id: EventId) -> Result<EventHandle, ApiError> {
    state
        .registry
        .actor(id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or_else(|| ApiError::new(Code::EventNotFound, format!("No event has id {id}.")))
}

/// `POST /v1/events/{id}/reservations`, counted by outcome.
#[utoipa::path(post, path = "/v1/events/{id}/reservations", tag = "reservations",
    security(("user_header" = []), ("user_jwt" = [])),
    params(("id" = i64, Path, description = "Event id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key replay the first answer")),
    request_body(content = ReserveBody, description = "Optional; an empty body means quantity 1"),
    responses(
    (status = 201, description = "Reserved and committed to the database", body = Reservation),
    (status = 409, description = "sold_out, insufficient_stock, limit_reached, not_open, closed or idempotency_in_flight", body = Problem, content_type = "application/problem+json"),
    (status = 404, description = "event_not_found", body = Problem, content_type = "application/problem+json"),
    (status = 422, description = "invalid_quantity or idempotency_key_reused", body = Problem, content_type = "application/problem+json"),
    (status = 503, description = "unavailable (with Retry-After): nothing was reserved", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn reserve(
    user: User,
    key: IdemKey,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let result = reserve_units(user, key, req, payload, state).await;
    let outcome = match &result {
        Ok(response) if response.headers().contains_key(REPLAYED) => "replayed",
        Ok(_) => "created",
        Err(error) => error.code.name(),
    };
    crate::metrics::count_reservation(outcome);
    result
}

/// The header that marks a replayed answer to a retried `Idempotency-Key`.
const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

async fn reserve_units(
    User(user): User,
    IdemKey(key): IdemKey,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    // why not `web::Path<String>`: the hot route reads its id in place instead of copying it
    // into a `String` for every claim.
    let id = event_id(req.match_info().get("id").unwrap_or_default())?;
    let body: Option<ReserveBody> = json_body(&req, payload, state.body_limit).await?;
    let quantity = match body.and_then(|b| b.quantity) {
        None => Quantity::ONE,
        Some(raw) => Quantity::parse(raw).map_err(|e| ApiError::new(Code::InvalidQuantity, e.0))?,
    };
    // A retry with a key goes to the actor, which replays its first answer. An event whose actor
    // is not running yet is not known to be sold out: its actor starts and answers.
    if key.is_none() && state.registry.sold_out(id, crate::domain::now()) {
        return Err(ApiError::sold_out());
    }
    let event = event_actor(&state, id).await?;
    let (reply, answer) = reply_channel();
    send_queued(
        &event,
        Reserve {
            user,
            quantity,
            key,
            reply,
        },
    )?;
    let reserved = answer.await?;
    let mut response = json(StatusCode::CREATED, &reserved.reservation);
    if reserved.replayed {
        response
            .headers_mut()
            .insert(REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// The caller's reservation `raw`, or 404 whether it does not exist or belongs to someone else.
async fn own_reservation(state: &AppState, raw: &str, user: &UserId) -> Result<Reservation, ApiError> {
    let id = reservation_id(raw)?;
    find_own(state, id, user).await?.ok_or_else(|| {
        ApiError::new(
            Code::ReservationNotFound,
            format!("No reservation has id {raw:?}."),
        )
    })
}

async fn find_own(
    state: &AppState,
    id: ReservationId,
    user: &UserId,
) -> Result<Option<Reservation>, ApiError> {
    let found = store::find_reservation(&state.db, id)
        .await
        .map_err(ApiError::unavailable)?;
    Ok(found.filter(|r| &r.user_id == user))
}

#[utoipa::path(get, path = "/v1/reservations/{id}", tag = "reservations",
    security(("user_header" = []), ("user_jwt" = [])),
    params(("id" = String, Path, description = "Reservation id")), responses(
    (status = 200, body = Reservation),
    (status = 404, description = "reservation_not_found (also for someone else's)", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn read(
    path: web::Path<String>,
    User(user): User,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let reservation = own_reservation(&state, &path, &user).await?;
    Ok(json(StatusCode::OK, &reservation))
}

/// What a confirm or cancel found.
enum Change {
    /// The actor applied it and it committed.
    Applied(Reservation),
    /// The reservation no longer counts against stock (cancelled, revoked, expired): its
    /// committed state, for the route to say what that means.
    Ended(Reservation),
}

/// Sends a confirm or cancel of the caller's reservation `raw` to its event actor.
async fn change_own<M>(
    state: &AppState,
    raw: &str,
    user: UserId,
    message: impl FnOnce(ReservationId, UserId, Reply) -> M,
) -> Result<Change, ApiError>
where
    M: actix::Message<Result = ()> + Send + 'static,
    EventActor: actix::Handler<M>,
    ClusterEventActor: actix::Handler<M>,
{
    let found = own_reservation(state, raw, &user).await?;
    let event = event_actor(state, found.event_id).await?;
    let (reply, answer) = reply_channel();
    send_queued(&event, message(found.id, user.clone(), reply))?;
    match answer.await {
        Ok(done) => Ok(Change::Applied(done.reservation)),
        Err(Refusal::Ended) => {
            let current = find_own(state, found.id, &user)
                .await?
                .ok_or(Refusal::UnknownReservation)?;
            Ok(Change::Ended(current))
        }
        Err(refusal) => Err(refusal.into()),
    }
}

/// Hands a request to the event's actor if its queue has room; otherwise sheds it at once with
/// 503 `overloaded` rather than queue it without bound.
fn send_queued<M>(event: &EventHandle, message: M) -> Result<(), ApiError>
where
    M: actix::Message<Result = ()> + Send + 'static,
    EventActor: actix::Handler<M>,
    ClusterEventActor: actix::Handler<M>,
{
    const SHED: &str = "This event's queue is full; nothing was changed. Retry after Retry-After seconds.";
    if !event.admission.enqueue() {
        metrics::counter!(crate::metrics::SHED_TOTAL).increment(1);
        return Err(ApiError::overloaded(SHED));
    }
    event.actor.try_send(message).map_err(|error| {
        event.admission.dequeued();
        match error {
            actix::prelude::SendError::Full(_) => ApiError::overloaded(SHED),
            actix::prelude::SendError::Closed(_) => {
                ApiError::unavailable("the event's actor is not accepting messages")
            }
        }
    })
}

#[utoipa::path(post, path = "/v1/reservations/{id}/confirm", tag = "reservations",
    security(("user_header" = []), ("user_jwt" = [])),
    params(("id" = String, Path, description = "Reservation id")), responses(
    (status = 200, description = "Held → confirmed", body = Reservation),
    (status = 404, body = Problem, content_type = "application/problem+json"),
    (status = 409, description = "hold_expired or invalid_state", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn confirm(
    path: web::Path<String>,
    User(user): User,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    match change_own(&state, &path, user, |id, user, reply| Confirm { id, user, reply }).await? {
        Change::Applied(confirmed) => Ok(json(StatusCode::OK, &confirmed)),
        Change::Ended(ended) if ended.status == ReservationStatus::Expired => {
            Err(Refusal::HoldExpired.into())
        }
        Change::Ended(ended) => Err(Refusal::InvalidState(format!(
            "a reservation that is {} cannot be confirmed",
            ended.status.as_str()
        ))
        .into()),
    }
}

#[utoipa::path(post, path = "/v1/reservations/{id}/cancel", tag = "reservations",
    security(("user_header" = []), ("user_jwt" = [])),
    params(("id" = String, Path, description = "Reservation id")), responses(
    (status = 200, description = "Cancelled; the units return to stock", body = Reservation),
    (status = 404, body = Problem, content_type = "application/problem+json"),
    (status = 409, description = "invalid_state", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn cancel(
    path: web::Path<String>,
    User(user): User,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    match change_own(&state, &path, user, |id, user, reply| Cancel { id, user, reply }).await? {
        // Cancelling what has already ended changes nothing.
        Change::Applied(reservation) | Change::Ended(reservation) => Ok(json(StatusCode::OK, &reservation)),
    }
}

/// The most reservations `GET /v1/me/reservations` returns, newest first.
const MINE_LIMIT: u64 = 100;

#[utoipa::path(get, path = "/v1/me/reservations", tag = "reservations",
    security(("user_header" = []), ("user_jwt" = [])), responses(
    (status = 200, description = "The caller's reservations, newest first (at most 100)")))]
pub(super) async fn mine(User(user): User, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let reservations = match &state.user_index {
        Some(index) => {
            let ids = index.newest(&user, MINE_LIMIT as usize);
            store::user_reservations_by_id(&state.db, &user, ids).await
        }
        None => store::list_user_reservations(&state.db, &user, MINE_LIMIT).await,
    }
    .map_err(ApiError::unavailable)?;
    let now = crate::domain::now();
    let reservations: Vec<Reservation> = reservations.into_iter().map(|r| r.as_of(now)).collect();
    Ok(json(StatusCode::OK, &json!({ "reservations": reservations })))
}
