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

use crate::amqp::QueueKind;
use crate::domain::{ImportFileId, TenantId};
use crate::messages::{self, FileFinished, NotifyMessage};
use crate::outbox;
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
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = import_files, check_for_backend(Pg))]
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
    /// Rows a later file of the tenant had already written (arrival order: it wins).
    pub rows_superseded: i64,
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
    /// The file's OpenTelemetry trace id (32 hex digits), when traces are exported.
    pub trace_id: Option<String>,
    /// A dry run (`*.validate.csv`): checked, nothing changed.
    pub dry_run: bool,
    /// The mass-deactivation guard's hold: `held`, `approved`, `rejected`, or none.
    pub hold: Option<String>,
    /// Users the held file would deactivate or archive.
    pub hold_users: Option<i64>,
    /// The tenant's active users when it was held.
    pub hold_active_users: Option<i64>,
}

impl FileLine {
    /// Whether the file waits for the operator's decision (`muictl files approve|reject`).
    pub fn is_held(&self) -> bool {
        self.hold.as_deref() == Some("held") && !self.state.is_finished()
    }

    /// Rows imported: created, changed, already right, or superseded by a later file.
    pub fn rows_imported(&self) -> i64 {
        self.rows_inserted + self.rows_updated + self.rows_unchanged + self.rows_superseded
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
        .select(FileLine::as_select())
        .load(conn)
}

/// One file, with its tenant's slug.
pub fn file_line(conn: &mut PgConnection, id: i64) -> QueryResult<Option<(FileLine, String)>> {
    use crate::schema::tenants;
    import_files::table
        .inner_join(tenants::table.on(tenants::id.eq(import_files::tenant_id)))
        .filter(import_files::id.eq(id))
        .select((FileLine::as_select(), tenants::slug))
        .first(conn)
        .optional()
}

/// A tenant's files in arrival order (oldest first).
pub fn files_in_order(conn: &mut PgConnection, tenant: TenantId) -> QueryResult<Vec<FileLine>> {
    import_files::table
        .filter(import_files::tenant_id.eq(tenant.0))
        .order(import_files::id)
        .select(FileLine::as_select())
        .load(conn)
}

/// A file with its tenant's slug: views across tenants (the console's overview and held list).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TenantFileLine {
    /// The tenant's slug.
    pub tenant: String,
    /// The file.
    #[serde(flatten)]
    pub file: FileLine,
}

fn tenant_file_lines(rows: Vec<(String, FileLine)>) -> Vec<TenantFileLine> {
    rows.into_iter()
        .map(|(tenant, file)| TenantFileLine { tenant, file })
        .collect()
}

/// Files of every tenant still being imported (`received`, `importing`) or received since
/// `since`, newest first, at most `limit`.
pub fn open_or_recent(
    conn: &mut PgConnection,
    since: chrono::DateTime<chrono::Utc>,
    limit: i64,
) -> QueryResult<Vec<TenantFileLine>> {
    use crate::schema::tenants;
    let rows = import_files::table
        .inner_join(tenants::table)
        .filter(
            import_files::state
                .eq_any([FileState::Received, FileState::Importing])
                .or(import_files::received_at.gt(since)),
        )
        .order(import_files::id.desc())
        .limit(limit)
        .select((tenants::slug, FileLine::as_select()))
        .load(conn)?;
    Ok(tenant_file_lines(rows))
}

/// Files of every tenant whose report is held (no mail settings, or the address refused),
/// oldest first.
pub fn held(conn: &mut PgConnection) -> QueryResult<Vec<TenantFileLine>> {
    use crate::schema::tenants;
    let rows = import_files::table
        .inner_join(tenants::table)
        .filter(import_files::notify_status.eq(NotifyStatus::Held))
        .order(import_files::id)
        .select((tenants::slug, FileLine::as_select()))
        .load(conn)?;
    Ok(tenant_file_lines(rows))
}

/// A file that waits on something, and on what ([`waiting`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WaitingFile {
    /// The file's id.
    pub id: i64,
    /// Its tenant's slug.
    pub tenant: String,
    /// Its name as uploaded.
    pub file_name: String,
    /// Where it is.
    pub state: FileState,
    /// Where its report is.
    pub notify_status: NotifyStatus,
    /// When it arrived.
    pub received_at: chrono::DateTime<chrono::Utc>,
    /// What it waits on, and what resolves it.
    pub why: String,
    /// An operator may end it now ([`crate::ending::end_by_operator`]): registered, not
    /// held, and no ingest reading it.
    pub can_end: bool,
}

