//! Email and user name are unique within a tenant, compared case-insensitively, even when two
//! chunks (of one file, or of two files) claim the same new value at the same moment on
//! separate connections: exactly one user ends up with it, the other row is reported
//! (`email_taken` / `user_name_taken`), no row is dropped, and nothing but the errors the
//! worker retries (deadlocks) comes out of `import_chunk`. Two users of one chunk may swap
//! their values; another tenant may use the same ones.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Barrier;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use mui_shared::domain::{ImportFileId, TenantId};
use mui_shared::messages::{self, Chunk, NotifyMessage, RawRow, RowErrorCode};
use mui_shared::schema::{import_files, outbox, tenants, users};
use mui_shared::tenants::Tenant;
use mui_tests::register_file;
use mui_tests::{AppOptions, TestEnv};

const HEADER: [&str; 5] = ["unique_id", "login_source", "email", "user_name", "active"];
const ROUNDS: u64 = 16;
const FILLER: u64 = 12;

type Row = (String, String, String, String);

/// Registers a file of `chunks` chunks for tenant `t`, as ingest leaves it for the workers.
fn new_file(conn: &mut PgConnection, t: &Tenant, name: &str, chunks: i32, rows: i64) -> i64 {
    register_file(conn, t.id, name, &HEADER, chunks, rows).unwrap()
}

/// A chunk whose rows (unique_id, email, user_name, active) are numbered from `first_row`.
fn chunk(file: i64, tenant: TenantId, chunk_no: u32, first_row: u64, rows: &[Row]) -> Chunk {
    Chunk {
        file_id: ImportFileId(file),
        tenant_id: tenant,
        chunk_no,
        header: HEADER.map(String::from).to_vec(),
        repeated: None,
        rows: rows
            .iter()
            .enumerate()
            .map(|(i, (uid, email, user_name, active))| RawRow {
                row: first_row + i as u64,
                fields: vec![
                    uid.clone(),
                    "sso".into(),
                    email.clone(),
                    user_name.clone(),
                    active.clone(),
                ]
                .into(),
                too_large: None,
            })
            .collect(),
    }
}

fn row(uid: &str, email: &str, user_name: &str, active: &str) -> Row {
    (uid.into(), email.into(), user_name.into(), active.into())
}

/// Imports a chunk; errors the worker retries (transient ones) are retried here too, any
/// other error fails the test. Returns the number of retries.
fn import(conn: &mut PgConnection, chunk: &Chunk) -> u32 {
    for attempt in 0..50 {
        match mui_worker::import::import_chunk(conn, chunk) {
            Ok(outcome) => {
                assert!(outcome.applied);
                return attempt;
            }
            Err(mui_worker::import::ImportError::Db(e)) if mui_shared::db::is_transient(&e) => {}
            Err(e) => panic!(
                "file {} chunk {}: {e}: {:?}",
                chunk.file_id.0,
                chunk.chunk_no,
                std::error::Error::source(&e)
            ),
        }
    }
    panic!(
        "file {} chunk {}: still failing",
        chunk.file_id.0, chunk.chunk_no
    )
}

/// The failure records of `files` in the outbox: row number (with its file) → (code,
/// message) of each error.
fn failures(
    conn: &mut PgConnection,
    files: &[i64],
) -> BTreeMap<(i64, u64), Vec<(RowErrorCode, String)>> {
    let mut out = BTreeMap::new();
    let payloads: Vec<Vec<u8>> = outbox::table.select(outbox::payload).load(conn).unwrap();
    for p in payloads {
        if let NotifyMessage::RowFailuresV1(f) = messages::decode(&p).unwrap() {
            if !files.contains(&f.file_id.0) {
                continue;
            }
            for failure in f.failures {
                let errors = failure
                    .errors
                    .into_iter()
                    .map(|e| (e.code, e.message))
                    .collect();
                let prev = out.insert((f.file_id.0, failure.row), errors);
                assert!(prev.is_none(), "row {} reported twice", failure.row);
            }
        }
    }
    out
}

#[derive(QueryableByName)]
struct Holder {
    #[diesel(sql_type = Text)]
    unique_id: String,
}

