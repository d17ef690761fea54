//! Any bytes uploaded as a .csv: sniffing, decoding, chunking, checking every row and writing
//! the failures CSV must never panic, and every data row must come out either as a user or
//! as a failure.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use mui_ingest::reader::{self, Limits};
use mui_shared::messages::RowFailure;
use mui_worker::validate::{self, TenantRules};

fuzz_target!(|data: &[u8]| {
    let mut cur = Cursor::new(data.to_vec());
    let Ok(sniff) = reader::sniff(&mut cur) else { return };
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
                    failures.push(RowFailure { row: raw.row, fields: raw.fields, errors });
                }
            }
            Ok(())
        },
    );
    if let Ok(Ok(summary)) = outcome {
        assert_eq!(summary.rows, seen, "every row handed over is counted");
        let csv = mui_notifier::report::failures_csv(&header, &failures).expect("writing to memory");
        assert!(csv.starts_with("\u{feff}".as_bytes()));
    }
});
