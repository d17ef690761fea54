//! The fair dispatcher: hands the chunks queued in PostgreSQL to the broker in fair order
//! across tenants (see `mui_shared::dispatch` and docs/dispatch.md).
//!
//! Every worker runs one; exactly one leads, the one holding a PostgreSQL advisory lock on
//! its own connection. The lock goes with the session: a leader killed or cut off loses it
//! when PostgreSQL drops the session (at once for a closed socket; within about 20 s for a
//! silent one, through the session's idle and TCP keepalive timeouts set below), and another
//! worker's next try takes over. A new leader first hands out again what its predecessor
//! marked without a broker confirm, so nothing is lost; a chunk handed out twice is imported
//! once (the worker takes its row from the queue in the importing transaction).
//!
//! A round: read how many chunks the live workers import at once (`workers` table), what
//! waits and what is in flight; pick with [`Fair`] up to the free slots, each tenant under
//! its cap and only from its oldest open file; mark them, publish their references with
//! confirms, record the confirms.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use diesel::prelude::*;
use mui_shared::amqp::{Publisher, QueueKind};
use mui_shared::dispatch::{self, Candidate, Fair, QueueState};
use mui_shared::domain::{ImportFileId, TenantId};
use mui_shared::messages::{self, ChunkRef, WorkMessage};
use mui_shared::otel::{self, TraceContext};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// A worker not seen for this long is not counted.
pub const ALIVE_SECS: i64 = 15;
/// How often a worker that does not lead tries to.
const CANDIDATE_INTERVAL: Duration = Duration::from_millis(1000);

/// The dispatcher's settings.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// Where the queue is.
    pub database_url: String,
    /// At most this many chunks of one tenant in flight (None: as many as the workers
    /// import at once, so a lone tenant uses every worker).
    pub tenant_cap: Option<i64>,
    /// A chunk handed out this long ago and not imported is handed out again.
    pub lease_secs: i64,
    /// How often the leader looks at the queue when nothing wakes it.
    pub poll: Duration,
    /// This worker's name (the dispatcher's session is `mui-dispatcher <name>`, which
    /// `muictl queue` shows for the leader).
    pub worker: String,
}

/// Runs until `shutdown`, leading whenever it can. `wake` is notified when this process
/// imported a chunk (a slot is free).
pub async fn run(
    settings: DispatchSettings,
    publisher: Publisher,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut conn: Option<PgConnection> = None;
    let mut leading = false;
    let mut fair = Fair::default();
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let Some(c) = conn.take() else {
            let url = settings.database_url.clone();
            let app = format!("mui-dispatcher {}", settings.worker);
            match tokio::task::spawn_blocking(move || connect(&url, &app)).await {
                Ok(Ok(c)) => conn = Some(c),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "DispatcherConnectError");
                    if pause(&shutdown, CANDIDATE_INTERVAL).await {
                        break;
                    }
                }
                Err(e) => tracing::error!(error = %e, "DispatcherTaskPanicked"),
            }
            continue;
        };
        if !leading {
            let (c, won) = blocking(c, try_lead).await;
            match won {
                Ok(Some(reclaimed)) => {
                    tracing::info!(reclaimed, "DispatcherLeading");
                    leading = true;
                    fair = Fair::default();
                    conn = c;
                }
                Ok(None) => {
                    conn = c;
                    if pause(&shutdown, CANDIDATE_INTERVAL).await {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "DispatcherLeadError");
                    if pause(&shutdown, CANDIDATE_INTERVAL).await {
                        break;
                    }
                }
            }
            continue;
        }
        match round(c, &settings, &publisher, &mut fair).await {
            (Some(c), Ok(handed)) => {
                conn = Some(c);
                if handed == 0 {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep(settings.poll) => {}
                    }
                }
            }
            (c, result) => {
                // The session may be gone, and the lock with it: start over as a candidate.
                if let Err(e) = result {
                    tracing::warn!(error = %e, "DispatcherRoundError");
                }
                drop(c);
                leading = false;
                tracing::info!("DispatcherNotLeading");
                if pause(&shutdown, CANDIDATE_INTERVAL).await {
                    break;
                }
            }
        }
    }
    if leading {
        tracing::info!("DispatcherStopping");
    }
    // Dropping the connection ends the session and releases the lock.
}

