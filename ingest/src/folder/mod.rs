//! A tenant's drop folder, reached only through directory handles that cannot leave it.
//!
//! (Over 400 lines on purpose: every file-system operation ingest makes inside a tenant
//! folder is in this one file, so that it can be reviewed for link safety in one read.)
//!
//! The tenant can do over SFTP whatever OpenSSH lets it do inside `upload/`: upload, rename,
//! remove, `mkdir`, `chmod`, and (if the SSH server allows it, or someone with a shell on
//! the host does it behind OpenSSH's back) make links. So every server-side operation inside
//! a tenant folder goes through a handle opened with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` and `O_NOFOLLOW`: a symbolic link where a
//! folder or file is expected is refused (`ELOOP`), never followed, so nothing ingest does
//! on behalf of tenant A can touch tenant B's folder. `docs/threat-model.md` lists what a
//! tenant can do and what each is allowed to cause.
//!
//! - [`TenantFolder::open`]: `DROP_ROOT/<tenant>/upload`, each component checked.
//! - [`TenantFolder::entries`], [`TenantFolder::stat`], [`TenantFolder::open_file`]: listing,
//!   `lstat` and opening for reading (no link followed, a FIFO cannot block).
//! - [`TenantFolder::archive`]: moving a handled file into `bak/` by *inode*, not by name, so
//!   that a re-upload under the same name while the first was being imported is never
//!   moved, overwritten or lost; a `bak` that is not a folder is set aside and reported.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags, Stat};
use rustix::io::Errno;

/// The name of the archive folder inside a drop folder.
pub const BAK: &str = "bak";

/// Start of the name a `bak` that was not a folder is renamed to.
pub const BAK_ASIDE: &str = "bak.not-a-folder.";

/// Resolution rules for every path inside a tenant folder: stay beneath the handle, follow
/// no symbolic link (and no /proc magic link) anywhere in the path.
fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

fn dir_flags() -> OFlags {
    OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// A drop folder, opened without following links.
#[derive(Debug)]
pub struct TenantFolder {
    fd: OwnedFd,
    /// For messages only; never used to reach the folder.
    path: PathBuf,
    dev: u64,
    ino: u64,
}

/// Why a drop folder could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FolderError {
    /// The folder (or the tenant's folder above it) does not exist yet.
    #[error("{0} does not exist")]
    Missing(PathBuf),
    /// A symbolic link, file or other non-folder stands where a folder is expected.
    #[error("{0} is not a folder (a symbolic link or another kind of file); it is not followed")]
    NotAFolder(PathBuf),
    /// The service may not read or search it (a tenant's `chmod`, or wrong ownership).
    #[error("{path} cannot be read by the import service ({source}); uploads there are not imported until its permissions are restored")]
    Denied {
        /// The folder.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// The service may read it but not create or remove names in it (a tenant's `chmod`),
    /// so handled files cannot be moved to `bak/`.
    #[error("{path}: the import service may not create or remove files here ({source}), so processed files cannot be moved to bak/; restore the folder's group write permission")]
    NotWritable {
        /// The folder.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// Anything else the system refused.
    #[error("{path}: {source}")]
    Io {
        /// The folder.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
}

fn folder_error(path: PathBuf, e: Errno) -> FolderError {
    match e {
        Errno::NOENT => FolderError::Missing(path),
        Errno::LOOP | Errno::NOTDIR | Errno::XDEV => FolderError::NotAFolder(path),
        Errno::ACCESS | Errno::PERM => FolderError::Denied {
            path,
            source: e.into(),
        },
        _ => FolderError::Io {
            path,
            source: e.into(),
        },
    }
}

/// A file's identity and state as `lstat` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Hard links.
    pub nlink: u64,
    /// The kind of entry.
    pub kind: EntryKind,
    /// Permission bits.
    pub mode: u32,
}

/// What kind of directory entry a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file: the only kind ever imported.
    File,
    /// A folder.
    Folder,
    /// A symbolic link: never followed.
    Symlink,
    /// A named pipe: never opened.
    Fifo,
    /// A socket.
    Socket,
    /// A block or character device.
    Device,
}

impl EntryKind {
    /// How reports name it.
    pub fn describe(self) -> &'static str {
        match self {
            EntryKind::File => "a file",
            EntryKind::Folder => "a folder",
            EntryKind::Symlink => "a symbolic link",
            EntryKind::Fifo => "a named pipe (FIFO)",
            EntryKind::Socket => "a socket",
            EntryKind::Device => "a device file",
        }
    }
}

