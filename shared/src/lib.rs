//! What the Managed User Import services share, and nothing else.
//!
//! - [`domain`]: tenants, files, the known CSV columns and header mapping.
//! - [`codes`]: why a row or a file was not imported (stable codes, human messages).
//! - [`messages`]: the wire contracts (envelopes only; they import `domain` and `codes`). A file's rows travel as [`messages::Chunk`]s on the
//!   `chunks` queue; failed rows travel as [`messages::RowFailure`]s on the `notify` queue.
//! - [`schema`] and [`db`]: the PostgreSQL schema (migrations embedded) and pool.
//! - [`amqp`]: the RabbitMQ topology, connecting with backoff, publishing with confirms.
//! - [`outbox`]: database-to-broker hand-off that a crash cannot lose.
//! - [`deadletters`]: recording, listing and replaying dead-lettered messages.
//! - [`tenants`]: tenant settings as the services read them.
//! - [`config`] and [`telemetry`]: settings, logs and spans.
//! - [`service`]: start-up, shutdown and exit, the same for every service.

pub mod amqp;
pub mod codes;
pub mod config;
pub mod db;
pub mod deadletters;
pub mod domain;
pub mod messages;
pub mod outbox;
pub mod schema;
pub mod service;
pub mod telemetry;
pub mod tenants;
