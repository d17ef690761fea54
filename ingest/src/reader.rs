//! Reading an uploaded file: sniffing its encoding and kind, then streaming it as a header and
//! chunks of rows, in memory that does not grow with the file.
//!
//! Two passes over the same open file: [`sniff`] hashes it, decides the encoding (BOM, else
//! valid UTF-8, else the detector's guess, typically Windows-1252 from Excel) and recognises
//! binaries; [`read_chunks`] decodes to UTF-8, splits CSV records (quoted commas and line
//! breaks included) and hands rows over chunk by chunk.

use std::io::{self, BufReader, Read, Seek, SeekFrom};

use encoding_rs::Encoding;
use mui_shared::domain::HeaderMap;
use mui_shared::messages::{FileErrorCode, RawRow, TooLargeRow};
use sha2::{Digest, Sha256};

/// Longest physical line accepted (bytes); a longer one makes the file fail with
/// [`FileErrorCode::MalformedCsv`] instead of growing memory without bound.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// What the first pass learned about a file.
#[derive(Debug, Clone)]
pub struct Sniff {
    /// Hex SHA-256 of the content.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Detected encoding.
    pub encoding: &'static Encoding,
    /// Whether the file starts with a byte-order mark.
    pub bom: bool,
    /// If the content is clearly not text: the likely format.
    pub binary: Option<&'static str>,
    /// Data rows, at most (unknown for UTF-16).
    pub rows_at_most: Option<u64>,
    /// First line longer than [`MAX_LINE_BYTES`].
    pub long_line: Option<u64>,
    /// For a damaged UTF-8 file: byte offset and line of the first invalid byte.
    pub broken_utf8: Option<(u64, u64)>,
}

impl Sniff {
    /// The encoding as written in reports (`UTF-8 with BOM`, `windows-1252`).
    pub fn encoding_label(&self) -> String {
        if self.bom {
            format!("{} with BOM", self.encoding.name())
        } else {
            self.encoding.name().to_owned()
        }
    }
}

/// A file-level problem: nothing of the file is imported, and the tenant is told this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FileProblem {
    /// Stable code.
    pub code: FileErrorCode,
    /// What exactly is wrong, for the tenant.
    pub message: String,
}

impl FileProblem {
    fn new(code: FileErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Limits a deployment sets on uploaded files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest file accepted, in bytes.
    pub max_bytes: u64,
    /// Most data rows accepted.
    pub max_rows: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 30,
            max_rows: 5_000_000,
        }
    }
}

/// Streaming UTF-8 check that keeps going past errors, to tell a file that is mostly UTF-8
/// with a few broken bytes from one in another encoding.
#[derive(Debug, Default)]
struct Utf8Scan {
    carry: Vec<u8>,
    /// Offset in the file of `carry[0]`.
    offset: u64,
    /// Line breaks before `offset`.
    lines_before: u64,
    multibyte: u64,
    invalid: u64,
    first_invalid: Option<(u64, u64)>,
}

impl Utf8Scan {
    fn feed(&mut self, bytes: &[u8]) {
        self.carry.extend_from_slice(bytes);
        let data = std::mem::take(&mut self.carry);
        let mut i = 0;
        loop {
            match std::str::from_utf8(&data[i..]) {
                Ok(valid) => {
                    self.multibyte += valid.bytes().filter(|b| *b >= 0xC0).count() as u64;
                    i = data.len();
                    break;
                }
                Err(e) => {
                    let good = &data[i..i + e.valid_up_to()];
                    self.multibyte += good.iter().filter(|b| **b >= 0xC0).count() as u64;
                    match e.error_len() {
                        None => {
                            // An incomplete sequence at the end: wait for more bytes.
                            i += e.valid_up_to();
                            break;
                        }
                        Some(n) => {
                            let at = i + e.valid_up_to();
                            if self.first_invalid.is_none() {
                                let line = self.lines_before
                                    + data[..at].iter().filter(|b| **b == b'\n').count() as u64
                                    + 1;
                                self.first_invalid = Some((self.offset + at as u64, line));
                            }
                            self.invalid += n as u64;
                            i = at + n;
                        }
                    }
                }
            }
        }
        let (done, rest) = data.split_at(i);
        self.lines_before += done.iter().filter(|b| **b == b'\n').count() as u64;
        self.offset += done.len() as u64;
        self.carry = rest.to_vec();
    }

