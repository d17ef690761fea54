//! Writing a chunk's checked rows into `users`. When rows that change nothing may be left
//! alone, those are found first: by the digest stored with each user (`crate::unchanged`:
//! only keys and digests sent, nothing staged; `crate::digest`), then, for the users found whose
//! digest differs, by comparing the staged values ([`Statements::skip_unchanged`]). The rest
//! are written with set-based statements, in rounds: lock the users
//! that exist ([`LOCK_EXISTING`]), update them ([`Statements::update`]), take them out of the
//! staging table and insert the rest ([`Statements::insert`]). A concurrent transaction may
//! insert one of our new users first; such rows stay staged and go round again, now as
//! existing users.
//!
//! The write runs inside a savepoint and ends with the identity checks that need the stored
//! values (`identity.rs`: conflicts after the write, then the deferred constraints checked
//! at once); a row that loses there is reported, the savepoint rolled back and the chunk's
//! remaining rows written again.
//!
//! Each user carries the version `(file id, row)` that last wrote it, and a write only
//! applies when its version is newer, so chunks may be imported by any number of workers in
//! any order and the later row (of a later file) still wins. The same statements apply
//! archive-on-inactive (archive, suffix, reactivate); the permits of users archived by an
//! `active=0` row are released ([`RELEASE_PERMITS`]).
//!
//! The fixed statements are the files in `sql/`. The update and the insert have one
//! expression per text column, so they are generated from [`TEXT_COLUMNS`] (the staging
//! table's own list): the values are bound parameters, only column names and their lengths
//! (constants of the schema) are written into the text, and a test pins the result against
//! `sql/generated/*.sql`.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Jsonb, Nullable, Text};
use mui_shared::domain::{HeaderMap, ImportFileId};
use mui_shared::messages::{Chunk, RowFailure};

use crate::duplicate::{duplicate_failure, stored_fields};
use crate::identity::{self, CHECK_NOW, DEFER_CHECKS};
use crate::import::{ChunkOutcome, ImportError, RowFields};
use crate::sql::{LOCK_EXISTING, RELEASE_PERMITS};
use crate::staging::{self, TEXT_COLUMNS};
use crate::unchanged::{self, Found};
use crate::validate::UserRow;

/// A tenant's archive-on-inactive settings.
#[derive(Debug, Clone)]
pub(crate) struct ArchiveSettings {
    /// Whether an `active=0` row archives its user.
    pub(crate) on: bool,
    /// The columns that get the archive suffix.
    pub(crate) fields: Vec<String>,
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

/// What one attempt at writing did besides updating: the rows left alone (they change
/// nothing) and the rows inserted (new users).
#[derive(Debug, Default)]
struct Written {
    skipped: HashSet<i64>,
    inserted: HashSet<i64>,
    /// Rows refused because another user holds their email or user name (checked after the
    /// unchanged rows were left out).
    refused: HashSet<i64>,
}

#[derive(QueryableByName)]
struct Inserted {
    #[diesel(sql_type = BigInt)]
    last_row: i64,
    #[diesel(sql_type = Bool)]
    archived: bool,
}

/// Archive-on-inactive, for an existing user `u` and its staged row `s` ($3: the tenant's
/// setting). A user ends archived when the row says active=0 and the setting is on (or it was
/// archived already), or when the row leaves `active` empty and it was archived.
const ARCHIVED: &str = "((s.active IS FALSE AND ($3 OR u.archived_at IS NOT NULL)) \
                        OR (s.active IS NULL AND u.archived_at IS NOT NULL))";
/// The suffix a user archived now gets.
const NEW_SUFFIX: &str = "('_' || to_char(now(), 'YYYY'))";
/// Whether a new user is inserted archived.
const ARCHIVE_NEW: &str = "(s.active IS FALSE AND $3)";

/// The generated statements. Parameters: $1 tenant, $2 file, $3 the tenant's
/// archive-on-inactive setting, $4 the fields that get the suffix, and for the update $5 the
/// unique ids just locked.
#[derive(Debug)]
pub(crate) struct Statements {
    pub(crate) update: String,
    pub(crate) insert: String,
    pub(crate) skip_unchanged: String,
}

/// The generated statements, built once per process.
pub(crate) fn statements() -> &'static Statements {
    static SQL: OnceLock<Statements> = OnceLock::new();
    SQL.get_or_init(|| Statements {
        update: update_statement(),
        insert: insert_statement(),
        skip_unchanged: skip_unchanged_statement(),
    })
}

