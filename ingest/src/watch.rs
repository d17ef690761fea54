//! Watching drop folders and deciding which file is ready, apart from what is done with it:
//! no broker, no database. The loop in [`crate::run`] feeds it file-system events and
//! rescans, asks it each tick which files settled ([`Watch::settle`]) and which to hand over
//! next ([`Watch::next_ready`]: one file per tenant at a time, oldest first), and tells it
//! when a file was handled ([`Watch::finished`]). The fair dispatcher plugs in here.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mui_shared::tenants::Tenant;

use crate::folder::{self, Signature, TenantFolder};
use crate::pipeline;

#[derive(Debug)]
pub(crate) struct Candidate {
    sig: Signature,
    since: Instant,
}

/// A directory entry of one tenant's drop folder.
pub type Entry = (String, OsString);

/// What the watch loop keeps between events.
#[derive(Debug, Default)]
pub struct Watch {
    /// The tenants, by slug (refreshed from the database at each rescan).
    pub tenants: HashMap<String, Tenant>,
    /// Open handles of the drop folders that could be opened.
    pub folders: HashMap<String, Arc<TenantFolder>>,
    /// The last problem recorded for each tenant's folder (None: fine).
    pub folder_problems: HashMap<String, Option<String>>,
    candidates: HashMap<Entry, Candidate>,
    /// Ready files per tenant, oldest mtime first.
    ready: HashMap<String, BTreeMap<(i64, OsString), ()>>,
    busy: HashSet<String>,
    in_flight: HashSet<Entry>,
}

impl Watch {
    pub fn observe(&mut self, slug: &str, name: OsString) {
        let display = folder::display_name(&name).0;
        if display == folder::BAK || pipeline::is_temporary(&display) {
            return;
        }
        let key = (slug.to_owned(), name);
        if self.in_flight.contains(&key) || self.candidates.contains_key(&key) {
            return; // the tick notices a change itself
        }
        let Some(folder) = self.folders.get(slug) else {
            return;
        };
        if let Ok(sig) = folder.stat(&key.1) {
            if !sig.regular() && display.starts_with(folder::BAK_ASIDE) {
                return; // a bad bak/ we set aside ourselves: the tenant was told already
            }
            self.candidates.insert(
                key,
                Candidate {
                    sig,
                    since: Instant::now(),
                },
            );
        }
    }

    /// Opens (or keeps) the tenant's folder handle and lists it; returns the folder's
    /// problem, if any.
    pub fn scan(&mut self, drop_root: &Path, slug: &str) -> Option<String> {
        let opened = match TenantFolder::open(drop_root, slug) {
            Ok(f) => f,
            Err(e) => {
                self.folders.remove(slug);
                return Some(e.to_string());
            }
        };
        let folder = match self.folders.get(slug) {
            Some(old) if old.id() == opened.id() => old.clone(),
            _ => {
                let f = Arc::new(opened);
                self.folders.insert(slug.to_owned(), f.clone());
                f
            }
        };
        let names = match folder.entries() {
            Ok(n) => n,
            Err(e) => return Some(e.to_string()),
        };
        for name in names {
            self.observe(slug, name);
        }
        folder.check_writable().err().map(|e| e.to_string())
    }

    /// Moves the candidates that stayed unchanged for `settle` and that no process holds
    /// open for writing (`open_for_write(dev, ino)`) to the ready lists; forgets entries
    /// that went away.
    pub fn settle(
        &mut self,
        now: Instant,
        settle: Duration,
        open_for_write: impl Fn(u64, u64) -> bool,
    ) {
        let mut became_ready = Vec::new();
        let folders = &self.folders;
        self.candidates.retain(|(slug, name), cand| {
            let Some(sig) = folders.get(slug).and_then(|f| f.stat(name).ok()) else {
                return false;
            };
            if sig != cand.sig {
                cand.sig = sig;
                cand.since = now;
                return true;
            }
            if sig.regular() && now.duration_since(cand.since) < settle {
                return true;
            }
            if sig.regular() && open_for_write(sig.dev, sig.ino) {
                cand.since = now; // still being written; look again after settle
                return true;
            }
            became_ready.push((slug.clone(), name.clone(), sig.mtime_ns));
            false
        });
        for (slug, name, mtime) in became_ready {
            self.ready
                .entry(slug)
                .or_default()
                .insert((mtime, name), ());
        }
    }

    /// The files to hand over now, at most `free`: one per tenant at a time (a tenant's
    /// files take effect in arrival order), its oldest first. Each is marked in flight
    /// until [`Watch::finished`].
    pub fn next_ready(&mut self, free: usize) -> Vec<(Tenant, Arc<TenantFolder>, OsString)> {
        let mut out = Vec::new();
        let slugs: Vec<String> = self.ready.keys().cloned().collect();
        for slug in slugs {
            if out.len() >= free {
                break;
            }
            if self.busy.contains(&slug) {
                continue;
            }
            let Some(queue) = self.ready.get_mut(&slug) else {
                continue;
            };
            let Some(((_, name), ())) = queue.pop_first() else {
                continue;
            };
            if queue.is_empty() {
                self.ready.remove(&slug);
            }
            let Some(tenant) = self.tenants.get(&slug).cloned() else {
                tracing::warn!(tenant = %slug, "FileForUnknownTenant");
                continue;
            };
            let Some(folder) = self.folders.get(&slug).cloned() else {
                continue;
            };
            self.busy.insert(slug.clone());
            self.in_flight.insert((slug, name.clone()));
            out.push((tenant, folder, name));
        }
        out
    }

