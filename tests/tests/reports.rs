//! The failure report under pressure, over real SMTP: lists too long for one email (zipped,
//! or cut down to what fits), a relay refusing large mail (552), a recipient refused (550),
//! one tenant's mail server stalling while another tenant's report goes out, and the
//! database dropping right after the server accepted a report.

use mui_shared::files::NotifyStatus;
use std::io::Read as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use diesel::prelude::*;
use mui_shared::domain::ImportFileId;
use mui_shared::schema::import_files;
use mui_tests::chaos::{host_port, reported_rows, users_csv, wait_settled, FaultProxy, Services};
use mui_tests::{AppOptions, ReceivedMail, SinkRules, SmtpSink, TestEnv};

fn env_with(sink: Option<SinkRules>) -> TestEnv {
    let mut env = TestEnv::new(AppOptions {
        chunk_rows: 500,
        ..Default::default()
    })
    .unwrap();
    if let Some(rules) = sink {
        env.smtp = SmtpSink::start_with(rules).unwrap();
    }
    env
}

fn start(env: &TestEnv, notifier: mui_notifier::NotifierConfig) -> Services {
    Services::start(
        vec![env.ingest_config()],
        vec![env.worker_config()],
        Some(notifier),
    )
}

fn notify_detail(env: &TestEnv, file_id: i64) -> Option<String> {
    import_files::table
        .find(file_id)
        .select(import_files::notify_detail)
        .first(&mut env.db.conn())
        .unwrap()
}

/// The CSV the notifier writes for the whole list (what `muictl files failures` prints).
fn whole_csv(env: &TestEnv, file_id: i64) -> Vec<u8> {
    let mut conn = env.db.conn();
    let header: Option<serde_json::Value> = import_files::table
        .find(file_id)
        .select(import_files::header)
        .first(&mut conn)
        .unwrap();
    let header: Vec<String> = serde_json::from_value(header.unwrap()).unwrap();
    let failures = mui_notifier::load_failures(&mut conn, ImportFileId(file_id), i64::MAX).unwrap();
    mui_notifier::report::failures_csv(&header, &failures).unwrap()
}

fn message_id(mail: &ReceivedMail) -> String {
    mail.parsed().message_id().unwrap_or_default().to_owned()
}

