//! An event actor's mailbox is bounded: when it is full, a claim is answered 503 `overloaded`
//! (not `unavailable`, which means the database is down) with `Retry-After` at once instead of
//! queueing without limit — and nothing of a shed claim is kept, while every accepted one is
//! durable.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::helpers::{Backend, Stampede, TestApp, active_units, exclusive_machine, send};

on_every_backend!(
    a_full_mailbox_sheds_claims_with_503_and_keeps_every_accepted_one,
    shed_refusals_are_answered_within_50_ms_of_healthz_at_p99_under_sustained_overload,
);

/// Bound on the 99th percentile of shed refusals beyond that of `GET /healthz` under the same
/// load, measured by the client from sending to the whole answer, on a 2-core machine shared
/// with the client (debug build of the server). why relative: with 32 clients in a closed loop
/// the debug server is saturated, so every answer waits its turn in the HTTP layer, and that
/// wait is the machine's speed, not shedding's; a refusal that waited for the actor or the
/// database would add whole commits to it.
const SHED_P99: Duration = Duration::from_millis(50);
/// Clients that keep claiming over pre-opened connections, and for how long.
const OVERLOAD_CLIENTS: usize = 32;
const OVERLOAD_FOR: Duration = Duration::from_secs(2);

async fn a_full_mailbox_sheds_claims_with_503_and_keeps_every_accepted_one(
    backend: Backend,
) -> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange: a one-message mailbox, so a burst must overflow it.
    let app = TestApp::spawn_with(backend, &["--mailbox-capacity", "1"]).await?;
    let event = app.coupon_event(10_000, 1).await?;
    let users = Stampede::users("crowd", 600);

    // Act
    let outcome = Stampede::new(&app.client, &app.address, event, users).run().await;

    // Assert
    let shed = outcome.refused("503 overloaded");
    assert!(
        shed > 0,
        "a burst of 600 on a one-message mailbox sheds something: {outcome:?}"
    );
    assert_eq!(
        outcome.granted.len() + shed,
        600,
        "every answer is 201 or 503: {outcome:?}"
    );
    assert!(outcome.unanswered.is_empty(), "{:?}", outcome.unanswered);
    let sample = &outcome.refusal_samples["503 overloaded"];
    sample.assert_problem(503, "overloaded");
    assert_eq!(sample.header("retry-after"), Some("1"), "{sample:?}");
    let rows = app.db.reservations(event).await?;
    let stored: HashSet<_> = rows.iter().filter(|r| r.is_active()).map(|r| r.id).collect();
    let granted: HashSet<_> = outcome.granted.iter().map(|g| g.id).collect();
    assert_eq!(stored, granted, "exactly the accepted claims are in the database");
    assert_eq!(active_units(&rows).1, outcome.granted.len() as i64);
    let counts = app.counts(event).await?;
    assert_eq!(counts.sold as usize, outcome.granted.len());
    assert_eq!(counts.remaining as usize, 10_000 - outcome.granted.len());
    Ok(())
}

async fn shed_refusals_are_answered_within_50_ms_of_healthz_at_p99_under_sustained_overload(
    backend: Backend,
) -> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange: a one-message mailbox, kept full by clients that claim again as soon as they
    // are answered; each first claim (which opens the connection) is not timed. First, the
    // same clients on `GET /healthz`: what this machine's HTTP layer alone takes to answer them.
    let app = TestApp::spawn_with(backend, &["--mailbox-capacity", "1"]).await?;
    let event = app.coupon_event(1_000_000, 1).await?;
    let healthz = app.url("/healthz");
    let mut probes: Vec<Duration> = closed_loop(&app, move |http, _, _| http.get(&healthz))
        .await?
        .into_iter()
        .map(|(_, took)| took)
        .collect();
    probes.sort();
    let probe_p99 = percentile(&probes, 99).ok_or_else(|| anyhow::anyhow!("no /healthz answers"))?;
    let url = app.url(&format!("/v1/events/{event}/reservations"));

    // Act
    let answers = closed_loop(&app, move |http, client, claim| {
        http.post(&url).header("x-user-id", format!("c{client}-{claim}"))
    })
    .await?;
    let mut shed = Vec::new();
    let mut others = std::collections::BTreeMap::<String, usize>::new();
    for (code, took) in answers {
        match code.as_str() {
            "503 overloaded" => shed.push(took),
            _ => *others.entry(code).or_default() += 1,
        }
    }

    // Assert
    shed.sort();
    anyhow::ensure!(
        shed.len() >= 100,
        "too few refusals to measure: {} shed, {others:?}",
        shed.len()
    );
    let p50 = shed[shed.len() / 2];
    let p99 = percentile(&shed, 99).ok_or_else(|| anyhow::anyhow!("no refusals"))?;
    let max = shed[shed.len() - 1];
    eprintln!(
        "{backend:?}: {} shed refusals at {OVERLOAD_CLIENTS} clients: p50 {p50:?}, p99 {p99:?}, max {max:?}; /healthz p99 {probe_p99:?}; others {others:?}",
        shed.len()
    );
    assert!(
        p99 < SHED_P99 + probe_p99,
        "shed refusals must be answered at once: p99 {p99:?} (p50 {p50:?}), /healthz p99 {probe_p99:?}"
    );
    assert!(
        others.keys().all(|code| code == "201 -"),
        "every claim is granted or shed: {others:?}"
    );
    Ok(())
}

/// [`OVERLOAD_CLIENTS`] clients, each sending `request(client, n)` again as soon as it is
/// answered, for [`OVERLOAD_FOR`]: every answer's status and code (`"503 overloaded"`) and how
/// long it took. Each client's first request, which opens its connection, is not timed.
async fn closed_loop(
    app: &TestApp,
    request: impl Fn(&reqwest::Client, usize, usize) -> reqwest::RequestBuilder + Clone + Send + 'static,
) -> anyhow::Result<Vec<(String, Duration)>> {
    let until = Instant::now() + OVERLOAD_FOR;
    let clients: Vec<_> = (0..OVERLOAD_CLIENTS)
        .map(|client| {
            let (http, request) = (app.client.clone(), request.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for n in 0.. {
                    if Instant::now() >= until {
                        break;
                    }
                    let began = Instant::now();
                    let reply = send(request(&http, client, n)).await?;
                    let code = format!("{} {}", reply.status.as_u16(), reply.code().unwrap_or("-"));
                    if n > 0 {
                        answers.push((code, began.elapsed()));
                    }
                }
                anyhow::Ok(answers)
            })
        })
        .collect();
    let mut all = Vec::new();
    for client in clients {
        all.extend(client.await??);
    }
    Ok(all)
}

/// The `p`th percentile of `sorted`.
fn percentile(sorted: &[Duration], p: usize) -> Option<Duration> {
    let rank = (sorted.len() * p).div_ceil(100);
    sorted.get(rank.checked_sub(1)?).copied()
}
