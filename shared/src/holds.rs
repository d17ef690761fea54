//! The mass-deactivation guard, and the operator's decision on a file it held.
//!
//! A file that would deactivate or archive more than its tenant's threshold of active users
//! (more than `guard_percent` % of them and more than `guard_min_users`; `guard_percent` 0
//! switches the guard off) is **held before any change**: ingest queues its chunks held back
//! from the dispatcher ([`evaluate`] decides, before the first chunk is queued), records the
//! users it would deactivate (`file_deactivations`) and, once the file is queued whole, puts
//! "file held" in the outbox; the notifier mails the tenant what would happen with the list
//! of those users attached. The held file stays its tenant's oldest open file, so the
//! dispatcher hands out none of the tenant's later files until it is decided (arrival
//! order).
//!
//! The operator then [`approve`]s it (its chunks are released to the dispatcher and imported
//! exactly once, as uploaded) or [`reject`]s it (its chunks are dropped, the file fails with
//! the reason, and the tenant gets the usual "not imported" mail). Both are idempotent, and
//! both are what `muictl files approve|reject` and the operator console call.

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text};

use crate::domain::{ImportFileId, TenantId};
use crate::files::FileState;
use crate::schema::{file_deactivations, import_files};
use crate::tenants::Tenant;

/// The guard's default share of a tenant's active users, percent.
pub const DEFAULT_PERCENT: i32 = 10;
/// The guard's default minimum number of users.
pub const DEFAULT_MIN_USERS: i32 = 25;
/// Error code of a file the operator rejected.
pub const REJECTED_CODE: &str = "rejected_by_operator";

/// A tenant's guard settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guard {
    /// Share of the active users, percent; 0: off.
    pub percent: i32,
    /// Minimum number of users.
    pub min_users: i32,
}

impl Guard {
    /// The tenant's settings.
    pub fn of(tenant: &Tenant) -> Guard {
        Guard {
            percent: tenant.guard_percent,
            min_users: tenant.guard_min_users,
        }
    }

    /// Whether the guard is on.
    pub fn on(&self) -> bool {
        self.percent > 0
    }

    /// Whether deactivating `would` of `active` users is over the threshold.
    pub fn holds(&self, would: i64, active: i64) -> bool {
        self.on()
            && would > i64::from(self.min_users)
            && would.saturating_mul(100) > active.saturating_mul(i64::from(self.percent))
    }
}

/// What the guard decided for a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Import it.
    Pass,
    /// Held: it would deactivate or archive `would` of the tenant's `active` users.
    Held {
        /// Users it would deactivate or archive.
        would: i64,
        /// The tenant's active users.
        active: i64,
    },
}

