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
//!
//! Modules: [`run`] (this file) consumes the queue; [`Handler`] (`handler.rs`) handles one
//! message; `decide.rs` decides, under the file's row lock, whether a report is due;
//! [`retry`] retries a transient failure; [`compose`], [`report`] and [`mailer`] build and
//! send the mail.

pub mod compose;
pub mod dead_letters;
mod decide;
mod handler;
mod held;
pub mod html;
pub mod mailer;
pub mod report;
pub mod retry;

use decide::{decide, Decision};
pub use handler::Handler;
/// A file's stored failure records, in row order (in `mui_shared::failures`).
pub use mui_shared::failures::load_failures;
pub use retry::retry_transient;

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
use mui_shared::otel::{self, TraceContext};
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
    /// How long a report is retried (with backoff, holding one MAIL_CONCURRENCY slot) while
    /// the tenant's mail server refuses it for the time being (4xx, timeouts), seconds;
    /// after that the report is held with the server's answer, the slot is freed for other
    /// tenants, and `muictl files resend <file id>` sends it again.
    #[arg(long, env = "MAIL_RETRY_SECS", default_value_t = 900)]
    pub mail_retry_secs: u64,
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
        .with_mail_retry(Duration::from_secs(config.mail_retry_secs))
        .with_shutdown(stop.clone());
    tracing::info!(concurrency, "NotifierReady");
    let notify = async {
        let result = consume_notify(&mut consumer, &handler, concurrency, &stop).await;
        stop.cancel();
        result
    };
    let dead = async {
        let result = mui_shared::service::ends_after_stop(
            &stop,
            "the dead-letter recorder",
            dead_letters::run(&conn, pool.clone(), topology.clone(), stop.clone()),
        )
        .await;
        stop.cancel();
        result
    };
    let watch = async {
        tokio::select! {
            _ = amqp::connection_lost(&conn) => {
                stop.cancel();
                Err(anyhow::anyhow!("lost the connection to RabbitMQ"))
            }
            _ = stop.cancelled() => Ok(()),
        }
    };
    let (notify_result, dead_result, watch_result) = tokio::join!(notify, dead, watch);
    tracing::info!("NotifierStopping");
    drop(consumer);
    let _ = channel.close(200, "shutdown".into()).await;
    let _ = conn.close(200, "shutdown".into()).await;
    watch_result.and(notify_result).and(dead_result)
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
        let slots = slots.clone();
        tasks.spawn(async move {
            handler.handle_delivery(delivery, &stop, &slots, slot).await;
        });
    };
    if result.is_err() {
        // The channel is gone: the tasks in hand cannot acknowledge; stop their retries.
        stop.cancel();
    }
    mui_shared::service::drain(&mut tasks, log_task_end).await;
    result
}

fn log_task_end(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        // The message is unacknowledged and comes back when the channel closes.
        tracing::error!(error = %e, "NotifyTaskError");
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
