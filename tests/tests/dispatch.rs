//! Fair dispatch: a tenant's files take effect in arrival order even when the first one's
//! chunks are held back; a small file of one tenant is served while another tenant imports a
//! large one, and no tenant has more chunks in flight than its cap; the dispatching leader
//! killed with SIGKILL mid-import is replaced, and nothing is lost or doubled; a newcomer's
//! first chunk is imported through the express lane while every slot is held.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use mui_shared::files::FileState;
use mui_shared::schema::{chunk_queue, permits, tenants, users};
use mui_tests::chaos::{
    chunk_markers, reported_rows, service_env, users_csv, wait_settled, Kind, ServiceProcess,
    Services,
};
use mui_tests::{AppOptions, TestEnv};

const BIN: &str = env!("CARGO_BIN_EXE_mui-service");

/// Chunks of the file named `first.csv` wait, when they are imported, for an advisory lock
/// the test holds: they are forced to take longer than anything after them.
const HOLD_FIRST: &str = r#"
CREATE FUNCTION hold_first() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM import_files WHERE id = NEW.file_id AND file_name = 'first.csv') THEN
    PERFORM pg_advisory_xact_lock_shared(4242);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER hold_first BEFORE INSERT ON file_chunks
  FOR EACH ROW EXECUTE FUNCTION hold_first();
