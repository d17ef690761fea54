//! Checking one uploaded row against the format and the tenant's rules. A failure reason is
//! data for the tenant: a code plus a message naming the column, quoting the value and saying
//! what was expected.
//!
//! Over 400 lines because of its unit tests (about 150): the checks themselves are one
//! job, and splitting them would scatter the column rules.

use std::collections::{HashMap, HashSet};

use chrono::{Datelike, NaiveDate};
use mui_shared::domain::{Column, HeaderMap};
use mui_shared::messages::{truncate_for_message, RawRow, RowError, RowErrorCode};

/// The text columns after `unique_id` and `login_source`, in staging-table order (declared
/// with the staging table).
pub use crate::staging::TEXT_COLUMNS;

/// Where each column's value sits in [`UserRow::text`] (`usize::MAX`: not a text column).
const TEXT_SLOT: [usize; Column::ALL.len()] = {
    let mut slot = [usize::MAX; Column::ALL.len()];
    let mut i = 0;
    while i < TEXT_COLUMNS.len() {
        slot[TEXT_COLUMNS[i] as usize] = i;
        i += 1;
    }
    slot
};

/// What a tenant allows.
#[derive(Debug, Clone, Default)]
pub struct TenantRules {
    /// Login sources, keyed by lowercase name, valued by the stored spelling.
    pub login_sources: HashMap<String, String>,
    /// User type ids.
    pub user_types: HashSet<String>,
}

impl TenantRules {
    /// Builds the rules from the tenant's lists.
    pub fn new(login_sources: Vec<String>, user_types: Vec<String>) -> Self {
        Self {
            login_sources: login_sources
                .into_iter()
                .map(|s| (s.to_lowercase(), s))
                .collect(),
            user_types: user_types.into_iter().collect(),
        }
    }

    /// The tenant's spelling of login source `v`, matched without regard to case.
    pub fn login_source(&self, v: &str) -> Option<&str> {
        // The keys are lowercase: a value spelled as its key (most files) needs no lowercase
        // copy of its own.
        self.login_sources
            .get(v)
            .or_else(|| self.login_sources.get(&v.to_lowercase()))
            .map(String::as_str)
    }
}

/// A row that passed every check. Empty cells are `None`: they leave stored values unchanged.
/// The values are borrowed from the chunk's row (trimmed) and the tenant's rules: checking a
/// row allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow<'c> {
    /// Spreadsheet row number.
    pub row: u64,
    /// The user's key within the tenant.
    pub unique_id: &'c str,
    /// Login source, in the tenant's spelling.
    pub login_source: &'c str,
    /// Values of [`TEXT_COLUMNS`], in that order; read them with [`UserRow::value`].
    pub text: [Option<&'c str>; TEXT_COLUMNS.len()],
    /// Date of birth.
    pub date_of_birth: Option<NaiveDate>,
    /// `active`.
    pub active: Option<bool>,
    /// The digest of the values above (`digest::of`; not of `row`).
    pub digest: [u8; crate::digest::DIGEST_BYTES],
}

impl<'c> UserRow<'c> {
    /// The value of a text column ([`TEXT_COLUMNS`]); `None` if the cell was empty (or
    /// `column` is not a text column). Columns are read by name so that no caller depends on
    /// the order of [`UserRow::text`].
    pub fn value(&self, column: Column) -> Option<&'c str> {
        *self.text.get(TEXT_SLOT[column.index()])?
    }
}