/// The users of tenant `t` whose `column`, lowercased, is `value` (lowercased).
fn holders(conn: &mut PgConnection, t: &Tenant, column: &str, value: &str) -> Vec<String> {
    diesel::sql_query(format!(
        "SELECT unique_id FROM users WHERE tenant_id = $1 AND lower({column}) = lower($2) \
         ORDER BY unique_id"
    ))
    .bind::<BigInt, _>(t.id)
    .bind::<Text, _>(value)
    .load::<Holder>(conn)
    .unwrap()
    .into_iter()
    .map(|h| h.unique_id)
    .collect()
}

/// Imports `a` and `b` at the same moment, each on its own connection.
fn at_once(url: &str, a: &Chunk, b: &Chunk) -> u32 {
    let barrier = Barrier::new(2);
    let go = |c: &Chunk| {
        let mut conn = PgConnection::establish(url).unwrap();
        barrier.wait();
        import(&mut conn, c)
    };
    std::thread::scope(|s| {
        let ta = s.spawn(|| go(a));
        let tb = s.spawn(|| go(b));
        ta.join().unwrap() + tb.join().unwrap()
    })
}

/// Two chunks claim one new email (in another case) and one new user name for different
/// users at the same moment: even rounds two chunks of one file, odd rounds two files.
#[test]
fn one_new_value_claimed_by_two_chunks_at_once_goes_to_one_user_and_the_other_row_is_reported() {
    let env = TestEnv::new(AppOptions::default()).unwrap();
    let t = env.tenant("acme").unwrap();
    let mut conn = env.db.conn();
    let mut retries = 0;
    for round in 0..ROUNDS {
        // Each chunk: filler users, then (in the middle) the rows that race.
        let side = |s: &str| -> Vec<Row> {
            let mut rows: Vec<Row> = (0..FILLER)
                .map(|i| {
                    row(
                        &format!("r{round}-{s}{i}"),
                        &format!("{s}{i}.r{round}@example.org"),
                        &format!("{s}{i}r{round}"),
                        "1",
                    )
                })
                .collect();
            let (email, name) = if s == "a" {
                (
                    format!("shared{round}@example.org"),
                    format!("Shared{round}"),
                )
            } else {
                (
                    format!("SHARED{round}@Example.ORG"),
                    format!("shared{round}"),
                )
            };
            let mid = (FILLER / 2) as usize;
            rows.insert(
                mid,
                row(
                    &format!("r{round}-{s}-email"),
                    &email,
                    &format!("{s}x{round}"),
                    "1",
                ),
            );
            rows.insert(
                mid + 1,
                row(
                    &format!("r{round}-{s}-name"),
                    &format!("{s}y{round}@example.org"),
                    &name,
                    "1",
                ),
            );
            rows
        };
        let (a_rows, b_rows) = (side("a"), side("b"));
        let n = a_rows.len() as u64;
        let (files, a, b) = if round % 2 == 0 {
            let f = new_file(&mut conn, &t, &format!("one{round}.csv"), 2, 2 * n as i64);
            (
                vec![f],
                chunk(f, t.tenant_id(), 0, 2, &a_rows),
                chunk(f, t.tenant_id(), 1, 2 + n, &b_rows),
            )
        } else {
            let fa = new_file(&mut conn, &t, &format!("a{round}.csv"), 1, n as i64);
            let fb = new_file(&mut conn, &t, &format!("b{round}.csv"), 1, n as i64);
            (
                vec![fa, fb],
                chunk(fa, t.tenant_id(), 0, 2, &a_rows),
                chunk(fb, t.tenant_id(), 0, 2, &b_rows),
            )
        };
        retries += at_once(&env.db.url, &a, &b);

        let reported = failures(&mut conn, &files);
        let mut losers = BTreeSet::new();
        for (column, what, code) in [
            ("email", "email", RowErrorCode::EmailTaken),
            ("user_name", "name", RowErrorCode::UserNameTaken),
        ] {
            let value = format!(
                "shared{round}{}",
                if what == "email" { "@example.org" } else { "" }
            );
            let held = holders(&mut conn, &t, column, &value);
            assert_eq!(
                held.len(),
                1,
                "round {round}: {column} {value} held by {held:?}"
            );
            let winner = &held[0];
            let loser_side = if winner.ends_with(&format!("a-{what}")) {
                "b"
            } else {
                "a"
            };
            assert_eq!(
                *winner,
                format!(
                    "r{round}-{}-{what}",
                    if loser_side == "a" { "b" } else { "a" }
                )
            );
            // The losing row: the same place in the other chunk.
            let (loser_chunk, loser_rows) = if loser_side == "a" {
                (&a, &a_rows)
            } else {
                (&b, &b_rows)
            };
            let i = loser_rows
                .iter()
                .position(|r| r.0 == format!("r{round}-{loser_side}-{what}"))
                .unwrap();
            let loser_row = loser_chunk.rows[i].row;
            let errors = reported
                .get(&(loser_chunk.file_id.0, loser_row))
                .unwrap_or_else(|| {
                    panic!("round {round}: row {loser_row} not reported: {reported:?}")
                });
            assert_eq!(errors.len(), 1, "round {round}: {errors:?}");
            assert_eq!(errors[0].0, code, "round {round}: {errors:?}");
            assert!(
                errors[0].1.contains(winner.as_str()),
                "round {round}: the message names the holder {winner}: {}",
                errors[0].1
            );
            losers.insert((loser_chunk.file_id.0, loser_row));
        }
        // Nothing else was reported, and every other row was imported (a new user each).
        assert_eq!(
            reported.keys().copied().collect::<BTreeSet<_>>(),
            losers,
            "round {round}"
        );
        let mut imported: BTreeSet<String> =
            a_rows.iter().chain(&b_rows).map(|r| r.0.clone()).collect();
        for (file, row) in &losers {
            let c = if *file == a.file_id.0 && a.rows.iter().any(|r| r.row == *row) {
                &a
            } else {
                &b
            };
            let raw = c.rows.iter().find(|r| r.row == *row).unwrap();
            imported.remove(&raw.fields[0]);
        }
        let stored: BTreeSet<String> = users::table
            .filter(users::tenant_id.eq(t.id))
            .filter(users::unique_id.like(format!("r{round}-%")))
            .select(users::unique_id)
            .load::<String>(&mut conn)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(stored, imported, "round {round}");
        let counted: Vec<(i64, i64)> = import_files::table
            .filter(import_files::id.eq_any(&files))
            .select((import_files::rows_inserted, import_files::rows_failed))
            .load(&mut conn)
            .unwrap();
        let (ins, failed) = counted.iter().fold((0, 0), |(i, f), c| (i + c.0, f + c.1));
        assert_eq!((ins, failed), (2 * n as i64 - 2, 2), "round {round}");
    }
    eprintln!("{ROUNDS} rounds, {retries} retried imports");
}

