//! "Every file ends, once, whatever it holds" (issue 26): inputs and events found to break
//! it, each reproduced on the real services. A file ends in one final state with exactly
//! one report, and nothing a tenant uploads can block that tenant's later files.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use mui_shared::failpoint;
use mui_shared::files::{FileState, NotifyStatus};
use mui_shared::schema::tenants;
use mui_tests::chaos::{
    host_port, service_env, wait_settled, FaultProxy, Kind, ServiceProcess, Services,
};
use mui_tests::{parse_csv, spawn_app, AppOptions, TestEnv};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_mui-service");

/// `text` as UTF-16LE with a byte order mark, as Excel's "Unicode Text" and some HR systems
/// write it.
fn utf16le(text: &str) -> Vec<u8> {
    let mut out = vec![0xFF, 0xFE];
    for unit in text.encode_utf16() {
        out.extend_from_slice(&unit.to_le_bytes());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nul_in_a_utf16_header_fails_the_file_once_and_the_tenants_next_file_imports() {
    let mut app = spawn_app().await;
    let env = &app.env;
    let t = env.tenant("acme").unwrap();
    let bad = utf16le("unique_id,login_source,fir\u{0}st\r\nn1,sso,Ann\r\n");
    env.drop_file("acme", "nul-header.csv", &bad).unwrap();
    let files = app.wait_files_settled(&t, 1).await;
    assert_eq!(files[0].state, FileState::Failed, "{files:?}");
    assert_eq!(files[0].notify_status, NotifyStatus::Sent, "{files:?}");
    let message = files[0].error_message.clone().unwrap_or_default();
    assert!(
        message.contains("U+0000"),
        "the message names the character: {message}"
    );
    // The tenant is not blocked: its next file imports and is mailed.
    env.drop_file("acme", "later.csv", b"unique_id,login_source\nk1,sso\n")
        .unwrap();
    let files = app.wait_files_settled(&t, 2).await;
    let later = files.iter().find(|f| f.file_name == "later.csv").unwrap();
    assert_eq!(later.state, FileState::Done, "{files:?}");
    assert_eq!(env.users(&t).len(), 1);
    let mails = env.smtp.messages();
    assert_eq!(
        mails.len(),
        1,
        "one mail: the failed file's (later.csv had no failures)"
    );
    assert!(
        mails[0].subject().contains("nul-header.csv"),
        "{}",
        mails[0].subject()
    );
    assert!(mails[0].body().contains("U+0000"), "{}", mails[0].body());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nul_in_a_utf16_cell_is_a_reported_row_and_the_report_is_sent() {
    let mut app = spawn_app().await;
    let env = &app.env;
    let t = env.tenant("acme").unwrap();
    let text =
        "unique_id,login_source,first_name\r\nn1,sso,A\u{0}nn\r\nn2,sso,Bob\r\nn\u{0}3,sso,Cy\r\n";
    env.drop_file("acme", "nul-cell.csv", &utf16le(text))
        .unwrap();
    let files = app.wait_files_settled(&t, 1).await;
    assert_eq!(files[0].state, FileState::Done, "{files:?}");
    assert_eq!(files[0].notify_status, NotifyStatus::Sent, "{files:?}");
    assert_eq!(files[0].rows_failed, 2, "{files:?}");
    let users: Vec<String> = env.users(&t).into_iter().map(|u| u.0).collect();
    assert_eq!(users, ["n2"]);
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1);
    let rows = parse_csv(&mails[0].attachments()[0].1);
    let reported: Vec<(&str, &str)> = rows[1..]
        .iter()
        .map(|r| (r[0].as_str(), r[4].as_str()))
        .collect();
    assert_eq!(
        reported,
        [("2", "control_character"), ("4", "control_character")],
        "{rows:?}"
    );
    assert!(rows[1][5].contains("U+0000"), "{}", rows[1][5]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_guard_counts_a_deactivation_that_a_later_refused_row_of_the_same_id_leaves_standing() {
    let mut app = spawn_app().await;
    let env = &app.env;
    let t = env.tenant("acme").unwrap();
    diesel::update(tenants::table.find(t.id))
        .set(tenants::archive_on_inactive.eq(true))
        .execute(&mut env.db.conn())
        .unwrap();
    let mut seed = String::from("unique_id,login_source,email,active\n");
    for i in 0..100 {
        seed.push_str(&format!("u{i:03},sso,u{i:03}@example.org,1\n"));
    }
    env.drop_file("acme", "seed.csv", seed.as_bytes()).unwrap();
    app.wait_files_settled(&t, 1).await;
    // Every user deactivated, then each id again with an invalid email and active=1: the
    // later rows are refused, so the earlier ones stand and would archive all 100.
    let mut csv = String::from("unique_id,login_source,email,active\n");
    for i in 0..100 {
        csv.push_str(&format!("u{i:03},sso,,0\n"));
    }
    for i in 0..100 {
        csv.push_str(&format!("u{i:03},sso,not-an-email,1\n"));
    }
    env.drop_file("acme", "bypass.csv", csv.as_bytes()).unwrap();
    let hold_of = || -> Option<String> {
        mui_shared::schema::import_files::table
            .filter(mui_shared::schema::import_files::file_name.eq("bypass.csv"))
            .select(mui_shared::schema::import_files::hold)
            .first(&mut env.db.conn())
            .optional()
            .unwrap()
            .flatten()
    };
    env.wait_until(60, "bypass.csv held and the tenant told", || {
        hold_of().as_deref() == Some("held") && !env.smtp.messages().is_empty()
    })
    .await;
    let active = env.users(&t).iter().filter(|u| u.5).count();
    assert_eq!(active, 100, "nothing deactivated while the file is held");
    // The operator sees what it waits on.
    let waiting = mui_shared::files::waiting(&mut env.db.conn()).unwrap();
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert_eq!(waiting[0].file_name, "bypass.csv");
    assert!(
        waiting[0].why.contains("mass-deactivation guard"),
        "{waiting:?}"
    );
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1, "the held notice");
    assert!(mails[0].body().contains("100"), "{}", mails[0].body());
    app.stop().await;
}

/// A file whose handling was cut (ingest killed right after registering it) and that the
/// tenant replaced before ingest came back: the first registration's content is gone, so it
/// ends failed with one report saying so, and the replacement and a later file import.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_replaced_while_ingest_was_down_ends_once_and_blocks_nothing() {
    let env = TestEnv::new(AppOptions {
        chunk_rows: 20,
        settle_ms: 200,
        ..Default::default()
    })
    .unwrap();
    let t = env.tenant("acme").unwrap();
    let logs = tempfile::tempdir().unwrap();
    let start = |kind: Kind, stop: Option<&str>| {
        let mut vars = service_env(&env, kind);
        if let Some(point) = stop {
            vars.push((failpoint::ENV.to_owned(), point.to_owned()));
        }
        ServiceProcess::start(BIN, kind, vars, &logs.path().join(format!("{kind:?}.log")))
    };
    let mut ingest = start(Kind::Ingest, Some("ingest.after_register"));
    let mut worker = start(Kind::Worker, None);
    let mut notifier = start(Kind::Notifier, None);
    let mut first = String::from("unique_id,login_source\n");
    for i in 0..200 {
        first.push_str(&format!("f{i},sso\n"));
    }
    env.drop_file("acme", "users.csv", first.as_bytes())
        .unwrap();
    ingest
        .wait_log(&failpoint::reached_line("ingest.after_register"), 120)
        .await;
    ingest.kill9().await;
    // While ingest is down the tenant replaces users.csv and drops another file.
    env.drop_file("acme", "users.csv", b"unique_id,login_source\nr1,sso\n")
        .unwrap();
    ingest.set_var(failpoint::ENV, None);
    ingest.restart();
    env.wait_until(120, "users.csv (new) taken", || {
        env.files(&t)
            .iter()
            .filter(|f| f.file_name == "users.csv")
            .count()
            == 2
    })
    .await;
    env.drop_file("acme", "later.csv", b"unique_id,login_source\nl1,sso\n")
        .unwrap();
    env.wait_until(120, "all three files finished and notified", || {
        let files = env.files(&t);
        files.len() == 3
            && files.iter().all(|f| {
                matches!(f.state, FileState::Done | FileState::Failed)
                    && matches!(
                        f.notify_status,
                        NotifyStatus::Sent | NotifyStatus::NotNeeded
                    )
            })
    })
    .await;
    let files = env.files(&t);
    assert_eq!(files[0].file_name, "users.csv");
    assert_eq!(files[0].state, FileState::Failed, "{files:?}");
    assert_eq!(
        files[0].error_code.as_deref(),
        Some("unreadable"),
        "{files:?}"
    );
    assert_eq!(files[0].notify_status, NotifyStatus::Sent, "{files:?}");
    assert!(
        files[1..].iter().all(|f| f.state == FileState::Done),
        "{files:?}"
    );
    let users: Vec<String> = env.users(&t).into_iter().map(|u| u.0).collect();
    assert_eq!(
        users,
        ["l1", "r1"],
        "only the replacement and the later file imported"
    );
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1, "one report: the lost version's");
    assert!(
        mails[0].body().contains("replaced") || mails[0].body().contains("removed"),
        "{}",
        mails[0].body()
    );
    for p in [&mut ingest, &mut worker, &mut notifier] {
        p.kill9().await;
    }
}

/// The database is gone at the moment ingest records that it moved a file to `bak/` (the
/// flaky outage test's window): the file is no longer in the drop folder to be taken again,
/// and its archive is still recorded once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_to_bak_that_could_not_be_recorded_is_recorded_when_the_database_is_back() {
    let env = TestEnv::new(AppOptions {
        rescan_secs: 1,
        ..Default::default()
    })
    .unwrap();
    let t = env.tenant("acme").unwrap();
    let pg = FaultProxy::start(&host_port(&env.db.url, 5432)).unwrap();
    let mut ingest = env.ingest_config();
    ingest.common.database_url = pg.url_for(&env.db.url);
    let (pauses, mut paused) = tokio::sync::mpsc::unbounded_channel();
    ingest.hooks.pauses = Some(pauses);
    let services = Services::start(
        vec![ingest],
        vec![env.worker_config()],
        Some(env.notifier_config()),
    );
    env.drop_file(
        "acme",
        "users.csv",
        b"unique_id,login_source\nb1,sso\nb2,nope\n",
    )
    .unwrap();
    let mut cut = false;
    while let Some((point, _name, resume)) = paused.recv().await {
        if point == "ingest.before_archive" && !cut {
            pg.down();
            cut = true;
            let _ = resume.send(());
            break;
        }
        let _ = resume.send(());
    }
    assert!(cut, "ingest reached the archive step");
    env.wait_until(60, "the move to bak/ done", || {
        !env.folder("acme").join("users.csv").exists()
    })
    .await;
    // Longer than the pool waits for a connection (10 s), so that recording the move fails.
    tokio::time::sleep(Duration::from_secs(12)).await;
    pg.up();
    // Let later pauses through.
    tokio::spawn(async move {
        while let Some((_, _, resume)) = paused.recv().await {
            let _ = resume.send(());
        }
    });
    let files = wait_settled(&env, &t, 1, 120).await;
    assert_eq!(
        files[0].archived_name.as_deref(),
        Some("users.csv"),
        "{files:?}"
    );
    assert_eq!(files[0].state, FileState::Done, "{files:?}");
    assert_eq!(env.smtp.messages().len(), 1);
    services.stop().await;
}

