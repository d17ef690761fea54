//! `mui-bench-fair`: fair share between tenants, in one run (docs/benchmarks.md).
//!
//! The release binaries run as separate processes (ingest, W workers, notifier) against the
//! machine's PostgreSQL, RabbitMQ and a real SMTP server on loopback. Three measurements:
//!
//! - **(c) cost**: tenant A's N-row file alone, drop → last row committed and mail accepted,
//!   with ingest publishing chunks straight to the broker (`CHUNK_DISPATCH=direct`) and with
//!   the fair dispatcher (`fair`); the ratio of their rows/s.
//! - **(a) latency**: tenant B's 100-row file (one bad row) renamed into its folder 3 s into
//!   A's N-row import; from that rename to B's mail accepted by SMTP, in both modes.
//! - **(b) share**: three tenants' M-row files dropped together (fair); each tenant's rows/s
//!   while all three run (until the first finishes), and the largest deviation from their
//!   mean.
//! - **(d) idle latency**: K 100-row files (half of the rows bad, so a mail is due), each of
//!   a tenant of its own, renamed into place one after another on an idle pipeline; from the
//!   rename to the mail accepted by SMTP: the median and the longest.
//!
//! (c) runs direct, fair, fair, direct, and compares the sums, so that neither mode gets the
//! colder or the fuller database.
//!
//! Run with `scripts/bench.sh --fair [--rows N] [--share-rows M] [--workers W]`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use diesel::prelude::*;
use mui_shared::schema::import_files;
use mui_tests::bench::{delete_topology, generate, make_tenant, spawn, Setup};
use mui_tests::SmtpSink;

/// Measures fair share between tenants: cost, latency for a small file, shares.
#[derive(Debug, Parser)]
#[command(name = "mui-bench-fair")]
struct Args {
    /// Rows of tenant A's large file.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Rows of each of the three files dropped together.
    #[arg(long, default_value_t = 300_000)]
    share_rows: u64,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Chunks each worker imports at once.
    #[arg(long, default_value_t = 2)]
    worker_concurrency: usize,
    /// Rows per chunk.
    #[arg(long, default_value_t = 5000)]
    chunk_rows: usize,
    /// Run only (b), the three tenants' shares.
    #[arg(long)]
    only_shares: bool,
    /// Small files dropped one after another on an idle pipeline for (d).
    #[arg(long, default_value_t = 10)]
    idle_files: usize,
    /// Give up on one import after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
}

/// The running services, and where they drop and log.
struct Pipeline {
    bin: PathBuf,
    envs: Vec<(&'static str, String)>,
    logs: PathBuf,
    ingest: Option<Child>,
    others: Vec<(String, Child)>,
}

impl Pipeline {
    fn start(
        bin: &Path,
        envs: Vec<(&'static str, String)>,
        logs: &Path,
        workers: usize,
    ) -> anyhow::Result<Self> {
        let mut others = vec![(
            "mui-notifier".to_owned(),
            spawn(bin, "mui-notifier", &envs, logs)?,
        )];
        for i in 0..workers {
            let name = format!("mui-worker-{}", i + 1);
            others.push((name.clone(), spawn(bin, &name, &envs, logs)?));
        }
        Ok(Self {
            bin: bin.to_path_buf(),
            envs,
            logs: logs.to_path_buf(),
            ingest: None,
            others,
        })
    }

    /// (Re)starts ingest with `CHUNK_DISPATCH=mode`.
    fn ingest(&mut self, mode: &str) -> anyhow::Result<()> {
        if let Some(mut old) = self.ingest.take() {
            terminate(&mut old);
        }
        let mut envs = self.envs.clone();
        envs.push(("CHUNK_DISPATCH", mode.to_owned()));
        self.ingest = Some(spawn(&self.bin, "mui-ingest", &envs, &self.logs)?);
        std::thread::sleep(Duration::from_secs(3)); // connect, start watching
        Ok(())
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, child) in self.others.iter_mut() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{name} exited early ({status}); see {}",
                    self.logs.display()
                );
            }
        }
        Ok(())
    }

    fn stop(mut self) {
        if let Some(mut i) = self.ingest.take() {
            terminate(&mut i);
        }
        for (_, c) in self.others.iter_mut() {
            terminate(c);
        }
    }
}

fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}