/// Checks a row; on failure returns every problem found.
pub fn validate<'c>(
    header: &[String],
    map: &HeaderMap,
    raw: &'c RawRow,
    rules: &'c TenantRules,
) -> Result<UserRow<'c>, Vec<RowError>> {
    let mut errors = Vec::new();
    if let Some(big) = &raw.too_large {
        errors.push(RowError {
            code: RowErrorCode::RecordTooLarge,
            column: None,
            message: format!(
                "the row is {} bytes long, more than the limit of {} bytes for one row; this usually means a quote (\") opens a cell in this row and is closed only much further down: check the quotes in this row and the rows after it",
                big.bytes,
                mui_shared::messages::MAX_ROW_BYTES
            ),
        });
        return Err(errors);
    }
    let n_header = map.positions.len();
    let extra_nonempty = raw
        .fields
        .iter()
        .skip(n_header)
        .any(|f| !f.trim().is_empty());
    if raw.fields.len() < n_header || extra_nonempty {
        errors.push(RowError {
            code: RowErrorCode::FieldCount,
            column: None,
            message: format!(
                "the row has {} fields but the header has {} columns; check for a missing or extra delimiter or an unclosed quote (on the last row, an upload that was cut off: upload the whole file again)",
                raw.fields.len(),
                n_header
            ),
        });
        return Err(errors);
    }
    let mut values: [Option<&'c str>; 24] = [None; 24];
    for (i, col) in map.positions.iter().enumerate() {
        let Some(col) = col else { continue };
        let v = raw.fields[i].trim();
        if v.is_empty() {
            continue;
        }
        let label = header.get(i).map(|h| h.trim()).unwrap_or(col.name());
        // A line break inside a quoted cell is data (Excel's Alt+Enter in an address);
        // any other control character is refused. (Printable ASCII, most cells, is looked
        // at byte by byte only.)
        let printable_ascii = v.bytes().all(|b| (b' '..=b'~').contains(&b));
        if let Some(c) = (!printable_ascii)
            .then(|| v.chars().find(|c| c.is_control() && *c != '\n'))
            .flatten()
        {
            errors.push(err(
                RowErrorCode::ControlCharacter,
                label,
                format!(
                    "`{label}` value {} contains a control character (U+{:04X}); only printable text is accepted",
                    quote(v),
                    c as u32
                ),
            ));
            continue;
        }
        // A value has at most as many characters as bytes.
        let len = if v.len() <= col.max_len() {
            v.len()
        } else {
            v.chars().count()
        };
        if len > col.max_len() && !matches!(col, Column::DateOfBirth | Column::Active) {
            errors.push(err(
                RowErrorCode::TooLong,
                label,
                format!(
                    "`{label}` value {} is {len} characters long; at most {} are stored",
                    quote(v),
                    col.max_len()
                ),
            ));
            continue;
        }
        values[col.index()] = Some(v);
    }
    let label_of = |col: Column| -> String {
        map.position(col)
            .and_then(|i| header.get(i))
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|| col.name().to_owned())
    };

    let unique_id = values[Column::UniqueId.index()];
    if unique_id.is_none()
        && !errors
            .iter()
            .any(|e| e.column.as_deref() == Some(&label_of(Column::UniqueId)))
    {
        let l = label_of(Column::UniqueId);
        errors.push(err(
            RowErrorCode::RequiredMissing,
            &l,
            format!("`{l}` is empty; every row needs the user's unique_id"),
        ));
    }
    let login_source = match values[Column::LoginSource.index()] {
        None => {
            let l = label_of(Column::LoginSource);
            if !errors.iter().any(|e| e.column.as_deref() == Some(&l)) {
                errors.push(err(
                    RowErrorCode::RequiredMissing,
                    &l,
                    format!(
                        "`{l}` is empty; every row needs a login source ({})",
                        list(rules.login_sources.values())
                    ),
                ));
            }
            None
        }
        Some(v) => match rules.login_source(v) {
            Some(canonical) => Some(canonical),
            None => {
                let l = label_of(Column::LoginSource);
                errors.push(err(
                    RowErrorCode::UnknownLoginSource,
                    &l,
                    format!(
                        "`{l}` {} is not one of this tenant's login sources ({})",
                        quote(v),
                        list(rules.login_sources.values())
                    ),
                ));
                None
            }
        },
    };
    if let Some(v) = values[Column::UserTypeId.index()] {
        if !rules.user_types.contains(v) {
            let l = label_of(Column::UserTypeId);
            errors.push(err(
                RowErrorCode::UnknownUserType,
                &l,
                format!(
                    "`{l}` {} is not one of this tenant's user types ({})",
                    quote(v),
                    list(rules.user_types.iter())
                ),
            ));
        }
    }
    let active = match values[Column::Active.index()] {
        None => None,
        Some("1") => Some(true),
        Some("0") => Some(false),
        Some(v) => {
            let l = label_of(Column::Active);
            errors.push(err(
                RowErrorCode::InvalidActive,
                &l,
                format!("`{l}` is {}; expected 0 (inactive) or 1 (active)", quote(v)),
            ));
            None
        }
    };
    if let Some(v) = values[Column::Email.index()] {
        if !email_address::EmailAddress::is_valid(v) || !v.contains('.') {
            let l = label_of(Column::Email);
            errors.push(err(
                RowErrorCode::InvalidEmail,
                &l,
                format!(
                    "`{l}` {} is not an email address (expected name@example.org)",
                    quote(v)
                ),
            ));
        }
    }
    let date_of_birth = match values[Column::DateOfBirth.index()] {
        None => None,
        Some(v) => match parse_date(v) {
            Ok(d) => Some(d),
            Err(DateError::Ambiguous(a, b)) => {
                let l = label_of(Column::DateOfBirth);
                errors.push(err(
                    RowErrorCode::AmbiguousDate,
                    &l,
                    format!(
                        "`{l}` {} could be {a} or {b}; write dates as YYYY-MM-DD",
                        quote(v)
                    ),
                ));
                None
            }
            Err(DateError::Invalid) => {
                let l = label_of(Column::DateOfBirth);
                errors.push(err(
                    RowErrorCode::InvalidDate,
                    &l,
                    format!(
                        "`{l}` {} is not a valid date; expected YYYY-MM-DD",
                        quote(v)
                    ),
                ));
                None
            }
        },
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    let (Some(unique_id), Some(login_source)) = (unique_id, login_source) else {
        return Err(errors);
    };
    let text = TEXT_COLUMNS.map(|c| values[c.index()]);
    let mut user = UserRow {
        row: raw.row,
        unique_id,
        login_source,
        text,
        date_of_birth,
        active,
        digest: [0; crate::digest::DIGEST_BYTES],
    };
    user.digest = crate::digest::of(&user);
    Ok(user)
}

