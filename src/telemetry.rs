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
    Ok(())
}
