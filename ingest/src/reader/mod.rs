//! Reading an uploaded file: sniffing its encoding and kind, then streaming it as a header and
//! chunks of rows, in memory that does not grow with the file.
//!
//! - [`sniff()`] ([`sniff`] module), the first pass: hashes the file, decides the encoding and
//!   recognises binaries and broken limits.
//! - [`read_chunks`] (this file), the second pass: decodes to UTF-8, splits CSV records
//!   (quoted commas and line breaks included; `records`) and hands rows over chunk by
//!   chunk, cut by rows and bytes ([`Chunking`]). Run once without publishing, it decides
//!   every file-level problem before anything is published.

mod records;
mod sniff;

use std::io::{self, BufReader, Read};

use mui_shared::codes::FileErrorCode;
use mui_shared::domain::{Column, HeaderMap};
use mui_shared::messages::{Fields, RawRow, TooLargeRow};

pub use records::MAX_RECORD_BYTES;
use records::{Item, Records};
pub use sniff::{sniff, FileProblem, Limits, Sniff, MAX_LINE_BYTES};

/// Reader that turns CRLF and lone CR line breaks into LF (so that line positions, and with
/// them spreadsheet row numbers, come out right whatever the file's line endings), and fails
/// once a physical line grows past [`MAX_LINE_BYTES`].
struct Lines<R> {
    inner: R,
    buf: Vec<u8>,
    line: usize,
    prev_cr: bool,
    /// Whether the last byte handed out was a line break (a final line without one gets one,
    /// so the last record's line count is right too).
    at_line_start: bool,
    done: bool,
}

impl<R: Read> Lines<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            buf: vec![0; 64 * 1024],
            line: 0,
            prev_cr: false,
            at_line_start: true,
            done: false,
        }
    }
}

impl<R: Read> Read for Lines<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            let want = out.len().min(self.buf.len());
            if self.done || out.is_empty() {
                return Ok(0);
            }
            let n = self.inner.read(&mut self.buf[..want])?;
            if n == 0 {
                self.done = true;
                if !self.at_line_start {
                    out[0] = b'\n';
                    return Ok(1);
                }
                return Ok(0);
            }
            // Runs of ordinary bytes are copied whole; only the line breaks (found with
            // memchr) are looked at one by one.
            let mut w = 0;
            let mut start = 0;
            let src = &self.buf[..n];
            for at in memchr::memchr2_iter(b'\n', b'\r', src).chain(std::iter::once(n)) {
                let run = &src[start..at];
                if !run.is_empty() {
                    self.prev_cr = false;
                    out[w..w + run.len()].copy_from_slice(run);
                    w += run.len();
                    self.line += run.len();
                    if self.line > MAX_LINE_BYTES {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, LineTooLong));
                    }
                }
                match src.get(at) {
                    Some(b'\r') => {
                        out[w] = b'\n';
                        w += 1;
                        self.prev_cr = true;
                        self.line = 0;
                    }
                    Some(b'\n') if self.prev_cr => self.prev_cr = false,
                    Some(_) => {
                        out[w] = b'\n';
                        w += 1;
                        self.line = 0;
                    }
                    None => {}
                }
                start = at + 1;
            }
            if w > 0 {
                self.at_line_start = out[w - 1] == b'\n';
                return Ok(w);
            }
        }
    }
}

#[derive(Debug)]
struct LineTooLong;
impl std::fmt::Display for LineTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a line is longer than {MAX_LINE_BYTES} bytes")
    }
}
impl std::error::Error for LineTooLong {}

/// What [`read_chunks`] found once the whole file was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadSummary {
    /// The header row as uploaded (trailing empty cells dropped).
    pub header: Vec<String>,
    /// Columns we ignored.
    pub ignored: Vec<String>,
    /// Delimiter used.
    pub delimiter: u8,
    /// Data rows handed over (blank rows are skipped and not counted).
    pub rows: u64,
    /// Chunks handed over.
    pub chunks: u32,
}

/// Names a delimiter for reports.
pub fn delimiter_label(d: u8) -> &'static str {
    match d {
        b',' => "comma",
        b';' => "semicolon",
        b'\t' => "tab",
        _ => "other",
    }
}

