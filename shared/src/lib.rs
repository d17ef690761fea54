//! What the Managed User Import services share, and nothing else.
//!
//! - [`domain`]: tenants, files, the known CSV columns and header mapping.
//! - [`codes`]: why a row or a file was not imported (stable codes, human messages).
//! - [`messages`]: the wire contracts (envelopes only; they import `domain` and `codes`). A
//!   file's rows travel as [`messages::Chunk`]s on the `chunks` queue, each row's cells in
//!   one buffer ([`fields::Fields`]); failed rows travel as [`messages::RowFailure`]s on the
//!   `notify` queue.
//! - [`schema`] and [`db`]: the PostgreSQL schema (migrations embedded) and pool.
//! - [`amqp`]: the RabbitMQ topology, connecting with backoff, publishing with confirms.
//! - [`outbox`]: database-to-broker hand-off that a crash cannot lose.
//! - [`deadletters`]: recording, listing and replaying dead-lettered messages.
//! - [`dispatch`]: the chunk queue in the database and the fair order it is handed out in.
//! - [`failures`]: a file's stored failure records and the failures CSV, as mailed.
//! - [`files`]: the files a tenant sent, as an operator lists them.
//! - [`users`]: a tenant's users, as an operator lists and looks them up.
//! - [`permits`]: users' parking permits, as an operator lists and adds them.
//! - [`tenants`]: tenant settings as the services read them.
//! - [`config`] and [`telemetry`]: settings, logs and spans; [`otel`]: OpenTelemetry traces
//!   (one per file) and their context in messages; [`health`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`service`]: start-up, shutdown and exit, the same for every service.

pub mod amqp;
pub mod codes;
pub mod config;
pub mod db;
pub mod deadletters;
pub mod dispatch;
pub mod domain;
pub mod ending;
pub mod failpoint;
pub mod failures;
pub mod fields;
pub mod files;
pub mod health;
pub mod holds;
pub mod messages;
pub mod otel;
pub mod outbox;
pub mod permits;
pub mod schema;
pub mod service;
pub mod telemetry;
pub mod tenants;
pub mod users;
