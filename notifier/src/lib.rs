//! # notifier
//!
//! Consumes the `notify` queue: failure records of each chunk
//! ([`mui_shared::messages::RowFailures`]) and "file finished" events. Failure records are
//! stored in `row_failures` before their message is acknowledged, so a restart loses none.
//! When a file is finished and every failure record it announced (`import_files.rows_failed`)
//! is stored, the notifier sends ONE email (see [`report`]) through [`mailer`], from the
//! tenant's Reply-to Admin Email Address to its Failed Import Email(s).
//!
//! Exactly one email per file in normal operation: `import_files.notify_status` goes
//! `pending → sending → sent` (or `not_needed` when nothing failed, or `held` when the tenant
//! lacks mail settings, with the reason in `notify_detail`). `sending` is a claim with a
//! timestamp, so two notifiers never mail the same file at once, and a notifier that died
//! while sending lets its claim expire. SMTP errors are retried with exponential backoff
//! while the triggering message is held; on success it is acknowledged.
//!
//! The notifier also records dead letters ([`dead_letters`]) for `muictl dead-letters`.

pub mod dead_letters;
pub mod mailer;
pub mod report;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use diesel::prelude::*;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use mui_shared::amqp::{self, QueueKind};
use mui_shared::config::{redact_url, CommonArgs};
use mui_shared::db::{self, DbError, PgPool};
use mui_shared::domain::ImportFileId;
use mui_shared::messages::{self, NotifyMessage, RowFailure, RowFailures};
use mui_shared::schema::{import_files, row_failures};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::mailer::{MailError, Mailer, Report};

/// notifier's settings.
#[derive(Debug, Clone, Args)]
pub struct NotifierConfig {
    /// Shared settings.
    #[command(flatten)]
    pub common: CommonArgs,
    /// SMTP server URL (`smtp://host:25`, `smtps://user:pass@host:465`,
    /// `smtp://host:587?tls=required`). Unset: mail is written to MAIL_OUTBOX as .eml files.
    #[arg(long, env = "SMTP_URL")]
    pub smtp_url: Option<String>,
    /// Folder for .eml files when no SMTP_URL is set.
    #[arg(long, env = "MAIL_OUTBOX", default_value = "mail-outbox")]
    pub mail_outbox: PathBuf,
    /// Most failed rows attached to one email (the rest are counted in the body and can be
    /// fetched with `muictl files failures`).
    #[arg(long, env = "MAX_ATTACHED_FAILURES", default_value_t = 50_000)]
    pub max_attached_failures: i64,
}

/// How long a `sending` claim holds before another notifier may take over.
const SENDING_CLAIM_SECS: i64 = 300;

/// Errors handling one notify message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotifyError {
    /// Database trouble.
    #[error("database error")]
    Db(#[from] DbError),
    /// Mail trouble.
    #[error("mail error")]
    Mail(#[from] MailError),
    /// Another notifier is sending this file's report right now.
    #[error("another notifier is sending this report")]
    Busy,
    /// The message names a file of another tenant (or none): never processed.
    #[error("message for {0} does not match its tenant")]
    WrongTenant(ImportFileId),
}

impl From<diesel::result::Error> for NotifyError {
    fn from(e: diesel::result::Error) -> Self {
        NotifyError::Db(e.into())
    }
}

impl NotifyError {
    fn is_transient(&self) -> bool {
        match self {
            NotifyError::Db(e) => db::is_transient(e),
            NotifyError::Mail(e) => e.is_transient(),
            NotifyError::Busy => true,
            NotifyError::WrongTenant(_) => false,
        }
    }
}

/// Runs the notifier until `shutdown`.
pub async fn run(config: NotifierConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mailer = Mailer::new(config.smtp_url.as_deref(), config.mail_outbox.clone())?;
    tracing::info!(
        database = %redact_url(&config.common.database_url),
        amqp = %redact_url(&config.common.amqp_url),
        mail = %mailer.describe(),
        "NotifierConfigured"
    );
    let pool = db::pool(&config.common.database_url, 4);
    let Some((conn, topology)) =
        mui_shared::service::start(&config.common, "mui-notifier", &pool, &shutdown).await?
    else {
        return Ok(());
    };
    let channel = conn.create_channel().await?;
    // Messages are handled one at a time in order; a small prefetch keeps the pipe full
    // without holding much that another notifier could take.
    channel.basic_qos(16, BasicQosOptions::default()).await?;
    let tag = format!("mui-notifier-{}", std::process::id());
    let mut consumer = channel
        .basic_consume(
            topology.queue(QueueKind::Notify).as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let handler = Handler::new(pool.clone(), mailer, config.max_attached_failures);
    tracing::info!("NotifierReady");
    // The notify consumer and the dead-letter recorder run side by side; if one fails the
    // other is stopped too and the run fails (the supervisor starts it again).
    let stop = shutdown.child_token();
    let notify = async {
        let result = consume_notify(&mut consumer, &handler, &stop).await;
        stop.cancel();
        result
    };
    let dead = async {
        let result = dead_letters::run(&conn, pool.clone(), topology.clone(), stop.clone()).await;
        stop.cancel();
        result
    };
    let (notify_result, dead_result) = tokio::join!(notify, dead);
    tracing::info!("NotifierStopping");
    drop(consumer);
    let _ = channel.close(200, "shutdown".into()).await;
    let _ = conn.close(200, "shutdown".into()).await;
    notify_result.and(dead_result)
}

async fn consume_notify(
    consumer: &mut lapin::Consumer,
    handler: &Handler,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let delivery = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            next = consumer.next() => match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e).context("consuming notify messages"),
                None => anyhow::bail!("the broker cancelled the notify consumer"),
            },
        };
        handler.handle_delivery(delivery, stop).await;
    }
}

