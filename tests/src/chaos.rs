//! Fault injection for the reliability tests: a TCP proxy that can be taken down and brought
//! back ([`FaultProxy`]), the services as real processes that can be killed with SIGKILL or
//! stopped with SIGTERM ([`ServiceProcess`], running the `mui-service` binary of this crate),
//! and the services in-process with configurations the test chose ([`Services`]).
//!
//! (Over 400 lines: the fault proxy, the process wrapper and the clean-run comparison are
//! used together by every fault test.)

use mui_shared::files::{FileState, NotifyStatus};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mui_shared::service::supervise;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A TCP proxy on a random loopback port that can be taken down: while down, every
/// connection through it is dropped and new ones are closed as soon as they are accepted
/// (the server looks unreachable), until it is brought up again.
#[derive(Debug, Clone)]
pub struct FaultProxy {
    /// Port it listens on.
    pub port: u16,
    up: tokio::sync::watch::Sender<bool>,
    refused: Arc<AtomicU64>,
    open: Arc<AtomicU64>,
}

/// TCP keepalive (probes from a third of `after`, every sixth, three unanswered ones kill
/// it) and a user timeout of `after` (data sent and never acknowledged) on `stream`.
fn detect_dead_peer(stream: &tokio::net::TcpStream, after: Duration) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(after / 3)
            .with_interval(after / 6)
            .with_retries(3),
    )?;
    sock.set_tcp_user_timeout(Some(after))
}

impl FaultProxy {
    /// Starts forwarding `127.0.0.1:<port>` to `target` (`host:port`), up.
    pub fn start(target: &str) -> anyhow::Result<Self> {
        Self::spawn("127.0.0.1:0", target, None)
    }

    /// Starts forwarding `listen` (`ip:port`, port 0 for any) to `target`, up: a forwarder on
    /// the host side of a link to another network namespace ([`crate::netns::NetNs`]), as a
    /// router in front of a server would be.
    ///
    /// A peer that goes away without a word (its link cut, its host gone) is noticed as the
    /// server itself would with TCP keepalive and a user timeout (PostgreSQL's
    /// `tcp_keepalives_*` and `tcp_user_timeout`): after `dead_peer_after` without an answer
    /// the forwarder drops that connection on both sides, so the server sees it closed (and
    /// a dead client's transaction, its locks and session advisory locks go with it).
    pub fn start_on(listen: &str, target: &str, dead_peer_after: Duration) -> anyhow::Result<Self> {
        Self::spawn(listen, target, Some(dead_peer_after))
    }

    fn spawn(
        listen: &str,
        target: &str,
        dead_peer_after: Option<Duration>,
    ) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let (up, _) = tokio::sync::watch::channel(true);
        let proxy = Self {
            port,
            up,
            refused: Arc::new(AtomicU64::new(0)),
            open: Arc::new(AtomicU64::new(0)),
        };
        let target = target.to_owned();
        let state = proxy.up.clone();
        let refused = proxy.refused.clone();
        let open = proxy.open.clone();
        tokio::spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut watch = state.subscribe();
                if !*watch.borrow_and_update() {
                    refused.fetch_add(1, Ordering::SeqCst);
                    drop(inbound);
                    continue;
                }
                if let Some(after) = dead_peer_after {
                    if detect_dead_peer(&inbound, after).is_err() {
                        drop(inbound);
                        continue;
                    }
                }
                let target = target.clone();
                let open = open.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    open.fetch_add(1, Ordering::SeqCst);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watch.wait_for(|up| !*up) => {}
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(proxy)
    }

    /// Drops every connection and refuses new ones until [`FaultProxy::up`].
    pub fn down(&self) {
        self.up.send_replace(false);
    }

    /// Forwards again.
    pub fn up(&self) {
        self.up.send_replace(true);
    }

    /// Connections being forwarded now.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::SeqCst)
    }

    /// Connections refused while down.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    /// `url` (a `scheme://user@host:port/...` URL) pointed at this proxy.
    pub fn url_for(&self, url: &str) -> String {
        self.url_at(url, "127.0.0.1")
    }

    /// `url` pointed at this proxy reached as `host` (the address it listens on).
    pub fn url_at(&self, url: &str, host: &str) -> String {
        let mut u = url::Url::parse(url).expect("a URL");
        let _ = u.set_host(Some(host));
        let _ = u.set_port(Some(self.port));
        u.to_string()
    }
}

