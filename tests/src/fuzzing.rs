//! The file-parsing fuzz check, and a bounded run of it that needs no nightly toolchain.
//!
//! [`parse_and_check`] is the property: any bytes uploaded as a .csv go through sniffing,
//! decoding, chunking, every row check and the failures CSV without a panic, and every data
//! row comes out either as a user or as a failure. The cargo-fuzz target
//! (`fuzz/fuzz_targets/parse_and_check.rs`, coverage-guided, nightly) calls it, and so does
//! [`run`]: a time-bounded run on the stable toolchain (the `mui-fuzz` binary, which
//! `scripts/test.sh` runs for a minute) that starts from the fixture corpus and mutates it
//! with proptest (bytes flipped, inserted, deleted, spliced from another file, CSV and
//! encoding tokens dropped in), shrinking any failure to a small input that it keeps as a
//! regression fixture.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mui_ingest::reader::{self, Limits};
use mui_shared::messages::RowFailure;
use mui_worker::validate::{self, TenantRules};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// Feeds `data` through the whole file path; panics if a step panics or a row is lost.
pub fn parse_and_check(data: &[u8]) {
    let mut cur = Cursor::new(data.to_vec());
    let Ok(sniff) = reader::sniff(&mut cur, None) else {
        return;
    };
    let rules = TenantRules::new(vec!["sso".into(), "Local".into()], vec!["1".into()]);
    let mut header: Vec<String> = Vec::new();
    let mut seen = 0u64;
    let mut failures: Vec<RowFailure> = Vec::new();
    let outcome = reader::read_chunks(
        cur,
        &sniff,
        Limits::default(),
        reader::Chunking::rows(7),
        |_, _, _| {},
        |_, cells, map, rows| {
            if header.is_empty() {
                header = cells.to_vec();
            }
            for raw in rows {
                seen += 1;
                if let Err(errors) = validate::validate(cells, map, &raw, &rules) {
                    assert!(!errors.is_empty(), "a failure names at least one problem");
                    failures.push(RowFailure {
                        row: raw.row,
                        fields: raw.fields.to_vec(),
                        errors,
                    });
                }
            }
            Ok(())
        },
    );
    if let Ok(Ok(summary)) = outcome {
        assert_eq!(summary.rows, seen, "every row handed over is counted");
        let csv = mui_notifier::report::failures_csv(&header, &failures)
            .expect("writing the failures CSV to memory");
        assert!(csv.starts_with("\u{feff}".as_bytes()));
    }
}

/// Byte sequences that matter to a CSV reader and its encoding detection.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"\"\"",
    b",",
    b";",
    b"\t",
    b"|",
    b"\r\n",
    b"\n",
    b"\r",
    b"\xef\xbb\xbf",
    b"\xff\xfe",
    b"\xfe\xff",
    b"\x00",
    b"\xc3\xa9",
    b"\xe9",
    b"\x80",
    b"=",
    b"unique_id",
    b"login_source",
    b"active",
    b"email",
];

#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, usize),
    Delete(usize, usize),
    Splice(usize, usize, usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Set(p, b)),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(p, t)| Mutation::Insert(p, t)),
        (any::<usize>(), 1usize..64).prop_map(|(p, n)| Mutation::Delete(p, n)),
        (any::<usize>(), any::<usize>(), any::<usize>(), 1usize..256)
            .prop_map(|(p, f, s, n)| Mutation::Splice(p, f, s, n)),
    ]
}

fn apply(corpus: &[Vec<u8>], seed: usize, mutations: &[Mutation]) -> Vec<u8> {
    let mut data = corpus[seed % corpus.len()].clone();
    for m in mutations {
        let at = |p: usize, len: usize| if len == 0 { 0 } else { p % (len + 1) };
        match *m {
            Mutation::Set(p, b) => {
                if !data.is_empty() {
                    let i = p % data.len();
                    data[i] = b;
                }
            }
            Mutation::Insert(p, t) => {
                let i = at(p, data.len());
                data.splice(i..i, TOKENS[t].iter().copied());
            }
            Mutation::Delete(p, n) => {
                let i = at(p, data.len());
                let end = (i + n).min(data.len());
                data.drain(i..end);
            }
            Mutation::Splice(p, f, s, n) => {
                let from = &corpus[f % corpus.len()];
                let start = at(s, from.len()).min(from.len());
                let piece = from[start..(start + n).min(from.len())].to_vec();
                let i = at(p, data.len());
                data.splice(i..i, piece);
            }
        }
    }
    data
}

/// The files of `dir` (sorted), skipping `.expect` and hidden files.
pub fn load_dir(dir: &Path) -> anyhow::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let hidden = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if p.is_file() && !hidden && p.extension().is_none_or(|x| x != "expect") {
            let bytes = std::fs::read(&p)?;
            files.push((p, bytes));
        }
    }
    files.sort();
    Ok(files)
}

/// What a bounded run found.
#[derive(Debug)]
pub struct RunReport {
    /// Inputs checked.
    pub cases: u64,
    /// The smallest failing input found and why it failed, if any.
    pub failure: Option<(Vec<u8>, String)>,
}

/// Checks mutations of `corpus` until `budget` is spent or one fails (then shrunk).
/// `seed` makes a run repeatable.
pub fn run(corpus: &[Vec<u8>], budget: Duration, seed: u64) -> RunReport {
    assert!(!corpus.is_empty(), "an empty corpus");
    let started = Instant::now();
    let strategy = (any::<usize>(), proptest::collection::vec(mutation(), 0..12))
        .prop_map(move |(s, m)| (s, m));
    let mut cases = 0u64;
    let mut round = 0u64;
    while started.elapsed() < budget {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(&round.to_le_bytes());
        round += 1;
        let config = Config {
            cases: 512,
            failure_persistence: None,
            max_shrink_iters: 4_096,
            ..Config::default()
        };
        let mut runner =
            TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
        let result = runner.run(&strategy, |(s, m)| {
            let input = apply(corpus, s, &m);
            std::panic::catch_unwind(|| parse_and_check(&input))
                .map_err(|e| TestCaseError::fail(panic_text(&e)))
        });
        cases += 512;
        if let Err(proptest::test_runner::TestError::Fail(why, (s, m))) = result {
            return RunReport {
                cases,
                failure: Some((apply(corpus, s, &m), why.to_string())),
            };
        }
    }
    RunReport {
        cases,
        failure: None,
    }
}

fn panic_text(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panicked".to_owned())
}
