//! Wire contracts between the services.
//!
//! Every message is a `#[serde(tag = "type")]` enum whose variants carry a version in their
//! tag (`chunk.v1`), so a new shape is added as a new variant and running consumers keep
//! understanding the old one.
//!
//! - [`WorkMessage`]: ingest → workers, on the `chunks` queue. A file's rows travel in chunks
//!   (no shared disk between the SFTP host and the workers), so any number of workers can
//!   import one file at once: either in the message, or (fair dispatch) queued in the
//!   database and named by the message.
//! - [`NotifyMessage`]: workers and ingest → notifier, on the `notify` queue, through the
//!   transactional outbox: failure records of a chunk, and "this file is finished".

use serde::{Deserialize, Serialize};

use crate::domain::{ImportFileId, TenantId};

// The failure vocabulary lives in `codes`; re-exported because the envelopes carry it.
pub use crate::codes::{FileErrorCode, RowError, RowErrorCode, MAX_ROW_BYTES};
pub use crate::domain::truncate_for_message;
pub use crate::fields::Fields;

/// Work for the workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
#[non_exhaustive]
pub enum WorkMessage {
    /// A chunk of a file's rows, carried in the message (`CHUNK_DISPATCH=direct`).
    #[serde(rename = "chunk.v1")]
    ChunkV1(Chunk),
    /// A chunk waiting in the database's `chunk_queue`, handed out by the fair dispatcher
    /// (`CHUNK_DISPATCH=fair`): the worker takes its rows from the queue in the
    /// transaction that imports them.
    #[serde(rename = "queued_chunk.v1")]
    QueuedChunkV1(ChunkRef),
}

impl WorkMessage {
    /// The chunk the message carries or names.
    pub fn chunk_ref(&self) -> ChunkRef {
        match self {
            WorkMessage::ChunkV1(c) => ChunkRef {
                file_id: c.file_id,
                tenant_id: c.tenant_id,
                chunk_no: c.chunk_no,
            },
            WorkMessage::QueuedChunkV1(r) => *r,
        }
    }
}

/// Names a queued chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    /// The file.
    pub file_id: ImportFileId,
    /// Its tenant.
    pub tenant_id: TenantId,
    /// 0-based number of the chunk within the file.
    pub chunk_no: u32,
}

/// A run of consecutive rows of one file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    /// The file the rows belong to.
    pub file_id: ImportFileId,
    /// The tenant owning the file: a worker only ever writes this tenant's users.
    pub tenant_id: TenantId,
    /// 0-based number of the chunk within the file; (file_id, chunk_no) makes redelivery
    /// idempotent.
    pub chunk_no: u32,
    /// The header as uploaded (decoded), so the worker maps columns itself.
    pub header: Vec<String>,
    /// The rows, already decoded to UTF-8 and split into fields.
    pub rows: Vec<RawRow>,
    /// The rows of this chunk whose `unique_id` cell (trimmed) is also another row's in the
    /// same file, as ingest found reading the whole file before publishing; `None` when
    /// not known (a message from an older ingest). A worker leaves alone an existing user
    /// whose row changes nothing only for a row known to be its user's one row in the file
    /// (see `worker/src/upsert.rs`), so that a duplicate elsewhere in the file is still found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeated: Option<Vec<u64>>,
}

/// One uploaded row, as uploaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawRow {
    /// The row number a person sees in a spreadsheet (the header is row 1).
    pub row: u64,
    /// The fields, in upload order. Empty for a row that was too large to hand over. (On the
    /// wire an array of strings; in memory one buffer, see [`Fields`].)
    pub fields: Fields,
    /// Set when the row was larger than ingest's bound for one row: it is not handed over
    /// (`fields` is empty, so a worker that predates this field reports it as a field-count
    /// failure rather than importing part of it) and is reported as `record_too_large`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub too_large: Option<TooLargeRow>,
}

/// What is kept of a row too large to hand over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TooLargeRow {
    /// The row's size in bytes (UTF-8).
    pub bytes: u64,
    /// The start of its first fields, for the report.
    pub start: Vec<String>,
}

/// Messages for the notifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
#[non_exhaustive]
pub enum NotifyMessage {
    /// The failed rows of one chunk.
    #[serde(rename = "row_failures.v1")]
    RowFailuresV1(RowFailures),
    /// The file is finished (all chunks committed, or a file-level failure).
    #[serde(rename = "file_finished.v1")]
    FileFinishedV1(FileFinished),
    /// The file is held by the mass-deactivation guard: the tenant is told what would happen.
    #[serde(rename = "file_held.v1")]
    FileHeldV1(FileFinished),
}

