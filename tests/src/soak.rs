//! The randomized chaos soak (`mui-soak`): dozens of tenants drop random files (good rows,
//! every row failure, repeated ids, every file-level refusal, dry runs, guard-tripping
//! files, careless file-system actions) while the services are killed with SIGKILL and
//! PostgreSQL, RabbitMQ and SMTP fail; then, after a quiet period, the history is read back
//! and checked against the reference model ([`crate::model`]), Jepsen style: observe
//! first, judge afterwards.
//!
//! Everything random comes from one seed (printed at the start and on failure): the same
//! seed generates the same tenants, files and fault schedule (what the services do with
//! them in between is up to timing, which is the point).
//!
//! Two kinds of tenants:
//!
//! - **strict** tenants drop well-formed uploads (written under a temporary name, then
//!   renamed), one after another. Everything about them is checked exactly against the
//!   model: file states and codes, holds, report rows, mails, users and permits. The guard
//!   counts against the users as they are when a file is read (docs/architecture.md), so a
//!   file that deactivates anyone is dropped only once the tenant is quiet, and the next one
//!   only once its guard has decided: then the model's order is the product's.
//! - **careless** tenants overwrite files in place while they may be read, rename over
//!   them, delete them right after writing, upload in two parts, and leave a directory, a
//!   symlink and a FIFO. Each version of such a file names users of its own, so whatever
//!   ingest made of a race, every user either comes whole from one registered version or
//!   not at all; a registered content the soak never wrote (a mix) must be `unreadable`.

// A poisoned lock means one of the soak's own tasks panicked: stopping there is right.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::Digest;

use crate::chaos::{host_port, service_env, FaultProxy, Kind, ServiceProcess};
use crate::model::{self, Decision, Expected, FileInput, Model, ModelUser, Settings};
use crate::{AppOptions, SinkRules, SmtpSink, TestEnv};
use mui_shared::domain::{ImportFileId, TenantId, TenantSlug};
use mui_shared::schema::{import_files, permits, row_failures, users};

/// Rows per chunk the soak's ingest runs with; the generator keeps the rows of one
/// `unique_id` inside one such block (see [`crate::model`]).
pub const CHUNK_ROWS: usize = 4;

/// Peak resident memory a service process may reach.
pub const RSS_LIMIT_KIB: u64 = 512 * 1024;

/// How a soak runs.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Wall time of the fault phase.
    pub fault_phase: Duration,
    /// Tenants.
    pub tenants: usize,
    /// Generate the inputs of the product defects known on 2026-12-07 (see the module docs
    /// of [`Gen`]).
    pub known_defects: bool,
    /// The `mui-service` binary.
    pub service_bin: PathBuf,
    /// Where the services' logs go.
    pub log_dir: PathBuf,
}

/// One violation found by the check.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Tenant slug.
    pub tenant: String,
    /// File (id and name), if about one.
    pub file: Option<String>,
    /// What the model expected.
    pub expected: String,
    /// What was seen.
    pub seen: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tenant {} file {}: expected {} | seen {}",
            self.tenant,
            self.file.as_deref().unwrap_or("-"),
            self.expected,
            self.seen
        )
    }
}

/// The soak's outcome.
#[derive(Debug, Default)]
pub struct SoakReport {
    /// Violations found.
    pub violations: Vec<Violation>,
    /// Files registered.
    pub files: usize,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Peak RSS of any service process, KiB.
    pub peak_rss_kib: u64,
    /// Mails received.
    pub mails: usize,
    /// What the check covered (files by outcome, rows and users compared...).
    pub stats: BTreeMap<String, u64>,
}

/// A tenant as the soak drives it.
#[derive(Debug)]
struct TenantRun {
    slug: String,
    id: i64,
    careless: bool,
    settings: Settings,
    /// Contents the soak wrote, by sha256: (name, bytes, declared refusal, any failure).
    contents: Mutex<HashMap<String, Content>>,
    /// sha256 of every upload the soak finished and left in place (must be registered).
    /// With, for a content written into a file ingest may have been reading, the sha256 of
    /// the first content: its registration alone is tolerated when the known defects are
    /// left out (a write between ingest's last read and its move to `bak/` is lost
    /// silently: found by this soak, seeds 7 and 8).
    must_register: Mutex<Vec<(String, String, Option<String>)>>,
    /// Permits added after how many files were registered: (after, number, unique_id).
    permits: Mutex<Vec<(usize, String, String)>>,
    /// Special entries (directory, symlink, FIFO) the soak left in the folder.
    specials: Mutex<Vec<String>>,
}

#[derive(Debug, Clone)]
struct Content {
    name: String,
    bytes: Vec<u8>,
    refusal: Option<&'static str>,
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Shared state of the run.
struct Run {
    cfg: SoakConfig,
    env: TestEnv,
    smtp: SmtpSink,
    pg: FaultProxy,
    amqp: FaultProxy,
    services: tokio::sync::Mutex<Vec<ServiceProcess>>,
    /// Without the known defects: a replace in a careless tenant and an ingest kill or a
    /// PostgreSQL outage never overlap (a file registered, ingest killed or cut off from
    /// PostgreSQL, the file replaced before it is back: the tenant is blocked, a known
    /// defect).
    ingest_gate: tokio::sync::RwLock<()>,
    tenants: Vec<Arc<TenantRun>>,
    faults: Mutex<BTreeMap<String, u64>>,
    stop_faults: AtomicBool,
    stop_drops: AtomicBool,
    peak_rss: AtomicU64,
    /// 550 answers scripted (each may hold one report).
    refusals_550: AtomicU64,
    /// Operator decisions taken: file id → decision.
    decisions: Mutex<BTreeMap<i64, Decision>>,
    /// When a notifier was last killed (a report it was sending waits out its claim).
    notifier_killed: Mutex<Option<Instant>>,
    /// Every notifier kill: a mail it had sent and not yet recorded is known by one.
    notifier_kills: Mutex<Vec<Instant>>,
}

impl Run {
    fn fault(&self, what: &str) {
        *self
            .faults
            .lock()
            .unwrap()
            .entry(what.to_owned())
            .or_default() += 1;
        self.journal(&format!("fault {what}"));
    }
    /// One line of `<log dir>/journal.txt`: what the soak did when, to read beside the
    /// services' logs after a failure.
    fn journal(&self, line: &str) {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.cfg.log_dir.join("journal.txt"))
        {
            // One write per line: the soak's tasks journal at once.
            let text = format!("{} {line}\n", chrono::Utc::now().format("%H:%M:%S%.3f"));
            let _ = f.write_all(text.as_bytes());
        }
    }
    fn conn(&self) -> PgConnection {
        self.env.db.conn()
    }
}

