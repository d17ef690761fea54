//! Handling one file that is ready: register it, hand its rows to the workers, archive it.
//!
//! Crash safety comes from the order of steps and from the file's *arrival key* (tenant,
//! device, inode, mtime, size, content hash), unique in `import_files`:
//! 1. register (insert-or-find by arrival key) and take a PostgreSQL advisory lock on the
//!    file's id for the duration (a second ingest process skips a locked file; a dead one's
//!    lock dies with its connection);
//! 2. while the file is `received`: make sure `bak/` is a real folder (a link is set aside,
//!    with a notice), read the whole file once without publishing so that any file-level
//!    problem fails it before a row is sent, then publish all its chunks with confirms, cut
//!    as fixed at registration, and record the totals (state `importing`, or `done` if the
//!    workers already finished every chunk); a crash before that re-publishes every chunk,
//!    which workers recognise and skip;
//! 3. move it into `bak/` by inode ([`TenantFolder::archive`]: retry-safe, never
//!    overwriting, and a re-upload under the same name is left to be imported next).
//!
//! A file still in the folder whose arrival key is already past step 2 only gets step 3, so a
//! restart never imports a file twice; a re-upload has a new mtime, so it is a new import.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::sync::Arc;

use anyhow::Context as _;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool};
use mui_shared::amqp::{Publisher, QueueKind};
use mui_shared::db::{self, PgPool};
use mui_shared::dispatch;
use mui_shared::domain::{ImportFileId, TenantId};
use mui_shared::ending;
use mui_shared::files::{self, FileState};
use mui_shared::messages::{self, Chunk, ChunkRef, FileErrorCode, WorkMessage};
use mui_shared::otel::{self, TraceContext};
use mui_shared::outbox::Kick;
use mui_shared::schema::import_files;
use mui_shared::tenants::Tenant;
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::folder::{self, Signature, TenantFolder};
use crate::reader::{self, Chunking, FileProblem, Sniff};

pub mod orphans;
mod publish;
mod repeats;
mod state;

pub use publish::QUEUE_WINDOW;
use publish::{publish_rows, validate_whole, Validated};
use state::{add_notice, adopt_trace, current_state, fail, register, FileLock};

/// What the pipeline needs.
#[derive(Debug, Clone)]
pub struct Context {
    /// Pool for short queries.
    pub pool: PgPool,
    /// URL for the per-file lock connection.
    pub database_url: String,
    /// Confirm-mode publisher.
    pub publisher: Publisher,
    /// Wakes the outbox relay.
    pub kick: Kick,
    /// How new files are cut into chunks (fixed per file when it is registered).
    pub chunking: Chunking,
    /// Size and row limits of an uploaded file.
    pub limits: reader::Limits,
    /// Pause points for tests.
    pub hooks: Hooks,
    /// How chunks reach the workers.
    pub dispatch: ChunkDispatch,
    /// Registered files whose handling failed with an error that does not pass: how often
    /// in a row, and since when ([`GIVE_UP_AFTER`]).
    pub persistent_failures:
        Arc<std::sync::Mutex<std::collections::HashMap<ImportFileId, (u32, std::time::Instant)>>>,
}

/// How many times in a row, over at least [`GIVE_UP_SPAN`], handling a registered file may
/// fail with an error that does not pass (the database refusing what it was given, a panic,
/// a message that cannot be written) before the file is ended as `internal_error`: every
/// file ends, and none holds back its tenant's later files for good. Outages (connections,
/// the broker) do not count, and the span outlasts a database's restart.
pub const GIVE_UP_AFTER: u32 = 3;

/// See [`GIVE_UP_AFTER`].
pub const GIVE_UP_SPAN: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether `e` is an error that retrying the same file will meet again: the database
/// refused the statement itself (not the connection), a value could not be encoded, or a
/// step panicked.
fn persistent(e: &anyhow::Error) -> bool {
    for cause in e.chain() {
        if let Some(db) = cause.downcast_ref::<db::DbError>() {
            return !db::is_transient(db);
        }
        if let Some(q) = cause.downcast_ref::<diesel::result::Error>() {
            return !db::is_transient_query(q);
        }
        if cause.is::<serde_json::Error>() {
            return true;
        }
        if let Some(j) = cause.downcast_ref::<tokio::task::JoinError>() {
            return j.is_panic();
        }
    }
    false
}

/// How chunks reach the workers (`CHUNK_DISPATCH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ChunkDispatch {
    /// Queued in PostgreSQL; the workers' dispatcher hands them out fairly.
    Fair,
    /// Published straight to the broker, first come first served.
    Direct,
}

