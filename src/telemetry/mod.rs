//! Telemetry: the `tracing` subscriber that writes the logs (JSON lines for collectors, or pretty text
//! for local development) and, when an OTLP endpoint is configured, turns this crate's spans into
//! OpenTelemetry spans ([`otel`]); and the Prometheus metrics ([`metrics`]).
//!
//! The log layer sees events only, never spans: formatting a span's fields on every call would cost
//! each RPC for nothing, since the one line per RPC carries its facts, trace and span id as fields.

pub mod metrics;
pub mod otel;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{FilterExt, Targets, filter_fn},
    fmt,
    layer::SubscriberExt,
};

use crate::config::{LogFormat, TelemetrySettings};

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
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exports_traces(&self) -> bool {
        self.tracer_provider.is_some()
    }

    /// Sends the spans still queued, waiting at most `telemetry.flush_timeout`.
    pub async fn shutdown(self) {
        let Some(provider) = self.tracer_provider else {
            return;
        };
        let timeout = self.flush_timeout;
        // The SDK's shutdown blocks its caller until the batch thread is done: off the runtime's
        // workers, so that the exporter's own tasks can still run.
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout));
        match tokio::time::timeout(timeout + Duration::from_secs(1), flushed).await {
            Ok(Ok(Ok(()))) => tracing::debug!("spans flushed"),
            Ok(Ok(Err(err))) => tracing::warn!(error = %err, "cannot flush pending spans"),
            Ok(Err(err)) => tracing::warn!(error = %err, "span flush task failed"),
            Err(_) => tracing::warn!(?timeout, "pending spans not flushed in time"),
        }
    }
}

/// Installs the global subscriber, and the span exporter when configured; call once, first thing in
/// `main`, inside the Tokio runtime.
pub fn init(settings: &TelemetrySettings) -> Result<Telemetry, TelemetryError> {
    use tracing_subscriber::util::SubscriberInitExt;

    let tracer_provider = otel::tracer_provider(settings);
    let log_filter = EnvFilter::builder()
        .parse(settings.log_level.as_str())?
        .and(filter_fn(|metadata| metadata.is_event()));
    let log_layer = match settings.log_format {
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .boxed(),
        LogFormat::Pretty => fmt::layer().pretty().boxed(),
    }
    .with_filter(log_filter);
    // The spans of this crate (calls and their database operations) and the events inside them;
    // not those of the libraries below, and never the exporter's own (it would trace itself).
    let span_layer = tracer_provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(env!("CARGO_PKG_NAME")))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_target(false)
            .with_filter(Targets::new().with_target("app", LevelFilter::INFO))
    });
    tracing_subscriber::registry()
        .with(log_layer)
        .with(span_layer)
        .try_init()?;
    log_panics();
    Ok(Telemetry {
        tracer_provider,
        flush_timeout: settings.flush_timeout,
    })
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
#[cfg(test)]
pub(crate) mod test_support {
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

    struct SharedWriter(Arc<Mutex<Vec<u8>>>);

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
    use super::*;

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
