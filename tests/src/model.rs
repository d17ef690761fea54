//! The reference model of one tenant: plain Rust, straight from the rules in README.md
//! ("The CSV format", "Inactive users", "Dry runs, the deactivation guard") and
//! docs/errors.md, that says what a tenant's files in arrival order must do: each file's
//! final state, its report's failed rows (row number and codes), whether a report and a
//! hold mail go out, and the users and permits afterwards.
//!
//! It calls no product code (no validation function of ingest or the worker): the soak
//! ([`crate::soak`]) compares the product with it, and a model that borrowed the product's
//! checks would agree with their bugs. It covers a well-defined subset of the rules, the
//! one the soak's generator stays inside:
//!
//! - content: UTF-8 (with or without BOM) or UTF-16LE with BOM, comma-separated, header
//!   names exactly as the columns are spelled (any case), no blank line inside, no quoted
//!   line break, values without surrounding spaces;
//! - columns: `unique_id`, `login_source`, `first_name`, `last_name`, `user_name`, `email`,
//!   `city`, `user_type_id`, `date_of_birth` (valid ones as `YYYY-MM-DD`), `active`;
//! - emails and user names are unique to their `unique_id`, so `email_taken` and
//!   `user_name_taken` never arise;
//! - rows of one `unique_id` sit in one chunk (docs/architecture.md, "Order within a
//!   file": across chunks the earlier row's values may stay, a known limit);
//! - the file-level refusals whose detection is about bytes rather than rows (binary,
//!   unclosed quote, long line, broken UTF-8) are declared by the generator with their
//!   code: the model only needs the code.

use std::collections::{BTreeMap, BTreeSet};

/// The columns the model knows, besides `unique_id` and `login_source`, in the order the
/// soak compares them.
pub const VALUE_COLUMNS: [&str; 7] = [
    "first_name",
    "last_name",
    "user_name",
    "email",
    "city",
    "user_type_id",
    "date_of_birth",
];

/// A tenant's settings, as the model needs them.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Login sources (compared case-insensitively).
    pub login_sources: Vec<String>,
    /// User type ids.
    pub user_types: Vec<String>,
    /// Archive-on-inactive.
    pub archive_on_inactive: bool,
    /// The fields an archived user's values get the `_YEAR` suffix on.
    pub archive_fields: Vec<String>,
    /// Guard share, percent (0: off).
    pub guard_percent: i32,
    /// Guard minimum of users.
    pub guard_min_users: i32,
    /// Mail also a file without failures.
    pub success_mail: bool,
}

/// A user as the model keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelUser {
    /// Login source as given.
    pub login_source: String,
    /// Stored values of [`VALUE_COLUMNS`] (absent: NULL).
    pub values: BTreeMap<String, String>,
    /// `users.active`.
    pub active: bool,
    /// `users.archived_at` is set.
    pub archived: bool,
}

/// What the operator decided about a held file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// `holds::approve`: imported as uploaded.
    Approve,
    /// `holds::reject`: failed with `rejected_by_operator`.
    Reject,
}

/// A file's expected final state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// `done`.
    Done,
    /// `failed` with this file error code.
    Failed(String),
}

/// What the model says of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOutcome {
    /// Final state.
    pub state: Expected,
    /// Held by the guard (then decided by the operator).
    pub held: bool,
    /// Failed rows of the report: spreadsheet row number → codes.
    pub failed_rows: BTreeMap<u64, BTreeSet<String>>,
    /// A report mail goes out.
    pub report_mail: bool,
    /// A dry run (`*.validate.csv`).
    pub dry_run: bool,
}

/// A file as the generator hands it to the model: its name and bytes, and, for a refusal
/// found in the bytes rather than the rows, the code (see the module docs).
#[derive(Debug, Clone)]
pub struct FileInput<'a> {
    /// Name in the drop folder.
    pub name: &'a str,
    /// Content.
    pub bytes: &'a [u8],
    /// The file error code of a byte-level refusal the generator made on purpose.
    pub declared_refusal: Option<&'a str>,
}

/// One tenant's state in the model.
#[derive(Debug, Clone)]
pub struct Model {
    /// Settings.
    pub settings: Settings,
    /// The archive suffix (`_YEAR`).
    pub suffix: String,
    /// Users by unique_id.
    pub users: BTreeMap<String, ModelUser>,
    /// Permits by number: (unique_id, released).
    pub permits: BTreeMap<String, (String, bool)>,
}

/// A parsed data row: spreadsheet row number and the fields.
type Row = (u64, Vec<String>);

impl Model {
    /// A tenant without users; `year` is the year archiving happens in.
    pub fn new(settings: Settings, year: i32) -> Self {
        Self {
            settings,
            suffix: format!("_{year}"),
            users: BTreeMap::new(),
            permits: BTreeMap::new(),
        }
    }

