//! # ingest
//!
//! Watches every tenant's drop folder, `DROP_ROOT/<tenant>/upload/`
//! ([`mui_shared::tenants::drop_folder`]), and hands each finished upload to the workers.
//! `DROP_ROOT/<tenant>/` is the tenant's SFTP chroot (see `deploy/sftp/`). A newcomer's map:
//!
//! - [`run`] (this file): the watch loop. File-system events (inotify through `notify`) and a
//!   periodic rescan feed *candidates*; a candidate becomes *ready* once its size, mtime and
//!   inode stayed the same for the settle interval and no process holds it open for writing
//!   ([`openfiles`]). Temporary upload names (`*.filepart`, `*.part`, `*.tmp`, dot-files)
//!   are left alone. Files of one tenant are handled one at a time, oldest first, so they
//!   take effect in arrival order.
//! - [`pipeline`]: one ready file: register → publish its rows as chunks → move to `bak/`.
//! - [`reader`]: encoding detection, CSV decoding, chunking (a file event becomes
//!   [`mui_shared::messages::Chunk`]s here).
//! - [`archive`]: `bak/` without overwriting.

pub mod archive;
pub mod openfiles;
pub mod pipeline;
pub mod reader;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
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
    /// How long a file must stay unchanged (size, mtime) before it is taken, in milliseconds.
    #[arg(long, env = "INGEST_SETTLE_MS", default_value_t = 1000)]
    pub settle_ms: u64,
    /// How often every drop folder is rescanned (the safety net for missed events), seconds.
    #[arg(long, env = "INGEST_RESCAN_SECS", default_value_t = 10)]
    pub rescan_secs: u64,
    /// Do not use file-system events; only rescan (for network file systems), every
    /// INGEST_RESCAN_SECS.
    #[arg(long, env = "INGEST_POLL_ONLY", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub poll_only: bool,
    /// Rows per chunk message.
    #[arg(long, env = "CHUNK_ROWS", default_value_t = 5000)]
    pub chunk_rows: usize,
    /// Files handled at once (of different tenants).
    #[arg(long, env = "INGEST_CONCURRENCY", default_value_t = 4)]
    pub concurrency: usize,
    /// Largest file accepted, in bytes; a larger one is refused with a clear report.
    #[arg(long, env = "MAX_FILE_BYTES", default_value_t = 1 << 30)]
    pub max_file_bytes: u64,
    /// Most rows accepted in one file.
    #[arg(long, env = "MAX_FILE_ROWS", default_value_t = 5_000_000)]
    pub max_file_rows: u64,
}

/// Identity of a directory entry as last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Signature {
    ino: u64,
    dev: u64,
    size: u64,
    mtime_ns: i64,
    nlink: u64,
    regular: bool,
}

impl Signature {
    fn of(path: &Path) -> Option<Signature> {
        let m = std::fs::symlink_metadata(path).ok()?;
        Some(Signature {
            ino: m.ino(),
            dev: m.dev(),
            size: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            nlink: m.nlink(),
            regular: m.file_type().is_file(),
        })
    }
}

#[derive(Debug)]
struct Candidate {
    sig: Signature,
    since: Instant,
}