/// A file whose handling the database refuses every time (here a trigger stands for an input
/// nobody foresaw) is ended as `internal_error` with one report, and the tenant's next file
/// imports: no file holds back its tenant for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_that_fails_again_and_again_is_ended_and_blocks_nothing() {
    let env = TestEnv::new(AppOptions {
        rescan_secs: 1,
        ..Default::default()
    })
    .unwrap();
    let t = env.tenant("acme").unwrap();
    env.db
        .conn()
        .batch_execute(
        "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.file_name = 'poison.csv' AND NEW.total_chunks IS NOT NULL \
         AND array_to_string(NEW.notices, ' ') NOT LIKE '%again and again%' THEN \
         RAISE EXCEPTION 'refused for the test'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER poison BEFORE UPDATE ON import_files FOR EACH ROW EXECUTE FUNCTION poison();",
    )
    .unwrap();
    let services = Services::start(
        vec![env.ingest_config()],
        vec![env.worker_config()],
        Some(env.notifier_config()),
    );
    env.drop_file(
        "acme",
        "poison.csv",
        b"unique_id,login_source\np1,sso\np2,sso\n",
    )
    .unwrap();
    env.wait_until(60, "poison.csv registered", || !env.files(&t).is_empty())
        .await;
    env.drop_file("acme", "later.csv", b"unique_id,login_source\nl1,sso\n")
        .unwrap();
    let files = wait_settled(&env, &t, 2, 180).await;
    let poison = files.iter().find(|f| f.file_name == "poison.csv").unwrap();
    let later = files.iter().find(|f| f.file_name == "later.csv").unwrap();
    assert_eq!(later.state, FileState::Done, "{files:?}");
    assert_eq!(poison.notify_status, NotifyStatus::Sent, "{files:?}");
    // Its one chunk was queued before the refused step: it is kept and imported.
    let users: Vec<String> = env.users(&t).into_iter().map(|u| u.0).collect();
    assert_eq!(users, ["l1", "p1", "p2"], "{files:?}");
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1, "one report: poison.csv's");
    assert!(
        mails[0]
            .body()
            .contains("failed on this file again and again"),
        "{}",
        mails[0].body()
    );
    services.stop().await;
}

