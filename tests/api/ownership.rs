//! A user sees and changes only their own reservations: anyone else's is a 404, exactly like a
//! reservation that does not exist, and asking changes nothing.

use std::collections::HashSet;

use reqwest::Method;
use uuid::Uuid;

use serde_json::json;

use crate::helpers::{Backend, Reply, TestApp, send};

on_every_backend!(
    another_users_reservation_is_not_found_and_stays_unchanged,
    my_reservations_lists_only_my_own,
    my_list_shows_each_acknowledged_reservation_at_once_and_the_same_after_a_restart,
    unknown_or_malformed_reservation_ids_are_not_found,
);

async fn another_users_reservation_is_not_found_and_stays_unchanged(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.ticket_event(5, 2, 600).await?;
    let hold = app.reserve_ok(event, "ana", Some(2)).await?;
    let id = hold["id"].as_str().unwrap_or_default().to_owned();
    let before = app.get_reservation(&id, "ana").await?;
    let counts_before = app.counts(event).await?;

    // Act
    let attempts: Vec<(&str, Reply)> = vec![
        ("read", app.get_reservation(&id, "ben").await?),
        ("confirm", app.confirm(&id, "ben").await?),
        ("cancel", app.cancel(&id, "ben").await?),
    ];

    // Assert
    for (what, reply) in &attempts {
        if let Some(mismatch) = reply.problem_mismatch(404, "reservation_not_found") {
            panic!("ben's {what} of ana's reservation: {mismatch}");
        }
    }
    let after = app.get_reservation(&id, "ana").await?;
    after.assert_status(200);
    assert_eq!(after.body, before.body, "ana's reservation is unchanged");
    assert_eq!(after.body["status"], "held");
    assert_eq!(app.counts(event).await?, counts_before);
    assert_eq!(app.db.reservations(event).await?[0].status, "held");
    let mine = app.my_reservations("ben").await?;
    assert_eq!(mine.body["reservations"], serde_json::json!([]), "{mine}");
    app.confirm(&id, "ana").await?.assert_status(200);
    Ok(())
}

async fn my_reservations_lists_only_my_own(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let coupons = app.coupon_event(5, 1).await?;
    let tickets = app.ticket_event(5, 2, 600).await?;
    let ana_ids: HashSet<String> = [
        app.reserve_ok(coupons, "ana", None).await?,
        app.reserve_ok(tickets, "ana", Some(2)).await?,
    ]
    .iter()
    .map(|r| r["id"].as_str().unwrap_or_default().to_owned())
    .collect();
    app.reserve_ok(coupons, "ben", None).await?;

    // Act
    let ana = app.my_reservations("ana").await?;
    let ben = app.my_reservations("ben").await?;
    let cy = app.my_reservations("cy").await?;

    // Assert
    for reply in [&ana, &ben, &cy] {
        reply.assert_status(200);
    }
    let listed = |reply: &Reply| -> Vec<(String, String)> {
        reply.body["reservations"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let field = |name: &str| r[name].as_str().unwrap_or_default().to_owned();
                (field("id"), field("user_id"))
            })
            .collect()
    };
    let ana_listed = listed(&ana);
    assert_eq!(
        ana_listed
            .iter()
            .map(|(id, _)| id.clone())
            .collect::<HashSet<_>>(),
        ana_ids
    );
    assert!(ana_listed.iter().all(|(_, user)| user == "ana"), "{ana}");
    let ben_listed = listed(&ben);
    assert_eq!(ben_listed.len(), 1, "{ben}");
    assert_eq!(ben_listed[0].1, "ben");
    assert!(listed(&cy).is_empty(), "{cy}");
    let anonymous = send(app.request(Method::GET, "/v1/me/reservations")).await?;
    anonymous.assert_problem(401, "missing_user");
    Ok(())
}

