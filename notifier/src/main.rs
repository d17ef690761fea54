use clap::Parser;
use mui_notifier::NotifierConfig;

/// Collects each imported file's failure records and, when the file is finished, sends the
/// tenant ONE email with a failures CSV (or writes it to MAIL_OUTBOX when no SMTP_URL is set).
///
/// Every option can be given as the environment variable shown; MUI_CONFIG_FILE may name a
/// file of KEY=value lines read first. Also records dead-lettered messages for `muictl
/// dead-letters`. Reports go out concurrently (MAIL_CONCURRENCY), each SMTP conversation
/// bounded by SMTP_TIMEOUT_SECS. On SIGTERM it stops consuming, finishes (or hands back) the
/// messages in hand and exits, within 30 seconds.
#[derive(Debug, Parser)]
#[command(name = "mui-notifier", version)]
struct Cli {
    #[command(flatten)]
    config: NotifierConfig,
}

#[tokio::main]
async fn main() {
    let cli: Cli = mui_shared::service::parse_cli("mui-notifier");
    let common = cli.config.common.clone();
    mui_shared::service::serve("mui-notifier", &common, |shutdown| {
        mui_notifier::run(cli.config.clone(), shutdown)
    })
    .await
}

/// jemalloc rather than glibc's allocator, as in ingest and the workers: failure records
/// are thousands of short strings decoded, stored and freed together on several threads,
/// and glibc's per-thread arenas kept much of that memory (docs/benchmarks.md, "Memory").
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
