//! What the benchmark binaries share: the generated users file, tenants, and service
//! processes.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::Context;
use diesel::prelude::*;
use mui_shared::domain::TenantSlug;
use mui_shared::tenants;
use rand::{Rng, SeedableRng};

/// The generated file's columns.
pub const COLUMNS: &[&str] = &[
    "unique_id",
    "login_source",
    "first_name",
    "last_name",
    "user_name",
    "email",
    "street",
    "city",
    "province",
    "postal_code",
    "phone_cell",
    "user_type_id",
    "employ_no",
    "employee_phone",
    "student_no",
    "date_of_birth",
    "active",
];

const FIRST: &[&str] = &[
    "Amélie", "Bjørn", "Carlos", "Dana", "Élodie", "Farah", "Günther", "Hiro", "Ines", "José",
    "Kwame", "Léa", "Mateo", "Nadia", "Olivier", "Priya",
];
const LAST: &[&str] = &[
    "Tremblay",
    "Gagnon",
    "Roy",
    "Côté",
    "Bouchard",
    "Gauthier",
    "Morin",
    "Lavoie",
    "Fortin",
    "Gagné",
    "Ouellet",
    "Pelletier",
    "Bélanger",
    "Lévesque",
    "Bergeron",
    "Leblanc",
];
const CITY: &[&str] = &[
    "Montréal",
    "Québec",
    "Ottawa",
    "Toronto",
    "Sherbrooke",
    "Gatineau",
    "Laval",
    "Kingston",
];
const STREET: &[&str] = &[
    "Maple Street",
    "Rue Saint-Denis",
    "King Street West",
    "Boulevard René-Lévesque",
    "Elm Avenue",
    "Chemin du Lac",
];

/// Writes an N-row users file (realistic values, about 200 bytes a row) where every
/// `bad_every`-th row has an unknown login source; returns how many rows are bad.
pub fn generate(path: &Path, rows: u64, bad_every: u64) -> anyhow::Result<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    writeln!(w, "{}", COLUMNS.join(","))?;
    let mut bad = 0;
    for i in 0..rows {
        let first = FIRST[rng.gen_range(0..FIRST.len())];
        let last = LAST[rng.gen_range(0..LAST.len())];
        let login = if i % bad_every == bad_every - 1 {
            bad += 1;
            "retired-sso"
        } else {
            "sso"
        };
        writeln!(
            w,
            "U{i:09},{login},{first},{last},{}{}{i},{}.{}.{i}@staff.example.edu,\"{} {}\",{},QC,H{}X {}Y{},+1-514-555-{:04},{},E{:07},+1-438-555-{:04} x{},S{:07},{}-{:02}-{:02},1",
            first.chars().next().unwrap_or('x').to_lowercase(),
            last.to_lowercase(),
            first.to_lowercase(),
            last.to_lowercase(),
            rng.gen_range(1..9999),
            STREET[rng.gen_range(0..STREET.len())],
            CITY[rng.gen_range(0..CITY.len())],
            rng.gen_range(1..9),
            rng.gen_range(1..9),
            rng.gen_range(1..9),
            rng.gen_range(0..10000),
            rng.gen_range(1..3),
            rng.gen_range(0..9_999_999),
            rng.gen_range(0..10000),
            rng.gen_range(100..999),
            rng.gen_range(0..9_999_999),
            rng.gen_range(1950..2005),
            rng.gen_range(1..13),
            rng.gen_range(1..29),
        )?;
    }
    w.flush()?;
    Ok(bad)
}

/// Starts a release binary from `bin` with `envs`, logging to `<log_dir>/<name>.log`
/// (`mui-worker-N` runs `mui-worker`).
pub fn spawn(
    bin: &Path,
    name: &str,
    envs: &[(&str, String)],
    log_dir: &Path,
) -> anyhow::Result<Child> {
    let log = std::fs::File::create(log_dir.join(format!("{name}.log")))?;
    Command::new(bin.join(if name.starts_with("mui-worker") {
        "mui-worker"
    } else {
        name
    }))
    .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
    .env("RUST_LOG", "warn")
    .stdout(Stdio::from(log.try_clone()?))
    .stderr(Stdio::from(log))
    .spawn()
    .with_context(|| format!("starting {name} (scripts/bench.sh builds them: `cargo build --release -p mui-ingest -p mui-worker -p mui-notifier`)"))
}

