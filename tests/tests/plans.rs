//! Every statement a chunk runs (and every statement the dispatcher runs each round) has one
//! good plan whatever the statistics say: each is PREPAREd and EXPLAINed with realistic
//! parameters (a chunk's 5,000 ids or values), under the planner settings of the session that
//! runs it, with its custom plan and its generic plan (the one PostgreSQL switches to after
//! five executions of a cached statement; diesel does not cache `sql_query` statements today,
//! which is no reason for a generic plan to be bad), under statistics that are absent (a table
//! never analyzed, empty or loaded: autovacuum may be off), tiny (a tenant of ten users,
//! analyzed), stale (analyzed at ten users, then 50,000 loaded), fresh, and a new tenant's
//! (loaded after the last ANALYZE, so the statistics have never heard of it). A plan passes
//! when every scan of `users`, `permits`, `chunk_queue` and `import_files` is a point probe:
//! an index condition on the identifying key (unique id, lowercased email or user name, file,
//! chunk, id) or a TID scan of rows found that way; never a sequential scan,
//! and never an index or bitmap scan whose only condition is the tenant (a range holding the
//! tenant's every user). The shape is asserted, not the time.
//!
//! And a chunk's index reads do not grow with its tenant: importing a 5,000-row chunk into a
//! tenant of 10,000 or of 40,000 users reads about the same index tuples of the identity
//! indexes (it once read the tenant's every user through `users_user_name_unique`).

use std::fmt::Write as _;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Json, Text};
use mui_shared::dispatch::sql as dispatch_sql;
use mui_shared::domain::ImportFileId;
use mui_shared::messages::{Chunk, RawRow};
use mui_tests::register_file;
use mui_tests::TestDb;
use mui_worker::sql;

/// Rows of a chunk, as ingest cuts them.
const CHUNK: usize = 5_000;

/// The tenants: one that grows big, another, and one that arrives after the last ANALYZE.
const BIG: i64 = 1;
const OTHER: i64 = 2;
const NEWCOMER: i64 = 3;

/// The relations a hot statement must probe, each with what its index condition must name
/// (the identifying key).
const WATCHED: &[(&str, &[&str])] = &[
    ("users", &["unique_id", "lower("]),
    ("permits", &["unique_id", "permit_number"]),
    ("chunk_queue", &["file_id", "chunk_no"]),
    ("import_files", &["(id ="]),
];

/// A plan node on a watched relation that a statement may have besides point probes (where
/// it is allowed, a comment says why: the statement reads that whole set by design, and the
/// set stays small).
#[derive(Clone, Copy)]
struct Allowed {
    relation: &'static str,
    /// Node type, and index name if the node must use that index.
    node: &'static str,
    index: Option<&'static str>,
}

/// One statement to EXPLAIN.
struct Hot {
    name: &'static str,
    sql: String,
    /// The PREPARE parameter types, as diesel binds them.
    types: &'static str,
    /// The EXECUTE arguments for tenant `t` (SQL literals).
    args: Box<dyn Fn(&Args) -> String>,
    /// Fill `users_stage` with the chunk's rows first.
    staged: bool,
    /// The planner settings of the session that runs it.
    settings: &'static str,
    allowed: Vec<Allowed>,
}

/// What a chunk of one tenant brings: 5,000 unique ids (existing users once loaded), their
/// lowercased emails and user names, row numbers.
struct Args {
    tenant: i64,
    file: i64,
    ids: String,
    emails: String,
    user_names: String,
    rows: String,
}

/// The first unique id number of the chunk EXPLAINed for `tenant` (inside its loaded range).
fn chunk_base(tenant: i64) -> usize {
    match tenant {
        NEWCOMER => 10_000,
        _ => 20_000,
    }
}

fn prefix(tenant: i64) -> &'static str {
    match tenant {
        BIG => "a",
        OTHER => "b",
        _ => "c",
    }
}

fn uid(i: usize) -> String {
    format!("U{i:09}")
}

fn user_name(tenant: i64, i: usize) -> String {
    format!("{}tremblay{i}", prefix(tenant))
}

fn email(tenant: i64, i: usize) -> String {
    format!("{}.tremblay.{i}@staff.example.edu", prefix(tenant))
}