/// Failure records found while importing one chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowFailures {
    /// The file.
    pub file_id: ImportFileId,
    /// Its tenant.
    pub tenant_id: TenantId,
    /// The chunk whose import found them.
    pub chunk_no: u32,
    /// One record per failed row.
    pub failures: Vec<RowFailure>,
}

/// A row that was not imported, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowFailure {
    /// Spreadsheet row number (header is row 1).
    pub row: u64,
    /// The row as uploaded.
    pub fields: Vec<String>,
    /// Every problem found in the row.
    pub errors: Vec<RowError>,
}

/// A file is finished; the notifier decides whether and what to mail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileFinished {
    /// The file.
    pub file_id: ImportFileId,
    /// Its tenant.
    pub tenant_id: TenantId,
}

/// Serialises a message for the wire.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(message)
}

/// Parses a message from the wire.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(bytes)
}

/// How this version writes a `chunk.v1` message's start: the tag first.
const CHUNK_V1_START: &[u8] = br#"{"type":"chunk.v1","#;

/// Parses a work message, as [`decode`] does. A chunk written tag first (as ingest writes
/// them) is read straight into a [`Chunk`], whose fields ignore the tag: the generic path
/// must buffer the whole message before it can look at the tag, which for a chunk of 5,000
/// rows doubled the work and the memory of parsing it.
///
/// A chunk's text is checked to be UTF-8 once, whole, rather than string by string.
pub fn decode_work(bytes: &[u8]) -> Result<WorkMessage, serde_json::Error> {
    if bytes.starts_with(CHUNK_V1_START) {
        if let Ok(text) = std::str::from_utf8(bytes) {
            return serde_json::from_str::<Chunk>(text).map(WorkMessage::ChunkV1);
        }
    }
    decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast path reads what the generic one reads, and only chunks take it.
    #[test]
    fn a_chunk_decodes_the_same_either_way() {
        let chunk = WorkMessage::ChunkV1(Chunk {
            file_id: ImportFileId(7),
            tenant_id: TenantId(3),
            chunk_no: 2,
            header: vec!["unique_id".into(), "email".into()],
            rows: vec![RawRow {
                row: 5,
                fields: ["u1", "a\"b@example.org"].into_iter().collect(),
                too_large: None,
            }],
            repeated: Some(vec![5]),
        });
        let bytes = encode(&chunk).unwrap();
        assert!(
            bytes.starts_with(CHUNK_V1_START),
            "the tag is written first"
        );
        assert_eq!(decode_work(&bytes).unwrap(), chunk);
        assert_eq!(decode::<WorkMessage>(&bytes).unwrap(), chunk);
        let queued = WorkMessage::QueuedChunkV1(ChunkRef {
            file_id: ImportFileId(7),
            tenant_id: TenantId(3),
            chunk_no: 2,
        });
        assert_eq!(decode_work(&encode(&queued).unwrap()).unwrap(), queued);
        assert!(decode_work(br#"{"type":"chunk.v1","file_id":"x"}"#).is_err());
        assert!(decode_work(br#"{"type":"chunk.v9"}"#).is_err());
    }

    #[test]
    fn messages_carry_a_versioned_type_tag() {
        let msg = NotifyMessage::FileFinishedV1(FileFinished {
            file_id: ImportFileId(7),
            tenant_id: TenantId(3),
        });
        let json = String::from_utf8(encode(&msg).unwrap()).unwrap();
        assert_eq!(
            json,
            r#"{"type":"file_finished.v1","file_id":7,"tenant_id":3}"#
        );
        assert_eq!(decode::<NotifyMessage>(json.as_bytes()).unwrap(), msg);
    }

    #[test]
    fn unknown_message_types_are_an_error_not_a_panic() {
        assert!(decode::<WorkMessage>(br#"{"type":"chunk.v9"}"#).is_err());
        assert!(decode::<WorkMessage>(b"\xff\x00").is_err());
    }

    #[test]
    fn truncation_marks_the_cut() {
        assert_eq!(truncate_for_message("abcdef", 3), "abc…");
        assert_eq!(truncate_for_message("abc", 3), "abc");
    }
}
