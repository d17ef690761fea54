//! A dry run (`*.validate.csv`): every check and every write a real import makes, in one
//! transaction for the whole file, rolled back; only the counts and the failure records are
//! kept.
//!
//! ingest queues a dry run's chunks held back from the dispatcher and, once it has queued
//! them all, releases the first alone. The worker that imports it finds the file marked
//! `dry_run` and, inside one savepoint, imports that chunk and then each later one (read
//! from the queue) exactly as a real import would — so a later chunk sees what the earlier
//! ones wrote, as it would once they had committed: a `unique_id` repeated across chunks,
//! an email an earlier row took, a user archived twice — then rolls the savepoint back. No
//! user, no permit, no archive is left; what remains is what a real import records besides
//! its writes: each chunk's marker and counts, its failure records (in the outbox, for the
//! notifier), "file finished", and the queue emptied of the file's chunks. So the report
//! gives the counts the real import of the same file would give, against the tenant's users
//! as they are now (a real import's chunks may commit in another order; the totals are the
//! same, see docs/architecture.md).
//!
//! A redelivery of the first chunk finds its marker (or, while the first transaction still
//! runs, waits for its row lock) and does nothing.

use diesel::prelude::*;
use mui_shared::dispatch;
use mui_shared::domain::ImportFileId;
use mui_shared::messages::{self, Chunk, ChunkRef, RowFailure, WorkMessage};
use mui_shared::schema::{file_chunks, import_files};

use crate::import::{apply_chunk, record_chunk, ChunkOutcome, ImportError};

/// Whether `file` is a dry run.
pub(crate) fn is_dry_run(conn: &mut PgConnection, file: ImportFileId) -> QueryResult<bool> {
    Ok(import_files::table
        .find(file.0)
        .select(import_files::dry_run)
        .first::<bool>(conn)
        .optional()?
        .unwrap_or(false))
}

/// Why the savepoint ended.
enum Ended {
    /// Every chunk was checked: roll back, keep the results.
    Checked,
    /// A query failed.
    Failed(ImportError),
}

impl From<diesel::result::Error> for Ended {
    fn from(e: diesel::result::Error) -> Self {
        Ended::Failed(e.into())
    }
}

impl From<std::io::Error> for Ended {
    fn from(e: std::io::Error) -> Self {
        Ended::Failed(ImportError::Spill(e))
    }
}

impl From<ImportError> for Ended {
    fn from(e: ImportError) -> Self {
        Ended::Failed(e)
    }
}