/// Two users of one chunk swap their emails and user names (in another case), three rotate
/// theirs: the file imports without a failure.
#[test]
fn users_of_one_chunk_may_swap_their_emails_and_user_names() {
    let env = TestEnv::new(AppOptions::default()).unwrap();
    let t = env.tenant("acme").unwrap();
    let mut conn = env.db.conn();
    let f1 = new_file(&mut conn, &t, "before.csv", 1, 5);
    let before = [
        row("p", "p@example.org", "pat", "1"),
        row("q", "q@example.org", "quinn", "1"),
        row("x", "x@example.org", "xan", "1"),
        row("y", "y@example.org", "yves", "1"),
        row("z", "z@example.org", "zoe", "1"),
    ];
    import(&mut conn, &chunk(f1, t.tenant_id(), 0, 2, &before));
    let f2 = new_file(&mut conn, &t, "after.csv", 1, 5);
    let after = [
        row("p", "Q@example.org", "QUINN", "1"),
        row("q", "p@example.org", "pat", "1"),
        row("x", "y@example.org", "yves", "1"),
        row("y", "Z@example.org", "zoe", "1"),
        row("z", "x@example.org", "Xan", "1"),
    ];
    import(&mut conn, &chunk(f2, t.tenant_id(), 0, 2, &after));
    assert_eq!(failures(&mut conn, &[f2]), BTreeMap::new());
    let stored: Vec<(String, Option<String>, Option<String>)> = users::table
        .filter(users::tenant_id.eq(t.id))
        .order(users::unique_id)
        .select((users::unique_id, users::email, users::user_name))
        .load(&mut conn)
        .unwrap();
    let want: Vec<(String, Option<String>, Option<String>)> = after
        .iter()
        .map(|r| (r.0.clone(), Some(r.1.clone()), Some(r.2.clone())))
        .collect();
    assert_eq!(stored, want);
}

