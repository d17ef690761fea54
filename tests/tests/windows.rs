//! Kills inside the recovery windows, hit for certain: each test runs the services as real
//! processes (`mui-service`) and tells the one under test to stop at a named point
//! (`MUI_STOP_AT`, `mui_shared::failpoint`): after a chunk's commit and before its ack, in
//! the middle of a `COPY`, after ingest registered a file and before it queued a chunk,
//! after it queued them all and before it moved the file to `bak/`, after it moved it and
//! before it recorded that, after the SMTP server
//! accepted a report and before the notifier recorded it. The test sees the process say it
//! stopped there, checks the window from outside (the database, the drop folder, the SMTP
//! server), kills it with SIGKILL, starts it again without the stop point, and checks that
//! the end state equals a clean run's: every user once, every chunk once, every bad row
//! reported once, one email (two, with the same Message-ID, in the one window
//! docs/reliability.md names). The notifier killed in the middle of DATA is stopped by the
//! test SMTP server instead, which holds the conversation there.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use diesel::prelude::*;
use mui_shared::failpoint;
use mui_shared::files::NotifyStatus;
use mui_shared::schema::import_files;
use mui_shared::tenants::Tenant;
use mui_tests::chaos::{
    chunk_markers, reported_rows, service_env, users_csv, wait_settled, Kind, ServiceProcess,
};
use mui_tests::{AppOptions, ReceivedMail, TestEnv};

const BIN: &str = env!("CARGO_BIN_EXE_mui-service");
const ROWS: usize = 400;
const CHUNK_ROWS: usize = 20;
const BAD_EVERY: usize = 13;

struct Run {
    env: TestEnv,
    tenant: Tenant,
    ingest: ServiceProcess,
    worker: ServiceProcess,
    notifier: ServiceProcess,
    bad: Vec<u64>,
    _logs: tempfile::TempDir,
}

impl Run {
    /// Starts the three services, `stop` (if any) told to stop at `point`, and drops the
    /// file.
    fn start(stop: Option<(Kind, &str)>) -> Self {
        Self::start_with(stop, None)
    }

    /// [`Run::start`], with ingest's `CHUNK_DISPATCH` set to `dispatch` when given.
    fn start_with(stop: Option<(Kind, &str)>, dispatch: Option<&str>) -> Self {
        let env = TestEnv::new(AppOptions {
            chunk_rows: CHUNK_ROWS,
            settle_ms: 200,
            ..Default::default()
        })
        .unwrap();
        let tenant = env.tenant("acme").unwrap();
        let logs = tempfile::tempdir().unwrap();
        let start = |kind: Kind, name: &str| {
            let mut vars = service_env(&env, kind);
            if let (Kind::Ingest, Some(mode)) = (kind, dispatch) {
                vars.push(("CHUNK_DISPATCH".to_owned(), mode.to_owned()));
            }
            if let Some((k, point)) = stop {
                if k == kind {
                    vars.push((failpoint::ENV.to_owned(), point.to_owned()));
                }
            }
            ServiceProcess::start(BIN, kind, vars, &logs.path().join(format!("{name}.log")))
        };
        let ingest = start(Kind::Ingest, "ingest");
        let worker = start(Kind::Worker, "worker");
        let notifier = start(Kind::Notifier, "notifier");
        let (csv, bad) = users_csv(ROWS, BAD_EVERY, "window");
        env.drop_file("acme", "users.csv", csv.as_bytes()).unwrap();
        Self {
            env,
            tenant,
            ingest,
            worker,
            notifier,
            bad,
            _logs: logs,
        }
    }

    fn process(&mut self, kind: Kind) -> &mut ServiceProcess {
        match kind {
            Kind::Ingest => &mut self.ingest,
            Kind::Worker => &mut self.worker,
            Kind::Notifier => &mut self.notifier,
        }
    }

    /// Waits until `kind` says it stopped at `point`.
    async fn stopped_at(&mut self, kind: Kind, point: &str) {
        self.process(kind)
            .wait_log(&failpoint::reached_line(point), 120)
            .await;
    }

    /// SIGKILL to `kind` where it stands, then starts it again without a stop point.
    async fn kill_and_restart(&mut self, kind: Kind) {
        let p = self.process(kind);
        p.kill9().await;
        p.set_var(failpoint::ENV, None);
        p.restart();
    }