/// Whether `name` asks for a dry run: it ends in `.validate.csv` (any case). Such a file is
/// checked exactly as an import would check it and changes nothing.
pub fn is_dry_run(name: &str) -> bool {
    name.to_lowercase().ends_with(".validate.csv")
}

/// Whether `name` is a temporary upload name left alone until renamed.
pub fn is_temporary(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    name.starts_with('.')
        || lower.ends_with(".filepart")
        || lower.ends_with(".part")
        || lower.ends_with(".tmp")
}

/// Points where a test can hold ingest to act in a precise window (a re-upload while a
/// file is being imported, a kill between two steps). Empty in production: a pause that no
/// one listens to is skipped.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Receives `(point, file name, resume)` at each pause point; ingest waits until
    /// `resume` is sent (or dropped).
    pub pauses: Option<tokio::sync::mpsc::UnboundedSender<Pause>>,
}

/// One pause: the point's name, the file's name, and the sender that lets ingest go on.
pub type Pause = (&'static str, String, tokio::sync::oneshot::Sender<()>);

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("pauses", &self.pauses.is_some())
            .finish()
    }
}

impl Hooks {
    async fn pause(&self, point: &'static str, name: &str) {
        if let Some(tx) = &self.pauses {
            let (resume, wait) = tokio::sync::oneshot::channel();
            if tx.send((point, name.to_owned(), resume)).is_ok() {
                let _ = wait.await;
            }
        }
    }
}

/// What handling an entry did with it, as far as watching the folder is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Imported, failed, moved, or put off (locked by another ingest, replaced or renamed
    /// meanwhile): if the name is still there, it is looked at again.
    Done,
    /// Reported and left where it is by design: not looked at again until it changes.
    Left,
}

