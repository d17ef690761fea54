//! `mui-bench`: the pipeline against PostgreSQL's own bulk path, in one run.
//!
//! 1. Generates an N-row users file (realistic values, about 200 bytes a row; one row in a
//!    thousand has an unknown login source so that a failure email is due).
//! 2. Baseline: the same file loaded by `COPY` into a staging table and one
//!    `INSERT … SELECT … ON CONFLICT (tenant_id, unique_id) DO UPDATE` into the users table
//!    (for a tenant of its own), in one transaction.
//! 3. Pipeline: the release binaries `mui-ingest`, `mui-worker` (×W) and `mui-notifier` run as
//!    separate processes; the file is renamed into the tenant's drop folder and the clock
//!    stops when the last row is committed and the email was accepted by the SMTP server.
//! 4. Prints rows/s of both, their ratio, each service's peak resident memory (VmHWM) and
//!    CPU time, how busy the machine's CPUs were during the pipeline run, and the most
//!    database connections the services held at once.
//! 5. Onboarding (`--onboarding-rows S,L`, default 50,000 and 200,000; 0 skips it): two new
//!    tenants each send a 10-row test file, then `ANALYZE users` (as autovacuum would after
//!    it), then their real export of S and L rows; the ratio of the two imports' times, which
//!    is L/S (4 for the defaults) when a chunk's cost does not grow with the tenant.
//!
//! 6. Re-import (`--reimport true`, the default): the same file again, unchanged; the
//!    baseline's upsert skips rows whose values are all the same (`WHERE (stored) IS DISTINCT
//!    FROM (new)`), the pipeline counts them unchanged; the ratio of their times.
//!
//! Run with `scripts/bench.sh [--rows N] [--workers W]`.
//!
//! (Over 400 lines: the generator, the pipeline run and the baseline must run on the same
//! data in the same process to give ratios of one run.)

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use mui_shared::schema::import_files;
use mui_tests::bench::{generate, make_tenant, peak_rss_kib, spawn, Setup, COLUMNS};

/// Measures the import pipeline against PostgreSQL's COPY + INSERT … ON CONFLICT baseline.
#[derive(Debug, Parser)]
#[command(name = "mui-bench")]
struct Args {
    /// Rows in the generated file.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Chunks each worker imports at once.
    #[arg(long, default_value_t = 2)]
    worker_concurrency: usize,
    /// Rows per chunk.
    #[arg(long, default_value_t = 5000)]
    chunk_rows: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// Import the same file again, unchanged, and compare with a baseline that skips
    /// unchanged rows.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    reimport: bool,
    /// The onboarding scenario's two first imports (rows, small and large); 0 skips it.
    #[arg(long, value_delimiter = ',', default_values_t = [50_000u64, 200_000])]
    onboarding_rows: Vec<u64>,
    /// Tracing on: the services export their spans (one trace per file) over OTLP/HTTP to
    /// a receiver in this process, as to a collector. Compare with a run without it for
    /// the cost of tracing.
    #[arg(long)]
    otel: bool,
    /// Print the statements of the pipeline run and of the re-import, slowest first, from
    /// `pg_stat_statements` (the server must load it: `shared_preload_libraries =
    /// 'pg_stat_statements'`, then a restart). Resets the server's statement statistics,
    /// every database's, before each.
    #[arg(long)]
    statements: bool,
}

/// One line of the per-statement profile.
#[derive(QueryableByName)]
struct StatementTime {
    #[diesel(sql_type = diesel::sql_types::Double)]
    ms: f64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    calls: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    rows: i64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    wal_mb: f64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    query: String,
}

/// Starts the statement statistics afresh; false (and says why) when the server has none.
#[derive(diesel::QueryableByName)]
struct Secs {
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
    secs: Option<f64>,
}

fn reset_statements(conn: &mut PgConnection) -> bool {
    let ready = conn
        .batch_execute(
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset();",
        )
        .map_err(|e| {
            eprintln!(
                "--statements: no statement statistics ({e}); set shared_preload_libraries = 'pg_stat_statements' and restart PostgreSQL"
            )
        });
    ready.is_ok()
}

