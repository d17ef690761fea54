//! Dry run (`*.validate.csv`), the report's HTML part, per-tenant header names and the
//! success mail (issue 17), through the real pipeline.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use mui_shared::schema::{permits, tenants};
use mui_shared::tenants::Tenant;
use mui_tests::{parse_csv, spawn_app, App, FileRow, ReceivedMail, TestEnv};

#[derive(QueryableByName)]
struct Json {
    #[diesel(sql_type = Text)]
    j: String,
}

/// Every stored column of the tenant's users and permits, as JSON text: the state a dry
/// run must not change.
fn snapshot(env: &TestEnv, t: &Tenant) -> (Vec<String>, Vec<String>) {
    let mut conn = env.db.conn();
    let users: Vec<Json> = diesel::sql_query(
        "SELECT row_to_json(u)::text AS j FROM users u WHERE tenant_id = $1 ORDER BY unique_id",
    )
    .bind::<BigInt, _>(t.id)
    .load(&mut conn)
    .unwrap();
    let permits: Vec<Json> = diesel::sql_query(
        "SELECT row_to_json(p)::text AS j FROM permits p WHERE tenant_id = $1 ORDER BY id",
    )
    .bind::<BigInt, _>(t.id)
    .load(&mut conn)
    .unwrap();
    (
        users.into_iter().map(|r| r.j).collect(),
        permits.into_iter().map(|r| r.j).collect(),
    )
}

fn give_permit(env: &TestEnv, t: &Tenant, uid: &str, number: &str) {
    diesel::insert_into(permits::table)
        .values((
            permits::tenant_id.eq(t.id),
            permits::unique_id.eq(uid),
            permits::permit_number.eq(number),
            permits::lot_name.eq("Employee Parking"),
            permits::state.eq("active"),
        ))
        .execute(&mut env.db.conn())
        .unwrap();
}

async fn import(app: &App, t: &Tenant, name: &str, csv: &str) -> FileRow {
    let before = app.env.files(t).len();
    app.env.drop_file(&t.slug, name, csv.as_bytes()).unwrap();
    let files = app.wait_files_settled(t, before + 1).await;
    files.last().unwrap().clone()
}

/// The counts a report gives.
fn counts(f: &FileRow) -> [i64; 8] {
    [
        f.rows_total.unwrap_or(-1),
        f.rows_inserted,
        f.rows_updated,
        f.rows_unchanged,
        f.rows_failed,
        f.users_archived,
        f.users_reactivated,
        f.permits_released,
    ]
}

fn mail_about(env: &TestEnv, needle: &str) -> ReceivedMail {
    let mails: Vec<ReceivedMail> = env
        .smtp
        .messages()
        .into_iter()
        .filter(|m| m.subject().contains(needle))
        .collect();
    assert_eq!(mails.len(), 1, "one mail about {needle:?}");
    mails.into_iter().next().unwrap()
}

fn csv_attachment(m: &ReceivedMail) -> Vec<u8> {
    let atts = m.attachments();
    assert_eq!(atts.len(), 1, "one attachment");
    atts[0].1.clone()
}

