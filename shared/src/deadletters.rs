//! Dead letters: what the operator sees of a message that could not be handled, and how it is
//! replayed after the cause is fixed.
//!
//! A message reaches `P.dead-letters` when a service rejects it (it can never succeed: not
//! decodable, names another tenant's file) or when the queue's delivery limit is exceeded
//! (it kept failing: [`crate::amqp::DELIVERY_LIMIT`]). The notifier records each one in the
//! `dead_letters` table ([`record`]) and then acknowledges it; a redelivery of the same dead
//! letter (a crash before the ack) is recorded once (unique on payload hash, source queue and
//! time of death).
//!
//! AMQP cannot carry a service's error on a requeued or rejected message, so the service
//! notes it in `message_errors` by payload hash ([`note_error`]); [`record`] moves it into
//! the dead-letter record, where `muictl dead-letters list` shows it next to the broker's
//! reason and the number of deliveries.
//!
//! [`replay`] puts the stored payloads back into the outbox (addressed to their original
//! queue), in the transaction that marks them replayed, so a crash cannot lose a replay nor
//! replay twice. Replaying is idempotent downstream: a chunk already imported is recognised
//! by its marker, failure records are keyed by row, and a file's report is claimed once.
//!
//! (Over 400 lines: recording, listing and replaying are one contract with one table; kept
//! together so that a replay can be read against what was recorded.)

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Bool, Bytea, Int4, Int8, Nullable, Text, Timestamptz, Varchar};
use lapin::types::{AMQPValue, FieldTable};

use crate::amqp::{QueueKind, Topology, DELIVERY_LIMIT};
use crate::dispatch;
use crate::messages::{self, ChunkRef, NotifyMessage, WorkMessage};
use crate::outbox;

/// The longest error text kept for a message.
const MAX_ERROR_CHARS: usize = 2_000;

/// What the broker's headers say about a dead-lettered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Death {
    /// Full name of the queue it was dead-lettered from (`x-first-death-queue`).
    pub source_queue: String,
    /// The broker's reason (`x-first-death-reason`): `delivery_limit`, `rejected`, ...
    pub reason: String,
    /// How many times it was delivered before it died.
    pub attempts: i32,
    /// When it died (`x-death[].time`), or now if the headers do not say.
    pub died_at: DateTime<Utc>,
}

fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn int(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

impl Death {
    /// Reads the `x-first-death-*`, `x-death` and `x-delivery-count` headers.
    pub fn from_headers(headers: Option<&FieldTable>) -> Self {
        let get = |k: &str| headers.and_then(|h| h.inner().get(k));
        let source_queue = get("x-first-death-queue")
            .and_then(text)
            .unwrap_or_else(|| "unknown".to_owned());
        let reason = get("x-first-death-reason")
            .and_then(text)
            .unwrap_or_else(|| "unknown".to_owned());
        // The x-death entry of the queue it first died in: its time (and, for messages
        // dead-lettered more than once, how often).
        let mut died_at = None;
        if let Some(AMQPValue::FieldArray(deaths)) = get("x-death") {
            for d in deaths.as_slice() {
                if let AMQPValue::FieldTable(t) = d {
                    let queue = t.inner().get("queue").and_then(text);
                    if queue.as_deref() == Some(source_queue.as_str()) {
                        died_at = t
                            .inner()
                            .get("time")
                            .and_then(int)
                            .and_then(|s| DateTime::from_timestamp(s, 0));
                    }
                }
            }
        }
        // RabbitMQ 3.10 drops x-delivery-count when it dead-letters, so: a message past the
        // delivery limit was delivered limit + 1 times (the queue's definition), a rejected
        // one as often as its header says (once if it had none: rejected at first sight).
        let attempts = match get("x-delivery-count").and_then(int) {
            Some(returned) => returned.saturating_add(1),
            None if reason == "delivery_limit" => DELIVERY_LIMIT + 1,
            None => 1,
        };
        let attempts = i32::try_from(attempts).unwrap_or(i32::MAX);
        Death {
            source_queue,
            reason,
            attempts,
            died_at: died_at.unwrap_or_else(Utc::now),
        }
    }
}

/// What a payload says about itself: queue, tenant, file, chunk.
fn describe(payload: &[u8]) -> (Option<QueueKind>, Option<i64>, Option<i64>, Option<i32>) {
    if let Ok(m) = messages::decode::<WorkMessage>(payload) {
        let c = m.chunk_ref();
        return (
            Some(QueueKind::Chunks),
            Some(c.tenant_id.0),
            Some(c.file_id.0),
            i32::try_from(c.chunk_no).ok(),
        );
    }
    match messages::decode::<NotifyMessage>(payload) {
        Ok(NotifyMessage::RowFailuresV1(f)) => (
            Some(QueueKind::Notify),
            Some(f.tenant_id.0),
            Some(f.file_id.0),
            i32::try_from(f.chunk_no).ok(),
        ),
        Ok(NotifyMessage::FileFinishedV1(f) | NotifyMessage::FileHeldV1(f)) => (
            Some(QueueKind::Notify),
            Some(f.tenant_id.0),
            Some(f.file_id.0),
            None,
        ),
        _ => (None, None, None, None),
    }
}

/// The queued chunk a payload names, if it is a reference to one.
fn queued_chunk(payload: &[u8]) -> Option<ChunkRef> {
    match messages::decode::<WorkMessage>(payload) {
        Ok(WorkMessage::QueuedChunkV1(c)) => Some(c),
        _ => None,
    }
}

fn cut(s: &str) -> String {
    s.chars().take(MAX_ERROR_CHARS).collect()
}

/// Notes the error a service hit handling a message (by the SHA-256 of its payload,
/// computed by PostgreSQL), so its dead-letter record can show it. Replaces an earlier note
/// and counts the failures.
pub fn note_error(
    conn: &mut PgConnection,
    queue: QueueKind,
    file_id: Option<i64>,
    payload: &[u8],
    error: &str,
) -> QueryResult<()> {
    diesel::sql_query(
        "INSERT INTO message_errors (payload_sha256, queue, file_id, error) \
         VALUES (sha256($1), $2, $3, $4) \
         ON CONFLICT (payload_sha256, queue) DO UPDATE SET error = EXCLUDED.error, \
           failures = message_errors.failures + 1, noted_at = now()",
    )
    .bind::<Bytea, _>(payload)
    .bind::<Varchar, _>(queue.as_str())
    .bind::<Nullable<Int8>, _>(file_id)
    .bind::<Text, _>(cut(error))
    .execute(conn)?;
    Ok(())
}

/// Forgets the error noted for a message of `queue` that has now been handled.
pub fn forget_error(conn: &mut PgConnection, queue: QueueKind, payload: &[u8]) -> QueryResult<()> {
    diesel::sql_query(
        "DELETE FROM message_errors WHERE payload_sha256 = sha256($1) AND queue = $2",
    )
    .bind::<Bytea, _>(payload)
    .bind::<Varchar, _>(queue.as_str())
    .execute(conn)?;
    Ok(())
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = Int8)]
    id: i64,
}

/// Records a dead-lettered message (idempotent: a redelivered dead letter is recorded once).
/// Returns the new record's id, or `None` if it was recorded before.
pub fn record(
    conn: &mut PgConnection,
    topology: &Topology,
    payload: &[u8],
    headers: Option<&FieldTable>,
) -> QueryResult<Option<i64>> {
    let death = Death::from_headers(headers);
    let (decoded_kind, tenant_id, file_id, chunk_no) = describe(payload);
    // A chunk dead in the express lane is a chunk like any other: replayed to the chunks queue.
    let kind = [QueueKind::Chunks, QueueKind::Express, QueueKind::Notify]
        .into_iter()
        .find(|k| topology.queue(*k) == death.source_queue)
        .map(|k| match k {
            QueueKind::Express => QueueKind::Chunks,
            k => k,
        })
        .or(decoded_kind);
    conn.transaction(|conn| {
        let inserted: Option<Id> = diesel::sql_query(
            "INSERT INTO dead_letters (queue, source_queue, tenant_id, file_id, chunk_no, reason, \
               last_error, attempts, died_at, payload, payload_sha256) \
             SELECT $1, $2, $3, $4, $5, $6, \
               (SELECT error FROM message_errors WHERE payload_sha256 = sha256($8) AND queue = $1), \
               $7, $9, $8, sha256($8) \
             ON CONFLICT (payload_sha256, source_queue, died_at) DO NOTHING RETURNING id",
        )
        .bind::<Nullable<Varchar>, _>(kind.map(QueueKind::as_str))
        .bind::<Text, _>(&death.source_queue)
        .bind::<Nullable<Int8>, _>(tenant_id)
        .bind::<Nullable<Int8>, _>(file_id)
        .bind::<Nullable<Int4>, _>(chunk_no)
        .bind::<Text, _>(&death.reason)
        .bind::<Int4, _>(death.attempts)
        .bind::<Bytea, _>(payload)
        .bind::<Timestamptz, _>(death.died_at)
        .get_result(conn)
        .optional()?;
        if let Some(kind) = kind {
            forget_error(conn, kind, payload)?;
        }
        if let Some(chunk) = queued_chunk(payload) {
            // No longer in flight, and no longer holding back the tenant's later files.
            dispatch::dead(conn, chunk)?;
        }
        Ok(inserted.map(|r| r.id))
    })
}

