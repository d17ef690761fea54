//! Is anyone still writing this file? Reads `/proc/<pid>/fd` the way `lsof` does, so an upload
//! that pauses longer than the settle interval (a slow client, a resumed transfer) is not
//! taken while the SFTP server still holds it open for writing.
//!
//! Needs permission to read other processes' `/proc` entries (root, the same user as the
//! SFTP server processes, or `CAP_DAC_READ_SEARCH` + `CAP_SYS_PTRACE`, which
//! `deploy/systemd/mui-ingest.service` grants); without it the check sees nothing and the
//! settle interval alone decides.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;

/// Whether any process other than this one has the file (by device and inode) open for
/// writing. One pass over `/proc`: for one file an event just said was finished.
pub fn open_for_write(dev: u64, ino: u64) -> bool {
    let mut seen = false;
    scan(
        |d, i| d == dev && i == ino,
        |_, _| {
            seen = true;
            true
        },
    );
    seen
}

/// Every regular file (device, inode) a process other than this one holds open for
/// writing, in one pass over `/proc`: for a tick that looks at many candidates at once
/// (after a restart, thousands may be waiting), so the cost is one pass, not one per file.
pub fn writers() -> HashSet<(u64, u64)> {
    let mut set = HashSet::new();
    scan(
        |_, _| true,
        |dev, ino| {
            set.insert((dev, ino));
            false
        },
    );
    set
}

/// Walks the open file descriptors of every other process; for each regular file `wanted`
/// accepts that is open for writing, calls `found`, which returns whether to stop.
fn scan(wanted: impl Fn(u64, u64) -> bool, mut found: impl FnMut(u64, u64) -> bool) {
    let own = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for proc_entry in procs.flatten() {
        let pid = proc_entry.file_name();
        let Some(pid) = pid.to_str() else { continue };
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == own {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            // metadata() follows the magic link to the open file itself.
            let Ok(meta) = std::fs::metadata(fd.path()) else {
                continue;
            };
            if !meta.is_file() || !wanted(meta.dev(), meta.ino()) {
                continue;
            }
            let info = proc_entry.path().join("fdinfo").join(fd.file_name());
            if let Ok(text) = std::fs::read_to_string(info) {
                let flags = text
                    .lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok());
                // O_WRONLY = 1, O_RDWR = 2.
                if flags.is_some_and(|f| f & 0o3 != 0) && found(meta.dev(), meta.ino()) {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sees_a_writer_in_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("upload.csv");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(!open_for_write(meta.dev(), meta.ino()));
        assert!(!writers().contains(&(meta.dev(), meta.ino())));
        // A child process holding the file open for appending, as sftp-server would.
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec 3>>'{}'; sleep 5", path.display()))
            .spawn()
            .unwrap();
        let mut seen = false;
        for _ in 0..50 {
            if open_for_write(meta.dev(), meta.ino()) {
                // The child holds it until killed: the one-pass set sees it too.
                assert!(writers().contains(&(meta.dev(), meta.ino())));
                seen = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(seen, "the child's write handle was not seen");
    }
}