/// The file of the comparison: six chunks of three rows (the test app cuts chunks of 3),
/// with an update, an unchanged user, an archive releasing permits, a reactivation, new
/// users, a `unique_id` repeated across chunks (the later row wins), an email taken by an
/// existing user, two new users of one chunk claiming one email, and rows that fail their
/// checks.
const NIGHTLY: &str = "unique_id,login_source,first_name,last_name,email,active\n\
    k1,sso,Ken,Thompson,ken@acme.example.org,1\n\
    k2,sso,Dennis,Ritchie,dmr@acme.example.org,0\n\
    k3,sso,Brian,Kernighan-Changed,bwk@acme.example.org,1\n\
    k4,sso,Rob,Pike,rob@acme.example.org,1\n\
    n1,sso,New,One,n1@acme.example.org,1\n\
    n2,bogus,New,Two,n2@acme.example.org,1\n\
    n3,sso,New,Three,ken@acme.example.org,1\n\
    n4,sso,New,Four,n4@acme.example.org,\n\
    n1,sso,New,One-Later,n1@acme.example.org,1\n\
    n5,sso,New,Five,same@acme.example.org,1\n\
    n6,sso,New,Six,same@acme.example.org,1\n\
    n7,local,New,Seven,n7@acme.example.org,7\n\
    k5,sso,Old,Archived,,1\n\
    n8,sso,New,Eight,,1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dry_run_changes_nothing_and_its_counts_and_failures_are_the_real_imports() {
    let mut app = spawn_app().await;
    let env = &app.env;
    let t = env.tenant("acme").unwrap();
    diesel::update(tenants::table.find(t.id))
        .set(tenants::archive_on_inactive.eq(true))
        .execute(&mut env.db.conn())
        .unwrap();
    import(
        &app,
        &t,
        "seed.csv",
        "unique_id,login_source,first_name,last_name,email,active\n\
         k1,sso,Ken,Thompson,ken@acme.example.org,1\n\
         k2,sso,Dennis,Ritchie,dmr@acme.example.org,1\n\
         k3,sso,Brian,Kernighan,bwk@acme.example.org,1\n\
         k4,sso,Rob,Pike,rob@acme.example.org,1\n\
         k5,sso,Old,Archived,old@acme.example.org,0\n",
    )
    .await;
    give_permit(env, &t, "k2", "7512");
    give_permit(env, &t, "k2", "7513");
    let before = snapshot(env, &t);
    assert_eq!(before.0.len(), 5);

    let dry = import(&app, &t, "nightly.VALIDATE.csv", NIGHTLY).await;
    assert!(dry.dry_run, "the name asks for a dry run");
    assert_eq!(dry.state, mui_shared::files::FileState::Done);
    assert_eq!(
        snapshot(env, &t),
        before,
        "a dry run changes no user and no permit"
    );
    assert!(
        dry.archived_name
            .as_deref()
            .is_some_and(|n| n.contains("nightly.VALIDATE")),
        "the dry run is kept in bak/ like any file: {:?}",
        dry.archived_name
    );
    assert!(env
        .folder(&t.slug)
        .join("bak")
        .join(dry.archived_name.as_deref().unwrap())
        .exists());
    let dry_mail = mail_about(env, "Validation of \"nightly.VALIDATE.csv\"");
    assert!(
        dry_mail.body().contains("VALIDATION ONLY")
            && dry_mail.body().contains("NOTHING WAS CHANGED"),
        "{}",
        dry_mail.body()
    );

    let real = import(&app, &t, "nightly.csv", NIGHTLY).await;
    assert!(!real.dry_run);
    assert_eq!(
        counts(&dry),
        counts(&real),
        "the dry run's counts are the real import's (rows, new, updated, unchanged, failed, archived, reactivated, permits released)"
    );
    // The comparison is not vacuous: every kind of count is there.
    assert_eq!(
        counts(&real),
        [14, 4, 3, 2, 5, 1, 1, 2],
        "the real import: {real:?}"
    );
    assert_ne!(snapshot(env, &t), before, "the real import changed users");
    let real_mail = mail_about(env, "User import \"nightly.csv\"");
    // Row, codes and reasons. (A row that lost to a later row of another chunk is shown
    // with its stored values, and says so, when its chunk committed first: the real import
    // commits chunks in either order, the dry run in file order. A known limit of the real
    // import, docs/architecture.md; the note is left out of the comparison.)
    let failures = |m: &ReceivedMail| -> Vec<(String, String, String)> {
        let rows = parse_csv(&csv_attachment(m));
        let code = rows[0].iter().position(|h| h == "error_code").unwrap();
        let reason = rows[0].iter().position(|h| h == "reason").unwrap();
        rows.iter()
            .skip(1)
            .map(|r| {
                let why =
                    r[reason].replace(" (values shown as they were stored from this row)", "");
                (r[0].clone(), r[code].clone(), why)
            })
            .collect()
    };
    assert_eq!(
        failures(&dry_mail),
        failures(&real_mail),
        "the dry run reports the real import's failures"
    );
    let reported: Vec<String> = failures(&real_mail).into_iter().map(|f| f.0).collect();
    assert_eq!(reported.len(), 5, "{reported:?}");
    for row in ["6", "7", "8", "13"] {
        assert!(
            reported.contains(&row.to_owned()),
            "row {row} in {reported:?}"
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dry_run_of_a_broken_file_says_it_would_not_import() {
    let mut app = spawn_app().await;
    let env = &app.env;
    let t = env.tenant("acme").unwrap();
    let f = import(&app, &t, "x.validate.csv", "unique_id,first_name\nu1,Ann\n").await;
    assert!(f.dry_run);
    assert_eq!(f.state, mui_shared::files::FileState::Failed);
    let m = mail_about(env, "Validation of \"x.validate.csv\"");
    assert!(m.subject().contains("would NOT import"), "{}", m.subject());
    assert!(m.body().contains("login_source"), "{}", m.body());
    assert!(env.users(&t).is_empty());
    app.stop().await;
}

/// Strips tags and decodes the entities maud writes.
fn text_of(cell: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in cell.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// The rows of the failures table: cells of each `<tr>` in `<tbody>`.
fn html_table(html: &str) -> Vec<Vec<String>> {
    let body = html
        .split("<tbody>")
        .nth(1)
        .and_then(|b| b.split("</tbody>").next())
        .expect("a failures table");
    body.split("<tr>")
        .skip(1)
        .map(|tr| {
            tr.split("<td")
                .skip(1)
                .map(|td| {
                    let inner = td.split_once('>').map(|x| x.1).unwrap_or("");
                    text_of(inner.split("</td>").next().unwrap_or(""))
                })
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_html_part_parses_escapes_tenant_values_and_its_table_matches_the_csv() {
    let mut app = spawn_app().await;
    let env = &app.env;
    let t = env.tenant("acme").unwrap();
    let hostile = "<script>alert('x')</script>@example.org";
    import(
        &app,
        &t,
        "<b onmouseover=x>staff.csv",
        &format!(
            "unique_id,login_source,email,user_type_id,active\n\
             u1,sso,\"{hostile}\",1,1\n\
             u2,nowhere,u2@example.org,1,1\n\
             u3,sso,u3@example.org,9,1\n\
             u4,sso,u4@example.org,1,1\n\
             u5,sso,bad,1,yes\n"
        ),
    )
    .await;
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1);
    let m = &mails[0];
    let parsed = m.parsed();
    let html = parsed.body_html(0).expect("an HTML part").to_string();
    let text = parsed.body_text(0).expect("a text part").to_string();
    assert!(text.contains("4 of 5 rows failed") || m.subject().contains("4 of 5"));
    // The structure: multipart/mixed holding multipart/alternative (text, HTML) and the CSV.
    let raw = String::from_utf8_lossy(&m.data).to_lowercase();
    assert!(raw.contains("multipart/alternative"), "{raw}");
    assert!(raw.contains("text/html"));
    // Escaped, never markup; nothing remote.
    assert!(!html.contains("<script>"), "{html}");
    assert!(!html.contains("<b onmouseover"), "{html}");
    assert!(html.contains("&lt;script&gt;"), "{html}");
    assert!(html.contains("&lt;b onmouseover=x&gt;staff.csv"), "{html}");
    for remote in ["src=\"http", "href=\"http", "<img", "<link", "url("] {
        assert!(!html.contains(remote), "{remote} in {html}");
    }
    // The table is the CSV's rows: row number and reason, in order.
    let table = html_table(&html);
    let csv = parse_csv(&m.attachments()[0].1);
    let reason = csv[0].iter().position(|h| h == "reason").unwrap();
    let from_csv: Vec<(String, String)> = csv
        .iter()
        .skip(1)
        .map(|r| (r[0].clone(), r[reason].clone()))
        .collect();
    let from_html: Vec<(String, String)> =
        table.iter().map(|r| (r[0].clone(), r[3].clone())).collect();
    assert_eq!(from_html, from_csv);
    assert_eq!(from_html.len(), 4);
    // The value column shows the row's value in the column named.
    let u1 = &table[0];
    assert_eq!(u1[1], "email");
    assert_eq!(u1[2], hostile);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenants_own_header_names_import_and_are_shown_in_the_report() {
    let mut app = spawn_app().await;
    let env = &app.env;
    let t = env.tenant("acme").unwrap();
    diesel::update(tenants::table.find(t.id))
        .set(tenants::header_aliases.eq(serde_json::json!({
            "employee_id": "unique_id",
            "sso": "login_source",
            "given_name": "first_name",
        })))
        .execute(&mut env.db.conn())
        .unwrap();
    import(
        &app,
        &t,
        "hr-export.csv",
        "Employee ID,SSO,Given Name,Email\nE100,sso,Ann,ann@example.org\nE101,nowhere,Bob,bob@example.org\n",
    )
    .await;
    let users = env.users(&t);
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].0, "E100");
    assert_eq!(users[0].2.as_deref(), Some("Ann"));
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1);
    let body = mails[0].body();
    assert!(
        body.contains("\"Employee ID\" read as unique_id")
            && body.contains("\"SSO\" read as login_source"),
        "{body}"
    );
    let csv = parse_csv(&mails[0].attachments()[0].1);
    assert_eq!(
        &csv[0][1..4],
        ["Employee ID", "SSO", "Given Name"],
        "the tenant's own names"
    );
    assert_eq!(csv[1][0], "3");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clean_import_is_mailed_only_when_the_tenant_asked_for_it() {
    let mut app = spawn_app().await;
    let env = &app.env;
    let quiet = env.tenant("quiet").unwrap();
    let loud = env.tenant("loud").unwrap();
    diesel::update(tenants::table.find(loud.id))
        .set(tenants::success_mail.eq(true))
        .execute(&mut env.db.conn())
        .unwrap();
    let csv = "unique_id,login_source\nu1,sso\nu2,sso\n";
    import(&app, &quiet, "a.csv", csv).await;
    import(&app, &loud, "a.csv", csv).await;
    assert!(env.smtp.messages_to("it@quiet.example.org").is_empty());
    let mails = env.smtp.messages_to("it@loud.example.org");
    assert_eq!(mails.len(), 1);
    assert!(
        mails[0].subject().contains("0 of 2 rows failed"),
        "{}",
        mails[0].subject()
    );
    assert!(mails[0].attachments().is_empty());
    assert!(mails[0].parsed().body_html(0).is_some());
    app.stop().await;
}