/// Renaming a dry run to a real name while ingest checks it: the check ends as a dry run
/// (nothing changed, its mail), and the real name is imported as an upload of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dry_run_renamed_to_a_real_name_while_it_is_read_is_also_imported() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<mui_ingest::pipeline::Pause>();
    let mut app = mui_tests::spawn_app_with(AppOptions {
        ingest_hooks: mui_ingest::pipeline::Hooks { pauses: Some(tx) },
        ..AppOptions::default()
    })
    .await;
    let env = &app.env;
    let t = env.tenant("acme").unwrap();
    env.drop_file(
        "acme",
        "x.validate.csv",
        b"unique_id,login_source\nv1,sso\nv2,nope\n",
    )
    .unwrap();
    let resume = loop {
        let (point, name, resume) = rx.recv().await.unwrap();
        if point == "ingest.before_publish" && name == "x.validate.csv" {
            break resume;
        }
        let _ = resume.send(());
    };
    let folder = env.folder("acme");
    std::fs::rename(folder.join("x.validate.csv"), folder.join("x.csv")).unwrap();
    let _ = resume.send(());
    tokio::spawn(async move {
        while let Some((_, _, resume)) = rx.recv().await {
            let _ = resume.send(());
        }
    });
    let files = app.wait_files_settled(&t, 2).await;
    let names: Vec<&str> = files.iter().map(|f| f.file_name.as_str()).collect();
    assert_eq!(names, ["x.validate.csv", "x.csv"], "{files:?}");
    assert!(
        files.iter().all(|f| f.state == FileState::Done),
        "{files:?}"
    );
    let users: Vec<String> = env.users(&t).into_iter().map(|u| u.0).collect();
    assert_eq!(users, ["v1"], "the real import happened");
    assert_eq!(
        env.smtp.messages().len(),
        2,
        "the dry run's mail and the import's"
    );
    app.stop().await;
}

