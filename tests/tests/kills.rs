//! kill -9: the services run as real processes (`mui-service`), and one of them is killed
//! with SIGKILL at random moments (seeded) during a large import, then started again. Each
//! time: the users table equals a clean run's, every bad row is reported exactly once, and
//! exactly one email is sent for the file. Also: two ingest processes watching the same drop
//! folders import each file once; and every service stops on SIGTERM within its bound.
//!
//! Seeds: `MUI_KILL_SEEDS` (default 20 for the worker, and a quarter of it for ingest and
//! the notifier), starting at `MUI_KILL_SEED_BASE` (default 1) so a failing seed can be rerun
//! alone. The seed of every run is printed.

use mui_shared::files::{FileState, NotifyStatus};
use std::time::Duration;

use mui_tests::chaos::{
    chunk_markers, reported_rows, service_env, users_csv, wait_settled, Kind, ServiceProcess,
};
use mui_tests::{AppOptions, TestEnv, UserRow};
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_mui-service");
/// The bound on a graceful stop that docs/reliability.md promises (shared/src/service.rs).
const SHUTDOWN_BOUND: Duration = Duration::from_secs(30);

fn seeds(share: u64) -> std::ops::Range<u64> {
    let n: u64 = std::env::var("MUI_KILL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let base: u64 = std::env::var("MUI_KILL_SEED_BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    base..base + (n / share).max(1)
}

struct Run {
    env: TestEnv,
    ingest: Vec<ServiceProcess>,
    workers: Vec<ServiceProcess>,
    notifier: ServiceProcess,
    _logs: tempfile::TempDir,
}

impl Run {
    fn start(chunk_rows: usize, ingests: usize) -> Self {
        let env = TestEnv::new(AppOptions {
            chunk_rows,
            settle_ms: 200,
            ..Default::default()
        })
        .unwrap();
        env.tenant("acme").unwrap();
        let logs = tempfile::tempdir().unwrap();
        let start = |kind: Kind, name: String| {
            ServiceProcess::start(
                BIN,
                kind,
                service_env(&env, kind),
                &logs.path().join(format!("{name}.log")),
            )
        };
        let ingest = (0..ingests)
            .map(|i| start(Kind::Ingest, format!("ingest{i}")))
            .collect();
        let workers = (0..2)
            .map(|i| start(Kind::Worker, format!("worker{i}")))
            .collect();
        let notifier = start(Kind::Notifier, "notifier".into());
        Self {
            env,
            ingest,
            workers,
            notifier,
            _logs: logs,
        }
    }

    /// Stops every process with SIGTERM: each must exit 0 within the bound.
    async fn stop(mut self) {
        let mut all: Vec<&mut ServiceProcess> = self.ingest.iter_mut().collect();
        all.extend(self.workers.iter_mut());
        all.push(&mut self.notifier);
        for p in all {
            let log = p.log_text();
            match p.terminate(SHUTDOWN_BOUND).await {
                Some((status, _took)) => assert!(status.success(), "exit {status}:\n{log}"),
                None => panic!("did not stop within {SHUTDOWN_BOUND:?} of SIGTERM:\n{log}"),
            }
        }
    }
}

/// Waits for the file and checks its outcome (against the clean run's users, if given);
/// returns the users.
async fn check(run: &Run, expected: Option<&[UserRow]>, bad: &[u64], what: &str) -> Vec<UserRow> {
    let env = &run.env;
    let t = mui_shared::tenants::find_by_slug(&mut env.db.conn(), "acme")
        .unwrap()
        .unwrap();
    let files = wait_settled(env, &t, 1, 240).await;
    assert_eq!(files.len(), 1, "{what}: one file, registered once");
    let f = &files[0];
    assert_eq!(
        (
            f.state.as_str(),
            f.rows_total,
            f.rows_failed,
            f.notify_status.as_str()
        ),
        ("done", Some(ROWS as i64), bad.len() as i64, "sent"),
        "{what}: state, rows, failed, email"
    );
    assert_eq!(
        chunk_markers(env, f.id),
        ROWS.div_ceil(CHUNK_ROWS) as i64,
        "{what}: every chunk imported once"
    );
    let users = env.users(&t);
    if let Some(expected) = expected {
        assert!(
            users == expected,
            "{what}: the users differ from the clean run's ({} vs {})",
            users.len(),
            expected.len()
        );
    }
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1, "{what}: exactly one email");
    assert_eq!(
        reported_rows(&mails[0].attachments()[0].1),
        bad,
        "{what}: every bad row reported exactly once"
    );
    users
}

const ROWS: usize = 20_000;
const CHUNK_ROWS: usize = 100;

/// Whether the file is imported and its report sent.
fn settled(env: &TestEnv) -> bool {
    let Ok(Some(t)) = mui_shared::tenants::find_by_slug(&mut env.db.conn(), "acme") else {
        return false;
    };
    env.files(&t)
        .iter()
        .any(|f| f.notify_status == NotifyStatus::Sent)
}

/// Whether the file is imported (all chunks).
fn imported(env: &TestEnv) -> bool {
    let Ok(Some(t)) = mui_shared::tenants::find_by_slug(&mut env.db.conn(), "acme") else {
        return false;
    };
    env.files(&t).iter().any(|f| f.state == FileState::Done)
}

