//! One tenant can never hurt another, and no upload is lost: links in a tenant's folder,
//! re-uploads while importing, malformed and huge files, a channel closed by the broker, and
//! names that are not UTF-8.
//!
//! (Over 400 lines: one test per isolation defect, each a user story on real services.)

use mui_shared::files::FileState;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use mui_ingest::pipeline::{Hooks, Pause};
use mui_tests::{spawn_app_with, AppOptions};
use tokio::sync::mpsc;

fn users_csv(ids: &[&str]) -> Vec<u8> {
    let mut s = String::from("unique_id,login_source,first_name\n");
    for id in ids {
        s.push_str(&format!("{id},sso,Name {id}\n"));
    }
    s.into_bytes()
}

fn with_pauses() -> (AppOptions, mpsc::UnboundedReceiver<Pause>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        AppOptions {
            ingest_hooks: Hooks { pauses: Some(tx) },
            ..AppOptions::default()
        },
        rx,
    )
}

/// Waits for ingest to reach `point` for a file, answering (resuming) any other pause.
async fn reach(rx: &mut mpsc::UnboundedReceiver<Pause>, point: &str) -> Pause {
    loop {
        let p = tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("ingest never reached {point}"))
            .expect("ingest's hooks dropped");
        if p.0 == point {
            return p;
        }
        let _ = p.2.send(());
    }
}

