//! The life of an uploaded file, in one place: its states ([`FileState`], and
//! [`NotifyStatus`] for its report) as types mapped to the `import_files` columns, and the
//! file as the operator, the tests and the console read it ([`FileLine`]).
//!
//! ```text
//! received ──(all chunks published)──▶ importing ──(last chunk)──▶ done
//!     └──────────(file-level problem, nothing imported)──────────▶ failed
//! report: pending ─▶ sending (a claim) ─▶ sent | not_needed | held
//! ```

use std::io::Write;

use diesel::deserialize::{self, FromSql, FromSqlRow};
use diesel::expression::AsExpression;
use diesel::pg::{Pg, PgValue};
use diesel::prelude::*;
use diesel::serialize::{self, Output, ToSql};
use diesel::sql_types::Text;

use crate::domain::TenantId;
use crate::schema::import_files;

/// Where a file is in its import (`import_files.state`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, AsExpression, FromSqlRow, serde::Serialize,
)]
#[diesel(sql_type = Text)]
#[serde(rename_all = "snake_case")]
pub enum FileState {
    /// Registered; its chunks are being published (or imported already).
    #[default]
    Received,
    /// Every chunk published; `chunks_done` of `total_chunks` imported.
    Importing,
    /// Every chunk imported.
    Done,
    /// Refused as a whole: nothing of it was imported.
    Failed,
}

/// Where a file's report is (`import_files.notify_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, AsExpression, FromSqlRow, serde::Serialize)]
#[diesel(sql_type = Text)]
#[serde(rename_all = "snake_case")]
pub enum NotifyStatus {
    /// Not decided yet (the file is not finished, or its failure records are on their way).
    Pending,
    /// A notifier claimed it and is sending (the claim expires).
    Sending,
    /// Mailed.
    Sent,
    /// Nothing failed and there is nothing to tell: no mail.
    NotNeeded,
    /// Not mailed: the tenant lacks mail settings, or the server refused the address.
    Held,
}

macro_rules! text_enum {
    ($ty:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            /// The value as stored and as printed.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }

            /// Parses the stored value.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some(Self::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                // pad: widths and alignment in format strings apply (muictl's columns).
                f.pad(self.as_str())
            }
        }

        impl ToSql<Text, Pg> for $ty {
            fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
                out.write_all(self.as_str().as_bytes())?;
                Ok(serialize::IsNull::No)
            }
        }

        impl FromSql<Text, Pg> for $ty {
            fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
                let s = std::str::from_utf8(value.as_bytes())?;
                Self::parse(s).ok_or_else(|| {
                    format!(concat!("unknown ", stringify!($ty), " {:?} in the database"), s).into()
                })
            }
        }
    };
}

text_enum!(FileState {
    Received => "received",
    Importing => "importing",
    Done => "done",
    Failed => "failed",
});

text_enum!(NotifyStatus {
    Pending => "pending",
    Sending => "sending",
    Sent => "sent",
    NotNeeded => "not_needed",
    Held => "held",
});

impl FileState {
    /// Whether the file will not change any more.
    pub fn is_finished(self) -> bool {
        matches!(self, FileState::Done | FileState::Failed)
    }
}

impl NotifyStatus {
    /// Whether the report's fate is decided (sent, not needed, or held).
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            NotifyStatus::Sent | NotifyStatus::NotNeeded | NotifyStatus::Held
        )
    }
}

/// One file as an operator's list shows it (`muictl files list`, also its JSON form).
#[derive(Debug, Clone, PartialEq, Eq, Queryable, serde::Serialize)]
pub struct FileLine {
    /// The file's id (`import_files.id`).
    pub id: i64,
    /// Name as uploaded.
    pub file_name: String,
    /// Where the file is.
    pub state: FileState,
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
    /// Where its report is.
    pub notify_status: NotifyStatus,
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
        .select(FILE_LINE_COLUMNS)
        .load(conn)
}

/// A tenant's files in arrival order (oldest first).
pub fn files_in_order(conn: &mut PgConnection, tenant: TenantId) -> QueryResult<Vec<FileLine>> {
    import_files::table
        .filter(import_files::tenant_id.eq(tenant.0))
        .order(import_files::id)
        .select(FILE_LINE_COLUMNS)
        .load(conn)
}

/// The columns of a [`FileLine`], in its field order.
#[allow(clippy::type_complexity)]
const FILE_LINE_COLUMNS: (
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
) = (
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
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_back_as_stored_and_print_padded() {
        for s in [
            FileState::Received,
            FileState::Importing,
            FileState::Done,
            FileState::Failed,
        ] {
            assert_eq!(FileState::parse(s.as_str()), Some(s));
        }
        for s in [
            NotifyStatus::Pending,
            NotifyStatus::Sending,
            NotifyStatus::Sent,
            NotifyStatus::NotNeeded,
            NotifyStatus::Held,
        ] {
            assert_eq!(NotifyStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(FileState::parse("DONE"), None);
        assert_eq!(format!("[{:<6}]", FileState::Done), "[done  ]");
        assert_eq!(NotifyStatus::NotNeeded.to_string(), "not_needed");
        assert_eq!(
            serde_json::to_string(&NotifyStatus::NotNeeded).unwrap(),
            "\"not_needed\""
        );
    }
}