/// Runs the soak and returns what the check found.
pub async fn run(cfg: SoakConfig) -> anyhow::Result<SoakReport> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let env = TestEnv::new(AppOptions {
        chunk_rows: CHUNK_ROWS,
        settle_ms: 400,
        rescan_secs: 1,
        ..AppOptions::default()
    })?;
    let smtp = SmtpSink::start_with(SinkRules::default())?;
    let pg = FaultProxy::start(&host_port(&env.db.url, 5432))?;
    let amqp = FaultProxy::start(&host_port(&env.amqp, 5672))?;
    std::fs::create_dir_all(&cfg.log_dir)?;

    // Tenants, with random settings.
    let mut tenant_runs = Vec::new();
    for i in 0..cfg.tenants {
        let slug = format!("t{i:02}");
        let careless = i % 4 == 3;
        let settings = random_settings(&mut rng, careless);
        let id = create_tenant(&env, &slug, &settings)?;
        tenant_runs.push(Arc::new(TenantRun {
            slug,
            id,
            careless,
            settings,
            contents: Mutex::new(HashMap::new()),
            must_register: Mutex::new(Vec::new()),
            permits: Mutex::new(Vec::new()),
            specials: Mutex::new(Vec::new()),
        }));
    }

    // The services, as processes, through the fault proxies.
    let mut procs = Vec::new();
    for (n, kind) in [Kind::Ingest, Kind::Worker, Kind::Worker, Kind::Notifier]
        .into_iter()
        .enumerate()
    {
        let mut vars = service_env(&env, kind);
        for (k, v) in vars.iter_mut() {
            match k.as_str() {
                "DATABASE_URL" => *v = pg.url_for(v),
                "AMQP_URL" => *v = amqp.url_for(v),
                "SMTP_URL" => *v = smtp.url(),
                _ => {}
            }
        }
        let log = cfg.log_dir.join(format!("{n}-{kind:?}.log").to_lowercase());
        procs.push(ServiceProcess::start(
            cfg.service_bin.to_str().unwrap_or_default(),
            kind,
            vars,
            &log,
        ));
    }
    let run = Arc::new(Run {
        cfg: cfg.clone(),
        env,
        smtp,
        pg,
        amqp,
        services: tokio::sync::Mutex::new(procs),
        ingest_gate: tokio::sync::RwLock::new(()),
        tenants: tenant_runs,
        faults: Mutex::new(BTreeMap::new()),
        stop_faults: AtomicBool::new(false),
        stop_drops: AtomicBool::new(false),
        peak_rss: AtomicU64::new(0),
        refusals_550: AtomicU64::new(0),
        decisions: Mutex::new(BTreeMap::new()),
        notifier_killed: Mutex::new(None),
        notifier_kills: Mutex::new(Vec::new()),
    });

    let rss = tokio::spawn(watch_rss(run.clone()));
    let operator = tokio::spawn(operator(run.clone(), rng.gen()));

    // Seeding: every tenant's first file and its permits, before any fault.
    println!("mui-soak: seeding {} tenants", run.tenants.len());
    let mut seeds = Vec::new();
    for t in &run.tenants {
        seeds.push(tokio::spawn(seed_tenant(run.clone(), t.clone(), rng.gen())));
    }
    for s in seeds {
        s.await??;
    }

    // The fault phase.
    println!(
        "mui-soak: fault phase of {}s",
        run.cfg.fault_phase.as_secs()
    );
    let started = Instant::now();
    let mut drivers = Vec::new();
    for t in &run.tenants {
        drivers.push(tokio::spawn(drive_tenant(
            run.clone(),
            t.clone(),
            rng.gen(),
        )));
    }
    let chaos = tokio::spawn(chaos(run.clone(), rng.gen()));
    let progress = tokio::spawn(progress(run.clone()));
    tokio::time::sleep(run.cfg.fault_phase).await;
    run.stop_drops.store(true, Ordering::SeqCst);
    run.stop_faults.store(true, Ordering::SeqCst);
    chaos.await?;
    for d in drivers {
        d.await?;
    }
    println!(
        "mui-soak: fault phase over after {}s; quiet period",
        started.elapsed().as_secs()
    );

    // Quiet: everything restored, every service running.
    run.pg.up();
    run.amqp.up();
    run.smtp.update(|r| *r = SinkRules::default());
    {
        let mut procs = run.services.lock().await;
        for p in procs.iter_mut() {
            if !p.running() {
                p.kill9().await;
                p.restart();
            }
        }
    }
    // The canaries: one small file per tenant, which must get through.
    for t in &run.tenants {
        let uid = if t.careless { "cc-canary" } else { "canary" };
        let text = format!(
            "unique_id,login_source,first_name\n{uid}1,{src},Ok\n{uid}2,nowhere,Bad\n",
            src = t.settings.login_sources[0]
        );
        drop_upload(&run, t, "canary.csv", text.as_bytes(), None)?;
    }
    let settled = wait_settled(&run).await;
    run.stop_faults.store(true, Ordering::SeqCst);
    operator.abort();
    progress.abort();
    rss.abort();
    let _ = watch_rss_once(&run).await;

    let mut report = check(&run, settled)?;
    report.faults = run.faults.lock().unwrap().clone();
    report.peak_rss_kib = run.peak_rss.load(Ordering::SeqCst);
    report.mails = run.smtp.messages().len();
    if report.peak_rss_kib > RSS_LIMIT_KIB {
        report.violations.push(Violation {
            tenant: "-".into(),
            file: None,
            expected: format!("every service's peak RSS under {RSS_LIMIT_KIB} KiB"),
            seen: format!("{} KiB", report.peak_rss_kib),
        });
    }
    let mut procs = run.services.lock().await;
    for p in procs.iter_mut() {
        let _ = p.terminate(Duration::from_secs(10)).await;
    }
    Ok(report)
}

fn random_settings(rng: &mut StdRng, careless: bool) -> Settings {
    let mut login_sources = vec!["sso".to_owned(), "local".to_owned()];
    if rng.gen_bool(0.3) {
        login_sources.push("ldap".into());
    }
    let archive_fields = match rng.gen_range(0..3) {
        0 => vec!["last_name".into(), "user_name".into(), "email".into()],
        1 => vec!["last_name".into()],
        _ => vec!["first_name".into(), "email".into(), "city".into()],
    };
    let (guard_percent, guard_min_users) = if careless || rng.gen_bool(0.3) {
        (0, 0)
    } else {
        ([5, 10, 30][rng.gen_range(0..3)], rng.gen_range(0..4))
    };
    Settings {
        login_sources,
        user_types: vec!["1".into(), "2".into()],
        archive_on_inactive: rng.gen_bool(0.7),
        archive_fields,
        guard_percent,
        guard_min_users,
        success_mail: rng.gen_bool(0.5),
    }
}

fn create_tenant(env: &TestEnv, slug: &str, s: &Settings) -> anyhow::Result<i64> {
    use mui_shared::tenants::{self as t, SettingsChange};
    let mut conn = env.db.conn();
    let parsed = TenantSlug::parse(slug)?;
    let tenant = t::create(&mut conn, &parsed, &format!("{slug} soak"))?;
    t::update(
        &mut conn,
        tenant.tenant_id(),
        &SettingsChange {
            reply_to_email: Some(Some(format!("admin@{slug}.example.org"))),
            failed_import_emails: Some(vec![format!("it@{slug}.example.org")]),
            archive_on_inactive: Some(s.archive_on_inactive),
            archive_suffix_fields: Some(s.archive_fields.clone()),
            guard_percent: Some(s.guard_percent),
            guard_min_users: Some(s.guard_min_users),
            success_mail: Some(s.success_mail),
            ..SettingsChange::default()
        },
    )?;
    for l in &s.login_sources {
        t::add_login_source(&mut conn, tenant.tenant_id(), l)?;
    }
    for u in &s.user_types {
        t::add_user_type(&mut conn, tenant.tenant_id(), u, "Type")?;
    }
    std::fs::create_dir_all(env.folder(slug))?;
    Ok(tenant.id)
}

/// Records a content and writes it as a finished upload (temporary name, then renamed).
fn drop_upload(
    run: &Run,
    t: &TenantRun,
    name: &str,
    bytes: &[u8],
    refusal: Option<&'static str>,
) -> anyhow::Result<()> {
    remember(t, name, bytes, refusal);
    run.journal(&format!("{} drop {name} {}", t.slug, sha(bytes)));
    t.must_register
        .lock()
        .unwrap()
        .push((name.to_owned(), sha(bytes), None));
    run.env.drop_file(&t.slug, name, bytes)
}

fn remember(t: &TenantRun, name: &str, bytes: &[u8], refusal: Option<&'static str>) {
    t.contents.lock().unwrap().insert(
        sha(bytes),
        Content {
            name: name.to_owned(),
            bytes: bytes.to_vec(),
            refusal,
        },
    );
}

/// Bounded wait for a condition.
async fn wait_for(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A file row as the soak reads it back.
#[derive(Debug, Clone, Queryable)]
struct FileSeen {
    id: i64,
    tenant_id: i64,
    file_name: String,
    sha256: String,
    state: String,
    error_code: Option<String>,
    notify_status: String,
    notify_detail: Option<String>,
    hold: Option<String>,
    dry_run: bool,
    notices: Vec<String>,
    hold_notified: Option<chrono::DateTime<chrono::Utc>>,
}

fn files_seen(conn: &mut PgConnection, tenant: Option<i64>) -> QueryResult<Vec<FileSeen>> {
    let mut q = import_files::table
        .select((
            import_files::id,
            import_files::tenant_id,
            import_files::file_name,
            import_files::sha256,
            import_files::state,
            import_files::error_code,
            import_files::notify_status,
            import_files::notify_detail,
            import_files::hold,
            import_files::dry_run,
            import_files::notices,
            import_files::hold_notified_at,
        ))
        .order(import_files::id)
        .into_boxed();
    if let Some(t) = tenant {
        q = q.filter(import_files::tenant_id.eq(t));
    }
    q.load(conn)
}

fn terminal(f: &FileSeen) -> bool {
    (f.state == "done" || f.state == "failed") && f.hold.as_deref() != Some("held")
}

/// A tenant is quiet when nothing waits in its folder and every file of it is finished.
fn quiet(run: &Run, t: &TenantRun) -> bool {
    let pending = std::fs::read_dir(run.env.folder(&t.slug))
        .map(|d| {
            d.flatten()
                .any(|e| e.file_type().map(|ft| ft.is_file()).unwrap_or(false))
        })
        .unwrap_or(true);
    if pending {
        return false;
    }
    let Ok(mut conn) = PgConnection::establish(&run.env.db.url) else {
        return false;
    };
    files_seen(&mut conn, Some(t.id))
        .map(|fs| fs.iter().all(terminal))
        .unwrap_or(false)
}

fn any_held(run: &Run, t: &TenantRun) -> bool {
    let Ok(mut conn) = PgConnection::establish(&run.env.db.url) else {
        return false;
    };
    files_seen(&mut conn, Some(t.id))
        .map(|fs| fs.iter().any(|f| f.hold.as_deref() == Some("held")))
        .unwrap_or(false)
}

/// The first file of a tenant (users to work on) and a few permits, before any fault.
async fn seed_tenant(run: Arc<Run>, t: Arc<TenantRun>, seed: u64) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut gen = Gen::new(&t, run.cfg.known_defects);
    let n = rng.gen_range(8..30);
    let (text, uids) = gen.seed_file(n);
    drop_upload(&run, &t, "seed.csv", text.as_bytes(), None)?;
    let done = wait_for(120, || quiet(&run, &t)).await;
    anyhow::ensure!(done, "tenant {}: the seed file did not finish", t.slug);
    if !t.careless {
        let mut conn = run.conn();
        for (k, uid) in uids.iter().enumerate() {
            if rng.gen_bool(0.4) {
                let number = format!("P{}-{k}", t.slug);
                mui_shared::permits::add_permit(
                    &mut conn,
                    &mui_shared::permits::NewPermit {
                        tenant: TenantId(t.id),
                        unique_id: uid,
                        permit_number: &number,
                        lot_name: "Lot A",
                        active_window: None,
                    },
                )
                .map_err(|e| anyhow::anyhow!("permit: {e}"))?;
                t.permits.lock().unwrap().push((1, number, uid.clone()));
            }
        }
    }
    Ok(())
}

