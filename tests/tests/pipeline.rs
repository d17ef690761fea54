//! The pipeline end to end: drop folder → RabbitMQ → PostgreSQL → SMTP.
//!
//! (Over 400 lines: one user story per test, each readable alone; splitting them would only
//! scatter the story.)

use mui_shared::files::{FileState, NotifyStatus};
use mui_tests::{parse_csv, spawn_app};

const GOOD_AND_BAD: &str = "\
unique_id,login_source,first_name,last_name,email,active,user_type_id
e1,sso,Ada,Lovelace,ada@example.org,1,1
e2,SSO,Alan,Turing,alan@example.org,1,2
e3,local,Grace,Hopper,grace@example.org,,
e4,ldap,Edsger,Dijkstra,edsger@example.org,1,1
e5,sso,Barbara,Liskov,not-an-email,1,1
e6,sso,Donald,Knuth,don@example.org,yes,1
,sso,No,Id,noid@example.org,1,1
e7,sso,Ken,Thompson,ken@example.org,0,1
e8,sso,Dennis,Ritchie,dennis@example.org,1,9
";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn good_rows_land_bad_rows_are_mailed_once_and_the_file_is_archived() {
    let mut app = spawn_app().await;
    let env = &app.env;
    let acme = env.tenant("acme").unwrap();
    let other = env.tenant("other").unwrap();
    // The other tenant has a user with the same unique_id as one of acme's rows.
    env.drop_file(
        "other",
        "theirs.csv",
        b"unique_id,login_source,first_name\ne1,sso,Someone Else\n",
    )
    .unwrap();
    app.wait_files_settled(&other, 1).await;

    env.drop_file("acme", "staff.csv", GOOD_AND_BAD.as_bytes())
        .unwrap();
    let files = app.wait_files_settled(&acme, 1).await;
    let f = &files[0];
    assert_eq!(f.state, FileState::Done);
    assert_eq!(f.rows_total, Some(9), "rows read");
    assert_eq!(
        (
            f.rows_inserted,
            f.rows_updated,
            f.rows_unchanged,
            f.rows_failed
        ),
        (4, 0, 0, 5),
        "inserted, updated, unchanged, failed"
    );
    assert_eq!(f.notify_status, NotifyStatus::Sent);

    // The good users, with the tenant's spelling of the login source and `active` applied.
    let users = env.users(&acme);
    let ids: Vec<&str> = users.iter().map(|u| u.0.as_str()).collect();
    assert_eq!(ids, ["e1", "e2", "e3", "e7"]);
    assert_eq!(users[1].1, "sso");
    assert_eq!(users[0].2.as_deref(), Some("Ada"));
    assert!(users[2].5, "empty active makes a new user active");
    assert!(!users[3].5, "active=0 stores the user inactive");

    // The other tenant's user is untouched.
    let theirs = env.users(&other);
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0].2.as_deref(), Some("Someone Else"));

    // The file is in bak/ and gone from the drop folder.
    assert!(env.folder("acme").join("bak/staff.csv").exists());
    assert!(!env.folder("acme").join("staff.csv").exists());

    // Exactly one email for acme (other's file had no failures: no email).
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1, "one email in all");
    let mail = &mails[0];
    assert_eq!(mail.from, "admin@acme.example.org");
    assert_eq!(mail.to, vec!["it@acme.example.org".to_owned()]);
    assert_eq!(
        mail.subject(),
        "User import \"staff.csv\": 5 of 9 rows failed"
    );
    assert!(
        mail.body()
            .contains("Imported:         4 (4 new, 0 updated, 0 unchanged)"),
        "{}",
        mail.body()
    );
    let attachments = mail.attachments();
    assert_eq!(attachments.len(), 1);
    assert_eq!(attachments[0].0, "staff.csv.failures.csv");
    let rows = parse_csv(&attachments[0].1);
    assert_eq!(
        rows[0],
        [
            "row",
            "unique_id",
            "login_source",
            "first_name",
            "last_name",
            "email",
            "active",
            "user_type_id",
            "error_code",
            "reason"
        ]
    );
    let summary: Vec<(String, String, String)> = rows[1..]
        .iter()
        .map(|r| (r[0].clone(), r[1].clone(), r[8].clone()))
        .collect();
    assert_eq!(
        summary,
        [
            ("5".into(), "e4".into(), "unknown_login_source".into()),
            ("6".into(), "e5".into(), "invalid_email".into()),
            ("7".into(), "e6".into(), "invalid_active".into()),
            ("8".into(), "".into(), "required_missing".into()),
            ("10".into(), "e8".into(), "unknown_user_type".into()),
        ]
    );
    // Reasons name the column, quote the value and say what was expected.
    assert!(
        rows[1][9].contains("\"ldap\"") && rows[1][9].contains("valid: local, sso"),
        "{}",
        rows[1][9]
    );
    assert!(
        rows[3][9].contains("expected 0 (inactive) or 1 (active)"),
        "{}",
        rows[3][9]
    );
    // The row as uploaded.
    assert_eq!(
        rows[2][1..8],
        ["e5", "sso", "Barbara", "Liskov", "not-an-email", "1", "1"]
    );

    app.stop().await;
    assert_eq!(
        app.env.smtp.messages().len(),
        1,
        "no second email after shutdown"
    );
}