fn err(code: RowErrorCode, column: &str, message: String) -> RowError {
    RowError {
        code,
        column: Some(column.to_owned()),
        message,
    }
}

fn quote(v: &str) -> String {
    format!("\"{}\"", truncate_for_message(v, 60))
}

fn list<'a>(items: impl Iterator<Item = &'a String>) -> String {
    let mut v: Vec<&String> = items.collect();
    v.sort();
    match v.len() {
        0 => "none are set up; ask your administrator".to_owned(),
        1..=10 => format!(
            "valid: {}",
            v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        ),
        n => format!("{n} are set up"),
    }
}

/// Why a date was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DateError {
    /// Not a date.
    Invalid,
    /// Two readings are possible (day/month order unknown); both given as YYYY-MM-DD.
    Ambiguous(String, String),
}

/// Parses a date of birth: `YYYY-MM-DD` (also with `/` or `.`, or `YYYYMMDD`, or with a
/// midnight time as Excel writes), month names (`3 Apr 2001`, `April 3, 2001`), and
/// day/month/year numerals when only one order makes a real date.
pub fn parse_date(v: &str) -> Result<NaiveDate, DateError> {
    let v = v.trim();
    let v = v
        .strip_suffix(" 00:00:00")
        .or_else(|| v.strip_suffix(" 00:00"))
        .or_else(|| v.strip_suffix("T00:00:00"))
        .unwrap_or(v);
    // The form asked for, YYYY-MM-DD, read without a format string (what "%Y-%m-%d" reads
    // for it); anything else, or a day that does not exist, takes the general path below.
    if let Some(d) = iso_date(v) {
        return plausible(d);
    }
    for fmt in [
        "%Y-%m-%d",
        "%Y/%m/%d",
        "%Y.%m.%d",
        "%Y%m%d",
        "%d %b %Y",
        "%d-%b-%Y",
        "%b %d, %Y",
        "%B %d, %Y",
        "%d %B %Y",
        "%B %d %Y",
        "%b %d %Y",
    ] {
        if let Ok(d) = NaiveDate::parse_from_str(v, fmt) {
            return plausible(d);
        }
    }
    let parts: Vec<&str> = v.split(['/', '-', '.']).collect();
    if parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && parts[2].len() == 4
    {
        let (a, b, y) = (
            parts[0].parse::<u32>().map_err(|_| DateError::Invalid)?,
            parts[1].parse::<u32>().map_err(|_| DateError::Invalid)?,
            parts[2].parse::<i32>().map_err(|_| DateError::Invalid)?,
        );
        let dm = NaiveDate::from_ymd_opt(y, b, a); // a = day
        let md = NaiveDate::from_ymd_opt(y, a, b); // a = month
        return match (dm, md) {
            (Some(x), Some(y)) if x != y => Err(DateError::Ambiguous(
                x.format("%Y-%m-%d").to_string(),
                y.format("%Y-%m-%d").to_string(),
            )),
            (Some(x), _) | (None, Some(x)) => plausible(x),
            (None, None) => Err(DateError::Invalid),
        };
    }
    Err(DateError::Invalid)
}

