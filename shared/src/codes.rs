//! The vocabulary of failures: why a row or a whole file was not imported, as stable codes
//! with a human message (documented in `docs/errors.md`). Domain data for the tenant, not Rust
//! errors: the wire messages ([`crate::messages`]) carry them, the reports print them.

use serde::{Deserialize, Serialize};

/// Largest row ingest hands over, in bytes of UTF-8 (quoted line breaks included).
pub const MAX_ROW_BYTES: usize = 1 << 20;

/// One problem with one row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowError {
    /// Stable code, for filtering and documentation.
    pub code: RowErrorCode,
    /// The column concerned, as the tenant named it, if any.
    pub column: Option<String>,
    /// Human message naming the column, quoting the value and saying what was expected.
    pub message: String,
}

/// Stable codes for row failures. Documented in `docs/errors.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RowErrorCode {
    /// A required value (unique_id, login_source) is empty.
    RequiredMissing,
    /// The login source is not one of the tenant's.
    UnknownLoginSource,
    /// The user type is not one of the tenant's.
    UnknownUserType,
    /// `active` is not `0` or `1`.
    InvalidActive,
    /// The email is not an address.
    InvalidEmail,
    /// The date of birth is not a real date.
    InvalidDate,
    /// The date of birth could be read two ways.
    AmbiguousDate,
    /// A value is longer than its column stores.
    TooLong,
    /// A value holds control characters.
    ControlCharacter,
    /// The row has more or fewer fields than the header.
    FieldCount,
    /// A later row of the same file has the same unique_id and wins.
    DuplicateUniqueId,
    /// The email already belongs to another user of the tenant.
    EmailTaken,
    /// The user name already belongs to another user of the tenant.
    UserNameTaken,
    /// The row is larger than the service's bound for one row (usually a quote opened in
    /// it and closed much further down).
    RecordTooLarge,
}

impl RowErrorCode {
    /// The code as written in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RequiredMissing => "required_missing",
            Self::UnknownLoginSource => "unknown_login_source",
            Self::UnknownUserType => "unknown_user_type",
            Self::InvalidActive => "invalid_active",
            Self::InvalidEmail => "invalid_email",
            Self::InvalidDate => "invalid_date",
            Self::AmbiguousDate => "ambiguous_date",
            Self::TooLong => "too_long",
            Self::ControlCharacter => "control_character",
            Self::FieldCount => "field_count",
            Self::DuplicateUniqueId => "duplicate_unique_id",
            Self::EmailTaken => "email_taken",
            Self::UserNameTaken => "user_name_taken",
            Self::RecordTooLarge => "record_too_large",
        }
    }
}

/// Stable codes for file-level failures (nothing of the file is imported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FileErrorCode {
    /// The file has no bytes, or only blank lines.
    EmptyFile,
    /// The file has a header and no rows.
    HeaderOnly,
    /// A required column is missing from the header.
    MissingRequiredColumn,
    /// A column is named twice in the header.
    DuplicateColumn,
    /// The content is not CSV text (a spreadsheet or other binary).
    NotCsv,
    /// The name does not end in `.csv`.
    NotCsvName,
    /// Not a regular file (symlink, FIFO, device, directory).
    NotRegularFile,
    /// The CSV structure could not be read.
    MalformedCsv,
    /// A line is longer than the documented limit.
    LineTooLong,
    /// The file is larger (bytes or rows) than the deployment accepts.
    TooLarge,
    /// Bytes that the detected encoding cannot explain (a damaged UTF-8 file).
    BadEncoding,
    /// The file could not be read.
    Unreadable,
    /// A quote opened in a row is never closed: the rest of the file would be one cell.
    UnclosedQuote,
    /// The import service failed on the file again and again with an error that does not
    /// pass (a fault of ours, or an input nobody foresaw): the file is ended rather than
    /// left to hold back its tenant's later files.
    InternalError,
    /// An operator ended the file before it was read to its end (`muictl files end`).
    EndedByOperator,
}

impl FileErrorCode {
    /// The code as written in reports and stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EmptyFile => "empty_file",
            Self::HeaderOnly => "header_only",
            Self::MissingRequiredColumn => "missing_required_column",
            Self::DuplicateColumn => "duplicate_column",
            Self::NotCsv => "not_csv",
            Self::NotCsvName => "not_csv_name",
            Self::NotRegularFile => "not_regular_file",
            Self::MalformedCsv => "malformed_csv",
            Self::LineTooLong => "line_too_long",
            Self::TooLarge => "too_large",
            Self::BadEncoding => "bad_encoding",
            Self::Unreadable => "unreadable",
            Self::UnclosedQuote => "unclosed_quote",
            Self::InternalError => "internal_error",
            Self::EndedByOperator => "ended_by_operator",
        }
    }
}
