//! One integration-test binary (one link) with a module per subject.

// Test helpers fail the test by panicking; that is what unwrap is for here.
#![allow(clippy::unwrap_used)]

mod archive;
mod concurrency;
mod console;
mod corpus;
mod dead_letters;
mod disk;
mod dispatch;
mod dry_run;
mod faults;
mod file_level;
mod guard;
mod hosts;
mod invariants;
mod isolation;
mod kills;
mod observability;
mod outages;
mod pipeline;
mod plans;
mod redelivery;
mod reimport;
mod reports;
mod restarts;
mod roundtrip;
mod sftp;
mod smtp_faults;
mod unchanged;
mod uniqueness;
mod upload;
mod windows;
