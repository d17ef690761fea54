//! Importing one chunk, in one transaction:
//!
//! 1. insert the chunk's marker `(file_id, chunk_no)`: if it exists the chunk was imported
//!    before (a redelivery) and nothing else happens;
//! 2. check every row ([`crate::validate`]); within the chunk, a later row with the same
//!    `unique_id` wins and the earlier is reported; a row whose email or user name belongs
//!    to another user of the tenant is reported (`check_identities`);
//! 3. `COPY` the good rows into a temporary staging table and upsert them into `users` with
//!    set-based statements. Each user carries the version `(file id, row)` that last wrote
//!    it, and a write only applies when its version is newer, so chunks may be imported by
//!    any number of workers in any order and the later row (of a later file) still wins.
//!    The same statements apply archive-on-inactive (archive, suffix, reactivate), and the
//!    permits of users archived by an `active=0` row are released;
//! 4. add the counts to the file, put the chunk's failure records (and, for the file's last
//!    chunk, "file finished") in the outbox.
//!
//! Empty cells leave stored values unchanged; a new user without `active` is active.

use std::collections::HashMap;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Integer, Jsonb, Nullable, Text};
use mui_shared::amqp::QueueKind;
use mui_shared::domain::{Column, HeaderMap, ImportFileId, TenantId};
use mui_shared::messages::{
    self, Chunk, FileFinished, NotifyMessage, RowError, RowErrorCode, RowFailure, RowFailures,
};
use mui_shared::outbox;
use mui_shared::schema::{file_chunks, import_files, tenants};

use crate::validate::{self, TenantRules, UserRow, TEXT_COLUMNS};

diesel::table! {
    /// Per-connection temporary table the good rows of a chunk are copied into.
    users_stage (row_no) {
        row_no -> Int8,
        unique_id -> Text,
        login_source -> Text,
        first_name -> Nullable<Text>,
        last_name -> Nullable<Text>,
        user_name -> Nullable<Text>,
        email -> Nullable<Text>,
        street -> Nullable<Text>,
        city -> Nullable<Text>,
        province -> Nullable<Text>,
        postal_code -> Nullable<Text>,
        street2 -> Nullable<Text>,
        city2 -> Nullable<Text>,
        state2 -> Nullable<Text>,
        zip2 -> Nullable<Text>,
        phone_cell -> Nullable<Text>,
        user_type_id -> Nullable<Text>,
        employ_no -> Nullable<Text>,
        employee_phone -> Nullable<Text>,
        student_no -> Nullable<Text>,
        student_phone -> Nullable<Text>,
        drivers_license_num -> Nullable<Text>,
        drivers_license_prov -> Nullable<Text>,
        date_of_birth -> Nullable<Date>,
        active -> Nullable<Bool>,
    }
}

#[derive(Insertable)]
#[diesel(table_name = users_stage)]
#[diesel(treat_none_as_default_value = false)]
struct StageRow<'a> {
    row_no: i64,
    unique_id: &'a str,
    login_source: &'a str,
    first_name: Option<&'a str>,
    last_name: Option<&'a str>,
    user_name: Option<&'a str>,
    email: Option<&'a str>,
    street: Option<&'a str>,
    city: Option<&'a str>,
    province: Option<&'a str>,
    postal_code: Option<&'a str>,
    street2: Option<&'a str>,
    city2: Option<&'a str>,
    state2: Option<&'a str>,
    zip2: Option<&'a str>,
    phone_cell: Option<&'a str>,
    user_type_id: Option<&'a str>,
    employ_no: Option<&'a str>,
    employee_phone: Option<&'a str>,
    student_no: Option<&'a str>,
    student_phone: Option<&'a str>,
    drivers_license_num: Option<&'a str>,
    drivers_license_prov: Option<&'a str>,
    date_of_birth: Option<chrono::NaiveDate>,
    active: Option<bool>,
}

