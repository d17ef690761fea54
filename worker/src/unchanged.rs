//! Which rows of a chunk would change nothing, found by the digest stored with their user
//! (`crate::digest`), before anything is staged: a re-import of an unchanged export then
//! sends each row's key and digest at most, and writes nothing.
//!
//! A row is the same when it may be left alone at all (not `active=0`, not a unique_id another
//! row of the file has too), its user was last written by an older file with the same digest,
//! and the user is not archived. Two reads find the users:
//!
//! 1. When the chunk's rows come in unique_id order (most exports are sorted by it), the
//!    stretch of the primary key from its first to its last unique_id is read in key order
//!    ([`USERS_IN_RANGE`]), bounded to a few times the chunk's rows, and matched to the rows
//!    here, by exact key. Several times cheaper for the database than a probe per row.
//! 2. Every row that read did not find (all of them when the chunk is not in order, or when
//!    the stretch held too many users) is probed by its key ([`SAME_DIGEST`]). So whatever
//!    the database's collation orders differently from bytes, or whatever the stretch left
//!    out, is still looked up exactly; a row is never taken for a new user because of 1.

use std::collections::{HashMap, HashSet};

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Binary, Bool, Nullable, Text};
use mui_shared::domain::ImportFileId;
use rustc_hash::FxBuildHasher;

use crate::sql::{SAME_DIGEST, USERS_IN_RANGE};
use crate::validate::UserRow;

/// Fewest rows for which reading a stretch of the key is tried (below, one probe per row is
/// as cheap, and a small file's chunk saves a round trip).
const RANGE_MIN_ROWS: usize = 64;

/// What the digests told.
#[derive(Debug, Default)]
pub(crate) struct ByDigest {
    /// The rows (row numbers) that would change nothing.
    pub(crate) same: Vec<i64>,
    /// How many of the other rows name an existing user.
    pub(crate) differ: usize,
}

/// A row whose user exists, and whether it would change nothing (what [`SAME_DIGEST`] and
/// `upsert`'s comparison by value return).
#[derive(QueryableByName)]
pub(crate) struct Found {
    #[diesel(sql_type = BigInt)]
    pub(crate) row_no: i64,
    #[diesel(sql_type = Bool)]
    pub(crate) same: bool,
}

#[derive(QueryableByName)]
struct Stored {
    #[diesel(sql_type = Text)]
    unique_id: String,
    #[diesel(sql_type = BigInt)]
    last_file_id: i64,
    #[diesel(sql_type = Bool)]
    live: bool,
    #[diesel(sql_type = Nullable<Binary>)]
    row_digest: Option<Vec<u8>>,
}

/// Finds the rows of `good` (one per unique_id) that would change nothing; `listed`: rows
/// that must be written anyway (their unique_id is another row's in the file).
pub(crate) fn by_digest(
    conn: &mut PgConnection,
    tenant: i64,
    file: ImportFileId,
    good: &[&UserRow],
    listed: &HashSet<i64>,
) -> QueryResult<ByDigest> {
    let may_skip = |u: &UserRow| u.active != Some(false) && !listed.contains(&(u.row as i64));
    let mut out = ByDigest::default();
    let mut unknown: Vec<&UserRow> = good.to_vec();
    if let Some(stored) = users_in_range(conn, tenant, good)? {
        let by_uid: HashMap<&str, &UserRow, FxBuildHasher> =
            good.iter().map(|u| (u.unique_id, *u)).collect();
        let mut found: HashSet<u64, FxBuildHasher> = HashSet::default();
        for s in &stored {
            let Some(&u) = by_uid.get(s.unique_id.as_str()) else {
                continue; // a user of the stretch that the chunk does not name
            };
            found.insert(u.row);
            let same = may_skip(u)
                && s.last_file_id < file.0
                && s.live
                && s.row_digest.as_deref() == Some(&u.digest[..]);
            if same {
                out.same.push(u.row as i64);
            } else {
                out.differ += 1;
            }
        }
        unknown.retain(|u| !found.contains(&u.row));
    }
    if unknown.is_empty() {
        return Ok(out);
    }
    let ids: Vec<&str> = unknown.iter().map(|u| u.unique_id).collect();
    let digests: Vec<&[u8]> = unknown.iter().map(|u| &u.digest[..]).collect();
    let rows: Vec<i64> = unknown.iter().map(|u| u.row as i64).collect();
    let skippable: Vec<bool> = unknown.iter().map(|u| may_skip(u)).collect();
    let found = diesel::sql_query(SAME_DIGEST)
        .bind::<BigInt, _>(tenant)
        .bind::<BigInt, _>(file.0)
        .bind::<Array<Text>, _>(&ids)
        .bind::<Array<Binary>, _>(&digests)
        .bind::<Array<BigInt>, _>(&rows)
        .bind::<Array<Bool>, _>(&skippable)
        .load::<Found>(conn)?;
    for f in found {
        if f.same {
            out.same.push(f.row_no);
        } else {
            out.differ += 1;
        }
    }
    Ok(out)
}