/// Updates the locked users whose version is older than their staged row's. Suffixed fields
/// hold their value plus the archive suffix exactly once: the stored value is un-suffixed
/// first, so a repeat adds nothing and reactivation (active=1) takes the suffix off.
///
/// The users are found by one probe of the primary key per locked id (LATERAL over $5,
/// OFFSET 0) and updated by their row address (a TID scan); the tenant is in the probe. With
/// `u.tenant_id = $1 AND u.unique_id = ANY($5)` joined to the staging table, the planner read
/// the tenant's every user per chunk whenever it thought the tenant small (a table never
/// analyzed, a new tenant after the last ANALYZE); and for a chunk of new users only (`$5`
/// empty, so `unique_id = ANY('{}')` is false and implies any index predicate) it read them
/// through `users_user_name_unique`, the smallest index led by the tenant: that was the one
/// range scan of that index per chunk that made a first import quadratic. The address is
/// stable: these users were locked by this transaction's [`LOCK_EXISTING`].
fn update_statement() -> String {
    let (sets, differs) = assignments();
    // One item a line, so the pinned text reads (and diffs) column by column.
    format!(
        "UPDATE users u SET {},\n  last_file_id = $2, last_row = s.row_no, row_digest = s.row_digest,\n  \
         updated_at = CASE WHEN {}\n  THEN now() ELSE u.updated_at END\n\
         FROM users_stage s\n\
         WHERE u.ctid = ANY (ARRAY(\n    \
             SELECT p.ctid FROM unnest($5::text[]) AS k(uid)\n    \
             CROSS JOIN LATERAL (\n      \
               SELECT ctid FROM users WHERE tenant_id = $1 AND unique_id = k.uid OFFSET 0) p))\n  \
           AND u.unique_id = s.unique_id\n  \
           AND (u.last_file_id, u.last_row) < ($2, s.row_no)\n\
         RETURNING s.row_no, (u.updated_at = now()) AS changed,\n  \
           (u.archived_at IS NOT NULL) AS archived, (u.archived_at = now()) AS newly_archived\n",
        sets.join(",\n  "),
        differs.join("\n  OR ")
    )
}

/// What the update writes, for an existing user `u` and its staged row `s`: the `SET` items
/// for the values, and the conditions under which each differs from what is stored (any of
/// them true: the row changes the user).
fn assignments() -> (Vec<String>, Vec<String>) {
    let final_suffix =
        format!("(CASE WHEN {ARCHIVED} THEN COALESCE(u.archive_suffix, {NEW_SUFFIX}) END)");
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
    sets.push(format!(
        "archived_at = CASE WHEN {ARCHIVED} THEN COALESCE(u.archived_at, now()) END"
    ));
    sets.push(format!("archive_suffix = {final_suffix}"));
    differs.push(format!(
        "(u.archived_at IS NOT NULL) IS DISTINCT FROM {ARCHIVED}"
    ));
    (sets, differs)
}

