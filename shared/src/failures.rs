//! A file's failure records as stored (`row_failures`), and the failures CSV built from them
//! exactly as the report mails it. The notifier attaches it; `muictl files failures` prints
//! it again.

use diesel::prelude::*;

use crate::domain::ImportFileId;
use crate::messages::{RowError, RowFailure};
use crate::schema::import_files;

/// A file's failure records, with what the CSV needs of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFailures {
    /// The file's name as uploaded.
    pub file_name: String,
    /// The file's header as uploaded (empty if the file has none stored).
    pub header: Vec<String>,
    /// The failure records, by row number.
    pub failures: Vec<RowFailure>,
}

impl FileFailures {
    /// The failures CSV of the whole list (see [`failures_csv`]).
    pub fn csv(&self) -> Result<Vec<u8>, csv::Error> {
        failures_csv(&self.header, &self.failures)
    }
}

/// Every failure record of a file, with its name and header; `None` if there is no such file.
pub fn load_file(
    conn: &mut PgConnection,
    file_id: ImportFileId,
) -> QueryResult<Option<FileFailures>> {
    let file: Option<(String, Option<serde_json::Value>)> = import_files::table
        .find(file_id.0)
        .select((import_files::file_name, import_files::header))
        .first(conn)
        .optional()?;
    let Some((file_name, header)) = file else {
        return Ok(None);
    };
    let failures = load_failures(conn, file_id, i64::MAX)?;
    Ok(Some(FileFailures {
        file_name,
        header: header_of(header),
        failures,
    }))
}

/// A file's stored header (`import_files.header`, a JSON array of strings) as a list; empty
/// when there is none or it is not a list of strings.
pub fn header_of(header: Option<serde_json::Value>) -> Vec<String> {
    header
        .and_then(|h| serde_json::from_value(h).ok())
        .unwrap_or_default()
}

/// The first `limit` failure records of a file, by row number.
pub fn load_failures(
    conn: &mut PgConnection,
    file_id: ImportFileId,
    limit: i64,
) -> Result<Vec<RowFailure>, diesel::result::Error> {
    load_failures_within(conn, file_id, limit, i64::MAX)
}

/// The first `limit` failure records of a file, by row number, and of those only as many
/// as hold at most `max_bytes` of cells and messages (as JSON text) past the first: what a
/// report loads is bounded by its settings, never by what a tenant's rows hold.
pub fn load_failures_within(
    conn: &mut PgConnection,
    file_id: ImportFileId,
    limit: i64,
    max_bytes: i64,
) -> Result<Vec<RowFailure>, diesel::result::Error> {
    load_page(conn, file_id, i64::MIN, limit, max_bytes)
}

/// [`load_failures_within`] of the records after row `after`.
/// A failure record as `row_failures` stores it.
#[derive(QueryableByName)]
struct Stored {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    row_number: i64,
    #[diesel(sql_type = diesel::sql_types::Jsonb)]
    fields: serde_json::Value,
    #[diesel(sql_type = diesel::sql_types::Jsonb)]
    errors: serde_json::Value,
}

impl Stored {
    fn into_failure(self) -> QueryResult<RowFailure> {
        let bad = |e: serde_json::Error| diesel::result::Error::DeserializationError(Box::new(e));
        Ok(RowFailure {
            row: self.row_number as u64,
            fields: serde_json::from_value(self.fields).map_err(bad)?,
            errors: serde_json::from_value(self.errors).map_err(bad)?,
        })
    }
}

fn load_page(
    conn: &mut PgConnection,
    file_id: ImportFileId,
    after: i64,
    limit: i64,
    max_bytes: i64,
) -> Result<Vec<RowFailure>, diesel::result::Error> {
    use diesel::sql_types::BigInt;
    let rows: Vec<Stored> = diesel::sql_query(
        "SELECT row_number, fields, errors FROM \
           (SELECT row_number, fields, errors, len, sum(len) OVER (ORDER BY row_number) AS upto \
            FROM (SELECT row_number, fields, errors, \
                         octet_length(fields::text) + octet_length(errors::text) AS len \
                  FROM row_failures WHERE file_id = $1 AND row_number > $4 \
                  ORDER BY row_number LIMIT $2) f) s \
         WHERE upto - len < $3 ORDER BY row_number",
    )
    .bind::<BigInt, _>(file_id.0)
    .bind::<BigInt, _>(limit)
    .bind::<BigInt, _>(max_bytes)
    .bind::<BigInt, _>(after)
    .load(conn)?;
    rows.into_iter().map(Stored::into_failure).collect()
}

