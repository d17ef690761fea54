//! OpenTelemetry traces: one trace per file across the three services
//! (docs/observability.md lists every span).
//!
//! The services' `tracing` spans are bridged to OpenTelemetry by `tracing-opentelemetry`
//! and exported over OTLP/HTTP (protobuf) by a batch processor. Only the standard variables
//! configure it: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` (none
//! set: no exporter and no OpenTelemetry layer at all, so nothing is recorded and nothing
//! slows down), `OTEL_SERVICE_NAME` (default: the service's binary name),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`,
//! `OTEL_EXPORTER_OTLP_HEADERS`/`_TIMEOUT`, `OTEL_BSP_*`, and `OTEL_SDK_DISABLED`.
//!
//! A collector that is down or slow never holds up an import: ended spans go into a bounded
//! queue (`OTEL_BSP_MAX_QUEUE_SIZE`, default 2048) that one background thread exports;
//! when it is full, a span is dropped and counted in `mui_otel_spans_dropped_total`.
//!
//! The trace context (W3C `traceparent` and `tracestate`) travels as a [`TraceContext`]: in
//! the AMQP headers of every message about a file, and in the database where a message is
//! written first (the outbox, the file's row for the fair dispatcher).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Status, TraceContextExt};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C trace context of a span, as carrier entries (`traceparent`, `tracestate`).
/// Empty when tracing is off or the span is not recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct TraceContext(HashMap<String, String>);

impl TraceContext {
    /// The context of `span` (empty without the OpenTelemetry layer).
    pub fn of(span: &tracing::Span) -> Self {
        if !enabled() {
            return Self::default();
        }
        Self::of_otel(&span.context())
    }

    /// The context of the span entered on this thread (entering a span makes its
    /// OpenTelemetry context current; `spawn_blocking` closures enter theirs).
    pub fn current() -> Self {
        if !enabled() {
            return Self::default();
        }
        Self::of_otel(&opentelemetry::Context::current())
    }

    fn of_otel(cx: &opentelemetry::Context) -> Self {
        let mut map = HashMap::new();
        if cx.span().span_context().is_valid() {
            TraceContextPropagator::new().inject_context(cx, &mut map);
        }
        Self(map)
    }

    /// Whether it carries nothing.
    pub fn is_empty(&self) -> bool {
        !self.0.contains_key(TRACEPARENT)
    }

    /// The trace id (32 hex digits), if any.
    pub fn trace_id(&self) -> Option<String> {
        let parent = self.0.get(TRACEPARENT)?;
        let id = parent.split('-').nth(1)?;
        (id.len() == 32).then(|| id.to_owned())
    }

    /// Makes `span` a child of this context (call before the span is first entered).
    /// Nothing happens when the context is empty or tracing is off.
    pub fn parent(&self, span: &tracing::Span) {
        if self.is_empty() || !enabled() {
            return;
        }
        let cx = TraceContextPropagator::new().extract(&self.0);
        let _ = span.set_parent(cx);
    }

    /// Adds the entries to AMQP message headers.
    pub fn add_to(&self, headers: &mut FieldTable) {
        for (k, v) in &self.0 {
            headers.insert(
                k.as_str().into(),
                AMQPValue::LongString(LongString::from(v.as_bytes().to_vec())),
            );
        }
    }

    /// Reads the entries from AMQP message headers (missing or not text: left out).
    pub fn from_headers(headers: Option<&FieldTable>) -> Self {
        let mut map = HashMap::new();
        if let Some(h) = headers {
            for key in [TRACEPARENT, TRACESTATE] {
                let value = match h.inner().get(key) {
                    Some(AMQPValue::LongString(s)) => String::from_utf8(s.as_bytes().to_vec()).ok(),
                    Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
                    _ => None,
                };
                if let Some(v) = value {
                    map.insert(key.to_owned(), v);
                }
            }
        }
        Self(map)
    }

    /// As stored in a `jsonb` column (`None` when empty).
    pub fn to_json(&self) -> Option<serde_json::Value> {
        if self.is_empty() {
            return None;
        }
        serde_json::to_value(&self.0).ok()
    }

    /// From a `jsonb` column (anything unreadable: empty).
    pub fn from_json(value: Option<serde_json::Value>) -> Self {
        value
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default()
    }
}

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// Marks `span` as failed with `cause` (OpenTelemetry status `Error`).
pub fn set_error(span: &tracing::Span, cause: impl std::fmt::Display) {
    if enabled() {
        span.set_status(Status::error(cause.to_string()));
    }
}

/// Marks `span` as succeeded (after a retry that had set an error).
pub fn set_ok(span: &tracing::Span) {
    if enabled() {
        span.set_status(Status::Ok);
    }
}

/// The provider, once [`init_provider`] built one.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether spans are exported (an OTLP endpoint is configured and the provider was built).
pub fn enabled() -> bool {
    PROVIDER.get().is_some()
}

