//! Identifiers: events are numbered by the database, reservations get a time-ordered UUID from
//! their event actor, users and idempotency keys are opaque client strings.

use std::fmt;
use std::sync::Arc;

use serde::{Serialize, Serializer};
use uuid::Uuid;

use super::Invalid;

/// An event's database id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
pub struct EventId(i64);

impl EventId {
    /// Parses a path segment; anything that is not a positive integer names no event.
    pub fn parse(raw: &str) -> Option<Self> {
        // Digits only: `+1` or ` 1` would otherwise name event 1 too.
        if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        raw.parse::<i64>().ok().filter(|id| *id > 0).map(Self)
    }

    pub fn from_db(id: i64) -> Self {
        Self(id)
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A reservation's id: UUIDv7, so ids sort by creation time and index inserts stay local.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
pub struct ReservationId(Uuid);

impl ReservationId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Uuid::try_parse(raw).ok().map(Self)
    }

    pub fn from_db(id: Uuid) -> Self {
        Self(id)
    }

    pub fn get(self) -> Uuid {
        self.0
    }
}

impl Default for ReservationId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Checks an opaque client token: 1..=`max` visible ASCII characters (no spaces, no controls).
fn visible_token(raw: &str, max: usize, what: &str) -> Result<(), Invalid> {
    if raw.is_empty() || raw.len() > max {
        return Err(Invalid(format!("{what} must be 1 to {max} characters long")));
    }
    if !raw.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Invalid(format!(
            "{what} may contain only visible ASCII characters"
        )));
    }
    Ok(())
}

/// The caller's identity. Shared (`Arc`) because every reservation and per-user count keeps one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);

impl UserId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        visible_token(raw, Self::MAX_LEN, "a user id")?;
        Ok(Self(raw.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Serialize for UserId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A client's `Idempotency-Key`, scoped to (event, user).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(Arc<str>);

impl IdempotencyKey {
    pub const MAX_LEN: usize = 255;

    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        visible_token(raw, Self::MAX_LEN, "Idempotency-Key")?;
        Ok(Self(raw.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_visible_ascii_of_bounded_length() {
        let cases = [
            ("", false, "empty"),
            ("alice", true, "plain"),
            ("user:42@tenant", true, "punctuation"),
            ("has space", false, "space"),
            ("tab\t", false, "control character"),
            ("é", false, "non-ASCII"),
        ];
        for (raw, ok, why) in cases {
            assert_eq!(UserId::parse(raw).is_ok(), ok, "{why}: {raw:?}");
        }
        assert!(UserId::parse(&"x".repeat(128)).is_ok(), "128 characters");
        assert!(UserId::parse(&"x".repeat(129)).is_err(), "129 characters");
    }

    #[test]
    fn event_ids_are_positive_integers() {
        assert_eq!(EventId::parse("7"), Some(EventId(7)));
        for raw in ["0", "-3", "+1", " 1", "abc", "", "99999999999999999999"] {
            assert_eq!(EventId::parse(raw), None, "{raw:?}");
        }
    }
}
