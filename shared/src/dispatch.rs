//! The chunk queue in PostgreSQL, and the fair order the dispatcher hands it out in
//! (docs/dispatch.md has the whole design).
//!
//! - ingest [`enqueue`]s a file's chunks as it reads them;
//! - the dispatcher (one leader among the workers, `mui_worker::dispatcher`) reads what
//!   waits ([`queue_state`], [`waiting_chunks`]), picks in [`Fair`] order, [`mark_dispatched`]
//!   and publishes a [`ChunkRef`] for each, then [`mark_confirmed`] once the broker confirmed;
//! - a worker [`take`]s the chunk's rows in the transaction that imports them (the row is
//!   deleted on commit, so the queue holds exactly the chunks not imported yet);
//! - the notifier marks a dead-lettered chunk [`dead`]; a replay [`revived`] it.
//!
//! Order within a tenant: only its oldest open file is handed out, and its next file waits
//! until every chunk of it is imported (or dead-lettered), so a tenant's files take effect in
//! arrival order whatever the workers' timing.

use std::collections::{BTreeMap, HashMap};

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Int4, Integer, Nullable};

use crate::domain::{ImportFileId, TenantId};
use crate::messages::ChunkRef;
use crate::schema::{chunk_queue, workers};

/// The statements the dispatcher (every `DISPATCH_POLL_MS`) and the workers (every chunk) run
/// on `chunk_queue` and `import_files`, public so that tests can check their plans
/// (`tests/tests/plans.rs`).
pub mod sql {
    /// Set on the dispatcher's session: its statements probe the queue by file and chunk
    /// (and the files by the index of open files), and a sequential scan chosen while the
    /// queue or the file history was tiny would read them whole every round in any plan that
    /// outlives it. No JIT (a plan that must still scan sequentially would cost enough to be
    /// compiled, every round).
    pub const PLANNER_SETTINGS: &str =
        "SELECT set_config('enable_seqscan', 'off', false), set_config('jit', 'off', false)";
    /// Queues a chunk: $1 tenant, $2 file (bigint), $3 chunk, $4 rows (integer), $5 payload
    /// (bytea).
    pub const ENQUEUE: &str =
        "INSERT INTO chunk_queue (tenant_id, file_id, chunk_no, rows, payload) \
         SELECT $1, $2, $3, $4, $5 \
         WHERE NOT EXISTS (SELECT 1 FROM file_chunks WHERE file_id = $2 AND chunk_no = $3) \
         ON CONFLICT DO NOTHING";
    /// Takes a queued chunk's payload: $1 tenant, $2 file (bigint), $3 chunk (integer).
    /// [`ENQUEUE`] with the chunk held back from the dispatcher ($6): a held file's chunks
    /// until the operator approves it, a dry run's until ingest has queued them all.
    pub const ENQUEUE_HELD: &str =
        "INSERT INTO chunk_queue (tenant_id, file_id, chunk_no, rows, payload, held) \
         SELECT $1, $2, $3, $4, $5, $6 \
         WHERE NOT EXISTS (SELECT 1 FROM file_chunks WHERE file_id = $2 AND chunk_no = $3) \
         ON CONFLICT DO NOTHING";
    /// Lets the dispatcher hand out a file's held chunks: all of them ($3 false) or the first
    /// only ($3 true: a dry run, whose worker takes the others in the same transaction).
    pub const RELEASE: &str = "UPDATE chunk_queue SET held = false \
         WHERE tenant_id = $1 AND file_id = $2 AND held AND (NOT $3 OR chunk_no = 0)";
    /// A queued chunk's payload, read without taking it (a dry run reads a file's later
    /// chunks inside the savepoint it rolls back, and takes them after).
    pub const PEEK: &str = "SELECT payload FROM chunk_queue \
         WHERE tenant_id = $1 AND file_id = $2 AND chunk_no = $3";
    /// Takes every queued chunk of a file (a dry run, once it has read them all).
    pub const TAKE_FILE: &str = "DELETE FROM chunk_queue WHERE tenant_id = $1 AND file_id = $2";
    pub const TAKE: &str = "DELETE FROM chunk_queue \
         WHERE tenant_id = $1 AND file_id = $2 AND chunk_no = $3 RETURNING payload";
    /// Live chunks in flight and waiting, by file: $1 lease (bigint seconds).
    pub const QUEUED_FILES: &str = "SELECT tenant_id, file_id, \
           count(*) FILTER (WHERE dispatched_at > now() - make_interval(secs => $1)) AS in_flight, \
           count(*) FILTER (WHERE NOT held AND (dispatched_at IS NULL \
                              OR dispatched_at <= now() - make_interval(secs => $1))) AS waiting \
         FROM chunk_queue WHERE dead_at IS NULL GROUP BY tenant_id, file_id";
    /// Per tenant, its oldest open file not fully queued yet.
    pub const READING_FILES: &str = "SELECT tenant_id, min(id) AS file_id FROM import_files \
         WHERE state IN ('received', 'importing') AND total_chunks IS NULL \
         GROUP BY tenant_id";
    /// Up to $4 (bigint) chunks of tenant $1, file $2 (bigint) waiting to be handed out, with
    /// the lease $3 (bigint seconds).
    pub const WAITING_CHUNKS: &str = "SELECT chunk_no, rows FROM chunk_queue \
         WHERE tenant_id = $1 AND file_id = $2 AND dead_at IS NULL AND NOT held \
           AND (dispatched_at IS NULL OR dispatched_at <= now() - make_interval(secs => $3)) \
         ORDER BY chunk_no LIMIT $4";
    /// Marks chunks $3 (integer[]) of tenant $1, file $2 (bigint) dispatched.
    pub const MARK_DISPATCHED: &str =
        "UPDATE chunk_queue SET dispatched_at = now(), confirmed = false \
         WHERE ctid = ANY (ARRAY(SELECT ctid FROM chunk_queue \
           WHERE tenant_id = $1 AND file_id = $2 AND chunk_no = ANY ($3) \
           FOR UPDATE SKIP LOCKED)) \
         RETURNING chunk_no";
    /// Records the broker's answer $4 (boolean) for chunks $3 (integer[]) of tenant $1, file $2
    /// (bigint).
    pub const MARK_CONFIRMED: &str = "UPDATE chunk_queue SET confirmed = $4, \
           dispatched_at = CASE WHEN $4 THEN dispatched_at END \
         WHERE ctid = ANY (ARRAY(SELECT ctid FROM chunk_queue \
           WHERE tenant_id = $1 AND file_id = $2 AND chunk_no = ANY ($3) \
           FOR UPDATE SKIP LOCKED))";
    /// A new leader's hand-out of what its predecessor marked without a confirm (once per
    /// leadership, not per round).
    pub const RECLAIM_UNCONFIRMED: &str = "UPDATE chunk_queue SET dispatched_at = NULL \
         WHERE ctid = ANY (ARRAY(SELECT ctid FROM chunk_queue \
           WHERE dispatched_at IS NOT NULL AND NOT confirmed FOR UPDATE SKIP LOCKED))";
    /// Chunks the live workers import at once: $1 (bigint seconds).
    pub const CAPACITY: &str = "SELECT sum(concurrency)::BIGINT AS slots FROM workers \
         WHERE seen_at > now() - make_interval(secs => $1)";
}

