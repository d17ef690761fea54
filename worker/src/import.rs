//! Importing one chunk, in one transaction; this file keeps its steps in order:
//!
//! 0. a chunk handed out by the fair dispatcher is taken from `chunk_queue` (its row is
//!    deleted by this transaction; see `mui_shared::dispatch`);
//! 1. insert the chunk's marker `(file_id, chunk_no)`: if it exists the chunk was imported
//!    before (a redelivery) and nothing else happens;
//! 2. check every row ([`crate::validate`]); within the chunk, a later row with the same
//!    `unique_id` wins and the earlier is reported (`duplicate.rs`); a row whose email
//!    or user name belongs to another user of the tenant is reported (`identity.rs`, run in
//!    step 3 on the staged rows that change something);
//! 3. leave alone the rows that change nothing (found by the digest stored with their user,
//!    `digest.rs`, then by value), `COPY` the others into a temporary staging table
//!    (`staging.rs`) and upsert them into `users` with set-based statements (`upsert.rs`:
//!    versions, so any number of workers may import a file's chunks in any order;
//!    archive-on-inactive; permits released);
//! 4. add the counts to the file, put the chunk's failure records (and, for the file's last
//!    chunk, "file finished") in the outbox.
//!
//! Empty cells leave stored values unchanged; a new user without `active` is active.

use std::collections::HashMap;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Nullable, Text};
use mui_shared::amqp::QueueKind;
use mui_shared::dispatch;
use mui_shared::domain::{HeaderMap, ImportFileId, TenantId};
use mui_shared::files::FileState;
use mui_shared::messages::{
    self, Chunk, ChunkRef, Fields, NotifyMessage, RowFailure, RowFailures, WorkMessage,
};
use mui_shared::outbox;
use mui_shared::schema::{file_chunks, import_files, tenants};

use crate::duplicate::duplicate_failure;
use crate::sql::COUNT_CHUNK;
use crate::upsert::{upsert, ArchiveSettings};
use crate::validate::{self, TenantRules, UserRow};