/// Which of a file's failure records to show: those with an error of this code and/or on
/// this column (as the tenant named it); `None` for any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailureFilter {
    /// An error code (`invalid_email`, ...).
    pub code: Option<String>,
    /// A column, as the tenant's header names it.
    pub column: Option<String>,
}

/// One page of a file's failure records, by row number: those matching `filter`, skipping
/// `offset`, at most `limit`; with how many match in all.
pub fn failures_page(
    conn: &mut PgConnection,
    file_id: ImportFileId,
    filter: &FailureFilter,
    offset: i64,
    limit: i64,
) -> QueryResult<(i64, Vec<RowFailure>)> {
    use diesel::sql_types::{BigInt, Nullable, Text};
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        total: i64,
    }
    const MATCHES: &str = "file_id = $1 \
        AND ($2::TEXT IS NULL OR errors @> jsonb_build_array(jsonb_build_object('code', $2::TEXT))) \
        AND ($3::TEXT IS NULL OR errors @> jsonb_build_array(jsonb_build_object('column', $3::TEXT)))";
    let total: Count = diesel::sql_query(format!(
        "SELECT count(*) AS total FROM row_failures WHERE {MATCHES}"
    ))
    .bind::<BigInt, _>(file_id.0)
    .bind::<Nullable<Text>, _>(filter.code.as_deref())
    .bind::<Nullable<Text>, _>(filter.column.as_deref())
    .get_result(conn)?;
    let rows: Vec<Stored> = diesel::sql_query(format!(
        "SELECT row_number, fields, errors FROM row_failures \
         WHERE {MATCHES} ORDER BY row_number OFFSET $4 LIMIT $5"
    ))
    .bind::<BigInt, _>(file_id.0)
    .bind::<Nullable<Text>, _>(filter.code.as_deref())
    .bind::<Nullable<Text>, _>(filter.column.as_deref())
    .bind::<BigInt, _>(offset.max(0))
    .bind::<BigInt, _>(limit.max(0))
    .load(conn)?;
    let failures = rows
        .into_iter()
        .map(Stored::into_failure)
        .collect::<QueryResult<Vec<_>>>()?;
    Ok((total.total, failures))
}

/// The error codes and the columns a file's failure records name, each sorted: what a
/// failures table can be filtered by.
pub fn failure_facets(
    conn: &mut PgConnection,
    file_id: ImportFileId,
) -> QueryResult<(Vec<String>, Vec<String>)> {
    use diesel::sql_types::{BigInt, Text};
    #[derive(QueryableByName)]
    struct Facet {
        #[diesel(sql_type = Text)]
        kind: String,
        #[diesel(sql_type = Text)]
        value: String,
    }
    let rows: Vec<Facet> = diesel::sql_query(
        "SELECT DISTINCT k.kind, k.value FROM row_failures f \
           CROSS JOIN LATERAL jsonb_array_elements(f.errors) e \
           CROSS JOIN LATERAL (VALUES ('code', e->>'code'), ('column', e->>'column')) k(kind, value) \
         WHERE f.file_id = $1 AND k.value IS NOT NULL ORDER BY k.kind, k.value",
    )
    .bind::<BigInt, _>(file_id.0)
    .load(conn)?;
    let (codes, columns): (Vec<Facet>, Vec<Facet>) =
        rows.into_iter().partition(|f| f.kind == "code");
    Ok((
        codes.into_iter().map(|f| f.value).collect(),
        columns.into_iter().map(|f| f.value).collect(),
    ))
}

/// The failures CSV's file name as mailed (and as the console downloads it): `<file>.failures.csv`, with path separators and control
/// characters replaced.
pub fn attachment_name(file_name: &str) -> String {
    format!("{}.failures.csv", safe_name(file_name))
}

/// A tenant's file name made fit to name an attachment: path separators and control
/// characters replaced by `_`.
pub fn safe_name(file_name: &str) -> String {
    file_name
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// A cell made safe to open in a spreadsheet: a value that a spreadsheet would run as a
/// formula (starting with `=`, `+`, `-`, `@`, tab or carriage return) gets a leading `'`, as
/// OWASP's CSV-injection guidance recommends. Values are otherwise unchanged.
pub fn neutralise(cell: &str) -> String {
    match cell.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{cell}"),
        _ => cell.to_owned(),
    }
}

