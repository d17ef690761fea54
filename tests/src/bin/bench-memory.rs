//! `mui-bench-memory`: each service's peak memory against the size of what a tenant sends.
//!
//! The services' memory must be bounded by their configuration, not by a tenant's file
//! (docs/reliability.md, "Memory bounded by configuration"). This runs the release binaries
//! as processes (ingest, W workers, the notifier) and drops one file of `--mb` megabytes
//! (default 150) in which every row fails (an unknown login source): first as a dry run
//! (`users.validate.csv`: the workers keep every chunk's outcome and failures until the file
//! ends, the case that once grew with the file), then as an import (`users.csv`: every row
//! reported, the report's load capped). It waits for each to end and its report to be
//! accepted by the SMTP server, then prints each service's peak resident memory (VmHWM) and
//! the largest against the file's size and against 512 MiB, the limit the deployment gives
//! each service (`deploy/`).
//!
//! Run with `scripts/bench.sh --memory [--mb N]`.

use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use diesel::prelude::*;
use mui_shared::schema::import_files;
use mui_tests::bench::{generate, make_tenant, peak_rss_kib, spawn, summary, Setup};

/// Each service's peak memory for a large file in which every row fails.
#[derive(Debug, Parser)]
#[command(name = "mui-bench-memory")]
struct Args {
    /// Size of the generated file, megabytes (about 200 bytes a row).
    #[arg(long, default_value_t = 150)]
    mb: u64,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Give up on each file after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
}

/// The bound every service is held to, KiB.
const LIMIT_KIB: u64 = 512 * 1024;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let setup = Setup::new("mui_bench_mem")?;
    let mut conn = setup.db.conn();
    let tenant = make_tenant(&mut conn, "bench")?;
    let folder = mui_shared::tenants::drop_folder(&setup.drop_root, "bench");
    std::fs::create_dir_all(&folder)?;

    let rows = args.mb * 1_000_000 / 200;
    let file = setup.drop_root.join(".all-failing.csv");
    eprintln!(
        "generating about {} MB ({rows} rows, every one failing)…",
        args.mb
    );
    generate(&file, rows, 1)?;
    let size = std::fs::metadata(&file)?.len();

    let envs = setup.envs(5000, 2);
    let mut children: Vec<(String, Child)> = Vec::new();
    children.push((
        "mui-notifier".into(),
        spawn(&setup.bin, "mui-notifier", &envs, &setup.logs)?,
    ));
    for i in 0..args.workers {
        let name = format!("mui-worker-{}", i + 1);
        children.push((name.clone(), spawn(&setup.bin, &name, &envs, &setup.logs)?));
    }
    children.push((
        "mui-ingest".into(),
        spawn(&setup.bin, "mui-ingest", &envs, &setup.logs)?,
    ));
    std::thread::sleep(Duration::from_secs(3)); // connect, declare, start watching

    let mut took = Vec::new();
    for (n, name) in ["users.validate.csv", "users.csv"].into_iter().enumerate() {
        eprintln!("{name}: drop folder → … → email…");
        let copy = setup.drop_root.join(format!(".{name}"));
        std::fs::copy(&file, &copy)?;
        let start = Instant::now();
        std::fs::rename(&copy, folder.join(name))?;
        wait_ended(
            &mut conn,
            tenant.id,
            n as i64 + 1,
            &mut children,
            start + Duration::from_secs(args.timeout_secs),
            &setup.logs,
        )?;
        took.push((name, start.elapsed()));
    }
    let peaks: Vec<(String, u64)> = children
        .iter()
        .map(|(n, c)| (n.clone(), peak_rss_kib(c.id()).unwrap_or(0)))
        .collect();
    let mails = setup.smtp.messages();
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    mui_tests::bench::delete_topology(&setup.prefix);

    println!(
        "file: {:.1} MB, {rows} rows, every one failing; {} report mails",
        size as f64 / 1e6,
        mails.len()
    );
    for (name, t) in &took {
        println!("{name}: ended and mailed in {:.1} s", t.as_secs_f64());
    }
    for (name, kib) in &peaks {
        println!("peak memory {name}: {:.1} MiB", *kib as f64 / 1024.0);
    }
    let (worst, kib) = peaks
        .iter()
        .max_by_key(|(_, k)| *k)
        .cloned()
        .unwrap_or_default();
    let of_file = kib as f64 * 1024.0 / size as f64;
    println!(
        "largest: {worst} {:.1} MiB = {of_file:.2} × the file's size, {:.2} × the 512 MiB limit",
        kib as f64 / 1024.0,
        kib as f64 / LIMIT_KIB as f64
    );
    summary(
        &format!("peak memory, {} MB all-failing dry run and import", args.mb),
        &format!("{worst} {:.0} MiB", kib as f64 / 1024.0),
        "≤ 512 MiB per service",
        kib <= LIMIT_KIB,
    );
    if mails.len() != 2 {
        bail!("expected 2 report mails, got {}", mails.len());
    }
    if kib > LIMIT_KIB {
        bail!("{worst} went over 512 MiB");
    }
    Ok(())
}

/// Waits until the tenant's `count` files all ended and were mailed.
fn wait_ended(
    conn: &mut PgConnection,
    tenant_id: i64,
    count: i64,
    children: &mut [(String, Child)],
    deadline: Instant,
    logs: &std::path::Path,
) -> anyhow::Result<()> {
    let mut last_report = Instant::now();
    loop {
        let rows: Vec<(String, String, i32, Option<i32>)> = import_files::table
            .filter(import_files::tenant_id.eq(tenant_id))
            .select((
                import_files::state,
                import_files::notify_status,
                import_files::chunks_done,
                import_files::total_chunks,
            ))
            .load(conn)?;
        let ended = rows
            .iter()
            .filter(|(s, n, _, _)| (s == "done" || s == "failed") && (n == "sent" || n == "held"))
            .count() as i64;
        if ended >= count {
            return Ok(());
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            if let Some((s, n, done, total)) = rows.last() {
                eprintln!(
                    "  {s}/{n}: chunks {done}/{}",
                    total.map_or("?".into(), |t| t.to_string())
                );
            }
            last_report = Instant::now();
        }
        for (name, child) in children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited early ({status}); see {}", logs.display());
            }
        }
        if Instant::now() > deadline {
            bail!("timed out; see {}", logs.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
