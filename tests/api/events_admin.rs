//! Operators: creating and changing events needs the admin token; invalid settings are refused;
//! stock moves up and down but never below what is held or sold; closing and sales windows
//! stop reservations; probes and stats answer.

use std::time::Duration;

use chrono::{SecondsFormat, TimeDelta, Utc};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, Backend, TestApp, mismatches, refusals, send};

on_every_backend!(
    admin_routes_refuse_missing_or_wrong_credentials,
    invalid_event_settings_are_refused_and_nothing_is_created,
    a_new_event_gets_the_defaults_and_reads_back_the_same,
    stock_can_be_raised_and_lowered_but_never_below_what_is_held_or_sold,
    bad_event_changes_are_refused_and_change_nothing,
    a_closed_event_refuses_reservations_until_it_is_reopened,
    an_event_closes_by_itself_at_closes_at,
    an_event_that_opens_later_is_scheduled_and_refuses_reservations_until_then,
    probes_and_operator_stats_answer,
);

fn rfc3339(at: chrono::DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

async fn admin_routes_refuse_missing_or_wrong_credentials(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(5, 1).await?;
    let before = app.get_event(event).await?.body;
    let spec = json!({ "name": "sneaky", "kind": "coupon", "stock": 5 });
    let patch_path = format!("/v1/events/{event}");
    let create = || app.request(Method::POST, "/v1/events").json(&spec);
    let patch = || {
        app.request(Method::PATCH, &patch_path)
            .json(&json!({ "stock": 50 }))
    };
    let stats = || app.request(Method::GET, "/v1/admin/stats");
    let wrong = format!("{ADMIN_TOKEN}x");
    let unauthenticated = vec![
        ("create without a token", create()),
        (
            "create with a user id but no token",
            create().header("x-user-id", "ana"),
        ),
        (
            "create with Basic credentials",
            create().basic_auth("admin", Some(ADMIN_TOKEN)),
        ),
        (
            "create with an empty bearer token",
            create().header("authorization", "Bearer "),
        ),
        ("change without a token", patch()),
        ("stats without a token", stats()),
    ];
    let wrong_token = vec![
        ("create with a wrong token", create().bearer_auth(&wrong)),
        ("change with a wrong token", patch().bearer_auth(&wrong)),
        ("stats with a wrong token", stats().bearer_auth("nope")),
    ];

    // Act
    let mut failures = refusals(unauthenticated, 401, "unauthorized").await?;
    failures.extend(refusals(wrong_token, 403, "forbidden").await?);

    // Assert
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(app.db.event_count().await?, 1, "no event was created");
    assert_eq!(app.get_event(event).await?.body, before, "the event is unchanged");
    Ok(())
}

async fn invalid_event_settings_are_refused_and_nothing_is_created(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let create = |spec: Value| app.admin(Method::POST, "/v1/events").json(&spec);
    let raw = |content_type: &str, body: &str| {
        app.admin(Method::POST, "/v1/events")
            .header("content-type", content_type)
            .body(body.to_owned())
    };
    let soon = Utc::now() + TimeDelta::hours(1);
    let coupon = |extra: Value| {
        let mut spec = json!({ "name": "drop", "kind": "coupon", "stock": 10 });
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        create(spec)
    };
    let invalid_event = vec![
        ("empty name", coupon(json!({ "name": "" }))),
        ("blank name", coupon(json!({ "name": "   " }))),
        (
            "name of 201 characters",
            coupon(json!({ "name": "n".repeat(201) })),
        ),
        (
            "stock above 1,000,000,000",
            coupon(json!({ "stock": 1_000_000_001u64 })),
        ),
        ("per_user_limit 0", coupon(json!({ "per_user_limit": 0 }))),
        (
            "per_user_limit above 10,000",
            coupon(json!({ "per_user_limit": 10_001 })),
        ),
        (
            "max_per_request 0",
            coupon(json!({ "per_user_limit": 2, "max_per_request": 0 })),
        ),
        (
            "max_per_request above per_user_limit",
            coupon(json!({ "per_user_limit": 2, "max_per_request": 3 })),
        ),
        (
            "hold_seconds 0",
            coupon(json!({ "kind": "ticket", "hold_seconds": 0 })),
        ),
        (
            "hold_seconds above a week",
            coupon(json!({ "kind": "ticket", "hold_seconds": 604_801 })),
        ),
        (
            "closes_at before opens_at",
            coupon(json!({ "opens_at": rfc3339(soon), "closes_at": rfc3339(soon - TimeDelta::minutes(1)) })),
        ),
        (
            "closes_at equal to opens_at",
            coupon(json!({ "opens_at": rfc3339(soon), "closes_at": rfc3339(soon) })),
        ),
    ];
    let invalid_body = vec![
        ("unknown kind", coupon(json!({ "kind": "raffle" }))),
        ("negative stock", coupon(json!({ "stock": -1 }))),
        ("stock as a string", coupon(json!({ "stock": "10" }))),
        (
            "missing stock",
            create(json!({ "name": "drop", "kind": "coupon" })),
        ),
        ("missing kind", create(json!({ "name": "drop", "stock": 10 }))),
        ("unknown field", coupon(json!({ "colour": "red" }))),
        (
            "opens_at that is not a timestamp",
            coupon(json!({ "opens_at": "tomorrow" })),
        ),
        ("no body", app.admin(Method::POST, "/v1/events")),
    ];

    // Act
    let mut failures = refusals(invalid_event, 422, "invalid_event").await?;
    failures.extend(refusals(invalid_body, 422, "invalid_body").await?);
    let malformed = vec![("malformed JSON", raw("application/json", r#"{"name":"#))];
    failures.extend(refusals(malformed, 400, "malformed_json").await?);
    let not_json = vec![("text/plain body", raw("text/plain", r#"{"name":"x"}"#))];
    failures.extend(refusals(not_json, 415, "unsupported_media_type").await?);

    // Assert
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(app.db.event_count().await?, 0, "no event was created");
    Ok(())
}

async fn a_new_event_gets_the_defaults_and_reads_back_the_same(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;

    // Act
    let created = send(
        app.admin(Method::POST, "/v1/events")
            .json(&json!({ "name": "  Launch day  ", "kind": "coupon", "stock": 5 })),
    )
    .await?;

    // Assert
    created.assert_status(201);
    let event = &created.body;
    let id = event["id"].as_i64().unwrap_or_default();
    assert_eq!(
        created.header("location"),
        Some(format!("/v1/events/{id}").as_str())
    );
    let expected = json!({
        "name": "Launch day", "kind": "coupon", "stock": 5, "per_user_limit": 1, "max_per_request": 1,
        "hold_seconds": 600, "opens_at": null, "closes_at": null, "closed": false,
        "remaining": 5, "held": 0, "sold": 0, "status": "open",
    });
    for (member, value) in expected.as_object().into_iter().flatten() {
        assert_eq!(&event[member], value, "{member} in {created}");
    }
    let read = app.get_event(id).await?;
    read.assert_status(200);
    assert_eq!(&read.body, event, "GET shows what POST answered");
    Ok(())
}

async fn stock_can_be_raised_and_lowered_but_never_below_what_is_held_or_sold(
    backend: Backend,
) -> anyhow::Result<()> {
    // Arrange: 2 held, 1 sold.
    let app = TestApp::spawn(backend).await?;
    let event = app.ticket_event(5, 1, 600).await?;
    app.reserve_ok(event, "ana", None).await?;
    app.reserve_ok(event, "ben", None).await?;
    let cy = app.reserve_ok(event, "cy", None).await?;
    app.confirm(cy["id"].as_str().unwrap_or_default(), "cy")
        .await?
        .assert_status(200);

    // Act
    let below = app.patch_event(event, json!({ "stock": 2 })).await?;
    let exact = app.patch_event(event, json!({ "stock": 3 })).await?;

    // Assert
    below.assert_problem(422, "invalid_event");
    exact.assert_status(200);
    assert_eq!(
        (&exact.body["stock"], &exact.body["remaining"]),
        (&json!(3), &json!(0)),
        "{exact}"
    );
    assert_eq!(exact.body["status"], "sold_out");
    app.reserve(event, "dee", None, None)
        .await?
        .assert_problem(409, "sold_out");

    let raised = app.patch_event(event, json!({ "stock": 10 })).await?;
    raised.assert_status(200);
    let counts = app.counts(event).await?;
    assert_eq!(
        (counts.stock, counts.remaining, counts.held, counts.sold),
        (10, 7, 2, 1)
    );
    assert_eq!(counts.status, "open");
    app.reserve_ok(event, "dee", None).await?;
    assert_eq!(app.counts(event).await?.remaining, 6);
    Ok(())
}

async fn bad_event_changes_are_refused_and_change_nothing(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(5, 1).await?;
    let before = app.get_event(event).await?.body;
    let path = format!("/v1/events/{event}");
    let patch = |body: Value| app.admin(Method::PATCH, &path).json(&body);
    let soon = Utc::now() + TimeDelta::hours(1);
    let cases = vec![
        (
            "unknown event",
            app.admin(Method::PATCH, "/v1/events/999999")
                .json(&json!({ "stock": 9 })),
            404,
            "event_not_found",
        ),
        (
            "non-numeric event id",
            app.admin(Method::PATCH, "/v1/events/abc")
                .json(&json!({ "stock": 9 })),
            404,
            "event_not_found",
        ),
        (
            "stock above 1,000,000,000",
            patch(json!({ "stock": 1_000_000_001u64 })),
            422,
            "invalid_event",
        ),
        (
            "closes_at before opens_at",
            patch(json!({ "opens_at": rfc3339(soon), "closes_at": rfc3339(soon - TimeDelta::minutes(1)) })),
            422,
            "invalid_event",
        ),
        (
            "negative stock",
            patch(json!({ "stock": -5 })),
            422,
            "invalid_body",
        ),
        (
            "closed as a string",
            patch(json!({ "closed": "yes" })),
            422,
            "invalid_body",
        ),
        (
            "unknown field",
            patch(json!({ "name": "renamed" })),
            422,
            "invalid_body",
        ),
        ("no body", app.admin(Method::PATCH, &path), 422, "invalid_body"),
    ];

    // Act
    let failures = mismatches(cases).await?;

    // Assert
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(app.get_event(event).await?.body, before, "the event is unchanged");
    Ok(())
}

async fn a_closed_event_refuses_reservations_until_it_is_reopened(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(5, 1).await?;
    app.reserve_ok(event, "ana", None).await?;

    // Act
    let closed = app.patch_event(event, json!({ "closed": true })).await?;

    // Assert
    closed.assert_status(200);
    assert_eq!(closed.body["status"], "closed", "{closed}");
    assert_eq!(closed.body["closed"], true);
    app.reserve(event, "ben", None, None)
        .await?
        .assert_problem(409, "closed");
    let counts = app.counts(event).await?;
    assert_eq!((counts.status.as_str(), counts.sold), ("closed", 1));

    let reopened = app.patch_event(event, json!({ "closed": false })).await?;
    assert_eq!(reopened.body["status"], "open", "{reopened}");
    app.reserve_ok(event, "ben", None).await?;
    assert_eq!(app.counts(event).await?.sold, 2);
    Ok(())
}

async fn an_event_closes_by_itself_at_closes_at(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let closes_at = Utc::now() + TimeDelta::milliseconds(1_500);
    let event = app
        .create_event(
            json!({ "name": "flash", "kind": "coupon", "stock": 5, "closes_at": rfc3339(closes_at) }),
        )
        .await?;
    let past = app
        .create_event(json!({
            "name": "over", "kind": "coupon", "stock": 5,
            "closes_at": rfc3339(Utc::now() - TimeDelta::minutes(1)),
        }))
        .await?;
    app.reserve_ok(event, "ana", None).await?;

    // Act
    let wait = (closes_at + TimeDelta::milliseconds(100) - Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(wait).await;

    // Assert
    app.reserve(event, "ben", None, None)
        .await?
        .assert_problem(409, "closed");
    assert_eq!(app.counts(event).await?.status, "closed");
    app.reserve(past, "ben", None, None)
        .await?
        .assert_problem(409, "closed");
    assert_eq!(app.counts(past).await?.status, "closed");
    Ok(())
}

async fn an_event_that_opens_later_is_scheduled_and_refuses_reservations_until_then(
    backend: Backend,
) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let later = app
        .create_event(json!({
            "name": "later", "kind": "coupon", "stock": 5,
            "opens_at": rfc3339(Utc::now() + TimeDelta::hours(1)),
        }))
        .await?;
    let opens_at = Utc::now() + TimeDelta::milliseconds(1_500);
    let soon = app
        .create_event(json!({ "name": "soon", "kind": "coupon", "stock": 5, "opens_at": rfc3339(opens_at) }))
        .await?;

    // Act
    let early = app.reserve(later, "ana", None, None).await?;

    // Assert
    early.assert_problem(409, "not_open");
    assert!(
        early.body["opens_at"].is_string(),
        "the refusal says when: {early}"
    );
    assert_eq!(app.counts(later).await?.status, "scheduled");
    let opened = app.patch_event(later, json!({ "opens_at": null })).await?;
    assert_eq!(opened.body["status"], "open", "{opened}");
    assert_eq!(opened.body["opens_at"], Value::Null);
    app.reserve_ok(later, "ana", None).await?;

    app.reserve(soon, "ana", None, None)
        .await?
        .assert_problem(409, "not_open");
    let wait = (opens_at + TimeDelta::milliseconds(100) - Utc::now())
        .to_std()
        .unwrap_or(Duration::ZERO);
    tokio::time::sleep(wait).await;
    assert_eq!(app.counts(soon).await?.status, "open");
    app.reserve_ok(soon, "ana", None).await?;
    Ok(())
}

async fn probes_and_operator_stats_answer(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(5, 1).await?;
    app.reserve_ok(event, "ana", None).await?;

    // Act
    let health = send(app.request(Method::GET, "/healthz")).await?;
    let ready = send(app.request(Method::GET, "/readyz")).await?;
    let stats = send(app.admin(Method::GET, "/v1/admin/stats")).await?;

    // Assert
    health.assert_status(200);
    ready.assert_status(200);
    stats.assert_status(200);
    let persister = &stats.body["persister"];
    for member in ["batches", "writes", "mean_batch", "mean_commit_ms"] {
        assert!(persister[member].is_number(), "{member} in {stats}");
    }
    assert!(persister["writes"].as_u64() >= Some(1), "{stats}");
    assert!(persister["batches"].as_u64() >= Some(1), "{stats}");
    assert!(
        stats.body["event_actors"]["starts"].as_u64() >= Some(1),
        "{stats}"
    );
    assert_eq!(stats.body["event_actors"]["restarts"], 0, "{stats}");
    Ok(())
}