/// (state, notify status, rows handled) of a tenant's newest file.
fn progress(conn: &mut PgConnection, tenant: i64) -> anyhow::Result<Option<(String, String, i64)>> {
    Ok(import_files::table
        .filter(import_files::tenant_id.eq(tenant))
        .order(import_files::id.desc())
        .select((
            import_files::state,
            import_files::notify_status,
            import_files::rows_inserted
                + import_files::rows_updated
                + import_files::rows_unchanged
                + import_files::rows_failed,
        ))
        .first(conn)
        .optional()?)
}

fn settled(p: &Option<(String, String, i64)>) -> bool {
    matches!(p, Some((s, n, _)) if s == "done" && (n == "sent" || n == "not_needed"))
}

/// Renames `file` into `slug`'s drop folder (an upload completing) and returns when.
fn drop_into(drop_root: &Path, slug: &str, file: &Path) -> anyhow::Result<Instant> {
    let dir = mui_shared::tenants::drop_folder(drop_root, slug);
    std::fs::create_dir_all(&dir)?;
    let at = Instant::now();
    std::fs::rename(file, dir.join("users.csv"))?;
    Ok(at)
}

/// Waits until every tenant's newest file is done and mailed.
fn wait_all(
    conn: &mut PgConnection,
    p: &mut Pipeline,
    tenants: &[i64],
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut all = true;
        for &t in tenants {
            let s = progress(conn, t)?;
            if matches!(&s, Some((st, _, _)) if st == "failed") {
                bail!("a file failed; see {}", p.logs.display());
            }
            all &= settled(&s);
        }
        if all {
            return Ok(());
        }
        p.check_alive()?;
        if Instant::now() > deadline {
            bail!("timed out; see {}", p.logs.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (c): A's file alone; seconds from drop to settled.
fn alone(
    conn: &mut PgConnection,
    p: &mut Pipeline,
    drop_root: &Path,
    work: &Path,
    slug: &str,
    rows: u64,
    timeout: Duration,
) -> anyhow::Result<f64> {
    let t = make_tenant(conn, slug)?;
    let file = work.join(format!(".{slug}.csv"));
    generate(&file, rows, 1000)?;
    diesel::sql_query("CHECKPOINT").execute(conn)?;
    let start = drop_into(drop_root, slug, &file)?;
    wait_all(conn, p, &[t.id], timeout)?;
    Ok(start.elapsed().as_secs_f64())
}

/// A tenant whose reports go to an address of its own (returned), so that its mail can be
/// told from the others'.
fn tenant_mailed_alone(
    conn: &mut PgConnection,
    slug: &str,
) -> anyhow::Result<(mui_shared::tenants::Tenant, String)> {
    let t = make_tenant(conn, slug)?;
    let to = format!("{slug}@bench.example.edu");
    let t = mui_shared::tenants::update(
        conn,
        t.tenant_id(),
        &mui_shared::tenants::SettingsChange {
            failed_import_emails: Some(vec![to.clone()]),
            ..Default::default()
        },
    )?;
    Ok((t, to))
}

/// (a): B's small file 3 s into A's large one; seconds from B's drop to B's mail.
#[allow(clippy::too_many_arguments)]
fn latency(
    conn: &mut PgConnection,
    p: &mut Pipeline,
    smtp: &SmtpSink,
    drop_root: &Path,
    work: &Path,
    tag: &str,
    rows: u64,
    timeout: Duration,
) -> anyhow::Result<f64> {
    let (a_slug, b_slug) = (format!("big-{tag}"), format!("small-{tag}"));
    let a = make_tenant(conn, &a_slug)?;
    let (b, to) = tenant_mailed_alone(conn, &b_slug)?;
    let big = work.join(format!(".{a_slug}.csv"));
    let small = work.join(format!(".{b_slug}.csv"));
    generate(&big, rows, 1000)?;
    generate(&small, 100, 50)?;
    diesel::sql_query("CHECKPOINT").execute(conn)?;
    drop_into(drop_root, &a_slug, &big)?;
    std::thread::sleep(Duration::from_secs(3));
    let b_start = drop_into(drop_root, &b_slug, &small)?;
    let deadline = b_start + timeout;
    let took = loop {
        if !smtp.messages_to(&to).is_empty() {
            break b_start.elapsed().as_secs_f64();
        }
        p.check_alive()?;
        if Instant::now() > deadline {
            bail!(
                "timed out waiting for {b_slug}'s mail; see {}",
                p.logs.display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    wait_all(conn, p, &[a.id, b.id], timeout)?;
    Ok(took)
}

/// (d): `count` 100-row files, one after another on an idle pipeline; seconds from each
/// rename to its mail, sorted.
fn idle_latency(
    conn: &mut PgConnection,
    p: &mut Pipeline,
    smtp: &SmtpSink,
    drop_root: &Path,
    work: &Path,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<f64>> {
    let mut took = Vec::with_capacity(count);
    for i in 0..count {
        let slug = format!("idle-{i}");
        let (t, to) = tenant_mailed_alone(conn, &slug)?;
        let file = work.join(format!(".{slug}.csv"));
        generate(&file, 100, 2)?;
        std::thread::sleep(Duration::from_millis(300)); // idle: nothing else in flight
        let start = drop_into(drop_root, &slug, &file)?;
        let deadline = start + timeout;
        loop {
            if !smtp.messages_to(&to).is_empty() {
                took.push(start.elapsed().as_secs_f64());
                break;
            }
            p.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "timed out waiting for {slug}'s mail; see {}",
                    p.logs.display()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        wait_all(conn, p, &[t.id], timeout)?;
    }
    took.sort_by(f64::total_cmp);
    Ok(took)
}

/// (b): three files dropped together; each tenant's rows/s while all three run.
fn share(
    conn: &mut PgConnection,
    p: &mut Pipeline,
    drop_root: &Path,
    work: &Path,
    rows: u64,
    timeout: Duration,
) -> anyhow::Result<Vec<f64>> {
    let mut ids = Vec::new();
    let mut files = Vec::new();
    for i in 1..=3 {
        let slug = format!("share-{i}");
        ids.push(make_tenant(conn, &slug)?.id);
        let f = work.join(format!(".{slug}.csv"));
        generate(&f, rows, 1000)?;
        files.push((slug, f));
    }
    diesel::sql_query("CHECKPOINT").execute(conn)?;
    let start = Instant::now();
    for (slug, f) in &files {
        drop_into(drop_root, slug, f)?;
    }
    // From the moment every tenant has rows imported (ingest reads and checks each file
    // first, the three at once on this machine's two cores) until the first finishes: the
    // rows each tenant got in between.
    let deadline = start + timeout;
    let mut all_started: Option<(Instant, Vec<i64>)> = None;
    let (at, done) = loop {
        let mut rows_now = Vec::new();
        let mut any_done = false;
        for &t in &ids {
            let s = progress(conn, t)?;
            any_done |= matches!(&s, Some((st, _, _)) if st == "done");
            rows_now.push(s.map_or(0, |(_, _, r)| r));
        }
        if all_started.is_none() && rows_now.iter().all(|&r| r > 0) {
            all_started = Some((Instant::now(), rows_now.clone()));
        }
        if any_done {
            let (since, base) = all_started.unwrap_or((start, vec![0; ids.len()]));
            let got: Vec<i64> = rows_now.iter().zip(&base).map(|(n, b)| n - b).collect();
            break (since.elapsed().as_secs_f64(), got);
        }
        p.check_alive()?;
        if Instant::now() > deadline {
            bail!("timed out; see {}", p.logs.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    wait_all(conn, p, &ids, timeout)?;
    Ok(done.into_iter().map(|r| r as f64 / at).collect())
}

fn print_shares(rows: u64, shares: &[f64]) {
    let mean = shares.iter().sum::<f64>() / shares.len() as f64;
    let worst = shares
        .iter()
        .map(|s| (s / mean - 1.0).abs())
        .fold(0.0, f64::max);
    println!(
        "(b) three × {} rows, rows/s while all run: {}   largest deviation from the mean {:.1}%",
        rows,
        shares
            .iter()
            .map(|s| format!("{s:.0}"))
            .collect::<Vec<_>>()
            .join(" / "),
        worst * 100.0
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let setup = Setup::new("mui_bench_fair")?;
    let (bin, db, prefix, smtp) = (&setup.bin, &setup.db, &setup.prefix, &setup.smtp);
    let (drop_root, logs, work) = (&setup.drop_root, &setup.logs, &setup.work);
    std::fs::create_dir_all(drop_root)?;
    let timeout = Duration::from_secs(args.timeout_secs);
    let mut conn = db.conn();
    let envs = setup.envs(args.chunk_rows, args.worker_concurrency);
    let mut p = Pipeline::start(bin, envs, logs, args.workers)?;
    let result = (|| -> anyhow::Result<()> {
        if args.only_shares {
            p.ingest("fair")?;
            let shares = share(
                &mut conn,
                &mut p,
                drop_root,
                work.path(),
                args.share_rows,
                timeout,
            )?;
            print_shares(args.share_rows, &shares);
            return Ok(());
        }
        let (mut direct, mut fair) = (0.0, 0.0);
        for (round, mode) in ["direct", "fair", "fair", "direct"].into_iter().enumerate() {
            eprintln!("(c) {} rows alone, {mode}…", args.rows);
            p.ingest(mode)?;
            let took = alone(
                &mut conn,
                &mut p,
                drop_root,
                work.path(),
                &format!("alone-{mode}-{round}"),
                args.rows,
                timeout,
            )?;
            if mode == "fair" {
                fair += took / 2.0;
            } else {
                direct += took / 2.0;
            }
        }
        p.ingest("fair")?;
        eprintln!(
            "(d) {} small files on an idle pipeline, fair…",
            args.idle_files
        );
        let idle = idle_latency(
            &mut conn,
            &mut p,
            smtp,
            drop_root,
            work.path(),
            args.idle_files.max(1),
            timeout,
        )?;
        eprintln!("(a) 100 rows 3 s into {} rows, fair…", args.rows);
        let lat_fair = latency(
            &mut conn,
            &mut p,
            smtp,
            drop_root,
            work.path(),
            "fair",
            args.rows,
            timeout,
        )?;
        eprintln!("(b) three × {} rows together, fair…", args.share_rows);
        let shares = share(
            &mut conn,
            &mut p,
            drop_root,
            work.path(),
            args.share_rows,
            timeout,
        )?;
        eprintln!("(a) 100 rows 3 s into {} rows, direct…", args.rows);
        p.ingest("direct")?;
        let lat_direct = latency(
            &mut conn,
            &mut p,
            smtp,
            drop_root,
            work.path(),
            "direct",
            args.rows,
            timeout,
        )?;

        let rows = args.rows as f64;
        println!(
            "workers: {} × {}, {} rows a chunk",
            args.workers, args.worker_concurrency, args.chunk_rows
        );
        println!(
            "(c) {} rows alone (mean of two runs each):   direct {:>8.0} rows/s   fair {:>8.0} rows/s   ratio fair/direct {:.3}",
            args.rows,
            rows / direct,
            rows / fair,
            direct / fair
        );
        println!(
            "(a) 100-row file 3 s into {} rows, drop → mail:   fair {:.2} s   direct {:.2} s",
            args.rows, lat_fair, lat_direct
        );
        print_shares(args.share_rows, &shares);
        let summary = mui_tests::bench::summary;
        summary(
            &format!("(c) {} rows alone, fair dispatch vs direct", args.rows),
            &format!("{:.3}", direct / fair),
            "≥ 0.95",
            direct / fair >= 0.95,
        );
        summary(
            &format!("(a) 100-row file 3 s into {} rows, drop → mail", args.rows),
            &format!("{lat_fair:.2} s (direct {lat_direct:.2} s)"),
            "≤ 1.5 s",
            lat_fair <= 1.5,
        );
        let mean = shares.iter().sum::<f64>() / shares.len() as f64;
        let worst = shares
            .iter()
            .map(|s| (s / mean - 1.0).abs())
            .fold(0.0, f64::max);
        summary(
            &format!(
                "(b) three × {} rows at once, largest deviation from the mean share",
                args.share_rows
            ),
            &format!("{:.1} %", worst * 100.0),
            "≤ 20 %",
            worst <= 0.2,
        );
        let (p50, max) = (idle[idle.len() / 2], idle[idle.len() - 1]);
        summary(
            "(d) 100-row file on an idle pipeline, drop → mail",
            &format!("p50 {p50:.2} s, max {max:.2} s"),
            "p50 ≤ 1 s, max ≤ 2 s",
            p50 <= 1.0 && max <= 2.0,
        );
        println!(
            "(d) 100-row file on an idle pipeline, drop → mail, {} files:   p50 {:.2} s   max {:.2} s",
            idle.len(),
            idle[idle.len() / 2],
            idle[idle.len() - 1]
        );
        Ok(())
    })();
    p.stop();
    delete_topology(prefix);
    result
}
