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
//! `pending → sending → sent` (or `not_needed` when nothing failed and there is no notice, or `held` when the tenant
//! lacks mail settings, with the reason in `notify_detail`). `sending` is a claim with a
//! timestamp, so two notifiers never mail the same file at once, and a notifier that died
//! while sending lets its claim expire. SMTP errors (and sends that time out) are retried
//! with exponential backoff while the triggering message is held; on success it is
//! acknowledged. The write that records the outcome of a send is itself retried with backoff
//! ([`retry_transient`]), so a database hiccup right after the server accepted the mail does
//! not leave the claim to lapse into a second mail.
//!
//! Messages are handled concurrently, at most `MAIL_CONCURRENCY` at once, each send bounded
//! by `SMTP_TIMEOUT_SECS`: one tenant's slow or stuck mail server does not hold up another
//! tenant's report. Reports too large for mail are compressed or cut down ([`compose`]).
//!
//! The notifier also records dead letters ([`dead_letters`]) for `muictl dead-letters`.

pub mod compose;
pub mod dead_letters;
pub mod mailer;
pub mod report;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
use mui_shared::files::{FileState, NotifyStatus};
use mui_shared::messages::{self, NotifyMessage, RowFailures};
use mui_shared::schema::{import_files, row_failures};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::compose::{MailLimits, ReportPlan};
use crate::mailer::{MailError, Mailer};

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
    /// Notify messages handled at once, so reports sent at once: one tenant's slow mail
    /// server holds at most one of these slots per report.
    #[arg(long, env = "MAIL_CONCURRENCY", default_value_t = 4)]
    pub mail_concurrency: usize,
    /// Longest one SMTP conversation may take, seconds; a send that takes longer is given
    /// up and retried with backoff.
    #[arg(long, env = "SMTP_TIMEOUT_SECS", default_value_t = 30)]
    pub smtp_timeout_secs: u64,
    /// A failures CSV larger than this (bytes) is attached as a .zip holding it.
    #[arg(long, env = "ATTACH_COMPRESS_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub attach_compress_bytes: usize,
    /// Largest email sent (bytes, as sent: base64 makes an attachment a third larger).
    /// Above it the email carries the summary and the first failed rows that fit, and says
    /// how many were left out. A server refusing an email as too large (552) gets such a
    /// reduced email too.
    #[arg(long, env = "MAX_MAIL_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_mail_bytes: usize,
}

impl NotifierConfig {
    /// The report size limits.
    pub fn mail_limits(&self) -> MailLimits {
        MailLimits {
            compress_above: self.attach_compress_bytes,
            max_mail_bytes: self.max_mail_bytes,
        }
    }
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
    let mailer = Mailer::with_timeout(
        config.smtp_url.as_deref(),
        config.mail_outbox.clone(),
        Duration::from_secs(config.smtp_timeout_secs.max(1)),
    )?;
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
    // Up to MAIL_CONCURRENCY messages are in hand at once; the prefetch keeps a few more
    // ready behind them without holding much that another notifier could take.
    let concurrency = config.mail_concurrency.max(1);
    let prefetch = u16::try_from(concurrency.saturating_mul(2).max(16)).unwrap_or(u16::MAX);
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("mui-notifier-{}", std::process::id());
    let mut consumer = channel
        .basic_consume(
            topology.queue(QueueKind::Notify).as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // The notify consumer and the dead-letter recorder run side by side; if one fails the
    // other is stopped too and the run fails (the supervisor starts it again).
    let stop = shutdown.child_token();
    let handler = Handler::new(pool.clone(), mailer, config.max_attached_failures)
        .with_limits(config.mail_limits())
        .with_shutdown(stop.clone());
    tracing::info!(concurrency, "NotifierReady");
    let notify = async {
        let result = consume_notify(&mut consumer, &handler, concurrency, &stop).await;
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

/// Takes deliveries while fewer than `concurrency` are in hand and handles each in a task of
/// its own, so a report stuck on one tenant's mail server does not hold up the messages
/// behind it. Each task acknowledges its message once its work is durably done, as before.
/// On stop (or a consumer failure) it waits for the tasks in hand, which finish or hand
/// their message back.
async fn consume_notify(
    consumer: &mut lapin::Consumer,
    handler: &Handler,
    concurrency: usize,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    let result = loop {
        while let Some(done) = tasks.try_join_next() {
            log_task_end(done);
        }
        let slot = tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break Ok(()), // never closed
            },
        };
        let delivery = tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            next = consumer.next() => match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => break Err(anyhow::Error::new(e).context("consuming notify messages")),
                None => break Err(anyhow::anyhow!("the broker cancelled the notify consumer")),
            },
        };
        let handler = handler.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            handler.handle_delivery(delivery, &stop).await;
            drop(slot);
        });
    };
    if result.is_err() {
        // The channel is gone: the tasks in hand cannot acknowledge; stop their retries.
        stop.cancel();
    }
    while let Some(done) = tasks.join_next().await {
        log_task_end(done);
    }
    result
}

