//! Any bytes uploaded as a .csv: sniffing, decoding, chunking, checking every row and writing
//! the failures CSV must never panic, and every data row must come out either as a user or
//! as a failure. The check itself is `mui_tests::fuzzing::parse_and_check`, which the stable
//! bounded run (`mui-fuzz`, in `scripts/test.sh`) uses too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mui_tests::fuzzing::parse_and_check(data);
});
