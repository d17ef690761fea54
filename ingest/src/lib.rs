//! # ingest
//!
//! Watches every tenant's drop folder, `DROP_ROOT/<tenant>/upload/`
//! ([`mui_shared::tenants::drop_folder`]), and hands each finished upload to the workers.
//! `DROP_ROOT/<tenant>/` is the tenant's SFTP chroot (see `deploy/sftp/`). A newcomer's map:
//!
//! - [`run`] (this file): the loop. File-system events (inotify through `notify`), a
//!   periodic rescan and a 200 ms tick drive [`watch::Watch`], which decides what is ready:
//!   a candidate becomes ready once no process holds it open for writing ([`openfiles`]) and
//!   either a writer just closed it or it was just renamed into place (inotify's
//!   `IN_CLOSE_WRITE` / `IN_MOVED_TO`: taken at once) or its size, mtime and inode stayed
//!   the same for the settle interval (a file found by a rescan, a polled folder, a file
//!   written again after its close); temporary upload
//!   names (`*.filepart`, `*.part`, `*.tmp`, dot-files) are left alone; files of one tenant
//!   are handed over one at a time, oldest first, so they take effect in arrival order.
//! - [`folder`]: a tenant's drop folder through directory handles that follow no link; `bak/`
//!   by inode, never overwriting.
//! - [`pipeline`]: one ready file: register → check whole → publish its rows as chunks →
//!   move to `bak/`.
//! - [`reader`]: encoding detection, CSV decoding, chunking (a file event becomes
//!   [`mui_shared::messages::Chunk`]s here).

pub mod folder;
pub mod openfiles;
pub mod pipeline;
pub mod reader;
pub mod watch;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use diesel::prelude::*;
use mui_shared::amqp::Publisher;
use mui_shared::config::{redact_url, CommonArgs};
use mui_shared::db;
use mui_shared::outbox::{Kick, Relay};
use mui_shared::tenants::{self, Tenant};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// ingest's settings.
#[derive(Debug, Clone, Args)]
pub struct IngestConfig {
    /// Shared settings.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Folder holding one folder per tenant; files are dropped into `DROP_ROOT/<tenant>/upload/`.
    #[arg(long, env = "DROP_ROOT", default_value = "/srv/mui/drop")]
    pub drop_root: PathBuf,
    /// How long a file must stay unchanged (size, mtime) before it is taken, in milliseconds,
    /// when its writer was not seen to finish (found by a rescan, a polled folder, written
    /// again after a close). A file renamed into place is taken at once, and one its writer
    /// closed after INGEST_CLOSED_SETTLE_MS, if no process holds it open for writing.
    #[arg(long, env = "INGEST_SETTLE_MS", default_value_t = 1000)]
    pub settle_ms: u64,
    /// How long a file its writer closed must stay unchanged before it is taken, in
    /// milliseconds (0: at once). A dropped connection also closes its partial file: raise
    /// this to give tenants time to reconnect and resume an upload (`reput`) first.
    #[arg(long, env = "INGEST_CLOSED_SETTLE_MS", default_value_t = 0)]
    pub closed_settle_ms: u64,
    /// How often every drop folder is rescanned (the safety net for missed events), seconds.
    #[arg(long, env = "INGEST_RESCAN_SECS", default_value_t = 10)]
    pub rescan_secs: u64,
    /// Do not use file-system events; only rescan (for network file systems), every
    /// INGEST_RESCAN_SECS.
    #[arg(long, env = "INGEST_POLL_ONLY", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub poll_only: bool,
    /// Rows per chunk message (fixed for each file when it is registered).
    #[arg(long, env = "CHUNK_ROWS", default_value_t = 5000)]
    pub chunk_rows: usize,
    /// Bytes of field data per chunk message, about: a chunk is closed early once it holds
    /// this much, so that no message comes near RabbitMQ's size limit (fixed for each file
    /// when it is registered).
    #[arg(long, env = "CHUNK_MAX_BYTES", default_value_t = reader::DEFAULT_CHUNK_MAX_BYTES)]
    pub chunk_max_bytes: usize,
    /// Files handled at once (of different tenants).
    #[arg(long, env = "INGEST_CONCURRENCY", default_value_t = 4)]
    pub concurrency: usize,
    /// Largest file accepted, in bytes; a larger one is refused with a clear report.
    #[arg(long, env = "MAX_FILE_BYTES", default_value_t = 1 << 30)]
    pub max_file_bytes: u64,
    /// Most rows accepted in one file.
    #[arg(long, env = "MAX_FILE_ROWS", default_value_t = 5_000_000)]
    pub max_file_rows: u64,
    /// Pause points for tests (not settable from outside).
    /// How chunks reach the workers. `fair`: queued in PostgreSQL and handed to the broker
    /// by the workers' fair dispatcher (fair share between tenants, one file of a tenant at a
    /// time so that its files take effect in arrival order). `direct`: published straight to
    /// the broker in the order read (first come, first served; no order across a tenant's
    /// files; kept for comparison and for deployments without dispatching workers).
    #[arg(long, env = "CHUNK_DISPATCH", value_enum, default_value_t = pipeline::ChunkDispatch::Fair)]
    pub chunk_dispatch: pipeline::ChunkDispatch,
    #[arg(skip)]
    pub hooks: pipeline::Hooks,
}

