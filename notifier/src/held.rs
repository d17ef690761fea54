//! The mail telling a tenant that a file is held by the mass-deactivation guard: what the
//! file would do, the users it would deactivate or archive (attached as CSV), and what
//! happens next. Sent once per held file (`import_files.hold_notified_at`, claimed first by
//! `hold_notice_claimed_until`).

use super::*;
use crate::mailer::{Report, ReportAttachment};
use mui_shared::schema::import_files;

/// How long a claim on sending a held mail lasts: longer than any SMTP conversation
/// (`SMTP_TIMEOUT_SECS`), as the report's claim.
const CLAIM_FOR: &str = "now() + interval '5 minutes'";

/// What the held mail is built from.
#[derive(Debug, Clone)]
struct HeldPlan {
    from: String,
    to: Vec<String>,
    file_name: String,
    received_at: chrono::DateTime<chrono::Utc>,
    would: i64,
    active: i64,
    users: Vec<[String; 5]>,
}

/// Mails the tenant that `file_id` is held, unless it was mailed already, is no longer held,
/// or the tenant has no mail settings (then the operator sees the file held in `muictl
/// files list` and the report waits, as for any file).
pub(crate) async fn send_hold_notice(
    pool: &PgPool,
    mailer: &Mailer,
    file_id: ImportFileId,
) -> Result<(), NotifyError> {
    let plan = db::run(pool, move |conn| {
        type Row = (
            i64,
            String,
            chrono::DateTime<chrono::Utc>,
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<chrono::DateTime<chrono::Utc>>,
        );
        let row: Option<Row> = import_files::table
            .find(file_id.0)
            .select((
                import_files::tenant_id,
                import_files::file_name,
                import_files::received_at,
                import_files::hold,
                import_files::hold_users,
                import_files::hold_active_users,
                import_files::hold_notified_at,
            ))
            .first(conn)
            .optional()?;
        let Some((tenant_id, file_name, received_at, hold, would, active, notified)) = row else {
            return Ok(None);
        };
        if hold.as_deref() != Some("held") || notified.is_some() {
            return Ok(None);
        }
        let Some(tenant) =
            mui_shared::tenants::find(conn, mui_shared::domain::TenantId(tenant_id))?
        else {
            return Ok(None);
        };
        if let Some(why) = tenant.missing_mail_settings() {
            tracing::warn!(reason = %why, "HeldNoticeNotMailed");
            return Ok(None);
        }
        // Claimed, as a report is, so that two copies of the "file held" message handled at
        // once (the outbox publishes at least once; several notifiers) send one mail. A claim
        // left by a notifier that died mid-send expires.
        let claimed = diesel::update(
            import_files::table
                .find(file_id.0)
                .filter(import_files::hold.eq("held"))
                .filter(import_files::hold_notified_at.is_null())
                .filter(
                    import_files::hold_notice_claimed_until
                        .is_null()
                        .or(import_files::hold_notice_claimed_until.lt(diesel::dsl::now)),
                ),
        )
        .set(
            import_files::hold_notice_claimed_until.eq(diesel::dsl::sql::<
                diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>,
            >(CLAIM_FOR)),
        )
        .execute(conn)?;
        if claimed == 0 {
            return Ok(None);
        }
        let users = mui_shared::holds::deactivations(conn, file_id)?;
        Ok(Some(HeldPlan {
            from: tenant.reply_to_email.clone().unwrap_or_default(),
            to: tenant.failed_import_emails.clone(),
            file_name,
            received_at,
            would: would.unwrap_or(0),
            active: active.unwrap_or(0),
            users,
        }))
    })
    .await?;
    let Some(plan) = plan else {
        return Ok(());
    };
    let sent = async {
        let report = held_report(&plan, file_id)?;
        let message = report.to_message()?;
        mailer.send(message).await?;
        Ok::<_, NotifyError>(())
    }
    .await;
    if let Err(e) = sent {
        // Let the retry claim it at once (else the claim expires).
        let _ = db::run(pool, move |conn| {
            diesel::update(import_files::table.find(file_id.0))
                .set(
                    import_files::hold_notice_claimed_until
                        .eq(None::<chrono::DateTime<chrono::Utc>>),
                )
                .execute(conn)?;
            Ok(())
        })
        .await;
        return Err(e);
    }
    db::run(pool, move |conn| {
        diesel::update(import_files::table.find(file_id.0))
            .set(import_files::hold_notified_at.eq(diesel::dsl::now))
            .execute(conn)?;
        Ok(())
    })
    .await?;
    tracing::info!(file_id = file_id.0, "HeldNoticeSent");
    Ok(())
}

fn held_report(plan: &HeldPlan, file_id: ImportFileId) -> Result<Report, MailError> {
    let name = mui_shared::messages::truncate_for_message(&plan.file_name, 80);
    let subject = format!(
        "User import \"{name}\" is ON HOLD: it would deactivate {} of your {} active users",
        plan.would, plan.active
    );
    let csv_name = format!(
        "{}.would-deactivate.csv",
        mui_shared::failures::safe_name(&plan.file_name)
    );
    let paragraphs = vec![
        format!(
            "Your file \"{}\" (received {}) was NOT imported yet, and nothing was changed: it \
             would deactivate or archive {} of your {} active users, more than the \
             mass-deactivation guard allows for one file.",
            plan.file_name,
            plan.received_at.format("%Y-%m-%d %H:%M UTC"),
            plan.would,
            plan.active
        ),
        format!(
            "The attached {csv_name} lists those users. A file that says active=0 for \
             many users is often an export that went wrong (a missing or wrong active \
             column, an empty filter)."
        ),
        "If this is what you want, ask your administrator to approve the file: it is then \
         imported exactly as you uploaded it. If it is a mistake, ask them to reject it and \
         upload a corrected file. Files you upload after this one wait until it is decided, \
         so that your files take effect in the order you sent them."
            .to_owned(),
        format!(
            "Your administrator's reference for this file: {}.",
            file_id.0
        ),
    ];
    let mut body = String::new();
    for p in &paragraphs {
        body.push_str(p);
        body.push_str("\n\n");
    }
    let mut csv = Vec::new();
    csv.extend_from_slice("\u{feff}".as_bytes());
    {
        let mut w = csv::WriterBuilder::new()
            .terminator(csv::Terminator::CRLF)
            .from_writer(&mut csv);
        let write = |w: &mut csv::Writer<&mut Vec<u8>>, rec: &[String]| {
            w.write_record(rec.iter().map(|c| mui_shared::failures::neutralise(c)))
                .map_err(|e| MailError::Attachment(e.to_string()))
        };
        write(
            &mut w,
            &["unique_id", "first_name", "last_name", "email", "user_name"].map(String::from),
        )?;
        for u in &plan.users {
            write(&mut w, u)?;
        }
        w.flush()
            .map_err(|e| MailError::Attachment(e.to_string()))?;
    }
    Ok(Report {
        from: plan.from.clone(),
        to: plan.to.clone(),
        html: Some(crate::html::simple_html(&subject, &paragraphs)),
        subject,
        body,
        attachment: Some(ReportAttachment {
            name: csv_name,
            content_type: "text/csv; charset=utf-8".into(),
            bytes: csv,
        }),
        message_id: format!(
            "<import-file-{}.{}.held@managed-user-import>",
            file_id.0,
            plan.received_at.timestamp()
        ),
    })
}