/// Drops a tenant's random files until the fault phase ends.
async fn drive_tenant(run: Arc<Run>, t: Arc<TenantRun>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut gen = Gen::new(&t, run.cfg.known_defects);
    let mut n = 0u32;
    while !run.stop_drops.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..4000))).await;
        if run.stop_drops.load(Ordering::SeqCst) {
            break;
        }
        n += 1;
        let result = if t.careless {
            careless_step(&run, &t, &mut gen, &mut rng, n).await
        } else {
            strict_step(&run, &t, &mut gen, &mut rng, n).await
        };
        if let Err(e) = result {
            eprintln!("mui-soak: tenant {}: {e:#}", t.slug);
        }
    }
}

async fn strict_step(
    run: &Run,
    t: &TenantRun,
    gen: &mut Gen,
    rng: &mut StdRng,
    n: u32,
) -> anyhow::Result<()> {
    // Whether a file trips the guard depends on the users when it is read; not to depend
    // on timing, a file that deactivates anyone goes in only when the tenant is quiet.
    let file = gen.strict_file(rng, n, active_users(run, t));
    if file.deactivates {
        let stop = || run.stop_drops.load(Ordering::SeqCst);
        if !wait_for(60, || stop() || quiet(run, t)).await || stop() {
            return Ok(()); // not quiet in time: the file is not dropped at all
        }
        // A guard file is aimed at the threshold of the active users as they are now.
        let file = if file.guard {
            gen.guard_file(rng, file.name, &active_users(run, t))
        } else {
            file
        };
        drop_upload(run, t, &file.name, &file.bytes, file.refusal)?;
        // The next file only once this one's guard has decided.
        let _ = wait_for(90, || stop() || quiet(run, t) || any_held(run, t)).await;
        return Ok(());
    }
    drop_upload(run, t, &file.name, &file.bytes, file.refusal)
}

fn active_users(run: &Run, t: &TenantRun) -> Vec<String> {
    let Ok(mut conn) = PgConnection::establish(&run.env.db.url) else {
        return Vec::new();
    };
    users::table
        .filter(users::tenant_id.eq(t.id))
        .filter(users::active.eq(true))
        .select(users::unique_id)
        .order(users::unique_id)
        .load(&mut conn)
        .unwrap_or_default()
}

async fn careless_step(
    run: &Run,
    t: &TenantRun,
    gen: &mut Gen,
    rng: &mut StdRng,
    n: u32,
) -> anyhow::Result<()> {
    let folder = run.env.folder(&t.slug);
    let name = format!("c{n}.csv");
    let path = folder.join(&name);
    let action = rng.gen_range(0..100);
    run.journal(&format!("{} careless action {action} on {name}", t.slug));
    match action {
        // A plain upload.
        0..=24 => {
            let a = gen.careless_version(rng);
            drop_upload(run, t, &name, &a, None)?;
        }
        // Overwritten in place while it may be read.
        25..=44 => {
            let _gate = gate(run).await;
            let (a, b) = (gen.careless_version(rng), gen.careless_version(rng));
            remember(t, &name, &a, None);
            remember(t, &name, &b, None);
            std::fs::write(&path, &a)?;
            run.journal(&format!("{} wrote {name} in place {}", t.slug, sha(&a)));
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..1500))).await;
            std::fs::write(&path, &b)?;
            run.journal(&format!("{} overwrote {name} in place {}", t.slug, sha(&b)));
            t.must_register
                .lock()
                .unwrap()
                .push((name.clone(), sha(&b), Some(sha(&a))));
            tokio::time::sleep(Duration::from_secs(6)).await;
        }
        // Renamed over.
        45..=59 => {
            let _gate = gate(run).await;
            let (a, b) = (gen.careless_version(rng), gen.careless_version(rng));
            remember(t, &name, &a, None);
            run.env.drop_file(&t.slug, &name, &a)?;
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..1500))).await;
            drop_upload(run, t, &name, &b, None)?;
            tokio::time::sleep(Duration::from_secs(6)).await;
        }
        // Deleted right after writing.
        60..=69 => {
            let a = gen.careless_version(rng);
            remember(t, &name, &a, None);
            run.env.drop_file(&t.slug, &name, &a)?;
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..300))).await;
            let _ = std::fs::remove_file(&path);
        }
        // A partial upload (cut at a line end), resumed.
        70..=84 => {
            let _gate = gate(run).await;
            let full = gen.careless_version(rng);
            let ends: Vec<usize> = full
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1)
                .collect();
            let cut = ends[rng.gen_range(0..ends.len())];
            remember(t, &name, &full[..cut], None);
            remember(t, &name, &full, None);
            std::fs::write(&path, &full[..cut])?;
            run.journal(&format!(
                "{} wrote part of {name} {}",
                t.slug,
                sha(&full[..cut])
            ));
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..1500))).await;
            {
                use std::io::Write;
                match std::fs::OpenOptions::new().append(true).open(&path) {
                    Ok(mut f) => {
                        f.write_all(&full[cut..])?;
                        run.journal(&format!(
                            "{} appended the rest of {name} {}",
                            t.slug,
                            sha(&full)
                        ));
                    }
                    // The first part was taken as the whole upload and moved to bak/
                    // already (a writer that closed its file is done, INGEST_CLOSED_SETTLE_MS
                    // 0): the rest is not uploaded.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                    Err(e) => return Err(e.into()),
                }
            }
            t.must_register.lock().unwrap().push((
                name.clone(),
                sha(&full),
                Some(sha(&full[..cut])),
            ));
            tokio::time::sleep(Duration::from_secs(6)).await;
        }
        // A directory, a symlink, a FIFO: never opened, left in place.
        85..=92 => {
            let which = rng.gen_range(0..3);
            let special = format!("s{n}.csv");
            let p = folder.join(&special);
            match which {
                0 => std::fs::create_dir(&p)?,
                1 => std::os::unix::fs::symlink("/etc/hostname", &p)?,
                _ => {
                    let status = std::process::Command::new("mkfifo").arg(&p).status()?;
                    anyhow::ensure!(status.success(), "mkfifo failed");
                }
            }
            t.specials.lock().unwrap().push(special);
        }
        // A known defect: registered, ingest killed, replaced before ingest restarts.
        _ if run.cfg.known_defects => {
            let (a, b) = (gen.careless_version(rng), gen.careless_version(rng));
            drop_upload(run, t, &name, &a, None)?;
            let sha_a = sha(&a);
            let registered = wait_for(30, || {
                let mut conn = run.conn();
                files_seen(&mut conn, Some(t.id))
                    .map(|fs| fs.iter().any(|f| f.sha256 == sha_a))
                    .unwrap_or(false)
            })
            .await;
            let mut procs = run.services.lock().await;
            if registered && std::fs::metadata(&path).is_ok() {
                procs[0].kill9().await;
                run.fault("kill ingest (replace while down)");
                remember(t, &name, &b, None);
                std::fs::write(&path, &b)?;
                t.must_register
                    .lock()
                    .unwrap()
                    .push((name.clone(), sha(&b), None));
                tokio::time::sleep(Duration::from_millis(500)).await;
                procs[0].restart();
            }
        }
        _ => {
            let a = gen.careless_version(rng);
            drop_upload(run, t, &name, &a, None)?;
        }
    }
    Ok(())
}

/// Without the known defects, a replace and an ingest kill do not overlap.
async fn gate(run: &Run) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
    if run.cfg.known_defects {
        None
    } else {
        Some(run.ingest_gate.read().await)
    }
}