/// The ids in a `GET /v1/me/reservations` answer, in the order given; fails on anything but 200.
fn listed_ids(reply: &Reply) -> anyhow::Result<Vec<String>> {
    anyhow::ensure!(reply.status == 200, "listing answered {reply}");
    Ok(reply.body["reservations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["id"].as_str().unwrap_or_default().to_owned())
        .collect())
}

/// A 201 is in its owner's list at once (SQLite serves the list from an in-memory user index,
/// the other backends from an index on the table); the list holds the newest 100, newest first;
/// and a restart, which rebuilds that memory from the table, lists exactly the same.
async fn my_list_shows_each_acknowledged_reservation_at_once_and_the_same_after_a_restart(
    backend: Backend,
) -> anyhow::Result<()> {
    // Arrange
    let mut app = TestApp::spawn(backend).await?;
    let coupons = app.coupon_event(1_000, 1).await?;
    let repeats = app
        .create_event(json!({
            "name": "repeat buys", "kind": "coupon", "stock": 1_000, "per_user_limit": 120,
            "max_per_request": 1,
        }))
        .await?;

    // Act: 40 users claim at once, each reading its list as soon as its 201 arrives.
    let claims = (0..40).map(|i| {
        let app = &app;
        async move {
            let user = format!("user-{i}");
            let reservation = app.reserve_ok(coupons, &user, None).await?;
            let listed = listed_ids(&app.my_reservations(&user).await?)?;
            let id = reservation["id"].as_str().unwrap_or_default().to_owned();
            anyhow::Ok((user, id, listed))
        }
    });
    let claimed = futures_util::future::try_join_all(claims).await?;
    let mut many = Vec::new();
    for _ in 0..105 {
        let reservation = app.reserve_ok(repeats, "many", None).await?;
        many.push(reservation["id"].as_str().unwrap_or_default().to_owned());
    }
    let newest_hundred: Vec<String> = many.iter().rev().take(100).cloned().collect();
    let many_listed = listed_ids(&app.my_reservations("many").await?)?;
    app.restart().await?;

    // Assert
    for (user, id, listed) in &claimed {
        assert_eq!(listed, &vec![id.clone()], "{user}'s list right after the 201");
        let after = listed_ids(&app.my_reservations(user).await?)?;
        assert_eq!(&after, listed, "{user}'s list after the restart");
    }
    assert_eq!(many_listed, newest_hundred, "the newest 100 of 105, newest first");
    let many_after = listed_ids(&app.my_reservations("many").await?)?;
    assert_eq!(many_after, newest_hundred, "the same after the restart");
    assert!(listed_ids(&app.my_reservations("nobody").await?)?.is_empty());
    Ok(())
}

async fn unknown_or_malformed_reservation_ids_are_not_found(backend: Backend) -> anyhow::Result<()> {
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.ticket_event(5, 1, 600).await?;
    let hold = app.reserve_ok(event, "ana", None).await?;
    let id = hold["id"].as_str().unwrap_or_default().to_owned();
    let unknown = Uuid::now_v7().to_string();
    let cases = [
        (
            "read of an unknown id",
            app.get_reservation(&unknown, "ana").await?,
        ),
        ("confirm of an unknown id", app.confirm(&unknown, "ana").await?),
        ("cancel of an unknown id", app.cancel(&unknown, "ana").await?),
        (
            "read of a malformed id",
            app.get_reservation("not-a-uuid", "ana").await?,
        ),
        ("confirm of a malformed id", app.confirm("12345", "ana").await?),
        (
            "cancel of a malformed id",
            app.cancel("01a2011b-ffff", "ana").await?,
        ),
    ];

    // Act
    let anonymous = send(app.request(Method::GET, &format!("/v1/reservations/{id}"))).await?;

    // Assert
    for (what, reply) in &cases {
        if let Some(mismatch) = reply.problem_mismatch(404, "reservation_not_found") {
            panic!("{what}: {mismatch}");
        }
    }
    anonymous.assert_problem(401, "missing_user");
    assert_eq!(app.get_reservation(&id, "ana").await?.body["status"], "held");
    assert_eq!(app.counts(event).await?.held, 1);
    Ok(())
}
