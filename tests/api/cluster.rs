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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use self::harness::{Cluster, DbProxy, TestRedis, refused_start, shared_redis_url};
use crate::helpers::{
    Backend, Counts, EXPIRY_SLACK, Outcome, Reply, Row, Stampede, TestApp, TestDb, active_units,
    assert_acknowledged_are_durable, check_exact, exclusive_machine, keyed_successes, quiet_machine, send,
    timestamp,
};
use crate::live::{Ws, listen, next_message};

/// How long after it was made an uncommitted allocation is reconciled, in the kill -9 test.
const RECONCILE_AFTER_SECS: u64 = 3;
/// What the kill -9 test allows on top of `RECONCILE_AFTER_SECS` for the counts to settle.
const SETTLE_SLACK: Duration = Duration::from_secs(5);
/// How long the victim keeps allocating with its commits unacknowledged before it is killed.
const STALL_BEFORE_KILL: Duration = Duration::from_millis(300);
/// The Redis timeout the nodes of the Redis-loss test run with.
const REDIS_TIMEOUT_MS: u64 = 300;
/// The slowest a claim may be answered while Redis is down (the timeout plus a busy machine).
const OUTAGE_ANSWER_LIMIT: Duration = Duration::from_secs(3);
/// How long a WebSocket client on one node may wait to hear of a sale on another.
const CROSS_NODE_PUSH: Duration = Duration::from_secs(1);
/// The most claims of the 5,000-client burst that may have to be sent again unread (a fifth).
const MOST_UNREAD: usize = 1_000;
/// Clients beyond the missing units in each wave that keeps a drop going.
const EXTRA_DEMAND: usize = 50;
/// The pause between two such waves.
const WAVE_PAUSE: Duration = Duration::from_millis(100);
/// Fresh events raced for by three nodes at once: each a chance for two of them to build its ledger.
const FIRST_USE_EVENTS: usize = 30;

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

