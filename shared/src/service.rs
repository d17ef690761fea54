//! What every service does around its own work: read configuration, set up logs, turn
//! SIGTERM/SIGINT into a shutdown token, migrate the database and connect to RabbitMQ at
//! start (cancellable), and exit with the right status, within [`SHUTDOWN_BOUND`] of the
//! signal.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use lapin::Connection;
use tokio_util::sync::CancellationToken;

use crate::amqp::{self, Topology};
use crate::config::{self, CommonArgs};
use crate::db::{self, PgPool};
use crate::{health, telemetry};

/// Reads `MUI_CONFIG_FILE` (if set) into the environment, then parses the command line.
/// Exits with status 2 and a message on a bad configuration file or bad arguments.
pub fn parse_cli<C: clap::Parser>(service: &str) -> C {
    if let Err(e) = config::load_config_file() {
        eprintln!("{service}: {e:#}");
        std::process::exit(2);
    }
    C::parse()
}

/// How long a service may take to stop after SIGTERM (or SIGINT) before it exits anyway.
/// Within it, each service stops taking work and finishes or hands back what it holds
/// (docs/reliability.md); past it, the process exits with status 1 and whatever it still
/// held is redelivered, as after a crash. Below the 60 s the systemd units and Kubernetes
/// pods allow before SIGKILL.
pub const SHUTDOWN_BOUND: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits for the tasks in hand to end, for at most [`SHUTDOWN_BOUND`], handing each result
/// to `each`; the ones still running then are aborted. Returns how many were aborted. A task
/// that never ends once the broker connection is gone (waiting for something the dead
/// connection will never bring) would otherwise hold its service for good, never
/// reconnecting: found by the chaos soak (a notifier silent for ten minutes after RabbitMQ
/// went away). What an aborted task held
/// is unacknowledged and comes back when its channel closes, as after a crash.
pub async fn drain<T: 'static>(
    tasks: &mut tokio::task::JoinSet<T>,
    mut each: impl FnMut(Result<T, tokio::task::JoinError>),
) -> usize {
    let deadline = tokio::time::Instant::now() + SHUTDOWN_BOUND;
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(done)) => each(done),
            Ok(None) => return 0,
            Err(_) => {
                let stuck = tasks.len();
                tracing::error!(stuck, "TasksAbortedAtStop");
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                return stuck;
            }
        }
    }
}

/// Runs `work` until it ends; once `stop` is cancelled, gives it [`SHUTDOWN_BOUND`] more,
/// then drops it (and whatever it awaits) and returns an error naming `what`: see
/// [`drain`] for why.
pub async fn ends_after_stop(
    stop: &CancellationToken,
    what: &str,
    work: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    tokio::pin!(work);
    tokio::select! {
        result = &mut work => return result,
        _ = stop.cancelled() => {}
    }
    match tokio::time::timeout(SHUTDOWN_BOUND, work).await {
        Ok(result) => result,
        Err(_) => {
            tracing::error!(what, "DidNotStopInTime");
            Err(anyhow::anyhow!(
                "{what} did not stop within {} s of being told to",
                SHUTDOWN_BOUND.as_secs()
            ))
        }
    }
}

/// Runs a service: logs, a shutdown token cancelled by SIGTERM or SIGINT, then `run` under
/// [`supervise`]. Exits the process when it stops (0 on shutdown), without waiting for
/// blocking tasks still retrying a connection; at the latest [`SHUTDOWN_BOUND`] after the
/// signal (status 1), or at once on a second signal (status 1).
///
/// With `MUI_HTTP_ADDR` set, `/metrics`, `/healthz` and `/readyz` are served for the whole
/// life of the process ([`crate::health`]); a port that cannot be bound exits with status 2.
/// Spans still queued for export are flushed (for at most two seconds) before exiting.
pub async fn serve<F, Fut>(service: &'static str, common: &CommonArgs, run: F) -> !
where
    F: Fn(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let http = common.http_addr.map(|addr| (addr, common.health.clone()));
    serve_with(service, common.log_format, http, run).await
}

/// [`serve`] for a process without the pipeline's common arguments (the console): its log
/// format, and where to serve `/metrics`, `/healthz` and `/readyz` with what health, if at all.
pub async fn serve_with<F, Fut>(
    service: &'static str,
    log_format: config::LogFormat,
    http: Option<(std::net::SocketAddr, health::Health)>,
    run: F,
) -> !
where
    F: Fn(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    telemetry::init(service, log_format);
    let shutdown = CancellationToken::new();
    if let Some((addr, health)) = http {
        if let Err(e) = health::serve(addr, health, shutdown.child_token()).await {
            eprintln!("{service}: {e:#}");
            std::process::exit(2);
        }
    }
    let signal = shutdown.clone();
    tokio::spawn(async move {
        telemetry::shutdown_signal().await;
        tracing::info!(bound_secs = SHUTDOWN_BOUND.as_secs(), "ShutdownRequested");
        signal.cancel();
        telemetry::shutdown_signal().await;
        tracing::warn!("ShutdownForced");
        exit(1);
    });
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_BOUND).await;
    };
    tokio::select! {
        result = supervise(service, &shutdown, run) => match result {
            Ok(()) => {
                tracing::info!("ShutdownComplete");
                exit(0)
            }
            Err(e) => {
                telemetry::log_error_chain("ServiceFailed", &e);
                exit(1)
            }
        },
        _ = deadline => {
            tracing::warn!(bound_secs = SHUTDOWN_BOUND.as_secs(), "ShutdownTimedOut");
            exit(1)
        }
    }
}

