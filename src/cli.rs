//! The command line: `serve` (the default), `migrate`, `healthcheck` and `print-config`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use platform::cli::HealthcheckArgs;

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