#[derive(QueryableByName)]
struct Uid {
    #[diesel(sql_type = Text)]
    unique_id: String,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Decides whether `file` is held, given the `unique_id`s that a row of it sets to
/// `active=0` (any row: a later row of the same id wins only if it passes the row checks,
/// so the earlier one may stand). A file decided before (ingest read it again after a crash, or the operator
/// approved it) keeps its decision. Counts the users among `deactivating` that are active
/// now (not archived, `active`); when that is over the tenant's threshold the file is marked
/// held and those users are recorded for the tenant's mail, in one transaction.
pub fn evaluate(
    conn: &mut PgConnection,
    tenant: &Tenant,
    file: ImportFileId,
    deactivating: &[String],
) -> QueryResult<Check> {
    let decided: Option<String> = import_files::table
        .find(file.0)
        .select(import_files::hold)
        .first::<Option<String>>(conn)?;
    match decided.as_deref() {
        Some("held") => {
            let (would, active): (Option<i64>, Option<i64>) = import_files::table
                .find(file.0)
                .select((import_files::hold_users, import_files::hold_active_users))
                .first(conn)?;
            return Ok(Check::Held {
                would: would.unwrap_or(0),
                active: active.unwrap_or(0),
            });
        }
        Some(_) => return Ok(Check::Pass),
        None => {}
    }
    let Some((would, active)) = assess(conn, tenant, deactivating)? else {
        return Ok(Check::Pass);
    };
    let n = would.len() as i64;
    conn.transaction(|conn| {
        for part in would.chunks(10_000) {
            let rows: Vec<_> = part
                .iter()
                .map(|uid| {
                    (
                        file_deactivations::file_id.eq(file.0),
                        file_deactivations::unique_id.eq(uid),
                    )
                })
                .collect();
            diesel::insert_into(file_deactivations::table)
                .values(&rows)
                .on_conflict_do_nothing()
                .execute(conn)?;
        }
        diesel::update(import_files::table.find(file.0))
            .set((
                import_files::hold.eq("held"),
                import_files::hold_users.eq(n),
                import_files::hold_active_users.eq(active),
            ))
            .execute(conn)?;
        Ok(Check::Held { would: n, active })
    })
}

/// Whether a file whose rows say `active=0` for `deactivating` is over the tenant's
/// threshold, without holding anything (a dry run reports it): the active users it would
/// deactivate or archive and the tenant's active users, when it is.
pub fn assess(
    conn: &mut PgConnection,
    tenant: &Tenant,
    deactivating: &[String],
) -> QueryResult<Option<(Vec<String>, i64)>> {
    let guard = Guard::of(tenant);
    if !guard.on() || deactivating.is_empty() {
        return Ok(None);
    }
    let active: Count = diesel::sql_query(
        "SELECT count(*) AS n FROM users \
         WHERE tenant_id = $1 AND active AND archived_at IS NULL",
    )
    .bind::<BigInt, _>(tenant.id)
    .get_result(conn)?;
    let mut would: Vec<String> = Vec::new();
    for part in deactivating.chunks(5_000) {
        let found: Vec<Uid> = diesel::sql_query(
            "SELECT u.unique_id FROM unnest($2::text[]) AS k(uid) \
             CROSS JOIN LATERAL (SELECT unique_id, active, archived_at FROM users \
               WHERE tenant_id = $1 AND unique_id = k.uid OFFSET 0) u \
             WHERE u.active AND u.archived_at IS NULL",
        )
        .bind::<BigInt, _>(tenant.id)
        .bind::<Array<Text>, _>(part)
        .load(conn)?;
        would.extend(found.into_iter().map(|u| u.unique_id));
    }
    if !guard.holds(would.len() as i64, active.n) {
        return Ok(None);
    }
    Ok(Some((would, active.n)))
}

/// The notice a dry run carries when a real import of it would be held.
pub fn dry_run_notice(tenant: &Tenant, would: usize, active: i64) -> String {
    format!(
        "An import of this file would be HELD by the mass-deactivation guard before any \
         change: it would deactivate or archive {would} of your {active} active users (the \
         guard holds a file above {}% of them and above {} users), and an operator would have \
         to approve it",
        tenant.guard_percent, tenant.guard_min_users
    )
}

/// The users a held file would deactivate or archive, as stored now (for the tenant's mail
/// and the operator): `unique_id`, first and last name, email, user name.
pub fn deactivations(conn: &mut PgConnection, file: ImportFileId) -> QueryResult<Vec<[String; 5]>> {
    #[derive(QueryableByName)]
    struct Line {
        #[diesel(sql_type = Text)]
        unique_id: String,
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        first_name: Option<String>,
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        last_name: Option<String>,
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        email: Option<String>,
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        user_name: Option<String>,
    }
    let lines: Vec<Line> = diesel::sql_query(
        "SELECT d.unique_id, u.first_name, u.last_name, u.email, u.user_name \
         FROM file_deactivations d JOIN import_files f ON f.id = d.file_id \
         LEFT JOIN users u ON u.tenant_id = f.tenant_id AND u.unique_id = d.unique_id \
         WHERE d.file_id = $1 ORDER BY d.unique_id",
    )
    .bind::<BigInt, _>(file.0)
    .load(conn)?;
    Ok(lines
        .into_iter()
        .map(|l| {
            [
                l.unique_id,
                l.first_name.unwrap_or_default(),
                l.last_name.unwrap_or_default(),
                l.email.unwrap_or_default(),
                l.user_name.unwrap_or_default(),
            ]
        })
        .collect())
}

/// Why a decision on a file cannot be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HoldError {
    /// No such file.
    #[error("there is no file with id {}", .0.0)]
    NoSuchFile(ImportFileId),
    /// The file was never held.
    #[error("file {} is not held by the mass-deactivation guard: there is nothing to approve or reject", .0.0)]
    NotHeld(ImportFileId),
    /// Ingest is still queueing the file's rows.
    #[error("file {} is still being read; try again in a moment", .0.0)]
    StillReading(ImportFileId),
    /// Approving a rejected file, or rejecting an approved one.
    #[error("file {} was {decision} already{by}; that cannot be undone", .file.0)]
    Decided {
        /// The file.
        file: ImportFileId,
        /// `approved` or `rejected`.
        decision: String,
        /// Who decided, as ` by <who>`.
        by: String,
    },
    /// Database trouble.
    #[error("database error: {0}")]
    Db(#[from] diesel::result::Error),
}

/// What a decision did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done now.
    Done,
    /// It had been taken already (the same decision): nothing changed.
    Already,
}

struct HeldFile {
    tenant_id: i64,
    hold: Option<String>,
    total_chunks: Option<i32>,
    decided_by: Option<String>,
}

fn lock(conn: &mut PgConnection, file: ImportFileId) -> Result<HeldFile, HoldError> {
    type Row = (i64, Option<String>, Option<i32>, Option<String>);
    let row: Option<Row> = import_files::table
        .find(file.0)
        .select((
            import_files::tenant_id,
            import_files::hold,
            import_files::total_chunks,
            import_files::hold_decided_by,
        ))
        .for_update()
        .first(conn)
        .optional()?;
    let (tenant_id, hold, total_chunks, decided_by) = row.ok_or(HoldError::NoSuchFile(file))?;
    Ok(HeldFile {
        tenant_id,
        hold,
        total_chunks,
        decided_by,
    })
}