/// Two copies of the "file held" message handled at once (the outbox publishes at least
/// once) send one held mail: the second finds the first's claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_file_is_mailed_once_when_its_message_comes_twice() {
    let mut app = spawn_app().await;
    let env = &app.env;
    let t = env.tenant("acme").unwrap();
    let mut seed = String::from("unique_id,login_source,active\n");
    for i in 0..40 {
        seed.push_str(&format!("h{i:02},sso,1\n"));
    }
    env.drop_file("acme", "seed.csv", seed.as_bytes()).unwrap();
    app.wait_files_settled(&t, 1).await;
    let to = "it@acme.example.org".to_owned();
    env.smtp.update(|r| r.stall.push(to.clone()));
    let mut off = String::from("unique_id,login_source,active\n");
    for i in 0..40 {
        off.push_str(&format!("h{i:02},sso,0\n"));
    }
    env.drop_file("acme", "off.csv", off.as_bytes()).unwrap();
    env.wait_until(60, "the held mail's send under way", || {
        env.smtp.stalled() >= 1
    })
    .await;
    let file = env
        .files(&t)
        .into_iter()
        .find(|f| f.file_name == "off.csv")
        .unwrap();
    // The copy: "file held" once more through the outbox.
    mui_shared::holds::announce_held(
        &mut env.db.conn(),
        mui_shared::domain::ImportFileId(file.id),
        t.tenant_id(),
    )
    .unwrap();
    env.wait_until(30, "the copy published", || {
        mui_shared::schema::outbox::table
            .count()
            .get_result::<i64>(&mut env.db.conn())
            .unwrap()
            == 0
    })
    .await;
    // Time for the copy to be handled beside the stalled send (a second send would stall
    // too and be counted).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.smtp.stalled(), 1, "one send of the held mail");
    env.smtp.update(|r| r.stall.clear());
    env.wait_until(60, "the held mail accepted", || {
        !env.smtp.messages().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.smtp.messages().len(),
        1,
        "{:?}",
        env.smtp
            .messages()
            .iter()
            .map(|m| m.subject())
            .collect::<Vec<_>>()
    );
    app.stop().await;
}