/// The statements this database ran since [`reset_statements`], by their total time
/// (summed over sessions running at once, so more than the wall-clock time).
fn print_statements(conn: &mut PgConnection, run: &str) -> anyhow::Result<()> {
    let top: Vec<StatementTime> = diesel::sql_query(
        "SELECT sum(total_exec_time) AS ms, sum(calls)::bigint AS calls, sum(rows)::bigint AS rows, \
           (sum(wal_bytes) / 1e6)::float8 AS wal_mb, \
           left(regexp_replace(query, '\\s+', ' ', 'g'), 72) AS query \
         FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         GROUP BY 5 ORDER BY 1 DESC",
    )
    .load(conn)?;
    let (ms, calls) = top
        .iter()
        .fold((0.0, 0), |(ms, calls), t| (ms + t.ms, calls + t.calls));
    println!(
        "statements of {run} (pg_stat_statements, time summed over sessions): {ms:.0} ms in {calls} calls"
    );
    println!(
        "{:>10} {:>7} {:>9} {:>8}  statement",
        "ms", "calls", "rows", "WAL MB"
    );
    for t in top.into_iter().take(20) {
        println!(
            "{:>10.0} {:>7} {:>9} {:>8.0}  {}",
            t.ms, t.calls, t.rows, t.wal_mb, t.query
        );
    }
    Ok(())
}

