//! The persister's group commit: every write gathered since the last commit, applied in one
//! transaction as multi-row statements cut at the driver's bind-parameter limit (and, over TCP,
//! small enough to leave in one segment: see [`Backend::params_per_statement`]).

use std::collections::HashMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use entity::{events, reservations};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, IntoActiveModel, QueryFilter, TransactionTrait};

use super::Backend;
use super::convert::{event_to_row, reservation_to_row};
use crate::domain::{Event, Reservation, ReservationId, ReservationStatus};

/// One change an event actor has decided on and waits to see committed.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// A new reservation.
    Insert(Reservation),
    /// A reservation moves to `status` (confirm, cancel, expiry).
    SetStatus {
        id: ReservationId,
        status: ReservationStatus,
    },
    /// An admin changed the event.
    UpdateEvent(Event),
}

/// Columns in a `reservations` row: what one inserted row costs in bind parameters.
const RESERVATION_COLUMNS: usize = 9;

/// Applies `ops` in one transaction, in order: inserts, then status changes, then event updates.
/// why that order is safe: an actor never changes a reservation before its insert committed, and
/// never submits two changes to one reservation at once.
pub async fn apply_batch(db: &DatabaseConnection, backend: Backend, ops: &[WriteOp]) -> anyhow::Result<()> {
    let now: DateTime<Utc> = crate::domain::now();
    let mut inserts = Vec::new();
    let mut status_changes: HashMap<ReservationStatus, Vec<uuid::Uuid>> = HashMap::new();
    let mut event_updates = Vec::new();
    for op in ops {
        match op {
            WriteOp::Insert(r) => inserts.push(reservation_to_row(r).into_active_model()),
            WriteOp::SetStatus { id, status } => status_changes.entry(*status).or_default().push(id.get()),
            WriteOp::UpdateEvent(e) => event_updates.push(event_to_row(e).into_active_model()),
        }
    }

    let txn = db.begin().await.context("beginning a batch transaction")?;
    for chunk in inserts.chunks(backend.params_per_statement() / RESERVATION_COLUMNS) {
        reservations::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(&txn)
            .await
            .with_context(|| format!("inserting {} reservations", chunk.len()))?;
    }
    for (status, ids) in status_changes {
        // Two parameters go to the SET clause.
        for chunk in ids.chunks(backend.params_per_statement() - 2) {
            reservations::Entity::update_many()
                .col_expr(reservations::Column::Status, Expr::value(status.as_str()))
                .col_expr(reservations::Column::UpdatedAt, Expr::value(now))
                .filter(reservations::Column::Id.is_in(chunk.iter().copied()))
                .exec(&txn)
                .await
                .with_context(|| format!("marking {} reservations {}", chunk.len(), status.as_str()))?;
        }
    }
    for row in event_updates {
        events::Entity::update(row)
            .exec(&txn)
            .await
            .context("updating an event")?;
    }
    txn.commit().await.context("committing a batch")
}