/// Runs ingest until `shutdown`: files being handled are finished first.
pub async fn run(config: IngestConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    tracing::info!(
        database = %redact_url(&config.common.database_url),
        amqp = %redact_url(&config.common.amqp_url),
        drop_root = %config.drop_root.display(),
        "IngestConfigured"
    );
    let pool = db::pool(&config.common.database_url, (config.concurrency as u32) + 4);
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
        chunk_rows: config.chunk_rows.max(1),
        limits: reader::Limits {
            max_bytes: config.max_file_bytes,
            max_rows: config.max_file_rows,
        },
    });

    let (events_tx, mut events) = mpsc::unbounded_channel::<PathBuf>();
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
                        let _ = tx.send(root.clone());
                    }
                    for p in ev.paths {
                        let _ = tx.send(p);
                    }
                }
                // Overflow or watch errors: rescan everything.
                Err(e) => {
                    tracing::warn!(error = %e, "WatchError");
                    let _ = tx.send(root.clone());
                }
            }
        })
        .context("starting the file watcher")?;
        w.watch(&config.drop_root, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", config.drop_root.display()))?;
        Some(w)
    };

    let settle = Duration::from_millis(config.settle_ms);
    let mut tenants: HashMap<String, Tenant> = HashMap::new();
    // Watched folders and the inode each was watched at: a folder deleted and made again is
    // a new inode, and needs a new watch.
    let mut watched: HashMap<PathBuf, (u64, u64)> = HashMap::new();
    let mut candidates: HashMap<PathBuf, Candidate> = HashMap::new();
    // Ready files per tenant, oldest mtime first.
    let mut ready: HashMap<String, BTreeMap<(i64, PathBuf), ()>> = HashMap::new();
    let mut busy: HashSet<String> = HashSet::new();
    let mut in_flight: HashSet<PathBuf> = HashSet::new();
    let mut tasks: JoinSet<(String, PathBuf, anyhow::Result<()>)> = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut rescan = tokio::time::interval(Duration::from_secs(config.rescan_secs.max(1)));
    tracing::info!("IngestReady");

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = rescan.tick() => {
                match refresh_tenants(&pool).await {
                    Ok(t) => tenants = t,
                    Err(e) => tracing::warn!(error = format!("{e:#}"), "TenantRefreshError"),
                }
                for slug in tenants.keys() {
                    // The tenant's folder too, so that a drop folder (re)created in it is
                    // noticed at once rather than at the next rescan.
                    let tenant_dir = config.drop_root.join(slug);
                    let folder = tenants::drop_folder(&config.drop_root, slug);
                    for dir in [&tenant_dir, &folder] {
                        let now_id = std::fs::metadata(dir)
                            .ok()
                            .filter(|m| m.is_dir())
                            .map(|m| (m.dev(), m.ino()));
                        let was = watched.get(dir).copied();
                        if was.is_some() && was != now_id {
                            // Deleted (and perhaps made again): drop the old watch.
                            watched.remove(dir);
                            if let Some(w) = watcher.as_mut() { let _ = w.unwatch(dir); }
                        }
                        if let (Some(w), Some(id)) = (watcher.as_mut(), now_id) {
                            if !watched.contains_key(dir) {
                                match w.watch(dir, RecursiveMode::NonRecursive) {
                                    Ok(()) => { watched.insert(dir.clone(), id); }
                                    Err(e) => tracing::warn!(error = %e, tenant = %slug, "WatchError"),
                                }
                            }
                        }
                    }
                    if folder.is_dir() {
                        scan_folder(&folder, &mut candidates, &in_flight);
                    }
                }
            }
            Some(path) = events.recv() => {
                if tenant_of(&config.drop_root, &path).is_some() {
                    observe(&path, &mut candidates, &in_flight);
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
                    while tasks.join_next().await.is_some() {}
                    anyhow::bail!("lost the connection to RabbitMQ");
                }
                let now = Instant::now();
                let mut became_ready = Vec::new();
                candidates.retain(|path, cand| {
                    let Some(sig) = Signature::of(path) else { return false };
                    if sig != cand.sig {
                        cand.sig = sig;
                        cand.since = now;
                        return true;
                    }
                    if sig.regular && now.duration_since(cand.since) < settle {
                        return true;
                    }
                    if sig.regular && openfiles::open_for_write(sig.dev, sig.ino) {
                        cand.since = now; // still being written; look again after settle
                        return true;
                    }
                    became_ready.push((path.clone(), sig.mtime_ns));
                    false
                });
                for (path, mtime) in became_ready {
                    if let Some(slug) = tenant_of(&config.drop_root, &path) {
                        ready.entry(slug).or_default().insert((mtime, path), ());
                    }
                }
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                match done {
                    Ok((slug, path, result)) => {
                        busy.remove(&slug);
                        in_flight.remove(&path);
                        if let Err(e) = result {
                            // Left in place: the next rescan tries again.
                            tracing::warn!(tenant = %slug, error = format!("{e:#}"), "FileHandleError");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "FileTaskPanicked"),
                }
            }
        }
        // Dispatch: one file per tenant at a time, oldest first, up to the concurrency limit.
        let slugs: Vec<String> = ready.keys().cloned().collect();
        for slug in slugs {
            if tasks.len() >= config.concurrency.max(1) {
                break;
            }
            if busy.contains(&slug) {
                continue;
            }
            let Some(queue) = ready.get_mut(&slug) else {
                continue;
            };
            let Some(((_, path), ())) = queue.pop_first() else {
                continue;
            };
            if queue.is_empty() {
                ready.remove(&slug);
            }
            let Some(tenant) = tenants.get(&slug).cloned() else {
                tracing::warn!(tenant = %slug, "FileForUnknownTenant");
                continue;
            };
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            busy.insert(slug.clone());
            in_flight.insert(path.clone());
            let ctx = ctx.clone();
            let folder = tenants::drop_folder(&config.drop_root, &slug);
            tasks.spawn(async move {
                let result = pipeline::handle(&ctx, &tenant, &folder, &name).await;
                (slug, path, result)
            });
        }
    }
    tracing::info!(in_flight = tasks.len(), "IngestStopping");
    while tasks.join_next().await.is_some() {}
    drop(watcher);
    let _ = relay_task.await;
    ctx.publisher.close().await;
    let _ = conn.close(200, "shutdown".into()).await;
    Ok(())
}

async fn refresh_tenants(pool: &db::PgPool) -> anyhow::Result<HashMap<String, Tenant>> {
    let list = db::run(pool, |conn| Ok(tenants::list(conn)?)).await?;
    Ok(list.into_iter().map(|t| (t.slug.clone(), t)).collect())
}

/// The tenant whose drop folder holds `path` (`DROP_ROOT/<tenant>/upload/<name>`).
fn tenant_of(drop_root: &Path, path: &Path) -> Option<String> {
    let folder = path.parent()?;
    if folder.file_name()? != tenants::DROP_SUBDIR {
        return None;
    }
    let tenant_dir = folder.parent()?;
    if tenant_dir.parent()? != drop_root {
        return None;
    }
    tenant_dir.file_name()?.to_str().map(str::to_owned)
}

fn observe(
    path: &Path,
    candidates: &mut HashMap<PathBuf, Candidate>,
    in_flight: &HashSet<PathBuf>,
) {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    if name == "bak" || pipeline::is_temporary(name) || in_flight.contains(path) {
        return;
    }
    if candidates.contains_key(path) {
        return; // the tick notices the change itself
    }
    if let Some(sig) = Signature::of(path) {
        candidates.insert(
            path.to_path_buf(),
            Candidate {
                sig,
                since: Instant::now(),
            },
        );
    }
}

fn scan_folder(
    folder: &Path,
    candidates: &mut HashMap<PathBuf, Candidate>,
    in_flight: &HashSet<PathBuf>,
) {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    for entry in entries.flatten() {
        observe(&entry.path(), candidates, in_flight);
    }
}
