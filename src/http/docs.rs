//! The OpenAPI description, generated from the handlers' `#[utoipa::path]` annotations, at
//! `GET /openapi.json`, and a Swagger UI at `/docs/` whose files are compiled into the binary
//! (no internet needed to read the docs).

use actix_web::web;
use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_swagger_ui::SwaggerUi;

use super::{admin, bulk, events, health, live, observe, reservations};
use crate::actors::EventSnapshot;
use crate::domain::{Event, EventKind, EventPatch, EventSpec, EventStatus, Reservation, ReservationStatus};

/// Every error body: RFC 9457 `application/problem+json` with our stable `code`; some codes add
/// members (`remaining` for `insufficient_stock`, `limit` for `limit_reached`, …).
#[derive(Serialize, ToSchema)]
pub struct Problem {
    /// `urn:firstcome:problem:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The stable, machine-readable reason (see the README's error table).
    pub code: String,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "firstcome", description = "Limited-inventory drops: exact, durable, fast reservations."),
    paths(
        health::healthz, health::readyz, observe::render_metrics,
        events::create, events::read, events::update, live::live,
        reservations::reserve, reservations::read, reservations::confirm, reservations::cancel,
        reservations::mine,
        admin::stats,
        bulk::submit, bulk::list, bulk::read, bulk::cancel, bulk::revoke,
    ),
    components(schemas(
        Problem, Event, EventSnapshot, EventSpec, EventPatch, EventKind, EventStatus, Reservation,
        ReservationStatus, reservations::ReserveBody,
    )),
    modifiers(&SecuritySchemes),
)]
pub struct ApiDoc;

/// The credentials the routes name: the admin bearer token, and the two ways a user is known.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "user_header",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-User-Id"))),
        );
        components.add_security_scheme(
            "user_jwt",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(SwaggerUi::new("/docs/{_:.*}").url("/openapi.json", ApiDoc::openapi()));
}
