//! Parsing requests into domain types: who is calling, which key, which body.

use std::future::{Ready, ready};

use actix_web::http::header;
use actix_web::{FromRequest, HttpMessage, HttpRequest, dev::Payload, web};
use serde::de::DeserializeOwned;

use super::AppState;
use super::auth::Authenticator;
use crate::domain::{EventId, IdempotencyKey, ReservationId, UserId};
use crate::error::{ApiError, Code};

/// The calling user: the bearer token's `sub`, or the gateway's `X-User-Id` in trusted-header
/// mode (see [`super::auth::Authenticator::user`]).
pub struct User(pub UserId);

impl FromRequest for User {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let remembered = req.extensions().get::<Caller>().map(|caller| caller.0.clone());
        ready(
            remembered
                .unwrap_or_else(|| authenticator(req).and_then(|auth| auth.user(req.headers())))
                .map(User),
        )
    }
}

/// A request's authentication outcome, kept in its extensions by [`remember_caller`].
#[derive(Clone)]
struct Caller(Result<UserId, ApiError>);

/// Authenticates the caller of `req` and keeps the outcome for the route's [`User`] extractor,
/// so a request is verified once even when middleware (the rate limiter) needs the user first.
/// `None` if the request does not authenticate (its route then answers 401).
pub fn remember_caller(req: &HttpRequest) -> Option<UserId> {
    let outcome = authenticator(req).and_then(|auth| auth.user(req.headers()));
    let user = outcome.as_ref().ok().cloned();
    req.extensions_mut().insert(Caller(outcome));
    user
}

/// An operator: an admin token, or a user token with the admin role.
pub struct Admin;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticator(req).and_then(|auth| auth.admin(req.headers()).map(|()| Admin)))
    }
}

fn authenticator(req: &HttpRequest) -> Result<&Authenticator, ApiError> {
    req.app_data::<web::Data<AppState>>()
        .map(|state| &*state.auth)
        .ok_or_else(|| ApiError::new(Code::Internal, "The server is misconfigured."))
}

/// The optional `Idempotency-Key` header.
pub struct IdemKey(pub Option<IdempotencyKey>);

const IDEMPOTENCY_KEY: header::HeaderName = header::HeaderName::from_static("idempotency-key");

impl FromRequest for IdemKey {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let parsed = match req.headers().get(IDEMPOTENCY_KEY) {
            None => Ok(IdemKey(None)),
            Some(value) => value
                .to_str()
                .map_err(|_| "Idempotency-Key may contain only visible ASCII characters".to_owned())
                .and_then(|raw| IdempotencyKey::parse(raw).map_err(|e| e.to_string()))
                .map(|key| IdemKey(Some(key)))
                .map_err(|why| {
                    ApiError::new(
                        Code::InvalidIdempotencyKey,
                        // `why` names the header itself.
                        format!("{why}."),
                    )
                }),
        };
        ready(parsed)
    }
}

pub fn event_id(raw: &str) -> Result<EventId, ApiError> {
    EventId::parse(raw).ok_or_else(|| ApiError::new(Code::EventNotFound, format!("No event has id {raw:?}.")))
}

pub fn reservation_id(raw: &str) -> Result<ReservationId, ApiError> {
    ReservationId::parse(raw).ok_or_else(|| {
        ApiError::new(
            Code::ReservationNotFound,
            format!("No reservation has id {raw:?}."),
        )
    })
}

/// Reads a JSON body of at most `limit` bytes; `None` when the body is empty.
pub async fn json_body<T: DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
) -> Result<Option<T>, ApiError> {
    let too_large = || {
        ApiError::new(
            Code::PayloadTooLarge,
            format!("The body must be at most {limit} bytes."),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let bytes = payload
        .to_bytes_limited(limit)
        .await
        .map_err(|_| too_large())?
        .map_err(|e| ApiError::new(Code::BadRequest, format!("The body could not be read: {e}.")))?;
    if bytes.is_empty() {
        return Ok(None);
    }
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<mime::Mime>().ok())
        .is_some_and(|m| {
            m.type_() == mime::APPLICATION && (m.subtype() == mime::JSON || m.suffix() == Some(mime::JSON))
        });
    if !is_json {
        return Err(ApiError::new(
            Code::UnsupportedMediaType,
            "The body must be sent as Content-Type: application/json.",
        ));
    }
    // why: serde's derived structs also accept a JSON array read field by field (`[2]` would be
    // quantity 2); our bodies are objects only.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return match serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
            Ok(_) => Err(ApiError::new(
                Code::InvalidBody,
                "The body must be a JSON object.",
            )),
            Err(e) => Err(ApiError::new(
                Code::MalformedJson,
                format!("The body is not valid JSON: {e}."),
            )),
        };
    }
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        let code = if e.is_data() {
            Code::InvalidBody
        } else {
            Code::MalformedJson
        };
        ApiError::new(code, format!("The body is not acceptable: {e}."))
    })
}

/// Like [`json_body`], for routes where the body is required.
pub async fn required_json_body<T: DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
) -> Result<T, ApiError> {
    json_body(req, payload, limit)
        .await?
        .ok_or_else(|| ApiError::new(Code::InvalidBody, "A JSON body is required."))
}