fn array(values: impl Iterator<Item = String>, ty: &str) -> String {
    let mut out = String::from("'{");
    for (n, v) in values.enumerate() {
        if n > 0 {
            out.push(',');
        }
        let _ = write!(out, "\"{v}\"");
    }
    let _ = write!(out, "}}'::{ty}");
    out
}

impl Args {
    fn of(tenant: i64) -> Self {
        let base = chunk_base(tenant);
        let range = || base..base + CHUNK;
        Args {
            tenant,
            file: tenant,
            ids: array(range().map(uid), "text[]"),
            emails: array(range().map(|i| email(tenant, i)), "text[]"),
            user_names: array(range().map(|i| user_name(tenant, i)), "text[]"),
            rows: array((0..CHUNK).map(|r| (r + 2).to_string()), "bigint[]"),
        }
    }
}

fn hot_statements() -> Vec<Hot> {
    let queue_scan = Allowed {
        // The live chunk counts read the whole queue, however: it holds the chunks not
        // imported yet.
        relation: "chunk_queue",
        node: "*",
        index: None,
    };
    let open_files = |node| Allowed {
        // The files being read: the partial index of open files, never the file history.
        relation: "import_files",
        node,
        index: Some("import_files_open"),
    };
    let hot = |name, sql: &str, types, args: Box<dyn Fn(&Args) -> String>, staged| Hot {
        name,
        sql: sql.to_owned(),
        types,
        args,
        staged,
        settings: sql::PLANNER_SETTINGS,
        allowed: Vec::new(),
    };
    // The dispatcher's own session (`take` runs in the worker's import transaction).
    let dispatcher = |h: Hot| Hot {
        settings: dispatch_sql::PLANNER_SETTINGS,
        ..h
    };
    let archive = "false, '{last_name,user_name,email}'::text[]";
    vec![
        hot(
            "lock_existing",
            sql::LOCK_EXISTING,
            "bigint, bigint",
            Box::new(|a| format!("{}, {}", a.tenant, a.file)),
            true,
        ),
        hot(
            "update (users locked)",
            sql::update(),
            "bigint, bigint, boolean, text[], text[]",
            Box::new(move |a| format!("{}, {}, {archive}, {}", a.tenant, a.file, a.ids)),
            true,
        ),
        hot(
            "update (no user locked: a chunk of new users)",
            sql::update(),
            "bigint, bigint, boolean, text[], text[]",
            Box::new(move |a| format!("{}, {}, {archive}, '{{}}'::text[]", a.tenant, a.file)),
            true,
        ),
        hot(
            "insert",
            sql::insert(),
            "bigint, bigint, boolean, text[]",
            Box::new(move |a| format!("{}, {}, {archive}", a.tenant, a.file)),
            true,
        ),
        hot(
            "same_digest",
            sql::SAME_DIGEST,
            "bigint, bigint, text[], bytea[], bigint[], boolean[]",
            Box::new(|a| {
                format!(
                    "{}, {}, {}, array_fill('\\x0102'::bytea, ARRAY[{CHUNK}]), {}, \
                     array_fill(true, ARRAY[{CHUNK}])",
                    a.tenant, a.file, a.ids, a.rows
                )
            }),
            false,
        ),
        hot(
            "users_in_range",
            sql::USERS_IN_RANGE,
            "bigint, text, text, bigint",
            Box::new(|a| {
                let base = chunk_base(a.tenant);
                format!(
                    "{}, '{}', '{}', {}",
                    a.tenant,
                    uid(base),
                    uid(base + CHUNK - 1),
                    3 * CHUNK + 100
                )
            }),
            false,
        ),
        hot(
            "skip_unchanged",
            sql::skip_unchanged(),
            "bigint, bigint, boolean, text[], bigint[]",
            Box::new(move |a| format!("{}, {}, {archive}, '{{}}'::bigint[]", a.tenant, a.file)),
            true,
        ),
        Hot {
            allowed: vec![
                open_files("Index Scan"),
                open_files("Index Only Scan"),
                open_files("Bitmap Heap Scan"),
            ],
            ..hot(
                "older_open",
                sql::OLDER_OPEN,
                "bigint, bigint",
                Box::new(|a| format!("{}, {}", a.tenant, a.file)),
                false,
            )
        },
        hot(
            "unstage",
            sql::UNSTAGE,
            "bigint[]",
            Box::new(|a| a.rows.clone()),
            true,
        ),
        hot(
            "email_owners",
            sql::EMAIL_OWNERS,
            "bigint, text[]",
            Box::new(|a| format!("{}, {}", a.tenant, a.emails)),
            false,
        ),
        hot(
            "user_name_owners",
            sql::USER_NAME_OWNERS,
            "bigint, text[]",
            Box::new(|a| format!("{}, {}", a.tenant, a.user_names)),
            false,
        ),
        hot(
            "email_conflicts",
            sql::EMAIL_CONFLICTS,
            "bigint, bigint, text[]",
            Box::new(|a| format!("{}, {}, {}", a.tenant, a.file, a.ids)),
            false,
        ),
        hot(
            "user_name_conflicts",
            sql::USER_NAME_CONFLICTS,
            "bigint, bigint, text[]",
            Box::new(|a| format!("{}, {}, {}", a.tenant, a.file, a.ids)),
            false,
        ),
        hot(
            "release_permits",
            sql::RELEASE_PERMITS,
            "bigint, text[]",
            Box::new(|a| format!("{}, {}", a.tenant, a.ids)),
            false,
        ),
        hot(
            "count_chunk",
            sql::COUNT_CHUNK,
            "bigint, bigint, bigint, bigint, bigint, bigint, bigint, bigint, bigint",
            Box::new(|a| format!("{}, 1, 2, 3, 4, 5, 6, 7, 8", a.file)),
            false,
        ),
        hot(
            "dispatch take",
            dispatch_sql::TAKE,
            "bigint, bigint, integer",
            Box::new(|a| format!("{}, {}, 7", a.tenant, a.file)),
            false,
        ),
        dispatcher(Hot {
            allowed: vec![queue_scan],
            ..hot(
                "dispatch queued files",
                dispatch_sql::QUEUED_FILES,
                "bigint",
                Box::new(|_| "900".into()),
                false,
            )
        }),
        dispatcher(Hot {
            allowed: vec![
                open_files("Index Scan"),
                open_files("Index Only Scan"),
                open_files("Bitmap Heap Scan"),
            ],
            ..hot(
                "dispatch reading files",
                dispatch_sql::READING_FILES,
                "",
                Box::new(|_| String::new()),
                false,
            )
        }),
        dispatcher(hot(
            "dispatch waiting chunks",
            dispatch_sql::WAITING_CHUNKS,
            "bigint, bigint, bigint, bigint",
            Box::new(|a| format!("{}, {}, 900, 4", a.tenant, a.file)),
            false,
        )),
        dispatcher(hot(
            "dispatch mark dispatched",
            dispatch_sql::MARK_DISPATCHED,
            "bigint, bigint, integer[]",
            Box::new(|a| format!("{}, {}, '{{1,2,3,4}}'::integer[]", a.tenant, a.file)),
            false,
        )),
        dispatcher(hot(
            "dispatch mark confirmed",
            dispatch_sql::MARK_CONFIRMED,
            "bigint, bigint, integer[], boolean",
            Box::new(|a| format!("{}, {}, '{{1,2,3,4}}'::integer[], true", a.tenant, a.file)),
            false,
        )),
    ]
}