impl<'a> StageRow<'a> {
    fn from(u: &'a UserRow) -> Self {
        let t = |i: usize| u.text[i].as_deref();
        StageRow {
            row_no: u.row as i64,
            unique_id: &u.unique_id,
            login_source: &u.login_source,
            first_name: t(0),
            last_name: t(1),
            user_name: t(2),
            email: t(3),
            street: t(4),
            city: t(5),
            province: t(6),
            postal_code: t(7),
            street2: t(8),
            city2: t(9),
            state2: t(10),
            zip2: t(11),
            phone_cell: t(12),
            user_type_id: t(13),
            employ_no: t(14),
            employee_phone: t(15),
            student_no: t(16),
            student_phone: t(17),
            drivers_license_num: t(18),
            drivers_license_prov: t(19),
            date_of_birth: u.date_of_birth,
            active: u.active,
        }
    }
}

/// A tenant's archive-on-inactive settings.
#[derive(Debug, Clone)]
struct ArchiveSettings {
    on: bool,
    fields: Vec<String>,
}

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
}

impl From<diesel::result::Error> for ImportError {
    fn from(e: diesel::result::Error) -> Self {
        ImportError::Db(e.into())
    }
}

/// What importing a chunk did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkOutcome {
    /// False if the chunk had been imported before (redelivery): nothing was changed.
    pub applied: bool,
    /// Users created.
    pub inserted: i64,
    /// Users changed.
    pub updated: i64,
    /// Users already as the row says.
    pub unchanged: i64,
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
}

#[derive(QueryableByName)]
struct Existing {
    #[diesel(sql_type = Text)]
    unique_id: String,
    #[diesel(sql_type = BigInt)]
    last_file_id: i64,
    #[diesel(sql_type = BigInt)]
    last_row: i64,
    #[diesel(sql_type = Bool)]
    was_archived: bool,
    #[diesel(sql_type = Nullable<Jsonb>)]
    old: Option<serde_json::Value>,
}

#[derive(QueryableByName)]
struct Updated {
    #[diesel(sql_type = BigInt)]
    row_no: i64,
    #[diesel(sql_type = Bool)]
    changed: bool,
    #[diesel(sql_type = Bool)]
    archived: bool,
    #[diesel(sql_type = Nullable<Bool>)]
    newly_archived: Option<bool>,
}

#[derive(QueryableByName)]
struct Inserted {
    #[diesel(sql_type = BigInt)]
    last_row: i64,
    #[diesel(sql_type = Bool)]
    archived: bool,
}

#[derive(QueryableByName)]
struct Progress {
    #[diesel(sql_type = Integer)]
    chunks_done: i32,
    #[diesel(sql_type = Nullable<Integer>)]
    total_chunks: Option<i32>,
    #[diesel(sql_type = Text)]
    state: String,
}

struct Sql {
    create_stage: String,
    select_existing: String,
    update: String,
    insert: String,
}