/// Sleeps, or returns true at once on shutdown.
async fn pause(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// The dispatcher's own session, set to die soon after its process or network does, so that
/// the lock it may hold goes with it.
fn connect(url: &str, application_name: &str) -> anyhow::Result<PgConnection> {
    let mut c = PgConnection::establish(url)?;
    diesel::sql_query(mui_shared::db::DEAD_PEER_SETTINGS).execute(&mut c)?;
    diesel::sql_query(dispatch::sql::PLANNER_SETTINGS).execute(&mut c)?;
    diesel::sql_query(
        "SELECT set_config('idle_session_timeout', '20s', false), \
                set_config('idle_in_transaction_session_timeout', '20s', false), \
                set_config('application_name', $1, false)",
    )
    .bind::<diesel::sql_types::Text, _>(application_name)
    .execute(&mut c)?;
    Ok(c)
}

/// Runs `f` on the blocking pool with the connection, and gives the connection back (None if
/// the task panicked).
async fn blocking<T: Send + 'static>(
    mut c: PgConnection,
    f: impl FnOnce(&mut PgConnection) -> anyhow::Result<T> + Send + 'static,
) -> (Option<PgConnection>, anyhow::Result<T>) {
    match tokio::task::spawn_blocking(move || {
        let r = f(&mut c);
        (c, r)
    })
    .await
    {
        Ok((c, r)) => (Some(c), r),
        Err(e) => (None, Err(e.into())),
    }
}

#[derive(QueryableByName)]
struct Locked {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    locked: bool,
}

/// Tries to take the leader's lock; on success hands out again what a predecessor marked
/// without a confirm, and returns how many.
fn try_lead(c: &mut PgConnection) -> anyhow::Result<Option<usize>> {
    let (k1, k2) = dispatch::LEADER_LOCK;
    let l: Locked = diesel::sql_query(format!("SELECT pg_try_advisory_lock({k1}, {k2}) AS locked"))
        .get_result(c)?;
    if !l.locked {
        return Ok(None);
    }
    Ok(Some(dispatch::reclaim_unconfirmed(c)?))
}

/// What a round decided: per (tenant, file), the chunks to hand out.
type Picks = Vec<(TenantId, ImportFileId, Vec<i32>)>;

/// The chunks (tenant, chunk_no) of a round that go to the express lane.
type Express = HashSet<(i64, i32)>;

/// One round; returns how many chunks it handed out.
async fn round(
    c: PgConnection,
    settings: &DispatchSettings,
    publisher: &Publisher,
    fair: &mut Fair,
) -> (Option<PgConnection>, anyhow::Result<usize>) {
    let lease = settings.lease_secs;
    let cap = settings.tenant_cap;
    // The blocking task needs an owned value (it outlives this borrow): move the tags in and out.
    let mut f = std::mem::take(fair);
    let (c, picked) = blocking(c, move |c| {
        let (picks, express) = pick(c, &mut f, lease, cap)?;
        let mut marked: Picks = Vec::new();
        if !picks.is_empty() {
            c.transaction(|c| {
                for (tenant, file, chunks) in &picks {
                    let m = dispatch::mark_dispatched(c, *tenant, *file, chunks)?;
                    if !m.is_empty() {
                        marked.push((*tenant, *file, m));
                    }
                }
                diesel::QueryResult::Ok(())
            })?;
        }
        // Each file's trace, continued by the span that hands out its chunks.
        let traces = if otel::enabled() && !marked.is_empty() {
            let files: Vec<i64> = marked.iter().map(|(_, f, _)| f.0).collect();
            dispatch::trace_contexts(c, &files)?
        } else {
            HashMap::new()
        };
        Ok((f, marked, express, traces))
    })
    .await;
    let (marked, express, traces) = match picked {
        Ok((f, marked, express, traces)) => {
            *fair = f;
            (marked, express, traces)
        }
        Err(e) => return (c, Err(e)),
    };
    let Some(c) = c else {
        return (None, Ok(0));
    };
    if marked.is_empty() {
        return (Some(c), Ok(0));
    }
    // Publish every reference, then wait for the confirms.
    let mut outcome: Vec<(TenantId, ImportFileId, Vec<i32>, Vec<i32>)> = Vec::new();
    let mut handed = 0;
    for (tenant, file, chunks) in marked {
        let mut pending = Vec::with_capacity(chunks.len());
        for &chunk_no in &chunks {
            let msg = WorkMessage::QueuedChunkV1(ChunkRef {
                file_id: file,
                tenant_id: tenant,
                chunk_no: chunk_no as u32,
            });
            let lane = if express.contains(&(tenant.0, chunk_no)) {
                QueueKind::Express
            } else {
                QueueKind::Chunks
            };
            let span = tracing::info_span!(
                "chunk.dispatch",
                tenant_id = tenant.0,
                file_id = file.0,
                chunk_no,
                messaging.system = "rabbitmq",
                messaging.operation.type = "send",
                messaging.destination.name = %publisher.topology().queue(lane),
                mui.express = lane == QueueKind::Express,
                otel.kind = "producer",
            );
            if let Some(t) = traces.get(&file.0) {
                t.parent(&span);
            }
            let trace = TraceContext::of(&span);
            let sent = match messages::encode(&msg) {
                Ok(bytes) => match publisher
                    .send_traced(lane, &bytes, &trace)
                    .instrument(span.clone())
                    .await
                {
                    Ok(p) => Some(p),
                    Err(e) => {
                        otel::set_error(&span, &e);
                        None
                    }
                },
                Err(_) => None,
            };
            pending.push((chunk_no, sent));
        }
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        for (chunk_no, p) in pending {
            let confirmed = match p {
                Some(p) => p.confirmed().await.is_ok(),
                None => false,
            };
            if confirmed {
                ok.push(chunk_no);
            } else {
                failed.push(chunk_no);
            }
        }
        handed += ok.len();
        outcome.push((tenant, file, ok, failed));
    }
    let failures: usize = outcome.iter().map(|o| o.3.len()).sum();
    let (c, recorded) = blocking(c, move |c| {
        for (tenant, file, ok, failed) in &outcome {
            if !ok.is_empty() {
                dispatch::mark_confirmed(c, *tenant, *file, ok, true)?;
            }
            if !failed.is_empty() {
                dispatch::mark_confirmed(c, *tenant, *file, failed, false)?;
            }
        }
        Ok(())
    })
    .await;
    if failures > 0 {
        tracing::warn!(failures, "DispatchPublishError");
        // The broker is in trouble: the chunks wait again; back off a little.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    match recorded {
        Ok(()) => (c, Ok(handed)),
        Err(e) => (c, Err(e)),
    }
}