/// The tenant uploads the same name again, into the same file (as an SFTP client without
/// temporary names does), while ingest queues its chunks: what was queued is the version
/// first read, cut short and said so, never a mix; the new content is imported whole as an
/// upload of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_overwritten_in_place_while_queued_is_never_mixed_and_the_new_one_imports() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<mui_ingest::pipeline::Pause>();
    let mut app = mui_tests::spawn_app_with(AppOptions {
        chunk_rows: 10,
        ingest_hooks: mui_ingest::pipeline::Hooks { pauses: Some(tx) },
        ..AppOptions::default()
    })
    .await;
    let env = &app.env;
    let t = env.tenant("acme").unwrap();
    let mut old = String::from("unique_id,login_source,first_name\n");
    for i in 0..2000 {
        old.push_str(&format!("o{i:04},sso,Old\n"));
    }
    env.drop_file("acme", "users.csv", old.as_bytes()).unwrap();
    let resume = loop {
        let (point, _, resume) = rx.recv().await.unwrap();
        if point == "ingest.publishing" {
            break resume;
        }
        let _ = resume.send(());
    };
    // In place: same inode, truncated and written again.
    let mut new = String::from("unique_id,login_source,first_name\n");
    for i in 0..30 {
        new.push_str(&format!("n{i:02},sso,New\n"));
    }
    std::fs::write(env.folder("acme").join("users.csv"), new.as_bytes()).unwrap();
    let _ = resume.send(());
    tokio::spawn(async move {
        while let Some((_, _, resume)) = rx.recv().await {
            let _ = resume.send(());
        }
    });
    env.wait_until(120, "both versions finished and notified", || {
        let files = env.files(&t);
        files.len() == 2
            && files.iter().all(|f| {
                f.state.is_finished()
                    && matches!(
                        f.notify_status,
                        NotifyStatus::Sent | NotifyStatus::NotNeeded
                    )
            })
    })
    .await;
    let files = env.files(&t);
    let users = env.users(&t);
    let olds: Vec<&str> = users
        .iter()
        .filter(|u| u.0.starts_with('o'))
        .map(|u| u.0.as_str())
        .collect();
    let news = users.iter().filter(|u| u.0.starts_with('n')).count();
    assert_eq!(news, 30, "the new content imported whole");
    assert!(
        !olds.is_empty() && olds.len() < 2000 && olds.len().is_multiple_of(10),
        "whole chunks of the old version: {}",
        olds.len()
    );
    // A prefix of the old version, never a row of it from after the write.
    let prefix: Vec<String> = (0..olds.len()).map(|i| format!("o{i:04}")).collect();
    assert_eq!(olds, prefix);
    assert!(
        users
            .iter()
            .all(|u| u.2.as_deref() == Some(if u.0.starts_with('o') { "Old" } else { "New" })),
        "no row mixes the versions"
    );
    assert_eq!(files[0].rows_total, Some(olds.len() as i64), "{files:?}");
    assert!(
        files[0]
            .notices
            .iter()
            .any(|n| n.contains("written to while it was being imported")),
        "{files:?}"
    );
    assert_eq!(files[1].rows_total, Some(30), "{files:?}");
    app.stop().await;
}