    fn finish(&mut self) {
        if !self.carry.is_empty() {
            if self.first_invalid.is_none() {
                self.first_invalid = Some((self.offset, self.lines_before + 1));
            }
            self.invalid += self.carry.len() as u64;
            self.carry.clear();
        }
    }
}

/// Counts CSV records on the raw bytes (quoted line breaks included), with `csv-core`.
#[derive(Debug)]
struct RecordCount {
    reader: csv_core::Reader,
    records: u64,
    out: Vec<u8>,
    ends: Vec<usize>,
}

impl RecordCount {
    fn new() -> Self {
        Self {
            reader: csv_core::Reader::new(),
            records: 0,
            out: vec![0; 64 * 1024],
            ends: vec![0; 1024],
        }
    }

    fn feed(&mut self, mut input: &[u8]) {
        let at_end = input.is_empty();
        loop {
            let (result, nin, _, _) = self
                .reader
                .read_record(input, &mut self.out, &mut self.ends);
            input = &input[nin..];
            match result {
                csv_core::ReadRecordResult::InputEmpty => {
                    if !at_end {
                        return;
                    }
                }
                csv_core::ReadRecordResult::OutputFull
                | csv_core::ReadRecordResult::OutputEndsFull => {}
                csv_core::ReadRecordResult::Record => self.records += 1,
                csv_core::ReadRecordResult::End => return,
            }
        }
    }
}

/// First pass: hash, size, encoding, binary detection, and the structural limits (line
/// length, row count) so that a file breaking them is refused before anything is imported.
/// Leaves `file` at its start.
pub fn sniff<R: Read + Seek>(file: &mut R) -> io::Result<Sniff> {
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    let mut detector = chardetng::EncodingDetector::new(chardetng::Iso2022JpDetection::Deny);
    let mut buf = vec![0u8; 256 * 1024];
    let mut head: Vec<u8> = Vec::new();
    let mut size: u64 = 0;
    let mut utf8 = Utf8Scan::default();
    let mut records = RecordCount::new();
    let mut fed: usize = 0;
    let mut nul = false;
    let mut line_len: usize = 0;
    let mut line_no: u64 = 1;
    let mut long_line: Option<u64> = None;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let bytes = &buf[..n];
        hasher.update(bytes);
        size += n as u64;
        if head.len() < 16 {
            head.extend_from_slice(&bytes[..bytes.len().min(16 - head.len())]);
        }
        nul |= bytes.contains(&0);
        if fed < 4 * 1024 * 1024 {
            detector.feed(bytes, false);
            fed += n;
        }
        utf8.feed(bytes);
        records.feed(bytes);
        for &b in bytes {
            if b == b'\n' || b == b'\r' {
                line_len = 0;
                if b == b'\n' {
                    line_no += 1;
                }
            } else {
                line_len += 1;
                if line_len > MAX_LINE_BYTES && long_line.is_none() {
                    long_line = Some(line_no);
                }
            }
        }
    }
    utf8.finish();
    records.feed(&[]);
    detector.feed(&[], true);
    file.seek(SeekFrom::Start(0))?;

    let (bom_encoding, bom) = match Encoding::for_bom(&head) {
        Some((enc, _)) => (Some(enc), true),
        None => (None, false),
    };
    let utf16 = bom_encoding.is_some_and(|e| e != encoding_rs::UTF_8);
    let binary = if utf16 {
        None // UTF-16 text legitimately holds NUL bytes.
    } else {
        binary_kind(&head, nul)
    };
    // Mostly valid UTF-8 with some broken bytes: a damaged UTF-8 file, not Windows-1252.
    let broken_utf8 = match utf8.first_invalid {
        Some(at) if !utf16 && bom_encoding.is_none() && utf8.multibyte >= utf8.invalid => Some(at),
        Some(at) if bom_encoding == Some(encoding_rs::UTF_8) => Some(at),
        _ => None,
    };
    let encoding = match bom_encoding {
        Some(enc) => enc,
        None if utf8.invalid == 0 => encoding_rs::UTF_8,
        None if broken_utf8.is_some() => encoding_rs::UTF_8,
        None => detector.guess(None, chardetng::Utf8Detection::Deny),
    };
    Ok(Sniff {
        sha256: hex::encode(hasher.finalize()),
        size,
        encoding,
        bom,
        binary,
        // Records minus the header (blank lines are records to csv-core, so this is an upper
        // bound); not known for UTF-16, whose bytes csv-core cannot read.
        rows_at_most: (!utf16).then(|| records.records.saturating_sub(1)),
        long_line,
        broken_utf8,
    })
}

