//! Re-importing an export that changed little: a user whose row changes nothing is read and
//! left alone (not rewritten, so its row version `xmin` stays), counted as unchanged, while
//! everything a full write guarantees still holds: a unique_id given twice in the file is
//! still reported as a duplicate, and while an older file of the tenant is unfinished every
//! row is written with its version (an older row may still come, and must lose).

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use mui_shared::domain::ImportFileId;
use mui_shared::files::{FileState, NotifyStatus};
use mui_shared::messages::RowErrorCode;
use mui_shared::tenants::Tenant;
use mui_tests::{register_file, spawn_app, spawn_app_with, App, AppOptions, FileRow, TestEnv};

const EXPORT: &str = "\
unique_id,login_source,first_name,email
u1,sso,Ada,ada@example.org
u2,sso,Alan,alan@example.org
u3,sso,Grace,grace@example.org
u4,sso,Edsger,edsger@example.org
u5,sso,Barbara,barbara@example.org
u6,sso,Donald,don@example.org
u7,sso,Ken,ken@example.org
";

/// Each user's unique_id and row version (`xmin`: changes whenever the row is written).
fn versions(env: &TestEnv, t: &Tenant) -> Vec<(String, String)> {
    #[derive(QueryableByName)]
    struct V {
        #[diesel(sql_type = Text)]
        unique_id: String,
        #[diesel(sql_type = Text)]
        xmin: String,
    }
    diesel::sql_query(
        "SELECT unique_id, xmin::text AS xmin FROM users WHERE tenant_id = $1 ORDER BY unique_id",
    )
    .bind::<BigInt, _>(t.id)
    .load::<V>(&mut env.db.conn())
    .unwrap()
    .into_iter()
    .map(|v| (v.unique_id, v.xmin))
    .collect()
}

fn counts(f: &FileRow) -> (i64, i64, i64, i64) {
    (
        f.rows_inserted,
        f.rows_updated,
        f.rows_unchanged,
        f.rows_failed,
    )
}

/// Waits until the file named `name` is done and its report settled, and returns it.
async fn wait_done(env: &TestEnv, t: &Tenant, name: &str) -> FileRow {
    let settled = |f: &FileRow| {
        f.file_name == name
            && f.state == FileState::Done
            && f.archived_name.is_some()
            && !matches!(
                f.notify_status,
                NotifyStatus::Pending | NotifyStatus::Sending
            )
    };
    env.wait_until(120, name, || env.files(t).iter().any(settled))
        .await;
    env.files(t).into_iter().find(settled).unwrap()
}

/// The unique_ids whose version differs between two snapshots.
fn rewritten(before: &[(String, String)], after: &[(String, String)]) -> Vec<String> {
    assert_eq!(before.len(), after.len());
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| b.1 != a.1)
        .map(|(b, _)| b.0.clone())
        .collect()
}

