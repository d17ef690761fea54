use clap::Parser;
use mui_ingest::IngestConfig;

/// Watches the tenants' SFTP drop folders (DROP_ROOT/<tenant>/upload/) and hands every finished CSV
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
    let cli: Cli = mui_shared::service::parse_cli("mui-ingest");
    let common = cli.config.common.clone();
    mui_shared::service::serve("mui-ingest", &common, |shutdown| {
        mui_ingest::run(cli.config.clone(), shutdown)
    })
    .await
}

/// jemalloc rather than glibc's allocator: a chunk is thousands of short strings allocated
/// and freed together, from several threads; glibc's per-thread arenas kept more of that
/// memory (a worker's peak 131–151 MiB on the 1,000,000-row benchmark, 118–137 MiB with
/// jemalloc; docs/benchmarks.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
