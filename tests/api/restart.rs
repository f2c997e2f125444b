//! Restarts: the database is the record. A new process on the same database (after kill -9)
//! shows the same events and reservations, enforces the same limits, replays the same
//! idempotent answers, and expires the same holds at the same instants. And a kill -9 in the
//! middle of a stampede loses no acknowledged claim and strands no stock.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use futures_util::StreamExt;
use serde_json::Value;

use crate::helpers::{
    Backend, EXPIRY_SLACK, Stampede, TestApp, active_units, assert_acknowledged_are_durable, check_exact,
    exclusive_machine, quiet_machine, timestamp,
};

on_every_backend!(
    a_restart_on_the_same_database_restores_the_same_state,
    a_hold_that_expired_while_the_server_was_down_is_free_at_once_after_the_restart,
    a_restored_hold_expires_on_time_even_if_nobody_touches_its_event,
    claims_acknowledged_before_a_kill_9_survive_it_and_the_rest_of_the_stock_still_sells,
);

/// Everything a client can read about a set of events and users.
async fn everything(app: &TestApp, events: &[i64], users: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut seen = Vec::new();
    for event in events {
        seen.push(app.get_event(*event).await?.body);
    }
    for user in users {
        let mine = app.my_reservations(user).await?.body;
        for reservation in mine["reservations"].as_array().into_iter().flatten() {
            let id = reservation["id"].as_str().unwrap_or_default();
            seen.push(app.get_reservation(id, user).await?.body);
        }
        seen.push(mine);
    }
    Ok(seen)
}

async fn a_restart_on_the_same_database_restores_the_same_state(backend: Backend) -> anyhow::Result<()> {
    let _quiet = quiet_machine().await;
    // Arrange: coupons issued and revoked, tickets held, confirmed and cancelled.
    let mut app = TestApp::spawn(backend).await?;
    let coupons = app.coupon_event(10, 1).await?;
    let tickets = app.ticket_event(10, 2, 3).await?;
    let ana_coupon = app.reserve(coupons, "ana", None, Some("c-ana")).await?;
    ana_coupon.assert_status(201);
    app.reserve_ok(coupons, "ben", None).await?;
    let cy_coupon = app.reserve_ok(coupons, "cy", None).await?;
    app.cancel(cy_coupon["id"].as_str().unwrap_or_default(), "cy")
        .await?
        .assert_status(200);
    let ana_hold = app.reserve(tickets, "ana", Some(2), Some("t-ana")).await?;
    ana_hold.assert_status(201);
    let ben_ticket = app.reserve_ok(tickets, "ben", Some(1)).await?;
    app.confirm(ben_ticket["id"].as_str().unwrap_or_default(), "ben")
        .await?
        .assert_status(200);
    let cy_ticket = app.reserve_ok(tickets, "cy", Some(1)).await?;
    app.cancel(cy_ticket["id"].as_str().unwrap_or_default(), "cy")
        .await?
        .assert_status(200);
    let expires_at = timestamp(&ana_hold.body["expires_at"])?;
    let users = ["ana", "ben", "cy"];
    let before = everything(&app, &[coupons, tickets], &users).await?;

    // Act
    app.restart().await?;

    // Assert
    let after = everything(&app, &[coupons, tickets], &users).await?;
    assert_eq!(after, before, "what clients can read is identical");
    let counts = app.counts(tickets).await?;
    assert_eq!(
        (counts.remaining, counts.held, counts.sold),
        (7, 2, 1),
        "ana's hold is still held"
    );
    let counts = app.counts(coupons).await?;
    assert_eq!((counts.remaining, counts.sold), (8, 2));

    app.reserve(coupons, "ben", None, None)
        .await?
        .assert_problem(409, "limit_reached");
    app.reserve(tickets, "ana", Some(1), None)
        .await?
        .assert_problem(409, "limit_reached");
    let replay = app.reserve(coupons, "ana", None, Some("c-ana")).await?;
    replay.assert_status(201);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        replay.body, ana_coupon.body,
        "the replay is the first answer, byte for byte"
    );
    let replay = app.reserve(tickets, "ana", Some(2), Some("t-ana")).await?;
    replay.assert_status(201);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        replay.body, ana_hold.body,
        "the replay is the first answer, byte for byte"
    );
    app.reserve(tickets, "ana", Some(1), Some("t-ana"))
        .await?
        .assert_problem(422, "idempotency_key_reused");

    // The hold kept its expiry: it comes back on time, not early, not late.
    let (_, back_at) = app.watch_release(tickets, 2, expires_at).await?;
    assert!(
        back_at <= expires_at + EXPIRY_SLACK,
        "the restored hold came back {} ms late",
        (back_at - expires_at).num_milliseconds()
    );
    let counts = app.counts(tickets).await?;
    assert_eq!((counts.remaining, counts.held, counts.sold), (9, 0, 1));
    Ok(())
}

