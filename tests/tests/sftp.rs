//! The SFTP front door: a real OpenSSH server on a loopback port, configured with
//! `deploy/sftp/mui-sftp.conf`, tenant accounts made by `deploy/sftp/mui-sftp-account`, and
//! uploads by the real clients (OpenSSH `sftp` in batch mode, curl's libssh2). The tests
//! with the import pipeline check the users in the database, the email and where the file
//! ended; the last two look only at what SFTP and the account script do on disk.
//!
//! (Over 400 lines: each test starts a real OpenSSH server and tells one tenant's story.)

use mui_shared::files::{FileState, NotifyStatus};
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mui_shared::tenants::Tenant;
use mui_tests::sftp::{chroot_ready_tempdir, Account, SftpServer};
use mui_tests::{spawn_app_with, App, AppOptions};

async fn setup(tenants: &[&str], settle_ms: u64) -> (App, SftpServer, Vec<(Tenant, Account)>) {
    setup_with(tenants, settle_ms, 0).await
}

async fn setup_with(
    tenants: &[&str],
    settle_ms: u64,
    closed_settle_ms: u64,
) -> (App, SftpServer, Vec<(Tenant, Account)>) {
    let app = spawn_app_with(AppOptions {
        chroot_ready: true,
        settle_ms,
        closed_settle_ms,
        ..AppOptions::default()
    })
    .await;
    let mut server = SftpServer::start(app.env.drop_root.path()).unwrap();
    let mut out = Vec::new();
    for slug in tenants {
        let t = app.env.tenant(slug).unwrap();
        let a = server.add_account(slug).unwrap();
        out.push((t, a));
    }
    (app, server, out)
}

fn users_csv(prefix: &str, n: usize, bad_row: bool) -> String {
    let mut s = String::from("unique_id,login_source,first_name,last_name,active\n");
    for i in 0..n {
        s.push_str(&format!("{prefix}{i:05},sso,First {i},Last {i},1\n"));
    }
    if bad_row {
        s.push_str(&format!("{prefix}-bad,nowhere,Bad,Row,1\n"));
    }
    s
}