fn decided(file: ImportFileId, f: &HeldFile) -> HoldError {
    HoldError::Decided {
        file,
        decision: f.hold.clone().unwrap_or_default(),
        by: f
            .decided_by
            .as_deref()
            .map(|b| format!(" by {b}"))
            .unwrap_or_default(),
    }
}

/// Approves a held file: it is imported as it was uploaded (its chunks go to the
/// dispatcher; each is imported once). `by` names the operator, for the record.
pub fn approve(
    conn: &mut PgConnection,
    file: ImportFileId,
    by: &str,
) -> Result<Outcome, HoldError> {
    conn.transaction(|conn| {
        let f = lock(conn, file)?;
        match f.hold.as_deref() {
            None => return Err(HoldError::NotHeld(file)),
            Some("approved") => return Ok(Outcome::Already),
            Some("held") => {}
            Some(_) => return Err(decided(file, &f)),
        }
        if f.total_chunks.is_none() {
            return Err(HoldError::StillReading(file));
        }
        diesel::update(import_files::table.find(file.0))
            .set((
                import_files::hold.eq("approved"),
                import_files::hold_decided_at.eq(diesel::dsl::now),
                import_files::hold_decided_by.eq(by),
            ))
            .execute(conn)?;
        crate::dispatch::release(conn, TenantId(f.tenant_id), file, false)?;
        Ok(Outcome::Done)
    })
}

/// Rejects a held file: nothing of it is imported, its queued chunks are dropped, it fails
/// with the reason, and the tenant is mailed that it was not imported and why. The file
/// stays in the tenant's `bak/`.
pub fn reject(conn: &mut PgConnection, file: ImportFileId, by: &str) -> Result<Outcome, HoldError> {
    conn.transaction(|conn| {
        let f = lock(conn, file)?;
        match f.hold.as_deref() {
            None => return Err(HoldError::NotHeld(file)),
            Some("rejected") => return Ok(Outcome::Already),
            Some("held") => {}
            Some(_) => return Err(decided(file, &f)),
        }
        if f.total_chunks.is_none() {
            return Err(HoldError::StillReading(file));
        }
        let (would, active): (Option<i64>, Option<i64>) = import_files::table
            .find(file.0)
            .select((import_files::hold_users, import_files::hold_active_users))
            .first(conn)?;
        let message = format!(
            "it would have deactivated or archived {} of your {} active users, more than the \
             mass-deactivation guard allows, and the operator rejected it. Check the export \
             (a missing or wrong active column is the usual cause) and upload a corrected file",
            would.unwrap_or(0),
            active.unwrap_or(0)
        );
        crate::dispatch::take_file(conn, TenantId(f.tenant_id), file)?;
        diesel::update(import_files::table.find(file.0))
            .set((
                import_files::hold.eq("rejected"),
                import_files::hold_decided_at.eq(diesel::dsl::now),
                import_files::hold_decided_by.eq(by),
                import_files::state.eq(FileState::Failed),
                import_files::error_code.eq(REJECTED_CODE),
                import_files::error_message.eq(&message),
                import_files::finished_at.eq(diesel::dsl::now),
            ))
            .execute(conn)?;
        crate::files::announce_finished(conn, file, TenantId(f.tenant_id))?;
        Ok(Outcome::Done)
    })
}

/// The tenant's oldest file waiting for a decision, if any: its later files wait behind it.
pub fn oldest_held(conn: &mut PgConnection, tenant: TenantId) -> QueryResult<Option<i64>> {
    import_files::table
        .filter(import_files::tenant_id.eq(tenant.0))
        .filter(import_files::hold.eq("held"))
        .filter(import_files::state.eq_any([FileState::Received, FileState::Importing]))
        .select(diesel::dsl::min(import_files::id))
        .first::<Option<i64>>(conn)
}

/// Puts "file held" in the outbox, for the notifier to mail the tenant (ingest, once the
/// held file is queued whole).
pub fn announce_held(
    conn: &mut PgConnection,
    file: ImportFileId,
    tenant: TenantId,
) -> QueryResult<()> {
    let msg = crate::messages::NotifyMessage::FileHeldV1(crate::messages::FileFinished {
        file_id: file,
        tenant_id: tenant,
    });
    let bytes = crate::messages::encode(&msg)
        .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
    crate::outbox::enqueue(conn, crate::amqp::QueueKind::Notify, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_is_a_share_and_a_minimum_and_zero_is_off() {
        let g = Guard {
            percent: 10,
            min_users: 25,
        };
        assert!(!g.holds(25, 100)); // 25 % but not more than 25 users
        assert!(g.holds(26, 100));
        assert!(!g.holds(26, 1000)); // 2.6 %
        assert!(g.holds(101, 1000));
        assert!(!g.holds(100, 1000)); // exactly 10 % is not more
        let off = Guard {
            percent: 0,
            min_users: 0,
        };
        assert!(!off.holds(1000, 1000));
        let any = Guard {
            percent: 1,
            min_users: 0,
        };
        assert!(any.holds(1, 10));
    }
}