/// A swap across two chunks of one file cannot be seen by either chunk (each checks its rows
/// against the users as stored): both rows are reported, neither user changes.
#[test]
fn a_swap_across_two_chunks_is_reported_not_lost() {
    let env = TestEnv::new(AppOptions::default()).unwrap();
    let t = env.tenant("acme").unwrap();
    let mut conn = env.db.conn();
    let f1 = new_file(&mut conn, &t, "before.csv", 1, 2);
    import(
        &mut conn,
        &chunk(
            f1,
            t.tenant_id(),
            0,
            2,
            &[
                row("p", "p@example.org", "", "1"),
                row("q", "q@example.org", "", "1"),
            ],
        ),
    );
    let f2 = new_file(&mut conn, &t, "after.csv", 2, 2);
    let c0 = chunk(
        f2,
        t.tenant_id(),
        0,
        2,
        &[row("p", "q@example.org", "", "1")],
    );
    let c1 = chunk(
        f2,
        t.tenant_id(),
        1,
        3,
        &[row("q", "p@example.org", "", "1")],
    );
    at_once(&env.db.url, &c0, &c1);
    let reported = failures(&mut conn, &[f2]);
    let codes: Vec<(u64, RowErrorCode)> = reported
        .iter()
        .map(|((_, row), e)| (*row, e[0].0))
        .collect();
    assert_eq!(
        codes,
        vec![(2, RowErrorCode::EmailTaken), (3, RowErrorCode::EmailTaken)]
    );
    assert_eq!(holders(&mut conn, &t, "email", "p@example.org"), vec!["p"]);
    assert_eq!(holders(&mut conn, &t, "email", "q@example.org"), vec!["q"]);
}

/// Two tenants importing the same new email and user name at the same moment both keep them.
#[test]
fn another_tenant_may_use_the_same_email_and_user_name() {
    let env = TestEnv::new(AppOptions::default()).unwrap();
    let acme = env.tenant("acme").unwrap();
    let beta = env.tenant("beta").unwrap();
    let mut conn = env.db.conn();
    for round in 0..4 {
        let rows = [row(
            &format!("u{round}"),
            &format!("same{round}@example.org"),
            &format!("same{round}"),
            "1",
        )];
        let fa = new_file(&mut conn, &acme, &format!("a{round}.csv"), 1, 1);
        let fb = new_file(&mut conn, &beta, &format!("b{round}.csv"), 1, 1);
        at_once(
            &env.db.url,
            &chunk(fa, acme.tenant_id(), 0, 2, &rows),
            &chunk(fb, beta.tenant_id(), 0, 2, &rows),
        );
        assert_eq!(failures(&mut conn, &[fa, fb]), BTreeMap::new());
        for t in [&acme, &beta] {
            let email = format!("same{round}@example.org");
            assert_eq!(
                holders(&mut conn, t, "email", &email),
                vec![format!("u{round}")]
            );
            let name = format!("same{round}");
            assert_eq!(
                holders(&mut conn, t, "user_name", &name),
                vec![format!("u{round}")]
            );
        }
    }
}

