//! Per-user limits and multi-unit requests: a user never holds more than `per_user_limit`
//! units, however many requests they fire at once, and a request for more units than remain
//! is refused with how many do.

use reqwest::Method;

use crate::helpers::{Backend, TestApp, active_units, exclusive_machine, send};

on_every_backend!(
    one_user_firing_two_hundred_concurrent_requests_at_a_one_per_user_coupon_gets_exactly_one,
    reserving_more_tickets_than_remain_is_refused_with_the_remaining_count,
    four_hundred_concurrent_requests_for_three_tickets_each_never_oversell,
    the_per_user_limit_counts_units_across_requests,
    a_quantity_above_the_events_max_per_request_is_refused,
);

async fn one_user_firing_two_hundred_concurrent_requests_at_a_one_per_user_coupon_gets_exactly_one(
    backend: Backend,
) -> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(100, 1).await?;
    let path = format!("/v1/events/{event}/reservations");
    let requests: Vec<_> = (0..200)
        .map(|_| send(app.as_user(Method::POST, &path, "greedy")))
        .collect();

    // Act
    let replies = futures_util::future::join_all(requests).await;

    // Assert
    let mut created = 0;
    for reply in replies {
        let reply = reply?;
        if reply.status.as_u16() == 201 {
            created += 1;
        } else {
            reply.assert_problem(409, "limit_reached");
        }
    }
    assert_eq!(created, 1, "exactly one request succeeds");
    let rows = app.db.reservations(event).await?;
    assert_eq!(active_units(&rows), (1, 1), "one row in the database");
    let counts = app.counts(event).await?;
    assert_eq!((counts.remaining, counts.sold), (99, 1));
    Ok(())
}

async fn reserving_more_tickets_than_remain_is_refused_with_the_remaining_count(
    backend: Backend,
) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.ticket_event(10, 3, 600).await?;
    for user in ["ana", "ben", "cy"] {
        let reservation = app.reserve_ok(event, user, Some(3)).await?;
        assert_eq!(reservation["quantity"], 3);
        assert_eq!(reservation["status"], "held");
    }

    // Act
    let refused = app.reserve(event, "dee", Some(3), None).await?;

    // Assert
    refused.assert_problem(409, "insufficient_stock");
    assert_eq!(refused.body["remaining"], 1, "{refused}");
    let counts = app.counts(event).await?;
    assert_eq!((counts.remaining, counts.held, counts.sold), (1, 9, 0));
    app.reserve_ok(event, "dee", Some(1)).await?;
    app.reserve(event, "eve", Some(1), None)
        .await?
        .assert_problem(409, "sold_out");
    assert_eq!(active_units(&app.db.reservations(event).await?), (4, 10));
    Ok(())
}

async fn four_hundred_concurrent_requests_for_three_tickets_each_never_oversell(
    backend: Backend,
) -> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.ticket_event(1_000, 3, 600).await?;
    let buyers: Vec<String> = (0..400).map(|i| format!("buyer-{i}")).collect();
    let requests: Vec<_> = buyers
        .iter()
        .map(|buyer| app.reserve(event, buyer, Some(3), None))
        .collect();

    // Act
    let replies = futures_util::future::join_all(requests).await;

    // Assert: 333 × 3 = 999 units; everyone after that is told exactly one remains.
    let mut granted = 0;
    for reply in replies {
        let reply = reply?;
        if reply.status.as_u16() == 201 {
            granted += 1;
            assert_eq!(reply.body["quantity"], 3, "{reply}");
        } else {
            reply.assert_problem(409, "insufficient_stock");
            assert_eq!(reply.body["remaining"], 1, "{reply}");
        }
    }
    assert_eq!(granted, 333);
    assert_eq!(active_units(&app.db.reservations(event).await?), (333, 999));
    let counts = app.counts(event).await?;
    assert_eq!((counts.remaining, counts.held, counts.sold), (1, 999, 0));
    Ok(())
}

async fn the_per_user_limit_counts_units_across_requests(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.ticket_event(50, 3, 600).await?;
    app.reserve_ok(event, "ana", Some(2)).await?;

    // Act
    let second = app.reserve(event, "ana", Some(2), None).await?;

    // Assert
    second.assert_problem(409, "limit_reached");
    assert_eq!(second.body["limit"], 3, "{second}");
    app.reserve_ok(event, "ana", Some(1)).await?;
    app.reserve(event, "ana", None, None)
        .await?
        .assert_problem(409, "limit_reached");
    app.reserve_ok(event, "ben", Some(3)).await?;
    let counts = app.counts(event).await?;
    assert_eq!((counts.remaining, counts.held), (44, 6));
    Ok(())
}

async fn a_quantity_above_the_events_max_per_request_is_refused(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app
        .create_event(serde_json::json!({
            "name": "two at a time", "kind": "ticket", "stock": 20,
            "per_user_limit": 4, "max_per_request": 2,
        }))
        .await?;

    // Act
    let refused = app.reserve(event, "ana", Some(3), None).await?;

    // Assert
    refused.assert_problem(422, "invalid_quantity");
    assert_eq!(refused.body["max_per_request"], 2, "{refused}");
    app.reserve_ok(event, "ana", Some(2)).await?;
    app.reserve_ok(event, "ana", Some(2)).await?;
    assert_eq!(app.counts(event).await?.held, 4);
    Ok(())
}
