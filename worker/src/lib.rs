//! # worker
//!
//! Consumes [`mui_shared::messages::Chunk`]s from the `chunks` queue and imports them. Any
//! number of workers, on any hosts, can share the queue; one file's chunks spread over all of
//! them.
//!
//! - [`run`] (this file): the consumer. Prefetch equals the number of chunks imported at
//!   once, so a worker never hoards work another could do. A delivery is acknowledged only
//!   after its transaction committed; database trouble is retried with exponential backoff
//!   while the message is held (so an outage does not burn the queue's delivery limit). A
//!   query that keeps failing (3 tries) hands the chunk back to the queue, which
//!   dead-letters it after its delivery limit; a message that can never be imported is
//!   rejected and dead-lettered at once. Either way the error is logged and noted for the
//!   message's dead-letter record (`muictl dead-letters list`).
//! - [`validate`]: the row checks; a row becomes a [`validate::UserRow`] or a failure record.
//! - [`import`]: one chunk in one transaction, its steps in order: users upserted in bulk,
//!   failure records and "file finished" written to the outbox, relayed to the notifier.
//!   The steps' parts:
//!   - `identity`: a row's email and user name must not belong to another user of the tenant:
//!     checked before the write, and after it (in a savepoint, with the deferred database
//!     constraints forced), so that it holds when chunks commit at the same moment;
//!   - `duplicate`: reporting a row that lost to a later row of the same `unique_id`;
//!   - `digest` and `unchanged`: the rows that would change nothing, found by the digest
//!     stored with their user before anything is staged (reading the chunk's stretch of the
//!     key when its rows come in unique_id order, else probing each key);
//!   - `staging`: the staging table, declared once, and copying the good rows into it;
//!   - `upsert`: the set-based lock / update / insert statements (the fixed ones in
//!     `src/sql/`, the generated ones pinned in `src/sql/generated/`; [`sql`] has them all).

mod digest;
pub mod dispatcher;
mod dryrun;
mod duplicate;
mod identity;
pub mod import;
pub mod sql;
mod staging;
mod unchanged;
mod upsert;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use mui_shared::amqp::{self, Publisher, QueueKind};
use mui_shared::config::{redact_url, CommonArgs};
use mui_shared::db::{self, PgPool};
use mui_shared::deadletters as dead;
use mui_shared::dispatch;
use mui_shared::messages::{self, ChunkRef, WorkMessage};
use mui_shared::outbox::{Kick, Relay};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::import::{ChunkOutcome, ImportError};
use mui_shared::otel::{self, TraceContext};

/// Counts an applied chunk in the metrics (docs/observability.md).
fn record_metrics(outcome: &ChunkOutcome, took: Duration) {
    let tenant = outcome.tenant.clone();
    metrics::counter!("mui_rows_imported_total", "tenant" => tenant.clone())
        .increment((outcome.rows - outcome.failed).max(0) as u64);
    metrics::counter!("mui_rows_failed_total", "tenant" => tenant.clone())
        .increment(outcome.failed.max(0) as u64);
    metrics::histogram!("mui_chunk_import_duration_seconds").record(took.as_secs_f64());
    if outcome.finished_file {
        metrics::counter!("mui_files_done_total", "tenant" => tenant).increment(1);
    }
}

/// worker's settings.
#[derive(Debug, Clone, Args)]
pub struct WorkerConfig {
    /// Shared settings.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Chunks imported at once by this process (each uses one database connection).
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 2)]
    pub concurrency: usize,
    /// Take part in the fair dispatcher: one worker leads (by a PostgreSQL advisory lock) and
    /// hands queued chunks to the broker; the others stand by to take over. With `false` this
    /// worker only imports (at least one worker must dispatch when ingest queues chunks).
    #[arg(long, env = "DISPATCH", default_value_t = true, action = clap::ArgAction::Set)]
    pub dispatch: bool,
    /// At most this many chunks of one tenant in flight at once (default: as many as all live
    /// workers import at once, so a tenant alone uses every worker; while several tenants
    /// have work they share the workers by rows either way).
    #[arg(long, env = "TENANT_MAX_IN_FLIGHT")]
    pub tenant_max_in_flight: Option<u32>,
    /// A chunk handed to the broker this long ago and still not imported is handed out again
    /// (its message was lost, e.g. a purged queue; the worker imports a chunk once however
    /// often it is handed out).
    #[arg(long, env = "DISPATCH_LEASE_SECS", default_value_t = 900)]
    pub dispatch_lease_secs: u32,
    /// How often the leading dispatcher looks at the chunk queue when nothing wakes it, in
    /// milliseconds.
    #[arg(long, env = "DISPATCH_POLL_MS", default_value_t = 50)]
    pub dispatch_poll_ms: u64,
}

