//! Where reports go: an SMTP server (`SMTP_URL`, e.g. `smtp://mail.example.org:25`,
//! `smtps://user:password@mail.example.org:465`, or `smtp://...?tls=required` for STARTTLS),
//! or, when none is configured, `.eml` files in a local outbox folder (`MAIL_OUTBOX`).

use std::path::PathBuf;

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
    /// SMTP failed (server down, refused): transient, retried.
    #[error("SMTP delivery failed")]
    Smtp(#[from] lettre::transport::smtp::Error),
    /// Writing the outbox file failed.
    #[error("writing to the mail outbox failed")]
    File(#[from] lettre::transport::file::Error),
}

impl MailError {
    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            MailError::Smtp(e) => !e.is_permanent(),
            MailError::File(_) => true,
            MailError::Address(_) | MailError::Build(_) => false,
        }
    }
}

/// A configured mail transport.
#[derive(Debug, Clone)]
pub enum Mailer {
    /// Real SMTP.
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    /// `.eml` files in a folder.
    Outbox(AsyncFileTransport<Tokio1Executor>, PathBuf),
}

impl Mailer {
    /// SMTP if `smtp_url` is given, otherwise the outbox folder (created if missing).
    pub fn new(smtp_url: Option<&str>, outbox: PathBuf) -> anyhow::Result<Self> {
        match smtp_url.filter(|u| !u.trim().is_empty()) {
            Some(url) => Ok(Mailer::Smtp(
                AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
                    .map_err(|e| anyhow::anyhow!("SMTP_URL is not usable: {e}"))?
                    .build(),
            )),
            None => {
                std::fs::create_dir_all(&outbox).map_err(|e| {
                    anyhow::anyhow!("creating the mail outbox {}: {e}", outbox.display())
                })?;
                Ok(Mailer::Outbox(AsyncFileTransport::new(&outbox), outbox))
            }
        }
    }

    /// Describes the transport for logs (no credentials).
    pub fn describe(&self) -> String {
        match self {
            Mailer::Smtp(_) => "smtp".to_owned(),
            Mailer::Outbox(_, dir) => format!("outbox folder {}", dir.display()),
        }
    }

    /// Sends one message.
    pub async fn send(&self, message: Message) -> Result<(), MailError> {
        match self {
            Mailer::Smtp(t) => {
                t.send(message).await?;
            }
            Mailer::Outbox(t, _) => {
                t.send(message).await?;
            }
        }
        Ok(())
    }
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
    /// Optional attachment: (file name, CSV bytes).
    pub attachment: Option<(String, Vec<u8>)>,
    /// Message-ID, stable per file, so a duplicate delivery is recognisable downstream.
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
        let message = match &self.attachment {
            Some((name, bytes)) => {
                builder.multipart(MultiPart::mixed().singlepart(text).singlepart(
                    Attachment::new(name.clone()).body(
                        bytes.clone(),
                        ContentType::parse("text/csv; charset=utf-8").map_err(|e| {
                            lettre::error::Error::Io(std::io::Error::other(e.to_string()))
                        })?,
                    ),
                ))?
            }
            None => builder.singlepart(text)?,
        };
        Ok(message)
    }
}
