//! `ws-fanout`: many WebSocket listeners on one event, then the sale of its last unit.
//!
//! Opens `--clients` connections to `/v1/events/{id}/live` at a bounded rate (each reads its
//! snapshot), records the server's RSS, sells the event's last unit over HTTP and, for every
//! client, the time from reading that `201` to reading `sold_out`. A `sold_out` read before
//! the `201` counts as 0 ms (and in `before_201`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt;
use http_body_util::Full;
use hyper::Request;
use hyper::header::HOST;
use serde_json::{Map, Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::{exchange, histogram, micros, ms, percentiles};

#[derive(Debug, Args)]
pub struct FanoutArgs {
    /// Server base URL, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: String,
    /// The event to listen to; the run sells its last unit, so give it a stock of 1.
    #[arg(long)]
    event: i64,
    /// Concurrent WebSocket clients.
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// New connections per second.
    #[arg(long, default_value_t = 2_000.0)]
    connect_rate: f64,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// The server's process id, for its VmRSS (from /proc/PID/status).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Seconds every client may take to see `sold_out` after the 201.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Milliseconds to pause between the last client connecting and the sale.
    #[arg(long, default_value_t = 500)]
    settle_ms: u64,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How one client ended.
enum Seen {
    /// When it read `sold_out`, and its socket, kept open until every client is counted: a
    /// client closing as soon as it is served would make the server tear connections down
    /// while it is still fanning out, and time that instead.
    SoldOut(Instant, Box<Ws>),
    Closed(String),
}

/// The server's resident set size in KiB, if a pid was given and readable.
fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub async fn ws_fanout(args: FanoutArgs) -> anyhow::Result<Value> {
    let (addr, _, host) = super::split_url(&format!("{}/", args.url.trim_end_matches('/')))?;
    let ws_url = format!("ws://{addr}/v1/events/{}/live", args.event);
    let rss_idle = rss_kib(args.server_pid);

    let (connected_tx, mut connected_rx) = mpsc::channel::<Result<(), String>>(args.clients.max(1));
    let handshakes = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let gap = Duration::from_secs_f64(1.0 / args.connect_rate.max(1.0));
    let started = Instant::now();
    let mut next = started;
    let mut clients = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        tokio::time::sleep_until(next).await;
        next += gap;
        let permit = handshakes.clone().acquire_owned().await?;
        let (url, connected) = (ws_url.clone(), connected_tx.clone());
        clients.push(tokio::spawn(async move {
            let mut ws = match tokio_tungstenite::connect_async(url.as_str()).await {
                Ok((ws, _)) => ws,
                Err(e) => {
                    let _ = connected.send(Err(format!("connect: {e}"))).await;
                    return Seen::Closed(e.to_string());
                }
            };
            let snapshot = ws.next().await;
            drop(permit);
            match snapshot {
                Some(Ok(Message::Text(t))) if t.as_str().contains(r#""type":"snapshot""#) => {
                    let _ = connected.send(Ok(())).await;
                }
                other => {
                    let _ = connected.send(Err(format!("no snapshot: {other:?}"))).await;
                    return Seen::Closed(format!("{other:?}"));
                }
            }
            drop(connected);
            while let Some(message) = ws.next().await {
                match message {
                    Ok(Message::Text(t)) if t.as_str().contains(r#""type":"sold_out""#) => {
                        return Seen::SoldOut(Instant::now(), Box::new(ws));
                    }
                    Ok(Message::Close(frame)) => return Seen::Closed(format!("close {frame:?}")),
                    Ok(_) => {}
                    Err(e) => return Seen::Closed(e.to_string()),
                }
            }
            Seen::Closed("the socket ended".into())
        }));
    }
    drop(connected_tx);
    let (mut connected, mut failures) = (0usize, Vec::new());
    while let Some(outcome) = connected_rx.recv().await {
        match outcome {
            Ok(()) => connected += 1,
            Err(e) => failures.push(e),
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
    let rss_connected = rss_kib(args.server_pid);

    // The sale of the last unit.
    let mut sender = super::connect(&addr).await?;
    let sale = Request::post(format!("/v1/events/{}/reservations", args.event))
        .header(HOST, host)
        .header("x-user-id", "fanout-buyer")
        .body(Full::new(Bytes::new()))
        .context("building the sale")?;
    let sent = Instant::now();
    let (status, body) = exchange(&mut sender, sale).await?;
    let answered = Instant::now();
    if status != 201 {
        bail!(
            "selling the last unit answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }

    let deadline = answered + Duration::from_secs_f64(args.timeout);
    let mut from_201 = histogram()?;
    let mut from_request = histogram()?;
    let (mut delivered, mut before_201, mut missed) = (0usize, 0usize, Vec::new());
    let mut served = Vec::with_capacity(args.clients);
    for client in clients {
        match tokio::time::timeout_at(deadline, client).await {
            Ok(Ok(Seen::SoldOut(at, ws))) => {
                served.push(ws);
                delivered += 1;
                if at < answered {
                    before_201 += 1;
                }
                from_201.record(micros(at.saturating_duration_since(answered)).max(1))?;
                from_request.record(micros(at.saturating_duration_since(sent)).max(1))?;
            }
            Ok(Ok(Seen::Closed(why))) => missed.push(why),
            Ok(Err(e)) => missed.push(format!("task: {e}")),
            Err(_) => missed.push("no sold_out before the timeout".into()),
        }
    }
    let rss_after = rss_kib(args.server_pid);
    drop(served);

    let mut report = Map::new();
    report.insert("scenario".into(), json!("ws_fanout"));
    report.insert("clients".into(), json!(args.clients));
    report.insert("connected".into(), json!(connected));
    report.insert("connect_secs".into(), json!(connect_secs));
    report.insert("sale_ms".into(), json!(ms(micros(answered - sent))));
    report.insert("delivered".into(), json!(delivered));
    report.insert("before_201".into(), json!(before_201));
    report.insert(
        "all_delivered_ms".into(),
        json!(if delivered == args.clients {
            ms(from_201.max())
        } else {
            f64::NAN
        }),
    );
    percentiles(&from_201, &mut report, "");
    percentiles(&from_request, &mut report, "from_request_");
    report.insert("rss_idle_kib".into(), json!(rss_idle));
    report.insert("rss_connected_kib".into(), json!(rss_connected));
    report.insert("rss_after_kib".into(), json!(rss_after));
    report.insert("connect_failures".into(), json!(failures.len()));
    report.insert("first_connect_failure".into(), json!(failures.first()));
    report.insert("missed".into(), json!(missed.len()));
    report.insert("first_missed".into(), json!(missed.first()));
    Ok(Value::Object(report))
}
