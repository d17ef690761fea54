use clap::Parser;
use mui_console::ConsoleArgs;

/// The operator's web console: every tenant's files, live, in the browser (overview,
/// tenants, a file with its failures and report, dead letters and their replay, held mail).
///
/// Every option can be given as the environment variable shown; MUI_CONFIG_FILE may name a
/// file of KEY=value lines read first. Operators log in with MUI_CONSOLE_TOKEN (or the
/// token in MUI_CONSOLE_TOKEN_FILE) and get a session cookie. Without a token it listens
/// only on a loopback address, and prints a one-time token for this run on standard error.
/// Reads and writes PostgreSQL (DATABASE_URL) only, through the same code as muictl.
#[derive(Debug, Parser)]
#[command(name = "mui-console", version)]
struct Cli {
    #[command(flatten)]
    args: ConsoleArgs,
}

#[tokio::main]
async fn main() {
    let cli: Cli = mui_shared::service::parse_cli("mui-console");
    let log_format = cli.args.log_format;
    let config = match cli.args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mui-console: {e:#}");
            std::process::exit(2);
        }
    };
    if config.token_generated {
        // Not a log line: a one-time token for an operator at this terminal, never stored.
        eprintln!(
            "mui-console: no MUI_CONSOLE_TOKEN set; log in at http://{} with this run's token: {}",
            config.addr,
            config.token.expose()
        );
    }
    mui_shared::service::serve_with("mui-console", log_format, None, |shutdown| {
        mui_console::run(config.clone(), shutdown)
    })
    .await
}