/// A dead letter as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName, serde::Serialize)]
pub struct DeadLetter {
    /// Record id (`muictl dead-letters replay --id`).
    #[diesel(sql_type = Int8)]
    pub id: i64,
    /// The tenant's slug, if the message names an existing tenant.
    #[diesel(sql_type = Nullable<Varchar>)]
    pub tenant: Option<String>,
    /// The file id named by the message.
    #[diesel(sql_type = Nullable<Int8>)]
    pub file_id: Option<i64>,
    /// The file's name, if the file exists.
    #[diesel(sql_type = Nullable<Text>)]
    pub file_name: Option<String>,
    /// Logical queue it came from (`chunks`, `notify`), if known.
    #[diesel(sql_type = Nullable<Varchar>)]
    pub queue: Option<String>,
    /// The chunk number, for a chunk or its failure records.
    #[diesel(sql_type = Nullable<Int4>)]
    pub chunk_no: Option<i32>,
    /// The broker's reason (`delivery_limit`, `rejected`).
    #[diesel(sql_type = Text)]
    pub reason: String,
    /// The last error a service noted for the message.
    #[diesel(sql_type = Nullable<Text>)]
    pub last_error: Option<String>,
    /// Deliveries before it died.
    #[diesel(sql_type = Int4)]
    pub attempts: i32,
    /// When it died.
    #[diesel(sql_type = Timestamptz)]
    pub died_at: DateTime<Utc>,
    /// When it was replayed, if it was.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub replayed_at: Option<DateTime<Utc>>,
}

/// Dead letters, oldest first: of one tenant (by id) or all, replayed ones too if asked.
pub fn list(
    conn: &mut PgConnection,
    tenant_id: Option<i64>,
    include_replayed: bool,
) -> QueryResult<Vec<DeadLetter>> {
    diesel::sql_query(
        "SELECT d.id, t.slug AS tenant, d.file_id, f.file_name, d.queue, d.chunk_no, d.reason, \
           d.last_error, d.attempts, d.died_at, d.replayed_at \
         FROM dead_letters d \
         LEFT JOIN tenants t ON t.id = d.tenant_id \
         LEFT JOIN import_files f ON f.id = d.file_id AND f.tenant_id = d.tenant_id \
         WHERE ($1::BIGINT IS NULL OR d.tenant_id = $1) AND ($2 OR d.replayed_at IS NULL) \
         ORDER BY d.id",
    )
    .bind::<Nullable<Int8>, _>(tenant_id)
    .bind::<Bool, _>(include_replayed)
    .load(conn)
}

/// Dead letters not yet replayed, per file of a tenant: the operator's `dead-lettered` state.
pub fn pending_by_file(
    conn: &mut PgConnection,
    tenant_id: i64,
) -> QueryResult<std::collections::HashMap<i64, i64>> {
    #[derive(QueryableByName)]
    struct PerFile {
        #[diesel(sql_type = Int8)]
        file_id: i64,
        #[diesel(sql_type = Int8)]
        n: i64,
    }
    let rows: Vec<PerFile> = diesel::sql_query(
        "SELECT file_id, count(*) AS n FROM dead_letters \
         WHERE tenant_id = $1 AND file_id IS NOT NULL AND replayed_at IS NULL GROUP BY file_id",
    )
    .bind::<Int8, _>(tenant_id)
    .load(conn)?;
    Ok(rows.into_iter().map(|r| (r.file_id, r.n)).collect())
}

