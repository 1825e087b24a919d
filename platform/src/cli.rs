//! The command-line pieces every service on the platform shares: the `healthcheck` probe's arguments.
//! The service's own `Cli` puts them beside its commands (`serve`, `migrate`, `print-config`).

use std::time::Duration;

use crate::healthcheck::Probe;

#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct HealthcheckArgs {
    /// The server to ask, `HOST:PORT` [default: `server.grpc_addr`, on loopback]
    #[arg(long, value_name = "HOST:PORT")]
    pub addr: Option<String>,
    /// The service whose status to ask: empty for the whole server (liveness), or e.g. the API's
    /// full name (readiness)
    #[arg(long, value_name = "NAME", default_value = "")]
    pub service: String,
    /// How long the whole probe may take
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub timeout: Duration,
}

impl HealthcheckArgs {
    /// The probe these arguments describe.
    pub fn probe(&self) -> Probe {
        Probe {
            addr: self.addr.clone(),
            service: self.service.clone(),
            timeout: self.timeout,
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, humantime_serde::re::humantime::DurationError> {
    humantime_serde::re::humantime::parse_duration(text)
}