/// Kills and restarts services and cuts PostgreSQL, RabbitMQ and SMTP, at random, bounded.
async fn chaos(run: Arc<Run>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let budget = 20 * (run.cfg.fault_phase.as_secs() / 60 + 1);
    let mut used = 0;
    while !run.stop_faults.load(Ordering::SeqCst) && used < budget {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1000..4000))).await;
        if run.stop_faults.load(Ordering::SeqCst) {
            break;
        }
        used += 1;
        let down = Duration::from_millis(rng.gen_range(200..4000));
        match rng.gen_range(0..100) {
            0..=44 => {
                let which = rng.gen_range(0..4);
                let _gate = if which == 0 && !run.cfg.known_defects {
                    Some(run.ingest_gate.write().await)
                } else {
                    None
                };
                if which == 3 && notifier_sending(&run) {
                    // A notifier killed during an SMTP conversation leaves its claim for 5
                    // minutes (documented): not worth waiting for at the end.
                    continue;
                }
                let name = ["ingest", "worker", "worker", "notifier"][which];
                run.services.lock().await[which].kill9().await;
                if which == 3 {
                    *run.notifier_killed.lock().unwrap() = Some(Instant::now());
                    run.notifier_kills.lock().unwrap().push(Instant::now());
                }
                run.fault(&format!("kill -9 {name}"));
                tokio::time::sleep(down).await;
                run.services.lock().await[which].restart();
                if which == 0 {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
            45..=59 => {
                // The same defect's other door (seed 7, found by this soak): a file
                // registered just before PostgreSQL went away and replaced during the
                // outage stays `received` for good.
                let _gate = if run.cfg.known_defects {
                    None
                } else {
                    Some(run.ingest_gate.write().await)
                };
                run.pg.down();
                run.fault("postgresql down");
                tokio::time::sleep(down).await;
                run.pg.up();
                if _gate.is_some() {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
            60..=74 => {
                run.amqp.down();
                run.fault("rabbitmq down");
                tokio::time::sleep(down).await;
                run.amqp.up();
            }
            75..=89 => {
                let codes: Vec<u16> = (0..rng.gen_range(1..4))
                    .map(|_| [421, 451, 452][rng.gen_range(0..3)])
                    .collect();
                run.fault(&format!("smtp {codes:?}"));
                run.smtp.update(|r| r.data_end_script.extend(codes));
            }
            90..=94 => {
                let t = &run.tenants[rng.gen_range(0..run.tenants.len())];
                let to = format!("it@{}.example.org", t.slug);
                run.fault("smtp stall");
                run.smtp.update(|r| r.stall.push(to));
                tokio::time::sleep(down).await;
                run.smtp.update(|r| r.stall.clear());
            }
            _ => {
                run.fault("smtp 550");
                run.refusals_550.fetch_add(1, Ordering::SeqCst);
                run.smtp.update(|r| r.data_end_script.push(550));
            }
        }
    }
    // Whatever the script still holds is taken out: the quiet period has no faults.
    run.smtp.update(|r| *r = SinkRules::default());
}

fn notifier_sending(run: &Run) -> bool {
    let mut conn = run.conn();
    import_files::table
        .filter(import_files::notify_status.eq("sending"))
        .count()
        .get_result::<i64>(&mut conn)
        .map(|n| n > 0)
        .unwrap_or(true)
}

/// The operator: decides every held file after a random delay (approve or reject).
async fn operator(run: Arc<Run>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut due: BTreeMap<i64, (Instant, Decision)> = BTreeMap::new();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut conn = run.conn();
        let held: Vec<i64> = import_files::table
            .filter(import_files::hold.eq("held"))
            .select(import_files::id)
            .load(&mut conn)
            .unwrap_or_default();
        for id in held {
            due.entry(id).or_insert_with(|| {
                let d = if rng.gen_bool(0.65) {
                    Decision::Approve
                } else {
                    Decision::Reject
                };
                (
                    Instant::now() + Duration::from_millis(rng.gen_range(500..6000)),
                    d,
                )
            });
        }
        let now = Instant::now();
        let ready: Vec<(i64, Decision)> = due
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(id, (_, d))| (*id, *d))
            .collect();
        for (id, d) in ready {
            let r = match d {
                Decision::Approve => {
                    mui_shared::holds::approve(&mut conn, ImportFileId(id), "soak").map(|_| ())
                }
                Decision::Reject => {
                    mui_shared::holds::reject(&mut conn, ImportFileId(id), "soak").map(|_| ())
                }
            };
            if r.is_ok() {
                due.remove(&id);
                run.decisions.lock().unwrap().insert(id, d);
            }
        }
    }
}

/// Peak RSS (VmHWM) of the running service processes.
async fn watch_rss(run: Arc<Run>) {
    loop {
        watch_rss_once(&run).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn watch_rss_once(run: &Run) {
    let pids: Vec<u32> = run
        .services
        .lock()
        .await
        .iter()
        .filter_map(ServiceProcess::pid)
        .collect();
    for pid in pids {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kib) = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                run.peak_rss.fetch_max(kib, Ordering::SeqCst);
            }
        }
    }
}

async fn progress(run: Arc<Run>) {
    loop {
        tokio::time::sleep(Duration::from_secs(15)).await;
        let mut conn = run.conn();
        if let Ok(fs) = files_seen(&mut conn, None) {
            let done = fs.iter().filter(|f| terminal(f)).count();
            let faults: u64 = run.faults.lock().unwrap().values().sum();
            println!(
                "mui-soak: {} files registered, {done} finished, {faults} faults, {} mails",
                fs.len(),
                run.smtp.messages().len()
            );
        }
    }
}

/// How long the settling may go without progress (a file registered, or one more finished
/// and mailed) before the check takes what it sees.
const NO_PROGRESS_FOR: Duration = Duration::from_secs(240);

/// The longest the settling may take, progress or not.
const SETTLE_AT_MOST: Duration = Duration::from_secs(45 * 60);

/// Waits (bounded) until every file is finished, its mail handled, every upload the soak
/// left is registered, and no report is being sent. Returns whether that happened.
///
/// A long run on a small machine ends with a backlog (files still queued when the faults
/// stop) that is slow, not stuck: the wait goes on while files keep being registered or
/// finished, and ends [`NO_PROGRESS_FOR`] after the last of that (a blocked tenant with
/// it), or at [`SETTLE_AT_MOST`].
async fn wait_settled(run: &Run) -> bool {
    let started = Instant::now();
    let mut deadline = started + NO_PROGRESS_FOR;
    let mut progress = (0usize, 0usize);
    let mut claim_deadline = None;
    loop {
        let mut conn = run.conn();
        let fs = files_seen(&mut conn, None).unwrap_or_default();
        let now_progress = (
            fs.len(),
            fs.iter()
                .filter(|f| {
                    terminal(f) && f.notify_status != "pending" && f.notify_status != "sending"
                })
                .count(),
        );
        if now_progress != progress {
            progress = now_progress;
            deadline = (Instant::now() + NO_PROGRESS_FOR).min(started + SETTLE_AT_MOST);
        }
        let sending = fs.iter().any(|f| f.notify_status == "sending");
        let all = fs
            .iter()
            .all(|f| terminal(f) && f.notify_status != "pending" && f.notify_status != "sending");
        let registered: BTreeSet<(i64, String)> =
            fs.iter().map(|f| (f.tenant_id, f.sha256.clone())).collect();
        let folders_empty = run.tenants.iter().all(|t| {
            t.must_register.lock().unwrap().iter().all(|(_, s, first)| {
                registered.contains(&(t.id, s.clone()))
                    || (!run.cfg.known_defects
                        && first
                            .as_ref()
                            .is_some_and(|f| registered.contains(&(t.id, f.clone()))))
            })
        });
        if all && folders_empty {
            return true;
        }
        // A report claimed by a notifier that was killed mid-conversation waits out its
        // 5-minute claim (docs/reliability.md): that long after the last notifier kill.
        if sending && Instant::now() > deadline && claim_deadline.is_none() {
            claim_deadline = *run.notifier_killed.lock().unwrap();
            claim_deadline = claim_deadline.map(|k| k + Duration::from_secs(330));
        }
        let limit = claim_deadline.unwrap_or(deadline);
        if Instant::now() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A mail as the check sorts it.
#[derive(Debug)]
struct MailSeen {
    file: i64,
    held: bool,
    /// When the sink began to receive it.
    at: Instant,
    failed_rows: Option<BTreeMap<u64, BTreeSet<String>>>,
}

fn mails_by_file(smtp: &SmtpSink) -> (Vec<MailSeen>, Vec<String>) {
    let mut seen = Vec::new();
    let mut strays = Vec::new();
    for m in smtp.messages() {
        let parsed = m.parsed();
        let id = parsed.message_id().unwrap_or_default().to_owned();
        let file = id
            .strip_prefix("import-file-")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<i64>().ok());
        let Some(file) = file else {
            strays.push(format!("{id:?} {:?}", m.subject()));
            continue;
        };
        let held = id.contains(".held@");
        let failed_rows = m
            .attachments()
            .into_iter()
            .find(|(name, _)| name.ends_with(".csv"))
            .map(|(_, bytes)| attachment_rows(&bytes));
        seen.push(MailSeen {
            file,
            held,
            at: m.at,
            failed_rows,
        });
    }
    (seen, strays)
}

/// Row number → codes of a failures CSV.
fn attachment_rows(bytes: &[u8]) -> BTreeMap<u64, BTreeSet<String>> {
    let rows = crate::parse_csv(bytes);
    let mut out = BTreeMap::new();
    let Some(head) = rows.first() else {
        return out;
    };
    let (Some(r), Some(c)) = (
        head.iter().position(|h| h == "row"),
        head.iter().position(|h| h == "error_code"),
    ) else {
        return out;
    };
    for row in &rows[1..] {
        let n: u64 = row.get(r).and_then(|v| v.parse().ok()).unwrap_or(0);
        let codes = row
            .get(c)
            .map(|v| v.split(';').map(|s| s.trim().to_owned()).collect())
            .unwrap_or_default();
        out.insert(n, codes);
    }
    out
}

fn db_failed_rows(conn: &mut PgConnection, file: i64) -> BTreeMap<u64, BTreeSet<String>> {
    let rows: Vec<(i64, serde_json::Value)> = row_failures::table
        .filter(row_failures::file_id.eq(file))
        .select((row_failures::row_number, row_failures::errors))
        .load(conn)
        .unwrap_or_default();
    rows.into_iter()
        .map(|(n, errors)| {
            let codes = errors
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|e| e.get("code").and_then(|c| c.as_str()))
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            (n as u64, codes)
        })
        .collect()
}

