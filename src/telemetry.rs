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
