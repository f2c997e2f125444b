//! Every error a client can see: one table of codes (code → HTTP status → snake_case name), and
//! one body shape, RFC 9457 `application/problem+json` with our stable `code`.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::web::Bytes;
use actix_web::{HttpResponse, ResponseError};
use std::borrow::Cow;
use std::sync::LazyLock;

use serde::Serialize;
use serde_json::{Map, Value};

macro_rules! error_codes {
    ($($variant:ident => $status:ident, $name:literal, $title:literal;)*) => {
        /// A stable, machine-readable reason for a refusal.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Code { $($variant),* }

        impl Code {
            pub fn status(self) -> StatusCode {
                match self { $(Self::$variant => StatusCode::$status),* }
            }
            /// The `code` member of the problem body.
            pub fn name(self) -> &'static str {
                match self { $(Self::$variant => $name),* }
            }
            /// The problem type's short, human-readable summary.
            pub fn title(self) -> &'static str {
                match self { $(Self::$variant => $title),* }
            }
            /// The problem type's URI, the `type` member of the body.
            pub fn type_uri(self) -> &'static str {
                match self { $(Self::$variant => concat!("urn:firstcome:problem:", $name)),* }
            }
        }
    };
}

error_codes! {
    MalformedJson => BAD_REQUEST, "malformed_json", "The body is not valid JSON";
    InvalidIdempotencyKey => BAD_REQUEST, "invalid_idempotency_key", "The Idempotency-Key header is malformed";
    BadRequest => BAD_REQUEST, "bad_request", "The request is malformed";
    MissingUser => UNAUTHORIZED, "missing_user", "The request does not identify a user";
    InvalidToken => UNAUTHORIZED, "invalid_token", "The bearer token is not valid";
    Unauthorized => UNAUTHORIZED, "unauthorized", "Admin credentials are required";
    Forbidden => FORBIDDEN, "forbidden", "These credentials may not do this";
    NotFound => NOT_FOUND, "not_found", "No such resource";
    EventNotFound => NOT_FOUND, "event_not_found", "No such event";
    ReservationNotFound => NOT_FOUND, "reservation_not_found", "No such reservation";
    JobNotFound => NOT_FOUND, "job_not_found", "No such bulk job";
    OriginNotAllowed => FORBIDDEN, "origin_not_allowed", "This Origin may not open a WebSocket";
    UpgradeRequired => UPGRADE_REQUIRED, "upgrade_required", "This route needs a WebSocket upgrade";
    MethodNotAllowed => METHOD_NOT_ALLOWED, "method_not_allowed", "This method is not allowed here";
    SoldOut => CONFLICT, "sold_out", "Sold out";
    InsufficientStock => CONFLICT, "insufficient_stock", "Fewer units remain than requested";
    LimitReached => CONFLICT, "limit_reached", "The per-user limit is reached";
    NotOpen => CONFLICT, "not_open", "The event is not open yet";
    Closed => CONFLICT, "closed", "The event is closed";
    HoldExpired => CONFLICT, "hold_expired", "The hold has expired";
    InvalidState => CONFLICT, "invalid_state", "The reservation is not in a state that allows this";
    IdempotencyInFlight => CONFLICT, "idempotency_in_flight", "A request with this Idempotency-Key is still in progress";
    BulkUnsupported => CONFLICT, "bulk_unsupported", "Bulk issuance is not available on this deployment";
    PayloadTooLarge => PAYLOAD_TOO_LARGE, "payload_too_large", "The body is too large";
    UnsupportedMediaType => UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "The body must be application/json";
    InvalidBody => UNPROCESSABLE_ENTITY, "invalid_body", "The body does not have the expected shape";
    InvalidQuantity => UNPROCESSABLE_ENTITY, "invalid_quantity", "The quantity is not allowed";
    InvalidEvent => UNPROCESSABLE_ENTITY, "invalid_event", "The event settings are not valid";
    InvalidBulkIssue => UNPROCESSABLE_ENTITY, "invalid_bulk_issue", "The bulk issue cannot be run as asked";
    IdempotencyKeyReused => UNPROCESSABLE_ENTITY, "idempotency_key_reused", "This Idempotency-Key was used with a different request";
    RateLimited => TOO_MANY_REQUESTS, "rate_limited", "Too many requests";
    Unavailable => SERVICE_UNAVAILABLE, "unavailable", "The service cannot commit right now";
    Overloaded => SERVICE_UNAVAILABLE, "overloaded", "The server is too busy to take this request now";
    Internal => INTERNAL_SERVER_ERROR, "internal", "Internal error";
}

/// The RFC 9457 body: the standard members, our `code`, and any extension members.
#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'static str,
    status: u16,
    detail: &'a str,
    code: &'static str,
    #[serde(flatten)]
    extra: &'a Map<String, Value>,
}