/// Decides what to hand out now, and which of it goes to the express lane.
fn pick(
    c: &mut PgConnection,
    fair: &mut Fair,
    lease: i64,
    tenant_cap: Option<i64>,
) -> anyhow::Result<(Picks, Express)> {
    let slots = dispatch::capacity(c, ALIVE_SECS)?;
    // As many in flight as the live workers import at once: the broker's queue stays empty,
    // so a chunk handed out is started by the next free slot, whoever's it is.
    let limit = slots.max(1);
    let cap = tenant_cap.unwrap_or(limit).clamp(1, limit);
    let state = dispatch::queue_state(c, lease)?;
    let in_flight: i64 = state.files.iter().map(|f| f.in_flight).sum();
    let current = current_files(&state);
    if current.is_empty() {
        // Nobody has work: every tenant's tag is forgotten.
        fair.pick(&[], 0, cap);
        return Ok(Default::default());
    }
    // A tenant with nothing in flight gets one chunk even when every slot is taken: it goes
    // to the express lane, which every worker serves beside its usual slots, one chunk at a
    // time, so it starts at once instead of waiting for a large import's chunk to finish.
    let newcomers = current.values().filter(|(_, n)| *n == 0).count() as i64;
    let slots_free = (limit - in_flight).max(0);
    let free = slots_free.max(newcomers);
    if free <= 0 {
        return Ok(Default::default());
    }
    let mut candidates = Vec::new();
    let mut chunk_nos: HashMap<i64, (ImportFileId, Vec<i32>)> = HashMap::new();
    for (tenant, (file, tenant_in_flight)) in current {
        if tenant_in_flight >= cap {
            // Stays a candidate with nothing to take, so its tag is kept.
            candidates.push(Candidate {
                tenant_id: tenant,
                in_flight: tenant_in_flight,
                waiting: Vec::new(),
            });
            continue;
        }
        let want = free.min(cap - tenant_in_flight);
        let waiting = dispatch::waiting_chunks(c, TenantId(tenant), file, lease, want)?;
        candidates.push(Candidate {
            tenant_id: tenant,
            in_flight: tenant_in_flight,
            waiting: waiting.iter().map(|w| w.rows).collect(),
        });
        chunk_nos.insert(tenant, (file, waiting.iter().map(|w| w.chunk_no).collect()));
    }
    let picked = fair.pick(&candidates, free, cap);
    let picks: Picks = picked
        .into_iter()
        .filter_map(|(tenant, n)| {
            let (file, nos) = chunk_nos.get(&tenant)?;
            Some((
                TenantId(tenant),
                *file,
                nos.iter().take(n).copied().collect(),
            ))
        })
        .collect();
    let newcomer: HashSet<i64> = candidates
        .iter()
        .filter(|c| c.in_flight == 0)
        .map(|c| c.tenant_id)
        .collect();
    let express = express_lane(&picks, slots_free, &newcomer);
    Ok((picks, express))
}

