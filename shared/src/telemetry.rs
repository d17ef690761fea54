//! Logging and tracing set-up, one place for all services.
//!
//! Events are named `<Noun><Verb>[Error]` (`FileRegistered`, `ChunkImported`,
//! `EmailSendError`). Every span about a file carries `tenant` and `file_id`, opened by each
//! service from the message it handles, so one file can be followed from ingest through the
//! workers to the email. Logs never carry a tenant user's personal data or an email address.

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Layer as _, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;
use crate::otel;

/// What is logged (and exported as spans) when `RUST_LOG` says nothing.
const DEFAULT_FILTER: &str = "info,lapin=warn,amq_protocol=warn";

/// Installs the global subscriber. `RUST_LOG` filters (default `info`). When the standard
/// `OTEL_*` variables configure an exporter ([`otel::configured`]), spans are also exported
/// as OpenTelemetry traces (service name `service` unless `OTEL_SERVICE_NAME` says
/// otherwise), and JSON log lines written inside a span carry its `trace_id` and `span_id`.
/// A bad OpenTelemetry configuration ends the process with status 2 and says why.
pub fn init(service: &'static str, format: LogFormat) {
    let provider = match otel::init_provider(service) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{service}: {e}");
            std::process::exit(2);
        }
    };
    // Spans are exported whatever RUST_LOG says of the logs (a quieter log must not empty
    // the traces): the exporter's own filter is the default one.
    let otel_layer = provider.map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("mui"))
            .with_tracked_inactivity(false)
            .with_filter(EnvFilter::new(DEFAULT_FILTER))
    });
    let filter =
        || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let registry = tracing_subscriber::registry().with(otel_layer);
    let result = match format {
        LogFormat::Human => registry
            .with(fmt::layer().with_target(false).with_filter(filter()))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .fmt_fields(fmt::format::JsonFields::new())
                    .event_format(WithTraceIds(
                        fmt::format()
                            .json()
                            .flatten_event(true)
                            .with_current_span(true),
                    ))
                    .with_filter(filter()),
            )
            .try_init(),
    };
    if result.is_ok() {
        tracing::info!(service, traces = otel::enabled(), "ServiceStarting");
    }
}

/// For tests that run the services in their own process: human log lines written through
/// the test harness (`print!`), so that they are captured and shown only for a failing test;
/// no exporter. `RUST_LOG` filters as in [`init`]. A second call does nothing.
pub fn init_for_tests() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let _ = tracing_subscriber::registry()
        .with(
            fmt::layer()
                .with_target(false)
                .with_test_writer()
                .with_filter(filter),
        )
        .try_init();
}

/// A JSON event format that adds the OpenTelemetry `trace_id` and `span_id` of the span the
/// event happened in (entering a span makes its OpenTelemetry context current), so that a
/// log line leads to its trace.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    F: FormatEvent<S, N>,
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let cx = opentelemetry::Context::current();
        let span = cx.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return self.0.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.trim_end().strip_suffix('}') {
            Some(object) => writeln!(
                writer,
                "{object},\"trace_id\":\"{}\",\"span_id\":\"{}\"}}",
                sc.trace_id(),
                sc.span_id()
            ),
            None => writer.write_str(&line),
        }
    }
}

/// Logs an error with its whole cause chain.
pub fn log_error_chain(context: &str, err: &anyhow::Error) {
    let chain: Vec<String> = err.chain().map(|c| c.to_string()).collect();
    tracing::error!(error = %chain.join(": "), "{context}");
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