/// Why a chunk could not be imported.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// Database trouble; see [`mui_shared::db::is_transient`].
    #[error("database error")]
    Db(#[from] mui_shared::db::DbError),
    /// The chunk names a file that does not exist or belongs to another tenant: never
    /// imported, dead-lettered.
    #[error("chunk {chunk_no} of {file_id} does not belong to {tenant_id}")]
    WrongTenant {
        /// The file named.
        file_id: ImportFileId,
        /// The tenant named.
        tenant_id: TenantId,
        /// The chunk.
        chunk_no: u32,
    },
    /// The chunk's header cannot be mapped (ingest checks this first; a hand-made message).
    #[error("chunk header is unusable: {0}")]
    Header(#[from] mui_shared::domain::HeaderError),
    /// A reference to a chunk that is neither queued nor imported (its file was deleted, or
    /// a hand-made message): dead-lettered.
    #[error("chunk {} of file {} (tenant {}) is not in the chunk queue and was never imported", .0.chunk_no, .0.file_id, .0.tenant_id)]
    NotQueued(ChunkRef),
    /// A dry run's results could not be kept aside on local disk while it runs (a full
    /// disk): retried like a failed query.
    #[error("keeping a dry run's results on local disk failed")]
    Spill(#[source] std::io::Error),
    /// The queued payload is not the chunk its reference names.
    #[error("the queued payload of chunk {} of file {} is not that chunk: {why}", .chunk.chunk_no, .chunk.file_id)]
    BadPayload {
        /// The reference.
        chunk: ChunkRef,
        /// What is wrong with the payload.
        why: String,
    },
}

impl From<diesel::result::Error> for ImportError {
    fn from(e: diesel::result::Error) -> Self {
        ImportError::Db(e.into())
    }
}

/// What importing a chunk did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkOutcome {
    /// False if the chunk had been imported before (redelivery): nothing was changed.
    pub applied: bool,
    /// The chunk's data rows.
    pub rows: i64,
    /// Users created.
    pub inserted: i64,
    /// Users changed.
    pub updated: i64,
    /// Users already as the row says.
    pub unchanged: i64,
    /// Rows whose user a later file of the tenant had already written: arrival order says
    /// the later file wins, so they change nothing (a dead-lettered chunk replayed after a
    /// newer file was imported).
    pub superseded: i64,
    /// Rows reported.
    pub failed: i64,
    /// Users archived by this chunk (active=0 with archive-on-inactive on).
    pub archived: i64,
    /// Archived users reactivated (active=1).
    pub reactivated: i64,
    /// Permits released because their holder was archived.
    pub permits_released: i64,
    /// Whether this chunk finished its file.
    pub finished_file: bool,
    /// The tenant's slug (for metrics; empty when nothing was applied).
    pub tenant: String,
}

#[derive(QueryableByName)]
struct Progress {
    #[diesel(sql_type = Integer)]
    chunks_done: i32,
    #[diesel(sql_type = Nullable<Integer>)]
    total_chunks: Option<i32>,
    #[diesel(sql_type = Text)]
    state: FileState,
}

/// Imports a chunk (see the module docs). Runs its own transaction.
pub fn import_chunk(conn: &mut PgConnection, chunk: &Chunk) -> Result<ChunkOutcome, ImportError> {
    conn.transaction(|conn| {
        diesel::sql_query(crate::sql::PLANNER_SETTINGS).execute(conn)?;
        import_in_tx(conn, chunk)
    })
}

/// Imports a chunk waiting in the database's chunk queue: its row is taken (deleted) in the
/// transaction that imports it, so it is imported once and the queue holds exactly the
/// chunks not imported yet. A reference to a chunk imported before changes nothing.
pub fn import_queued(
    conn: &mut PgConnection,
    chunk_ref: ChunkRef,
) -> Result<ChunkOutcome, ImportError> {
    conn.transaction(|conn| {
        diesel::sql_query(crate::sql::PLANNER_SETTINGS).execute(conn)?;
        let Some(payload) = dispatch::take(conn, chunk_ref)? else {
            let imported: bool = diesel::select(diesel::dsl::exists(
                file_chunks::table.find((chunk_ref.file_id.0, chunk_ref.chunk_no as i32)),
            ))
            .get_result(conn)?;
            return if imported {
                Ok(ChunkOutcome::default())
            } else {
                Err(ImportError::NotQueued(chunk_ref))
            };
        };
        let chunk = match messages::decode_work(&payload) {
            Ok(WorkMessage::ChunkV1(c))
                if c.file_id == chunk_ref.file_id
                    && c.tenant_id == chunk_ref.tenant_id
                    && c.chunk_no == chunk_ref.chunk_no =>
            {
                c
            }
            Ok(_) => {
                return Err(ImportError::BadPayload {
                    chunk: chunk_ref,
                    why: "it names another chunk".into(),
                })
            }
            Err(e) => {
                return Err(ImportError::BadPayload {
                    chunk: chunk_ref,
                    why: e.to_string(),
                })
            }
        };
        if crate::dryrun::is_dry_run(conn, chunk.file_id)? {
            return crate::dryrun::import_dry_run(conn, chunk);
        }
        import_in_tx(conn, &chunk)
    })
}

fn import_in_tx(conn: &mut PgConnection, chunk: &Chunk) -> Result<ChunkOutcome, ImportError> {
    match apply_chunk(conn, chunk)? {
        None => Ok(ChunkOutcome::default()),
        Some((outcome, failures)) => record_chunk(conn, chunk, outcome, failures),
    }
}

/// Steps 1 to 3: the chunk's marker, the checks and the write. `None`: a redelivery. The
/// outcome and the failure records are what [`record_chunk`] then counts and reports.
pub(crate) fn apply_chunk(
    conn: &mut PgConnection,
    chunk: &Chunk,
) -> Result<Option<(ChunkOutcome, Vec<RowFailure>)>, ImportError> {
    let file = chunk.file_id;
    let owner: Option<i64> = import_files::table
        .find(file.0)
        .select(import_files::tenant_id)
        .first(conn)
        .optional()?;
    if owner != Some(chunk.tenant_id.0) {
        return Err(ImportError::WrongTenant {
            file_id: file,
            tenant_id: chunk.tenant_id,
            chunk_no: chunk.chunk_no,
        });
    }
    // 1. The chunk's marker: present already means a redelivery.
    let fresh = diesel::insert_into(file_chunks::table)
        .values((
            file_chunks::file_id.eq(file.0),
            file_chunks::chunk_no.eq(chunk.chunk_no as i32),
            file_chunks::rows.eq(chunk.rows.len() as i32),
            file_chunks::failed.eq(0),
        ))
        .on_conflict_do_nothing()
        .execute(conn)?;
    if fresh == 0 {
        return Ok(None);
    }

    let map = HeaderMap::parse(&chunk.header)?;
    let (on, fields, slug): (bool, Vec<String>, String) = tenants::table
        .find(chunk.tenant_id.0)
        .select((
            tenants::archive_on_inactive,
            tenants::archive_suffix_fields,
            tenants::slug,
        ))
        .first(conn)?;
    let archive = ArchiveSettings { on, fields };
    let rules = TenantRules::new(
        mui_shared::tenants::login_sources_of(conn, chunk.tenant_id)?,
        mui_shared::tenants::user_types_of(conn, chunk.tenant_id)?,
    );

    // 2. Check rows; within the chunk the later row of a unique_id wins.
    let Checked {
        good,
        mut failures,
        fields_of,
    } = check_rows(chunk, &map, &rules);

    let mut outcome = ChunkOutcome {
        applied: true,
        rows: chunk.rows.len() as i64,
        tenant: slug,
        ..ChunkOutcome::default()
    };
    // 3. Stage the good rows, check their emails and user names, and write them into
    // `users`; rows that change nothing are left alone, before those checks, when no older
    // row can follow them (see `upsert::skip_unchanged_statement`).
    if !good.is_empty() {
        let repeated: Option<Vec<i64>> = match &chunk.repeated {
            Some(rows) if !older_open(conn, chunk.tenant_id, file)? => {
                Some(rows.iter().map(|&r| r as i64).collect())
            }
            _ => None,
        };
        upsert(
            conn,
            chunk,
            file,
            &good,
            &map,
            &fields_of,
            &mut failures,
            &mut outcome,
            &archive,
            repeated.as_deref(),
        )?;
    }
    Ok(Some((outcome, failures)))
}

/// The rows of a chunk, checked ([`check_rows`]).
#[derive(Debug)]
pub struct Checked<'c> {
    /// The rows that passed every check, one per `unique_id` (the chunk's last row of each).
    pub good: Vec<UserRow<'c>>,
    /// The rows refused, with every reason, and the earlier rows of a repeated `unique_id`.
    pub failures: Vec<RowFailure>,
    /// The uploaded fields of the good rows by row number, for the reports of later steps.
    pub fields_of: RowFields<'c>,
}