async fn a_hold_that_expired_while_the_server_was_down_is_free_at_once_after_the_restart(
    backend: Backend,
) -> anyhow::Result<()> {
    let _quiet = quiet_machine().await;
    // Arrange: every unit held, and the server down when the hold expires.
    let mut app = TestApp::spawn(backend).await?;
    let event = app.ticket_event(2, 2, 1).await?;
    let hold = app.reserve_ok(event, "ana", Some(2)).await?;
    let id = hold["id"].as_str().unwrap_or_default().to_owned();
    let expires_at = timestamp(&hold["expires_at"])?;
    app.kill();
    let wait = (expires_at + TimeDelta::milliseconds(300) - Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(wait).await;

    // Act
    app.start().await?;
    let first_read = app.counts(event).await?;
    let claim = app.reserve(event, "ben", Some(1), None).await?;

    // Assert
    assert!(
        first_read.held == 0 && claim.status.as_u16() == 201,
        "an expired hold still counted after the restart: the first read showed {first_read:?}, \
         a claim for 1 of the 2 free units got {claim}"
    );
    app.confirm(&id, "ana").await?.assert_problem(409, "hold_expired");
    let read = app.get_reservation(&id, "ana").await?;
    assert_eq!(read.body["status"], "expired", "{read}");
    let counts = app.counts(event).await?;
    assert_eq!((counts.remaining, counts.held), (1, 1));
    Ok(())
}

async fn a_restored_hold_expires_on_time_even_if_nobody_touches_its_event(
    backend: Backend,
) -> anyhow::Result<()> {
    let _quiet = quiet_machine().await;
    // Arrange
    let mut app = TestApp::spawn(backend).await?;
    let event = app.ticket_event(5, 2, 2).await?;
    let hold = app.reserve_ok(event, "ana", Some(2)).await?;
    let id = hold["id"].as_str().unwrap_or_default().to_owned();
    let expires_at = timestamp(&hold["expires_at"])?;

    // Act: restart before the hold expires, then leave the event alone until after it has.
    app.restart().await?;
    let wait = (expires_at + TimeDelta::milliseconds(250) - Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(wait).await;

    // Assert
    let row = app.db.reservations(event).await?;
    let read = app.get_reservation(&id, "ana").await?;
    assert_eq!(
        (row[0].status.as_str(), read.body["status"].as_str()),
        ("expired", Some("expired")),
        "250 ms after expires_at the database row and GET /v1/reservations/{{id}} should say expired"
    );
    Ok(())
}

async fn claims_acknowledged_before_a_kill_9_survive_it_and_the_rest_of_the_stock_still_sells(
    backend: Backend,
) -> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange
    let stock = 2_000;
    let mut app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(stock as u64, 1).await?;
    let crowd = Stampede::users("crowd", 3_000);
    let stampede = Stampede::new(&app.client, &app.address, event, crowd.clone());
    let finished = stampede.finished.clone();
    let running = tokio::spawn(stampede.run());

    // Act: kill -9 once a few hundred claims are answered and the rest are in flight.
    let few_hundred = async {
        while finished.load(Ordering::Relaxed) < 300 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), few_hundred).await?;
    app.kill();
    let outcome = tokio::time::timeout(Duration::from_secs(120), running).await??;
    app.start().await?;

    // Assert
    assert!(
        !outcome.unanswered.is_empty(),
        "the kill should have cut off requests in flight ({} granted, {:?})",
        outcome.granted.len(),
        outcome.refused
    );
    assert!(
        outcome
            .refused
            .keys()
            .all(|answer| !answer.starts_with('5') || answer == "503 unavailable"),
        "{:?}",
        outcome.refused
    );
    let rows = app.db.reservations(event).await?;
    assert_acknowledged_are_durable(&outcome, &rows);
    let attempted: HashSet<&str> = crowd.iter().map(String::as_str).collect();
    let mut owners = HashSet::new();
    for row in &rows {
        assert!(attempted.contains(row.user_id.as_str()), "phantom row {row:?}");
        assert!(
            owners.insert(row.user_id.as_str()),
            "two rows for {}",
            row.user_id
        );
    }
    let (_, units) = active_units(&rows);
    eprintln!(
        "{backend:?}: kill -9 cut off {} of 3000 claims; {} were acknowledged, {units} units are durable",
        outcome.unanswered.len(),
        outcome.granted.len(),
    );
    assert!(units <= stock, "{units} units in the database for {stock}");
    let counts = app.counts(event).await?;
    assert_eq!(
        (counts.sold, counts.held),
        (units, 0),
        "the live counts are the database's"
    );

    // Every acknowledged claim is readable by its owner after the restart.
    let app = &app;
    let reads = futures_util::stream::iter(&outcome.granted)
        .map(|grant| async move {
            (
                grant,
                app.get_reservation(&grant.id.to_string(), &grant.user).await,
            )
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    for (grant, read) in reads {
        let read = read?;
        assert_eq!(read.body["status"], "issued", "{grant:?}: {read}");
    }

    // Liveness: the remaining units still sell, exactly.
    let remaining = usize::try_from(counts.remaining)?;
    let latecomers = Stampede::users("latecomer", remaining + 300);
    let second = Stampede::new(&app.client, &app.address, event, latecomers)
        .run()
        .await;
    if let Err(violations) = check_exact(&second, remaining) {
        panic!("after the restart: {violations}");
    }
    let counts = app.counts(event).await?;
    assert_eq!((counts.remaining, counts.sold), (0, stock));
    assert_eq!(active_units(&app.db.reservations(event).await?).1, stock);
    Ok(())
}
