//! `GET /v1/events/{id}/live` with a real WebSocket client (tokio-tungstenite): the snapshot on
//! connect, pushes on sell-out, restock and close, coalesced availability with contiguous `seq`,
//! and the refusals and closes at the edge (foreign Origin, unknown event, oversized message,
//! silent client).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::helpers::{Backend, TestApp};

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest any expected message may take to arrive.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

on_every_backend!(the_last_unit_sold_over_http_pushes_sold_out_to_a_listener);

fn live_url(app: &TestApp, event: i64) -> String {
    format!("{}/v1/events/{event}/live", app.address.replacen("http", "ws", 1))
}

/// Opens the event's live socket, optionally with an `Origin` header.
async fn open(app: &TestApp, event: i64, origin: Option<&str>) -> Result<Ws, WsError> {
    let mut request = live_url(app, event).into_client_request()?;
    if let Some(origin) = origin {
        let value = HeaderValue::from_str(origin).map_err(|e| WsError::HttpFormat(e.into()))?;
        request.headers_mut().insert("origin", value);
    }
    let (ws, _) = tokio_tungstenite::connect_async(request).await?;
    Ok(ws)
}

/// Connects and reads the snapshot the server sends first.
pub(crate) async fn listen(app: &TestApp, event: i64) -> anyhow::Result<(Ws, Value)> {
    let mut ws = open(app, event, None).await.context("opening the live socket")?;
    let snapshot = next_message(&mut ws).await?;
    assert_eq!(snapshot["type"], "snapshot", "the first message: {snapshot}");
    Ok((ws, snapshot))
}

/// The next text message as JSON (pings and pongs skipped); an error on close or timeout.
pub(crate) async fn next_message(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        let message = tokio::time::timeout(MESSAGE_TIMEOUT, ws.next())
            .await
            .context("no message in time")?
            .context("the socket ended")??;
        match message {
            Message::Text(text) => return serde_json::from_str(text.as_str()).context("a non-JSON message"),
            Message::Ping(_) | Message::Pong(_) => {}
            other => bail!("expected a text message, got {other:?}"),
        }
    }
}

/// Reads until the server closes the socket; returns the close code.
async fn close_code(ws: &mut Ws) -> anyhow::Result<u16> {
    loop {
        let message = tokio::time::timeout(MESSAGE_TIMEOUT, ws.next())
            .await
            .context("no close frame in time")?
            .context("the socket ended without a close frame")??;
        if let Message::Close(frame) = message {
            return frame
                .map(|f| u16::from(f.code))
                .context("a close frame without a code");
        }
    }
}

fn seq(message: &Value) -> anyhow::Result<u64> {
    message["seq"]
        .as_u64()
        .with_context(|| format!("no seq in {message}"))
}

/// The HTTP status and problem `code` of a refused handshake.
fn refusal(result: Result<Ws, WsError>) -> anyhow::Result<(u16, String, String)> {
    match result {
        Ok(_) => bail!("the handshake was accepted"),
        Err(WsError::Http(response)) => {
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                .context("the refusal's body is not JSON")?;
            let code = body["code"].as_str().unwrap_or_default().to_owned();
            Ok((response.status().as_u16(), code, content_type))
        }
        Err(other) => bail!("expected an HTTP refusal, got {other}"),
    }
}

