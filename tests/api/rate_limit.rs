//! The rate-limit contract, against the real server: a flood from one key is refused with
//! `429 rate_limited` as problem+json with `Retry-After`, `RateLimit-Policy` and `RateLimit`;
//! a client that waits `Retry-After` is accepted; writes, reads and WebSocket connects have
//! separate quotas; one IP is limited across users; `X-Forwarded-For` counts only from a
//! trusted proxy; admin and probe routes are never limited; nothing answers 500.
//!
//! The limiter sits in front of the routes and the database, so these run on SQLite only.

use std::time::Duration;

use futures_util::future::join_all;
use reqwest::{Method, RequestBuilder};

use crate::helpers::{Backend, Reply, TestApp, active_units, quiet_machine, send};

/// A server with rate limiting on and the given quota flags.
async fn limited_app(flags: &[&str]) -> anyhow::Result<TestApp> {
    let mut args = vec!["--rate-limit", "true"];
    args.extend_from_slice(flags);
    TestApp::spawn_with(Backend::Sqlite, &args).await
}

/// Sends all `requests` at once; fails on any 500.
async fn burst(requests: Vec<RequestBuilder>) -> anyhow::Result<Vec<Reply>> {
    let replies = join_all(requests.into_iter().map(send))
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<Reply>>>()?;
    if let Some(error) = replies.iter().find(|r| r.status.is_server_error()) {
        anyhow::bail!("a request answered {error}");
    }
    Ok(replies)
}

/// Panics unless `reply` is a 429 under `policy` with every header of the contract.
#[track_caller]
fn assert_limited(reply: &Reply, policy: &str, quota: u32, window: u64) {
    reply.assert_problem(429, "rate_limited");
    assert_eq!(reply.body["policy"], policy, "{reply}");
    let retry_after: u64 = reply
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric Retry-After: {reply:?}"));
    assert!(retry_after >= 1, "{reply:?}");
    assert_eq!(reply.body["retry_after"], retry_after, "{reply}");
    assert_eq!(
        reply.header("ratelimit-policy"),
        Some(format!("\"{policy}\";q={quota};w={window}").as_str()),
        "{reply:?}"
    );
    assert_eq!(
        reply.header("ratelimit"),
        Some(format!("\"{policy}\";r=0;t={retry_after}").as_str()),
        "{reply:?}"
    );
}

