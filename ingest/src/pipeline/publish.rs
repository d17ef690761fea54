//! Reading a registered file whole without publishing (every file-level problem decided
//! first), then publishing its chunks with confirms and recording the totals.

use super::repeats::{Collect, Repeats};
use super::*;
use futures::StreamExt as _;
use mui_shared::domain::Column;

/// Chunks in flight (published, confirm not yet awaited) per file.
const CONFIRM_WINDOW: usize = 8;

/// Chunk inserts into the database's chunk queue in flight at once per file (each on a
/// connection of its own): the file is read on while the database stores the chunks before,
/// instead of waiting for each insert's round trip and commit. Each file being read may
/// hold this many connections of ingest's pool at once (see `crate::run`).
pub const QUEUE_WINDOW: usize = 2;

/// What the validating pass found.
pub(super) enum Validated {
    /// Nothing stops the import.
    Good {
        /// Which rows share their unique_id with another row of the file.
        repeats: Repeats,
        /// When asked for: the `unique_id`s that a row of the file sets to `active=0` (for
        /// the mass-deactivation guard).
        deactivating: Vec<String>,
    },
    /// A file-level problem: nothing is published.
    Problem(FileProblem),
    /// The content is not what was registered (someone is writing to it).
    Changed,
}

/// Reads the whole file once without publishing anything, so that every file-level problem
/// (header, unclosed quote, row limit…) is decided before the first row is handed over, and
/// the rows whose unique_id another row of the file has too are known ([`Repeats`]).
///
/// With `deactivating`, it also collects the `unique_id`s that any row sets to `active=0`:
/// only those are held in memory, so a file that deactivates no one costs nothing more. A
/// later row of the same id with another value does not take the id out: the later row
/// wins only if it passes the row checks, and a tenant could otherwise hide every
/// deactivation behind a refused repeat of its id.
pub(super) async fn validate_whole(
    file: &File,
    sniff: &Sniff,
    limits: reader::Limits,
    chunking: Chunking,
    aliases: Vec<(String, Column)>,
    deactivating: bool,
) -> anyhow::Result<Validated> {
    let mut f = file.try_clone()?;
    let sniff = sniff.clone();
    tokio::task::spawn_blocking(move || {
        let mut zeros: std::collections::HashSet<String> = std::collections::HashSet::new();
        f.seek(SeekFrom::Start(0))?;
        let mut hashing = HashingReader {
            inner: f,
            hasher: Sha256::new(),
        };
        let mut ids = Collect::default();
        // Only the key and `active` are needed here: the other cells are not kept.
        let outcome = reader::read_chunks_keeping(
            &mut hashing,
            &sniff,
            limits,
            chunking,
            &aliases,
            Some(&[Column::UniqueId, Column::Active]),
            |_, _, _| {},
            |_, _, map, rows| {
                ids.observe(map, &rows);
                if !deactivating {
                    return Ok(());
                }
                let (Some(uid), Some(active)) =
                    (map.position(Column::UniqueId), map.position(Column::Active))
                else {
                    return Ok(());
                };
                for row in rows.iter().filter(|r| r.too_large.is_none()) {
                    let Some(id) = row.fields.get(uid).map(|v| v.trim()) else {
                        continue;
                    };
                    if id.is_empty() {
                        continue;
                    }
                    // A later row of the same id does not take it out: that row may be
                    // refused (an invalid email), and then the earlier one stands. An id
                    // holding a control character is refused by the worker, so it never
                    // deactivates anyone (and a NUL cannot be sent to PostgreSQL).
                    if row.fields.get(active).map(|v| v.trim()) == Some("0")
                        && !id.chars().any(char::is_control)
                    {
                        zeros.insert(id.to_owned());
                    }
                }
                Ok(())
            },
        );
        io::copy(&mut hashing, &mut io::sink())?;
        let outcome = outcome?;
        if hex::encode(hashing.hasher.finalize()) != sniff.sha256 {
            return Ok(Validated::Changed);
        }
        Ok(match outcome {
            Ok(_) => Validated::Good {
                repeats: ids.finish(),
                deactivating: zeros.into_iter().collect(),
            },
            Err(problem) => Validated::Problem(problem),
        })
    })
    .await?
}