/// Resumes every pause from now on.
fn resume_all(mut rx: mpsc::UnboundedReceiver<Pause>) {
    tokio::spawn(async move {
        while let Some((_, _, resume)) = rx.recv().await {
            let _ = resume.send(());
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bak_link_into_another_tenants_folder_is_never_followed() {
    let mut app = spawn_app_with(AppOptions::default()).await;
    let acme = app.env.tenant("acme").unwrap();
    let globex = app.env.tenant("globex").unwrap();
    let globex_dir = app.env.folder("globex");
    std::os::unix::fs::symlink("../../acme/upload", globex_dir.join("bak")).unwrap();

    app.env
        .drop_file("globex", "users.csv", &users_csv(&["g1", "g2"]))
        .unwrap();
    let files = app.wait_files_settled(&globex, 1).await;
    assert_eq!(files[0].state, FileState::Done);

    // globex's rows are globex's; nothing reached acme's folder or users.
    assert_eq!(app.env.users(&globex).len(), 2);
    assert!(app.env.users(&acme).is_empty());
    assert!(app.env.files(&acme).is_empty());
    assert_eq!(
        std::fs::read_dir(app.env.folder("acme")).unwrap().count(),
        0,
        "nothing was written into acme's folder"
    );
    // The link was set aside, not followed; a real bak/ holds globex's file.
    let bak = globex_dir.join("bak");
    assert!(bak.is_dir() && !bak.is_symlink());
    let archived = files[0].archived_name.clone().unwrap();
    assert_eq!(
        std::fs::read(bak.join(&archived)).unwrap(),
        users_csv(&["g1", "g2"])
    );
    let aside = globex_dir.join(format!("bak.not-a-folder.{}", files[0].id));
    assert!(std::fs::symlink_metadata(&aside).unwrap().is_symlink());
    assert!(
        files[0].notices.iter().any(|n| n.contains("symbolic link")),
        "{:?}",
        files[0].notices
    );
    // globex is told, although no row failed; acme hears nothing.
    let mails = app.env.smtp.messages();
    assert_eq!(mails.len(), 1, "one mail");
    assert!(mails[0].to.iter().all(|t| t.contains("globex")));
    assert!(
        mails[0].body().contains("was not followed"),
        "{}",
        mails[0].body()
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn links_and_fifos_in_a_drop_folder_are_reported_and_never_opened() {
    let mut app = spawn_app_with(AppOptions::default()).await;
    let acme = app.env.tenant("acme").unwrap();
    let globex = app.env.tenant("globex").unwrap();
    // Another tenant's data, where globex's SFTP session cannot reach it.
    let secret = app.env.drop_root.path().join("acme").join("secret.csv");
    std::fs::write(&secret, users_csv(&["a1"])).unwrap();
    let globex_dir = app.env.folder("globex");
    // Made behind OpenSSH's back (SFTP refuses to make links): a link to acme's file, and a
    // FIFO that would block a reader forever.
    std::os::unix::fs::symlink("../../acme/secret.csv", globex_dir.join("a.csv")).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(globex_dir.join("pipe.csv"))
        .status()
        .unwrap();
    assert!(status.success());
    app.env
        .drop_file("globex", "real.csv", &users_csv(&["g1"]))
        .unwrap();
    let files = app.wait_files_finished(&globex, 3).await;
    let by_name = |n: &str| files.iter().find(|f| f.file_name == n).unwrap().clone();
    assert_eq!(
        by_name("a.csv").error_code.as_deref(),
        Some("not_regular_file")
    );
    assert_eq!(
        by_name("pipe.csv").error_code.as_deref(),
        Some("not_regular_file")
    );
    assert_eq!(by_name("real.csv").state, FileState::Done);
    // Only globex's own file became users; the link and the FIFO are left where they were.
    let users = app.env.users(&globex);
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].0, "g1");
    assert!(std::fs::symlink_metadata(globex_dir.join("a.csv"))
        .unwrap()
        .is_symlink());
    assert_eq!(std::fs::read(&secret).unwrap(), users_csv(&["a1"]));
    assert!(app.env.users(&acme).is_empty());
    app.stop().await;
}

/// The file ids handed out so far (each registration attempt takes one, even for an entry
/// registered before).
fn ids_taken(env: &mui_tests::TestEnv) -> i64 {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Last {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        last_value: i64,
    }
    diesel::sql_query("SELECT last_value FROM import_files_id_seq")
        .get_result::<Last>(&mut env.db.conn())
        .unwrap()
        .last_value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn entries_left_in_a_drop_folder_are_reported_once_and_the_tenant_goes_on() {
    let mut app = spawn_app_with(AppOptions {
        rescan_secs: 1,
        ..AppOptions::default()
    })
    .await;
    let acme = app.env.tenant("acme").unwrap();
    let dir = app.env.folder("acme");
    // Folders, links and FIFOs the tenant leaves in its folder for good.
    for i in 0..60 {
        let p = dir.join(format!("s{i}.csv"));
        match i % 3 {
            0 => std::fs::create_dir(&p).unwrap(),
            1 => std::os::unix::fs::symlink("/etc/hostname", &p).unwrap(),
            _ => assert!(std::process::Command::new("mkfifo")
                .arg(&p)
                .status()
                .unwrap()
                .success()),
        }
    }
    let files = app.wait_files_finished(&acme, 60).await;
    assert!(
        files
            .iter()
            .all(|f| f.error_code.as_deref() == Some("not_regular_file")),
        "{files:?}"
    );
    // Rescans and ticks go by: none of them is handled again (each handling took a file id,
    // 5 per entry and second before).
    let before = ids_taken(&app.env);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(ids_taken(&app.env), before, "entries handled again");
    // The tenant's uploads are taken as ever, each once.
    for n in 0..3 {
        app.env
            .drop_file(
                "acme",
                &format!("u{n}.csv"),
                &users_csv(&[&format!("a{n}")]),
            )
            .unwrap();
    }
    let files = app.wait_files_finished(&acme, 63).await;
    assert_eq!(files.len(), 63, "{files:?}");
    assert_eq!(app.env.users(&acme).len(), 3);
    // A left entry replaced by another is a new entry, reported again.
    std::fs::remove_dir(dir.join("s0.csv")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", dir.join("s0.csv")).unwrap();
    let files = app.wait_files_finished(&acme, 64).await;
    assert_eq!(
        files.iter().filter(|f| f.file_name == "s0.csv").count(),
        2,
        "{files:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reupload_under_the_same_name_while_importing_is_imported_too() {
    let (options, mut pauses) = with_pauses();
    let mut app = spawn_app_with(options).await;
    let acme = app.env.tenant("acme").unwrap();
    app.env
        .drop_file("acme", "users.csv", &users_csv(&["a1", "a2"]))
        .unwrap();
    // The first upload is imported and about to be archived when the tenant uploads the
    // same name again (a new file renamed over it, as WinSCP, FileZilla and sftp put do).
    let (_, name, resume) = reach(&mut pauses, "ingest.before_archive").await;
    assert_eq!(name, "users.csv");
    app.env
        .drop_file("acme", "users.csv", &users_csv(&["b1"]))
        .unwrap();
    resume.send(()).unwrap();
    resume_all(pauses);

    let files = app.wait_files_settled(&acme, 2).await;
    assert_eq!(files.len(), 2, "each upload is its own file: {files:?}");
    assert!(
        files.iter().all(|f| f.state == FileState::Done),
        "{files:?}"
    );
    let ids: Vec<String> = app.env.users(&acme).into_iter().map(|u| u.0).collect();
    assert_eq!(ids, ["a1", "a2", "b1"]);
    // Both uploads are in bak/, each under its own name, with its own bytes.
    let bak = app.env.folder("acme").join("bak");
    let first = std::fs::read(bak.join(files[0].archived_name.as_ref().unwrap())).unwrap();
    let second = std::fs::read(bak.join(files[1].archived_name.as_ref().unwrap())).unwrap();
    assert_eq!(first, users_csv(&["a1", "a2"]));
    assert_eq!(second, users_csv(&["b1"]));
    assert!(!app.env.folder("acme").join("users.csv").exists());
    // Nothing failed and there was nothing to tell: no mail.
    assert_eq!(app.env.smtp.messages().len(), 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unclosed_quote_fails_its_file_and_every_other_tenant_goes_on() {
    let mut app = spawn_app_with(AppOptions {
        chunk_rows: 500,
        ..AppOptions::default()
    })
    .await;
    let acme = app.env.tenant("acme").unwrap();
    let globex = app.env.tenant("globex").unwrap();
    // 4 MB whose quote in row 3 never closes: one giant cell to the end of the file.
    let mut bad = b"unique_id,login_source,street\ng1,sso,x\ng2,sso,\"Main St\n".to_vec();
    for i in 0..100_000 {
        bad.extend_from_slice(format!("g{i},sso,somewhere street {i}\n").as_bytes());
    }
    app.env.drop_file("globex", "bad.csv", &bad).unwrap();
    app.env
        .drop_file("acme", "users.csv", &users_csv(&["a1"]))
        .unwrap();
    let g = app.wait_files_settled(&globex, 1).await;
    assert_eq!(g[0].state, FileState::Failed);
    assert_eq!(g[0].error_code.as_deref(), Some("unclosed_quote"));
    let message = g[0].error_message.clone().unwrap();
    assert!(message.contains("row 3, on line 3"), "{message}");
    assert_eq!(g[0].total_chunks, None, "nothing was published");
    assert!(
        app.env.users(&globex).is_empty(),
        "a failed file imports nothing"
    );
    let a = app.wait_files_settled(&acme, 1).await;
    assert_eq!(a[0].state, FileState::Done);
    assert_eq!(app.env.users(&acme).len(), 1);
    // globex is told why, in one mail.
    let mails = app.env.smtp.messages();
    let to_globex: Vec<_> = mails
        .iter()
        .filter(|m| m.to.iter().any(|t| t.contains("globex")))
        .collect();
    assert_eq!(to_globex.len(), 1);
    assert!(to_globex[0].body().contains("never closed"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_huge_record_is_one_failed_row_and_chunks_stay_small() {
    let mut app = spawn_app_with(AppOptions {
        chunk_rows: 100_000,
        chunk_max_bytes: 64 * 1024,
        ..AppOptions::default()
    })
    .await;
    let acme = app.env.tenant("acme").unwrap();
    // Row 3 opens a quote that closes 2 MB later; the rows around it are fine.
    let mut data = b"unique_id,login_source,street\na1,sso,x\na2,sso,\"".to_vec();
    for _ in 0..50_000 {
        data.extend_from_slice(b"a line of an address that goes on\n");
    }
    data.extend_from_slice(b"\"\n");
    for i in 3..10_003 {
        data.extend_from_slice(format!("a{i},sso,street {i}\n").as_bytes());
    }
    app.env.drop_file("acme", "users.csv", &data).unwrap();
    let files = app.wait_files_settled(&acme, 1).await;
    let f = &files[0];
    assert_eq!(f.state, FileState::Done);
    assert_eq!(f.rows_total, Some(10_002), "every row counted");
    assert_eq!(f.rows_failed, 1, "the huge row failed");
    assert_eq!(app.env.users(&acme).len(), 10_001);
    // Chunks were cut by bytes, not only by rows.
    let chunks = f.total_chunks.unwrap();
    assert!(chunks > 1, "{chunks} chunk(s)");
    let mails = app.env.smtp.messages();
    assert_eq!(mails.len(), 1);
    let csv = mui_tests::parse_csv(&mails[0].attachments()[0].1);
    let failed: Vec<_> = csv.iter().filter(|r| r.iter().any(|c| c == "3")).collect();
    assert_eq!(failed.len(), 1, "{csv:?}");
    assert!(failed[0].iter().any(|c| c.contains("record_too_large")));
    app.stop().await;
}

/// Makes the broker close, with a channel error, every channel of the connections whose
/// name contains `marker`: each channel is made to declare a queue that does not exist
/// (passively), which RabbitMQ answers by closing that channel with 404 NOT_FOUND while the
/// connection stays open, as it does for a message over its size limit. Returns how many.
fn broker_closes_channels(marker: &str) -> usize {
    let erl = format!(
        "length([rabbit_channel:do(P, {{'queue.declare', 0, <<\"mui-test-no-such-queue\">>, true, false, false, false, false, []}}) || \
         P <- rabbit_channel:list(), \
         N <- [proplists:get_value(<<\"connection_name\">>, [{{K, V}} || {{K, _, V}} <- element(2, hd(rabbit_networking:connection_info(element(2, hd(rabbit_channel:info(P, [connection]))), [client_properties])))])], \
         is_binary(N), binary:match(N, <<\"{marker}\">>) =/= nomatch]).",
    );
    let out = std::process::Command::new("rabbitmqctl")
        .args(["eval", &erl])
        .output()
        .expect("rabbitmqctl runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("rabbitmqctl said {out:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_channel_the_broker_closes_is_reopened_and_nothing_stalls() {
    let (options, mut pauses) = with_pauses();
    // ingest publishing chunks itself (`direct`): with fair dispatch it queues them in the
    // database and its channels carry only the outbox (the dispatcher's channel is the
    // workers' publisher, the same `amqp::Publisher`).
    let mut app = spawn_app_with(AppOptions {
        chunk_rows: 2,
        chunk_dispatch: mui_ingest::pipeline::ChunkDispatch::Direct,
        ..options
    })
    .await;
    let acme = app.env.tenant("acme").unwrap();
    let globex = app.env.tenant("globex").unwrap();
    let marker = format!("mui-ingest {}", app.env.prefix);

    // 1. The broker closes ingest's channels (publisher and outbox relay) while nothing is
    //    in flight on them, as after a refused message; the connection stays up. The next
    //    file must go out on a new channel, not fail forever on the closed one.
    app.env
        .drop_file("acme", "users.csv", &users_csv(&["a1", "a2", "a3"]))
        .unwrap();
    let (_, _, resume) = reach(&mut pauses, "ingest.before_publish").await;
    let closed = broker_closes_channels(&marker);
    assert!(closed >= 1, "the broker closed {closed} channels");
    resume.send(()).unwrap();
    let (_, _, resume) = reach(&mut pauses, "ingest.before_archive").await;
    resume.send(()).unwrap();
    let files = app.wait_files_settled(&acme, 1).await;
    assert_eq!(files[0].state, FileState::Done);
    assert_eq!(app.env.users(&acme).len(), 3);

    // 2. Closed again in the middle of publishing a file (its first chunk sent, its confirm
    //    perhaps not yet back): the chunks whose confirm was lost and the rest go out again
    //    on a new channel; workers skip what they have.
    let ids: Vec<String> = (0..600).map(|i| format!("g{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    app.env
        .drop_file("globex", "big.csv", &users_csv(&refs))
        .unwrap();
    let (_, _, resume) = reach(&mut pauses, "ingest.publishing").await;
    let closed = broker_closes_channels(&marker);
    assert!(closed >= 1, "the broker closed {closed} channels");
    let total = app.env.files(&globex)[0].total_chunks;
    assert_eq!(total, None, "closed while the file was being published");
    resume.send(()).unwrap();
    resume_all(pauses);
    let g = app.wait_files_settled(&globex, 1).await;
    assert_eq!(g[0].state, FileState::Done);
    assert_eq!(g[0].rows_total, Some(600));
    assert_eq!(app.env.users(&globex).len(), 600);

    // 3. Later files of every tenant still go through.
    app.env
        .drop_file("acme", "later.csv", &users_csv(&["a4"]))
        .unwrap();
    let a = app.wait_files_settled(&acme, 2).await;
    assert!(a.iter().all(|f| f.state == FileState::Done), "{a:?}");
    assert_eq!(app.env.users(&acme).len(), 4);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_name_that_is_not_utf8_is_imported_under_an_escaped_name() {
    let mut app = spawn_app_with(AppOptions::default()).await;
    let acme = app.env.tenant("acme").unwrap();
    let folder = app.env.folder("acme");
    let raw = OsStr::from_bytes(b"caf\xE9 list.csv");
    std::fs::write(folder.join("tmp.filepart"), users_csv(&["c1"])).unwrap();
    std::fs::rename(folder.join("tmp.filepart"), folder.join(raw)).unwrap();
    let files = app.wait_files_settled(&acme, 1).await;
    assert_eq!(files[0].file_name, "caf%E9 list.csv");
    assert_eq!(files[0].state, FileState::Done);
    assert_eq!(app.env.users(&acme).len(), 1);
    assert_eq!(files[0].archived_name.as_deref(), Some("caf%E9 list.csv"));
    assert!(folder.join("bak").join("caf%E9 list.csv").exists());
    assert!(!folder.join(raw).exists());
    let notices = &files[0].notices;
    assert!(
        notices.iter().any(|n| n.contains("not valid UTF-8")),
        "{notices:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_chunking_of_a_file_is_fixed_when_it_is_registered() {
    let (options, mut pauses) = with_pauses();
    let mut app = spawn_app_with(AppOptions {
        chunk_rows: 3,
        ..options
    })
    .await;
    let acme = app.env.tenant("acme").unwrap();
    let ids: Vec<String> = (0..30).map(|i| format!("u{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    app.env
        .drop_file("acme", "users.csv", &users_csv(&refs))
        .unwrap();
    // Registered, not published yet: ingest dies here and comes back with another setting.
    let (_, _, resume) = reach(&mut pauses, "ingest.before_publish").await;
    app.kill().await;
    drop(resume);
    app.env.options.chunk_rows = 7;
    app.env.options.ingest_hooks = Hooks::default();
    app.start();
    let files = app.wait_files_settled(&acme, 1).await;
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].rows_total, Some(30));
    assert_eq!(app.env.chunk_rows(files[0].id), Some(3));
    assert_eq!(files[0].total_chunks, Some(10), "cut in 3s as registered");
    assert_eq!(app.env.users(&acme).len(), 30);
    app.stop().await;
}

/// The problem ingest recorded for a tenant's drop folder: None while it has not looked,
/// Some(None) when the folder is fine.
fn folder_problem(env: &mui_tests::TestEnv, tenant_id: i64) -> Option<Option<String>> {
    use diesel::prelude::*;
    use mui_shared::schema::drop_folder_status as dfs;
    dfs::table
        .find(tenant_id)
        .select(dfs::problem)
        .first::<Option<String>>(&mut env.db.conn())
        .optional()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drop_folder_ingest_may_not_read_is_shown_to_the_operator() {
    use std::os::unix::fs::PermissionsExt;
    // ingest runs as an unprivileged user (nobody, group nogroup), as in production, where
    // the tenant owns upload/ and ingest reaches it through the folder's group.
    let env = mui_tests::TestEnv::new(AppOptions::default()).unwrap();
    let acme = env.tenant("acme").unwrap();
    let (nobody, nogroup) = (65534, 65534);
    let set_mode = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    set_mode(env.drop_root.path(), 0o755);
    let upload = env.folder("acme");
    std::os::unix::fs::chown(&upload, Some(0), Some(nogroup)).unwrap();
    set_mode(&upload, 0o2770);
    let logs = tempfile::tempdir().unwrap();
    let vars = mui_tests::chaos::service_env(&env, mui_tests::chaos::Kind::Ingest);
    let mut ingest = mui_tests::chaos::ServiceProcess::start_as(
        env!("CARGO_BIN_EXE_mui-service"),
        mui_tests::chaos::Kind::Ingest,
        vars,
        &logs.path().join("ingest.log"),
        nobody,
        nogroup,
    );
    env.wait_until(120, "ingest looked at acme's folder", || {
        folder_problem(&env, acme.id) == Some(None)
    })
    .await;
    // The tenant takes the group's rights away (SFTP chmod 700).
    set_mode(&upload, 0o700);
    env.wait_until(60, "the operator sees the folder problem", || {
        matches!(folder_problem(&env, acme.id), Some(Some(_)))
    })
    .await;
    let problem = folder_problem(&env, acme.id).unwrap().unwrap();
    assert!(problem.contains("acme/upload"), "{problem}");
    assert!(problem.contains("cannot be read"), "{problem}");
    // Read but not write (chmod 750): files could not be moved to bak/; shown too.
    set_mode(&upload, 0o2750);
    env.wait_until(60, "the write problem is shown", || {
        folder_problem(&env, acme.id)
            .flatten()
            .is_some_and(|p| p.contains("may not create or remove files"))
    })
    .await;
    // Put right, the problem clears.
    set_mode(&upload, 0o2770);
    env.wait_until(60, "the problem clears", || {
        folder_problem(&env, acme.id) == Some(None)
    })
    .await;
    ingest.kill9().await;
    drop(ingest);
    let log = std::fs::read_to_string(logs.path().join("ingest.log")).unwrap_or_default();
    assert!(
        log.contains("DropFolderProblem"),
        "logged for the operator too"
    );
}