/// A fresh pipeline whose tenant `acme` has imported [`EXPORT`] (three rows a chunk: the
/// export spans three chunks), and that tenant.
async fn export_imported() -> (App, Tenant) {
    let app = spawn_app().await;
    let t = app.env.tenant("acme").unwrap();
    app.env
        .drop_file("acme", "export.csv", EXPORT.as_bytes())
        .unwrap();
    let first = app.wait_files_settled(&t, 1).await;
    assert_eq!(counts(&first[0]), (7, 0, 0, 0));
    (app, t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unchanged_re_import_rewrites_no_user_and_a_repeated_unique_id_is_still_reported() {
    let (app, t) = export_imported().await;
    let env = &app.env;
    let v1 = versions(env, &t);

    // The same export again: nothing to write.
    env.drop_file("acme", "export-again.csv", EXPORT.as_bytes())
        .unwrap();
    let files = app.wait_files_settled(&t, 2).await;
    assert_eq!(files[1].state, FileState::Done);
    assert_eq!(
        counts(&files[1]),
        (0, 0, 7, 0),
        "inserted, updated, unchanged, failed"
    );
    let v2 = versions(env, &t);
    assert_eq!(
        rewritten(&v1, &v2),
        Vec::<String>::new(),
        "no user rewritten"
    );

    // u1 changes; u2's row 3 is as stored, but row 9 (another chunk) gives u2 again with a
    // new first name: row 3 is the duplicate, whichever chunk is imported first.
    let third = "\
unique_id,login_source,first_name,email
u1,sso,Augusta,ada@example.org
u2,sso,Alan,alan@example.org
u3,sso,Grace,grace@example.org
u4,sso,Edsger,edsger@example.org
u5,sso,Barbara,barbara@example.org
u6,sso,Donald,don@example.org
u7,sso,Ken,ken@example.org
u2,sso,Alan M.,alan@example.org
";
    env.drop_file("acme", "export-3.csv", third.as_bytes())
        .unwrap();
    let files = app.wait_files_settled(&t, 3).await;
    let f = &files[2];
    assert_eq!(f.rows_failed, 1, "the earlier row of u2 is reported");
    assert_eq!(
        f.rows_inserted + f.rows_updated + f.rows_unchanged + f.rows_failed,
        8,
        "every row counted once"
    );
    let failures =
        mui_shared::failures::load_failures(&mut env.db.conn(), ImportFileId(f.id), 100).unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].row, 3, "{failures:?}");
    assert_eq!(failures[0].errors[0].code, RowErrorCode::DuplicateUniqueId);
    let users = env.users(&t);
    let u2 = users.iter().find(|u| u.0 == "u2").unwrap();
    assert_eq!(u2.2.as_deref(), Some("Alan M."), "the later row wins");
    let v3 = versions(env, &t);
    assert_eq!(rewritten(&v2, &v3), ["u1", "u2"], "only the changed users");
}

