//! Telemetry: the `tracing` subscriber that writes the logs (JSON lines for collectors, or pretty text
//! for local development) and, when an OTLP endpoint is configured, turns this crate's spans into
//! OpenTelemetry spans ([`otel`]); and the Prometheus metrics ([`metrics`]).
//!
//! The log layer sees events, and (when traces are exported, in JSON) the calls' spans, whose fields it
//! never formats: a log line needs only the span's trace and span id, which [`JsonWithCallIds`] adds
//! to every line written inside a call, so that an error logged deep in a call joins its trace.

pub mod metrics;
pub mod otel;

use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Event, Metadata, Subscriber, level_filters::LevelFilter, subscriber::Interest};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{
    EnvFilter, Layer, Registry,
    field::RecordFields,
    filter::{FilterExt, Targets},
    fmt::{self, FmtContext, FormatEvent, FormatFields, MakeWriter, format::Writer},
    layer::{self, SubscriberExt},
    registry::LookupSpan,
};

use crate::{
    ServiceInfo,
    config::{LogFormat, TelemetrySettings},
};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    #[error("a global tracing subscriber is already installed: {0}")]
    AlreadyInstalled(#[from] tracing_subscriber::util::TryInitError),
}

/// What `init` installed; [`Telemetry::shutdown`] flushes it.
#[must_use = "call shutdown() before exiting, or pending spans are lost"]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    flush_timeout: Duration,
    /// Writes the log lines still queued when dropped.
    _log_writer: WorkerGuard,
}

impl Telemetry {
    /// Sends the spans still queued, waiting at most `telemetry.flush_timeout`, then writes the log
    /// lines still queued.
    pub async fn shutdown(self) {
        let Some(provider) = self.tracer_provider else {
            return;
        };
        let started = std::time::Instant::now();
        let timeout = self.flush_timeout;
        // The SDK's shutdown blocks its caller until the batch thread is done: off the runtime's
        // workers, so that the exporter's own tasks can still run.
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout));
        match tokio::time::timeout(timeout + Duration::from_secs(1), flushed).await {
            Ok(Ok(Ok(()))) => tracing::info!(
                step = "flush_telemetry",
                duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                "shutdown: pending spans flushed"
            ),
            Ok(Ok(Err(err))) => tracing::warn!(error = %err, "cannot flush pending spans"),
            Ok(Err(err)) => tracing::warn!(error = %err, "span flush task failed"),
            Err(_) => tracing::warn!(?timeout, "pending spans not flushed in time"),
        }
    }
}

/// Installs the global subscriber, and the span exporter when configured; call once, first thing in
/// `main`, inside the Tokio runtime.
pub fn init(
    settings: &TelemetrySettings,
    service: &ServiceInfo,
) -> Result<Telemetry, TelemetryError> {
    use tracing_subscriber::util::SubscriberInitExt;

    let tracer_provider = otel::tracer_provider(settings, service);
    let log_filter = EnvFilter::builder().parse(settings.log_level.as_str())?;
    // Lines go through a bounded queue to a writer thread, which writes them to stdout in batches: a
    // call never waits for the log pipe (a slow reader of it drops lines, counted in
    // `log_lines_dropped_total`, rather than slowing every call).
    let (log_writer, log_writer_guard) = NonBlockingBuilder::default()
        .lossy(true)
        .thread_name("log-writer")
        .finish(std::io::BufWriter::new(std::io::stdout()));
    metrics::count_dropped_log_lines(log_writer.error_counter());
    let log_layer = match settings.log_format {
        LogFormat::Json => json_log_layer(log_writer, log_filter, tracer_provider.is_some()),
        LogFormat::Pretty => fmt::layer()
            .pretty()
            .with_writer(log_writer)
            .with_filter(log_filter.and(Events))
            .boxed(),
    };
    // A `Vec` of layers, not an `Option` layer: `None` counts as a layer interested in everything,
    // which would make every span of every crate live (and cost) with traces off.
    let mut layers = vec![log_layer];
    if let Some(provider) = &tracer_provider {
        // The spans of the service and the platform (calls and their database operations) and the
        // events inside them; not those of the libraries below, and never the exporter's own (it would trace
        // itself).
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(service.name))
                .with_location(false)
                .with_threads(false)
                .with_tracked_inactivity(false)
                .with_context_activation(false)
                .with_target(false)
                .with_filter(
                    Targets::new()
                        .with_target("app", LevelFilter::INFO)
                        .with_target("platform", LevelFilter::INFO)
                        .with_target(UNSAMPLED_CALL_SPAN_TARGET, LevelFilter::OFF),
                )
                .boxed(),
        );
    }
    tracing_subscriber::registry().with(layers).try_init()?;
    log_panics();
    Ok(Telemetry {
        tracer_provider,
        flush_timeout: settings.flush_timeout,
        _log_writer: log_writer_guard,
    })
}

