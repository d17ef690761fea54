//! The report a tenant receives: subject, body and the failures CSV. Pure functions, so the
//! wording is tested without a mail server.

use mui_shared::files::FileState;

// The failures CSV is built in `mui_shared::failures`, so `muictl files failures` prints the
// very bytes a report attaches.
pub use mui_shared::failures::{attachment_name, failures_csv, failures_csv_with_ends, neutralise};

/// What the report says about one file.
#[derive(Debug, Clone, Default)]
pub struct FileSummary {
    /// The file's id (`import_files.id`), which the operator's `muictl files failures` takes.
    pub file_id: i64,
    /// Name as uploaded.
    pub file_name: String,
    /// `done` or `failed`.
    pub state: FileState,
    /// Data rows read.
    pub rows_total: i64,
    /// Users created.
    pub inserted: i64,
    /// Users changed.
    pub updated: i64,
    /// Users already right.
    pub unchanged: i64,
    /// Rows a later file had already written (it wins: arrival order).
    pub superseded: i64,
    /// Rows not imported.
    pub failed: i64,
    /// Users archived (active=0 with archive-on-inactive).
    pub archived: i64,
    /// Archived users made active again.
    pub reactivated: i64,
    /// Permits released by archiving.
    pub permits_released: i64,
    /// Detected encoding.
    pub encoding: Option<String>,
    /// Detected delimiter.
    pub delimiter: Option<String>,
    /// Columns ignored.
    pub ignored: Vec<String>,
    /// File-level error, when the file failed as a whole.
    pub error: Option<String>,
    /// When the file arrived.
    pub received_at: String,
    /// Things the tenant must know that did not stop the import (see `docs/errors.md`).
    pub notices: Vec<String>,
    /// A dry run (`*.validate.csv`): checked, nothing changed.
    pub dry_run: bool,
    /// The tenant's own header names found in the file, each with the column it was read as.
    pub mapped: Vec<(String, String)>,
}

impl FileSummary {
    /// Whether the file failed as a whole.
    pub fn file_failed(&self) -> bool {
        self.state == FileState::Failed
    }

    /// The email subject.
    pub fn subject(&self) -> String {
        let name = short(&self.file_name, 80);
        if self.dry_run {
            return if self.file_failed() {
                let reason = self
                    .error
                    .as_deref()
                    .unwrap_or("the file could not be read");
                format!(
                    "Validation of \"{name}\" (nothing changed): it would NOT import: {}",
                    short(reason, 120)
                )
            } else {
                format!(
                    "Validation of \"{name}\" (nothing changed): {} of {} rows would fail",
                    self.failed, self.rows_total
                )
            };
        }
        if self.file_failed() {
            let reason = self
                .error
                .as_deref()
                .unwrap_or("the file could not be read");
            format!("User import \"{name}\" failed: {}", short(reason, 120))
        } else {
            format!(
                "User import \"{name}\": {} of {} rows failed",
                self.failed, self.rows_total
            )
        }
    }

