//! Events (drops): their configuration, the rules for creating and changing one, and the live
//! inventory split `remaining + held + sold = stock`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};

use super::{EventId, Invalid};

/// Largest stock one event may carry.
pub const MAX_STOCK: u64 = 1_000_000_000;
/// Largest per-user limit (and so the largest quantity in one request).
pub const MAX_PER_USER: u32 = 10_000;
/// Longest hold on a ticket: one week.
pub const MAX_HOLD_SECONDS: u32 = 7 * 24 * 3600;
const DEFAULT_HOLD_SECONDS: u32 = 600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Issued at once; the reservation is final.
    Coupon,
    /// Held for `hold_seconds`, then confirmed or returned to stock.
    Ticket,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Coupon => "coupon",
            Self::Ticket => "ticket",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "coupon" => Some(Self::Coupon),
            "ticket" => Some(Self::Ticket),
            _ => None,
        }
    }
}

/// What an admin sends to create an event, before validation.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventSpec {
    pub name: String,
    pub kind: EventKind,
    pub stock: u64,
    pub per_user_limit: Option<u32>,
    pub max_per_request: Option<u32>,
    pub hold_seconds: Option<u32>,
    pub opens_at: Option<DateTime<Utc>>,
    pub closes_at: Option<DateTime<Utc>>,
}

/// A validated event. `id` is zero until the database assigns one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Event {
    pub id: EventId,
    pub name: String,
    pub kind: EventKind,
    pub stock: u64,
    pub per_user_limit: u32,
    pub max_per_request: u32,
    pub hold_seconds: u32,
    pub opens_at: Option<DateTime<Utc>>,
    pub closes_at: Option<DateTime<Utc>>,
    pub closed: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

fn check_window(opens_at: Option<DateTime<Utc>>, closes_at: Option<DateTime<Utc>>) -> Result<(), Invalid> {
    match (opens_at, closes_at) {
        (Some(open), Some(close)) if close <= open => {
            Err(Invalid::new("closes_at must be later than opens_at"))
        }
        _ => Ok(()),
    }
}

impl EventSpec {
    /// Applies defaults and checks every rule; `id` is filled in by the database.
    pub fn validate(self, now: DateTime<Utc>) -> Result<Event, Invalid> {
        let name = self.name.trim().to_owned();
        if name.is_empty() || name.chars().count() > 200 {
            return Err(Invalid::new("name must be 1 to 200 characters long"));
        }
        if self.stock > MAX_STOCK {
            return Err(Invalid(format!("stock must be at most {MAX_STOCK}")));
        }
        let per_user_limit = self.per_user_limit.unwrap_or(1);
        if !(1..=MAX_PER_USER).contains(&per_user_limit) {
            return Err(Invalid(format!("per_user_limit must be 1 to {MAX_PER_USER}")));
        }
        let max_per_request = self.max_per_request.unwrap_or(per_user_limit);
        if !(1..=per_user_limit).contains(&max_per_request) {
            return Err(Invalid::new("max_per_request must be 1 to per_user_limit"));
        }
        let hold_seconds = self.hold_seconds.unwrap_or(DEFAULT_HOLD_SECONDS);
        if !(1..=MAX_HOLD_SECONDS).contains(&hold_seconds) {
            return Err(Invalid(format!("hold_seconds must be 1 to {MAX_HOLD_SECONDS}")));
        }
        check_window(self.opens_at, self.closes_at)?;
        Ok(Event {
            id: EventId::from_db(0),
            name,
            kind: self.kind,
            stock: self.stock,
            per_user_limit,
            max_per_request,
            hold_seconds,
            opens_at: self.opens_at,
            closes_at: self.closes_at,
            closed: false,
            created_at: now,
            updated_at: now,
        })
    }
}

/// Deserializes a field that may be absent (no change) or `null` (clear it).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// An admin's change to an event: each field absent means "leave as is".
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventPatch {
    pub stock: Option<u64>,
    /// `null` removes the opening time.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub opens_at: Option<Option<DateTime<Utc>>>,
    /// `null` removes the closing time.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub closes_at: Option<Option<DateTime<Utc>>>,
    pub closed: Option<bool>,
}