impl Sniff {
    /// A problem the first pass found, if any: the file is refused before any row is read.
    pub fn problem(&self, limits: &Limits) -> Option<FileProblem> {
        if let Some(kind) = self.binary {
            return Some(FileProblem::new(
                FileErrorCode::NotCsv,
                format!("the file is not CSV text: it looks like {kind}. Save it as \"CSV UTF-8 (Comma delimited)\" and upload the .csv"),
            ));
        }
        if self.size > limits.max_bytes {
            return Some(FileProblem::new(
                FileErrorCode::TooLarge,
                format!(
                    "the file is {} bytes; this service takes files of at most {} bytes. Split it into smaller files",
                    self.size, limits.max_bytes
                ),
            ));
        }
        if let Some(rows) = self.rows_at_most {
            if rows > limits.max_rows {
                return Some(FileProblem::new(
                    FileErrorCode::TooLarge,
                    format!(
                        "the file has {rows} rows; this service takes at most {} rows a file. Split it into smaller files",
                        limits.max_rows
                    ),
                ));
            }
        }
        if let Some(line) = self.long_line {
            return Some(FileProblem::new(
                FileErrorCode::LineTooLong,
                format!("line {line} is longer than the limit of {MAX_LINE_BYTES} bytes; is this really a CSV file?"),
            ));
        }
        if let Some((offset, line)) = self.broken_utf8 {
            return Some(FileProblem::new(
                FileErrorCode::BadEncoding,
                format!(
                    "the file is UTF-8 but holds bytes that are not valid UTF-8, first on line {line} (at byte offset {offset}); \
                     re-save it as \"CSV UTF-8\" from your spreadsheet"
                ),
            ));
        }
        None
    }
}

fn binary_kind(head: &[u8], has_nul: bool) -> Option<&'static str> {
    if head.starts_with(b"PK\x03\x04") {
        Some("a ZIP container (an Excel .xlsx, a Numbers file or another zipped document)")
    } else if head.starts_with(&[0xD0, 0xCF, 0x11, 0xE0]) {
        Some("an old-style Excel .xls workbook")
    } else if head.starts_with(b"%PDF") {
        Some("a PDF document")
    } else if head.starts_with(&[0x1F, 0x8B]) {
        Some("a gzip archive")
    } else if has_nul {
        Some("a binary file")
    } else {
        None
    }
}

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
            let mut w = 0;
            for &b in &self.buf[..n] {
                match b {
                    b'\r' => {
                        out[w] = b'\n';
                        w += 1;
                        self.prev_cr = true;
                        self.line = 0;
                    }
                    b'\n' if self.prev_cr => self.prev_cr = false,
                    b'\n' => {
                        out[w] = b'\n';
                        w += 1;
                        self.line = 0;
                    }
                    _ => {
                        self.prev_cr = false;
                        out[w] = b;
                        w += 1;
                        self.line += 1;
                        if self.line > MAX_LINE_BYTES {
                            return Err(io::Error::new(io::ErrorKind::InvalidData, LineTooLong));
                        }
                    }
                }
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

/// Largest record (one row, quoted line breaks included), in bytes of UTF-8. A larger one
/// is not kept in memory: it is handed over as a row failure (`record_too_large`) holding
/// only the start of its first fields.
pub const MAX_RECORD_BYTES: usize = mui_shared::messages::MAX_ROW_BYTES;

/// Most fields in one record; more makes the record too large as well.
const MAX_FIELDS: usize = 4096;

/// Characters of each field kept for the report of a record that is too large.
const TOO_LARGE_FIELD_CHARS: usize = 200;

/// One step of [`Records`].
enum Item {
    /// A record and where it ended.
    Record {
        fields: Vec<String>,
        /// Bytes of the record if it was larger than [`MAX_RECORD_BYTES`] (then `fields`
        /// holds only the start of it).
        too_large: Option<u64>,
        /// Line breaks inside its fields.
        breaks_inside: u64,
    },
    /// The input ended inside a quoted field.
    Unclosed {
        /// Line breaks inside the record (all swallowed by the open quote).
        breaks_inside: u64,
        /// The line the quote was opened on.
        quote_line: u64,
    },
    /// No more records.
    End,
}

/// CSV records straight from `csv-core`, in memory bounded by [`MAX_RECORD_BYTES`], that
/// can tell a file ending inside a quoted field from one ending cleanly (the `csv` crate
/// hands back whatever it read, and grows without bound on an unclosed quote).
struct Records<R> {
    src: R,
    core: csv_core::Reader,
    out: Vec<u8>,
    ends: Vec<usize>,
    scratch: Vec<u8>,
    scratch_ends: Vec<usize>,
    quotes: Quotes,
}

/// Follows quoting the way `csv-core` reads it (a quote opens a quoted field only as the
/// field's first byte; `""` inside is a quote; after the closing quote the rest of the field
/// is literal), to know at the end of the input whether a quoted field is still open, and
/// on which line it opened. `csv-core` itself hands back the open field as a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QuoteState {
    FieldStart,
    InField,
    Quoted,
    QuoteInQuoted,
}

