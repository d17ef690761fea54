//! RabbitMQ: connecting (with exponential backoff, in one place), the topology every service
//! declares, and publishing with confirms.
//!
//! Topology, for a queue prefix `P` (default `mui`; tests use their own):
//! - `P.chunks`: quorum queue of [`crate::messages::WorkMessage`]s, consumed by workers.
//! - `P.notify`: quorum queue of [`crate::messages::NotifyMessage`]s, consumed by the notifier.
//! - `P.dead`: fanout exchange and `P.dead-letters` quorum queue that receive a message
//!   rejected without requeue, or returned more than [`DELIVERY_LIMIT`] times, so a poison
//!   message cannot block the queue behind it. The notifier records each one in the
//!   `dead_letters` table (see [`crate::deadletters`]) for `muictl dead-letters`.
//!
//! Dead-lettering is **at-least-once** (`x-dead-letter-strategy: at-least-once`, RabbitMQ
//! 3.10+, quorum queues only; it requires `x-overflow: reject-publish`): the source queue
//! keeps a dead-lettered message until `P.dead-letters` has confirmed it, so a broker crash
//! or a missing binding cannot drop it (the default, at-most-once, can). Changing these
//! arguments on an existing queue makes its declaration fail with `PRECONDITION_FAILED`:
//! `deploy/README.md` says how to migrate a deployment that declared the queues before.
//!
//! Messages are published to the default exchange with the queue name as routing key,
//! `mandatory` (an unroutable message is an error, not silently dropped) and persistent.

use std::sync::Arc;
use std::time::Duration;

use backoff::ExponentialBackoff;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::otel::TraceContext;

/// How many times a quorum queue redelivers a message before dead-lettering it.
pub const DELIVERY_LIMIT: i64 = 10;

/// Errors talking to the broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AmqpError {
    /// The broker refused or dropped something.
    #[error("RabbitMQ error")]
    Lapin(#[from] lapin::Error),
    /// The broker answered a publish with a nack.
    #[error("RabbitMQ did not confirm a publish to {queue}")]
    Nacked {
        /// The target queue.
        queue: String,
    },
    /// The message could not be routed (the queue does not exist).
    #[error("RabbitMQ returned a message published to {queue}: {reply}")]
    Returned {
        /// The target queue.
        queue: String,
        /// The broker's reply text.
        reply: String,
    },
    /// The broker did not confirm in time (a connection that died without closing).
    #[error("RabbitMQ did not confirm within {0:?}")]
    Timeout(std::time::Duration),
}

/// The logical queues of the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    /// Chunks of rows for the workers.
    Chunks,
    /// The express lane: a tenant's first chunk while it had nothing in flight and every
    /// worker's slots were taken (the fair dispatcher's newcomer). Each worker imports one
    /// express chunk at a time beside its usual slots, so a small file does not wait for a
    /// large import's chunks to finish. Dead letters and replays go to [`QueueKind::Chunks`].
    Express,
    /// Failure records and "file finished" events for the notifier.
    Notify,
}

impl QueueKind {
    /// The name stored in the outbox.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueKind::Chunks => "chunks",
            QueueKind::Express => "express",
            QueueKind::Notify => "notify",
        }
    }

    /// Parses the name stored in the outbox.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "chunks" => Some(QueueKind::Chunks),
            "express" => Some(QueueKind::Express),
            "notify" => Some(QueueKind::Notify),
            _ => None,
        }
    }
}