    /// An operator's `permit add` for an existing user.
    pub fn add_permit(&mut self, number: &str, unique_id: &str) {
        assert!(self.users.contains_key(unique_id), "permit for no user");
        self.permits
            .insert(number.to_owned(), (unique_id.to_owned(), false));
    }

    /// Active users now.
    pub fn active_users(&self) -> i64 {
        self.users.values().filter(|u| u.active).count() as i64
    }

    /// Whether a non-dry-run file of these contents would be held now (the guard's rule:
    /// more than `guard_percent` % of the active users and more than `guard_min_users`).
    pub fn would_hold(&self, input: &FileInput<'_>) -> bool {
        match self.parse(input) {
            Ok((header, rows)) => {
                let would = self.deactivations(&header, &rows);
                self.guard_holds(would)
            }
            Err(_) => false,
        }
    }

    fn guard_holds(&self, would: i64) -> bool {
        let s = &self.settings;
        s.guard_percent > 0
            && would > i64::from(s.guard_min_users)
            && would * 100 > self.active_users() * i64::from(s.guard_percent)
    }

    /// Applies one file in arrival order; `decision` is the operator's if the file is held.
    pub fn file(&mut self, input: &FileInput<'_>, decision: Option<Decision>) -> FileOutcome {
        let dry_run = is_dry_run(input.name);
        let refused = |code: &str| FileOutcome {
            state: Expected::Failed(code.to_owned()),
            held: false,
            failed_rows: BTreeMap::new(),
            report_mail: true,
            dry_run,
        };
        if !input.name.to_ascii_lowercase().ends_with(".csv") {
            return refused("not_csv_name");
        }
        if let Some(code) = input.declared_refusal {
            return refused(code);
        }
        let (header, rows) = match self.parse(input) {
            Ok(parsed) => parsed,
            Err(code) => return refused(code),
        };
        let (failed_rows, winners) = self.check_rows(&header, &rows);
        let mut outcome = FileOutcome {
            state: Expected::Done,
            held: false,
            report_mail: dry_run || !failed_rows.is_empty() || self.settings.success_mail,
            failed_rows,
            dry_run,
        };
        if dry_run {
            return outcome;
        }
        if self.guard_holds(self.deactivations(&header, &rows)) {
            outcome.held = true;
            match decision {
                Some(Decision::Approve) => {}
                Some(Decision::Reject) | None => {
                    outcome.state = Expected::Failed("rejected_by_operator".into());
                    outcome.failed_rows.clear();
                    outcome.report_mail = true;
                    return outcome;
                }
            }
        }
        for (_, fields) in &winners {
            self.apply(&header, fields);
        }
        outcome
    }

