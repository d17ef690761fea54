//! The mass-deactivation guard (issue 17): a file that would deactivate more than the
//! tenant's threshold is held before any change, the tenant's later files wait behind it,
//! and the operator's approve imports it exactly once, reject drops it; both idempotent.

use axum::http::{Method, StatusCode};
use diesel::prelude::*;
use mui_shared::domain::ImportFileId;
use mui_shared::files::FileState;
use mui_shared::holds::{self, HoldError, Outcome};
use mui_shared::schema::{chunk_queue, file_chunks, import_files, tenants};
use mui_shared::tenants::Tenant;
use mui_tests::{parse_csv, spawn_app, App, FileRow, TestEnv};

use crate::console::Console;

/// A tenant with `n` active users u01.. and the guard at 10 % and more than 2 users.
async fn tenant_with_users(app: &App, n: usize) -> Tenant {
    let env = &app.env;
    let t = env.tenant("acme").unwrap();
    diesel::update(tenants::table.find(t.id))
        .set((
            tenants::guard_percent.eq(10),
            tenants::guard_min_users.eq(2),
            tenants::archive_on_inactive.eq(true),
        ))
        .execute(&mut env.db.conn())
        .unwrap();
    let mut csv = String::from("unique_id,login_source,first_name,active\n");
    for i in 1..=n {
        csv.push_str(&format!("u{i:02},sso,User{i},1\n"));
    }
    env.drop_file(&t.slug, "seed.csv", csv.as_bytes()).unwrap();
    app.wait_files_settled(&t, 1).await;
    env.tenant_reload(&t)
}

trait Reload {
    fn tenant_reload(&self, t: &Tenant) -> Tenant;
}

impl Reload for TestEnv {
    fn tenant_reload(&self, t: &Tenant) -> Tenant {
        mui_shared::tenants::find(&mut self.db.conn(), t.tenant_id())
            .unwrap()
            .unwrap()
    }
}

fn file(env: &TestEnv, t: &Tenant, name: &str) -> FileRow {
    env.files(t)
        .into_iter()
        .find(|f| f.file_name == name)
        .unwrap_or_else(|| panic!("no file {name}"))
}

fn queued(env: &TestEnv, id: i64) -> i64 {
    chunk_queue::table
        .filter(chunk_queue::file_id.eq(id))
        .count()
        .get_result(&mut env.db.conn())
        .unwrap()
}

/// (unique_id, first_name, active) of every user.
fn people(env: &TestEnv, t: &Tenant) -> Vec<(String, Option<String>, bool)> {
    env.users(t).into_iter().map(|u| (u.0, u.2, u.5)).collect()
}

const LEAVERS: &str = "unique_id,login_source,active\nu01,sso,0\nu02,sso,0\nu03,sso,0\nu04,sso,0\nu05,sso,0\nu06,sso,1\n";
const LATER: &str = "unique_id,login_source,first_name\nu01,sso,Renamed\nu11,sso,Later\n";

