//! Many clients, few units: exactly `stock` claims succeed, every one of them is durable, and
//! the live counts agree with the database.

use std::collections::HashSet;

use crate::helpers::{Backend, Stampede, TestApp, active_units, check_exact, exclusive_machine};

on_every_backend!(fifteen_hundred_clients_claiming_one_thousand_units_get_exactly_one_thousand);

async fn fifteen_hundred_clients_claiming_one_thousand_units_get_exactly_one_thousand(
    backend: Backend,
) -> anyhow::Result<()> {
    let _alone = exclusive_machine().await;
    // Arrange
    let app = TestApp::spawn(backend).await?;
    let event = app.coupon_event(1_000, 1).await?;
    let users = Stampede::users("fan", 1_500);

    // Act
    let outcome = Stampede::new(&app.client, &app.address, event, users).run().await;

    // Assert
    if let Err(violations) = check_exact(&outcome, 1_000) {
        panic!(
            "{violations} (slowest answer {:?}); server log:\n{}",
            outcome.slowest,
            app.log_tail()
        );
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