/// Handles the entry `name` of `tenant`'s drop folder: every file-system operation goes
/// through `folder`'s handle, never through a path a tenant could redirect.
pub async fn handle(
    ctx: &Context,
    tenant: &Tenant,
    folder: Arc<TenantFolder>,
    name: OsString,
) -> anyhow::Result<Handled> {
    let (display, escaped) = folder::display_name(&name);
    let meta = match folder.stat(&name) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Handled::Done),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("stat {display:?} in {}", folder.path().display()))
        }
    };
    if !meta.regular() {
        handle_not_regular(ctx, tenant, &display, meta.kind.describe(), &meta).await?;
        return Ok(Handled::Left);
    }
    let file = match folder.open_file(&name) {
        Ok(f) => f,
        // The tenant changed the file's permissions so that ingest may not read it.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            let problem = FileProblem {
                code: FileErrorCode::Unreadable,
                message: format!(
                    "{display:?} cannot be read by the import service: its permissions were changed (mode {:o}); upload it again without changing them",
                    meta.mode
                ),
            };
            report_unopened(ctx, tenant, &display, &meta, &problem).await?;
            return Ok(Handled::Left);
        }
        // Replaced by a link or removed since the stat: the next scan sees what is there.
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ELOOP) => {
            return Ok(Handled::Done)
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("open {display:?} in {}", folder.path().display()))
        }
    };
    let fmeta = Signature::of_file(&file)?;
    // Taken before the first byte is read: a write into the file after this shows in it.
    let stamp = publish::Stamp::of(&file)?;
    if !fmeta.regular() || fmeta.ino != meta.ino {
        return Ok(Handled::Done); // Replaced under us; the next scan sees the new entry.
    }
    if fmeta.nlink > 1 {
        match other_names(&folder, &name, fmeta.ino) {
            // OpenSSH renames by link + unlink: the temporary name is about to go.
            OtherNames::RenameInProgress => return Ok(Handled::Done),
            // All names are the tenant's: the file is registered once by its content and
            // inode, whichever name is handled first.
            OtherNames::InOwnFolder => {}
            OtherNames::Elsewhere => {
                handle_not_regular(
                    ctx,
                    tenant,
                    &display,
                    "a hard link to a file outside this folder",
                    &meta,
                )
                .await?;
                return Ok(Handled::Left);
            }
        }
    }
    // The tenant's settings as they are now (the watcher's copy is refreshed only every
    // rescan): its region (the encoding detector's hint), header names and guard.
    let tid = tenant.tenant_id();
    let fresh = db::run(&ctx.pool, move |conn| {
        Ok(mui_shared::tenants::find(conn, tid)?)
    })
    .await?
    .unwrap_or_else(|| tenant.clone());
    let mut for_sniff = file.try_clone()?;
    let region = fresh.region.clone();
    let sniff =
        tokio::task::spawn_blocking(move || reader::sniff(&mut for_sniff, region.as_deref()))
            .await?
            .with_context(|| format!("read {display:?}"))?;
    // A dry run is a registration of its own: the same upload renamed from `x.validate.csv`
    // to `x.csv` while ingest handles it (or back) is checked under one name and imported
    // under the other, never taken for the one it was before. Any other rename keeps the key.
    let arrival_key = format!(
        "{}:{}:{}:{}:{}:{}{}",
        tenant.id,
        fmeta.dev,
        fmeta.ino,
        fmeta.mtime_ns,
        sniff.size,
        sniff.sha256,
        if is_dry_run(&display) { ":dry-run" } else { "" }
    );
    let registered = register(ctx, tenant.tenant_id(), &display, &arrival_key, &sniff).await?;
    let file_id = registered.id;
    if registered.new {
        metrics::counter!("mui_files_received_total", "tenant" => tenant.slug.clone()).increment(1);
    }
    // The file's trace: this span is its root (or continues it, for a file handled again).
    let span = tracing::info_span!(
        "file.ingest",
        tenant_id = tenant.id,
        tenant = %tenant.slug,
        file_id = file_id.0,
        mui.file.bytes = sniff.size as i64,
        mui.file.new = registered.new,
        otel.kind = "producer",
    );
    adopt_trace(&ctx.pool, file_id, &span).await?;
    let result = async move {
        let Some(lock) = FileLock::try_acquire(&ctx.database_url, file_id).await? else {
            tracing::debug!("FileLockedElsewhere");
            return Ok(false); // not handled here: says nothing of its failures
        };
        let state = current_state(&ctx.pool, file_id).await?;
        if state == FileState::Received {
            if escaped {
                add_notice(
                    &ctx.pool,
                    file_id,
                    format!(
                        "The file's name is not valid UTF-8 (your SFTP client sent it in another character set); it is shown here and kept in bak/ as {display:?}, each byte that is not UTF-8 written as %XX"
                    ),
                )
                .await?;
            }
            // A close call made without a region: the tenant is told which other reading
            // there was.
            if let Some(other) = sniff.unhinted_guess {
                add_notice(
                    &ctx.pool,
                    file_id,
                    format!(
                        "The file is not UTF-8; it was read as {} (what Excel writes in Western Europe and the Americas). Its text could also be {}: if names in it look wrong, save it as \"CSV UTF-8\" (or ask for your region to be set) and upload it again",
                        sniff.encoding.name(),
                        other.name()
                    ),
                )
                .await?;
            }
            // Settle bak/ before any row is published, so that what the tenant must know
            // about it is in the report.
            let f = folder.clone();
            if let Some(notice) = tokio::task::spawn_blocking(move || f.prepare_bak(file_id.0))
                .await?
                .context("preparing bak/")?
            {
                add_notice(&ctx.pool, file_id, notice).await?;
            }
            if !display.to_ascii_lowercase().ends_with(".csv") {
                let problem = FileProblem {
                    code: FileErrorCode::NotCsvName,
                    message: format!(
                        "only .csv files are imported, and {display:?} does not end in .csv; save the users as CSV and upload that file"
                    ),
                };
                fail(ctx, file_id, tenant, &problem, Some(&sniff)).await?;
            } else {
                let chunking = registered.chunking;
                let dry_run = is_dry_run(&display);
                if dry_run {
                    db::run(&ctx.pool, move |conn| {
                        Ok(diesel::update(
                            mui_shared::schema::import_files::table.find(file_id.0),
                        )
                        .set(mui_shared::schema::import_files::dry_run.eq(true))
                        .execute(conn)
                        .map(|_| ())?)
                    })
                    .await?;
                }
                let aliases = mui_shared::tenants::header_aliases(&fresh);
                // A dry run is never held, but says whether its import would be.
                let guarded = mui_shared::holds::Guard::of(&fresh).on();
                let read = tracing::info_span!("file.read", mui.file.bytes = sniff.size as i64);
                match validate_whole(&file, &sniff, ctx.limits, chunking, aliases.clone(), guarded)
                    .instrument(read)
                    .await?
                {
                    Validated::Problem(problem) => {
                        fail(ctx, file_id, tenant, &problem, Some(&sniff)).await?;
                    }
                    Validated::Changed => {
                        let problem = FileProblem {
                            code: FileErrorCode::Unreadable,
                            message: "the file changed while it was being read; nothing of this version was imported, and its new content is imported as a new upload".into(),
                        };
                        fail(ctx, file_id, tenant, &problem, Some(&sniff)).await?;
                        lock.release().await;
                        return Ok(true);
                    }
                    Validated::Good {
                        repeats,
                        deactivating,
                    } => {
                        let held = if guarded && dry_run {
                            let t = fresh.clone();
                            let notice = db::run(&ctx.pool, move |conn| {
                                Ok(mui_shared::holds::assess(conn, &t, &deactivating)?
                                    .map(|(would, active)| {
                                        mui_shared::holds::dry_run_notice(&t, would.len(), active)
                                    }))
                            })
                            .await?;
                            if let Some(notice) = notice {
                                add_notice(&ctx.pool, file_id, notice).await?;
                            }
                            false
                        } else if guarded {
                            let t = fresh.clone();
                            let check = db::run(&ctx.pool, move |conn| {
                                Ok(mui_shared::holds::evaluate(conn, &t, file_id, &deactivating)?)
                            })
                            .await?;
                            if let mui_shared::holds::Check::Held { would, active } = check {
                                tracing::warn!(would, active, "FileHeldByGuard");
                            }
                            check != mui_shared::holds::Check::Pass
                        } else {
                            false
                        };
                        ctx.hooks.pause("ingest.before_publish", &display).await;
                        mui_shared::failpoint::stop("ingest.after_register");
                        let mode = publish::Mode {
                            held,
                            dry_run,
                            aliases,
                            stamp,
                        };
                        let chunked = tracing::info_span!(
                            "file.chunk",
                            mui.dispatch = ?ctx.dispatch,
                            mui.rows = tracing::field::Empty,
                            mui.chunks = tracing::field::Empty,
                        );
                        publish_rows(
                            ctx, tenant, file_id, &file, &sniff, chunking, &display, &mode,
                            repeats,
                        )
                        .instrument(chunked)
                        .await?;
                    }
                }
            }
        }
        ctx.hooks.pause("ingest.before_archive", &display).await;
        mui_shared::failpoint::stop("ingest.before_archive");
        // Written to in place since it was first read (an SFTP client uploading the same name
        // again without a temporary name): what is in the file now is a new upload, to be
        // imported next, so it is not moved; the version read is not kept anywhere.
        if publish::Stamp::of(&file)? != stamp {
            add_notice(
                &ctx.pool,
                file_id,
                "The file was uploaded again under the same name, into the same file, while this version was being handled: this version could not be kept in bak/, and the new content is imported as a new upload".to_owned(),
            )
            .await?;
            tracing::warn!("FileOverwrittenInPlace");
            lock.release().await;
            return Ok(true);
        }
        let f = folder.clone();
        let owned_name = name.clone();
        let archive_name = display.clone();
        let (archived, notice) = tokio::task::spawn_blocking(move || {
            f.archive(&owned_name, &file, &archive_name, file_id.0)
        })
        .await?
        .with_context(|| format!("move {display:?} to bak/"))?;
        mui_shared::failpoint::stop("ingest.after_archive");
        if let Some(notice) = notice {
            add_notice(&ctx.pool, file_id, notice).await?;
        }
        db::run(&ctx.pool, move |conn| Ok(files::archived(conn, file_id, &archived)?)).await?;
        tracing::info!("FileArchived");
        lock.release().await;
        Ok(true)
    }
    .instrument(span.clone())
    .await;
    match &result {
        Err(e) => {
            otel::set_error(&span, format!("{e:#}"));
            give_up_if_persistent(ctx, tenant, file_id, e).await;
        }
        // Handled to its end: its failures in a row are over. Not so when another
        // connection held its lock: often only the last failed try's own connection, not yet
        // closed by the server, and taking that for a success kept a file that always fails
        // from ever being given up (its tenant's later files waiting behind it for good).
        Ok(true) => forget_failures(ctx, file_id),
        Ok(false) => {}
    }
    result.map(|_| Handled::Done)
}

