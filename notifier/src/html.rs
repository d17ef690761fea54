//! The HTML part of a report: the summary counts, the file-level cause if any, and the
//! first failed rows as a table (row, column, value, reason), readable on a phone.
//!
//! Built with `maud`'s compiled templates, which escape every value put into the page, so
//! nothing a tenant uploaded (a file name, a header, a cell) can become markup. No remote
//! images, no scripts, no external style sheets: inline styles only.

use maud::{html, Markup, DOCTYPE};
use mui_shared::messages::RowFailure;

use crate::report::{FileSummary, ListNote};

/// Failed rows shown in the table at most; the attachment has them all.
pub const TABLE_ROWS: usize = 50;

/// The page's one style sheet, inline (no remote style sheet); cells are styled here
/// rather than one by one, so that fifty rows stay small.
const STYLE: &str = "td,th{border:1px solid #ccc;padding:4px 6px;text-align:left;\
                     vertical-align:top;word-break:break-word}table{border-collapse:collapse}";

/// One line of the table: a failed row's number, the columns its errors name, the values
/// it had there, and the reasons (as the failures CSV gives them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRow {
    /// Row number in the tenant's file.
    pub row: u64,
    /// Columns the errors name (`; `-separated), as the tenant named them.
    pub column: String,
    /// The row's values in those columns.
    pub value: String,
    /// The reasons, as in the CSV's `reason` column.
    pub reason: String,
}

/// The table's lines for `failures` (in row order, at most [`TABLE_ROWS`]).
pub fn table_rows(header: &[String], failures: &[RowFailure]) -> Vec<TableRow> {
    let mut sorted: Vec<&RowFailure> = failures.iter().collect();
    sorted.sort_by_key(|f| f.row);
    sorted
        .into_iter()
        .take(TABLE_ROWS)
        .map(|f| {
            let mut columns = Vec::new();
            let mut values = Vec::new();
            for e in &f.errors {
                if let Some(c) = &e.column {
                    if columns.contains(c) {
                        continue;
                    }
                    let value = header
                        .iter()
                        .position(|h| h.trim().eq_ignore_ascii_case(c.trim()))
                        .and_then(|i| f.fields.get(i))
                        .cloned()
                        .unwrap_or_default();
                    columns.push(c.clone());
                    values.push(value);
                }
            }
            TableRow {
                row: f.row,
                column: columns.join("; "),
                value: values.join("; "),
                reason: mui_shared::failures::reasons(&f.errors),
            }
        })
        .collect()
}

fn count(label: &str, n: i64) -> Markup {
    html! {
        tr {
            th { (label) }
            td { (n) }
        }
    }
}

/// The page for a file's report.
pub fn report_html(
    s: &FileSummary,
    header: &[String],
    failures: &[RowFailure],
    list: &ListNote,
) -> String {
    let rows = table_rows(header, failures);
    let title = s.subject();
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                style { (STYLE) }
            }
            body style="font-family:-apple-system,Segoe UI,Roboto,Arial,sans-serif;font-size:15px;line-height:1.4;color:#222;margin:0;padding:12px;max-width:720px" {
                h1 style="font-size:18px;margin:0 0 12px" { (title) }
                @if s.dry_run {
                    p style="background:#fff4ce;border:1px solid #e0c060;padding:8px" {
                        strong { "Validation only: nothing was changed." }
                        " Your file was checked exactly as an import would check it; no user, no permit and no archive was changed. These are the counts an import of it would give now. To import it, upload it again with a name ending in .csv only."
                    }
                }
                @if !s.notices.is_empty() {
                    p { strong { "Please note:" } }
                    ul {
                        @for n in &s.notices { li { (n) } }
                    }
                }
                p {
                    "File " strong { (s.file_name) } ", received " (s.received_at) "."
                }
                @if s.file_failed() {
                    p style="background:#fde7e9;border:1px solid #d08080;padding:8px" {
                        strong {
                            @if s.dry_run { "An import of this file would be refused: " }
                            @else { "This file was NOT imported; no user was changed: " }
                        }
                        (s.error.as_deref().unwrap_or("the file could not be read"))
                    }
                    p { "Please correct the file and upload it again." }
                } @else {
                    table style="border-collapse:collapse;margin:8px 0" {
                        (count("Rows read", s.rows_total))
                        (count("New users", s.inserted))
                        (count("Updated", s.updated))
                        (count("Unchanged", s.unchanged))
                        @if s.superseded > 0 { (count("Left as a later file set them", s.superseded)) }
                        (count("Failed", s.failed))
                        (count("Archived", s.archived))
                        (count("Reactivated", s.reactivated))
                        (count("Permits released", s.permits_released))
                    }
                    @if !s.mapped.is_empty() {
                        p { "Your column names: " (s.mapped_text()) }
                    }
                    @if !s.ignored.is_empty() {
                        p { "Ignored columns (not part of the import format): " (s.ignored.join(", ")) }
                    }
                    @if !rows.is_empty() {
                        h2 style="font-size:16px;margin:16px 0 8px" {
                            @if (rows.len() as i64) < s.failed {
                                "The first " (rows.len()) " of " (s.failed) " rows that failed"
                            } @else {
                                "Rows that failed"
                            }
                        }
                        div style="overflow-x:auto" {
                            table style="border-collapse:collapse;width:100%" {
                                thead {
                                    tr {
                                        th { "Row" }
                                        th { "Column" }
                                        th { "Value" }
                                        th { "Reason" }
                                    }
                                }
                                tbody {
                                    @for r in &rows {
                                        tr {
                                            td { (r.row) }
                                            td { (r.column) }
                                            td { (r.value) }
                                            td { (r.reason) }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    @if s.failed > 0 {
                        p { (s.list_paragraph(list)) }
                    }
                }
            }
        }
    };
    page.into_string()
}

/// A short page: a title, paragraphs, and an optional list (the held-file mail).
pub fn simple_html(title: &str, paragraphs: &[String]) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
            }
            body style="font-family:-apple-system,Segoe UI,Roboto,Arial,sans-serif;font-size:15px;line-height:1.4;color:#222;margin:0;padding:12px;max-width:720px" {
                h1 style="font-size:18px;margin:0 0 12px" { (title) }
                @for p in paragraphs { p { (p) } }
            }
        }
    }
    .into_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mui_shared::codes::{RowError, RowErrorCode};

    #[test]
    fn tenant_values_are_escaped_and_nothing_remote_is_loaded() {
        let s = FileSummary {
            file_name: "<script>alert(1)</script>.csv".into(),
            rows_total: 1,
            failed: 1,
            state: mui_shared::files::FileState::Done,
            ..FileSummary::default()
        };
        let header = vec!["unique_id".to_owned(), "email".to_owned()];
        let failures = vec![RowFailure {
            row: 2,
            fields: vec!["u1".into(), "<img src=x onerror=alert(1)>".into()],
            errors: vec![RowError {
                code: RowErrorCode::InvalidEmail,
                column: Some("email".into()),
                message: "email \"<img src=x onerror=alert(1)>\" is not an email address".into(),
            }],
        }];
        let page = report_html(&s, &header, &failures, &ListNote::default());
        assert!(!page.contains("<script>"), "{page}");
        assert!(!page.contains("<img"), "{page}");
        assert!(
            page.contains("&lt;img src=x onerror=alert(1)&gt;"),
            "{page}"
        );
        assert!(!page.contains("http://") && !page.contains("https://"));
    }
}
