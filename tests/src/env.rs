//! A test's throwaway resources (database, queue prefix, drop root, SMTP sink) and what
//! the tests read back: files, users.

use crate::db::unique;
use crate::*;
use std::path::PathBuf;
use std::time::Duration;

use diesel::prelude::*;
use mui_shared::config::{CommonArgs, LogFormat};
use mui_shared::domain::TenantSlug;
use mui_shared::schema::{import_files, users};
use mui_shared::tenants::{self, SettingsChange, Tenant};

/// Settings of a test run.
#[derive(Debug, Clone)]
pub struct AppOptions {
    /// Rows per chunk (small, so files span several chunks).
    pub chunk_rows: usize,
    /// ingest's settle interval.
    pub settle_ms: u64,
    /// ingest's settle interval for a file its writer closed.
    pub closed_settle_ms: u64,
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
    /// How ingest hands chunks on (`CHUNK_DISPATCH`).
    pub chunk_dispatch: mui_ingest::pipeline::ChunkDispatch,
    /// Make DROP_ROOT where OpenSSH accepts chroot folders (every folder above it root-owned
    /// and writable by nobody else, so not under /tmp): see [`sftp`].
    pub chroot_ready: bool,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            chunk_rows: 3,
            settle_ms: 400,
            closed_settle_ms: 0,
            workers: 2,
            max_file_rows: 5_000_000,
            broker_proxy: false,
            chroot_ready: false,
            rescan_secs: 1,
            chunk_max_bytes: mui_ingest::reader::DEFAULT_CHUNK_MAX_BYTES,
            ingest_hooks: mui_ingest::pipeline::Hooks::default(),
            chunk_dispatch: mui_ingest::pipeline::ChunkDispatch::Fair,
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
    /// The RabbitMQ the services use (`MUI_TEST_AMQP_URL`, or a private node's).
    pub amqp: String,
}

impl TestEnv {
    /// Fresh resources.
    pub fn new(options: AppOptions) -> anyhow::Result<Self> {
        Self::new_on(options, TestDb::new()?, amqp_url())
    }

    /// [`TestEnv::new`] on a database and a broker the test chose: e.g. a private
    /// PostgreSQL cluster or RabbitMQ node ([`crate::private`]) that it may stop and start
    /// without disturbing the tests running beside it.
    pub fn new_on(options: AppOptions, db: TestDb, amqp: String) -> anyhow::Result<Self> {
        let broker = if options.broker_proxy {
            let target = url::Url::parse(&amqp)?;
            let host = target.host_str().unwrap_or("127.0.0.1").to_owned();
            Some(TcpProxy::start(&format!(
                "{host}:{}",
                target.port().unwrap_or(5672)
            ))?)
        } else {
            None
        };
        Ok(Self {
            db,
            prefix: unique("mui_t"),
            drop_root: if options.chroot_ready {
                sftp::chroot_ready_tempdir()?
            } else {
                tempfile::tempdir()?
            },
            smtp: SmtpSink::start()?,
            options,
            broker,
            amqp,
        })
    }

    fn common(&self) -> CommonArgs {
        let amqp_url = match &self.broker {
            Some(proxy) => {
                let mut u = url::Url::parse(&self.amqp).expect("MUI_TEST_AMQP_URL is a URL");
                let _ = u.set_port(Some(proxy.port));
                let _ = u.set_host(Some("127.0.0.1"));
                u.to_string()
            }
            None => self.amqp.clone(),
        };
        CommonArgs {
            database_url: self.db.url.clone(),
            amqp_url,
            queue_prefix: self.prefix.clone(),
            log_format: LogFormat::Human,
            http_addr: None,
            health: Default::default(),
        }
    }

    /// ingest's configuration.
    pub fn ingest_config(&self) -> mui_ingest::IngestConfig {
        mui_ingest::IngestConfig {
            common: self.common(),
            drop_root: self.drop_root.path().to_path_buf(),
            settle_ms: self.options.settle_ms,
            closed_settle_ms: self.options.closed_settle_ms,
            rescan_secs: self.options.rescan_secs,
            poll_only: false,
            chunk_rows: self.options.chunk_rows,
            chunk_max_bytes: self.options.chunk_max_bytes,
            hooks: self.options.ingest_hooks.clone(),
            concurrency: 4,
            max_file_bytes: 1 << 30,
            max_file_rows: self.options.max_file_rows,
            chunk_dispatch: self.options.chunk_dispatch,
        }
    }

    /// A worker's configuration.
    pub fn worker_config(&self) -> mui_worker::WorkerConfig {
        mui_worker::WorkerConfig {
            common: self.common(),
            concurrency: 2,
            dispatch: true,
            tenant_max_in_flight: None,
            dispatch_lease_secs: 900,
            dispatch_poll_ms: 50,
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
            mail_retry_secs: 900,
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
        mui_shared::files::files_in_order(&mut self.db.conn(), tenant.tenant_id())
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

impl TestEnv {
    /// The rows per chunk a file was registered with (not part of the operator's view).
    pub fn chunk_rows(&self, file_id: i64) -> Option<i32> {
        import_files::table
            .find(file_id)
            .select(import_files::chunk_rows)
            .first(&mut self.db.conn())
            .expect("chunk_rows query")
    }
}

/// A file as the tests look at it: the operator's view ([`mui_shared::files::FileLine`]).
pub type FileRow = mui_shared::files::FileLine;

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
        let amqp = self.amqp.clone();
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
                    lapin::Connection::connect(&amqp, lapin::ConnectionProperties::default()).await
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