fn file_with_one_bad_row() -> String {
    "unique_id,login_source,first_name,email\n\
     u1,sso,Ann,ann@example.org\n\
     u2,sso,Bob,bob@example.org\n\
     u3,nowhere,Cid,cid@example.org\n\
     u4,local,Dee,dee@example.org\n"
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploading_the_same_file_again_is_a_new_import_that_changes_nothing_and_reports_again() {
    let mut app = spawn_app().await;
    let env = &app.env;
    let t = env.tenant("acme").unwrap();
    env.drop_file("acme", "users.csv", file_with_one_bad_row().as_bytes())
        .unwrap();
    app.wait_files_settled(&t, 1).await;
    let stamps_before = updated_at(env, &t);

    env.drop_file("acme", "users.csv", file_with_one_bad_row().as_bytes())
        .unwrap();
    let files = app.wait_files_settled(&t, 2).await;
    assert_eq!(files.len(), 2);
    assert_eq!(
        (
            files[0].rows_inserted,
            files[0].rows_unchanged,
            files[0].rows_failed
        ),
        (3, 0, 1)
    );
    assert_eq!(
        (
            files[1].rows_inserted,
            files[1].rows_updated,
            files[1].rows_unchanged,
            files[1].rows_failed
        ),
        (0, 0, 3, 1),
        "second: all unchanged"
    );
    assert_eq!(
        updated_at(env, &t),
        stamps_before,
        "no user touched by the second import"
    );
    // Both arrivals are kept in bak/, the second under a new name.
    assert_eq!(files[0].archived_name.as_deref(), Some("users.csv"));
    assert_eq!(
        files[1].archived_name.as_deref(),
        Some(format!("users.{}.csv", files[1].id).as_str())
    );
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 2, "one email per import");
    for m in &mails {
        let rows = parse_csv(&m.attachments()[0].1);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1][0], "4");
        assert_eq!(rows[1][5], "unknown_login_source");
    }
    app.stop().await;
}

