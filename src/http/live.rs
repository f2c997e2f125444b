//! `GET /v1/events/{id}/live`: the event's live notifications over a WebSocket (actix-ws).
//!
//! Everything that can refuse a client happens before the upgrade, as problem+json: a foreign
//! `Origin` (403), an unknown event (404), a request that is no WebSocket handshake (426). After
//! the upgrade one task per socket forwards the event's broadcasts (see
//! [`crate::actors::live`]) and keeps the connection honest:
//! - it pings every `ws_heartbeat_ms` and closes a client silent for `ws_client_timeout_ms`
//!   (1008);
//! - a client message larger than `ws_max_message_bytes` closes it with 1009; other client
//!   messages are read and ignored (the protocol is server → client);
//! - a client too slow to keep up with the broadcasts is closed with 1013 (try again later)
//!   and never slows anyone else: the broadcaster does not wait for it;
//! - [`LiveHub::close_all`](crate::actors::LiveHub::close_all) closes it with 1001 (going away).

use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, ProtocolError, Session};
use bytestring::ByteString;
use serde::Deserialize;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::time::{Instant, timeout};

use super::docs::Problem;
use super::extract::event_id;
use super::{AppState, resource};
use crate::actors::event::{Listening, Snapshot};
use crate::actors::live::{Frame, SessionGuard};
use crate::domain::UserId;
use crate::error::{ApiError, Code};

/// Longest a single message may take to enter a socket's send queue; a client that lets its
/// queue fill this long is cut off (it is not reading), without a close frame it would not read.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/events/{id}/live").route(web::get().to(live)));
}

/// The handshake's query string.
#[derive(Deserialize)]
struct LiveQuery {
    /// A credential for browsers, which cannot set headers on a WebSocket handshake.
    access_token: Option<String>,
}

#[utoipa::path(get, path = "/v1/events/{id}/live", tag = "events",
    params(("id" = i64, Path, description = "Event id"),
        ("access_token" = Option<String>, Query, description = "A user JWT (optional; verified if given)")),
    responses(
    (status = 101, description = "WebSocket: a `snapshot`, then `availability`, `sold_out`, `restocked` and `closed` messages, each with a per-event `seq`"),
    (status = 401, description = "invalid_token", body = Problem, content_type = "application/problem+json"),
    (status = 403, description = "origin_not_allowed", body = Problem, content_type = "application/problem+json"),
    (status = 404, description = "event_not_found", body = Problem, content_type = "application/problem+json"),
    (status = 426, description = "upgrade_required: not a WebSocket handshake", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn live(
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = event_id(&path)?;
    let hub = state.registry.live().clone();
    check_origin(&req, &hub.settings().allowed_origins)?;
    let query = web::Query::<LiveQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::new(Code::BadRequest, format!("The query string is malformed: {e}.")))?;
    let _viewer = authenticate_live_token(&state, query.access_token.as_deref())?;
    if hub.is_closing() {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    let event = super::reservations::event_actor(&state, id).await?;
    // Also waits until the actor has loaded its state, so the snapshot below exists.
    event.actor.send(Snapshot).await??;
    let (snapshot, updates) = event
        .live
        .subscribe()
        .ok_or_else(|| ApiError::unavailable("the event's live state is not loaded"))?;
    let (response, session, stream) = actix_ws::handle(&req, body).map_err(|e| {
        ApiError::new(
            Code::UpgradeRequired,
            format!("Expected a WebSocket handshake: {e}."),
        )
    })?;
    let limit = hub.settings().max_message_bytes;
    let stream = stream
        .max_frame_size(limit)
        .aggregate_continuations()
        .max_continuation_size(limit);
    let socket = Socket {
        session,
        stream,
        updates,
        last_seq: snapshot.seq,
        heartbeat: hub.settings().heartbeat,
        client_timeout: hub.settings().client_timeout,
        shutdown: hub.shutdown_signal(),
        _open: hub.session_started(),
    };
    event.actor.do_send(Listening);
    actix_web::rt::spawn(socket.run(snapshot.text));
    Ok(response)
}

/// Checks a handshake's `access_token`. The notifications are public, so a handshake without
/// one is accepted with no identity; a token that is given must verify (401 otherwise), the
/// same way as a bearer token on the HTTP routes.
fn authenticate_live_token(state: &AppState, token: Option<&str>) -> Result<Option<UserId>, ApiError> {
    token
        .map(|token| state.auth.authenticate_token(token))
        .transpose()
}

/// Refuses a browser page from a foreign site before the upgrade. Allowed: no `Origin` (not a
/// browser: nothing cross-site to protect), an `Origin` on the same host and port as the
/// request's `Host`, and the configured `ws_allowed_origins` (`*` allows any).
fn check_origin(req: &HttpRequest, allowed: &[String]) -> Result<(), ApiError> {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or(""));
    let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok());
    if origin_allowed(origin, host, allowed) {
        Ok(())
    } else {
        Err(ApiError::new(
            Code::OriginNotAllowed,
            format!(
                "Origin {:?} may not open this WebSocket.",
                origin.unwrap_or_default()
            ),
        ))
    }
}