/// Waits until `tenant` has `files` files done and mailed (or needing no mail).
fn wait_files(
    conn: &mut PgConnection,
    tenant: i64,
    files: i64,
    children: &mut [(String, Child)],
    deadline: Instant,
    logs: &Path,
) -> anyhow::Result<()> {
    loop {
        let states: Vec<(String, String)> = import_files::table
            .filter(import_files::tenant_id.eq(tenant))
            .select((import_files::state, import_files::notify_status))
            .load(conn)?;
        if states.iter().any(|(s, _)| s == "failed") {
            bail!("a file failed: see {}", logs.display());
        }
        let done = states
            .iter()
            .filter(|(s, n)| s == "done" && (n == "sent" || n == "not_needed"))
            .count() as i64;
        if done >= files {
            return Ok(());
        }
        for (name, child) in children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited early ({status}); see {}", logs.display());
            }
        }
        if Instant::now() > deadline {
            bail!("timed out; see {}", logs.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The onboarding scenario for one new tenant: a 10-row test file, `ANALYZE users`, then a
/// `rows`-row export; seconds the export took, drop → settled.
fn onboard(
    conn: &mut PgConnection,
    setup: &Setup,
    slug: &str,
    rows: u64,
    children: &mut [(String, Child)],
    deadline: Instant,
) -> anyhow::Result<f64> {
    let t = make_tenant(conn, slug)?;
    let folder = mui_shared::tenants::drop_folder(&setup.drop_root, slug);
    std::fs::create_dir_all(&folder)?;
    let first = setup.drop_root.join(format!(".{slug}-first.csv"));
    generate(&first, 10, 1000)?;
    std::fs::rename(&first, folder.join("first.csv"))?;
    wait_files(conn, t.id, 1, children, deadline, &setup.logs)?;
    diesel::sql_query("ANALYZE users").execute(conn)?;
    let export = setup.drop_root.join(format!(".{slug}-export.csv"));
    generate(&export, rows, 1000)?;
    diesel::sql_query("CHECKPOINT").execute(conn)?;
    let start = Instant::now();
    std::fs::rename(&export, folder.join("export.csv"))?;
    wait_files(conn, t.id, 2, children, deadline, &setup.logs)?;
    Ok(start.elapsed().as_secs_f64())
}

diesel::table! {
    /// The baseline's staging table: the generated file's columns, as text.
    bench_stage (unique_id) {
        unique_id -> Text,
        login_source -> Text,
        first_name -> Text,
        last_name -> Text,
        user_name -> Text,
        email -> Text,
        street -> Text,
        city -> Text,
        province -> Text,
        postal_code -> Text,
        phone_cell -> Text,
        user_type_id -> Text,
        employ_no -> Text,
        employee_phone -> Text,
        student_no -> Text,
        date_of_birth -> Text,
        active -> Text,
    }
}

/// `skip_unchanged`: the upsert leaves alone the rows whose values are all the same
/// (`… DO UPDATE … WHERE (stored) IS DISTINCT FROM (new)`), as a re-import's baseline.
fn baseline(
    url: &str,
    tenant_id: i64,
    file: &Path,
    skip_unchanged: bool,
) -> anyhow::Result<Duration> {
    Ok(baseline_with_cpu(url, tenant_id, file, skip_unchanged)?.0)
}

/// [`baseline`], and the CPU seconds its PostgreSQL backend used (a connection of its own).
fn baseline_with_cpu(
    url: &str,
    tenant_id: i64,
    file: &Path,
    skip_unchanged: bool,
) -> anyhow::Result<(Duration, Option<f64>)> {
    #[derive(QueryableByName)]
    struct Pid {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        pid: i32,
    }
    let mut conn = PgConnection::establish(url)?;
    let backend = diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result::<Pid>(&mut conn)?
        .pid as u32;
    let text_cols: Vec<String> = COLUMNS.iter().map(|c| format!("{c} TEXT")).collect();
    let select: Vec<String> = COLUMNS
        .iter()
        .map(|c| match *c {
            "date_of_birth" => "NULLIF(date_of_birth, '')::date".to_owned(),
            "active" => "(active = '1')".to_owned(),
            c => c.to_owned(),
        })
        .collect();
    let updates: Vec<String> = COLUMNS
        .iter()
        .skip(1)
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect();
    let only_changed = if skip_unchanged {
        let stored: Vec<String> = COLUMNS[1..].iter().map(|c| format!("users.{c}")).collect();
        let new: Vec<String> = COLUMNS[1..]
            .iter()
            .map(|c| format!("EXCLUDED.{c}"))
            .collect();
        format!(
            " WHERE ({}) IS DISTINCT FROM ({})",
            stored.join(", "),
            new.join(", ")
        )
    } else {
        String::new()
    };
    let start = Instant::now();
    conn.transaction(|conn| {
        diesel::sql_query(format!(
            "CREATE TEMP TABLE bench_stage ({}) ON COMMIT DROP",
            text_cols.join(", ")
        ))
        .execute(conn)?;
        // COPY the file as it is (CSV with header), streamed through COPY FROM STDIN.
        diesel::copy_from(bench_stage::table)
            .from_raw_data(bench_stage::table, |w: &mut dyn Write| {
                let io = |e: std::io::Error| diesel::result::Error::QueryBuilderError(Box::new(e));
                let mut f = std::fs::File::open(file).map_err(io)?;
                std::io::copy(&mut f, w).map(|_| ()).map_err(io)
            })
            .with_format(diesel::pg::CopyFormat::Csv)
            .with_header(diesel::pg::CopyHeader::Set(true))
            .execute(conn)?;
        diesel::sql_query(format!(
            "INSERT INTO users (tenant_id, {cols}, last_file_id, last_row) \
             SELECT {tenant_id}, {sel}, 0, 0 FROM bench_stage \
             ON CONFLICT (tenant_id, unique_id) DO UPDATE SET {upd}{only_changed}",
            cols = COLUMNS.join(", "),
            sel = select.join(", "),
            upd = updates.join(", ")
        ))
        .execute(conn)?;
        Ok::<_, diesel::result::Error>(())
    })?;
    Ok((start.elapsed(), cpu_secs(backend)))
}

/// CPU time a process (all its threads) has used so far: user + system time from
/// `/proc/<pid>/stat`, in clock ticks of 1/100 s (Linux's USER_HZ).
fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses: state is the
    // 3rd field of the line, utime the 14th and stime the 15th.
    let rest = s.get(s.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// CPU time used so far by every process whose command is `comm` (`postgres`: the server
/// and all its backends, idle ones included), as [`cpu_secs`] counts it.
fn command_cpu_secs(comm: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == comm)
        })
        .filter_map(cpu_secs)
        .sum()
}

