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
use mui_shared::domain::{ImportFileId, TenantId};
use mui_shared::messages::{self, Chunk, FileErrorCode, FileFinished, NotifyMessage, WorkMessage};
use mui_shared::outbox::{self, Kick};
use mui_shared::schema::import_files;
use mui_shared::tenants::Tenant;
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::folder::{self, Signature, TenantFolder};
use crate::reader::{self, Chunking, FileProblem, Sniff};

/// Chunks in flight (published, confirm not yet awaited) per file.
const CONFIRM_WINDOW: usize = 8;

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

/// Handles the entry `name` of `tenant`'s drop folder: every file-system operation goes
/// through `folder`'s handle, never through a path a tenant could redirect.
pub async fn handle(
    ctx: &Context,
    tenant: &Tenant,
    folder: Arc<TenantFolder>,
    name: OsString,
) -> anyhow::Result<()> {
    let (display, escaped) = folder::display_name(&name);
    let meta = match folder.stat(&name) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("stat {display:?} in {}", folder.path().display()))
        }
    };
    if !meta.regular() {
        return handle_not_regular(ctx, tenant, &display, meta.kind.describe(), &meta).await;
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
            return report_unopened(ctx, tenant, &display, &meta, &problem).await;
        }
        // Replaced by a link or removed since the stat: the next scan sees what is there.
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ELOOP) => {
            return Ok(())
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("open {display:?} in {}", folder.path().display()))
        }
    };
    let fmeta = Signature::of_file(&file)?;
    if !fmeta.regular() || fmeta.ino != meta.ino {
        return Ok(()); // Replaced under us; the next scan sees the new entry.
    }
    if fmeta.nlink > 1 {
        match other_names(&folder, &name, fmeta.ino) {
            // OpenSSH renames by link + unlink: the temporary name is about to go.
            OtherNames::RenameInProgress => return Ok(()),
            // All names are the tenant's: the file is registered once by its content and
            // inode, whichever name is handled first.
            OtherNames::InOwnFolder => {}
            OtherNames::Elsewhere => {
                return handle_not_regular(
                    ctx,
                    tenant,
                    &display,
                    "a hard link to a file outside this folder",
                    &meta,
                )
                .await;
            }
        }
    }
    let mut for_sniff = file.try_clone()?;
    let sniff = tokio::task::spawn_blocking(move || reader::sniff(&mut for_sniff))
        .await?
        .with_context(|| format!("read {display:?}"))?;
    let arrival_key = format!(
        "{}:{}:{}:{}:{}:{}",
        tenant.id, fmeta.dev, fmeta.ino, fmeta.mtime_ns, sniff.size, sniff.sha256
    );
    let registered = register(ctx, tenant.tenant_id(), &display, &arrival_key, &sniff).await?;
    let file_id = registered.id;
    let span = tracing::info_span!(
        "import_file",
        tenant_id = tenant.id,
        tenant = %tenant.slug,
        file_id = file_id.0
    );
    async move {
        let Some(lock) = FileLock::try_acquire(&ctx.database_url, file_id).await? else {
            tracing::debug!("FileLockedElsewhere");
            return Ok(());
        };
        let state = current_state(&ctx.pool, file_id).await?;
        if state == "received" {
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
                fail(ctx, file_id, tenant.tenant_id(), &problem, Some(&sniff)).await?;
            } else {
                let chunking = registered.chunking;
                match validate_whole(&file, &sniff, ctx.limits, chunking).await? {
                    Validated::Problem(problem) => {
                        fail(ctx, file_id, tenant.tenant_id(), &problem, Some(&sniff)).await?;
                    }
                    Validated::Changed => {
                        let problem = FileProblem {
                            code: FileErrorCode::Unreadable,
                            message: "the file changed while it was being read; nothing of this version was imported, and its new content is imported as a new upload".into(),
                        };
                        fail(ctx, file_id, tenant.tenant_id(), &problem, Some(&sniff)).await?;
                        lock.release().await;
                        return Ok(());
                    }
                    Validated::Good => {
                        ctx.hooks.pause("ingest.before_publish", &display).await;
                        publish_rows(ctx, tenant, file_id, &file, &sniff, chunking, &display)
                            .await?;
                    }
                }
            }
        }
        ctx.hooks.pause("ingest.before_archive", &display).await;
        let f = folder.clone();
        let owned_name = name.clone();
        let archive_name = display.clone();
        let (archived, notice) = tokio::task::spawn_blocking(move || {
            f.archive(&owned_name, &file, &archive_name, file_id.0)
        })
        .await?
        .with_context(|| format!("move {display:?} to bak/"))?;
        if let Some(notice) = notice {
            add_notice(&ctx.pool, file_id, notice).await?;
        }
        db::run(&ctx.pool, move |conn| {
            diesel::update(import_files::table.find(file_id.0))
                .set(import_files::archived_name.eq(archived))
                .execute(conn)?;
            Ok(())
        })
        .await?;
        tracing::info!("FileArchived");
        lock.release().await;
        Ok(())
    }
    .instrument(span)
    .await
}