fn forget_failures(ctx: &Context, file_id: ImportFileId) {
    if let Ok(mut m) = ctx.persistent_failures.lock() {
        m.remove(&file_id);
    }
}

/// Counts a persistent failure of `file_id`'s handling; at [`GIVE_UP_AFTER`] in a row over
/// [`GIVE_UP_SPAN`] a file not yet queued whole is ended as `orphans::end` ends one whose
/// content is gone (failed as `internal_error`, or what was queued of it kept, with a
/// notice), so its next handling only archives it; the report and the operator's file list
/// say what went wrong.
async fn give_up_if_persistent(
    ctx: &Context,
    tenant: &Tenant,
    file_id: ImportFileId,
    e: &anyhow::Error,
) {
    if !persistent(e) {
        return;
    }
    let (count, since) = match ctx.persistent_failures.lock() {
        Ok(mut m) => {
            let entry = m.entry(file_id).or_insert((0, std::time::Instant::now()));
            entry.0 += 1;
            *entry
        }
        Err(_) => return,
    };
    if count < GIVE_UP_AFTER || since.elapsed() < GIVE_UP_SPAN {
        return;
    }
    let cause = format!("{e:#}");
    tracing::error!(file_id = file_id.0, error = %cause, "FileGivenUp");
    let Ok(Some(lock)) = FileLock::try_acquire(&ctx.database_url, file_id).await else {
        return; // another ingest has it now
    };
    let why = ending::Ending::GaveUp(messages::truncate_for_message(&cause, 200));
    let tenant_id = tenant.tenant_id();
    let ended = db::run(&ctx.pool, move |conn| {
        Ok(conn.transaction(|conn| {
            // Only a file still not queued whole: one that got past may end by its chunks.
            if files::state_of(conn, file_id)? != FileState::Received {
                return Ok(None);
            }
            ending::end(conn, file_id, tenant_id, &why).map(Some)
        })?)
    })
    .await;
    lock.release().await;
    match ended {
        Ok(_) => {
            forget_failures(ctx, file_id);
            ctx.kick.kick();
        }
        Err(e) => tracing::warn!(error = format!("{e:#}"), "FileGiveUpError"),
    }
}

