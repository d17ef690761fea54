//! The identity checks: a row's email and user name (compared case-insensitively) must not
//! belong to another user of the tenant, nor to another unique_id earlier in the chunk.
//!
//! Three layers, so that the rule holds when chunks of one file or of several files commit at
//! the same moment on different workers:
//!
//! 1. [`check_identities`], before the write, reports the rows whose value another user
//!    holds (as committed) or an earlier row of the chunk gives to another unique_id. A user
//!    of the chunk whose row gives it another value does not hold its old one, so users of
//!    one chunk may swap their values. It runs on the staged rows (`upsert.rs`) after those
//!    that change nothing were left out, where they are: such a row takes no value from
//!    anyone, and a re-import of an unchanged export then probes no value at all.
//! 2. [`conflicts_after_write`], after the chunk's users are written (inside a savepoint,
//!    `upsert.rs`), finds every user this chunk wrote whose stored value another user holds:
//!    the stored value is what counts (an empty cell keeps the old one, a reactivation takes
//!    the archive suffix off), and a swap whose other half did not apply is caught here. The
//!    upsert reports those rows and writes the chunk again without them. (A chunk's first
//!    attempt checks the users it updated; the users it inserted hold exactly what layer 1
//!    checked, and a conflict they have all the same breaks layer 3, after which every
//!    attempt checks every user written.)
//! 3. The constraints `users_email_unique` and `users_user_name_unique` (migration 000008,
//!    deferred, among users not archived), forced with [`CHECK_NOW`] before the savepoint is
//!    released: a concurrent transaction writing the same value is waited for, and if it
//!    commits the violation rolls the savepoint back and the chunk is written again, when
//!    layer 2 sees the winner and reports the row. The database thus holds the rule whatever
//!    the interleaving; a violation at commit (not expected) is retried like a deadlock
//!    ([`mui_shared::db::is_transient`]).
//!
//! Values are not locked before the check (advisory locks per value): a chunk of 5,000 rows
//! would take 10,000 locks, more than PostgreSQL's default lock table holds for all sessions
//! together. The constraint's own index serialises writers of one value instead.

use std::collections::{BTreeMap, HashMap};

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text};
use mui_shared::domain::{Column, HeaderMap, ImportFileId};
use mui_shared::messages::{self, Chunk, Fields, RowError, RowErrorCode, RowFailure};

use crate::import::{ImportError, RowFields};
use crate::validate::UserRow;

/// The identifying fields that must be unique within a tenant, case-insensitively.
/// Each with the code and wording of its failure, the statement finding its owners (before
/// the write) and the one finding conflicts (after it).
const IDENTITIES: [(Column, RowErrorCode, &str, &str, &str); 2] = [
    (
        Column::Email,
        RowErrorCode::EmailTaken,
        "email",
        crate::sql::EMAIL_OWNERS,
        crate::sql::EMAIL_CONFLICTS,
    ),
    (
        Column::UserName,
        RowErrorCode::UserNameTaken,
        "user name",
        crate::sql::USER_NAME_OWNERS,
        crate::sql::USER_NAME_CONFLICTS,
    ),
];

/// Defers the identity constraints to the end of the write (a swap updates both users before
/// either is checked).
pub(crate) const DEFER_CHECKS: &str =
    "SET CONSTRAINTS users_email_unique, users_user_name_unique DEFERRED";
/// Checks the identity constraints now, waiting for any concurrent writer of the same value.
pub(crate) const CHECK_NOW: &str =
    "SET CONSTRAINTS users_email_unique, users_user_name_unique IMMEDIATE";

/// The column's name as the file's header spells it (its own name if the file has none).
fn label_of(chunk: &Chunk, map: &HeaderMap, column: Column) -> String {
    map.position(column)
        .and_then(|i| chunk.header.get(i))
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|| column.name().to_owned())
}

