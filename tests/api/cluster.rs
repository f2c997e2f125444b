//! Several nodes: three `firstcome` processes on one PostgreSQL database, gating through one
//! Redis under a key prefix of the test's own (see `harness`). Every invariant holds across
//! them: exactly N issued to 5,000 clients spread round-robin; one user hammering all three gets
//! one coupon; an `Idempotency-Key` replays on another node; a hold expires once for every node
//! (even if its node is gone) and cannot be confirmed after; a cancel anywhere returns the units
//! everywhere; a node killed (-9) mid-drop strands nothing; Redis lost mid-drop fails closed and
//! is rebuilt; a WebSocket client on one node hears about a sale on another. The negative control
//! runs the same stampede without Redis and shows the check catches the oversell, and the
//! startup guard refuses Redis on anything but PostgreSQL.

mod harness;

use std::collections::HashSet;

use reqwest::{Method, StatusCode};
use serde_json::json;
use uuid::Uuid;

use self::harness::Cluster;
use crate::helpers::{
    Outcome, Row, Stampede, active_units, assert_acknowledged_are_durable, check_exact, exclusive_machine,
    send,
};

/// The most claims of the 5,000-client burst that may have to be sent again unread (a fifth).
const MOST_UNREAD: usize = 1_000;

// ---------------------------------------------------------------------------------------------
// Shared steps
// ---------------------------------------------------------------------------------------------

/// `users` claiming one unit each of `event`, all at once, user `i` through the `i % n`-th
/// running node. A claim a node never read is sent again (see `Stampede::retrying_unread`):
/// three debug-build nodes and the clients share two cores.
fn stampede(cluster: &Cluster, event: i64, users: Vec<String>) -> Stampede {
    Stampede::round_robin(cluster.client(), &cluster.addresses(), event, users).retrying_unread()
}

/// `clients` distinct users claiming one unit each of a fresh `stock`-unit coupon event, all at
/// once, round-robin over the nodes: the event, how every claim ended, and the rows then in the
/// database.
async fn round_robin_stampede(
    cluster: &Cluster,
    stock: u64,
    clients: usize,
) -> anyhow::Result<(i64, Outcome, Vec<Row>)> {
    let event = cluster.node(0).coupon_event(stock, 1).await?;
    let outcome = stampede(cluster, event, Stampede::users("fan", clients))
        .run()
        .await;
    let rows = cluster.db.reservations(event).await?;
    Ok((event, outcome, rows))
}