/// A plan node's string attribute.
fn attr<'a>(node: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    node.get(key).and_then(|v| v.as_str())
}

/// The indexes a scan node reads: its own, or its bitmap index scans'.
fn indexes_of(node: &serde_json::Value) -> Vec<&str> {
    let mut out: Vec<&str> = attr(node, "Index Name").into_iter().collect();
    if attr(node, "Node Type") == Some("Bitmap Heap Scan") {
        let mut stack: Vec<&serde_json::Value> = node
            .get("Plans")
            .and_then(|p| p.as_array())
            .map(|p| p.iter().collect())
            .unwrap_or_default();
        while let Some(n) = stack.pop() {
            out.extend(attr(n, "Index Name"));
            if let Some(children) = n.get("Plans").and_then(|p| p.as_array()) {
                stack.extend(children);
            }
        }
    }
    out
}

/// What is wrong with `plan` (empty: every watched scan is a point probe).
fn violations(plan: &serde_json::Value, allowed: &[Allowed]) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![plan];
    while let Some(node) = stack.pop() {
        if let Some(children) = node.get("Plans").and_then(|p| p.as_array()) {
            stack.extend(children);
        }
        let kind = attr(node, "Node Type").unwrap_or("?");
        let Some(relation) = attr(node, "Relation Name") else {
            continue;
        };
        let Some((_, keys)) = WATCHED.iter().find(|(r, _)| *r == relation) else {
            continue;
        };
        if kind == "ModifyTable" {
            continue;
        }
        let indexes = indexes_of(node);
        if allowed.iter().any(|a| {
            a.relation == relation
                && (a.node == "*" || a.node == kind)
                && a.index
                    .is_none_or(|i| !indexes.is_empty() && indexes.iter().all(|x| *x == i))
        }) {
            continue;
        }
        let cond = match kind {
            "Index Scan" | "Index Only Scan" => attr(node, "Index Cond"),
            "Bitmap Heap Scan" => attr(node, "Recheck Cond"),
            "Tid Scan" => attr(node, "TID Cond"),
            _ => None,
        };
        let probe = match (kind, cond) {
            ("Tid Scan", Some(_)) => true,
            (_, Some(c)) => keys.iter().any(|k| c.contains(k)),
            (_, None) => false,
        };
        if !probe {
            out.push(format!(
                "{kind} on {relation}{} with condition {} reads a range, not the key {keys:?}",
                if indexes.is_empty() {
                    String::new()
                } else {
                    format!(" using {}", indexes.join(", "))
                },
                cond.unwrap_or("(none)"),
            ));
        }
    }
    out
}