    /// A file handed over by [`Watch::next_ready`] was handled (or failed and is left for a
    /// retry): its tenant may go on, and its name is looked at again at once, since a new
    /// upload under the same name may have arrived meanwhile.
    pub fn finished(&mut self, slug: &str, name: OsString) {
        self.busy.remove(slug);
        self.in_flight.remove(&(slug.to_owned(), name.clone()));
        self.observe(slug, name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: i64, slug: &str) -> Tenant {
        Tenant {
            id,
            slug: slug.into(),
            name: slug.into(),
            reply_to_email: None,
            failed_import_emails: Vec::new(),
            archive_on_inactive: false,
            created_at: chrono::Utc::now(),
            archive_suffix_fields: Vec::new(),
        }
    }

    fn setup(slugs: &[&str]) -> (tempfile::TempDir, Watch) {
        let root = tempfile::tempdir().unwrap();
        let mut w = Watch::default();
        for (i, slug) in slugs.iter().enumerate() {
            std::fs::create_dir_all(root.path().join(slug).join("upload")).unwrap();
            w.tenants.insert((*slug).into(), tenant(i as i64 + 1, slug));
            assert_eq!(w.scan(root.path(), slug), None);
        }
        (root, w)
    }

    fn write(root: &Path, slug: &str, name: &str, body: &str) {
        std::fs::write(root.join(slug).join("upload").join(name), body).unwrap();
    }

    fn names(v: &[(Tenant, Arc<TenantFolder>, OsString)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(t, _, n)| (t.slug.clone(), n.to_string_lossy().into_owned()))
            .collect()
    }

    #[test]
    fn a_file_is_ready_once_unchanged_for_the_settle_time_and_closed() {
        let (root, mut w) = setup(&["acme"]);
        write(root.path(), "acme", "a.csv", "x");
        w.observe("acme", "a.csv".into());
        let t0 = Instant::now();
        let settle = Duration::from_secs(1);
        w.settle(t0, settle, |_, _| false);
        assert!(w.next_ready(4).is_empty(), "not settled yet");
        // Held open for writing: not taken, however long it stays unchanged.
        w.settle(t0 + Duration::from_secs(2), settle, |_, _| true);
        assert!(w.next_ready(4).is_empty());
        w.settle(t0 + Duration::from_secs(4), settle, |_, _| false);
        assert_eq!(names(&w.next_ready(4)), [("acme".into(), "a.csv".into())]);
    }

    #[test]
    fn temporary_names_and_bak_are_left_alone() {
        let (root, mut w) = setup(&["acme"]);
        for n in ["a.csv.filepart", ".hidden.csv", "x.tmp"] {
            write(root.path(), "acme", n, "x");
        }
        std::fs::create_dir(root.path().join("acme/upload/bak")).unwrap();
        assert_eq!(w.scan(root.path(), "acme"), None);
        assert!(w.candidates.is_empty(), "{:?}", w.candidates.keys());
    }

    #[test]
    fn one_file_per_tenant_at_a_time_oldest_first_and_tenants_side_by_side() {
        let (root, mut w) = setup(&["acme", "globex"]);
        write(root.path(), "acme", "old.csv", "1");
        std::thread::sleep(Duration::from_millis(20));
        write(root.path(), "acme", "new.csv", "2");
        write(root.path(), "globex", "g.csv", "3");
        assert_eq!(w.scan(root.path(), "acme"), None);
        assert_eq!(w.scan(root.path(), "globex"), None);
        let later = Instant::now() + Duration::from_secs(5);
        w.settle(later, Duration::from_secs(1), |_, _| false);
        let first = names(&w.next_ready(4));
        assert_eq!(first.len(), 2, "{first:?}");
        assert!(first.contains(&("acme".into(), "old.csv".into())));
        assert!(first.contains(&("globex".into(), "g.csv".into())));
        assert!(
            w.next_ready(4).is_empty(),
            "acme is busy with its older file"
        );
        std::fs::remove_file(root.path().join("acme/upload/old.csv")).unwrap();
        w.finished("acme", "old.csv".into());
        assert_eq!(names(&w.next_ready(4)), [("acme".into(), "new.csv".into())]);
    }

    #[test]
    fn a_name_handled_is_looked_at_again_at_once() {
        let (root, mut w) = setup(&["acme"]);
        write(root.path(), "acme", "u.csv", "1");
        w.observe("acme", "u.csv".into());
        w.settle(
            Instant::now() + Duration::from_secs(5),
            Duration::from_secs(1),
            |_, _| false,
        );
        assert_eq!(w.next_ready(1).len(), 1);
        // While it was handled, a new upload took the same name.
        write(root.path(), "acme", "u.csv", "2");
        w.finished("acme", "u.csv".into());
        assert!(w
            .candidates
            .contains_key(&("acme".to_owned(), OsString::from("u.csv"))));
    }
}