/// Runs ingest until `shutdown`: files being handled are finished first.
pub async fn run(config: IngestConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    tracing::info!(
        database = %redact_url(&config.common.database_url),
        amqp = %redact_url(&config.common.amqp_url),
        drop_root = %config.drop_root.display(),
        "IngestConfigured"
    );
    // Each file being read holds up to QUEUE_WINDOW connections while queueing its chunks;
    // four more for everything else.
    let per_file = pipeline::QUEUE_WINDOW as u32;
    let pool = db::pool(
        &config.common.database_url,
        (config.concurrency as u32) * per_file + 4,
    );
    let Some((conn, topology)) =
        mui_shared::service::start(&config.common, "mui-ingest", &pool, &shutdown).await?
    else {
        return Ok(());
    };
    std::fs::create_dir_all(&config.drop_root)
        .with_context(|| format!("creating DROP_ROOT {}", config.drop_root.display()))?;
    let publisher = Publisher::new(&conn, topology.clone()).await?;
    let kick = Kick::default();
    let relay = Relay::new(
        pool.clone(),
        Publisher::new(&conn, topology).await?,
        kick.clone(),
    );
    // A child token: the relay stops with shutdown, and also when this run fails (the guard).
    let relay_stop = shutdown.child_token();
    let _relay_guard = relay_stop.clone().drop_guard();
    let relay_task = tokio::spawn(relay.run(relay_stop));

    let ctx = Arc::new(pipeline::Context {
        pool: pool.clone(),
        database_url: config.common.database_url.clone(),
        publisher,
        kick,
        chunking: reader::Chunking {
            rows: config.chunk_rows.max(1),
            max_bytes: config.chunk_max_bytes.max(1),
        },
        limits: reader::Limits {
            max_bytes: config.max_file_bytes,
            max_rows: config.max_file_rows,
        },
        hooks: config.hooks.clone(),
        dispatch: config.chunk_dispatch,
        persistent_failures: Default::default(),
    });

    // (path, finish): how the event says an upload finished, if it does, so that the file need
    // not wait out the settle interval.
    let (events_tx, mut events) = mpsc::unbounded_channel::<(PathBuf, Option<watch::Finish>)>();
    let mut watcher = if config.poll_only {
        None
    } else {
        let tx = events_tx.clone();
        let root = config.drop_root.clone();
        let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            match res {
                Ok(ev) => {
                    if ev.need_rescan() {
                        // The kernel's event queue overflowed: events were lost.
                        tracing::warn!("WatchOverflow");
                        let _ = tx.send((root.clone(), None));
                    }
                    if only_read(&ev.kind) {
                        // Opening or reading (ingest's own scans and reads among them)
                        // changes nothing; taken as a change, each scan's own open of the
                        // folder asked for the next rescan, in a loop.
                        return;
                    }
                    let finish = upload_finished(&ev.kind);
                    let last = ev.paths.len().saturating_sub(1);
                    for (i, p) in ev.paths.into_iter().enumerate() {
                        // A rename's paths are (from, to): only the new name was finished.
                        let _ = tx.send((p, finish.filter(|_| i == last)));
                    }
                }
                // Overflow or watch errors: rescan everything.
                Err(e) => {
                    tracing::warn!(error = %e, "WatchError");
                    let _ = tx.send((root.clone(), None));
                }
            }
        })
        .context("starting the file watcher")?;
        w.watch(&config.drop_root, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", config.drop_root.display()))?;
        Some(w)
    };

    let settle = watch::Settle {
        unfinished: Duration::from_millis(config.settle_ms),
        closed: Duration::from_millis(config.closed_settle_ms),
    };
    let mut st = watch::Watch::default();
    // Watched folders and the inode each was watched at: a folder deleted and made again is
    // a new inode, and needs a new watch.
    let mut watched: HashMap<PathBuf, (u64, u64)> = HashMap::new();
    let mut tasks: JoinSet<(String, OsString, anyhow::Result<pipeline::Handled>)> = JoinSet::new();
    // Files an ingest moved into bak/ and died before recording: looked for once the
    // folders are open, at the first rescan.
    let mut archives_checked = false;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut rescan = tokio::time::interval(Duration::from_secs(config.rescan_secs.max(1)));
    tracing::info!("IngestReady");

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = rescan.tick() => {
                metrics::counter!("mui_ingest_rescans_total").increment(1);
                match refresh_tenants(&pool).await {
                    Ok(t) => st.tenants = t,
                    Err(e) => tracing::warn!(error = format!("{e:#}"), "TenantRefreshError"),
                }
                let slugs: Vec<String> = st.tenants.keys().cloned().collect();
                let mut changed = Vec::new();
                for slug in slugs {
                    let problem = st.scan(&config.drop_root, &slug);
                    // The tenant's folder too, so that a drop folder (re)created in it is
                    // noticed at once rather than at the next rescan. A folder is watched
                    // only once its handle opened without following a link.
                    let tenant_dir = config.drop_root.join(&slug);
                    let folder_path = tenants::drop_folder(&config.drop_root, &slug);
                    let folder_id = st.folders.get(&slug).map(|f| f.id());
                    if let Some(w) = watcher.as_mut() {
                        rewatch(w, &mut watched, &tenant_dir, dir_id(&tenant_dir), &slug);
                        rewatch(w, &mut watched, &folder_path, folder_id, &slug);
                    }
                    if st.folder_problems.get(&slug) != Some(&problem) {
                        match &problem {
                            Some(p) => tracing::warn!(tenant = %slug, problem = %p, "DropFolderProblem"),
                            None => tracing::info!(tenant = %slug, "DropFolderReadable"),
                        }
                        if let Some(t) = st.tenants.get(&slug) {
                            changed.push((t.id, folder_path.display().to_string(), problem.clone(), slug.clone()));
                        }
                    }
                }
                if !archives_checked {
                    match record_interrupted_archives(&pool, &st).await {
                        Ok(()) => archives_checked = true,
                        Err(e) => tracing::warn!(error = format!("{e:#}"), "ArchiveRecoveryError"),
                    }
                }
                // Registrations whose handling was cut and whose content is gone since.
                if let Err(e) = pipeline::orphans::recover(&ctx, &tenant_folders(&st)).await {
                    tracing::warn!(error = format!("{e:#}"), "OrphanRecoveryError");
                }
                for (tenant_id, path, problem, slug) in changed {
                    match record_folder_status(&pool, tenant_id, path, problem.clone()).await {
                        Ok(()) => { st.folder_problems.insert(slug, problem); }
                        Err(e) => tracing::warn!(error = format!("{e:#}"), "DropFolderStatusError"),
                    }
                }
            }
            Some((path, finish)) = events.recv() => {
                if let Some((slug, name)) = tenant_of(&config.drop_root, &path) {
                    if let Some(how) = finish {
                        // Closed after writing or renamed into place: taken now if no
                        // process still holds it open for writing, not at the next tick.
                        st.observe_finished(&slug, name.clone(), how);
                        st.settle_one(&slug, &name, Instant::now(), settle, openfiles::open_for_write);
                    } else {
                        st.observe(&slug, name);
                    }
                } else if path == config.drop_root
                    || path.parent() == Some(config.drop_root.as_path())
                    || path.parent().and_then(Path::parent) == Some(config.drop_root.as_path())
                {
                    // A tenant folder or a drop folder appeared or went, or the watch
                    // overflowed: rescan now.
                    rescan.reset_immediately();
                }
            }
            _ = tick.tick() => {
                if !conn.status().connected() {
                    // Publishing needs the broker: start over (the supervisor reconnects).
                    mui_shared::service::drain(&mut tasks, drop).await;
                    anyhow::bail!("lost the connection to RabbitMQ");
                }
                // One pass over /proc for the whole tick, and only if a candidate is due.
                let writers = std::cell::OnceCell::new();
                st.settle(Instant::now(), settle, |dev, ino| {
                    writers.get_or_init(openfiles::writers).contains(&(dev, ino))
                });
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                match done {
                    Ok((slug, name, result)) => {
                        let handled = result.as_ref().ok().copied();
                        if let Err(e) = result {
                            // Left in place: the next rescan tries again. A file that was
                            // moved to bak/ before the error (recording the move failed)
                            // is no longer in the folder to be tried again: the next
                            // rescan looks for such files, as at start.
                            archives_checked = false;
                            tracing::warn!(
                                tenant = %slug,
                                file = %folder::display_name(&name).0,
                                error = format!("{e:#}"),
                                "FileHandleError"
                            );
                        }
                        st.finished(&slug, name, handled);
                    }
                    Err(e) => tracing::error!(error = %e, "FileTaskPanicked"),
                }
            }
        }
        // Dispatch: one file per tenant at a time, oldest first, up to the concurrency limit.
        let free = config.concurrency.max(1).saturating_sub(tasks.len());
        for (tenant, folder, name) in st.next_ready(free) {
            let ctx = ctx.clone();
            tasks.spawn(async move {
                let result = pipeline::handle(&ctx, &tenant, folder, name.clone()).await;
                (tenant.slug.clone(), name, result)
            });
        }
    }
    tracing::info!(in_flight = tasks.len(), "IngestStopping");
    mui_shared::service::drain(&mut tasks, drop).await;
    drop(watcher);
    let _ = relay_task.await;
    ctx.publisher.close().await;
    let _ = conn.close(200, "shutdown".into()).await;
    Ok(())
}

