//! Turning a file's report into an email that mail servers accept: the failures CSV is
//! compressed into a .zip above `ATTACH_COMPRESS_BYTES`, and when the whole list would make
//! the email larger than `MAX_MAIL_BYTES` (or the server refused it as too large) the email
//! carries the summary and as many of the first failed rows as fit, and says how many were
//! left out and how to get them. The tenant always gets an email saying what happened.
//!
//! Pure (no I/O), so sizes and wording are tested without a mail server.

use std::io::Write as _;

use mui_shared::messages::RowFailure;

use crate::mailer::{MailError, Report, ReportAttachment};
use crate::report::{self, AttachedList, Cut, FileSummary, ListNote};

/// Size limits of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailLimits {
    /// A failures CSV larger than this is attached as a .zip holding it.
    pub compress_above: usize,
    /// The largest email sent (as sent: headers, body, base64-encoded attachment).
    pub max_mail_bytes: usize,
}

impl Default for MailLimits {
    fn default() -> Self {
        Self {
            compress_above: 2 * 1024 * 1024,
            max_mail_bytes: 10 * 1024 * 1024,
        }
    }
}

/// Everything a file's report is made of, as loaded from the database.
#[derive(Debug, Clone)]
pub struct ReportPlan {
    /// Sender: the tenant's Reply-to Admin Email Address.
    pub from: String,
    /// Recipients: the tenant's Failed Import Email(s).
    pub to: Vec<String>,
    /// Stable per file: see [`Report::message_id`].
    pub message_id: String,
    /// What the report says about the file.
    pub summary: FileSummary,
    /// The file's header, for the CSV's columns.
    pub header: Vec<String>,
    /// The first failed rows by row number (at most `MAX_ATTACHED_FAILURES`).
    pub failures: Vec<RowFailure>,
    /// `MAX_ATTACHED_FAILURES`, for the wording when it cut the list.
    pub max_attached: i64,
    /// When the file arrived: the time stamp of the CSV inside a .zip, so the same report
    /// is the same bytes on every attempt.
    pub received_at: chrono::DateTime<chrono::Utc>,
}

/// A composed email.
#[derive(Debug, Clone)]
pub struct Composed {
    /// The email.
    pub report: Report,
    /// Its size as sent, bytes.
    pub size: usize,
    /// Failed rows attached.
    pub rows: usize,
    /// Whether failed rows were left out (for whatever reason).
    pub reduced: bool,
}

/// The report as one email of at most `max_bytes` bytes: every loaded failed row if they
/// fit, otherwise as many of the first ones as fit (none at all if even one does not; an
/// email with the summary alone is composed whatever its size, since nothing smaller can
/// tell the tenant what happened). `refused` says the server already refused a larger one,
/// which the body then gives as the reason rows were left out.
pub fn compose(
    plan: &ReportPlan,
    limits: MailLimits,
    max_bytes: usize,
    refused: bool,
) -> Result<Composed, MailError> {
    let csv_name = report::attachment_name(&plan.summary.file_name);
    if plan.summary.file_failed() || plan.summary.failed == 0 {
        return build(plan, limits, &csv_name, &[], &[0], 0, refused);
    }
    let (csv, ends) = report::failures_csv_with_ends(&plan.header, &plan.failures)
        .map_err(|e| MailError::Attachment(e.to_string()))?;
    let all = plan.failures.len();
    let full = build(plan, limits, &csv_name, &csv, &ends, all, refused)?;
    if full.size <= max_bytes {
        return Ok(full);
    }
    // The largest prefix that fits, by bisection: `lo` fits (0 by decision), `hi` does
    // not. Sizes grow with the prefix except where compression starts, so this finds a
    // prefix that fits, not always the very largest: good enough for a fallback.
    let (mut lo, mut hi) = (0, all);
    let mut best = None;
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let c = build(plan, limits, &csv_name, &csv, &ends, mid, refused)?;
        if c.size <= max_bytes {
            lo = mid;
            best = Some(c);
        } else {
            hi = mid;
        }
    }
    match best {
        Some(c) => Ok(c),
        None => build(plan, limits, &csv_name, &csv, &ends, 0, refused),
    }
}