/// Finds the staged rows that would change nothing by comparing their values with the
/// stored ones, before anything is locked or written (rewriting unchanged users, and their
/// version, cost ten times the database's own upsert that skips unchanged rows). [`write`]
/// runs it after the digest check (`crate::unchanged`), for the rows whose user exists but
/// whose digest differs (a user written before digests were kept, changed by something else
/// since, or archived), and takes the rows found the same out of the staging table when
/// other rows are left to write. The digest check leaves a row alone under the same
/// conditions as this statement.
///
/// Leaving a user alone leaves its version `(file, row)` as it was, so a row is taken out
/// only where no other row can need that version to lose to it. The caller runs this only
/// when no older file of the tenant is unfinished (`sql/older_open.sql`: no older row can
/// come later); and here a row is kept when:
/// - another row of the same file has its unique_id ($5, found by ingest over the whole
///   file): whichever of the two comes second must see the first's version to report it as
///   the duplicate;
/// - the user was last written by this file or a newer one (`last_file_id < $2` fails): the
///   usual path decides who wins and counts it;
/// - the row says `active=0`: it releases the user's permits, whatever else it changes.
///
/// Each staged row is one probe of the primary key (LATERAL, OFFSET 0), as in
/// `sql/lock_existing.sql`. Returns every staged row whose user exists, and whether it
/// changes nothing (`same`: counted as unchanged and left alone). A staged row not returned
/// had no user when the probe ran: [`write`] then inserts it without probing the key again
/// to lock it (a user inserted meanwhile by another transaction makes the insert do nothing,
/// and the row goes round again as an existing user).
fn skip_unchanged_statement() -> String {
    let (_, differs) = assignments();
    format!(
        "SELECT s.row_no,\n    \
             (s.active IS NOT FALSE AND s.row_no <> ALL ($5::bigint[])\n    \
             AND u.last_file_id < $2\n    \
             AND NOT ({})) AS same\n  \
           FROM users_stage s\n  \
           CROSS JOIN LATERAL (\n    \
             SELECT * FROM users WHERE tenant_id = $1 AND unique_id = s.unique_id OFFSET 0) u\n",
        differs.join("\n      OR ")
    )
}

/// Inserts the staged rows whose user does not exist; one inserted meanwhile by another
/// transaction is left staged (`DO NOTHING`) for the next round.
fn insert_statement() -> String {
    let text: Vec<&str> = TEXT_COLUMNS.iter().map(|c| c.name()).collect();
    let values: Vec<String> = TEXT_COLUMNS
        .iter()
        .map(|col| {
            let (c, max) = (col.name(), col.max_len());
            format!(
                "CASE WHEN '{c}' = ANY($4) AND {ARCHIVE_NEW} \
                 THEN mui_suffix(s.{c}, {NEW_SUFFIX}, {max}) ELSE s.{c} END"
            )
        })
        .collect();
    format!(
        "INSERT INTO users (tenant_id, unique_id, login_source, {cols}, date_of_birth, active,\n  \
           archived_at, archive_suffix, last_file_id, last_row, row_digest)\n\
         SELECT $1, s.unique_id, s.login_source,\n  {vals},\n  \
           s.date_of_birth, COALESCE(s.active, TRUE),\n  \
           CASE WHEN {ARCHIVE_NEW} THEN now() END, CASE WHEN {ARCHIVE_NEW} THEN {NEW_SUFFIX} END,\n  \
           $2, s.row_no, s.row_digest\n\
         FROM users_stage s\n\
         ORDER BY s.unique_id\n\
         ON CONFLICT (tenant_id, unique_id) DO NOTHING\n\
         RETURNING last_row, (archived_at IS NOT NULL) AS archived\n",
        cols = text.join(", "),
        vals = values.join(",\n  ")
    )
}

/// Times the chunk is written before giving up (each time with fewer rows, or after a
/// concurrent writer of the same value finished); the worker then retries the chunk.
const WRITE_ATTEMPTS: usize = 10;

/// Why one attempt at writing the chunk was undone.
enum Undone {
    /// These rows lost an identity to another user: reported, the others written again.
    Losers(Vec<RowFailure>),
    /// A query failed.
    Failed(ImportError),
}

impl From<diesel::result::Error> for Undone {
    fn from(e: diesel::result::Error) -> Self {
        Undone::Failed(e.into())
    }
}

impl From<ImportError> for Undone {
    fn from(e: ImportError) -> Self {
        Undone::Failed(e)
    }
}

