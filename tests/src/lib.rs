//! Test harness: the real thing on throwaway resources.
//!
//! - [`TestDb`]: a fresh PostgreSQL database per test (migrated), dropped afterwards.
//! - [`SmtpSink`]: a real SMTP server (mailin-embedded) on a random loopback port, keeping
//!   what it receives.
//! - [`App`]: ingest, a worker and the notifier running in-process against the test's own
//!   database, queue prefix, drop folder and SMTP sink ([`spawn_app`]), like zero2prod's
//!   `spawn_app()`. Tests read as the user story they check.
//!
//! PostgreSQL and RabbitMQ come from `MUI_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and `MUI_TEST_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`).

pub mod chaos;
pub mod sftp;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use diesel::prelude::*;
use mail_parser::MimeHeaders;
use mui_shared::config::{CommonArgs, LogFormat};
use mui_shared::domain::TenantSlug;
use mui_shared::schema::{import_files, users};
use mui_shared::service::supervise;
use mui_shared::tenants::{self, SettingsChange, Tenant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Base URL of the PostgreSQL server tests create databases on.
pub fn base_database_url() -> String {
    std::env::var("MUI_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// RabbitMQ URL for tests.
pub fn amqp_url() -> String {
    std::env::var("MUI_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A database of its own, migrated, dropped on drop.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    /// URL of the test's database.
    pub url: String,
}

impl TestDb {
    /// Creates and migrates a fresh database.
    pub fn new() -> anyhow::Result<Self> {
        let base = base_database_url();
        let name = unique("mui_t");
        let mut admin = PgConnection::establish(&base).context("connecting to PostgreSQL")?;
        diesel::sql_query(format!("CREATE DATABASE {name}")).execute(&mut admin)?;
        let url = replace_db(&base, &name);
        let mut conn = PgConnection::establish(&url)?;
        mui_shared::db::migrate(&mut conn)?;
        Ok(Self { name, url })
    }

    /// A new connection to the test database.
    pub fn conn(&self) -> PgConnection {
        PgConnection::establish(&self.url).expect("test database reachable")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = PgConnection::establish(&base_database_url()) {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut admin);
        }
    }
}

fn replace_db(url: &str, db: &str) -> String {
    match url.rfind('/') {
        Some(i) if url[..i].contains("://") && !url[..i].ends_with('/') => {
            let rest = &url[i + 1..];
            let query = rest.find('?').map(|q| &rest[q..]).unwrap_or("");
            format!("{}/{db}{query}", &url[..i])
        }
        _ => format!("{url}/{db}"),
    }
}

/// One message received by [`SmtpSink`].
#[derive(Debug, Clone)]
pub struct ReceivedMail {
    /// Envelope sender.
    pub from: String,
    /// Envelope recipients.
    pub to: Vec<String>,
    /// Raw message.
    pub data: Vec<u8>,
}

impl ReceivedMail {
    /// Parsed view of the message.
    pub fn parsed(&self) -> mail_parser::Message<'_> {
        mail_parser::MessageParser::default()
            .parse(&self.data)
            .expect("a parseable message")
    }

    /// Subject line.
    pub fn subject(&self) -> String {
        self.parsed().subject().unwrap_or_default().to_owned()
    }

    /// First text body.
    pub fn body(&self) -> String {
        self.parsed()
            .body_text(0)
            .map(|b| b.to_string())
            .unwrap_or_default()
    }

    /// Attachments as (name, bytes).
    pub fn attachments(&self) -> Vec<(String, Vec<u8>)> {
        let parsed = self.parsed();
        parsed
            .attachments()
            .map(|a| {
                (
                    a.attachment_name().unwrap_or_default().to_owned(),
                    a.contents().to_vec(),
                )
            })
            .collect()
    }
}

/// How an [`SmtpSink`] answers; changeable while it runs ([`SmtpSink::update`]). The
/// default accepts everything.
#[derive(Debug, Clone, Default)]
pub struct SinkRules {
    /// Messages larger than this (bytes of DATA) are refused with 552 at the end of DATA,
    /// as a relay with a size limit does; they are kept apart ([`SmtpSink::refused`]).
    pub max_message_bytes: Option<usize>,
    /// Recipients whose conversations stall: the end of DATA is not answered while the
    /// address is listed (at most two minutes); then the server answers 451 and keeps
    /// nothing, as a stuck server that finally gives up.
    pub stall: Vec<String>,
    /// Replies to `RCPT TO` for these recipients instead of 250 (e.g. 550 permanent, 451
    /// transient).
    pub rcpt_replies: Vec<(String, u16)>,
}

impl SinkRules {
    fn stalls(&self, to: &[String]) -> bool {
        to.iter()
            .any(|t| self.stall.iter().any(|s| same_address(s, t)))
    }
}

fn same_address(a: &str, b: &str) -> bool {
    let clean = |s: &str| {
        s.trim()
            .trim_matches(|c| c == '<' || c == '>')
            .to_ascii_lowercase()
    };
    clean(a) == clean(b)
}

type AcceptHook = Box<dyn Fn(&ReceivedMail) + Send + Sync>;

#[derive(Default)]
struct SinkState {
    store: Mutex<Vec<ReceivedMail>>,
    refused: Mutex<Vec<ReceivedMail>>,
    rules: Mutex<SinkRules>,
    /// Signalled when the rules change (a stall lifted).
    changed: std::sync::Condvar,
    stalled: std::sync::atomic::AtomicU64,
    rcpt_refusals: std::sync::atomic::AtomicU64,
    on_accept: Mutex<Option<AcceptHook>>,
}

#[derive(Clone, Default)]
struct SinkHandler {
    state: Arc<SinkState>,
    current: Option<ReceivedMail>,
}

impl mailin_embedded::Handler for SinkHandler {
    fn rcpt(&mut self, to: &str) -> mailin_embedded::Response {
        let code = self.state.rules.lock().ok().and_then(|r| {
            r.rcpt_replies
                .iter()
                .find(|(addr, _)| same_address(addr, to))
                .map(|(_, code)| *code)
        });
        match code {
            Some(code) => {
                self.state
                    .rcpt_refusals
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                mailin_embedded::Response::custom(code, format!("rule for {to}"))
            }
            None => mailin_embedded::response::OK,
        }
    }

    fn data_start(
        &mut self,
        _domain: &str,
        from: &str,
        _is8bit: bool,
        to: &[String],
    ) -> mailin_embedded::Response {
        self.current = Some(ReceivedMail {
            from: from.to_owned(),
            to: to.to_vec(),
            data: Vec::new(),
        });
        mailin_embedded::response::OK
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self.current.as_mut() {
            Some(m) => {
                m.data.extend_from_slice(buf);
                Ok(())
            }
            // mailin stays in its DATA state after `data_end` answered an error (552, 451),
            // so the client's next command (lettre sends QUIT) would be taken as message
            // text and never answered. Answering it with an error (554) lets the client
            // close the connection, as it would with a real server.
            None => Err(std::io::Error::other("command after a refused message")),
        }
    }

    fn data_end(&mut self) -> mailin_embedded::Response {
        let Some(m) = self.current.take() else {
            return mailin_embedded::response::OK;
        };
        let state = &self.state;
        let rules = state.rules.lock().map(|r| r.clone()).unwrap_or_default();
        if rules
            .max_message_bytes
            .is_some_and(|max| m.data.len() > max)
        {
            if let Ok(mut refused) = state.refused.lock() {
                refused.push(m);
            }
            return mailin_embedded::Response::custom(
                552,
                "5.3.4 Message size exceeds fixed maximum message size".into(),
            );
        }
        if rules.stalls(&m.to) {
            state
                .stalled
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            if let Ok(mut guard) = state.rules.lock() {
                while guard.stalls(&m.to) {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match state.changed.wait_timeout(guard, left) {
                        Ok((g, _)) => guard = g,
                        Err(_) => break,
                    }
                }
            }
            return mailin_embedded::Response::custom(
                451,
                "4.4.2 stalled conversation abandoned".into(),
            );
        }
        if let Ok(hook) = state.on_accept.lock() {
            if let Some(hook) = hook.as_ref() {
                hook(&m);
            }
        }
        if let Ok(mut store) = state.store.lock() {
            store.push(m);
        }
        mailin_embedded::response::OK
    }
}

/// A real SMTP server on a random loopback port, recording every message.
#[derive(Clone)]
pub struct SmtpSink {
    /// Port it listens on.
    pub port: u16,
    state: Arc<SinkState>,
}

impl std::fmt::Debug for SmtpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSink")
            .field("port", &self.port)
            .finish()
    }
}

