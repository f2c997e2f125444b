//! Reservations: the hot `POST /v1/events/{id}/reservations`, and a user's own reads, confirms
//! and cancels. A user only ever sees their own reservations; anyone else's is a 404.

use actix::Addr;
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::extract::{IdemKey, User, event_id, json_body, reservation_id};
use super::{AppState, json, resource};
use crate::actors::event::{Cancel, Confirm, Reserve};
use crate::actors::{EventActor, Refusal};
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
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveBody {
    quantity: Option<i64>,
}

pub(super) async fn event_actor(state: &AppState, id: EventId) -> Result<Addr<EventActor>, ApiError> {
    state
        .registry
        .actor(id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or_else(|| ApiError::new(Code::EventNotFound, format!("No event has id {id}.")))
}

async fn reserve(
    path: web::Path<String>,
    User(user): User,
    IdemKey(key): IdemKey,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = event_id(&path)?;
    let body: Option<ReserveBody> = json_body(&req, payload, state.body_limit).await?;
    let quantity = match body.and_then(|b| b.quantity) {
        None => Quantity::ONE,
        Some(raw) => Quantity::parse(raw).map_err(|e| ApiError::new(Code::InvalidQuantity, e.0))?,
    };
    let actor = event_actor(&state, id).await?;
    let reserved = actor
        .send(Reserve { user, quantity, key })
        .await?
        .outcome()
        .await?;
    let mut response = json(StatusCode::CREATED, &reserved.reservation);
    if reserved.replayed {
        response.headers_mut().insert(
            "idempotent-replayed"
                .try_into()
                .map_err(|_| ApiError::new(Code::Internal, "header"))?,
            "true"
                .try_into()
                .map_err(|_| ApiError::new(Code::Internal, "header"))?,
        );
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

async fn read(
    path: web::Path<String>,
    User(user): User,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let reservation = own_reservation(&state, &path, &user).await?;
    Ok(json(StatusCode::OK, &reservation))
}

async fn confirm(
    path: web::Path<String>,
    User(user): User,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let found = own_reservation(&state, &path, &user).await?;
    let actor = event_actor(&state, found.event_id).await?;
    match actor
        .send(Confirm {
            id: found.id,
            user: user.clone(),
        })
        .await?
        .outcome()
        .await
    {
        Ok(reserved) => Ok(json(StatusCode::OK, &reserved.reservation)),
        // The reservation no longer counts: say why from its final, committed state.
        Err(Refusal::Ended) => match find_own(&state, found.id, &user).await?.map(|r| r.status) {
            Some(ReservationStatus::Expired) => Err(Refusal::HoldExpired.into()),
            Some(status) => Err(Refusal::InvalidState(format!(
                "a reservation that is {} cannot be confirmed",
                status.as_str()
            ))
            .into()),
            None => Err(Refusal::UnknownReservation.into()),
        },
        Err(refusal) => Err(refusal.into()),
    }
}

async fn cancel(
    path: web::Path<String>,
    User(user): User,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let found = own_reservation(&state, &path, &user).await?;
    let actor = event_actor(&state, found.event_id).await?;
    match actor
        .send(Cancel {
            id: found.id,
            user: user.clone(),
        })
        .await?
        .outcome()
        .await
    {
        Ok(reserved) => Ok(json(StatusCode::OK, &reserved.reservation)),
        // Already cancelled, revoked or expired: cancelling again changes nothing.
        Err(Refusal::Ended) => {
            let current = find_own(&state, found.id, &user)
                .await?
                .ok_or(Refusal::UnknownReservation)?;
            Ok(json(StatusCode::OK, &current))
        }
        Err(refusal) => Err(refusal.into()),
    }
}

/// The most reservations `GET /v1/me/reservations` returns, newest first.
const MINE_LIMIT: u64 = 100;

async fn mine(User(user): User, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let reservations = store::list_user_reservations(&state.db, &user, MINE_LIMIT)
        .await
        .map_err(ApiError::unavailable)?;
    let now = crate::domain::now();
    let reservations: Vec<Reservation> = reservations.into_iter().map(|r| r.as_of(now)).collect();
    Ok(json(StatusCode::OK, &json!({ "reservations": reservations })))
}