/// `host:port` of a URL (default port `default_port`).
pub fn host_port(url: &str, default_port: u16) -> String {
    let u = url::Url::parse(url).expect("a URL");
    format!(
        "{}:{}",
        u.host_str().unwrap_or("127.0.0.1"),
        u.port().unwrap_or(default_port)
    )
}

/// Which service a [`ServiceProcess`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// mui-ingest.
    Ingest,
    /// mui-worker.
    Worker,
    /// mui-notifier.
    Notifier,
}

impl Kind {
    fn arg(self) -> &'static str {
        match self {
            Kind::Ingest => "ingest",
            Kind::Worker => "worker",
            Kind::Notifier => "notifier",
        }
    }
}

/// The environment a service process is configured with, as an operator would set it.
pub fn service_env(env: &crate::TestEnv, kind: Kind) -> Vec<(String, String)> {
    let mut vars = Vec::new();
    let mut common = |c: &mui_shared::config::CommonArgs| {
        vars.push(("DATABASE_URL".to_owned(), c.database_url.clone()));
        vars.push(("AMQP_URL".to_owned(), c.amqp_url.clone()));
        vars.push(("MUI_QUEUE_PREFIX".to_owned(), c.queue_prefix.clone()));
    };
    match kind {
        Kind::Ingest => {
            let c = env.ingest_config();
            common(&c.common);
            vars.extend([
                ("DROP_ROOT".into(), c.drop_root.display().to_string()),
                ("INGEST_SETTLE_MS".into(), c.settle_ms.to_string()),
                ("INGEST_RESCAN_SECS".into(), c.rescan_secs.to_string()),
                ("CHUNK_ROWS".into(), c.chunk_rows.to_string()),
            ]);
        }
        Kind::Worker => {
            let c = env.worker_config();
            common(&c.common);
            vars.push(("WORKER_CONCURRENCY".into(), c.concurrency.to_string()));
        }
        Kind::Notifier => {
            let c = env.notifier_config();
            common(&c.common);
            if let Some(smtp) = c.smtp_url {
                vars.push(("SMTP_URL".into(), smtp));
            }
        }
    }
    vars
}

/// A service running as a process of its own (the `mui-service` binary), its log appended
/// to a file.
#[derive(Debug)]
pub struct ServiceProcess {
    bin: PathBuf,
    kind: Kind,
    vars: Vec<(String, String)>,
    log: PathBuf,
    child: Option<tokio::process::Child>,
    /// How many times it was started.
    pub starts: u32,
    /// The user and group it runs as (None: the test's own).
    user: Option<(u32, u32)>,
    /// A command it is started through (e.g. `ip netns exec <ns>`), the binary and its
    /// arguments following; empty: started directly.
    wrapper: Vec<String>,
}

impl ServiceProcess {
    /// Starts `kind` with `vars`, logging to `log`. `bin` is the `mui-service` binary: an
    /// integration test passes `env!("CARGO_BIN_EXE_mui-service")`.
    pub fn start(bin: &str, kind: Kind, vars: Vec<(String, String)>, log: &Path) -> Self {
        Self::spawn(bin, kind, vars, log, None, Vec::new())
    }

