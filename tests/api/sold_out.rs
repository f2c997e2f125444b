//! After the last unit, claims are refused as `sold_out` at the HTTP edge (the event actor
//! publishes a sold-out gate) — but a retry with an Idempotency-Key still replays its first
//! answer, and units that come back (cancel, more stock) are claimable again at once.

use serde_json::json;

use crate::helpers::{Backend, TestApp};

on_every_backend!(
    a_keyed_retry_replays_its_reservation_after_the_event_sold_out,
    a_cancel_after_the_sell_out_makes_the_unit_claimable_again,
    raising_the_stock_of_a_sold_out_event_reopens_it,
    closing_a_sold_out_event_answers_closed,
);

/// A one-unit coupon event whose unit ana holds, and a first refusal (to ben) seen, then a
/// second (to cy), which the HTTP edge answers from the event's sold-out gate.
async fn sold_out_event(backend: Backend) -> anyhow::Result<(TestApp, i64)> {
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(1, 1).await?;
    app.reserve(event, "ana", None, None).await?.assert_status(201);
    app.reserve(event, "ben", None, None)
        .await?
        .assert_problem(409, "sold_out");
    let refusal = app.reserve(event, "cy", None, None).await?;
    refusal.assert_problem(409, "sold_out");
    assert_eq!(
        refusal.body,
        json!({
            "type": "urn:firstcome:problem:sold_out", "title": "Sold out", "status": 409,
            "detail": "Nothing is left.", "code": "sold_out", "remaining": 0,
        }),
        "{refusal}"
    );
    Ok((app, event))
}

async fn a_keyed_retry_replays_its_reservation_after_the_event_sold_out(
    backend: Backend,
) -> anyhow::Result<()> {
    // Arrange: the only unit goes to ana, with a key.
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(1, 1).await?;
    let first = app.reserve(event, "ana", None, Some("order-1")).await?;
    first.assert_status(201);
    app.reserve(event, "ben", None, None)
        .await?
        .assert_problem(409, "sold_out");

    // Act
    let retry = app.reserve(event, "ana", None, Some("order-1")).await?;

    // Assert
    retry.assert_status(201);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body, first.body);
    Ok(())
}

async fn a_cancel_after_the_sell_out_makes_the_unit_claimable_again(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(1, 1).await?;
    let ana = app.reserve(event, "ana", None, None).await?;
    ana.assert_status(201);
    app.reserve(event, "ben", None, None)
        .await?
        .assert_problem(409, "sold_out");
    let id = ana
        .id()
        .ok_or_else(|| anyhow::anyhow!("no id in {ana}"))?
        .to_owned();

    // Act
    app.cancel(&id, "ana").await?.assert_status(200);
    let ben = app.reserve(event, "ben", None, None).await?;

    // Assert
    ben.assert_status(201);
    app.reserve(event, "cleo", None, None)
        .await?
        .assert_problem(409, "sold_out");
    let counts = app.counts(event).await?;
    assert_eq!((counts.remaining, counts.sold), (0, 1));
    Ok(())
}

async fn raising_the_stock_of_a_sold_out_event_reopens_it(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let (app, event) = sold_out_event(backend).await?;

    // Act
    app.patch_event(event, json!({ "stock": 2 }))
        .await?
        .assert_status(200);

    // Assert
    app.reserve(event, "ben", None, None).await?.assert_status(201);
    app.reserve(event, "cleo", None, None)
        .await?
        .assert_problem(409, "sold_out");
    Ok(())
}

async fn closing_a_sold_out_event_answers_closed(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let (app, event) = sold_out_event(backend).await?;

    // Act
    app.patch_event(event, json!({ "closed": true }))
        .await?
        .assert_status(200);

    // Assert
    app.reserve(event, "ben", None, None)
        .await?
        .assert_problem(409, "closed");
    Ok(())
}
