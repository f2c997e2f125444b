//! Failing closed: while the database cannot take a write, claims are answered 503 with
//! `Retry-After` — never a 2xx that is not durable — and once it can again, claims succeed and
//! the counts match the database. The same when PostgreSQL ends every session of the server (as a
//! restart does): a claim that fails is a 503, and the pool's fresh connections serve the next.

use std::time::{Duration, Instant};

use reqwest::StatusCode;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dropping_every_connection_fails_closed_and_recovers() -> anyhow::Result<()> {
    // Arrange: claims made, so the server holds pooled connections it used a moment ago.
    let app = TestApp::spawn(Backend::Postgres).await?;
    let event = app.coupon_event(100, 1).await?;
    for user in ["ana", "ben", "cy"] {
        app.reserve_ok(event, user, None).await?;
    }

    // Act: every other session on the database is ended, as a restart would. Then one claim after
    // another until one succeeds, and ten more.
    app.db
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut failed = Vec::new();
    let recovered = loop {
        let reply = app
            .reserve(event, &format!("after-{}", failed.len()), None, None)
            .await?;
        if reply.status == StatusCode::CREATED || Instant::now() > deadline {
            break reply;
        }
        failed.push(reply);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut then = Vec::new();
    for i in 0..10 {
        then.push(app.reserve(event, &format!("then-{i}"), None, None).await?);
    }

    // Assert: a claim that fails is a 503 with Retry-After (never a 500 or a 2xx that is not
    // durable), and within the deadline claims succeed again, every one of them.
    eprintln!("{} claims answered 503 before one succeeded", failed.len());
    for reply in &failed {
        reply.assert_problem(503, "unavailable");
        assert!(reply.header("retry-after").is_some(), "{reply:?}");
    }
    recovered.assert_status(201);
    for reply in &then {
        reply.assert_status(201);
    }
    let counts = app.counts(event).await?;
    assert_eq!((counts.sold, counts.remaining), (14, 86));
    assert_eq!(active_units(&app.db.reservations(event).await?), (14, 14));
    Ok(())
}
