//! Reservations: a user's claim on some units of one event, and its life cycle.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::event::MAX_PER_USER;
use super::{EventId, EventKind, IdempotencyKey, Invalid, ReservationId, UserId};

/// How many units one request asks for: at least 1, at most the largest per-user limit.
/// The event's own `max_per_request` is checked by its actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity(u32);

impl Quantity {
    pub const ONE: Quantity = Quantity(1);

    pub fn parse(raw: i64) -> Result<Self, Invalid> {
        u32::try_from(raw)
            .ok()
            .filter(|q| (1..=MAX_PER_USER).contains(q))
            .map(Self)
            .ok_or_else(|| Invalid(format!("quantity must be an integer from 1 to {MAX_PER_USER}")))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReservationStatus {
    /// A coupon, final at once.
    Issued,
    Redeemed,
    Revoked,
    /// A ticket waiting for confirmation until `expires_at`.
    Held,
    Confirmed,
    Cancelled,
    Expired,
}

impl ReservationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Issued => "issued",
            Self::Redeemed => "redeemed",
            Self::Revoked => "revoked",
            Self::Held => "held",
            Self::Confirmed => "confirmed",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [
            Self::Issued,
            Self::Redeemed,
            Self::Revoked,
            Self::Held,
            Self::Confirmed,
            Self::Cancelled,
            Self::Expired,
        ]
        .into_iter()
        .find(|s| s.as_str() == raw)
    }

    /// The state a new reservation starts in.
    pub fn initial(kind: EventKind) -> Self {
        match kind {
            EventKind::Coupon => Self::Issued,
            EventKind::Ticket => Self::Held,
        }
    }

    /// Units in this state count as sold.
    pub fn is_sold(self) -> bool {
        matches!(self, Self::Issued | Self::Redeemed | Self::Confirmed)
    }

    /// Units in this state still count against stock and the user's limit.
    pub fn is_active(self) -> bool {
        self.is_sold() || self == Self::Held
    }

    /// The state a user's cancel leads to: coupons are revoked, tickets cancelled.
    pub fn cancelled(kind: EventKind) -> Self {
        match kind {
            EventKind::Coupon => Self::Revoked,
            EventKind::Ticket => Self::Cancelled,
        }
    }
}

/// A reservation as stored and as shown to its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Reservation {
    pub id: ReservationId,
    pub event_id: EventId,
    #[schema(value_type = String)]
    pub user_id: UserId,
    pub quantity: u32,
    pub status: ReservationStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    #[serde(skip)]
    #[schema(ignore)]
    pub idempotency_key: Option<IdempotencyKey>,
}

impl Reservation {
    /// The state at `now`: a hold whose `expires_at` has passed is expired even before its row
    /// is marked so.
    pub fn status_at(&self, now: DateTime<Utc>) -> ReservationStatus {
        match (self.status, self.expires_at) {
            (ReservationStatus::Held, Some(at)) if at <= now => ReservationStatus::Expired,
            (status, _) => status,
        }
    }

    /// This reservation as it stands at `now` (see [`Reservation::status_at`]).
    pub fn as_of(mut self, now: DateTime<Utc>) -> Self {
        self.status = self.status_at(now);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_outside_one_to_the_limit_are_refused() {
        for raw in [0, -1, i64::from(MAX_PER_USER) + 1, i64::MAX, i64::MIN] {
            assert!(Quantity::parse(raw).is_err(), "{raw}");
        }
        assert_eq!(Quantity::parse(3).map(Quantity::get), Ok(3));
    }

    #[test]
    fn statuses_round_trip_through_their_names() {
        for s in [
            "issued",
            "redeemed",
            "revoked",
            "held",
            "confirmed",
            "cancelled",
            "expired",
        ] {
            assert_eq!(ReservationStatus::parse(s).map(|s| s.as_str()), Some(s));
        }
        assert_eq!(ReservationStatus::parse("sold"), None);
    }
}