fn log_task_end(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        // The message is unacknowledged and comes back when the channel closes.
        tracing::error!(error = %e, "NotifyTaskError");
    }
}

/// Handles notify messages.
#[derive(Debug, Clone)]
pub struct Handler {
    pool: PgPool,
    mailer: Mailer,
    max_attached: i64,
    limits: MailLimits,
    shutdown: CancellationToken,
}

impl Handler {
    /// A handler storing through `pool` and sending through `mailer`, with the default
    /// [`MailLimits`].
    pub fn new(pool: PgPool, mailer: Mailer, max_attached: i64) -> Self {
        Self {
            pool,
            mailer,
            max_attached: max_attached.max(1),
            limits: MailLimits::default(),
            shutdown: CancellationToken::new(),
        }
    }

    /// The same handler with other report size limits.
    pub fn with_limits(mut self, limits: MailLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The same handler, giving up retrying the write after a send once `shutdown` is
    /// cancelled (its message is then handed back; see [`Handler::send_if_due`]).
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
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
    ///
    /// The outcome is written with retries ([`retry_transient`], for up to the claim's
    /// lifetime): once a server accepted the mail, a failed write would leave the claim to
    /// expire and the report to go out a second time.
    pub async fn send_if_due(&self, file_id: ImportFileId) -> Result<(), NotifyError> {
        let max_attached = self.max_attached;
        let decision = db::run(&self.pool, move |conn| {
            Ok(conn.transaction(|conn| decide(conn, file_id, max_attached))?)
        })
        .await?;
        let plan = match decision {
            Decision::Nothing => return Ok(()),
            Decision::Busy => return Err(NotifyError::Busy),
            Decision::Send(plan) => plan,
        };
        let outcome = self.deliver(Arc::new(*plan)).await;
        let (status, detail) = match &outcome {
            Ok(None) => (NotifyStatus::Sent, None),
            Ok(Some(note)) => (NotifyStatus::Sent, Some(note.clone())),
            Err(e) if e.is_transient() => (NotifyStatus::Pending, None),
            Err(e) => (NotifyStatus::Held, Some(format!("{e}: {}", error_chain(e)))),
        };
        let pool = self.pool.clone();
        retry_transient(
            amqp::backoff_policy(Some(Duration::from_secs(SENDING_CLAIM_SECS as u64 - 30))),
            &self.shutdown,
            |e: &DbError| db::is_transient(e),
            "NotifyStatusWriteRetry",
            || {
                let detail = detail.clone();
                db::run(&pool, move |conn| {
                    diesel::update(import_files::table.find(file_id.0))
                        .set((
                            import_files::notify_status.eq(status),
                            import_files::notify_detail.eq(detail),
                            import_files::notified_at.eq(diesel::dsl::now),
                        ))
                        .execute(conn)?;
                    Ok(())
                })
            },
        )
        .await?;
        match outcome {
            Ok(note) => {
                tracing::info!(reduced = note.is_some(), "EmailSent");
                Ok(())
            }
            Err(e) if e.is_transient() => Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, "EmailHeld");
                Ok(())
            }
        }
    }

    /// Sends the report: the full one (compressed or cut down to `MAX_MAIL_BYTES`), and
    /// when the server refuses it as too large (552), smaller ones (half the size each time,
    /// down to the summary alone) until one is accepted. `Ok(Some(note))`: sent, with what
    /// the operator should know (rows left out, the server's refusal).
    async fn deliver(&self, plan: Arc<ReportPlan>) -> Result<Option<String>, MailError> {
        let limits = self.limits;
        let mut max_bytes = limits.max_mail_bytes;
        let mut refused: Option<(usize, String)> = None;
        loop {
            let p = plan.clone();
            let was_refused = refused.is_some();
            // Compressing and measuring a large report is CPU work: off the async threads.
            let composed = tokio::task::spawn_blocking(move || {
                compose::compose(&p, limits, max_bytes, was_refused)
            })
            .await
            .map_err(|e| MailError::Attachment(format!("composing the report: {e}")))??;
            let message = composed.report.to_message()?;
            match self.mailer.send(message).await {
                Ok(()) => {
                    let failed = plan.summary.failed;
                    let note = match (&refused, composed.reduced) {
                        (Some((size, why)), _) => Some(format!(
                            "sent reduced ({} of {failed} failed rows attached, {} bytes): the \
                             server refused {size} bytes: {why}",
                            composed.rows, composed.size
                        )),
                        (None, true) => Some(format!(
                            "sent reduced: {} of {failed} failed rows attached (MAX_MAIL_BYTES \
                             or MAX_ATTACHED_FAILURES)",
                            composed.rows
                        )),
                        (None, false) => None,
                    };
                    return Ok(note);
                }
                Err(e) if e.is_too_large() && composed.rows > 0 => {
                    let why = format!("{e}: {}", error_chain(&e));
                    tracing::warn!(size = composed.size, rows = composed.rows, error = %why, "EmailTooLarge");
                    max_bytes = composed.size / 2;
                    if refused.is_none() {
                        refused = Some((composed.size, why));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Runs `op` until it succeeds, retrying errors `is_transient` accepts with the waits of
/// `policy`; gives up (returning the last error) on any other error, when the policy runs
/// out, or when `stop` is cancelled. `event` names the log line of each retry.
pub async fn retry_transient<T, E, F, Fut>(
    mut policy: impl backoff::backoff::Backoff,
    stop: &CancellationToken,
    is_transient: impl Fn(&E) -> bool,
    event: &'static str,
    mut op: F,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if is_transient(&e) => {
                let Some(wait) = policy.next_backoff() else {
                    return Err(e);
                };
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "{event}");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return Err(e),
                }
            }
            Err(e) => return Err(e),
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
    Send(Box<ReportPlan>),
}

#[derive(Queryable)]
#[allow(dead_code)]
struct FileRow {
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
    failed: i64,
    archived: i64,
    reactivated: i64,
    permits_released: i64,
    error_message: Option<String>,
    notify_status: NotifyStatus,
    notified_at: Option<chrono::DateTime<chrono::Utc>>,
    received_at: chrono::DateTime<chrono::Utc>,
    notices: Vec<String>,
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
            import_files::notices,
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
        // UTF-8…) is mailed even when nothing failed: the tenant must hear of it.
        if f.failed == 0 && f.notices.is_empty() {
            diesel::update(import_files::table.find(file_id.0))
                .set(import_files::notify_status.eq(NotifyStatus::NotNeeded))
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
                import_files::notify_status.eq(NotifyStatus::Held),
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
        file_id: file_id.0,
        file_name: f.file_name.clone(),
        state: f.state,
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
        notices: f.notices.clone(),
    };
    let failures = if f.state == FileState::Done {
        load_failures(conn, file_id, max_attached)?
    } else {
        Vec::new()
    };
    diesel::update(import_files::table.find(file_id.0))
        .set((
            import_files::notify_status.eq(NotifyStatus::Sending),
            import_files::notified_at.eq(diesel::dsl::now),
        ))
        .execute(conn)?;
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

/// A file's stored failure records, in row order (in `mui_shared::failures`).
pub use mui_shared::failures::load_failures;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn quick() -> backoff::ExponentialBackoff {
        backoff::ExponentialBackoff {
            current_interval: Duration::from_millis(1),
            initial_interval: Duration::from_millis(1),
            max_interval: Duration::from_millis(5),
            max_elapsed_time: Some(Duration::from_secs(30)),
            ..backoff::ExponentialBackoff::default()
        }
    }

    #[derive(Debug)]
    struct Fail(bool); // transient?

    impl std::fmt::Display for Fail {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "fail (transient: {})", self.0)
        }
    }

    #[tokio::test]
    async fn a_write_that_fails_transiently_is_retried_until_it_succeeds() {
        let calls = AtomicUsize::new(0);
        let stop = CancellationToken::new();
        let result = retry_transient(
            quick(),
            &stop,
            |e: &Fail| e.0,
            "Test",
            || async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0..=3 => Err(Fail(true)),
                    n => Ok(n),
                }
            },
        )
        .await;
        assert_eq!(result.unwrap(), 4, "succeeded on the fifth call");
        assert_eq!(calls.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn a_permanent_error_is_not_retried() {
        let calls = AtomicUsize::new(0);
        let stop = CancellationToken::new();
        let result: Result<(), Fail> = retry_transient(
            quick(),
            &stop,
            |e: &Fail| e.0,
            "Test",
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Fail(false))
            },
        )
        .await;
        assert!(matches!(result, Err(Fail(false))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn retries_end_when_the_policy_runs_out_or_on_stop() {
        let calls = AtomicUsize::new(0);
        let stop = CancellationToken::new();
        let mut policy = quick();
        policy.max_elapsed_time = Some(Duration::from_millis(50));
        let result: Result<(), Fail> = retry_transient(
            policy,
            &stop,
            |e: &Fail| e.0,
            "Test",
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Fail(true))
            },
        )
        .await;
        assert!(matches!(result, Err(Fail(true))));
        assert!(calls.load(Ordering::SeqCst) > 1, "retried before giving up");

        stop.cancel();
        let calls = AtomicUsize::new(0);
        let result: Result<(), Fail> = retry_transient(
            quick(),
            &stop,
            |e: &Fail| e.0,
            "Test",
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Fail(true))
            },
        )
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "no retry once stopped");
    }

    #[test]
    fn the_options_have_their_documented_defaults() {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            config: NotifierConfig,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(["mui-notifier"]).unwrap();
        let c = cli.config;
        assert_eq!(c.mail_concurrency, 4);
        assert_eq!(c.smtp_timeout_secs, 30);
        assert_eq!(c.mail_limits(), MailLimits::default());
        assert_eq!(c.attach_compress_bytes, 2 * 1024 * 1024);
        assert_eq!(c.max_mail_bytes, 10 * 1024 * 1024);
    }
}
