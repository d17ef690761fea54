//! Observability (docs/observability.md), with the services as real processes
//! (`mui-service`), so that each has its own tracer provider and metrics recorder as in
//! production, configured only by the standard environment variables:
//! - one imported file is one trace across ingest, the workers and the notifier, received
//!   by an OTLP/HTTP receiver in the test: one trace id (stored with the file), every
//!   span's parent present, the chunk spans under the file's span, counts matching;
//!   the JSON logs carry the trace and span ids;
//! - `/metrics` counts files and rows exactly across an import;
//! - an idle ingest rescans its folders at its interval, not in a loop;
//! - `/readyz` is not ready while the broker is unreachable, and ready again after.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use mui_shared::files::{FileState, NotifyStatus};
use mui_tests::chaos::ServiceProcess;
use mui_tests::chaos::{host_port, service_env, users_csv, wait_settled, FaultProxy, Kind};
use mui_tests::otlp::{http_get, sample, OtlpSink, ReceivedSpan};
use mui_tests::{amqp_url, AppOptions, TestEnv};

const BIN: &str = env!("CARGO_BIN_EXE_mui-service");
const ROWS: usize = 20;
const CHUNK_ROWS: usize = 3;

fn set(vars: &mut Vec<(String, String)>, key: &str, value: &str) {
    vars.retain(|(k, _)| k != key);
    vars.push((key.to_owned(), value.to_owned()));
}

/// The services' log folder; its logs are printed if the test fails.
struct Logs(tempfile::TempDir);

impl Logs {
    fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.path().join(format!("{name}.log"))
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for entry in std::fs::read_dir(self.0.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                eprintln!("==== {} ====\n{text}", entry.path().display());
            }
        }
    }
}

struct Run {
    env: TestEnv,
    procs: Vec<ServiceProcess>,
    _logs: Logs,
}

impl Run {
    /// Ingest, two workers and the notifier as processes, each with `extra` variables.
    fn start(extra: &[(&str, String)]) -> Self {
        let env = TestEnv::new(AppOptions {
            chunk_rows: CHUNK_ROWS,
            settle_ms: 200,
            ..Default::default()
        })
        .unwrap();
        env.tenant("acme").unwrap();
        let logs = Logs::new();
        let mut procs = Vec::new();
        for (kind, name) in [
            (Kind::Ingest, "ingest"),
            (Kind::Worker, "worker0"),
            (Kind::Worker, "worker1"),
            (Kind::Notifier, "notifier"),
        ] {
            let mut vars = service_env(&env, kind);
            for (k, v) in extra {
                set(&mut vars, k, v);
            }
            procs.push(ServiceProcess::start(BIN, kind, vars, &logs.path(name)));
        }
        Self {
            env,
            procs,
            _logs: logs,
        }
    }

    /// SIGTERM to every process (which flushes the spans still queued), each must exit 0.
    async fn stop(&mut self) {
        for p in &mut self.procs {
            let log = p.log_text();
            match p.terminate(Duration::from_secs(40)).await {
                Some((status, _)) => assert!(status.success(), "exit {status}:\n{log}"),
                None => panic!("did not stop on SIGTERM:\n{log}"),
            }
        }
    }
}