/// Drops the leavers file (5 of 10 active users to deactivate) and a later file, waits until
/// the leavers are held and mailed and the later file is queued; checks that nothing
/// changed. Returns the held file and the later file.
async fn hold_leavers(app: &App, t: &Tenant) -> (FileRow, FileRow) {
    let env = &app.env;
    let before = people(env, t);
    env.drop_file(&t.slug, "leavers.csv", LEAVERS.as_bytes())
        .unwrap();
    env.wait_until(120, "leavers.csv held and the tenant mailed", || {
        env.files(t)
            .iter()
            .any(|f| f.file_name == "leavers.csv" && f.is_held())
            && env
                .smtp
                .messages()
                .iter()
                .any(|m| m.subject().contains("ON HOLD"))
    })
    .await;
    env.drop_file(&t.slug, "later.csv", LATER.as_bytes())
        .unwrap();
    env.wait_until(120, "later.csv queued behind the held file", || {
        env.files(t).iter().any(|f| {
            f.file_name == "later.csv" && f.total_chunks.is_some() && f.archived_name.is_some()
        })
    })
    .await;
    // Give the dispatcher rounds in which it could (wrongly) hand either file out.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let held = file(env, t, "leavers.csv");
    let later = file(env, t, "later.csv");
    assert!(held.is_held());
    assert_eq!(
        (held.hold_users, held.hold_active_users),
        (Some(5), Some(10))
    );
    assert_eq!(held.chunks_done, 0, "nothing of the held file is imported");
    assert!(held.archived_name.is_some(), "the held file is in bak/");
    assert_eq!(queued(env, held.id), i64::from(held.total_chunks.unwrap()));
    assert_eq!(
        later.chunks_done, 0,
        "the later file waits behind the held one"
    );
    assert_eq!(
        queued(env, later.id),
        i64::from(later.total_chunks.unwrap())
    );
    assert_ne!(later.state, FileState::Done);
    assert_eq!(people(env, t), before, "nothing changed while held");

    let mails: Vec<_> = env
        .smtp
        .messages()
        .into_iter()
        .filter(|m| m.subject().contains("ON HOLD"))
        .collect();
    assert_eq!(mails.len(), 1, "one held mail");
    assert!(
        mails[0].subject().contains("5 of your 10 active users"),
        "{}",
        mails[0].subject()
    );
    let list = parse_csv(&mails[0].attachments()[0].1);
    let uids: Vec<&str> = list.iter().skip(1).map(|r| r[0].as_str()).collect();
    assert_eq!(uids, ["u01", "u02", "u03", "u04", "u05"]);
    assert_eq!(list[1][1], "User1", "the list names the users");
    (held, later)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_file_changes_nothing_until_approved_then_imports_once_before_later_files() {
    let mut app = spawn_app().await;
    let t = tenant_with_users(&app, 10).await;
    let env = &app.env;
    let (held, _later) = hold_leavers(&app, &t).await;

    // Approved from the file's own page in the console (the HTML form, as a browser posts it).
    let console = Console::new(&env.db.url);
    let (cookie, csrf) = console.login().await;
    let page = console.get(&format!("/files/{}", held.id), &cookie).await;
    assert!(
        page.body.contains("value=\"approve\"") && page.body.contains("value=\"reject\""),
        "a held file's page offers the decision: {}",
        page.body
    );
    let form = format!(
        "csrf={csrf}&tenant={}&file={}&decision=approve",
        t.slug, held.id
    );
    let r = console
        .call(
            Method::POST,
            "/held/decide",
            Some(&cookie),
            Some(&form),
            false,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains("approved now"), "{}", r.body);
    let mut conn = env.db.conn();
    assert_eq!(
        holds::approve(&mut conn, ImportFileId(held.id), "tester").unwrap(),
        Outcome::Already,
        "approving twice changes nothing"
    );
    let by: Option<String> = import_files::table
        .find(held.id)
        .select(import_files::hold_decided_by)
        .first(&mut conn)
        .unwrap();
    assert_eq!(by.as_deref(), Some("console"));
    let files = app.wait_files_settled(&t, 3).await;
    let leavers = &files[1];
    let later = &files[2];
    assert_eq!(leavers.file_name, "leavers.csv");
    assert_eq!(leavers.state, FileState::Done);
    assert_eq!(leavers.hold.as_deref(), Some("approved"));
    assert_eq!(
        (
            leavers.users_archived,
            leavers.rows_updated,
            leavers.rows_unchanged
        ),
        (5, 5, 1),
        "imported as uploaded, once"
    );
    let markers: i64 = file_chunks::table
        .filter(file_chunks::file_id.eq(leavers.id))
        .count()
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(markers, i64::from(leavers.total_chunks.unwrap()));
    assert_eq!(leavers.chunks_done, leavers.total_chunks.unwrap());
    // Arrival order: the later file ran after the leavers (it renamed an archived user,
    // which keeps the archive suffix rules) and both are done.
    assert_eq!(later.state, FileState::Done);
    let later_queued: Option<chrono::DateTime<chrono::Utc>> = import_files::table
        .find(later.id)
        .select(import_files::finished_at)
        .first(&mut conn)
        .unwrap();
    assert!(
        later_queued >= leavers.finished_at,
        "later.csv finished after leavers.csv"
    );
    let people = people(env, &t);
    let inactive: Vec<&str> = people
        .iter()
        .filter(|p| !p.2)
        .map(|p| p.0.as_str())
        .collect();
    assert_eq!(inactive, ["u01", "u02", "u03", "u04", "u05"]);
    assert_eq!(people[0].1.as_deref(), Some("Renamed"));
    assert!(people.iter().any(|p| p.0 == "u11"));
    // A decision taken cannot be turned round.
    assert!(matches!(
        holds::reject(&mut conn, ImportFileId(held.id), "tester"),
        Err(HoldError::Decided { .. })
    ));
    // A file never held has nothing to approve.
    assert!(matches!(
        holds::approve(&mut conn, ImportFileId(later.id), "tester"),
        Err(HoldError::NotHeld(_))
    ));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_rejected_in_the_console_changes_nothing_is_mailed_and_lets_later_files_through() {
    let mut app = spawn_app().await;
    let t = tenant_with_users(&app, 10).await;
    let env = &app.env;
    let before = people(env, &t);
    let (held, _later) = hold_leavers(&app, &t).await;
    let other = env.tenant("other").unwrap();

    // The operator finds the file on the console's held page and rejects it there.
    let console = Console::new(&env.db.url);
    let (cookie, csrf) = console.login().await;
    let page = console.json("/held?format=json", &cookie).await;
    let waiting = page["awaiting_decision"].as_array().unwrap();
    assert_eq!(waiting.len(), 1, "{page}");
    assert_eq!(waiting[0]["id"], held.id);
    assert_eq!(waiting[0]["tenant"], "acme");
    assert_eq!(waiting[0]["hold_users"], 5);
    assert_eq!(
        console.json("/?format=json", &cookie).await["awaiting_decision"],
        1
    );
    let html = console.get("/held", &cookie).await;
    assert!(
        html.body.contains("action=\"/held/decide\""),
        "the held page offers the decision: {}",
        html.body
    );
    let decide = |csrf: &str, tenant: &str, decision: &str| {
        format!(
            "csrf={csrf}&tenant={tenant}&file={}&decision={decision}",
            held.id
        )
    };
    let post = |form: String| {
        let console = &console;
        let cookie = cookie.clone();
        async move {
            console
                .call(
                    Method::POST,
                    "/held/decide",
                    Some(&cookie),
                    Some(&form),
                    true,
                )
                .await
        }
    };
    let r = post(decide("", "acme", "reject")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "no CSRF token: {}", r.body);
    let r = post(decide(&csrf, &other.slug, "reject")).await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "another tenant's file: {}",
        r.body
    );
    let r = post(decide(&csrf, "acme", "maybe")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(
        env.files(&t).iter().any(|f| f.id == held.id && f.is_held()),
        "refused actions change nothing"
    );
    let r = post(decide(&csrf, "acme", "reject")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["done_now"], true, "{v}");
    let r = post(decide(&csrf, "acme", "reject")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["done_now"], false, "rejecting twice changes nothing: {v}");
    let r = post(decide(&csrf, "acme", "approve")).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(r.body.contains("rejected already by console"), "{}", r.body);

    let mut conn = env.db.conn();
    assert_eq!(
        holds::reject(&mut conn, ImportFileId(held.id), "tester").unwrap(),
        Outcome::Already,
        "muictl sees the console's decision"
    );
    assert!(matches!(
        holds::approve(&mut conn, ImportFileId(held.id), "tester"),
        Err(HoldError::Decided { .. })
    ));
    let files = app.wait_files_settled(&t, 3).await;
    let leavers = &files[1];
    assert_eq!(leavers.state, FileState::Failed);
    assert_eq!(leavers.hold.as_deref(), Some("rejected"));
    assert_eq!(leavers.chunks_done, 0);
    assert_eq!(queued(env, leavers.id), 0, "its chunks are dropped");
    assert_eq!(
        files[2].state,
        FileState::Done,
        "the later file went through"
    );
    // Nothing of the rejected file: everyone still active; only the later file's change.
    let after = people(env, &t);
    assert!(after.iter().all(|p| p.2), "{after:?}");
    assert_eq!(after.len(), before.len() + 1);
    assert_eq!(after[0].1.as_deref(), Some("Renamed"));
    let rejected: Vec<_> = env
        .smtp
        .messages()
        .into_iter()
        .filter(|m| m.subject().contains("\"leavers.csv\" failed"))
        .collect();
    assert_eq!(rejected.len(), 1, "one rejection mail");
    assert!(
        rejected[0].body().contains("operator rejected it"),
        "{}",
        rejected[0].body()
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_the_threshold_or_switched_off_a_file_imports_at_once() {
    let mut app = spawn_app().await;
    let t = tenant_with_users(&app, 10).await;
    let env = &app.env;
    // 2 users: not more than the minimum of 2.
    env.drop_file(
        &t.slug,
        "two.csv",
        b"unique_id,login_source,active\nu01,sso,0\nu02,sso,0\n",
    )
    .unwrap();
    let files = app.wait_files_settled(&t, 2).await;
    assert_eq!(files[1].hold, None);
    assert_eq!(files[1].users_archived, 2);
    // Off: 5 more would be held at 10 %, not at 0.
    diesel::update(tenants::table.find(t.id))
        .set(tenants::guard_percent.eq(0))
        .execute(&mut env.db.conn())
        .unwrap();
    env.drop_file(
        &t.slug,
        "five.csv",
        b"unique_id,login_source,active\nu03,sso,0\nu04,sso,0\nu05,sso,0\nu06,sso,0\nu07,sso,0\n",
    )
    .unwrap();
    let files = app.wait_files_settled(&t, 3).await;
    assert_eq!(files[2].hold, None);
    assert_eq!(files[2].users_archived, 5);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dry_run_is_never_held_but_says_that_its_import_would_be() {
    let mut app = spawn_app().await;
    let t = tenant_with_users(&app, 10).await;
    let env = &app.env;
    let before = people(env, &t);
    env.drop_file(&t.slug, "leavers.validate.csv", LEAVERS.as_bytes())
        .unwrap();
    let files = app.wait_files_settled(&t, 2).await;
    let dry = &files[1];
    assert!(dry.dry_run);
    assert_eq!(dry.hold, None, "a dry run is never held");
    assert_eq!(dry.state, FileState::Done);
    assert_eq!(dry.users_archived, 5, "what the import would do");
    assert_eq!(people(env, &t), before, "nothing changed");
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1);
    assert!(mails[0].subject().starts_with("Validation of"));
    assert!(
        mails[0]
            .body()
            .contains("would be HELD by the mass-deactivation guard")
            && mails[0].body().contains("5 of your 10 active users"),
        "{}",
        mails[0].body()
    );
    app.stop().await;
}
