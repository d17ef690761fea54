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
use crate::pipeline::{self, Handled};

#[derive(Debug)]
pub(crate) struct Candidate {
    sig: Signature,
    since: Instant,
    /// How the writer said it was done, if it did ([`Watch::observe_finished`]), and the
    /// file has not changed since.
    finished: Option<Finish>,
}

/// How an upload was seen to finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Its writer closed it (`IN_CLOSE_WRITE`): a whole upload, or a dropped connection's
    /// partial file. It waits the closed-settle interval (0 by default: taken at once).
    Closed,
    /// It was renamed into place (`IN_MOVED_TO`): clients that upload under a temporary
    /// name rename only once the upload is whole. Taken at once.
    Renamed,
}

/// How long a candidate must stay unchanged before it is taken.
#[derive(Debug, Clone, Copy)]
pub struct Settle {
    /// A file no writer was seen to finish (found by a rescan, polled, written again).
    pub unfinished: Duration,
    /// A file its writer closed.
    pub closed: Duration,
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
    /// Ready files per tenant, oldest mtime first, each as it was when it became ready.
    ready: HashMap<String, BTreeMap<(i64, OsString), Signature>>,
    busy: HashSet<String>,
    /// Entries handed over and not yet finished, as they were when they became ready.
    in_flight: HashMap<Entry, Signature>,
    /// Entries reported and left where they are by design ([`Handled::Left`]: a folder, a
    /// link, a FIFO, a file ingest may not read), as they were when handled: not handed
    /// over again while they stay so. Without this, each one was handled again at every
    /// tick, oldest first: a tenant who left some in the folder kept ingest busy re-reporting
    /// them, and once there were enough of them its own uploads never got a turn.
    left: HashMap<Entry, Signature>,
}

impl Watch {
    /// A directory entry appeared or changed: it becomes a candidate, taken once it stayed
    /// unchanged for the settle interval and no process holds it open for writing.
    pub fn observe(&mut self, slug: &str, name: OsString) {
        self.note(slug, name, None);
    }

    /// A file was closed after writing, or renamed into place (an upload under a temporary
    /// name finished): it is taken at a [`Watch::settle`] once unchanged for the shorter
    /// interval `how` allows ([`Settle`]) and no process holds it open for writing. A file
    /// written again later loses that and settles as usual.
    pub fn observe_finished(&mut self, slug: &str, name: OsString, how: Finish) {
        self.note(slug, name, Some(how));
    }