    /// [`ServiceProcess::start`] as user `uid` and group `gid` (an unprivileged service, as
    /// in production: root may read and write anything, so a permission problem shows only
    /// under another user).
    pub fn start_as(
        bin: &str,
        kind: Kind,
        vars: Vec<(String, String)>,
        log: &Path,
        uid: u32,
        gid: u32,
    ) -> Self {
        Self::spawn(bin, kind, vars, log, Some((uid, gid)), Vec::new())
    }

    /// [`ServiceProcess::start`] through `wrapper`, a command that runs the command line it
    /// is given (the binary, then its arguments): `ip netns exec <ns>` to start it in a
    /// network namespace, `setpriv --reuid …` to drop to another user there. The process
    /// started is the wrapper; a wrapper that execs (as these do) leaves the service itself,
    /// which [`ServiceProcess::kill9`] then kills.
    pub fn start_wrapped(
        bin: &str,
        kind: Kind,
        vars: Vec<(String, String)>,
        log: &Path,
        wrapper: Vec<String>,
    ) -> Self {
        Self::spawn(bin, kind, vars, log, None, wrapper)
    }

    fn spawn(
        bin: &str,
        kind: Kind,
        vars: Vec<(String, String)>,
        log: &Path,
        user: Option<(u32, u32)>,
        wrapper: Vec<String>,
    ) -> Self {
        let mut p = Self {
            bin: PathBuf::from(bin),
            kind,
            vars,
            log: log.to_path_buf(),
            child: None,
            starts: 0,
            user,
            wrapper,
        };
        p.restart();
        p
    }

    /// Starts it again (after a kill); nothing if it runs already (two fault makers, the
    /// soak's chaos and a careless tenant's "kill ingest while I replace a file", may both
    /// kill it and restart it, and only the first restart starts it).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            return;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("service log");
        let err = log.try_clone().expect("service log");
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = tokio::process::Command::new(program);
                cmd.args(args).arg(&self.bin);
                cmd
            }
            None => tokio::process::Command::new(&self.bin),
        };
        cmd.arg(self.kind.arg())
            .env_clear()
            .env("RUST_LOG", "info")
            .envs(self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true);
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        self.child = Some(cmd.spawn().expect("spawning mui-service"));
        self.starts += 1;
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// SIGTERM; returns how it exited and how long it took, or `None` if it was still
    /// running after `limit` (then it is killed).
    pub async fn terminate(
        &mut self,
        limit: Duration,
    ) -> Option<(std::process::ExitStatus, Duration)> {
        let mut child = self.child.take()?;
        let pid = child.id()?;
        let started = std::time::Instant::now();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        match tokio::time::timeout(limit, child.wait()).await {
            Ok(Ok(status)) => Some((status, started.elapsed())),
            _ => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                None
            }
        }
    }

    /// Sets (or, with `None`, removes) an environment variable for the next start.
    pub fn set_var(&mut self, name: &str, value: Option<&str>) {
        self.vars.retain(|(k, _)| k != name);
        if let Some(v) = value {
            self.vars.push((name.to_owned(), v.to_owned()));
        }
    }

    /// Waits until the log holds `needle` (fails after `secs` seconds, showing the log).
    pub async fn wait_log(&self, needle: &str, secs: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out after {secs}s waiting for {needle:?} in the log of {:?}:\n{}",
                    self.kind,
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id while it runs (the soak reads its peak memory from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(tokio::process::Child::id)
    }

    /// Whether it is still running (not exited on its own).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Services running in-process (each under the supervisor, as the binaries run them), with
/// configurations the test built (e.g. through a [`FaultProxy`]).
#[derive(Debug)]
pub struct Services {
    shutdown: CancellationToken,
    handles: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
}

impl Services {
    /// Starts the given services.
    pub fn start(
        ingest: Vec<mui_ingest::IngestConfig>,
        workers: Vec<mui_worker::WorkerConfig>,
        notifier: Option<mui_notifier::NotifierConfig>,
    ) -> Self {
        mui_shared::telemetry::init_for_tests();
        let shutdown = CancellationToken::new();
        let mut handles = Vec::new();
        for c in ingest {
            let token = shutdown.clone();
            handles.push((
                "ingest",
                tokio::spawn(async move {
                    supervise("mui-ingest", &token, |s| mui_ingest::run(c.clone(), s)).await
                }),
            ));
        }
        for c in workers {
            let token = shutdown.clone();
            handles.push((
                "worker",
                tokio::spawn(async move {
                    supervise("mui-worker", &token, |s| mui_worker::run(c.clone(), s)).await
                }),
            ));
        }
        if let Some(c) = notifier {
            let token = shutdown.clone();
            handles.push((
                "notifier",
                tokio::spawn(async move {
                    supervise("mui-notifier", &token, |s| mui_notifier::run(c.clone(), s)).await
                }),
            ));
        }
        Self { shutdown, handles }
    }

    /// Stops them gracefully; panics if one failed or did not stop within 30 s.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for (name, h) in self.handles {
            match tokio::time::timeout(Duration::from_secs(30), h).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => panic!("{name} failed: {e:#}"),
                Ok(Err(e)) => panic!("{name} panicked: {e}"),
                Err(_) => panic!("{name} did not stop within 30s"),
            }
        }
    }
}