/// The failures CSV: UTF-8 with BOM (so Excel shows accents right), columns `row`, the
/// uploaded columns in uploaded order, `error_code`, `reason`. Rows sorted by row number.
pub fn failures_csv(header: &[String], failures: &[RowFailure]) -> Result<Vec<u8>, csv::Error> {
    Ok(failures_csv_with_ends(header, failures)?.0)
}

/// [`failures_csv`], with where each row ends: `ends[k]` is the length of the CSV holding
/// the header and the first `k` rows (`ends[0]`: the header alone), so a report can attach
/// a prefix of the list without writing it again.
pub fn failures_csv_with_ends(
    header: &[String],
    failures: &[RowFailure],
) -> Result<(Vec<u8>, Vec<usize>), csv::Error> {
    let width = failures
        .iter()
        .map(|f| f.fields.len())
        .max()
        .unwrap_or(0)
        .max(header.len());
    let mut out = Vec::with_capacity(64 + failures.len() * 128);
    let mut ends = Vec::with_capacity(failures.len() + 1);
    out.extend_from_slice("\u{feff}".as_bytes());
    {
        let mut w = csv::WriterBuilder::new()
            .terminator(csv::Terminator::CRLF)
            .from_writer(&mut out);
        w.write_record(csv_head(header, width))?;
        w.flush()?;
        ends.push(w.get_ref().len());
        let mut sorted: Vec<&RowFailure> = failures.iter().collect();
        sorted.sort_by_key(|f| f.row);
        for f in sorted {
            w.write_record(csv_row(f, width))?;
            // The writer buffers; flushing per row (into memory) makes the length exact.
            w.flush()?;
            ends.push(w.get_ref().len());
        }
    }
    Ok((out, ends))
}

/// The failures CSV's header row: `row`, the uploaded columns (as many as the widest
/// record, extras named), `error_code`, `reason`.
fn csv_head(header: &[String], width: usize) -> Vec<String> {
    let mut head = vec!["row".to_owned()];
    for i in 0..width {
        head.push(match header.get(i) {
            Some(h) => neutralise(h.trim()),
            None => format!("(extra {})", i + 1 - header.len()),
        });
    }
    head.push("error_code".to_owned());
    head.push("reason".to_owned());
    head
}

/// One failed row of the failures CSV.
fn csv_row(f: &RowFailure, width: usize) -> Vec<String> {
    let mut rec = vec![f.row.to_string()];
    for i in 0..width {
        rec.push(neutralise(
            f.fields.get(i).map(String::as_str).unwrap_or(""),
        ));
    }
    rec.push(codes(&f.errors));
    rec.push(neutralise(&reasons(&f.errors)));
    rec
}

/// Records a streamed failures CSV reads at a time ([`write_file_csv`]), and the bytes of
/// cells and messages such a page holds at most past its first record.
pub const STREAM_PAGE_ROWS: i64 = 1000;
/// See [`STREAM_PAGE_ROWS`].
pub const STREAM_PAGE_BYTES: i64 = 4 << 20;