    /// The file's registrations (one expected).
    fn file_ids(&self) -> Vec<i64> {
        import_files::table
            .filter(import_files::tenant_id.eq(self.tenant.id))
            .select(import_files::id)
            .load(&mut self.env.db.conn())
            .unwrap()
    }

    /// The file's chunks queued or imported, counted in one snapshot (a worker takes chunks
    /// off the queue meanwhile).
    fn queued_or_imported(&self, file_id: i64) -> i64 {
        diesel::sql_query(
            "SELECT (SELECT count(*) FROM chunk_queue WHERE file_id = $1) \
             + (SELECT count(*) FROM file_chunks WHERE file_id = $1) AS n",
        )
        .bind::<diesel::sql_types::BigInt, _>(file_id)
        .get_result::<Count>(&mut self.env.db.conn())
        .unwrap()
        .n
    }

    /// Whether the file is still in the drop folder (not moved to `bak/`).
    fn in_drop_folder(&self) -> bool {
        self.env.folder("acme").join("users.csv").exists()
    }

    /// Waits for the end state and checks it equals a clean run's, with `mails` emails for
    /// the file; returns them.
    async fn check_clean(&self, mails: usize, what: &str) -> Vec<ReceivedMail> {
        let env = &self.env;
        let files = wait_settled(env, &self.tenant, 1, 180).await;
        assert_eq!(files.len(), 1, "{what}: one file, registered once");
        let f = &files[0];
        let good = (ROWS - self.bad.len()) as i64;
        assert_eq!(
            (
                f.state.as_str(),
                f.rows_total,
                f.rows_inserted,
                f.rows_failed,
                f.notify_status.as_str()
            ),
            (
                "done",
                Some(ROWS as i64),
                good,
                self.bad.len() as i64,
                "sent"
            ),
            "{what}: state, rows, inserted, failed, email"
        );
        assert_eq!(
            chunk_markers(env, f.id),
            ROWS.div_ceil(CHUNK_ROWS) as i64,
            "{what}: every chunk imported once"
        );
        assert!(!self.in_drop_folder(), "{what}: the file moved to bak/");
        let expected: Vec<String> = (0..ROWS)
            .filter(|i| i % BAD_EVERY != 6)
            .map(|i| format!("u{i:06}"))
            .collect();
        let users: Vec<String> = env.users(&self.tenant).into_iter().map(|u| u.0).collect();
        assert_eq!(users, expected, "{what}: every good row's user, once");
        let sent = env.smtp.messages();
        assert_eq!(sent.len(), mails, "{what}: emails for the file");
        for m in &sent {
            assert_eq!(
                reported_rows(&m.attachments()[0].1),
                self.bad,
                "{what}: every bad row reported exactly once"
            );
        }
        sent
    }

    /// Stops every process with SIGTERM: each must exit 0 within the bound.
    async fn stop(mut self) {
        for p in [&mut self.ingest, &mut self.worker, &mut self.notifier] {
            let log = p.log_text();
            match p.terminate(Duration::from_secs(30)).await {
                Some((status, _)) => assert!(status.success(), "exit {status}:\n{log}"),
                None => panic!("did not stop within 30 s of SIGTERM:\n{log}"),
            }
        }
    }