/// A row's uploaded fields by its row number.
pub type RowFields<'c> = HashMap<u64, &'c Fields, rustc_hash::FxBuildHasher>;

/// Step 2: checks every row of `chunk` ([`validate::validate`]); within the chunk a later
/// row with the same `unique_id` wins and the earlier is reported. No database needed.
pub fn check_rows<'c>(chunk: &'c Chunk, map: &HeaderMap, rules: &'c TenantRules) -> Checked<'c> {
    let mut failures: Vec<RowFailure> = Vec::new();
    let mut good: Vec<UserRow> = Vec::with_capacity(chunk.rows.len());
    // Index into `good` by unique_id. A fast hash, not a keyed one: the keys are the
    // tenant's, but a chunk is bounded (ingest's chunk size), so even keys chosen to collide
    // cost at most one chunk's rows squared, in that chunk only.
    let mut by_uid: HashMap<&'c str, usize, rustc_hash::FxBuildHasher> = HashMap::default();
    let mut fields_of: RowFields<'c> = HashMap::default();
    fields_of.reserve(chunk.rows.len());
    by_uid.reserve(chunk.rows.len());
    for raw in &chunk.rows {
        match validate::validate(&chunk.header, map, raw, rules) {
            Ok(user) => {
                fields_of.insert(raw.row, &raw.fields);
                let key = user.unique_id;
                if let Some(&earlier) = by_uid.get(key) {
                    let prev = std::mem::replace(&mut good[earlier], user);
                    failures.push(duplicate_failure(
                        prev.row,
                        fields_of
                            .get(&prev.row)
                            .map(|f| f.to_vec())
                            .unwrap_or_default(),
                        good[earlier].unique_id,
                        good[earlier].row,
                        map,
                        &chunk.header,
                        false,
                    ));
                } else {
                    by_uid.insert(key, good.len());
                    good.push(user);
                }
            }
            Err(errors) => failures.push(RowFailure {
                row: raw.row,
                // A row too large to hand over is reported with the start of its fields.
                fields: match &raw.too_large {
                    Some(big) => big.start.clone(),
                    None => raw.fields.to_vec(),
                },
                errors,
            }),
        }
    }
    Checked {
        good,
        failures,
        fields_of,
    }
}