/// Fails unless every running node shows `(remaining, held, sold)` for `event`.
async fn assert_counts_everywhere(
    cluster: &Cluster,
    event: i64,
    expected: (i64, i64, i64),
) -> anyhow::Result<()> {
    for (node, counts) in cluster.counts_everywhere(event).await? {
        assert_eq!(
            (counts.remaining, counts.held, counts.sold),
            expected,
            "(remaining, held, sold) of event {event} on node {node}: {counts:?}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Exactness
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_clients_spread_over_three_nodes_get_exactly_the_stock() -> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange
    let cluster = Cluster::on_shared_redis(3, &[]).await?;

    // Act
    let (event, outcome, rows) = round_robin_stampede(&cluster, 1_000, 5_000).await?;

    // Assert
    eprintln!(
        "3 nodes, 5000 clients: slowest answer {:?}; {} claims sent again because a node never read them",
        outcome.slowest, outcome.retried
    );
    if let Err(violations) = check_exact(&outcome, 1_000) {
        panic!("{violations} (slowest answer {:?})", outcome.slowest);
    }
    assert!(
        outcome.retried <= MOST_UNREAD,
        "{} claims were sent again: that was not one burst",
        outcome.retried
    );
    assert_eq!(
        active_units(&rows),
        (1_000, 1_000),
        "rows and units in PostgreSQL"
    );
    assert_acknowledged_are_durable(&outcome, &rows);
    let in_db: HashSet<Uuid> = rows.iter().map(|r| r.id).collect();
    let granted: HashSet<Uuid> = outcome.granted.iter().map(|g| g.id).collect();
    assert_eq!(
        in_db, granted,
        "the database holds exactly the granted reservations"
    );
    for (node, counts) in cluster.counts_everywhere(event).await? {
        assert_eq!(
            (counts.remaining, counts.held, counts.sold, counts.status.as_str()),
            (0, 0, 1_000, "sold_out"),
            "node {node}"
        );
    }
    assert!(
        !cluster.redis_keys().await?.is_empty(),
        "the nodes gated through Redis under the test's prefix"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_redis_gate_the_same_three_node_stampede_oversells_and_the_check_catches_it()
-> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange: three nodes on one database, each gating with nothing but its own memory.
    let cluster = Cluster::start(3, None, &[]).await?;

    // Act
    let (_, outcome, rows) = round_robin_stampede(&cluster, 1_000, 5_000).await?;

    // Assert
    let Err(violations) = check_exact(&outcome, 1_000) else {
        panic!("the check passed three nodes that each count the stock on their own");
    };
    eprintln!("negative control (3 nodes, no Redis): {violations}");
    assert!(violations.contains("oversell"), "{violations}");
    let (issued, _) = active_units(&rows);
    assert!(
        issued > 1_000,
        "the database agrees: {issued} coupons issued for 1000"
    );
    assert_acknowledged_are_durable(&outcome, &rows);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_firing_three_hundred_requests_across_three_nodes_gets_exactly_one() -> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange
    let cluster = Cluster::on_shared_redis(3, &[]).await?;
    let event = cluster.node(0).coupon_event(100, 1).await?;
    let path = format!("/v1/events/{event}/reservations");
    let mut requests = Vec::new();
    for _ in 0..300 {
        requests.push(send(cluster.next()?.as_user(Method::POST, &path, "greedy")));
    }

    // Act
    let replies = futures_util::future::join_all(requests).await;

    // Assert
    let mut created = 0;
    for reply in replies {
        let reply = reply?;
        if reply.status == StatusCode::CREATED {
            created += 1;
        } else {
            reply.assert_problem(409, "limit_reached");
        }
    }
    assert_eq!(created, 1, "exactly one request succeeds");
    let rows = cluster.db.reservations(event).await?;
    assert_eq!(active_units(&rows), (1, 1), "one row in the database");
    assert_counts_everywhere(&cluster, event, (99, 0, 1)).await
}

// ---------------------------------------------------------------------------------------------
// Idempotency
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_used_on_one_node_replays_on_another_and_a_different_quantity_is_refused_on_a_third()
-> anyhow::Result<()> {
    // Arrange
    let cluster = Cluster::on_shared_redis(3, &[]).await?;
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let event = a.ticket_event(10, 5, 600).await?;
    let first = a.reserve(event, "ana", Some(2), Some("order-1")).await?;
    first.assert_status(201);

    // Act
    let retry = b.reserve(event, "ana", Some(2), Some("order-1")).await?;
    let reused = c.reserve(event, "ana", Some(3), Some("order-1")).await?;

    // Assert
    retry.assert_status(201);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"), "{retry}");
    assert_eq!(retry.id(), first.id(), "the same reservation");
    assert_eq!(retry.body, first.body, "the replay is the first answer");
    reused.assert_problem(422, "idempotency_key_reused");
    let rows = cluster.db.reservations(event).await?;
    assert_eq!(active_units(&rows), (1, 2), "one reservation in the database");
    assert_eq!(rows[0].idempotency_key.as_deref(), Some("order-1"));
    assert_counts_everywhere(&cluster, event, (8, 2, 0)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_with_one_key_across_three_nodes_create_one_reservation() -> anyhow::Result<()> {
    // Arrange
    let cluster = Cluster::on_shared_redis(3, &[]).await?;
    let event = cluster.node(0).ticket_event(100, 5, 600).await?;
    let path = format!("/v1/events/{event}/reservations");
    let mut requests = Vec::new();
    for _ in 0..30 {
        let request = cluster
            .next()?
            .as_user(Method::POST, &path, "ana")
            .header("idempotency-key", "double-click")
            .json(&json!({ "quantity": 2 }));
        requests.push(send(request));
    }

    // Act
    let replies = futures_util::future::join_all(requests).await;

    // Assert
    let mut ids = HashSet::new();
    let mut fresh = 0;
    for reply in replies {
        let reply = reply?;
        if reply.status == StatusCode::CREATED {
            ids.insert(reply.id().unwrap_or_default().to_owned());
            if reply.header("idempotent-replayed").is_none() {
                fresh += 1;
            }
        } else {
            reply.assert_problem(409, "idempotency_in_flight");
        }
    }
    assert_eq!(ids.len(), 1, "every success carries the same id: {ids:?}");
    assert_eq!(fresh, 1, "one answer is the original, the others replays");
    let rows = cluster.db.reservations(event).await?;
    assert_eq!(active_units(&rows), (1, 2), "one reservation in the database");
    assert!(ids.contains(&rows[0].id.to_string()), "{ids:?} vs {rows:?}");
    assert_counts_everywhere(&cluster, event, (98, 2, 0)).await
}
