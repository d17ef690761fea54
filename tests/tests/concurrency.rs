//! Many chunks of one file imported at the same time, by the worker's own import function on
//! separate connections, with the same users appearing in several chunks and several times
//! within a chunk. Whatever the interleaving: every user ends with the values of its last row
//! in the file, and every other row naming it is reported once, as a duplicate.

use std::collections::{BTreeMap, BTreeSet};

use diesel::prelude::*;
use mui_shared::domain::ImportFileId;
use mui_shared::messages::{self, Chunk, NotifyMessage, RawRow, RowErrorCode};
use mui_shared::schema::{import_files, outbox};
use mui_tests::register_file;
use mui_tests::{AppOptions, TestEnv};

const CHUNKS: u64 = 8;
const ROWS_PER_CHUNK: u64 = 40;
const USERS: u64 = 25;
const ROUNDS: u64 = 16;

fn import_with_retry(url: &str, chunk: &Chunk) {
    let mut conn = PgConnection::establish(url).unwrap();
    for attempt in 0.. {
        match mui_worker::import::import_chunk(&mut conn, chunk) {
            Ok(outcome) => {
                assert!(outcome.applied);
                return;
            }
            // The worker retries these (deadlocks between chunks locking the same users).
            Err(mui_worker::import::ImportError::Db(e))
                if mui_shared::db::is_transient(&e) && attempt < 20 => {}
            Err(e) => panic!("chunk {}: {e}", chunk.chunk_no),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_chunks_sharing_users_keep_the_last_row_and_report_every_other_once() {
    let env = TestEnv::new(AppOptions::default()).unwrap();
    let t = env.tenant("acme").unwrap();
    let header: Vec<String> = ["unique_id", "login_source", "first_name"]
        .map(String::from)
        .to_vec();
    for round in 0..ROUNDS {
        let mut conn = env.db.conn();
        let file_id = register_file(
            &mut conn,
            t.id,
            &format!("c{round}.csv"),
            &header,
            CHUNKS as i32,
            (CHUNKS * ROWS_PER_CHUNK) as i64,
        )
        .unwrap();
        // Row r names user (r * 7) % USERS: every user appears in most chunks, and some twice
        // in one chunk. Odd rounds update the users of the round before; even rounds bring
        // new users, whom several chunks race to insert.
        let uid = |row: u64| format!("g{}-u{:02}", round / 2, (row * 7) % USERS);
        let chunks: Vec<Chunk> = (0..CHUNKS)
            .map(|c| Chunk {
                file_id: ImportFileId(file_id),
                tenant_id: t.tenant_id(),
                chunk_no: c as u32,
                header: header.clone(),
                repeated: None,
                rows: (0..ROWS_PER_CHUNK)
                    .map(|i| {
                        let row = 2 + c * ROWS_PER_CHUNK + i;
                        RawRow {
                            row,
                            fields: vec![uid(row), "sso".into(), format!("r{round}-{row}")].into(),
                            too_large: None,
                        }
                    })
                    .collect(),
            })
            .collect();
        let url = env.db.url.clone();
        std::thread::scope(|s| {
            for chunk in &chunks {
                let url = &url;
                s.spawn(move || import_with_retry(url, chunk));
            }
        });

        let mut last: BTreeMap<String, u64> = BTreeMap::new();
        for row in 2..2 + CHUNKS * ROWS_PER_CHUNK {
            last.insert(uid(row), row);
        }
        let users = env.users(&t);
        assert_eq!(users.len() as u64, USERS * (round / 2 + 1));
        for u in users.iter().filter(|u| last.contains_key(&u.0)) {
            let want = format!("r{round}-{}", last[&u.0]);
            assert_eq!(u.2.as_deref(), Some(want.as_str()), "user {}", u.0);
        }

        let losers: BTreeSet<u64> = (2..2 + CHUNKS * ROWS_PER_CHUNK)
            .filter(|row| last[&uid(*row)] != *row)
            .collect();
        let mut reported: Vec<u64> = Vec::new();
        let payloads: Vec<Vec<u8>> = outbox::table
            .select(outbox::payload)
            .load(&mut conn)
            .unwrap();
        for p in payloads {
            if let NotifyMessage::RowFailuresV1(f) = messages::decode(&p).unwrap() {
                if f.file_id.0 != file_id {
                    continue;
                }
                for failure in f.failures {
                    assert_eq!(
                        failure.errors[0].code,
                        RowErrorCode::DuplicateUniqueId,
                        "row {}",
                        failure.row
                    );
                    reported.push(failure.row);
                }
            }
        }
        reported.sort_unstable();
        let mut twice = reported.clone();
        twice.dedup();
        let once: BTreeSet<u64> = reported.iter().copied().collect();
        assert_eq!(
            twice.len(),
            reported.len(),
            "round {round}: a row reported twice"
        );
        assert_eq!(
            (
                losers.difference(&once).collect::<Vec<_>>(),
                once.difference(&losers).collect::<Vec<_>>()
            ),
            (vec![], vec![]),
            "round {round}: (losing rows not reported, winning rows reported)"
        );

        let counts: (String, i64, i64, i64, i64) = import_files::table
            .find(file_id)
            .select((
                import_files::state,
                import_files::rows_inserted,
                import_files::rows_updated,
                import_files::rows_unchanged,
                import_files::rows_failed,
            ))
            .first(&mut conn)
            .unwrap();
        assert_eq!(counts.4 as usize, losers.len());
        assert_eq!(
            (counts.1 + counts.2 + counts.3 + counts.4) as u64,
            CHUNKS * ROWS_PER_CHUNK,
            "every row counted once: {counts:?}"
        );
    }
}