/// Unchanged rows are left out before the email and user name checks (they take no value
/// from anyone): the rows that change something are still checked against them. u3 takes
/// u2's email and new user u8 takes u7's, while u2 and u7 are unchanged in the same file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_re_import_still_refuses_an_email_that_an_unchanged_user_holds() {
    let (app, t) = export_imported().await;
    let env = &app.env;
    let v1 = versions(env, &t);
    let again = "\
unique_id,login_source,first_name,email
u1,sso,Ada,ada@example.org
u2,sso,Alan,alan@example.org
u3,sso,Grace,Alan@Example.org
u4,sso,Edsger,edsger@example.org
u5,sso,Barbara,barbara@example.org
u6,sso,Donald,don@example.org
u7,sso,Ken,ken@example.org
u8,sso,Kenneth,KEN@example.org
";
    env.drop_file("acme", "export-again.csv", again.as_bytes())
        .unwrap();
    let files = app.wait_files_settled(&t, 2).await;
    assert_eq!(files[1].state, FileState::Done);
    assert_eq!(
        counts(&files[1]),
        (0, 0, 6, 2),
        "inserted, updated, unchanged, failed"
    );
    let failures =
        mui_shared::failures::load_failures(&mut env.db.conn(), ImportFileId(files[1].id), 100)
            .unwrap();
    let refused: Vec<(u64, RowErrorCode)> =
        failures.iter().map(|f| (f.row, f.errors[0].code)).collect();
    assert_eq!(
        refused,
        [(4, RowErrorCode::EmailTaken), (9, RowErrorCode::EmailTaken)],
        "{failures:?}"
    );
    let users = env.users(&t);
    assert_eq!(users.len(), 7, "u8 was not created");
    assert_eq!(
        rewritten(&v1, &versions(env, &t)),
        Vec::<String>::new(),
        "no user rewritten"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_an_older_file_is_unfinished_every_row_is_written_with_its_version() {
    // Chunks straight to the broker: the fair dispatcher would (rightly) hold the newer file
    // back behind the unfinished one.
    let app = spawn_app_with(AppOptions {
        chunk_dispatch: mui_ingest::pipeline::ChunkDispatch::Direct,
        ..AppOptions::default()
    })
    .await;
    let env = &app.env;
    let t = env.tenant("acme").unwrap();
    env.drop_file("acme", "export.csv", EXPORT.as_bytes())
        .unwrap();
    app.wait_files_settled(&t, 1).await;
    let v1 = versions(env, &t);

    // An older file still importing (its last chunk not in yet): its rows could still come,
    // and the newer file's rows must win over them, so each carries its version.
    let mut conn = env.db.conn();
    let stuck = register_file(
        &mut conn,
        t.id,
        "stuck.csv",
        &["unique_id", "login_source"],
        1,
        1,
    )
    .unwrap();
    env.drop_file("acme", "export-again.csv", EXPORT.as_bytes())
        .unwrap();
    let again = wait_done(env, &t, "export-again.csv").await;
    assert_eq!(counts(&again), (0, 0, 7, 0));
    let v2 = versions(env, &t);
    assert_eq!(rewritten(&v1, &v2).len(), 7, "every user written");

    // Once it is finished, the next unchanged export writes nothing.
    diesel::sql_query("UPDATE import_files SET state = 'failed' WHERE id = $1")
        .bind::<BigInt, _>(stuck)
        .execute(&mut conn)
        .unwrap();
    env.drop_file("acme", "export-3.csv", EXPORT.as_bytes())
        .unwrap();
    let third = wait_done(env, &t, "export-3.csv").await;
    assert_eq!(counts(&third), (0, 0, 7, 0));
    let v3 = versions(env, &t);
    assert_eq!(
        rewritten(&v2, &v3),
        Vec::<String>::new(),
        "no user rewritten"
    );
}

/// The digest stored with each user stands for the values the last import wrote: an
/// operator's edit clears it (a trigger), so the next import of the same export compares that
/// user by value and writes the file's value back; a user without a digest (written before
/// digests were kept) is compared by value and, unchanged, left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hand_edited_user_is_compared_by_value_and_written_back() {
    let (app, t) = export_imported().await;
    let env = &app.env;
    let mut conn = env.db.conn();
    let digests = |conn: &mut PgConnection| -> i64 {
        #[derive(QueryableByName)]
        struct N {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        diesel::sql_query(
            "SELECT count(*) AS n FROM users WHERE tenant_id = $1 AND row_digest IS NOT NULL",
        )
        .bind::<BigInt, _>(t.id)
        .get_result::<N>(conn)
        .unwrap()
        .n
    };
    assert_eq!(
        digests(&mut conn),
        7,
        "every imported user has its row's digest"
    );

    // By hand: u3's email changes (its digest is cleared), and u5 and u6 lose their digest as
    // if written before digests were kept.
    diesel::sql_query(
        "UPDATE users SET email = 'someone.else@example.org' WHERE tenant_id = $1 AND unique_id = 'u3'",
    )
    .bind::<BigInt, _>(t.id)
    .execute(&mut conn)
    .unwrap();
    diesel::sql_query(
        "UPDATE users SET row_digest = NULL WHERE tenant_id = $1 AND unique_id IN ('u5', 'u6')",
    )
    .bind::<BigInt, _>(t.id)
    .execute(&mut conn)
    .unwrap();
    assert_eq!(digests(&mut conn), 4, "the edit cleared u3's digest");
    let before = versions(env, &t);

    env.drop_file("acme", "export-again.csv", EXPORT.as_bytes())
        .unwrap();
    let again = wait_done(env, &t, "export-again.csv").await;
    assert_eq!(
        counts(&again),
        (0, 1, 6, 0),
        "u3 written back, the rest unchanged"
    );
    let after = versions(env, &t);
    assert_eq!(rewritten(&before, &after), vec!["u3".to_owned()]);
    #[derive(QueryableByName)]
    struct Email {
        #[diesel(sql_type = Text)]
        email: String,
    }
    let email =
        diesel::sql_query("SELECT email FROM users WHERE tenant_id = $1 AND unique_id = 'u3'")
            .bind::<BigInt, _>(t.id)
            .get_result::<Email>(&mut conn)
            .unwrap();
    assert_eq!(email.email, "grace@example.org");
    assert_eq!(
        digests(&mut conn),
        5,
        "u3 has its row's digest again; u5 and u6, left alone, still have none"
    );
}
