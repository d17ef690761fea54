//! `mui-service ingest|worker|notifier`: one of the services, exactly as its own binary runs
//! it (configuration from the environment, the supervisor, SIGTERM handling), built with the
//! tests so that they can kill it with SIGKILL or stop it with SIGTERM as a real process,
//! and with the named stop points of `mui_shared::failpoint` (`MUI_STOP_AT`) so that a test
//! can kill it inside a precise window.

use clap::{Parser, Subcommand};

/// Runs one Managed User Import service (for the fault tests).
#[derive(Debug, Parser)]
#[command(name = "mui-service")]
struct Cli {
    #[command(subcommand)]
    service: Service,
}

#[derive(Debug, Subcommand)]
enum Service {
    /// mui-ingest.
    Ingest(mui_ingest::IngestConfig),
    /// mui-worker.
    Worker(mui_worker::WorkerConfig),
    /// mui-notifier.
    Notifier(mui_notifier::NotifierConfig),
}

#[tokio::main]
async fn main() {
    let cli: Cli = mui_shared::service::parse_cli("mui-service");
    // MUI_STOP_AT: the named point this process stops at for a fault test to kill it there.
    if let Err(e) = mui_shared::failpoint::configure_from_env() {
        eprintln!("mui-service: {e}");
        std::process::exit(2);
    }
    match cli.service {
        Service::Ingest(c) => {
            let common = c.common.clone();
            mui_shared::service::serve("mui-ingest", &common, |s| mui_ingest::run(c.clone(), s))
                .await
        }
        Service::Worker(c) => {
            let common = c.common.clone();
            mui_shared::service::serve("mui-worker", &common, |s| mui_worker::run(c.clone(), s))
                .await
        }
        Service::Notifier(c) => {
            let common = c.common.clone();
            mui_shared::service::serve("mui-notifier", &common, |s| mui_notifier::run(c.clone(), s))
                .await
        }
    }
}
