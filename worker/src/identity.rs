//! The identity checks: a row's email and user name must not belong to another user of the
//! tenant, nor to another unique_id earlier in the chunk (both compared case-insensitively).

use std::collections::HashMap;

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text};
use mui_shared::domain::{Column, HeaderMap};
use mui_shared::messages::{self, Chunk, RowError, RowErrorCode, RowFailure};

use crate::import::ImportError;
use crate::validate::UserRow;

/// The identifying fields that must be unique within a tenant, case-insensitively.
/// Each with the code and wording of its failure and the statement finding its owners.
const IDENTITIES: [(Column, RowErrorCode, &str, &str); 2] = [
    (
        Column::Email,
        RowErrorCode::EmailTaken,
        "email",
        include_str!("sql/email_owners.sql"),
    ),
    (
        Column::UserName,
        RowErrorCode::UserNameTaken,
        "user name",
        include_str!("sql/user_name_owners.sql"),
    ),
];

/// Refuses rows whose email or user name (compared case-insensitively) belongs to another
/// user of the tenant, or to an earlier row of this chunk with another unique_id. Returns the
/// rows that may be imported. Two chunks importing the same new email for different users
/// at the same moment are not caught (the check is not a unique constraint, which would make
/// a swap of two users' emails in one file fail).
pub(crate) fn check_identities(
    conn: &mut PgConnection,
    chunk: &Chunk,
    map: &HeaderMap,
    good: Vec<UserRow>,
    failures: &mut Vec<RowFailure>,
) -> Result<Vec<UserRow>, ImportError> {
    let mut problems: HashMap<u64, Vec<RowError>> = HashMap::new();
    for (column, code, what, owners_sql) in IDENTITIES {
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
        let label = map
            .position(column)
            .and_then(|i| chunk.header.get(i))
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|| column.name().to_owned());
        let mut first_in_chunk: HashMap<String, (u64, &str)> = HashMap::new();
        for u in &good {
            let Some(value) = u.value(column) else {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The two probes are one statement with the column swapped, so a fix to one cannot be
    /// forgotten in the other; each reads its own column (and so its own index).
    #[test]
    fn the_owner_probes_differ_only_in_their_column() {
        let [(email, ..), (user_name, ..)] = IDENTITIES.map(|(c, _, _, sql)| (c, sql));
        assert_eq!(email, Column::Email);
        assert_eq!(user_name, Column::UserName);
        let [(_, _, _, email_sql), (_, _, _, user_name_sql)] = IDENTITIES;
        assert!(email_sql.contains("lower(email) = v.value OFFSET 0"));
        assert!(user_name_sql.contains("lower(user_name) = v.value OFFSET 0"));
        assert_eq!(
            email_sql.replace("email", "COLUMN"),
            user_name_sql.replace("user_name", "COLUMN")
        );
    }
}
