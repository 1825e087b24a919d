//! Mints a development JWT for a server running with `auth.mode = "jwt"`, signed with an HS256
//! secret (the server's `auth.jwt_secret_file`) or an ES256/RS256 private key (whose public half is
//! the server's `auth.jwt_public_key_file`):
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
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(about = "Mint a development JWT (HS256, ES256 or RS256) for this service")]
#[command(group(clap::ArgGroup::new("key").required(true).multiple(false)))]
struct Args {
    /// The file holding the shared secret (the server's `auth.jwt_secret_file`): HS256.
    #[arg(long, group = "key")]
    secret_file: Option<PathBuf>,
    /// A PEM EC (P-256) or RSA private key whose public key is the server's
    /// `auth.jwt_public_key_file`: ES256 or RS256.
    #[arg(long, group = "key")]
    private_key_file: Option<PathBuf>,
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
    let (header, key) = signing_key(&args)?;
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
    let token = jsonwebtoken::encode(&header, &claims, &key).context("signing the token")?;
    println!("{token}");
    Ok(())
}

fn signing_key(args: &Args) -> anyhow::Result<(Header, EncodingKey)> {
    let read =
        |path: &PathBuf| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    if let Some(path) = &args.private_key_file {
        let pem = read(path)?;
        if let Ok(key) = EncodingKey::from_ec_pem(&pem) {
            return Ok((Header::new(Algorithm::ES256), key));
        }
        let key = EncodingKey::from_rsa_pem(&pem)
            .with_context(|| format!("{}: not a PEM EC or RSA private key", path.display()))?;
        return Ok((Header::new(Algorithm::RS256), key));
    }
    let path = args
        .secret_file
        .as_ref()
        .context("--secret-file or --private-key-file is required")?;
    let secret = read(path)?;
    // The server ignores a trailing newline in the file; so must the signer.
    Ok((
        Header::default(),
        EncodingKey::from_secret(secret.trim_ascii_end()),
    ))
}