/// `YYYY-MM-DD` with exactly those digits, if it names a day.
fn iso_date(v: &str) -> Option<NaiveDate> {
    let b: &[u8; 10] = v.as_bytes().try_into().ok()?;
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        b[r].iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    if b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let year = i32::try_from(digits(0..4)?).ok()?;
    NaiveDate::from_ymd_opt(year, digits(5..7)?, digits(8..10)?)
}

fn plausible(d: NaiveDate) -> Result<NaiveDate, DateError> {
    let today = chrono::Utc::now().date_naive();
    if d.year() < 1900 || d > today {
        Err(DateError::Invalid)
    } else {
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> TenantRules {
        TenantRules::new(
            vec!["SSO".into(), "local".into()],
            vec!["1".into(), "2".into()],
        )
    }

    /// Checks one row; the row and the rules live as long as the test (a checked row
    /// borrows from both).
    fn check(header: &[&str], fields: &[&str]) -> Result<UserRow<'static>, Vec<RowError>> {
        let header: Vec<String> = header.iter().map(|s| s.to_string()).collect();
        let map = HeaderMap::parse(&header).unwrap();
        let raw: &'static RawRow = Box::leak(Box::new(RawRow {
            row: 2,
            fields: fields.iter().collect(),
            too_large: None,
        }));
        validate(&header, &map, raw, Box::leak(Box::new(rules())))
    }

    #[test]
    fn a_good_row() {
        let u = check(
            &[
                "unique_id",
                "login_source",
                "Email",
                "active",
                "date_of_birth",
                "user_type_id",
            ],
            &[" A1 ", "sso", "a@example.org", "1", "2001-04-03", "2"],
        )
        .unwrap();
        assert_eq!(u.unique_id, "A1");
        assert_eq!(u.login_source, "SSO");
        assert_eq!(u.active, Some(true));
        assert_eq!(u.value(Column::Email), Some("a@example.org"));
        assert_eq!(u.date_of_birth, NaiveDate::from_ymd_opt(2001, 4, 3));
    }

    #[test]
    fn every_problem_is_named() {
        let errs = check(
            &[
                "unique_id",
                "login_source",
                "email",
                "active",
                "date_of_birth",
                "user_type_id",
            ],
            &["", "ldap", "bob@", "yes", "03/04/2001", "9"],
        )
        .unwrap_err();
        let codes: Vec<_> = errs.iter().map(|e| e.code).collect();
        assert_eq!(
            codes,
            vec![
                RowErrorCode::RequiredMissing,
                RowErrorCode::UnknownLoginSource,
                RowErrorCode::UnknownUserType,
                RowErrorCode::InvalidActive,
                RowErrorCode::InvalidEmail,
                RowErrorCode::AmbiguousDate,
            ]
        );
        assert!(errs[1].message.contains("\"ldap\""), "{}", errs[1].message);
        assert!(
            errs[1].message.contains("valid: SSO, local"),
            "{}",
            errs[1].message
        );
        assert!(
            errs[5].message.contains("2001-04-03 or 2001-03-04"),
            "{}",
            errs[5].message
        );
    }

    #[test]
    fn field_count_and_trailing_empty_fields() {
        assert!(check(&["unique_id", "login_source"], &["1", "sso", "", ""]).is_ok());
        let e = check(&["unique_id", "login_source", "email"], &["1", "sso"]).unwrap_err();
        assert_eq!(e[0].code, RowErrorCode::FieldCount);
        assert!(e[0].message.contains("2 fields but the header has 3"));
    }

    #[test]
    fn lengths_and_control_characters() {
        let long = "x".repeat(101);
        let e = check(
            &["unique_id", "login_source", "first_name"],
            &["1", "sso", &long],
        )
        .unwrap_err();
        assert_eq!(e[0].code, RowErrorCode::TooLong);
        assert!(e[0].message.contains("101 characters"));
        let e = check(
            &["unique_id", "login_source", "first_name"],
            &["1", "sso", "a\u{7}b"],
        )
        .unwrap_err();
        assert_eq!(e[0].code, RowErrorCode::ControlCharacter);
        let street = check(
            &["unique_id", "login_source", "street"],
            &["1", "sso", "Line 1\nLine 2"],
        );
        assert_eq!(
            street.unwrap().value(Column::Street),
            Some("Line 1\nLine 2"),
            "a line break in a cell is data"
        );
    }

    #[test]
    fn dates() {
        let d = |s| parse_date(s);
        assert_eq!(
            d("2001-04-03"),
            Ok(NaiveDate::from_ymd_opt(2001, 4, 3).unwrap())
        );
        assert_eq!(
            d("25/12/1990"),
            Ok(NaiveDate::from_ymd_opt(1990, 12, 25).unwrap())
        );
        assert_eq!(
            d("12/25/1990"),
            Ok(NaiveDate::from_ymd_opt(1990, 12, 25).unwrap())
        );
        assert_eq!(
            d("05/05/1990"),
            Ok(NaiveDate::from_ymd_opt(1990, 5, 5).unwrap())
        );
        assert_eq!(
            d("3 Apr 2001"),
            Ok(NaiveDate::from_ymd_opt(2001, 4, 3).unwrap())
        );
        assert_eq!(
            d("1990-12-25 00:00:00"),
            Ok(NaiveDate::from_ymd_opt(1990, 12, 25).unwrap())
        );
        assert!(matches!(d("03/04/2001"), Err(DateError::Ambiguous(_, _))));
        assert_eq!(d("2001-02-30"), Err(DateError::Invalid));
        assert_eq!(d("3000-01-01"), Err(DateError::Invalid));
        assert_eq!(d("soon"), Err(DateError::Invalid));
    }

    /// The YYYY-MM-DD shortcut reads exactly what chrono's "%Y-%m-%d" reads, and nothing it
    /// does not: every day, month and year around the ones that exist, and stray bytes.
    #[test]
    fn the_iso_shortcut_reads_as_the_format_does() {
        let chrono_reads = |v: &str| NaiveDate::parse_from_str(v, "%Y-%m-%d").ok();
        for year in [0, 1, 999, 1899, 1900, 1999, 2000, 2024, 2100, 9999] {
            for month in 0..=13 {
                for day in 0..=32 {
                    let v = format!("{year:04}-{month:02}-{day:02}");
                    if let Some(d) = iso_date(&v) {
                        assert_eq!(Some(d), chrono_reads(&v), "{v}");
                    } else {
                        assert_eq!(chrono_reads(&v), None, "{v}");
                    }
                }
            }
        }
        for v in [
            "2001-4-03",
            "2001-04-3",
            "2001/04/03",
            "20010-4-03",
            "2001-04-03 ",
            "+001-04-03",
            "2001-0a-03",
            "2001--4-03",
            "２００１-04-03",
            "2001-04-031",
        ] {
            assert_eq!(iso_date(v), None, "{v}");
        }
    }
}
