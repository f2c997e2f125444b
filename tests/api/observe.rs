//! What operators read: `/metrics` in Prometheus text, `X-Request-Id` on every answer and in the
//! logs, and the OpenAPI description with its docs page (served from the binary, no internet).

use reqwest::Method;

use crate::helpers::{Backend, TestApp, quiet_machine, send};

#[tokio::test]
async fn metrics_count_requests_by_route_reservations_by_outcome_and_persister_batches() -> anyhow::Result<()>
{
    let _quiet = quiet_machine().await;
    // Arrange
    let app = TestApp::spawn(Backend::Sqlite).await?;
    let event = app.coupon_event(1, 1).await?;

    // Act: one unit issued, one refused as sold out, one refused by the per-user limit.
    app.reserve_ok(event, "ana", None).await?;
    app.reserve(event, "ben", None, None)
        .await?
        .assert_problem(409, "sold_out");
    app.reserve(event, "ana", Some(1), Some("k1"))
        .await?
        .assert_problem(409, "limit_reached");
    let scrape = send(app.request(Method::GET, "/metrics")).await?;

    // Assert
    scrape.assert_status(200);
    assert!(
        scrape
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{scrape}"
    );
    let text = scrape.text.clone();
    let value = |series: &str| -> Option<f64> {
        text.lines()
            .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    assert_eq!(
        value(r#"firstcome_reservations_total{outcome="created"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(r#"firstcome_reservations_total{outcome="sold_out"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(r#"firstcome_reservations_total{outcome="limit_reached"}"#),
        Some(1.0),
        "{text}"
    );
    let route = r#"firstcome_http_request_duration_seconds_count{route="/v1/events/{id}/reservations",method="POST",status="201"}"#;
    assert_eq!(value(route), Some(1.0), "{text}");
    assert!(
        value("firstcome_persister_batch_writes_count").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        value("firstcome_persister_commit_duration_seconds_count").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(value("firstcome_event_actors"), Some(1.0), "{text}");
    assert_eq!(value("firstcome_event_actor_queue_depth"), Some(0.0), "{text}");
    Ok(())
}

#[tokio::test]
async fn every_answer_carries_a_request_id_and_a_plain_one_from_the_caller_is_kept() -> anyhow::Result<()> {
    let _quiet = quiet_machine().await;
    let app = TestApp::spawn(Backend::Sqlite).await?;

    let kept = send(
        app.request(Method::GET, "/healthz")
            .header("x-request-id", "trace-42"),
    )
    .await?;
    let made = send(app.request(Method::GET, "/v1/events/999")).await?;
    let hostile = send(
        app.request(Method::GET, "/healthz")
            .header("x-request-id", "a b\"c"),
    )
    .await?;

    assert_eq!(kept.header("x-request-id"), Some("trace-42"));
    let made_id = made.header("x-request-id").unwrap_or_default();
    assert_eq!(made_id.len(), 32, "a fresh id on an error answer too: {made}");
    assert!(made_id.bytes().all(|b| b.is_ascii_hexdigit()), "{made_id}");
    assert_ne!(
        hostile.header("x-request-id"),
        Some("a b\"c"),
        "log injection must not pass"
    );
    Ok(())
}

#[tokio::test]
async fn a_request_id_appears_on_the_log_lines_of_its_request() -> anyhow::Result<()> {
    let _quiet = quiet_machine().await;
    // Arrange: a server whose database cannot commit, so the claim logs a warning.
    let app = TestApp::spawn(Backend::Sqlite).await?;
    let event = app.coupon_event(5, 1).await?;
    app.db
        .execute("CREATE TRIGGER refuse BEFORE INSERT ON reservations BEGIN SELECT RAISE(ABORT, 'refused by test'); END")
        .await?;

    // Act
    let refused = send(
        app.as_user(Method::POST, &format!("/v1/events/{event}/reservations"), "ana")
            .header("x-request-id", "find-me-7"),
    )
    .await?;

    // Assert
    refused.assert_problem(503, "unavailable");
    let log = std::fs::read_to_string(app.log_path())?;
    let line = log
        .lines()
        .find(|line| line.contains("answering 503"))
        .unwrap_or_default();
    assert!(
        line.contains("find-me-7"),
        "the 503 warning should name its request id: {line:?}"
    );
    Ok(())
}

#[tokio::test]
async fn the_openapi_description_lists_every_route_and_the_docs_page_works_offline() -> anyhow::Result<()> {
    let _quiet = quiet_machine().await;
    let app = TestApp::spawn(Backend::Sqlite).await?;

    let spec = send(app.request(Method::GET, "/openapi.json")).await?;
    let page = app.client.get(app.url("/docs/")).send().await?;
    let page_status = page.status();
    let page_text = page.text().await?;
    let bundle = app
        .client
        .get(app.url("/docs/swagger-ui-bundle.js"))
        .send()
        .await?;

    spec.assert_status(200);
    for (path, method) in [
        ("/v1/events", "post"),
        ("/v1/events/{id}", "get"),
        ("/v1/events/{id}", "patch"),
        ("/v1/events/{id}/reservations", "post"),
        ("/v1/events/{id}/live", "get"),
        ("/v1/reservations/{id}", "get"),
        ("/v1/reservations/{id}/confirm", "post"),
        ("/v1/reservations/{id}/cancel", "post"),
        ("/v1/me/reservations", "get"),
        ("/v1/admin/stats", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            spec.body["paths"][path][method].is_object(),
            "{method} {path} is missing from /openapi.json"
        );
    }
    assert!(spec.body["components"]["schemas"]["Reservation"].is_object());
    assert!(spec.body["components"]["schemas"]["Problem"].is_object());
    assert_eq!(page_status, 200);
    assert!(page_text.contains("swagger-ui"), "{page_text}");
    assert_eq!(bundle.status(), 200, "the UI's script is served from the binary");
    assert!(bundle.bytes().await?.len() > 100_000);
    Ok(())
}

/// Growing maps of millions of entries on 2 MiB pages stalled a hot event for most of a second
/// (BENCHMARKS.md, "Transparent huge pages and map growth"); the server opts out at start.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_server_runs_without_transparent_huge_pages() -> anyhow::Result<()> {
    use anyhow::Context;

    // Arrange
    let app = TestApp::spawn(Backend::Sqlite).await?;
    let pid = app.pid().context("the server has no pid")?;

    // Act
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading the server's status")?;

    // Assert (Linux reports the flag here since 5.0)
    let line = status
        .lines()
        .find(|line| line.starts_with("THP_enabled:"))
        .context("no THP_enabled line in /proc/<pid>/status")?;
    assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
    Ok(())
}