#[derive(Debug)]
struct Quotes {
    delimiter: u8,
    state: QuoteState,
    line: u64,
    opened_on: u64,
}

impl Quotes {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.state = match (self.state, b) {
                (QuoteState::FieldStart, b'"') => {
                    self.opened_on = self.line;
                    QuoteState::Quoted
                }
                (QuoteState::Quoted, b'"') => QuoteState::QuoteInQuoted,
                (QuoteState::Quoted, _) => QuoteState::Quoted,
                (QuoteState::QuoteInQuoted, b'"') => QuoteState::Quoted,
                (_, b'\n' | b'\r') => QuoteState::FieldStart,
                (_, d) if d == self.delimiter => QuoteState::FieldStart,
                _ => QuoteState::InField,
            };
            if b == b'\n' {
                self.line += 1;
            }
        }
    }
}

impl<R: io::BufRead> Records<R> {
    fn new(src: R, delimiter: u8) -> Self {
        Self {
            src,
            core: csv_core::ReaderBuilder::new().delimiter(delimiter).build(),
            out: vec![0; 4096],
            ends: vec![0; 64],
            scratch: vec![0; 64 * 1024],
            scratch_ends: vec![0; 1024],
            quotes: Quotes {
                delimiter,
                state: QuoteState::FieldStart,
                line: 1,
                opened_on: 1,
            },
        }
    }

    /// The line the reader stands on (1-based; line breaks are normalised to LF).
    fn line(&self) -> u64 {
        self.core.line()
    }

