//! The fixture corpus: one file per case under `tests/fixtures/corpus/`, each with a
//! `.expect` file, all sent through the real pipeline at once (one tenant per case).
//!
//! `.expect` lines: `file_error: CODE`, `rows: N`, `imported: N`, `encoding: LABEL`,
//! `delimiter: comma|semicolon|tab`, `ignored: COLUMN`, `failure: ROW CODE[,CODE…]` (the exact
//! list of failed rows), `user: UNIQUE_ID COLUMN=VALUE` (`\n` for a line break),
//! `message: TEXT` (in the file's error or a failure reason), `attachment: TEXT` (in the
//! failures CSV mailed), `notice: TEXT` (in one of the file's notices), `region: CC` (the
//! tenant's region, set before the file is dropped).

use std::collections::BTreeMap;
use std::path::PathBuf;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Jsonb, Text};
use mui_shared::schema::{import_files, row_failures};
use mui_tests::{spawn_app_with, AppOptions};

#[derive(Debug, Default)]
struct Expect {
    lines: Vec<(String, String)>,
}

impl Expect {
    fn get(&self, key: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

fn corpus() -> BTreeMap<String, (PathBuf, Expect)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/corpus");
    let mut cases = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "expect") {
            continue;
        }
        let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let text = std::fs::read_to_string(dir.join(format!("{stem}.expect"))).unwrap();
        let lines = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (k, v) = l
                    .split_once(':')
                    .unwrap_or_else(|| panic!("{stem}: bad line {l:?}"));
                (k.trim().to_owned(), v.trim().replace("\\n", "\n"))
            })
            .collect();
        cases.insert(stem, (path, Expect { lines }));
    }
    cases
}

#[derive(QueryableByName)]
struct UserJson {
    #[diesel(sql_type = Jsonb)]
    user: serde_json::Value,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_fixture_ends_as_its_expect_file_says() {
    let cases = corpus();
    assert!(
        cases.len() >= 25,
        "the corpus is all there ({})",
        cases.len()
    );
    let mut app = spawn_app_with(AppOptions {
        max_file_rows: 50,
        ..Default::default()
    })
    .await;
    let env = &app.env;
    let mut tenants = Vec::new();
    for (i, (name, (path, expect))) in cases.iter().enumerate() {
        let t = env.tenant(&format!("c{i:02}")).unwrap();
        if let Some(region) = expect.get("region").first() {
            diesel::update(mui_shared::schema::tenants::table.find(t.id))
                .set(mui_shared::schema::tenants::region.eq(*region))
                .execute(&mut env.db.conn())
                .unwrap();
        }
        let file_name = path.file_name().unwrap().to_str().unwrap().to_owned();
        env.drop_file(&t.slug, &file_name, &std::fs::read(path).unwrap())
            .unwrap();
        tenants.push((name.clone(), t));
    }
    for (_, t) in &tenants {
        app.wait_files_settled(t, 1).await;
    }
    let mails = env.smtp.messages();
    let mut conn = env.db.conn();
    let mut problems = Vec::new();
    for ((name, (_, expect)), (_, t)) in cases.iter().zip(&tenants) {
        let mut fail = |what: String| problems.push(format!("{name}: {what}"));
        type File = (
            i64,
            String,
            Option<String>,
            Option<i64>,
            i64,
            i64,
            i64,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<serde_json::Value>,
        );
        let f: File = import_files::table
            .filter(import_files::tenant_id.eq(t.id))
            .select((
                import_files::id,
                import_files::state,
                import_files::error_code,
                import_files::rows_total,
                import_files::rows_inserted,
                import_files::rows_updated,
                import_files::rows_unchanged,
                import_files::error_message,
                import_files::encoding,
                import_files::delimiter,
                import_files::ignored_columns,
            ))
            .first(&mut conn)
            .unwrap();
        let failures: Vec<(i64, serde_json::Value)> = row_failures::table
            .filter(row_failures::file_id.eq(f.0))
            .order(row_failures::row_number)
            .select((row_failures::row_number, row_failures::errors))
            .load(&mut conn)
            .unwrap();
        let failure_lines: Vec<String> = failures
            .iter()
            .map(|(row, errors)| {
                let codes: Vec<&str> = errors
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["code"].as_str().unwrap())
                    .collect();
                format!("{row} {}", codes.join(","))
            })
            .collect();
        let reasons: Vec<String> = failures
            .iter()
            .flat_map(|(_, e)| {
                e.as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["message"].as_str().unwrap().to_owned())
                    .collect::<Vec<_>>()
            })
            .collect();
        let mail: Vec<_> = mails
            .iter()
            .filter(|m| m.to == [format!("it@{}.example.org", t.slug)])
            .collect();