type DbUser = (String, ModelUser);

fn db_users(conn: &mut PgConnection, tenant: i64) -> QueryResult<BTreeMap<String, ModelUser>> {
    #[allow(clippy::type_complexity)]
    let rows: Vec<(
        String,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<chrono::NaiveDate>,
        bool,
        Option<chrono::DateTime<chrono::Utc>>,
    )> = users::table
        .filter(users::tenant_id.eq(tenant))
        .select((
            users::unique_id,
            users::login_source,
            users::first_name,
            users::last_name,
            users::user_name,
            users::email,
            users::city,
            users::user_type_id,
            users::date_of_birth,
            users::active,
            users::archived_at,
        ))
        .load(conn)?;
    Ok(rows
        .into_iter()
        .map(|r| -> DbUser {
            let mut values = BTreeMap::new();
            let cols = [
                ("first_name", r.2),
                ("last_name", r.3),
                ("user_name", r.4),
                ("email", r.5),
                ("city", r.6),
                ("user_type_id", r.7),
                (
                    "date_of_birth",
                    r.8.map(|d| d.format("%Y-%m-%d").to_string()),
                ),
            ];
            for (c, v) in cols {
                if let Some(v) = v {
                    values.insert(c.to_owned(), v);
                }
            }
            (
                r.0,
                ModelUser {
                    login_source: r.1,
                    values,
                    active: r.9,
                    archived: r.10.is_some(),
                },
            )
        })
        .collect())
}

fn db_permits(
    conn: &mut PgConnection,
    tenant: i64,
) -> QueryResult<BTreeMap<String, (String, bool)>> {
    let rows: Vec<(String, String, Option<chrono::DateTime<chrono::Utc>>)> = permits::table
        .filter(permits::tenant_id.eq(tenant))
        .select((
            permits::permit_number,
            permits::unique_id,
            permits::released_at,
        ))
        .load(conn)?;
    Ok(rows
        .into_iter()
        .map(|(n, u, r)| (n, (u, r.is_some())))
        .collect())
}

/// The check: the history read back against the model.
fn check(run: &Run, settled: bool) -> anyhow::Result<SoakReport> {
    let mut report = SoakReport::default();
    let mut v = Vec::new();
    if !settled {
        v.push(Violation {
            tenant: "-".into(),
            file: None,
            expected: "every file finished and mailed, every upload registered, within the bound"
                .into(),
            seen: "not settled in time (details below)".into(),
        });
    }
    let mut conn = run.conn();
    let all = files_seen(&mut conn, None)?;
    report.files = all.len();
    // The files as registered, kept with the logs (the database goes with the run).
    let table: String = all.iter().map(|f| format!("{f:?}\n")).collect();
    let _ = std::fs::write(run.cfg.log_dir.join("import_files.txt"), table);
    let (mails, strays) = mails_by_file(&run.smtp);
    let kills: Vec<Instant> = run.notifier_kills.lock().unwrap().clone();
    for s in strays {
        v.push(Violation {
            tenant: "-".into(),
            file: None,
            expected: "every mail about a registered file".into(),
            seen: format!("a mail with Message-ID {s}"),
        });
    }
    let known_ids: BTreeSet<i64> = all.iter().map(|f| f.id).collect();
    for m in &mails {
        if !known_ids.contains(&m.file) {
            v.push(Violation {
                tenant: "-".into(),
                file: Some(m.file.to_string()),
                expected: "no mail for a file never registered".into(),
                seen: "a mail".into(),
            });
        }
    }
    let year = chrono::Datelike::year(&chrono::Utc::now());
    let mut held_by_550 = 0u64;
    let mut stats: BTreeMap<String, u64> = BTreeMap::new();
    for t in &run.tenants {
        let files: Vec<&FileSeen> = all.iter().filter(|f| f.tenant_id == t.id).collect();
        let contents = t.contents.lock().unwrap().clone();
        let permits_added = t.permits.lock().unwrap().clone();
        let mut model = Model::new(t.settings.clone(), year);
        // Careless tenants: users of versions that may have been imported in part.
        let mut maybe = Model::new(t.settings.clone(), year);
        let viol = |file: &FileSeen, expected: String, seen: String| Violation {
            tenant: t.slug.clone(),
            file: Some(format!("{} {:?}", file.id, file.file_name)),
            expected,
            seen,
        };
        for (k, f) in files.iter().enumerate() {
            if !terminal(f) {
                v.push(viol(
                    f,
                    "finished (done or failed, no hold left)".into(),
                    format!("state {} hold {:?}", f.state, f.hold),
                ));
            }
            let Some(content) = contents.get(&f.sha256) else {
                let special = t.specials.lock().unwrap().contains(&f.file_name);
                if f.error_code.as_deref() == Some("not_regular_file") {
                    *stats
                        .entry("special entry refused not_regular_file".into())
                        .or_default() += 1;
                    if !special {
                        v.push(viol(
                            f,
                            "not_regular_file only for a directory, symlink or FIFO".into(),
                            "a file the soak wrote as a regular file".into(),
                        ));
                    }
                } else if special {
                    v.push(viol(
                        f,
                        "a directory, symlink or FIFO refused not_regular_file".into(),
                        format!("state {} code {:?}", f.state, f.error_code),
                    ));
                } else if !(f.state == "failed" && f.error_code.as_deref() == Some("unreadable")) {
                    v.push(viol(
                        f,
                        "a content the soak wrote, or failed unreadable".into(),
                        format!("unknown content, state {} {:?}", f.state, f.error_code),
                    ));
                }
                check_mails(
                    &mut v,
                    t,
                    f,
                    &mails,
                    None,
                    &mut conn,
                    &mut held_by_550,
                    &kills,
                );
                continue;
            };
            let decision = match f.hold.as_deref() {
                Some("approved") => Some(Decision::Approve),
                Some("rejected") => Some(Decision::Reject),
                _ => None,
            };
            let input = FileInput {
                name: &content.name,
                bytes: &content.bytes,
                declared_refusal: content.refusal,
            };
            // Changed while read, or cut short (written to, replaced or removed while
            // ingest read it): the notice says only a first part of this version was
            // imported, which the model does not pin down; what that part made is a
            // "maybe".
            // (Not a file given up after the same error again and again: that is a defect
            // here, and stays held to the model.)
            let changed = f.notices.iter().any(|n| {
                (n.contains("changed")
                    || n.contains("only its first")
                    || n.contains("only the first"))
                    && !n.contains("again and again")
            });
            let unreadable = f.state == "failed" && f.error_code.as_deref() == Some("unreadable");
            if t.careless {
                let what = if unreadable {
                    "careless file unreadable"
                } else if changed {
                    "careless file changed while imported"
                } else {
                    "careless file as written"
                };
                *stats.entry(what.into()).or_default() += 1;
            }
            let expected = if t.careless && (changed || unreadable) {
                if changed && f.state == "done" {
                    maybe.file(&input, decision);
                }
                None
            } else {
                let e = model.file(&input, decision);
                maybe.file(&input, decision);
                Some(e)
            };
            if let Some(e) = &expected {
                let outcome = match (&e.state, e.held, e.dry_run) {
                    (_, _, true) => "dry run".to_owned(),
                    (Expected::Done, true, _) => "held, approved, done".to_owned(),
                    (Expected::Failed(c), true, _) => format!("held, {c}"),
                    (Expected::Done, false, _) => "done".to_owned(),
                    (Expected::Failed(c), false, _) => format!("failed {c}"),
                };
                *stats.entry(format!("file {outcome}")).or_default() += 1;
                *stats.entry("failed rows compared".into()).or_default() +=
                    e.failed_rows.len() as u64;
                let state_ok = match &e.state {
                    Expected::Done => f.state == "done",
                    Expected::Failed(code) => {
                        f.state == "failed" && f.error_code.as_deref() == Some(code.as_str())
                    }
                };
                if !state_ok {
                    v.push(viol(
                        f,
                        format!("{:?}", e.state),
                        format!(
                            "state {} code {:?} (notices {:?})",
                            f.state, f.error_code, f.notices
                        ),
                    ));
                }
                if e.held != f.hold.is_some() {
                    v.push(viol(
                        f,
                        format!("held by the guard: {}", e.held),
                        format!("hold {:?}", f.hold),
                    ));
                }
                if e.dry_run != f.dry_run {
                    v.push(viol(
                        f,
                        format!("dry run {}", e.dry_run),
                        format!("dry run {}", f.dry_run),
                    ));
                }
            }
            check_mails(
                &mut v,
                t,
                f,
                &mails,
                expected.as_ref(),
                &mut conn,
                &mut held_by_550,
                &kills,
            );
            // Permits were added once the seed file was in.
            for (after, number, uid) in &permits_added {
                if *after == k + 1 {
                    model.add_permit(number, uid);
                }
            }
        }
        // Specials: each registered once at most, and only as not_regular_file.
        for s in t.specials.lock().unwrap().iter() {
            let n = files.iter().filter(|f| &f.file_name == s).count();
            if n > 1 {
                v.push(Violation {
                    tenant: t.slug.clone(),
                    file: Some(s.clone()),
                    expected: "a special entry registered once at most".into(),
                    seen: format!("{n} times"),
                });
            }
        }
        // Nothing lost.
        let registered: BTreeSet<&str> = files.iter().map(|f| f.sha256.as_str()).collect();
        for (name, s, first) in t.must_register.lock().unwrap().iter() {
            let first_only = first.as_deref().is_some_and(|f| registered.contains(f))
                && !registered.contains(s.as_str());
            if first_only {
                *stats
                    .entry("late write into a file being taken, lost (known defect)".into())
                    .or_default() += 1;
                if !run.cfg.known_defects {
                    continue;
                }
            }
            if !registered.contains(s.as_str()) {
                v.push(Violation {
                    tenant: t.slug.clone(),
                    file: Some(name.clone()),
                    expected: format!("the upload left in place registered (sha256 {s})"),
                    seen: "never registered".into(),
                });
            }
        }
        if !files
            .iter()
            .any(|f| f.file_name == "canary.csv" && f.state == "done")
        {
            v.push(Violation {
                tenant: t.slug.clone(),
                file: Some("canary.csv".into()),
                expected: "the final canary imported".into(),
                seen: "not done: the tenant is blocked".into(),
            });
        }
        // Users and permits.
        let seen_users = db_users(&mut conn, t.id)?;
        *stats.entry("users compared".into()).or_default() += model.users.len() as u64;
        *stats.entry("users archived".into()).or_default() +=
            model.users.values().filter(|u| u.archived).count() as u64;
        *stats.entry("permits released".into()).or_default() +=
            model.permits.values().filter(|p| p.1).count() as u64;
        for (uid, want) in &model.users {
            match seen_users.get(uid) {
                Some(got) if got == want => {}
                got => v.push(Violation {
                    tenant: t.slug.clone(),
                    file: None,
                    expected: format!("user {uid}: {want:?}"),
                    seen: format!("{got:?}"),
                }),
            }
        }
        for (uid, got) in &seen_users {
            if model.users.contains_key(uid) {
                continue;
            }
            // A user only a partly imported version may have made, exactly as that version.
            match maybe.users.get(uid) {
                Some(want) if t.careless && want == got => {}
                want => v.push(Violation {
                    tenant: t.slug.clone(),
                    file: None,
                    expected: format!(
                        "no user {uid} (or as a partly imported version made it: {want:?})"
                    ),
                    seen: format!("{got:?}"),
                }),
            }
        }
        let seen_permits = db_permits(&mut conn, t.id)?;
        if seen_permits != model.permits {
            v.push(Violation {
                tenant: t.slug.clone(),
                file: None,
                expected: format!("permits (number: (user, released)) {:?}", model.permits),
                seen: format!("{seen_permits:?}"),
            });
        }
    }
    if held_by_550 > run.refusals_550.load(Ordering::SeqCst) {
        v.push(Violation {
            tenant: "-".into(),
            file: None,
            expected: format!(
                "at most {} reports held by a 550",
                run.refusals_550.load(Ordering::SeqCst)
            ),
            seen: format!("{held_by_550}"),
        });
    }
    dump_violating_files(run, &all, &v);
    report.violations = v;
    report.stats = stats;
    Ok(report)
}

