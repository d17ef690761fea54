//! At-least-once delivery: the same chunk and the same notifier messages delivered twice
//! change nothing and mail nothing twice. Runs the worker's and the notifier's own handlers
//! against the real database and SMTP server.

use diesel::prelude::*;
use mui_shared::domain::ImportFileId;
use mui_shared::messages::{self, Chunk, NotifyMessage, RawRow};
use mui_shared::schema::{import_files, outbox};
use mui_tests::register_file;
use mui_tests::{AppOptions, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_chunk_and_repeated_notifications_change_nothing() {
    let env = TestEnv::new(AppOptions::default()).unwrap();
    let t = env.tenant("acme").unwrap();
    let mut conn = env.db.conn();
    let file_id = register_file(
        &mut conn,
        t.id,
        "r.csv",
        &["unique_id", "login_source"],
        1,
        3,
    )
    .unwrap();
    let chunk = Chunk {
        file_id: ImportFileId(file_id),
        tenant_id: t.tenant_id(),
        chunk_no: 0,
        header: vec!["unique_id".into(), "login_source".into()],
        repeated: None,
        rows: vec![
            RawRow {
                row: 2,
                fields: vec!["a".into(), "sso".into()].into(),
                too_large: None,
            },
            RawRow {
                row: 3,
                fields: vec!["b".into(), "nope".into()].into(),
                too_large: None,
            },
            RawRow {
                row: 4,
                fields: vec!["c".into(), "local".into()].into(),
                too_large: None,
            },
        ],
    };
    let first = mui_worker::import::import_chunk(&mut conn, &chunk).unwrap();
    assert!(first.applied);
    assert_eq!(
        (first.inserted, first.failed, first.finished_file),
        (2, 1, true)
    );
    let second = mui_worker::import::import_chunk(&mut conn, &chunk).unwrap();
    assert!(!second.applied, "the redelivery is recognised");
    assert_eq!(env.users(&t).len(), 2);
    let counts: (i32, i64, i64) = import_files::table
        .find(file_id)
        .select((
            import_files::chunks_done,
            import_files::rows_inserted,
            import_files::rows_failed,
        ))
        .first(&mut conn)
        .unwrap();
    assert_eq!(counts, (1, 2, 1), "counted once");

    // The outbox holds the failure records and "file finished", once each.
    let payloads: Vec<Vec<u8>> = outbox::table
        .order(outbox::id)
        .select(outbox::payload)
        .load(&mut conn)
        .unwrap();
    assert_eq!(payloads.len(), 2);
    let msgs: Vec<NotifyMessage> = payloads
        .iter()
        .map(|p| messages::decode(p).unwrap())
        .collect();

    // The notifier receives every message twice (at-least-once): one email.
    let pool = mui_shared::db::pool(&env.db.url, 2);
    let mailer =
        mui_notifier::mailer::Mailer::new(Some(&env.smtp.url()), env.drop_root.path().join("o"))
            .unwrap();
    let handler = mui_notifier::Handler::new(pool, mailer, 1000);
    for m in msgs.iter().chain(msgs.iter()).chain(msgs.iter().rev()) {
        handler.handle(m).await.unwrap();
    }
    let mails = env.smtp.messages();
    assert_eq!(
        mails.len(),
        1,
        "one email however often the messages arrive"
    );
    let rows = mui_tests::parse_csv(&mails[0].attachments()[0].1);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1][..3], ["3", "b", "nope"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_naming_another_tenants_file_is_refused() {
    let env = TestEnv::new(AppOptions::default()).unwrap();
    let a = env.tenant("tenant-a").unwrap();
    let b = env.tenant("tenant-b").unwrap();
    let mut conn = env.db.conn();
    let file_id: i64 = diesel::insert_into(import_files::table)
        .values((
            import_files::tenant_id.eq(a.id),
            import_files::file_name.eq("a.csv"),
            import_files::arrival_key.eq("test:a"),
            import_files::size_bytes.eq(10),
            import_files::sha256.eq("x"),
        ))
        .returning(import_files::id)
        .get_result(&mut conn)
        .unwrap();
    let forged = Chunk {
        file_id: ImportFileId(file_id),
        tenant_id: b.tenant_id(),
        chunk_no: 0,
        header: vec!["unique_id".into(), "login_source".into()],
        repeated: None,
        rows: vec![RawRow {
            row: 2,
            fields: vec!["x".into(), "sso".into()].into(),
            too_large: None,
        }],
    };
    let err = mui_worker::import::import_chunk(&mut conn, &forged).unwrap_err();
    assert!(
        matches!(err, mui_worker::import::ImportError::WrongTenant { .. }),
        "{err}"
    );
    assert!(env.users(&a).is_empty() && env.users(&b).is_empty());
}