#[derive(QueryableByName)]
struct Explained {
    #[diesel(sql_type = Json)]
    #[diesel(column_name = "QUERY PLAN")]
    plan: serde_json::Value,
}

/// Fills the staging table with the chunk's rows (inside the caller's transaction).
fn stage(conn: &mut PgConnection, tenant: i64) {
    conn.batch_execute(sql::create_staging()).unwrap();
    let base = chunk_base(tenant);
    let p = prefix(tenant);
    conn.batch_execute(&format!(
        "INSERT INTO users_stage (row_no, unique_id, login_source, first_name, last_name, \
           user_name, email, city, active, row_digest) \
         SELECT i - {base} + 2, format('U%s', lpad(i::text, 9, '0')), 'sso', 'Amélie', \
           'Tremblay', '{p}tremblay' || i, '{p}.tremblay.' || i || '@staff.example.edu', \
           'Montréal', true, decode(md5(i::text), 'hex') \
         FROM generate_series({base}, {}) i",
        base + CHUNK - 1
    ))
    .unwrap();
}

/// The plan of `hot` for tenant `tenant`'s chunk, custom (`generic` false) or generic.
fn explain(conn: &mut PgConnection, hot: &Hot, tenant: i64, generic: bool) -> serde_json::Value {
    let args = Args::of(tenant);
    conn.batch_execute("BEGIN").unwrap();
    conn.batch_execute(hot.settings).unwrap();
    if hot.staged {
        stage(conn, tenant);
    }
    let types = if hot.types.is_empty() {
        String::new()
    } else {
        format!("({})", hot.types)
    };
    conn.batch_execute(&format!("PREPARE hot{types} AS {}", hot.sql))
        .unwrap();
    let mode = if generic {
        "force_generic_plan"
    } else {
        "force_custom_plan"
    };
    conn.batch_execute(&format!("SET LOCAL plan_cache_mode = {mode}"))
        .unwrap();
    let a = (hot.args)(&args);
    let call = if a.is_empty() {
        "hot".to_owned()
    } else {
        format!("hot({a})")
    };
    let explained: Explained = diesel::sql_query(format!("EXPLAIN (FORMAT JSON) EXECUTE {call}"))
        .get_result(conn)
        .unwrap();
    conn.batch_execute("ROLLBACK; DEALLOCATE hot").unwrap();
    explained.plan[0]["Plan"].clone()
}