fn local_file(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

/// Uploads `local` slowly (curl at 20 kB/s) into the tenant's drop folder as `name` and kills
/// the client (SIGKILL) once a third has arrived: the connection drops and sftp-server closes
/// the partial file. Returns the partial file's size.
async fn upload_cut_off_after_a_third(
    app: &App,
    server: &SftpServer,
    account: &Account,
    local: &Path,
    name: &str,
) -> usize {
    let whole = std::fs::metadata(local).unwrap().len() as usize;
    let mut child = server
        .curl_command(
            account,
            local,
            &format!("/upload/{name}"),
            &["--limit-rate", "20k"],
        )
        .spawn()
        .unwrap();
    let remote = app.env.folder(&account.tenant).join(name);
    app.env
        .wait_until(60, "a third of the upload", || {
            std::fs::metadata(&remote).is_ok_and(|m| m.len() as usize > whole / 3)
        })
        .await;
    child.kill().unwrap();
    let _ = child.wait();
    std::fs::metadata(&remote).unwrap().len() as usize
}

fn uids(app: &App, t: &Tenant) -> BTreeSet<String> {
    app.env.users(t).into_iter().map(|u| u.0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_filepart_rename_and_link_unlink_rename_each_import_once_and_bak_lists_them() {
    let (mut app, server, accounts) = setup(&["acme"], 400).await;
    let (t, a) = &accounts[0];
    let local = tempfile::tempdir().unwrap();

    // 1. Plain `put`: sftp writes users.csv in place.
    let f1 = local_file(local.path(), "one.csv", &users_csv("p", 3, true));
    let run = server.sftp(a, &[], &format!("put {} users.csv\n", f1.display()));
    assert!(run.ok, "{}\n{}", run.output, server.log());
    let files = app.wait_files_settled(t, 1).await;
    assert_eq!(
        (files[0].rows_inserted, files[0].rows_failed),
        (3, 1),
        "3 inserted, 1 failed"
    );
    assert_eq!(files[0].archived_name.as_deref(), Some("users.csv"));

    // 2. WinSCP's way: upload as .filepart, then rename (posix-rename@openssh.com).
    let f2 = local_file(local.path(), "two.csv", &users_csv("q", 2, false));
    let run = server.sftp(
        a,
        &[],
        &format!(
            "put {} second.csv.filepart\nrename second.csv.filepart second.csv\n",
            f2.display()
        ),
    );
    assert!(run.ok, "{}", run.output);
    app.wait_files_settled(t, 2).await;

    // 3. curl (libssh2) renames with a plain SFTP rename, which OpenSSH's server performs
    //    as link + unlink: the watcher sees a new name appear beside the temporary one.
    let f3 = local_file(local.path(), "three.csv", &users_csv("r", 2, false));
    let run = server.curl_upload(
        a,
        &f3,
        "/upload/third.csv.filepart",
        &["rename /upload/third.csv.filepart /upload/third.csv"],
    );
    assert!(run.ok, "{}", run.output);
    let files = app.wait_files_settled(t, 3).await;

    // Each upload imported once, one email each (only the first had a bad row).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let files_after = app.env.files(t);
    assert_eq!(
        files_after.len(),
        3,
        "nothing imported twice: {files_after:?}"
    );
    let names: Vec<&str> = files.iter().map(|f| f.file_name.as_str()).collect();
    assert_eq!(names, ["users.csv", "second.csv", "third.csv"]);
    assert_eq!(uids(&app, t).len(), 7);
    let mails = app.env.smtp.messages();
    assert_eq!(mails.len(), 1, "one report: the file with a bad row");
    assert!(
        mails[0].subject().contains("users.csv"),
        "{}",
        mails[0].subject()
    );

    // The tenant lists bak/ and sees its files; the drop folder is empty again.
    let run = server.sftp(a, &[], "ls -1 bak\nls -1\n");
    assert!(run.ok, "{}", run.output);
    for name in ["users.csv", "second.csv", "third.csv"] {
        assert!(
            run.output.contains(&format!("bak/{name}")),
            "{}",
            run.output
        );
    }
    let left: Vec<_> = std::fs::read_dir(app.env.folder("acme"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, ["bak"], "only bak/ is left in the drop folder");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_upload_pausing_longer_than_the_settle_interval_is_taken_once_complete() {
    // Settle 300 ms; curl limited to 40 kB/s sends its writes (up to 64 kB at a time) with
    // pauses of up to a second and a half, over about 4 s.
    let (mut app, server, accounts) = setup(&["acme"], 300).await;
    let (t, a) = &accounts[0];
    let local = tempfile::tempdir().unwrap();
    let content = users_csv("s", 4000, false);
    assert!(content.len() > 120_000);
    let f = local_file(local.path(), "slow.csv", &content);
    let child = server
        .curl_command(a, &f, "/upload/slow.csv", &["--limit-rate", "40k"])
        .spawn()
        .unwrap();
    // The upload is slow: the file is seen part-written (and nothing is taken meanwhile).
    let remote = app.env.folder("acme").join("slow.csv");
    app.env
        .wait_until(30, "a part-written file", || {
            std::fs::metadata(&remote)
                .is_ok_and(|m| m.len() > 0 && (m.len() as usize) < content.len())
        })
        .await;
    assert!(app.env.files(t).is_empty());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files = app.wait_files_settled(t, 1).await;
    assert_eq!(files.len(), 1);
    assert_eq!(
        files[0].rows_total,
        Some(4000),
        "the whole file, once: {files:?}"
    );
    assert_eq!(uids(&app, t).len(), 4000);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_killed_halfway_is_imported_as_far_as_it_got_and_a_full_upload_completes_it() {
    let (mut app, server, accounts) = setup(&["acme"], 400).await;
    let (t, a) = &accounts[0];
    let local = tempfile::tempdir().unwrap();
    let content = users_csv("k", 4000, false);
    let f = local_file(local.path(), "big.csv", &content);
    upload_cut_off_after_a_third(&app, &server, a, &f, "big.csv").await;

    let files = app.wait_files_settled(t, 1).await;
    let f0 = &files[0];
    assert_eq!(f0.state, FileState::Done);
    let total = f0.rows_total.unwrap();
    assert!(
        total > 0 && (total as usize) < 4000,
        "a partial file: {f0:?}"
    );
    assert_eq!(
        f0.rows_inserted + f0.rows_failed,
        total,
        "every row imported or reported"
    );
    assert!(
        f0.rows_failed <= 1,
        "at most the cut-off last row is reported: {f0:?}"
    );
    assert_eq!(
        f0.archived_name.as_deref(),
        Some("big.csv"),
        "archived like any file"
    );
    let imported = uids(&app, t);
    assert_eq!(imported.len() as i64, f0.rows_inserted);
    assert!(imported.iter().all(|u| u.starts_with('k')));
    assert_eq!(app.env.smtp.messages().len(), f0.rows_failed as usize);
    if f0.rows_failed == 1 {
        // The cut-off row's reason says what probably happened.
        let mail = &app.env.smtp.messages()[0];
        let rows = mui_tests::parse_csv(&mail.attachments()[0].1);
        let reason = rows[1].last().unwrap();
        assert!(reason.contains("cut off"), "{reason}");
    }

    // The tenant uploads the whole file again: everything is there, nothing doubled.
    let run = server.sftp(a, &[], &format!("put {} big.csv\n", f.display()));
    assert!(run.ok, "{}", run.output);
    let files = app.wait_files_settled(t, 2).await;
    assert_eq!(files[1].rows_total, Some(4000));
    assert_eq!(files[1].rows_failed, 0);
    assert_eq!(uids(&app, t).len(), 4000);
    let bak = app.env.folder("acme").join("bak");
    assert!(bak.join("big.csv").exists());
    assert!(bak.join(format!("big.{}.csv", files[1].id)).exists());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_name_twice_odd_names_and_two_tenants_at_once() {
    let (mut app, server, accounts) = setup(&["acme", "globex"], 400).await;
    let local = tempfile::tempdir().unwrap();
    let (ta, aa) = &accounts[0];
    let (tg, ag) = &accounts[1];

    // Two tenants upload at the same time.
    let fa = local_file(local.path(), "a.csv", &users_csv("a", 300, true));
    let fg = local_file(local.path(), "g.csv", &users_csv("g", 300, true));
    let (ra, rg) = std::thread::scope(|s| {
        let ja = s.spawn(|| server.sftp(aa, &[], &format!("put {} users.csv\n", fa.display())));
        let jg = s.spawn(|| server.sftp(ag, &[], &format!("put {} users.csv\n", fg.display())));
        (ja.join().unwrap(), jg.join().unwrap())
    });
    assert!(ra.ok && rg.ok, "{}\n{}", ra.output, rg.output);
    app.wait_files_settled(ta, 1).await;
    app.wait_files_settled(tg, 1).await;
    let (ua, ug) = (uids(&app, ta), uids(&app, tg));
    assert_eq!((ua.len(), ug.len()), (300, 300));
    assert!(ua.iter().all(|u| u.starts_with('a')) && ug.iter().all(|u| u.starts_with('g')));

    // The same name again, after the first was taken: a second import, kept beside the
    // first in bak/ (never overwriting it).
    let fa2 = local_file(
        local.path(),
        "a2.csv",
        &users_csv("a", 2, false).replace("First", "Renamed"),
    );
    let run = server.sftp(aa, &[], &format!("put {} users.csv\n", fa2.display()));
    assert!(run.ok, "{}", run.output);
    let files = app.wait_files_settled(ta, 2).await;
    assert_eq!(files[1].rows_updated, 2, "two users updated");
    let bak = app.env.folder("acme").join("bak");
    assert!(
        bak.join("users.csv").exists() && bak.join(format!("users.{}.csv", files[1].id)).exists()
    );

    // Odd names: spaces, unicode, quotes, a leading dash, a long name.
    let long = format!("{}.csv", "long-name-".repeat(20));
    let odd = ["my users (v2) ünïcødé 'q'.csv", "-dash.csv", long.as_str()];
    let fo = local_file(local.path(), "o.csv", &users_csv("o", 1, true));
    let mut batch = String::new();
    for name in odd {
        batch.push_str(&format!("put {} \"./{name}\"\n", fo.display()));
    }
    let run = server.sftp(aa, &[], &batch);
    assert!(run.ok, "{}", run.output);
    let files = app.wait_files_settled(ta, 5).await;
    let names: BTreeSet<&str> = files[2..].iter().map(|f| f.file_name.as_str()).collect();
    assert_eq!(names, odd.into_iter().collect());
    // Each report names its file: in the subject (a very long name is shortened there) and
    // in full as its attachment's name.
    let mails = app.env.smtp.messages();
    for name in odd {
        let attachment = format!("{name}.failures.csv");
        let short: String = name.chars().take(60).collect();
        assert!(
            mails.iter().any(|m| m.subject().contains(&short)
                && m.attachments().iter().any(|(n, _)| *n == attachment)),
            "{name:?} not reported"
        );
        assert!(bak.join(name).exists(), "{name:?} in bak/");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_cannot_escape_its_chroot_nor_import_another_tenants_file() {
    let (mut app, server, accounts) = setup(&["victim", "mallory"], 400).await;
    let local = tempfile::tempdir().unwrap();
    let (tv, av) = &accounts[0];
    let (tm, am) = &accounts[1];
    let fv = local_file(local.path(), "v.csv", &users_csv("v", 3, false));
    assert!(
        server
            .sftp(av, &[], &format!("put {} victim.csv\n", fv.display()))
            .ok
    );
    app.wait_files_settled(tv, 1).await;
    let victim_file = app.env.folder("victim").join("bak/victim.csv");
    assert!(victim_file.exists());

    // Outside the chroot is out of reach: `..` stops at the chroot's root, which is
    // read-only, and the other tenant's folder does not exist from in here.
    let fm = local_file(local.path(), "m.csv", &users_csv("m", 1, false));
    for cmd in [
        format!("put {} ../../victim/upload/evil.csv", fm.display()),
        format!("put {} /evil.csv", fm.display()),
        format!(
            "put {} {}",
            fm.display(),
            app.env.folder("victim").join("evil.csv").display()
        ),
        "ls ../../victim/upload/bak".to_owned(),
        format!("ln {} stolen.csv", victim_file.display()),
    ] {
        let run = server.sftp(am, &[], &format!("{cmd}\n"));
        assert!(!run.ok, "{cmd:?} should fail: {}", run.output);
    }
    // Symbolic links cannot be made over SFTP (mui-sftp.conf denies the request) ...
    let links = [
        (victim_file.display().to_string(), "link-abs.csv"),
        (
            "../../victim/upload/bak/victim.csv".to_owned(),
            "link-rel.csv",
        ),
        (
            app.env.folder("victim").display().to_string(),
            "link-dir.csv",
        ),
    ];
    for (target, name) in &links {
        let run = server.sftp(am, &[], &format!("symlink {target} {name}\n"));
        assert!(!run.ok, "symlink should be refused: {}", run.output);
        assert!(std::fs::symlink_metadata(app.env.folder("mallory").join(name)).is_err());
    }
    // ... and one that got there some other way (made before the request was denied, or by
    // the host) is never followed: planted here by root.
    for (target, name) in &links {
        std::os::unix::fs::symlink(target, app.env.folder("mallory").join(name)).unwrap();
    }
    app.env
        .wait_until(60, "mallory's 3 links reported", || {
            let files = app.env.files(tm);
            files.len() >= 3 && files.iter().all(|f| f.notify_status == NotifyStatus::Sent)
        })
        .await;
    let files = app.env.files(tm);
    assert_eq!(files.len(), 3, "{files:?}");
    for f in &files {
        assert_eq!(f.state, FileState::Failed);
        assert_eq!(f.error_code.as_deref(), Some("not_regular_file"), "{f:?}");
        assert_eq!(f.archived_name, None, "left where it is");
    }
    assert!(uids(&app, tm).is_empty(), "nothing imported into mallory");
    assert_eq!(uids(&app, tv).len(), 3, "victim unchanged");
    assert_eq!(app.env.files(tv).len(), 1);
    let mails = app.env.smtp.messages();
    let to_mallory: Vec<_> = mails
        .iter()
        .filter(|m| m.subject().contains("link-"))
        .collect();
    assert_eq!(to_mallory.len(), 3);
    assert!(
        to_mallory[0].body().contains("symbolic link"),
        "{}",
        to_mallory[0].body()
    );
    for name in ["link-abs.csv", "link-rel.csv", "link-dir.csv"] {
        let p = app.env.folder("mallory").join(name);
        assert!(std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()));
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotating_a_tenants_key_locks_the_old_one_out() {
    let (mut app, server, accounts) = setup(&["acme"], 400).await;
    let (t, a) = &accounts[0];
    let new_key = server.dir.path().join("rotated_key");
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&new_key)
        .status()
        .unwrap();
    assert!(made.success());
    assert!(server.sftp(a, &[], "ls\n").ok, "the first key works");
    let out = server
        .account_script(&[
            "rotate",
            "acme",
            "--user",
            &a.user,
            "--key",
            &format!("{}.pub", new_key.display()),
        ])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let old = server.sftp(a, &[], "ls\n");
    assert!(!old.ok, "the old key is refused: {}", old.output);
    let local = tempfile::tempdir().unwrap();
    let f = local_file(local.path(), "r.csv", &users_csv("z", 2, false));
    let new = server.sftp_with_key(a, &new_key, &format!("put {} users.csv\n", f.display()));
    assert!(new.ok, "the new key works: {}", new.output);
    let files = app.wait_files_settled(t, 1).await;
    assert_eq!(files[0].rows_inserted, 2);
    // A bad argument is refused with a message naming it.
    let bad = server
        .account_script(&["add", "Bad Slug", "--key", "x"])
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("tenant slug 'Bad Slug'"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_resumed_after_a_dropped_connection_is_imported_once_whole() {
    // A settle interval long enough for the tenant to reconnect and resume, also for a file
    // its writer closed (the dropped connection closes the partial file).
    let (mut app, server, accounts) = setup_with(&["acme"], 15_000, 15_000).await;
    let (t, a) = &accounts[0];
    let local = tempfile::tempdir().unwrap();
    let content = users_csv("m", 4000, false);
    let f = local_file(local.path(), "big.csv", &content);
    let partial = upload_cut_off_after_a_third(&app, &server, a, &f, "big.csv").await;
    assert!(partial < content.len());
    // OpenSSH's sftp resumes: it sends only what the remote file lacks.
    let run = server.sftp(a, &[], &format!("reput {} big.csv\n", f.display()));
    assert!(run.ok, "{}", run.output);
    assert!(
        app.env.files(t).is_empty(),
        "the partial file was not taken"
    );
    let files = app.wait_files_settled(t, 1).await;
    assert_eq!(files.len(), 1);
    assert_eq!(
        (files[0].rows_total, files[0].rows_failed),
        (Some(4000), 0),
        "{files:?}"
    );
    assert_eq!(uids(&app, t).len(), 4000);
    assert_eq!(
        std::fs::read(app.env.folder("acme").join("bak/big.csv")).unwrap(),
        content.as_bytes(),
        "the resumed file is the whole file"
    );
    assert!(app.env.smtp.messages().is_empty(), "no bad rows, no email");
    app.stop().await;
}

/// An SFTP server and accounts made by `mui-sftp-account`, without the import pipeline (these
/// tests look only at what SFTP and the script do on disk).
fn server_only(tenants: &[&str]) -> (tempfile::TempDir, SftpServer, Vec<Account>) {
    let drop_root = chroot_ready_tempdir().unwrap();
    let mut server = SftpServer::start(drop_root.path()).unwrap();
    let accounts = tenants
        .iter()
        .map(|t| server.add_account(t).unwrap())
        .collect();
    (drop_root, server, accounts)
}

#[test]
fn links_are_refused_while_uploads_and_renames_still_work() {
    let (_root, server, accounts) = server_only(&["acme"]);
    let a = &accounts[0];
    let upload = server.upload_dir("acme");
    let local = tempfile::tempdir().unwrap();
    let content = users_csv("l", 3, false);
    let f = local_file(local.path(), "l.csv", &content);

    // An ordinary upload.
    let run = server.sftp(a, &[], &format!("put {} users.csv\n", f.display()));
    assert!(run.ok, "{}\n{}", run.output, server.log());
    assert_eq!(
        std::fs::read_to_string(upload.join("users.csv")).unwrap(),
        content
    );

    // Symbolic links (`ln -s`, `symlink`: the symlink request) and hard links (`ln`:
    // hardlink@openssh.com) are refused, whatever they point to; nothing appears.
    for (cmd, name) in [
        ("ln -s users.csv soft.csv", "soft.csv"),
        ("symlink users.csv soft2.csv", "soft2.csv"),
        ("ln -s /etc/passwd passwd.csv", "passwd.csv"),
        ("ln -s .. up", "up"),
        ("ln -s bak bak2", "bak2"),
        ("ln users.csv hard.csv", "hard.csv"),
    ] {
        let run = server.sftp(a, &[], &format!("{cmd}\n"));
        assert!(!run.ok, "{cmd:?} should be refused: {}", run.output);
        // The server refuses a symlink request; it no longer advertises the hardlink
        // extension, so the client does not even send it.
        let said = run.output.to_lowercase();
        assert!(
            said.contains("permission denied")
                || said.contains("does not support hardlink@openssh.com"),
            "{cmd:?}: {}",
            run.output
        );
        assert!(
            std::fs::symlink_metadata(upload.join(name)).is_err(),
            "{cmd:?} made {name}"
        );
    }
    // A client that sends the hardlink request anyway is refused by the server.
    let (code, msg) = server
        .raw_extended_request(a, "hardlink@openssh.com", &["users.csv", "hard.csv"])
        .unwrap();
    assert_eq!(code, 3, "SSH_FX_PERMISSION_DENIED: {msg}");
    assert!(std::fs::symlink_metadata(upload.join("hard.csv")).is_err());
    assert_eq!(
        std::fs::metadata(upload.join("users.csv")).unwrap().nlink(),
        1,
        "no second name for the upload"
    );

    // Renames still work: OpenSSH's sftp (posix-rename@openssh.com), after a .filepart upload
    // and of a file already there ...
    let run = server.sftp(
        a,
        &[],
        &format!(
            "put {} second.csv.filepart\nrename second.csv.filepart second.csv\n\
             rename users.csv renamed.csv\n",
            f.display()
        ),
    );
    assert!(run.ok, "{}\n{}", run.output, server.log());
    // ... and libssh2's plain SFTP rename (which sftp-server does as link + unlink).
    let run = server.curl_upload(
        a,
        &f,
        "/upload/third.csv.filepart",
        &["rename /upload/third.csv.filepart /upload/third.csv"],
    );
    assert!(run.ok, "{}\n{}", run.output, server.log());
    let mut names: Vec<String> = std::fs::read_dir(&upload)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["renamed.csv", "second.csv", "third.csv"]);
    for name in &names {
        let m = std::fs::symlink_metadata(upload.join(name)).unwrap();
        assert!(m.file_type().is_file() && m.nlink() == 1, "{name}: {m:?}");
        assert_eq!(std::fs::read_to_string(upload.join(name)).unwrap(), content);
    }
}

/// Owner, group and mode of `path` (not followed) and, for a folder, of everything under it.
fn owners_and_modes(path: &Path) -> Vec<(PathBuf, u32, u32, u32)> {
    let m = std::fs::symlink_metadata(path).unwrap();
    let mut out = vec![(path.to_path_buf(), m.uid(), m.gid(), m.mode())];
    if m.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for e in entries {
            out.extend(owners_and_modes(&e));
        }
    }
    out
}

#[test]
fn the_account_script_never_follows_links_a_tenant_planted() {
    let (root, server, accounts) = server_only(&["victim", "mallory"]);
    let (av, am) = (&accounts[0], &accounts[1]);
    let local = tempfile::tempdir().unwrap();
    let f = local_file(local.path(), "v.csv", &users_csv("v", 2, false));
    assert!(
        server
            .sftp(av, &[], &format!("put {} victim.csv\n", f.display()))
            .ok
    );
    // The victim's bak/ as ingest leaves it.
    let victim_upload = server.upload_dir("victim");
    std::fs::create_dir(victim_upload.join("bak")).unwrap();
    std::fs::write(victim_upload.join("bak/old.csv"), "x").unwrap();

    // Mallory (before links were refused, or by other means) replaced its bak/ and planted
    // links to the victim's folders and files and to a host file.
    let mallory = server.upload_dir("mallory");
    let plant = |target: &str, name: &str| {
        std::os::unix::fs::symlink(target, mallory.join(name)).unwrap();
    };
    plant("../../victim/upload", "bak");
    plant("/etc/passwd", "x");
    plant(
        &victim_upload.join("victim.csv").display().to_string(),
        "y.csv",
    );
    plant("../../victim", "z");
    let watched = || {
        let mut v = owners_and_modes(&root.path().join("victim"));
        v.extend(owners_and_modes(Path::new("/etc/passwd")));
        v.extend(owners_and_modes(Path::new("/etc/shadow")));
        v
    };
    let before = watched();
    assert!(before.len() >= 5, "{before:?}");

    let key = format!("{}.pub", server.client_key().display());
    let script = |args: &[&str]| {
        let out = server.account_script(args).unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let user = am.user.as_str();
    script(&["rotate", "mallory", "--user", user, "--key", &key]);
    script(&["rotate", "mallory", "--user", user, "--no-password"]);
    script(&["remove", "mallory", "--user", user, "--keep-files"]);
    script(&["add", "mallory", "--user", user, "--key", &key]);
    script(&["rotate", "mallory", "--user", user, "--key", &key]);
    assert_eq!(
        watched(),
        before,
        "nothing outside mallory's folder changed"
    );
    // Mallory's own drop folder is right again after the re-add, its links still in it.
    let m = std::fs::symlink_metadata(&mallory).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o2770);
    assert!(std::fs::symlink_metadata(mallory.join("bak"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(server.sftp(am, &[], "ls\n").ok, "mallory logs in again");

    // A tenant folder that is itself a link (only root could make one) is refused, not
    // followed into the victim's folder.
    std::os::unix::fs::symlink(root.path().join("victim"), root.path().join("evil")).unwrap();
    let evil = format!("mt{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let out = server
        .account_script(&["add", "evil", "--user", &evil, "--key", &key])
        .unwrap();
    if out.status.success() {
        // Do not leave the account behind when this fails.
        let _ = server.account_script(&["remove", "evil", "--user", &evil, "--keep-files"]);
    }
    assert!(!out.status.success(), "add through a linked folder refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("symbolic link"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !std::process::Command::new("getent")
            .args(["passwd", &evil])
            .status()
            .unwrap()
            .success(),
        "no account made"
    );

    // Removing mallory with its files removes the links, not what they point to.
    script(&["remove", "mallory", "--user", user]);
    assert!(std::fs::symlink_metadata(root.path().join("mallory")).is_err());
    assert_eq!(watched(), before, "the victim's folder is intact");
    assert!(server.sftp(av, &[], "ls bak\n").ok);
}