/// Exits the process after flushing the spans still queued for export.
fn exit(code: i32) -> ! {
    crate::otel::shutdown(std::time::Duration::from_secs(2));
    std::process::exit(code)
}

/// Runs `run` until `shutdown`, starting it again after it fails (lost broker connection,
/// consumer cancelled, database gone at start), with exponential backoff: the one place
/// where a service reconnects. Everything a run holds is recoverable by design (unacked
/// messages are redelivered, files stay in their folder, the outbox keeps its rows).
/// A run that lasted a minute resets the backoff.
pub async fn supervise<F, Fut>(
    service: &str,
    shutdown: &CancellationToken,
    run: F,
) -> anyhow::Result<()>
where
    F: Fn(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut policy = amqp::backoff_policy(None);
    loop {
        let started = std::time::Instant::now();
        let result = run(shutdown.clone()).await;
        if shutdown.is_cancelled() {
            return result;
        }
        let err = match result {
            Ok(()) => anyhow::anyhow!("{service} stopped without being asked to"),
            Err(e) => e,
        };
        if started.elapsed() > std::time::Duration::from_secs(60) {
            policy = amqp::backoff_policy(None);
        }
        let wait = backoff::backoff::Backoff::next_backoff(&mut policy)
            .unwrap_or(std::time::Duration::from_secs(10));
        let chain: Vec<String> = err.chain().map(|c| c.to_string()).collect();
        metrics::counter!("mui_service_restarts_total").increment(1);
        tracing::warn!(service, error = %chain.join(": "), restart_in_ms = wait.as_millis() as u64, "ServiceRestarting");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Whether this process connected to the broker before (later connections are reconnects).
static CONNECTED_BEFORE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Start-up shared by the services: applies migrations (waiting for the database) and
/// connects to RabbitMQ (waiting for the broker) and declares the topology. Returns `None`
/// if `shutdown` came first.
pub async fn start(
    common: &CommonArgs,
    name: &str,
    pool: &PgPool,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<(Arc<Connection>, Topology)>> {
    tokio::select! {
        r = db::migrate_at_start(pool) => r.context("applying database migrations")?,
        _ = shutdown.cancelled() => return Ok(None),
    }
    // The queue prefix in the name tells a deployment's (or a test's) connections apart in
    // the broker's list.
    let connection_name = format!("{name} {}", common.queue_prefix);
    let conn = tokio::select! {
        c = amqp::connect(&common.amqp_url, &connection_name) => {
            c.context("connecting to RabbitMQ")?
        }
        _ = shutdown.cancelled() => return Ok(None),
    };
    let topology = Topology::new(&common.queue_prefix);
    let channel = conn.create_channel().await?;
    topology.declare(&channel).await?;
    let _ = channel.close(200, "declared".into()).await;
    let conn = Arc::new(conn);
    common.health.connected(&conn, pool);
    if CONNECTED_BEFORE.swap(true, std::sync::atomic::Ordering::Relaxed) {
        metrics::counter!("mui_broker_reconnects_total").increment(1);
    }
    Ok(Some((conn, topology)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_tasks_that_end_and_aborts_one_that_never_does() {
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(async {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            1
        });
        // As an acknowledgement on a connection that is gone: never resolves.
        tasks.spawn(std::future::pending::<i32>());
        let mut ended = Vec::new();
        let started = tokio::time::Instant::now();
        let aborted = drain(&mut tasks, |r| {
            if let Ok(v) = r {
                ended.push(v)
            }
        })
        .await;
        assert_eq!(aborted, 1);
        assert_eq!(ended, [1]);
        assert!(tasks.is_empty());
        assert_eq!(started.elapsed(), SHUTDOWN_BOUND);
    }

    #[tokio::test(start_paused = true)]
    async fn work_that_ignores_its_stop_is_dropped_after_the_bound() {
        let stop = CancellationToken::new();
        stop.cancel();
        let r = ends_after_stop(&stop, "the test's work", std::future::pending()).await;
        let e = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e.contains("the test's work did not stop within 30 s"),
            "{e}"
        );
        // Work that ends by itself, stop or not, gives its own result.
        let r = ends_after_stop(&stop, "w", async { Ok(()) }).await;
        assert!(r.is_ok());
        let running = CancellationToken::new();
        let r = ends_after_stop(&running, "w", async { anyhow::bail!("own error") }).await;
        assert_eq!(r.err().map(|e| e.to_string()).as_deref(), Some("own error"));
    }
}
