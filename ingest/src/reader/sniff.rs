//! The first pass over a file: hash, size, encoding (BOM, else valid UTF-8, else the
//! detector's guess with the tenant's region as its hint, typically Windows-1252 from Excel),
//! binaries recognised, line lengths and an upper bound of the rows, so that a file breaking
//! a limit is refused before anything is read as rows.

use std::io::{self, Read, Seek, SeekFrom};

use encoding_rs::Encoding;
use mui_shared::codes::FileErrorCode;
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
    /// For a file of a tenant without a region, read in a guessed encoding: the detector's
    /// guess without the Western hint, when it differs (a close call the tenant is told of:
    /// a Turkish tenant without its region has its files read as Windows-1252). Never set
    /// with a region: a region set by the operator is a decision, not a guess.
    pub unhinted_guess: Option<&'static Encoding>,
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
    pub(super) fn new(code: FileErrorCode, message: impl Into<String>) -> Self {
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

/// The detector's hint when the tenant has no region: a country of Western Europe or the
/// Americas (for chardetng, any two-letter domain it does not list), where Excel writes
/// Windows-1252.
const WESTERN: &[u8] = b"us";

/// Bytes of a file that is not UTF-8 the encoding detector reads.
const DETECTOR_BYTES: u64 = 4 * 1024 * 1024;

/// The detector's hint for a tenant's region (`mui_shared::tenants::parse_region`); `None`
/// for no region, and for anything else (the database checks it too) rather than risk
/// chardetng's panic on a label it does not accept.
///
/// chardetng's hints are made for web pages: for Poland, Hungary and Slovenia it prefers
/// ISO-8859-2, which their sites use; Excel there writes Windows-1250, as in Czechia, so those
/// regions get Czechia's hint.
fn region_hint(region: Option<&str>) -> Option<&[u8]> {
    match region {
        Some("pl" | "hu" | "si") => Some(b"cz"),
        Some(r) if mui_shared::tenants::is_region(r) => Some(r.as_bytes()),
        _ => None,
    }
}

/// First pass: hash, size, encoding, binary detection, and the structural limits (line
/// length, row count) so that a file breaking them is refused before anything is imported.
/// Leaves `file` at its start.
///
/// A file with a BOM is read in its BOM's encoding, a file of valid UTF-8 as UTF-8, a damaged
/// UTF-8 file is refused (`broken_utf8`); any other is the encoding chardetng guesses, with the
/// tenant's `region` as its hint: without one, Windows-1252 (what Excel writes in Western
/// Europe and the Americas) unless the text is clearly another script's (Cyrillic, Greek...);
/// with `cz`, Windows-1250 unless clearly another.
pub fn sniff<R: Read + Seek>(file: &mut R, region: Option<&str>) -> io::Result<Sniff> {
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    let mut detector = chardetng::EncodingDetector::new(chardetng::Iso2022JpDetection::Deny);
    let mut buf = vec![0u8; 256 * 1024];
    let mut head: Vec<u8> = Vec::new();
    let mut size: u64 = 0;
    let mut utf8 = Utf8Scan::default();
    let mut records = RecordCount::new();
    let mut fed_detector = false;
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
        utf8.feed(bytes);
        records.feed(bytes);
        // Line lengths from the line breaks alone (memchr), a line's length checked at its
        // end or at the end of this buffer.
        let mut start = 0;
        for at in memchr::memchr2_iter(b'\n', b'\r', bytes).chain(std::iter::once(n)) {
            line_len += at - start;
            if line_len > MAX_LINE_BYTES && long_line.is_none() {
                long_line = Some(line_no);
            }
            match bytes.get(at) {
                Some(b'\n') => {
                    line_len = 0;
                    line_no += 1;
                }
                Some(_) => line_len = 0,
                None => {}
            }
            start = at + 1;
        }
    }
    utf8.finish();
    records.feed(&[]);
    file.seek(SeekFrom::Start(0))?;
    // The detector is needed only for a file that is not UTF-8: it reads the first 4 MiB
    // then (a UTF-8 file, the usual case, is read once).
    let mut guess = |hint: Option<&[u8]>| -> io::Result<&'static Encoding> {
        if !fed_detector {
            fed_detector = true;
            let mut head = Vec::new();
            (&mut *file).take(DETECTOR_BYTES).read_to_end(&mut head)?;
            file.seek(SeekFrom::Start(0))?;
            detector.feed(&head, true);
        }
        Ok(detector.guess(hint, chardetng::Utf8Detection::Deny))
    };

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
    let mut unhinted_guess = None;
    let encoding = match bom_encoding {
        Some(enc) => enc,
        None if utf8.invalid == 0 => encoding_rs::UTF_8,
        None if broken_utf8.is_some() => encoding_rs::UTF_8,
        None => match region_hint(region) {
            Some(hint) => guess(Some(hint))?,
            None => {
                let western = guess(Some(WESTERN))?;
                let unhinted = guess(None)?;
                unhinted_guess = (unhinted != western).then_some(unhinted);
                western
            }
        },
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
        unhinted_guess,
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