/// JSON lines to `writer`: the events `filter` lets through, with their call's ids when `call_ids`
/// (traces are exported, so calls have spans and ids).
fn json_log_layer<W>(
    writer: W,
    filter: EnvFilter,
    call_ids: bool,
) -> Box<dyn Layer<Registry> + Send + Sync>
where
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    fmt::layer()
        .with_writer(writer)
        .fmt_fields(NoSpanFields)
        .event_format(JsonWithCallIds(
            fmt::format()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false),
        ))
        .with_filter(filter.and(Events).or(CallSpans { wanted: call_ids }))
        .boxed()
}

/// The target of a sampled call's span (`server::observe`), which is exported.
pub const CALL_SPAN_TARGET: &str = "app::rpc";
/// The target of an unsampled call's span, which only carries its ids for the log lines written
/// inside it: the span exporter never sees it.
pub const UNSAMPLED_CALL_SPAN_TARGET: &str = "app::rpc::unsampled";

/// Whether the current span is a sampled call's: database operations get spans only inside one.
pub fn in_sampled_call() -> bool {
    // With traces off there is no such span: skip looking up the current one.
    otel::exports_traces()
        && tracing::Span::current()
            .metadata()
            .is_some_and(|metadata| metadata.target() == CALL_SPAN_TARGET)
}

/// The trace and span id of a call, kept on its span for the log lines written inside it.
#[derive(Debug, Clone, Copy)]
pub struct CallIds {
    pub trace_id: TraceId,
    pub span_id: SpanId,
}

/// Keeps `ids` on `span` (a call's span, registered with the global subscriber) for the log lines
/// written inside it.
pub fn keep_call_ids(span: &tracing::Span, ids: CallIds) {
    span.with_subscriber(|(id, dispatch)| {
        if let Some(span) = dispatch
            .downcast_ref::<Registry>()
            .and_then(|registry| registry.span(id))
        {
            span.extensions_mut().insert(ids);
        }
    });
}

/// Events, by callsite, so the decision is made once per callsite rather than once per event.
struct Events;

impl<S> layer::Filter<S> for Events {
    fn enabled(&self, metadata: &Metadata<'_>, _: &layer::Context<'_, S>) -> bool {
        metadata.is_event()
    }

    fn callsite_enabled(&self, metadata: &'static Metadata<'static>) -> Interest {
        if metadata.is_event() {
            Interest::always()
        } else {
            Interest::never()
        }
    }
}

/// The calls' spans, when they exist (traces are exported): the log layer reads their ids.
struct CallSpans {
    wanted: bool,
}

impl CallSpans {
    fn matches(&self, metadata: &Metadata<'_>) -> bool {
        self.wanted
            && metadata.is_span()
            && (metadata.target() == CALL_SPAN_TARGET
                || metadata.target() == UNSAMPLED_CALL_SPAN_TARGET)
    }
}

impl<S> layer::Filter<S> for CallSpans {
    fn enabled(&self, metadata: &Metadata<'_>, _: &layer::Context<'_, S>) -> bool {
        self.matches(metadata)
    }

    fn callsite_enabled(&self, metadata: &'static Metadata<'static>) -> Interest {
        if self.matches(metadata) {
            Interest::always()
        } else {
            Interest::never()
        }
    }
}

/// Span fields are not part of a JSON line (the line has its call's ids instead): nothing is
/// formatted when a span starts.
struct NoSpanFields;

impl<'writer> FormatFields<'writer> for NoSpanFields {
    fn format_fields<R: RecordFields>(&self, _: Writer<'writer>, _: R) -> std::fmt::Result {
        Ok(())
    }
}