        let notices: Vec<String> = import_files::table
            .find(f.0)
            .select(import_files::notices)
            .first(&mut conn)
            .unwrap();
        match expect.get("file_error").first() {
            Some(code) => {
                if f.1 != "failed" || f.2.as_deref() != Some(*code) {
                    fail(format!(
                        "expected file error {code}, got state {} code {:?}",
                        f.1, f.2
                    ));
                }
                if mail.len() != 1 {
                    fail(format!("expected one email, got {}", mail.len()));
                }
            }
            None => {
                if f.1 != "done" {
                    fail(format!("expected done, got {} ({:?})", f.1, f.7));
                }
                let want: Vec<String> = expect
                    .get("failure")
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                if failure_lines != want {
                    fail(format!("failures {failure_lines:?}, expected {want:?}"));
                }
                // A report goes out for failures, and for a notice the tenant must read.
                let want_mails = usize::from(!want.is_empty() || !notices.is_empty());
                if mail.len() != want_mails {
                    fail(format!(
                        "expected {want_mails} email(s), got {}",
                        mail.len()
                    ));
                }
            }
        }
        if let Some(n) = expect.get("rows").first() {
            if f.3 != Some(n.parse().unwrap()) {
                fail(format!("rows {:?}, expected {n}", f.3));
            }
        }
        if let Some(n) = expect.get("imported").first() {
            let imported = f.4 + f.5 + f.6;
            if imported != n.parse::<i64>().unwrap() {
                fail(format!("imported {imported}, expected {n}"));
            }
        }
        if let Some(e) = expect.get("encoding").first() {
            if f.8.as_deref() != Some(*e) {
                fail(format!("encoding {:?}, expected {e}", f.8));
            }
        }
        if let Some(d) = expect.get("delimiter").first() {
            if f.9.as_deref() != Some(*d) {
                fail(format!("delimiter {:?}, expected {d}", f.9));
            }
        }
        for col in expect.get("ignored") {
            let ignored = f.10.clone().unwrap_or_default();
            if !ignored
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v == col))
            {
                fail(format!("ignored columns {ignored}, expected {col}"));
            }
        }
        for m in expect.get("message") {
            let in_error = f.7.as_deref().is_some_and(|e| e.contains(m));
            if !in_error && !reasons.iter().any(|r| r.contains(m)) {
                fail(format!(
                    "no message contains {m:?} (error {:?}, reasons {reasons:?})",
                    f.7
                ));
            }
        }
        for n in expect.get("notice") {
            if !notices.iter().any(|x| x.contains(n)) {
                fail(format!("no notice contains {n:?} (notices {notices:?})"));
            }
        }
        if expect.get("notice").is_empty() && !notices.is_empty() {
            fail(format!("unexpected notices {notices:?}"));
        }
        for a in expect.get("attachment") {
            let found = mail.iter().any(|m| {
                m.attachments()
                    .iter()
                    .any(|(_, bytes)| String::from_utf8_lossy(bytes).contains(a))
            });
            if !found {
                fail(format!("no attachment contains {a:?}"));
            }
        }
        for u in expect.get("user") {
            let (uid, rest) = u.split_once(' ').unwrap();
            let (col, value) = rest.split_once('=').unwrap();
            let row: Option<UserJson> = diesel::sql_query(
                "SELECT to_jsonb(u) AS user FROM users u WHERE tenant_id = $1 AND unique_id = $2",
            )
            .bind::<BigInt, _>(t.id)
            .bind::<Text, _>(uid)
            .get_result(&mut conn)
            .optional()
            .unwrap();
            let got = row
                .as_ref()
                .and_then(|r| r.user.get(col))
                .and_then(|v| v.as_str())
                .map(str::to_owned);
            if got.as_deref() != Some(value) {
                fail(format!("user {uid} {col} = {got:?}, expected {value:?}"));
            }
        }
    }
    app.stop().await;
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}
