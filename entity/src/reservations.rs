//! One user's claim on some units of an event.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "reservations")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub event_id: i64,
    pub user_id: String,
    pub quantity: i32,
    /// `issued`, `redeemed`, `revoked`, `held`, `confirmed`, `cancelled` or `expired`.
    pub status: String,
    /// Scoped to (event, user); replayed answers are rebuilt from this row.
    pub idempotency_key: Option<String>,
    /// Set for ticket holds: when the units go back to stock unless confirmed.
    pub expires_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::events::Entity",
        from = "Column::EventId",
        to = "super::events::Column::Id"
    )]
    Event,
}

impl Related<super::events::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Event.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