/// Imports the file while killing `target` (SIGKILL) at random moments chosen by `seed`,
/// starting it again each time; returns how many kills there were.
async fn import_with_kills(run: &mut Run, csv: &str, target: Kind, seed: u64) -> u32 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    run.env
        .drop_file("acme", "big.csv", csv.as_bytes())
        .unwrap();
    let mut kills = 0;
    for _ in 0..rng.gen_range(3..=6) {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..2_500))).await;
        // The notifier is killed only before the report is due: killed in the middle of the
        // SMTP conversation, its claim on the report waits 5 minutes to expire (and the
        // report could then go out twice: "once in normal operation").
        let stop = match target {
            Kind::Notifier => imported(&run.env),
            _ => settled(&run.env),
        };
        if stop {
            break;
        }
        let p = match target {
            Kind::Ingest => &mut run.ingest[0],
            Kind::Worker => {
                let i = rng.gen_range(0..run.workers.len());
                &mut run.workers[i]
            }
            Kind::Notifier => &mut run.notifier,
        };
        p.kill9().await;
        kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..800))).await;
        p.restart();
    }
    kills
}

async fn kill_test(target: Kind, share: u64) {
    let (csv, bad) = users_csv(ROWS, 97, "kill");
    let clean = {
        let run = Run::start(CHUNK_ROWS, 1);
        run.env
            .drop_file("acme", "big.csv", csv.as_bytes())
            .unwrap();
        let users = check(&run, None, &bad, "clean run").await;
        run.stop().await;
        users
    };
    assert_eq!(clean.len(), ROWS - bad.len());
    for seed in seeds(share) {
        let mut run = Run::start(CHUNK_ROWS, 1);
        let kills = import_with_kills(&mut run, &csv, target, seed).await;
        let what = format!("{target:?} killed {kills} time(s), seed {seed}");
        check(&run, Some(&clean), &bad, &what).await;
        eprintln!("kill -9 {what}: ok");
        run.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_worker_at_random_moments_loses_and_duplicates_nothing() {
    kill_test(Kind::Worker, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_ingest_at_random_moments_loses_and_duplicates_nothing() {
    kill_test(Kind::Ingest, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_the_notifier_at_random_moments_loses_and_duplicates_nothing() {
    kill_test(Kind::Notifier, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_ingest_processes_on_the_same_folders_import_each_file_once() {
    let run = Run::start(10, 2);
    let env = &run.env;
    let mut bads = Vec::new();
    for i in 0..6 {
        let (csv, bad) = users_csv(200 + i * 37, 13, &format!("f{i}"));
        env.drop_file("acme", &format!("file{i}.csv"), csv.as_bytes())
            .unwrap();
        bads.push(bad);
    }
    let t = mui_shared::tenants::find_by_slug(&mut env.db.conn(), "acme")
        .unwrap()
        .unwrap();
    let files = wait_settled(env, &t, 6, 180).await;
    assert_eq!(files.len(), 6, "each file registered once");
    for f in &files {
        let i: usize = f
            .file_name
            .trim_start_matches("file")
            .trim_end_matches(".csv")
            .parse()
            .unwrap();
        let bad = &bads[i];
        assert_eq!(
            (
                f.state.as_str(),
                f.rows_total,
                f.rows_failed,
                f.notify_status.as_str()
            ),
            ("done", Some(200 + i as i64 * 37), bad.len() as i64, "sent"),
            "{}",
            f.file_name
        );
        assert_eq!(
            chunk_markers(env, f.id),
            (200 + i as i64 * 37 + 9) / 10,
            "{}: every chunk imported once",
            f.file_name
        );
    }
    // Later files update the same unique_ids: the last file's values win.
    let users = env.users(&t);
    assert_eq!(users.len(), 200 + 5 * 37 - bads[5].len());
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 6, "one email per file");
    for m in &mails {
        let subject = m.subject();
        let i: usize = (0..6)
            .find(|i| subject.contains(&format!("file{i}.csv")))
            .expect("the file's name in the subject");
        assert_eq!(reported_rows(&m.attachments()[0].1), bads[i]);
    }
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_stops_busy_workers_within_the_bound_and_their_work_is_not_lost() {
    let (csv, bad) = users_csv(ROWS, 97, "term");
    let mut run = Run::start(CHUNK_ROWS, 1);
    run.env
        .drop_file("acme", "big.csv", csv.as_bytes())
        .unwrap();
    let t = mui_shared::tenants::find_by_slug(&mut run.env.db.conn(), "acme")
        .unwrap()
        .unwrap();
    let env = &run.env;
    env.wait_until(120, "the import under way", || env.users(&t).len() >= 2_000)
        .await;
    for w in &mut run.workers {
        let log = w.log_text();
        match w.terminate(SHUTDOWN_BOUND).await {
            Some((status, _)) => assert!(status.success(), "exit {status}:\n{log}"),
            None => panic!("a busy worker did not stop within {SHUTDOWN_BOUND:?}:\n{log}"),
        }
    }
    assert!(
        !imported(&run.env),
        "the workers were stopped in the middle of the import"
    );
    for w in &mut run.workers {
        w.restart();
    }
    check(&run, None, &bad, "after SIGTERM").await;
    run.stop().await;
}