impl SmtpSink {
    /// Starts the server on a background thread (it lives as long as the test process),
    /// accepting everything.
    pub fn start() -> anyhow::Result<Self> {
        Self::serve(SinkRules::default(), 2)
    }

    /// Starts a server answering by `rules`. It serves up to 32 conversations at once,
    /// since each stalled one holds a thread until the stall is lifted.
    pub fn start_with(rules: SinkRules) -> anyhow::Result<Self> {
        Self::serve(rules, 32)
    }

    fn serve(rules: SinkRules, threads: u32) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(SinkState {
            rules: Mutex::new(rules),
            ..SinkState::default()
        });
        let handler = SinkHandler {
            state: state.clone(),
            current: None,
        };
        let mut server = mailin_embedded::Server::new(handler);
        server
            .with_name("sink.test")
            .with_ssl(mailin_embedded::SslConfig::None)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_num_threads(threads)
            .with_tcp_listener(listener);
        std::thread::spawn(move || {
            let _ = server.serve();
        });
        Ok(Self { port, state })
    }

    /// `smtp://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Everything received (accepted) so far.
    pub fn messages(&self) -> Vec<ReceivedMail> {
        self.state
            .store
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Messages accepted for `address`.
    pub fn messages_to(&self, address: &str) -> Vec<ReceivedMail> {
        self.messages()
            .into_iter()
            .filter(|m| m.to.iter().any(|t| same_address(t, address)))
            .collect()
    }

    /// Messages refused with 552 (too large).
    pub fn refused(&self) -> Vec<ReceivedMail> {
        self.state
            .refused
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Conversations that stalled so far.
    pub fn stalled(&self) -> u64 {
        self.state.stalled.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `RCPT TO` commands answered by a [`SinkRules::rcpt_replies`] rule so far.
    pub fn rcpt_refusals(&self) -> u64 {
        self.state
            .rcpt_refusals
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Changes the rules; a stall lifted this way ends the conversations waiting on it.
    pub fn update(&self, change: impl FnOnce(&mut SinkRules)) {
        if let Ok(mut rules) = self.state.rules.lock() {
            change(&mut rules);
        }
        self.state.changed.notify_all();
    }

    /// Runs `hook` on every message just before it is accepted (before the 250 reply is
    /// written), e.g. to cut the notifier's database at that moment.
    pub fn on_accept(&self, hook: impl Fn(&ReceivedMail) + Send + Sync + 'static) {
        if let Ok(mut h) = self.state.on_accept.lock() {
            *h = Some(Box::new(hook));
        }
    }
}

/// Settings of a test run.
#[derive(Debug, Clone)]
pub struct AppOptions {
    /// Rows per chunk (small, so files span several chunks).
    pub chunk_rows: usize,
    /// ingest's settle interval.
    pub settle_ms: u64,
    /// Workers to run.
    pub workers: usize,
    /// Most rows a file may have.
    pub max_file_rows: u64,
    /// Put a [`TcpProxy`] the test controls between the services and RabbitMQ.
    pub broker_proxy: bool,
    /// ingest's full rescan interval, seconds (the safety net behind file-system events).
    pub rescan_secs: u64,
    /// Bytes of field data per chunk (ingest's CHUNK_MAX_BYTES).
    pub chunk_max_bytes: usize,
    /// Pause points in ingest the test listens to.
    pub ingest_hooks: mui_ingest::pipeline::Hooks,
    /// Make DROP_ROOT where OpenSSH accepts chroot folders (every folder above it root-owned
    /// and writable by nobody else, so not under /tmp): see [`sftp`].
    pub chroot_ready: bool,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            chunk_rows: 3,
            settle_ms: 400,
            workers: 2,
            max_file_rows: 5_000_000,
            broker_proxy: false,
            chroot_ready: false,
            rescan_secs: 1,
            chunk_max_bytes: mui_ingest::reader::DEFAULT_CHUNK_MAX_BYTES,
            ingest_hooks: mui_ingest::pipeline::Hooks::default(),
        }
    }
}

/// Throwaway resources of one test: database, queue prefix, drop root, SMTP sink.
#[derive(Debug)]
pub struct TestEnv {
    /// The database.
    pub db: TestDb,
    /// Queue prefix.
    pub prefix: String,
    /// DROP_ROOT.
    pub drop_root: tempfile::TempDir,
    /// The SMTP server the notifier sends to.
    pub smtp: SmtpSink,
    /// Options the services run with.
    pub options: AppOptions,
    /// The proxy in front of RabbitMQ, with [`AppOptions::broker_proxy`].
    pub broker: Option<TcpProxy>,
}

impl TestEnv {
    /// Fresh resources.
    pub fn new(options: AppOptions) -> anyhow::Result<Self> {
        let broker = if options.broker_proxy {
            let target = url::Url::parse(&amqp_url())?;
            let host = target.host_str().unwrap_or("127.0.0.1").to_owned();
            Some(TcpProxy::start(&format!(
                "{host}:{}",
                target.port().unwrap_or(5672)
            ))?)
        } else {
            None
        };
        Ok(Self {
            db: TestDb::new()?,
            prefix: unique("mui_t"),
            drop_root: if options.chroot_ready {
                sftp::chroot_ready_tempdir()?
            } else {
                tempfile::tempdir()?
            },
            smtp: SmtpSink::start()?,
            options,
            broker,
        })
    }

    fn common(&self) -> CommonArgs {
        let amqp_url = match &self.broker {
            Some(proxy) => {
                let mut u = url::Url::parse(&amqp_url()).expect("MUI_TEST_AMQP_URL is a URL");
                let _ = u.set_port(Some(proxy.port));
                let _ = u.set_host(Some("127.0.0.1"));
                u.to_string()
            }
            None => amqp_url(),
        };
        CommonArgs {
            database_url: self.db.url.clone(),
            amqp_url,
            queue_prefix: self.prefix.clone(),
            log_format: LogFormat::Human,
        }
    }

    /// ingest's configuration.
    pub fn ingest_config(&self) -> mui_ingest::IngestConfig {
        mui_ingest::IngestConfig {
            common: self.common(),
            drop_root: self.drop_root.path().to_path_buf(),
            settle_ms: self.options.settle_ms,
            rescan_secs: self.options.rescan_secs,
            poll_only: false,
            chunk_rows: self.options.chunk_rows,
            chunk_max_bytes: self.options.chunk_max_bytes,
            hooks: self.options.ingest_hooks.clone(),
            concurrency: 4,
            max_file_bytes: 1 << 30,
            max_file_rows: self.options.max_file_rows,
        }
    }

    /// A worker's configuration.
    pub fn worker_config(&self) -> mui_worker::WorkerConfig {
        mui_worker::WorkerConfig {
            common: self.common(),
            concurrency: 2,
        }
    }

    /// The notifier's configuration.
    pub fn notifier_config(&self) -> mui_notifier::NotifierConfig {
        mui_notifier::NotifierConfig {
            common: self.common(),
            smtp_url: Some(self.smtp.url()),
            mail_outbox: self.drop_root.path().join("unused-outbox"),
            max_attached_failures: 50_000,
            mail_concurrency: 4,
            smtp_timeout_secs: 30,
            attach_compress_bytes: 2 * 1024 * 1024,
            max_mail_bytes: 10 * 1024 * 1024,
        }
    }

    /// Creates a tenant with mail settings, login sources `sso` and `local`, user types `1`
    /// and `2`, and its drop folder.
    pub fn tenant(&self, slug: &str) -> anyhow::Result<Tenant> {
        let mut conn = self.db.conn();
        let slug = TenantSlug::parse(slug)?;
        let t = tenants::create(&mut conn, &slug, &format!("{slug} university"))?;
        let t = tenants::update(
            &mut conn,
            t.tenant_id(),
            &SettingsChange {
                reply_to_email: Some(Some(format!("admin@{slug}.example.org"))),
                failed_import_emails: Some(vec![format!("it@{slug}.example.org")]),
                ..SettingsChange::default()
            },
        )?;
        tenants::add_login_source(&mut conn, t.tenant_id(), "sso")?;
        tenants::add_login_source(&mut conn, t.tenant_id(), "local")?;
        tenants::add_user_type(&mut conn, t.tenant_id(), "1", "Staff")?;
        tenants::add_user_type(&mut conn, t.tenant_id(), "2", "Student")?;
        std::fs::create_dir_all(self.folder(&t.slug))?;
        Ok(t)
    }

    /// A tenant's drop folder.
    pub fn folder(&self, slug: &str) -> PathBuf {
        tenants::drop_folder(self.drop_root.path(), slug)
    }

    /// Writes a file into a tenant's drop folder the way an upload finishes: written under a
    /// temporary name, then renamed.
    pub fn drop_file(&self, slug: &str, name: &str, content: &[u8]) -> anyhow::Result<()> {
        let folder = self.folder(slug);
        let tmp = folder.join(format!("{name}.filepart"));
        std::fs::write(&tmp, content)?;
        std::fs::rename(&tmp, folder.join(name))?;
        Ok(())
    }

    /// The files of a tenant, oldest first.
    pub fn files(&self, tenant: &Tenant) -> Vec<FileRow> {
        let mut conn = self.db.conn();
        import_files::table
            .filter(import_files::tenant_id.eq(tenant.id))
            .order(import_files::id)
            .select((
                import_files::id,
                import_files::file_name,
                import_files::state,
                import_files::rows_total,
                import_files::rows_inserted,
                import_files::rows_updated,
                import_files::rows_unchanged,
                import_files::rows_failed,
                import_files::error_code,
                import_files::notify_status,
                import_files::archived_name,
            ))
            .load(&mut conn)
            .expect("files query")
    }

    /// A tenant's users as (unique_id, login_source, first_name, last_name, email, active),
    /// by unique_id.
    pub fn users(&self, tenant: &Tenant) -> Vec<UserRow> {
        let mut conn = self.db.conn();
        users::table
            .filter(users::tenant_id.eq(tenant.id))
            .order(users::unique_id)
            .select((
                users::unique_id,
                users::login_source,
                users::first_name,
                users::last_name,
                users::email,
                users::active,
            ))
            .load(&mut conn)
            .expect("users query")
    }

    /// Waits until `cond` holds, polling; fails after `secs` seconds with `what`.
    pub async fn wait_until(&self, secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if cond() {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out after {secs}s waiting for: {what}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What the tests read of a file beyond [`FileRow`].
#[derive(Debug, Clone)]
pub struct FileDetail {
    /// The name as registered (escaped if it was not UTF-8).
    pub file_name: String,
    /// Notices for the tenant and operator.
    pub notices: Vec<String>,
    /// The file-level error, if any.
    pub error_message: Option<String>,
    /// Chunks published.
    pub total_chunks: Option<i32>,
    /// The chunking fixed at registration.
    pub chunk_rows: Option<i32>,
}

impl TestEnv {
    /// Details of one file.
    pub fn file_detail(&self, file_id: i64) -> FileDetail {
        let mut conn = self.db.conn();
        let (file_name, notices, error_message, total_chunks, chunk_rows) = import_files::table
            .find(file_id)
            .select((
                import_files::file_name,
                import_files::notices,
                import_files::error_message,
                import_files::total_chunks,
                import_files::chunk_rows,
            ))
            .first::<(
                String,
                Vec<String>,
                Option<String>,
                Option<i32>,
                Option<i32>,
            )>(&mut conn)
            .expect("file detail query");
        FileDetail {
            file_name,
            notices,
            error_message,
            total_chunks,
            chunk_rows,
        }
    }
}

/// A file as the tests look at it.
pub type FileRow = (
    i64,
    String,
    String,
    Option<i64>,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
    String,
    Option<String>,
);

/// A user as the tests look at it.
pub type UserRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    bool,
);

impl Drop for TestEnv {
    fn drop(&mut self) {
        let prefix = self.prefix.clone();
        // Drop cannot await; clean the broker up on a small runtime of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(conn) =
                    lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
                        .await
                {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = mui_shared::amqp::Topology::new(prefix).delete(&ch).await;
                        let _ = ch.close(200, "bye".into()).await;
                    }
                    let _ = conn.close(200, "bye".into()).await;
                }
            });
        })
        .join();
    }
}