/// How a file is cut into chunk messages: at most `rows` rows and, past `max_bytes` bytes
/// of field data, the chunk is closed early. Both are fixed when a file is registered, so a
/// retry cuts the file exactly as the first attempt did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    /// Rows per chunk, at most.
    pub rows: usize,
    /// Bytes of field data per chunk, about (a chunk is closed once it reaches this; one row
    /// of at most [`MAX_RECORD_BYTES`] may take it past).
    pub max_bytes: usize,
}

impl Chunking {
    /// `rows` rows and the default byte bound.
    pub fn rows(rows: usize) -> Self {
        Self {
            rows,
            max_bytes: DEFAULT_CHUNK_MAX_BYTES,
        }
    }
}

/// Default byte bound of a chunk: far below RabbitMQ's largest message (128 MiB by default
/// in 3.10), even with JSON escaping (at most six bytes a character) of a full chunk plus
/// one largest row.
pub const DEFAULT_CHUNK_MAX_BYTES: usize = 4 << 20;

/// Second pass: decodes `file` with the sniffed encoding and calls `on_header` once with the
/// mapped header (a header problem stops the read before any row is handed over), then
/// `on_chunk` for each run of rows cut as `chunking` says, with the header again. Any
/// file-level problem (an unclosed quote running to the end of the file, too many rows…)
/// is found by this pass too, so running it once with a no-op `on_chunk` decides whether
/// the file is refused before anything is published.
pub fn read_chunks<R, H, C>(
    file: R,
    sniff: &Sniff,
    limits: Limits,
    chunking: Chunking,
    on_header: H,
    on_chunk: C,
) -> Result<Result<ReadSummary, FileProblem>, io::Error>
where
    R: Read,
    H: FnMut(&[String], &HeaderMap, u8),
    C: FnMut(u32, &[String], &HeaderMap, Vec<RawRow>) -> io::Result<()>,
{
    read_chunks_mapped(file, sniff, limits, chunking, &[], on_header, on_chunk)
}

/// The first header cell holding a control character other than a tab or a line break
/// (which a quoted cell may hold), with its position and the character.
fn header_control(cells: &[String]) -> Option<(usize, &str, char)> {
    cells.iter().enumerate().find_map(|(i, cell)| {
        cell.chars()
            .find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
            .map(|c| (i, cell.as_str(), c))
    })
}

/// Replaces each header cell that is one of the tenant's own names (`aliases`: normalised
/// name, our column) by our column's name.
pub fn apply_aliases(cells: &[String], aliases: &[(String, Column)]) -> Vec<String> {
    cells
        .iter()
        .map(|cell| {
            let key = mui_shared::domain::normalise_header(cell);
            match aliases.iter().find(|(k, _)| *k == key) {
                Some((_, col)) => col.name().to_owned(),
                None => cell.clone(),
            }
        })
        .collect()
}

/// [`read_chunks`] for a tenant with its own header names (`aliases`, see
/// `mui_shared::tenants::header_aliases`): the header is matched after they are replaced by
/// ours, and the chunks carry the replaced header; `on_header` gets the header as uploaded
/// (the failures CSV shows the tenant's own names).
#[allow(clippy::too_many_arguments)]
pub fn read_chunks_mapped<R, H, C>(
    file: R,
    sniff: &Sniff,
    limits: Limits,
    chunking: Chunking,
    aliases: &[(String, Column)],
    on_header: H,
    on_chunk: C,
) -> Result<Result<ReadSummary, FileProblem>, io::Error>
where
    R: Read,
    H: FnMut(&[String], &HeaderMap, u8),
    C: FnMut(u32, &[String], &HeaderMap, Vec<RawRow>) -> io::Result<()>,
{
    read_chunks_keeping(
        file, sniff, limits, chunking, aliases, None, on_header, on_chunk,
    )
}

