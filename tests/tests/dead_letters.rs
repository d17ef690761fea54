//! Dead letters: a poison chunk is dead-lettered after the delivery limit without blocking
//! the work behind it, the operator sees it with its reason and attempts, and after the fix a
//! replay imports it once and the tenant gets one email. A message that can never be handled
//! is dead-lettered at once.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use mui_shared::amqp::{QueueKind, DELIVERY_LIMIT};
use mui_shared::deadletters::{self, Selection};
use mui_shared::files::{FileState, NotifyStatus};
use mui_tests::chaos::reported_rows;
use mui_tests::{amqp_url, spawn_app_with, AppOptions};

/// A real database error for one user, while the test wants it: a trigger raising for the
/// unique_ids listed in `poison`.
const POISON: &str = "
CREATE TABLE poison (unique_id TEXT PRIMARY KEY);
CREATE FUNCTION poison_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM poison WHERE unique_id = NEW.unique_id) THEN
    RAISE EXCEPTION 'injected failure for unique_id %', NEW.unique_id;
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER poison BEFORE INSERT OR UPDATE ON users
  FOR EACH ROW EXECUTE FUNCTION poison_check();
";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_chunk_is_dead_lettered_and_replayed_once_after_the_fix() {
    let mut app = spawn_app_with(AppOptions {
        chunk_rows: 3,
        ..Default::default()
    })
    .await;
    let t = app.env.tenant("acme").unwrap();
    let mut conn = app.env.db.conn();
    conn.batch_execute(POISON).unwrap();
    diesel::sql_query("INSERT INTO poison VALUES ('p040')")
        .execute(&mut conn)
        .unwrap();
    // 60 rows, 20 chunks; row 41 (p039, same chunk as p040) and two others are bad.
    let mut csv = String::from("unique_id,login_source,first_name\n");
    for i in 0..60 {
        let source = if [5, 39, 50].contains(&i) {
            "bogus"
        } else {
            "sso"
        };
        csv.push_str(&format!("p{i:03},{source},Name {i}\n"));
    }
    app.env
        .drop_file("acme", "poisoned.csv", csv.as_bytes())
        .unwrap();
    let env = &app.env;
    env.wait_until(120, "the poison chunk dead-lettered", || {
        deadletters::list(&mut env.db.conn(), Some(t.id), false)
            .unwrap()
            .len()
            == 1
    })
    .await;
    // The work behind it went on: every other chunk is imported; and a later file of the
    // same tenant is imported and reported. It also sets p041, a user of the dead chunk:
    // when the chunk is replayed, arrival order keeps the later file's values, and the
    // report counts that row as superseded, not as unchanged.
    env.wait_until(60, "every other chunk imported", || {
        env.users(&t).len() == 60 - 3 - 2 // the dead chunk, two bad rows
    })
    .await;
    app.env
        .drop_file(
            "acme",
            "later.csv",
            b"unique_id,login_source,first_name\nq1,sso,Q\nq2,bogus,\np041,sso,Later\n",
        )
        .unwrap();
    let env = &app.env;
    env.wait_until(60, "the later file reported", || {
        env.files(&t)
            .iter()
            .any(|f| f.file_name == "later.csv" && f.notify_status == NotifyStatus::Sent)
    })
    .await;
    let files = env.files(&t);
    let poisoned = files
        .iter()
        .find(|f| f.file_name == "poisoned.csv")
        .unwrap();
    assert_eq!(
        poisoned.state,
        FileState::Importing,
        "the file waits for its dead chunk"
    );
    assert_eq!(
        poisoned.notify_status,
        NotifyStatus::Pending,
        "no report before the chunk is imported"
    );
    assert_eq!(env.smtp.messages().len(), 1, "only the later file's email");

    // What the operator sees.
    let letters = deadletters::list(&mut env.db.conn(), Some(t.id), false).unwrap();
    let d = &letters[0];
    assert_eq!(d.tenant.as_deref(), Some("acme"));
    assert_eq!(d.file_id, Some(poisoned.id));
    assert_eq!(d.file_name.as_deref(), Some("poisoned.csv"));
    assert_eq!(d.queue.as_deref(), Some("chunks"));
    assert_eq!(d.chunk_no, Some(13), "rows 41-43 are the 14th chunk");
    assert_eq!(d.reason, "delivery_limit");
    assert_eq!(
        i64::from(d.attempts),
        DELIVERY_LIMIT + 1,
        "delivered once and redelivered up to the limit"
    );
    let error = d.last_error.as_deref().unwrap_or_default();
    assert!(
        error.contains("injected failure for unique_id p040"),
        "the worker's error is kept: {error}"
    );
    let table = deadletters::render(&letters);
    for needle in [
        "acme",
        "poisoned.csv",
        "chunk 13",
        "delivery_limit",
        "11",
        "p040",
    ] {
        assert!(table.contains(needle), "{needle} in\n{table}");
    }

    // The fix, then the replay (a second replay finds nothing left to replay).
    diesel::sql_query("DELETE FROM poison")
        .execute(&mut conn)
        .unwrap();
    let done = deadletters::replay(&mut conn, Selection::Tenant(t.id)).unwrap();
    assert_eq!(done.replayed, vec![d.id]);
    let again = deadletters::replay(&mut conn, Selection::Tenant(t.id)).unwrap();
    assert!(again.replayed.is_empty() && again.skipped.is_empty());
    let by_id = deadletters::replay(&mut conn, Selection::Id(d.id)).unwrap();
    assert!(by_id.replayed.is_empty() && by_id.skipped.len() == 1);

    let files = app.wait_files_settled(&t, 2).await;
    let poisoned = files
        .iter()
        .find(|f| f.file_name == "poisoned.csv")
        .unwrap();
    assert_eq!(
        (poisoned.state.as_str(), poisoned.notify_status.as_str()),
        ("done", "sent")
    );
    assert_eq!(
        (
            poisoned.rows_inserted,
            poisoned.rows_unchanged,
            poisoned.rows_superseded,
            poisoned.rows_failed
        ),
        (56, 0, 1, 3),
        "inserted once, p041 left as the later file set it, 3 failed"
    );
    let p041: String = mui_shared::schema::users::table
        .filter(mui_shared::schema::users::tenant_id.eq(t.id))
        .filter(mui_shared::schema::users::unique_id.eq("p041"))
        .select(mui_shared::schema::users::first_name.assume_not_null())
        .first(&mut app.env.db.conn())
        .unwrap();
    assert_eq!(p041, "Later", "the later file wins");
    assert_eq!(
        app.env.users(&t).len(),
        58,
        "57 of the file and q1, once each"
    );
    let mails = app.env.smtp.messages();
    assert_eq!(mails.len(), 2, "one email per file");
    let mail = mails
        .iter()
        .find(|m| m.subject().contains("poisoned.csv"))
        .expect("the poisoned file's email");
    assert!(
        mail.body().contains(
            "56 new, 0 updated, 0 unchanged, 1 left as a later file of yours had set them"
        ),
        "{}",
        mail.body()
    );
    assert_eq!(reported_rows(&mail.attachments()[0].1), vec![7, 41, 52]);
    assert!(deadletters::list(&mut app.env.db.conn(), None, false)
        .unwrap()
        .is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_can_never_be_handled_is_dead_lettered_at_once() {
    let mut app = spawn_app_with(AppOptions::default()).await;
    let conn = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    let topology = mui_shared::amqp::Topology::new(&app.env.prefix);
    // The services declare the topology; wait for it, then publish garbage to both queues.
    let env = &app.env;
    for _ in 0..300 {
        let probe = conn.create_channel().await.unwrap();
        if probe
            .queue_declare(
                topology.queue(QueueKind::Notify).as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let ch = conn.create_channel().await.unwrap();
    for kind in [QueueKind::Chunks, QueueKind::Notify] {
        ch.basic_publish(
            "".into(),
            topology.queue(kind).as_str().into(),
            BasicPublishOptions::default(),
            format!("{{not json, for {}", kind.as_str()).as_bytes(),
            Default::default(),
        )
        .await
        .unwrap();
    }
    env.wait_until(60, "both recorded", || {
        deadletters::list(&mut env.db.conn(), None, false)
            .unwrap()
            .len()
            == 2
    })
    .await;
    let letters = deadletters::list(&mut env.db.conn(), None, false).unwrap();
    let mut queues: Vec<_> = letters.iter().map(|d| d.queue.clone()).collect();
    queues.sort();
    assert_eq!(
        queues,
        vec![Some("chunks".to_owned()), Some("notify".to_owned())]
    );
    for d in &letters {
        assert_eq!((d.reason.as_str(), d.attempts), ("rejected", 1));
        assert_eq!((d.tenant.clone(), d.file_id), (None, None));
        let e = d.last_error.as_deref().unwrap_or_default();
        assert!(e.contains("not a"), "the reason is noted: {e}");
    }

    // The queues dead-letter at-least-once: redeclaring them with the old arguments (no
    // strategy) is refused, which is what an operator upgrading sees (deploy/README.md).
    let mut old = FieldTable::default();
    old.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    old.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(DELIVERY_LIMIT),
    );
    old.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(topology.dead_exchange().as_str())),
    );
    let refused = ch
        .queue_declare(
            topology.queue(QueueKind::Chunks).as_str().into(),
            QueueDeclareOptions::durable(),
            old,
        )
        .await;
    assert!(
        format!("{refused:?}").contains("PRECONDITION_FAILED"),
        "{refused:?}"
    );
    let _ = conn.close(200, "bye".into()).await;
    app.stop().await;
}