/// Waits until `finished` stampede requests have ended (at most a minute).
async fn until_finished(finished: &AtomicUsize, count: usize) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(60), async {
        while finished.load(Ordering::Relaxed) < count {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .with_context(|| format!("{count} claims were not answered within 60 s"))
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

/// Fails if a request of `outcome` went unanswered, or was answered anything but 201 or one of
/// `allowed`, or a 503 came without `Retry-After`.
#[track_caller]
fn assert_only(outcome: &Outcome, allowed: &[&str], what: &str) {
    let unexpected: Vec<_> = outcome
        .refused
        .iter()
        .filter(|(answer, _)| !allowed.contains(&answer.as_str()))
        .collect();
    assert!(unexpected.is_empty(), "{what}: unexpected answers {unexpected:?}");
    assert!(
        outcome.unanswered.is_empty(),
        "{what}: {} requests got no answer, first: {:?}",
        outcome.unanswered.len(),
        outcome.unanswered.first()
    );
    if let Some(refusal) = outcome.refusal_samples.get("503 unavailable") {
        assert!(
            refusal.header("retry-after").is_some(),
            "{what}: 503 without Retry-After: {refusal}"
        );
    }
}

/// Keeps fresh users claiming one unit each, round-robin over the running nodes (each wave as
/// many users as the database misses units, and `EXTRA_DEMAND` more), until the database holds
/// the whole stock and every running node shows it sold — or fails at `deadline`. Fails at once
/// if the database ever holds more than the stock. Every wave's outcome.
async fn claim_until_settled(
    cluster: &Cluster,
    event: i64,
    stock: i64,
    deadline: Instant,
) -> anyhow::Result<Vec<Outcome>> {
    let mut waves = Vec::new();
    loop {
        let (_, units) = active_units(&cluster.db.reservations(event).await?);
        anyhow::ensure!(
            units <= stock,
            "oversell: {units} units in the database for {stock}"
        );
        let mut shown = Vec::new();
        for node in cluster.running() {
            let reply = node.get_event(event).await?;
            // why: a node may refuse reads while it rebuilds its ledger; that is not settled yet.
            shown.push(match reply.status {
                StatusCode::SERVICE_UNAVAILABLE => None,
                _ => Some(Counts::parse(&reply)?),
            });
        }
        let settled = shown.iter().all(|counts| {
            counts
                .as_ref()
                .is_some_and(|c| (c.remaining, c.held, c.sold) == (0, 0, stock))
        });
        if units == stock && settled {
            return Ok(waves);
        }
        if Instant::now() > deadline {
            bail!(
                "not settled in time: {units} of {stock} units in the database, the nodes show \
                 {shown:?} (None: 503), after {} waves",
                waves.len()
            );
        }
        let missing = usize::try_from(stock - units)?;
        let users = Stampede::users(&format!("wave{}", waves.len()), missing + EXTRA_DEMAND);
        waves.push(stampede(cluster, event, users).run().await);
        tokio::time::sleep(WAVE_PAUSE).await;
    }
}

/// One claim by each of `count` fresh users, all at once, user `i` through the `i % n`-th
/// running node: each answer and how long it took.
async fn claims_everywhere(
    cluster: &Cluster,
    event: i64,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<(Reply, Duration)>> {
    let nodes: Vec<&TestApp> = cluster.running().collect();
    let claims = (0..count).map(|i| {
        let node = nodes[i % nodes.len()];
        let user = format!("{prefix}-{i}");
        async move {
            let began = Instant::now();
            let reply = node.reserve(event, &user, None, None).await;
            reply.map(|reply| (reply, began.elapsed()))
        }
    });
    futures_util::future::join_all(claims).await.into_iter().collect()
}

/// Reads messages until one of type `kind`, skipping `availability` updates; fails if none
/// arrives before `deadline`.
async fn first_of_type(ws: &mut Ws, kind: &str, deadline: Instant) -> anyhow::Result<Value> {
    loop {
        let message = tokio::time::timeout_at(deadline.into(), next_message(ws))
            .await
            .with_context(|| format!("no {kind} message in time"))??;
        if message["type"] == kind {
            return Ok(message);
        }
        anyhow::ensure!(
            message["type"] == "availability",
            "expected {kind} or availability, got {message}"
        );
    }
}

fn reservation_id(reservation: &Value) -> anyhow::Result<String> {
    reservation["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no reservation id in {reservation}"))
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
    let (ids, fresh) = keyed_successes(replies)?;
    assert_eq!(ids.len(), 1, "every success carries the same id: {ids:?}");
    assert_eq!(fresh, 1, "one answer is the original, the others replays");
    let rows = cluster.db.reservations(event).await?;
    assert_eq!(active_units(&rows), (1, 2), "one reservation in the database");
    assert!(ids.contains(&rows[0].id.to_string()), "{ids:?} vs {rows:?}");
    assert_counts_everywhere(&cluster, event, (98, 2, 0)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_first_used_on_three_nodes_at_once_have_their_ledger_built_once() -> anyhow::Result<()> {
    // Arrange: events no node has served yet.
    let cluster = Cluster::on_shared_redis(3, &[]).await?;
    let mut events = Vec::new();
    for _ in 0..FIRST_USE_EVENTS {
        events.push(cluster.node(0).coupon_event(100, 1).await?);
    }

    for event in events {
        // Act: every node gets its first claims for the event at the same instant.
        let path = format!("/v1/events/{event}/reservations");
        let requests = (0..9).map(|i| {
            let node = cluster.node(i % 3);
            send(node.as_user(Method::POST, &path, &format!("user-{i}")))
        });
        let replies = futures_util::future::join_all(requests).await;

        // Assert
        for reply in replies {
            reply?.assert_status(201);
        }
        assert_eq!(
            cluster.db.ledger_generation(event).await?,
            1,
            "event {event}: one ledger built, not one per node that raced for it"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Holds, confirms and cancels
// ---------------------------------------------------------------------------------------------

/// Node `watcher` watches ana's hold `hold` of both units of `event` come back, then node
/// `confirmer` is asked to confirm it. Fails unless the confirm is refused `hold_expired` and the
/// units came back on time (never early, at most `EXPIRY_SLACK` late) and exactly once: every
/// running node shows them free, the row and a read say expired, and they sell once more but not
/// a third time.
async fn assert_hold_expires_once(
    cluster: &Cluster,
    event: i64,
    hold: &Value,
    watcher: usize,
    confirmer: usize,
) -> anyhow::Result<()> {
    let id = reservation_id(hold)?;
    let expires_at = timestamp(&hold["expires_at"])?;
    let (watcher, confirmer) = (cluster.node(watcher), cluster.node(confirmer));

    let (counts, back_at) = watcher.watch_release(event, 2, expires_at).await?;
    let confirm = confirmer.confirm(&id, "ana").await?;

    confirm.assert_problem(409, "hold_expired");
    assert!(
        back_at <= expires_at + EXPIRY_SLACK,
        "units came back {} ms after the hold expired",
        (back_at - expires_at).num_milliseconds()
    );
    assert_eq!(
        (counts.remaining, counts.held, counts.sold),
        (2, 0, 0),
        "{counts:?}"
    );
    assert_counts_everywhere(cluster, event, (2, 0, 0)).await?;
    let rows = cluster.db.reservations(event).await?;
    assert_eq!(
        (rows.len(), rows.first().map(|r| r.status.as_str())),
        (1, Some("expired")),
        "the database rows: {rows:?}"
    );
    let read = confirmer.get_reservation(&id, "ana").await?;
    assert_eq!(read.body["status"], "expired", "{read}");
    // Released exactly once: the two units sell once more, and not a third time.
    watcher.reserve_ok(event, "ben", Some(2)).await?;
    confirmer
        .reserve(event, "cy", Some(1), None)
        .await?
        .assert_problem(409, "sold_out");
    assert_eq!(active_units(&cluster.db.reservations(event).await?), (1, 2));
    assert_counts_everywhere(cluster, event, (0, 2, 0)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_made_on_one_node_expires_once_for_every_node_and_a_confirm_on_another_is_refused()
-> anyhow::Result<()> {
    let _quiet = quiet_machine().await;
    // Arrange: node A holds both units for a second.
    let cluster = Cluster::on_shared_redis(3, &[]).await?;
    let event = cluster.node(0).ticket_event(2, 2, 1).await?;
    let hold = cluster.node(0).reserve_ok(event, "ana", Some(2)).await?;
    assert_counts_everywhere(&cluster, event, (0, 2, 0)).await?;

    // Act and Assert: node C watches the units come back, node B is asked to confirm.
    assert_hold_expires_once(&cluster, event, &hold, 2, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_whose_node_was_killed_still_expires_once_on_the_other_nodes() -> anyhow::Result<()> {
    let _quiet = quiet_machine().await;
    // Arrange: every node has read the event (so each runs its actor); node A holds both units
    // for two seconds and is killed (-9).
    let mut cluster = Cluster::on_shared_redis(3, &[]).await?;
    let event = cluster.node(0).ticket_event(2, 2, 2).await?;
    assert_counts_everywhere(&cluster, event, (2, 0, 0)).await?;
    let hold = cluster.node(0).reserve_ok(event, "ana", Some(2)).await?;
    cluster.kill(0);

    // Act and Assert: node C watches the units come back, node B is asked to confirm.
    assert_hold_expires_once(&cluster, event, &hold, 2, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_and_cancels_on_another_node_change_the_counts_of_every_node() -> anyhow::Result<()> {
    // Arrange: two holds made on node A.
    let cluster = Cluster::on_shared_redis(3, &[]).await?;
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let tickets = a.ticket_event(3, 2, 600).await?;
    let ana = reservation_id(&a.reserve_ok(tickets, "ana", Some(1)).await?)?;
    let ben = reservation_id(&a.reserve_ok(tickets, "ben", Some(1)).await?)?;
    let coupons = a.coupon_event(1, 1).await?;
    let cy = reservation_id(&a.reserve_ok(coupons, "cy", None).await?)?;
    assert_counts_everywhere(&cluster, tickets, (1, 2, 0)).await?;

    // Act: node B confirms one hold and cancels the other, and revokes the coupon.
    let confirmed = b.confirm(&ben, "ben").await?;
    let after_confirm = c.counts(tickets).await?;
    let cancelled = b.cancel(&ana, "ana").await?;
    let after_cancel = c.counts(tickets).await?;
    let revoked = b.cancel(&cy, "cy").await?;
    let coupons_after = c.counts(coupons).await?;

    // Assert
    confirmed.assert_status(200);
    assert_eq!(confirmed.body["status"], "confirmed", "{confirmed}");
    assert_eq!(
        (after_confirm.remaining, after_confirm.held, after_confirm.sold),
        (1, 1, 1),
        "node C after the confirm on node B"
    );
    cancelled.assert_status(200);
    assert_eq!(cancelled.body["status"], "cancelled", "{cancelled}");
    assert_eq!(
        (after_cancel.remaining, after_cancel.held, after_cancel.sold),
        (2, 0, 1),
        "node C after the cancel on node B: the unit is back"
    );
    revoked.assert_status(200);
    assert_eq!(revoked.body["status"], "revoked", "{revoked}");
    assert_eq!(
        (coupons_after.remaining, coupons_after.sold),
        (1, 0),
        "{coupons_after:?}"
    );
    let rows = cluster.db.reservations(tickets).await?;
    let status_of = |id: &str| {
        rows.iter()
            .find(|r| r.id.to_string() == id)
            .map(|r| r.status.clone())
    };
    assert_eq!(
        (status_of(&ana).as_deref(), status_of(&ben).as_deref()),
        (Some("cancelled"), Some("confirmed"))
    );
    // The units and the per-user counts came back for everyone: ana may hold two again, on C.
    c.reserve_ok(tickets, "ana", Some(2)).await?;
    c.reserve_ok(coupons, "dee", None).await?;
    assert_counts_everywhere(&cluster, tickets, (0, 2, 1)).await?;
    assert_counts_everywhere(&cluster, coupons, (0, 0, 1)).await
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_drop_strands_nothing_and_the_others_sell_exactly_the_stock() -> anyhow::Result<()>
{
    let _alone = exclusive_machine().await;
    // Arrange: two nodes reach the database directly; the victim goes through a proxy that can
    // hold back the database's answers, so at the kill it has allocations in Redis that it never
    // saw committed (some may have committed: those must be kept, the others released).
    let stock: i64 = 1_000;
    let reconcile = RECONCILE_AFTER_SECS.to_string();
    let mut cluster = Cluster::on_shared_redis(2, &["--reconcile-after-secs", &reconcile]).await?;
    let proxy = DbProxy::start(&cluster.db.url).await?;
    let victim = cluster.add_node(Some(&proxy.url)).await?;
    let event = cluster.node(0).coupon_event(u64::try_from(stock)?, 1).await?;
    let crowd = Stampede::users("crowd", 2_400);
    // The stampede sends user i to the i % 3-th node.
    let victims_users: HashSet<&str> = crowd.iter().skip(victim).step_by(3).map(String::as_str).collect();
    let burst = stampede(&cluster, event, crowd.clone());
    let finished = burst.finished.clone();
    let running = tokio::spawn(burst.run());

    // Act: mid-drop the victim's commits stop being answered; it keeps allocating for the claims
    // it receives, and is killed -9. The others keep selling until the database holds the stock.
    until_finished(&finished, 300).await?;
    proxy.stall();
    tokio::time::sleep(STALL_BEFORE_KILL).await;
    cluster.kill(victim);
    let killed_at = Instant::now();
    let first = tokio::time::timeout(Duration::from_secs(120), running).await??;
    let right_after = cluster.counts_everywhere(event).await?;
    let (_, units_right_after) = active_units(&cluster.db.reservations(event).await?);
    let settle_limit = Duration::from_secs(RECONCILE_AFTER_SECS) + SETTLE_SLACK;
    let waves = claim_until_settled(&cluster, event, stock, killed_at + settle_limit).await?;
    let settled_in = killed_at.elapsed();
    // Once every allocation of the victim is past its reconciliation, the stock stays sold.
    let all_reconciled = killed_at + Duration::from_secs(RECONCILE_AFTER_SECS + 2);
    tokio::time::sleep_until(all_reconciled.into()).await;
    let late = stampede(&cluster, event, Stampede::users("late", 200))
        .run()
        .await;
    proxy.resume();
    cluster.restart(victim).await?;

    // Assert
    eprintln!(
        "kill -9 of a node mid-drop: {} of its claims cut off; right after, the others showed \
         {right_after:?} with {units_right_after} units in the database; the counts settled \
         (sold == rows == {stock}) {settled_in:?} after the kill (reconcile after \
         {RECONCILE_AFTER_SECS} s), in {} waves",
        first.unanswered.len(),
        waves.len()
    );
    assert!(
        !first.unanswered.is_empty(),
        "the kill should have cut off the victim's claims in flight: {:?}",
        first.refused
    );
    let allowed = ["409 sold_out", "503 unavailable"];
    assert!(
        first
            .refused
            .keys()
            .all(|answer| allowed.contains(&answer.as_str())),
        "{:?}",
        first.refused
    );
    for wave in &waves {
        assert_only(wave, &allowed, "a wave on the surviving nodes");
    }
    if let Err(violations) = check_exact(&late, 0) {
        panic!("after every reconciliation, a unit came back: {violations}");
    }
    let rows = cluster.db.reservations(event).await?;
    assert_eq!(
        active_units(&rows),
        (1_000, 1_000),
        "exactly the stock in PostgreSQL"
    );
    assert_only_fences(&rows, &HashSet::new());
    let rows: Vec<_> = rows.into_iter().filter(|r| r.is_active()).collect();
    assert_eq!(
        rows.len(),
        1_000,
        "no active row other than the issued ones: {rows:?}"
    );
    let outcomes = std::iter::once(&first)
        .chain(&waves)
        .chain(std::iter::once(&late));
    let mut acknowledged = HashSet::new();
    for outcome in outcomes {
        assert_acknowledged_are_durable(outcome, &rows);
        acknowledged.extend(outcome.granted.iter().map(|g| g.id));
    }
    let mut owners = HashSet::new();
    for row in &rows {
        assert!(
            owners.insert(row.user_id.as_str()),
            "two rows for {}",
            row.user_id
        );
        assert!(
            acknowledged.contains(&row.id) || victims_users.contains(row.user_id.as_str()),
            "a row nobody was told about, not the victim's: {row:?}"
        );
    }
    assert_counts_everywhere(&cluster, event, (0, 0, stock)).await?;
    assert!(
        settled_in <= settle_limit,
        "settled after {settled_in:?}, more than {settle_limit:?}"
    );
    Ok(())
}

/// Rows that do not count against stock can only be fences: `cancelled` rows the ledger wrote
/// over allocations whose commit it could not confirm (their clients got 503 or no answer), so
/// that the original insert can never land. None of them may have been acknowledged.
fn assert_only_fences(rows: &[Row], acknowledged: &HashSet<Uuid>) {
    for row in rows.iter().filter(|r| !r.is_active()) {
        assert_eq!(
            row.status, "cancelled",
            "an inactive row that is not a fence: {row:?}"
        );
        assert!(
            !acknowledged.contains(&row.id),
            "a fence over an acknowledged reservation: {row:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_mid_drop_fails_closed_and_after_it_restarts_empty_the_drop_sells_exactly_the_stock()
-> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange: a Redis of the test's own, so it can be killed.
    let stock: i64 = 2_000;
    let mut redis = TestRedis::start().await?;
    let timeout = REDIS_TIMEOUT_MS.to_string();
    let cluster = Cluster::start(3, Some(&redis.url()), &["--redis-timeout-ms", &timeout]).await?;
    let event = cluster.node(0).coupon_event(u64::try_from(stock)?, 1).await?;
    let burst = stampede(&cluster, event, Stampede::users("crowd", 1_500));
    let finished = burst.finished.clone();
    let running = tokio::spawn(burst.run());

    // Act: kill -9 of redis-server mid-drop; claims on every node while it is gone; then an
    // empty redis-server on the same port, and claims until the stock is sold.
    until_finished(&finished, 200).await?;
    redis.kill();
    let burst = tokio::time::timeout(Duration::from_secs(120), running).await??;
    let during = claims_everywhere(&cluster, event, "during", 30).await?;
    redis.restart().await?;
    let restarted_at = Instant::now();
    let waves = claim_until_settled(&cluster, event, stock, restarted_at + Duration::from_secs(60)).await?;
    let recovered_in = restarted_at.elapsed();
    let late = stampede(&cluster, event, Stampede::users("late", 300))
        .run()
        .await;

    // Assert
    let slowest = during.iter().map(|(_, took)| *took).max().unwrap_or_default();
    eprintln!(
        "Redis lost mid-drop: the burst got {} × 201 and {:?}; claims during the outage were \
         answered within {slowest:?}; after the restart the drop sold out {recovered_in:?} later \
         in {} waves",
        burst.granted.len(),
        burst.refused,
        waves.len()
    );
    assert_only(
        &burst,
        &["409 sold_out", "503 unavailable"],
        "the burst Redis died in",
    );
    for (reply, took) in &during {
        reply.assert_problem(503, "unavailable");
        assert!(reply.header("retry-after").is_some(), "no Retry-After: {reply}");
        assert!(
            *took <= OUTAGE_ANSWER_LIMIT,
            "answered after {took:?} while Redis was down"
        );
    }
    for wave in &waves {
        assert_only(
            wave,
            &["409 sold_out", "503 unavailable"],
            "a wave after the restart",
        );
    }
    if let Err(violations) = check_exact(&late, 0) {
        panic!("after the rebuild, more than the stock: {violations}");
    }
    let rows = cluster.db.reservations(event).await?;
    assert_eq!(
        active_units(&rows),
        (2_000, 2_000),
        "exactly the stock in PostgreSQL"
    );
    let mut acknowledged = HashSet::new();
    for outcome in std::iter::once(&burst)
        .chain(&waves)
        .chain(std::iter::once(&late))
    {
        assert_acknowledged_are_durable(outcome, &rows);
        acknowledged.extend(outcome.granted.iter().map(|g| g.id));
    }
    let active: HashSet<Uuid> = rows.iter().filter(|r| r.is_active()).map(|r| r.id).collect();
    assert_eq!(
        active, acknowledged,
        "no node died: every active row was acknowledged, every 201 is an active row"
    );
    assert_only_fences(&rows, &acknowledged);
    assert_counts_everywhere(&cluster, event, (0, 0, stock)).await?;
    assert!(
        !cluster.redis_keys().await?.is_empty(),
        "the ledger was rebuilt in the new Redis"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Notifications across nodes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_on_one_node_hears_sold_out_within_a_second_of_the_last_sale_on_another()
-> anyhow::Result<()> {
    let _quiet = quiet_machine().await;
    // Arrange: a listener on node B; one of the two units sold on node C.
    let cluster = Cluster::on_shared_redis(3, &[]).await?;
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let event = a.coupon_event(2, 1).await?;
    let (mut ws, snapshot) = listen(b, event).await?;
    c.reserve_ok(event, "ana", None).await?;

    // Act: the last unit sold on node A.
    a.reserve_ok(event, "ben", None).await?;
    let sold_at = Instant::now();
    let pushed = first_of_type(&mut ws, "sold_out", sold_at + CROSS_NODE_PUSH).await;
    let took = sold_at.elapsed();

    // Assert
    let pushed = pushed.with_context(|| format!("node B, {took:?} after node A sold the last unit"))?;
    eprintln!("sold_out reached a node B listener {took:?} after node A's 201");
    assert_eq!(
        (snapshot["remaining"].as_u64(), snapshot["status"].as_str()),
        (Some(2), Some("open")),
        "{snapshot}"
    );
    assert_eq!(
        (pushed["remaining"].as_u64(), pushed["sold"].as_u64()),
        (Some(0), Some(2)),
        "{pushed}"
    );
    assert_eq!(pushed["event_id"].as_i64(), Some(event), "{pushed}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_on_one_node_pushes_restocked_to_a_websocket_client_on_another() -> anyhow::Result<()> {
    let _quiet = quiet_machine().await;
    // Arrange: the only unit sold on node A, a listener on node B.
    let cluster = Cluster::on_shared_redis(3, &[]).await?;
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let event = a.coupon_event(1, 1).await?;
    let id = reservation_id(&a.reserve_ok(event, "ana", None).await?)?;
    let (mut ws, snapshot) = listen(b, event).await?;

    // Act: the coupon revoked on node C.
    c.cancel(&id, "ana").await?.assert_status(200);
    let cancelled_at = Instant::now();
    let pushed = first_of_type(&mut ws, "restocked", cancelled_at + CROSS_NODE_PUSH).await;
    let took = cancelled_at.elapsed();

    // Assert
    let pushed = pushed.with_context(|| format!("node B, {took:?} after node C's cancel"))?;
    assert_eq!(snapshot["status"], "sold_out", "{snapshot}");
    assert_eq!(
        (pushed["remaining"].as_u64(), pushed["status"].as_str()),
        (Some(1), Some("open")),
        "{pushed}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The startup guard
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_a_database_other_than_postgresql_is_refused_at_startup() -> anyhow::Result<()> {
    // Arrange
    let redis_url = shared_redis_url();
    let flag = ["--redis-url", redis_url.as_str()];
    let env = [("REDIS_URL", redis_url.as_str())];
    struct Case<'a> {
        what: &'a str,
        backend: Backend,
        args: &'a [&'a str],
        env: &'a [(&'a str, &'a str)],
    }
    let cases = [
        Case {
            what: "SQLite, --redis-url",
            backend: Backend::Sqlite,
            args: &flag,
            env: &[],
        },
        Case {
            what: "SQLite, REDIS_URL",
            backend: Backend::Sqlite,
            args: &[],
            env: &env,
        },
        Case {
            what: "MySQL, --redis-url",
            backend: Backend::MySql,
            args: &flag,
            env: &[],
        },
        Case {
            what: "MySQL, REDIS_URL",
            backend: Backend::MySql,
            args: &[],
            env: &env,
        },
    ];

    // Act and Assert
    let mut failures = Vec::new();
    for Case {
        what,
        backend,
        args,
        env,
    } in cases
    {
        let db = TestDb::create(backend).await?;
        let (status, printed) = match refused_start(&db.url, args, env, db.dir()).await {
            Ok(refused) => refused,
            Err(error) => {
                failures.push(format!("{what}: {error:#}"));
                continue;
            }
        };
        if status.success() || !printed.contains("PostgreSQL") || !printed.contains("REDIS_URL") {
            failures.push(format!(
                "{what}: exited with {status}, expected a failure naming PostgreSQL and \
                 REDIS_URL; it printed:\n{printed}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Sends `count` reservations for `user` through the nodes in turn, one after another, and
/// returns how many were refused with 429.
async fn rate_limited_of(cluster: &Cluster, event: i64, user: &str, count: usize) -> anyhow::Result<usize> {
    let path = format!("/v1/events/{event}/reservations");
    let mut limited = 0;
    for _ in 0..count {
        let reply = send(cluster.next()?.as_user(Method::POST, &path, user)).await?;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            reply.assert_problem(429, "rate_limited");
            assert!(reply.header("retry-after").is_some(), "429 without Retry-After");
            limited += 1;
        }
    }
    Ok(limited)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_per_user_rate_limit_holds_across_nodes_where_the_per_node_one_multiplies()
-> anyhow::Result<()> {
    let _alone = quiet_machine().await;
    // Arrange: 3 writes per user per minute (burst 3), one user spreading 9 writes over 3 nodes.
    let quota = [
        "--rate-limit",
        "true",
        "--rate-limit-writes-per-user",
        "3/min burst 3",
    ];
    let global: Vec<&str> = quota
        .iter()
        .copied()
        .chain(["--rate-limit-global", "true"])
        .collect();
    let per_node = Cluster::on_shared_redis(3, &quota).await?;
    let shared = Cluster::on_shared_redis(3, &global).await?;
    let per_node_event = per_node.node(0).coupon_event(100, 100).await?;
    let shared_event = shared.node(0).coupon_event(100, 100).await?;

    // Act
    let per_node_limited = rate_limited_of(&per_node, per_node_event, "spreader", 9).await?;
    let shared_limited = rate_limited_of(&shared, shared_event, "spreader", 9).await?;

    // Assert
    assert_eq!(per_node_limited, 0, "per node, 3 nodes allow 3 × the quota");
    assert_eq!(shared_limited, 6, "across nodes, the quota of 3 holds once");
    Ok(())
}