fn build(
    plan: &ReportPlan,
    limits: MailLimits,
    csv_name: &str,
    csv: &[u8],
    ends: &[usize],
    rows: usize,
    refused: bool,
) -> Result<Composed, MailError> {
    let s = &plan.summary;
    let loaded = plan.failures.len();
    let attachment = match ends.get(rows) {
        Some(&end) if rows > 0 => {
            let part = csv.get(..end).unwrap_or(csv);
            Some(if part.len() > limits.compress_above {
                ReportAttachment {
                    name: report::zip_name(csv_name),
                    content_type: "application/zip".into(),
                    bytes: zip_csv(csv_name, part, plan.received_at)?,
                }
            } else {
                ReportAttachment {
                    name: csv_name.to_owned(),
                    content_type: "text/csv; charset=utf-8".into(),
                    bytes: part.to_vec(),
                }
            })
        }
        _ => None,
    };
    let reduced = !s.file_failed() && (rows as i64) < s.failed;
    let cut = if !reduced {
        None
    } else if rows < loaded || loaded == 0 {
        Some(if refused { Cut::Refused } else { Cut::MailSize })
    } else if (loaded as i64) < plan.max_attached {
        // Fewer rows were loaded than the attach limit allows: their size cut them.
        Some(if refused { Cut::Refused } else { Cut::MailSize })
    } else {
        Some(Cut::AttachLimit(plan.max_attached))
    };
    let note = ListNote {
        attached: attachment.as_ref().map(|a| AttachedList {
            name: a.name.clone(),
            zipped_csv: (a.name != csv_name).then(|| csv_name.to_owned()),
        }),
        rows: rows as i64,
        cut,
    };
    let report = Report {
        from: plan.from.clone(),
        to: plan.to.clone(),
        subject: s.subject(),
        body: s.body(&note),
        html: Some(crate::html::report_html(
            s,
            &plan.header,
            plan.failures.get(..rows).unwrap_or(&plan.failures),
            &note,
        )),
        attachment,
        message_id: plan.message_id.clone(),
    };
    let size = report.size()?;
    Ok(Composed {
        report,
        size,
        rows,
        reduced,
    })
}