/// Which dead letters to replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// One record.
    Id(i64),
    /// Every record of a tenant (by id).
    Tenant(i64),
    /// Every record.
    All,
}

/// What [`replay`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Records whose payload went back into the outbox.
    pub replayed: Vec<i64>,
    /// Records left alone, with why.
    pub skipped: Vec<(i64, String)>,
}

#[derive(QueryableByName)]
struct ToReplay {
    #[diesel(sql_type = Int8)]
    id: i64,
    #[diesel(sql_type = Nullable<Varchar>)]
    queue: Option<String>,
    #[diesel(sql_type = Bytea)]
    payload: Vec<u8>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    replayed_at: Option<DateTime<Utc>>,
}

/// Puts the selected dead letters back into the outbox for their original queue and marks
/// them replayed, in one transaction. Records replayed before are skipped (replaying them
/// again would be harmless, but is never needed: a replay that dies again is a new record).
/// A running service's outbox relay publishes them within about a second.
pub fn replay(conn: &mut PgConnection, selection: Selection) -> QueryResult<Replayed> {
    let (id, tenant) = match selection {
        Selection::Id(id) => (Some(id), None),
        Selection::Tenant(t) => (None, Some(t)),
        Selection::All => (None, None),
    };
    conn.transaction(|conn| {
        let rows: Vec<ToReplay> = diesel::sql_query(
            "SELECT id, queue, payload, replayed_at FROM dead_letters \
             WHERE ($1::BIGINT IS NULL OR id = $1) AND ($2::BIGINT IS NULL OR tenant_id = $2) \
               AND ($1::BIGINT IS NOT NULL OR replayed_at IS NULL) \
             ORDER BY id FOR UPDATE",
        )
        .bind::<Nullable<Int8>, _>(id)
        .bind::<Nullable<Int8>, _>(tenant)
        .load(conn)?;
        let mut done = Replayed::default();
        for row in rows {
            if let Some(at) = row.replayed_at {
                done.skipped.push((
                    row.id,
                    format!("already replayed at {}", at.format("%Y-%m-%d %H:%M:%S UTC")),
                ));
                continue;
            }
            let Some(kind) = row.queue.as_deref().and_then(QueueKind::parse) else {
                done.skipped
                    .push((row.id, "the queue it came from is unknown".to_owned()));
                continue;
            };
            if let Some(chunk) = queued_chunk(&row.payload) {
                dispatch::revived(conn, chunk)?;
            }
            outbox::enqueue(conn, kind, row.payload)?;
            diesel::sql_query("UPDATE dead_letters SET replayed_at = now() WHERE id = $1")
                .bind::<Int8, _>(row.id)
                .execute(conn)?;
            done.replayed.push(row.id);
        }
        Ok(done)
    })
}

/// The operator's table of dead letters (`muictl dead-letters list`).
pub fn render(letters: &[DeadLetter]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6} {:<16} {:>7} {:<24} {:<12} {:<15} {:>8} {:<19} REPLAYED",
        "ID", "TENANT", "FILE", "NAME", "MESSAGE", "REASON", "ATTEMPTS", "WHEN (UTC)"
    );
    for d in letters {
        let message = match (d.queue.as_deref(), d.chunk_no) {
            (Some("chunks"), Some(n)) => format!("chunk {n}"),
            (Some("notify"), Some(n)) => format!("failures {n}"),
            (Some("notify"), None) => "finished".to_owned(),
            (Some(q), _) => q.to_owned(),
            (None, _) => "?".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:>6} {:<16} {:>7} {:<24} {:<12} {:<15} {:>8} {:<19} {}",
            d.id,
            d.tenant.as_deref().unwrap_or("?"),
            d.file_id.map_or("?".to_owned(), |f| f.to_string()),
            messages::truncate_for_message(d.file_name.as_deref().unwrap_or("?"), 23),
            message,
            d.reason,
            d.attempts,
            d.died_at.format("%Y-%m-%d %H:%M:%S"),
            d.replayed_at.map_or("-".to_owned(), |t| t
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()),
        );
        if let Some(e) = &d.last_error {
            let _ = writeln!(out, "{:>6} error: {}", "", e.replace('\n', " "));
        }
    }
    out
}
