//! The rows of a chunk that change nothing, found by digest through the worker's two reads
//! (`worker/src/unchanged.rs`): a chunk in unique_id order reads its stretch of the key, and
//! anything that read does not settle is probed key by key. Chunks of realistic size (the
//! stretch is read from 64 rows on) imported with the worker's own import function, against
//! PostgreSQL: whichever read decides, the counts and the stored users are exact.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use mui_shared::domain::ImportFileId;
use mui_shared::messages::{Chunk, RawRow};
use mui_shared::tenants::Tenant;
use mui_tests::{register_file, AppOptions, TestEnv};
use mui_worker::import::{import_chunk, ChunkOutcome};

const HEADER: [&str; 3] = ["unique_id", "login_source", "first_name"];

/// Imports `rows` (unique_id, first name) as a new file of one chunk; returns what it did.
fn import(env: &TestEnv, t: &Tenant, name: &str, rows: &[(String, String)]) -> ChunkOutcome {
    let mut conn = env.db.conn();
    let file = register_file(&mut conn, t.id, name, &HEADER, 1, rows.len() as i64).unwrap();
    let chunk = Chunk {
        file_id: ImportFileId(file),
        tenant_id: t.tenant_id(),
        chunk_no: 0,
        header: HEADER.map(String::from).to_vec(),
        // Known: no unique_id repeats in the file.
        repeated: Some(Vec::new()),
        rows: rows
            .iter()
            .enumerate()
            .map(|(i, (id, first))| RawRow {
                row: i as u64 + 2,
                fields: [id.as_str(), "sso", first.as_str()].into_iter().collect(),
                too_large: None,
            })
            .collect(),
    };
    let outcome = import_chunk(&mut conn, &chunk).unwrap();
    assert!(outcome.applied);
    outcome
}

fn counts(o: &ChunkOutcome) -> (i64, i64, i64, i64) {
    (o.inserted, o.updated, o.unchanged, o.failed)
}

/// Each user's unique_id, first name and row version (`xmin`), in key order.
fn stored(env: &TestEnv, t: &Tenant) -> Vec<(String, String, String)> {
    #[derive(QueryableByName)]
    struct U {
        #[diesel(sql_type = Text)]
        unique_id: String,
        #[diesel(sql_type = Text)]
        first_name: String,
        #[diesel(sql_type = Text)]
        xmin: String,
    }
    diesel::sql_query(
        "SELECT unique_id, first_name, xmin::text AS xmin FROM users \
         WHERE tenant_id = $1 ORDER BY unique_id",
    )
    .bind::<BigInt, _>(t.id)
    .load::<U>(&mut env.db.conn())
    .unwrap()
    .into_iter()
    .map(|u| (u.unique_id, u.first_name, u.xmin))
    .collect()
}

fn row(i: usize, first: &str) -> (String, String) {
    (format!("k{i:05}"), first.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_of_unchanged_rows_counts_exactly() {
    let env = TestEnv::new(AppOptions::default()).unwrap();
    let t = env.tenant("acme").unwrap();

    // 2,000 users, in key order.
    let all: Vec<(String, String)> = (0..2000).map(|i| row(i, "Ada")).collect();
    assert_eq!(counts(&import(&env, &t, "all.csv", &all)), (2000, 0, 0, 0));
    let before = stored(&env, &t);

    // The first 300 again, in order: the stretch holds exactly them.
    let first: Vec<(String, String)> = all[..300].to_vec();
    assert_eq!(
        counts(&import(&env, &t, "first.csv", &first)),
        (0, 0, 300, 0)
    );

    // Every tenth user, in order: the stretch holds ten times the chunk, more than is read;
    // every row is probed by its key instead.
    let tenth: Vec<(String, String)> = all.iter().step_by(10).cloned().collect();
    assert_eq!(tenth.len(), 200);
    assert_eq!(
        counts(&import(&env, &t, "tenth.csv", &tenth)),
        (0, 0, 200, 0)
    );

    // The same 300 shuffled: not in order, probed.
    let shuffled: Vec<(String, String)> = (0..300).map(|i| all[(i * 37) % 300].clone()).collect();
    assert_eq!(
        counts(&import(&env, &t, "shuffled.csv", &shuffled)),
        (0, 0, 300, 0)
    );
    assert_eq!(stored(&env, &t), before, "no user rewritten");

    // In order, with new users between existing ones (not in the stretch's users: probed, and
    // found absent) and two existing users changed (found in the stretch, written).
    let mut mixed: Vec<(String, String)> = Vec::new();
    for i in 1000..1200 {
        let first = if i == 1010 || i == 1150 {
            "Grace"
        } else {
            "Ada"
        };
        mixed.push(row(i, first));
        if i % 2 == 0 {
            mixed.push((format!("k{i:05}b"), "New".to_owned()));
        }
    }
    assert_eq!(
        counts(&import(&env, &t, "mixed.csv", &mixed)),
        (100, 2, 198, 0)
    );
    let after = stored(&env, &t);
    assert_eq!(after.len(), 2100);
    let changed: Vec<&str> = before
        .iter()
        .filter(|b| {
            after
                .iter()
                .find(|a| a.0 == b.0)
                .is_some_and(|a| a.2 != b.2)
        })
        .map(|b| b.0.as_str())
        .collect();
    assert_eq!(
        changed,
        ["k01010", "k01150"],
        "only the changed users rewritten"
    );
    for id in ["k01010", "k01150"] {
        let u = after.iter().find(|a| a.0 == id).unwrap();
        assert_eq!(u.1, "Grace");
    }
    assert!(after.iter().any(|a| a.0 == "k01000b" && a.1 == "New"));

    // The mixed file once more: now everything in it is stored as it says.
    assert_eq!(
        counts(&import(&env, &t, "mixed-again.csv", &mixed)),
        (0, 0, 300, 0)
    );
}