fn origin_allowed(origin: Option<&str>, host: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else { return true };
    let origin = origin.trim().trim_end_matches('/');
    if allowed
        .iter()
        .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let (Ok(origin), Some(host)) = (url::Url::parse(origin), host) else {
        return false;
    };
    let Some(origin_host) = origin.host_str() else {
        return false;
    };
    let Ok(request) = url::Url::parse(&format!("{}://{host}", origin.scheme())) else {
        return false;
    };
    request
        .host_str()
        .is_some_and(|h| h.eq_ignore_ascii_case(origin_host))
        && request.port_or_known_default() == origin.port_or_known_default()
}

/// One WebSocket client of one event.
struct Socket {
    session: Session,
    stream: AggregatedMessageStream,
    updates: broadcast::Receiver<Frame>,
    /// The last `seq` sent; broadcasts up to it are already in the snapshot.
    last_seq: u64,
    heartbeat: Duration,
    client_timeout: Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
    _open: SessionGuard,
}

/// How a socket's loop ended.
enum End {
    /// Close with this code and reason.
    Close(CloseCode, &'static str),
    /// The connection is gone or stuck; nothing more can be sent.
    Gone,
}

impl Socket {
    async fn run(mut self, snapshot: ByteString) {
        let end = match send(&mut self.session, snapshot).await {
            Ok(()) => self.serve().await,
            Err(end) => end,
        };
        if let End::Close(code, why) = end {
            let reason = CloseReason {
                code,
                description: Some(why.to_owned()),
            };
            let _ = timeout(SEND_TIMEOUT, self.session.close(Some(reason))).await;
        }
    }

    async fn serve(&mut self) -> End {
        let mut pings = tokio::time::interval_at(Instant::now() + self.heartbeat, self.heartbeat);
        pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.wait_for(|closing| *closing) => {
                    return End::Close(CloseCode::Away, "the server is shutting down");
                }
                update = self.updates.recv() => match update {
                    Ok(frame) if frame.seq <= self.last_seq => {}
                    Ok(frame) => {
                        self.last_seq = frame.seq;
                        if let Err(end) = send(&mut self.session, frame.text).await {
                            return end;
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        return End::Close(CloseCode::Again, "too slow to keep up; reconnect for a new snapshot");
                    }
                    Err(RecvError::Closed) => return End::Close(CloseCode::Away, "the event's channel closed"),
                },
                message = self.stream.recv() => {
                    last_heard = Instant::now();
                    match message {
                        None => return End::Gone,
                        Some(Ok(AggregatedMessage::Ping(bytes))) => {
                            if self.session.pong(&bytes).await.is_err() {
                                return End::Gone;
                            }
                        }
                        Some(Ok(AggregatedMessage::Close(reason))) => {
                            // Echo the client's close, as RFC 6455 asks.
                            let _ = timeout(SEND_TIMEOUT, self.session.clone().close(reason)).await;
                            return End::Gone;
                        }
                        // The protocol is server → client; anything else a client says is ignored.
                        Some(Ok(_)) => {}
                        Some(Err(error)) if is_oversized(&error) => {
                            return End::Close(CloseCode::Size, "message too large");
                        }
                        Some(Err(_)) => return End::Close(CloseCode::Protocol, "protocol error"),
                    }
                }
                _ = pings.tick() => {
                    if last_heard.elapsed() > self.client_timeout {
                        return End::Close(CloseCode::Policy, "no pong within the client timeout");
                    }
                    if self.session.ping(b"").await.is_err() {
                        return End::Gone;
                    }
                }
            }
        }
    }
}