/// Why the OpenTelemetry configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OtelError {
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` names a protocol other than `http/protobuf`.
    #[error("OTEL_EXPORTER_OTLP_PROTOCOL={0:?} is not supported: only http/protobuf is")]
    Protocol(String),
    /// The exporter could not be built (a bad endpoint or header, for example).
    #[error("OTLP exporter: {0}")]
    Exporter(String),
}

fn env_set(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Whether the standard variables ask for traces to be exported: an OTLP endpoint is set,
/// and neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`.
pub fn configured() -> bool {
    if env_set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return false;
    }
    if env_set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none")) {
        return false;
    }
    env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        || env_set("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
}

/// Builds the process's tracer provider from the standard variables, if they configure an
/// exporter (see [`configured`]); `default_service` names the service when neither
/// `OTEL_SERVICE_NAME` nor `service.name` in `OTEL_RESOURCE_ATTRIBUTES` does. Returns the
/// provider (the first one built, if called again).
pub fn init_provider(default_service: &str) -> Result<Option<SdkTracerProvider>, OtelError> {
    if !configured() {
        return Ok(None);
    }
    if let Some(p) = PROVIDER.get() {
        return Ok(Some(p.clone()));
    }
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(p) = env_set(var) {
            if p.trim() != "http/protobuf" {
                return Err(OtelError::Protocol(p));
            }
        }
    }
    let default_service = default_service.to_owned();
    // The blocking HTTP client starts a runtime of its own, which must not be created (nor
    // later dropped) on a thread of an async runtime: build it on a plain thread.
    let built = std::thread::spawn(move || build_provider(&default_service))
        .join()
        .map_err(|_| OtelError::Exporter("building the exporter panicked".into()))??;
    let _ = PROVIDER.set(built);
    Ok(PROVIDER.get().cloned())
}

fn build_provider(default_service: &str) -> Result<SdkTracerProvider, OtelError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| OtelError::Exporter(e.to_string()))?;
    let max_queue = env_set("OTEL_BSP_MAX_QUEUE_SIZE")
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(2048);
    let queued = Arc::new(AtomicUsize::new(0));
    let batch = BatchSpanProcessor::builder(CountingExporter {
        inner: exporter,
        queued: queued.clone(),
    })
    .build();
    let named_in_attributes = env_set("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| {
        a.split(',')
            .any(|kv| kv.trim().starts_with("service.name="))
    });
    let mut resource = Resource::builder();
    if env_set("OTEL_SERVICE_NAME").is_none() && !named_in_attributes {
        resource = resource.with_service_name(default_service.to_owned());
    }
    // The SDK reads OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG itself.
    Ok(SdkTracerProvider::builder()
        .with_span_processor(BoundedProcessor {
            inner: batch,
            queued,
            max_queue,
        })
        .with_resource(resource.build())
        .build())
}

/// Flushes what is queued and stops exporting (at most `timeout`). Called as a service
/// exits.
pub fn shutdown(timeout: Duration) {
    if let Some(p) = PROVIDER.get() {
        let p = p.clone();
        // The batch processor's thread does the work; wait for it off the async threads.
        let _ = std::thread::spawn(move || p.shutdown_with_timeout(timeout)).join();
    }
}

/// Passes ended spans to the batch processor while fewer than `max_queue` are waiting for
/// export, and drops (and counts) the rest, so that the count is exact and the batch
/// processor's own queue (of the same size) never fills.
#[derive(Debug)]
struct BoundedProcessor {
    inner: BatchSpanProcessor,
    queued: Arc<AtomicUsize>,
    max_queue: usize,
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let taken = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_queue).then_some(n + 1)
            })
            .is_ok();
        if taken {
            self.inner.on_end(span);
        } else {
            metrics::counter!("mui_otel_spans_dropped_total").increment(1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, telling [`BoundedProcessor`] how many spans left the queue and
/// counting what was exported or failed.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    queued: Arc<AtomicUsize>,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.inner.export(batch).await;
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                Some(q.saturating_sub(n))
            })
            .ok();
        match &result {
            Ok(()) => metrics::counter!("mui_otel_spans_exported_total").increment(n as u64),
            Err(_) => metrics::counter!("mui_otel_spans_failed_total").increment(n as u64),
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_reads_back_from_headers_and_json() {
        let mut map = HashMap::new();
        map.insert(
            TRACEPARENT.to_owned(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
        );
        map.insert(TRACESTATE.to_owned(), "vendor=x".to_owned());
        let cx = TraceContext(map);
        let mut headers = FieldTable::default();
        cx.add_to(&mut headers);
        assert_eq!(TraceContext::from_headers(Some(&headers)), cx);
        assert_eq!(TraceContext::from_json(cx.to_json()), cx);
        assert_eq!(
            cx.trace_id().as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert!(TraceContext::from_headers(None).is_empty());
        assert_eq!(TraceContext::default().to_json(), None);
    }
}
