//! Handling one file that is ready: register it, hand its rows to the workers, archive it.
//!
//! Crash safety comes from the order of steps and from the file's *arrival key* (tenant,
//! device, inode, mtime, size, content hash), unique in `import_files`:
//! 1. register (insert-or-find by arrival key) and take a PostgreSQL advisory lock on the
//!    file's id for the duration (a second ingest process skips a locked file; a dead one's
//!    lock dies with its connection);
//! 2. while the file is `received`, publish all its chunks with confirms, then record the
//!    totals (state `importing`, or `done` if the workers already finished every chunk);
//!    a crash before that re-publishes every chunk, which workers recognise and skip;
//! 3. move it into `bak/` (retry-safe, never overwriting).
//!
//! A file still in the folder whose arrival key is already past step 2 only gets step 3, so a
//! restart never imports a file twice; a re-upload has a new mtime, so it is a new import.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

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

use crate::reader::{self, FileProblem, Sniff};

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
    /// Rows per chunk.
    pub chunk_rows: usize,
    /// Size and row limits of an uploaded file.
    pub limits: reader::Limits,
}

/// Whether `name` is a temporary upload name left alone until renamed.
pub fn is_temporary(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    name.starts_with('.')
        || lower.ends_with(".filepart")
        || lower.ends_with(".part")
        || lower.ends_with(".tmp")
}

/// Handles the entry `name` of `tenant`'s drop folder `folder`.
pub async fn handle(
    ctx: &Context,
    tenant: &Tenant,
    folder: &Path,
    name: &str,
) -> anyhow::Result<()> {
    let path = folder.join(name);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
    };
    if !meta.file_type().is_file() {
        return handle_not_regular(ctx, tenant, name, &meta).await;
    }
    // O_NOFOLLOW: a symlink swapped in since the stat is refused, never followed.
    // O_NONBLOCK: a FIFO swapped in cannot block us.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(f) => f,
        // The tenant changed the file's permissions so that ingest may not read it.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            let problem = FileProblem {
                code: FileErrorCode::Unreadable,
                message: format!(
                    "{name:?} cannot be read by the import service: its permissions were changed (mode {:o}); upload it again without changing them",
                    meta.mode() & 0o7777
                ),
            };
            return report_unopened(ctx, tenant, name, &meta, &problem).await;
        }
        Err(e) => return Err(e).with_context(|| format!("open {}", path.display())),
    };
    let fmeta = file.metadata()?;
    if !fmeta.file_type().is_file() || fmeta.ino() != meta.ino() {
        return Ok(()); // Replaced under us; the next scan sees the new entry.
    }
    if fmeta.nlink() > 1 {
        match other_names(folder, name, fmeta.ino()) {
            // OpenSSH renames by link + unlink: the temporary name is about to go.
            OtherNames::RenameInProgress => return Ok(()),
            // All names are the tenant's: the file is registered once by its content and
            // inode, whichever name is handled first.
            OtherNames::InOwnFolder => {}
            OtherNames::Elsewhere => {
                return handle_not_regular(ctx, tenant, name, &meta).await;
            }
        }
    }
    let (file, sniff) = tokio::task::spawn_blocking(move || {
        let mut file = file;
        let sniff = reader::sniff(&mut file);
        (file, sniff)
    })
    .await?;
    let sniff = sniff.with_context(|| format!("read {}", path.display()))?;
    let arrival_key = format!(
        "{}:{}:{}:{}:{}:{}",
        tenant.id,
        fmeta.dev(),
        fmeta.ino(),
        fmeta.mtime_nsec() + fmeta.mtime() * 1_000_000_000,
        sniff.size,
        sniff.sha256
    );
    let (file_id, _) = register(ctx, tenant.tenant_id(), name, &arrival_key, &sniff).await?;
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
            if !name.to_ascii_lowercase().ends_with(".csv") {
                let problem = FileProblem {
                    code: FileErrorCode::NotCsvName,
                    message: format!(
                        "only .csv files are imported, and {name:?} does not end in .csv; save the users as CSV and upload that file"
                    ),
                };
                fail(ctx, file_id, tenant.tenant_id(), &problem, Some(&sniff)).await?;
            } else if !publish_rows(ctx, tenant, file_id, file, &sniff, &path).await? {
                // The file changed while being read: leave it for its new arrival.
                lock.release().await;
                return Ok(());
            }
        }
        let folder = folder.to_path_buf();
        let owned_name = name.to_owned();
        let archived = tokio::task::spawn_blocking(move || {
            crate::archive::move_to_bak(&folder, &owned_name, file_id.0)
        })
        .await?
        .with_context(|| format!("move {name:?} to bak/"))?;
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

