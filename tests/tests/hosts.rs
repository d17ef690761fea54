//! Workers on other hosts, no shared disk: each `mui-worker` runs in a network namespace of
//! its own (its own loopback, a veth link to this host) and a mount namespace where the drop
//! root is covered by an empty tmpfs, as an unprivileged user, without the drop folders' path
//! in its configuration; it reaches PostgreSQL and RabbitMQ only through forwarders on the
//! host side of its own link. ingest and the notifier run on this host. A large file is imported across the workers; once each has imported chunks, one
//! worker's link is cut (no FIN, no RST: a host gone) and the worker is killed with
//! SIGKILL. Which one is cut is chosen at random (`MUI_HOSTS_CUT=<index>` picks it): the
//! test assumes nothing about which worker does what (e.g. which one leads).
//!
//! The dead host is noticed by the servers the way they would notice it across a real
//! network: RabbitMQ by the AMQP heartbeat (the workers ask for 5 s in their `AMQP_URL`,
//! so their unacknowledged chunks come back in about 10 s instead of the broker's 60 s
//! default times two), PostgreSQL by TCP keepalive / user timeout (modelled by the
//! forwarders, see [`FaultProxy::start_on`]), which ends the dead worker's session, its
//! open transaction and its locks.
//!
//! A second test mends the cut link instead of killing the worker: the worker comes back on
//! its own (it connects again), what the others finished stays exactly as it was whatever
//! the returning worker still had in hand, and it then imports the next file's chunks.
//!
//! Needs root and `ip` (iproute2): without them the test fails, it does not skip.

use std::time::Duration;

use mui_shared::files::FileState;
use mui_tests::chaos::{
    chunk_markers, host_port, reported_rows, service_env, users_csv, wait_settled, FaultProxy,
    Kind, ServiceProcess,
};
use mui_tests::netns::{find_program, ip_command, NetNs};
use mui_tests::{amqp_url, AppOptions, TestEnv};
use rand::Rng;

const BIN: &str = env!("CARGO_BIN_EXE_mui-service");
const ROWS: usize = 30_000;
const CHUNK_ROWS: usize = 50;
const WORKERS: usize = 2;
const BAD_EVERY: usize = 997;
/// The unprivileged user the workers run as.
const NOBODY: (u32, u32) = (65534, 65534);
/// How long a forwarder waits for a silent peer before dropping its connection.
const DEAD_PEER_AFTER: Duration = Duration::from_secs(6);

/// A worker "host": its namespace, its forwarders to PostgreSQL and RabbitMQ (bound on the
/// host side of its link), and the worker process. Fields drop in order: the process, then
/// the namespace.
struct Host {
    worker: ServiceProcess,
    pg: FaultProxy,
    amqp: FaultProxy,
    ns: NetNs,
}

impl Host {
    fn start(env: &TestEnv, logs: &std::path::Path, i: usize) -> Self {
        let ns = NetNs::create().unwrap();
        let host_ip = ns.host_ip.to_string();
        let pg = FaultProxy::start_on(
            &format!("{host_ip}:0"),
            &host_port(&env.db.url, 5432),
            DEAD_PEER_AFTER,
        )
        .unwrap();
        let amqp = FaultProxy::start_on(
            &format!("{host_ip}:0"),
            &host_port(&amqp_url(), 5672),
            DEAD_PEER_AFTER,
        )
        .unwrap();

        // The worker's whole configuration, as an operator would set it on another host.
        let mut vars = service_env(env, Kind::Worker);
        let drop_root = env.drop_root.path().display().to_string();
        for (k, v) in &vars {
            assert!(
                k != "DROP_ROOT" && !v.contains(&drop_root),
                "a worker needs no drop folder, yet its configuration has {k}={v}"
            );
        }
        for (k, v) in vars.iter_mut() {
            match k.as_str() {
                "DATABASE_URL" => *v = pg.url_at(v, &host_ip),
                "AMQP_URL" => {
                    let mut u = url::Url::parse(&amqp.url_at(v, &host_ip)).unwrap();
                    u.query_pairs_mut().append_pair("heartbeat", "5");
                    *v = u.to_string();
                }
                _ => {}
            }
        }

        // What that host can and cannot reach: not this host's loopback servers, not the
        // drop folders; the forwarders, yes.
        let bash = find_program("bash").expect("bash");
        let bash = bash.to_str().unwrap();
        let hide = [env.drop_root.path()];
        let reach = |user, target: &str| {
            ns.run(
                user,
                &hide,
                bash,
                &["-c", &format!("exec 3<>/dev/tcp/{target}")],
            )
            .unwrap()
            .status
            .success()
        };
        assert!(
            !reach(None, "127.0.0.1/5432"),
            "PostgreSQL on 127.0.0.1 is reachable from namespace {}",
            ns.name
        );
        assert!(
            reach(Some(NOBODY), &format!("{host_ip}/{}", pg.port)),
            "the PostgreSQL forwarder is not reachable from namespace {}",
            ns.name
        );
        let folder = env.folder("acme").display().to_string();
        let ls = find_program("ls").expect("ls");
        let listed = ns
            .run(Some(NOBODY), &hide, ls.to_str().unwrap(), &[&folder])
            .unwrap();
        assert!(
            !listed.status.success(),
            "the drop folder {folder} can be read where the workers run"
        );

        let worker = ServiceProcess::start_wrapped(
            BIN,
            Kind::Worker,
            vars,
            &logs.join(format!("worker{i}.log")),
            ns.exec_prefix(Some(NOBODY), &hide).unwrap(),
        );
        Self {
            worker,
            pg,
            amqp,
            ns,
        }
    }