#[derive(QueryableByName)]
struct WaitingRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    tenant: String,
    #[diesel(sql_type = Text)]
    file_name: String,
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = Text)]
    notify_status: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    notify_detail: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    received_at: chrono::DateTime<chrono::Utc>,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    hold: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Integer>)]
    total_chunks: Option<i32>,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    chunks_done: i32,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    behind: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    dead_chunks: i64,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    being_read: bool,
}

/// Every file, of every tenant, that is not finished or whose report did not go out, with
/// what it waits on and what resolves it, oldest first: the operator's answer to "why has
/// this file not arrived?" By design every file ends; one listed here for long is a fault
/// to look into (`docs/reliability.md`).
pub fn waiting(conn: &mut PgConnection) -> QueryResult<Vec<WaitingFile>> {
    let rows: Vec<WaitingRow> = diesel::sql_query(
        "SELECT f.id, t.slug AS tenant, f.file_name, f.state, f.notify_status, f.notify_detail, \
                f.received_at, f.hold, f.total_chunks, f.chunks_done, \
                (SELECT min(o.id) FROM import_files o WHERE o.tenant_id = f.tenant_id \
                   AND o.id < f.id AND o.state IN ('received', 'importing')) AS behind, \
                (SELECT count(*) FROM chunk_queue q WHERE q.file_id = f.id \
                   AND q.dead_at IS NOT NULL) AS dead_chunks, \
                EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' \
                   AND l.objsubid = 1 AND l.granted \
                   AND ((l.classid::bigint << 32) | l.objid::bigint) = f.id) AS being_read \
         FROM import_files f JOIN tenants t ON t.id = f.tenant_id \
         WHERE f.state IN ('received', 'importing') \
            OR f.notify_status IN ('pending', 'sending', 'held') \
         ORDER BY f.id",
    )
    .load(conn)?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let state = FileState::parse(&r.state).unwrap_or(FileState::Received);
            let notify = NotifyStatus::parse(&r.notify_status).unwrap_or(NotifyStatus::Pending);
            let open = !state.is_finished();
            let held = open && r.hold.as_deref() == Some("held");
            let can_end = state == FileState::Received && !held && !r.being_read;
            let why = if held {
                format!("held by the mass-deactivation guard: `muictl files approve {0}` or `muictl files reject {0}`", r.id)
            } else if open && r.dead_chunks > 0 {
                format!("{} of its chunks were dead-lettered: fix the cause, then `muictl dead-letters replay`", r.dead_chunks)
            } else if state == FileState::Received && r.being_read {
                "being read and queued by ingest".to_owned()
            } else if state == FileState::Received {
                format!("registered, and no ingest is reading it: it is taken again at ingest's next rescan, or ended there if its content is gone from the drop folder (ingest must run for its tenant); `muictl files end {} --reason ...` ends it now", r.id)
            } else if let (true, Some(b)) = (open, r.behind) {
                format!("waits for the tenant's earlier file {b} to finish (files take effect in arrival order)")
            } else if open {
                format!(
                    "importing: {} of {} chunks done (a worker with the dispatcher must run)",
                    r.chunks_done,
                    r.total_chunks.map_or("?".to_owned(), |n| n.to_string())
                )
            } else if notify == NotifyStatus::Held {
                format!(
                    "report held: {}; `muictl files resend {}` once that is fixed",
                    r.notify_detail.as_deref().unwrap_or("no reason recorded"),
                    r.id
                )
            } else {
                "report being sent (a notifier must run; a mail server refusing for the time being is retried for MAIL_RETRY_SECS)".to_owned()
            };
            WaitingFile {
                id: r.id,
                tenant: r.tenant,
                file_name: r.file_name,
                state,
                notify_status: notify,
                received_at: r.received_at,
                why,
                can_end,
            }
        })
        .collect())
}

