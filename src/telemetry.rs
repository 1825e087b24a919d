//! Logging: one `tracing` subscriber writing JSON lines (for collectors) or pretty text (for local
//! development) to stdout, filtered by `telemetry.log_level`.

use tracing_subscriber::{EnvFilter, fmt};

use crate::config::{LogFormat, TelemetrySettings};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    #[error("a global tracing subscriber is already installed: {0}")]
    AlreadyInstalled(#[from] tracing_subscriber::util::TryInitError),
}

/// Installs the global subscriber; call once, first thing in `main`.
pub fn init(settings: &TelemetrySettings) -> Result<(), TelemetryError> {
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = EnvFilter::builder().parse(settings.log_level.as_str())?;
    let builder = fmt().with_env_filter(filter);
    match settings.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .finish()
            .try_init()?,
        LogFormat::Pretty => builder.pretty().finish().try_init()?,
    }
    log_panics();
    Ok(())
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

    /// Runs `f` with a JSON subscriber on this thread and returns the lines it logged.
    pub fn json_logs(f: impl FnOnce()) -> Vec<serde_json::Value> {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let buffer = Arc::clone(&buffer);
            move || SharedWriter(Arc::clone(&buffer))
        };
        let subscriber = tracing_subscriber::fmt()
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
                .is_some_and(|location| location.contains("telemetry.rs")),
            "{line}"
        );
    }
}