fn updated_at(
    env: &mui_tests::TestEnv,
    t: &mui_shared::tenants::Tenant,
) -> Vec<(String, chrono::DateTime<chrono::Utc>)> {
    use diesel::prelude::*;
    use mui_shared::schema::users;
    users::table
        .filter(users::tenant_id.eq(t.id))
        .order(users::unique_id)
        .select((users::unique_id, users::updated_at))
        .load(&mut env.db.conn())
        .expect("users query")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_in_the_middle_of_an_import_neither_loses_nor_repeats_anything() {
    let mut app = mui_tests::spawn_app_with(mui_tests::AppOptions {
        chunk_rows: 1,
        workers: 1,
        ..Default::default()
    })
    .await;
    let t = app.env.tenant("acme").unwrap();
    let mut csv = String::from("unique_id,login_source,first_name\n");
    for i in 0..120 {
        let source = if i % 40 == 7 { "bogus" } else { "sso" };
        csv.push_str(&format!("id{i:03},{source},Name {i}\n"));
    }
    app.env
        .drop_file("acme", "big.csv", csv.as_bytes())
        .unwrap();
    {
        let env = &app.env;
        env.wait_until(60, "some rows imported", || env.users(&t).len() >= 5)
            .await;
    }
    app.stop().await;
    let imported_at_stop = app.env.users(&t).len();
    assert!(
        imported_at_stop < 117,
        "the restart really happened mid-import ({imported_at_stop})"
    );
    app.start();
    let files = app.wait_files_settled(&t, 1).await;
    assert_eq!(files.len(), 1, "one file, not re-registered");
    assert_eq!(
        (
            files[0].rows_total,
            files[0].rows_inserted,
            files[0].rows_failed
        ),
        (Some(120), 117, 3)
    );
    assert_eq!(app.env.users(&t).len(), 117);
    let mails = app.env.smtp.messages();
    assert_eq!(mails.len(), 1, "exactly one email after the restart");
    let rows = parse_csv(&mails[0].attachments()[0].1);
    let failed: Vec<&str> = rows[1..].iter().map(|r| r[0].as_str()).collect();
    assert_eq!(failed, ["9", "49", "89"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_without_mail_settings_keeps_its_report_and_the_operator_sees_why() {
    use diesel::prelude::*;
    let mut app = spawn_app().await;
    let env = &app.env;
    let t = env.tenant("nomail").unwrap();
    mui_shared::tenants::update(
        &mut env.db.conn(),
        t.tenant_id(),
        &mui_shared::tenants::SettingsChange {
            failed_import_emails: Some(vec![]),
            ..Default::default()
        },
    )
    .unwrap();
    env.drop_file("nomail", "users.csv", file_with_one_bad_row().as_bytes())
        .unwrap();
    let files = app.wait_files_settled(&t, 1).await;
    assert_eq!(files[0].notify_status, NotifyStatus::Held);
    let detail: Option<String> = mui_shared::schema::import_files::table
        .find(files[0].id)
        .select(mui_shared::schema::import_files::notify_detail)
        .first(&mut env.db.conn())
        .unwrap();
    assert_eq!(detail.as_deref(), Some("tenant has no Failed Import Email"));
    assert_eq!(env.users(&t).len(), 3, "the import itself ran");
    assert!(env.smtp.messages().is_empty());
    // The report is kept: the failure records are there to fetch.
    let kept = mui_notifier::load_failures(
        &mut env.db.conn(),
        mui_shared::domain::ImportFileId(files[0].id),
        100,
    )
    .unwrap();
    assert_eq!(kept.len(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_later_of_two_rows_with_the_same_unique_id_wins_within_and_across_chunks() {
    // Chunks of 3 rows: d1 appears in chunk 0 and chunk 1, d2 twice within chunk 0.
    let mut app = spawn_app().await;
    let env = &app.env;
    let t = env.tenant("acme").unwrap();
    let csv = "unique_id,login_source,first_name\n\
               d1,sso,Early\n\
               d2,sso,First\n\
               d2,sso,Second\n\
               x1,sso,Other\n\
               d1,sso,Late\n\
               x2,sso,Other\n";
    env.drop_file("acme", "dups.csv", csv.as_bytes()).unwrap();
    let files = app.wait_files_settled(&t, 1).await;
    let f = &files[0];
    assert_eq!(f.rows_total, Some(6));
    assert_eq!(f.rows_failed, 2, "two earlier rows reported");
    assert_eq!(
        f.rows_inserted + f.rows_updated + f.rows_unchanged + f.rows_failed,
        6,
        "every row counted once"
    );
    let users = env.users(&t);
    let names: Vec<(&str, &str)> = users
        .iter()
        .map(|u| (u.0.as_str(), u.2.as_deref().unwrap_or("")))
        .collect();
    assert_eq!(
        names,
        [
            ("d1", "Late"),
            ("d2", "Second"),
            ("x1", "Other"),
            ("x2", "Other")
        ]
    );
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1);
    let rows = parse_csv(&mails[0].attachments()[0].1);
    let reported: Vec<(&str, &str, &str)> = rows[1..]
        .iter()
        .map(|r| (r[0].as_str(), r[1].as_str(), r[4].as_str()))
        .collect();
    assert_eq!(
        reported,
        [
            ("2", "d1", "duplicate_unique_id"),
            ("3", "d2", "duplicate_unique_id")
        ]
    );
    assert!(
        rows[1][5].contains("appears again in row 6"),
        "{}",
        rows[1][5]
    );
    assert!(
        rows[2][5].contains("appears again in row 4"),
        "{}",
        rows[2][5]
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_email_or_user_name_of_another_user_is_refused_case_insensitively() {
    let mut app = spawn_app().await;
    let env = &app.env;
    let t = env.tenant("acme").unwrap();
    env.drop_file(
        "acme",
        "first.csv",
        b"unique_id,login_source,email,user_name\nm1,sso,ann@example.org,ann\n",
    )
    .unwrap();
    app.wait_files_settled(&t, 1).await;
    env.drop_file(
        "acme",
        "second.csv",
        b"unique_id,login_source,email,user_name\nm2,sso,ANN@example.org,ann2\nm3,sso,m3@example.org,Ann\nm1,sso,ann@example.org,ann\n",
    )
    .unwrap();
    let files = app.wait_files_settled(&t, 2).await;
    assert_eq!(
        (files[1].rows_failed, files[1].rows_unchanged),
        (2, 1),
        "two refused, m1 unchanged"
    );
    let mails = env.smtp.messages();
    let rows = parse_csv(&mails[0].attachments()[0].1);
    assert_eq!(rows[1][..2], ["2", "m2"]);
    assert_eq!(rows[1][5], "email_taken");
    assert!(
        rows[1][6].contains("already belongs to another user of this tenant (unique_id \"m1\")"),
        "{}",
        rows[1][6]
    );
    assert_eq!(rows[2][5], "user_name_taken");
    assert_eq!(env.users(&t).len(), 1);
    app.stop().await;
}