    /// Moves the file's `sending` claim 6 minutes into the past: the 5 minutes a claim
    /// left by a dead notifier lives, without waiting them out.
    fn expire_claim(&self, file_id: i64) {
        let n = diesel::sql_query(
            "UPDATE import_files SET notified_at = notified_at - interval '6 minutes' \
             WHERE id = $1 AND notify_status = 'sending'",
        )
        .bind::<diesel::sql_types::BigInt, _>(file_id)
        .execute(&mut self.env.db.conn())
        .unwrap();
        assert_eq!(n, 1, "the dead notifier's claim is still there");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_after_its_commit_and_before_its_ack_changes_nothing() {
    let mut run = Run::start(Some((Kind::Worker, "worker.after_commit")));
    run.stopped_at(Kind::Worker, "worker.after_commit").await;
    // In the window: a chunk's transaction is committed (its marker is there) and no chunk
    // was acknowledged yet (the worker stops before its first ack).
    let file = run.file_ids()[0];
    assert!(chunk_markers(&run.env, file) >= 1, "a chunk committed");
    run.kill_and_restart(Kind::Worker).await;
    // The broker gives the unacknowledged chunk back and it is recognised as imported.
    run.worker.wait_log("ChunkAlreadyImported", 120).await;
    run.check_clean(1, "worker killed after commit").await;
    run.stop().await;
}

/// The same window with ingest publishing the chunks' rows straight to the broker
/// (`CHUNK_DISPATCH=direct`): the redelivered message carries the rows again, and only the
/// chunk's marker (`file_chunks`, written in the committed transaction) tells the worker it
/// was imported.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_direct_dispatch_a_worker_killed_after_its_commit_and_before_its_ack_changes_nothing()
{
    let mut run = Run::start_with(Some((Kind::Worker, "worker.after_commit")), Some("direct"));
    run.stopped_at(Kind::Worker, "worker.after_commit").await;
    let file = run.file_ids()[0];
    assert!(chunk_markers(&run.env, file) >= 1, "a chunk committed");
    assert_eq!(
        run.queued_or_imported(file),
        chunk_markers(&run.env, file),
        "nothing goes through the database's chunk queue"
    );
    run.kill_and_restart(Kind::Worker).await;
    run.worker.wait_log("ChunkAlreadyImported", 120).await;
    run.check_clean(1, "worker killed after commit, direct dispatch")
        .await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_in_the_middle_of_a_copy_leaves_nothing_half_done() {
    let mut run = Run::start(Some((Kind::Worker, "worker.mid_copy")));
    run.stopped_at(Kind::Worker, "worker.mid_copy").await;
    // In the window: the server is receiving the COPY of a chunk's rows, and no chunk of
    // the file is committed.
    let copying = || -> i64 {
        diesel::sql_query(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() \
             AND state = 'active' AND query ILIKE 'COPY%'",
        )
        .get_result::<Count>(&mut run.env.db.conn())
        .unwrap()
        .n
    };
    assert!(copying() >= 1, "a COPY is under way on the server");
    let file = run.file_ids()[0];
    assert_eq!(chunk_markers(&run.env, file), 0, "no chunk committed yet");
    run.kill_and_restart(Kind::Worker).await;
    run.check_clean(1, "worker killed mid-COPY").await;
    run.stop().await;
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingest_killed_after_registering_a_file_and_before_queueing_it_registers_it_once() {
    let mut run = Run::start(Some((Kind::Ingest, "ingest.after_register")));
    run.stopped_at(Kind::Ingest, "ingest.after_register").await;
    // In the window: the file is registered, none of its chunks queued, and it is still in
    // the drop folder.
    let ids = run.file_ids();
    assert_eq!(ids.len(), 1, "registered");
    assert_eq!(run.queued_or_imported(ids[0]), 0, "nothing queued");
    assert!(run.in_drop_folder());
    run.kill_and_restart(Kind::Ingest).await;
    run.check_clean(1, "ingest killed after registering").await;
    assert_eq!(run.file_ids(), ids, "the same registration was carried on");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingest_killed_after_queueing_every_chunk_and_before_archiving_imports_each_once() {
    let mut run = Run::start(Some((Kind::Ingest, "ingest.before_archive")));
    run.stopped_at(Kind::Ingest, "ingest.before_archive").await;
    // In the window: every chunk is queued (or already imported by the worker) and the file
    // is still in the drop folder, not archived.
    let ids = run.file_ids();
    assert_eq!(ids.len(), 1, "registered");
    assert_eq!(
        run.queued_or_imported(ids[0]),
        ROWS.div_ceil(CHUNK_ROWS) as i64,
        "every chunk queued"
    );
    assert!(run.in_drop_folder());
    assert!(run.env.files(&run.tenant)[0].archived_name.is_none());
    run.kill_and_restart(Kind::Ingest).await;
    run.check_clean(1, "ingest killed before archiving").await;
    assert_eq!(run.file_ids(), ids, "the same registration was carried on");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingest_killed_after_moving_the_file_to_bak_and_before_recording_it_records_it() {
    let mut run = Run::start(Some((Kind::Ingest, "ingest.after_archive")));
    run.stopped_at(Kind::Ingest, "ingest.after_archive").await;
    // In the window: the file is in bak/, no longer in the drop folder, and the database
    // does not know it was archived.
    let ids = run.file_ids();
    assert_eq!(ids.len(), 1, "registered");
    assert!(!run.in_drop_folder());
    assert!(run.env.files(&run.tenant)[0].archived_name.is_none());
    run.kill_and_restart(Kind::Ingest).await;
    run.check_clean(1, "ingest killed after archiving").await;
    let files = run.env.files(&run.tenant);
    assert_eq!(run.file_ids(), ids, "the same registration was carried on");
    let bak = run.env.folder("acme").join("bak");
    let archived = files[0].archived_name.clone().unwrap();
    assert!(bak.join(&archived).is_file(), "{archived} is in bak/");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_notifier_killed_after_the_server_accepted_sends_the_same_message_again_once() {
    let mut run = Run::start(Some((Kind::Notifier, "notifier.after_accept")));
    run.stopped_at(Kind::Notifier, "notifier.after_accept")
        .await;
    // In the window: the server has the mail, the file is still claimed (`sending`).
    assert_eq!(run.env.smtp.messages().len(), 1, "the server accepted it");
    let file = run.file_ids()[0];
    assert_eq!(
        run.env.files(&run.tenant)[0].notify_status,
        NotifyStatus::Sending
    );
    run.kill_and_restart(Kind::Notifier).await;
    // The claim holds the report back while it lives: the restarted notifier finds it
    // busy. Once it expires, the report is sent again: the one window where
    // docs/reliability.md allows a second email, with the same Message-ID.
    run.notifier
        .wait_log("another notifier is sending this report", 120)
        .await;
    assert_eq!(run.env.smtp.messages().len(), 1, "held back by the claim");
    run.expire_claim(file);
    let mails = run
        .check_clean(2, "notifier killed after the server accepted")
        .await;
    let id = |m: &ReceivedMail| m.parsed().message_id().unwrap_or_default().to_owned();
    assert!(!id(&mails[0]).is_empty());
    assert_eq!(id(&mails[0]), id(&mails[1]), "the same Message-ID");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_notifier_killed_in_the_middle_of_data_sends_the_same_message_again_once() {
    let mut run = Run::start(None);
    // The SMTP server holds the first conversation in the middle of DATA: the notifier has
    // written its message and waits for the answer.
    let reached = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    {
        let (reached, release) = (reached.clone(), release.clone());
        run.env.smtp.on_data(move |_| {
            if reached.swap(true, Ordering::SeqCst) {
                return;
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while !release.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    }
    run.env
        .wait_until(120, "the report's DATA under way", || {
            reached.load(Ordering::SeqCst)
        })
        .await;
    let file = run.file_ids()[0];
    assert_eq!(
        run.env.files(&run.tenant)[0].notify_status,
        NotifyStatus::Sending
    );
    assert!(run.env.smtp.messages().is_empty(), "not accepted yet");
    run.kill_and_restart(Kind::Notifier).await;
    // The server reads on: the whole message had reached it, so it keeps it, as a real
    // server does with a client gone before the answer.
    release.store(true, Ordering::SeqCst);
    run.env
        .wait_until(60, "the server kept the message", || {
            run.env.smtp.messages().len() == 1
        })
        .await;
    // The notifier cannot know: its claim holds the report back while it lives, then the
    // report is sent again (docs/reliability.md: "possibly a second time if the first had
    // reached the server"), as the same message.
    run.notifier
        .wait_log("another notifier is sending this report", 120)
        .await;
    assert_eq!(
        run.env.files(&run.tenant)[0].notify_status,
        NotifyStatus::Sending
    );
    run.expire_claim(file);
    let mails = run.check_clean(2, "notifier killed mid-DATA").await;
    let id = |m: &ReceivedMail| m.parsed().message_id().unwrap_or_default().to_owned();
    assert!(!id(&mails[0]).is_empty());
    assert_eq!(id(&mails[0]), id(&mails[1]), "the same Message-ID");
    run.stop().await;
}