/// A tenant whose mail server refuses its reports for the time being (451) holds a
/// notifier slot only for MAIL_RETRY_SECS: then the report is held with the server's answer,
/// another tenant's report goes out on that slot, and `muictl files resend` sends the held
/// one once the server accepts mail again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mail_server_refusing_for_the_time_being_holds_its_report_and_frees_the_slot() {
    let env = TestEnv::new(AppOptions::default()).unwrap();
    let acme = env.tenant("acme").unwrap();
    let beta = env.tenant("beta").unwrap();
    env.smtp
        .update(|r| r.rcpt_replies.push(("it@acme.example.org".into(), 451)));
    let mut notifier = env.notifier_config();
    notifier.mail_concurrency = 1;
    notifier.mail_retry_secs = 3;
    let services = Services::start(
        vec![env.ingest_config()],
        vec![env.worker_config()],
        Some(notifier),
    );
    let bad = b"unique_id,login_source\na1,nope\n";
    env.drop_file("acme", "users.csv", bad).unwrap();
    env.wait_until(60, "acme's report refused", || {
        env.smtp.rcpt_refusals() >= 1
    })
    .await;
    env.drop_file("beta", "users.csv", bad).unwrap();
    env.wait_until(60, "beta's report sent on the freed slot", || {
        !env.smtp.messages_to("it@beta.example.org").is_empty()
    })
    .await;
    let acme_file = wait_settled(&env, &acme, 1, 60).await.remove(0);
    assert_eq!(acme_file.notify_status, NotifyStatus::Held, "{acme_file:?}");
    let detail = acme_file.notify_detail.clone().unwrap_or_default();
    assert!(detail.contains("kept refusing"), "{detail}");
    assert!(
        detail.contains(&format!("muictl files resend {}", acme_file.id)),
        "{detail}"
    );
    let waiting = mui_shared::files::waiting(&mut env.db.conn()).unwrap();
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert!(
        waiting[0]
            .why
            .starts_with("report held: the mail server kept refusing"),
        "{waiting:?}"
    );
    // The server accepts mail again; the operator sends the report again.
    env.smtp.update(|r| r.rcpt_replies.clear());
    assert!(mui_shared::files::resend_report(
        &mut env.db.conn(),
        mui_shared::domain::ImportFileId(acme_file.id)
    )
    .unwrap());
    env.wait_until(60, "acme's report sent", || {
        !env.smtp.messages_to("it@acme.example.org").is_empty()
    })
    .await;
    let acme_file = wait_settled(&env, &acme, 1, 60).await.remove(0);
    assert_eq!(acme_file.notify_status, NotifyStatus::Sent, "{acme_file:?}");
    assert_eq!(env.smtp.messages_to("it@acme.example.org").len(), 1);
    assert_eq!(
        wait_settled(&env, &beta, 1, 60).await[0].notify_status,
        NotifyStatus::Sent
    );
    services.stop().await;
}

/// What a report loads of a file's failure records is bounded in bytes, whatever its rows
/// hold: the first record always, then only while the total stays under the bound.
#[test]
fn a_reports_failure_records_are_loaded_within_a_byte_bound() {
    use mui_shared::schema::row_failures;
    let env = TestEnv::new(AppOptions::default()).unwrap();
    let t = env.tenant("acme").unwrap();
    let mut conn = env.db.conn();
    let file = mui_tests::register_file(
        &mut conn,
        t.id,
        "big.csv",
        &["unique_id", "login_source"],
        1,
        3,
    )
    .unwrap();
    let big = "x".repeat(1 << 20);
    for row in 2..5_i64 {
        diesel::insert_into(row_failures::table)
            .values((
                row_failures::file_id.eq(file),
                row_failures::row_number.eq(row),
                row_failures::fields.eq(serde_json::json!([big, "sso"])),
                row_failures::errors.eq(serde_json::json!([])),
            ))
            .execute(&mut conn)
            .unwrap();
    }
    let id = mui_shared::domain::ImportFileId(file);
    let rows = |limit, bytes| -> Vec<u64> {
        mui_shared::failures::load_failures_within(&mut env.db.conn(), id, limit, bytes)
            .unwrap()
            .iter()
            .map(|f| f.row)
            .collect()
    };
    assert_eq!(rows(100, 3 << 19), [2, 3], "1.5 MiB: two of the 1 MiB rows");
    assert_eq!(rows(100, 1), [2], "the first always");
    assert_eq!(rows(2, i64::MAX), [2, 3], "the row limit still holds");
    assert_eq!(rows(100, i64::MAX), [2, 3, 4]);
}

