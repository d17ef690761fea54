//! The operator's web console (`mui-console`): every tenant's files, live, in the browser.
//!
//! - [`auth`]: the operator's token, exchanged at `/login` for a session cookie; the CSRF
//!   token of each session; the security headers of every response.
//! - [`pages`]: the pages, each with a JSON twin (`Accept: application/json` or
//!   `?format=json`), the actions (POST), the failures CSV download and the live updates
//!   (Server-Sent Events).
//! - [`views`]: the HTML, rendered on the server with maud (which escapes every value it
//!   is given; nothing a tenant wrote is inserted unescaped).
//!
//! It reads and writes only through `mui_shared` (files, failures, dead letters, dispatch,
//! tenants), the same code as `muictl`, and depends on no service crate. `docs/console.md`
//! describes the routes, the authentication, CSRF and SSE.

pub mod auth;
pub mod pages;
pub mod views;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use clap::Args;
use mui_shared::config::LogFormat;
use mui_shared::db::PgPool;
use tokio_util::sync::CancellationToken;

/// The console's settings (each also an environment variable).
#[derive(Debug, Clone, Args)]
pub struct ConsoleArgs {
    /// Address to listen on. Without a token, only a loopback address is accepted.
    #[arg(long, env = "MUI_CONSOLE_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/mui"
    )]
    pub database_url: String,
    /// The operators' login token (at least 16 characters). Prefer MUI_CONSOLE_TOKEN_FILE.
    #[arg(long, env = "MUI_CONSOLE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding the operators' login token (surrounding whitespace ignored).
    #[arg(long, env = "MUI_CONSOLE_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Mark the session cookie `Secure` (serve the console behind TLS, e.g. a reverse proxy).
    #[arg(long, env = "MUI_CONSOLE_SECURE_COOKIES")]
    pub secure_cookies: bool,
    /// Seconds between two live updates of the overview.
    #[arg(long, env = "MUI_CONSOLE_REFRESH_SECS", default_value_t = 1)]
    pub refresh_secs: u64,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: LogFormat,
}

/// The operators' token; never printed by `Debug`.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// The token itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

/// The shortest token accepted.
pub const MIN_TOKEN_CHARS: usize = 16;

/// The console's checked configuration.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// Where it listens.
    pub addr: SocketAddr,
    /// PostgreSQL URL.
    pub database_url: String,
    /// The operators' token.
    pub token: Token,
    /// Whether the token was generated for this run (none was configured).
    pub token_generated: bool,
    /// `Secure` session cookies.
    pub secure_cookies: bool,
    /// Seconds between live updates.
    pub refresh_secs: u64,
}

impl ConsoleArgs {
    /// Checks the settings: the token (from the variable or the file, long enough), and no
    /// listening beyond loopback without one.
    pub fn into_config(self) -> anyhow::Result<ConsoleConfig> {
        let token = match (self.token, &self.token_file) {
            (Some(t), _) => Some(t),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading MUI_CONSOLE_TOKEN_FILE {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let (token, generated) = match token {
            Some(t) if t.chars().count() < MIN_TOKEN_CHARS => anyhow::bail!(
                "the console token is too short ({} characters): use at least {MIN_TOKEN_CHARS}, e.g. `openssl rand -hex 32`",
                t.chars().count()
            ),
            Some(t) => (t, false),
            None if self.addr.ip().is_loopback() => (auth::random_hex(32), true),
            None => anyhow::bail!(
                "refusing to listen on {} (not a loopback address) without an operator token: set MUI_CONSOLE_TOKEN or MUI_CONSOLE_TOKEN_FILE",
                self.addr
            ),
        };
        if self.refresh_secs == 0 {
            anyhow::bail!("MUI_CONSOLE_REFRESH_SECS must be at least 1");
        }
        Ok(ConsoleConfig {
            addr: self.addr,
            database_url: self.database_url,
            token: Token(token),
            token_generated: generated,
            secure_cookies: self.secure_cookies,
            refresh_secs: self.refresh_secs,
        })
    }
}

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Database connections.
    pub pool: PgPool,
    /// Token and sessions.
    pub auth: Arc<auth::Auth>,
    /// Seconds between live updates.
    pub refresh_secs: u64,
    /// Cancelled at shutdown: ends the live-update streams.
    pub shutdown: CancellationToken,
}

impl AppState {
    /// The state for `config`, with a pool that connects when first used.
    pub fn new(config: &ConsoleConfig, shutdown: CancellationToken) -> Self {
        Self {
            pool: mui_shared::db::pool(&config.database_url, 8),
            auth: Arc::new(auth::Auth::new(config.token.clone(), config.secure_cookies)),
            refresh_secs: config.refresh_secs,
            shutdown,
        }
    }
}

/// The console's routes with their state.
pub fn router(state: AppState) -> Router {
    pages::routes(state)
}

/// Applies migrations (waiting for the database), then serves on `listener` until
/// `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: ConsoleConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let state = AppState::new(&config, shutdown.clone());
    tokio::select! {
        r = mui_shared::db::migrate_at_start(&state.pool) => r.context("applying database migrations")?,
        _ = shutdown.cancelled() => return Ok(()),
    }
    tracing::info!(addr = %listener.local_addr()?, "ConsoleListening");
    let app = router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("serving HTTP")
}

/// Binds `config.addr` and [`serve`]s: what the binary runs (under the shared supervisor).
pub async fn run(config: ConsoleConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("listening on {}", config.addr))?;
    serve(listener, config, shutdown).await
}
