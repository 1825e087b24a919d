//! The command line: `serve` (the default), `migrate`, `healthcheck` and `print-config`.

use std::path::PathBuf;

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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Serve the gRPC API (the default).
    #[default]
    Serve,
    /// Apply the embedded database migrations, then exit.
    Migrate,
    /// Ask the running server's health service whether it is SERVING; exit 0 if so, 1 if not.
    Healthcheck,
    /// Print the merged configuration, with secrets redacted.
    PrintConfig,
}
