//! Many clients, few units: exactly `stock` claims succeed, every one of them is durable, and
//! the live counts agree with the database.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use reqwest::Method;

use crate::helpers::{Backend, Stampede, TestApp, active_units, check_exact, exclusive_machine, send};

on_every_backend!(
    fifteen_hundred_clients_claiming_one_thousand_units_get_exactly_one_thousand,
    three_events_stampeded_at_once_each_sell_exactly_their_stock,
    with_tiny_batches_and_one_thread_each_the_stampede_is_still_exact,
    a_burst_of_claims_with_the_longest_ids_and_keys_all_land,
);

/// 400 concurrent claims whose user ids (128 characters) and idempotency keys (255) are as long
/// as allowed: batches of such rows are cut into several statements by size on PostgreSQL and
/// MySQL. Every claim is answered 201, and every one is a row with its own key.
async fn a_burst_of_claims_with_the_longest_ids_and_keys_all_land(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(1_000, 1).await?;
    let long = |prefix: &str, i: usize, len: usize| {
        let tag = format!("{prefix}{i:04}");
        format!("{tag}{}", "x".repeat(len - tag.len()))
    };

    // Act
    let claims = (0..400).map(|i| {
        let (app, user, key) = (&app, long("u", i, 128), long("k", i, 255));
        async move { app.reserve(event, &user, None, Some(&key)).await }
    });
    let replies = futures_util::future::try_join_all(claims).await?;

    // Assert
    let created = replies.iter().filter(|r| r.status == 201).count();
    assert_eq!(created, 400, "{:?}", replies.iter().find(|r| r.status != 201));
    let rows = app.db.reservations(event).await?;
    let keys: HashSet<&str> = rows.iter().filter_map(|r| r.idempotency_key.as_deref()).collect();
    assert_eq!((rows.len(), keys.len()), (400, 400));
    assert!(keys.iter().all(|k| k.len() == 255));
    assert_eq!(app.counts(event).await?.sold, 400);
    Ok(())
}

async fn fifteen_hundred_clients_claiming_one_thousand_units_get_exactly_one_thousand(
    backend: Backend,
) -> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(1_000, 1).await?;
    let users = Stampede::users("fan", 1_500);

    // Act: the stampede, with a reader watching the counts all along.
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (app, done) = (&app, done.clone());
        async move {
            let mut reads = Vec::new();
            while !done.load(Ordering::Relaxed) {
                reads.push(app.counts(event).await);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            reads
        }
    };
    let stampede = async {
        let outcome = Stampede::new(&app.client, &app.address, event, users).run().await;
        done.store(true, Ordering::Relaxed);
        outcome
    };
    let (outcome, reads) = tokio::join!(stampede, reader);

    // Assert
    if let Err(violations) = check_exact(&outcome, 1_000) {
        panic!("{violations} (slowest answer {:?})", outcome.slowest);
    }
    let mut sold_before = 0;
    for read in reads {
        let counts = read?; // fails if remaining + held + sold != stock in any read
        assert!(
            counts.sold >= sold_before,
            "sold went back from {sold_before} to {}",
            counts.sold
        );
        assert!(counts.sold <= 1_000, "{counts:?}");
        sold_before = counts.sold;
    }
    let rows = app.db.reservations(event).await?;
    assert_eq!(
        active_units(&rows),
        (1_000, 1_000),
        "rows and units in the database"
    );
    let in_db: HashSet<_> = rows.iter().map(|r| r.id).collect();
    let granted: HashSet<_> = outcome.granted.iter().map(|g| g.id).collect();
    assert_eq!(
        in_db, granted,
        "the database holds exactly the granted reservations"
    );
    let counts = app.counts(event).await?;
    assert_eq!(
        (counts.remaining, counts.held, counts.sold, counts.status.as_str()),
        (0, 0, 1_000, "sold_out")
    );
    Ok(())
}

async fn three_events_stampeded_at_once_each_sell_exactly_their_stock(
    backend: Backend,
) -> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange: the persister batches writes of all three events together.
    let app = TestApp::spawn(backend).await?;
    let mut events = Vec::new();
    for _ in 0..3 {
        events.push(app.coupon_event(200, 1).await?);
    }

    // Act
    let stampedes = events.iter().enumerate().map(|(i, event)| {
        let users = Stampede::users(&format!("fan{i}"), 300);
        Stampede::new(&app.client, &app.address, *event, users).run()
    });
    let outcomes = futures_util::future::join_all(stampedes).await;

    // Assert
    for (event, outcome) in events.iter().zip(&outcomes) {
        if let Err(violations) = check_exact(outcome, 200) {
            panic!("event {event}: {violations}");
        }
        assert_eq!(active_units(&app.db.reservations(*event).await?), (200, 200));
        let counts = app.counts(*event).await?;
        assert_eq!((counts.remaining, counts.sold), (0, 200), "event {event}");
    }
    Ok(())
}

async fn with_tiny_batches_and_one_thread_each_the_stampede_is_still_exact(
    backend: Backend,
) -> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange: at most 7 writes per commit, so the claims span many batches.
    let flags = ["--max-batch", "7", "--http-workers", "1", "--event-arbiters", "1"];
    let app = TestApp::spawn_with(backend, &flags).await?;
    let event = app.coupon_event(100, 1).await?;

    // Act
    let outcome = Stampede::new(&app.client, &app.address, event, Stampede::users("fan", 300))
        .run()
        .await;

    // Assert
    if let Err(violations) = check_exact(&outcome, 100) {
        panic!("{violations}");
    }
    assert_eq!(active_units(&app.db.reservations(event).await?), (100, 100));
    let stats = send(app.admin(Method::GET, "/v1/admin/stats")).await?;
    let largest = stats.body["persister"]["largest_batch"].as_u64();
    assert!(largest.is_some_and(|n| n <= 7), "{stats}");
    assert_eq!(app.counts(event).await?.remaining, 0);
    Ok(())
}
