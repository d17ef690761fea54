//! Outages: PostgreSQL unreachable for 20 seconds in the middle of an import, and SMTP down
//! when a report is due. Each through a [`FaultProxy`] the test controls (the real servers
//! stay up for the tests running beside this one).

use mui_shared::files::{FileState, NotifyStatus};
use std::time::Duration;

use mui_tests::chaos::{
    chunk_markers, host_port, reported_rows, users_csv, wait_settled, FaultProxy, Services,
};
use mui_tests::{AppOptions, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_import_completes_after_postgresql_was_unreachable_for_20_seconds() {
    let env = TestEnv::new(AppOptions {
        chunk_rows: 20,
        ..Default::default()
    })
    .unwrap();
    let t = env.tenant("acme").unwrap();
    let pg = FaultProxy::start(&host_port(&env.db.url, 5432)).unwrap();
    let through_proxy = pg.url_for(&env.db.url);
    let mut ingest = env.ingest_config();
    ingest.common.database_url = through_proxy.clone();
    let workers = (0..2)
        .map(|_| {
            let mut w = env.worker_config();
            w.common.database_url = through_proxy.clone();
            w
        })
        .collect();
    let mut notifier = env.notifier_config();
    notifier.common.database_url = through_proxy.clone();
    let services = Services::start(vec![ingest], workers, Some(notifier));

    let (csv, bad) = users_csv(4_000, 97, "pg");
    env.drop_file("acme", "big.csv", csv.as_bytes()).unwrap();
    env.wait_until(120, "the import under way", || env.users(&t).len() >= 300)
        .await;
    pg.down();
    let before = env.users(&t).len();
    assert!(
        (before as i64) < 4_000 - bad.len() as i64,
        "the outage starts mid-import ({before} users so far)"
    );
    // The outage itself: 20 seconds of an unreachable database.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(pg.refused() > 0, "the services kept trying the database");
    assert_eq!(
        env.users(&t).len(),
        before,
        "nothing was written while the database was unreachable"
    );
    pg.up();

    let files = wait_settled(&env, &t, 1, 180).await;
    assert_eq!(files.len(), 1, "one file, registered once");
    let f = &files[0];
    let good = 4_000 - bad.len() as i64;
    assert_eq!(
        (
            f.state.as_str(),
            f.rows_total,
            f.rows_inserted,
            f.rows_failed,
            f.notify_status.as_str()
        ),
        ("done", Some(4_000), good, bad.len() as i64, "sent"),
        "state, rows, inserted, failed, email"
    );
    assert_eq!(chunk_markers(&env, f.id), 200, "every chunk imported once");
    assert_eq!(env.users(&t).len() as i64, good);
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1, "exactly one email");
    assert_eq!(reported_rows(&mails[0].attachments()[0].1), bad);
    services.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_report_due_while_smtp_is_down_is_sent_once_when_it_is_back() {
    let env = TestEnv::new(AppOptions::default()).unwrap();
    let t = env.tenant("acme").unwrap();
    let smtp = FaultProxy::start(&format!("127.0.0.1:{}", env.smtp.port)).unwrap();
    smtp.down();
    let mut notifier = env.notifier_config();
    notifier.smtp_url = Some(format!("smtp://127.0.0.1:{}", smtp.port));
    let services = Services::start(
        vec![env.ingest_config()],
        vec![env.worker_config()],
        Some(notifier),
    );
    let (csv, bad) = users_csv(40, 9, "smtp");
    env.drop_file("acme", "users.csv", csv.as_bytes()).unwrap();
    // The report is due and the notifier has tried (and failed) to send it, twice.
    env.wait_until(60, "the report due and tried while SMTP is down", || {
        let files = env.files(&t);
        files.len() == 1 && files[0].state == FileState::Done && smtp.refused() >= 2
    })
    .await;
    // Between tries the report is `pending`; during one it is `sending`. Either way it is
    // waiting for SMTP, not given up (`held`) nor sent.
    let status = env.files(&t)[0].notify_status;
    assert!(
        matches!(status, NotifyStatus::Pending | NotifyStatus::Sending),
        "waiting for SMTP, not given up: {status}"
    );
    assert!(env.smtp.messages().is_empty());
    smtp.up();

    let files = wait_settled(&env, &t, 1, 60).await;
    assert_eq!(files[0].notify_status, NotifyStatus::Sent);
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1, "exactly one email");
    assert_eq!(reported_rows(&mails[0].attachments()[0].1), bad);
    services.stop().await;
}