/// Puts one chunk of a file in the queue (a retry of the same chunk changes nothing; a chunk
/// already imported is not queued again).
pub fn enqueue(
    conn: &mut PgConnection,
    chunk: ChunkRef,
    rows: i32,
    payload: &[u8],
) -> QueryResult<()> {
    diesel::sql_query(sql::ENQUEUE)
        .bind::<BigInt, _>(chunk.tenant_id.0)
        .bind::<BigInt, _>(chunk.file_id.0)
        .bind::<Int4, _>(chunk.chunk_no as i32)
        .bind::<Int4, _>(rows)
        .bind::<diesel::sql_types::Bytea, _>(payload)
        .execute(conn)?;
    Ok(())
}

/// Takes a queued chunk's payload, deleting its row (inside the caller's transaction: a
/// rollback puts it back). `None`: it is not queued (imported already, or never queued).
/// Queues a chunk like [`enqueue`], held back from the dispatcher when `held` (see
/// [`sql::ENQUEUE_HELD`]).
pub fn enqueue_held(
    conn: &mut PgConnection,
    chunk: ChunkRef,
    rows: i32,
    payload: &[u8],
    held: bool,
) -> QueryResult<()> {
    diesel::sql_query(sql::ENQUEUE_HELD)
        .bind::<BigInt, _>(chunk.tenant_id.0)
        .bind::<BigInt, _>(chunk.file_id.0)
        .bind::<Int4, _>(chunk.chunk_no as i32)
        .bind::<Int4, _>(rows)
        .bind::<diesel::sql_types::Bytea, _>(payload)
        .bind::<Bool, _>(held)
        .execute(conn)?;
    Ok(())
}