/// The three services running in-process.
#[derive(Debug)]
pub struct App {
    /// The test's resources.
    pub env: TestEnv,
    services: Option<Services>,
}

#[derive(Debug)]
struct Services {
    shutdown: CancellationToken,
    handles: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
}

/// Starts ingest, the workers and the notifier on fresh resources.
pub async fn spawn_app() -> App {
    spawn_app_with(AppOptions::default()).await
}

/// [`spawn_app`] with options.
pub async fn spawn_app_with(options: AppOptions) -> App {
    mui_shared::telemetry::init("tests", LogFormat::Human);
    let env = TestEnv::new(options).expect("test resources");
    let mut app = App {
        env,
        services: None,
    };
    app.start();
    app
}

impl App {
    /// Starts (or restarts) the services, each under the supervisor that restarts it after a
    /// failure, as the binaries run them.
    pub fn start(&mut self) {
        assert!(self.services.is_none(), "already running");
        let shutdown = CancellationToken::new();
        let mut handles = Vec::new();
        let ingest = self.env.ingest_config();
        let token = shutdown.clone();
        handles.push((
            "ingest",
            tokio::spawn(async move {
                supervise("mui-ingest", &token, |s| mui_ingest::run(ingest.clone(), s)).await
            }),
        ));
        for _ in 0..self.env.options.workers {
            let worker = self.env.worker_config();
            let token = shutdown.clone();
            handles.push((
                "worker",
                tokio::spawn(async move {
                    supervise("mui-worker", &token, |s| mui_worker::run(worker.clone(), s)).await
                }),
            ));
        }
        let notifier = self.env.notifier_config();
        let token = shutdown.clone();
        handles.push((
            "notifier",
            tokio::spawn(async move {
                supervise("mui-notifier", &token, |s| {
                    mui_notifier::run(notifier.clone(), s)
                })
                .await
            }),
        ));
        self.services = Some(Services { shutdown, handles });
    }

