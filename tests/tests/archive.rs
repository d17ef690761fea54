//! Inactive users: archive-on-inactive archives them and releases their permits.

use chrono::Datelike;
use diesel::prelude::*;
use mui_shared::schema::{import_files, permits, tenants, users};
use mui_shared::tenants::Tenant;
use mui_tests::{parse_csv, spawn_app, App, TestEnv};

fn set_archive(env: &TestEnv, t: &Tenant, on: bool) {
    diesel::update(tenants::table.find(t.id))
        .set(tenants::archive_on_inactive.eq(on))
        .execute(&mut env.db.conn())
        .unwrap();
}

fn give_permit(env: &TestEnv, t: &Tenant, uid: &str, number: &str, released: bool) {
    let released_at = released.then(|| chrono::Utc::now() - chrono::Duration::days(400));
    diesel::insert_into(permits::table)
        .values((
            permits::tenant_id.eq(t.id),
            permits::unique_id.eq(uid),
            permits::permit_number.eq(number),
            permits::lot_name.eq("Employee Parking"),
            permits::active_window.eq("O: Perm"),
            permits::state.eq(if released { "released" } else { "active" }),
            permits::released_at.eq(released_at),
        ))
        .execute(&mut env.db.conn())
        .unwrap();
}

/// (permit, state, released_at) of a user, by permit number.
fn permits_of(
    env: &TestEnv,
    t: &Tenant,
    uid: &str,
) -> Vec<(String, String, Option<chrono::DateTime<chrono::Utc>>)> {
    permits::table
        .filter(permits::tenant_id.eq(t.id).and(permits::unique_id.eq(uid)))
        .order(permits::permit_number)
        .select((permits::permit_number, permits::state, permits::released_at))
        .load(&mut env.db.conn())
        .unwrap()
}

/// (first, last, user_name, email, active, archived) of a user.
type Person = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    bool,
    bool,
);

/// A user's row as selected.
type StoredPerson = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    bool,
    Option<chrono::DateTime<chrono::Utc>>,
);

fn person(env: &TestEnv, t: &Tenant, uid: &str) -> Person {
    let (f, l, u, e, a, at): StoredPerson = users::table
        .find((t.id, uid))
        .select((
            users::first_name,
            users::last_name,
            users::user_name,
            users::email,
            users::active,
            users::archived_at,
        ))
        .first(&mut env.db.conn())
        .unwrap();
    (f, l, u, e, a, at.is_some())
}

/// (archived, reactivated, permits released, inserted, updated, unchanged, failed) of the
/// tenant's newest file.
fn last_counts(env: &TestEnv, t: &Tenant) -> (i64, i64, i64, i64, i64, i64, i64) {
    import_files::table
        .filter(import_files::tenant_id.eq(t.id))
        .order(import_files::id.desc())
        .select((
            import_files::users_archived,
            import_files::users_reactivated,
            import_files::permits_released,
            import_files::rows_inserted,
            import_files::rows_updated,
            import_files::rows_unchanged,
            import_files::rows_failed,
        ))
        .first(&mut env.db.conn())
        .unwrap()
}

async fn import(app: &App, t: &Tenant, name: &str, csv: &str) {
    let before = app.env.files(t).len();
    app.env.drop_file(&t.slug, name, csv.as_bytes()).unwrap();
    app.wait_files_settled(t, before + 1).await;
}