/// Lets the dispatcher hand out a file's held chunks: every one, or (`first_only`) the
/// first. Returns how many were released.
pub fn release(
    conn: &mut PgConnection,
    tenant: TenantId,
    file: ImportFileId,
    first_only: bool,
) -> QueryResult<usize> {
    diesel::sql_query(sql::RELEASE)
        .bind::<BigInt, _>(tenant.0)
        .bind::<BigInt, _>(file.0)
        .bind::<Bool, _>(first_only)
        .execute(conn)
}

#[derive(QueryableByName)]
struct QueuedPayload {
    #[diesel(sql_type = diesel::sql_types::Bytea)]
    payload: Vec<u8>,
}

/// A queued chunk's payload, left in the queue.
pub fn peek(conn: &mut PgConnection, chunk: ChunkRef) -> QueryResult<Option<Vec<u8>>> {
    let p: Option<QueuedPayload> = diesel::sql_query(sql::PEEK)
        .bind::<BigInt, _>(chunk.tenant_id.0)
        .bind::<BigInt, _>(chunk.file_id.0)
        .bind::<Int4, _>(chunk.chunk_no as i32)
        .get_result(conn)
        .optional()?;
    Ok(p.map(|p| p.payload))
}

/// Takes (deletes) every queued chunk of a file.
pub fn take_file(
    conn: &mut PgConnection,
    tenant: TenantId,
    file: ImportFileId,
) -> QueryResult<usize> {
    diesel::sql_query(sql::TAKE_FILE)
        .bind::<BigInt, _>(tenant.0)
        .bind::<BigInt, _>(file.0)
        .execute(conn)
}

pub fn take(conn: &mut PgConnection, chunk: ChunkRef) -> QueryResult<Option<Vec<u8>>> {
    #[derive(QueryableByName)]
    struct Payload {
        #[diesel(sql_type = diesel::sql_types::Bytea)]
        payload: Vec<u8>,
    }
    let taken: Option<Payload> = diesel::sql_query(sql::TAKE)
        .bind::<BigInt, _>(chunk.tenant_id.0)
        .bind::<BigInt, _>(chunk.file_id.0)
        .bind::<Int4, _>(chunk.chunk_no as i32)
        .get_result(conn)
        .optional()?;
    Ok(taken.map(|p| p.payload))
}

/// The chunk was dead-lettered: it no longer counts as in flight and no longer holds back
/// its tenant's later files.
pub fn dead(conn: &mut PgConnection, chunk: ChunkRef) -> QueryResult<()> {
    diesel::update(chunk_queue::table.find((
        chunk.tenant_id.0,
        chunk.file_id.0,
        chunk.chunk_no as i32,
    )))
    .set(chunk_queue::dead_at.eq(diesel::dsl::now))
    .execute(conn)?;
    // A dry run's other chunks wait, held, for the one that died: they die with it, so the
    // file no longer holds back the tenant's later files (a replay of the first chunk takes
    // them all again). A file held by the guard is not a dry run and keeps holding.
    diesel::update(
        chunk_queue::table
            .filter(chunk_queue::tenant_id.eq(chunk.tenant_id.0))
            .filter(chunk_queue::file_id.eq(chunk.file_id.0))
            .filter(chunk_queue::held)
            .filter(diesel::dsl::exists(
                crate::schema::import_files::table
                    .filter(crate::schema::import_files::id.eq(chunk.file_id.0))
                    .filter(crate::schema::import_files::dry_run),
            )),
    )
    .set(chunk_queue::dead_at.eq(diesel::dsl::now))
    .execute(conn)?;
    Ok(())
}