/// Records a notice for the tenant and the operator on the file (once, however often a
/// retry records it).
async fn add_notice(pool: &PgPool, file_id: ImportFileId, notice: String) -> anyhow::Result<()> {
    db::run(pool, move |conn| {
        diesel::sql_query(
            "UPDATE import_files SET notices = array_append(notices, $2) \
             WHERE id = $1 AND NOT ($2 = ANY (notices))",
        )
        .bind::<BigInt, _>(file_id.0)
        .bind::<diesel::sql_types::Text, _>(notice)
        .execute(conn)?;
        Ok(())
    })
    .await?;
    Ok(())
}

/// A registered file.
struct Registered {
    id: ImportFileId,
    /// How it is cut into chunks, as fixed when it was registered.
    chunking: Chunking,
}

async fn register(
    ctx: &Context,
    tenant: TenantId,
    name: &str,
    arrival_key: &str,
    sniff: &Sniff,
) -> anyhow::Result<Registered> {
    let (name, key, size, sha) = (
        name.to_owned(),
        arrival_key.to_owned(),
        sniff.size as i64,
        sniff.sha256.clone(),
    );
    let encoding = sniff.encoding_label();
    let chunking = ctx.chunking;
    let row: (i64, Option<i32>, Option<i32>) = db::run(&ctx.pool, move |conn| {
        let inserted = diesel::insert_into(import_files::table)
            .values((
                import_files::tenant_id.eq(tenant.0),
                import_files::file_name.eq(&name),
                import_files::arrival_key.eq(&key),
                import_files::size_bytes.eq(size),
                import_files::sha256.eq(&sha),
                import_files::encoding.eq(&encoding),
                import_files::chunk_rows.eq(chunking.rows.min(i32::MAX as usize) as i32),
                import_files::chunk_max_bytes.eq(chunking.max_bytes.min(i32::MAX as usize) as i32),
            ))
            .on_conflict(import_files::arrival_key)
            .do_nothing()
            .execute(conn)?;
        let row: (i64, Option<i32>, Option<i32>) = import_files::table
            .filter(import_files::arrival_key.eq(&key))
            .select((
                import_files::id,
                import_files::chunk_rows,
                import_files::chunk_max_bytes,
            ))
            .first(conn)?;
        if inserted == 1 {
            tracing::info!(file_id = row.0, tenant = tenant.0, size, "FileRegistered");
        }
        Ok(row)
    })
    .await?;
    Ok(Registered {
        id: ImportFileId(row.0),
        // Files registered before the chunking was stored are cut as the service says.
        chunking: Chunking {
            rows: row.1.map_or(ctx.chunking.rows, |r| r.max(1) as usize),
            max_bytes: row.2.map_or(ctx.chunking.max_bytes, |b| b.max(1) as usize),
        },
    })
}

/// What the validating pass found.
enum Validated {
    /// Nothing stops the import.
    Good,
    /// A file-level problem: nothing is published.
    Problem(FileProblem),
    /// The content is not what was registered (someone is writing to it).
    Changed,
}

/// Reads the whole file once without publishing anything, so that every file-level problem
/// (header, unclosed quote, row limit…) is decided before the first row is handed over.
async fn validate_whole(
    file: &File,
    sniff: &Sniff,
    limits: reader::Limits,
    chunking: Chunking,
) -> anyhow::Result<Validated> {
    let mut f = file.try_clone()?;
    let sniff = sniff.clone();
    tokio::task::spawn_blocking(move || {
        f.seek(SeekFrom::Start(0))?;
        let mut hashing = HashingReader {
            inner: f,
            hasher: Sha256::new(),
        };
        let outcome = reader::read_chunks(
            &mut hashing,
            &sniff,
            limits,
            chunking,
            |_, _, _| {},
            |_, _, _, _| Ok(()),
        );
        io::copy(&mut hashing, &mut io::sink())?;
        let outcome = outcome?;
        if hex::encode(hashing.hasher.finalize()) != sniff.sha256 {
            return Ok(Validated::Changed);
        }
        Ok(match outcome {
            Ok(_) => Validated::Good,
            Err(problem) => Validated::Problem(problem),
        })
    })
    .await?
}

