//! CSV records straight from `csv-core`, in memory bounded by [`MAX_RECORD_BYTES`], and
//! able to tell a file that ends inside a quoted field from one that ends cleanly.

use std::io;

use mui_shared::messages::Fields;

/// Largest record (one row, quoted line breaks included), in bytes of UTF-8. A larger one
/// is not kept in memory: it is handed over as a row failure (`record_too_large`) holding
/// only the start of its first fields.
pub const MAX_RECORD_BYTES: usize = mui_shared::messages::MAX_ROW_BYTES;

/// Most fields in one record; more makes the record too large as well.
const MAX_FIELDS: usize = 4096;

/// Characters of each field kept for the report of a record that is too large.
const TOO_LARGE_FIELD_CHARS: usize = 200;

/// One step of [`Records`].
pub(super) enum Item {
    /// A record and where it ended.
    Record {
        /// Its fields; one not asked for (see [`Records::next`]) is an empty string.
        fields: Fields,
        /// Whether every field is empty or whitespace (never for a record too large).
        blank: bool,
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
pub(super) struct Records<R> {
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
    /// Follows `bytes`. Only the quotes are looked at one by one (found with memchr): between
    /// two of them outside a quoted field, the state after a run of other bytes depends on its
    /// last byte alone, and inside a quoted field nothing but a quote changes it.
    fn feed(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let next = memchr::memchr(b'"', rest);
            let run = &rest[..next.unwrap_or(rest.len())];
            self.line += memchr::memchr_iter(b'\n', run).count() as u64;
            if self.state != QuoteState::Quoted {
                if let Some(&last) = run.last() {
                    self.state = if last == b'\n' || last == b'\r' || last == self.delimiter {
                        QuoteState::FieldStart
                    } else {
                        QuoteState::InField
                    };
                }
            }
            let Some(at) = next else { return };
            self.state = match self.state {
                QuoteState::FieldStart => {
                    self.opened_on = self.line;
                    QuoteState::Quoted
                }
                QuoteState::Quoted => QuoteState::QuoteInQuoted,
                QuoteState::QuoteInQuoted => QuoteState::Quoted,
                QuoteState::InField => QuoteState::InField,
            };
            rest = &rest[at + 1..];
        }
    }

    /// The byte-by-byte rule [`Quotes::feed`] follows in runs (kept to test it against).
    #[cfg(test)]
    fn feed_bytewise(&mut self, bytes: &[u8]) {
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
    pub(super) fn new(src: R, delimiter: u8) -> Self {
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
    pub(super) fn line(&self) -> u64 {
        self.core.line()
    }

    /// The next record. With `keep`, only the fields whose position it marks are handed
    /// over as text (the others are empty strings, which cost no allocation), for a pass that
    /// needs a few columns of every row; a record too large is always handed over whole.
    pub(super) fn next(&mut self, keep: Option<&[bool]>) -> io::Result<Item> {
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
                    let room = if keep.is_none() && !too_large {
                        outlen
                    } else {
                        0
                    };
                    let mut fields = Fields::with_capacity(endlen, room);
                    let mut blank = !too_large;
                    let mut start = 0usize;
                    // The decoder's output is UTF-8, and fields end where a delimiter (ASCII)
                    // was, so the record is checked once and its fields are slices of it.
                    let whole = std::str::from_utf8(&out[..outlen.min(out.len())]).ok();
                    let mut cut = String::new();
                    for (i, &end) in ends[..endlen].iter().enumerate() {
                        let end = end.min(outlen);
                        let from = start.min(end);
                        let text = match whole.and_then(|w| w.get(from..end)) {
                            Some(t) => std::borrow::Cow::Borrowed(t),
                            None => String::from_utf8_lossy(&out[from..end]),
                        };
                        blank = blank && text.trim().is_empty();
                        let kept = keep.is_none_or(|k| k.get(i).copied().unwrap_or(false));
                        if too_large {
                            cut.clear();
                            cut.extend(text.chars().take(TOO_LARGE_FIELD_CHARS));
                            fields.push(&cut);
                        } else if kept {
                            fields.push(&text);
                        } else {
                            fields.push("");
                        }
                        start = end;
                    }
                    if too_large && start < outlen {
                        // The field that was being read when the record outgrew the bound.
                        let text = String::from_utf8_lossy(&out[start..outlen]);
                        cut.clear();
                        cut.extend(text.chars().take(TOO_LARGE_FIELD_CHARS));
                        fields.push(&cut);
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
                        blank,
                        too_large: too_large.then_some(total as u64),
                        breaks_inside: breaks,
                    });
                }
                csv_core::ReadRecordResult::End => return Ok(Item::End),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> Quotes {
        Quotes {
            delimiter: b',',
            state: QuoteState::FieldStart,
            line: 1,
            opened_on: 1,
        }
    }

    /// The run-wise rule gives the byte-wise rule's state, line and opening line after every
    /// prefix of inputs full of quotes, delimiters and line breaks, fed in pieces of any size.
    #[test]
    fn runs_follow_quotes_as_bytes_do() {
        let alphabet = b"a,\"\n\r;x\"";
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut input = Vec::new();
            for _ in 0..64 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                input.push(alphabet[(seed % alphabet.len() as u64) as usize]);
            }
            let piece = 1 + (seed % 9) as usize;
            let (mut runs, mut bytes) = (fresh(), fresh());
            for part in input.chunks(piece) {
                runs.feed(part);
                bytes.feed_bytewise(part);
                assert_eq!(
                    (runs.state, runs.line, runs.opened_on),
                    (bytes.state, bytes.line, bytes.opened_on),
                    "after {:?}",
                    String::from_utf8_lossy(&input)
                );
            }
        }
    }
}