/// A dead chunk was replayed (its reference is on its way to the broker again).
pub fn revived(conn: &mut PgConnection, chunk: ChunkRef) -> QueryResult<()> {
    diesel::update(chunk_queue::table.find((
        chunk.tenant_id.0,
        chunk.file_id.0,
        chunk.chunk_no as i32,
    )))
    .set((
        chunk_queue::dead_at.eq(None::<chrono::DateTime<chrono::Utc>>),
        chunk_queue::dispatched_at.eq(diesel::dsl::now),
        chunk_queue::confirmed.eq(true),
    ))
    .execute(conn)?;
    Ok(())
}

/// One open file's chunks in the queue, as the dispatcher sees them.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct QueuedFile {
    /// The tenant.
    #[diesel(sql_type = BigInt)]
    pub tenant_id: i64,
    /// The file.
    #[diesel(sql_type = BigInt)]
    pub file_id: i64,
    /// Chunks handed to the broker and not imported yet (within the lease).
    #[diesel(sql_type = BigInt)]
    pub in_flight: i64,
    /// Chunks waiting to be handed out (never, or longer ago than the lease).
    #[diesel(sql_type = BigInt)]
    pub waiting: i64,
}

/// What the queue holds, and which tenants have an older file still being read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueState {
    /// Live (not dead-lettered) chunks, by file.
    pub files: Vec<QueuedFile>,
    /// For each tenant, its oldest open file whose chunks are not all queued yet (ingest is
    /// still reading it): none of the tenant's later files is handed out before it.
    pub reading: HashMap<i64, i64>,
}

#[derive(QueryableByName)]
struct Reading {
    #[diesel(sql_type = BigInt)]
    tenant_id: i64,
    #[diesel(sql_type = BigInt)]
    file_id: i64,
}

/// Reads the queue. A chunk dispatched more than `lease_secs` ago and still not imported is
/// counted as waiting again (its message was lost, e.g. a purged queue; a duplicate is
/// harmless: the worker recognises a chunk already imported).
pub fn queue_state(conn: &mut PgConnection, lease_secs: i64) -> QueryResult<QueueState> {
    let files: Vec<QueuedFile> = diesel::sql_query(sql::QUEUED_FILES)
        .bind::<BigInt, _>(lease_secs)
        .load(conn)?;
    let reading: Vec<Reading> = diesel::sql_query(sql::READING_FILES).load(conn)?;
    Ok(QueueState {
        files,
        reading: reading
            .into_iter()
            .map(|r| (r.tenant_id, r.file_id))
            .collect(),
    })
}

/// A chunk waiting to be handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, QueryableByName)]
pub struct Waiting {
    /// Its number in the file.
    #[diesel(sql_type = Integer)]
    pub chunk_no: i32,
    /// Its data rows.
    #[diesel(sql_type = Integer)]
    pub rows: i32,
}

/// Up to `limit` chunks of a file waiting to be handed out, in file order.
pub fn waiting_chunks(
    conn: &mut PgConnection,
    tenant: TenantId,
    file: ImportFileId,
    lease_secs: i64,
    limit: i64,
) -> QueryResult<Vec<Waiting>> {
    diesel::sql_query(sql::WAITING_CHUNKS)
        .bind::<BigInt, _>(tenant.0)
        .bind::<BigInt, _>(file.0)
        .bind::<BigInt, _>(lease_secs)
        .bind::<BigInt, _>(limit)
        .load(conn)
}

#[derive(QueryableByName)]
struct ChunkNo {
    #[diesel(sql_type = Integer)]
    chunk_no: i32,
}

/// Marks chunks of a file dispatched (not yet confirmed) and returns those it marked. A
/// chunk a worker is importing right now (its row locked) is skipped: it needs no message.
pub fn mark_dispatched(
    conn: &mut PgConnection,
    tenant: TenantId,
    file: ImportFileId,
    chunks: &[i32],
) -> QueryResult<Vec<i32>> {
    let marked: Vec<ChunkNo> = diesel::sql_query(sql::MARK_DISPATCHED)
        .bind::<BigInt, _>(tenant.0)
        .bind::<BigInt, _>(file.0)
        .bind::<Array<Integer>, _>(chunks)
        .load(conn)?;
    Ok(marked.into_iter().map(|c| c.chunk_no).collect())
}