/// Writes the content of every file a violation names into `<log dir>/files/`, to read
/// (and to replay by hand) after the run.
fn dump_violating_files(run: &Run, all: &[FileSeen], v: &[Violation]) {
    let dir = run.cfg.log_dir.join("files");
    for viol in v {
        let Some(id) = viol
            .file
            .as_deref()
            .and_then(|f| f.split(' ').next())
            .and_then(|n| n.parse::<i64>().ok())
        else {
            continue;
        };
        let Some(f) = all.iter().find(|f| f.id == id) else {
            continue;
        };
        let Some(t) = run.tenants.iter().find(|t| t.id == f.tenant_id) else {
            continue;
        };
        if let Some(c) = t.contents.lock().unwrap().get(&f.sha256) {
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(dir.join(format!("{}-{id}-{}", t.slug, c.name)), &c.bytes);
        }
    }
}

/// One report mail per file that needs one (and one hold mail per held file), with the
/// model's failed rows; a report a 550 refused is held and its rows read from the database.
#[allow(clippy::too_many_arguments)] // the file, what was expected of it, and what the run saw
fn check_mails(
    v: &mut Vec<Violation>,
    t: &TenantRun,
    f: &FileSeen,
    mails: &[MailSeen],
    expected: Option<&model::FileOutcome>,
    conn: &mut PgConnection,
    held_by_550: &mut u64,
    notifier_kills: &[Instant],
) {
    let viol = |expected: String, seen: String| Violation {
        tenant: t.slug.clone(),
        file: Some(format!("{} {:?}", f.id, f.file_name)),
        expected,
        seen,
    };
    let reports: Vec<&MailSeen> = mails.iter().filter(|m| m.file == f.id && !m.held).collect();
    let holds = mails.iter().filter(|m| m.file == f.id && m.held).count();
    let refused = f.notify_status == "held"
        && f.notify_detail
            .as_deref()
            .is_some_and(|d| d.contains("550"));
    if refused {
        *held_by_550 += 1;
    }
    let Some(e) = expected else {
        // Content the model does not pin down: one mail at most, and it is the report.
        if reports.len() > 1 {
            v.push(viol(
                "one report mail at most".into(),
                format!("{}", reports.len()),
            ));
        }
        return;
    };
    let want_reports = usize::from(e.report_mail && !refused);
    if reports.len() != want_reports {
        v.push(viol(
            format!("{want_reports} report mail(s)"),
            format!(
                "{} (notify {} {:?})",
                reports.len(),
                f.notify_status,
                f.notify_detail
            ),
        ));
    }
    // The hold mail goes out unless the operator decided first (notifier/src/held.rs);
    // `hold_notified_at` says whether it went.
    let want_holds = usize::from(e.held && f.hold_notified.is_some());
    // A notifier killed after the sink took the hold mail and before it recorded the send:
    // sent, not recorded, and (the operator deciding before the claim expired) not sent
    // again. One such mail is right.
    let sent_unrecorded = e.held
        && f.hold_notified.is_none()
        && holds == 1
        && mails.iter().any(|m| {
            m.file == f.id
                && m.held
                && notifier_kills
                    .iter()
                    .any(|k| *k >= m.at && k.duration_since(m.at) < Duration::from_secs(10))
        });
    if !sent_unrecorded && (holds != want_holds || (f.hold_notified.is_some() && !e.held)) {
        v.push(viol(
            format!("{want_holds} hold mail(s) (held: {})", e.held),
            format!("{holds} (hold notified {:?})", f.hold_notified),
        ));
    }
    if !e.report_mail && f.notify_status != "not_needed" {
        v.push(viol(
            "no report needed".into(),
            format!("notify {}", f.notify_status),
        ));
    }
    let got = match reports.first() {
        Some(m) => m.failed_rows.clone().unwrap_or_default(),
        None => db_failed_rows(conn, f.id),
    };
    if got != e.failed_rows {
        v.push(viol(
            format!("failed rows {:?}", e.failed_rows),
            format!("{got:?}"),
        ));
    }
}