/// Files of every tenant held by the mass-deactivation guard and waiting for the operator's
/// decision (`muictl files approve|reject`, the console's held page), oldest first. Reads
/// through the open-files index: only files still `received` or `importing` are looked at.
pub fn awaiting_decision(conn: &mut PgConnection) -> QueryResult<Vec<TenantFileLine>> {
    use crate::schema::tenants;
    let rows = import_files::table
        .inner_join(tenants::table)
        .filter(import_files::state.eq_any([FileState::Received, FileState::Importing]))
        .filter(import_files::hold.eq("held"))
        .order(import_files::id)
        .select((tenants::slug, FileLine::as_select()))
        .load(conn)?;
    Ok(tenant_file_lines(rows))
}

/// What the operator's page of one file shows beyond its [`FileLine`]: whose it is, what
/// it was, and when each step happened.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = import_files, check_for_backend(Pg))]
pub struct FileDetail {
    /// The tenant (`tenants.id`).
    pub tenant_id: i64,
    /// Size in bytes.
    pub size_bytes: i64,
    /// Hex SHA-256 of the content.
    pub sha256: String,
    /// Detected encoding.
    pub encoding: Option<String>,
    /// Detected delimiter.
    pub delimiter: Option<String>,
    /// When every chunk was published (the totals known).
    pub queued_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When the report's status last changed (claimed, sent, held).
    pub notified_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The header as uploaded (a JSON list; see [`crate::failures::header_of`]).
    pub header: Option<serde_json::Value>,
}

/// One file as the operator sees it, with its [`FileDetail`]; `None` if there is none.
pub fn file_detail(
    conn: &mut PgConnection,
    id: ImportFileId,
) -> QueryResult<Option<(FileLine, FileDetail)>> {
    import_files::table
        .find(id.0)
        .select((FileLine::as_select(), FileDetail::as_select()))
        .first(conn)
        .optional()
}

/// A tenant's files summed up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, QueryableByName, serde::Serialize)]
pub struct FileTotals {
    /// Files received.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub files: i64,
    /// Files still being imported.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub open: i64,
    /// Files refused as a whole.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub failed: i64,
    /// Rows imported (created, changed or already right).
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub rows_imported: i64,
    /// Rows not imported.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub rows_failed: i64,
    /// Files whose report is held.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub held: i64,
}

/// Every file of a tenant summed up.
pub fn totals_of(conn: &mut PgConnection, tenant: TenantId) -> QueryResult<FileTotals> {
    diesel::sql_query(
        "SELECT count(*) AS files, \
           count(*) FILTER (WHERE state IN ('received', 'importing')) AS open, \
           count(*) FILTER (WHERE state = 'failed') AS failed, \
           coalesce(sum(rows_inserted + rows_updated + rows_unchanged + rows_superseded), 0)::BIGINT AS rows_imported, \
           coalesce(sum(rows_failed), 0)::BIGINT AS rows_failed, \
           count(*) FILTER (WHERE notify_status = 'held') AS held \
         FROM import_files WHERE tenant_id = $1",
    )
    .bind::<diesel::sql_types::BigInt, _>(tenant.0)
    .get_result(conn)
}

// ---------------------------------------------------------------------------------------
// Transitions: the only way the services change a file's state.
// ---------------------------------------------------------------------------------------

/// What ingest knows of a file when it registers it.
#[derive(Debug, Clone)]
pub struct NewFile<'a> {
    /// Its tenant.
    pub tenant: TenantId,
    /// Its name as shown (escaped if it was not UTF-8).
    pub name: &'a str,
    /// Tenant, device, inode, mtime, size and hash: one upload, whatever its name.
    pub arrival_key: &'a str,
    /// Size in bytes.
    pub size: i64,
    /// Hex SHA-256 of the content.
    pub sha256: &'a str,
    /// Detected encoding, as reports write it.
    pub encoding: &'a str,
    /// Rows per chunk, fixed for this file.
    pub chunk_rows: i32,
    /// Bytes per chunk, about, fixed for this file.
    pub chunk_max_bytes: i32,
}

/// A registered file and the chunking it was registered with (None for files registered
/// before the chunking was stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// The file.
    pub id: ImportFileId,
    /// Rows per chunk.
    pub chunk_rows: Option<i32>,
    /// Bytes per chunk.
    pub chunk_max_bytes: Option<i32>,
    /// Whether this call registered it (false: it was registered before, e.g. by a retry).
    pub new: bool,
}

