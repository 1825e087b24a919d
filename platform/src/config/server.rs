//! The sections that shape the server: `[server]` (listening, HTTP/2 limits, rate limits,
//! deadlines), `[tls]`, `[auth]`, `[health]` and `[shutdown]`.

use std::{collections::BTreeMap, net::SocketAddr, num::NonZeroU32, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Where the gRPC server listens.
    pub grpc_addr: SocketAddr,
    /// Where the Prometheus endpoint (`GET /metrics`) listens; `""` (`None`) turns it and the
    /// metrics off.
    #[serde(with = "optional_addr")]
    pub metrics_addr: Option<SocketAddr>,
    /// Serve `grpc.reflection.v1` and `v1alpha` so tools can discover the API.
    pub reflection: bool,
    /// The largest message decoded or encoded; a larger request is RESOURCE_EXHAUSTED.
    pub max_message_bytes: usize,
    /// HTTP/2 streams (calls) one connection may have open; further ones wait in the client.
    pub max_concurrent_streams: u32,
    /// How often an HTTP/2 PING checks that a quiet connection's peer is still there.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// A connection with no call in progress for this long is closed with GOAWAY.
    #[serde(with = "humantime_serde")]
    pub max_connection_idle: Duration,
    /// A connection this old (± 10 % jitter) is asked to go away, so clients behind L4 load
    /// balancers reconnect and spread over new replicas.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// How long calls on a connection past its age may still run before it is closed.
    #[serde(with = "humantime_serde")]
    pub max_connection_age_grace: Duration,
    /// A new connection that has not sent the HTTP/2 preface (after TLS, when on) within this is closed.
    #[serde(with = "humantime_serde")]
    pub preface_timeout: Duration,
    /// Calls in progress server-wide (streams until their last message); more are refused at once
    /// with RESOURCE_EXHAUSTED rather than queued.
    pub max_in_flight: NonZeroU32,
    pub rate_limit: RateLimitSettings,
    pub timeouts: TimeoutSettings,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([0, 0, 0, 0], 50051)),
            metrics_addr: Some(SocketAddr::from(([0, 0, 0, 0], 9090))),
            reflection: true,
            max_message_bytes: 4 * 1024 * 1024,
            max_concurrent_streams: 100,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_connection_idle: Duration::from_secs(5 * 60),
            max_connection_age: Duration::from_secs(30 * 60),
            max_connection_age_grace: Duration::from_secs(30),
            preface_timeout: Duration::from_secs(10),
            max_in_flight: NonZeroU32::new(1000).unwrap_or(NonZeroU32::MIN),
            rate_limit: RateLimitSettings::default(),
            timeouts: TimeoutSettings::default(),
        }
    }
}

/// A token bucket per client (authenticated subject, else client certificate, else peer IP).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Calls per second each client may make; 0 turns the limit off.
    pub per_second: u32,
    /// Calls a client may make at once after being quiet; 0 means `per_second`.
    pub burst: u32,
}

/// Server-side deadlines; the most specific entry wins (method > service > default), and a call's
/// effective deadline is the shorter of the client's `grpc-timeout` and this. `0s` means none.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutSettings {
    #[serde(with = "humantime_serde")]
    pub default: Duration,
    /// By full service name, `"package.Service"`.
    #[serde(with = "duration_map")]
    pub services: BTreeMap<String, Duration>,
    /// By `"package.Service/Method"`.
    #[serde(with = "duration_map")]
    pub methods: BTreeMap<String, Duration>,
}

impl Default for TimeoutSettings {
    fn default() -> Self {
        Self {
            default: Duration::from_secs(30),
            services: BTreeMap::new(),
            // A health Watch is meant to stay open; clients re-open it when it ends.
            methods: BTreeMap::from([("grpc.health.v1.Health/Watch".to_owned(), Duration::ZERO)]),
        }
    }
}

/// `humantime_serde` for the values of a map.
mod duration_map {
    use std::{collections::BTreeMap, time::Duration};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Deserialize, Serialize)]
    struct Humantime(#[serde(with = "humantime_serde")] Duration);

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<String, Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        map.iter()
            .map(|(key, value)| (key, Humantime(*value)))
            .collect::<BTreeMap<_, _>>()
            .serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<String, Duration>, D::Error> {
        Ok(BTreeMap::<String, Humantime>::deserialize(deserializer)?
            .into_iter()
            .map(|(key, Humantime(value))| (key, value))
            .collect())
    }
}

/// Transport security: plaintext when no certificate is set, TLS with one, mutual TLS with a client CA.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the leaf certificate.
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates; when set, clients must present a certificate chaining to one of them.
    pub client_ca_file: Option<PathBuf>,
    /// How often the files are re-read; changed ones serve new connections (SIGHUP reloads at once).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Longest a TLS handshake may take before the connection is dropped.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            reload_interval: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Every caller is anonymous.
    #[default]
    None,
    /// Every non-public call needs `authorization: Bearer <JWT>`.
    Jwt,
}

/// Who may call: bearer JWTs checked by a layer in front of every service.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    pub mode: AuthMode,
    /// File holding the HS256 shared secret (e.g. a mounted Kubernetes Secret).
    pub jwt_secret_file: Option<PathBuf>,
    /// File holding the PEM public key that verifies RS256 or ES256 tokens.
    pub jwt_public_key_file: Option<PathBuf>,
    /// Required `iss` claim.
    pub issuer: String,
    /// Required `aud` claim.
    pub audience: String,
    /// Clock skew allowed when checking `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Methods anyone may call: `"package.Service/Method"` or `"package.Service/*"`.
    pub public_methods: Vec<String>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            mode: AuthMode::None,
            jwt_secret_file: None,
            jwt_public_key_file: None,
            issuer: String::new(),
            audience: String::new(),
            leeway: Duration::from_secs(30),
            public_methods: vec![
                "grpc.health.v1.Health/*".to_owned(),
                "grpc.reflection.v1.ServerReflection/*".to_owned(),
                "grpc.reflection.v1alpha.ServerReflection/*".to_owned(),
            ],
        }
    }
}

/// How readiness follows the checks the service registers (its database, say).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthSettings {
    /// How often the readiness checks run.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// Consecutive failed checks before a service reports NOT_SERVING; one success brings it back.
    /// One slow ping does not flap readiness.
    pub failure_threshold: NonZeroU32,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            check_interval: Duration::from_secs(5),
            failure_threshold: NonZeroU32::new(3).unwrap_or(NonZeroU32::MIN),
        }
    }
}

/// How the server drains on SIGTERM or SIGINT. The defaults fit, with `telemetry.flush_timeout`,
/// in Kubernetes' default 30s termination grace period.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSettings {
    /// How long the server keeps accepting and serving after reporting NOT_SERVING, so that every
    /// load balancer and kube-proxy has taken the endpoint out before connections are refused.
    /// Longer than a readiness probe's period.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// How long calls in progress may still run once the server stops accepting; past it they end
    /// with UNAVAILABLE (handlers are cancelled, transactions roll back).
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self {
            drain_delay: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(20),
        }
    }
}

/// `server.metrics_addr`: an address, or `""` for none.
mod optional_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|err| {
            D::Error::custom(format!(
                "{err}: expected host:port, e.g. 0.0.0.0:9090, or \"\" for none"
            ))
        })
    }
}