enum OtherNames {
    RenameInProgress,
    InOwnFolder,
    Elsewhere,
}

/// Where the other names of a file with several hard links are: a temporary name beside it
/// (an OpenSSH rename, done as link + unlink, is under way), another name in the tenant's
/// own folder or its `bak/` (the tenant's own link, or an older version's interrupted move
/// to `bak/`), or somewhere we cannot see: outside the tenant's folder.
fn other_names(folder: &TenantFolder, name: &OsStr, ino: u64) -> OtherNames {
    let beside: Vec<OsString> = folder
        .entries()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.as_os_str() != name)
        .filter(|n| folder.stat(n).is_ok_and(|s| s.ino == ino && s.regular()))
        .collect();
    if beside
        .iter()
        .any(|n| is_temporary(&folder::display_name(n).0))
    {
        OtherNames::RenameInProgress
    } else if !beside.is_empty() || folder.bak_holds(ino) {
        OtherNames::InOwnFolder
    } else {
        OtherNames::Elsewhere
    }
}

/// Symlinks, FIFOs, devices, directories, and regular files that are also linked from outside
/// the drop folder: never opened or followed (nor read); reported once (their arrival key is
/// their inode and mtime) and left where they are.
async fn handle_not_regular(
    ctx: &Context,
    tenant: &Tenant,
    name: &str,
    kind: &str,
    meta: &Signature,
) -> anyhow::Result<()> {
    let problem = FileProblem {
        code: FileErrorCode::NotRegularFile,
        message: format!(
            "{name:?} is {kind}; only regular .csv files uploaded into this folder are imported, and it was left untouched (links are never followed)"
        ),
    };
    report_unopened(ctx, tenant, name, meta, &problem).await
}

/// Reports an entry that is not opened (or cannot be) once, keyed on its inode and mtime, and
/// leaves it where it is.
async fn report_unopened(
    ctx: &Context,
    tenant: &Tenant,
    name: &str,
    meta: &Signature,
    problem: &FileProblem,
) -> anyhow::Result<()> {
    let arrival_key = format!(
        "{}:{}:{}:{}:special",
        tenant.id, meta.dev, meta.ino, meta.mtime_ns
    );
    let sniff = Sniff {
        sha256: String::new(),
        size: 0,
        encoding: encoding_rs::UTF_8,
        bom: false,
        binary: None,
        rows_at_most: None,
        long_line: None,
        broken_utf8: None,
        unhinted_guess: None,
    };
    let registered = register(ctx, tenant.tenant_id(), name, &arrival_key, &sniff).await?;
    if registered.new {
        metrics::counter!("mui_files_received_total", "tenant" => tenant.slug.clone()).increment(1);
    }
    if current_state(&ctx.pool, registered.id).await? == FileState::Received {
        fail(ctx, registered.id, tenant, problem, None).await?;
    }
    Ok(())
}