/// The address a service logged for its HTTP endpoint (`HttpListening addr=…`).
async fn http_addr(p: &ServiceProcess) -> SocketAddr {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let log = strip_ansi(&p.log_text());
        let found = log
            .lines()
            .filter(|l| l.contains("HttpListening"))
            .find_map(|l| {
                l.split("addr=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            });
        if let Some(addr) = found {
            return addr;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no HttpListening line in:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `text` without its terminal colour codes (`ESC [ … m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `/metrics` text of every service, concatenated per metric value by summing.
async fn scrape(addrs: &[SocketAddr], name: &str, labels: &str) -> f64 {
    let mut total = 0.0;
    for addr in addrs {
        let (status, body) = http_get(*addr, "/metrics").await.unwrap();
        assert_eq!(status, 200, "/metrics of {addr}: {body}");
        total += sample(&body, name, labels);
    }
    total
}

fn ancestors<'a>(span: &'a ReceivedSpan, by_id: &'a HashMap<&str, &ReceivedSpan>) -> Vec<&'a str> {
    let mut names = Vec::new();
    let mut cur = span;
    while let Some(parent) = by_id.get(cur.parent_span_id.as_str()) {
        names.push(parent.name.as_str());
        cur = parent;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_file_is_one_trace_across_the_three_services() {
    let sink = OtlpSink::start().await.unwrap();
    let mut run = Run::start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", sink.endpoint()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_owned()),
        ("LOG_FORMAT", "json".to_owned()),
    ]);
    let (csv, bad) = users_csv(ROWS, 7, "traced");
    run.env
        .drop_file("acme", "users.csv", csv.as_bytes())
        .unwrap();
    let t = mui_shared::tenants::find_by_slug(&mut run.env.db.conn(), "acme")
        .unwrap()
        .unwrap();
    let files = wait_settled(&run.env, &t, 1, 180).await;
    let f = &files[0];
    assert_eq!(
        (f.state, f.notify_status, f.rows_failed),
        (FileState::Done, NotifyStatus::Sent, bad.len() as i64)
    );
    let trace_id = f.trace_id.clone().expect("the file's trace id is stored");
    assert_eq!(trace_id.len(), 32, "{trace_id}");
    // What `muictl files show` prints.
    let (shown, slug) = mui_shared::files::file_line(&mut run.env.db.conn(), f.id)
        .unwrap()
        .unwrap();
    assert_eq!(
        (shown.trace_id.as_deref(), slug.as_str()),
        (Some(trace_id.as_str()), "acme")
    );
    // Stopping flushes every span still queued.
    run.stop().await;

    let spans: Vec<ReceivedSpan> = sink
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == trace_id)
        .collect();
    let names: Vec<(&str, &str)> = spans
        .iter()
        .map(|s| (s.service.as_str(), s.name.as_str()))
        .collect();
    let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        HashSet::from(["mui-ingest", "mui-worker", "mui-notifier"]),
        "spans of the file's trace: {names:?}"
    );
    let by_id: HashMap<&str, &ReceivedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    // One root, the file's span in ingest; every other span's parent is in the trace.
    let roots: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root: {names:?}");
    assert_eq!(
        (roots[0].service.as_str(), roots[0].name.as_str()),
        ("mui-ingest", "file.ingest")
    );
    assert_eq!(roots[0].int("file_id"), Some(f.id));
    assert_eq!(roots[0].str("tenant"), Some("acme"));
    for s in &spans {
        assert!(
            s.parent_span_id.is_empty() || by_id.contains_key(s.parent_span_id.as_str()),
            "the parent of {} ({}) is missing: {names:?}",
            s.name,
            s.service
        );
        assert_ne!(s.status_code, 2, "{} failed: {}", s.name, s.status_message);
    }
    // Each chunk imported once, under the file's span, its counts adding up to the file's.
    let chunks = ROWS.div_ceil(CHUNK_ROWS);
    let imports: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.name == "chunk.import" && s.bool("mui.already_imported") == Some(false))
        .collect();
    assert_eq!(imports.len(), chunks, "chunk.import spans: {names:?}");
    let numbers: HashSet<i64> = imports.iter().filter_map(|s| s.int("chunk_no")).collect();
    assert_eq!(numbers, (0..chunks as i64).collect::<HashSet<_>>());
    for s in &imports {
        let up = ancestors(s, &by_id);
        assert!(up.contains(&"chunk.dispatch"), "{up:?}");
        assert_eq!(up.last(), Some(&"file.ingest"), "{up:?}");
        assert_eq!(s.str("messaging.system"), Some("rabbitmq"));
        assert_eq!(s.str("tenant"), Some("acme"));
        assert_eq!(s.int("file_id"), Some(f.id));
    }
    let sum = |key: &str| imports.iter().filter_map(|s| s.int(key)).sum::<i64>();
    assert_eq!(sum("mui.rows"), ROWS as i64);
    assert_eq!(sum("mui.rows.new"), f.rows_inserted);
    assert_eq!(sum("mui.rows.new"), (ROWS - bad.len()) as i64);
    assert_eq!(sum("mui.rows.updated") + sum("mui.rows.unchanged"), 0);
    assert_eq!(sum("mui.rows.failed"), bad.len() as i64);
    assert_eq!(
        imports
            .iter()
            .filter(|s| s.bool("mui.file_finished") == Some(true))
            .count(),
        1
    );
    // Ingest's steps, the failure records and the mail, all in the file's trace.
    for name in [
        "file.read",
        "file.chunk",
        "chunk.publish",
        "chunk.transaction",
    ] {
        assert!(names.iter().any(|(_, n)| *n == name), "{name}: {names:?}");
    }
    assert_eq!(
        spans.iter().filter(|s| s.name == "chunk.publish").count(),
        chunks
    );
    let recorded: i64 = spans
        .iter()
        .filter(|s| s.name == "failures.record")
        .filter_map(|s| s.int("mui.failures"))
        .sum();
    assert_eq!(recorded, bad.len() as i64, "failure records: {names:?}");
    let mails: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == "mail.send").collect();
    assert_eq!(mails.len(), 1, "{names:?}");
    assert_eq!(mails[0].service, "mui-notifier");
    assert_eq!(mails[0].int("smtp.reply_code"), Some(250));
    assert_eq!(ancestors(mails[0], &by_id).last(), Some(&"file.ingest"));

    // A worker's JSON log line about the file names the trace and its span.
    let worker_log = run.procs[1].log_text() + &run.procs[2].log_text();
    let line = worker_log
        .lines()
        .find(|l| l.contains("\"ChunkImported\"") && l.contains(&trace_id))
        .unwrap_or_else(|| panic!("no ChunkImported line with the trace id in:\n{worker_log}"));
    let json: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(json["trace_id"], trace_id.as_str());
    let span_id = json["span_id"].as_str().unwrap();
    assert_eq!(by_id[span_id].name, "chunk.import", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_files_and_rows_exactly() {
    let mut run = Run::start(&[("MUI_HTTP_ADDR", "127.0.0.1:0".to_owned())]);
    let mut addrs = Vec::new();
    for p in &run.procs {
        addrs.push(http_addr(p).await);
    }
    let t = mui_shared::tenants::find_by_slug(&mut run.env.db.conn(), "acme")
        .unwrap()
        .unwrap();
    // A first file, so that every series exists, then the import measured.
    let (csv, _) = users_csv(5, 7, "first");
    run.env
        .drop_file("acme", "first.csv", csv.as_bytes())
        .unwrap();
    wait_settled(&run.env, &t, 1, 180).await;
    let tenant = r#"tenant="acme""#;
    let read = |name: &'static str, labels: &'static str| {
        let addrs = addrs.clone();
        async move { scrape(&addrs, name, labels).await }
    };
    let before = (
        read("mui_files_received_total", tenant).await,
        read("mui_files_done_total", tenant).await,
        read("mui_rows_imported_total", tenant).await,
        read("mui_rows_failed_total", tenant).await,
        read("mui_mails_sent_total", "").await,
        read("mui_chunk_import_duration_seconds_count", "").await,
        read("mui_file_upload_to_mail_seconds_count", "").await,
    );
    assert_eq!((before.0, before.1, before.2), (1.0, 1.0, 5.0));

    let (csv, bad) = users_csv(ROWS, 7, "second");
    run.env
        .drop_file("acme", "second.csv", csv.as_bytes())
        .unwrap();
    wait_settled(&run.env, &t, 2, 180).await;
    // The notifier counts the mail just after recording it sent: scrape until it shows.
    // Each service counts just after the state the test waited for is written: scrape until
    // the counts settle (or the deadline), then compare.
    let expected = (
        before.0 + 1.0,
        before.1 + 1.0,
        before.2 + (ROWS - bad.len()) as f64,
        before.3 + bad.len() as f64,
        before.4 + 1.0,
        before.5 + ROWS.div_ceil(CHUNK_ROWS) as f64,
        before.6 + 1.0,
    );
    let mut after = before;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        after = (
            read("mui_files_received_total", tenant).await,
            read("mui_files_done_total", tenant).await,
            read("mui_rows_imported_total", tenant).await,
            read("mui_rows_failed_total", tenant).await,
            read("mui_mails_sent_total", "").await,
            read("mui_chunk_import_duration_seconds_count", "").await,
            read("mui_file_upload_to_mail_seconds_count", "").await,
        );
        if after == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(after.0 - before.0, 1.0, "files received");
    assert_eq!(after.1 - before.1, 1.0, "files done");
    assert_eq!(
        after.2 - before.2,
        (ROWS - bad.len()) as f64,
        "rows imported"
    );
    assert_eq!(after.3 - before.3, bad.len() as f64, "rows failed");
    assert_eq!(after.4 - before.4, 1.0, "mails sent");
    assert_eq!(
        after.5 - before.5,
        ROWS.div_ceil(CHUNK_ROWS) as f64,
        "chunk imports timed"
    );
    assert_eq!(after.6 - before.6, 1.0, "upload-to-mail latencies");
    run.stop().await;
}

/// Ingest rescans the drop folders at its interval and when a folder appears or goes, not
/// when something in them is merely opened or read: once (notify reports `IN_OPEN`) each
/// rescan's own opening of the folders asked for the next one, and an idle ingest rescanned
/// and listed the tenants in PostgreSQL hundreds of times a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_ingest_rescans_at_its_interval_not_in_a_loop() {
    let mut run = Run::start(&[
        ("MUI_HTTP_ADDR", "127.0.0.1:0".to_owned()),
        ("INGEST_RESCAN_SECS", "60".to_owned()),
    ]);
    let ingest = [http_addr(&run.procs[0]).await];
    let t = mui_shared::tenants::find_by_slug(&mut run.env.db.conn(), "acme")
        .unwrap()
        .unwrap();
    // A file imported and archived first: its folder and bak/ exist and were read.
    let (csv, _) = users_csv(5, 7, "idle");
    run.env
        .drop_file("acme", "idle.csv", csv.as_bytes())
        .unwrap();
    wait_settled(&run.env, &t, 1, 180).await;
    let before = scrape(&ingest, "mui_ingest_rescans_total", "").await;
    assert!(before >= 1.0, "the rescan at start is counted");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = scrape(&ingest, "mui_ingest_rescans_total", "").await;
    // In 4 s of a 60-s interval: at most the one that may fall due.
    assert!(
        after - before <= 1.0,
        "ingest rescanned {} times in 4 s while idle",
        after - before
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_is_not_ready_while_the_broker_is_unreachable() {
    let env = TestEnv::new(AppOptions::default()).unwrap();
    let broker = FaultProxy::start(&host_port(&amqp_url(), 5672)).unwrap();
    let logs = Logs::new();
    let mut vars = service_env(&env, Kind::Worker);
    set(&mut vars, "AMQP_URL", &broker.url_for(&amqp_url()));
    set(&mut vars, "MUI_HTTP_ADDR", "127.0.0.1:0");
    let mut worker = ServiceProcess::start(BIN, Kind::Worker, vars, &logs.path("worker"));
    let addr = http_addr(&worker).await;
    let ready = || async move { http_get(addr, "/readyz").await.unwrap() };
    let wait_for = |want: u16, what: &'static str| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = ready().await;
            if status == want {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    wait_for(200, "ready once connected").await;

    broker.down();
    let body = wait_for(503, "not ready once the broker is cut").await;
    assert!(body.contains("RabbitMQ"), "{body}");
    // Still not ready while it stays unreachable (the worker keeps trying), and alive.
    for _ in 0..10 {
        let (status, body) = ready().await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(http_get(addr, "/healthz").await.unwrap().0, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(broker.refused() > 0, "the worker tried to reconnect");

    broker.up();
    wait_for(200, "ready again once the broker is back").await;
    let (_, metrics) = http_get(addr, "/metrics").await.unwrap();
    assert!(
        sample(&metrics, "mui_broker_reconnects_total", "") >= 1.0,
        "{metrics}"
    );
    let log = worker.log_text();
    match worker.terminate(Duration::from_secs(40)).await {
        Some((status, _)) => assert!(status.success(), "exit {status}:\n{log}"),
        None => panic!("did not stop on SIGTERM:\n{log}"),
    }
}