    /// Stops the services gracefully and checks none of them failed.
    pub async fn stop(&mut self) {
        if let Some(s) = self.services.take() {
            s.shutdown.cancel();
            for (name, h) in s.handles {
                match tokio::time::timeout(Duration::from_secs(30), h).await {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(e))) => panic!("{name} failed: {e:#}"),
                    Ok(Err(e)) => panic!("{name} panicked: {e}"),
                    Err(_) => panic!("{name} did not stop within 30s"),
                }
            }
        }
    }

    /// Stops the services at once, as a crash would: their tasks are dropped wherever they
    /// are (open connections close, advisory locks and unacknowledged messages go back).
    pub async fn kill(&mut self) {
        if let Some(s) = self.services.take() {
            for (_, h) in s.handles {
                h.abort();
                let _ = h.await;
            }
            s.shutdown.cancel();
        }
    }

    /// Waits until `count` files of `tenant` are finished and their email handled, whether
    /// or not they were archived (an entry that is not a regular file is left in place).
    pub async fn wait_files_finished(&self, tenant: &Tenant, count: usize) -> Vec<FileRow> {
        let what = format!("{count} file(s) of {} finished and notified", tenant.slug);
        self.env
            .wait_until(120, &what, || {
                let files = self.env.files(tenant);
                files.len() >= count
                    && files.iter().all(|f| {
                        (f.2 == "done" || f.2 == "failed") && f.9 != "pending" && f.9 != "sending"
                    })
            })
            .await;
        self.env.files(tenant)
    }

    /// Waits until every file of `tenant` listed is finished and its email handled.
    pub async fn wait_files_settled(&self, tenant: &Tenant, count: usize) -> Vec<FileRow> {
        let env = &self.env;
        // A liveness bound, generous because the whole suite shares two cores.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let files = env.files(tenant);
            let settled = files.len() >= count
                && files.iter().all(|f| {
                    (f.2 == "done" || f.2 == "failed")
                        && f.9 != "pending"
                        && f.9 != "sending"
                        && f.10.is_some()
                });
            if settled {
                return files;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out after 120s waiting for {count} file(s) of {} finished and notified; files now: {files:?}",
                    tenant.slug
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Reads a CSV attachment (UTF-8 with BOM) into rows of strings.
pub fn parse_csv(bytes: &[u8]) -> Vec<Vec<String>> {
    let text = std::str::from_utf8(bytes).expect("utf-8 attachment");
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(text.as_bytes());
    r.records()
        .map(|rec| rec.expect("csv record").iter().map(str::to_owned).collect())
        .collect()
}

/// Whether `path` exists.
pub fn exists(path: &Path) -> bool {
    path.exists()
}

/// A TCP proxy on a random loopback port that the test can cut: every connection through it
/// is dropped at once, as a network failure or a broker restart would.
#[derive(Debug, Clone)]
pub struct TcpProxy {
    /// Port it listens on.
    pub port: u16,
    cuts: tokio::sync::watch::Sender<u64>,
}

impl TcpProxy {
    /// Starts forwarding `127.0.0.1:<port>` to `target`.
    pub fn start(target: &str) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let (cuts, _) = tokio::sync::watch::channel(0u64);
        let proxy = Self { port, cuts };
        let target = target.to_owned();
        let cuts = proxy.cuts.clone();
        tokio::spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Ok(proxy)
    }

    /// Drops every connection going through the proxy.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }
}