impl Signature {
    fn of(st: &Stat) -> Self {
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => EntryKind::File,
            FileType::Directory => EntryKind::Folder,
            FileType::Symlink => EntryKind::Symlink,
            FileType::Fifo => EntryKind::Fifo,
            FileType::Socket => EntryKind::Socket,
            _ => EntryKind::Device,
        };
        Signature {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec as i64,
            nlink: st.st_nlink,
            kind,
            mode: st.st_mode & 0o7777,
        }
    }

    /// Signature of an open file.
    pub fn of_file(file: &File) -> io::Result<Self> {
        Ok(Self::of(&rustix::fs::fstat(file)?))
    }

    /// Whether this is a regular file.
    pub fn regular(&self) -> bool {
        self.kind == EntryKind::File
    }
}

impl TenantFolder {
    /// Opens `drop_root/<slug>/upload`. `drop_root` is the operator's and may be reached
    /// through links; below it, nothing is followed.
    pub fn open(drop_root: &Path, slug: &str) -> Result<Self, FolderError> {
        let tenant_path = drop_root.join(slug);
        let path = mui_shared::tenants::drop_folder(drop_root, slug);
        let root = rustix::fs::open(
            drop_root,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| folder_error(drop_root.to_path_buf(), e))?;
        let tenant = rustix::fs::openat2(&root, slug, dir_flags(), Mode::empty(), beneath())
            .map_err(|e| folder_error(tenant_path, e))?;
        let fd = rustix::fs::openat2(
            &tenant,
            mui_shared::tenants::DROP_SUBDIR,
            dir_flags(),
            Mode::empty(),
            beneath(),
        )
        .map_err(|e| folder_error(path.clone(), e))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| folder_error(path.clone(), e))?;
        Ok(Self {
            fd,
            path,
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }

    /// The folder's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Device and inode of the folder this handle holds.
    pub fn id(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// Whether the service may create and remove names in the folder (to move files into
    /// `bak/`): a tenant's `chmod` can take that away.
    pub fn check_writable(&self) -> Result<(), FolderError> {
        rustix::fs::accessat(
            &self.fd,
            ".",
            rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
            AtFlags::EACCESS,
        )
        .map_err(|e| FolderError::NotWritable {
            path: self.path.clone(),
            source: e.into(),
        })
    }

    /// The names in the folder (not `.`, `..`). Names are bytes: a name that is not UTF-8
    /// is listed too.
    pub fn entries(&self) -> Result<Vec<OsString>, FolderError> {
        let dir =
            rustix::fs::Dir::read_from(&self.fd).map_err(|e| folder_error(self.path.clone(), e))?;
        let mut names = Vec::new();
        for entry in dir {
            let entry = entry.map_err(|e| folder_error(self.path.clone(), e))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            names.push(OsString::from_vec(name.to_vec()));
        }
        Ok(names)
    }

    /// `lstat` of one entry (never follows a link).
    pub fn stat(&self, name: &OsStr) -> io::Result<Signature> {
        check_name(name)?;
        let st = rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(Signature::of(&st))
    }

    /// Opens a regular file for reading: a link is refused (`ELOOP`), a FIFO cannot block
    /// (`O_NONBLOCK`), a device cannot become our terminal.
    pub fn open_file(&self, name: &OsStr) -> io::Result<File> {
        check_name(name)?;
        let fd = rustix::fs::openat2(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
            beneath(),
        )?;
        Ok(File::from(fd))
    }

    /// Opens `bak/`, making it if missing. If something other than a folder has the name
    /// (a link to another tenant's folder, a file, a FIFO), it is never followed: it is
    /// renamed aside to `bak.not-a-folder.<file id>` (kept for the tenant to look at), a
    /// real `bak/` is made, and the returned notice says so.
    fn bak(&self, file_id: i64) -> io::Result<(OwnedFd, Option<String>)> {
        let mut notice = None;
        for _ in 0..4 {
            match rustix::fs::openat2(&self.fd, BAK, dir_flags(), Mode::empty(), beneath()) {
                Ok(fd) => return Ok((fd, notice)),
                Err(Errno::NOENT) => {
                    // Made by the ingest service: the tenant can list and read it (others
                    // r-x) but not change it; the drop folder's setgid group is inherited.
                    match rustix::fs::mkdirat(&self.fd, BAK, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    let kind = self
                        .stat(OsStr::new(BAK))
                        .map(|s| s.kind.describe())
                        .unwrap_or("not a folder");
                    let aside = (0..1000)
                        .map(|n| {
                            if n == 0 {
                                format!("{BAK_ASIDE}{file_id}")
                            } else {
                                format!("{BAK_ASIDE}{file_id}-{n}")
                            }
                        })
                        .find_map(|candidate| {
                            match rustix::fs::renameat_with(
                                &self.fd,
                                BAK,
                                &self.fd,
                                candidate.as_str(),
                                RenameFlags::NOREPLACE,
                            ) {
                                Ok(()) => Some(Ok(candidate)),
                                Err(Errno::EXIST) => None,
                                Err(e) => Some(Err(e)),
                            }
                        })
                        .unwrap_or(Err(Errno::EXIST))?;
                    tracing::warn!(folder = %self.path.display(), kind, aside = %aside, "BakNotAFolder");
                    notice = Some(format!(
                        "`bak` in your folder was {kind}, not a folder: it was not followed, it was renamed to `{aside}`, and a new `bak` folder was made for your processed files"
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(io::Error::other("bak/ keeps changing; try again"))
    }

    /// Makes sure `bak/` is a real folder before a file's rows are published (see
    /// [`TenantFolder::archive`] for what happens when it is not); returns the notice for
    /// the tenant, if any.
    pub fn prepare_bak(&self, file_id: i64) -> io::Result<Option<String>> {
        Ok(self.bak(file_id)?.1)
    }

    /// Whether `bak/` (if it is a real folder) holds a name for inode `ino`.
    pub fn bak_holds(&self, ino: u64) -> bool {
        self.bak_name_of(ino).is_some()
    }

    /// A name `bak/` (if it is a real folder) holds for inode `ino`.
    fn bak_name_of(&self, ino: u64) -> Option<Vec<u8>> {
        let bak = rustix::fs::openat2(&self.fd, BAK, dir_flags(), Mode::empty(), beneath()).ok()?;
        let dir = rustix::fs::Dir::read_from(&bak).ok()?;
        dir.flatten().find_map(|e| {
            let n = e.file_name().to_bytes();
            (n != b"." && n != b".." && e.ino() == ino).then(|| n.to_vec())
        })
    }

    /// The name in `bak/` of inode `ino` as it was at `mtime_ns` with `size` bytes, if this
    /// folder's `bak/` holds it and the drop folder itself does not (a file moved into
    /// `bak/`, not one still being uploaded or imported; not a later version written into
    /// the same inode and archived since). Names in `bak/` are written as UTF-8
    /// ([`display_name`]).
    pub fn archived_as(&self, ino: u64, mtime_ns: i64, size: u64) -> Option<String> {
        let here = self
            .entries()
            .ok()?
            .into_iter()
            .any(|n| self.stat(&n).is_ok_and(|s| s.ino == ino));
        if here {
            return None;
        }
        let name = self.bak_name_of(ino)?;
        let bak = rustix::fs::openat2(&self.fd, BAK, dir_flags(), Mode::empty(), beneath()).ok()?;
        let st = rustix::fs::statat(&bak, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW).ok()?;
        let same = Signature::of(&st);
        if same.mtime_ns != mtime_ns || same.size != size {
            return None;
        }
        String::from_utf8(name).ok()
    }

    /// Moves the handled file — the inode `file` holds open, which was `name` in this folder
    /// when it was taken — into `bak/` under a name that never overwrites anything, and
    /// returns that name plus any notice for the tenant.
    ///
    /// Identity is the inode, not the name: if the tenant uploaded a new file under the same
    /// name while this one was being imported (a rename over it, as SFTP clients do), the
    /// new upload stays where it is, to be imported next, and this file's bytes are copied
    /// into `bak/` from the open handle. A retry after a crash recognises its own earlier
    /// move or copy.
    pub fn archive(
        &self,
        name: &OsStr,
        file: &File,
        archive_name: &str,
        file_id: i64,
    ) -> io::Result<(String, Option<String>)> {
        check_name(name)?;
        let ours = Signature::of_file(file)?;
        let (bak, notice) = self.bak(file_id)?;
        let is_ours = |dir: &OwnedFd, n: &str| {
            rustix::fs::statat(dir, n, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| st.st_dev == ours.dev && st.st_ino == ours.ino)
        };
        for candidate in bak_names(archive_name, file_id) {
            let still_here = self
                .stat(name)
                .is_ok_and(|s| s.dev == ours.dev && s.ino == ours.ino);
            if still_here {
                match rustix::fs::renameat_with(
                    &self.fd,
                    name,
                    &bak,
                    candidate.as_str(),
                    RenameFlags::NOREPLACE,
                ) {
                    Ok(()) if is_ours(&bak, &candidate) => return Ok((candidate, notice)),
                    Ok(()) => {
                        // The name was replaced between the check and the rename: that was
                        // a new upload. Put it back (or beside, if yet another arrived).
                        self.put_back(&bak, &candidate, name)?;
                        continue;
                    }
                    // An earlier attempt's hard link (older versions archived by link +
                    // unlink): ours, so only the upload's name is left to remove.
                    Err(Errno::EXIST) if is_ours(&bak, &candidate) => {
                        rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())?;
                        return Ok((candidate, notice));
                    }
                    Err(Errno::EXIST) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            // The name no longer holds this file: its bytes live in our handle only.
            if is_ours(&bak, &candidate) {
                return Ok((candidate, notice));
            }
            match copy_into(&bak, &candidate, file) {
                Ok(()) => {
                    tracing::info!(folder = %self.path.display(), "FileReplacedWhileImporting");
                    return Ok((candidate, notice));
                }
                Err(e) if e.raw_os_error() == Some(Errno::EXIST.raw_os_error()) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other(format!(
            "no free name for {archive_name:?} in bak/ after 1000 tries"
        )))
    }

    /// Moves `bak/<moved>` (a new upload caught by a rename race) back to `name`, or, if
    /// that name is taken again, beside it under a new name: it is never lost and will be
    /// imported.
    fn put_back(&self, bak: &OwnedFd, moved: &str, name: &OsStr) -> io::Result<()> {
        let mut target = name.to_os_string();
        for n in 0..1000 {
            if n > 0 {
                let mut t = name.as_bytes().to_vec();
                t.extend_from_slice(format!(".reupload-{n}").as_bytes());
                target = OsString::from_vec(t);
            }
            match rustix::fs::renameat_with(
                bak,
                moved,
                &self.fd,
                target.as_os_str(),
                RenameFlags::NOREPLACE,
            ) {
                Ok(()) => return Ok(()),
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(io::Error::other("could not put a new upload back"))
    }
}

/// Copies the open `file` into a new file `dir/name` (never replacing one), durably.
fn copy_into(dir: &OwnedFd, name: &str, file: &File) -> io::Result<()> {
    let fd = rustix::fs::openat2(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        // Owned by the ingest service (a moved file keeps the tenant's ownership); readable
        // by the tenant, like the rest of bak/.
        Mode::from_raw_mode(0o644),
        beneath(),
    )?;
    let mut out = File::from(fd);
    let mut src = file.try_clone()?;
    src.seek(SeekFrom::Start(0))?;
    let written = io::copy(&mut src, &mut out);
    match written
        .and_then(|_| out.flush())
        .and_then(|()| out.sync_all())
    {
        Ok(()) => Ok(()),
        Err(e) => {
            // A half copy must not look like an archived file.
            let _ = rustix::fs::unlinkat(dir, name, AtFlags::empty());
            Err(e)
        }
    }
}

/// A name from a directory listing or an event is one path component: anything else is
/// refused rather than resolved.
fn check_name(name: &OsStr) -> io::Result<()> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a file name"),
        ));
    }
    Ok(())
}

/// The names tried in `bak/`, in order: the name, then `<stem>.<file id>.<ext>`, then
/// `<stem>.<file id>-<n>.<ext>`. Deterministic, so a retry after a crash finds its own.
/// Each is cut (in its stem, on a character boundary) to the 255 bytes a file name may
/// have, so that a long name (or one that grew by escaping) can still be archived.
pub fn bak_names(name: &str, file_id: i64) -> impl Iterator<Item = String> + '_ {
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 && name.len() - i <= 16 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    std::iter::once(fit(stem, "", ext))
        .chain(std::iter::once(fit(stem, &format!(".{file_id}"), ext)))
        .chain((2..1000).map(move |n| fit(stem, &format!(".{file_id}-{n}"), ext)))
}

/// `stem + tag + ext`, the stem shortened so the whole fits in 255 bytes.
fn fit(stem: &str, tag: &str, ext: &str) -> String {
    const NAME_MAX: usize = 255;
    let room = NAME_MAX.saturating_sub(tag.len() + ext.len());
    let mut cut = stem.len().min(room);
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{tag}{ext}", &stem[..cut])
}

/// A name as text for reports and for `bak/`: UTF-8 as it is; any byte that is not part of
/// valid UTF-8 written `%XX` (so `caf\xE9.csv` from a Latin-1 client becomes `caf%E9.csv`),
/// and a literal `%` written `%25` only when there was something to escape, so ordinary
/// names are unchanged and escaped names cannot collide with them.
pub fn display_name(name: &OsStr) -> (String, bool) {
    let bytes = name.as_bytes();
    if let Ok(s) = std::str::from_utf8(bytes) {
        return (s.to_owned(), false);
    }
    let mut out = String::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(&s.replace('%', "%25"));
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                out.push_str(
                    &std::str::from_utf8(good)
                        .unwrap_or_default()
                        .replace('%', "%25"),
                );
                let n = e.error_len().unwrap_or(bad.len());
                for b in &bad[..n] {
                    out.push_str(&format!("%{b:02X}"));
                }
                rest = &bad[n..];
            }
        }
    }
    (out, true)
}

#[cfg(test)]
mod tests;