/// [`read_chunks_mapped`], for a pass that needs only the cells of the columns in `keep`
/// (`None`: every cell): every other cell of a row is handed over empty (the row keeps its
/// length and positions), which spares a string for each. The file-level checks are the
/// same, so such a pass decides exactly what the full read would; but chunks may be cut
/// elsewhere (their size is counted from the cells kept).
#[allow(clippy::too_many_arguments)]
pub fn read_chunks_keeping<R, H, C>(
    file: R,
    sniff: &Sniff,
    limits: Limits,
    chunking: Chunking,
    aliases: &[(String, Column)],
    keep: Option<&[Column]>,
    mut on_header: H,
    mut on_chunk: C,
) -> Result<Result<ReadSummary, FileProblem>, io::Error>
where
    R: Read,
    H: FnMut(&[String], &HeaderMap, u8),
    C: FnMut(u32, &[String], &HeaderMap, Vec<RawRow>) -> io::Result<()>,
{
    if let Some(problem) = sniff.problem(&limits) {
        return Ok(Err(problem));
    }
    let chunk_rows = chunking.rows.max(1);
    let decoded = encoding_rs_io::DecodeReaderBytesBuilder::new()
        .encoding(Some(sniff.encoding))
        .bom_override(true)
        .strip_bom(true)
        .build(file);
    let mut limited = BufReader::with_capacity(256 * 1024, Lines::new(decoded));

    // Peek at the start of the decoded text to choose the delimiter from the header line.
    let mut head = Vec::with_capacity(64 * 1024);
    if let Err(e) = (&mut limited).take(64 * 1024).read_to_end(&mut head) {
        return match line_error(e) {
            Ok(Err(problem)) => Ok(Err(problem)),
            Ok(Ok(())) => unreachable_ok(),
            Err(e) => Err(e),
        };
    }
    let delimiter = detect_delimiter(&head);
    let source = BufReader::with_capacity(256 * 1024, io::Cursor::new(head).chain(limited));
    let mut records = Records::new(source, delimiter);

    let mut header: Option<(Vec<String>, HeaderMap)> = None;
    // Which cells of a row are handed over (with `keep`, once the header is known).
    let mut mask: Option<Vec<bool>> = None;
    let mut full = false;
    let mut rows: Vec<RawRow> = Vec::with_capacity(chunk_rows.min(100_000));
    let mut chunk_bytes: usize = 0;
    let mut chunk_no: u32 = 0;
    let mut total: u64 = 0;
    // Spreadsheet row of the last record read, and the line the reader stood on after it.
    // Line breaks are normalised to LF, so the reader's line count is exact; blank lines,
    // which it skips, still occupy spreadsheet rows.
    let mut last_row: u64 = 0;
    let mut line_after_last: u64 = 1;
    loop {
        let item = match records.next(mask.as_deref()) {
            Ok(item) => item,
            Err(e) => {
                return match line_error(e) {
                    Ok(Err(problem)) => Ok(Err(FileProblem {
                        message: format!("{} (around row {})", problem.message, last_row + 1),
                        ..problem
                    })),
                    Ok(Ok(())) => unreachable_ok(),
                    Err(e) => Err(e),
                }
            }
        };
        let (fields, blank, too_large, breaks_inside) = match item {
            Item::End => break,
            Item::Unclosed {
                breaks_inside,
                quote_line,
            } => {
                // No terminator was read: the record runs to the end of the input.
                let start_line = records.line().saturating_sub(breaks_inside);
                let skipped = start_line.saturating_sub(line_after_last);
                let row = last_row + 1 + skipped;
                return Ok(Err(FileProblem::new(
                    FileErrorCode::UnclosedQuote,
                    format!(
                        "a quote (\") opened in row {row}, on line {quote_line}, is never closed: everything after it, to the end of the file, would be one cell. Nothing was imported; close the quote (or double a quote that is part of a value: \"\") and upload the file again"
                    ),
                )));
            }
            Item::Record {
                fields,
                blank,
                too_large,
                breaks_inside,
            } => (fields, blank, too_large, breaks_inside),
        };
        let after = records.line();
        let start_line = after.saturating_sub(1 + breaks_inside);
        let skipped = start_line.saturating_sub(line_after_last);
        let row = last_row + 1 + skipped;
        last_row = row;
        line_after_last = after;

        match &header {
            None => {
                if blank {
                    continue;
                }
                if let Some(bytes) = too_large {
                    return Ok(Err(FileProblem::new(
                        FileErrorCode::MalformedCsv,
                        format!("the header row (row {row}) is {bytes} bytes long, more than the limit of {MAX_RECORD_BYTES} bytes for one row; is this really a CSV file with a header row?"),
                    )));
                }
                let mut cells = fields.to_vec();
                while cells.last().is_some_and(|c| c.trim().is_empty()) {
                    cells.pop();
                }
                let uploaded = cells;
                // A header names its columns in plain text. A control character in it (a
                // NUL, which a UTF-16 file carries as text, above all) is a broken export:
                // the column would silently not match, and PostgreSQL cannot even keep it.
                if let Some((i, cell, c)) = header_control(&uploaded) {
                    return Ok(Err(FileProblem::new(
                        FileErrorCode::MalformedCsv,
                        format!(
                            "the header's column {} ({cell:?}) holds a control character (U+{:04X}); a header names each column in plain text. Save the file again from your spreadsheet as \"CSV UTF-8\" and upload it again",
                            i + 1,
                            c as u32
                        ),
                    )));
                }
                let cells = apply_aliases(&uploaded, aliases);
                let map = match HeaderMap::parse(&cells) {
                    Ok(map) => map,
                    Err(e) => {
                        let code = match e {
                            mui_shared::domain::HeaderError::DuplicateColumn { .. } => {
                                FileErrorCode::DuplicateColumn
                            }
                            _ => FileErrorCode::MissingRequiredColumn,
                        };
                        return Ok(Err(FileProblem::new(code, e.to_string())));
                    }
                };
                on_header(&uploaded, &map, delimiter);
                if let Some(keep) = keep {
                    mask = Some(
                        map.positions
                            .iter()
                            .map(|c| c.is_some_and(|c| keep.contains(&c)))
                            .collect(),
                    );
                }
                header = Some((cells, map));
            }
            Some(_) => {
                if blank {
                    continue;
                }
                chunk_bytes += fields.text_len() + fields.len();
                rows.push(match too_large {
                    None => RawRow {
                        row,
                        fields,
                        too_large: None,
                    },
                    Some(bytes) => RawRow {
                        row,
                        fields: Fields::new(),
                        too_large: Some(TooLargeRow {
                            bytes,
                            start: fields.to_vec(),
                        }),
                    },
                });
                total += 1;
                if total > limits.max_rows {
                    return Ok(Err(FileProblem::new(
                        FileErrorCode::TooLarge,
                        format!("the file has more than {} rows, the most this service takes; split it into smaller files", limits.max_rows),
                    )));
                }
                full = rows.len() >= chunk_rows || chunk_bytes >= chunking.max_bytes;
            }
        }
        if full {
            full = false;
            chunk_bytes = 0;
            if let Some((cells, map)) = &header {
                on_chunk(
                    chunk_no,
                    cells,
                    map,
                    std::mem::replace(&mut rows, Vec::with_capacity(chunk_rows.min(100_000))),
                )?;
                chunk_no += 1;
            }
        }
    }
    let Some((header, map)) = header else {
        return Ok(Err(FileProblem::new(
            FileErrorCode::EmptyFile,
            "the file is empty: it has no header row and no users",
        )));
    };
    if total == 0 {
        return Ok(Err(FileProblem::new(
            FileErrorCode::HeaderOnly,
            "the file has a header row but no users below it",
        )));
    }
    if !rows.is_empty() {
        on_chunk(chunk_no, &header, &map, rows)?;
        chunk_no += 1;
    }
    Ok(Ok(ReadSummary {
        header,
        ignored: map.ignored,
        delimiter,
        rows: total,
        chunks: chunk_no,
    }))
}

