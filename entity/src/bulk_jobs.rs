//! A bulk-issuance job: where its targets come from, how far it got, and its totals.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "bulk_jobs")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub event_id: i64,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    /// The targets' source, as JSON: an uploaded file or a table and column.
    pub source: String,
    /// Where the last committed chunk ended: data lines consumed (uploads) or the last value
    /// read (tables). A resumed job continues from here.
    pub cursor: Option<String>,
    pub read_count: i64,
    pub issued: i64,
    pub skipped: i64,
    pub invalid: i64,
    pub unissued: i64,
    /// The upload's size, or the table's row count when the job started; for the ETA.
    pub bytes_total: Option<i64>,
    /// How much of `bytes_total` the committed chunks have consumed.
    pub bytes_read: i64,
    /// JSON array of the first malformed lines: `[{"line": n, "reason": "..."}]`.
    pub invalid_lines: String,
    pub stock_exhausted: bool,
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub created_at: DateTimeUtc,
    pub started_at: Option<DateTimeUtc>,
    pub finished_at: Option<DateTimeUtc>,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