/// tracing-subscriber's JSON lines, with the `trace_id` and `span_id` of the call an event was
/// written in. Written by hand: the JSON formatter can show a span's fields, nested, but not the
/// OpenTelemetry ids, which are not fields.
struct JsonWithCallIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for JsonWithCallIds<F>
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
    N: for<'writer> FormatFields<'writer> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let ids = ctx.event_scope().and_then(|mut scope| {
            scope.find_map(|span| span.extensions().get::<CallIds>().copied())
        });
        let Some(ids) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        // One JSON object and a newline: the ids go in before the closing brace.
        match line.trim_end().strip_suffix('}') {
            Some(object) => writeln!(
                writer,
                r#"{object},"trace_id":"{}","span_id":"{}"}}"#,
                ids.trace_id, ids.span_id
            ),
            None => writer.write_str(&line),
        }
    }
}

/// Panics are logged at ERROR with their message and location, as one event that collectors index,
/// instead of as loose text on stderr. The server turns a panicking call into INTERNAL and goes on
/// (`server::panic_guard`); this is where operators learn what went wrong and where.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let location = info.location().map(tracing::field::display);
        tracing::error!(panic.message = message, panic.location = location, "panic");
    }));
}

/// Log capture for unit tests.
/// Helpers for the tests of the platform and of the services built on it.
#[cfg(any(test, feature = "test-support"))]
pub mod test_support {
    use std::sync::{Arc, Mutex, PoisonError};

    /// Runs `f` with a JSON subscriber on this thread and returns the lines it logged, at every
    /// level.
    pub fn json_logs(f: impl FnOnce()) -> Vec<serde_json::Value> {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let buffer = Arc::clone(&buffer);
            move || SharedWriter(Arc::clone(&buffer))
        };
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .json()
            .flatten_event(true)
            .with_writer(writer)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buffer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        String::from_utf8(bytes)
            .expect("UTF-8")
            .lines()
            .map(|line| serde_json::from_str(line).expect("JSON"))
            .collect()
    }

    pub struct SharedWriter(pub Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SharedWriter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, PoisonError};

    use opentelemetry::trace::TraceContextExt;
    use opentelemetry_sdk::trace::InMemorySpanExporter;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::*;

    #[test]
    fn lines_written_inside_a_call_carry_its_trace_and_span_id() {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let buffer = Arc::clone(&buffer);
            move || test_support::SharedWriter(Arc::clone(&buffer))
        };
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(InMemorySpanExporter::default())
            .build();
        let subscriber = Registry::default()
            .with(json_log_layer(writer, EnvFilter::new("info"), true))
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let ids = tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside any call");
            let call = tracing::info_span!(target: CALL_SPAN_TARGET, parent: None, "rpc");
            let context = call.context();
            let span_context = context.span().span_context().clone();
            let ids = CallIds {
                trace_id: span_context.trace_id(),
                span_id: span_context.span_id(),
            };
            keep_call_ids(&call, ids);
            call.in_scope(|| {
                tracing::warn!(answer = 42, "inside the call");
                tracing::info_span!("db").in_scope(|| tracing::error!("inside a child span"));
                tracing::info!(parent: None, "a summary with ids of its own");
            });
            ids
        });
        let text = String::from_utf8(
            buffer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
        .expect("UTF-8");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).expect("each line is one JSON object"))
            .collect();
        let trace_id = ids.trace_id.to_string();
        let span_id = ids.span_id.to_string();
        let ids_of = |line: &serde_json::Value| (line["trace_id"].clone(), line["span_id"].clone());
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(
            ids_of(&lines[0]),
            (serde_json::Value::Null, serde_json::Value::Null)
        );
        assert_eq!(lines[1]["answer"], 42);
        assert_eq!(lines[1]["message"], "inside the call");
        for line in &lines[1..3] {
            assert_eq!(
                ids_of(line),
                (trace_id.clone().into(), span_id.clone().into()),
                "{line}"
            );
        }
        // An explicit root is not inside the call, even while its span is entered.
        assert_eq!(lines[3]["trace_id"], serde_json::Value::Null);
    }

    #[test]
    fn panics_are_logged_at_error_with_their_message_and_location() {
        let lines = test_support::json_logs(|| {
            let previous = std::panic::take_hook();
            log_panics();
            let caught = std::panic::catch_unwind(|| panic!("a panic for the log"));
            std::panic::set_hook(previous);
            assert!(caught.is_err());
        });
        let line = lines
            .iter()
            .find(|line| line["panic.message"] == "a panic for the log")
            .unwrap_or_else(|| panic!("no panic line in {lines:?}"));
        assert_eq!(line["level"], "ERROR");
        assert!(
            line["panic.location"]
                .as_str()
                .is_some_and(|location| location.contains("telemetry/mod.rs")),
            "{line}"
        );
    }
}