fn sql() -> &'static Sql {
    static SQL: std::sync::OnceLock<Sql> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        let text: Vec<&str> = TEXT_COLUMNS.iter().map(|c| c.name()).collect();
        let create_stage = format!(
            "CREATE TEMP TABLE IF NOT EXISTS users_stage (row_no BIGINT PRIMARY KEY, \
             unique_id TEXT NOT NULL, login_source TEXT NOT NULL, {}, date_of_birth DATE, \
             active BOOLEAN) ON COMMIT DELETE ROWS",
            text.iter().map(|c| format!("{c} TEXT")).collect::<Vec<_>>().join(", ")
        );
        // Users are found by probing the primary key with the staged ids (`= ANY(ARRAY(…))`),
        // never by joining on the tenant: during a bulk load the table's statistics lag far
        // behind, and a join plan chosen on them scans the tenant's every user per chunk.
        let staged_ids = "ANY(ARRAY(SELECT unique_id FROM users_stage))";
        let select_existing = format!(
            "SELECT u.unique_id, u.last_file_id, u.last_row, (u.archived_at IS NOT NULL) AS was_archived, \
             CASE WHEN u.last_file_id = $2 THEN to_jsonb(u) END AS old \
             FROM users u WHERE u.tenant_id = $1 AND u.unique_id = {staged_ids} \
             ORDER BY u.unique_id FOR UPDATE"
        );
        // Archive-on-inactive ($3: the tenant's setting, $4: the fields that get the suffix).
        // A user ends archived when the row says active=0 and the setting is on (or it was
        // archived already), or when the row leaves `active` empty and it was archived.
        // Suffixed fields hold their value plus the archive suffix exactly once: the stored
        // value is un-suffixed first, so a repeat adds nothing and reactivation (active=1)
        // takes the suffix off.
        let archived = "((s.active IS FALSE AND ($3 OR u.archived_at IS NOT NULL)) \
                        OR (s.active IS NULL AND u.archived_at IS NOT NULL))";
        let new_suffix = "('_' || to_char(now(), 'YYYY'))";
        let final_suffix = format!("(CASE WHEN {archived} THEN COALESCE(u.archive_suffix, {new_suffix}) END)");
        let mut sets = vec!["login_source = s.login_source".to_owned()];
        let mut differs = vec!["u.login_source IS DISTINCT FROM s.login_source".to_owned()];
        for col in TEXT_COLUMNS {
            let (c, max) = (col.name(), col.max_len());
            let value = format!(
                "(CASE WHEN '{c}' = ANY($4) \
                   THEN mui_suffix(mui_unsuffix(COALESCE(s.{c}, u.{c}), u.archive_suffix), {final_suffix}, {max}) \
                   ELSE COALESCE(s.{c}, u.{c}) END)"
            );
            differs.push(format!("u.{c} IS DISTINCT FROM {value}"));
            sets.push(format!("{c} = {value}"));
        }
        for c in ["date_of_birth", "active"] {
            sets.push(format!("{c} = COALESCE(s.{c}, u.{c})"));
            differs.push(format!("u.{c} IS DISTINCT FROM COALESCE(s.{c}, u.{c})"));
        }
        sets.push(format!("archived_at = CASE WHEN {archived} THEN COALESCE(u.archived_at, now()) END"));
        sets.push(format!("archive_suffix = {final_suffix}"));
        differs.push(format!("(u.archived_at IS NOT NULL) IS DISTINCT FROM {archived}"));
        let update = format!(
            "UPDATE users u SET {}, last_file_id = $2, last_row = s.row_no, \
             updated_at = CASE WHEN {} THEN now() ELSE u.updated_at END \
             FROM users_stage s \
             WHERE u.tenant_id = $1 AND u.unique_id = ANY($5) AND u.unique_id = s.unique_id \
               AND (u.last_file_id, u.last_row) < ($2, s.row_no) \
             RETURNING s.row_no, (u.updated_at = now()) AS changed, \
               (u.archived_at IS NOT NULL) AS archived, (u.archived_at = now()) AS newly_archived",
            sets.join(", "),
            differs.join(" OR ")
        );
        let archive_new = "(s.active IS FALSE AND $3)";
        let insert_values: Vec<String> = TEXT_COLUMNS
            .iter()
            .map(|col| {
                let (c, max) = (col.name(), col.max_len());
                format!("CASE WHEN '{c}' = ANY($4) AND {archive_new} THEN mui_suffix(s.{c}, {new_suffix}, {max}) ELSE s.{c} END")
            })
            .collect();
        let insert = format!(
            "INSERT INTO users (tenant_id, unique_id, login_source, {cols}, date_of_birth, active, \
               archived_at, archive_suffix, last_file_id, last_row) \
             SELECT $1, s.unique_id, s.login_source, {vals}, s.date_of_birth, COALESCE(s.active, TRUE), \
               CASE WHEN {archive_new} THEN now() END, CASE WHEN {archive_new} THEN {new_suffix} END, \
               $2, s.row_no \
             FROM users_stage s \
             ORDER BY s.unique_id \
             ON CONFLICT (tenant_id, unique_id) DO NOTHING \
             RETURNING last_row, (archived_at IS NOT NULL) AS archived",
            cols = text.join(", "),
            vals = insert_values.join(", ")
        );
        Sql {
            create_stage,
            select_existing,
            update,
            insert,
        }
    })
}

