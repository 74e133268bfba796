//! Logs and traces of a Sagaflow process (a node, a participant). Logs go to stderr, filtered
//! by `RUST_LOG`. Spans leave the process only when an OTLP endpoint is configured, by the
//! OpenTelemetry variables every OTLP exporter reads (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, HTTP with protobuf; `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`): off by default. The export takes every span at
//! INFO and above, whatever `RUST_LOG` says.
//!
//! One saga is one trace. Its W3C `traceparent` travels with every command and reply; the
//! orchestrator's `decide` span and the participants' `command` span take it as their remote
//! parent ([`follow`]), and a command leaves with the span that decided it as its parent
//! ([`traceparent_of`]), so a collector shows each command under the decision that sent it.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use sagas::protocol::valid_traceparent;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Whether this process exports spans (set once by [`init`]).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The variables that turn the export on.
const ENDPOINT_VARS: [&str; 2] = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"];

/// Why logging or the export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter refused its configuration (an endpoint that is not a URL, say).
    #[error("cannot export traces to the OTLP endpoint {endpoint:?}: {source}")]
    Exporter {
        /// The configured endpoint.
        endpoint: String,
        /// What the exporter said.
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// Another subscriber is already installed in this process.
    #[error("cannot install the log subscriber: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Keeps the span export running; dropping it sends the spans still buffered.
#[must_use = "dropping it stops the export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            EXPORTING.store(false, Ordering::Relaxed);
            if let Err(e) = p.shutdown() {
                eprintln!("sagaflow: the last spans were not exported: {e}");
            }
        }
    }
}

/// The OTLP endpoint the environment configures, if any.
pub fn configured_endpoint() -> Option<String> {
    ENDPOINT_VARS.iter().find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()))
}

/// Install the process's subscriber: logs to stderr filtered by `RUST_LOG` (else
/// `default_filter`), and, when an OTLP endpoint is configured, the export of the same spans as
/// service `service_name` (unless `OTEL_SERVICE_NAME` names it). Keep the result alive while
/// the process runs.
pub fn init(default_filter: &str, service_name: &str) -> Result<Telemetry, TelemetryError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter);
    let Some(endpoint) = configured_endpoint() else {
        tracing_subscriber::registry().with(fmt).try_init()?;
        return Ok(Telemetry { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|source| TelemetryError::Exporter { endpoint: endpoint.clone(), source })?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service_name.to_owned());
    }
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build();
    // The export has its own filter, whatever RUST_LOG keeps for stderr: spans at INFO and
    // above (`decide`, `command` and the handlers' own), and the warnings and errors logged
    // inside them as their events.
    let exported = tracing_subscriber::filter::filter_fn(|m| {
        if m.is_span() { *m.level() <= tracing::Level::INFO } else { *m.level() <= tracing::Level::WARN }
    });
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("sagaflow")).with_filter(exported);
    tracing_subscriber::registry().with(fmt).with(layer).try_init()?;
    EXPORTING.store(true, Ordering::Relaxed);
    tracing::info!(endpoint, "exporting spans over OTLP");
    Ok(Telemetry { provider: Some(provider) })
}

/// Make `traceparent` (a W3C trace context, version `00`) the remote parent of `span`, when
/// spans are exported; a malformed one is ignored (the span starts a trace of its own).
pub fn follow(span: &tracing::Span, traceparent: Option<&str>) {
    if !EXPORTING.load(Ordering::Relaxed) {
        return;
    }
    let Some(parent) = traceparent.and_then(parse) else { return };
    let cx = opentelemetry::Context::new().with_remote_span_context(parent);
    if let Err(e) = span.set_parent(cx) {
        tracing::debug!(error = %e, "the span's trace parent was not set");
    }
}

/// The W3C trace context naming `span` as the parent, when spans are exported and `span` is
/// recorded; else `None` (send the saga's stored context as it is).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !EXPORTING.load(Ordering::Relaxed) {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
}

/// A `traceparent`'s span context, if it is a well-formed version `00` one
/// ([`valid_traceparent`]).
fn parse(tp: &str) -> Option<SpanContext> {
    if !valid_traceparent(tp) {
        return None;
    }
    let trace = TraceId::from_hex(&tp[3..35]).ok()?;
    let span = SpanId::from_hex(&tp[36..52]).ok()?;
    let flags = TraceFlags::new(u8::from_str_radix(&tp[53..], 16).ok()?);
    Some(SpanContext::new(trace, span, flags, true, TraceState::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_is_parsed_or_refused() {
        let sc = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
    }
}