/// Query errors (not connection trouble) tolerated in one delivery of a chunk before it is
/// handed back to the queue (which dead-letters it after its delivery limit).
const MAX_QUERY_FAILURES: u32 = 3;

/// Runs the worker until `shutdown`: it stops taking chunks, finishes and acknowledges the
/// ones it holds, and returns.
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    tracing::info!(
        database = %redact_url(&config.common.database_url),
        amqp = %redact_url(&config.common.amqp_url),
        concurrency = config.concurrency,
        "WorkerConfigured"
    );
    let concurrency = config.concurrency.max(1);
    // A connection per slot, one for the express lane, two for the relay and the heartbeat.
    let pool = db::pool(&config.common.database_url, concurrency as u32 + 3);
    let Some((conn, topology)) =
        mui_shared::service::start(&config.common, "mui-worker", &pool, &shutdown).await?
    else {
        return Ok(());
    };
    let channel = conn.create_channel().await?;
    // Prefetch = concurrency: every chunk this worker holds is being imported, none waits
    // here while another worker idles.
    channel
        .basic_qos(concurrency as u16, BasicQosOptions::default())
        .await?;
    let kick = Kick::default();
    let relay = Relay::new(
        pool.clone(),
        Publisher::new(&conn, topology.clone()).await?,
        kick.clone(),
    );
    // Stopped after the in-flight chunks (below), or by the guard if this run fails.
    let relay_stop = CancellationToken::new();
    let _relay_guard = relay_stop.clone().drop_guard();
    let relay_task = tokio::spawn(relay.run(relay_stop.clone()));

    // Say we are alive (the dispatcher sizes what it keeps in flight by the live workers).
    let name = worker_name();
    let beat_stop = CancellationToken::new();
    let _beat_guard = beat_stop.clone().drop_guard();
    let beat_task = tokio::spawn(heartbeat(
        pool.clone(),
        name.clone(),
        concurrency as i32,
        beat_stop.clone(),
    ));
    let wake = Arc::new(Notify::new());
    let dispatch_stop = CancellationToken::new();
    let _dispatch_guard = dispatch_stop.clone().drop_guard();
    let dispatch_task = if config.dispatch {
        let settings = dispatcher::DispatchSettings {
            database_url: config.common.database_url.clone(),
            tenant_cap: config.tenant_max_in_flight.map(i64::from),
            lease_secs: i64::from(config.dispatch_lease_secs.max(1)),
            poll: Duration::from_millis(config.dispatch_poll_ms.max(1)),
            worker: name.clone(),
        };
        Some(tokio::spawn(dispatcher::run(
            settings,
            Publisher::new(&conn, topology.clone()).await?,
            wake.clone(),
            dispatch_stop.clone(),
        )))
    } else {
        None
    };

    // The queue gauges of /metrics, sampled only where they are served.
    let gauges_task = config.common.http_addr.is_some().then(|| {
        tokio::spawn(sample_gauges(
            pool.clone(),
            conn.clone(),
            topology.clone(),
            beat_stop.clone(),
        ))
    });

    let tag = format!("mui-worker-{}", std::process::id());
    let mut consumer = channel
        .basic_consume(
            topology.queue(QueueKind::Chunks).as_str().into(),
            tag.as_str().into(),
            // Manual acks: a chunk is acknowledged only after its transaction committed.
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // The express lane (a newcomer tenant's first chunk while every slot is taken): a
    // channel of its own with a prefetch of one, imported beside the usual slots.
    let express_channel = conn.create_channel().await?;
    express_channel
        .basic_qos(1, BasicQosOptions::default())
        .await?;
    let express_tag = format!("{tag}-express");
    let mut express = express_channel
        .basic_consume(
            topology.queue(QueueKind::Express).as_str().into(),
            express_tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let slots = Arc::new(Semaphore::new(concurrency));
    let express_slot = Arc::new(Semaphore::new(1));
    let mut tasks = JoinSet::new();
    tracing::info!("WorkerReady");
    let lost = amqp::connection_lost(&conn);
    tokio::pin!(lost);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = &mut lost => {
                // The supervisor connects again. The chunks in hand cannot be acknowledged
                // any more: the broker hands them out again, and a transaction that still
                // commits is recognised then by its marker.
                anyhow::bail!("lost the connection to RabbitMQ");
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done { tracing::error!(error = %e, "ChunkTaskPanicked"); }
            }
            next = consumer.next() => {
                let delivery = delivered(next, "chunk")?;
                let permit = slots.clone().acquire_owned().await?;
                spawn_import(&mut tasks, delivery, permit, &pool, &kick, &wake, &shutdown);
            }
            next = express.next() => {
                let delivery = delivered(next, "express")?;
                let permit = express_slot.clone().acquire_owned().await?;
                spawn_import(&mut tasks, delivery, permit, &pool, &kick, &wake, &shutdown);
            }
        }
    }
    tracing::info!(in_flight = tasks.len(), "WorkerStopping");
    let _ = channel
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await;
    let _ = express_channel
        .basic_cancel(express_tag.as_str().into(), BasicCancelOptions::default())
        .await;
    dispatch_stop.cancel();
    mui_shared::service::drain(&mut tasks, drop).await;
    if let Some(t) = dispatch_task {
        let _ = t.await;
    }
    beat_stop.cancel();
    let _ = beat_task.await;
    if let Some(t) = gauges_task {
        let _ = t.await;
    }
    let gone = name.clone();
    if let Err(e) = db::run(&pool, move |c| Ok(dispatch::worker_gone(c, &gone)?)).await {
        tracing::warn!(error = %e, "WorkerDeregisterError");
    }
    relay_stop.cancel();
    let _ = relay_task.await;
    drop(consumer);
    drop(express);
    let _ = express_channel.close(200, "shutdown".into()).await;
    let _ = channel.close(200, "shutdown".into()).await;
    let _ = conn.close(200, "shutdown".into()).await;
    Ok(())
}

