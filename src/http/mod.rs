//! # HTTP edge
//!
//! Handlers only parse (into `crate::domain` types), send a message to an actor (or read the
//! database for plain lookups), and render the answer. Every error leaves as problem+json: our
//! own through [`ApiError`], and anything actix-web produces itself (unknown route, wrong method,
//! oversized body) through [`problem_safety_net`].

mod admin;
pub mod auth;
mod bulk;
pub mod docs;
mod events;
mod extract;
mod health;
mod live;
mod observe;
pub mod rate_limit;
mod reservations;

use std::sync::Arc;

use actix_web::dev::ServiceResponse;
use actix_web::http::header::CONTENT_TYPE;
use actix_web::middleware::ErrorHandlerResponse;
use actix_web::{HttpResponse, ResponseError, web};
use sea_orm::DatabaseConnection;

use crate::actors::{PersisterStats, Refusal, Registry};
use crate::error::{ApiError, Code};

pub use observe::observe;

/// What every handler can reach.
pub struct AppState {
    pub registry: Arc<Registry>,
    pub db: DatabaseConnection,
    pub auth: Arc<auth::Authenticator>,
    pub body_limit: usize,
    pub persister_stats: Arc<PersisterStats>,
    /// SQLite: where `GET /v1/me/reservations` finds a user's reservation ids.
    pub user_index: Option<Arc<crate::store::UserIndex>>,
    /// `None` when rate limiting is off.
    pub rate_limits: Option<Arc<rate_limit::RateLimits>>,
    /// Several nodes: the shared Redis ledger (`None` on one node).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Bulk issuance: settings, the job queue's wake-up, revocation.
    pub bulk: Arc<crate::bulk::BulkRunner>,
}

/// Registers every route.
///
/// why this order: actix-web tries resources in registration order, and each pattern with an
/// `{id}` is a regex match. The probes and the reservation routes, the hot ones, come first, so
/// a reservation is not first tried against `/v1/events/{id}`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    health::configure(cfg);
    reservations::configure(cfg);
    events::configure(cfg);
    admin::configure(cfg);
    bulk::configure(cfg);
    observe::configure(cfg);
    docs::configure(cfg);
    live::configure(cfg);
}

/// The answer to a path that names no route.
pub async fn not_found() -> HttpResponse {
    ApiError::new(Code::NotFound, "No route matches this path.").error_response()
}

/// The answer to a known path with a method it does not take.
async fn method_not_allowed() -> HttpResponse {
    ApiError::new(Code::MethodNotAllowed, "This path does not accept this method.").error_response()
}

/// A resource whose other methods get a problem+json 405, and which names its pattern to the
/// request metrics ([`observe::RoutePattern`]).
fn resource(path: &'static str) -> actix_web::Resource {
    web::resource(path)
        .app_data(observe::RoutePattern(path))
        .default_service(web::to(method_not_allowed))
}

/// Turns any error response that is not already problem+json into one, so clients see a single
/// error shape whatever produced the error.
pub fn problem_safety_net<B>(res: ServiceResponse<B>) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let is_problem = res
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/problem+json");
    if is_problem {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let code = match status.as_u16() {
        404 => Code::NotFound,
        405 => Code::MethodNotAllowed,
        413 => Code::PayloadTooLarge,
        415 => Code::UnsupportedMediaType,
        500.. => Code::Internal,
        _ => Code::BadRequest,
    };
    let detail = res.response().error().map_or_else(
        || status.canonical_reason().unwrap_or("error").to_owned(),
        ToString::to_string,
    );
    let (req, _) = res.into_parts();
    let mut problem = ApiError::new(code, detail).error_response();
    *problem.status_mut() = status;
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, problem).map_into_right_body(),
    ))
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        // Rendered only where the detail is the refusal's text: the hottest refusal, sold out,
        // formats nothing.
        let detail = || refusal.to_string();
        match &refusal {
            Refusal::SoldOut => ApiError::sold_out(),
            Refusal::InsufficientStock { remaining } => {
                ApiError::new(Code::InsufficientStock, detail()).with("remaining", *remaining)
            }
            Refusal::LimitReached { limit } => {
                ApiError::new(Code::LimitReached, detail()).with("limit", *limit)
            }
            Refusal::NotOpen(at) => ApiError::new(Code::NotOpen, detail()).with("opens_at", at.to_rfc3339()),
            Refusal::Closed => ApiError::new(Code::Closed, detail()),
            Refusal::QuantityOverMax { max } => {
                ApiError::new(Code::InvalidQuantity, detail()).with("max_per_request", *max)
            }
            Refusal::HoldExpired => ApiError::new(Code::HoldExpired, detail()),
            Refusal::InvalidState(_) | Refusal::Ended => ApiError::new(Code::InvalidState, detail()),
            Refusal::KeyInFlight => ApiError::new(Code::IdempotencyInFlight, detail()),
            Refusal::KeyReused { .. } => ApiError::new(Code::IdempotencyKeyReused, detail()),
            Refusal::InvalidPatch(_) => ApiError::new(Code::InvalidEvent, detail()),
            Refusal::UnknownReservation => ApiError::new(Code::ReservationNotFound, "No such reservation."),
            Refusal::EventGone => ApiError::new(Code::EventNotFound, "No such event."),
            Refusal::Unavailable => ApiError::unavailable(detail()),
        }
    }
}

impl From<actix::MailboxError> for ApiError {
    fn from(error: actix::MailboxError) -> Self {
        ApiError::unavailable(format!("event actor unreachable: {error}"))
    }
}

/// A successful JSON answer.
fn json<T: serde::Serialize>(status: actix_web::http::StatusCode, body: &T) -> HttpResponse {
    HttpResponse::build(status).json(body)
}
