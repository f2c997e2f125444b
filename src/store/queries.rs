//! Reads, and the one write that does not go through the persister (creating an event, which has
//! no actor yet).

use anyhow::Context;
use entity::{events, reservations};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, EntityTrait,
    IntoActiveModel, QueryFilter, QueryOrder, QuerySelect,
};

use super::convert::{event_from_row, event_to_row, reservation_from_row};
use crate::domain::{Event, EventId, Reservation, ReservationId, ReservationStatus, UserId};

/// Checks that the database answers a trivial query.
pub async fn ping(db: &DatabaseConnection) -> anyhow::Result<()> {
    db.ping().await.context("pinging the database")
}

pub async fn create_event(db: &DatabaseConnection, event: Event) -> anyhow::Result<Event> {
    let mut row = event_to_row(&event).into_active_model();
    row.id = sea_orm::ActiveValue::NotSet;
    let saved = row.insert(db).await.context("inserting an event")?;
    event_from_row(saved)
}

pub async fn find_event(db: &DatabaseConnection, id: EventId) -> anyhow::Result<Option<Event>> {
    events::Entity::find_by_id(id.get())
        .one(db)
        .await
        .context("reading an event")?
        .map(event_from_row)
        .transpose()
}

/// Everything an event actor needs to rebuild its state.
pub struct EventState {
    pub event: Event,
    /// Reservations still counting against stock, plus every one carrying an idempotency key
    /// (so retries replay their first answer even after a cancel).
    pub reservations: Vec<Reservation>,
}

pub async fn load_event_state(db: &impl ConnectionTrait, id: EventId) -> anyhow::Result<Option<EventState>> {
    let Some(row) = events::Entity::find_by_id(id.get())
        .one(db)
        .await
        .context("reading an event")?
    else {
        return Ok(None);
    };
    let active: Vec<&str> = [
        ReservationStatus::Issued,
        ReservationStatus::Redeemed,
        ReservationStatus::Held,
        ReservationStatus::Confirmed,
    ]
    .iter()
    .map(|s| s.as_str())
    .collect();
    let rows = reservations::Entity::find()
        .filter(reservations::Column::EventId.eq(id.get()))
        .filter(
            Condition::any()
                .add(reservations::Column::Status.is_in(active))
                .add(reservations::Column::IdempotencyKey.is_not_null()),
        )
        .all(db)
        .await
        .with_context(|| format!("reading the reservations of event {id}"))?;
    Ok(Some(EventState {
        event: event_from_row(row)?,
        reservations: rows
            .into_iter()
            .map(reservation_from_row)
            .collect::<anyhow::Result<_>>()?,
    }))
}

/// Events with holds outstanding, whose actors must run so the holds expire on time.
pub async fn events_with_holds(db: &DatabaseConnection) -> anyhow::Result<Vec<EventId>> {
    let ids: Vec<i64> = reservations::Entity::find()
        .select_only()
        .column(reservations::Column::EventId)
        .distinct()
        .filter(reservations::Column::Status.eq(ReservationStatus::Held.as_str()))
        .into_tuple()
        .all(db)
        .await
        .context("listing events with holds")?;
    Ok(ids.into_iter().map(EventId::from_db).collect())
}

pub async fn find_reservation(
    db: &DatabaseConnection,
    id: ReservationId,
) -> anyhow::Result<Option<Reservation>> {
    reservations::Entity::find_by_id(id.get())
        .one(db)
        .await
        .context("reading a reservation")?
        .map(reservation_from_row)
        .transpose()
}

/// A user's reservations, newest first.
pub async fn list_user_reservations(
    db: &DatabaseConnection,
    user: &UserId,
    limit: u64,
) -> anyhow::Result<Vec<Reservation>> {
    reservations::Entity::find()
        .filter(reservations::Column::UserId.eq(user.as_str()))
        .order_by_desc(reservations::Column::Id)
        .limit(limit)
        .all(db)
        .await
        .context("listing a user's reservations")?
        .into_iter()
        .map(reservation_from_row)
        .collect()
}
