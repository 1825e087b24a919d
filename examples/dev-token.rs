//! Mints a development JWT for a server running with `auth.mode = "jwt"` and an HS256 secret:
//!
//! ```sh
//! cargo run --example dev-token -- --secret-file certs/jwt-secret --issuer dev \
//!     --audience my-service --scope "orders.read orders.write" --subject alice
//! ```
//!
//! It prints the token; send it as `authorization: Bearer <token>`. For development only:
//! production tokens come from your identity provider.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(about = "Mint a development JWT (HS256) for this service")]
struct Args {
    /// The file holding the shared secret (the server's `auth.jwt_secret_file`).
    #[arg(long)]
    secret_file: PathBuf,
    /// The `iss` claim (the server's `auth.issuer`).
    #[arg(long)]
    issuer: String,
    /// The `aud` claim (the server's `auth.audience`).
    #[arg(long)]
    audience: String,
    /// Space-separated scopes, e.g. "orders.read orders.write".
    #[arg(long, default_value = "orders.read")]
    scope: String,
    /// The `sub` claim: who the caller is.
    #[arg(long, default_value = "developer")]
    subject: String,
    /// How long the token is valid, e.g. 15m or 1h.
    #[arg(long, default_value = "1h", value_parser = humantime_serde::re::humantime::parse_duration)]
    ttl: Duration,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iss: &'a str,
    aud: &'a str,
    scope: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let secret = std::fs::read(&args.secret_file)
        .with_context(|| format!("reading {}", args.secret_file.display()))?;
    // The server ignores a trailing newline in the file; so must the signer.
    let secret = secret.trim_ascii_end();
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: &args.subject,
        iss: &args.issuer,
        aud: &args.audience,
        scope: &args.scope,
        iat: now,
        nbf: now,
        exp: now + args.ttl.as_secs(),
    };
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .context("signing the token")?;
    println!("{token}");
    Ok(())
}