/// Every hot statement's custom and generic plan for `tenant`'s chunk under the current
/// statistics (`state`); returns the failures, each naming statement, state, plan kind and
/// the plan.
fn check_all(conn: &mut PgConnection, state: &str, tenant: i64, hots: &[Hot]) -> Vec<String> {
    let mut failures = Vec::new();
    for hot in hots {
        for generic in [false, true] {
            let plan = explain(conn, hot, tenant, generic);
            let found = violations(&plan, &hot.allowed);
            if !found.is_empty() {
                failures.push(format!(
                    "{} ({}, tenant {tenant}, {} plan): {}\nplan: {}",
                    hot.name,
                    state,
                    if generic { "generic" } else { "custom" },
                    found.join("; "),
                    serde_json::to_string_pretty(&plan).unwrap()
                ));
            }
        }
    }
    failures
}

/// Tenants, their open files, a worker.
fn base_rows(conn: &mut PgConnection) {
    conn.batch_execute(
        "INSERT INTO tenants (id, slug, name) VALUES \
           (1, 'big', 'big'), (2, 'other', 'other'), (3, 'newcomer', 'newcomer'); \
         INSERT INTO import_files (id, tenant_id, file_name, arrival_key, size_bytes, sha256, \
           state, total_chunks) VALUES \
           (1, 1, 'big.csv', 'k1', 1, 'x', 'importing', 200), \
           (2, 2, 'other.csv', 'k2', 1, 'x', 'importing', 20), \
           (3, 3, 'new.csv', 'k3', 1, 'x', 'importing', 4), \
           (4, 2, 'later.csv', 'k4', 1, 'x', 'received', NULL); \
         SELECT setval('import_files_id_seq', 100); \
         INSERT INTO workers (name, host, pid, concurrency) VALUES ('w', 'h', 1, 2);",
    )
    .unwrap();
}

/// Users `from..to` of `tenant` (written by its file), with a permit each for every tenth.
fn load_users(conn: &mut PgConnection, tenant: i64, from: usize, to: usize) {
    let p = prefix(tenant);
    conn.batch_execute(&format!(
        "INSERT INTO users (tenant_id, unique_id, login_source, first_name, last_name, \
           user_name, email, city, last_file_id, last_row) \
         SELECT {tenant}, format('U%s', lpad(i::text, 9, '0')), 'sso', 'Amélie', 'Tremblay', \
           '{p}tremblay' || i, '{p}.tremblay.' || i || '@staff.example.edu', 'Montréal', \
           {tenant}, i + 2 \
         FROM generate_series({from}, {}) i; \
         INSERT INTO permits (tenant_id, unique_id, permit_number, lot_name) \
         SELECT {tenant}, format('U%s', lpad(i::text, 9, '0')), 'P' || i, 'Lot A' \
         FROM generate_series({from}, {}) i WHERE i % 10 = 0",
        to - 1,
        to - 1
    ))
    .unwrap();
}

/// `n` finished files of `tenant` (the history the dispatcher must not read) and `chunks`
/// chunks of its open file in the queue.
fn load_files(conn: &mut PgConnection, tenant: i64, n: usize, chunks: usize) {
    conn.batch_execute(&format!(
        "INSERT INTO import_files (tenant_id, file_name, arrival_key, size_bytes, sha256, \
           state, total_chunks, chunks_done) \
         SELECT {tenant}, 'old' || i, 'old-{tenant}-' || i || '-' || random(), 1, 'x', 'done', 1, 1 \
         FROM generate_series(1, {n}) i; \
         INSERT INTO chunk_queue (tenant_id, file_id, chunk_no, rows, payload) \
         SELECT {tenant}, {tenant}, i, 5000, '\\x00'::bytea FROM generate_series(1, {chunks}) i \
         ON CONFLICT DO NOTHING",
    ))
    .unwrap();
}