/// An operator ends a registered file that nothing reads (`muictl files end`, the console's
/// waiting page): refused while an ingest holds it, done once with the operator's reason in
/// the tenant's one report, and the tenant's next file imports.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_ends_a_registered_file_nothing_reads_and_the_next_file_imports() {
    use mui_shared::ending::{self, EndError};
    let env = TestEnv::new(AppOptions::default()).unwrap();
    let t = env.tenant("acme").unwrap();
    let mut conn = env.db.conn();
    // A registration as ingest makes it, whose ingest never comes back to it.
    let key = format!("{}:1:424242:1:30:stuck", t.id);
    let reg = mui_shared::files::register(
        &mut conn,
        &mui_shared::files::NewFile {
            tenant: mui_shared::domain::TenantId(t.id),
            name: "stuck.csv",
            arrival_key: &key,
            size: 30,
            sha256: "stuck",
            encoding: "UTF-8",
            chunk_rows: 1000,
            chunk_max_bytes: 1 << 20,
        },
    )
    .unwrap();
    let id = reg.id;
    let waiting = mui_shared::files::waiting(&mut conn).unwrap();
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert!(waiting[0].can_end, "{waiting:?}");
    assert!(
        waiting[0]
            .why
            .contains(&format!("muictl files end {}", id.0)),
        "{waiting:?}"
    );
    // An ingest holding the file's lock: refused, nothing changed.
    let mut reader = env.db.conn();
    diesel::sql_query(format!("SELECT pg_advisory_lock({})", id.0))
        .execute(&mut reader)
        .unwrap();
    let r = ending::end_by_operator(&mut conn, id, "tester", "stuck for the test");
    assert!(matches!(r, Err(EndError::BeingRead(_))), "{r:?}");
    assert!(!mui_shared::files::waiting(&mut conn).unwrap()[0].can_end);
    drop(reader);
    // In the console, as the operator would.
    let console = crate::console::Console::new(&env.db.url);
    let (cookie, csrf) = console.login().await;
    let page = console.json("/waiting?format=json", &cookie).await;
    assert_eq!(page["files"][0]["id"], id.0, "{page}");
    assert_eq!(page["files"][0]["can_end"], true, "{page}");
    let html = console.get("/waiting", &cookie).await;
    assert!(
        html.body.contains("action=\"/waiting/end\""),
        "{}",
        html.body
    );
    let form = format!(
        "csrf={csrf}&tenant=acme&file={}&reason=the+upload+was+a+mistake",
        id.0
    );
    let post = |form: String| {
        let (console, cookie) = (&console, cookie.clone());
        async move {
            console
                .call(
                    axum::http::Method::POST,
                    "/waiting/end",
                    Some(&cookie),
                    Some(&form),
                    true,
                )
                .await
        }
    };
    let r = post(form.replace("tenant=acme", "tenant=other")).await;
    assert_eq!(r.status, axum::http::StatusCode::NOT_FOUND, "{}", r.body);
    let r = post(form.clone()).await;
    assert_eq!(r.status, axum::http::StatusCode::OK, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["kept_rows"], 0, "{v}");
    // Ending it again is refused: it has ended.
    let r = post(form).await;
    assert_eq!(r.status, axum::http::StatusCode::CONFLICT, "{}", r.body);
    assert!(r.body.contains("ended already"), "{}", r.body);
    let r = ending::end_by_operator(&mut conn, id, "tester", "again");
    assert!(matches!(r, Err(EndError::NotReceived { .. })), "{r:?}");

    let services = Services::start(
        vec![env.ingest_config()],
        vec![env.worker_config()],
        Some(env.notifier_config()),
    );
    env.drop_file("acme", "later.csv", b"unique_id,login_source\nl1,sso\n")
        .unwrap();
    // (Nothing of the ended file was in the folder to move to bak/.)
    env.wait_until(120, "both files finished and notified", || {
        let files = env.files(&t);
        files.len() == 2
            && files.iter().all(|f| {
                f.state.is_finished()
                    && f.notify_status != NotifyStatus::Pending
                    && f.notify_status != NotifyStatus::Sending
            })
    })
    .await;
    let files = env.files(&t);
    let stuck = files.iter().find(|f| f.id == id.0).unwrap();
    let later = files.iter().find(|f| f.file_name == "later.csv").unwrap();
    assert_eq!(stuck.state, FileState::Failed, "{files:?}");
    assert_eq!(
        stuck.error_code.as_deref(),
        Some("ended_by_operator"),
        "{files:?}"
    );
    assert_eq!(later.state, FileState::Done, "{files:?}");
    let users: Vec<String> = env.users(&t).into_iter().map(|u| u.0).collect();
    assert_eq!(users, ["l1"]);
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1, "one report: the ended file's");
    assert!(
        mails[0].body().contains("the upload was a mistake"),
        "the operator's reason reaches the tenant: {}",
        mails[0].body()
    );
    assert!(mui_shared::files::waiting(&mut conn).unwrap().is_empty());
    services.stop().await;
}