/// The trace context stored with each of `files` (see [`crate::otel`]): the dispatcher's
/// span for a chunk continues its file's trace. Files without one are left out.
pub fn trace_contexts(
    conn: &mut PgConnection,
    files: &[i64],
) -> QueryResult<std::collections::HashMap<i64, crate::otel::TraceContext>> {
    use crate::schema::import_files;
    let rows: Vec<(i64, Option<serde_json::Value>)> = import_files::table
        .filter(import_files::id.eq_any(files))
        .filter(import_files::trace_context.is_not_null())
        .select((import_files::id, import_files::trace_context))
        .load(conn)?;
    Ok(rows
        .into_iter()
        .map(|(id, cx)| (id, crate::otel::TraceContext::from_json(cx)))
        .collect())
}

/// Records that the broker confirmed the chunks' references (or, `confirmed` false, that
/// publishing failed: they are waiting again). Rows being imported are skipped.
pub fn mark_confirmed(
    conn: &mut PgConnection,
    tenant: TenantId,
    file: ImportFileId,
    chunks: &[i32],
    confirmed: bool,
) -> QueryResult<()> {
    diesel::sql_query(sql::MARK_CONFIRMED)
        .bind::<BigInt, _>(tenant.0)
        .bind::<BigInt, _>(file.0)
        .bind::<Array<Integer>, _>(chunks)
        .bind::<Bool, _>(confirmed)
        .execute(conn)?;
    Ok(())
}

/// A new leader hands out again every chunk its predecessor marked but had no confirmation
/// for (it may have died before publishing). Returns how many.
pub fn reclaim_unconfirmed(conn: &mut PgConnection) -> QueryResult<usize> {
    diesel::sql_query(sql::RECLAIM_UNCONFIRMED).execute(conn)
}

/// A worker says it is alive, and how many chunks it imports at once.
pub fn heartbeat(
    conn: &mut PgConnection,
    name: &str,
    host: &str,
    concurrency: i32,
) -> QueryResult<()> {
    diesel::insert_into(workers::table)
        .values((
            workers::name.eq(name),
            workers::host.eq(host),
            workers::pid.eq(std::process::id() as i32),
            workers::concurrency.eq(concurrency),
        ))
        .on_conflict(workers::name)
        .do_update()
        .set((
            workers::seen_at.eq(diesel::dsl::now),
            workers::concurrency.eq(concurrency),
        ))
        .execute(conn)?;
    Ok(())
}

/// A worker stopping says so (a killed one is simply not seen any more).
pub fn worker_gone(conn: &mut PgConnection, name: &str) -> QueryResult<()> {
    diesel::delete(workers::table.find(name)).execute(conn)?;
    Ok(())
}

#[derive(QueryableByName)]
struct Capacity {
    #[diesel(sql_type = Nullable<BigInt>)]
    slots: Option<i64>,
}

/// Chunks the live workers (seen within `alive_secs`) import at once.
pub fn capacity(conn: &mut PgConnection, alive_secs: i64) -> QueryResult<i64> {
    let c: Capacity = diesel::sql_query(sql::CAPACITY)
        .bind::<BigInt, _>(alive_secs)
        .get_result(conn)?;
    Ok(c.slots.unwrap_or(0))
}

/// A live worker, as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName, serde::Serialize)]
pub struct WorkerLine {
    /// `host:pid:start`.
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub name: String,
    /// Chunks it imports at once.
    #[diesel(sql_type = Integer)]
    pub concurrency: i32,
    /// Seconds since its last heartbeat.
    #[diesel(sql_type = BigInt)]
    pub seen_secs_ago: i64,
}

/// One file's chunks in the queue, as the operator sees them.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName, serde::Serialize)]
pub struct QueueLine {
    /// The tenant's slug.
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub tenant: String,
    /// The file.
    #[diesel(sql_type = BigInt)]
    pub file_id: i64,
    /// Its name.
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub file_name: String,
    /// Chunks not handed out yet.
    #[diesel(sql_type = BigInt)]
    pub waiting: i64,
    /// Chunks handed out, not imported yet.
    #[diesel(sql_type = BigInt)]
    pub in_flight: i64,
    /// Chunks dead-lettered (`muictl dead-letters`).
    #[diesel(sql_type = BigInt)]
    pub dead: i64,
    /// Chunks held back: a file held by the mass-deactivation guard (until `muictl files
    /// approve`), or a dry run's chunks its worker takes with the first.
    #[diesel(sql_type = BigInt)]
    pub held: i64,
}

