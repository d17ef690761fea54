use clap::Parser;
use mui_notifier::NotifierConfig;
use mui_shared::telemetry;
use tokio_util::sync::CancellationToken;

/// Collects each imported file's failure records and, when the file is finished, sends the
/// tenant ONE email with a failures CSV (or writes it to MAIL_OUTBOX when no SMTP_URL is set).
///
/// Every option can be given as the environment variable shown; MUI_CONFIG_FILE may name a
/// file of KEY=value lines read first.
#[derive(Debug, Parser)]
#[command(name = "mui-notifier", version)]
struct Cli {
    #[command(flatten)]
    config: NotifierConfig,
}

#[tokio::main]
async fn main() {
    if let Err(e) = mui_shared::config::load_config_file() {
        eprintln!("mui-notifier: {e:#}");
        std::process::exit(2);
    }
    let cli = Cli::parse();
    telemetry::init("mui-notifier", cli.config.common.log_format);
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        telemetry::shutdown_signal().await;
        signal.cancel();
    });
    match mui_notifier::run(cli.config, shutdown).await {
        // Exit here rather than return: the runtime would otherwise wait for blocking
        // tasks still retrying a connection (up to the pool's 10 s timeout) after shutdown.
        Ok(()) => std::process::exit(0),
        Err(e) => {
            telemetry::log_error_chain("NotifierFailed", &e);
            std::process::exit(1)
        }
    }
}
