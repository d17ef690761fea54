//! Disk trouble: the tenant's drop folder on a full file system (a small tmpfs the test
//! mounts over it and fills; the tests run as root), so that ingest cannot make `bak/` to
//! archive the file into. The file is not lost: it stays in the drop folder, nothing of it is
//! imported or mailed, the operator sees why in ingest's log (`FileHandleError`, naming
//! `bak/` and the full device), and once there is room again the next rescan imports it
//! once and archives it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mui_tests::chaos::{
    chunk_markers, reported_rows, service_env, users_csv, wait_settled, Kind, ServiceProcess,
};
use mui_tests::{AppOptions, TestEnv};

const BIN: &str = env!("CARGO_BIN_EXE_mui-service");

/// A tmpfs mounted over a folder for the test's lifetime (unmounted when dropped).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, options: &str) -> Self {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "mui-test-full"])
            .arg(at)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mount tmpfs on {} (needs root)",
            at.display()
        );
        Self(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_whose_bak_cannot_be_made_on_a_full_disk_stays_and_is_imported_once_there_is_room() {
    let env = TestEnv::new(AppOptions {
        chunk_rows: 20,
        settle_ms: 200,
        ..Default::default()
    })
    .unwrap();
    let t = env.tenant("acme").unwrap();
    let folder = env.folder("acme");
    // Few inodes: the file system is full once they are used up (tmpfs counts a folder as
    // an inode, so `bak/` cannot be made).
    let mount = Tmpfs::mount(&folder, "size=4m,nr_inodes=24,mode=0755");
    // Fill it: hidden names, which ingest leaves alone.
    let mut fillers = Vec::new();
    for i in 0.. {
        let p = folder.join(format!(".fill-{i}"));
        match std::fs::write(&p, b"") {
            Ok(()) => fillers.push(p),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc_enospc()), "full: {e}");
                break;
            }
        }
        assert!(i < 1_000, "the tmpfs never filled up");
    }
    // Room for the upload itself, and no more.
    std::fs::remove_file(fillers.pop().unwrap()).unwrap();
    let (csv, bad) = users_csv(200, 11, "disk");
    env.drop_file("acme", "users.csv", csv.as_bytes()).unwrap();
    assert!(
        std::fs::create_dir(folder.join("probe")).is_err(),
        "no room for a folder"
    );

    let logs = tempfile::tempdir().unwrap();
    let start = |kind: Kind, name: &str| {
        ServiceProcess::start(
            BIN,
            kind,
            service_env(&env, kind),
            &logs.path().join(format!("{name}.log")),
        )
    };
    let mut procs = vec![
        start(Kind::Ingest, "ingest"),
        start(Kind::Worker, "worker"),
        start(Kind::Notifier, "notifier"),
    ];
    // The operator sees why, in ingest's log; tried at least twice (the rescan retries).
    let ingest = &procs[0];
    ingest.wait_log("No space left on device", 120).await;
    env.wait_until(60, "a second try", || {
        ingest.log_text().matches("FileHandleError").count() >= 2
    })
    .await;
    let log = ingest.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("FileHandleError"))
        .unwrap()
        .to_owned();
    assert!(
        line.contains("users.csv") && line.contains("bak/") && line.contains("No space left"),
        "the log names the file, bak/ and the full disk: {line}"
    );
    // Not lost, not half-imported: still in the drop folder, nothing queued, no mail.
    assert!(folder.join("users.csv").exists(), "the file stays");
    let files = env.files(&t);
    assert!(files.len() <= 1);
    if let Some(f) = files.first() {
        assert_eq!(chunk_markers(&env, f.id), 0, "nothing imported");
        assert!(f.archived_name.is_none());
    }
    assert!(env.users(&t).is_empty());
    assert!(env.smtp.messages().is_empty());

    // Room again: the next rescan takes the file.
    for p in fillers.drain(..4) {
        std::fs::remove_file(p).unwrap();
    }
    let files = wait_settled(&env, &t, 1, 120).await;
    assert_eq!(files.len(), 1, "registered once");
    let f = &files[0];
    assert_eq!(
        (
            f.state.as_str(),
            f.rows_total,
            f.rows_failed,
            f.notify_status.as_str()
        ),
        ("done", Some(200), bad.len() as i64, "sent")
    );
    assert_eq!(chunk_markers(&env, f.id), 10, "every chunk once");
    assert!(!folder.join("users.csv").exists());
    assert!(f.archived_name.is_some());
    assert_eq!(
        std::fs::read_dir(folder.join("bak")).unwrap().count(),
        1,
        "archived in bak/"
    );
    assert_eq!(env.users(&t).len(), 200 - bad.len());
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1, "one email");
    assert_eq!(reported_rows(&mails[0].attachments()[0].1), bad);

    for p in &mut procs {
        let log = p.log_text();
        match p.terminate(Duration::from_secs(30)).await {
            Some((status, _)) => assert!(status.success(), "exit {status}:\n{log}"),
            None => panic!("did not stop within 30 s of SIGTERM:\n{log}"),
        }
    }
    drop(mount);
}

/// ENOSPC, "No space left on device".
fn libc_enospc() -> i32 {
    28
}