/// The file generator. With `known_defects`, it also writes the inputs of the product
/// defects known on 2026-12-07: a NUL in a UTF-16 header (the file stayed `received` and
/// blocked its tenant), a NUL in a UTF-16 data cell (the report never went out), an
/// `active=0` row followed by an invalid row of the same id in a guard tenant (the guard
/// was bypassed), and (careless tenants) a file replaced while ingest was down after
/// registering it (the tenant blocked).
#[derive(Debug)]
pub struct Gen {
    slug: String,
    settings: Settings,
    careless: bool,
    known_defects: bool,
    /// unique_ids generated so far (strict tenants).
    pool: Vec<String>,
    next_uid: u64,
    version: u64,
}

/// A generated file.
#[derive(Debug)]
pub struct GenFile {
    /// Name.
    pub name: String,
    /// Content.
    pub bytes: Vec<u8>,
    /// Declared byte-level refusal.
    pub refusal: Option<&'static str>,
    /// Some winning row says `active=0`.
    pub deactivates: bool,
    /// Aimed at the guard's threshold.
    pub guard: bool,
}

/// One row's kind of trouble.
#[derive(Debug, Clone, Copy)]
enum Bad {
    MissingUid,
    MissingSource,
    UnknownSource,
    UnknownType,
    InvalidActive,
    InvalidEmail,
    InvalidDate,
    AmbiguousDate,
    TooLong,
    Control,
    FieldCount,
}

impl Gen {
    fn new(t: &TenantRun, known_defects: bool) -> Self {
        Self {
            slug: t.slug.clone(),
            settings: t.settings.clone(),
            careless: t.careless,
            known_defects,
            pool: Vec::new(),
            next_uid: 0,
            version: 0,
        }
    }

    fn new_uid(&mut self) -> String {
        self.next_uid += 1;
        let uid = format!("u{:04}", self.next_uid);
        self.pool.push(uid.clone());
        uid
    }

    fn source(&self, rng: &mut StdRng) -> String {
        let s = &self.settings.login_sources;
        s[rng.gen_range(0..s.len())].clone()
    }

    /// A good row's value of `col` for `uid` (empty sometimes, for an optional column).
    fn value(&self, rng: &mut StdRng, uid: &str, col: &str, active: &str) -> String {
        if col != "unique_id" && col != "login_source" && col != "active" && rng.gen_bool(0.2) {
            return String::new();
        }
        let k = rng.gen_range(0..3);
        match col {
            "unique_id" => uid.to_owned(),
            "login_source" => self.source(rng),
            "first_name" => format!("F{uid}v{k}"),
            "last_name" => format!("L{uid}v{k}"),
            "user_name" => format!("n{uid}v{k}"),
            "email" => format!("{uid}.{k}@{}.example.org", self.slug),
            "city" => ["Brno", "Oslo", "Lima"][k].to_owned(),
            "user_type_id" => self.settings.user_types[k % self.settings.user_types.len()].clone(),
            "date_of_birth" => ["1990-05-17", "1985-12-01", "2001-01-31"][k].to_owned(),
            "active" => active.to_owned(),
            _ => String::new(),
        }
    }

    fn header(&self, rng: &mut StdRng, need_active: bool) -> Vec<String> {
        let mut cols = vec!["unique_id".to_owned(), "login_source".to_owned()];
        // The optional columns: the model's, then `active`.
        for c in model::VALUE_COLUMNS.into_iter().chain(["active"]) {
            if (c == "active" && need_active) || rng.gen_bool(0.6) {
                cols.push(c.to_owned());
            }
        }
        // Columns in any order.
        for i in (1..cols.len()).rev() {
            let j = rng.gen_range(0..=i);
            cols.swap(i, j);
        }
        cols
    }

    fn good_row(
        &self,
        rng: &mut StdRng,
        header: &[String],
        uid: &str,
        active: &str,
    ) -> Vec<String> {
        header
            .iter()
            .map(|c| self.value(rng, uid, c, active))
            .collect()
    }

    /// A row of `uid` with one (sometimes two) problems; its `active` is never `0`.
    fn bad_row(&self, rng: &mut StdRng, header: &[String], uid: &str) -> Vec<String> {
        let active = if rng.gen_bool(0.5) { "1" } else { "" };
        let mut row = self.good_row(rng, header, uid, active);
        let kinds = [
            Bad::MissingUid,
            Bad::MissingSource,
            Bad::UnknownSource,
            Bad::UnknownType,
            Bad::InvalidActive,
            Bad::InvalidEmail,
            Bad::InvalidDate,
            Bad::AmbiguousDate,
            Bad::TooLong,
            Bad::Control,
            Bad::FieldCount,
        ];
        let count = if rng.gen_bool(0.2) { 2 } else { 1 };
        let mut applied = 0;
        let mut tries = 0;
        let mut extra = false;
        while applied < count && tries < 30 {
            tries += 1;
            let kind = kinds[rng.gen_range(0..kinds.len())];
            let set = |row: &mut Vec<String>, col: &str, v: &str| -> bool {
                match header.iter().position(|h| h == col) {
                    Some(i) => {
                        row[i] = v.to_owned();
                        true
                    }
                    None => false,
                }
            };
            let ok = match kind {
                Bad::MissingUid => set(&mut row, "unique_id", ""),
                Bad::MissingSource => set(&mut row, "login_source", ""),
                Bad::UnknownSource => set(&mut row, "login_source", "nowhere"),
                Bad::UnknownType => set(&mut row, "user_type_id", "9"),
                Bad::InvalidActive => set(&mut row, "active", "yes"),
                Bad::InvalidEmail => set(
                    &mut row,
                    "email",
                    ["bob@", "not-an-email"][rng.gen_range(0..2)],
                ),
                Bad::InvalidDate => set(&mut row, "date_of_birth", "2001-02-30"),
                Bad::AmbiguousDate => set(&mut row, "date_of_birth", "03/04/2001"),
                Bad::TooLong => set(&mut row, "first_name", &"x".repeat(101)),
                Bad::Control => set(&mut row, "first_name", "bel\u{7}l"),
                Bad::FieldCount => {
                    // Alone: a row of the wrong width is reported for its width only.
                    row = self.good_row(rng, header, uid, active);
                    extra = true;
                    applied = count;
                    false
                }
            };
            if ok {
                applied += 1;
            }
        }
        if applied == 0 {
            row[header.iter().position(|h| h == "login_source").unwrap_or(0)] = "nowhere".into();
        }
        if extra {
            row.push("extra".into());
        }
        row
    }

    fn render(&self, rng: &mut StdRng, header: &[String], rows: &[Vec<String>]) -> Vec<u8> {
        let mut w = csv::WriterBuilder::new()
            .flexible(true)
            .terminator(if rng.gen_bool(0.5) {
                csv::Terminator::CRLF
            } else {
                csv::Terminator::Any(b'\n')
            })
            .from_writer(Vec::new());
        let head: Vec<String> = header
            .iter()
            .map(|h| {
                if rng.gen_bool(0.2) {
                    h.to_uppercase()
                } else {
                    h.clone()
                }
            })
            .collect();
        w.write_record(&head).expect("csv");
        for r in rows {
            w.write_record(r).expect("csv");
        }
        let mut out = w.into_inner().expect("csv");
        if rng.gen_bool(0.2) {
            let mut bom = vec![0xEF, 0xBB, 0xBF];
            bom.extend(out);
            out = bom;
        }
        out
    }

    /// The first file: `n` new users, all active.
    fn seed_file(&mut self, n: usize) -> (String, Vec<String>) {
        let mut text =
            String::from("unique_id,login_source,first_name,last_name,user_name,email\n");
        let mut uids = Vec::new();
        for _ in 0..n {
            let uid = if self.careless {
                self.version += 1;
                format!("cs{}", self.version)
            } else {
                self.new_uid()
            };
            text.push_str(&format!(
                "{uid},{src},F{uid},L{uid},n{uid},{uid}@{slug}.example.org\n",
                src = self.settings.login_sources[0],
                slug = self.slug
            ));
            uids.push(uid);
        }
        (text, uids)
    }