/// Checks the whole dry-run file whose first chunk (taken from the queue by the caller) is
/// `first`, in the caller's transaction; see the module docs. Returns the first chunk's
/// outcome (`finished_file` set: a dry run finishes with its first chunk).
pub(crate) fn import_dry_run(
    conn: &mut PgConnection,
    first: Chunk,
) -> Result<ChunkOutcome, ImportError> {
    let file = first.file_id;
    let tenant = first.tenant_id;
    let total: Option<i32> = import_files::table
        .find(file.0)
        .select(import_files::total_chunks)
        .first(conn)?;
    let total = total.unwrap_or(1).max(1) as u32;
    // Each chunk's outcome and failure records wait on local disk, not in memory, until the
    // savepoint is rolled back: an all-failing file of any size keeps one chunk's failures
    // in memory at a time. (Anonymous: gone with the process, whatever happens.)
    let mut results = Spill::new()?;
    let mut redelivered = false;
    let ended = conn.transaction::<(), Ended, _>(|conn| {
        let mut chunk = first.clone();
        loop {
            match apply_chunk(conn, &chunk)? {
                Some((outcome, failures)) => {
                    // The rows go; the chunk's header and number are kept for the report.
                    let kept = Chunk {
                        rows: Vec::new(),
                        ..chunk
                    };
                    results.push(&kept, &outcome, &failures)?;
                }
                None => {
                    redelivered = true;
                    return Err(Ended::Checked);
                }
            }
            let next = results.chunks;
            if next >= total {
                return Err(Ended::Checked);
            }
            let r = ChunkRef {
                file_id: file,
                tenant_id: tenant,
                chunk_no: next,
            };
            let Some(payload) = dispatch::peek(conn, r)? else {
                return Err(Ended::Failed(ImportError::NotQueued(r)));
            };
            chunk = match messages::decode_work(&payload) {
                Ok(WorkMessage::ChunkV1(c))
                    if c.file_id == file && c.tenant_id == tenant && c.chunk_no == next =>
                {
                    c
                }
                Ok(_) => {
                    return Err(Ended::Failed(ImportError::BadPayload {
                        chunk: r,
                        why: "it names another chunk".into(),
                    }))
                }
                Err(e) => {
                    return Err(Ended::Failed(ImportError::BadPayload {
                        chunk: r,
                        why: e.to_string(),
                    }))
                }
            };
        }
    });
    match ended {
        Err(Ended::Checked) => {}
        Err(Ended::Failed(e)) => return Err(e),
        Ok(()) => {}
    }
    if redelivered {
        // Checked before: the markers are there.
        return Ok(ChunkOutcome::default());
    }
    // Everything written is undone; keep what a real import records besides its writes.
    dispatch::take_file(conn, tenant, file)?;
    let mut first_outcome = None;
    for spilled in results.read_back()? {
        let Spilled {
            chunk,
            outcome,
            failures,
        } = spilled?;
        diesel::insert_into(file_chunks::table)
            .values((
                file_chunks::file_id.eq(file.0),
                file_chunks::chunk_no.eq(chunk.chunk_no as i32),
                file_chunks::rows.eq(outcome.rows as i32),
                file_chunks::failed.eq(0),
            ))
            .on_conflict_do_nothing()
            .execute(conn)?;
        let recorded = record_chunk(conn, &chunk, outcome, failures)?;
        if first_outcome.is_none() {
            first_outcome = Some(recorded.clone());
        }
        if recorded.finished_file {
            if let Some(f) = first_outcome.as_mut() {
                f.finished_file = true;
            }
        }
    }
    tracing::info!(file_id = file.0, chunks = total, "DryRunChecked");
    Ok(first_outcome.unwrap_or_default())
}

/// One checked chunk's results, as kept aside ([`Spill`]).
#[derive(serde::Serialize, serde::Deserialize)]
struct Spilled {
    /// The chunk without its rows (its header and number, for the report).
    chunk: Chunk,
    outcome: ChunkOutcome,
    failures: Vec<RowFailure>,
}

/// A dry run's per-chunk results on local disk: one JSON line a chunk.
struct Spill {
    file: std::io::BufWriter<std::fs::File>,
    /// Chunks written.
    chunks: u32,
}

impl Spill {
    fn new() -> Result<Self, ImportError> {
        let file = tempfile::tempfile().map_err(ImportError::Spill)?;
        Ok(Self {
            file: std::io::BufWriter::new(file),
            chunks: 0,
        })
    }

    fn push(
        &mut self,
        chunk: &Chunk,
        outcome: &ChunkOutcome,
        failures: &[RowFailure],
    ) -> std::io::Result<()> {
        use std::io::Write;
        #[derive(serde::Serialize)]
        struct Ref<'a> {
            chunk: &'a Chunk,
            outcome: &'a ChunkOutcome,
            failures: &'a [RowFailure],
        }
        serde_json::to_writer(
            &mut self.file,
            &Ref {
                chunk,
                outcome,
                failures,
            },
        )?;
        self.file.write_all(b"\n")?;
        self.chunks += 1;
        Ok(())
    }

    /// The chunks' results in the order written, one at a time.
    fn read_back(self) -> Result<impl Iterator<Item = Result<Spilled, ImportError>>, ImportError> {
        use std::io::{BufRead, Seek};
        let mut file = self
            .file
            .into_inner()
            .map_err(|e| ImportError::Spill(e.into_error()))?;
        file.rewind().map_err(ImportError::Spill)?;
        Ok(std::io::BufReader::new(file).lines().map(|line| {
            let line = line.map_err(ImportError::Spill)?;
            serde_json::from_str(&line).map_err(|e| ImportError::Spill(e.into()))
        }))
    }
}