/// The next delivery of a consumer (`what`: which), or why there is none.
fn delivered(
    next: Option<Result<lapin::message::Delivery, lapin::Error>>,
    what: &str,
) -> anyhow::Result<lapin::message::Delivery> {
    match next {
        Some(Ok(d)) => Ok(d),
        Some(Err(e)) => Err(e).with_context(|| format!("consuming {what} chunks")),
        None => anyhow::bail!("the broker cancelled the {what} consumer"),
    }
}

/// Imports one delivered chunk in its own task, holding `permit` (its slot) until done; then
/// wakes the outbox relay and the dispatcher (a slot is free).
fn spawn_import(
    tasks: &mut JoinSet<()>,
    delivery: lapin::message::Delivery,
    permit: tokio::sync::OwnedSemaphorePermit,
    pool: &PgPool,
    kick: &Kick,
    wake: &Arc<Notify>,
    shutdown: &CancellationToken,
) {
    let (pool, kick, wake, stop) = (pool.clone(), kick.clone(), wake.clone(), shutdown.clone());
    tasks.spawn(async move {
        handle_delivery(&pool, delivery, &stop).await;
        kick.kick();
        wake.notify_one();
        drop(permit);
    });
}

/// How often the queue gauges are sampled.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// Samples `mui_chunks_pending{tenant}` (chunks queued in PostgreSQL and not imported yet)
/// and `mui_queue_depth{queue}` (messages ready in the chunks and express queues) every few
/// seconds until `stop`. A tenant whose chunks are all imported is set to 0 (its series
/// stays, at 0, until the process restarts).
async fn sample_gauges(
    pool: PgPool,
    conn: Arc<lapin::Connection>,
    topology: amqp::Topology,
    stop: CancellationToken,
) {
    use diesel::prelude::*;
    let mut shown: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut channel: Option<lapin::Channel> = None;
    loop {
        let pending = db::run(&pool, |c| {
            use diesel::dsl::count_star;
            use mui_shared::schema::{chunk_queue, tenants};
            Ok(chunk_queue::table
                .inner_join(tenants::table.on(tenants::id.eq(chunk_queue::tenant_id)))
                .filter(chunk_queue::dead_at.is_null())
                .group_by(tenants::slug)
                .select((tenants::slug, count_star()))
                .load::<(String, i64)>(c)?)
        })
        .await;
        if let Ok(pending) = pending {
            let now: std::collections::HashSet<String> =
                pending.iter().map(|(s, _)| s.clone()).collect();
            for (slug, n) in pending {
                metrics::gauge!("mui_chunks_pending", "tenant" => slug).set(n as f64);
            }
            for gone in shown.difference(&now) {
                metrics::gauge!("mui_chunks_pending", "tenant" => gone.clone()).set(0.0);
            }
            shown = now;
        }
        if channel.as_ref().is_none_or(|c| !c.status().connected()) {
            channel = conn.create_channel().await.ok();
        }
        if let Some(ch) = &channel {
            for kind in [QueueKind::Chunks, QueueKind::Express] {
                let name = topology.queue(kind);
                let passive = lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                if let Ok(q) = ch
                    .queue_declare(name.as_str().into(), passive, FieldTable::default())
                    .await
                {
                    metrics::gauge!("mui_queue_depth", "queue" => kind.as_str())
                        .set(f64::from(q.message_count()));
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(GAUGE_INTERVAL) => {}
        }
    }
    if let Some(ch) = channel {
        let _ = ch.close(200, "shutdown".into()).await;
    }
}

/// How often a worker says it is alive.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// This process's name in the `workers` table: host, pid and start time.
fn worker_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{host}:{}:{started}", std::process::id())
}

/// Records this worker as alive every few seconds until `stop`.
async fn heartbeat(pool: PgPool, name: String, concurrency: i32, stop: CancellationToken) {
    let host = name.split(':').next().unwrap_or("unknown").to_owned();
    loop {
        let (n, h) = (name.clone(), host.clone());
        if let Err(e) = db::run(&pool, move |c| {
            Ok(dispatch::heartbeat(c, &n, &h, concurrency)?)
        })
        .await
        {
            tracing::warn!(error = %e, "WorkerHeartbeatError");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
}

/// Notes why a message failed, where its dead-letter record will find it (best effort: the
/// database may be what failed).
async fn note_error(pool: &PgPool, file_id: Option<i64>, payload: Vec<u8>, error: String) {
    let result = db::run(pool, move |conn| {
        Ok(dead::note_error(
            conn,
            QueueKind::Chunks,
            file_id,
            &payload,
            &error,
        )?)
    })
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "ChunkErrorNoteError");
    }
}

/// The error and its causes, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        parts.push(c.to_string());
        cur = c.source();
    }
    parts.join(": ")
}