async fn current_state(pool: &PgPool, file_id: ImportFileId) -> anyhow::Result<String> {
    Ok(db::run(pool, move |conn| {
        Ok(import_files::table
            .find(file_id.0)
            .select(import_files::state)
            .first::<String>(conn)?)
    })
    .await?)
}

/// Reads and publishes the file's rows, then records the totals. The file was validated
/// whole before, so a problem found now means its content changed since: the rows already
/// published are imported, and the report says exactly which.
async fn publish_rows(
    ctx: &Context,
    tenant: &Tenant,
    file_id: ImportFileId,
    file: &File,
    sniff: &Sniff,
    chunking: Chunking,
    name: &str,
) -> anyhow::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let tenant_id = tenant.tenant_id();
    let sniff_for_read = sniff.clone();
    let limits = ctx.limits;
    let mut f = file.try_clone()?;
    let reading = tokio::task::spawn_blocking(move || {
        f.seek(SeekFrom::Start(0))?;
        let mut hashing = HashingReader {
            inner: f,
            hasher: Sha256::new(),
        };
        let mut header_seen: Option<(Vec<String>, Vec<String>, u8)> = None;
        let mut published_rows: u64 = 0;
        let mut published_chunks: u32 = 0;
        let outcome = reader::read_chunks(
            &mut hashing,
            &sniff_for_read,
            limits,
            chunking,
            |cells, map, delimiter| {
                header_seen = Some((cells.to_vec(), map.ignored.clone(), delimiter));
            },
            |chunk_no, header, _, rows| {
                let n = rows.len() as u64;
                let msg = WorkMessage::ChunkV1(Chunk {
                    file_id,
                    tenant_id,
                    chunk_no,
                    header: header.to_vec(),
                    rows,
                });
                let bytes = messages::encode(&msg).map_err(io::Error::other)?;
                tx.blocking_send(bytes)
                    .map_err(|_| io::Error::other("publisher stopped"))?;
                published_rows += n;
                published_chunks = chunk_no + 1;
                Ok(())
            },
        );
        // Drain what the reader did not consume so the hash covers the whole file.
        let _ = io::copy(&mut hashing, &mut io::sink());
        Ok::<_, io::Error>((
            outcome,
            hex::encode(hashing.hasher.finalize()),
            header_seen,
            published_rows,
            published_chunks,
        ))
    });

    let mut window: VecDeque<mui_shared::amqp::Pending> = VecDeque::new();
    let mut publish_error = None;
    let mut sent = 0u64;
    while let Some(bytes) = rx.recv().await {
        if publish_error.is_some() {
            continue; // keep draining so the reader finishes
        }
        match ctx.publisher.send(QueueKind::Chunks, &bytes).await {
            Ok(p) => window.push_back(p),
            Err(e) => publish_error = Some(e),
        }
        sent += 1;
        if sent == 1 {
            ctx.hooks.pause("ingest.publishing", name).await;
        }
        while window.len() > CONFIRM_WINDOW {
            if let Some(p) = window.pop_front() {
                if let Err(e) = p.confirmed().await {
                    publish_error.get_or_insert(e);
                }
            }
        }
    }
    for p in window {
        if let Err(e) = p.confirmed().await {
            publish_error.get_or_insert(e);
        }
    }
    let (outcome, hash_again, header_seen, published_rows, published_chunks) = reading.await??;
    if let Some(e) = publish_error {
        // Nothing is recorded: the whole file is published again (workers skip the chunks
        // they already imported).
        return Err(e).context("publishing chunks");
    }
    let outcome = outcome.context("reading the file")?;
    let changed = hash_again != sniff.sha256;
    let (chunks, rows, notice) = match outcome {
        Ok(summary) => {
            let notice = changed.then(|| {
                "The file changed while it was being imported: the rows were imported as they were read, and the new content is imported as a new upload".to_owned()
            });
            (summary.chunks, summary.rows, notice)
        }
        Err(problem) if published_chunks == 0 => {
            fail(ctx, file_id, tenant_id, &problem, Some(sniff)).await?;
            return Ok(());
        }
        Err(problem) => (
            published_chunks,
            published_rows,
            Some(format!(
                "The file changed while it was being imported, and its new content has a problem ({problem}): only the first {published_rows} data rows were imported (each is counted and reported here); the rest was not. Upload the whole file again"
            )),
        ),
    };
    if let Some(notice) = notice {
        tracing::warn!("FileChangedWhileRead");
        add_notice(&ctx.pool, file_id, notice).await?;
    }
    let (header, ignored, delimiter) = header_seen.unwrap_or_default();
    tracing::info!(rows, chunks, "FileQueued");
    let header = serde_json::to_value(&header)?;
    let ignored = serde_json::to_value(&ignored)?;
    let delimiter = reader::delimiter_label(delimiter);
    let chunks = chunks as i32;
    let rows = rows as i64;
    let kick = ctx.kick.clone();
    db::run(&ctx.pool, move |conn| {
        conn.transaction(|conn| {
            #[derive(QueryableByName)]
            struct Done {
                #[diesel(sql_type = Bool)]
                done: bool,
            }
            let done: Done = diesel::sql_query(
                "UPDATE import_files SET total_chunks = $2, rows_total = $3, \
                 delimiter = $4, header = $5, ignored_columns = $6, queued_at = now(), \
                 state = CASE WHEN chunks_done >= $2 THEN 'done' ELSE 'importing' END, \
                 finished_at = CASE WHEN chunks_done >= $2 THEN now() END \
                 WHERE id = $1 RETURNING (state = 'done') AS done",
            )
            .bind::<BigInt, _>(file_id.0)
            .bind::<diesel::sql_types::Integer, _>(chunks)
            .bind::<BigInt, _>(rows)
            .bind::<diesel::sql_types::Text, _>(delimiter)
            .bind::<diesel::sql_types::Jsonb, _>(header)
            .bind::<diesel::sql_types::Jsonb, _>(ignored)
            .get_result(conn)?;
            if done.done {
                finished(conn, file_id, tenant_id)?;
            }
            Ok::<_, diesel::result::Error>(())
        })?;
        Ok(())
    })
    .await?;
    kick.kick();
    Ok(())
}

