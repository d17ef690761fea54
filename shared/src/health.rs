//! Each service's HTTP endpoint on `MUI_HTTP_ADDR` (unset: none): `/metrics` (Prometheus
//! text format), `/healthz` (the process is alive) and `/readyz` (connected to RabbitMQ and
//! to PostgreSQL, so able to work; not ready while it reconnects). docs/observability.md
//! lists every metric.
//!
//! Metrics are recorded with the `metrics` facade everywhere in the code; the Prometheus
//! recorder is installed only when the endpoint is served, so without `MUI_HTTP_ADDR`
//! recording a metric costs nothing.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use diesel::RunQueryDsl;
use lapin::Connection;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::db::{self, PgPool};

/// Histogram buckets of one chunk's import, in seconds: a chunk of 5,000 rows takes from a
/// few milliseconds (all unchanged) to about a second on a busy database; the last buckets
/// show retries and lock waits.
pub const CHUNK_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Histogram buckets of a file's upload-to-mail latency, in seconds: a 100-row file takes
/// about a second, a 1,000,000-row file about a minute; the last buckets show a file that
/// waited behind others or for a mail server.
pub const FILE_BUCKETS: &[f64] = &[
    0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Whether the service is connected: set by [`crate::service::start`] once the broker and
/// the database answered, read by `/readyz`. Clones share the state.
#[derive(Clone, Default)]
pub struct Health(Arc<Mutex<Option<Connected>>>);

/// The broker connection and the database pool of the current run.
type Connected = (Arc<Connection>, PgPool);

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").finish_non_exhaustive()
    }
}

impl Health {
    /// The service (re)connected: `conn` to the broker, `pool` to the database.
    pub fn connected(&self, conn: &Arc<Connection>, pool: &PgPool) {
        if let Ok(mut g) = self.0.lock() {
            *g = Some((conn.clone(), pool.clone()));
        }
    }

    /// Ready, or why not: the broker connection must be open and the database must answer
    /// a query within two seconds.
    pub async fn ready(&self) -> Result<(), String> {
        let current = self.0.lock().ok().and_then(|g| g.clone());
        let Some((conn, pool)) = current else {
            return Err("not connected yet".into());
        };
        if !conn.status().connected() {
            return Err("not connected to RabbitMQ (reconnecting)".into());
        }
        let query = db::run(&pool, |c| {
            diesel::sql_query("SELECT 1").execute(c)?;
            Ok(())
        });
        match tokio::time::timeout(Duration::from_secs(2), query).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("PostgreSQL: {e}")),
            Err(_) => Err("PostgreSQL did not answer within 2 s".into()),
        }
    }
}

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's Prometheus recorder (once) and returns its handle.
fn prometheus() -> anyhow::Result<PrometheusHandle> {
    if let Some(h) = PROMETHEUS.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("mui_chunk_import_duration_seconds".into()),
            CHUNK_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("mui_file_upload_to_mail_seconds".into()),
            FILE_BUCKETS,
        )?
        .install_recorder()?;
    let _ = PROMETHEUS.set(handle);
    PROMETHEUS
        .get()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("the Prometheus recorder was not installed"))
}

#[derive(Clone)]
struct Served {
    health: Health,
    metrics: PrometheusHandle,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until `shutdown`. Returns the
/// address bound (port 0 picks a free one), also logged as `HttpListening`.
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let metrics = prometheus()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("MUI_HTTP_ADDR {addr}: cannot listen: {e}"))?;
    let bound = listener.local_addr()?;
    let upkeep = metrics.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => upkeep.run_upkeep(),
            }
        }
    });
    let app = axum::Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Served { health, metrics });
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HttpServeError");
        }
    });
    tracing::info!(addr = %bound, "HttpListening");
    Ok(bound)
}

async fn metrics_text(State(s): State<Served>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn readyz(State(s): State<Served>) -> impl IntoResponse {
    match s.health.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