async fn register(
    ctx: &Context,
    tenant: TenantId,
    name: &str,
    arrival_key: &str,
    sniff: &Sniff,
) -> anyhow::Result<(ImportFileId, String)> {
    let (name, key, size, sha) = (
        name.to_owned(),
        arrival_key.to_owned(),
        sniff.size as i64,
        sniff.sha256.clone(),
    );
    let encoding = sniff.encoding_label();
    let row: (i64, String) = db::run(&ctx.pool, move |conn| {
        let inserted = diesel::insert_into(import_files::table)
            .values((
                import_files::tenant_id.eq(tenant.0),
                import_files::file_name.eq(&name),
                import_files::arrival_key.eq(&key),
                import_files::size_bytes.eq(size),
                import_files::sha256.eq(&sha),
                import_files::encoding.eq(&encoding),
            ))
            .on_conflict(import_files::arrival_key)
            .do_nothing()
            .execute(conn)?;
        let row: (i64, String) = import_files::table
            .filter(import_files::arrival_key.eq(&key))
            .select((import_files::id, import_files::state))
            .first(conn)?;
        if inserted == 1 {
            tracing::info!(file_id = row.0, tenant = tenant.0, size, "FileRegistered");
        }
        Ok(row)
    })
    .await?;
    Ok((ImportFileId(row.0), row.1))
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

/// Reads and publishes the file's rows. Returns false if the file changed while being read.
async fn publish_rows(
    ctx: &Context,
    tenant: &Tenant,
    file_id: ImportFileId,
    file: File,
    sniff: &Sniff,
    path: &Path,
) -> anyhow::Result<bool> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let chunk_rows = ctx.chunk_rows;
    let tenant_id = tenant.tenant_id();
    let sniff_for_read = sniff.clone();
    let limits = ctx.limits;
    let reading = tokio::task::spawn_blocking(move || {
        let mut hashing = HashingReader {
            inner: file,
            hasher: Sha256::new(),
        };
        let outcome = reader::read_chunks(
            &mut hashing,
            &sniff_for_read,
            limits,
            chunk_rows,
            |_, _, _| {},
            |chunk_no, header, _, rows| {
                let msg = WorkMessage::ChunkV1(Chunk {
                    file_id,
                    tenant_id,
                    chunk_no,
                    header: header.to_vec(),
                    rows,
                });
                let bytes = messages::encode(&msg).map_err(io::Error::other)?;
                tx.blocking_send(bytes)
                    .map_err(|_| io::Error::other("publisher stopped"))
            },
        );
        // Drain what the reader did not consume so the hash covers the whole file.
        let _ = io::copy(&mut hashing, &mut io::sink());
        (outcome, hex::encode(hashing.hasher.finalize()))
    });

    let mut window: VecDeque<mui_shared::amqp::Pending> = VecDeque::new();
    let mut published = 0u32;
    let mut publish_error = None;
    while let Some(bytes) = rx.recv().await {
        if publish_error.is_some() {
            continue; // keep draining so the reader finishes
        }
        match ctx.publisher.send(QueueKind::Chunks, &bytes).await {
            Ok(p) => window.push_back(p),
            Err(e) => publish_error = Some(e),
        }
        while window.len() > CONFIRM_WINDOW {
            if let Some(p) = window.pop_front() {
                if let Err(e) = p.confirmed().await {
                    publish_error.get_or_insert(e);
                }
            }
        }
        published += 1;
    }
    for p in window {
        if let Err(e) = p.confirmed().await {
            publish_error.get_or_insert(e);
        }
    }
    let (outcome, hash_again) = reading.await?;
    if let Some(e) = publish_error {
        return Err(e).context("publishing chunks");
    }
    let outcome = outcome.with_context(|| format!("reading {}", path.display()))?;
    if hash_again != sniff.sha256 {
        let problem = FileProblem {
            code: FileErrorCode::Unreadable,
            message: "the file changed while it was being read; its new content is imported as a new upload".into(),
        };
        fail(ctx, file_id, tenant_id, &problem, Some(sniff)).await?;
        return Ok(false);
    }
    match outcome {
        Err(problem) => {
            fail(ctx, file_id, tenant_id, &problem, Some(sniff)).await?;
        }
        Ok(summary) => {
            tracing::info!(rows = summary.rows, chunks = published, "FileQueued");
            let header = serde_json::to_value(&summary.header)?;
            let ignored = serde_json::to_value(&summary.ignored)?;
            let delimiter = reader::delimiter_label(summary.delimiter);
            let chunks = summary.chunks as i32;
            let rows = summary.rows as i64;
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
        }
    }
    Ok(true)
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
/// own folder or its `bak/` (the tenant's own link, or our interrupted move to `bak/`), or
/// somewhere we cannot see: outside the tenant's folder.
fn other_names(folder: &Path, name: &str, ino: u64) -> OtherNames {
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.metadata().is_ok_and(|m| m.ino() == ino && m.is_file()))
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .filter(|n| n != name)
                    .collect()
            })
            .unwrap_or_default()
    };
    let beside = names(folder);
    if beside.iter().any(|n| is_temporary(n)) {
        OtherNames::RenameInProgress
    } else if !beside.is_empty() || !names(&folder.join("bak")).is_empty() {
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
    meta: &std::fs::Metadata,
) -> anyhow::Result<()> {
    let ft = meta.file_type();
    use std::os::unix::fs::FileTypeExt;
    let kind = if ft.is_file() {
        "a hard link to a file outside this folder"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_dir() {
        "a folder"
    } else if ft.is_fifo() {
        "a named pipe (FIFO)"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "a device file"
    };
    let problem = FileProblem {
        code: FileErrorCode::NotRegularFile,
        message: format!(
            "{name:?} is {kind}; only regular .csv files uploaded into this folder are imported, and it was left untouched"
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
    meta: &std::fs::Metadata,
    problem: &FileProblem,
) -> anyhow::Result<()> {
    let arrival_key = format!(
        "{}:{}:{}:{}:special",
        tenant.id,
        meta.dev(),
        meta.ino(),
        meta.mtime_nsec() + meta.mtime() * 1_000_000_000
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
    let (file_id, state) = register(ctx, tenant.tenant_id(), name, &arrival_key, &sniff).await?;
    if state == "received" {
        fail(ctx, file_id, tenant.tenant_id(), problem, None).await?;
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