/// Imports a chunk (see the module docs). Runs its own transaction.
pub fn import_chunk(conn: &mut PgConnection, chunk: &Chunk) -> Result<ChunkOutcome, ImportError> {
    conn.transaction(|conn| import_in_tx(conn, chunk))
}

fn import_in_tx(conn: &mut PgConnection, chunk: &Chunk) -> Result<ChunkOutcome, ImportError> {
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
        return Ok(ChunkOutcome::default());
    }

    let map = HeaderMap::parse(&chunk.header)?;
    let (on, fields): (bool, Vec<String>) = tenants::table
        .find(chunk.tenant_id.0)
        .select((tenants::archive_on_inactive, tenants::archive_suffix_fields))
        .first(conn)?;
    let archive = ArchiveSettings { on, fields };
    let rules = TenantRules::new(
        mui_shared::tenants::login_sources_of(conn, chunk.tenant_id)?,
        mui_shared::tenants::user_types_of(conn, chunk.tenant_id)?,
    );

    // Check rows; within the chunk the later row of a unique_id wins.
    let mut failures: Vec<RowFailure> = Vec::new();
    let mut good: Vec<UserRow> = Vec::with_capacity(chunk.rows.len());
    let mut by_uid: HashMap<String, usize> = HashMap::new();
    let mut fields_of: HashMap<u64, &[String]> = HashMap::new();
    for raw in &chunk.rows {
        match validate::validate(&chunk.header, &map, raw, &rules) {
            Ok(user) => {
                fields_of.insert(raw.row, &raw.fields);
                if let Some(&earlier) = by_uid.get(&user.unique_id) {
                    let prev = std::mem::replace(&mut good[earlier], user);
                    failures.push(duplicate_failure(
                        prev.row,
                        fields_of
                            .get(&prev.row)
                            .map(|f| f.to_vec())
                            .unwrap_or_default(),
                        &good[earlier].unique_id,
                        good[earlier].row,
                        &map,
                        &chunk.header,
                        false,
                    ));
                } else {
                    by_uid.insert(user.unique_id.clone(), good.len());
                    good.push(user);
                }
            }
            Err(errors) => failures.push(RowFailure {
                row: raw.row,
                // A row too large to hand over is reported with the start of its fields.
                fields: match &raw.too_large {
                    Some(big) => big.start.clone(),
                    None => raw.fields.clone(),
                },
                errors,
            }),
        }
    }

    let good = check_identities(conn, chunk, &map, good, &mut failures)?;
    let mut outcome = ChunkOutcome {
        applied: true,
        ..ChunkOutcome::default()
    };
    if !good.is_empty() {
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
        )?;
    }
    failures.sort_by_key(|f| f.row);
    outcome.failed = failures.len() as i64;

    diesel::update(file_chunks::table.find((file.0, chunk.chunk_no as i32)))
        .set(file_chunks::failed.eq(outcome.failed as i32))
        .execute(conn)?;
    let progress: Progress = diesel::sql_query(
        "UPDATE import_files SET chunks_done = chunks_done + 1, \
         rows_inserted = rows_inserted + $2, rows_updated = rows_updated + $3, \
         rows_unchanged = rows_unchanged + $4, rows_failed = rows_failed + $5, \
         users_archived = users_archived + $6, users_reactivated = users_reactivated + $7, \
         permits_released = permits_released + $8 \
         WHERE id = $1 RETURNING chunks_done, total_chunks, state",
    )
    .bind::<BigInt, _>(file.0)
    .bind::<BigInt, _>(outcome.inserted)
    .bind::<BigInt, _>(outcome.updated)
    .bind::<BigInt, _>(outcome.unchanged)
    .bind::<BigInt, _>(outcome.failed)
    .bind::<BigInt, _>(outcome.archived)
    .bind::<BigInt, _>(outcome.reactivated)
    .bind::<BigInt, _>(outcome.permits_released)
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
    if progress.state == "importing" && progress.total_chunks == Some(progress.chunks_done) {
        diesel::update(import_files::table.find(file.0))
            .set((
                import_files::state.eq("done"),
                import_files::finished_at.eq(diesel::dsl::now),
            ))
            .execute(conn)?;
        let msg = NotifyMessage::FileFinishedV1(FileFinished {
            file_id: file,
            tenant_id: chunk.tenant_id,
        });
        outbox::enqueue(conn, QueueKind::Notify, encode(&msg)?)?;
        outcome.finished_file = true;
    }
    Ok(outcome)
}

