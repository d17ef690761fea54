//! Domain types: tenants, files, the CSV columns we know and how an uploaded header maps to them.
//!
//! Raw input (folder names, header cells) is parsed here once; the rest of the code works with
//! the parsed values.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Database id of a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TenantId(pub i64);

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tenant_{}", self.0)
    }
}

/// Database id of one arrival of a file. Ids grow in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ImportFileId(pub i64);

impl fmt::Display for ImportFileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "file_{}", self.0)
    }
}

/// A tenant's drop-folder name: also its SFTP account name, so it is kept to what every
/// file system and `useradd` accept.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantSlug(String);

/// Why a string is not a tenant slug.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlugError {
    /// Empty, or longer than 32 characters.
    #[error("a tenant name must be 1 to 32 characters long, got {0}")]
    Length(usize),
    /// A character outside `a-z`, `0-9`, `-`, `_`, or a leading character that is not a letter.
    #[error("a tenant name must start with a lowercase letter and use only a-z, 0-9, '-' and '_': {0:?}")]
    Characters(String),
    /// A name the drop folder layout reserves.
    #[error("{0:?} is reserved")]
    Reserved(String),
}

impl TenantSlug {
    /// Parses a slug: lowercase ASCII letter first, then letters, digits, `-` or `_`.
    pub fn parse(s: &str) -> Result<Self, SlugError> {
        let len = s.chars().count();
        if len == 0 || len > 32 {
            return Err(SlugError::Length(len));
        }
        let mut chars = s.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        if !first_ok
            || !s
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        {
            return Err(SlugError::Characters(s.to_owned()));
        }
        if s == "bak" {
            return Err(SlugError::Reserved(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }

    /// The slug as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TenantSlug {
    type Error = SlugError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<TenantSlug> for String {
    fn from(value: TenantSlug) -> Self {
        value.0
    }
}

impl fmt::Display for TenantSlug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! columns {
    ($( $variant:ident => $name:literal, $max:literal, [$($alias:literal),*] ;)*) => {
        /// A user column of the import format (the seed's list).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum Column { $($variant),* }

        impl Column {
            /// Every column, in the seed's order.
            pub const ALL: &'static [Column] = &[$(Column::$variant),*];

            /// The canonical column name, as documented and stored.
            pub fn name(self) -> &'static str {
                match self { $(Column::$variant => $name),* }
            }

            /// The longest value the column stores, in characters.
            pub fn max_len(self) -> usize {
                match self { $(Column::$variant => $max),* }
            }

            /// Other spellings accepted in a header (after normalisation).
            pub fn aliases(self) -> &'static [&'static str] {
                match self { $(Column::$variant => &[$($alias),*]),* }
            }
        }
    };
}

columns! {
    UniqueId => "unique_id", 100, [];
    LoginSource => "login_source", 100, [];
    FirstName => "first_name", 100, [];
    LastName => "last_name", 100, [];
    UserName => "user_name", 150, ["username"];
    Email => "email", 254, ["email_address"];
    Street => "street", 200, [];
    City => "city", 100, [];
    Province => "province", 100, [];
    PostalCode => "postal_code", 20, [];
    Street2 => "street2", 200, [];
    City2 => "city2", 100, [];
    State2 => "state2", 100, [];
    Zip2 => "zip2", 20, [];
    PhoneCell => "phone_cell", 40, [];
    UserTypeId => "user_type_id", 50, [];
    EmployNo => "employ_no", 50, [];
    EmployeePhone => "employee_phone", 40, [];
    StudentNo => "student_no", 50, [];
    StudentPhone => "student_phone", 40, [];
    DriversLicenseNum => "drivers_license_num", 50, ["driver_licence_num", "drivers_licence_num", "driver_license_num"];
    DriversLicenseProv => "drivers_license_prov", 50, ["driver_licence_prov", "drivers_licence_prov", "driver_license_prov"];
    DateOfBirth => "date_of_birth", 10, ["data_of_birth"];
    Active => "active", 1, [];
}

impl Column {
    /// Columns a file must have.
    pub const REQUIRED: &'static [Column] = &[Column::UniqueId, Column::LoginSource];

    /// Index into [`Column::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Finds the column an uploaded header cell names: case-insensitive, surrounding spaces
    /// and quotes trimmed, spaces and hyphens read as underscores (`First Name` is
    /// `first_name`).
    pub fn from_header(cell: &str) -> Option<Column> {
        let normalised = normalise_header(cell);
        Column::ALL
            .iter()
            .copied()
            .find(|c| c.name() == normalised || c.aliases().iter().any(|a| *a == normalised))
    }
}

impl fmt::Display for Column {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The normal form of a header cell used for matching.
pub fn normalise_header(cell: &str) -> String {
    let trimmed =
        cell.trim_matches(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '\u{feff}');
    let mut out = String::with_capacity(trimmed.len());
    let mut last_us = false;
    for c in trimmed.chars() {
        let c = if c == ' ' || c == '-' { '_' } else { c };
        if c == '_' {
            if !last_us {
                out.push('_');
            }
            last_us = true;
        } else {
            out.extend(c.to_lowercase());
            last_us = false;
        }
    }
    out
}

/// How an uploaded header maps onto our columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMap {
    /// For each uploaded position, the column it carries (None: ignored).
    pub positions: Vec<Option<Column>>,
    /// Uploaded header cells we do not know, in upload order; they are ignored.
    pub ignored: Vec<String>,
}

/// A header that cannot be imported: a file-level error.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderError {
    /// One or more required columns are absent.
    #[error("the header has no {} column{} (found: {found})", missing.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(" or "), if missing.len() > 1 { "s" } else { "" })]
    MissingRequired {
        /// The required columns not found.
        missing: Vec<Column>,
        /// The header as uploaded, for the message.
        found: String,
    },
    /// A column appears twice, so we cannot tell which value is meant.
    #[error("column `{column}` appears twice in the header (columns {first} and {second})")]
    DuplicateColumn {
        /// The column given twice.
        column: Column,
        /// 1-based position of the first occurrence.
        first: usize,
        /// 1-based position of the second occurrence.
        second: usize,
    },
}

impl HeaderMap {
    /// Maps an uploaded header row.
    pub fn parse<S: AsRef<str>>(header: &[S]) -> Result<HeaderMap, HeaderError> {
        let mut positions = Vec::with_capacity(header.len());
        let mut ignored = Vec::new();
        let mut seen: [Option<usize>; 24] = [None; 24];
        for (i, cell) in header.iter().enumerate() {
            let cell = cell.as_ref();
            match Column::from_header(cell) {
                Some(col) => {
                    if let Some(first) = seen[col.index()] {
                        return Err(HeaderError::DuplicateColumn {
                            column: col,
                            first: first + 1,
                            second: i + 1,
                        });
                    }
                    seen[col.index()] = Some(i);
                    positions.push(Some(col));
                }
                None => {
                    if !cell.trim().is_empty() {
                        ignored.push(cell.trim().to_owned());
                    }
                    positions.push(None);
                }
            }
        }
        let missing: Vec<Column> = Column::REQUIRED
            .iter()
            .copied()
            .filter(|c| seen[c.index()].is_none())
            .collect();
        if !missing.is_empty() {
            let found = header
                .iter()
                .map(|c| c.as_ref().trim())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(HeaderError::MissingRequired {
                missing,
                found: truncate_for_message(&found, 200),
            });
        }
        Ok(HeaderMap { positions, ignored })
    }