/// Which picked chunks go to the express lane: as many as were picked beyond the free slots,
/// each the first chunk of a tenant that had nothing in flight (those are the picks the
/// slots did not pay for).
fn express_lane(picks: &Picks, slots_free: i64, newcomer: &HashSet<i64>) -> Express {
    let picked: usize = picks.iter().map(|(_, _, nos)| nos.len()).sum();
    let beyond = picked.saturating_sub(usize::try_from(slots_free).unwrap_or(0));
    picks
        .iter()
        .filter(|(t, _, _)| newcomer.contains(&t.0))
        .filter_map(|(t, _, nos)| nos.first().map(|n| (t.0, *n)))
        .take(beyond)
        .collect()
}

/// Per tenant with work: the file it may hand out from (its oldest open file with live
/// chunks, unless an older one is still being read) and its chunks in flight.
fn current_files(state: &QueueState) -> HashMap<i64, (ImportFileId, i64)> {
    let mut oldest: HashMap<i64, (i64, i64, i64)> = HashMap::new(); // file, waiting, in flight
    for f in &state.files {
        let e = oldest
            .entry(f.tenant_id)
            .or_insert((f.file_id, f.waiting, 0));
        if f.file_id < e.0 {
            e.0 = f.file_id;
            e.1 = f.waiting;
        }
        e.2 += f.in_flight;
    }
    oldest
        .into_iter()
        .filter(|(tenant, (file, _, _))| {
            state
                .reading
                .get(tenant)
                .is_none_or(|reading| reading >= file)
        })
        .filter(|(_, (_, waiting, _))| *waiting > 0)
        .map(|(tenant, (file, _, in_flight))| (tenant, (ImportFileId(file), in_flight)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mui_shared::dispatch::QueuedFile;

    fn qf(tenant_id: i64, file_id: i64, in_flight: i64, waiting: i64) -> QueuedFile {
        QueuedFile {
            tenant_id,
            file_id,
            in_flight,
            waiting,
        }
    }

    #[test]
    fn only_picks_beyond_the_free_slots_go_express_each_a_newcomers_first_chunk() {
        let picks: Picks = vec![
            (TenantId(1), ImportFileId(10), vec![4]),
            (TenantId(2), ImportFileId(20), vec![0]),
            (TenantId(3), ImportFileId(30), vec![0, 1]),
        ];
        let newcomers = HashSet::from([2, 3]);
        // Slots for everything: nothing goes express.
        assert!(express_lane(&picks, 4, &newcomers).is_empty());
        // Two picked beyond the slots: the newcomers' first chunks.
        assert_eq!(
            express_lane(&picks, 2, &newcomers),
            HashSet::from([(2, 0), (3, 0)])
        );
        // One beyond: one newcomer's first chunk, never a busy tenant's.
        let one = express_lane(&picks, 3, &newcomers);
        assert_eq!(one.len(), 1);
        assert!(one.is_subset(&HashSet::from([(2, 0), (3, 0)])), "{one:?}");
    }

    #[test]
    fn only_a_tenants_oldest_file_is_handed_out() {
        let state = QueueState {
            files: vec![qf(1, 10, 2, 0), qf(1, 11, 0, 5), qf(2, 12, 0, 3)],
            reading: HashMap::new(),
        };
        let cur = current_files(&state);
        // Tenant 1's file 10 has nothing waiting but is not finished: file 11 waits.
        assert_eq!(cur.get(&1), None);
        assert_eq!(cur.get(&2), Some(&(ImportFileId(12), 0)));
    }

    #[test]
    fn an_older_file_still_being_read_holds_back_the_later_ones() {
        let state = QueueState {
            files: vec![qf(1, 11, 0, 5), qf(2, 12, 0, 3)],
            reading: HashMap::from([(1, 9), (2, 12)]),
        };
        let cur = current_files(&state);
        assert_eq!(cur.get(&1), None, "file 9 is still being read");
        // A file being read may be handed out as its chunks arrive.
        assert_eq!(cur.get(&2), Some(&(ImportFileId(12), 0)));
    }
}