/// The dispatcher as the operator sees it (`muictl queue`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Overview {
    /// The leading dispatcher's session name (`mui-dispatcher <worker>`), if one leads.
    pub leader: Option<String>,
    /// Workers seen within the last minute.
    pub workers: Vec<WorkerLine>,
    /// Files with chunks in the queue, oldest first.
    pub files: Vec<QueueLine>,
}

#[derive(QueryableByName)]
struct Leader {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
}

/// Who leads, which workers live, what the queue holds.
pub fn overview(conn: &mut PgConnection) -> QueryResult<Overview> {
    let leader: Option<Leader> = diesel::sql_query(format!(
        "SELECT a.application_name AS name FROM pg_locks l \
         JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.database = \
           (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND l.classid = {} AND l.objid = {} AND l.objsubid = 2",
        LEADER_LOCK.0, LEADER_LOCK.1
    ))
    .get_result(conn)
    .optional()?;
    let workers = diesel::sql_query(
        "SELECT name, concurrency, extract(epoch FROM now() - seen_at)::BIGINT AS seen_secs_ago \
         FROM workers WHERE seen_at > now() - interval '1 minute' ORDER BY name",
    )
    .load(conn)?;
    let files = diesel::sql_query(
        "SELECT t.slug AS tenant, q.file_id, f.file_name, \
           count(*) FILTER (WHERE q.dead_at IS NULL AND q.dispatched_at IS NULL AND NOT q.held) AS waiting, \
           count(*) FILTER (WHERE q.dead_at IS NULL AND q.held) AS held, \
           count(*) FILTER (WHERE q.dead_at IS NULL AND q.dispatched_at IS NOT NULL) AS in_flight, \
           count(*) FILTER (WHERE q.dead_at IS NOT NULL) AS dead \
         FROM chunk_queue q JOIN tenants t ON t.id = q.tenant_id \
           JOIN import_files f ON f.id = q.file_id \
         GROUP BY t.slug, q.file_id, f.file_name ORDER BY q.file_id",
    )
    .load(conn)?;
    Ok(Overview {
        leader: leader.map(|l| l.name),
        workers,
        files,
    })
}

/// The two keys of the advisory lock whose holder leads the dispatcher (two-int form, apart
/// from the migration lock's `(7173481, 1)`).
pub const LEADER_LOCK: (i32, i32) = (7_173_481, 2);

/// Start-time fair queueing by rows, across tenants.
///
/// Each tenant has a tag: the rows handed out to it, in virtual time. The next chunk goes to
/// the tenant with the lowest tag (ties: fewer chunks in flight, then the lower tenant id)
/// among those with a chunk waiting and room under the per-tenant cap; its tag grows by the
/// chunk's rows. A tenant that comes (back) with work starts at the lowest tag of the
/// tenants already busy, so it is served next but banks no credit for the time it was idle.
/// While k tenants have work, each gets about 1/k of the chunks in flight, by rows.
#[derive(Debug, Default)]
pub struct Fair {
    tags: HashMap<i64, u64>,
}

/// A tenant with work, as [`Fair::pick`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The tenant.
    pub tenant_id: i64,
    /// Its chunks in flight now.
    pub in_flight: i64,
    /// The rows of its chunks that may be handed out, in order.
    pub waiting: Vec<i32>,
}