fn report(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} plan(s) read a range instead of probing the key:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn hot_statements_probe_the_key_without_statistics() {
    let db = TestDb::new().unwrap();
    let mut conn = db.conn();
    let hots = hot_statements();
    base_rows(&mut conn);
    let mut failures = check_all(&mut conn, "empty, never analyzed", BIG, &hots);
    // A loaded table nobody analyzed (autovacuum is off): the planner sizes it by its pages
    // and guesses every selectivity.
    load_users(&mut conn, BIG, 0, 50_000);
    load_users(&mut conn, OTHER, 0, 3_000);
    load_files(&mut conn, BIG, 5_000, 200);
    load_files(&mut conn, OTHER, 500, 20);
    failures.extend(check_all(&mut conn, "loaded, never analyzed", BIG, &hots));
    report(failures);
}

#[test]
fn hot_statements_probe_the_key_with_tiny_stale_and_fresh_statistics() {
    let db = TestDb::new().unwrap();
    let mut conn = db.conn();
    let hots = hot_statements();
    base_rows(&mut conn);
    // Tiny: the big tenant's first users, analyzed.
    load_users(&mut conn, BIG, 0, 10);
    load_users(&mut conn, OTHER, 0, 10);
    load_files(&mut conn, BIG, 10, 10);
    conn.batch_execute("ANALYZE").unwrap();
    let mut failures = check_all(&mut conn, "tiny, analyzed", BIG, &hots);
    // Stale: analyzed at ten users, then the import goes on (the tenant thought to be tiny).
    load_users(&mut conn, BIG, 10, 50_010);
    load_users(&mut conn, OTHER, 10, 3_000);
    load_files(&mut conn, BIG, 5_000, 200);
    load_files(&mut conn, OTHER, 500, 20);
    failures.extend(check_all(
        &mut conn,
        "stale: analyzed at 10 users",
        BIG,
        &hots,
    ));
    conn.batch_execute("ANALYZE").unwrap();
    failures.extend(check_all(&mut conn, "fresh, analyzed", BIG, &hots));
    // A new tenant's first import after that ANALYZE: its tenant id is in no statistics.
    load_users(&mut conn, NEWCOMER, 0, 20_000);
    load_files(&mut conn, NEWCOMER, 0, 4);
    failures.extend(check_all(
        &mut conn,
        "new tenant, loaded after ANALYZE",
        NEWCOMER,
        &hots,
    ));
    report(failures);
}

/// The check can fail: the lookup as it was before the probes (the tenant's users joined on
/// `unique_id = ANY(ids)`), which read the tenant's every user on stale statistics, is
/// caught.
#[test]
fn a_statement_reading_the_tenants_range_is_caught() {
    let db = TestDb::new().unwrap();
    let mut conn = db.conn();
    base_rows(&mut conn);
    load_users(&mut conn, BIG, 0, 10);
    load_users(&mut conn, OTHER, 0, 3_000);
    conn.batch_execute("ANALYZE").unwrap();
    load_users(&mut conn, BIG, 10, 50_010);
    let bad = Hot {
        name: "bad lookup",
        sql: "SELECT u.unique_id, s.row_no FROM users u JOIN users_stage s \
                ON s.unique_id = u.unique_id \
              WHERE u.tenant_id = $1 AND u.unique_id = ANY($2)"
            .into(),
        types: "bigint, text[]",
        args: Box::new(|a| format!("{}, {}", a.tenant, a.ids)),
        staged: true,
        settings: sql::PLANNER_SETTINGS,
        allowed: Vec::new(),
    };
    let failures = check_all(&mut conn, "stale", BIG, &[bad]);
    for f in &failures {
        eprintln!("caught: {}", f.lines().next().unwrap_or_default());
    }
    assert!(
        !failures.is_empty(),
        "a lookup by tenant and `= ANY(ids)` passed the check"
    );
    assert!(
        failures[0].contains("bad lookup (stale, tenant 1,"),
        "{failures:?}"
    );
}

#[derive(QueryableByName, Debug)]
struct IndexReads {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = BigInt)]
    scans: i64,
    #[diesel(sql_type = BigInt)]
    read: i64,
}

/// Scans and index tuples read so far, per index of `users` (this session's counts flushed
/// first).
fn index_reads(conn: &mut PgConnection) -> Vec<IndexReads> {
    conn.batch_execute("SELECT pg_stat_force_next_flush()")
        .unwrap();
    conn.batch_execute("SELECT pg_stat_clear_snapshot()")
        .unwrap();
    diesel::sql_query(
        "SELECT indexrelname::text AS name, idx_scan AS scans, idx_tup_read AS read \
         FROM pg_stat_user_indexes WHERE relname = 'users' ORDER BY 1",
    )
    .load(conn)
    .unwrap()
}