fn line_error(e: io::Error) -> Result<Result<(), FileProblem>, io::Error> {
    if e.get_ref().is_some_and(|inner| inner.is::<LineTooLong>()) {
        Ok(Err(FileProblem::new(
            FileErrorCode::LineTooLong,
            format!("a line is longer than the limit of {MAX_LINE_BYTES} bytes; is this really a CSV file?"),
        )))
    } else {
        Err(e)
    }
}

fn unreachable_ok() -> Result<Result<ReadSummary, FileProblem>, io::Error> {
    Err(io::Error::other("unexpected reader state"))
}

/// Picks the delimiter from the first line: comma is the format; a header that is clearly
/// semicolon- or tab-separated (as Excel writes in many locales) is read with that.
pub fn detect_delimiter(head: &[u8]) -> u8 {
    let first_line = head
        .split(|b| *b == b'\n' || *b == b'\r')
        .find(|l| !l.iter().all(u8::is_ascii_whitespace))
        .unwrap_or(&[]);
    let count = |d: u8| first_line.iter().filter(|b| **b == d).count();
    let (commas, semis, tabs) = (count(b','), count(b';'), count(b'\t'));
    if commas == 0 && semis > 0 && semis >= tabs {
        b';'
    } else if commas == 0 && tabs > 0 {
        b'\t'
    } else {
        b','
    }
}

#[cfg(test)]
mod tests;