impl Fair {
    /// Picks up to `free` chunks among `candidates`, at most `per_tenant` in flight per
    /// tenant. Returns, per tenant, how many of its waiting chunks to hand out (in the order
    /// they were picked; only tenants that got at least one).
    pub fn pick(
        &mut self,
        candidates: &[Candidate],
        free: i64,
        per_tenant: i64,
    ) -> BTreeMap<i64, usize> {
        // Forget tenants with no work: they re-enter at the busy tenants' lowest tag.
        self.tags
            .retain(|t, _| candidates.iter().any(|c| c.tenant_id == *t));
        let floor = self.tags.values().copied().min().unwrap_or(0);
        for c in candidates {
            self.tags.entry(c.tenant_id).or_insert(floor);
        }
        let mut in_flight: HashMap<i64, i64> = candidates
            .iter()
            .map(|c| (c.tenant_id, c.in_flight))
            .collect();
        let mut taken: BTreeMap<i64, usize> = BTreeMap::new();
        for _ in 0..free.max(0) {
            let next = candidates
                .iter()
                .filter(|c| {
                    let n = taken.get(&c.tenant_id).copied().unwrap_or(0);
                    n < c.waiting.len() && in_flight[&c.tenant_id] < per_tenant
                })
                .min_by_key(|c| {
                    (
                        self.tags[&c.tenant_id],
                        in_flight[&c.tenant_id],
                        c.tenant_id,
                    )
                });
            let Some(c) = next else { break };
            let n = taken.entry(c.tenant_id).or_insert(0);
            let rows = c.waiting[*n].max(1) as u64;
            *n += 1;
            if let Some(tag) = self.tags.get_mut(&c.tenant_id) {
                *tag += rows;
            }
            if let Some(f) = in_flight.get_mut(&c.tenant_id) {
                *f += 1;
            }
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(tenant_id: i64, in_flight: i64, chunks: usize, rows: i32) -> Candidate {
        Candidate {
            tenant_id,
            in_flight,
            waiting: vec![rows; chunks],
        }
    }

    #[test]
    fn a_lone_tenant_gets_every_free_slot_up_to_its_cap() {
        let mut f = Fair::default();
        let got = f.pick(&[cand(1, 0, 100, 1000)], 6, 4);
        assert_eq!(got, BTreeMap::from([(1, 4)]));
        let got = f.pick(&[cand(1, 4, 96, 1000)], 2, 4);
        assert!(got.is_empty(), "capped: {got:?}");
    }

    #[test]
    fn a_newcomer_is_served_next_and_tenants_then_alternate() {
        let mut f = Fair::default();
        // A has been busy a long time.
        for _ in 0..50 {
            f.pick(&[cand(1, 0, 1, 1000)], 1, 8);
        }
        // B arrives with one small chunk while A has plenty waiting: B goes first.
        let got = f.pick(&[cand(1, 5, 100, 1000), cand(2, 0, 1, 100)], 1, 8);
        assert_eq!(got, BTreeMap::from([(2, 1)]));
        // Three busy tenants with equal chunks share six slots two each.
        let mut f = Fair::default();
        let got = f.pick(
            &[
                cand(1, 0, 100, 500),
                cand(2, 0, 100, 500),
                cand(3, 0, 100, 500),
            ],
            6,
            6,
        );
        assert_eq!(got, BTreeMap::from([(1, 2), (2, 2), (3, 2)]));
    }

    #[test]
    fn shares_are_by_rows_not_by_chunks() {
        let mut f = Fair::default();
        let mut handed = HashMap::<i64, u64>::new();
        // Tenant 1 sends 1000-row chunks, tenant 2 250-row chunks: over time both get the
        // same rows, so tenant 2 gets about four chunks for each of tenant 1's.
        for _ in 0..400 {
            let got = f.pick(&[cand(1, 0, 10, 1000), cand(2, 0, 10, 250)], 1, 10);
            for (t, n) in got {
                *handed.entry(t).or_default() += n as u64 * if t == 1 { 1000 } else { 250 };
            }
        }
        let (a, b) = (handed[&1] as f64, handed[&2] as f64);
        assert!((a / b - 1.0).abs() < 0.05, "rows {a} vs {b}");
    }

    #[test]
    fn an_idle_tenant_banks_no_credit() {
        let mut f = Fair::default();
        f.pick(&[cand(2, 0, 1, 1000)], 1, 8);
        // Tenant 1 works alone for a long time; tenant 2 is idle (forgotten).
        for _ in 0..100 {
            f.pick(&[cand(1, 0, 1, 1000)], 1, 8);
        }
        // When 2 returns it does not get 100 chunks in a row: they alternate.
        let mut order = Vec::new();
        for _ in 0..6 {
            let got = f.pick(&[cand(1, 0, 10, 1000), cand(2, 0, 10, 1000)], 1, 8);
            order.extend(got.keys().copied());
        }
        assert_eq!(order.len(), 6);
        assert!(order.windows(2).all(|w| w[0] != w[1]), "{order:?}");
    }
}
