//! `Idempotency-Key`: a retry replays the first answer instead of claiming again; the same key
//! with a different request is refused; concurrent requests with one key create one
//! reservation. The key is scoped to (event, user).

use reqwest::Method;
use serde_json::json;

use crate::helpers::{Backend, TestApp, active_units, keyed_successes, send};

on_every_backend!(
    retrying_with_the_same_key_replays_the_first_reservation,
    reusing_a_key_with_a_different_quantity_is_refused,
    concurrent_requests_with_one_key_create_one_reservation,
    the_same_key_from_two_users_makes_two_reservations,
    the_same_key_on_two_events_makes_two_reservations,
    a_key_still_replays_after_its_reservation_was_cancelled,
);

async fn retrying_with_the_same_key_replays_the_first_reservation(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(10, 1).await?;
    let first = app.reserve(event, "ana", Some(1), Some("order-1")).await?;
    first.assert_status(201);
    assert_eq!(first.header("idempotent-replayed"), None, "{first}");

    // Act
    let retry = app.reserve(event, "ana", Some(1), Some("order-1")).await?;

    // Assert
    retry.assert_status(201);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body, first.body, "the replay is the first answer");
    let counts = app.counts(event).await?;
    assert_eq!((counts.sold, counts.remaining), (1, 9), "no second unit");
    assert_eq!(active_units(&app.db.reservations(event).await?), (1, 1));
    Ok(())
}

async fn reusing_a_key_with_a_different_quantity_is_refused(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.ticket_event(10, 5, 600).await?;
    let first = app.reserve(event, "ana", Some(2), Some("k")).await?;
    first.assert_status(201);

    // Act
    let reused = app.reserve(event, "ana", Some(3), Some("k")).await?;

    // Assert
    reused.assert_problem(422, "idempotency_key_reused");
    let no_body = app.reserve(event, "ana", None, Some("k")).await?;
    no_body.assert_problem(422, "idempotency_key_reused");
    let counts = app.counts(event).await?;
    assert_eq!((counts.held, counts.remaining), (2, 8), "nothing more taken");
    assert_eq!(app.db.reservations(event).await?.len(), 1);
    Ok(())
}

async fn concurrent_requests_with_one_key_create_one_reservation(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.ticket_event(100, 5, 600).await?;
    let path = format!("/v1/events/{event}/reservations");
    let requests: Vec<_> = (0..20)
        .map(|_| {
            send(
                app.as_user(Method::POST, &path, "ana")
                    .header("idempotency-key", "double-click")
                    .json(&json!({ "quantity": 2 })),
            )
        })
        .collect();

    // Act
    let replies = futures_util::future::join_all(requests).await;

    // Assert
    let (ids, fresh) = keyed_successes(replies)?;
    assert_eq!(ids.len(), 1, "every success carries the same id: {ids:?}");
    assert_eq!(fresh, 1, "one answer is the original, the others replays");
    let rows = app.db.reservations(event).await?;
    assert_eq!(active_units(&rows), (1, 2), "one reservation in the database");
    assert_eq!(rows[0].idempotency_key.as_deref(), Some("double-click"));
    assert_eq!(
        ids.iter().next().map(String::as_str),
        Some(rows[0].id.to_string().as_str())
    );
    assert_eq!(app.counts(event).await?.held, 2);
    Ok(())
}

async fn the_same_key_from_two_users_makes_two_reservations(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(10, 1).await?;
    let ana = app.reserve(event, "ana", None, Some("same")).await?;

    // Act
    let ben = app.reserve(event, "ben", None, Some("same")).await?;

    // Assert
    ana.assert_status(201);
    ben.assert_status(201);
    assert_eq!(ben.header("idempotent-replayed"), None);
    assert_ne!(ana.id(), ben.id());
    assert_eq!(app.counts(event).await?.sold, 2);
    Ok(())
}

async fn a_key_still_replays_after_its_reservation_was_cancelled(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(10, 1).await?;
    let first = app.reserve(event, "ana", None, Some("k1")).await?;
    first.assert_status(201);
    let id = first.id().unwrap_or_default().to_owned();
    app.cancel(&id, "ana").await?.assert_status(200);

    // Act
    let retry = app.reserve(event, "ana", None, Some("k1")).await?;

    // Assert
    retry.assert_status(201);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.id(), Some(id.as_str()), "the first answer, not a new claim");
    let counts = app.counts(event).await?;
    assert_eq!((counts.sold, counts.remaining), (0, 10), "the retry took nothing");
    Ok(())
}

async fn the_same_key_on_two_events_makes_two_reservations(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let first_event = app.coupon_event(10, 1).await?;
    let second_event = app.coupon_event(10, 1).await?;
    let first = app.reserve(first_event, "ana", None, Some("same")).await?;

    // Act
    let second = app.reserve(second_event, "ana", None, Some("same")).await?;

    // Assert
    first.assert_status(201);
    second.assert_status(201);
    assert_eq!(second.header("idempotent-replayed"), None);
    assert_eq!(second.body["event_id"], second_event);
    assert_eq!(app.counts(first_event).await?.sold, 1);
    assert_eq!(app.counts(second_event).await?.sold, 1);
    Ok(())
}