"#;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenants_files_take_effect_in_arrival_order_even_when_the_first_is_held() {
    let env = TestEnv::new(AppOptions {
        chunk_rows: 2,
        ..Default::default()
    })
    .unwrap();
    let t = env.tenant("acme").unwrap();
    diesel::update(tenants::table.find(t.id))
        .set(tenants::archive_on_inactive.eq(true))
        .execute(&mut env.db.conn())
        .unwrap();
    let services = Services::start(
        vec![env.ingest_config()],
        vec![env.worker_config(), env.worker_config()],
        Some(env.notifier_config()),
    );
    // Six users, u3 with a parking permit.
    let mut seed = String::from("unique_id,login_source,first_name,active\n");
    for i in 1..=6 {
        seed.push_str(&format!("u{i},sso,Seed{i},1\n"));
    }
    env.drop_file("acme", "seed.csv", seed.as_bytes()).unwrap();
    wait_settled(&env, &t, 1, 60).await;
    diesel::insert_into(permits::table)
        .values((
            permits::tenant_id.eq(t.id),
            permits::unique_id.eq("u3"),
            permits::permit_number.eq("P-3"),
            permits::lot_name.eq("Lot A"),
            permits::active_window.eq("O: Perm"),
            permits::state.eq("active"),
        ))
        .execute(&mut env.db.conn())
        .unwrap();

    let mut holder = env.db.conn();
    holder.batch_execute(HOLD_FIRST).unwrap();
    diesel::sql_query("SELECT pg_advisory_lock(4242)")
        .execute(&mut holder)
        .unwrap();
    // File 1 archives u3 (its permit is released) and renames u1; file 2, sent after it,
    // renames u1 and u3 again and leaves `active` alone.
    env.drop_file(
        "acme",
        "first.csv",
        b"unique_id,login_source,first_name,active\nu1,sso,One,1\nu2,sso,Seed2,1\nu3,sso,Seed3,0\nu4,sso,Seed4,1\nu5,sso,Seed5,1\nu6,sso,Seed6,1\n",
    )
    .unwrap();
    env.wait_until(60, "a chunk of first.csv held", || {
        let c: Count = diesel::sql_query(
            "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        )
        .get_result(&mut env.db.conn())
        .unwrap();
        c.n >= 1
    })
    .await;
    env.drop_file(
        "acme",
        "second.csv",
        b"unique_id,login_source,first_name,active\nu1,sso,Two,\nu3,sso,Renamed,\n",
    )
    .unwrap();
    // The second file is read and queued while the first is held…
    env.wait_until(60, "second.csv queued", || {
        env.files(&t)
            .iter()
            .any(|f| f.file_name == "second.csv" && f.state == FileState::Importing)
    })
    .await;
    // …and only then is the first let go: whatever the workers do now, file 2's chunks
    // could commit before file 1's.
    diesel::sql_query("SELECT pg_advisory_unlock(4242)")
        .execute(&mut holder)
        .unwrap();
    let files = wait_settled(&env, &t, 3, 60).await;

    let (first, second) = (&files[1], &files[2]);
    assert_eq!(
        (first.file_name.as_str(), second.file_name.as_str()),
        ("first.csv", "second.csv")
    );
    assert!(
        first.finished_at <= second.finished_at,
        "the first file finished first"
    );
    // The end state is file 1's effect, then file 2's.
    let (name1, name3, active3, archived3): (
        Option<String>,
        Option<String>,
        bool,
        Option<chrono::DateTime<chrono::Utc>>,
    ) = {
        let mut c = env.db.conn();
        let n1: Option<String> = users::table
            .find((t.id, "u1"))
            .select(users::first_name)
            .first(&mut c)
            .unwrap();
        let (n3, a3, at3) = users::table
            .find((t.id, "u3"))
            .select((users::first_name, users::active, users::archived_at))
            .first(&mut c)
            .unwrap();
        (n1, n3, a3, at3)
    };
    assert_eq!(name1.as_deref(), Some("Two"));
    assert_eq!(name3.as_deref(), Some("Renamed"));
    assert!(!active3 && archived3.is_some(), "u3 archived by file 1");
    let permit: String = permits::table
        .filter(permits::tenant_id.eq(t.id))
        .select(permits::state)
        .first(&mut env.db.conn())
        .unwrap();
    assert_eq!(permit, "released", "file 1 released u3's permit");
    // And each file is counted as it took effect.
    assert_eq!(
        (
            first.rows_updated,
            first.rows_unchanged,
            first.users_archived,
            first.permits_released
        ),
        (2, 4, 1, 1),
        "first.csv: u1 and u3 changed, u3 archived, its permit released"
    );
    assert_eq!(
        (
            second.rows_updated,
            second.rows_unchanged,
            second.rows_failed
        ),
        (2, 0, 0),
        "second.csv: u1 and u3 changed"
    );
    services.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_file_is_served_while_another_tenant_imports_a_large_one_under_its_cap() {
    let env = TestEnv::new(AppOptions {
        chunk_rows: 25,
        ..Default::default()
    })
    .unwrap();
    let a = env.tenant("acme").unwrap();
    let b = env.tenant("beta").unwrap();
    let workers = (0..2)
        .map(|_| {
            let mut w = env.worker_config();
            w.tenant_max_in_flight = Some(3);
            w
        })
        .collect();
    let services = Services::start(
        vec![env.ingest_config()],
        workers,
        Some(env.notifier_config()),
    );
    let (big, _) = users_csv(10_000, 1_000_000, "big");
    env.drop_file("acme", "big.csv", big.as_bytes()).unwrap();

    // Watch acme's chunks in flight while everything runs.
    let mut most_in_flight = 0i64;
    let in_flight = |env: &TestEnv| -> i64 {
        chunk_queue::table
            .filter(chunk_queue::tenant_id.eq(a.id))
            .filter(chunk_queue::dispatched_at.is_not_null())
            .filter(chunk_queue::dead_at.is_null())
            .count()
            .get_result(&mut env.db.conn())
            .unwrap()
    };
    env.wait_until(120, "acme's import under way", || {
        most_in_flight = most_in_flight.max(in_flight(&env));
        env.files(&a).first().is_some_and(|f| f.rows_inserted > 500)
    })
    .await;
    let (small, bad) = users_csv(30, 10, "small");
    env.drop_file("beta", "small.csv", small.as_bytes())
        .unwrap();
    env.wait_until(120, "both files finished", || {
        most_in_flight = most_in_flight.max(in_flight(&env));
        let done = |t| {
            env.files(t)
                .first()
                .is_some_and(|f| f.state == FileState::Done)
        };
        done(&a) && done(&b)
    })
    .await;
    let (fa, fb) = (&env.files(&a)[0], &env.files(&b)[0]);
    assert!(
        fb.finished_at < fa.finished_at,
        "beta's small file finished before acme's large one (beta {:?}, acme {:?})",
        fb.finished_at,
        fa.finished_at
    );
    assert_eq!(fa.rows_inserted + fa.rows_failed, 10_000);
    assert!(
        (1..=3).contains(&most_in_flight),
        "acme's chunks in flight stayed within its cap of 3: at most {most_in_flight}"
    );
    let fb = &wait_settled(&env, &b, 1, 60).await[0];
    assert_eq!(fb.rows_failed, bad.len() as i64);
    let mails = env.smtp.messages();
    let beta_mail = mails
        .iter()
        .find(|m| m.subject().contains("small.csv"))
        .expect("beta's email");
    assert_eq!(reported_rows(&beta_mail.attachments()[0].1), bad);
    services.stop().await;
}

/// Chunks of the file named `big.csv` wait, when they are imported, for an advisory lock the
/// test holds: they keep every slot of every worker busy for as long as the test wants.
const HOLD_BIG: &str = r#"
CREATE FUNCTION hold_big() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM import_files WHERE id = NEW.file_id AND file_name = 'big.csv') THEN
    PERFORM pg_advisory_xact_lock_shared(4343);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER hold_big BEFORE INSERT ON file_chunks
  FOR EACH ROW EXECUTE FUNCTION hold_big();
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_newcomers_first_chunk_is_imported_while_every_slot_is_held_by_another_tenant() {
    let env = TestEnv::new(AppOptions {
        chunk_rows: 2,
        ..Default::default()
    })
    .unwrap();
    let a = env.tenant("acme").unwrap();
    let b = env.tenant("beta").unwrap();
    let workers = vec![env.worker_config(), env.worker_config()];
    let slots: usize = workers.iter().map(|w| w.concurrency).sum();
    let services = Services::start(
        vec![env.ingest_config()],
        workers,
        Some(env.notifier_config()),
    );
    let mut holder = env.db.conn();
    holder.batch_execute(HOLD_BIG).unwrap();
    diesel::sql_query("SELECT pg_advisory_lock(4343)")
        .execute(&mut holder)
        .unwrap();
    let (big, big_bad) = users_csv(40, 1_000_000, "big");
    env.drop_file("acme", "big.csv", big.as_bytes()).unwrap();
    // Every slot of both workers is importing one of acme's chunks, each held.
    env.wait_until(60, "every slot held by acme", || {
        let c: Count = diesel::sql_query(
            "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        )
        .get_result(&mut env.db.conn())
        .unwrap();
        c.n as usize >= slots
    })
    .await;
    let (small, bad) = users_csv(2, 2, "small");
    env.drop_file("beta", "small.csv", small.as_bytes())
        .unwrap();
    // beta's only chunk goes through the express lane: it is imported and mailed while
    // every one of acme's chunks is still held (nothing of acme's is committed).
    let fb = &wait_settled(&env, &b, 1, 60).await[0];
    assert_eq!(fb.state, FileState::Done);
    assert_eq!(fb.rows_inserted + fb.rows_failed, 2);
    assert_eq!(fb.rows_failed, bad.len() as i64);
    let fa = &env.files(&a)[0];
    assert_eq!(
        (fa.chunks_done, fa.rows_inserted),
        (0, 0),
        "acme's chunks were all still held: {fa:?}"
    );
    diesel::sql_query("SELECT pg_advisory_unlock(4343)")
        .execute(&mut holder)
        .unwrap();
    let fa = &wait_settled(&env, &a, 1, 120).await[0];
    assert_eq!(fa.rows_inserted + fa.rows_failed, 40);
    assert_eq!(env.users(&a).len(), 40 - big_bad.len());
    assert_eq!(env.users(&b).len(), 2 - bad.len());
    services.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dispatching_leader_killed_mid_import_is_replaced_and_nothing_is_lost_or_doubled() {
    let env = TestEnv::new(AppOptions {
        chunk_rows: 20,
        settle_ms: 200,
        ..Default::default()
    })
    .unwrap();
    let t = env.tenant("acme").unwrap();
    let logs = tempfile::tempdir().unwrap();
    let start = |kind: Kind, name: &str| {
        ServiceProcess::start(
            BIN,
            kind,
            service_env(&env, kind),
            &logs.path().join(format!("{name}.log")),
        )
    };
    let mut ingest = start(Kind::Ingest, "ingest");
    let mut workers = [
        start(Kind::Worker, "worker0"),
        start(Kind::Worker, "worker1"),
    ];
    let mut notifier = start(Kind::Notifier, "notifier");
    const ROWS: usize = 6_000;
    let (csv, bad) = users_csv(ROWS, 89, "leader");
    env.drop_file("acme", "big.csv", csv.as_bytes()).unwrap();
    env.wait_until(120, "the import under way", || env.users(&t).len() >= 600)
        .await;
    let leader = workers
        .iter()
        .position(|w| w.log_text().contains("DispatcherLeading"))
        .expect("one worker leads");
    // What `muictl queue` shows: the leader, both workers, the file's chunks.
    let o = mui_shared::dispatch::overview(&mut env.db.conn()).unwrap();
    assert!(
        o.leader
            .as_deref()
            .is_some_and(|l| l.starts_with("mui-dispatcher ")),
        "{o:?}"
    );
    assert_eq!(o.workers.len(), 2, "{o:?}");
    assert!(o.files.iter().any(|f| f.file_name == "big.csv"), "{o:?}");
    workers[leader].kill9().await;
    let other = 1 - leader;
    env.wait_until(60, "the other worker takes the lead", || {
        workers[other].log_text().contains("DispatcherLeading")
    })
    .await;
    let files = wait_settled(&env, &t, 1, 240).await;
    let f = &files[0];
    assert_eq!(
        (f.state, f.rows_total, f.rows_failed),
        (FileState::Done, Some(ROWS as i64), bad.len() as i64)
    );
    assert_eq!(
        f.rows_imported() + f.rows_failed,
        ROWS as i64,
        "every row once"
    );
    assert_eq!(
        chunk_markers(&env, f.id),
        i64::from(f.total_chunks.unwrap_or(-1)),
        "every chunk imported once"
    );
    let queued: i64 = chunk_queue::table
        .count()
        .get_result(&mut env.db.conn())
        .unwrap();
    assert_eq!(queued, 0, "nothing left in the queue");
    assert_eq!(env.users(&t).len(), ROWS - bad.len());
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), 1, "exactly one email");
    assert_eq!(reported_rows(&mails[0].attachments()[0].1), bad);
    for p in [&mut ingest, &mut notifier, &mut workers[other]] {
        let _ = p.terminate(std::time::Duration::from_secs(30)).await;
    }
}