    fn note(&mut self, slug: &str, name: OsString, finished: Option<Finish>) {
        let display = folder::display_name(&name).0;
        if display == folder::BAK || pipeline::is_temporary(&display) {
            return;
        }
        let key = (slug.to_owned(), name);
        if self.in_flight.contains_key(&key) {
            return; // looked at again when it is finished
        }
        let Some(folder) = self.folders.get(slug) else {
            return;
        };
        if let Some(was) = self.left.get(&key) {
            match folder.stat(&key.1) {
                Ok(sig) if sig == *was => return, // reported already, unchanged
                _ => {
                    self.left.remove(&key);
                }
            }
        }
        if let Some(cand) = self.candidates.get_mut(&key) {
            if finished.is_some() {
                // Its state as of the close: settle takes it if nothing changed since.
                if let Ok(sig) = folder.stat(&key.1) {
                    cand.sig = sig;
                    cand.since = Instant::now();
                    cand.finished = finished;
                }
            }
            return; // otherwise the tick notices a change itself
        }
        if let Ok(sig) = folder.stat(&key.1) {
            if !sig.regular() && display.starts_with(folder::BAK_ASIDE) {
                return; // a bad bak/ we set aside ourselves: the tenant was told already
            }
            self.candidates.insert(
                key,
                Candidate {
                    sig,
                    since: Instant::now(),
                    finished,
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
        // What was left in place and is gone since is forgotten.
        let listed: HashSet<&OsString> = names.iter().collect();
        self.left
            .retain(|(s, name), _| s != slug || listed.contains(name));
        for name in names {
            self.observe(slug, name);
        }
        folder.check_writable().err().map(|e| e.to_string())
    }

    /// Moves the candidates that stayed unchanged for `settle` (or since they were closed
    /// after writing or renamed into place) and that no process holds open for writing
    /// (`open_for_write(dev, ino)`) to the ready lists; forgets entries that went away.
    pub fn settle(
        &mut self,
        now: Instant,
        settle: Settle,
        open_for_write: impl Fn(u64, u64) -> bool,
    ) {
        let mut became_ready = Vec::new();
        let folders = &self.folders;
        self.candidates.retain(|(slug, name), cand| {
            match look(folders.get(slug), name, cand, now, settle, &open_for_write) {
                Look::Gone => false,
                Look::Wait => true,
                Look::Ready(sig) => {
                    became_ready.push((slug.clone(), name.clone(), sig));
                    false
                }
            }
        });
        for (slug, name, sig) in became_ready {
            self.make_ready(slug, name, sig);
        }
    }

    /// [`Watch::settle`] for one entry only (the one an event just said was finished), so
    /// that a burst of uploads costs one look per file, not one per file and candidate.
    pub fn settle_one(
        &mut self,
        slug: &str,
        name: &OsString,
        now: Instant,
        settle: Settle,
        open_for_write: impl Fn(u64, u64) -> bool,
    ) {
        let key = (slug.to_owned(), name.clone());
        let Some(cand) = self.candidates.get_mut(&key) else {
            return;
        };
        match look(
            self.folders.get(slug),
            name,
            cand,
            now,
            settle,
            &open_for_write,
        ) {
            Look::Wait => {}
            Look::Gone => {
                self.candidates.remove(&key);
            }
            Look::Ready(sig) => {
                self.candidates.remove(&key);
                self.make_ready(key.0, key.1, sig);
            }
        }
    }

    fn make_ready(&mut self, slug: String, name: OsString, sig: Signature) {
        self.ready
            .entry(slug)
            .or_default()
            .insert((sig.mtime_ns, name), sig);
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
            let Some(((_, name), sig)) = queue.pop_first() else {
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
            self.in_flight.insert((slug, name.clone()), sig);
            out.push((tenant, folder, name));
        }
        out
    }

    /// A file handed over by [`Watch::next_ready`] was handled (`Some`) or failed and is
    /// left for a retry (`None`): its tenant may go on, and its name is looked at again at
    /// once, since a new upload under the same name may have arrived meanwhile; unless it was
    /// [`Handled::Left`] and is still exactly as it was when it became ready.
    pub fn finished(&mut self, slug: &str, name: OsString, handled: Option<Handled>) {
        self.busy.remove(slug);
        let key = (slug.to_owned(), name);
        let was = self.in_flight.remove(&key);
        if let (Some(Handled::Left), Some(was), Some(folder)) =
            (handled, was, self.folders.get(slug))
        {
            if folder.stat(&key.1).ok() == Some(was) {
                self.left.insert(key.clone(), was);
            }
        }
        self.observe(slug, key.1);
    }
}

/// What a look at a candidate found.
enum Look {
    /// It went away (or its folder did).
    Gone,
    /// Not yet: changed, still settling, or still open for writing.
    Wait,
    /// Ready, as it is now (the tenant's files are taken oldest mtime first).
    Ready(Signature),
}

/// Looks at one candidate now, updating what it remembers of it.
fn look(
    folder: Option<&Arc<TenantFolder>>,
    name: &OsString,
    cand: &mut Candidate,
    now: Instant,
    settle: Settle,
    open_for_write: &impl Fn(u64, u64) -> bool,
) -> Look {
    let Some(sig) = folder.and_then(|f| f.stat(name).ok()) else {
        return Look::Gone;
    };
    if sig != cand.sig {
        cand.sig = sig;
        cand.since = now;
        cand.finished = None; // written again since it was closed
        return Look::Wait;
    }
    let wait = match cand.finished {
        None => settle.unfinished,
        Some(Finish::Closed) => settle.closed,
        Some(Finish::Renamed) => Duration::ZERO,
    };
    if sig.regular() && now.duration_since(cand.since) < wait {
        return Look::Wait;
    }
    if sig.regular() && open_for_write(sig.dev, sig.ino) {
        // Still being written (another writer, or reopened): look again after settle.
        cand.since = now;
        cand.finished = None;
        return Look::Wait;
    }
    Look::Ready(sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_S: Settle = Settle {
        unfinished: Duration::from_secs(1),
        closed: Duration::ZERO,
    };

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
            guard_percent: 10,
            guard_min_users: 25,
            success_mail: false,
            header_aliases: serde_json::json!({}),
            region: None,
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
        let settle = Settle {
            unfinished: Duration::from_secs(1),
            closed: Duration::ZERO,
        };
        w.settle(t0, settle, |_, _| false);
        assert!(w.next_ready(4).is_empty(), "not settled yet");
        // Held open for writing: not taken, however long it stays unchanged.
        w.settle(t0 + Duration::from_secs(2), settle, |_, _| true);
        assert!(w.next_ready(4).is_empty());
        w.settle(t0 + Duration::from_secs(4), settle, |_, _| false);
        assert_eq!(names(&w.next_ready(4)), [("acme".into(), "a.csv".into())]);
    }

    #[test]
    fn a_file_closed_or_renamed_into_place_is_taken_at_once_unless_still_written() {
        let (root, mut w) = setup(&["a", "b", "c", "d"]);
        let settle = Settle {
            unfinished: Duration::from_secs(1),
            closed: Duration::ZERO,
        };
        // Closed after writing, nobody writing: ready at once.
        write(root.path(), "a", "u.csv", "x");
        w.observe("a", "u.csv".into());
        w.observe_finished("a", "u.csv".into(), Finish::Closed);
        // Only that entry is looked at (b's file, not finished, is left to the tick).
        write(root.path(), "b", "early.csv", "x");
        w.observe("b", "early.csv".into());
        w.settle_one(
            "a",
            &"u.csv".into(),
            Instant::now() + Duration::from_secs(5),
            settle,
            |_, _| false,
        );
        assert_eq!(names(&w.next_ready(4)), [("a".into(), "u.csv".into())]);

        std::fs::remove_file(root.path().join("b/upload/early.csv")).unwrap();
        w.settle(Instant::now(), settle, |_, _| false);
        assert!(
            w.next_ready(4).is_empty(),
            "a file that went away is forgotten"
        );

        // Closed, but another process still holds it open for writing: it settles as usual.
        write(root.path(), "b", "u.csv", "x");
        w.observe_finished("b", "u.csv".into(), Finish::Renamed);
        let t0 = Instant::now();
        w.settle(t0, settle, |_, _| true);
        w.settle(t0, settle, |_, _| false);
        assert!(w.next_ready(4).is_empty(), "taken although still written");
        w.settle(t0 + Duration::from_secs(2), settle, |_, _| false);
        assert_eq!(names(&w.next_ready(4)), [("b".into(), "u.csv".into())]);

        // Closed, then written again (reopened to append) before the check: settles as usual.
        write(root.path(), "c", "u.csv", "x");
        w.observe_finished("c", "u.csv".into(), Finish::Closed);
        write(root.path(), "c", "u.csv", "xy");
        let t1 = Instant::now();
        w.settle(t1, settle, |_, _| false);
        assert!(
            w.next_ready(4).is_empty(),
            "taken although written after its close"
        );
        w.settle(t1 + Duration::from_secs(2), settle, |_, _| false);
        assert_eq!(names(&w.next_ready(4)), [("c".into(), "u.csv".into())]);

        // An operator giving dropped connections time to resume (a closed-settle interval):
        // a closed file waits that long.
        let patient = Settle {
            unfinished: Duration::from_secs(1),
            closed: Duration::from_secs(5),
        };
        write(root.path(), "d", "u.csv", "x");
        w.observe_finished("d", "u.csv".into(), Finish::Closed);
        let t2 = Instant::now();
        w.settle(t2 + Duration::from_secs(2), patient, |_, _| false);
        assert!(
            w.next_ready(4).is_empty(),
            "taken before the closed-settle interval"
        );
        w.settle(t2 + Duration::from_secs(6), patient, |_, _| false);
        assert_eq!(names(&w.next_ready(4)), [("d".into(), "u.csv".into())]);
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
        w.settle(later, ONE_S, |_, _| false);
        let first = names(&w.next_ready(4));
        assert_eq!(first.len(), 2, "{first:?}");
        assert!(first.contains(&("acme".into(), "old.csv".into())));
        assert!(first.contains(&("globex".into(), "g.csv".into())));
        assert!(
            w.next_ready(4).is_empty(),
            "acme is busy with its older file"
        );
        std::fs::remove_file(root.path().join("acme/upload/old.csv")).unwrap();
        w.finished("acme", "old.csv".into(), Some(Handled::Done));
        assert_eq!(names(&w.next_ready(4)), [("acme".into(), "new.csv".into())]);
    }

    #[test]
    fn a_name_handled_is_looked_at_again_at_once() {
        let (root, mut w) = setup(&["acme"]);
        write(root.path(), "acme", "u.csv", "1");
        w.observe("acme", "u.csv".into());
        w.settle(Instant::now() + Duration::from_secs(5), ONE_S, |_, _| false);
        assert_eq!(w.next_ready(1).len(), 1);
        // While it was handled, a new upload took the same name.
        write(root.path(), "acme", "u.csv", "2");
        w.finished("acme", "u.csv".into(), Some(Handled::Done));
        assert!(w
            .candidates
            .contains_key(&("acme".to_owned(), OsString::from("u.csv"))));
    }

    /// Hands over everything ready one at a time, as the loop does, finishing each as
    /// `handled` says; returns the names handed over, in order.
    fn handle_all(w: &mut Watch, handled: impl Fn(&str) -> Handled) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let got = names(&w.next_ready(1));
            let Some((slug, name)) = got.into_iter().next() else {
                return out;
            };
            w.finished(&slug, name.clone().into(), Some(handled(&name)));
            w.settle(Instant::now() + Duration::from_secs(5), ONE_S, |_, _| false);
            out.push(name);
        }
    }

    fn left_if_special(name: &str) -> Handled {
        if name.starts_with('s') {
            Handled::Left
        } else {
            Handled::Done
        }
    }

    #[test]
    fn an_entry_left_in_place_is_not_handed_over_again_until_it_changes() {
        let (root, mut w) = setup(&["acme"]);
        let folder = root.path().join("acme/upload");
        std::fs::create_dir(folder.join("s1.csv")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", folder.join("s2.csv")).unwrap();
        assert_eq!(w.scan(root.path(), "acme"), None);
        w.settle(Instant::now() + Duration::from_secs(5), ONE_S, |_, _| false);
        let mut first = handle_all(&mut w, left_if_special);
        first.sort();
        assert_eq!(first, ["s1.csv", "s2.csv"]);
        // Rescans and ticks find them unchanged: nothing to hand over.
        for _ in 0..3 {
            assert_eq!(w.scan(root.path(), "acme"), None);
            w.settle(Instant::now() + Duration::from_secs(5), ONE_S, |_, _| false);
            assert!(
                w.next_ready(4).is_empty(),
                "a left entry was handed over again"
            );
        }
        // Replaced by another folder of the same name: a new entry, reported again.
        std::fs::remove_dir(folder.join("s1.csv")).unwrap();
        std::fs::create_dir(folder.join("s1.csv")).unwrap();
        assert_eq!(w.scan(root.path(), "acme"), None);
        w.settle(Instant::now() + Duration::from_secs(5), ONE_S, |_, _| false);
        assert_eq!(handle_all(&mut w, left_if_special), ["s1.csv"]);
        // Gone: forgotten.
        std::fs::remove_file(folder.join("s2.csv")).unwrap();
        assert_eq!(w.scan(root.path(), "acme"), None);
        assert_eq!(w.left.len(), 1, "{:?}", w.left.keys());
    }

    #[test]
    fn an_entry_that_failed_or_was_put_off_is_looked_at_again() {
        let (root, mut w) = setup(&["acme"]);
        std::fs::create_dir(root.path().join("acme/upload/s1.csv")).unwrap();
        assert_eq!(w.scan(root.path(), "acme"), None);
        w.settle(Instant::now() + Duration::from_secs(5), ONE_S, |_, _| false);
        assert_eq!(names(&w.next_ready(1)).len(), 1);
        // The database was away: the error leaves it for a retry.
        w.finished("acme", "s1.csv".into(), None);
        w.settle(Instant::now() + Duration::from_secs(5), ONE_S, |_, _| false);
        assert_eq!(
            names(&w.next_ready(1)).len(),
            1,
            "not retried after an error"
        );
        w.finished("acme", "s1.csv".into(), Some(Handled::Done));
        w.settle(Instant::now() + Duration::from_secs(5), ONE_S, |_, _| false);
        assert_eq!(names(&w.next_ready(1)).len(), 1, "not looked at again");
    }

    #[test]
    fn uploads_behind_many_left_entries_get_their_turn_once() {
        let (root, mut w) = setup(&["acme"]);
        let folder = root.path().join("acme/upload");
        for i in 0..200 {
            std::fs::create_dir(folder.join(format!("s{i}.csv"))).unwrap();
        }
        assert_eq!(w.scan(root.path(), "acme"), None);
        w.settle(Instant::now() + Duration::from_secs(5), ONE_S, |_, _| false);
        assert_eq!(handle_all(&mut w, left_if_special).len(), 200);
        // Uploads that come later are handed over at once, and nothing else is.
        for round in 0..5 {
            let name = format!("u{round}.csv");
            write(root.path(), "acme", &name, "x");
            assert_eq!(w.scan(root.path(), "acme"), None);
            w.settle(Instant::now() + Duration::from_secs(5), ONE_S, |_, _| false);
            assert_eq!(
                handle_all(&mut w, |n| {
                    if n.starts_with('u') {
                        let _ = std::fs::remove_file(folder.join(n)); // moved to bak/
                    }
                    left_if_special(n)
                }),
                [name]
            );
        }
    }
}
