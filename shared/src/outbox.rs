//! Transactional outbox: a message that announces database state ("these rows failed", "this
//! file is finished") is inserted in the same transaction as that state, and a relay publishes
//! it with confirms afterwards. A crash between commit and publish therefore loses nothing:
//! the row stays until a relay has the broker's confirm, then it is deleted. A message may be
//! published twice (crash after the confirm, before the delete); consumers are idempotent.

use std::sync::Arc;
use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{Array, Int8};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::amqp::{Publisher, QueueKind};
use crate::db::{self, DbError, PgPool};
use crate::otel::TraceContext;
use crate::schema::outbox;

/// How long a relay owns a claimed batch before another relay may take it over.
const CLAIM_SECONDS: i64 = 30;
/// Rows published per round, at most.
const BATCH: i64 = 200;
/// Payload bytes claimed per round, at most (past the first row, which is always taken):
/// a round's rows are in memory at once, and a chunk's failure records can be megabytes.
const BATCH_BYTES: i64 = 16 * 1024 * 1024;
/// How often a relay looks for rows without being kicked (rows left by other processes).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Adds a message to the outbox, inside the caller's transaction, with the trace context of
/// the span entered on this thread (the relay puts it in the message's headers).
pub fn enqueue(
    conn: &mut PgConnection,
    queue: QueueKind,
    payload: Vec<u8>,
) -> Result<(), diesel::result::Error> {
    diesel::insert_into(outbox::table)
        .values((
            outbox::queue.eq(queue.as_str()),
            outbox::payload.eq(payload),
            outbox::trace_context.eq(TraceContext::current().to_json()),
        ))
        .execute(conn)?;
    Ok(())
}

/// Wakes the relay right after a commit, so messages go out without waiting for the sweep.
#[derive(Debug, Clone, Default)]
pub struct Kick(Arc<Notify>);

impl Kick {
    /// Signals that the outbox has new rows.
    pub fn kick(&self) {
        self.0.notify_one();
    }
}

/// Publishes outbox rows until `shutdown`.
#[derive(Debug)]
pub struct Relay {
    pool: PgPool,
    publisher: Publisher,
    kick: Kick,
}

#[derive(QueryableByName)]
struct Claimed {
    #[diesel(sql_type = Int8)]
    id: i64,
    #[diesel(sql_type = diesel::sql_types::Varchar)]
    queue: String,
    #[diesel(sql_type = diesel::sql_types::Bytea)]
    payload: Vec<u8>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Jsonb>)]
    trace_context: Option<serde_json::Value>,
}

impl Relay {
    /// A relay publishing through `publisher`, woken by `kick`.
    pub fn new(pool: PgPool, publisher: Publisher, kick: Kick) -> Self {
        Self {
            pool,
            publisher,
            kick,
        }
    }

    /// Runs until `shutdown`, then drains what is claimable once more and closes its
    /// channel.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            match self.publish_round().await {
                Ok(n) if n as i64 == BATCH => continue,
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(error = %err, cause = ?err, "OutboxPublishError");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.kick.0.notified() => {}
                _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
            }
        }
        if let Err(err) = self.publish_round().await {
            tracing::warn!(error = %err, "OutboxPublishError");
        }
        self.publisher.close().await;
    }

    /// Claims a batch, publishes it with confirms, deletes it. Returns how many went out.
    pub async fn publish_round(&self) -> Result<usize, RelayError> {
        let claimed: Vec<Claimed> = db::run(&self.pool, |conn| {
            Ok(diesel::sql_query(format!(
                "UPDATE outbox SET claimed_until = now() + interval '{CLAIM_SECONDS} seconds' \
                 WHERE id IN (SELECT id FROM \
                                (SELECT id, octet_length(payload) AS len, \
                                        sum(octet_length(payload)) OVER (ORDER BY id) AS upto \
                                 FROM (SELECT id, payload FROM outbox \
                                       WHERE claimed_until IS NULL OR claimed_until < now() \
                                       ORDER BY id LIMIT {BATCH} FOR UPDATE SKIP LOCKED) free \
                                ) sized \
                              WHERE upto - len < {BATCH_BYTES}) \
                 RETURNING id, queue, payload, trace_context"
            ))
            .load(conn)?)
        })
        .await?;
        if claimed.is_empty() {
            return Ok(0);
        }
        let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
        // Each confirm is awaited at most amqp::CONFIRM_TIMEOUT, inside the claim: a publish
        // stuck on a half-dead connection gives its rows back.
        if let Err(e) = self.publish_claimed(claimed).await {
            // Release the claim so the rows go out on the next round, not in 30 s.
            let _ = db::run(&self.pool, move |conn| {
                diesel::sql_query("UPDATE outbox SET claimed_until = NULL WHERE id = ANY($1)")
                    .bind::<Array<Int8>, _>(ids)
                    .execute(conn)?;
                Ok(())
            })
            .await;
            return Err(e.into());
        }
        let n = ids.len();
        db::run(&self.pool, move |conn| {
            diesel::sql_query("DELETE FROM outbox WHERE id = ANY($1)")
                .bind::<Array<Int8>, _>(ids)
                .execute(conn)?;
            Ok(())
        })
        .await?;
        Ok(n)
    }
}

impl Relay {
    /// Publishes the claimed rows (pipelined, then every confirm awaited), each with its
    /// trace context in the headers.
    async fn publish_claimed(&self, claimed: Vec<Claimed>) -> Result<(), crate::amqp::AmqpError> {
        let mut pending = Vec::with_capacity(claimed.len());
        for row in claimed {
            match QueueKind::parse(&row.queue) {
                Some(kind) => {
                    let trace = TraceContext::from_json(row.trace_context);
                    pending.push(
                        self.publisher
                            .send_traced(kind, &row.payload, &trace)
                            .await?,
                    );
                }
                None => tracing::error!(id = row.id, queue = %row.queue, "OutboxUnknownQueue"),
            }
        }
        for p in pending {
            p.confirmed().await?;
        }
        Ok(())
    }
}

/// Why a relay round failed; the rows stay and are retried.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// Reading or deleting outbox rows failed.
    #[error("outbox database error")]
    Db(#[from] DbError),
    /// Publishing failed.
    #[error("outbox publish failed")]
    Amqp(#[from] crate::amqp::AmqpError),
}

impl From<diesel::result::Error> for RelayError {
    fn from(e: diesel::result::Error) -> Self {
        RelayError::Db(DbError::Query(e))
    }
}