/// Announces a finished file to the notifier (inside the caller's transaction).
pub fn finished(
    conn: &mut PgConnection,
    file_id: ImportFileId,
    tenant_id: TenantId,
) -> Result<(), diesel::result::Error> {
    let msg = NotifyMessage::FileFinishedV1(FileFinished { file_id, tenant_id });
    let bytes = messages::encode(&msg)
        .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
    outbox::enqueue(conn, QueueKind::Notify, bytes)
}

/// Marks a file failed at file level and announces it.
async fn fail(
    ctx: &Context,
    file_id: ImportFileId,
    tenant_id: TenantId,
    problem: &FileProblem,
    sniff: Option<&Sniff>,
) -> anyhow::Result<()> {
    tracing::info!(code = problem.code.as_str(), "FileRejected");
    let code = problem.code.as_str();
    let message = problem.message.clone();
    let encoding = sniff.map(Sniff::encoding_label);
    db::run(&ctx.pool, move |conn| {
        conn.transaction(|conn| {
            let updated = diesel::update(
                import_files::table
                    .find(file_id.0)
                    .filter(import_files::state.eq_any(["received", "importing"])),
            )
            .set((
                import_files::state.eq("failed"),
                import_files::error_code.eq(code),
                import_files::error_message.eq(&message),
                import_files::encoding.eq(encoding),
                import_files::finished_at.eq(diesel::dsl::now),
            ))
            .execute(conn)?;
            if updated == 1 {
                finished(conn, file_id, tenant_id)?;
            }
            Ok::<_, diesel::result::Error>(())
        })?;
        Ok(())
    })
    .await?;
    ctx.kick.kick();
    Ok(())
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
    };
    let registered = register(ctx, tenant.tenant_id(), name, &arrival_key, &sniff).await?;
    if current_state(&ctx.pool, registered.id).await? == "received" {
        fail(ctx, registered.id, tenant.tenant_id(), problem, None).await?;
    }
    Ok(())
}

/// Session advisory lock on one file id, held on a dedicated connection so that it dies with
/// the process.
struct FileLock {
    conn: Option<PgConnection>,
}

impl FileLock {
    async fn try_acquire(url: &str, file_id: ImportFileId) -> anyhow::Result<Option<FileLock>> {
        let url = url.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut conn = PgConnection::establish(&url).context("connecting for the file lock")?;
            #[derive(QueryableByName)]
            struct Locked {
                #[diesel(sql_type = Bool)]
                locked: bool,
            }
            let got: Locked = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS locked")
                .bind::<BigInt, _>(file_id.0)
                .get_result(&mut conn)?;
            Ok(got.locked.then_some(FileLock { conn: Some(conn) }))
        })
        .await?
    }

    /// Closes the connection (which releases the lock) off the async threads.
    async fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = tokio::task::spawn_blocking(move || drop(conn)).await;
        }
    }
}

impl std::fmt::Debug for FileLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileLock")
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}
