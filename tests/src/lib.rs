//! Test harness: the real thing on throwaway resources.
//!
//! - [`TestDb`]: a fresh PostgreSQL database per test (migrated), dropped afterwards.
//! - [`SmtpSink`]: a real SMTP server (mailin-embedded) on a random loopback port, keeping
//!   what it receives.
//! - [`App`]: ingest, a worker and the notifier running in-process against the test's own
//!   database, queue prefix, drop folder and SMTP sink ([`spawn_app`]), like zero2prod's
//!   `spawn_app()`. Tests read as the user story they check.
//! - [`otlp::OtlpSink`]: an OTLP/HTTP trace receiver (a collector, as far as the services
//!   can tell), and a plain HTTP GET for `/metrics` and `/readyz`.
//! - [`netns::NetNs`]: another "host": a network namespace joined to this one by a veth pair.
//!
//! PostgreSQL and RabbitMQ come from `MUI_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and `MUI_TEST_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`).

mod app;
pub mod bench;
pub mod chaos;
mod db;
mod env;
pub mod fuzzing;
pub mod model;
pub mod netns;
pub mod otlp;
pub mod private;
mod proxy;
pub mod sftp;
mod smtp;
pub mod soak;

pub use app::{spawn_app, spawn_app_with, App};
pub use db::{amqp_url, base_database_url, register_file, TestDb};
pub use env::{AppOptions, FileRow, TestEnv, UserRow};
pub use proxy::TcpProxy;
pub use smtp::{DataCutter, ReceivedMail, SinkRules, SmtpSink};

use std::path::Path;

/// Reads a CSV attachment (UTF-8 with BOM) into rows of strings.
pub fn parse_csv(bytes: &[u8]) -> Vec<Vec<String>> {
    let text = std::str::from_utf8(bytes).expect("utf-8 attachment");
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(text.as_bytes());
    r.records()
        .map(|rec| rec.expect("csv record").iter().map(str::to_owned).collect())
        .collect()
}

/// Whether `path` exists.
pub fn exists(path: &Path) -> bool {
    path.exists()
}
