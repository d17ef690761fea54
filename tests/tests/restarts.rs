//! Real outages: the broker stopped and started (`rabbitmqctl stop_app` / `start_app`) and
//! the database restarted (`pg_ctl restart -m fast`) in the middle of an import. Each test
//! runs its own private RabbitMQ node or PostgreSQL cluster ([`mui_tests::private`]) so the
//! servers the other tests share stay up. The import completes unattended: every chunk once,
//! every user, every bad row reported once, one email.

use std::time::Duration;

use mui_tests::chaos::{chunk_markers, reported_rows, users_csv, wait_settled, Services};
use mui_tests::private::{PrivatePostgres, PrivateRabbit};
use mui_tests::{amqp_url, AppOptions, TestDb, TestEnv};

const ROWS: usize = 4_000;
const CHUNK_ROWS: usize = 20;

fn options() -> AppOptions {
    AppOptions {
        chunk_rows: CHUNK_ROWS,
        ..Default::default()
    }
}

/// Runs the import on `env`, calling `outage` once it is under way, and checks the end
/// state.
async fn import_through<F: std::future::Future<Output = ()>>(
    env: &TestEnv,
    outage: impl FnOnce() -> F,
) {
    let t = env.tenant("acme").unwrap();
    let services = Services::start(
        vec![env.ingest_config()],
        vec![env.worker_config(), env.worker_config()],
        Some(env.notifier_config()),
    );
    let (csv, bad) = users_csv(ROWS, 97, "restart");
    env.drop_file("acme", "big.csv", csv.as_bytes()).unwrap();
    env.wait_until(120, "the import under way", || env.users(&t).len() >= 300)
        .await;
    let before = env.users(&t).len();
    outage().await;
    assert!(
        before < ROWS - bad.len(),
        "the outage came mid-import ({before} users before it)"
    );

    let files = wait_settled(env, &t, 1, 240).await;
    assert_eq!(files.len(), 1, "one file, registered once");
    let f = &files[0];
    let good = (ROWS - bad.len()) as i64;
    assert_eq!(
        (
            f.state.as_str(),
            f.rows_total,
            f.rows_inserted,
            f.rows_failed,
            f.notify_status.as_str()
        ),
        ("done", Some(ROWS as i64), good, bad.len() as i64, "sent"),
        "state, rows, inserted, failed, email"
    );
    assert_eq!(
        chunk_markers(env, f.id),
        ROWS.div_ceil(CHUNK_ROWS) as i64,
        "every chunk imported once"
    );
    assert_eq!(env.users(&t).len() as i64, good, "every good row's user");
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1, "exactly one email");
    assert_eq!(reported_rows(&mails[0].attachments()[0].1), bad);
    services.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_import_completes_unattended_when_rabbitmq_is_stopped_and_started_midway() {
    let rabbit = PrivateRabbit::start().await.unwrap();
    let env = TestEnv::new_on(options(), TestDb::new().unwrap(), rabbit.url()).unwrap();
    import_through(&env, || async {
        rabbit.stop_app().await.unwrap();
        // The outage itself: the broker down for a few seconds.
        tokio::time::sleep(Duration::from_secs(5)).await;
        rabbit.start_app().await.unwrap();
    })
    .await;
    drop(env);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_import_completes_unattended_when_postgresql_is_restarted_midway() {
    let pg = PrivatePostgres::start().await.unwrap();
    let env = TestEnv::new_on(options(), TestDb::new_on(&pg.url()).unwrap(), amqp_url()).unwrap();
    import_through(&env, || async {
        pg.restart().await.unwrap();
    })
    .await;
    drop(env);
}