fn encode(msg: &NotifyMessage) -> Result<Vec<u8>, diesel::result::Error> {
    messages::encode(msg).map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))
}

#[allow(clippy::too_many_arguments)]
fn upsert(
    conn: &mut PgConnection,
    chunk: &Chunk,
    file: ImportFileId,
    good: &[UserRow],
    map: &HeaderMap,
    fields_of: &HashMap<u64, &[String]>,
    failures: &mut Vec<RowFailure>,
    outcome: &mut ChunkOutcome,
    archive: &ArchiveSettings,
) -> Result<(), ImportError> {
    let sql = sql();
    diesel::sql_query(&sql.create_stage).execute(conn)?;
    let stage: Vec<StageRow<'_>> = good.iter().map(StageRow::from).collect();
    diesel::copy_from(users_stage::table)
        .from_insertable(&stage)
        .execute(conn)?;
    let by_uid: HashMap<&str, &UserRow> = good.iter().map(|u| (u.unique_id.as_str(), u)).collect();
    let tenant = chunk.tenant_id.0;
    let mut pending = good.len();
    let mut release: Vec<String> = Vec::new();
    // Each round: lock and update the users that exist, drop them from the staging table,
    // insert the rest. A concurrent transaction may insert one of our new users first; such
    // rows stay staged and go round again, now as existing users.
    for _round in 0..5 {
        let existing: Vec<Existing> = diesel::sql_query(&sql.select_existing)
            .bind::<BigInt, _>(tenant)
            .bind::<BigInt, _>(file.0)
            .load(conn)?;
        // Only the users just locked are updated: each statement sees newly committed rows,
        // so a user another chunk inserted after the SELECT must wait for the next round
        // (updating it here would make this round read its own write as someone else's).
        let locked: Vec<&str> = existing.iter().map(|e| e.unique_id.as_str()).collect();
        let updated: HashMap<i64, Updated> = diesel::sql_query(&sql.update)
            .bind::<BigInt, _>(tenant)
            .bind::<BigInt, _>(file.0)
            .bind::<Bool, _>(archive.on)
            .bind::<diesel::sql_types::Array<Text>, _>(&archive.fields)
            .bind::<diesel::sql_types::Array<Text>, _>(&locked)
            .load::<Updated>(conn)?
            .into_iter()
            .map(|u| (u.row_no, u))
            .collect();
        let mut resolved: Vec<i64> = Vec::with_capacity(existing.len());
        for ex in existing {
            let Some(user) = by_uid.get(ex.unique_id.as_str()) else {
                continue;
            };
            let row = user.row as i64;
            resolved.push(row);
            match updated.get(&row) {
                Some(up) => {
                    if up.newly_archived == Some(true) {
                        outcome.archived += 1;
                    } else if ex.was_archived && !up.archived {
                        outcome.reactivated += 1;
                    }
                    if up.archived && user.active == Some(false) {
                        release.push(user.unique_id.clone());
                    }
                    if ex.last_file_id == file.0 {
                        // An earlier row of this file (another chunk) wrote this user; it
                        // loses to this row. This row takes its place in the counts.
                        failures.push(duplicate_failure(
                            ex.last_row as u64,
                            stored_fields(ex.old.as_ref(), map, &chunk.header),
                            &user.unique_id,
                            user.row,
                            map,
                            &chunk.header,
                            true,
                        ));
                    } else if up.changed {
                        outcome.updated += 1;
                    } else {
                        outcome.unchanged += 1;
                    }
                }
                None if ex.last_file_id == file.0 => {
                    // A later row of this file already wrote this user: this row loses.
                    failures.push(duplicate_failure(
                        user.row,
                        fields_of
                            .get(&user.row)
                            .map(|f| f.to_vec())
                            .unwrap_or_default(),
                        &user.unique_id,
                        ex.last_row as u64,
                        map,
                        &chunk.header,
                        false,
                    ));
                }
                // A later file already wrote this user; arrival order says it wins.
                None => outcome.unchanged += 1,
            }
        }
        remove_staged(conn, &resolved)?;
        let inserted: Vec<i64> = diesel::sql_query(&sql.insert)
            .bind::<BigInt, _>(tenant)
            .bind::<BigInt, _>(file.0)
            .bind::<Bool, _>(archive.on)
            .bind::<diesel::sql_types::Array<Text>, _>(&archive.fields)
            .load::<Inserted>(conn)?
            .into_iter()
            .map(|i| {
                if i.archived {
                    outcome.archived += 1;
                }
                i.last_row
            })
            .collect();
        outcome.inserted += inserted.len() as i64;
        remove_staged(conn, &inserted)?;
        pending = pending.saturating_sub(resolved.len() + inserted.len());
        if pending == 0 {
            if !release.is_empty() {
                // Every active permit of a user archived by an active=0 row, released with
                // the date; already released permits keep theirs.
                outcome.permits_released += diesel::sql_query(
                    "UPDATE permits SET state = 'released', released_at = now() \
                     WHERE tenant_id = $1 AND unique_id = ANY($2) AND state = 'active'",
                )
                .bind::<BigInt, _>(tenant)
                .bind::<diesel::sql_types::Array<Text>, _>(&release)
                .execute(conn)? as i64;
            }
            return Ok(());
        }
    }
    Err(ImportError::Db(mui_shared::db::DbError::Query(
        diesel::result::Error::RollbackTransaction,
    )))
}