/// A chunk to import: carried in the message, or queued in the database.
#[derive(Clone)]
enum Work {
    Inline(Arc<messages::Chunk>),
    Queued(ChunkRef),
}

async fn handle_delivery(
    pool: &PgPool,
    delivery: lapin::message::Delivery,
    stop: &CancellationToken,
) {
    let msg: WorkMessage = match messages::decode_work(&delivery.data) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, "ChunkUndecodableError");
            let why = format!("not a chunk message: {e}");
            note_error(pool, None, delivery.data.clone(), why).await;
            let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
            return;
        }
    };
    let r = msg.chunk_ref();
    let work = match msg {
        WorkMessage::ChunkV1(chunk) => Work::Inline(Arc::new(chunk)),
        WorkMessage::QueuedChunkV1(r) => Work::Queued(r),
        _ => {
            tracing::error!("ChunkUnknownVersionError");
            let why = "unknown chunk message version".to_owned();
            note_error(pool, None, delivery.data.clone(), why).await;
            let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
            return;
        }
    };
    // The file's trace continues here: the span that published this message is its parent.
    let delivery_count = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| match h.inner().get("x-delivery-count") {
            Some(lapin::types::AMQPValue::LongLongInt(n)) => Some(*n),
            Some(lapin::types::AMQPValue::LongInt(n)) => Some(i64::from(*n)),
            _ => None,
        })
        .unwrap_or(0);
    let span = tracing::info_span!(
        "chunk.import",
        tenant_id = r.tenant_id.0,
        tenant = tracing::field::Empty,
        file_id = r.file_id.0,
        chunk_no = i64::from(r.chunk_no),
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.destination.name = %delivery.routing_key,
        messaging.rabbitmq.delivery_tag = delivery.delivery_tag as i64,
        messaging.rabbitmq.redelivered = delivery.redelivered,
        mui.delivery_count = delivery_count,
        mui.rows = tracing::field::Empty,
        mui.rows.new = tracing::field::Empty,
        mui.rows.updated = tracing::field::Empty,
        mui.rows.unchanged = tracing::field::Empty,
        mui.rows.failed = tracing::field::Empty,
        mui.already_imported = tracing::field::Empty,
        mui.query_failures = tracing::field::Empty,
        mui.file_finished = tracing::field::Empty,
        otel.kind = "consumer",
    );
    TraceContext::from_headers(delivery.properties.headers().as_ref()).parent(&span);
    let started = std::time::Instant::now();
    async {
        let mut query_failures = 0u32;
        let mut backoff = amqp::backoff_policy(None);
        loop {
            let w = work.clone();
            let p = pool.clone();
            let parent = tracing::Span::current();
            let result = tokio::task::spawn_blocking(move || {
                // Entered here so that the outbox rows written by the transaction (failure
                // records, "file finished") carry the trace on to the notifier.
                let _tx = tracing::info_span!(
                    parent: &parent,
                    "chunk.transaction",
                    db.system = "postgresql",
                    db.operation.name = "import chunk",
                    otel.kind = "client",
                )
                .entered();
                let mut conn = p.get().map_err(|e| ImportError::Db(e.into()))?;
                match w {
                    Work::Inline(c) => import::import_chunk(&mut conn, &c),
                    Work::Queued(r) => import::import_queued(&mut conn, r),
                }
            })
            .await
            .unwrap_or_else(|join| Err(ImportError::Db(join.into())));
            let span = tracing::Span::current();
            if let Err(e) = &result {
                otel::set_error(&span, chain(e));
            }
            match result {
                Ok(outcome) => {
                    span.record("mui.already_imported", !outcome.applied);
                    span.record("mui.query_failures", i64::from(query_failures));
                    if outcome.applied {
                        span.record("tenant", outcome.tenant.as_str());
                        span.record("mui.rows", outcome.rows);
                        span.record("mui.rows.new", outcome.inserted);
                        span.record("mui.rows.updated", outcome.updated);
                        span.record("mui.rows.unchanged", outcome.unchanged);
                        span.record("mui.rows.failed", outcome.failed);
                        span.record("mui.file_finished", outcome.finished_file);
                        // The status set by a failed try before this one no longer holds.
                        if query_failures > 0 {
                            otel::set_ok(&span);
                        }
                        record_metrics(&outcome, started.elapsed());
                    }
                    if outcome.applied {
                        tracing::info!(
                            rows = outcome.rows,
                            inserted = outcome.inserted,
                            updated = outcome.updated,
                            unchanged = outcome.unchanged,
                            failed = outcome.failed,
                            finished_file = outcome.finished_file,
                            "ChunkImported"
                        );
                    } else {
                        tracing::info!("ChunkAlreadyImported");
                    }
                    mui_shared::failpoint::stop("worker.after_commit");
                    if delivery.redelivered || query_failures > 0 {
                        // It may have failed before: its noted error no longer applies.
                        let payload = delivery.data.clone();
                        let _ = db::run(pool, move |conn| {
                            Ok(dead::forget_error(conn, QueueKind::Chunks, &payload)?)
                        })
                        .await;
                    }
                    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                        // The commit stands; the redelivery will be recognised and skipped.
                        tracing::warn!(error = %e, "ChunkAckError");
                    }
                    return;
                }
                Err(e @ (ImportError::Db(_) | ImportError::Spill(_))) => {
                    let transient = matches!(&e, ImportError::Db(d) if db::is_transient(d));
                    if !transient {
                        query_failures += 1;
                    }
                    if query_failures >= MAX_QUERY_FAILURES {
                        // Hand it back to the queue: the next delivery (maybe on another
                        // worker) tries again, and past the queue's delivery limit it is
                        // dead-lettered with this error noted for the operator.
                        let why = chain(&e);
                        tracing::error!(error = %why, redelivered = delivery.redelivered, "ChunkImportError");
                        note_error(pool, Some(r.file_id.0), delivery.data.clone(), why).await;
                        let _ = delivery
                            .nack(BasicNackOptions { requeue: true, multiple: false })
                            .await;
                        return;
                    }
                    let wait = backoff::backoff::Backoff::next_backoff(&mut backoff)
                        .unwrap_or(Duration::from_secs(10));
                    tracing::warn!(error = %e, cause = ?e, transient, retry_in_ms = wait.as_millis() as u64, "ChunkImportRetry");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.cancelled() => {
                            // Hand it back: another worker (or this one, restarted) takes it.
                            let _ = delivery.nack(BasicNackOptions { requeue: true, multiple: false }).await;
                            return;
                        }
                    }
                }
                Err(permanent) => {
                    // A chunk that can never be imported (wrong tenant, unusable header).
                    let why = chain(&permanent);
                    tracing::error!(error = %why, "ChunkRejectedError");
                    let file = match permanent {
                        ImportError::WrongTenant { .. } | ImportError::NotQueued(_) => None,
                        _ => Some(r.file_id.0),
                    };
                    note_error(pool, file, delivery.data.clone(), why).await;
                    let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
                    return;
                }
            }
        }
    }
    .instrument(span)
    .await
}