/// Names of the queues and exchanges under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    /// Topology under `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// Full name of a logical queue.
    pub fn queue(&self, kind: QueueKind) -> String {
        format!("{}.{}", self.prefix, kind.as_str())
    }

    /// The dead-letter exchange.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// The dead-letter queue.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead-letters", self.prefix)
    }

    /// Declares everything (idempotent; every service does it at start).
    pub async fn declare(&self, channel: &Channel) -> Result<(), AmqpError> {
        let durable = QueueDeclareOptions::durable();
        channel
            .exchange_declare(
                self.dead_exchange().as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let mut dead_args = FieldTable::default();
        dead_args.insert("x-queue-type".into(), long_string("quorum"));
        channel
            .queue_declare(self.dead_queue().as_str().into(), durable, dead_args)
            .await?;
        channel
            .queue_bind(
                self.dead_queue().as_str().into(),
                self.dead_exchange().as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        for kind in [QueueKind::Chunks, QueueKind::Express, QueueKind::Notify] {
            let mut args = FieldTable::default();
            args.insert("x-queue-type".into(), long_string("quorum"));
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(DELIVERY_LIMIT),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                long_string(&self.dead_exchange()),
            );
            args.insert(
                "x-dead-letter-strategy".into(),
                long_string("at-least-once"),
            );
            // Required by at-least-once dead-lettering (no length limit is set, so nothing
            // is ever refused for it).
            args.insert("x-overflow".into(), long_string("reject-publish"));
            channel
                .queue_declare(self.queue(kind).as_str().into(), durable, args)
                .await?;
        }
        Ok(())
    }

    /// Deletes every queue and exchange of this prefix (tests clean up with it).
    pub async fn delete(&self, channel: &Channel) -> Result<(), AmqpError> {
        for q in [
            self.queue(QueueKind::Chunks),
            self.queue(QueueKind::Express),
            self.queue(QueueKind::Notify),
            self.dead_queue(),
        ] {
            channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        channel
            .exchange_delete(
                self.dead_exchange().as_str().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await?;
        Ok(())
    }
}

fn persistent_json() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2) // persistent: survives a broker restart
        .with_content_type("application/json".into())
}

/// Longest wait for one confirm. A healthy broker answers in milliseconds; this bounds a
/// publish on a connection that died without closing, and stays below the outbox's 30 s
/// claim so that a stuck relay gives its rows back before another relay may take them.
pub const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A published message whose confirm has not been awaited yet.
#[derive(Debug)]
pub struct Pending {
    queue: String,
    confirm: lapin::PublisherConfirm,
}

impl Pending {
    /// Waits for the broker's confirm; a nack, a returned message or no answer within
    /// [`CONFIRM_TIMEOUT`] is an error.
    pub async fn confirmed(self) -> Result<(), AmqpError> {
        let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, self.confirm)
            .await
            .map_err(|_| AmqpError::Timeout(CONFIRM_TIMEOUT))??;
        if !confirmation.is_ack() {
            return Err(AmqpError::Nacked { queue: self.queue });
        }
        if let Some(returned) = confirmation.take_message() {
            return Err(AmqpError::Returned {
                queue: self.queue,
                reply: returned.reply_text.to_string(),
            });
        }
        Ok(())
    }
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// The backoff policy used for every reconnect and transient retry: from 100 ms, doubling,
/// capped at 10 s between tries, for at most `max_elapsed` (None: forever).
pub fn backoff_policy(max_elapsed: Option<Duration>) -> ExponentialBackoff {
    ExponentialBackoff {
        // The first wait (the default would start at 500 ms whatever the initial interval).
        current_interval: Duration::from_millis(100),
        initial_interval: Duration::from_millis(100),
        max_interval: Duration::from_secs(10),
        multiplier: 2.0,
        max_elapsed_time: max_elapsed,
        ..ExponentialBackoff::default()
    }
}

/// Connects to RabbitMQ, retrying with exponential backoff (for up to two minutes) while the
/// broker is unreachable. `name` shows in the management UI's connection list.
pub async fn connect(url: &str, name: &str) -> Result<Connection, AmqpError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let conn = backoff::future::retry_notify(
        backoff_policy(Some(Duration::from_secs(120))),
        || async {
            match with_default_heartbeat(url) {
                Some(uri) => Connection::connect_uri(uri, props.clone()).await,
                None => Connection::connect(url, props.clone()).await,
            }
            .map_err(backoff::Error::transient)
        },
        |err: lapin::Error, wait: Duration| {
            tracing::warn!(error = %err, retry_in_ms = wait.as_millis() as u64, "AmqpConnectError");
        },
    )
    .await?;
    Ok(conn)
}

/// Returns once `conn` is no longer connected (closed, errored, or cut), checking every
/// second. A service runs it beside its consumers: a consumer waiting for its next delivery
/// is not always told that its connection died, and a service whose handlers are all busy
/// is not waiting on its consumer at all; either way the run ends and the supervisor
/// connects again.
pub async fn connection_lost(conn: &Connection) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !conn.status().connected() {
            return;
        }
    }
}