/// Registers a file under its arrival key, or finds it if already registered (`received`).
pub fn register(conn: &mut PgConnection, f: &NewFile<'_>) -> QueryResult<Registered> {
    let inserted = diesel::insert_into(import_files::table)
        .values((
            import_files::tenant_id.eq(f.tenant.0),
            import_files::file_name.eq(f.name),
            import_files::arrival_key.eq(f.arrival_key),
            import_files::size_bytes.eq(f.size),
            import_files::sha256.eq(f.sha256),
            import_files::encoding.eq(f.encoding),
            import_files::chunk_rows.eq(f.chunk_rows),
            import_files::chunk_max_bytes.eq(f.chunk_max_bytes),
        ))
        .on_conflict(import_files::arrival_key)
        .do_nothing()
        .execute(conn)?;
    let (id, chunk_rows, chunk_max_bytes): (i64, Option<i32>, Option<i32>) = import_files::table
        .filter(import_files::arrival_key.eq(f.arrival_key))
        .select((
            import_files::id,
            import_files::chunk_rows,
            import_files::chunk_max_bytes,
        ))
        .first(conn)?;
    Ok(Registered {
        id: ImportFileId(id),
        chunk_rows,
        chunk_max_bytes,
        new: inserted == 1,
    })
}

/// The state a file is in.
pub fn state_of(conn: &mut PgConnection, id: ImportFileId) -> QueryResult<FileState> {
    import_files::table
        .find(id.0)
        .select(import_files::state)
        .first(conn)
}

/// Records a notice for the tenant and the operator on the file (once, however often a
/// retry records it).
pub fn add_notice(conn: &mut PgConnection, id: ImportFileId, notice: &str) -> QueryResult<()> {
    diesel::sql_query(
        "UPDATE import_files SET notices = array_append(notices, $2) \
         WHERE id = $1 AND NOT ($2 = ANY (notices))",
    )
    .bind::<diesel::sql_types::BigInt, _>(id.0)
    .bind::<Text, _>(crate::domain::storable(notice).as_ref())
    .execute(conn)?;
    Ok(())
}

/// `received`/`importing` → `failed` (nothing of it imported), and "file finished" for the
/// notifier, in one transaction. False if the file was already past that (a retry).
pub fn fail(
    conn: &mut PgConnection,
    id: ImportFileId,
    tenant: TenantId,
    code: &str,
    message: &str,
    encoding: Option<&str>,
) -> QueryResult<bool> {
    conn.transaction(|conn| {
        let updated = diesel::update(
            import_files::table
                .find(id.0)
                .filter(import_files::state.eq_any([FileState::Received, FileState::Importing])),
        )
        .set((
            import_files::state.eq(FileState::Failed),
            import_files::error_code.eq(code),
            import_files::error_message.eq(crate::domain::storable(message).as_ref()),
            import_files::encoding.eq(encoding),
            import_files::finished_at.eq(diesel::dsl::now),
        ))
        .execute(conn)?;
        if updated == 1 {
            announce_finished(conn, id, tenant)?;
        }
        Ok(updated == 1)
    })
}

/// What ingest knows once every chunk of a file is published.
#[derive(Debug, Clone)]
pub struct Totals {
    /// Chunks published.
    pub chunks: i32,
    /// Data rows published.
    pub rows: i64,
    /// The delimiter, as reports name it.
    pub delimiter: String,
    /// The header as uploaded.
    pub header: serde_json::Value,
    /// Columns ignored.
    pub ignored: serde_json::Value,
}

/// `received` → `importing` (or straight to `done` if the workers already imported every
/// chunk, then announced), in one transaction. Returns whether the file is done.
pub fn totals_known(
    conn: &mut PgConnection,
    id: ImportFileId,
    tenant: TenantId,
    t: &Totals,
) -> QueryResult<bool> {
    conn.transaction(|conn| {
        #[derive(QueryableByName)]
        struct Done {
            #[diesel(sql_type = diesel::sql_types::Bool)]
            done: bool,
        }
        let done: Done = diesel::sql_query(
            "UPDATE import_files SET total_chunks = $2, rows_total = $3, \
             delimiter = $4, header = $5, ignored_columns = $6, queued_at = now(), \
             state = CASE WHEN chunks_done >= $2 THEN $7 ELSE $8 END, \
             finished_at = CASE WHEN chunks_done >= $2 THEN now() END \
             WHERE id = $1 RETURNING (state = $7) AS done",
        )
        .bind::<diesel::sql_types::BigInt, _>(id.0)
        .bind::<diesel::sql_types::Integer, _>(t.chunks)
        .bind::<diesel::sql_types::BigInt, _>(t.rows)
        .bind::<Text, _>(&t.delimiter)
        .bind::<diesel::sql_types::Jsonb, _>(&t.header)
        .bind::<diesel::sql_types::Jsonb, _>(&t.ignored)
        .bind::<Text, _>(FileState::Done)
        .bind::<Text, _>(FileState::Importing)
        .get_result(conn)?;
        if done.done {
            announce_finished(conn, id, tenant)?;
        }
        Ok(done.done)
    })
}