/// Refuses rows whose email or user name (compared case-insensitively) belongs to another
/// user of the tenant, or to an earlier row of this chunk with another unique_id. A user
/// whose own row in this chunk gives it another value is not counted as holding its old one
/// (a swap); whether that row applied is checked after the write ([`conflicts_after_write`]).
/// Returns the failure records of the rows refused, in chunk order.
pub(crate) fn check_identities(
    conn: &mut PgConnection,
    chunk: &Chunk,
    map: &HeaderMap,
    good: &[&UserRow],
) -> Result<Vec<RowFailure>, ImportError> {
    let mut problems: HashMap<u64, Vec<RowError>> = HashMap::new();
    for (column, code, what, owners_sql, _) in IDENTITIES {
        // Each distinct value once: one index probe each.
        let mut wanted: Vec<String> = good
            .iter()
            .filter_map(|u| u.value(column).map(str::to_lowercase))
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
        // One index probe per value; see the statement.
        let owners: Vec<Owner> = diesel::sql_query(owners_sql)
            .bind::<BigInt, _>(chunk.tenant_id.0)
            .bind::<Array<Text>, _>(&wanted)
            .load(conn)?;
        let mut owner_of: HashMap<String, Vec<String>> = HashMap::new();
        for o in owners {
            owner_of.entry(o.value).or_default().push(o.unique_id);
        }
        // The value each user of the chunk is given, where its row gives one.
        let given: HashMap<&str, String> = good
            .iter()
            .filter_map(|u| Some((u.unique_id, u.value(column)?.to_lowercase())))
            .collect();
        let label = label_of(chunk, map, column);
        let mut first_in_chunk: HashMap<String, (u64, &str)> = HashMap::new();
        for u in good {
            let Some(value) = u.value(column) else {
                continue;
            };
            let key = value.to_lowercase();
            let quoted = messages::truncate_for_message(value, 60);
            let taken_by = owner_of.get(&key).and_then(|owners| {
                owners
                    .iter()
                    .find(|o| **o != u.unique_id && given.get(o.as_str()).is_none_or(|v| *v == key))
            });
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
                    first_in_chunk.entry(key).or_insert((u.row, u.unique_id));
                }
            }
        }
    }
    if problems.is_empty() {
        return Ok(Vec::new());
    }
    let raw_of: HashMap<u64, &Fields> = chunk.rows.iter().map(|r| (r.row, &r.fields)).collect();
    Ok(good
        .iter()
        .filter_map(|u| {
            problems.remove(&u.row).map(|errors| RowFailure {
                row: u.row,
                fields: raw_of.get(&u.row).map(|f| f.to_vec()).unwrap_or_default(),
                errors,
            })
        })
        .collect())
}

