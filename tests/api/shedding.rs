//! An event actor's mailbox is bounded: when it is full, a claim is answered 503 `unavailable`
//! with `Retry-After` at once instead of queueing without limit — and nothing of a shed claim
//! is kept, while every accepted one is durable.

use std::collections::HashSet;

use crate::helpers::{Backend, Stampede, TestApp, active_units, exclusive_machine};

on_every_backend!(a_full_mailbox_sheds_claims_with_503_and_keeps_every_accepted_one,);

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
    let shed = outcome.refused("503 unavailable");
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