    /// Header (normalised names) and data rows, or the file error code.
    fn parse(&self, input: &FileInput<'_>) -> Result<(Vec<String>, Vec<Row>), &'static str> {
        let text = decode(input.bytes)?;
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(text.as_bytes());
        let mut records = Vec::new();
        for r in reader.records() {
            let r = r.map_err(|_| "malformed_csv")?;
            records.push(r.iter().map(str::to_owned).collect::<Vec<_>>());
        }
        // Trailing empty lines are harmless (the csv crate skips blank lines already).
        let Some((head, data)) = records.split_first() else {
            return Err("empty_file");
        };
        let mut header: Vec<String> = head
            .iter()
            .map(|h| h.trim().to_ascii_lowercase().replace(' ', "_"))
            .collect();
        while header.last().is_some_and(String::is_empty) {
            header.pop();
        }
        let mut seen = BTreeSet::new();
        for h in header.iter().filter(|h| !h.is_empty()) {
            if !seen.insert(h.clone()) {
                return Err("duplicate_column");
            }
        }
        if !seen.contains("unique_id") || !seen.contains("login_source") {
            return Err("missing_required_column");
        }
        if data.is_empty() {
            return Err("header_only");
        }
        let rows = data
            .iter()
            .enumerate()
            .map(|(i, r)| (i as u64 + 2, r.clone()))
            .collect();
        Ok((header, rows))
    }

    /// The codes of each failed row, and the rows that win (in file order).
    fn check_rows(
        &self,
        header: &[String],
        rows: &[Row],
    ) -> (BTreeMap<u64, BTreeSet<String>>, Vec<Row>) {
        let mut failed: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
        let mut valid: Vec<&Row> = Vec::new();
        for row in rows {
            // A row of empty cells only (`,,`, as spreadsheets write an empty line) is
            // skipped like a blank line; it keeps its row number (seen in the product, not
            // spelt out in README.md, which names blank lines only).
            if row.1.iter().all(|f| f.trim().is_empty()) {
                continue;
            }
            let codes = self.row_codes(header, &row.1);
            if codes.is_empty() {
                valid.push(row);
            } else {
                failed.insert(row.0, codes);
            }
        }
        // Of the valid rows of one unique_id the last wins; the earlier are duplicates.
        let mut last: BTreeMap<String, u64> = BTreeMap::new();
        for (n, fields) in &valid {
            last.insert(get(header, fields, "unique_id").to_owned(), *n);
        }
        let mut winners = Vec::new();
        for (n, fields) in valid {
            let uid = get(header, fields, "unique_id");
            if last.get(uid) == Some(n) {
                winners.push((*n, fields.clone()));
            } else {
                failed
                    .entry(*n)
                    .or_default()
                    .insert("duplicate_unique_id".into());
            }
        }
        (failed, winners)
    }

    /// The row checks of docs/errors.md (the subset the generator uses).
    fn row_codes(&self, header: &[String], fields: &[String]) -> BTreeSet<String> {
        let mut codes = BTreeSet::new();
        let width = header.len();
        let extra_non_empty = fields.iter().skip(width).any(|f| !f.trim().is_empty());
        if fields.len() < width || extra_non_empty {
            codes.insert("field_count".to_owned());
            return codes;
        }
        let s = &self.settings;
        let uid = get(header, fields, "unique_id");
        let source = get(header, fields, "login_source");
        if uid.is_empty() || source.is_empty() {
            codes.insert("required_missing".into());
        }
        if !source.is_empty()
            && !s
                .login_sources
                .iter()
                .any(|l| l.eq_ignore_ascii_case(source))
        {
            codes.insert("unknown_login_source".into());
        }
        let user_type = get(header, fields, "user_type_id");
        if !user_type.is_empty() && !s.user_types.iter().any(|t| t == user_type) {
            codes.insert("unknown_user_type".into());
        }
        let active = get(header, fields, "active");
        if !active.is_empty() && active != "0" && active != "1" {
            codes.insert("invalid_active".into());
        }
        let email = get(header, fields, "email");
        if !email.is_empty() && !plausible_email(email) {
            codes.insert("invalid_email".into());
        }
        let date = get(header, fields, "date_of_birth");
        if !date.is_empty() {
            if date.contains('/') {
                codes.insert("ambiguous_date".into());
            } else if chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").is_err() {
                codes.insert("invalid_date".into());
            }
        }
        for (i, value) in fields.iter().take(width).enumerate() {
            if header[i].is_empty() {
                continue;
            }
            if value
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\r')
            {
                codes.insert("control_character".into());
            }
            if value.chars().count() > 100 {
                codes.insert("too_long".into());
            }
        }
        codes
    }

    /// Users the file's winning rows would deactivate or archive: `active=0` for a user
    /// active now.
    fn deactivations(&self, header: &[String], rows: &[Row]) -> i64 {
        let (_, winners) = self.check_rows(header, rows);
        winners
            .iter()
            .filter(|(_, f)| get(header, f, "active") == "0")
            .filter(|(_, f)| {
                self.users
                    .get(get(header, f, "unique_id"))
                    .is_some_and(|u| u.active)
            })
            .count() as i64
    }

    /// One winning row's effect ("Inactive users" in README.md).
    fn apply(&mut self, header: &[String], fields: &[String]) {
        let uid = get(header, fields, "unique_id").to_owned();
        let active = get(header, fields, "active").to_owned();
        let archive_on = self.settings.archive_on_inactive;
        let suffix = self.suffix.clone();
        let archive_fields = self.settings.archive_fields.clone();
        let is_new = !self.users.contains_key(&uid);
        let user = self.users.entry(uid.clone()).or_insert_with(|| ModelUser {
            login_source: String::new(),
            values: BTreeMap::new(),
            active: true,
            archived: false,
        });
        user.login_source = get(header, fields, "login_source").to_owned();
        let was_archived = user.archived;
        // Given values first (an empty cell keeps the stored value).
        let mut given = BTreeSet::new();
        for col in VALUE_COLUMNS {
            let v = get(header, fields, col);
            if !v.is_empty() {
                user.values.insert(col.to_owned(), v.to_owned());
                given.insert(col);
            }
        }
        let mut released = false;
        match active.as_str() {
            "1" => {
                user.active = true;
                if user.archived {
                    // Reactivation: the suffix comes off the fields not given in the row.
                    user.archived = false;
                    for f in &archive_fields {
                        if given.contains(f.as_str()) {
                            continue;
                        }
                        if let Some(v) = user.values.get_mut(f) {
                            if let Some(stripped) = v.strip_suffix(&suffix) {
                                *v = stripped.to_owned();
                            }
                        }
                    }
                }
            }
            "0" => {
                user.active = false;
                if archive_on && !user.archived {
                    user.archived = true;
                    released = !is_new;
                }
            }
            _ => {}
        }
        if user.archived {
            // Every archive field carries the suffix exactly once (given values too).
            for f in &archive_fields {
                if let Some(v) = user.values.get_mut(f) {
                    let base = v.strip_suffix(&suffix).unwrap_or(v).to_owned();
                    *v = format!("{base}{suffix}");
                }
            }
        }
        if released && !was_archived {
            for (owner, gone) in self.permits.values_mut() {
                if *owner == uid {
                    *gone = true;
                }
            }
        }
    }
}