/// The generator's users (`mui_tests::bench::generate`, as the benchmark imports them).
fn generated(rows: usize) -> (Vec<String>, Vec<Vec<String>>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users.csv");
    mui_tests::bench::generate(&path, rows as u64, u64::MAX).unwrap();
    let mut r = csv::Reader::from_path(&path).unwrap();
    let header = r.headers().unwrap().iter().map(String::from).collect();
    let rows = r
        .records()
        .map(|rec| rec.unwrap().iter().map(String::from).collect())
        .collect();
    (header, rows)
}

fn new_file(
    conn: &mut PgConnection,
    tenant: i64,
    name: &str,
    header: &[String],
    chunks: usize,
) -> i64 {
    let rows = (chunks * CHUNK) as i64;
    register_file(conn, tenant, name, header, chunks as i32, rows).unwrap()
}

/// A chunk's index reads do not grow with the tenant. One connection imports a generated file
/// chunk by chunk, as a worker does (its prepared statements go generic after five chunks),
/// into a table never analyzed (autovacuum is off), then imports the first chunks again (every
/// user exists: lock, update). Each chunk may read each index of `users` a few times per row
/// (a probe per row and statement), never the tenant's users: the tenant grows to 40,000
/// users, and one range scan of the tenant per chunk would read more than the bound from
/// the fourth chunk on. (It did: the update, for a chunk of new users, read the tenant through
/// `users_user_name_unique`; the lock read it through the primary key.)
#[test]
fn a_chunk_reads_the_indexes_per_row_not_per_user_of_the_tenant() {
    const CHUNKS: usize = 8;
    const AGAIN: usize = 2;
    let db = TestDb::new().unwrap();
    let mut conn = db.conn();
    let t = mui_tests::bench::make_tenant(&mut conn, "growing").unwrap();
    let (header, rows) = generated(CHUNK * CHUNKS);
    let first = new_file(&mut conn, t.id, "first.csv", &header, CHUNKS);
    let again = new_file(&mut conn, t.id, "again.csv", &header, AGAIN);
    let chunks = rows
        .chunks(CHUNK)
        .enumerate()
        .map(|(n, part)| (first, n, part))
        .chain(
            rows.chunks(CHUNK)
                .take(AGAIN)
                .enumerate()
                .map(|(n, part)| (again, n, part)),
        );
    let mut work = db.conn();
    let mut problems = Vec::new();
    for (file, n, part) in chunks {
        let chunk = Chunk {
            file_id: ImportFileId(file),
            tenant_id: t.tenant_id(),
            chunk_no: n as u32,
            header: header.clone(),
            repeated: None,
            rows: part
                .iter()
                .enumerate()
                .map(|(i, f)| RawRow {
                    row: (2 + n * CHUNK + i) as u64,
                    fields: f.clone().into(),
                    too_large: None,
                })
                .collect(),
        };
        let before = index_reads(&mut work);
        let out = mui_worker::import::import_chunk(&mut work, &chunk).unwrap();
        let after = index_reads(&mut work);
        assert_eq!(out.failed, 0, "{out:?}");
        assert_eq!(out.inserted + out.updated + out.unchanged, CHUNK as i64);
        for (a, b) in after.iter().zip(&before) {
            let (scans, read) = (a.scans - b.scans, a.read - b.read);
            // The identity indexes: a constraint check per row written (finding the new
            // version, and the old one it replaces); the others: a probe per row and
            // statement (each finding a user's versions).
            let bound = match a.name.as_str() {
                "users_email_unique" | "users_user_name_unique" => 3 * CHUNK,
                _ => 6 * CHUNK,
            } as i64;
            eprintln!(
                "file {file} chunk {n}: {}: +{scans} scans, +{read} tuples read",
                a.name
            );
            if read > bound {
                problems.push(format!(
                    "file {file} chunk {n} ({CHUNK} rows, {} inserted, {} updated): {} read {read} index tuples in {scans} scans, more than {bound}",
                    out.inserted, out.updated, a.name
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