/// Handles notify messages.
#[derive(Debug, Clone)]
pub struct Handler {
    pool: PgPool,
    mailer: Mailer,
    max_attached: i64,
}

impl Handler {
    /// A handler storing through `pool` and sending through `mailer`.
    pub fn new(pool: PgPool, mailer: Mailer, max_attached: i64) -> Self {
        Self {
            pool,
            mailer,
            max_attached: max_attached.max(1),
        }
    }

    async fn handle_delivery(&self, delivery: lapin::message::Delivery, stop: &CancellationToken) {
        let msg: NotifyMessage = match messages::decode(&delivery.data) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "NotifyUndecodableError");
                self.note_error(None, &delivery.data, format!("not a notify message: {e}"))
                    .await;
                let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
                return;
            }
        };
        let (file_id, tenant_id) = match &msg {
            NotifyMessage::RowFailuresV1(f) => (f.file_id, f.tenant_id),
            NotifyMessage::FileFinishedV1(f) => (f.file_id, f.tenant_id),
            _ => {
                tracing::error!("NotifyUnknownVersionError");
                self.note_error(
                    None,
                    &delivery.data,
                    "unknown notify message version".into(),
                )
                .await;
                let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
                return;
            }
        };
        let span = tracing::info_span!("notify", tenant_id = tenant_id.0, file_id = file_id.0);
        async {
            let mut backoff = amqp::backoff_policy(None);
            loop {
                match self.handle(&msg).await {
                    Ok(()) => {
                        if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                            tracing::warn!(error = %e, "NotifyAckError");
                        }
                        return;
                    }
                    Err(e) if e.is_transient() => {
                        let wait = backoff::backoff::Backoff::next_backoff(&mut backoff)
                            .unwrap_or(Duration::from_secs(10));
                        tracing::warn!(error = %e, cause = ?e, retry_in_ms = wait.as_millis() as u64, "NotifyRetry");
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = stop.cancelled() => {
                                let _ = delivery.nack(BasicNackOptions { requeue: true, multiple: false }).await;
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, cause = ?e, "NotifyRejectedError");
                        let file = match e {
                            NotifyError::WrongTenant(_) => None,
                            _ => Some(file_id.0),
                        };
                        let why = format!("{e}: {}", error_chain(&e));
                        self.note_error(file, &delivery.data, why).await;
                        let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
                        return;
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Notes why a message is rejected, for its dead-letter record (best effort).
    async fn note_error(&self, file_id: Option<i64>, payload: &[u8], error: String) {
        let payload = payload.to_vec();
        let result = db::run(&self.pool, move |conn| {
            Ok(mui_shared::deadletters::note_error(
                conn,
                QueueKind::Notify,
                file_id,
                &payload,
                &error,
            )?)
        })
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "NotifyErrorNoteError");
        }
    }

    /// Handles one message: stores failure records, then sends the report if it is due.
    pub async fn handle(&self, msg: &NotifyMessage) -> Result<(), NotifyError> {
        let file_id = match msg {
            NotifyMessage::RowFailuresV1(f) => {
                self.store(f.clone()).await?;
                f.file_id
            }
            NotifyMessage::FileFinishedV1(f) => {
                self.check_tenant(f.file_id, f.tenant_id.0).await?;
                f.file_id
            }
            _ => return Ok(()),
        };
        self.send_if_due(file_id).await
    }

    async fn check_tenant(&self, file_id: ImportFileId, tenant: i64) -> Result<(), NotifyError> {
        let owner = db::run(&self.pool, move |conn| {
            Ok(import_files::table
                .find(file_id.0)
                .select(import_files::tenant_id)
                .first::<i64>(conn)
                .optional()?)
        })
        .await?;
        if owner != Some(tenant) {
            return Err(NotifyError::WrongTenant(file_id));
        }
        Ok(())
    }

    async fn store(&self, batch: RowFailures) -> Result<(), NotifyError> {
        self.check_tenant(batch.file_id, batch.tenant_id.0).await?;
        let n = batch.failures.len();
        db::run(&self.pool, move |conn| {
            let rows: Vec<_> = batch
                .failures
                .iter()
                .map(|f| {
                    Ok((
                        row_failures::file_id.eq(batch.file_id.0),
                        row_failures::row_number.eq(f.row as i64),
                        row_failures::fields.eq(serde_json::to_value(&f.fields)?),
                        row_failures::errors.eq(serde_json::to_value(&f.errors)?),
                    ))
                })
                .collect::<Result<_, serde_json::Error>>()
                .map_err(|e| {
                    DbError::Query(diesel::result::Error::SerializationError(Box::new(e)))
                })?;
            // 4 parameters a row: stay well under PostgreSQL's 65535 bind parameters.
            for part in rows.chunks(10_000) {
                diesel::insert_into(row_failures::table)
                    .values(part)
                    .on_conflict_do_nothing()
                    .execute(conn)?;
            }
            Ok(())
        })
        .await?;
        tracing::debug!(failures = n, "FailuresStored");
        Ok(())
    }

    /// Sends the file's report if the file is finished, every failure record is stored, and
    /// no report went out yet.
    pub async fn send_if_due(&self, file_id: ImportFileId) -> Result<(), NotifyError> {
        let max_attached = self.max_attached;
        let decision = db::run(&self.pool, move |conn| {
            Ok(conn.transaction(|conn| decide(conn, file_id, max_attached))?)
        })
        .await?;
        let report = match decision {
            Decision::Nothing => return Ok(()),
            Decision::Busy => return Err(NotifyError::Busy),
            Decision::Send(report) => report,
        };
        let result = match report.to_message() {
            Ok(message) => self.mailer.send(message).await,
            Err(e) => Err(e),
        };
        let (status, detail) = match &result {
            Ok(()) => ("sent", None),
            Err(e) if e.is_transient() => ("pending", None),
            Err(e) => ("held", Some(format!("{e}: {}", error_chain(e)))),
        };
        db::run(&self.pool, move |conn| {
            diesel::update(import_files::table.find(file_id.0))
                .set((
                    import_files::notify_status.eq(status),
                    import_files::notify_detail.eq(detail),
                    import_files::notified_at.eq(diesel::dsl::now),
                ))
                .execute(conn)?;
            Ok(())
        })
        .await?;
        match result {
            Ok(()) => {
                tracing::info!("EmailSent");
                Ok(())
            }
            Err(e) if e.is_transient() => Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, "EmailHeld");
                Ok(())
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        parts.push(c.to_string());
        cur = c.source();
    }
    parts.join(": ")
}