/// Whether a file-system event says an upload finished: a writer closed the file, or it was
/// renamed into place (clients that upload under a temporary name and rename at the end).
fn upload_finished(kind: &notify::EventKind) -> Option<watch::Finish> {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(watch::Finish::Closed),
        EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)) => {
            Some(watch::Finish::Renamed)
        }
        _ => None,
    }
}

/// Whether an event only says that something was opened or read, or closed without being
/// written: inotify reports those too (notify watches `IN_OPEN`), and they change nothing in
/// a folder.
fn only_read(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => false,
        EventKind::Access(_) => true,
        _ => false,
    }
}

/// Device and inode of a folder (not followed if it is a link), if it is one.
fn dir_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| (m.dev(), m.ino()))
}

/// Keeps one inotify watch on `dir` as it is now (`now`: its device and inode, None if it
/// is gone): a folder deleted and made again is a new inode and needs a new watch.
fn rewatch(
    watcher: &mut notify::RecommendedWatcher,
    watched: &mut HashMap<PathBuf, (u64, u64)>,
    dir: &Path,
    now: Option<(u64, u64)>,
    slug: &str,
) {
    let was = watched.get(dir).copied();
    if was.is_some() && was != now {
        watched.remove(dir);
        let _ = watcher.unwatch(dir);
    }
    if let Some(id) = now {
        if !watched.contains_key(dir) {
            match watcher.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(dir.to_path_buf(), id);
                }
                Err(e) => tracing::warn!(error = %e, tenant = %slug, "WatchError"),
            }
        }
    }
}

