//! Ending a registration without reading it to its end. A file is registered before it is
//! read; if nothing will ever read it (its content was replaced or removed while no ingest
//! was handling it, handling it fails again and again, or an operator decides so), it would
//! stay its tenant's oldest open file and hold back every later one. [`end`] ends it, once,
//! with one report:
//!
//! - nothing of it was queued: it fails (with the [`Ending`]'s code and reason);
//! - some chunks were queued (not held back: a dry run's or a held file's chunks are
//!   released only once all are queued, so those end as above): the longest unbroken run
//!   from the first chunk is kept (those rows were read from this version, and are imported
//!   and reported), the rest is taken off the queue, and the report's notice says how many
//!   rows were imported and that the rest was not. Never a mix of two versions.
//!
//! Ingest calls it for orphans and for its give-up net; [`end_by_operator`] is
//! `muictl files end` and the console's waiting page.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Integer};

use crate::domain::{ImportFileId, TenantId};
use crate::files::{self, FileState};
use crate::messages::{self, FileErrorCode, WorkMessage};
use crate::schema::import_files;

#[derive(QueryableByName)]
struct Queued {
    #[diesel(sql_type = Integer)]
    chunk_no: i32,
    #[diesel(sql_type = Integer)]
    rows: i32,
}

/// Why a registration is ended without being read to its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Its content is no longer in the folder.
    Gone,
    /// Handling it failed again and again with this error (ingest's give-up net).
    GaveUp(String),
    /// An operator ended it (`muictl files end`, the console's waiting page).
    Operator {
        /// Who, as recorded.
        by: String,
        /// Why, as the operator said it (goes into the tenant's report).
        reason: String,
    },
}

/// Ends a registration in one transaction, keeping what was queued of it (see the module
/// docs), as the caller holds its lock; returns the rows kept.
pub fn end(
    conn: &mut PgConnection,
    file: ImportFileId,
    tenant: TenantId,
    why: &Ending,
) -> diesel::QueryResult<i64> {
    // Locking the queued chunks first waits for a worker taking one of them; what the
    // workers imported is read after, so nothing is counted twice or missed.
    let queued: Vec<Queued> =
        diesel::sql_query("SELECT chunk_no, rows FROM chunk_queue WHERE file_id = $1 FOR UPDATE")
            .bind::<BigInt, _>(file.0)
            .load(conn)?;
    let imported: Vec<Queued> =
        diesel::sql_query("SELECT chunk_no, rows FROM file_chunks WHERE file_id = $1")
            .bind::<BigInt, _>(file.0)
            .load(conn)?;
    let mut rows_of: std::collections::BTreeMap<i32, i32> = std::collections::BTreeMap::new();
    for q in queued.iter().chain(&imported) {
        rows_of.insert(q.chunk_no, q.rows);
    }
    // The unbroken run from chunk 0. A dry run or a held file is queued held back and
    // released only once queued whole, so none of its chunks took effect: nothing is kept.
    let (dry_run, hold): (bool, Option<String>) = crate::schema::import_files::table
        .find(file.0)
        .select((
            crate::schema::import_files::dry_run,
            crate::schema::import_files::hold,
        ))
        .first(conn)?;
    let mut kept_chunks = 0;
    while !dry_run && hold.is_none() && rows_of.contains_key(&kept_chunks) {
        kept_chunks += 1;
    }
    // The header, from a queued chunk of the run (each chunk carries it).
    let mut header: Vec<String> = Vec::new();
    if let Some(q) = queued.iter().find(|q| q.chunk_no < kept_chunks) {
        let payload: Vec<u8> = crate::schema::chunk_queue::table
            .filter(crate::schema::chunk_queue::file_id.eq(file.0))
            .filter(crate::schema::chunk_queue::chunk_no.eq(q.chunk_no))
            .select(crate::schema::chunk_queue::payload)
            .first(conn)?;
        if let Ok(WorkMessage::ChunkV1(chunk)) = messages::decode_work(&payload) {
            header = chunk.header;
        }
    }
    diesel::sql_query("DELETE FROM chunk_queue WHERE file_id = $1 AND chunk_no >= $2")
        .bind::<BigInt, _>(file.0)
        .bind::<Integer, _>(kept_chunks)
        .execute(conn)?;
    let rows: i64 = rows_of
        .range(..kept_chunks)
        .map(|(_, r)| i64::from(*r))
        .sum();
    let (code, failed, notice) = match why {
        Ending::Gone => (
            FileErrorCode::Unreadable,
            "the file was replaced or removed before it was read (the import service was restarted meanwhile): nothing of this version was imported; a file uploaded in its place is imported as a new upload".to_owned(),
            format!("The file was replaced or removed while it was being read (the import service was restarted meanwhile): only its first {rows} data rows were imported (each is counted and reported here); the rest of this version was not. Upload the whole file again"),
        ),
        Ending::GaveUp(cause) => (
            FileErrorCode::InternalError,
            format!("the import service failed on this file again and again with the same error ({cause}); nothing of it was imported. The operators can see the error with the file (id {}); upload the file again once they say it is fixed", file.0),
            format!("The import service failed on this file again and again with the same error ({cause}): only its first {rows} data rows were imported (each is counted and reported here); the rest was not. The operators can see the error with the file (id {}); upload the whole file again once they say it is fixed", file.0),
        ),
        Ending::Operator { by, reason } => (
            FileErrorCode::EndedByOperator,
            format!("ended by the operators ({by}) before it was read: {reason}. Nothing of it was imported; upload the file again when they say so"),
            format!("Ended by the operators ({by}) before it was read to its end: {reason}. Only its first {rows} data rows were imported (each is counted and reported here); the rest was not. Upload the whole file again when they say so"),
        ),
    };
    if kept_chunks == 0 {
        files::fail(conn, file, tenant, code.as_str(), &failed, None)?;
        return Ok(0);
    }
    files::add_notice(conn, file, &notice)?;
    let totals = files::Totals {
        chunks: kept_chunks,
        rows,
        delimiter: "comma".to_owned(),
        header: serde_json::to_value(&header)
            .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?,
        ignored: serde_json::json!([]),
    };
    files::totals_known(conn, file, tenant, &totals)?;
    Ok(rows)
}