    /// The plain-text body; `list` says what the email carries of the failures list.
    pub fn body(&self, list: &ListNote) -> String {
        let mut b = String::new();
        if !self.notices.is_empty() {
            b.push_str("Please note:\n");
            for n in &self.notices {
                b.push_str(&format!("- {n}\n"));
            }
            b.push('\n');
        }
        if self.dry_run {
            b.push_str(&format!(
                "VALIDATION ONLY: your file \"{}\" (received {}) was checked exactly as an \
                 import would check it, and NOTHING WAS CHANGED: no user, no permit, no \
                 archive. Files whose name ends in .validate.csv are only checked. To import \
                 it, upload it again with a name ending in .csv only.\n\n",
                self.file_name, self.received_at
            ));
        }
        if self.file_failed() {
            b.push_str(&if self.dry_run {
                "An import of this file would be refused as a whole; no user would be changed.\n\n"
                    .to_owned()
            } else {
                format!(
                    "Your file \"{}\" (received {}) was NOT imported: no user was changed.\n\n",
                    self.file_name, self.received_at
                )
            });
            b.push_str(&format!(
                "Reason: {}\n\n",
                self.error
                    .as_deref()
                    .unwrap_or("the file could not be read")
            ));
            if let Some(enc) = &self.encoding {
                if !enc.is_empty() {
                    b.push_str(&format!("Detected encoding: {enc}\n\n"));
                }
            }
            b.push_str("Please correct the file and upload it again.\n");
            return b;
        }
        let imported = self.inserted + self.updated + self.unchanged + self.superseded;
        if self.dry_run {
            b.push_str("An import of this file now would give:\n\n");
        } else {
            b.push_str(&format!(
                "Your file \"{}\" (received {}) was imported.\n\n",
                self.file_name, self.received_at
            ));
        }
        b.push_str(&format!("Rows read:        {}\n", self.rows_total));
        b.push_str(&format!(
            "Imported:         {imported} ({} new, {} updated, {} unchanged{})\n",
            self.inserted,
            self.updated,
            self.unchanged,
            if self.superseded > 0 {
                format!(
                    ", {} left as a later file of yours had set them",
                    self.superseded
                )
            } else {
                String::new()
            }
        ));
        b.push_str(&format!("Failed:           {}\n", self.failed));
        if self.archived + self.reactivated + self.permits_released > 0 {
            b.push_str(&format!(
                "Archived:         {} user(s), {} permit(s) released\n",
                self.archived, self.permits_released
            ));
            if self.reactivated > 0 {
                b.push_str(&format!("Reactivated:      {} user(s)\n", self.reactivated));
            }
        }
        if let Some(enc) = &self.encoding {
            b.push_str(&format!("Encoding:         {enc}\n"));
        }
        if let Some(d) = &self.delimiter {
            b.push_str(&format!("Delimiter:        {d}\n"));
        }
        if !self.ignored.is_empty() {
            b.push_str(&format!(
                "Ignored columns:  {} (not part of the import format)\n",
                self.ignored.join(", ")
            ));
        }
        if !self.mapped.is_empty() {
            b.push_str(&format!("Your column names: {}\n", self.mapped_text()));
        }
        if self.failed > 0 {
            b.push('\n');
            b.push_str(&self.list_paragraph(list));
        }
        b
    }

    /// The tenant's column names found in the file: `"Employee ID" read as unique_id, …`.
    pub fn mapped_text(&self) -> String {
        self.mapped
            .iter()
            .map(|(theirs, ours)| format!("\"{theirs}\" read as {ours}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub(crate) fn list_paragraph(&self, list: &ListNote) -> String {
        const WHAT: &str = "its row number in your file, the values as you uploaded them, and \
                            the reason. Correct those rows and upload them again; rows that \
                            were imported need not be sent again.";
        let attached = list.attached.as_ref().map(|a| match &a.zipped_csv {
            Some(csv) => format!("{} (a ZIP archive: open it to get {csv})", a.name),
            None => a.name.clone(),
        });
        let left = self.failed - list.rows;
        match (attached, &list.cut) {
            (Some(name), _) if left <= 0 => {
                format!("The attached {name} lists every row that was not imported: {WHAT}\n")
            }
            (Some(name), cut) => format!(
                "The attached {name} lists the first {} of the {} rows that were not \
                 imported: {WHAT}\n\n{left} rows were left out{}. Ask your administrator \
                 for the full list: they can print it with `muictl files failures {}`.\n",
                list.rows,
                self.failed,
                cut.as_ref().map(Cut::because).unwrap_or_default(),
                self.file_id
            ),
            (None, cut) => format!(
                "The list of the rows that were not imported is not attached{}: {left} rows \
                 were left out. Ask your administrator for the full list: they can print it \
                 with `muictl files failures {}`.\n",
                cut.as_ref().map(Cut::because).unwrap_or_default(),
                self.file_id
            ),
        }
    }
}

/// What a report carries of the file's failures list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListNote {
    /// The attachment, if any.
    pub attached: Option<AttachedList>,
    /// Failed rows in the attachment (the first ones, by row number).
    pub rows: i64,
    /// Why rows were left out, when some were.
    pub cut: Option<Cut>,
}

/// The attached failures list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedList {
    /// Name of the attached file.
    pub name: String,
    /// Name of the CSV inside, when the attachment is a ZIP archive.
    pub zipped_csv: Option<String>,
}

