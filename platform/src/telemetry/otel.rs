//! Traces: an OpenTelemetry tracer provider exporting over OTLP/gRPC, and W3C context propagation.
//!
//! Spans leave through the SDK's batch processor, on its own thread: a call only ever hands its
//! finished span to a bounded queue, so a slow or absent collector never blocks or slows an RPC, and
//! the exporter connects lazily, so it never fails start-up either. The SDK keeps its count of
//! dropped spans private; [`QueueGate`] and [`CountingExporter`] count them for
//! `otel_spans_dropped_total`.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use opentelemetry::{
    Context, KeyValue, global,
    propagation::{TextMapCompositePropagator, TextMapPropagator},
    trace::{SpanKind, TraceContextExt},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    propagation::{BaggagePropagator, TraceContextPropagator},
    resource::EnvResourceDetector,
    trace::{
        BatchConfigBuilder, BatchSpanProcessor, IdGenerator, RandomIdGenerator, Sampler,
        SamplingDecision, SdkTracerProvider, ShouldSample, SpanData, SpanExporter, SpanProcessor,
    },
};

use super::{CallIds, metrics::DROPPED_SPANS};
use crate::{ServiceInfo, config::TelemetrySettings};

/// The OTLP endpoint to export to, if any: `telemetry.otlp_endpoint`, else the standard variables.
fn endpoint(settings: &TelemetrySettings) -> Option<Option<String>> {
    if !settings.otlp_endpoint.is_empty() {
        return Some(Some(settings.otlp_endpoint.clone()));
    }
    // Set in the environment: the exporter reads it (and its traces-only variant) itself.
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|value| !value.is_empty()))
    .then_some(None)
}

/// Builds the tracer provider when an endpoint is configured, and installs the W3C trace-context and
/// baggage propagator. Must run inside the Tokio runtime, on which the exporter's channel runs.
pub fn tracer_provider(
    settings: &TelemetrySettings,
    service: &ServiceInfo,
) -> Option<SdkTracerProvider> {
    let endpoint = endpoint(settings)?;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(endpoint) = endpoint {
        exporter = exporter.with_endpoint(endpoint);
    }
    // Only the environment's endpoint can fail here (the configured one is checked with the rest of
    // the settings): a collector problem never stops the service, it runs without traces.
    let exporter = match exporter.build() {
        Ok(exporter) => exporter,
        Err(err) => {
            // On stderr: the log subscriber is not installed yet.
            eprintln!("warning: traces are not exported: {err}");
            return None;
        }
    };

    // OTEL_BSP_MAX_QUEUE_SIZE is read by the SDK too; the gate needs the same number.
    let queue_size = std::env::var("OTEL_BSP_MAX_QUEUE_SIZE")
        .ok()
        .and_then(|size| size.parse().ok())
        .unwrap_or(2048);
    let pending = Arc::new(AtomicUsize::new(0));
    let processor = BatchSpanProcessor::builder(CountingExporter {
        inner: exporter,
        pending: Arc::clone(&pending),
    })
    .with_batch_config(
        BatchConfigBuilder::default()
            .with_max_queue_size(queue_size)
            .build(),
    )
    .build();

    let provider = SdkTracerProvider::builder()
        .with_span_processor(QueueGate {
            inner: processor,
            pending,
            capacity: queue_size,
        })
        .with_resource(resource(service))
        // Calls are sampled by `sample_call` before their span exists; a span that exists is
        // recorded.
        .with_sampler(Sampler::AlwaysOn);
    // OTEL_TRACES_SAMPLER (with its argument), when set, as the SDK's default configuration reads
    // it; else parent-based with the configured ratio for root calls.
    let call_sampler: Box<dyn ShouldSample> =
        if std::env::var("OTEL_TRACES_SAMPLER").is_ok_and(|sampler| !sampler.is_empty()) {
            opentelemetry_sdk::trace::Config::default().sampler
        } else {
            Box::new(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sample_ratio,
            ))))
        };
    // Set once per process, by the one `telemetry::init`.
    let _ = CALL_SAMPLER.set(call_sampler);

    global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()) as Box<dyn TextMapPropagator + Send + Sync>,
        Box::new(BaggagePropagator::new()),
    ]));
    Some(provider.build())
}

/// Who is sending spans: the package and version, this process, and its pod when Kubernetes says so
/// (`POD_NAME`/`POD_NAMESPACE` from the downward API). `OTEL_RESOURCE_ATTRIBUTES` and
/// `OTEL_SERVICE_NAME` override any of it.
fn resource(service: &ServiceInfo) -> Resource {
    let mut attributes = vec![
        KeyValue::new("service.name", service.name),
        KeyValue::new("service.version", service.version),
        KeyValue::new("service.instance.id", uuid::Uuid::new_v4().to_string()),
    ];
    for (variable, key) in [
        ("POD_NAME", "k8s.pod.name"),
        ("POD_NAMESPACE", "k8s.namespace.name"),
    ] {
        if let Ok(value) = std::env::var(variable)
            && !value.is_empty()
        {
            attributes.push(KeyValue::new(key, value));
        }
    }
    let mut resource = Resource::builder_empty()
        .with_attributes(attributes)
        .with_detector(Box::new(EnvResourceDetector::new()));
    if let Ok(name) = std::env::var("OTEL_SERVICE_NAME")
        && !name.is_empty()
    {
        resource = resource.with_service_name(name);
    }
    resource.build()
}

/// Decides which calls are traced, before anything is built for them; set with the tracer provider.
static CALL_SAMPLER: OnceLock<Box<dyn ShouldSample>> = OnceLock::new();