/// Whether an attempt undone by `e` is worth making again at once: a concurrent transaction
/// committed the same email or user name (the next attempt sees it and reports the row), or
/// a deadlock (the savepoint's locks are gone; the other transaction goes on).
fn retry_attempt(e: &ImportError) -> bool {
    match e {
        ImportError::Db(mui_shared::db::DbError::Query(q)) => {
            mui_shared::db::is_identity_conflict(q)
                || matches!(q, diesel::result::Error::DatabaseError(_, info)
                    if info.message().contains("deadlock"))
        }
        _ => false,
    }
}

/// Writes `good` (checked rows, one per unique_id) into `users`; see the module docs.
/// `skip`: when rows that change nothing may be left alone (no older file of the tenant is
/// unfinished), the rows that must be written anyway (their unique_id is another row's in
/// the file); see [`skip_unchanged_statement`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn upsert(
    conn: &mut PgConnection,
    chunk: &Chunk,
    file: ImportFileId,
    good: &[UserRow],
    map: &HeaderMap,
    fields_of: &RowFields<'_>,
    failures: &mut Vec<RowFailure>,
    outcome: &mut ChunkOutcome,
    archive: &ArchiveSettings,
    skip: Option<&[i64]>,
) -> Result<(), ImportError> {
    let mut rows: Vec<&UserRow> = good.iter().collect();
    let mut last_error = None;
    for attempt in 0..WRITE_ATTEMPTS {
        if rows.is_empty() {
            return Ok(());
        }
        let mut lost: Vec<RowFailure> = Vec::new();
        let mut counts = ChunkOutcome::default();
        // A savepoint: an attempt that is undone leaves nothing behind.
        let attempt = conn.transaction::<_, Undone, _>(|conn| {
            diesel::sql_query(DEFER_CHECKS).execute(conn)?;
            let done = write(
                conn,
                chunk,
                file,
                &rows,
                map,
                fields_of,
                &mut lost,
                &mut counts,
                archive,
                skip,
            )?;
            // A user left alone keeps what it held; the rows written are checked. In the first
            // attempt a user this chunk inserted is not: it holds exactly the value its row
            // gives, which `check_identities` checked against the committed users and the
            // chunk's other rows. A conflict it has all the same (a concurrent writer of the
            // value, or a swap whose other half did not apply) breaks the constraint at
            // CHECK_NOW, and the next attempt checks every user written.
            let written: Vec<&UserRow> = rows
                .iter()
                .filter(|u| {
                    let row = u.row as i64;
                    !done.skipped.contains(&row)
                        && !done.refused.contains(&row)
                        && (attempt > 0 || !done.inserted.contains(&row))
                })
                .copied()
                .collect();
            let losers =
                identity::conflicts_after_write(conn, chunk, map, file, &written, fields_of)?;
            if !losers.is_empty() {
                return Err(Undone::Losers(losers));
            }
            diesel::sql_query(CHECK_NOW).execute(conn)?;
            Ok(())
        });
        match attempt {
            Ok(()) => {
                failures.extend(lost);
                outcome.inserted += counts.inserted;
                outcome.updated += counts.updated;
                outcome.unchanged += counts.unchanged;
                outcome.superseded += counts.superseded;
                outcome.archived += counts.archived;
                outcome.reactivated += counts.reactivated;
                outcome.permits_released += counts.permits_released;
                return Ok(());
            }
            Err(Undone::Losers(losers)) => {
                rows.retain(|u| !losers.iter().any(|l| l.row == u.row));
                failures.extend(losers);
            }
            Err(Undone::Failed(e)) if retry_attempt(&e) => last_error = Some(e),
            Err(Undone::Failed(e)) => return Err(e),
        }
    }
    Err(
        last_error.unwrap_or(ImportError::Db(mui_shared::db::DbError::Query(
            diesel::result::Error::RollbackTransaction,
        ))),
    )
}