/// After the chunk's `rows` were written: the rows whose user now holds an email or user
/// name (as stored, compared case-insensitively) that another user of the tenant holds too,
/// each reported as [`check_identities`] would. Of two users this chunk wrote, the later row
/// is reported. Reads committed users and this transaction's own writes only: a concurrent
/// writer of the same value is for the constraint check ([`CHECK_NOW`]) to wait for.
pub(crate) fn conflicts_after_write(
    conn: &mut PgConnection,
    chunk: &Chunk,
    map: &HeaderMap,
    file: ImportFileId,
    rows: &[&UserRow],
    fields_of: &RowFields<'_>,
) -> Result<Vec<RowFailure>, ImportError> {
    #[derive(QueryableByName)]
    struct Conflict {
        #[diesel(sql_type = Text)]
        unique_id: String,
        #[diesel(sql_type = BigInt)]
        last_row: i64,
        #[diesel(sql_type = Text)]
        value: String,
        #[diesel(sql_type = Text)]
        other: String,
        #[diesel(sql_type = BigInt)]
        other_file: i64,
        #[diesel(sql_type = BigInt)]
        other_row: i64,
    }
    let row_of: HashMap<&str, &UserRow> = rows.iter().map(|u| (u.unique_id, *u)).collect();
    let ids: Vec<&str> = row_of.keys().copied().collect();
    // The row of ours that last wrote a user (else another chunk's row did, or none).
    let written = |uid: &str, last_file: i64, last_row: i64| -> Option<&UserRow> {
        let u = row_of.get(uid)?;
        (last_file == file.0 && last_row == u.row as i64).then_some(*u)
    };
    let mut problems: BTreeMap<u64, Vec<RowError>> = BTreeMap::new();
    for (column, code, what, _, conflicts_sql) in IDENTITIES {
        let found: Vec<Conflict> = diesel::sql_query(conflicts_sql)
            .bind::<BigInt, _>(chunk.tenant_id.0)
            .bind::<BigInt, _>(file.0)
            .bind::<Array<Text>, _>(&ids)
            .load(conn)?;
        let label = label_of(chunk, map, column);
        let mut blamed: BTreeMap<u64, String> = BTreeMap::new();
        for c in found {
            let Some(u) = written(&c.unique_id, file.0, c.last_row) else {
                continue;
            };
            // Both users written by this chunk: the later row is reported (its side of the
            // pair comes round too). Otherwise this chunk's row is.
            let other_row = written(&c.other, c.other_file, c.other_row).map(|o| o.row);
            if other_row.is_some_and(|o| o > u.row) {
                continue;
            }
            let stored = messages::truncate_for_message(&c.value, 60);
            let other = messages::truncate_for_message(&c.other, 60);
            let subject = match u.value(column) {
                Some(v) if v.to_lowercase() == c.value.to_lowercase() => {
                    format!("`{label}` \"{}\"", messages::truncate_for_message(v, 60))
                }
                _ => format!("`{label}` would become \"{stored}\", which"),
            };
            let message = match other_row {
                Some(row) => format!(
                    "{subject} is also given to unique_id \"{other}\" in row {row}; each user needs their own {what}"
                ),
                None => format!(
                    "{subject} already belongs to another user of this tenant (unique_id \"{other}\"); each user needs their own {what}"
                ),
            };
            blamed.entry(u.row).or_insert(message);
        }
        for (row, message) in blamed {
            problems.entry(row).or_default().push(RowError {
                code,
                column: Some(label.clone()),
                message,
            });
        }
    }
    Ok(problems
        .into_iter()
        .map(|(row, errors)| RowFailure {
            row,
            fields: fields_of.get(&row).map(|f| f.to_vec()).unwrap_or_default(),
            errors,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probes are one statement each with the column swapped, so a fix to one cannot be
    /// forgotten in the other; each reads its own column (and so its own index).
    #[test]
    fn the_owner_and_conflict_probes_differ_only_in_their_column() {
        let [(email, ..), (user_name, ..)] = IDENTITIES;
        assert_eq!(email, Column::Email);
        assert_eq!(user_name, Column::UserName);
        let [(_, _, _, email_sql, email_after), (_, _, _, user_name_sql, user_name_after)] =
            IDENTITIES;
        assert!(email_sql.contains("lower(email) = v.value OFFSET 0"));
        assert!(user_name_sql.contains("lower(user_name) = v.value OFFSET 0"));
        assert!(email_after.contains("lower(email) = lower(w.email) OFFSET 0"));
        assert!(user_name_after.contains("lower(user_name) = lower(w.user_name) OFFSET 0"));
        for (e, u) in [(email_sql, user_name_sql), (email_after, user_name_after)] {
            assert_eq!(
                e.replace("email", "COLUMN"),
                u.replace("user_name", "COLUMN")
            );
        }
    }

    /// The constraints set deferred and checked are the ones migration 000008 creates.
    #[test]
    fn the_constraint_statements_name_the_identity_constraints() {
        let names = mui_shared::db::IDENTITY_CONSTRAINTS.join(", ");
        assert_eq!(DEFER_CHECKS, format!("SET CONSTRAINTS {names} DEFERRED"));
        assert_eq!(CHECK_NOW, format!("SET CONSTRAINTS {names} IMMEDIATE"));
        let migration =
            include_str!("../../shared/migrations/2026-12-02-000008_unique_identity/up.sql");
        for name in mui_shared::db::IDENTITY_CONSTRAINTS {
            assert!(migration.contains(&format!("ADD CONSTRAINT {name}\n")));
        }
    }
}
