//! Ticket holds: a hold counts as `held` until it is confirmed (then `sold`), cancelled, or
//! expires — and an expired hold's units come back on time, never early. Every read checks
//! `remaining + held + sold == stock` (see `TestApp::counts`).

use chrono::{TimeDelta, Utc};

use crate::helpers::{Backend, EXPIRY_SLACK, TestApp, quiet_machine, timestamp};

on_every_backend!(
    an_unconfirmed_hold_returns_to_stock_on_time_and_can_no_longer_be_confirmed,
    a_hold_confirmed_before_expiry_is_sold_and_never_expires,
    cancelling_a_hold_returns_its_units_at_once,
    a_coupon_cannot_be_confirmed_and_cancelling_revokes_it,
);

async fn an_unconfirmed_hold_returns_to_stock_on_time_and_can_no_longer_be_confirmed(
    backend: Backend,
) -> anyhow::Result<()> {
    let _quiet = quiet_machine().await;
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.ticket_event(5, 2, 1).await?;
    let hold = app.reserve_ok(event, "ana", Some(2)).await?;
    let id = hold["id"].as_str().unwrap_or_default().to_owned();
    let expires_at = timestamp(&hold["expires_at"])?;
    assert_eq!(hold["status"], "held");
    assert_eq!(
        expires_at - timestamp(&hold["created_at"])?,
        TimeDelta::seconds(1)
    );
    let counts = app.counts(event).await?;
    assert_eq!((counts.remaining, counts.held, counts.sold), (3, 2, 0));

    // Act: watch the event every 20 ms until the units are back.
    let (counts, back_at) = app.watch_release(event, 2, expires_at).await?;

    // Assert
    assert_eq!((counts.remaining, counts.held), (5, 0), "{counts:?}");
    assert!(
        back_at <= expires_at + EXPIRY_SLACK,
        "units came back {} ms after the hold expired",
        (back_at - expires_at).num_milliseconds()
    );
    let rows = app.db.reservations(event).await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "expired", "the database row");
    let read = app.get_reservation(&id, "ana").await?;
    assert_eq!(read.body["status"], "expired", "{read}");
    app.confirm(&id, "ana").await?.assert_problem(409, "hold_expired");
    let cancel = app.cancel(&id, "ana").await?;
    cancel.assert_status(200);
    assert_eq!(cancel.body["status"], "expired", "cancelling changes nothing");
    let counts = app.counts(event).await?;
    assert_eq!((counts.remaining, counts.held, counts.sold), (5, 0, 0));
    Ok(())
}

async fn a_hold_confirmed_before_expiry_is_sold_and_never_expires(backend: Backend) -> anyhow::Result<()> {
    let _quiet = quiet_machine().await;
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.ticket_event(5, 2, 2).await?;
    let hold = app.reserve_ok(event, "ana", Some(2)).await?;
    let id = hold["id"].as_str().unwrap_or_default().to_owned();
    let expires_at = timestamp(&hold["expires_at"])?;

    // Act
    let confirmed = app.confirm(&id, "ana").await?;

    // Assert
    confirmed.assert_status(200);
    assert_eq!(confirmed.body["status"], "confirmed", "{confirmed}");
    assert_eq!(confirmed.body["id"], hold["id"]);
    let counts = app.counts(event).await?;
    assert_eq!((counts.remaining, counts.held, counts.sold), (3, 0, 2));
    let again = app.confirm(&id, "ana").await?;
    again.assert_status(200);
    assert_eq!(again.body["status"], "confirmed", "confirming twice is harmless");

    let wait = (expires_at + TimeDelta::milliseconds(500) - Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(wait).await;
    let counts = app.counts(event).await?;
    assert_eq!(
        (counts.remaining, counts.held, counts.sold),
        (3, 0, 2),
        "a confirmed ticket does not expire"
    );
    assert_eq!(app.db.reservations(event).await?[0].status, "confirmed");
    let read = app.get_reservation(&id, "ana").await?;
    assert_eq!(read.body["status"], "confirmed", "{read}");
    Ok(())
}

async fn cancelling_a_hold_returns_its_units_at_once(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.ticket_event(5, 2, 600).await?;
    let hold = app.reserve_ok(event, "ana", Some(2)).await?;
    let id = hold["id"].as_str().unwrap_or_default().to_owned();

    // Act
    let cancelled = app.cancel(&id, "ana").await?;

    // Assert
    cancelled.assert_status(200);
    assert_eq!(cancelled.body["status"], "cancelled", "{cancelled}");
    let counts = app.counts(event).await?;
    assert_eq!((counts.remaining, counts.held, counts.sold), (5, 0, 0));
    let again = app.cancel(&id, "ana").await?;
    again.assert_status(200);
    assert_eq!(again.body, cancelled.body, "cancelling twice changes nothing");
    app.confirm(&id, "ana")
        .await?
        .assert_problem(409, "invalid_state");
    assert_eq!(app.db.reservations(event).await?[0].status, "cancelled");

    // A confirmed ticket can be cancelled too, and its units come back.
    let bought = app.reserve_ok(event, "ana", Some(2)).await?;
    let bought = bought["id"].as_str().unwrap_or_default().to_owned();
    app.confirm(&bought, "ana").await?.assert_status(200);
    assert_eq!(app.counts(event).await?.sold, 2);
    let refund = app.cancel(&bought, "ana").await?;
    assert_eq!(refund.body["status"], "cancelled", "{refund}");
    let counts = app.counts(event).await?;
    assert_eq!((counts.remaining, counts.held, counts.sold), (5, 0, 0));
    Ok(())
}

async fn a_coupon_cannot_be_confirmed_and_cancelling_revokes_it(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(3, 1).await?;
    let coupon = app.reserve_ok(event, "ana", None).await?;
    let id = coupon["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(coupon["status"], "issued");
    assert!(coupon.get("expires_at").is_none(), "coupons do not expire");

    // Act
    let confirm = app.confirm(&id, "ana").await?;
    let revoke = app.cancel(&id, "ana").await?;

    // Assert
    confirm.assert_problem(409, "invalid_state");
    revoke.assert_status(200);
    assert_eq!(revoke.body["status"], "revoked", "{revoke}");
    let counts = app.counts(event).await?;
    assert_eq!((counts.remaining, counts.sold), (3, 0));
    assert_eq!(app.db.reservations(event).await?[0].status, "revoked");
    // A revoked coupon no longer counts against the user's limit.
    app.reserve_ok(event, "ana", None).await?;
    assert_eq!(app.counts(event).await?.sold, 1);
    Ok(())
}