/// One attempt at writing `good` (see the module docs); `failures` and `outcome` receive what
/// it found, to be kept only if the attempt is. Returns which rows were left alone and which
/// inserted.
#[allow(clippy::too_many_arguments)]
fn write(
    conn: &mut PgConnection,
    chunk: &Chunk,
    file: ImportFileId,
    good: &[&UserRow],
    map: &HeaderMap,
    fields_of: &RowFields<'_>,
    failures: &mut Vec<RowFailure>,
    outcome: &mut ChunkOutcome,
    archive: &ArchiveSettings,
    skip: Option<&[i64]>,
) -> Result<Written, ImportError> {
    let sql = statements();
    let tenant = chunk.tenant_id.0;
    let mut pending = good.len();
    let mut done = Written::default();
    // Whether a staged row may belong to an existing user: without the probes below, any.
    let mut may_exist = true;
    match skip {
        None => staging::stage(conn, good)?,
        Some(repeated) => {
            // First by digest, without staging anything: a re-import of an unchanged export
            // sends each row's key and digest at most (`unchanged.rs`).
            let listed: HashSet<i64> = repeated.iter().copied().collect();
            let found = unchanged::by_digest(conn, tenant, file, good, &listed)?;
            let differ = found.differ;
            done.skipped = found.same.into_iter().collect();
            let left: Vec<&UserRow> = good
                .iter()
                .filter(|u| !done.skipped.contains(&(u.row as i64)))
                .copied()
                .collect();
            if !left.is_empty() {
                staging::stage(conn, &left)?;
            }
            may_exist = differ > 0;
            if may_exist {
                // Then by value, for the users whose digest differs: written before digests
                // were kept, or changed since by something else than an import (the digest
                // was cleared), or archived.
                let same: Vec<i64> = diesel::sql_query(&sql.skip_unchanged)
                    .bind::<BigInt, _>(tenant)
                    .bind::<BigInt, _>(file.0)
                    .bind::<Bool, _>(archive.on)
                    .bind::<Array<Text>, _>(&archive.fields)
                    .bind::<Array<BigInt>, _>(repeated)
                    .load::<Found>(conn)?
                    .into_iter()
                    .filter(|f| f.same)
                    .map(|f| f.row_no)
                    .collect();
                may_exist = same.len() < differ;
                if !same.is_empty() && same.len() < left.len() {
                    staging::unstage(conn, &same)?;
                }
                done.skipped.extend(same);
            }
            outcome.unchanged += done.skipped.len() as i64;
            pending -= done.skipped.len();
            if pending == 0 {
                return Ok(done);
            }
        }
    }
    // The identity checks (layer 1, `identity.rs`), on the rows left: a row that changes
    // nothing takes no value from anyone, so a re-import of an unchanged export probes no
    // email or user name.
    let left: Vec<&UserRow> = good
        .iter()
        .filter(|u| !done.skipped.contains(&(u.row as i64)))
        .copied()
        .collect();
    let refused = identity::check_identities(conn, chunk, map, &left)?;
    if !refused.is_empty() {
        done.refused = refused.iter().map(|f| f.row as i64).collect();
        let rows: Vec<i64> = done.refused.iter().copied().collect();
        staging::unstage(conn, &rows)?;
        failures.extend(refused);
        pending -= done.refused.len();
        if pending == 0 {
            return Ok(done);
        }
    }
    let by_uid: HashMap<&str, &UserRow> = good.iter().map(|u| (u.unique_id, *u)).collect();
    let mut release: Vec<String> = Vec::new();
    // Each round: lock and update the users that exist, drop them from the staging table,
    // insert the rest. A concurrent transaction may insert one of our new users first; such
    // rows stay staged and go round again, now as existing users.
    for round in 0..5 {
        // The first round of a chunk whose probe found no user for any staged row (a new
        // tenant's import, new users) goes straight to the insert.
        let existing: Vec<Existing> = if round == 0 && !may_exist {
            Vec::new()
        } else {
            diesel::sql_query(LOCK_EXISTING)
                .bind::<BigInt, _>(tenant)
                .bind::<BigInt, _>(file.0)
                .load(conn)?
        };
        // Only the users just locked are updated: each statement sees newly committed rows,
        // so a user another chunk inserted after the SELECT must wait for the next round
        // (updating it here would make this round read its own write as someone else's).
        let locked: Vec<&str> = existing.iter().map(|e| e.unique_id.as_str()).collect();
        let updated: HashMap<i64, Updated> = if locked.is_empty() {
            HashMap::new()
        } else {
            diesel::sql_query(&sql.update)
                .bind::<BigInt, _>(tenant)
                .bind::<BigInt, _>(file.0)
                .bind::<Bool, _>(archive.on)
                .bind::<Array<Text>, _>(&archive.fields)
                .bind::<Array<Text>, _>(&locked)
                .load::<Updated>(conn)?
                .into_iter()
                .map(|u| (u.row_no, u))
                .collect()
        };
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
                        release.push(user.unique_id.to_owned());
                    }
                    if ex.last_file_id == file.0 {
                        // An earlier row of this file (another chunk) wrote this user; it
                        // loses to this row. This row takes its place in the counts.
                        failures.push(duplicate_failure(
                            ex.last_row as u64,
                            stored_fields(ex.old.as_ref(), map, &chunk.header),
                            user.unique_id,
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
                        user.unique_id,
                        ex.last_row as u64,
                        map,
                        &chunk.header,
                        false,
                    ));
                }
                // A later file already wrote this user; arrival order says it wins.
                None => outcome.superseded += 1,
            }
        }
        staging::unstage(conn, &resolved)?;
        let inserted: Vec<i64> = diesel::sql_query(&sql.insert)
            .bind::<BigInt, _>(tenant)
            .bind::<BigInt, _>(file.0)
            .bind::<Bool, _>(archive.on)
            .bind::<Array<Text>, _>(&archive.fields)
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
        staging::unstage(conn, &inserted)?;
        done.inserted.extend(&inserted);
        pending = pending.saturating_sub(resolved.len() + inserted.len());
        if pending == 0 {
            if !release.is_empty() {
                outcome.permits_released += diesel::sql_query(RELEASE_PERMITS)
                    .bind::<BigInt, _>(tenant)
                    .bind::<Array<Text>, _>(&release)
                    .execute(conn)? as i64;
            }
            return Ok(done);
        }
    }
    Err(ImportError::Db(mui_shared::db::DbError::Query(
        diesel::result::Error::RollbackTransaction,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compares a generated statement with its pinned text; `MUI_BLESS=1` rewrites the file
    /// (then review the diff: it is the SQL every chunk will run).
    fn pinned(name: &str, generated: &str) {
        let path = format!("{}/src/sql/generated/{name}", env!("CARGO_MANIFEST_DIR"));
        if std::env::var_os("MUI_BLESS").is_some() {
            std::fs::write(&path, generated).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap();
        assert!(
            generated == want,
            "{name} differs from {path} (MUI_BLESS=1 rewrites it):\n{generated}"
        );
    }

    #[test]
    fn the_update_is_pinned() {
        pinned("update.sql", &statements().update);
    }

    #[test]
    fn the_insert_is_pinned() {
        pinned("insert.sql", &statements().insert);
    }

    #[test]
    fn the_skip_is_pinned() {
        pinned("skip_unchanged.sql", &statements().skip_unchanged);
    }

    /// Every staged text column is written by both statements, under its own name.
    #[test]
    fn every_text_column_is_written() {
        let sql = statements();
        for col in TEXT_COLUMNS {
            let c = col.name();
            assert!(sql
                .update
                .contains(&format!("\n  {c} = (CASE WHEN '{c}' = ANY($4)")));
            assert!(sql.insert.contains(&format!(" {c},")));
            assert!(sql.insert.contains(&format!(
                "CASE WHEN '{c}' = ANY($4) AND {ARCHIVE_NEW} THEN mui_suffix(s.{c}, {NEW_SUFFIX}, {}) ELSE s.{c} END",
                col.max_len()
            )));
        }
    }
}