/// Step 4: count, and hand the failure records (and "file finished") to the outbox. The
/// chunk's marker exists.
pub(crate) fn record_chunk(
    conn: &mut PgConnection,
    chunk: &Chunk,
    mut outcome: ChunkOutcome,
    mut failures: Vec<RowFailure>,
) -> Result<ChunkOutcome, ImportError> {
    let file = chunk.file_id;
    failures.sort_by_key(|f| f.row);
    outcome.failed = failures.len() as i64;

    diesel::update(file_chunks::table.find((file.0, chunk.chunk_no as i32)))
        .set(file_chunks::failed.eq(outcome.failed as i32))
        .execute(conn)?;
    let progress: Progress = diesel::sql_query(COUNT_CHUNK)
        .bind::<BigInt, _>(file.0)
        .bind::<BigInt, _>(outcome.inserted)
        .bind::<BigInt, _>(outcome.updated)
        .bind::<BigInt, _>(outcome.unchanged)
        .bind::<BigInt, _>(outcome.failed)
        .bind::<BigInt, _>(outcome.archived)
        .bind::<BigInt, _>(outcome.reactivated)
        .bind::<BigInt, _>(outcome.permits_released)
        .bind::<BigInt, _>(outcome.superseded)
        .get_result(conn)?;
    if !failures.is_empty() {
        let msg = NotifyMessage::RowFailuresV1(RowFailures {
            file_id: file,
            tenant_id: chunk.tenant_id,
            chunk_no: chunk.chunk_no,
            failures,
        });
        outbox::enqueue(conn, QueueKind::Notify, encode(&msg)?)?;
    }
    if progress.state == FileState::Importing && progress.total_chunks == Some(progress.chunks_done)
    {
        mui_shared::files::last_chunk_done(conn, file, chunk.tenant_id)?;
        outcome.finished_file = true;
    }
    Ok(outcome)
}

/// Whether the tenant has an unfinished file older than `file` ([`crate::sql::OLDER_OPEN`]).
fn older_open(
    conn: &mut PgConnection,
    tenant: TenantId,
    file: ImportFileId,
) -> Result<bool, ImportError> {
    #[derive(QueryableByName)]
    struct Open {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        open: bool,
    }
    let o: Open = diesel::sql_query(crate::sql::OLDER_OPEN)
        .bind::<BigInt, _>(tenant.0)
        .bind::<BigInt, _>(file.0)
        .get_result(conn)?;
    Ok(o.open)
}

fn encode(msg: &NotifyMessage) -> Result<Vec<u8>, diesel::result::Error> {
    messages::encode(msg).map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))
}