    /// Rows in groups of one `unique_id`, each group inside one chunk; only a group's
    /// winner may say `active=0`. Returns the rows and whether a winner says `active=0`.
    fn rows(
        &mut self,
        rng: &mut StdRng,
        header: &[String],
        n: usize,
        zero_share: f64,
    ) -> (Vec<Vec<String>>, bool) {
        let has_active = header.iter().any(|h| h == "active");
        let guard_on = self.settings.guard_percent > 0;
        let mut rows: Vec<Vec<String>> = Vec::new();
        let mut used = BTreeSet::new();
        let mut deactivates = false;
        while rows.len() < n {
            let room = CHUNK_ROWS - rows.len() % CHUNK_ROWS;
            let size = rng.gen_range(1..=3).min(room);
            let uid = loop {
                let uid = if !self.pool.is_empty() && rng.gen_bool(0.6) {
                    self.pool[rng.gen_range(0..self.pool.len())].clone()
                } else {
                    self.new_uid()
                };
                if used.insert(uid.clone()) {
                    break uid;
                }
            };
            // Which rows of the group are bad, and which valid one wins.
            let bad: Vec<bool> = (0..size).map(|_| rng.gen_bool(0.3)).collect();
            let winner = (0..size).rev().find(|i| !bad[*i]);
            let last_bad_after_winner = winner.is_some_and(|w| w + 1 < size);
            for (i, is_bad) in bad.iter().enumerate() {
                let row = if *is_bad {
                    self.bad_row(rng, header, &uid)
                } else if Some(i) == winner {
                    let mut zero = has_active && rng.gen_bool(zero_share);
                    // The guard bypass (known defect): a deactivation hidden behind a
                    // refused repeat of its id, in a tenant with the guard on.
                    if zero && last_bad_after_winner && guard_on && !self.known_defects {
                        zero = false;
                    }
                    let active = if zero {
                        "0"
                    } else if has_active && rng.gen_bool(0.5) {
                        "1"
                    } else {
                        ""
                    };
                    deactivates |= zero;
                    self.good_row(rng, header, &uid, active)
                } else {
                    let active = if has_active && rng.gen_bool(0.5) {
                        "1"
                    } else {
                        ""
                    };
                    self.good_row(rng, header, &uid, active)
                };
                rows.push(row);
            }
        }
        (rows, deactivates)
    }

    /// A strict tenant's next file. `active` lists the tenant's active users (for a file
    /// meant to trip the guard).
    fn strict_file(&mut self, rng: &mut StdRng, n: u32, active: Vec<String>) -> GenFile {
        let name = format!("f{n:03}.csv");
        let plain = |name: String, bytes: Vec<u8>, deactivates: bool| GenFile {
            name,
            bytes,
            refusal: None,
            deactivates,
            guard: false,
        };
        let refused = |name: String, bytes: Vec<u8>, code: &'static str| GenFile {
            name,
            bytes,
            refusal: Some(code),
            deactivates: false,
            guard: false,
        };
        let roll = rng.gen_range(0..100);
        let size = rng.gen_range(1..14);
        match roll {
            0..=39 => {
                let header = self.header(rng, false);
                let (rows, z) = self.rows(rng, &header, size, 0.15);
                plain(name, self.render(rng, &header, &rows), z)
            }
            40..=46 => {
                // A dry run: never held, changes nothing.
                let header = self.header(rng, false);
                let (rows, _) = self.rows(rng, &header, size, 0.2);
                let name = if rng.gen_bool(0.5) {
                    format!("f{n:03}.validate.csv")
                } else {
                    format!("F{n:03}.VALIDATE.CSV")
                };
                plain(name, self.render(rng, &header, &rows), false)
            }
            47..=53 => {
                let header = self.header(rng, false);
                let (rows, z) = self.rows(rng, &header, size, 0.1);
                let text = String::from_utf8(self.render(rng, &header, &rows))
                    .expect("ascii")
                    .trim_start_matches('\u{feff}')
                    .to_owned();
                plain(name, utf16le(&text), z)
            }
            54..=63 if self.settings.guard_percent > 0 && !active.is_empty() => {
                self.guard_file(rng, name, &active)
            }
            64..=66 => refused(name, Vec::new(), "empty_file"),
            67..=68 => {
                let h = self.header(rng, false).join(",");
                refused(name, format!("{h}\n").into_bytes(), "header_only")
            }
            69..=70 => refused(
                name,
                b"unique_id,first_name\nx1,Ann\n".to_vec(),
                "missing_required_column",
            ),
            71..=72 => refused(
                name,
                b"unique_id,login_source,email,Email\nx1,sso,a@b.org,c@d.org\n".to_vec(),
                "duplicate_column",
            ),
            73..=74 => refused(
                name,
                include_bytes!("../fixtures/corpus/xlsx_renamed.csv").to_vec(),
                "not_csv",
            ),
            75..=76 => {
                let header = self.header(rng, false);
                let (rows, _) = self.rows(rng, &header, 2, 0.0);
                refused(
                    format!("f{n:03}.txt"),
                    self.render(rng, &header, &rows),
                    "not_csv_name",
                )
            }
            77..=78 => refused(
                name,
                format!(
                    "unique_id,login_source,first_name\nq1,{},\"open\nq2,sso,x\n",
                    self.source(rng)
                )
                .into_bytes(),
                "unclosed_quote",
            ),
            79 => {
                let mut text = String::from("unique_id,login_source,first_name\nl1,sso,");
                text.push_str(&"a".repeat((1 << 20) + 100));
                text.push('\n');
                refused(name, text.into_bytes(), "line_too_long")
            }
            80..=81 => refused(
                name,
                b"unique_id,login_source,first_name\nb1,sso,Ren\xc3\xa9e\nb2,sso,Bj\xf8rn\n"
                    .to_vec(),
                "bad_encoding",
            ),
            82..=84 if self.known_defects => {
                // NUL in a UTF-16 header: refused as malformed, naming the column.
                let text = format!(
                    "unique_id,login_source,first\u{0}name\nz1,{},Ann\n",
                    self.source(rng)
                );
                refused(name, utf16le(&text), "malformed_csv")
            }
            85..=87 if self.known_defects => {
                // NUL in a UTF-16 data cell: a control_character row, reported.
                let uid = self.new_uid();
                let src = self.source(rng);
                let text = format!(
                    "unique_id,login_source,first_name\n{uid},{src},Ok\nz{uid},{src},A\u{0}B\n"
                );
                plain(name, utf16le(&text), false)
            }
            _ => {
                let header = self.header(rng, false);
                let (rows, z) = self.rows(rng, &header, size, 0.0);
                plain(name, self.render(rng, &header, &rows), z)
            }
        }
    }

    /// Deactivates about the guard's threshold of the active users (over it or just
    /// under), with the known defect's pattern (each `active=0` followed by a refused
    /// repeat of its id) sometimes.
    fn guard_file(&mut self, rng: &mut StdRng, name: String, active: &[String]) -> GenFile {
        let pct = i64::from(self.settings.guard_percent);
        let min = i64::from(self.settings.guard_min_users);
        let total = active.len() as i64;
        let threshold = (total * pct / 100).max(min);
        let k = (threshold + rng.gen_range(-1..3)).clamp(1, total) as usize;
        let mut chosen: Vec<String> = active.to_vec();
        for i in (1..chosen.len()).rev() {
            let j = rng.gen_range(0..=i);
            chosen.swap(i, j);
        }
        chosen.truncate(k);
        let hide = self.known_defects && rng.gen_bool(0.4);
        let header: Vec<String> = ["unique_id", "login_source", "first_name", "active"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let mut rows = Vec::new();
        for uid in &chosen {
            if hide && rows.len() % CHUNK_ROWS == CHUNK_ROWS - 1 {
                // Keep the pair inside one chunk.
                let filler = self.new_uid();
                rows.push(self.good_row(rng, &header, &filler, "1"));
            }
            rows.push(vec![
                uid.clone(),
                self.source(rng),
                format!("Gone{uid}"),
                "0".into(),
            ]);
            if hide {
                rows.push(vec![
                    uid.clone(),
                    "nowhere".into(),
                    format!("Bad{uid}"),
                    "1".into(),
                ]);
            }
        }
        GenFile {
            name,
            bytes: self.render(rng, &header, &rows),
            refusal: None,
            deactivates: true,
            guard: true,
        }
    }

    /// A careless tenant's version: users of its own (no repeat, no deactivation).
    fn careless_version(&mut self, rng: &mut StdRng) -> Vec<u8> {
        self.version += 1;
        let v = self.version;
        let header = self.header(rng, false);
        let n = rng.gen_range(2..12);
        let rows: Vec<Vec<String>> = (0..n)
            .map(|i| {
                let uid = format!("c{v}r{i}");
                if rng.gen_bool(0.25) {
                    self.bad_row(rng, &header, &uid)
                } else {
                    let a = if header.iter().any(|h| h == "active") && rng.gen_bool(0.5) {
                        "1"
                    } else {
                        ""
                    };
                    self.good_row(rng, &header, &uid, a)
                }
            })
            .collect();
        self.render(rng, &header, &rows)
    }
}

/// UTF-16LE with BOM.
fn utf16le(text: &str) -> Vec<u8> {
    let mut out = vec![0xFF, 0xFE];
    for u in text.encode_utf16() {
        out.extend_from_slice(&u.to_le_bytes());
    }
    out
}

/// The `mui-service` binary next to this one.
pub fn service_bin_beside_me() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default()
        .join("mui-service")
}
