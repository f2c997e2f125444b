//! Graceful shutdown: SIGTERM in the middle of a stampede. The server stops taking claims
//! (503 + Retry-After), answers every claim already inside after its commit, and exits 0; every
//! acknowledged claim is in the database and a new process on it sells the rest exactly.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::helpers::{
    Backend, Stampede, TestApp, active_units, assert_acknowledged_are_durable, check_exact, exclusive_machine,
};

on_every_backend!(sigterm_mid_stampede_answers_what_is_inside_loses_no_acknowledged_claim_and_exits_zero);

/// The most a drain may take here: the claims inside need one or two commits.
const DRAIN_LIMIT: Duration = Duration::from_secs(20);

async fn sigterm_mid_stampede_answers_what_is_inside_loses_no_acknowledged_claim_and_exits_zero(
    backend: Backend,
) -> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange
    let stock = 2_000;
    let mut app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(stock as u64, 1).await?;
    let crowd = Stampede::users("crowd", 3_000);
    let stampede = Stampede::new(&app.client, &app.address, event, crowd);
    let finished = stampede.finished.clone();
    let running = tokio::spawn(stampede.run());

    // Act: SIGTERM once a few hundred claims are answered and the rest are in flight.
    tokio::time::timeout(Duration::from_secs(60), async {
        while finished.load(Ordering::Relaxed) < 300 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await?;
    let signalled = Instant::now();
    let status = app.terminate(DRAIN_LIMIT)?;
    let drained_in = signalled.elapsed();
    let outcome = tokio::time::timeout(Duration::from_secs(120), running).await??;

    // Assert: a clean exit, and only the answers a drain may give.
    assert!(status.success(), "the server exited with {status} after SIGTERM");
    assert!(
        outcome
            .refused
            .keys()
            .all(|answer| answer == "409 sold_out" || answer == "503 unavailable"),
        "{:?}",
        outcome.refused
    );
    assert!(
        outcome.refused.contains_key("503 unavailable") || !outcome.unanswered.is_empty(),
        "claims arriving after SIGTERM should be refused or find the port closed: {:?}",
        outcome.refused
    );
    let rows = app.db.reservations(event).await?;
    assert_acknowledged_are_durable(&outcome, &rows);
    // Drained, not cut off: every row in the database was acknowledged to its client.
    let (_, units) = active_units(&rows);
    assert_eq!(
        units,
        outcome.granted.len() as i64,
        "rows committed without an acknowledgement (or the reverse)"
    );
    eprintln!(
        "{backend:?}: SIGTERM after {} answers; drained and exited in {drained_in:?}; {} acknowledged, {} refused, {} unanswered",
        300,
        outcome.granted.len(),
        outcome.refused.values().sum::<usize>(),
        outcome.unanswered.len()
    );

    // Liveness: a new process on the same database sells the rest, exactly.
    app.start().await?;
    let counts = app.counts(event).await?;
    assert_eq!(counts.sold, units, "the restarted counts are the database's");
    let remaining = usize::try_from(counts.remaining)?;
    let latecomers = Stampede::users("latecomer", remaining + 300);
    let second = Stampede::new(&app.client, &app.address, event, latecomers)
        .run()
        .await;
    if let Err(violations) = check_exact(&second, remaining) {
        panic!("after the restart: {violations}");
    }
    Ok(())
}
