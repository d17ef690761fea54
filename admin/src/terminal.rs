//! What muictl writes to an operator's terminal is tenant text in part (file names, header
//! cells in error messages, failed rows): a name like `\x1b]0;…\x07users.csv` would otherwise
//! drive the terminal (retitle it, move the cursor, hide lines, or worse on old emulators).
//! [`TerminalSafe`] shows every control character as an escape instead. Output sent to a file
//! or a pipe is left exact (a failures CSV, JSON), since there it is data, not a screen.

use std::io::{self, Write};

/// Writes through to `inner`, with each control character except a line feed and a tab
/// (C0, DEL, and the C1 controls U+0080–U+009F, which some terminals obey like ESC) written
/// as `\xNN` or `\u{NN}`.
pub struct TerminalSafe<W: Write> {
    inner: W,
    /// A 0xC2 byte at the end of the last write, whose next byte decides whether it starts a
    /// C1 control.
    pending_c2: bool,
}

impl<W: Write> TerminalSafe<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            pending_c2: false,
        }
    }
}

impl<W: Write> Write for TerminalSafe<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = Vec::with_capacity(buf.len());
        for &b in buf {
            if self.pending_c2 {
                self.pending_c2 = false;
                if (0x80..=0x9F).contains(&b) {
                    out.extend_from_slice(format!("\\u{{{b:x}}}").as_bytes());
                    continue;
                }
                out.push(0xC2);
            }
            match b {
                b'\n' | b'\t' => out.push(b),
                0x00..=0x1F | 0x7F => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
                0xC2 => self.pending_c2 = true,
                _ => out.push(b),
            }
        }
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.pending_c2 {
            self.pending_c2 = false;
            self.inner.write_all(&[0xC2])?;
        }
        self.inner.flush()
    }
}

impl<W: Write> Drop for TerminalSafe<W> {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn safe(parts: &[&[u8]]) -> String {
        let mut buf = Vec::new();
        {
            let mut w = TerminalSafe::new(&mut buf);
            for p in parts {
                w.write_all(p).unwrap();
            }
        }
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn controls_are_shown_not_obeyed() {
        assert_eq!(
            safe(&[b"\x1b]0;owned\x07users.csv\r\n"]),
            "\\x1b]0;owned\\x07users.csv\\x0d\n"
        );
        assert_eq!(safe(&[b"a\tb\x7f\n"]), "a\tb\\x7f\n");
        // C1 CSI (U+009B), also when split across writes; other U+0080.. text stays.
        assert_eq!(safe(&["x\u{9b}2Jy".as_bytes()]), "x\\u{9b}2Jy");
        assert_eq!(safe(&[b"x\xc2", b"\x9b2J"]), "x\\u{9b}2J");
        assert_eq!(safe(&["Zoë Ünal ©".as_bytes()]), "Zoë Ünal ©");
        assert_eq!(safe(&[b"end\xc2", b"\xa9"]), "end©");
    }
}
