use std::process::ExitCode;

use anyhow::Context;
use app::{
    cli::{Cli, Command},
    config::Settings,
    server, store,
};
use clap::Parser;
use platform::{healthcheck, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // On stderr, not through `tracing`: the failure may have happened before logging started.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command.unwrap_or_default() {
        Command::Serve => {
            let telemetry = telemetry::init(&settings.platform.telemetry, &app::SERVICE)?;
            let served = match server::build(&settings).await {
                Ok(server) => server.run().await,
                Err(err) => Err(err),
            };
            // Whether serving ended well or not, the spans of its last calls go out.
            telemetry.shutdown().await;
            served?;
        }
        Command::Migrate => {
            let telemetry = telemetry::init(&settings.platform.telemetry, &app::SERVICE)?;
            let store = store::connect(&settings.database, &Default::default())?;
            store.migrate().await.context("migrating the database")?;
            store.close().await;
            tracing::info!("database migrations applied");
            telemetry.shutdown().await;
        }
        Command::Healthcheck(args) => {
            healthcheck::check(&settings.platform, &args.probe()).await?;
            println!("SERVING");
        }
        Command::PrintConfig => print!("{}", settings.to_redacted_toml()?),
    }
    Ok(())
}
