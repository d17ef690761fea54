//! Configuration shared by every service: environment variables first (each flag has one),
//! with a documented file alternative: `MUI_CONFIG_FILE=/etc/mui/mui.env` names a file of
//! `KEY=value` lines, read at start; variables already set in the environment win over it.

use clap::{Args, ValueEnum};

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (default).
    Human,
    /// One JSON object per line.
    Json,
}

/// Settings every service takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/mui"
    )]
    pub database_url: String,
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Prefix of every queue and exchange name (several deployments can share a broker).
    #[arg(long, env = "MUI_QUEUE_PREFIX", default_value = "mui")]
    pub queue_prefix: String,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: LogFormat,
    /// Address of the HTTP endpoint serving /metrics (Prometheus), /healthz and /readyz,
    /// e.g. 0.0.0.0:9090 (unset: none).
    #[arg(long, env = "MUI_HTTP_ADDR")]
    pub http_addr: Option<std::net::SocketAddr>,
    /// Whether the service is connected, for /readyz (set by the service itself).
    #[arg(skip)]
    pub health: crate::health::Health,
}

/// Reads the file named by `MUI_CONFIG_FILE`, if set, into the environment (without
/// overriding variables already set). Call before parsing arguments.
pub fn load_config_file() -> anyhow::Result<()> {
    if let Some(path) = std::env::var_os("MUI_CONFIG_FILE") {
        dotenvy::from_path(&path).map_err(|e| {
            anyhow::anyhow!(
                "could not read MUI_CONFIG_FILE {}: {e}",
                std::path::Path::new(&path).display()
            )
        })?;
    }
    Ok(())
}

/// A URL with its password replaced by `***`, for logs.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable url>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact_url("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("not a url"), "<unparseable url>");
    }
}