/// A process's peak resident memory (VmHWM), KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A tenant with mail settings, login source `sso` and user types 1 and 2.
pub fn make_tenant(conn: &mut PgConnection, slug: &str) -> anyhow::Result<tenants::Tenant> {
    let t = tenants::create(conn, &TenantSlug::parse(slug)?, slug)?;
    tenants::update(
        conn,
        t.tenant_id(),
        &tenants::SettingsChange {
            reply_to_email: Some(Some("admin@bench.example.edu".into())),
            failed_import_emails: Some(vec!["it@bench.example.edu".into()]),
            ..Default::default()
        },
    )?;
    tenants::add_login_source(conn, t.tenant_id(), "sso")?;
    tenants::add_user_type(conn, t.tenant_id(), "1", "Staff")?;
    tenants::add_user_type(conn, t.tenant_id(), "2", "Student")?;
    Ok(t)
}

/// Deletes a queue prefix's topology from the broker (best effort).
pub fn delete_topology(prefix: &str) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(async {
        if let Ok(c) =
            lapin::Connection::connect(&crate::amqp_url(), lapin::ConnectionProperties::default())
                .await
        {
            if let Ok(ch) = c.create_channel().await {
                let _ = mui_shared::amqp::Topology::new(prefix).delete(&ch).await;
                let _ = ch.close(200, "bye".into()).await;
            }
            let _ = c.close(200, "bye".into()).await;
        }
    });
}

/// What every benchmark run starts from: the release binaries' folder, a scratch folder, a
/// database of its own, a queue prefix, an SMTP server on loopback, the drop root and the
/// logs folder.
#[derive(Debug)]
pub struct Setup {
    /// The folder holding this binary and the services'.
    pub bin: std::path::PathBuf,
    /// Scratch space (removed on drop).
    pub work: tempfile::TempDir,
    /// The benchmark's database.
    pub db: crate::TestDb,
    /// Its queue prefix.
    pub prefix: String,
    /// The SMTP server the notifier sends to.
    pub smtp: crate::SmtpSink,
    /// `DROP_ROOT`.
    pub drop_root: std::path::PathBuf,
    /// Where each service logs.
    pub logs: std::path::PathBuf,
}

impl Setup {
    /// Creates everything; `name` starts the queue prefix.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let bin = std::env::current_exe()?
            .parent()
            .context("binary folder")?
            .to_path_buf();
        let work = tempfile::tempdir()?;
        let drop_root = work.path().join("drop");
        let logs = work.path().join("logs");
        std::fs::create_dir_all(&logs)?;
        std::fs::create_dir_all(&drop_root)?;
        Ok(Self {
            bin,
            db: crate::TestDb::new()?,
            prefix: format!("{name}_{}", std::process::id()),
            smtp: crate::SmtpSink::start()?,
            work,
            drop_root,
            logs,
        })
    }

    /// The services' environment.
    pub fn envs(
        &self,
        chunk_rows: usize,
        worker_concurrency: usize,
    ) -> Vec<(&'static str, String)> {
        vec![
            ("DATABASE_URL", self.db.url.clone()),
            ("AMQP_URL", crate::amqp_url()),
            ("MUI_QUEUE_PREFIX", self.prefix.clone()),
            ("DROP_ROOT", self.drop_root.display().to_string()),
            ("SMTP_URL", self.smtp.url()),
            ("INGEST_SETTLE_MS", "200".into()),
            ("INGEST_RESCAN_SECS", "1".into()),
            ("CHUNK_ROWS", chunk_rows.to_string()),
            ("WORKER_CONCURRENCY", worker_concurrency.to_string()),
        ]
    }
}

/// Adds one line to the table `scripts/bench.sh` prints at the end of a run (the file named
/// by `MUI_BENCH_SUMMARY`; nothing when it is unset): the measure, what was measured, the
/// goal, and whether it is met.
pub fn summary(measure: &str, value: &str, goal: &str, met: bool) {
    let Some(path) = std::env::var_os("MUI_BENCH_SUMMARY") else {
        return;
    };
    let line = format!(
        "{measure}\t{value}\t{goal}\t{}\n",
        if met { "met" } else { "NOT met" }
    );
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!(
            "cannot write the summary to {}: {e}",
            Path::new(&path).display()
        );
    }
}