impl Event {
    /// The event after `patch`, or why it cannot apply given what is already held and sold.
    pub fn patched(
        &self,
        patch: &EventPatch,
        inventory: Inventory,
        now: DateTime<Utc>,
    ) -> Result<Event, Invalid> {
        let mut next = self.clone();
        if let Some(stock) = patch.stock {
            if stock > MAX_STOCK {
                return Err(Invalid(format!("stock must be at most {MAX_STOCK}")));
            }
            let taken = inventory.held + inventory.sold;
            if stock < taken {
                return Err(Invalid(format!(
                    "stock cannot go below the {taken} units already held or sold"
                )));
            }
            next.stock = stock;
        }
        if let Some(opens_at) = patch.opens_at {
            next.opens_at = opens_at;
        }
        if let Some(closes_at) = patch.closes_at {
            next.closes_at = closes_at;
        }
        if let Some(closed) = patch.closed {
            next.closed = closed;
        }
        check_window(next.opens_at, next.closes_at)?;
        next.updated_at = now;
        Ok(next)
    }

    /// Where the sales window stands at `now`, ignoring stock.
    pub fn window(&self, now: DateTime<Utc>) -> Option<EventStatus> {
        if self.closed || self.closes_at.is_some_and(|close| now >= close) {
            Some(EventStatus::Closed)
        } else if self.opens_at.is_some_and(|open| now < open) {
            Some(EventStatus::Scheduled)
        } else {
            None
        }
    }

    pub fn status(&self, inventory: Inventory, now: DateTime<Utc>) -> EventStatus {
        self.window(now).unwrap_or(if inventory.remaining() == 0 {
            EventStatus::SoldOut
        } else {
            EventStatus::Open
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventStatus {
    Scheduled,
    Open,
    SoldOut,
    Closed,
}

/// The live split of an event's stock. `remaining + held + sold = stock` always.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Inventory {
    pub stock: u64,
    pub held: u64,
    pub sold: u64,
}

impl Inventory {
    pub fn remaining(self) -> u64 {
        self.stock.saturating_sub(self.held + self.sold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<Event, Invalid> {
        let spec: EventSpec = serde_json::from_str(json).map_err(|e| Invalid(e.to_string()))?;
        spec.validate(Utc::now())
    }

    #[test]
    fn event_specs_get_defaults_and_are_checked() {
        let ok = spec(r#"{"name":"Launch","kind":"coupon","stock":10}"#);
        let event = ok.as_ref().map_err(Clone::clone);
        assert_eq!(
            event.map(|e| (e.per_user_limit, e.max_per_request, e.hold_seconds)),
            Ok((1, 1, 600))
        );

        let refused = [
            (r#"{"name":"","kind":"coupon","stock":1}"#, "empty name"),
            (
                r#"{"name":"a","kind":"coupon","stock":1000000001}"#,
                "stock too large",
            ),
            (
                r#"{"name":"a","kind":"coupon","stock":1,"per_user_limit":0}"#,
                "zero limit",
            ),
            (
                r#"{"name":"a","kind":"ticket","stock":1,"per_user_limit":2,"max_per_request":3}"#,
                "max over limit",
            ),
            (
                r#"{"name":"a","kind":"ticket","stock":1,"hold_seconds":0}"#,
                "zero hold",
            ),
            (
                r#"{"name":"a","kind":"coupon","stock":1,"opens_at":"2030-01-02T00:00:00Z","closes_at":"2030-01-01T00:00:00Z"}"#,
                "window backwards",
            ),
        ];
        for (json, why) in refused {
            assert!(spec(json).is_err(), "{why} should be refused");
        }
    }

    #[test]
    fn stock_cannot_drop_below_what_is_held_or_sold() {
        let event = spec(r#"{"name":"a","kind":"ticket","stock":10}"#).map_err(|e| e.0);
        let Ok(event) = event else {
            panic!("valid spec refused")
        };
        let inventory = Inventory {
            stock: 10,
            held: 3,
            sold: 4,
        };
        let lower = |stock| EventPatch {
            stock: Some(stock),
            ..EventPatch::default()
        };
        assert!(event.patched(&lower(6), inventory, Utc::now()).is_err());
        assert_eq!(
            event.patched(&lower(7), inventory, Utc::now()).map(|e| e.stock),
            Ok(7)
        );
    }
}
