//! The digest of a checked row: 16 bytes of SHA-256 over every value the row writes, in an
//! encoding where no two rows give the same bytes. Stored with the user the row wrote
//! (`users.row_digest`), it lets a re-import tell that a row would change nothing from its
//! digest alone, without sending the row's values to the database to be compared column by
//! column (see `upsert::write`).
//!
//! What the digest stands for: the user holds exactly what applying this row gave, and
//! nothing changed it since. The worker's writes set it; any other change to a user clears
//! it (a trigger, migration `row_digest`). Applying a row again to the user it wrote changes
//! nothing as long as the user is not archived (then every value is the row's value, or the
//! stored one where the row's cell is empty); an archived user is always compared by value.

use sha2::{Digest as _, Sha256};

use crate::validate::UserRow;

/// Bytes of a stored digest.
pub const DIGEST_BYTES: usize = 16;

/// Names this encoding: a change of what goes into the digest changes it, so that digests of
/// the old encoding no longer match anything (such users are compared by value once).
const VERSION: &[u8] = b"mui-row-digest-v1\0";

/// The digest of `row` (its row number is not part of it: the same values in another row,
/// or another file, give the same digest).
pub fn of(row: &UserRow) -> [u8; DIGEST_BYTES] {
    // The encoding is written out whole and hashed in one call: the same bytes as hashing
    // each value as it comes, for much less work per value.
    let mut bytes: Vec<u8> = Vec::with_capacity(512);
    bytes.extend_from_slice(VERSION);
    value(&mut bytes, Some(row.unique_id));
    value(&mut bytes, Some(row.login_source));
    for text in &row.text {
        value(&mut bytes, *text);
    }
    match row.date_of_birth {
        None => bytes.push(0),
        Some(d) => {
            bytes.push(1);
            bytes.extend_from_slice(&chrono::Datelike::num_days_from_ce(&d).to_le_bytes());
        }
    }
    bytes.push(match row.active {
        None => 0,
        Some(false) => 1,
        Some(true) => 2,
    });
    let full = Sha256::digest(&bytes);
    let mut out = [0u8; DIGEST_BYTES];
    out.copy_from_slice(&full[..DIGEST_BYTES]);
    out
}

/// An optional value: absent is one byte, present is a marker, its length and its bytes, so
/// that no two sequences of values encode alike.
fn value(bytes: &mut Vec<u8>, v: Option<&str>) {
    match v {
        None => bytes.push(0),
        Some(s) => {
            bytes.push(1);
            bytes.extend_from_slice(&(s.len() as u64).to_le_bytes());
            bytes.extend_from_slice(s.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::TEXT_COLUMNS;

    fn row() -> UserRow<'static> {
        let mut text: [Option<&str>; TEXT_COLUMNS.len()] = Default::default();
        text[0] = Some("Ann");
        text[1] = Some("Lee");
        UserRow {
            row: 2,
            unique_id: "u1",
            login_source: "LDAP",
            text,
            date_of_birth: chrono::NaiveDate::from_ymd_opt(1990, 5, 17),
            active: None,
            digest: [0; DIGEST_BYTES],
        }
    }

    /// Stored digests must keep matching: the digest of a known row is pinned (a change of
    /// the encoding must change `VERSION` instead).
    #[test]
    fn the_encoding_is_pinned() {
        // SHA-256 of "mui-row-digest-v1\0", then u1, LDAP, Ann, Lee and 18 empty text values,
        // 1990-05-17 (day 726604 of the era) and no `active`, as encoded above: computed
        // outside this code.
        const PINNED: &str = "626d8e204aae9f175ab047c8b353a2f7";
        let hex: String = of(&row()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(TEXT_COLUMNS.len(), 20);
        assert_eq!(hex, PINNED);
    }

    #[test]
    fn the_row_number_is_not_part_of_it() {
        let a = row();
        let mut b = row();
        b.row = 9000;
        assert_eq!(of(&a), of(&b));
    }

    #[test]
    fn every_value_is_part_of_it() {
        let base = of(&row());
        let mut changes: Vec<UserRow> = Vec::new();
        // The changed values, living as long as the test.
        let longer: Vec<String> = (0..TEXT_COLUMNS.len())
            .map(|i| format!("{}x", row().text[i].unwrap_or_default()))
            .collect();
        for (i, longer) in longer.iter().enumerate() {
            let mut r = row();
            r.text[i] = Some(longer);
            changes.push(r);
            let mut r = row();
            r.text[i] = if r.text[i].is_some() { None } else { Some("") };
            changes.push(r);
        }
        let mut r = row();
        r.unique_id = "u2";
        changes.push(r);
        let mut r = row();
        r.login_source = "SAML";
        changes.push(r);
        let mut r = row();
        r.date_of_birth = None;
        changes.push(r);
        let mut r = row();
        r.date_of_birth = chrono::NaiveDate::from_ymd_opt(1990, 5, 18);
        changes.push(r);
        for active in [Some(true), Some(false)] {
            let mut r = row();
            r.active = active;
            changes.push(r);
        }
        let mut seen = std::collections::HashSet::new();
        seen.insert(base);
        for r in &changes {
            assert!(
                seen.insert(of(r)),
                "two different rows share a digest: {r:?}"
            );
        }
    }

    #[test]
    fn values_cannot_run_into_each_other() {
        // "Ann" + "Lee" and "AnnL" + "ee" are different rows.
        let a = row();
        let mut b = row();
        b.text[0] = Some("AnnL");
        b.text[1] = Some("ee");
        assert_ne!(of(&a), of(&b));
    }
}
