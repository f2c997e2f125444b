//! Reads, and the one write that does not go through the persister (creating an event, which has
//! no actor yet).

use anyhow::Context;
use entity::{events, reservations};
use std::collections::HashSet;

use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, DatabaseBackend, DatabaseConnection,
    EntityTrait, IntoActiveModel, QueryFilter, QueryOrder, QuerySelect, Statement,
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
    /// Active bulk grants (`events.bulk_issued`); each holds one unit.
    pub bulk_issued: u64,
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
    let bulk_issued = bulk_issued(db, id).await?;
    Ok(Some(EventState {
        bulk_issued,
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

/// `user`'s reservations among `ids`, newest first: the rows behind a [`super::UserIndex`]
/// lookup. Matching `user_id` too keeps another user's rows out even if the index were wrong.
pub async fn user_reservations_by_id(
    db: &DatabaseConnection,
    user: &UserId,
    ids: Vec<uuid::Uuid>,
) -> anyhow::Result<Vec<Reservation>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    reservations::Entity::find()
        .filter(reservations::Column::Id.is_in(ids))
        .filter(reservations::Column::UserId.eq(user.as_str()))
        .order_by_desc(reservations::Column::Id)
        .all(db)
        .await
        .context("reading a user's reservations")?
        .into_iter()
        .map(reservation_from_row)
        .collect()
}

/// The event's active bulk grants, kept on its row by every bulk chunk and revocation.
async fn bulk_issued(db: &impl ConnectionTrait, id: EventId) -> anyhow::Result<u64> {
    let backend = db.get_database_backend();
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            match backend {
                DatabaseBackend::Postgres => "SELECT bulk_issued FROM events WHERE id = $1",
                _ => "SELECT bulk_issued FROM events WHERE id = ?",
            },
            [id.get().into()],
        ))
        .await
        .context("reading an event's bulk grant count")?;
    let count: i64 = match row {
        Some(row) => row.try_get("", "bulk_issued").context("reading bulk_issued")?,
        None => 0,
    };
    Ok(u64::try_from(count).unwrap_or(0))
}

/// Which of `users` hold an active bulk grant for event `id`: one primary-key lookup each, in
/// one statement.
pub async fn granted_users(
    db: &DatabaseConnection,
    id: EventId,
    users: &[UserId],
) -> anyhow::Result<HashSet<String>> {
    if users.is_empty() {
        return Ok(HashSet::new());
    }
    let backend = db.get_database_backend();
    let placeholder = |n: usize| match backend {
        DatabaseBackend::Postgres => format!("${n}"),
        _ => "?".to_owned(),
    };
    let list: Vec<String> = (0..users.len()).map(|i| placeholder(i + 2)).collect();
    let sql = format!(
        "SELECT user_id FROM bulk_grants WHERE event_id = {} AND status = 'issued' AND user_id IN ({})",
        placeholder(1),
        list.join(", ")
    );
    let mut values: Vec<sea_orm::Value> = Vec::with_capacity(users.len() + 1);
    values.push(id.get().into());
    values.extend(users.iter().map(|u| u.as_str().to_owned().into()));
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(backend, sql, values))
        .await
        .context("looking up bulk grants")?;
    rows.into_iter()
        .map(|row| {
            row.try_get::<String>("", "user_id")
                .context("reading a grant's user")
        })
        .collect()
}