/// The machine's CPU counters (`/proc/stat`, all CPUs): (busy, total) in clock ticks.
fn machine_ticks() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is counted in user already).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// Connections to the benchmark's database other than this one.
fn db_connections(conn: &mut PgConnection) -> i64 {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    diesel::sql_query(
        "SELECT count(*) AS n FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .get_result::<Count>(conn)
    .map_or(0, |c| c.n)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let setup = Setup::new("mui_bench")?;
    let (bin, db, prefix, smtp) = (&setup.bin, &setup.db, &setup.prefix, &setup.smtp);
    let (drop_root, logs) = (&setup.drop_root, &setup.logs);

    let mut conn = db.conn();
    let base_tenant = make_tenant(&mut conn, "baseline")?;
    let tenant = make_tenant(&mut conn, "bench")?;
    std::fs::create_dir_all(mui_shared::tenants::drop_folder(drop_root, "bench"))?;

    let file = drop_root.join(".users.csv");
    eprintln!("generating {} rows…", args.rows);
    let bad = generate(&file, args.rows, 1000)?;
    let size = std::fs::metadata(&file)?.len();
    eprintln!(
        "{} bytes ({:.0} bytes a row), {bad} bad rows",
        size,
        size as f64 / args.rows as f64
    );

    eprintln!("baseline: COPY + INSERT … ON CONFLICT…");
    let base = baseline(&db.url, base_tenant.id, &file, false)?;
    diesel::sql_query("CHECKPOINT").execute(&mut conn)?;

    let mut envs = setup.envs(args.chunk_rows, args.worker_concurrency);
    // The OTLP receiver runs on a runtime of its own for the whole run.
    let otel = if args.otel {
        let rt = tokio::runtime::Runtime::new()?;
        let sink = rt.block_on(mui_tests::otlp::OtlpSink::start_with(false))?;
        envs.push(("OTEL_EXPORTER_OTLP_ENDPOINT", sink.endpoint()));
        Some((rt, sink))
    } else {
        None
    };
    let mut children: Vec<(String, Child)> = Vec::new();
    children.push((
        "mui-notifier".into(),
        spawn(bin, "mui-notifier", &envs, logs)?,
    ));
    for i in 0..args.workers {
        let name = format!("mui-worker-{}", i + 1);
        children.push((name.clone(), spawn(bin, &name, &envs, logs)?));
    }
    children.push(("mui-ingest".into(), spawn(bin, "mui-ingest", &envs, logs)?));
    std::thread::sleep(Duration::from_secs(3)); // connect, declare, start watching

    let statements = args.statements && reset_statements(&mut conn);
    eprintln!("pipeline: drop folder → … → email…");
    let ticks_before = machine_ticks();
    let mut peak_connections = db_connections(&mut conn);
    let mut last_sample = Instant::now();
    let start = Instant::now();
    std::fs::rename(
        &file,
        mui_shared::tenants::drop_folder(drop_root, "bench").join("users.csv"),
    )?;
    let deadline = start + Duration::from_secs(args.timeout_secs);
    let mut last_report = Instant::now();
    let elapsed = loop {
        let row: Option<(String, String, i32, Option<i32>)> = import_files::table
            .filter(import_files::tenant_id.eq(tenant.id))
            .select((
                import_files::state,
                import_files::notify_status,
                import_files::chunks_done,
                import_files::total_chunks,
            ))
            .first(&mut conn)
            .optional()?;
        if let Some((state, notify, done, total)) = &row {
            if state == "failed" {
                bail!("the file failed: see {}", logs.display());
            }
            if state == "done" && (notify == "sent" || notify == "not_needed") {
                break start.elapsed();
            }
            if last_report.elapsed() > Duration::from_secs(10) {
                eprintln!(
                    "  {:>5.0}s: chunks {done}/{}",
                    start.elapsed().as_secs_f64(),
                    total.map_or("?".into(), |t| t.to_string())
                );
                last_report = Instant::now();
            }
        }
        for (name, child) in children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited early ({status}); see {}", logs.display());
            }
        }
        if last_sample.elapsed() > Duration::from_secs(1) {
            peak_connections = peak_connections.max(db_connections(&mut conn));
            last_sample = Instant::now();
        }
        if Instant::now() > deadline {
            bail!("timed out; see {}", logs.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let busy = match (ticks_before, machine_ticks()) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => Some((b1 - b0) as f64 / (t1 - t0) as f64),
        _ => None,
    };
    let peaks: Vec<(String, Option<u64>, Option<f64>)> = children
        .iter()
        .map(|(n, c)| (n.clone(), peak_rss_kib(c.id()), cpu_secs(c.id())))
        .collect();
    // The main run's mail (it was accepted before the clock stopped).
    let main_mails = smtp.messages().len();
    if statements {
        print_statements(&mut conn, "the pipeline run")?;
    }
    // After the peaks and CPU times of the main run were read.
    let onboarding = match args.onboarding_rows.as_slice() {
        [small, large] if *small > 0 && *large > 0 => {
            eprintln!("onboarding: {small} and {large} rows after a 10-row first file…");
            let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
            let s = onboard(
                &mut conn,
                &setup,
                "onboard-s",
                *small,
                &mut children,
                deadline,
            )?;
            let l = onboard(
                &mut conn,
                &setup,
                "onboard-l",
                *large,
                &mut children,
                deadline,
            )?;
            Some((*small, s, *large, l))
        }
        _ => None,
    };
    // The same file again, unchanged: the baseline skips unchanged rows, the pipeline counts
    // them "unchanged".
    let reimport = if args.reimport {
        eprintln!("re-import of the unchanged file…");
        let again = drop_root.join(".again.csv");
        generate(&again, args.rows, 1000)?;
        let (base, base_pg) = baseline_with_cpu(&db.url, base_tenant.id, &again, true)?;
        diesel::sql_query("CHECKPOINT").execute(&mut conn)?;
        let cpu_before: Vec<Option<f64>> = children.iter().map(|(_, c)| cpu_secs(c.id())).collect();
        let (pg_before, mq_before) = (command_cpu_secs("postgres"), command_cpu_secs("beam.smp"));
        let statements = args.statements && reset_statements(&mut conn);
        eprintln!("re-import: pipeline: drop folder → … → email…");
        let start = Instant::now();
        std::fs::rename(
            &again,
            mui_shared::tenants::drop_folder(drop_root, "bench").join("users.csv"),
        )?;
        let deadline = start + Duration::from_secs(args.timeout_secs);
        wait_files(&mut conn, tenant.id, 2, &mut children, deadline, logs)?;
        let took = start.elapsed();
        // Where the CPU went: each service, every PostgreSQL process, RabbitMQ (the machine
        // is otherwise idle); the baseline's is PostgreSQL's alone.
        let mut cpu: Vec<String> = children
            .iter()
            .zip(&cpu_before)
            .filter_map(|((name, c), before)| {
                Some(format!("{name} {:.1}", cpu_secs(c.id())? - (*before)?))
            })
            .collect();
        cpu.push(format!(
            "PostgreSQL {:.1}",
            command_cpu_secs("postgres") - pg_before
        ));
        cpu.push(format!(
            "RabbitMQ {:.1}",
            command_cpu_secs("beam.smp") - mq_before
        ));
        println!(
            "re-import CPU seconds:   {} (the baseline's PostgreSQL: {})",
            cpu.join(", "),
            base_pg.map_or("?".into(), |c| format!("{c:.1}"))
        );
        if statements {
            print_statements(&mut conn, "the re-import")?;
        }
        // How long ingest took to queue every chunk (its share of the time: the workers
        // import while it reads on).
        let queued: Option<f64> = diesel::sql_query(
            "SELECT extract(epoch FROM queued_at - received_at)::float8 AS secs \
             FROM import_files WHERE tenant_id = $1 ORDER BY id DESC LIMIT 1",
        )
        .bind::<diesel::sql_types::BigInt, _>(tenant.id)
        .get_result::<Secs>(&mut conn)
        .ok()
        .and_then(|s| s.secs);
        if let Some(q) = queued {
            println!("re-import: ingest queued the last chunk {q:.2} s after registering the file");
        }
        let unchanged: i64 = import_files::table
            .filter(import_files::tenant_id.eq(tenant.id))
            .order(import_files::id.desc())
            .select(import_files::rows_unchanged)
            .first(&mut conn)?;
        Some((base, took, unchanged))
    } else {
        None
    };
    for (_, child) in children.iter_mut() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
    }
    for (_, child) in children.iter_mut() {
        let _ = child.wait();
    }
    let mails = main_mails;
    let imported: i64 = mui_shared::schema::users::table
        .filter(mui_shared::schema::users::tenant_id.eq(tenant.id))
        .count()
        .get_result(&mut conn)?;

    let rows = args.rows as f64;
    let pipe_rps = rows / elapsed.as_secs_f64();
    let base_rps = rows / base.as_secs_f64();
    println!("rows:                    {}", args.rows);
    match &otel {
        Some((_, sink)) => println!(
            "tracing:                 on (OTLP/HTTP to a receiver in mui-bench; {} spans received)",
            sink.received()
        ),
        None => println!("tracing:                 off (--otel turns it on)"),
    }
    println!("file size:               {size} bytes");
    println!(
        "baseline (COPY+upsert):  {:>8.2} s  {:>9.0} rows/s",
        base.as_secs_f64(),
        base_rps
    );
    println!(
        "pipeline (drop→email):   {:>8.2} s  {:>9.0} rows/s  ({} workers × {})",
        elapsed.as_secs_f64(),
        pipe_rps,
        args.workers,
        args.worker_concurrency
    );
    println!("ratio pipeline/baseline: {:.2}", pipe_rps / base_rps);
    let ratio = pipe_rps / base_rps;
    mui_tests::bench::summary(
        &format!("{} rows, drop → mail, vs COPY + upsert", args.rows),
        &format!(
            "{ratio:.2} ({:.1} s vs {:.1} s)",
            elapsed.as_secs_f64(),
            base.as_secs_f64()
        ),
        "≥ 0.8",
        ratio >= 0.8,
    );
    println!(
        "users imported:          {imported} (expected {})",
        args.rows - bad
    );
    println!("emails received:         {mails}");
    println!(
        "machine CPUs busy:       {} (all {} CPUs, every process, during the pipeline run)",
        busy.map_or("?".into(), |b| format!("{:.0}%", b * 100.0)),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("db connections (peak):   {peak_connections}");
    if let Some((base, took, unchanged)) = reimport {
        println!(
            "re-import unchanged:     baseline (skips unchanged) {:.2} s, pipeline {:.2} s ({unchanged} rows counted unchanged), ratio pipeline/baseline {:.2}",
            base.as_secs_f64(),
            took.as_secs_f64(),
            base.as_secs_f64() / took.as_secs_f64()
        );
        let ratio = base.as_secs_f64() / took.as_secs_f64();
        mui_tests::bench::summary(
            "re-import of the unchanged file vs an upsert skipping unchanged rows",
            &format!(
                "{ratio:.2} ({:.1} s vs {:.1} s)",
                took.as_secs_f64(),
                base.as_secs_f64()
            ),
            "≥ 0.9",
            ratio >= 0.9,
        );
    }
    if let Some((small, s, large, l)) = onboarding {
        println!(
            "onboarding (new tenant, 10-row file, ANALYZE, export): {small} rows {s:.2} s, {large} rows {l:.2} s, ratio {:.2} (linear: {:.2})",
            l / s,
            large as f64 / small as f64
        );
        let linear = large as f64 / small as f64 * 1.1;
        mui_tests::bench::summary(
            &format!("new tenant's first import, {large} vs {small} rows"),
            &format!("{:.2}× ({l:.1} s vs {s:.1} s)", l / s),
            &format!("≤ {linear:.1}× (linear)"),
            l / s <= linear,
        );
    }
    let worst = peaks.iter().filter_map(|(_, kib, _)| *kib).max();
    if let Some(kib) = worst {
        let mib = kib as f64 / 1024.0;
        mui_tests::bench::summary(
            "peak memory of the largest service process",
            &format!("{mib:.0} MiB"),
            "≤ 150 MB",
            mib * 1.048_576 <= 150.0,
        );
    }
    for (name, kib, cpu) in peaks {
        println!(
            "{name:<13} peak memory {:>10}  CPU {:>8}",
            kib.map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            cpu.map_or("?".into(), |c| format!("{c:.1} s"))
        );
    }
    if imported as u64 != args.rows - bad || mails != 1 {
        bail!(
            "the pipeline did not import what it should (see {})",
            logs.display()
        );
    }
    mui_tests::bench::delete_topology(prefix);
    Ok(())
}
