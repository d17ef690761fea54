//! Which rows of a file share their `unique_id` with another row of the same file, found by
//! the validating pass (which reads the whole file before anything is published) and handed
//! to the workers with each chunk ([`mui_shared::messages::Chunk::repeated`]).
//!
//! A worker leaves an existing user untouched when the row changes nothing, which makes a
//! re-import of an unchanged export cheap; but a user that another row of the same file
//! names must still be written with the row's version, or the other row (in another chunk,
//! imported in any order) could not tell that it is a duplicate. Those rows are the ones
//! listed here.
//!
//! Each value is kept as a 64-bit hash (8 bytes a row: 8 MB for 1,000,000 rows, freed once
//! the pass is over). Two values that collide are both listed: a row listed needlessly is
//! only written as before, never skipped wrongly.

use std::collections::HashSet;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

use mui_shared::domain::{Column, HeaderMap};
use mui_shared::messages::RawRow;

/// The key of a row: the hash of its trimmed `unique_id` cell, as the worker reads it; `None`
/// for a row without one (it cannot be imported, so it names no user).
fn key(map: &HeaderMap, row: &RawRow) -> Option<u64> {
    if row.too_large.is_some() {
        return None;
    }
    let v = row.fields.get(map.position(Column::UniqueId)?)?.trim();
    (!v.is_empty()).then(|| BuildHasherDefault::<DefaultHasher>::default().hash_one(v))
}

/// Collects every row's key during the validating pass.
#[derive(Debug, Default)]
pub(super) struct Collect {
    keys: Vec<u64>,
}

impl Collect {
    /// Notes the keys of a chunk's rows.
    pub(super) fn observe(&mut self, map: &HeaderMap, rows: &[RawRow]) {
        self.keys.extend(rows.iter().filter_map(|r| key(map, r)));
    }

    /// The keys seen more than once.
    pub(super) fn finish(mut self) -> Repeats {
        self.keys.sort_unstable();
        let repeated = self
            .keys
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| w[0])
            .collect();
        Repeats { repeated }
    }
}

/// The keys of the values that more than one row of the file holds.
#[derive(Debug, Default, Clone)]
pub(crate) struct Repeats {
    repeated: HashSet<u64>,
}

impl Repeats {
    /// The row numbers among `rows` whose `unique_id` another row of the file has too.
    pub(super) fn rows_of(&self, map: &HeaderMap, rows: &[RawRow]) -> Vec<u64> {
        if self.repeated.is_empty() {
            return Vec::new();
        }
        rows.iter()
            .filter(|r| key(map, r).is_some_and(|k| self.repeated.contains(&k)))
            .map(|r| r.row)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: u64, uid: &str) -> RawRow {
        RawRow {
            row: n,
            fields: vec![uid.into(), "sso".into()].into(),
            too_large: None,
        }
    }

    #[test]
    fn rows_sharing_a_unique_id_across_chunks_are_listed_and_only_those() {
        let map = HeaderMap::parse(&["unique_id", "login_source"]).unwrap();
        let first = vec![row(2, "a"), row(3, " b "), row(4, "c"), row(5, "")];
        let second = vec![row(6, "b"), row(7, "d"), row(8, "")];
        let mut c = Collect::default();
        c.observe(&map, &first);
        c.observe(&map, &second);
        let r = c.finish();
        // "b" and " b " are the same unique_id once trimmed, as the worker reads them; empty
        // cells name no user.
        assert_eq!(r.rows_of(&map, &first), vec![3]);
        assert_eq!(r.rows_of(&map, &second), vec![6]);
    }

    #[test]
    fn a_file_without_repeats_lists_nothing() {
        let map = HeaderMap::parse(&["unique_id", "login_source"]).unwrap();
        let rows: Vec<RawRow> = (0..1000).map(|i| row(i + 2, &format!("u{i}"))).collect();
        let mut c = Collect::default();
        c.observe(&map, &rows);
        assert!(c.finish().rows_of(&map, &rows).is_empty());
    }
}