/// Whether spans are exported (`telemetry::init` built a tracer provider).
pub fn exports_traces() -> bool {
    CALL_SAMPLER.get().is_some()
}

/// Whether and how a call is traced.
pub enum CallSampling {
    /// Spans are not exported.
    Off,
    /// Not sampled: the call gets no span, only ids for its log lines (the caller's trace id when
    /// it sent one, so its lines still join the caller's trace).
    Unsampled(CallIds),
    /// Sampled: the call's span continues `parent` (empty for a root call).
    Sampled(Context),
}

/// Samples a call from its metadata, before its span exists. The SDK would decide only once the
/// span is built, and building a span for each of the 90 % of calls that are then dropped cost
/// about 14 us of CPU per call in `scripts/bench-observability.sh`.
pub fn sample_call(headers: &http::HeaderMap, name: &str) -> CallSampling {
    let Some(sampler) = CALL_SAMPLER.get() else {
        return CallSampling::Off;
    };
    let parent = parent_context(headers);
    let ids = RandomIdGenerator::default();
    let parent_span = parent.span().span_context().clone();
    let trace_id = if parent_span.is_valid() {
        parent_span.trace_id()
    } else {
        ids.new_trace_id()
    };
    let sampled = sampler.should_sample(Some(&parent), trace_id, name, &SpanKind::Server, &[], &[]);
    match sampled.decision {
        SamplingDecision::Drop => CallSampling::Unsampled(CallIds {
            trace_id,
            span_id: ids.new_span_id(),
        }),
        SamplingDecision::RecordOnly | SamplingDecision::RecordAndSample => {
            CallSampling::Sampled(parent)
        }
    }
}

/// The caller's trace context and baggage from a call's metadata; empty when it sent none.
fn parent_context(headers: &http::HeaderMap) -> Context {
    if !headers.contains_key("traceparent") && !headers.contains_key("baggage") {
        return Context::new();
    }
    global::get_text_map_propagator(|propagator| {
        propagator.extract(&opentelemetry_http::HeaderExtractor(headers))
    })
}

/// In front of the batch processor: refuses a span, and counts it, when the queue is full, so that
/// the processor itself never drops one uncounted. `pending` counts spans handed on and not yet
/// taken by the exporter, at least what the queue holds.
#[derive(Debug)]
struct QueueGate<P = BatchSpanProcessor> {
    inner: P,
    pending: Arc<AtomicUsize>,
    capacity: usize,
}

impl<P: SpanProcessor> SpanProcessor for QueueGate<P> {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            DROPPED_SPANS.queue_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.inner.on_end(span);
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

/// Behind the batch processor: takes spans off the gate's count as they leave the queue, and counts
/// those whose export failed (after the exporter's own retries).
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    pending: Arc<AtomicUsize>,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        self.pending.fetch_sub(spans, Ordering::AcqRel);
        let result = self.inner.export(batch).await;
        if result.is_err() {
            DROPPED_SPANS
                .export_failed
                .fetch_add(u64::try_from(spans).unwrap_or(u64::MAX), Ordering::Relaxed);
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
    use std::sync::Mutex;

    use futures::executor::block_on;
    use opentelemetry::trace::{Tracer, TracerProvider as _};
    use opentelemetry_sdk::{
        error::OTelSdkError,
        trace::{InMemorySpanExporter, SimpleSpanProcessor},
    };

    use super::*;

    /// Spans refused by a full queue are counted, and handed on again once the exporter takes some.
    #[test]
    fn a_full_queue_drops_and_counts_spans() {
        let exporter = InMemorySpanExporter::default();
        let pending = Arc::new(AtomicUsize::new(0));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(QueueGate {
                inner: SimpleSpanProcessor::new(exporter.clone()),
                pending: Arc::clone(&pending),
                capacity: 2,
            })
            .build();
        let tracer = provider.tracer("test");
        let before = DROPPED_SPANS.queue_full.load(Ordering::Relaxed);
        for _ in 0..5 {
            tracer.in_span("call", |_| {});
        }
        // Nothing took spans off the gate's count: two passed, three were refused.
        assert_eq!(
            exporter.get_finished_spans().map(|spans| spans.len()).ok(),
            Some(2)
        );
        assert!(DROPPED_SPANS.queue_full.load(Ordering::Relaxed) - before >= 3);
        pending.store(0, Ordering::Release);
        tracer.in_span("call", |_| {});
        assert_eq!(
            exporter.get_finished_spans().map(|spans| spans.len()).ok(),
            Some(3)
        );
    }

    /// An exporter that fails every batch.
    #[derive(Debug, Default)]
    struct Failing(Mutex<usize>);

    impl SpanExporter for Failing {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) += batch.len();
            Err(OTelSdkError::InternalFailure(
                "collector unreachable".to_owned(),
            ))
        }
    }

    #[test]
    fn failed_exports_are_counted_and_leave_the_queue() {
        let pending = Arc::new(AtomicUsize::new(3));
        let exporter = CountingExporter {
            inner: Failing::default(),
            pending: Arc::clone(&pending),
        };
        let before = DROPPED_SPANS.export_failed.load(Ordering::Relaxed);
        let spans = {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            let tracer = provider.tracer("test");
            for _ in 0..3 {
                tracer.in_span("call", |_| {});
            }
            exporter.get_finished_spans().expect("spans")
        };
        assert!(block_on(exporter.export(spans)).is_err());
        assert_eq!(pending.load(Ordering::Acquire), 0);
        assert!(DROPPED_SPANS.export_failed.load(Ordering::Relaxed) - before >= 3);
    }
}
