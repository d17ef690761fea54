use clap::Parser;
use mui_worker::WorkerConfig;

/// Imports chunks of uploaded users from RabbitMQ into PostgreSQL and reports every row that
/// failed to the notifier. Run as many as you like, on any hosts.
///
/// Every option can be given as the environment variable shown; MUI_CONFIG_FILE may name a
/// file of KEY=value lines read first. On SIGTERM the worker stops taking chunks, finishes
/// the ones it holds (or hands back one it is still retrying) and exits, within 30 seconds.
#[derive(Debug, Parser)]
#[command(name = "mui-worker", version)]
struct Cli {
    #[command(flatten)]
    config: WorkerConfig,
}

#[tokio::main]
async fn main() {
    let cli: Cli = mui_shared::service::parse_cli("mui-worker");
    let common = cli.config.common.clone();
    mui_shared::service::serve("mui-worker", &common, |shutdown| {
        mui_worker::run(cli.config.clone(), shutdown)
    })
    .await
}

/// jemalloc rather than glibc's allocator: a chunk is thousands of short strings allocated
/// and freed together, from several threads; glibc's per-thread arenas kept more of that
/// memory (a worker's peak 131–151 MiB on the 1,000,000-row benchmark, 118–137 MiB with
/// jemalloc; docs/benchmarks.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