/// Records the files that an ingest moved into `bak/` and then died before recording (the
/// one step of a file's handling that is not redone: the file is no longer in the drop
/// folder to be taken again). Such a file is past registration and queueing, its archive
/// name unknown, and its inode (from its arrival key) is in its tenant's `bak/` and not in the
/// drop folder. Run at start (an ingest that died in the window), and after a file's
/// handling failed (recording the move can fail, the database gone at that moment).
async fn record_interrupted_archives(pool: &db::PgPool, st: &watch::Watch) -> anyhow::Result<()> {
    use mui_shared::schema::import_files as f;
    let open: Vec<(i64, i64, String)> = db::run(pool, |conn| {
        Ok(f::table
            .filter(f::archived_name.is_null())
            .filter(f::state.ne("received"))
            .filter(f::arrival_key.not_like("%:special"))
            .select((f::id, f::tenant_id, f::arrival_key))
            .load(conn)?)
    })
    .await?;
    let folders = tenant_folders(st);
    for (id, tenant_id, key) in open {
        let Some(folder) = folders.get(&tenant_id).cloned() else {
            continue;
        };
        // tenant:dev:ino:mtime:size:sha256
        let part = |i: usize| key.split(':').nth(i).map(str::to_owned);
        let (Some(ino), Some(mtime), Some(size)) = (
            part(2).and_then(|i| i.parse::<u64>().ok()),
            part(3).and_then(|i| i.parse::<i64>().ok()),
            part(4).and_then(|i| i.parse::<u64>().ok()),
        ) else {
            continue;
        };
        let Some(name) =
            tokio::task::spawn_blocking(move || folder.archived_as(ino, mtime, size)).await?
        else {
            continue;
        };
        let file = mui_shared::domain::ImportFileId(id);
        let recorded = name.clone();
        db::run(pool, move |conn| {
            Ok(mui_shared::files::archived(conn, file, &recorded)?)
        })
        .await?;
        tracing::info!(file_id = id, archived = %name, "InterruptedArchiveRecorded");
    }
    Ok(())
}