/// Why a streamed failures CSV stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading the records failed.
    #[error("reading the failure records: {0}")]
    Db(#[from] diesel::result::Error),
    /// Writing the CSV failed (the reader went away, a full disk).
    #[error("writing the failures CSV: {0}")]
    Csv(#[from] csv::Error),
}

/// A file's name and stored header (see [`header_of`]); `None` if there is no such file.
pub fn name_and_header(
    conn: &mut PgConnection,
    file_id: ImportFileId,
) -> QueryResult<Option<(String, Vec<String>)>> {
    let file: Option<(String, Option<serde_json::Value>)> = import_files::table
        .find(file_id.0)
        .select((import_files::file_name, import_files::header))
        .first(conn)
        .optional()?;
    Ok(file.map(|(name, header)| (name, header_of(header))))
}

/// Writes a file's whole failures CSV to `out`: the same bytes as [`failures_csv`] of every
/// record, read a page at a time ([`STREAM_PAGE_ROWS`], [`STREAM_PAGE_BYTES`]), so memory
/// stays bounded by one page whatever the file holds (the console's download, `muictl
/// files failures`). Returns the failed rows written.
pub fn write_file_csv(
    conn: &mut PgConnection,
    file_id: ImportFileId,
    header: &[String],
    mut out: impl std::io::Write,
) -> Result<u64, StreamError> {
    use diesel::sql_types::{BigInt, Integer};
    #[derive(QueryableByName)]
    struct Width {
        #[diesel(sql_type = Integer)]
        width: i32,
    }
    let widest: Width = diesel::sql_query(
        "SELECT coalesce(max(jsonb_array_length(fields)), 0)::int4 AS width \
         FROM row_failures WHERE file_id = $1",
    )
    .bind::<BigInt, _>(file_id.0)
    .get_result(conn)?;
    let width = usize::try_from(widest.width).unwrap_or(0).max(header.len());
    out.write_all("\u{feff}".as_bytes())
        .map_err(csv::Error::from)?;
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(out);
    w.write_record(csv_head(header, width))?;
    let mut after = i64::MIN;
    let mut written = 0;
    loop {
        let page = load_page(conn, file_id, after, STREAM_PAGE_ROWS, STREAM_PAGE_BYTES)?;
        let Some(last) = page.last() else { break };
        after = last.row as i64;
        for f in &page {
            w.write_record(csv_row(f, width))?;
            written += 1;
        }
    }
    w.flush().map_err(csv::Error::from)?;
    Ok(written)
}

/// A failed row's error codes, as the failures CSV gives them.
pub fn codes(errors: &[RowError]) -> String {
    errors
        .iter()
        .map(|e| e.code.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

/// A failed row's reasons, as the failures CSV gives them.
pub fn reasons(errors: &[RowError]) -> String {
    errors
        .iter()
        .map(|e| e.message.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::RowErrorCode;

    #[test]
    fn csv_has_bom_row_numbers_uploaded_values_and_reasons() {
        let header = vec![
            "unique_id".to_owned(),
            "login_source".to_owned(),
            "Email".to_owned(),
        ];
        let failures = vec![
            RowFailure {
                row: 7,
                fields: vec!["b".into(), "sso".into(), "=cmd|' /C calc'!A0".into()],
                errors: vec![RowError {
                    code: RowErrorCode::InvalidEmail,
                    column: Some("Email".into()),
                    message: "`Email` \"=cmd\" is not an email address".into(),
                }],
            },
            RowFailure {
                row: 3,
                fields: vec!["".into(), "ldap".into(), "Zoë@x.org".into()],
                errors: vec![
                    RowError {
                        code: RowErrorCode::RequiredMissing,
                        column: None,
                        message: "one".into(),
                    },
                    RowError {
                        code: RowErrorCode::UnknownLoginSource,
                        column: None,
                        message: "two".into(),
                    },
                ],
            },
        ];
        let bytes = failures_csv(&header, &failures).unwrap();
        let text = String::from_utf8(bytes).unwrap();
        let mut lines = text.split("\r\n");
        assert_eq!(
            lines.next().unwrap(),
            "\u{feff}row,unique_id,login_source,Email,error_code,reason"
        );
        assert_eq!(
            lines.next().unwrap(),
            "3,,ldap,Zoë@x.org,required_missing; unknown_login_source,one; two"
        );
        let third = lines.next().unwrap();
        assert!(third.starts_with("7,b,sso,'=cmd|"), "{third}");
    }

    #[test]
    fn neutralises_formula_starts_only() {
        assert_eq!(neutralise("=1+1"), "'=1+1");
        assert_eq!(neutralise("+15551234"), "'+15551234");
        assert_eq!(neutralise("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(neutralise("-2"), "'-2");
        assert_eq!(neutralise("a=b"), "a=b");
        assert_eq!(neutralise(""), "");
    }

    #[test]
    fn row_ends_cut_the_csv_at_row_boundaries() {
        let header = vec!["unique_id".to_owned()];
        let failures: Vec<RowFailure> = (0..5)
            .map(|i| RowFailure {
                row: 10 - i,
                fields: vec![format!("u{i}")],
                errors: vec![],
            })
            .collect();
        let (all, ends) = failures_csv_with_ends(&header, &failures).unwrap();
        assert_eq!(ends.len(), 6);
        assert_eq!(*ends.last().unwrap(), all.len());
        let first_two = String::from_utf8(all[..ends[2]].to_vec()).unwrap();
        assert_eq!(
            first_two,
            "\u{feff}row,unique_id,error_code,reason\r\n6,u4,,\r\n7,u3,,\r\n"
        );
        assert_eq!(all, failures_csv(&header, &failures).unwrap());
    }

    #[test]
    fn a_stored_header_that_is_not_a_list_of_strings_reads_as_none() {
        assert_eq!(
            header_of(Some(serde_json::json!(["a", " b"]))),
            vec!["a".to_owned(), " b".to_owned()]
        );
        assert!(header_of(Some(serde_json::json!({"a": 1}))).is_empty());
        assert!(header_of(None).is_empty());
    }
}