/// Reads the file's rows and hands them on as chunks (queued in the database for the fair
/// dispatcher, or published straight to the broker), then records the totals. The file was validated
/// whole before, so a problem found now means its content changed since: the rows already
/// published are imported, and the report says exactly which. (`repeats` is from the
/// validating pass: rows of changed content are listed as that pass found them.)
///
/// `mode` says whether the chunks are held back from the dispatcher (a file held by the
/// mass-deactivation guard, a dry run); such chunks are always queued in the database.
#[allow(clippy::too_many_arguments)]
pub(super) async fn publish_rows(
    ctx: &Context,
    tenant: &Tenant,
    file_id: ImportFileId,
    file: &File,
    sniff: &Sniff,
    chunking: Chunking,
    name: &str,
    mode: &Mode,
    repeats: Repeats,
) -> anyhow::Result<()> {
    let held_back = mode.held || mode.dry_run;
    let aliases = mode.aliases.clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u32, i32, Vec<u8>)>(4);
    let tenant_id = tenant.tenant_id();
    let sniff_for_read = sniff.clone();
    let limits = ctx.limits;
    let mut f = file.try_clone()?;
    let watched = file.try_clone()?;
    let stamp = mode.stamp;
    let reading = tokio::task::spawn_blocking(move || {
        f.seek(SeekFrom::Start(0))?;
        let mut hashing = HashingReader {
            inner: f,
            hasher: Sha256::new(),
        };
        let mut header_seen: Option<(Vec<String>, Vec<String>, u8)> = None;
        let mut published_rows: u64 = 0;
        let mut published_chunks: u32 = 0;
        // Set when the file was written to since it was first read: reading stops there.
        let mut overwritten = false;
        let outcome = reader::read_chunks_mapped(
            &mut hashing,
            &sniff_for_read,
            limits,
            chunking,
            &aliases,
            |cells, map, delimiter| {
                header_seen = Some((cells.to_vec(), map.ignored.clone(), delimiter));
            },
            |chunk_no, header, map, rows| {
                // Every byte of this chunk was read before this look: if the file was not
                // written to by now, they are the version first read.
                if Stamp::of(&watched)? != stamp {
                    overwritten = true;
                    return Err(io::Error::other(Overwritten));
                }
                let n = rows.len() as u64;
                let msg = WorkMessage::ChunkV1(Chunk {
                    file_id,
                    tenant_id,
                    chunk_no,
                    header: header.to_vec(),
                    repeated: Some(repeats.rows_of(map, &rows)),
                    rows,
                });
                let bytes = messages::encode(&msg).map_err(io::Error::other)?;
                tx.blocking_send((chunk_no, n as i32, bytes))
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
            overwritten,
            hex::encode(hashing.hasher.finalize()),
            header_seen,
            published_rows,
            published_chunks,
        ))
    });

    let mut window: VecDeque<mui_shared::amqp::Pending> = VecDeque::new();
    let mut inserts = futures::stream::FuturesOrdered::new();
    let mut publish_error: Option<anyhow::Error> = None;
    let mut sent = 0u64;
    while let Some((chunk_no, rows, bytes)) = rx.recv().await {
        if publish_error.is_some() {
            continue; // keep draining so the reader finishes
        }
        let how = if held_back {
            ChunkDispatch::Fair
        } else {
            ctx.dispatch
        };
        match how {
            ChunkDispatch::Direct => {
                let queue = ctx.publisher.topology().queue(QueueKind::Chunks);
                let span = tracing::info_span!(
                    "chunk.publish",
                    mui.chunk_no = i64::from(chunk_no),
                    mui.rows = rows,
                    messaging.system = "rabbitmq",
                    messaging.operation.type = "send",
                    messaging.destination.name = %queue,
                    otel.kind = "producer",
                );
                let trace = TraceContext::of(&span);
                let sent = ctx
                    .publisher
                    .send_traced(QueueKind::Chunks, &bytes, &trace)
                    .instrument(span.clone())
                    .await;
                match sent {
                    Ok(p) => window.push_back(p),
                    Err(e) => {
                        otel::set_error(&span, &e);
                        publish_error = Some(anyhow::Error::from(e));
                    }
                }
            }
            ChunkDispatch::Fair => {
                let chunk = ChunkRef {
                    file_id,
                    tenant_id,
                    chunk_no,
                };
                // Queued in PostgreSQL: the dispatcher's span continues from the file's
                // stored trace context when it hands the chunk to the broker.
                let span = tracing::info_span!(
                    "chunk.publish",
                    mui.chunk_no = i64::from(chunk_no),
                    mui.rows = rows,
                    db.system = "postgresql",
                    db.operation.name = "INSERT",
                    db.collection.name = "chunk_queue",
                    otel.kind = "producer",
                );
                let queued = db::run(&ctx.pool, move |conn| {
                    Ok(dispatch::enqueue_held(
                        conn, chunk, rows, &bytes, held_back,
                    )?)
                })
                .instrument(span.clone());
                inserts.push_back(async move {
                    let queued = queued.await;
                    if let Err(e) = &queued {
                        otel::set_error(&span, e);
                    }
                    queued
                });
                while inserts.len() >= QUEUE_WINDOW {
                    if let Some(Err(e)) = inserts.next().await {
                        publish_error.get_or_insert(anyhow::Error::from(e));
                    }
                }
            }
        }
        sent += 1;
        if sent == 1 {
            // The first chunk is queued (or published) before the stop point.
            while let Some(queued) = inserts.next().await {
                if let Err(e) = queued {
                    publish_error.get_or_insert(anyhow::Error::from(e));
                }
            }
            ctx.hooks.pause("ingest.publishing", name).await;
        }
        while window.len() > CONFIRM_WINDOW {
            if let Some(p) = window.pop_front() {
                if let Err(e) = p.confirmed().await {
                    publish_error.get_or_insert(e.into());
                }
            }
        }
    }
    while let Some(queued) = inserts.next().await {
        if let Err(e) = queued {
            publish_error.get_or_insert(anyhow::Error::from(e));
        }
    }
    for p in window {
        if let Err(e) = p.confirmed().await {
            publish_error.get_or_insert(e.into());
        }
    }
    let (outcome, overwritten, hash_again, header_seen, published_rows, published_chunks) =
        reading.await??;
    if let Some(e) = publish_error {
        // Nothing is recorded: the whole file is published again (workers skip the chunks
        // they already imported).
        return Err(e).context("publishing chunks");
    }
    if overwritten && published_chunks == 0 {
        let problem = FileProblem {
            code: FileErrorCode::Unreadable,
            message: "the file was written to while it was being read; nothing of this version was imported, and its new content is imported as a new upload".into(),
        };
        fail(ctx, file_id, tenant, &problem, Some(sniff)).await?;
        return Ok(());
    }
    let changed = hash_again != sniff.sha256;
    let outcome = if overwritten {
        // Only the chunks read before the write were handed over: the version first read,
        // cut short. The new content is a new upload (its stamp, so its arrival key,
        // changed).
        Err(FileProblem {
            code: FileErrorCode::Unreadable,
            message: format!(
                "The file was written to while it was being imported: only its first {published_rows} data rows, as they were before that, were imported (each is counted and reported here); the rest of that version was not. The new content is imported as a new upload"
            ),
        })
    } else {
        outcome.context("reading the file")?
    };
    let (chunks, rows, notice) = match outcome {
        Err(problem) if overwritten => (published_chunks, published_rows, Some(problem.message)),
        Ok(summary) => {
            let notice = changed.then(|| {
                "The file changed while it was being imported: the rows were imported as they were read, and the new content is imported as a new upload".to_owned()
            });
            (summary.chunks, summary.rows, notice)
        }
        Err(problem) if published_chunks == 0 => {
            fail(ctx, file_id, tenant, &problem, Some(sniff)).await?;
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
    let span = tracing::Span::current();
    span.record("mui.rows", rows as i64);
    span.record("mui.chunks", i64::from(chunks));
    let totals = files::Totals {
        chunks: chunks as i32,
        rows: rows as i64,
        delimiter: reader::delimiter_label(delimiter).to_owned(),
        header: serde_json::to_value(&header)?,
        ignored: serde_json::to_value(&ignored)?,
    };
    let kick = ctx.kick.clone();
    let (held, dry_run) = (mode.held, mode.dry_run);
    db::run(&ctx.pool, move |conn| {
        Ok(conn.transaction(|conn| {
            files::totals_known(conn, file_id, tenant_id, &totals)?;
            if held {
                // The tenant is told what would happen; the operator decides.
                mui_shared::holds::announce_held(conn, file_id, tenant_id)?;
            } else if dry_run {
                // Queued whole: the worker that gets the first chunk checks them all in
                // one transaction and rolls it back.
                dispatch::release(conn, tenant_id, file_id, true)?;
            }
            Ok::<_, diesel::result::Error>(())
        })?)
    })
    .await?;
    kick.kick();
    Ok(())
}

/// What the file system says of a file's content: its size and when its data last changed
/// (a write changes `mtime` before its bytes can be read). Not `ctime`: a rename or a
/// permission change moves it and changes no byte. (A client that sets `mtime` back after
/// writing in place hides its write from this; it can only mix its own versions.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Stamp {
    size: u64,
    mtime_ns: i128,
}

impl Stamp {
    /// The stamp of the open `file` now.
    pub(super) fn of(file: &File) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(Self {
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// Why the publishing pass stopped reading: the file was written to since it was first read.
#[derive(Debug)]
struct Overwritten;

impl std::fmt::Display for Overwritten {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the file was written to while it was being read")
    }
}

impl std::error::Error for Overwritten {}

/// How a file's chunks are queued.
#[derive(Debug, Clone, Default)]
pub(super) struct Mode {
    /// Held by the mass-deactivation guard: queued held back until approved.
    pub(super) held: bool,
    /// A dry run (`*.validate.csv`): queued held back, the first chunk released at the end.
    pub(super) dry_run: bool,
    /// The tenant's own header names.
    pub(super) aliases: Vec<(String, Column)>,
    /// The file's stamp before it was first read: a chunk is handed over only if the stamp
    /// is unchanged once its bytes were read, so no chunk mixes in a later version.
    pub(super) stamp: Stamp,
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