async fn the_last_unit_sold_over_http_pushes_sold_out_to_a_listener(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(1, 1).await?;
    let (mut ws, snapshot) = listen(&app, event).await?;

    // Act
    app.reserve(event, "ana", None, None).await?.assert_status(201);
    let pushed = next_message(&mut ws).await?;

    // Assert
    assert_eq!(
        (snapshot["remaining"].as_u64(), snapshot["status"].as_str()),
        (Some(1), Some("open"))
    );
    assert_eq!(pushed["type"], "sold_out", "{pushed}");
    assert_eq!(
        (pushed["remaining"].as_u64(), pushed["sold"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(pushed["event_id"].as_i64(), Some(event));
    assert_eq!(seq(&pushed)?, seq(&snapshot)? + 1, "no gap after the snapshot");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gets_the_live_counts_as_a_snapshot_on_connect() -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(Backend::Sqlite).await?;
    let event = app.coupon_event(5, 2).await?;
    app.reserve_ok(event, "ana", Some(2)).await?;

    // Act
    let (_ws, snapshot) = listen(&app, event).await?;

    // Assert
    assert_eq!(
        (
            snapshot["remaining"].as_u64(),
            snapshot["held"].as_u64(),
            snapshot["sold"].as_u64(),
            snapshot["status"].as_str(),
        ),
        (Some(3), Some(0), Some(2), Some("open")),
        "{snapshot}"
    );
    assert!(snapshot["seq"].is_u64(), "{snapshot}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_after_the_sell_out_pushes_restocked() -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(Backend::Sqlite).await?;
    let event = app.coupon_event(1, 1).await?;
    let ana = app.reserve_ok(event, "ana", None).await?;
    let id = ana["id"].as_str().context("no reservation id")?.to_owned();
    let (mut ws, snapshot) = listen(&app, event).await?;
    assert_eq!(snapshot["status"], "sold_out", "{snapshot}");

    // Act
    app.cancel(&id, "ana").await?.assert_status(200);
    let pushed = next_message(&mut ws).await?;

    // Assert
    assert_eq!(pushed["type"], "restocked", "{pushed}");
    assert_eq!(
        (pushed["remaining"].as_u64(), pushed["status"].as_str()),
        (Some(1), Some("open"))
    );
    assert_eq!(seq(&pushed)?, seq(&snapshot)? + 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_stock_after_the_sell_out_pushes_restocked() -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(Backend::Sqlite).await?;
    let event = app.coupon_event(1, 1).await?;
    let (mut ws, _) = listen(&app, event).await?;
    app.reserve_ok(event, "ana", None).await?;
    let sold_out = next_message(&mut ws).await?;
    assert_eq!(sold_out["type"], "sold_out", "{sold_out}");

    // Act
    app.patch_event(event, json!({"stock": 3}))
        .await?
        .assert_status(200);
    let pushed = next_message(&mut ws).await?;

    // Assert
    assert_eq!(pushed["type"], "restocked", "{pushed}");
    assert_eq!(pushed["remaining"].as_u64(), Some(2), "{pushed}");
    assert_eq!(seq(&pushed)?, seq(&sold_out)? + 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_reservations_are_coalesced_into_few_availability_messages_in_sequence() -> anyhow::Result<()> {
    // Arrange
    let _quiet = crate::helpers::quiet_machine().await;
    let app = TestApp::spawn(Backend::Sqlite).await?;
    let event = app.coupon_event(1000, 1).await?;
    let (mut ws, snapshot) = listen(&app, event).await?;
    let reservations = 300;

    // Act: waves of concurrent reservations over several coalescing intervals
    let started = Instant::now();
    for wave in 0..30 {
        let claims = (0..reservations / 30).map(|i| {
            let user = format!("user-{wave}-{i}");
            let app = &app;
            async move { app.reserve_ok(event, &user, None).await }
        });
        for claimed in futures_util::future::join_all(claims).await {
            claimed?;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    let mut messages = Vec::new();
    loop {
        let message = next_message(&mut ws).await?;
        let done = message["remaining"].as_u64() == Some(1000 - reservations);
        messages.push(message);
        if done {
            break;
        }
    }

    // Assert
    let intervals = u32::try_from(took.as_millis() / 100).unwrap_or(u32::MAX);
    let most = usize::try_from(intervals + 2)?;
    assert!(
        messages.len() <= most && messages.len() < 100,
        "{} messages for {reservations} reservations in {took:?} (at most {most} allowed)",
        messages.len()
    );
    for (expected, message) in (seq(&snapshot)? + 1..).zip(&messages) {
        assert_eq!(message["type"], "availability", "{message}");
        assert_eq!(seq(message)?, expected, "seq must grow by one: {message}");
    }
    assert!(
        messages.len() >= 2,
        "updates flowed during the burst: {messages:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_event_pushes_closed() -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(Backend::Sqlite).await?;
    let event = app.coupon_event(10, 1).await?;
    let (mut ws, snapshot) = listen(&app, event).await?;

    // Act
    app.patch_event(event, json!({"closed": true}))
        .await?
        .assert_status(200);
    let pushed = next_message(&mut ws).await?;

    // Assert
    assert_eq!(
        (pushed["type"].as_str(), pushed["status"].as_str()),
        (Some("closed"), Some("closed"))
    );
    assert_eq!(seq(&pushed)?, seq(&snapshot)? + 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clock_passing_closes_at_pushes_closed() -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(Backend::Sqlite).await?;
    let closes_at = chrono::Utc::now() + chrono::TimeDelta::milliseconds(1200);
    let event = app
        .create_event(json!({
            "name": "closing soon", "kind": "coupon", "stock": 10, "closes_at": closes_at,
        }))
        .await?;
    let (mut ws, snapshot) = listen(&app, event).await?;
    assert_eq!(snapshot["status"], "open", "{snapshot}");

    // Act: nobody reserves; only the clock moves
    let pushed = next_message(&mut ws).await?;

    // Assert
    assert_eq!(pushed["type"], "closed", "{pushed}");
    assert!(chrono::Utc::now() >= closes_at, "announced before closes_at");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_origin_is_refused_with_403_before_the_upgrade() -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn_with(Backend::Sqlite, &["--ws-allowed-origins", "https://shop.example"]).await?;
    let event = app.coupon_event(10, 1).await?;
    let own = app.address.clone();

    // Act
    let foreign = refusal(open(&app, event, Some("https://evil.example")).await)?;
    let listed = open(&app, event, Some("https://shop.example")).await;
    let same_host = open(&app, event, Some(&own)).await;

    // Assert
    assert_eq!(
        foreign,
        (
            403,
            "origin_not_allowed".to_owned(),
            "application/problem+json".to_owned()
        )
    );
    assert!(listed.is_ok(), "a listed origin connects: {:?}", listed.err());
    assert!(
        same_host.is_ok(),
        "the server's own origin connects: {:?}",
        same_host.err()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_event_is_refused_with_404_before_the_upgrade() -> anyhow::Result<()> {
    let app = TestApp::spawn(Backend::Sqlite).await?;
    let cases = [("no such id", 987_654), ("not an id", 0)];
    for (what, event) in cases {
        let refused = refusal(open(&app, event, None).await).with_context(|| what)?;
        assert_eq!(
            refused,
            (
                404,
                "event_not_found".to_owned(),
                "application/problem+json".to_owned()
            ),
            "{what}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_get_without_a_handshake_is_refused_with_426() -> anyhow::Result<()> {
    let app = TestApp::spawn(Backend::Sqlite).await?;
    let event = app.coupon_event(10, 1).await?;
    let reply =
        crate::helpers::send(app.request(reqwest::Method::GET, &format!("/v1/events/{event}/live"))).await?;
    reply.assert_problem(426, "upgrade_required");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_client_message_is_closed_with_1009() -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn_with(Backend::Sqlite, &["--ws-max-message-bytes", "1024"]).await?;
    let event = app.coupon_event(10, 1).await?;
    let (mut ws, _) = listen(&app, event).await?;
    ws.send(Message::text("small messages are ignored")).await?;

    // Act
    ws.send(Message::text("x".repeat(4096))).await?;

    // Assert
    assert_eq!(close_code(&mut ws).await?, 1009);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_answering_pings_stays_connected_and_a_silent_one_is_closed() -> anyhow::Result<()> {
    // Arrange: pings every 100 ms, 400 ms of silence is death
    let _quiet = crate::helpers::quiet_machine().await;
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &["--ws-heartbeat-ms", "100", "--ws-client-timeout-ms", "400"],
    )
    .await?;
    let event = app.coupon_event(10, 1).await?;
    let (mut alive, _) = listen(&app, event).await?;
    let mut silent = RawSocket::open(&app, event).await?;

    // Act: `alive` keeps reading, which answers each ping with a pong; `silent` reads nothing
    let mut pings = 0;
    let until = Instant::now() + Duration::from_millis(1500);
    while let Ok(message) = tokio::time::timeout_at(until.into(), alive.next()).await {
        match message.context("the live socket ended")?? {
            Message::Ping(_) => pings += 1,
            other => bail!("the answering client got {other:?}"),
        }
    }

    // Assert
    assert!(pings >= 5, "only {pings} pings in 1.5 s");
    app.patch_event(event, json!({"stock": 11}))
        .await?
        .assert_status(200);
    let still_served = next_message(&mut alive).await?;
    assert_eq!(still_served["type"], "availability", "{still_served}");
    assert_eq!(
        silent.close_code().await?,
        Some(1008),
        "the silent client is closed"
    );
    Ok(())
}

/// A client that completes the handshake by hand and then never reads nor answers a ping
/// (a WebSocket library would answer pings as soon as it reads).
struct RawSocket(TcpStream);

impl RawSocket {
    async fn open(app: &TestApp, event: i64) -> anyhow::Result<RawSocket> {
        let authority = app.address.trim_start_matches("http://").to_owned();
        let mut stream = TcpStream::connect(&authority).await?;
        let handshake = format!(
            "GET /v1/events/{event}/live HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        stream.write_all(handshake.as_bytes()).await?;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            stream
                .read_exact(&mut byte)
                .await
                .context("reading the handshake answer")?;
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        if !head.starts_with("HTTP/1.1 101") {
            bail!("handshake refused: {head}");
        }
        Ok(RawSocket(stream))
    }

    /// Reads everything the server sent until it closed the connection, and returns the code of
    /// its close frame, if it sent one.
    async fn close_code(&mut self) -> anyhow::Result<Option<u16>> {
        let mut bytes = Vec::new();
        tokio::time::timeout(MESSAGE_TIMEOUT, self.0.read_to_end(&mut bytes))
            .await
            .context("the server did not close the connection")??;
        // Server frames are unmasked: opcode, length (7 bits, or 16 bits after 126), payload.
        let mut rest = bytes.as_slice();
        while let [first, second, tail @ ..] = rest {
            let (len, tail) = match second & 0x7f {
                126 => match tail {
                    [hi, lo, tail @ ..] => (usize::from(u16::from_be_bytes([*hi, *lo])), tail),
                    _ => bail!("truncated frame header"),
                },
                127 => bail!("unexpected 64-bit frame length"),
                len => (usize::from(len), tail),
            };
            let payload = tail.get(..len).context("truncated frame")?;
            if first & 0x0f == 0x8 {
                return Ok(payload
                    .get(..2)
                    .map(|code| u16::from_be_bytes([code[0], code[1]])));
            }
            rest = &tail[len..];
        }
        Ok(None)
    }
}