fn some(s: &str) -> Option<String> {
    Some(s.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn active_0_archives_releases_permits_once_and_active_1_reactivates() {
    let mut app = spawn_app().await;
    let env = &app.env;
    let t = env.tenant("acme").unwrap();
    set_archive(env, &t, true);
    import(
        &app,
        &t,
        "staff.csv",
        "unique_id,login_source,first_name,last_name,user_name,email,active\n\
        k1,sso,Ken,Thompson,kthompson,ken@acme.example.org,1\n\
        k2,sso,Dennis,Ritchie,dmr,dmr@acme.example.org,1\n",
    )
    .await;
    give_permit(env, &t, "k1", "7512", false);
    give_permit(env, &t, "k1", "7513", false);
    give_permit(env, &t, "k1", "6001", true);
    give_permit(env, &t, "k2", "7600", false);
    let old_release = permits_of(env, &t, "k1")[0].2;

    // Archive.
    import(
        &app,
        &t,
        "leavers.csv",
        "unique_id,login_source,active\nk1,sso,0\n",
    )
    .await;
    let y = chrono::Utc::now().year();
    assert_eq!(
        person(env, &t, "k1"),
        (
            some("Ken"),
            Some(format!("Thompson_{y}")),
            Some(format!("kthompson_{y}")),
            Some(format!("ken@acme.example.org_{y}")),
            false,
            true
        )
    );
    let k1 = permits_of(env, &t, "k1");
    assert_eq!(
        k1.iter().map(|p| p.1.as_str()).collect::<Vec<_>>(),
        ["released", "released", "released"]
    );
    assert_eq!(
        k1[0].2, old_release,
        "an already released permit keeps its release date"
    );
    for p in &k1[1..] {
        let released = p.2.expect("release date recorded");
        assert!(chrono::Utc::now() - released < chrono::Duration::minutes(5));
    }
    assert_eq!(
        permits_of(env, &t, "k2")[0].1,
        "active",
        "another user's permit untouched"
    );
    let c = last_counts(env, &t);
    assert_eq!(
        (c.0, c.1, c.2),
        (1, 0, 2),
        "archived, reactivated, permits released"
    );

    // The same file again changes nothing more.
    let before: Vec<_> = permits_of(env, &t, "k1");
    import(
        &app,
        &t,
        "leavers.csv",
        "unique_id,login_source,active\nk1,sso,0\n",
    )
    .await;
    assert_eq!(
        person(env, &t, "k1").1,
        Some(format!("Thompson_{y}")),
        "no second suffix"
    );
    assert_eq!(permits_of(env, &t, "k1"), before, "no second release");
    let c = last_counts(env, &t);
    assert_eq!(
        (c.0, c.1, c.2, c.4, c.5),
        (0, 0, 0, 0, 1),
        "nothing archived or released again, row unchanged"
    );

    // A row with the names given again, still active=0: the suffix stays exactly once.
    import(
        &app,
        &t,
        "again.csv",
        "unique_id,login_source,last_name,active\nk1,sso,Thompson,0\n",
    )
    .await;
    assert_eq!(person(env, &t, "k1").1, Some(format!("Thompson_{y}")));

    // Reactivation: the suffix comes off, the user is active; released permits stay released.
    import(
        &app,
        &t,
        "back.csv",
        "unique_id,login_source,active\nk1,sso,1\n",
    )
    .await;
    assert_eq!(
        person(env, &t, "k1"),
        (
            some("Ken"),
            some("Thompson"),
            some("kthompson"),
            some("ken@acme.example.org"),
            true,
            false
        )
    );
    assert!(permits_of(env, &t, "k1").iter().all(|p| p.1 == "released"));
    let c = last_counts(env, &t);
    assert_eq!((c.0, c.1, c.2), (0, 1, 0));
    assert!(env.smtp.messages().is_empty(), "no failures, no email");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_setting_off_active_0_only_makes_the_user_inactive() {
    let mut app = spawn_app().await;
    let env = &app.env;
    let t = env.tenant("acme").unwrap();
    import(
        &app,
        &t,
        "staff.csv",
        "unique_id,login_source,last_name,email\nk1,sso,Thompson,ken@acme.example.org\n",
    )
    .await;
    give_permit(env, &t, "k1", "7512", false);
    import(
        &app,
        &t,
        "leavers.csv",
        "unique_id,login_source,active\nk1,sso,0\n",
    )
    .await;
    assert_eq!(
        person(env, &t, "k1"),
        (
            None,
            some("Thompson"),
            None,
            some("ken@acme.example.org"),
            false,
            false
        )
    );
    assert_eq!(permits_of(env, &t, "k1")[0].1, "active");
    let c = last_counts(env, &t);
    assert_eq!(
        (c.0, c.2, c.4),
        (0, 0, 1),
        "stored inactive, nothing archived or released"
    );
    // An empty `active` leaves the state as it is.
    import(
        &app,
        &t,
        "names.csv",
        "unique_id,login_source,first_name,active\nk1,sso,Ken,\n",
    )
    .await;
    assert!(!person(env, &t, "k1").4, "still inactive");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_mixing_archives_reactivations_new_inactive_users_and_failures() {
    let mut app = spawn_app().await;
    let env = &app.env;
    let t = env.tenant("acme").unwrap();
    set_archive(env, &t, true);
    import(
        &app,
        &t,
        "base.csv",
        "unique_id,login_source,last_name,active\na1,sso,Archer,0\na2,sso,Baker,1\n",
    )
    .await;
    give_permit(env, &t, "a2", "100", false);
    give_permit(env, &t, "a2", "101", false);
    give_permit(env, &t, "a2", "102", true);
    import(
        &app,
        &t,
        "mixed.csv",
        "unique_id,login_source,last_name,active\n\
        a1,sso,,1\n\
        a2,sso,,0\n\
        a3,sso,Carter,0\n\
        a4,sso,Dunn,2\n\
        a5,nowhere,Evans,0\n",
    )
    .await;
    let y = chrono::Utc::now().year();
    assert_eq!(
        person(env, &t, "a1").1,
        some("Archer"),
        "reactivated, suffix removed"
    );
    assert!(person(env, &t, "a1").4);
    assert_eq!(person(env, &t, "a2").1, Some(format!("Baker_{y}")));
    assert_eq!(
        person(env, &t, "a3"),
        (None, Some(format!("Carter_{y}")), None, None, false, true),
        "a new inactive user is archived at once"
    );
    let c = last_counts(env, &t);
    assert_eq!(
        (c.0, c.1, c.2, c.6),
        (2, 1, 2, 2),
        "archived, reactivated, released, failed"
    );
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1);
    let body = mails[0].body();
    assert!(
        body.contains("Archived:         2 user(s), 2 permit(s) released"),
        "{body}"
    );
    assert!(body.contains("Reactivated:      1 user(s)"), "{body}");
    let rows = parse_csv(&mails[0].attachments()[0].1);
    let failed: Vec<(&str, &str)> = rows[1..]
        .iter()
        .map(|r| (r[1].as_str(), r[5].as_str()))
        .collect();
    assert_eq!(
        failed,
        [("a4", "invalid_active"), ("a5", "unknown_login_source")]
    );
    app.stop().await;
}
