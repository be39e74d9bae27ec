//! Tessera's logs and traces, shared by the coordinator and the workers: the `tracing` subscriber every
//! subcommand installs, W3C trace-context propagation over HTTP and gRPC, and, when an OTLP endpoint is
//! configured, OpenTelemetry export of spans over OTLP/gRPC.
//!
//! With no endpoint (`--otlp-endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`) no OpenTelemetry layer exists at
//! all: nothing is exported and spans cost only what the log layer does with them. With one, spans go
//! through a batch processor with a bounded queue: an unreachable collector drops spans, it never blocks
//! serving. The W3C trace context travels in `traceparent` headers: read from HTTP requests, written into
//! the gRPC metadata of every step, read again by the workers ([`TraceContextLayer`]).

use std::{
    io::IsTerminal,
    sync::atomic::{AtomicBool, Ordering},
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use anyhow::{Context, Result};
use http::HeaderMap;
use opentelemetry::{
    global,
    propagation::{Extractor, Injector},
    trace::TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer as _, layer::SubscriberExt, util::SubscriberInitExt};

/// How spans are exported.
#[derive(Clone, Debug)]
pub struct Otlp {
    /// e.g. `http://otel-collector:4317`
    pub endpoint: String,
    /// Fraction of new traces sampled (a request arriving with a sampled `traceparent` is always kept).
    pub sampling_ratio: f64,
    pub service_name: &'static str,
}

/// Flushes and stops the exporter when dropped (at process exit).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Whether spans are exported (see [`exporting`]).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports spans over OTLP: what only an exported trace shows (links between spans)
/// need not be computed otherwise.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Installs the global subscriber: log lines on stderr (`json` or text, filtered by `RUST_LOG`, else
/// `default_filter`) and, with `otlp`, span export. Building the exporter needs a Tokio runtime context
/// (its gRPC channel lives there): call this inside one when `otlp` is set.
pub fn init(json: bool, default_filter: &str, otlp: Option<Otlp>) -> Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    // Colour only for a person at a terminal: escape codes in a file, `kubectl logs` or a log pipeline are
    // noise that breaks searching for `key=value`. `NO_COLOR` (no-color.org) turns it off there too.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(colour);
    let fmt = if json { fmt.json().flatten_event(true).boxed() } else { fmt.boxed() };
    let registry = tracing_subscriber::registry().with(fmt.with_filter(filter));
    let Some(o) = otlp else {
        registry.init();
        return Ok(Telemetry { provider: None });
    };
    global::set_text_map_propagator(TraceContextPropagator::new());
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(o.endpoint.clone())
        .with_timeout(Duration::from_secs(3))
        .build()
        .with_context(|| format!("OTLP exporter for {}", o.endpoint))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(o.sampling_ratio.clamp(0.0, 1.0)))))
        .with_resource(
            Resource::builder()
                .with_service_name(o.service_name)
                .with_attribute(opentelemetry::KeyValue::new("process.pid", std::process::id() as i64))
                .build(),
        )
        .build();
    let tracer = provider.tracer("tessera");
    // Only Tessera's own spans are exported; dependencies' spans would be noise and cost.
    // Source locations, thread ids and busy/idle timers on every span cost serialisation and bytes on
    // each export and tell an operator nothing the span names do not.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(tracing_subscriber::filter::Targets::new().with_target("tessera", tracing::Level::INFO));
    registry.with(otel).init();
    EXPORTING.store(true, Ordering::Relaxed);
    global::set_tracer_provider(provider.clone());
    Ok(Telemetry { provider: Some(provider) })
}

/// The endpoint from the flag, else the standard environment variable.
pub fn endpoint(flag: &Option<String>) -> Option<String> {
    flag.clone().or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok()).filter(|e| !e.is_empty())
}

struct HeaderExtract<'a>(&'a HeaderMap);

impl Extractor for HeaderExtract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInject<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInject<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), value.parse()) {
            self.0.insert(k, v);
        }
    }
}

/// Makes `span` a child of the trace context in `headers` (a `traceparent` from the client), if any.
pub fn adopt_parent(span: &tracing::Span, headers: &HeaderMap) {
    let cx = global::get_text_map_propagator(|p| p.extract(&HeaderExtract(headers)));
    let _ = span.set_parent(cx);
}

/// Writes the current span's trace context into outgoing gRPC metadata.
pub fn inject_current(metadata: &mut tonic::metadata::MetadataMap) {
    let cx = tracing::Span::current().context();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataInject(metadata)));
}

/// Links `span` to the trace of `other` (per-step work shared by many requests).
pub fn link(span: &tracing::Span, other: &tracing::Span) {
    let cx = other.context();
    let sc = opentelemetry::trace::TraceContextExt::span(&cx).span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// A tower layer for the worker's gRPC server: each call runs in a span whose parent is the caller's
/// trace context, so the worker's spans join the coordinator's trace.
#[derive(Clone, Copy, Default)]
pub struct TraceContextLayer;

impl<S> tower::Layer<S> for TraceContextLayer {
    type Service = TraceContextService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TraceContextService { inner }
    }
}

#[derive(Clone)]
pub struct TraceContextService<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for TraceContextService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tracing::instrument::Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let span = tracing::info_span!(target: "tessera::worker", "grpc", rpc = %req.uri().path());
        adopt_parent(&span, req.headers());
        self.inner.call(req).instrument(span)
    }
}