/// The one attachment of a mail, as (name, bytes).
fn attachment(mail: &ReceivedMail) -> (String, Vec<u8>) {
    let mut all = mail.attachments();
    assert_eq!(all.len(), 1, "one attachment");
    all.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_failure_list_is_zipped_and_the_zip_holds_the_same_csv() {
    let env = env_with(None);
    let t = env.tenant("acme").unwrap();
    let mut notifier = env.notifier_config();
    notifier.attach_compress_bytes = 20_000;
    let services = start(&env, notifier);
    let (csv, bad) = users_csv(7_000, 7, "zip");
    env.drop_file("acme", "users.csv", csv.as_bytes()).unwrap();

    let files = wait_settled(&env, &t, 1, 180).await;
    let f = &files[0];
    assert_eq!(
        (f.rows_failed, f.notify_status.as_str()),
        (bad.len() as i64, "sent")
    );
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1, "one email");
    let (name, zipped) = attachment(&mails[0]);
    assert_eq!(name, "users.csv.failures.zip");
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zipped.clone())).unwrap();
    assert_eq!(archive.len(), 1);
    let mut inner = archive.by_index(0).unwrap();
    assert_eq!(inner.name(), "users.csv.failures.csv");
    let mut unzipped = Vec::new();
    inner.read_to_end(&mut unzipped).unwrap();
    let whole = whole_csv(&env, f.id);
    assert!(whole.len() > 20_000, "the list is above the threshold");
    assert!(zipped.len() < whole.len() / 2, "compressed");
    assert_eq!(
        unzipped, whole,
        "the zip holds the uncompressed CSV, byte for byte"
    );
    assert_eq!(reported_rows(&unzipped), bad, "every bad row, once");
    let body = mails[0].body();
    assert!(
        body.contains("lists every row that was not imported"),
        "{body}"
    );
    assert!(
        body.contains("open it to get users.csv.failures.csv"),
        "{body}"
    );
    assert_eq!(notify_detail(&env, f.id), None);
    assert!(
        message_id(&mails[0]).starts_with(&format!("import-file-{}.", f.id)),
        "a stable Message-ID per file: {}",
        message_id(&mails[0])
    );
    services.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn above_the_mail_size_limit_the_mail_holds_the_summary_and_the_first_failures() {
    let env = env_with(None);
    let t = env.tenant("acme").unwrap();
    let mut notifier = env.notifier_config();
    notifier.max_mail_bytes = 8_000;
    let services = start(&env, notifier);
    let (csv, bad) = users_csv(1_400, 7, "cut");
    env.drop_file("acme", "users.csv", csv.as_bytes()).unwrap();

    let files = wait_settled(&env, &t, 1, 180).await;
    let f = &files[0];
    assert_eq!(f.notify_status, NotifyStatus::Sent);
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1, "one email");
    assert!(
        mails[0].data.len() <= 8_000,
        "within MAX_MAIL_BYTES: {}",
        mails[0].data.len()
    );
    let (name, csv) = attachment(&mails[0]);
    assert_eq!(name, "users.csv.failures.csv");
    let rows = reported_rows(&csv);
    assert!(
        !rows.is_empty() && rows.len() < bad.len(),
        "{} of {} rows attached",
        rows.len(),
        bad.len()
    );
    assert_eq!(rows, bad[..rows.len()], "the first failures, in row order");
    let left = bad.len() - rows.len();
    let body = mails[0].body();
    assert!(
        body.contains(&format!("{left} rows were left out")),
        "{body}"
    );
    assert!(
        body.contains(&format!("muictl files failures {}", f.id)),
        "{body}"
    );
    let detail = notify_detail(&env, f.id).unwrap_or_default();
    assert!(detail.starts_with("sent reduced"), "{detail}");
    services.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_refusing_the_full_mail_as_too_large_gets_the_reduced_mail_and_nothing_is_held() {
    let env = env_with(Some(SinkRules {
        max_message_bytes: Some(8_000),
        ..Default::default()
    }));
    let t = env.tenant("acme").unwrap();
    // The notifier's own limit (10 MiB) is far above the relay's.
    let services = start(&env, env.notifier_config());
    let (csv, bad) = users_csv(1_400, 7, "552");
    env.drop_file("acme", "users.csv", csv.as_bytes()).unwrap();

    let files = wait_settled(&env, &t, 1, 180).await;
    let f = &files[0];
    assert_eq!(f.notify_status, NotifyStatus::Sent, "not held");
    let refused = env.smtp.refused();
    assert!(!refused.is_empty(), "the full mail was refused");
    assert!(refused[0].data.len() > 8_000);
    assert_eq!(
        reported_rows(&attachment(&refused[0]).1),
        bad,
        "the full mail"
    );
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1, "the tenant received one email");
    assert!(mails[0].data.len() <= 8_000);
    let body = mails[0].body();
    assert!(
        body.contains("because the mail server refused the email with the whole list"),
        "{body}"
    );
    let rows = reported_rows(&attachment(&mails[0]).1);
    assert!(!rows.is_empty() && rows.len() < bad.len());
    assert!(
        body.contains(&format!("{} rows were left out", bad.len() - rows.len())),
        "{body}"
    );
    assert_eq!(
        message_id(&mails[0]),
        message_id(&refused[0]),
        "the reduced mail is the same message"
    );
    let detail = notify_detail(&env, f.id).unwrap_or_default();
    assert!(detail.contains("552"), "the operator sees why: {detail}");
    services.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recipient_refused_permanently_holds_the_report_with_the_reason() {
    let env = env_with(Some(SinkRules {
        rcpt_replies: vec![("it@acme.example.org".into(), 550)],
        ..Default::default()
    }));
    let t = env.tenant("acme").unwrap();
    let services = start(&env, env.notifier_config());
    let (csv, _) = users_csv(40, 7, "550");
    env.drop_file("acme", "users.csv", csv.as_bytes()).unwrap();

    let files = wait_settled(&env, &t, 1, 120).await;
    assert_eq!(files[0].notify_status, NotifyStatus::Held);
    let detail = notify_detail(&env, files[0].id).unwrap_or_default();
    assert!(detail.contains("550"), "{detail}");
    assert!(env.smtp.messages().is_empty());
    assert!(
        env.smtp.refused().is_empty(),
        "no fallback for a refused address"
    );
    services.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recipient_refused_transiently_gets_the_report_once_the_server_takes_it() {
    let env = env_with(Some(SinkRules {
        rcpt_replies: vec![("it@acme.example.org".into(), 451)],
        ..Default::default()
    }));
    let t = env.tenant("acme").unwrap();
    let services = start(&env, env.notifier_config());
    let (csv, bad) = users_csv(40, 7, "451");
    env.drop_file("acme", "users.csv", csv.as_bytes()).unwrap();

    env.wait_until(120, "the report refused (451) twice", || {
        env.smtp.rcpt_refusals() >= 2
    })
    .await;
    assert!(env.smtp.messages().is_empty());
    // `pending` between tries, `sending` during one: not held, not sent.
    let status = env.files(&t)[0].notify_status;
    assert!(
        matches!(status, NotifyStatus::Pending | NotifyStatus::Sending),
        "waiting to try again, not held: {status}"
    );
    env.smtp.update(|r| r.rcpt_replies.clear());
    let files = wait_settled(&env, &t, 1, 120).await;
    assert_eq!(files[0].notify_status, NotifyStatus::Sent);
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1, "exactly one email");
    assert_eq!(reported_rows(&attachment(&mails[0]).1), bad);
    services.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_mail_server_for_one_tenant_does_not_delay_another_tenants_report() {
    const ACME: &str = "it@acme.example.org";
    const BRAVO: &str = "it@bravo.example.org";
    let env = env_with(Some(SinkRules {
        stall: vec![ACME.into()],
        ..Default::default()
    }));
    let acme = env.tenant("acme").unwrap();
    let bravo = env.tenant("bravo").unwrap();
    let mut notifier = env.notifier_config();
    notifier.smtp_timeout_secs = 2;
    let services = start(&env, notifier);

    let (csv, acme_bad) = users_csv(40, 7, "a");
    env.drop_file("acme", "users.csv", csv.as_bytes()).unwrap();
    env.wait_until(120, "acme's report stuck in the SMTP conversation", || {
        env.smtp.stalled() >= 1
    })
    .await;

    let (csv, bravo_bad) = users_csv(40, 9, "b");
    env.drop_file("bravo", "users.csv", csv.as_bytes()).unwrap();
    env.wait_until(120, "bravo's report delivered", || {
        !env.smtp.messages_to(BRAVO).is_empty()
    })
    .await;
    // bravo's report went out while acme's was still stuck.
    assert!(env.smtp.messages_to(ACME).is_empty());
    let acme_status = env.files(&acme)[0].notify_status;
    assert!(
        acme_status == NotifyStatus::Pending || acme_status == NotifyStatus::Sending,
        "{acme_status}"
    );
    // A send that timed out is retried (and stalls again while the server is stuck).
    env.wait_until(120, "acme's report tried again after the timeout", || {
        env.smtp.stalled() >= 2
    })
    .await;
    assert!(env.smtp.messages_to(ACME).is_empty());

    env.smtp.update(|r| r.stall.clear());
    let files = wait_settled(&env, &acme, 1, 120).await;
    assert_eq!(files[0].notify_status, NotifyStatus::Sent);
    let to_acme = env.smtp.messages_to(ACME);
    assert_eq!(to_acme.len(), 1, "acme's report delivered exactly once");
    assert_eq!(reported_rows(&attachment(&to_acme[0]).1), acme_bad);
    let to_bravo = env.smtp.messages_to(BRAVO);
    assert_eq!(to_bravo.len(), 1);
    assert_eq!(reported_rows(&attachment(&to_bravo[0]).1), bravo_bad);
    assert_eq!(
        wait_settled(&env, &bravo, 1, 10).await[0].notify_status,
        NotifyStatus::Sent
    );
    services.stop().await;
}

/// The database becomes unreachable for the notifier at the moment the SMTP server accepts
/// the report (the sink cuts it before answering 250), for 15 seconds. The notifier keeps retrying the
/// "sent" write; once the database is back the file is `sent` with one email. Without the
/// retry the claim would stay `sending` until it expired (5 minutes, beyond this test's
/// bound) and the report would then go out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sent_mark_is_retried_when_the_database_drops_right_after_the_server_accepted() {
    let env = env_with(None);
    let t = env.tenant("acme").unwrap();
    let pg = FaultProxy::start(&host_port(&env.db.url, 5432)).unwrap();
    let mut notifier = env.notifier_config();
    notifier.common.database_url = pg.url_for(&env.db.url);
    let cut = pg.clone();
    let fired = Arc::new(AtomicBool::new(false));
    let once = fired.clone();
    env.smtp.on_accept(move |_| {
        if !once.swap(true, Ordering::SeqCst) {
            cut.down();
        }
    });
    let services = start(&env, notifier);
    let (csv, bad) = users_csv(40, 7, "mark");
    env.drop_file("acme", "users.csv", csv.as_bytes()).unwrap();

    env.wait_until(120, "the report accepted and the database cut", || {
        fired.load(Ordering::SeqCst)
    })
    .await;
    // The outage itself: longer than the pool's 10-second connection timeout, so the first
    // write attempt fails outright and only a retry can mark the file.
    tokio::time::sleep(std::time::Duration::from_secs(15)).await;
    assert!(pg.refused() >= 3, "the notifier kept trying the database");
    assert_eq!(env.smtp.messages().len(), 1);
    assert_eq!(
        env.files(&t)[0].notify_status,
        NotifyStatus::Sending,
        "the claim is held while the write is retried"
    );
    pg.up();

    // Well within the 5-minute claim: the retried write lands, no second send.
    let files = wait_settled(&env, &t, 1, 120).await;
    assert_eq!(files[0].notify_status, NotifyStatus::Sent);
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1, "exactly one email");
    assert_eq!(reported_rows(&attachment(&mails[0]).1), bad);
    services.stop().await;
}
