//! What every request leaves behind: a request id on its log lines and in its answer, and its
//! latency in the `/metrics` histogram. Also the `/metrics` route itself.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};
use metrics_exporter_prometheus::PrometheusHandle;
use tracing::Instrument;

use super::{AppState, resource};
use crate::metrics::{
    ACTOR_QUEUE_DEPTH, ACTOR_QUEUE_DEPTH_MAX, EVENT_ACTORS, HTTP_REQUEST_SECONDS, WS_CLIENTS,
};

/// Carries the request id both ways: a caller (or a gateway) may set it, and every answer has it.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The longest request id taken from a caller; longer or odd ones are replaced by our own.
const MAX_REQUEST_ID: usize = 128;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/metrics").route(web::get().to(render_metrics)));
}

/// The route pattern of the resource that served a request, kept in the resource's app data.
///
/// why: `HttpRequest::match_pattern` matches the path against the resource map again (regexes
/// for paths with an `{id}`) and allocates the pattern, on every request; the resource already
/// knows it. `match_pattern` stays the fallback for anything served outside `http::resource`.
#[derive(Debug, Clone, Copy)]
pub struct RoutePattern(pub &'static str);

/// Middleware: opens the request's span (so every log line of the request names its id),
/// answers with `X-Request-Id`, and records the latency by route template.
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let id = request_id(&req);
    // why only the id: the fmt layer renders a span's fields to text when the span opens, on
    // every request, whether or not anything is logged in it. Method and path cost 0.4-0.6 µs
    // more per claim (a tenth of a sold-out refusal's CPU, measured side by side at the default
    // `info` level, BENCHMARKS.md); the id finds them in the caller's and the gateway's logs.
    let span = tracing::info_span!("request", request_id = %id);
    let mut response = next.call(req).instrument(span).await?;
    let route: metrics::SharedString = match response.request().app_data::<RoutePattern>() {
        Some(RoutePattern(pattern)) => (*pattern).into(),
        None => response
            .request()
            .match_pattern()
            .map_or_else(|| "unmatched".into(), Into::into),
    };
    metrics::histogram!(
        HTTP_REQUEST_SECONDS,
        "route" => route,
        "method" => response.request().method().as_str().to_owned(),
        "status" => response.status().as_str().to_owned(),
    )
    .record(started.elapsed().as_secs_f64());
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    Ok(response)
}

/// The caller's `X-Request-Id` if it is short and plain (letters, digits, `-`, `_`, `.`),
/// otherwise a fresh one: a caller must not be able to inject text into our logs.
fn request_id(req: &ServiceRequest) -> String {
    req.headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_REQUEST_ID
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .map_or_else(|| uuid::Uuid::now_v7().simple().to_string(), str::to_owned)
}

/// `GET /metrics`: Prometheus text exposition. Current-state gauges are read now.
#[utoipa::path(get, path = "/metrics", tag = "probes",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
pub(super) async fn render_metrics(
    state: web::Data<AppState>,
    handle: web::Data<PrometheusHandle>,
) -> HttpResponse {
    let depths = state.registry.queue_depths();
    metrics::gauge!(EVENT_ACTORS).set(depths.actors as f64);
    metrics::gauge!(ACTOR_QUEUE_DEPTH).set(depths.queued as f64);
    metrics::gauge!(ACTOR_QUEUE_DEPTH_MAX).set(depths.deepest as f64);
    metrics::gauge!(WS_CLIENTS).set(state.registry.live().sessions() as f64);
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(handle.render())
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[test]
    fn a_plain_request_id_is_kept_and_anything_else_is_replaced() {
        let kept = TestRequest::default()
            .insert_header((REQUEST_ID, "abc-123_x.y"))
            .to_srv_request();
        assert_eq!(request_id(&kept), "abc-123_x.y");
        for bad in ["", "has space", "semi;colon", &"x".repeat(129)] {
            let req = TestRequest::default()
                .insert_header((REQUEST_ID, bad))
                .to_srv_request();
            let id = request_id(&req);
            assert_ne!(id, bad, "{bad:?} should be replaced");
            assert_eq!(id.len(), 32, "a fresh id is a UUID in 32 hex digits");
        }
    }
}
