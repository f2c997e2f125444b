//! Between sea-orm models and domain types. A row the domain would refuse is a corrupt database,
//! reported as an error rather than trusted.

use anyhow::{Context, anyhow};
use entity::{events, reservations};

use crate::domain::{
    Event, EventId, EventKind, IdempotencyKey, Reservation, ReservationId, ReservationStatus, UserId,
};

pub fn event_from_row(row: events::Model) -> anyhow::Result<Event> {
    let kind =
        EventKind::parse(&row.kind).ok_or_else(|| anyhow!("event {} has kind {:?}", row.id, row.kind))?;
    Ok(Event {
        id: EventId::from_db(row.id),
        name: row.name,
        kind,
        stock: u64::try_from(row.stock).context("negative stock")?,
        per_user_limit: u32::try_from(row.per_user_limit).context("negative per_user_limit")?,
        max_per_request: u32::try_from(row.max_per_request).context("negative max_per_request")?,
        hold_seconds: u32::try_from(row.hold_seconds).context("negative hold_seconds")?,
        opens_at: row.opens_at,
        closes_at: row.closes_at,
        closed: row.closed,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

pub fn event_to_row(event: &Event) -> events::Model {
    events::Model {
        id: event.id.get(),
        name: event.name.clone(),
        kind: event.kind.as_str().to_owned(),
        // why: domain limits keep these far below i64/i32 bounds (MAX_STOCK, MAX_PER_USER).
        stock: event.stock as i64,
        per_user_limit: event.per_user_limit as i32,
        max_per_request: event.max_per_request as i32,
        hold_seconds: event.hold_seconds as i32,
        opens_at: event.opens_at,
        closes_at: event.closes_at,
        closed: event.closed,
        created_at: event.created_at,
        updated_at: event.updated_at,
    }
}

pub fn reservation_from_row(row: reservations::Model) -> anyhow::Result<Reservation> {
    let status = ReservationStatus::parse(&row.status)
        .ok_or_else(|| anyhow!("reservation {} has status {:?}", row.id, row.status))?;
    let user_id = UserId::parse(&row.user_id).map_err(|e| anyhow!("reservation {}: {e}", row.id))?;
    let idempotency_key = row
        .idempotency_key
        .as_deref()
        .map(IdempotencyKey::parse)
        .transpose()
        .map_err(|e| anyhow!("reservation {}: {e}", row.id))?;
    Ok(Reservation {
        id: ReservationId::from_db(row.id),
        event_id: EventId::from_db(row.event_id),
        user_id,
        quantity: u32::try_from(row.quantity).context("negative quantity")?,
        status,
        expires_at: row.expires_at,
        created_at: row.created_at,
        idempotency_key,
    })
}

pub fn reservation_to_row(r: &Reservation) -> reservations::Model {
    reservations::Model {
        id: r.id.get(),
        event_id: r.event_id.get(),
        user_id: r.user_id.as_str().to_owned(),
        quantity: r.quantity as i32,
        status: r.status.as_str().to_owned(),
        idempotency_key: r.idempotency_key.as_ref().map(|k| k.as_str().to_owned()),
        expires_at: r.expires_at,
        created_at: r.created_at,
        updated_at: r.created_at,
    }
}
