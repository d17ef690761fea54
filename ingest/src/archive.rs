//! Moving a handled file into the tenant's `bak/` folder, never overwriting an earlier file.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The names tried in `bak/`, in order: the uploaded name, then `<stem>.<file id>.<ext>`,
/// then `<stem>.<file id>-<n>.<ext>`. Deterministic, so a retry after a crash finds the link
/// it already made.
fn candidates(name: &str, file_id: i64) -> impl Iterator<Item = String> + '_ {
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    std::iter::once(name.to_owned())
        .chain(std::iter::once(format!("{stem}.{file_id}{ext}")))
        .chain((2..1000).map(move |n| format!("{stem}.{file_id}-{n}{ext}")))
}

/// Moves `folder/name` to `folder/bak/<free name>` and returns the name used. Atomic with
/// respect to existing files: a hard link is made (which fails rather than replace an
/// existing name), then the original removed.
pub fn move_to_bak(folder: &Path, name: &str, file_id: i64) -> io::Result<String> {
    let src = folder.join(name);
    let bak = folder.join("bak");
    match std::fs::create_dir(&bak) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(&src)?;
    for candidate in candidates(name, file_id) {
        let dst = bak.join(&candidate);
        match std::fs::hard_link(&src, &dst) {
            Ok(()) => {
                std::fs::remove_file(&src)?;
                return Ok(candidate);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Our own link from an interrupted earlier attempt?
                if let Ok(existing) = std::fs::symlink_metadata(&dst) {
                    if existing.dev() == meta.dev() && existing.ino() == meta.ino() {
                        std::fs::remove_file(&src)?;
                        return Ok(candidate);
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!(
        "no free name for {name:?} in bak/ after 1000 tries"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_overwrites_and_is_retry_safe() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("users.csv"), "one").unwrap();
        assert_eq!(move_to_bak(d, "users.csv", 1).unwrap(), "users.csv");
        std::fs::write(d.join("users.csv"), "two").unwrap();
        assert_eq!(move_to_bak(d, "users.csv", 2).unwrap(), "users.2.csv");
        assert_eq!(
            std::fs::read_to_string(d.join("bak/users.csv")).unwrap(),
            "one"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("bak/users.2.csv")).unwrap(),
            "two"
        );
        assert!(!d.join("users.csv").exists());

        // Interrupted after linking: the retry recognises its own link.
        std::fs::write(d.join("users.csv"), "three").unwrap();
        std::fs::hard_link(d.join("users.csv"), d.join("bak/users.3.csv")).unwrap();
        assert_eq!(move_to_bak(d, "users.csv", 3).unwrap(), "users.3.csv");
        assert!(!d.join("users.csv").exists());
        assert_eq!(std::fs::read_dir(d.join("bak")).unwrap().count(), 3);
    }
}