/// The AMQP heartbeat asked for when `AMQP_URL` names none, in seconds. A worker whose host
/// vanished (no TCP reset) is noticed by the broker after about two missed heartbeats, and
/// its unacknowledged chunks go to another worker; the broker's own default, 60 s, would
/// keep them a few minutes.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// `url` parsed, with [`DEFAULT_HEARTBEAT_SECS`] when it names no heartbeat. `None` if it
/// does not parse (lapin then reports the error as it reads it).
fn with_default_heartbeat(url: &str) -> Option<lapin::uri::AMQPUri> {
    let mut uri: lapin::uri::AMQPUri = url.parse().ok()?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(DEFAULT_HEARTBEAT_SECS);
    }
    Some(uri)
}

/// A channel in confirm mode: every publish waits for the broker's confirm.
///
/// The broker may close a channel while the connection lives on (a message over its size
/// limit, a channel-level error, an operator's action); a closed channel is never reused:
/// the next publish opens a new one on the same connection (`PublishChannelReopened`), so
/// one bad publish cannot stall everything published after it. Messages whose confirm was
/// lost with the old channel surface as errors to their caller, who publishes them again
/// (consumers are idempotent). If the connection itself is gone, publishing fails and the
/// service's supervisor reconnects.
#[derive(Debug, Clone)]
pub struct Publisher {
    conn: Arc<Connection>,
    channel: Arc<tokio::sync::Mutex<Channel>>,
    topology: Topology,
}

impl Publisher {
    /// Opens a confirm-mode channel on `conn`.
    pub async fn new(conn: &Arc<Connection>, topology: Topology) -> Result<Self, AmqpError> {
        let channel = Self::open(conn).await?;
        Ok(Self {
            conn: conn.clone(),
            channel: Arc::new(tokio::sync::Mutex::new(channel)),
            topology,
        })
    }

    async fn open(conn: &Connection) -> Result<Channel, AmqpError> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(channel)
    }

    /// The channel to publish on: the current one, or a new one if the broker closed it.
    async fn channel(&self) -> Result<Channel, AmqpError> {
        let mut current = self.channel.lock().await;
        if !current.status().connected() && self.conn.status().connected() {
            *current = Self::open(&self.conn).await?;
            tracing::warn!("PublishChannelReopened");
        }
        Ok(current.clone())
    }

    /// Closes the channel (before closing the connection, so nothing is left to close on
    /// drop while the connection goes away).
    pub async fn close(&self) {
        let channel = self.channel.lock().await.clone();
        let _ = channel.close(200, "shutdown".into()).await;
    }

    /// The topology this publisher targets.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Publishes a batch and waits until the broker confirmed every message. The batch is
    /// pipelined: all are sent, then all confirms awaited. Any nack or return fails the batch
    /// (the caller retries it whole; consumers are idempotent).
    pub async fn publish_all(&self, messages: &[(QueueKind, &[u8])]) -> Result<(), AmqpError> {
        let mut pending = Vec::with_capacity(messages.len());
        for (kind, payload) in messages {
            pending.push(self.send(*kind, payload).await?);
        }
        for p in pending {
            p.confirmed().await?;
        }
        Ok(())
    }

    /// Sends one message without waiting for its confirm; await the returned [`Pending`] to
    /// get it. Lets a caller keep a window of messages in flight.
    pub async fn send(&self, kind: QueueKind, payload: &[u8]) -> Result<Pending, AmqpError> {
        self.send_traced(kind, payload, &TraceContext::default())
            .await
    }

    /// [`Publisher::send`], with the trace context of the file the message is about in its
    /// headers (`traceparent`, `tracestate`), so that the consumer continues the file's trace.
    pub async fn send_traced(
        &self,
        kind: QueueKind,
        payload: &[u8],
        trace: &TraceContext,
    ) -> Result<Pending, AmqpError> {
        let queue = self.topology.queue(kind);
        let mut properties = persistent_json();
        if !trace.is_empty() {
            let mut headers = FieldTable::default();
            trace.add_to(&mut headers);
            properties = properties.with_headers(headers);
        }
        let confirm = self
            .channel()
            .await?
            .basic_publish(
                ShortString::from(""),
                queue.as_str().into(),
                // mandatory: an unroutable message comes back instead of vanishing.
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                properties,
            )
            .await?;
        Ok(Pending { queue, confirm })
    }

    /// Publishes one message and waits for its confirm.
    pub async fn publish(&self, kind: QueueKind, payload: &[u8]) -> Result<(), AmqpError> {
        self.publish_all(&[(kind, payload)]).await
    }
}