/// The stored users of the stretch of the key that `good` covers, when the rows come in
/// unique_id order and the stretch is not much larger than the chunk; `None` when not read
/// or when it held too many users to be worth it.
fn users_in_range(
    conn: &mut PgConnection,
    tenant: i64,
    good: &[&UserRow],
) -> QueryResult<Option<Vec<Stored>>> {
    let Some((first, last)) = stretch(good) else {
        return Ok(None);
    };
    // A few times the chunk: reading an entry of the stretch costs a fraction of a probe,
    // so a stretch with some users the file does not name still pays.
    let limit = 3 * good.len() + 100;
    let stored = diesel::sql_query(USERS_IN_RANGE)
        .bind::<BigInt, _>(tenant)
        .bind::<Text, _>(first)
        .bind::<Text, _>(last)
        .bind::<BigInt, _>(limit as i64)
        .load::<Stored>(conn)?;
    Ok((stored.len() < limit).then_some(stored))
}

/// The first and last unique_id (byte order) of rows that come mostly in unique_id order:
/// nine in ten consecutive pairs ascending. `None` for fewer than [`RANGE_MIN_ROWS`] rows or
/// rows in no particular order.
fn stretch<'c>(good: &[&UserRow<'c>]) -> Option<(&'c str, &'c str)> {
    if good.len() < RANGE_MIN_ROWS {
        return None;
    }
    let ascending = good
        .windows(2)
        .filter(|w| w[0].unique_id < w[1].unique_id)
        .count();
    if ascending * 10 < (good.len() - 1) * 9 {
        return None;
    }
    let first = good.iter().map(|u| u.unique_id).min()?;
    let last = good.iter().map(|u| u.unique_id).max()?;
    Some((first, last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::TEXT_COLUMNS;

    fn user(unique_id: &str) -> UserRow<'_> {
        UserRow {
            row: 2,
            unique_id,
            login_source: "sso",
            text: [None; TEXT_COLUMNS.len()],
            date_of_birth: None,
            active: None,
            digest: [0; crate::digest::DIGEST_BYTES],
        }
    }

    #[test]
    fn a_stretch_is_read_only_for_rows_mostly_in_order() {
        let ids: Vec<String> = (0..100).map(|i| format!("U{i:04}")).collect();
        let rows: Vec<UserRow> = ids.iter().map(|id| user(id)).collect();
        let refs: Vec<&UserRow> = rows.iter().collect();
        assert_eq!(stretch(&refs), Some(("U0000", "U0099")));
        // A few out of place: still the stretch from the smallest to the largest.
        let mut nearly = refs.clone();
        nearly.swap(10, 90);
        assert_eq!(stretch(&nearly), Some(("U0000", "U0099")));
        // Reversed, or shuffled: a probe per row.
        let reversed: Vec<&UserRow> = refs.iter().rev().copied().collect();
        assert_eq!(stretch(&reversed), None);
        let shuffled: Vec<&UserRow> = (0..100).map(|i| refs[(i * 37) % 100]).collect();
        assert_eq!(stretch(&shuffled), None);
        // Too few rows to bother.
        assert_eq!(stretch(&refs[..RANGE_MIN_ROWS - 1]), None);
    }
}
