use clap::Parser;
use mui_shared::telemetry;
use mui_worker::WorkerConfig;
use tokio_util::sync::CancellationToken;

/// Imports chunks of uploaded users from RabbitMQ into PostgreSQL and reports every row that
/// failed to the notifier. Run as many as you like, on any hosts.
///
/// Every option can be given as the environment variable shown; MUI_CONFIG_FILE may name a
/// file of KEY=value lines read first. On SIGTERM the worker stops taking chunks, finishes
/// the ones it holds and exits.
#[derive(Debug, Parser)]
#[command(name = "mui-worker", version)]
struct Cli {
    #[command(flatten)]
    config: WorkerConfig,
}

#[tokio::main]
async fn main() {
    if let Err(e) = mui_shared::config::load_config_file() {
        eprintln!("mui-worker: {e:#}");
        std::process::exit(2);
    }
    let cli = Cli::parse();
    telemetry::init("mui-worker", cli.config.common.log_format);
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        telemetry::shutdown_signal().await;
        signal.cancel();
    });
    match mui_worker::run(cli.config, shutdown).await {
        // Exit here rather than return: the runtime would otherwise wait for blocking
        // tasks still retrying a connection (up to the pool's 10 s timeout) after shutdown.
        Ok(()) => std::process::exit(0),
        Err(e) => {
            telemetry::log_error_chain("WorkerFailed", &e);
            std::process::exit(1)
        }
    }
}