/// Why an operator's [`end_by_operator`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum EndError {
    /// No such file.
    #[error("there is no file with id {}", .0.0)]
    NoSuchFile(ImportFileId),
    /// Ingest holds the file now (it is reading and queueing it).
    #[error("file {} is being read by ingest right now: it will end by itself; try again if it is still waiting in a minute", .0.0)]
    BeingRead(ImportFileId),
    /// Held by the guard: the decision ends it.
    #[error("file {} is held by the mass-deactivation guard: approve or reject it instead (`muictl files approve|reject {}`)", .0.0, .0.0)]
    Held(ImportFileId),
    /// Past registration: it ends when its chunks are imported.
    #[error("file {} is {state}, not `received`: {hint}", .file.0)]
    NotReceived {
        /// The file.
        file: ImportFileId,
        /// Its state.
        state: FileState,
        /// What resolves it instead.
        hint: &'static str,
    },
    /// Database trouble.
    #[error("database error: {0}")]
    Db(#[from] diesel::result::Error),
}

/// What [`end_by_operator`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Ended {
    /// The file.
    pub file: i64,
    /// Data rows kept (queued before, imported and reported); 0: the file failed whole.
    pub kept_rows: i64,
}

/// An operator ends a registration that nothing reads (`received`, no ingest holding its
/// lock): see the module docs. Ingest ends such files by itself (orphans, the give-up
/// net); this is the operator's way out for any case those do not cover. Taken under the
/// file's advisory lock (the one ingest holds while it reads a file), so it never races a
/// reading ingest. The file then counts as handled: a copy still in the drop folder is
/// moved to `bak/` at ingest's next scan, not imported.
pub fn end_by_operator(
    conn: &mut PgConnection,
    file: ImportFileId,
    by: &str,
    reason: &str,
) -> Result<Ended, EndError> {
    conn.transaction(|conn| {
        #[derive(QueryableByName)]
        struct Locked {
            #[diesel(sql_type = Bool)]
            locked: bool,
        }
        let got: Locked = diesel::sql_query("SELECT pg_try_advisory_xact_lock($1) AS locked")
            .bind::<BigInt, _>(file.0)
            .get_result(conn)?;
        let row: Option<(i64, FileState, Option<String>)> = import_files::table
            .find(file.0)
            .select((import_files::tenant_id, import_files::state, import_files::hold))
            .for_update()
            .first(conn)
            .optional()?;
        let Some((tenant, state, hold)) = row else {
            return Err(EndError::NoSuchFile(file));
        };
        if hold.as_deref() == Some("held") && !state.is_finished() {
            return Err(EndError::Held(file));
        }
        match state {
            FileState::Received => {}
            FileState::Importing => {
                return Err(EndError::NotReceived {
                    file,
                    state,
                    hint: "its rows are queued and it ends when the workers have imported them (`muictl files waiting` says what it waits on; dead-lettered chunks are replayed with `muictl dead-letters replay`)",
                })
            }
            _ => {
                return Err(EndError::NotReceived {
                    file,
                    state,
                    hint: "it has ended already",
                })
            }
        }
        if !got.locked {
            return Err(EndError::BeingRead(file));
        }
        let reason = crate::messages::truncate_for_message(reason.trim(), 500);
        let reason = if reason.is_empty() {
            "no reason given".to_owned()
        } else {
            reason
        };
        let kept_rows = end(
            conn,
            file,
            TenantId(tenant),
            &Ending::Operator {
                by: by.to_owned(),
                reason,
            },
        )?;
        Ok(Ended {
            file: file.0,
            kept_rows,
        })
    })
}