/// Why a report leaves failed rows out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cut {
    /// At most this many rows are attached (`MAX_ATTACHED_FAILURES`).
    AttachLimit(i64),
    /// The whole list would make the email larger than `MAX_MAIL_BYTES`.
    MailSize,
    /// The mail server refused the email with the whole list as too large (reply 552).
    Refused,
}

impl Cut {
    fn because(&self) -> String {
        match self {
            Cut::AttachLimit(n) => format!(" (at most {n} rows are attached to one email)"),
            Cut::MailSize => " to keep this email within the size mail servers accept".into(),
            Cut::Refused => {
                " because the mail server refused the email with the whole list as too large".into()
            }
        }
    }
}

fn short(s: &str, max: usize) -> String {
    mui_shared::messages::truncate_for_message(s, max)
}

/// The name of the ZIP archive holding the failures CSV `csv_name` (`x.failures.csv` →
/// `x.failures.zip`).
pub fn zip_name(csv_name: &str) -> String {
    match csv_name.strip_suffix(".csv") {
        Some(stem) => format!("{stem}.zip"),
        None => format!("{csv_name}.zip"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_name_the_file_and_counts() {
        let s = FileSummary {
            file_name: "staff.csv".into(),
            state: FileState::Done,
            rows_total: 10,
            failed: 3,
            inserted: 7,
            ..FileSummary::default()
        };
        assert_eq!(
            s.subject(),
            "User import \"staff.csv\": 3 of 10 rows failed"
        );
        let all = ListNote {
            attached: Some(AttachedList {
                name: "staff.csv.failures.csv".into(),
                zipped_csv: None,
            }),
            rows: 3,
            cut: None,
        };
        let body = s.body(&all);
        assert!(body.contains("Imported:         7 (7 new, 0 updated, 0 unchanged)"));
        assert!(body.contains("The attached staff.csv.failures.csv lists every row"));
        let f = FileSummary {
            file_name: "staff.csv".into(),
            state: FileState::Failed,
            error: Some("the header has no `login_source` column".into()),
            ..FileSummary::default()
        };
        assert_eq!(
            f.subject(),
            "User import \"staff.csv\" failed: the header has no `login_source` column"
        );
        assert!(f.body(&ListNote::default()).contains("was NOT imported"));
        assert_eq!(attachment_name("a/b.csv"), "a_b.csv.failures.csv");
    }

    #[test]
    fn a_reduced_report_says_how_many_rows_were_left_out_and_how_to_get_them() {
        let s = FileSummary {
            file_id: 42,
            file_name: "staff.csv".into(),
            state: FileState::Done,
            rows_total: 5000,
            failed: 1200,
            ..FileSummary::default()
        };
        let some = ListNote {
            attached: Some(AttachedList {
                name: "staff.csv.failures.zip".into(),
                zipped_csv: Some("staff.csv.failures.csv".into()),
            }),
            rows: 200,
            cut: Some(Cut::MailSize),
        };
        let body = s.body(&some);
        assert!(
            body.contains("lists the first 200 of the 1200 rows"),
            "{body}"
        );
        assert!(
            body.contains("1000 rows were left out to keep this email"),
            "{body}"
        );
        assert!(body.contains("`muictl files failures 42`"), "{body}");
        assert!(
            body.contains("open it to get staff.csv.failures.csv"),
            "{body}"
        );
        let none = ListNote {
            attached: None,
            rows: 0,
            cut: Some(Cut::Refused),
        };
        let body = s.body(&none);
        assert!(
            body.contains("is not attached because the mail server refused"),
            "{body}"
        );
        assert!(body.contains("1200 rows were left out"), "{body}");
        assert_eq!(zip_name("a.csv.failures.csv"), "a.csv.failures.zip");
    }
}