/// Seconds a client should wait after a 503 before retrying.
pub const RETRY_AFTER_SECONDS: u32 = 1;

/// An error on its way to the client as problem+json.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {detail}", code.name())]
pub struct ApiError {
    pub code: Code,
    pub detail: Cow<'static, str>,
    /// Extension members added to the body (e.g. `remaining`), by [`ApiError::with`].
    extra: Cow<'static, Map<String, Value>>,
    /// The body, rendered once in advance from the fields above (see [`ApiError::sold_out`]).
    rendered: Option<&'static [u8]>,
}

/// The sold-out refusal, body rendered once.
///
/// why: it is the answer most of a stampede gets, from memory and as fast as the server can
/// answer at all; serializing the same problem document for each of them is wasted work. Its
/// copies borrow the members and the body from here, so answering one allocates nothing of ours.
static SOLD_OUT: LazyLock<ApiError> = LazyLock::new(|| {
    let error = ApiError::new(Code::SoldOut, "Nothing is left.").with("remaining", 0);
    let body: &'static [u8] = Box::leak(error.render().into_boxed_slice());
    ApiError {
        rendered: Some(body),
        ..error
    }
});

impl ApiError {
    pub fn new(code: Code, detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            detail: detail.into(),
            extra: Cow::Owned(Map::new()),
            rendered: None,
        }
    }

    pub fn with(mut self, member: &str, value: impl Into<Value>) -> Self {
        self.extra.to_mut().insert(member.to_owned(), value.into());
        self.rendered = None;
        self
    }

    /// 409 `sold_out`: nothing is left (`remaining` 0).
    pub fn sold_out() -> Self {
        let cached: &'static ApiError = &SOLD_OUT;
        Self {
            code: cached.code,
            detail: Cow::Borrowed(&cached.detail),
            extra: Cow::Borrowed(&cached.extra),
            rendered: cached.rendered,
        }
    }

    /// The problem+json body.
    fn render(&self) -> Vec<u8> {
        let problem = Problem {
            kind: self.code.type_uri(),
            title: self.code.title(),
            status: self.code.status().as_u16(),
            detail: &self.detail,
            code: self.code.name(),
            extra: &self.extra,
        };
        serde_json::to_vec(&problem).unwrap_or_default()
    }

    /// 503 `unavailable` with `Retry-After`, for a reason other than the database.
    pub fn unavailable_because(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::new(Code::Unavailable, detail)
    }

    /// Shed at the edge because the work queue is full; nothing was changed. Logged at debug
    /// level only: under overload this is the hot path and must stay cheap.
    pub fn overloaded(why: &'static str) -> Self {
        tracing::debug!(why, "answering 503 overloaded");
        Self::new(Code::Overloaded, why)
    }

    /// The database could not be reached or could not commit; nothing was changed.
    pub fn unavailable(error: impl std::fmt::Display) -> Self {
        tracing::warn!(%error, "answering 503");
        Self::new(
            Code::Unavailable,
            "The database cannot commit right now; nothing was changed. Retry shortly.",
        )
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.code.status()
    }

    fn error_response(&self) -> HttpResponse {
        let body = match &self.rendered {
            Some(rendered) => Bytes::from_static(rendered),
            None => Bytes::from(self.render()),
        };
        let mut response = HttpResponse::build(self.code.status());
        response.insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        ));
        if matches!(self.code, Code::Unavailable | Code::Overloaded) {
            response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECONDS));
        }
        // why: RFC 9110 requires a challenge on every 401; RFC 6750 names the error only when
        // a token was presented.
        if self.code.status() == StatusCode::UNAUTHORIZED {
            let challenge = if self.code == Code::InvalidToken {
                r#"Bearer realm="firstcome", error="invalid_token""#
            } else {
                r#"Bearer realm="firstcome""#
            };
            response.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge)));
        }
        response.body(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::MessageBody;

    fn body(error: &ApiError) -> anyhow::Result<Value> {
        let bytes = error
            .error_response()
            .into_body()
            .try_into_bytes()
            .map_err(|_| anyhow::anyhow!("a streamed body"))?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    #[test]
    fn the_prerendered_sold_out_body_is_the_one_its_fields_render() -> anyhow::Result<()> {
        let fresh = ApiError::new(Code::SoldOut, "Nothing is left.").with("remaining", 0);
        assert_eq!(body(&ApiError::sold_out())?, body(&fresh)?);
        assert_eq!(body(&fresh)?["remaining"], 0);
        Ok(())
    }

    #[test]
    fn a_member_added_to_the_sold_out_refusal_is_rendered() -> anyhow::Result<()> {
        let error = ApiError::sold_out().with("event_id", 7);
        let rendered = body(&error)?;
        assert_eq!(rendered["event_id"], 7, "{rendered}");
        assert_eq!(rendered["remaining"], 0, "{rendered}");
        Ok(())
    }
}