/// A .zip holding `csv` as `csv_name`, deflated.
pub fn zip_csv(
    csv_name: &str,
    csv: &[u8],
    modified: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<u8>, MailError> {
    use chrono::{Datelike as _, Timelike as _};
    let err = |e: &dyn std::fmt::Display| MailError::Attachment(format!("zip: {e}"));
    // ZIP time stamps start in 1980; a clock before that gets the format's default.
    let stamp = zip::DateTime::from_date_and_time(
        u16::try_from(modified.year()).unwrap_or(1980),
        modified.month() as u8,
        modified.day() as u8,
        modified.hour() as u8,
        modified.minute() as u8,
        modified.second() as u8,
    )
    .unwrap_or_default();
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .last_modified_time(stamp)
        .large_file(csv.len() as u64 >= u64::from(u32::MAX));
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::with_capacity(csv.len() / 4)));
    w.start_file(csv_name, options).map_err(|e| err(&e))?;
    w.write_all(csv).map_err(|e| err(&e))?;
    Ok(w.finish().map_err(|e| err(&e))?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mui_shared::messages::{RowError, RowErrorCode};
    use std::io::Read as _;

    fn plan(failed: usize) -> ReportPlan {
        let failures = (0..failed)
            .map(|i| RowFailure {
                row: i as u64 + 2,
                fields: vec![format!("u{i:06}"), "bogus".into(), format!("First{i}")],
                errors: vec![RowError {
                    code: RowErrorCode::UnknownLoginSource,
                    column: Some("login_source".into()),
                    message: format!("`login_source` \"bogus\" is not known (row {i})"),
                }],
            })
            .collect();
        ReportPlan {
            from: "admin@acme.example.org".into(),
            to: vec!["it@acme.example.org".into()],
            message_id: "<import-file-7.1700000000@managed-user-import>".into(),
            summary: FileSummary {
                file_id: 7,
                file_name: "staff.csv".into(),
                state: mui_shared::files::FileState::Done,
                rows_total: failed as i64 * 3,
                failed: failed as i64,
                ..FileSummary::default()
            },
            header: vec![
                "unique_id".into(),
                "login_source".into(),
                "first_name".into(),
            ],
            failures,
            max_attached: 50_000,
            received_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        }
    }

    fn unzip(bytes: &[u8]) -> (String, Vec<u8>) {
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        assert_eq!(archive.len(), 1);
        let mut f = archive.by_index(0).unwrap();
        let mut out = Vec::new();
        f.read_to_end(&mut out).unwrap();
        (f.name().to_owned(), out)
    }

    #[test]
    fn a_small_list_is_attached_as_csv_and_a_large_one_as_a_zip_of_the_same_csv() {
        let p = plan(2_000);
        let csv = report::failures_csv(&p.header, &p.failures).unwrap();
        let plain = compose(&p, MailLimits::default(), usize::MAX, false).unwrap();
        let a = plain.report.attachment.as_ref().unwrap();
        assert_eq!(a.name, "staff.csv.failures.csv");
        assert_eq!(a.bytes, csv);
        assert!(!plain.reduced);

        let limits = MailLimits {
            compress_above: 10_000,
            ..MailLimits::default()
        };
        let zipped = compose(&p, limits, usize::MAX, false).unwrap();
        let a = zipped.report.attachment.as_ref().unwrap();
        assert_eq!(a.name, "staff.csv.failures.zip");
        assert_eq!(a.content_type, "application/zip");
        assert!(a.bytes.len() < csv.len() / 3, "deflated");
        assert_eq!(unzip(&a.bytes), ("staff.csv.failures.csv".into(), csv));
        assert!(zipped
            .report
            .body
            .contains("open it to get staff.csv.failures.csv"));
        // The same report is the same email, byte for byte in its attachment, and keeps its
        // Message-ID: a re-send is recognisable as the same message.
        let again = compose(&p, limits, usize::MAX, false).unwrap();
        assert_eq!(again.report.attachment, zipped.report.attachment);
        assert_eq!(again.report.message_id, zipped.report.message_id);
        let m = zipped.report.to_message().unwrap().formatted();
        let text = String::from_utf8_lossy(&m);
        assert!(
            text.contains("Message-ID: <import-file-7.1700000000@managed-user-import>"),
            "{}",
            &text[..600.min(text.len())]
        );
    }

    #[test]
    fn over_the_size_limit_the_first_rows_that_fit_are_attached_and_the_rest_counted() {
        let p = plan(2_000);
        let limits = MailLimits {
            compress_above: usize::MAX,
            max_mail_bytes: 20_000,
        };
        let c = compose(&p, limits, limits.max_mail_bytes, false).unwrap();
        assert!(c.size <= 20_000, "{}", c.size);
        assert!(c.reduced);
        assert!(c.rows > 50 && c.rows < 2_000, "{}", c.rows);
        // One more row would not have fitted.
        let (csv, ends) = report::failures_csv_with_ends(&p.header, &p.failures).unwrap();
        let name = report::attachment_name("staff.csv");
        let one_more = build(&p, limits, &name, &csv, &ends, c.rows + 1, false).unwrap();
        assert!(one_more.size > 20_000, "{}", one_more.size);
        let a = c.report.attachment.as_ref().unwrap();
        assert_eq!(
            a.bytes,
            report::failures_csv(&p.header, &p.failures[..c.rows]).unwrap()
        );
        let left = 2_000 - c.rows;
        assert!(
            c.report
                .body
                .contains(&format!("{left} rows were left out to keep")),
            "{}",
            c.report.body
        );
        assert!(c.report.body.contains("muictl files failures 7"));

        // Nothing fits: the summary alone, saying so.
        let tiny = compose(&p, limits, 100, true).unwrap();
        assert_eq!(tiny.rows, 0);
        assert!(tiny.report.attachment.is_none());
        assert!(tiny
            .report
            .body
            .contains("is not attached because the mail server refused"));
        assert!(tiny.report.body.contains("2000 rows were left out"));
    }

    #[test]
    fn the_attach_limit_is_named_when_it_cut_the_list() {
        let mut p = plan(100);
        p.summary.failed = 250;
        p.max_attached = 100;
        let c = compose(&p, MailLimits::default(), usize::MAX, false).unwrap();
        assert_eq!(c.rows, 100);
        assert!(
            c.report
                .body
                .contains("150 rows were left out (at most 100 rows are attached"),
            "{}",
            c.report.body
        );
    }
}