/// A deterministic CSV of `rows` users where every `bad_every`-th row (from the 7th) names an
/// unknown login source; returns it with the spreadsheet row numbers of the bad rows.
pub fn users_csv(rows: usize, bad_every: usize, tag: &str) -> (String, Vec<u64>) {
    let mut csv = String::from("unique_id,login_source,first_name,last_name,email,active\n");
    let mut bad = Vec::new();
    for i in 0..rows {
        let source = if i % bad_every == 6 {
            bad.push(i as u64 + 2);
            "bogus"
        } else if i % 2 == 0 {
            "sso"
        } else {
            "local"
        };
        csv.push_str(&format!(
            "u{i:06},{source},First{i} {tag},Last{i},u{i}@example.org,{}\n",
            i % 5 != 0
        ));
    }
    let csv = csv.replace(",true\n", ",1\n").replace(",false\n", ",0\n");
    (csv, bad)
}

/// The row numbers listed in a failures CSV attachment (column `row`), in order.
pub fn reported_rows(attachment: &[u8]) -> Vec<u64> {
    let rows = crate::parse_csv(attachment);
    let Some(header) = rows.first() else {
        return Vec::new();
    };
    let col = header
        .iter()
        .position(|h| h == "row" || h == "row_number")
        .expect("a row column in the failures CSV");
    rows[1..]
        .iter()
        .map(|r| r[col].parse().expect("a row number"))
        .collect()
}

/// Waits until `count` files of `tenant` are finished and their email handled (as
/// [`crate::App::wait_files_settled`], for services the test runs itself).
pub async fn wait_settled(
    env: &crate::TestEnv,
    tenant: &mui_shared::tenants::Tenant,
    count: usize,
    secs: u64,
) -> Vec<crate::FileRow> {
    env.wait_until(
        secs,
        &format!("{count} file(s) of {} finished and notified", tenant.slug),
        || {
            let files = env.files(tenant);
            files.len() >= count
                && files.iter().all(|f| {
                    (f.state == FileState::Done || f.state == FileState::Failed)
                        && f.notify_status != NotifyStatus::Pending
                        && f.notify_status != NotifyStatus::Sending
                        && f.archived_name.is_some()
                })
        },
    )
    .await;
    env.files(tenant)
}

/// Chunk markers of a file (each chunk imported once leaves exactly one).
pub fn chunk_markers(env: &crate::TestEnv, file_id: i64) -> i64 {
    use diesel::prelude::*;
    use mui_shared::schema::file_chunks;
    file_chunks::table
        .filter(file_chunks::file_id.eq(file_id))
        .count()
        .get_result(&mut env.db.conn())
        .expect("chunk markers")
}