/// `importing` → `done` when a worker imported the last chunk, and "file finished" for the
/// notifier, inside the worker's transaction (the one that counted the chunk).
pub fn last_chunk_done(
    conn: &mut PgConnection,
    id: ImportFileId,
    tenant: TenantId,
) -> QueryResult<()> {
    diesel::update(import_files::table.find(id.0))
        .set((
            import_files::state.eq(FileState::Done),
            import_files::finished_at.eq(diesel::dsl::now),
        ))
        .execute(conn)?;
    announce_finished(conn, id, tenant)
}

/// Records the name the file was archived under in `bak/`.
pub fn archived(conn: &mut PgConnection, id: ImportFileId, name: &str) -> QueryResult<()> {
    diesel::update(import_files::table.find(id.0))
        .set(import_files::archived_name.eq(name))
        .execute(conn)?;
    Ok(())
}

/// The report is not needed (nothing failed, nothing to tell): no mail.
pub fn report_not_needed(conn: &mut PgConnection, id: ImportFileId) -> QueryResult<()> {
    report_status(conn, id, NotifyStatus::NotNeeded, None)
}

/// A notifier claims the report (`sending`, timestamped: the claim expires, so a notifier
/// that died while sending does not keep it forever).
pub fn claim_report(conn: &mut PgConnection, id: ImportFileId) -> QueryResult<()> {
    diesel::update(import_files::table.find(id.0))
        .set((
            import_files::notify_status.eq(NotifyStatus::Sending),
            import_files::notified_at.eq(diesel::dsl::now),
        ))
        .execute(conn)?;
    Ok(())
}

/// Records what became of a report: `sent` (with what it left out, if anything), `held`
/// (with why), or `pending` again (a transient failure: it is tried again).
pub fn report_status(
    conn: &mut PgConnection,
    id: ImportFileId,
    status: NotifyStatus,
    detail: Option<&str>,
) -> QueryResult<()> {
    diesel::update(import_files::table.find(id.0))
        .set((
            import_files::notify_status.eq(status),
            import_files::notify_detail.eq(detail),
            import_files::notified_at.eq(diesel::dsl::now),
        ))
        .execute(conn)?;
    Ok(())
}

/// Makes a held report due again (`held` → `pending`, and "file finished" for the notifier
/// in the outbox, in one transaction): the operator's "send it again" once the cause (mail
/// settings, the tenant's mail server) is fixed. False when the report is not held.
pub fn resend_report(conn: &mut PgConnection, id: ImportFileId) -> QueryResult<bool> {
    conn.transaction(|conn| {
        let tenant: Option<i64> = diesel::update(
            import_files::table
                .find(id.0)
                .filter(import_files::notify_status.eq(NotifyStatus::Held))
                .filter(import_files::state.eq_any([FileState::Done, FileState::Failed])),
        )
        .set((
            import_files::notify_status.eq(NotifyStatus::Pending),
            import_files::notify_detail.eq(None::<String>),
        ))
        .returning(import_files::tenant_id)
        .get_result(conn)
        .optional()?;
        match tenant {
            Some(t) => {
                announce_finished(conn, id, TenantId(t))?;
                Ok(true)
            }
            None => Ok(false),
        }
    })
}

/// Puts "file finished" for the notifier into the outbox, inside the caller's transaction.
pub fn announce_finished(
    conn: &mut PgConnection,
    id: ImportFileId,
    tenant: TenantId,
) -> QueryResult<()> {
    let msg = NotifyMessage::FileFinishedV1(FileFinished {
        file_id: id,
        tenant_id: tenant,
    });
    let bytes = messages::encode(&msg)
        .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
    outbox::enqueue(conn, QueueKind::Notify, bytes)
}

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
