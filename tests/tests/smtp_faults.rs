//! A mail server that misbehaves, over real SMTP: the test SMTP server answers the end of
//! DATA with the codes a test scripts (421, 451, 452: try again later; 550: refused for
//! good; 552: too large), and a proxy cuts the connection in the middle of DATA. Transient
//! trouble is retried with backoff and the tenant gets one email; a permanent refusal holds
//! the report and the operator sees why (`muictl files list` prints the file's email
//! detail); a refusal as too large sends the reduced email the docs promise. (A server that
//! stalls past the send timeout: `reports::a_stalled_mail_server_…`.)

use mui_shared::files::NotifyStatus;
use mui_shared::tenants::Tenant;

use mui_tests::chaos::{reported_rows, users_csv, wait_settled, Services};
use mui_tests::{AppOptions, DataCutter, SinkRules, SmtpSink, TestEnv};

/// A test's resources with the SMTP server answering by `rules`, a tenant, and the
/// services (the notifier sending to `smtp_url`, or to the server itself).
fn start(rules: SinkRules) -> (TestEnv, Tenant) {
    let mut env = TestEnv::new(AppOptions {
        chunk_rows: 50,
        ..Default::default()
    })
    .unwrap();
    env.smtp = SmtpSink::start_with(rules).unwrap();
    let t = env.tenant("acme").unwrap();
    (env, t)
}

fn services(env: &TestEnv, smtp_url: Option<String>) -> Services {
    let mut notifier = env.notifier_config();
    if let Some(url) = smtp_url {
        notifier.smtp_url = Some(url);
    }
    Services::start(
        vec![env.ingest_config()],
        vec![env.worker_config()],
        Some(notifier),
    )
}

/// The server answers `code` to the first two messages: the notifier tries again (with
/// backoff) and the tenant gets exactly one email with every bad row.
async fn refused_transiently_then_delivered_once(code: u16) {
    let (env, t) = start(SinkRules {
        data_end_script: vec![code, code],
        ..Default::default()
    });
    let services = services(&env, None);
    let (csv, bad) = users_csv(120, 7, &code.to_string());
    env.drop_file("acme", "users.csv", csv.as_bytes()).unwrap();

    let files = wait_settled(&env, &t, 1, 120).await;
    assert_eq!(env.smtp.scripted(), vec![code, code], "refused twice");
    assert_eq!(files[0].notify_status, NotifyStatus::Sent);
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1, "exactly one email");
    assert_eq!(reported_rows(&mails[0].attachments()[0].1), bad);
    services.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_closing_with_421_gets_the_report_once_when_it_is_back() {
    refused_transiently_then_delivered_once(421).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_answering_451_gets_the_report_once_when_it_takes_it() {
    refused_transiently_then_delivered_once(451).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_out_of_storage_452_gets_the_report_once_when_it_has_room() {
    refused_transiently_then_delivered_once(452).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_refused_for_good_550_is_held_and_the_operator_sees_why() {
    let (env, t) = start(SinkRules {
        data_end_script: vec![550],
        ..Default::default()
    });
    let services = services(&env, None);
    let (csv, _) = users_csv(60, 7, "550");
    env.drop_file("acme", "users.csv", csv.as_bytes()).unwrap();

    let files = wait_settled(&env, &t, 1, 120).await;
    let f = &files[0];
    assert_eq!(f.notify_status, NotifyStatus::Held, "held, not retried");
    let detail = f.notify_detail.clone().unwrap_or_default();
    assert!(
        detail.contains("550") && detail.contains("rejected by policy"),
        "the operator sees the server's answer: {detail}"
    );
    assert_eq!(env.smtp.scripted(), vec![550], "tried once");
    assert!(env.smtp.messages().is_empty(), "nothing delivered");
    services.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_refused_as_too_large_552_is_sent_reduced_and_the_operator_sees_why() {
    let (env, t) = start(SinkRules {
        data_end_script: vec![552],
        ..Default::default()
    });
    let services = services(&env, None);
    let (csv, bad) = users_csv(300, 7, "552");
    env.drop_file("acme", "users.csv", csv.as_bytes()).unwrap();

    let files = wait_settled(&env, &t, 1, 120).await;
    let f = &files[0];
    assert_eq!(f.notify_status, NotifyStatus::Sent, "sent, not held");
    let detail = f.notify_detail.clone().unwrap_or_default();
    assert!(
        detail.starts_with("sent reduced") && detail.contains("552"),
        "the operator sees why: {detail}"
    );
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1, "the tenant gets one, reduced, email");
    let rows = reported_rows(&mails[0].attachments()[0].1);
    assert!(rows.len() < bad.len(), "reduced: {} rows", rows.len());
    assert_eq!(rows, bad[..rows.len()], "the first failed rows, in order");
    assert!(
        mails[0].body().contains("rows were left out"),
        "{}",
        mails[0].body()
    );
    services.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_dropped_in_the_middle_of_data_is_retried_and_the_report_sent_once() {
    let (env, t) = start(SinkRules::default());
    let cutter = DataCutter::start(env.smtp.port, 1).unwrap();
    let services = services(&env, Some(cutter.url()));
    let (csv, bad) = users_csv(120, 7, "cut");
    env.drop_file("acme", "users.csv", csv.as_bytes()).unwrap();

    let files = wait_settled(&env, &t, 1, 120).await;
    assert_eq!(cutter.cuts(), 1, "the first conversation was cut mid-DATA");
    assert_eq!(files[0].notify_status, NotifyStatus::Sent);
    let mails = env.smtp.messages();
    assert_eq!(
        mails.len(),
        1,
        "exactly one email: the cut message was not kept"
    );
    assert_eq!(reported_rows(&mails[0].attachments()[0].1), bad);
    services.stop().await;
}
