//! Where reports go: an SMTP server (`SMTP_URL`, e.g. `smtp://mail.example.org:25`,
//! `smtps://user:password@mail.example.org:465`, or `smtp://...?tls=required` for STARTTLS),
//! or, when none is configured, `.eml` files in a local outbox folder (`MAIL_OUTBOX`).

use std::path::PathBuf;
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

/// Errors building or sending a report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MailError {
    /// An address in the tenant's settings is not valid: permanent until the setting is fixed.
    #[error("invalid address in tenant settings: {0}")]
    Address(#[from] lettre::address::AddressError),
    /// The message could not be built.
    #[error("could not build the email")]
    Build(#[from] lettre::error::Error),
    /// SMTP failed: server down or a 4xx reply (transient, retried), or a 5xx reply
    /// (permanent: 552 means the message is too large, see [`MailError::is_too_large`]).
    #[error("SMTP delivery failed")]
    Smtp(#[from] lettre::transport::smtp::Error),
    /// The SMTP conversation took longer than the send timeout: transient, retried. Whether
    /// the server kept the message is unknown (see docs/reliability.md).
    #[error("SMTP conversation did not finish within {}s", .0.as_secs())]
    Timeout(Duration),
    /// Writing the outbox file failed.
    #[error("writing to the mail outbox failed")]
    File(#[from] lettre::transport::file::Error),
    /// The failures CSV could not be written or compressed.
    #[error("could not build the failures attachment: {0}")]
    Attachment(String),
}

impl MailError {
    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            MailError::Smtp(e) => !e.is_permanent(),
            MailError::Timeout(_) | MailError::File(_) => true,
            MailError::Address(_) | MailError::Build(_) | MailError::Attachment(_) => false,
        }
    }

    /// Whether the server refused the message as too large (reply 552, "exceeded storage
    /// allocation", which servers use for messages over their size limit).
    pub fn is_too_large(&self) -> bool {
        match self {
            MailError::Smtp(e) => e.status().map(u16::from) == Some(552),
            _ => false,
        }
    }
}

/// How long one SMTP conversation may take by default (`SMTP_TIMEOUT_SECS`).
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// A configured mail transport.
#[derive(Debug, Clone)]
pub struct Mailer {
    transport: Transport,
    timeout: Duration,
}

#[derive(Debug, Clone)]
enum Transport {
    /// Real SMTP.
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    /// `.eml` files in a folder.
    Outbox(AsyncFileTransport<Tokio1Executor>, PathBuf),
}

impl Mailer {
    /// SMTP if `smtp_url` is given, otherwise the outbox folder (created if missing); each
    /// send bounded by [`DEFAULT_SEND_TIMEOUT`].
    pub fn new(smtp_url: Option<&str>, outbox: PathBuf) -> anyhow::Result<Self> {
        Self::with_timeout(smtp_url, outbox, DEFAULT_SEND_TIMEOUT)
    }

    /// [`Mailer::new`] with each send bounded by `timeout`.
    pub fn with_timeout(
        smtp_url: Option<&str>,
        outbox: PathBuf,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let transport = match smtp_url.filter(|u| !u.trim().is_empty()) {
            // lettre's own timeout bounds each read and write of the conversation; the
            // tokio timeout in `send` bounds the whole of it (a server trickling replies
            // would otherwise hold a report, and a concurrency slot, indefinitely).
            Some(url) => Transport::Smtp(
                AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
                    .map_err(|e| anyhow::anyhow!("SMTP_URL is not usable: {e}"))?
                    .timeout(Some(timeout))
                    .build(),
            ),
            None => {
                std::fs::create_dir_all(&outbox).map_err(|e| {
                    anyhow::anyhow!("creating the mail outbox {}: {e}", outbox.display())
                })?;
                Transport::Outbox(AsyncFileTransport::new(&outbox), outbox)
            }
        };
        Ok(Self { transport, timeout })
    }

    /// Describes the transport for logs (no credentials).
    pub fn describe(&self) -> String {
        match &self.transport {
            Transport::Smtp(_) => format!("smtp (timeout {}s)", self.timeout.as_secs()),
            Transport::Outbox(_, dir) => format!("outbox folder {}", dir.display()),
        }
    }

    /// Sends one message, giving up after the send timeout.
    pub async fn send(&self, message: Message) -> Result<(), MailError> {
        let send = async {
            match &self.transport {
                Transport::Smtp(t) => {
                    let reply = t.send(message).await.inspect_err(|e| {
                        if let Some(code) = e.status() {
                            tracing::Span::current()
                                .record("smtp.reply_code", i64::from(u16::from(code)));
                        }
                    })?;
                    tracing::Span::current()
                        .record("smtp.reply_code", i64::from(u16::from(reply.code())));
                }
                Transport::Outbox(t, _) => {
                    t.send(message).await?;
                }
            }
            Ok(())
        };
        match tokio::time::timeout(self.timeout, send).await {
            Ok(result) => result,
            Err(_) => Err(MailError::Timeout(self.timeout)),
        }
    }
}

/// A file attached to a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportAttachment {
    /// File name shown to the recipient.
    pub name: String,
    /// MIME type, e.g. `text/csv; charset=utf-8` or `application/zip`.
    pub content_type: String,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// A report ready to send.
#[derive(Debug, Clone)]
pub struct Report {
    /// Sender: the tenant's Reply-to Admin Email Address.
    pub from: String,
    /// Recipients: the tenant's Failed Import Email(s).
    pub to: Vec<String>,
    /// Subject.
    pub subject: String,
    /// Plain-text body.
    pub body: String,
    /// HTML body, sent beside the plain text as `multipart/alternative`.
    pub html: Option<String>,
    /// Optional attachment: the failures CSV, or a .zip holding it.
    pub attachment: Option<ReportAttachment>,
    /// Message-ID, stable per file (the same on every attempt and every re-send of the
    /// file's report, full or reduced), so a duplicate delivery is recognisable downstream
    /// and mail clients can merge duplicates.
    pub message_id: String,
}

impl Report {
    /// Builds the MIME message.
    pub fn to_message(&self) -> Result<Message, MailError> {
        let from: Mailbox = self.from.parse()?;
        let mut builder = Message::builder()
            .from(from.clone())
            .reply_to(from)
            .subject(self.subject.clone())
            .message_id(Some(self.message_id.clone()));
        for to in &self.to {
            builder = builder.to(to.parse()?);
        }
        let text = SinglePart::builder()
            .header(ContentType::TEXT_PLAIN)
            .body(self.body.clone());
        let message = match (&self.attachment, &self.html) {
            (Some(a), html) => {
                let content_type = ContentType::parse(&a.content_type)
                    .map_err(|e| MailError::Attachment(e.to_string()))?;
                let file = Attachment::new(a.name.clone()).body(a.bytes.clone(), content_type);
                match html {
                    Some(h) => builder.multipart(
                        MultiPart::mixed()
                            .multipart(MultiPart::alternative_plain_html(
                                self.body.clone(),
                                h.clone(),
                            ))
                            .singlepart(file),
                    )?,
                    None => {
                        builder.multipart(MultiPart::mixed().singlepart(text).singlepart(file))?
                    }
                }
            }
            (None, Some(h)) => builder.multipart(MultiPart::alternative_plain_html(
                self.body.clone(),
                h.clone(),
            ))?,
            (None, None) => builder.singlepart(text)?,
        };
        Ok(message)
    }

    /// The size of the message as sent (headers, body and the base64-encoded attachment).
    pub fn size(&self) -> Result<usize, MailError> {
        Ok(self.to_message()?.formatted().len())
    }
}