    fn next(&mut self) -> io::Result<Item> {
        let Self {
            src,
            core,
            out,
            ends,
            scratch,
            scratch_ends,
            quotes,
        } = self;
        let mut outlen = 0usize;
        let mut endlen = 0usize;
        // Bytes of the record produced so far (kept or not), and line breaks among them.
        let mut total = 0usize;
        let mut breaks = 0u64;
        let mut too_large = false;
        loop {
            let input = src.fill_buf()?;
            if input.is_empty() && quotes.state == QuoteState::Quoted {
                return Ok(Item::Unclosed {
                    breaks_inside: breaks,
                    quote_line: quotes.opened_on,
                });
            }
            let (res, nin, nout, nend) = if too_large {
                core.read_record(input, scratch, scratch_ends)
            } else {
                core.read_record(input, &mut out[outlen..], &mut ends[endlen..])
            };
            quotes.feed(&input[..nin]);
            src.consume(nin);
            let produced: &[u8] = if too_large {
                &scratch[..nout]
            } else {
                &out[outlen..outlen + nout]
            };
            breaks += produced.iter().filter(|b| **b == b'\n').count() as u64;
            total += nout;
            if !too_large {
                outlen += nout;
                endlen += nend;
            }
            match res {
                csv_core::ReadRecordResult::InputEmpty => {}
                csv_core::ReadRecordResult::OutputFull => {
                    if !too_large && out.len() < MAX_RECORD_BYTES {
                        let grown = (out.len() * 2).min(MAX_RECORD_BYTES);
                        out.resize(grown, 0);
                    } else {
                        too_large = true;
                    }
                }
                csv_core::ReadRecordResult::OutputEndsFull => {
                    if !too_large && ends.len() < MAX_FIELDS {
                        let grown = (ends.len() * 2).min(MAX_FIELDS);
                        ends.resize(grown, 0);
                    } else {
                        too_large = true;
                    }
                }
                csv_core::ReadRecordResult::Record => {
                    let mut fields = Vec::with_capacity(endlen);
                    let mut start = 0usize;
                    for &end in &ends[..endlen] {
                        let end = end.min(outlen);
                        let text = String::from_utf8_lossy(&out[start.min(end)..end]);
                        fields.push(if too_large {
                            text.chars().take(TOO_LARGE_FIELD_CHARS).collect()
                        } else {
                            text.into_owned()
                        });
                        start = end;
                    }
                    if too_large && start < outlen {
                        // The field that was being read when the record outgrew the bound.
                        let text = String::from_utf8_lossy(&out[start..outlen]);
                        fields.push(text.chars().take(TOO_LARGE_FIELD_CHARS).collect());
                    }
                    if too_large {
                        // Shrink back so that one large record does not keep its memory.
                        out.truncate(4096);
                        out.shrink_to_fit();
                        ends.truncate(64);
                        ends.shrink_to_fit();
                    }
                    return Ok(Item::Record {
                        fields,
                        too_large: too_large.then_some(total as u64),
                        breaks_inside: breaks,
                    });
                }
                csv_core::ReadRecordResult::End => return Ok(Item::End),
            }
        }
    }
}

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
        let item = match records.next() {
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
        let (fields, too_large, breaks_inside) = match item {
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
                too_large,
                breaks_inside,
            } => (fields, too_large, breaks_inside),
        };
        let after = records.line();
        let start_line = after.saturating_sub(1 + breaks_inside);
        let skipped = start_line.saturating_sub(line_after_last);
        let row = last_row + 1 + skipped;
        last_row = row;
        line_after_last = after;

        let blank = too_large.is_none() && fields.iter().all(|f| f.trim().is_empty());
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
                let mut cells = fields;
                while cells.last().is_some_and(|c| c.trim().is_empty()) {
                    cells.pop();
                }
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
                on_header(&cells, &map, delimiter);
                header = Some((cells, map));
            }
            Some(_) => {
                if blank {
                    continue;
                }
                chunk_bytes += fields.iter().map(String::len).sum::<usize>() + fields.len();
                rows.push(match too_large {
                    None => RawRow {
                        row,
                        fields,
                        too_large: None,
                    },
                    Some(bytes) => RawRow {
                        row,
                        fields: Vec::new(),
                        too_large: Some(TooLargeRow {
                            bytes,
                            start: fields,
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
mod tests {
    use super::*;
    use std::io::Cursor;

    fn read(bytes: &[u8]) -> (Sniff, Result<ReadSummary, FileProblem>, Vec<RawRow>) {
        let mut cur = Cursor::new(bytes.to_vec());
        let s = sniff(&mut cur).unwrap();
        let mut all = Vec::new();
        let r = read_chunks(
            cur,
            &s,
            Limits::default(),
            Chunking::rows(2),
            |_, _, _| {},
            |_, _, _, rows| {
                all.extend(rows);
                Ok(())
            },
        )
        .unwrap();
        (s, r, all)
    }

    #[test]
    fn utf8_with_bom_and_crlf() {
        let (s, r, rows) = read(
            b"\xEF\xBB\xBFunique_id,login_source,first_name\r\n1,sso,Ren\xC3\xA9e\r\n2,sso,Bob\r\n",
        );
        assert_eq!(s.encoding_label(), "UTF-8 with BOM");
        let r = r.unwrap();
        assert_eq!(r.header[0], "unique_id");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].fields[2], "Renée");
        assert_eq!(rows[0].row, 2);
    }

    #[test]
    fn windows_1252_is_detected() {
        let (s, r, rows) =
            read(b"unique_id,login_source,first_name\r\n1,sso,Ren\xE9e Mu\xF1oz\r\n");
        assert_eq!(s.encoding.name(), "windows-1252");
        assert!(r.is_ok());
        assert_eq!(rows[0].fields[2], "Renée Muñoz");
    }

    #[test]
    fn quoted_newlines_and_blank_lines_keep_spreadsheet_row_numbers() {
        for data in [
            &b"unique_id,login_source,street\n1,sso,\"a\nb, c\"\n\n3,sso,x\n\n7,sso,y"[..],
            &b"unique_id,login_source,street\r\n1,sso,\"a\r\nb, c\"\r\n\r\n3,sso,x\r\n\r\n7,sso,y\r\n"[..],
            &b"unique_id,login_source,street\r1,sso,\"a\rb, c\"\r\r3,sso,x\r\r7,sso,y\r"[..],
        ] {
            let (_, r, rows) = read(data);
            let r = r.unwrap();
            assert_eq!(r.rows, 3);
            assert_eq!(rows[0].row, 2);
            assert_eq!(rows[0].fields[2], "a\nb, c");
            assert_eq!(rows[1].row, 4, "{rows:?}");
            assert_eq!(rows[2].row, 6, "{rows:?}");
        }
    }

    #[test]
    fn chunks_are_bounded() {
        let (_, r, rows) = read(b"unique_id,login_source\n1,a\n2,a\n3,a\n4,a\n5,a\n");
        let r = r.unwrap();
        assert_eq!(r.chunks, 3);
        assert_eq!(rows.len(), 5);
    }

    #[test]
    fn broken_utf8_is_reported_where_it_is() {
        let (s, r, _) =
            read(b"unique_id,login_source,first_name\n1,sso,Ren\xC3\xA9e\n2,sso,Bj\xF8rn\n");
        assert_eq!(s.encoding.name(), "UTF-8");
        let p = r.unwrap_err();
        assert_eq!(p.code, FileErrorCode::BadEncoding);
        assert!(
            p.message.contains("line 3 (at byte offset 55)"),
            "{}",
            p.message
        );
    }

    #[test]
    fn utf16_with_bom() {
        let text = "unique_id,login_source,first_name\r\n1,sso,Zoë\r\n";
        let mut bytes = vec![0xFF, 0xFE];
        for unit in text.encode_utf16() {
            bytes.extend_from_slice(&unit.to_le_bytes());
        }
        let (s, r, rows) = read(&bytes);
        assert_eq!(s.encoding_label(), "UTF-16LE with BOM");
        assert_eq!(r.unwrap().rows, 1);
        assert_eq!(rows[0].fields[2], "Zoë");
    }

    #[test]
    fn limits_refuse_before_reading_rows() {
        let mut cur = Cursor::new(b"unique_id,login_source\n1,a\n\"2\nstill 2\",a\n3,a\n".to_vec());
        let s = sniff(&mut cur).unwrap();
        assert_eq!(s.rows_at_most, Some(3));
        let limits = Limits {
            max_bytes: 1 << 20,
            max_rows: 2,
        };
        assert_eq!(s.problem(&limits).unwrap().code, FileErrorCode::TooLarge);
        let limits = Limits {
            max_bytes: 10,
            max_rows: 100,
        };
        assert!(s
            .problem(&limits)
            .unwrap()
            .message
            .contains("at most 10 bytes"));
        assert!(s.problem(&Limits::default()).is_none());
    }

    #[test]
    fn semicolons_and_tabs() {
        assert_eq!(detect_delimiter(b"unique_id;login_source;email\n"), b';');
        assert_eq!(detect_delimiter(b"unique_id\tlogin_source\n"), b'\t');
        assert_eq!(detect_delimiter(b"unique_id,login_source;x\n"), b',');
        let (_, r, rows) = read(b"unique_id;login_source\n1;sso\n");
        assert_eq!(r.unwrap().delimiter, b';');
        assert_eq!(rows[0].fields, vec!["1", "sso"]);
    }

    #[test]
    fn file_level_problems() {
        let (_, r, _) = read(b"");
        assert_eq!(r.unwrap_err().code, FileErrorCode::EmptyFile);
        let (_, r, _) = read(b"\n\n");
        assert_eq!(r.unwrap_err().code, FileErrorCode::EmptyFile);
        let (_, r, _) = read(b"unique_id,login_source\n");
        assert_eq!(r.unwrap_err().code, FileErrorCode::HeaderOnly);
        let (_, r, _) = read(b"unique_id,email\n1,a@b.c\n");
        let p = r.unwrap_err();
        assert_eq!(p.code, FileErrorCode::MissingRequiredColumn);
        assert!(p.message.contains("login_source"), "{}", p.message);
        let (_, r, _) = read(b"PK\x03\x04\x14\x00\x06\x00rest-of-zip");
        let p = r.unwrap_err();
        assert_eq!(p.code, FileErrorCode::NotCsv);
        assert!(p.message.contains("xlsx"), "{}", p.message);
    }

    #[test]
    fn a_huge_line_is_a_file_problem_not_a_crash() {
        let mut data = b"unique_id,login_source\n1,".to_vec();
        data.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES + 10));
        let (_, r, _) = read(&data);
        let p = r.unwrap_err();
        assert_eq!(p.code, FileErrorCode::LineTooLong);
        assert!(p.message.starts_with("line 2 is longer"), "{}", p.message);
    }

    #[test]
    fn an_unclosed_quote_names_its_row_and_line() {
        let mut data =
            b"unique_id,login_source,street\n1,sso,\"a\nb\"\n2,sso,x\n3,sso,\"never closed\n"
                .to_vec();
        for i in 0..1000 {
            data.extend_from_slice(format!("{i},sso,y\n").as_bytes());
        }
        let (_, r, _) = read(&data);
        let p = r.unwrap_err();
        assert_eq!(p.code, FileErrorCode::UnclosedQuote);
        assert!(p.message.contains("row 4, on line 5"), "{}", p.message);
        // A quote closed on the last line is fine.
        let (_, r, rows) = read(b"unique_id,login_source,street\n1,sso,\"a\nb\"");
        assert!(r.is_ok());
        assert_eq!(rows[0].fields[2], "a\nb");
    }

    #[test]
    fn a_huge_record_is_a_row_failure_not_the_file() {
        let mut data = b"unique_id,login_source,street\n1,sso,\"".to_vec();
        for _ in 0..30_000 {
            data.extend_from_slice(b"0123456789012345678901234567890123456789\n");
        }
        data.extend_from_slice(b"\"\n2,sso,x\n");
        let (_, r, rows) = read(&data);
        let r = r.unwrap();
        assert_eq!(r.rows, 2);
        let big = rows[0].too_large.as_ref().unwrap();
        assert!(big.bytes > MAX_RECORD_BYTES as u64);
        assert!(rows[0].fields.is_empty());
        assert_eq!(big.start[0], "1");
        assert_eq!(rows[1].row, 3);
        assert_eq!(rows[1].fields[2], "x");
    }

    #[test]
    fn chunks_are_bounded_in_bytes() {
        let mut data = b"unique_id,login_source,street\n".to_vec();
        for i in 0..100 {
            data.extend_from_slice(format!("{i},sso,{}\n", "s".repeat(1000)).as_bytes());
        }
        let mut cur = Cursor::new(data);
        let s = sniff(&mut cur).unwrap();
        let mut sizes = Vec::new();
        let r = read_chunks(
            cur,
            &s,
            Limits::default(),
            Chunking {
                rows: 1000,
                max_bytes: 10_000,
            },
            |_, _, _| {},
            |_, _, _, rows| {
                sizes.push(rows.len());
                Ok(())
            },
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.rows, 100);
        assert!(sizes.len() >= 10, "{sizes:?}");
        assert!(sizes.iter().all(|n| *n <= 10), "{sizes:?}");
    }
}