/// The identifying fields that must be unique within a tenant, case-insensitively.
const IDENTITIES: [(Column, usize, RowErrorCode, &str); 2] = [
    (Column::Email, 3, RowErrorCode::EmailTaken, "email"),
    (
        Column::UserName,
        2,
        RowErrorCode::UserNameTaken,
        "user name",
    ),
];

/// Refuses rows whose email or user name (compared case-insensitively) belongs to another
/// user of the tenant, or to an earlier row of this chunk with another unique_id. Returns the
/// rows that may be imported. Two chunks importing the same new email for different users
/// at the same moment are not caught (the check is not a unique constraint, which would make
/// a swap of two users' emails in one file fail).
fn check_identities(
    conn: &mut PgConnection,
    chunk: &Chunk,
    map: &HeaderMap,
    good: Vec<UserRow>,
    failures: &mut Vec<RowFailure>,
) -> Result<Vec<UserRow>, ImportError> {
    let mut problems: HashMap<u64, Vec<RowError>> = HashMap::new();
    for (column, idx, code, what) in IDENTITIES {
        // Each distinct value once: one index probe each.
        let mut wanted: Vec<String> = good
            .iter()
            .filter_map(|u| u.text[idx].as_ref().map(|v| v.to_lowercase()))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.is_empty() {
            continue;
        }
        #[derive(QueryableByName)]
        struct Owner {
            #[diesel(sql_type = Text)]
            value: String,
            #[diesel(sql_type = Text)]
            unique_id: String,
        }
        let c = column.name();
        // One index probe per value (the `users_*_ci` indexes): a LATERAL subquery that
        // cannot be flattened (OFFSET 0) runs once per value, whatever the statistics say;
        // plans chosen on statistics went quadratic or scanned the table during bulk loads.
        let owners: Vec<Owner> = diesel::sql_query(format!(
            "SELECT v.value, u.unique_id \
             FROM unnest($2::text[]) AS v(value) \
             CROSS JOIN LATERAL ( \
               SELECT unique_id, tenant_id FROM users \
               WHERE {c} IS NOT NULL AND lower({c}) = v.value OFFSET 0) u \
             WHERE u.tenant_id = $1"
        ))
        .bind::<BigInt, _>(chunk.tenant_id.0)
        .bind::<diesel::sql_types::Array<Text>, _>(&wanted)
        .load(conn)?;
        let mut owner_of: HashMap<String, Vec<String>> = HashMap::new();
        for o in owners {
            owner_of.entry(o.value).or_default().push(o.unique_id);
        }
        let label = map
            .position(column)
            .and_then(|i| chunk.header.get(i))
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|| c.to_owned());
        let mut first_in_chunk: HashMap<String, (u64, &str)> = HashMap::new();
        for u in &good {
            let Some(value) = u.text[idx].as_deref() else {
                continue;
            };
            let key = value.to_lowercase();
            let quoted = messages::truncate_for_message(value, 60);
            let taken_by = owner_of
                .get(&key)
                .and_then(|owners| owners.iter().find(|o| **o != u.unique_id));
            let message = if let Some(other) = taken_by {
                Some(format!(
                    "`{label}` \"{quoted}\" already belongs to another user of this tenant (unique_id \"{}\"); each user needs their own {what}",
                    messages::truncate_for_message(other, 60)
                ))
            } else {
                match first_in_chunk.get(&key) {
                    Some((row, uid)) if *uid != u.unique_id => Some(format!(
                        "`{label}` \"{quoted}\" is also given to unique_id \"{}\" in row {row}; each user needs their own {what}",
                        messages::truncate_for_message(uid, 60)
                    )),
                    _ => None,
                }
            };
            match message {
                Some(message) => problems.entry(u.row).or_default().push(RowError {
                    code,
                    column: Some(label.clone()),
                    message,
                }),
                None => {
                    first_in_chunk.entry(key).or_insert((u.row, &u.unique_id));
                }
            }
        }
    }
    if problems.is_empty() {
        return Ok(good);
    }
    let raw_of: HashMap<u64, &Vec<String>> =
        chunk.rows.iter().map(|r| (r.row, &r.fields)).collect();
    Ok(good
        .into_iter()
        .filter_map(|u| match problems.remove(&u.row) {
            None => Some(u),
            Some(errors) => {
                failures.push(RowFailure {
                    row: u.row,
                    fields: raw_of.get(&u.row).map(|f| f.to_vec()).unwrap_or_default(),
                    errors,
                });
                None
            }
        })
        .collect())
}