/// Each tenant's drop folder that ingest has open, by tenant id.
fn tenant_folders(st: &watch::Watch) -> HashMap<i64, Arc<folder::TenantFolder>> {
    st.tenants
        .values()
        .filter_map(|t| Some((t.id, st.folders.get(&t.slug)?.clone())))
        .collect()
}

async fn refresh_tenants(pool: &db::PgPool) -> anyhow::Result<HashMap<String, Tenant>> {
    let list = db::run(pool, |conn| Ok(tenants::list(conn)?)).await?;
    Ok(list.into_iter().map(|t| (t.slug.clone(), t)).collect())
}

/// Records what ingest found in a tenant's drop folder, for the operator.
async fn record_folder_status(
    pool: &db::PgPool,
    tenant_id: i64,
    path: String,
    problem: Option<String>,
) -> anyhow::Result<()> {
    use mui_shared::schema::drop_folder_status as dfs;
    db::run(pool, move |conn| {
        diesel::insert_into(dfs::table)
            .values((
                dfs::tenant_id.eq(tenant_id),
                dfs::path.eq(&path),
                dfs::problem.eq(&problem),
            ))
            .on_conflict(dfs::tenant_id)
            .do_update()
            .set((
                dfs::path.eq(&path),
                dfs::problem.eq(&problem),
                dfs::since.eq(diesel::dsl::now),
            ))
            .execute(conn)?;
        Ok(())
    })
    .await?;
    Ok(())
}

/// The tenant whose drop folder holds `path` (`DROP_ROOT/<tenant>/upload/<name>`), and the
/// entry's name (bytes: a name need not be UTF-8).
fn tenant_of(drop_root: &Path, path: &Path) -> Option<watch::Entry> {
    let name = path.file_name()?;
    let folder = path.parent()?;
    if folder.file_name()? != tenants::DROP_SUBDIR {
        return None;
    }
    let tenant_dir = folder.parent()?;
    if tenant_dir.parent()? != drop_root {
        return None;
    }
    let slug = tenant_dir.file_name()?.to_str()?.to_owned();
    Some((slug, name.to_os_string()))
}