    /// Position of a column in the uploaded row, if present.
    pub fn position(&self, column: Column) -> Option<usize> {
        self.positions.iter().position(|c| *c == Some(column))
    }
}

/// `s` as PostgreSQL can store it: `text` and `jsonb` refuse the NUL character (U+0000),
/// which a UTF-16 file carries as ordinary text, so each is written as U+FFFD (the
/// replacement character) wherever a tenant's text is kept (a failure record, a file's
/// error or notice). The reason a row or file was refused names the character itself.
pub fn storable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\u{fffd}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// Cuts `s` to at most `max` characters for quoting in a message, marking the cut.
pub fn truncate_for_message(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_matching_is_forgiving() {
        assert_eq!(Column::from_header(" First Name "), Some(Column::FirstName));
        assert_eq!(Column::from_header("\"UNIQUE_ID\""), Some(Column::UniqueId));
        assert_eq!(
            Column::from_header("data_of_birth"),
            Some(Column::DateOfBirth)
        );
        assert_eq!(
            Column::from_header("driver_licence_num"),
            Some(Column::DriversLicenseNum)
        );
        assert_eq!(Column::from_header("favourite_colour"), None);
    }

    #[test]
    fn column_table_matches_all_order() {
        for (i, c) in Column::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
        assert_eq!(Column::ALL.len(), 24);
    }

    #[test]
    fn header_errors_name_the_problem() {
        let err = HeaderMap::parse(&["unique_id", "email"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the header has no `login_source` column (found: unique_id, email)"
        );
        let err = HeaderMap::parse(&["unique_id", "login_source", "Email", "email"]).unwrap_err();
        assert!(matches!(
            err,
            HeaderError::DuplicateColumn {
                column: Column::Email,
                first: 3,
                second: 4
            }
        ));
        let map = HeaderMap::parse(&["Login Source", "unique_id", "shoe size"]).unwrap();
        assert_eq!(map.ignored, vec!["shoe size".to_owned()]);
        assert_eq!(map.position(Column::UniqueId), Some(1));
    }

    #[test]
    fn slugs() {
        assert!(TenantSlug::parse("acme-university").is_ok());
        assert!(TenantSlug::parse("../etc").is_err());
        assert!(TenantSlug::parse("Acme").is_err());
        assert!(TenantSlug::parse("bak").is_err());
        assert!(TenantSlug::parse("").is_err());
    }
}