/// Queues one text message on the socket; a queue that stays full for [`SEND_TIMEOUT`] means
/// the client is not reading.
async fn send(session: &mut Session, text: ByteString) -> Result<(), End> {
    match timeout(SEND_TIMEOUT, session.text(text)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(End::Gone),
    }
}

/// A frame over `max_frame_size`, or continuations over `max_continuation_size`.
fn is_oversized(error: &ProtocolError) -> bool {
    match error {
        ProtocolError::Overflow => true,
        ProtocolError::Io(io) => io.to_string().contains("maximum continuation size"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use anyhow::Context;
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    use super::origin_allowed;
    use crate::config::Settings;
    use crate::startup::Application;

    /// Reads until a close frame arrives; its code.
    async fn close_code<S>(ws: &mut S) -> anyhow::Result<u16>
    where
        S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
    {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .context("no close frame in time")?
                .context("the socket ended")??;
            if let Message::Close(frame) = message {
                return frame.map(|f| u16::from(f.code)).context("no close code");
            }
        }
    }

    #[actix_rt::test]
    async fn close_all_closes_every_live_socket_with_1001_and_refuses_new_ones() -> anyhow::Result<()> {
        // Arrange: the real application in this process, on a fresh SQLite file
        let dir = tempfile::tempdir()?;
        let settings = Settings {
            bind: "127.0.0.1:0".into(),
            database_url: format!("sqlite://{}", dir.path().join("live.db").display()),
            admin_token: Some("close-all-test".into()),
            http_workers: 1,
            ..Settings::default()
        };
        let app = Application::build(settings).await?;
        let (port, hub) = (app.port(), app.live());
        actix_rt::spawn(app.run_until_stopped());
        let created: serde_json::Value = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/v1/events"))
            .bearer_auth("close-all-test")
            .json(&serde_json::json!({"name": "shutdown", "kind": "coupon", "stock": 5}))
            .send()
            .await?
            .json()
            .await?;
        let id = created["id"].as_i64().context("no event id")?;
        let url = format!("ws://127.0.0.1:{port}/v1/events/{id}/live");
        let mut sockets = Vec::new();
        for _ in 0..3 {
            let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
            let snapshot = ws.next().await.context("no snapshot")??;
            assert!(snapshot.is_text(), "{snapshot:?}");
            sockets.push(ws);
        }
        assert_eq!(hub.sessions(), 3);

        // Act
        hub.close_all();

        // Assert
        for ws in &mut sockets {
            assert_eq!(close_code(ws).await?, 1001);
        }
        assert!(
            hub.drained(Duration::from_secs(5)).await,
            "{} sessions left",
            hub.sessions()
        );
        let refused = tokio_tungstenite::connect_async(url.as_str()).await;
        assert!(
            matches!(&refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 503),
            "{refused:?}"
        );
        Ok(())
    }

    /// (what, Origin header, Host header, allowed list, expected).
    type Case<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a [String], bool);

    #[test]
    fn origins_are_allowed_only_when_absent_same_host_or_listed() {
        let listed = vec!["https://shop.example".to_owned()];
        let cases: &[Case] = &[
            ("no Origin: not a browser", None, Some("api.example"), &[], true),
            (
                "same host and port",
                Some("http://127.0.0.1:8080"),
                Some("127.0.0.1:8080"),
                &[],
                true,
            ),
            (
                "same host, default port",
                Some("https://api.example"),
                Some("api.example:443"),
                &[],
                true,
            ),
            (
                "same host, other port",
                Some("http://127.0.0.1:9999"),
                Some("127.0.0.1:8080"),
                &[],
                false,
            ),
            (
                "foreign site",
                Some("https://evil.example"),
                Some("api.example"),
                &[],
                false,
            ),
            ("opaque origin", Some("null"), Some("api.example"), &[], false),
            (
                "listed",
                Some("https://shop.example"),
                Some("api.example"),
                &listed,
                true,
            ),
            (
                "listed, case and trailing slash",
                Some("HTTPS://SHOP.EXAMPLE/"),
                Some("api.example"),
                &listed,
                true,
            ),
            (
                "not listed",
                Some("https://shop.example.evil"),
                Some("api.example"),
                &listed,
                false,
            ),
        ];
        let any = vec!["*".to_owned()];
        assert!(
            origin_allowed(Some("https://evil.example"), None, &any),
            "* allows any"
        );
        for (what, origin, host, allowed, expected) in cases {
            assert_eq!(origin_allowed(*origin, *host, allowed), *expected, "{what}");
        }
    }
}