fn remove_staged(conn: &mut PgConnection, rows: &[i64]) -> Result<(), diesel::result::Error> {
    if !rows.is_empty() {
        diesel::sql_query("DELETE FROM users_stage WHERE row_no = ANY($1)")
            .bind::<diesel::sql_types::Array<BigInt>, _>(rows)
            .execute(conn)?;
    }
    Ok(())
}

fn duplicate_failure(
    row: u64,
    fields: Vec<String>,
    unique_id: &str,
    winner: u64,
    map: &HeaderMap,
    header: &[String],
    stored: bool,
) -> RowFailure {
    let label = map
        .position(Column::UniqueId)
        .and_then(|i| header.get(i))
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|| "unique_id".to_owned());
    let mut message = format!(
        "`{label}` \"{}\" appears again in row {winner}; the later row wins and this one was not kept",
        messages::truncate_for_message(unique_id, 60)
    );
    if stored {
        message.push_str(" (values shown as they were stored from this row)");
    }
    RowFailure {
        row,
        fields,
        errors: vec![RowError {
            code: RowErrorCode::DuplicateUniqueId,
            column: Some(label),
            message,
        }],
    }
}

/// The stored values of a user, laid out like the uploaded header.
fn stored_fields(
    old: Option<&serde_json::Value>,
    map: &HeaderMap,
    header: &[String],
) -> Vec<String> {
    (0..header.len())
        .map(|i| {
            let Some(Some(col)) = map.positions.get(i) else {
                return String::new();
            };
            match old.and_then(|o| o.get(col.name())) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Bool(b)) => if *b { "1" } else { "0" }.to_owned(),
                Some(serde_json::Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            }
        })
        .collect()
}