enum Decision {
    Nothing,
    Busy,
    Send(Report),
}

#[derive(Queryable)]
#[allow(dead_code)]
struct FileRow {
    tenant_id: i64,
    file_name: String,
    state: String,
    encoding: Option<String>,
    delimiter: Option<String>,
    header: Option<serde_json::Value>,
    ignored: Option<serde_json::Value>,
    rows_total: Option<i64>,
    inserted: i64,
    updated: i64,
    unchanged: i64,
    failed: i64,
    archived: i64,
    reactivated: i64,
    permits_released: i64,
    error_message: Option<String>,
    notify_status: String,
    notified_at: Option<chrono::DateTime<chrono::Utc>>,
    received_at: chrono::DateTime<chrono::Utc>,
}

fn decide(
    conn: &mut PgConnection,
    file_id: ImportFileId,
    max_attached: i64,
) -> Result<Decision, diesel::result::Error> {
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
            import_files::rows_failed,
            import_files::users_archived,
            import_files::users_reactivated,
            import_files::permits_released,
            import_files::error_message,
            import_files::notify_status,
            import_files::notified_at,
            import_files::received_at,
        ))
        .for_update()
        .first(conn)
        .optional()?
    else {
        return Ok(Decision::Nothing);
    };
    match f.notify_status.as_str() {
        "pending" => {}
        "sending" => {
            let fresh = f.notified_at.is_some_and(|t| {
                chrono::Utc::now() - t < chrono::Duration::seconds(SENDING_CLAIM_SECS)
            });
            if fresh {
                return Ok(Decision::Busy);
            }
        }
        _ => return Ok(Decision::Nothing), // sent, not_needed, held
    }
    if f.state != "done" && f.state != "failed" {
        return Ok(Decision::Nothing);
    }
    if f.state == "done" {
        let stored: i64 = row_failures::table
            .filter(row_failures::file_id.eq(file_id.0))
            .count()
            .get_result(conn)?;
        if stored < f.failed {
            return Ok(Decision::Nothing); // more failure records are on their way
        }
        if f.failed == 0 {
            diesel::update(import_files::table.find(file_id.0))
                .set(import_files::notify_status.eq("not_needed"))
                .execute(conn)?;
            tracing::info!("ReportNotNeeded");
            return Ok(Decision::Nothing);
        }
    }
    let tenant = mui_shared::tenants::find(conn, mui_shared::domain::TenantId(f.tenant_id))?;
    let Some(tenant) = tenant else {
        return Ok(Decision::Nothing);
    };
    if let Some(why) = tenant.missing_mail_settings() {
        diesel::update(import_files::table.find(file_id.0))
            .set((
                import_files::notify_status.eq("held"),
                import_files::notify_detail.eq(&why),
            ))
            .execute(conn)?;
        tracing::warn!(reason = %why, "ReportHeld");
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
        file_name: f.file_name.clone(),
        state: f.state.clone(),
        rows_total: f.rows_total.unwrap_or(0),
        inserted: f.inserted,
        updated: f.updated,
        unchanged: f.unchanged,
        failed: f.failed,
        archived: f.archived,
        reactivated: f.reactivated,
        permits_released: f.permits_released,
        encoding: f.encoding.clone(),
        delimiter: f.delimiter.clone(),
        ignored,
        error: f.error_message.clone(),
        received_at: f.received_at.format("%Y-%m-%d %H:%M UTC").to_string(),
    };
    let attachment_name = report::attachment_name(&f.file_name);
    let mut body = summary.body(&attachment_name);
    let attachment = if f.state == "done" {
        let failures = load_failures(conn, file_id, max_attached)?;
        if f.failed > max_attached {
            body.push_str(&format!(
                "\nOnly the first {max_attached} failed rows are attached; ask your administrator for the full list of {}.\n",
                f.failed
            ));
        }
        let csv = report::failures_csv(&header, &failures)
            .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
        Some((attachment_name, csv))
    } else {
        None
    };
    diesel::update(import_files::table.find(file_id.0))
        .set((
            import_files::notify_status.eq("sending"),
            import_files::notified_at.eq(diesel::dsl::now),
        ))
        .execute(conn)?;
    Ok(Decision::Send(Report {
        from: tenant.reply_to_email.clone().unwrap_or_default(),
        to: tenant.failed_import_emails.clone(),
        subject: summary.subject(),
        body,
        attachment,
        message_id: format!(
            "<import-file-{}.{}@managed-user-import>",
            file_id.0,
            f.received_at.timestamp()
        ),
    }))
}

/// A file's stored failure records, in row order.
pub fn load_failures(
    conn: &mut PgConnection,
    file_id: ImportFileId,
    limit: i64,
) -> Result<Vec<RowFailure>, diesel::result::Error> {
    let rows: Vec<(i64, serde_json::Value, serde_json::Value)> = row_failures::table
        .filter(row_failures::file_id.eq(file_id.0))
        .order(row_failures::row_number)
        .limit(limit)
        .select((
            row_failures::row_number,
            row_failures::fields,
            row_failures::errors,
        ))
        .load(conn)?;
    rows.into_iter()
        .map(|(row, fields, errors)| {
            Ok(RowFailure {
                row: row as u64,
                fields: serde_json::from_value(fields)
                    .map_err(|e| diesel::result::Error::DeserializationError(Box::new(e)))?,
                errors: serde_json::from_value(errors)
                    .map_err(|e| diesel::result::Error::DeserializationError(Box::new(e)))?,
            })
        })
        .collect()
}
