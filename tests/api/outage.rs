//! Failing closed: while the database cannot take a write, claims are answered 503 with
//! `Retry-After` — never a 2xx that is not durable — and once it can again, claims succeed and
//! the counts match the database.

use std::time::{Duration, Instant};

use crate::helpers::{Backend, TestApp, active_units};

on_every_backend!(claims_fail_closed_while_the_database_cannot_commit_and_succeed_once_it_can);

async fn claims_fail_closed_while_the_database_cannot_commit_and_succeed_once_it_can(
    backend: Backend,
) -> anyhow::Result<()> {
    // Arrange: one claim made, then the reservations table taken away behind the server's back.
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(10, 1).await?;
    app.reserve_ok(event, "ana", None).await?;
    app.db
        .execute("ALTER TABLE reservations RENAME TO reservations_away")
        .await?;

    // Act
    let during = app.reserve(event, "ben", None, None).await?;
    let again = app.reserve(event, "cy", None, None).await?;
    app.db
        .execute("ALTER TABLE reservations_away RENAME TO reservations")
        .await?;

    // Assert
    during.assert_problem(503, "unavailable");
    assert!(during.header("retry-after").is_some(), "{during:?}");
    again.assert_problem(503, "unavailable");
    let rows = app.db.reservations(event).await?;
    assert_eq!(
        active_units(&rows),
        (1, 1),
        "nothing was written during the outage"
    );

    // Liveness: once the database is back, the same claim succeeds (retrying while it recovers).
    let deadline = Instant::now() + Duration::from_secs(10);
    let recovered = loop {
        let reply = app.reserve(event, "ben", None, None).await?;
        if reply.status.as_u16() != 503 || Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    recovered.assert_status(201);
    app.reserve_ok(event, "cy", None).await?;
    let counts = app.counts(event).await?;
    assert_eq!((counts.sold, counts.remaining), (3, 7));
    assert_eq!(active_units(&app.db.reservations(event).await?), (3, 3));
    Ok(())
}
