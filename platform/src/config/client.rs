//! `[client]`: how clients reach a server of this platform, the reference client and `healthcheck`.

use std::{num::NonZeroU32, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

/// How clients of this service connect to it: the reference client and the
/// `healthcheck` probe, which talks TLS whenever the server does (`tls.cert_file` set).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientSettings {
    /// Where the servers are: `host:port` entries used as they are, or `dns:///host:port` entries
    /// re-resolved every `resolve_interval` (a Kubernetes headless Service). Calls are spread over
    /// every address, round robin.
    pub targets: Vec<String>,
    /// How often `dns:///` targets are resolved again.
    #[serde(with = "humantime_serde")]
    pub resolve_interval: Duration,
    /// Deadline of a call that sets none of its own, retries included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts per call, the first included.
    pub max_attempts: NonZeroU32,
    /// Backoff before the first retry; it doubles per retry up to `max_backoff`, and each wait is
    /// drawn at random below it (full jitter).
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Retry throttling as in gRPC (A6): a bucket of this many tokens; a failed call takes one, a
    /// successful call gives back `retry_token_ratio`; retries stop while it is half empty or less.
    pub retry_budget: NonZeroU32,
    pub retry_token_ratio: f64,
    /// HTTP/2 PING interval on each connection, and how long an answer may take.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// PEM CA certificates that the server's certificate must chain to; set, the client uses TLS.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to a server that asks for one (mutual TLS).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate must carry; empty: the host being dialled.
    pub server_name: String,
    /// A file holding the bearer token sent with every call (`auth.mode = "jwt"` servers).
    pub token_file: Option<PathBuf>,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            targets: vec!["127.0.0.1:50051".to_owned()],
            resolve_interval: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            max_attempts: NonZeroU32::new(4).unwrap_or(NonZeroU32::MIN),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            retry_budget: NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN),
            retry_token_ratio: 0.1,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            ca_file: None,
            cert_file: None,
            key_file: None,
            server_name: String::new(),
            token_file: None,
        }
    }
}
