//! The files a tenant sent, as an operator lists them: state, progress, counts and notices.
//! Plain queries; `muictl files list` renders them.

use diesel::prelude::*;

use crate::domain::TenantId;
use crate::schema::import_files;

/// One file as an operator's list shows it (`muictl files list`, also its JSON form).
#[derive(Debug, Clone, PartialEq, Eq, Queryable, serde::Serialize)]
pub struct FileLine {
    /// The file's id (`import_files.id`).
    pub id: i64,
    /// Name as uploaded.
    pub file_name: String,
    /// `received`, `importing`, `done` or `failed`.
    pub state: String,
    /// Data rows read, once known.
    pub rows_total: Option<i64>,
    /// Chunks published, once all are.
    pub total_chunks: Option<i32>,
    /// Chunks imported.
    pub chunks_done: i32,
    /// Users created.
    pub rows_inserted: i64,
    /// Users changed.
    pub rows_updated: i64,
    /// Users already right.
    pub rows_unchanged: i64,
    /// Rows not imported.
    pub rows_failed: i64,
    /// Users archived (active=0 with archive-on-inactive).
    pub users_archived: i64,
    /// Archived users made active again.
    pub users_reactivated: i64,
    /// Permits released by archiving.
    pub permits_released: i64,
    /// File-level error code, when the file failed as a whole.
    pub error_code: Option<String>,
    /// File-level error, when the file failed as a whole.
    pub error_message: Option<String>,
    /// The file's name in `bak/`, once archived.
    pub archived_name: Option<String>,
    /// The report's state: `pending`, `sending`, `sent`, `not_needed` or `held`.
    pub notify_status: String,
    /// Why a report is held, or what a sent report left out.
    pub notify_detail: Option<String>,
    /// When the file arrived.
    pub received_at: chrono::DateTime<chrono::Utc>,
    /// When its last chunk was imported (or it failed).
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Things the tenant was told that did not stop the import.
    pub notices: Vec<String>,
}

impl FileLine {
    /// Rows imported: created, changed or already right.
    pub fn rows_imported(&self) -> i64 {
        self.rows_inserted + self.rows_updated + self.rows_unchanged
    }
}

/// A tenant's latest `limit` files, newest first.
pub fn list_file_lines(
    conn: &mut PgConnection,
    tenant: TenantId,
    limit: i64,
) -> QueryResult<Vec<FileLine>> {
    import_files::table
        .filter(import_files::tenant_id.eq(tenant.0))
        .order(import_files::id.desc())
        .limit(limit)
        .select((
            import_files::id,
            import_files::file_name,
            import_files::state,
            import_files::rows_total,
            import_files::total_chunks,
            import_files::chunks_done,
            import_files::rows_inserted,
            import_files::rows_updated,
            import_files::rows_unchanged,
            import_files::rows_failed,
            import_files::users_archived,
            import_files::users_reactivated,
            import_files::permits_released,
            import_files::error_code,
            import_files::error_message,
            import_files::archived_name,
            import_files::notify_status,
            import_files::notify_detail,
            import_files::received_at,
            import_files::finished_at,
            import_files::notices,
        ))
        .load(conn)
}