/// A queued chunk's payload is stored compressed with lz4 (it all goes through the WAL) and
/// taken back byte for byte.
#[test]
fn a_queued_payload_is_stored_lz4_compressed_and_taken_back_whole() {
    use mui_shared::domain::{ImportFileId, TenantId};
    use mui_shared::messages::ChunkRef;
    let db = mui_tests::TestDb::new().unwrap();
    let mut conn = db.conn();
    let slug = mui_shared::domain::TenantSlug::parse("acme").unwrap();
    let tenant = mui_shared::tenants::create(&mut conn, &slug, "Acme").unwrap();
    let file =
        mui_tests::register_file(&mut conn, tenant.id, "a.csv", &["unique_id"], 1, 3000).unwrap();
    // Rows as a chunk carries them: repetitive JSON, like any export.
    let payload: Vec<u8> = (0..3000)
        .map(|i| format!(r#"{{"row":{i},"fields":["u{i}","sso","Ada","Lovelace"]}},"#))
        .collect::<String>()
        .into_bytes();
    let chunk = ChunkRef {
        file_id: ImportFileId(file),
        tenant_id: TenantId(tenant.id),
        chunk_no: 0,
    };
    mui_shared::dispatch::enqueue(&mut conn, chunk, 3000, &payload).unwrap();
    #[derive(QueryableByName)]
    struct Stored {
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        method: Option<String>,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        size: i32,
    }
    let stored: Stored = diesel::sql_query(
        "SELECT pg_column_compression(payload) AS method, pg_column_size(payload) AS size \
         FROM chunk_queue WHERE file_id = $1",
    )
    .bind::<diesel::sql_types::BigInt, _>(file)
    .get_result(&mut conn)
    .unwrap();
    assert_eq!(stored.method.as_deref(), Some("lz4"));
    assert!(
        (stored.size as usize) < payload.len() / 2,
        "{} bytes stored for {}",
        stored.size,
        payload.len()
    );
    let taken = conn
        .transaction(|c| mui_shared::dispatch::take(c, chunk))
        .unwrap();
    assert_eq!(taken.as_deref(), Some(payload.as_slice()));
}