/// Archived users' values carry the archive suffix and do not take part: two users archived
/// the same year from one address both end archived. A user whose reactivation would give
/// back a value that another user took meanwhile is reported, precisely, and stays archived
/// (this is found after the write, not by the check before it, which sees no value in the row).
#[test]
fn archived_users_do_not_hold_values_and_a_reactivation_that_would_is_reported() {
    let env = TestEnv::new(AppOptions::default()).unwrap();
    let t = env.tenant("acme").unwrap();
    let mut conn = env.db.conn();
    diesel::update(tenants::table.find(t.id))
        .set(tenants::archive_on_inactive.eq(true))
        .execute(&mut conn)
        .unwrap();
    let mut step = 0;
    let mut run = |conn: &mut PgConnection, rows: &[Row]| -> i64 {
        step += 1;
        let f = new_file(conn, &t, &format!("s{step}.csv"), 1, rows.len() as i64);
        import(conn, &chunk(f, t.tenant_id(), 0, 2, rows));
        f
    };
    // b leaves, a arrives with b's old address and user name and leaves the same year.
    let f = run(&mut conn, &[row("b", "y@example.org", "yan", "0")]);
    assert_eq!(failures(&mut conn, &[f]), BTreeMap::new());
    let f = run(&mut conn, &[row("a", "y@example.org", "yan", "1")]);
    assert_eq!(failures(&mut conn, &[f]), BTreeMap::new());
    let f = run(&mut conn, &[row("a", "", "", "0")]);
    assert_eq!(failures(&mut conn, &[f]), BTreeMap::new());
    let archived: Vec<(String, bool)> = users::table
        .filter(users::tenant_id.eq(t.id))
        .order(users::unique_id)
        .select((users::unique_id, users::archived_at.is_not_null()))
        .load(&mut conn)
        .unwrap();
    assert_eq!(archived, vec![("a".into(), true), ("b".into(), true)]);
    // c takes the address; then a comes back with its cells empty: its stored address,
    // without the suffix, is c's now.
    let f = run(&mut conn, &[row("c", "Y@example.org", "cy", "1")]);
    assert_eq!(failures(&mut conn, &[f]), BTreeMap::new());
    let f = run(&mut conn, &[row("a", "", "", "1")]);
    let reported = failures(&mut conn, &[f]);
    let errors = &reported[&(f, 2)];
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, RowErrorCode::EmailTaken);
    assert!(
        errors[0].1.contains("\"y@example.org\"") && errors[0].1.contains("\"c\""),
        "{}",
        errors[0].1
    );
    assert_eq!(holders(&mut conn, &t, "email", "y@example.org"), vec!["c"]);
    let a_archived: bool = users::table
        .find((t.id, "a"))
        .select(users::archived_at.is_not_null())
        .first(&mut conn)
        .unwrap();
    assert!(a_archived, "a stays archived");
}

/// A deployment whose users already share a value: the migration stops, changing nothing,
/// and names every tenant, value and user concerned; once they are resolved it applies.
#[test]
fn the_migration_names_existing_duplicates_instead_of_failing_on_one() {
    const UP: &str =
        include_str!("../../shared/migrations/2026-12-02-000008_unique_identity/up.sql");
    const DOWN: &str =
        include_str!("../../shared/migrations/2026-12-02-000008_unique_identity/down.sql");
    let env = TestEnv::new(AppOptions::default()).unwrap();
    let t = env.tenant("acme").unwrap();
    let other = env.tenant("beta").unwrap();
    let mut conn = env.db.conn();
    conn.batch_execute(DOWN).unwrap();
    for (tenant, uid, email, user_name, archived) in [
        (&t, "d1", "Dup@example.org", "n1", false),
        (&t, "d2", "dup@EXAMPLE.org", "n2", false),
        (&t, "d3", "dup@example.org", "N1", true),
        (&t, "d4", "d4@example.org", "N1", false),
        (&other, "d1", "dup@example.org", "n1", false),
    ] {
        diesel::insert_into(users::table)
            .values((
                users::tenant_id.eq(tenant.id),
                users::unique_id.eq(uid),
                users::login_source.eq("sso"),
                users::email.eq(email),
                users::user_name.eq(user_name),
                users::archived_at.eq(archived.then(chrono::Utc::now)),
                users::last_file_id.eq(1),
                users::last_row.eq(2),
            ))
            .execute(&mut conn)
            .unwrap();
    }
    let err = conn
        .transaction(|conn| conn.batch_execute(UP))
        .unwrap_err()
        .to_string();
    let id = t.id;
    assert!(
        err.contains(&format!(
            "tenant {id} email 'dup@example.org': 2 user(s), unique_id d1, d2\n\
             tenant {id} user_name 'n1': 2 user(s), unique_id d1, d4"
        )),
        "{err}"
    );
    assert!(!err.contains(&format!("tenant {}", other.id)), "{err}");
    diesel::update(users::table.find((t.id, "d2")))
        .set(users::email.eq("d2@example.org"))
        .execute(&mut conn)
        .unwrap();
    diesel::update(users::table.find((t.id, "d4")))
        .set(users::user_name.eq("n4"))
        .execute(&mut conn)
        .unwrap();
    conn.transaction(|conn| conn.batch_execute(UP)).unwrap();
}
