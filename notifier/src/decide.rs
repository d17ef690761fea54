//! Deciding, under the file's row lock, what to do about its report: nothing yet, not
//! needed, held (and why), or send it (the claim is taken in the same transaction).

use super::*;

pub(crate) enum Decision {
    Nothing,
    Busy,
    Send(Box<ReportPlan>),
}

#[derive(Queryable)]
#[allow(dead_code)]
pub(crate) struct FileRow {
    tenant_id: i64,
    file_name: String,
    state: FileState,
    encoding: Option<String>,
    delimiter: Option<String>,
    header: Option<serde_json::Value>,
    ignored: Option<serde_json::Value>,
    rows_total: Option<i64>,
    inserted: i64,
    updated: i64,
    unchanged: i64,
    superseded: i64,
    failed: i64,
    archived: i64,
    reactivated: i64,
    permits_released: i64,
    error_message: Option<String>,
    notify_status: NotifyStatus,
    notified_at: Option<chrono::DateTime<chrono::Utc>>,
    received_at: chrono::DateTime<chrono::Utc>,
    notices: Vec<String>,
    dry_run: bool,
}

/// Most bytes of failed rows (cells and messages) a report loads: more could never go out
/// in one mail (`MAX_MAIL_BYTES`, a zipped CSV included), and `MAIL_CONCURRENCY` reports
/// are composed at once. The rows past it are counted and left out, as for a mail too large.
const LOAD_BYTES: i64 = 32 * 1024 * 1024;

pub(crate) fn decide(
    conn: &mut PgConnection,
    file_id: ImportFileId,
    max_attached: i64,
) -> Result<Decision, diesel::result::Error> {
    // Without a lock first: a file still importing has nothing to decide. Its workers'
    // transactions hold its row between counting a chunk and committing, so taking the lock
    // here queued this session (and every failure record of a large import another one)
    // behind them, and the notifier's connections with it, while other tenants' reports
    // waited. Its last chunk commits before "file finished" is published, so that message's
    // decision, or a later failure record's, sees it finished.
    let state: Option<FileState> = import_files::table
        .find(file_id.0)
        .select(import_files::state)
        .first(conn)
        .optional()?;
    if !state.is_some_and(|s| s.is_finished()) {
        return Ok(Decision::Nothing);
    }
    let Some(f): Option<FileRow> = import_files::table
        .find(file_id.0)
        .select((
            import_files::tenant_id,
            import_files::file_name,
            import_files::state,
            import_files::encoding,
            import_files::delimiter,
            import_files::header,
            import_files::ignored_columns,
            import_files::rows_total,
            import_files::rows_inserted,
            import_files::rows_updated,
            import_files::rows_unchanged,
            import_files::rows_superseded,
            import_files::rows_failed,
            import_files::users_archived,
            import_files::users_reactivated,
            import_files::permits_released,
            import_files::error_message,
            import_files::notify_status,
            import_files::notified_at,
            import_files::received_at,
            import_files::notices,
            import_files::dry_run,
        ))
        .for_update()
        .first(conn)
        .optional()?
    else {
        return Ok(Decision::Nothing);
    };
    match f.notify_status {
        NotifyStatus::Pending => {}
        NotifyStatus::Sending => {
            let fresh = f.notified_at.is_some_and(|t| {
                chrono::Utc::now() - t < chrono::Duration::seconds(SENDING_CLAIM_SECS)
            });
            if fresh {
                return Ok(Decision::Busy);
            }
        }
        _ => return Ok(Decision::Nothing), // sent, not_needed, held
    }
    if !f.state.is_finished() {
        return Ok(Decision::Nothing);
    }
    if f.state == FileState::Done {
        let stored: i64 = row_failures::table
            .filter(row_failures::file_id.eq(file_id.0))
            .count()
            .get_result(conn)?;
        if stored < f.failed {
            return Ok(Decision::Nothing); // more failure records are on their way
        }
        // A file with a notice (its bak/ was a link and was set aside, its name was not
        // UTF-8…) is mailed even when nothing failed: the tenant must hear of it. So is a
        // dry run (its mail is its whole point), and a clean import for a tenant that asked
        // for success mails.
        let mut wants_success_mail = || -> Result<bool, diesel::result::Error> {
            Ok(
                mui_shared::tenants::find(conn, mui_shared::domain::TenantId(f.tenant_id))?
                    .is_some_and(|t| t.success_mail),
            )
        };
        if f.failed == 0 && f.notices.is_empty() && !f.dry_run && !wants_success_mail()? {
            mui_shared::files::report_not_needed(conn, file_id)?;
            tracing::info!("ReportNotNeeded");
            return Ok(Decision::Nothing);
        }
    }
    let tenant = mui_shared::tenants::find(conn, mui_shared::domain::TenantId(f.tenant_id))?;
    let Some(tenant) = tenant else {
        return Ok(Decision::Nothing);
    };
    if let Some(why) = tenant.missing_mail_settings() {
        mui_shared::files::report_status(conn, file_id, NotifyStatus::Held, Some(&why))?;
        tracing::warn!(reason = %why, "ReportHeld");
        metrics::counter!("mui_mails_held_total").increment(1);
        return Ok(Decision::Nothing);
    }
    let header: Vec<String> = f
        .header
        .and_then(|h| serde_json::from_value(h).ok())
        .unwrap_or_default();
    let ignored: Vec<String> = f
        .ignored
        .and_then(|h| serde_json::from_value(h).ok())
        .unwrap_or_default();
    let summary = report::FileSummary {
        file_id: file_id.0,
        file_name: f.file_name.clone(),
        state: f.state,
        rows_total: f.rows_total.unwrap_or(0),
        inserted: f.inserted,
        updated: f.updated,
        unchanged: f.unchanged,
        superseded: f.superseded,
        failed: f.failed,
        archived: f.archived,
        reactivated: f.reactivated,
        permits_released: f.permits_released,
        encoding: f.encoding.clone(),
        delimiter: f.delimiter.clone(),
        ignored,
        error: f.error_message.clone(),
        received_at: f.received_at.format("%Y-%m-%d %H:%M UTC").to_string(),
        notices: f.notices.clone(),
        dry_run: f.dry_run,
        mapped: {
            let aliases = mui_shared::tenants::header_aliases(&tenant);
            header
                .iter()
                .filter_map(|h| {
                    let key = mui_shared::domain::normalise_header(h);
                    aliases
                        .iter()
                        .find(|(k, _)| *k == key)
                        .map(|(_, c)| (h.trim().to_owned(), c.name().to_owned()))
                })
                .collect()
        },
    };
    let failures = if f.state == FileState::Done {
        mui_shared::failures::load_failures_within(conn, file_id, max_attached, LOAD_BYTES)?
    } else {
        Vec::new()
    };
    mui_shared::files::claim_report(conn, file_id)?;
    Ok(Decision::Send(Box::new(ReportPlan {
        from: tenant.reply_to_email.clone().unwrap_or_default(),
        to: tenant.failed_import_emails.clone(),
        // Stable per file (its id and arrival time), whatever is attached: every attempt
        // and every re-send after a lapsed claim carries the same Message-ID.
        message_id: format!(
            "<import-file-{}.{}@managed-user-import>",
            file_id.0,
            f.received_at.timestamp()
        ),
        summary,
        header,
        failures,
        max_attached,
        received_at: f.received_at,
    })))
}
