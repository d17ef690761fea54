//! `muictl files`: the files a tenant sent, and a file's failures CSV.

use std::io::Write;

use anyhow::Context;
use clap::Subcommand;
use diesel::PgConnection;
use mui_shared::deadletters;
use mui_shared::domain::ImportFileId;
use mui_shared::ending;
use mui_shared::failures;
use mui_shared::files::{self, FileLine, FileState};
use mui_shared::holds;
use mui_shared::tenants::Tenant;

#[derive(Debug, Subcommand)]
pub enum FilesCmd {
    /// A tenant's files, newest first: state, progress and counts.
    List {
        /// The tenant.
        slug: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// How many files.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Every file of every tenant that is not finished or whose report did not go out, and
    /// what each waits on and what resolves it (held, behind an earlier file, dead-lettered
    /// chunks, a report held or being retried).
    Waiting {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// One file: state, counts, email, notices and its trace id (the file's trace in Jaeger,
    /// Tempo or any OpenTelemetry backend; shown when the services export traces).
    Show {
        /// The file id (from `files list`).
        file_id: i64,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Print a file's failures CSV (the email's attachment) again.
    Failures {
        /// The file id (from `files list`).
        file_id: i64,
    },
    /// Import a file held by the mass-deactivation guard, exactly as it was uploaded (the
    /// tenant's later files, waiting behind it, follow). Approving it again does nothing.
    Approve {
        /// The file id (from `files list`).
        file_id: i64,
        /// Who approves it, for the record (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
    /// Send a held report again (held: the tenant lacked mail settings, its mail server
    /// refused the address, or kept refusing the report for MAIL_RETRY_SECS): once the
    /// cause is fixed, the notifier sends it as usual. A report not held is left alone.
    Resend {
        /// The file id (from `files list`).
        file_id: i64,
    },
    /// End a file that is registered (`received`) and that no ingest reads, with one report
    /// to the tenant giving your reason (code `ended_by_operator`); its later files follow.
    /// Ingest ends such files by itself (content gone, the same error again and again):
    /// this is the way out for anything else `files waiting` shows stuck. Rows already
    /// queued from it are kept (imported and reported) and the rest is dropped; a copy still
    /// in the drop folder is moved to `bak/`, not imported. Refused for a file being read, a
    /// held one (approve or reject it) or one past `received`.
    End {
        /// The file id (from `files waiting`).
        file_id: i64,
        /// Why, for the tenant's report.
        #[arg(long)]
        reason: String,
        /// Who ends it, for the record (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
    /// Drop a file held by the mass-deactivation guard: nothing of it is imported, and the
    /// tenant is mailed that it was rejected. Rejecting it again does nothing.
    Reject {
        /// The file id (from `files list`).
        file_id: i64,
        /// Who rejects it, for the record (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
}

fn operator(by: Option<String>) -> String {
    by.or_else(|| std::env::var("USER").ok())
        .filter(|b| !b.trim().is_empty())
        .unwrap_or_else(|| "muictl".to_owned())
}

impl FilesCmd {
    pub fn run(self, conn: &mut PgConnection, out: &mut impl Write) -> anyhow::Result<()> {
        match self {
            FilesCmd::List { slug, json, limit } => {
                let t = super::find(conn, &slug)?;
                list_files(out, conn, &t, json, limit)
            }
            FilesCmd::Show { file_id, json } => show_file(out, conn, file_id, json),
            FilesCmd::Waiting { json } => {
                let waiting = files::waiting(conn)?;
                if json {
                    serde_json::to_writer_pretty(&mut *out, &waiting)?;
                    writeln!(out)?;
                    return Ok(());
                }
                if waiting.is_empty() {
                    writeln!(out, "no file waits on anything")?;
                }
                for w in waiting {
                    writeln!(
                        out,
                        "{:>6} {:<16} {:<28} {:<9} {:<8} {}",
                        w.id,
                        mui_shared::messages::truncate_for_message(&w.tenant, 15),
                        mui_shared::messages::truncate_for_message(&w.file_name, 27),
                        w.state,
                        w.notify_status,
                        w.received_at.format("%Y-%m-%d %H:%M:%S")
                    )?;
                    writeln!(out, "{:>6} {}", "", w.why)?;
                }
                Ok(())
            }
            FilesCmd::Failures { file_id } => {
                let id = ImportFileId(file_id);
                let (name, header) = failures::name_and_header(conn, id)?
                    .with_context(|| format!("no file with id {file_id}"))?;
                // Page by page: a file with millions of failed rows is not held in memory.
                let rows = failures::write_file_csv(conn, id, &header, &mut *out)?;
                eprintln!("{rows} failed row(s) of {name:?}");
                Ok(())
            }
            FilesCmd::Approve { file_id, by } => {
                let file = ImportFileId(file_id);
                match holds::approve(conn, file, &operator(by))? {
                    holds::Outcome::Done => writeln!(
                        out,
                        "file {file_id} approved: it is imported as uploaded; the tenant's later files follow"
                    )?,
                    holds::Outcome::Already => {
                        writeln!(out, "file {file_id} was approved already: nothing to do")?
                    }
                }
                Ok(())
            }
            FilesCmd::Resend { file_id } => {
                if files::resend_report(conn, ImportFileId(file_id))? {
                    writeln!(
                        out,
                        "file {file_id}: its report is due again; the notifier sends it"
                    )?;
                } else {
                    let (f, _) = files::file_line(conn, file_id)?
                        .with_context(|| format!("no file with id {file_id}"))?;
                    writeln!(
                        out,
                        "file {file_id}: its report is {} (not held): nothing to do",
                        f.notify_status
                    )?;
                }
                Ok(())
            }
            FilesCmd::End {
                file_id,
                reason,
                by,
            } => {
                let ended =
                    ending::end_by_operator(conn, ImportFileId(file_id), &operator(by), &reason)?;
                if ended.kept_rows == 0 {
                    writeln!(
                        out,
                        "file {file_id} ended: nothing of it was imported; the tenant is mailed why, and its later files follow"
                    )?;
                } else {
                    writeln!(
                        out,
                        "file {file_id} ended: the {} data rows queued before are imported and reported, the rest is not; the tenant is mailed why, and its later files follow",
                        ended.kept_rows
                    )?;
                }
                Ok(())
            }
            FilesCmd::Reject { file_id, by } => {
                let file = ImportFileId(file_id);
                match holds::reject(conn, file, &operator(by))? {
                    holds::Outcome::Done => writeln!(
                        out,
                        "file {file_id} rejected: nothing of it was imported, and the tenant is mailed why"
                    )?,
                    holds::Outcome::Already => {
                        writeln!(out, "file {file_id} was rejected already: nothing to do")?
                    }
                }
                Ok(())
            }
        }
    }
}

fn list_files(
    out: &mut impl Write,
    conn: &mut PgConnection,
    t: &Tenant,
    json: bool,
    limit: i64,
) -> anyhow::Result<()> {
    let files: Vec<FileLine> = files::list_file_lines(conn, t.tenant_id(), limit)?;
    let dead = deadletters::pending_by_file(conn, t.id)?;
    let held = holds::oldest_held(conn, t.tenant_id())?;
    if json {
        serde_json::to_writer_pretty(&mut *out, &files)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:>6} {:<28} {:<10} {:>9} {:>9} {:>7} {:<11} RECEIVED",
        "ID", "FILE", "STATE", "ROWS", "IMPORTED", "FAILED", "EMAIL"
    )?;
    for f in files {
        let imported = f.rows_imported();
        let rows = match (f.state, f.rows_total) {
            (_, Some(n)) => n.to_string(),
            (FileState::Failed, None) => "-".to_owned(),
            _ => "?".to_owned(),
        };
        let state = if f.state == FileState::Importing
            || (f.state == FileState::Received && f.chunks_done > 0)
        {
            format!(
                "{} {}/{}",
                f.state,
                f.chunks_done,
                f.total_chunks.map_or("?".to_owned(), |n| n.to_string())
            )
        } else {
            f.state.to_string()
        };
        let dead_letters = dead.get(&f.id).copied().unwrap_or(0);
        let waits = held.filter(|h| *h < f.id && !f.state.is_finished());
        let state = if dead_letters > 0 && f.state != FileState::Done {
            "dead-lettered".to_owned()
        } else if f.is_held() {
            "held".to_owned()
        } else if waits.is_some() {
            "waiting".to_owned()
        } else if f.dry_run && f.state == FileState::Done {
            "validated".to_owned()
        } else {
            state
        };
        writeln!(
            out,
            "{:>6} {:<28} {:<10} {:>9} {:>9} {:>7} {:<11} {}",
            f.id,
            mui_shared::messages::truncate_for_message(&f.file_name, 27),
            state,
            rows,
            imported,
            f.rows_failed,
            f.notify_status,
            f.received_at.format("%Y-%m-%d %H:%M:%S")
        )?;
        if f.users_archived + f.users_reactivated + f.permits_released > 0 {
            writeln!(
                out,
                "{:>6} archived {} user(s), reactivated {}, released {} permit(s)",
                "", f.users_archived, f.users_reactivated, f.permits_released
            )?;
        }
        if f.dry_run {
            writeln!(
                out,
                "{:>6} dry run (.validate.csv): nothing was changed; the counts are what an import would give",
                ""
            )?;
        }
        if f.is_held() {
            writeln!(
                out,
                "{:>6} held: it would deactivate or archive {} of {} active users; `muictl files approve {}` or `muictl files reject {}`",
                "",
                f.hold_users.unwrap_or(0),
                f.hold_active_users.unwrap_or(0),
                f.id,
                f.id
            )?;
        }
        if let Some(h) = waits {
            writeln!(
                out,
                "{:>6} waits behind held file {h} (files take effect in arrival order)",
                ""
            )?;
        }
        if let Some(msg) = f.error_message {
            writeln!(out, "{:>6} error: {}", "", msg)?;
        }
        if let Some(detail) = f.notify_detail {
            writeln!(out, "{:>6} email: {}", "", detail)?;
        }
        for notice in &f.notices {
            writeln!(out, "{:>6} notice: {}", "", notice)?;
        }
        if dead_letters > 0 {
            writeln!(
                out,
                "{:>6} {} dead-lettered message(s): see `muictl dead-letters list --tenant {}`",
                "", dead_letters, t.slug
            )?;
        }
    }
    Ok(())
}

fn show_file(
    out: &mut impl Write,
    conn: &mut PgConnection,
    file_id: i64,
    json: bool,
) -> anyhow::Result<()> {
    let (f, slug) =
        files::file_line(conn, file_id)?.with_context(|| format!("no file with id {file_id}"))?;
    if json {
        let mut value = serde_json::to_value(&f)?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("tenant".into(), serde_json::Value::String(slug));
        }
        serde_json::to_writer_pretty(&mut *out, &value)?;
        writeln!(out)?;
        return Ok(());
    }
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    writeln!(out, "id:          {}", f.id)?;
    writeln!(out, "tenant:      {slug}")?;
    writeln!(out, "file:        {}", f.file_name)?;
    writeln!(out, "state:       {}", f.state)?;
    writeln!(
        out,
        "received:    {}",
        f.received_at.format("%Y-%m-%d %H:%M:%S")
    )?;
    writeln!(
        out,
        "finished:    {}",
        opt(f
            .finished_at
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()))
    )?;
    writeln!(
        out,
        "chunks:      {}/{}",
        f.chunks_done,
        opt(f.total_chunks.map(|n| n.to_string()))
    )?;
    writeln!(
        out,
        "rows:        {}",
        opt(f.rows_total.map(|n| n.to_string()))
    )?;
    writeln!(
        out,
        "imported:    {} (new {}, updated {}, unchanged {}, superseded by a later file {})",
        f.rows_imported(),
        f.rows_inserted,
        f.rows_updated,
        f.rows_unchanged,
        f.rows_superseded
    )?;
    writeln!(out, "failed:      {}", f.rows_failed)?;
    writeln!(out, "email:       {}", f.notify_status)?;
    if let Some(detail) = &f.notify_detail {
        writeln!(out, "email note:  {detail}")?;
    }
    if let Some(msg) = &f.error_message {
        writeln!(out, "error:       {msg}")?;
    }
    for notice in &f.notices {
        writeln!(out, "notice:      {notice}")?;
    }
    writeln!(out, "trace id:    {}", opt(f.trace_id))?;
    Ok(())
}