    fn log_count(&self, event: &str) -> usize {
        self.worker.log_text().matches(event).count()
    }
}

/// What becomes of the worker whose link is cut.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Then {
    /// Killed with SIGKILL right after the cut: a host gone for good.
    Kill,
    /// Left running; its link is mended once the others finished the file.
    Restore,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_on_other_hosts_import_a_file_once_when_one_host_is_cut_off_and_killed() {
    one_host_cut_off(Then::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_cut_off_and_back_changes_nothing_of_what_others_finished_and_works_again() {
    one_host_cut_off(Then::Restore).await;
}

async fn one_host_cut_off(then: Then) {
    if let Err(e) = ip_command() {
        panic!("{e:#}");
    }
    let env = TestEnv::new(AppOptions {
        chunk_rows: CHUNK_ROWS,
        settle_ms: 200,
        ..Default::default()
    })
    .unwrap();
    let t = env.tenant("acme").unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut hosts: Vec<Host> = (0..WORKERS)
        .map(|i| Host::start(&env, logs.path(), i))
        .collect();
    let on_this_host = |kind: Kind, name: &str| {
        ServiceProcess::start(
            BIN,
            kind,
            service_env(&env, kind),
            &logs.path().join(format!("{name}.log")),
        )
    };
    let mut ingest = on_this_host(Kind::Ingest, "ingest");
    let mut notifier = on_this_host(Kind::Notifier, "notifier");

    env.wait_until(120, "every worker connected and consuming", || {
        hosts.iter().all(|h| h.log_count("WorkerReady") >= 1)
    })
    .await;

    let (csv, bad) = users_csv(ROWS, BAD_EVERY, "hosts");
    let good = (ROWS - bad.len()) as i64;
    env.drop_file("acme", "big.csv", csv.as_bytes()).unwrap();
    env.wait_until(180, "every worker has imported chunks", || {
        hosts.iter().all(|h| h.log_count("ChunkImported") >= 2)
    })
    .await;

    let victim = std::env::var("MUI_HOSTS_CUT")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or_else(|| rand::thread_rng().gen_range(0..WORKERS), |v| v % WORKERS);
    let before = env.files(&t);
    assert!(
        before.len() == 1 && before[0].state != FileState::Done,
        "the cut comes in the middle of the import"
    );
    hosts[victim].ns.cut().unwrap();
    if then == Then::Kill {
        hosts[victim].worker.kill9().await;
    }
    let imported_by: Vec<usize> = hosts.iter().map(|h| h.log_count("ChunkImported")).collect();
    eprintln!(
        "cut worker {victim} (namespace {}, then {then:?}); chunks imported so far by each \
         worker: {imported_by:?}",
        hosts[victim].ns.name
    );

    let files = wait_settled(&env, &t, 1, 300).await;
    assert_eq!(files.len(), 1, "one file, registered once");
    let f = &files[0];
    let chunks = ROWS.div_ceil(CHUNK_ROWS) as i64;
    assert_eq!(
        (
            f.state.as_str(),
            f.rows_total,
            f.rows_inserted,
            f.rows_updated,
            f.rows_unchanged,
            f.rows_failed,
            f.total_chunks.map(i64::from),
            i64::from(f.chunks_done),
            f.notify_status.as_str()
        ),
        (
            "done",
            Some(ROWS as i64),
            good,
            0,
            0,
            bad.len() as i64,
            Some(chunks),
            chunks,
            "sent"
        ),
        "state, rows, inserted, updated, unchanged, failed, chunks, chunks done, email"
    );
    assert_eq!(
        chunk_markers(&env, f.id),
        chunks,
        "every chunk imported once"
    );
    assert_eq!(env.users(&t).len() as i64, good, "every good row, once");
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1, "exactly one email");
    assert_eq!(
        reported_rows(&mails[0].attachments()[0].1),
        bad,
        "exactly the bad rows, each once"
    );

    // The servers let go of the dead host: no connection of it is left open.
    let dead = &hosts[victim];
    env.wait_until(60, "the dead host's connections closed", || {
        dead.pg.open() == 0 && dead.amqp.open() == 0
    })
    .await;
    if then == Then::Restore {
        back_again(&env, &t, &hosts, victim, &files[0]).await;
    }
    // The surviving workers finished the file, and stop cleanly.
    for (i, h) in hosts.iter_mut().enumerate() {
        if i == victim && then == Then::Kill {
            continue;
        }
        if i != victim {
            assert!(
                h.log_count("ChunkImported") > imported_by[i],
                "worker {i} imported after the cut"
            );
        }
        let log = h.worker.log_text();
        match h.worker.terminate(Duration::from_secs(30)).await {
            Some((status, _)) => assert!(status.success(), "worker {i}: exit {status}:\n{log}"),
            None => panic!("worker {i} did not stop on SIGTERM:\n{log}"),
        }
    }
    for p in [&mut ingest, &mut notifier] {
        let log = p.log_text();
        match p.terminate(Duration::from_secs(30)).await {
            Some((status, _)) => assert!(status.success(), "exit {status}:\n{log}"),
            None => panic!("did not stop on SIGTERM:\n{log}"),
        }
    }
}

/// The cut worker's link is mended after the others finished `done`: the worker connects
/// again by itself; `done` (its rows, chunks, users and the one mail) is unchanged by
/// whatever the worker still had in hand; a next file of the same users is imported with
/// the returning worker taking part, and mailed once.
async fn back_again(
    env: &TestEnv,
    t: &mui_shared::tenants::Tenant,
    hosts: &[Host],
    victim: usize,
    done: &mui_tests::FileRow,
) {
    let h = &hosts[victim];
    let ready = h.log_count("WorkerReady");
    let users = env.users(t);
    h.ns.restore().unwrap();
    env.wait_until(120, "the cut worker connected again", || {
        h.log_count("WorkerReady") > ready
    })
    .await;
    let imported_before = h.log_count("ChunkImported");

    let (csv, bad) = users_csv(ROWS / 3, BAD_EVERY, "hosts-next");
    env.drop_file("acme", "next.csv", csv.as_bytes()).unwrap();
    let files = wait_settled(env, t, 2, 300).await;
    let first = files
        .iter()
        .find(|f| f.id == done.id)
        .expect("the first file");
    assert_eq!(
        (
            first.state.as_str(),
            first.rows_inserted,
            first.rows_updated,
            first.rows_failed,
            first.chunks_done,
            first.notify_status.as_str()
        ),
        (
            done.state.as_str(),
            done.rows_inserted,
            done.rows_updated,
            done.rows_failed,
            done.chunks_done,
            done.notify_status.as_str()
        ),
        "the first file is as the other workers left it"
    );
    assert_eq!(
        chunk_markers(env, done.id),
        i64::from(done.chunks_done),
        "no chunk of the first file imported twice"
    );
    let next = files
        .iter()
        .find(|f| f.file_name == "next.csv")
        .expect("next.csv");
    let good = (ROWS / 3 - bad.len()) as i64;
    assert_eq!(
        (
            next.state.as_str(),
            next.rows_inserted + next.rows_updated + next.rows_unchanged,
            next.rows_failed
        ),
        ("done", good, bad.len() as i64),
        "state, rows imported, rows failed of next.csv"
    );
    assert_eq!(
        env.users(t).len(),
        users.len(),
        "next.csv names users the first file created: nobody new"
    );
    assert!(
        h.log_count("ChunkImported") > imported_before,
        "the returning worker imported chunks of next.csv"
    );
    assert_eq!(env.smtp.messages().len(), 2, "one email per file");
}