/// The failures CSV the console downloads and `muictl files failures` prints is written a
/// page at a time (by rows and by bytes) and is byte for byte the CSV of every record at
/// once: across page ends, with rows wider than the header and rows of a mebibyte.
#[test]
fn a_streamed_failures_csv_is_the_whole_csv_page_by_page() {
    use mui_shared::failures;
    use mui_shared::schema::row_failures;
    let env = TestEnv::new(AppOptions::default()).unwrap();
    let t = env.tenant("acme").unwrap();
    let mut conn = env.db.conn();
    let file = mui_tests::register_file(
        &mut conn,
        t.id,
        "many.csv",
        &["unique_id", "login_source"],
        1,
        3,
    )
    .unwrap();
    let n = failures::STREAM_PAGE_ROWS * 2 + 17;
    let big = "y".repeat(1 << 20);
    let values: Vec<_> = (0..n)
        .map(|k| {
            let row = 2 + k * 3;
            let fields = match k % 500 {
                7 => serde_json::json!([format!("u{k}"), "sso", "extra", "=1+1"]),
                9 if k < 3000 => serde_json::json!([big, "sso"]),
                _ => serde_json::json!([format!("u{k}"), "nope"]),
            };
            (
                row_failures::file_id.eq(file),
                row_failures::row_number.eq(row),
                row_failures::fields.eq(fields),
                row_failures::errors.eq(serde_json::json!([{
                    "code": "unknown_login_source",
                    "column": "login_source",
                    "message": format!("no login source for row {row}")
                }])),
            )
        })
        .collect();
    for part in values.chunks(500) {
        diesel::insert_into(row_failures::table)
            .values(part)
            .execute(&mut conn)
            .unwrap();
    }
    let id = mui_shared::domain::ImportFileId(file);
    let (name, header) = failures::name_and_header(&mut conn, id).unwrap().unwrap();
    assert_eq!(name, "many.csv");
    let whole = failures::load_file(&mut conn, id)
        .unwrap()
        .unwrap()
        .csv()
        .unwrap();
    let mut streamed = Vec::new();
    let rows = failures::write_file_csv(&mut conn, id, &header, &mut streamed).unwrap();
    assert_eq!(rows, n as u64);
    assert_eq!(streamed.len(), whole.len());
    assert!(
        streamed == whole,
        "the streamed CSV differs from the whole one"
    );
    assert!(
        String::from_utf8_lossy(&streamed[..200]).contains("(extra 2)"),
        "the widest record decides the columns"
    );
}

/// A report another notifier claimed (and died sending: the claim stands for minutes) does
/// not hold up other tenants' reports: its messages give their slot back while they wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_report_claimed_by_a_dead_notifier_does_not_hold_up_other_tenants_reports() {
    let env = TestEnv::new(AppOptions::default()).unwrap();
    let acme = env.tenant("acme").unwrap();
    env.tenant("beta").unwrap();
    let pipeline = Services::start(vec![env.ingest_config()], vec![env.worker_config()], None);
    let bad = b"unique_id,login_source\na1,nope\n";
    env.drop_file("acme", "users.csv", bad).unwrap();
    env.wait_until(60, "acme's file finished", || {
        env.files(&acme).iter().any(|f| f.state.is_finished())
    })
    .await;
    // A notifier claimed acme's report and died in the middle of sending it.
    diesel::sql_query("UPDATE import_files SET notify_status = 'sending', notified_at = now()")
        .execute(&mut env.db.conn())
        .unwrap();
    let mut notifier = env.notifier_config();
    notifier.mail_concurrency = 1;
    let mail = Services::start(vec![], vec![], Some(notifier));
    env.drop_file("beta", "users.csv", bad).unwrap();
    env.wait_until(
        60,
        "beta's report sent while acme's waits for its claim",
        || !env.smtp.messages_to("it@beta.example.org").is_empty(),
    )
    .await;
    assert!(env.smtp.messages_to("it@acme.example.org").is_empty());
    mail.stop().await;
    pipeline.stop().await;
}
