use clap::Parser;
use mui_ingest::IngestConfig;
use mui_shared::telemetry;
use tokio_util::sync::CancellationToken;

/// Watches the tenants' SFTP drop folders (DROP_ROOT/<tenant>/) and hands every finished CSV
/// upload to the workers through RabbitMQ, then moves it to the tenant's bak/ folder.
///
/// Every option can be given as the environment variable shown; MUI_CONFIG_FILE may name a
/// file of KEY=value lines read first.
#[derive(Debug, Parser)]
#[command(name = "mui-ingest", version)]
struct Cli {
    #[command(flatten)]
    config: IngestConfig,
}

#[tokio::main]
async fn main() {
    if let Err(e) = mui_shared::config::load_config_file() {
        eprintln!("mui-ingest: {e:#}");
        std::process::exit(2);
    }
    let cli = Cli::parse();
    telemetry::init("mui-ingest", cli.config.common.log_format);
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        telemetry::shutdown_signal().await;
        signal.cancel();
    });
    match mui_ingest::run(cli.config, shutdown).await {
        // Exit here rather than return: the runtime would otherwise wait for blocking
        // tasks still retrying a connection (up to the pool's 10 s timeout) after shutdown.
        Ok(()) => std::process::exit(0),
        Err(e) => {
            telemetry::log_error_chain("IngestFailed", &e);
            std::process::exit(1)
        }
    }
}