fn count(replies: &[Reply], status: u16) -> usize {
    replies.iter().filter(|r| r.status.as_u16() == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_user_gets_429_with_retry_after_and_waiting_that_long_is_accepted()
-> anyhow::Result<()> {
    let _quiet = quiet_machine().await;
    // Arrange: bursts of 3 writes per user, then one a second.
    let app = limited_app(&["--rate-limit-writes-per-user", "1/s burst 3"]).await?;
    let event = app.coupon_event(1_000, 100).await?;
    let path = format!("/v1/events/{event}/reservations");

    // Act
    let replies = burst(
        (0..10)
            .map(|_| app.as_user(Method::POST, &path, "flooder"))
            .collect(),
    )
    .await?;

    // Assert
    assert_eq!(
        count(&replies, 201),
        3,
        "the burst passes, nothing more: {replies:#?}"
    );
    for reply in replies.iter().filter(|r| r.status.as_u16() != 201) {
        assert_limited(reply, "writes-user", 3, 3);
    }
    let rows = app.db.reservations(event).await?;
    assert_eq!(active_units(&rows), (3, 3), "a refused request reserves nothing");
    let refused = replies
        .iter()
        .find(|r| r.status.as_u16() == 429)
        .ok_or_else(|| anyhow::anyhow!("nothing was limited"))?;
    assert_limited(
        &app.reserve(event, "flooder", None, None).await?,
        "writes-user",
        3,
        3,
    );

    // Act: wait as told.
    let wait: u64 = refused.header("retry-after").unwrap_or("1").parse()?;
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let after = app.reserve(event, "flooder", None, None).await?;

    // Assert
    after.assert_status(201);
    let other = app.reserve(event, "bystander", None, None).await?;
    other.assert_status(201);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_reads_have_separate_quotas() -> anyhow::Result<()> {
    // Arrange
    let app = limited_app(&[
        "--rate-limit-writes-per-user",
        "1/min burst 1",
        "--rate-limit-reads-per-user",
        "2/min burst 2",
    ])
    .await?;
    let event = app.coupon_event(100, 10).await?;
    let read_event = || app.as_user(Method::GET, &format!("/v1/events/{event}"), "ana");

    // Act + Assert: writes exhausted, reads still pass.
    let reservation = app.reserve_ok(event, "ana", None).await?;
    assert_limited(
        &app.reserve(event, "ana", None, None).await?,
        "writes-user",
        1,
        60,
    );
    let id = reservation["id"].as_str().unwrap_or_default().to_owned();
    assert_limited(&app.cancel(&id, "ana").await?, "writes-user", 1, 60);
    send(read_event()).await?.assert_status(200);
    app.get_reservation(&id, "ana").await?.assert_status(200);

    // Reads exhausted now; another user's reads and writes are their own.
    assert_limited(&app.my_reservations("ana").await?, "reads-user", 2, 60);
    app.my_reservations("ben").await?.assert_status(200);
    app.reserve_ok(event, "ben", None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ip_is_limited_across_all_its_users() -> anyhow::Result<()> {
    // Arrange: no per-user limit at all, five writes per minute per address.
    let app = limited_app(&[
        "--rate-limit-writes-per-user",
        "off",
        "--rate-limit-writes-per-ip",
        "5/min burst 5",
    ])
    .await?;
    let event = app.coupon_event(100, 1).await?;

    // Act
    let mut replies = Vec::new();
    for user in 0..8 {
        replies.push(app.reserve(event, &format!("user-{user}"), None, None).await?);
    }

    // Assert
    assert_eq!(count(&replies, 201), 5, "{replies:#?}");
    for reply in &replies[5..] {
        assert_limited(reply, "writes-ip", 5, 60);
    }
    let anonymous = send(app.request(Method::POST, &format!("/v1/events/{event}/reservations"))).await?;
    assert_limited(&anonymous, "writes-ip", 5, 60);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_counts_only_when_the_peer_is_a_trusted_proxy() -> anyhow::Result<()> {
    let quota = [
        "--rate-limit-writes-per-user",
        "off",
        "--rate-limit-writes-per-ip",
        "2/min burst 2",
    ];
    let claim = |app: &TestApp, event: i64, user: usize, forwarded: String| {
        app.as_user(
            Method::POST,
            &format!("/v1/events/{event}/reservations"),
            &format!("u{user}"),
        )
        .header("x-forwarded-for", forwarded)
    };

    // Untrusted peer: every forged address is still 127.0.0.1.
    let direct = limited_app(&quota).await?;
    let event = direct.coupon_event(100, 1).await?;
    let mut replies = Vec::new();
    for i in 0..4 {
        replies.push(send(claim(&direct, event, i, format!("198.51.100.{i}"))).await?);
    }
    assert_eq!(count(&replies, 201), 2, "{replies:#?}");
    assert_limited(&replies[2], "writes-ip", 2, 60);

    // Trusted peer: the forwarded address is the client.
    let mut flags = quota.to_vec();
    flags.extend(["--trusted-proxies", "127.0.0.1,10.0.0.0/8"]);
    let proxied = limited_app(&flags).await?;
    let event = proxied.coupon_event(100, 1).await?;
    let mut replies = Vec::new();
    for i in 0..4 {
        replies.push(send(claim(&proxied, event, i, format!("198.51.100.{i}"))).await?);
    }
    assert_eq!(
        count(&replies, 201),
        4,
        "four clients, one request each: {replies:#?}"
    );
    // One client behind the proxy, forging other addresses to the left of the proxy's entry
    // and reached through a second trusted hop.
    let mut replies = Vec::new();
    for i in 10..13 {
        let forwarded = format!("6.6.6.{i}, 203.0.113.5, 10.1.1.1");
        replies.push(send(claim(&proxied, event, i, forwarded)).await?);
    }
    assert_eq!(count(&replies, 201), 2, "{replies:#?}");
    assert_limited(&replies[2], "writes-ip", 2, 60);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_probe_routes_are_never_limited() -> anyhow::Result<()> {
    // Arrange: one request a minute for everything that is limited.
    let mut flags = Vec::new();
    for class in ["writes", "reads", "live"] {
        for scope in ["user", "ip"] {
            flags.push(format!("--rate-limit-{class}-per-{scope}"));
            flags.push("1/min burst 1".to_owned());
        }
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let app = limited_app(&flags).await?;
    let event = app.coupon_event(100, 1).await?;

    // Act
    let mut requests = Vec::new();
    for _ in 0..10 {
        requests.push(app.request(Method::GET, "/healthz"));
        requests.push(app.request(Method::GET, "/readyz"));
        requests.push(app.request(Method::GET, "/metrics"));
        requests.push(app.admin(Method::GET, "/v1/admin/stats"));
        requests.push(
            app.admin(Method::GET, "/v1/admin/stats")
                .header("x-user-id", "ops"),
        );
        requests.push(
            app.admin(Method::PATCH, &format!("/v1/events/{event}"))
                .json(&serde_json::json!({ "stock": 100 })),
        );
    }
    let replies = burst(requests).await?;
    for _ in 0..3 {
        app.coupon_event(10, 1).await?;
    }

    // Assert
    let limited: Vec<_> = replies.iter().filter(|r| r.status.as_u16() == 429).collect();
    assert!(limited.is_empty(), "{limited:#?}");
    // Control: the limits are on in this server.
    app.get_event(event).await?.assert_status(200);
    assert_limited(&app.get_event(event).await?, "reads-ip", 1, 60);
    let stats = send(app.admin(Method::GET, "/v1/admin/stats")).await?;
    assert_eq!(stats.body["rate_limits"]["refused"], 1, "{stats}");
    assert!(stats.body["rate_limits"]["keys"].as_u64() >= Some(1), "{stats}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_connects_have_their_own_quota() -> anyhow::Result<()> {
    // Arrange
    let app = limited_app(&["--rate-limit-live-per-user", "1/min burst 1"]).await?;
    let event = app.coupon_event(100, 1).await?;
    let live = format!("/v1/events/{event}/live");

    // Act
    let first = send(app.as_user(Method::GET, &live, "watcher")).await?;
    let second = send(app.as_user(Method::GET, &live, "watcher")).await?;

    // Assert
    assert_ne!(first.status.as_u16(), 429, "{first}");
    assert!(!first.status.is_server_error(), "{first}");
    assert_limited(&second, "live-user", 1, 60);
    let read = send(app.as_user(Method::GET, &format!("/v1/events/{event}"), "watcher")).await?;
    read.assert_status(200);
    let other = send(app.as_user(Method::GET, &live, "other")).await?;
    assert_ne!(other.status.as_u16(), 429, "another user connects: {other}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_quotas_let_a_user_burst_ten_writes_and_refuse_the_eleventh() -> anyhow::Result<()> {
    let _quiet = quiet_machine().await;
    // Arrange: rate limiting on with the shipped quotas (5/s burst 10 writes per user).
    let app = limited_app(&[]).await?;
    let event = app.coupon_event(1_000, 100).await?;

    // Act
    let path = format!("/v1/events/{event}/reservations");
    let replies = burst(
        (0..11)
            .map(|_| app.as_user(Method::POST, &path, "eager"))
            .collect(),
    )
    .await?;

    // Assert
    assert_eq!(count(&replies, 201), 10, "{replies:#?}");
    let refused = replies
        .iter()
        .find(|r| r.status.as_u16() == 429)
        .ok_or_else(|| anyhow::anyhow!("the 11th write passed"))?;
    assert_limited(refused, "writes-user", 10, 2);
    Ok(())
}
