//! Handling one notify message: storing failure records (idempotently), recording dead
//! letters, and sending a file's report once it is due, with bounded concurrency and a
//! per-send timeout.

use super::*;
use mui_shared::codes::RowError;
use mui_shared::domain::storable;

/// Handles notify messages.
#[derive(Debug, Clone)]
pub struct Handler {
    pool: PgPool,
    mailer: Mailer,
    max_attached: i64,
    limits: MailLimits,
    shutdown: CancellationToken,
    /// How long a report refused for the time being is retried in place (`MAIL_RETRY_SECS`).
    mail_retry: Duration,
}

/// Failure records stored by one statement (4 parameters each, well under PostgreSQL's
/// 65,535).
const STORE_PART: usize = 1000;

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
            mail_retry: Duration::from_secs(900),
        }
    }

    /// The same handler giving up on a report its mail server keeps refusing for the time
    /// being after `retry` (then the report is held, and its slot freed).
    pub fn with_mail_retry(mut self, retry: Duration) -> Self {
        self.mail_retry = retry;
        self
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

    /// Handles one message holding one of the notifier's `MAIL_CONCURRENCY` slots
    /// (`slot`, taken from `slots`). While it waits for a report another notifier holds
    /// (`Busy`: that one sends it, or its claim lapses), it gives its slot back: a report
    /// whose notifier died mid-send waits out its claim without holding up other tenants'
    /// reports (found by the soak: two such files, two messages each, held all four slots
    /// for minutes).
    pub(crate) async fn handle_delivery(
        &self,
        delivery: lapin::message::Delivery,
        stop: &CancellationToken,
        slots: &Arc<tokio::sync::Semaphore>,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) {
        let mut slot = Some(slot);
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
            NotifyMessage::FileFinishedV1(f) | NotifyMessage::FileHeldV1(f) => {
                (f.file_id, f.tenant_id)
            }
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
        // The file's trace continues here (the outbox row's context, from the worker or
        // ingest that wrote the message).
        let (name, failures) = match &msg {
            NotifyMessage::RowFailuresV1(f) => ("failures.record", f.failures.len()),
            _ => ("file.notify", 0),
        };
        let span = tracing::info_span!(
            "notify",
            otel.name = name,
            tenant_id = tenant_id.0,
            file_id = file_id.0,
            mui.failures = failures as i64,
            messaging.system = "rabbitmq",
            messaging.operation.type = "process",
            messaging.destination.name = %delivery.routing_key,
            messaging.rabbitmq.delivery_tag = delivery.delivery_tag as i64,
            messaging.rabbitmq.redelivered = delivery.redelivered,
            otel.kind = "consumer",
        );
        TraceContext::from_headers(delivery.properties.headers().as_ref()).parent(&span);
        let current = span.clone();
        async {
            let mut backoff = amqp::backoff_policy(None);
            let mut retried = false;
            // Since when the mail server has refused this report for the time being.
            let mut refused_since: Option<tokio::time::Instant> = None;
            loop {
                match self.handle(&msg).await {
                    Ok(()) => {
                        if retried {
                            // The error a try before set no longer holds.
                            otel::set_ok(&current);
                        }
                        if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                            tracing::warn!(error = %e, "NotifyAckError");
                        }
                        return;
                    }
                    Err(e) if e.is_transient() => {
                        if matches!(e, NotifyError::Mail(_)) {
                            let since = *refused_since.get_or_insert_with(tokio::time::Instant::now);
                            // Not for ever: another tenant's report needs the slot.
                            let held_notice = matches!(msg, NotifyMessage::FileHeldV1(_));
                            if since.elapsed() >= self.mail_retry
                                && (held_notice || self.hold_refused(file_id, &e).await)
                            {
                                if held_notice {
                                    // The operator's held page lists the file all the same.
                                    tracing::warn!(file_id = file_id.0, "HeldNoticeGivenUp");
                                }
                                if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                                    tracing::warn!(error = %e, "NotifyAckError");
                                }
                                return;
                            }
                        }
                        let wait = backoff::backoff::Backoff::next_backoff(&mut backoff)
                            .unwrap_or(Duration::from_secs(10));
                        otel::set_error(&current, &e);
                        retried = true;
                        tracing::warn!(error = %e, cause = ?e, retry_in_ms = wait.as_millis() as u64, "NotifyRetry");
                        if matches!(e, NotifyError::Busy) {
                            slot = None; // another report may go out meanwhile
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = stop.cancelled() => {
                                let _ = delivery.nack(BasicNackOptions { requeue: true, multiple: false }).await;
                                return;
                            }
                        }
                        if slot.is_none() {
                            tokio::select! {
                                got = slots.clone().acquire_owned() => slot = got.ok(),
                                _ = stop.cancelled() => {
                                    let _ = delivery.nack(BasicNackOptions { requeue: true, multiple: false }).await;
                                    return;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        otel::set_error(&current, format!("{e}: {}", error_chain(&e)));
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

    /// Holds the report of `file_id`, which its mail server kept refusing for the time
    /// being for [`Handler::with_mail_retry`]'s while (unless it was sent meanwhile), with
    /// the server's last answer; true when that is recorded.
    async fn hold_refused(&self, file_id: ImportFileId, e: &NotifyError) -> bool {
        let detail = format!(
            "the mail server kept refusing the report for {} s (last: {e}: {}); send it again with `muictl files resend {}` once the tenant's mail server accepts mail",
            self.mail_retry.as_secs(),
            error_chain(e),
            file_id.0
        );
        let held = db::run(&self.pool, move |conn| {
            Ok(diesel::update(
                import_files::table
                    .find(file_id.0)
                    .filter(import_files::notify_status.eq(NotifyStatus::Pending)),
            )
            .set((
                import_files::notify_status.eq(NotifyStatus::Held),
                import_files::notify_detail.eq(detail),
                import_files::notified_at.eq(diesel::dsl::now),
            ))
            .execute(conn)?)
        })
        .await;
        match held {
            Ok(n) => {
                tracing::warn!(file_id = file_id.0, held = n == 1, "EmailRetryGivenUp");
                metrics::counter!("mui_mails_held_total").increment(1);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "EmailHoldError");
                false
            }
        }
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
            NotifyMessage::FileHeldV1(f) => {
                self.check_tenant(f.file_id, f.tenant_id.0).await?;
                return crate::held::send_hold_notice(&self.pool, &self.mailer, f.file_id).await;
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
            // A part at a time: its JSON values and the statement's bind buffer are what is
            // held besides the batch, not those of the whole batch (a chunk's 5,000 records
            // of wide rows took tens of MiB per message, several messages at once).
            for part in batch.failures.chunks(STORE_PART) {
                let rows: Vec<_> = part
                    .iter()
                    .map(|f| {
                        // jsonb refuses U+0000, which a UTF-16 file can carry in any cell.
                        let fields: Vec<_> = f.fields.iter().map(|v| storable(v)).collect();
                        let errors: Vec<RowError> = f
                            .errors
                            .iter()
                            .map(|e| RowError {
                                code: e.code,
                                column: e.column.as_deref().map(|c| storable(c).into_owned()),
                                message: storable(&e.message).into_owned(),
                            })
                            .collect();
                        Ok((
                            row_failures::file_id.eq(batch.file_id.0),
                            row_failures::row_number.eq(f.row as i64),
                            row_failures::fields.eq(serde_json::to_value(&fields)?),
                            row_failures::errors.eq(serde_json::to_value(&errors)?),
                        ))
                    })
                    .collect::<Result<_, serde_json::Error>>()
                    .map_err(|e| {
                        DbError::Query(diesel::result::Error::SerializationError(Box::new(e)))
                    })?;
                diesel::insert_into(row_failures::table)
                    .values(&rows)
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
        let plan_received_at = plan.received_at;
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
                    Ok(mui_shared::files::report_status(
                        conn,
                        file_id,
                        status,
                        detail.as_deref(),
                    )?)
                })
            },
        )
        .await?;
        match outcome {
            Ok(note) => {
                tracing::info!(reduced = note.is_some(), "EmailSent");
                metrics::counter!("mui_mails_sent_total").increment(1);
                let waited = chrono::Utc::now() - plan_received_at;
                metrics::histogram!("mui_file_upload_to_mail_seconds")
                    .record(waited.num_milliseconds().max(0) as f64 / 1000.0);
                Ok(())
            }
            Err(e) if e.is_transient() => {
                metrics::counter!("mui_mails_failed_total").increment(1);
                Err(e.into())
            }
            Err(e) => {
                metrics::counter!("mui_mails_failed_total").increment(1);
                metrics::counter!("mui_mails_held_total").increment(1);
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
            let span = tracing::info_span!(
                "mail.send",
                mui.mail.bytes = composed.size as i64,
                mui.mail.rows_attached = composed.rows as i64,
                mui.mail.reduced = composed.reduced,
                smtp.reply_code = tracing::field::Empty,
                otel.kind = "client",
            );
            let sent = self.mailer.send(message).instrument(span.clone()).await;
            if let Err(e) = &sent {
                otel::set_error(&span, format!("{e}: {}", error_chain(e)));
            }
            match sent {
                Ok(()) => {
                    mui_shared::failpoint::stop("notifier.after_accept");
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
