//! One integration-test binary (one link) with a module per subject.

// Test helpers fail the test by panicking; that is what unwrap is for here.
#![allow(clippy::unwrap_used)]

mod archive;
mod concurrency;
mod corpus;
mod dead_letters;
mod dispatch;
mod dry_run;
mod faults;
mod file_level;
mod guard;
mod hosts;
mod isolation;
mod kills;
mod outages;
mod pipeline;
mod plans;
mod redelivery;
mod reports;
mod roundtrip;
mod sftp;
mod uniqueness;
mod upload;
