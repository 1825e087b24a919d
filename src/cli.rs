//! The command line: `serve` (the default), `migrate`, `healthcheck` and `print-config`.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// A TOML file whose keys override `config/` (environment variables still win).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Serve the gRPC API (the default).
    #[default]
    Serve,
    /// Apply the embedded database migrations, then exit.
    Migrate,
    /// Ask a server's health service whether it is SERVING; exit 0 if so, 1 (saying why) if not.
    /// Uses TLS, and the client certificate, as `tls.*` and `client.*` configure.
    Healthcheck(HealthcheckArgs),
    /// Print the merged configuration, with secrets redacted.
    PrintConfig,
}

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

fn parse_duration(text: &str) -> Result<Duration, humantime_serde::re::humantime::DurationError> {
    humantime_serde::re::humantime::parse_duration(text)
}