/// `*.validate.csv`, any case.
pub fn is_dry_run(name: &str) -> bool {
    name.to_ascii_lowercase().ends_with(".validate.csv")
}

/// The generator's emails are `local@domain.tld` or plainly broken (`bob@`, `not-an-email`).
fn plausible_email(e: &str) -> bool {
    match e.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty() && domain.contains('.') && !domain.ends_with('.')
        }
        None => false,
    }
}

/// UTF-16LE with BOM, UTF-8 with or without BOM; anything else is the generator's mistake.
fn decode(bytes: &[u8]) -> Result<String, &'static str> {
    if let Some(rest) = bytes.strip_prefix(&[0xFF, 0xFE]) {
        let units: Vec<u16> = rest
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)]))
            .collect();
        return String::from_utf16(&units).map_err(|_| "bad_encoding");
    }
    let bytes = bytes.strip_prefix(&[0xEF, 0xBB, 0xBF]).unwrap_or(bytes);
    let text = std::str::from_utf8(bytes).map_err(|_| "bad_encoding")?;
    if text.trim().is_empty() {
        return Err("empty_file");
    }
    Ok(text.to_owned())
}

/// A row's value of `col` (trimmed; empty when the column is absent).
fn get<'a>(header: &[String], fields: &'a [String], col: &str) -> &'a str {
    header
        .iter()
        .position(|h| h == col)
        .and_then(|i| fields.get(i))
        .map(|s| s.trim())
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            login_sources: vec!["sso".into(), "local".into()],
            user_types: vec!["1".into(), "2".into()],
            archive_on_inactive: true,
            archive_fields: vec!["last_name".into(), "user_name".into(), "email".into()],
            guard_percent: 0,
            guard_min_users: 0,
            success_mail: false,
        }
    }

    fn input(name: &str, text: &str) -> (String, Vec<u8>) {
        (name.to_owned(), text.as_bytes().to_vec())
    }

    fn run(m: &mut Model, name: &str, text: &str) -> FileOutcome {
        let (n, b) = input(name, text);
        m.file(
            &FileInput {
                name: &n,
                bytes: &b,
                declared_refusal: None,
            },
            None,
        )
    }

    #[test]
    fn the_last_valid_row_wins_and_archiving_suffixes_once() {
        let mut m = Model::new(settings(), 2026);
        let o = run(
            &mut m,
            "a.csv",
            "unique_id,login_source,last_name,active\nk1,sso,J3,1\nk1,sso,J4,0\nk1,nope,J5,1\n",
        );
        assert_eq!(o.state, Expected::Done);
        assert_eq!(o.failed_rows.len(), 2);
        assert!(o.failed_rows[&2].contains("duplicate_unique_id"));
        assert!(o.failed_rows[&4].contains("unknown_login_source"));
        let u = &m.users["k1"];
        assert!(u.archived && !u.active);
        assert_eq!(u.values["last_name"], "J4_2026");
        run(&mut m, "b.csv", "unique_id,login_source,active\nk1,sso,0\n");
        assert_eq!(m.users["k1"].values["last_name"], "J4_2026");
        run(&mut m, "c.csv", "unique_id,login_source,active\nk1,sso,1\n");
        assert_eq!(m.users["k1"].values["last_name"], "J4");
        assert!(m.users["k1"].active);
    }

    #[test]
    fn refusals_and_the_guard() {
        let mut m = Model::new(settings(), 2026);
        assert_eq!(
            run(&mut m, "e.csv", "").state,
            Expected::Failed("empty_file".into())
        );
        assert_eq!(
            run(&mut m, "h.csv", "unique_id,login_source\n").state,
            Expected::Failed("header_only".into())
        );
        assert_eq!(
            run(&mut m, "x.txt", "unique_id,login_source\nk,sso\n").state,
            Expected::Failed("not_csv_name".into())
        );
        m.settings.guard_percent = 10;
        m.settings.guard_min_users = 1;
        run(
            &mut m,
            "s.csv",
            "unique_id,login_source\nu1,sso\nu2,sso\nu3,sso\n",
        );
        let o = run(
            &mut m,
            "d.csv",
            "unique_id,login_source,active\nu1,sso,0\nu2,sso,0\n",
        );
        assert!(o.held);
        assert_eq!(o.state, Expected::Failed("rejected_by_operator".into()));
        assert!(m.users.values().all(|u| u.active));
    }
}
