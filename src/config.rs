//! Typed settings, read once at start-up from layered sources and passed down; no other module reads
//! the environment.
//!
//! Layers, later wins: built-in defaults < `config/default.toml` < `config/<APP_ENV>.toml` < the file
//! given with `--config` < `APP_*` environment variables (`__` separates nesting levels), and
//! `RUST_LOG`, when set, replaces `telemetry.log_level`. Unknown keys and invalid values fail with the key's name and the
//! layer it came from.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    num::NonZeroU32,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The directory holding `default.toml` and the per-environment files, relative to the working directory.
pub const CONFIG_DIR: &str = "config";
/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "APP_";

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub tls: TlsSettings,
    pub auth: AuthSettings,
    pub database: DatabaseSettings,
    pub service: ServiceSettings,
    pub health: HealthSettings,
    pub shutdown: ShutdownSettings,
    pub client: ClientSettings,
    pub telemetry: TelemetrySettings,
}

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
        let service = crate::health::ORDER_SERVICE_NAME;
        Self {
            default: Duration::from_secs(30),
            services: BTreeMap::from([(service.to_owned(), Duration::from_secs(10))]),
            methods: BTreeMap::from([
                // A search streams every match: give it longer than the service's unary calls.
                (format!("{service}/SearchOrders"), Duration::from_secs(60)),
                // A health Watch is meant to stay open; clients re-open it when it ends.
                ("grpc.health.v1.Health/Watch".to_owned(), Duration::ZERO),
            ]),
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

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite://<file>` (created if missing) or `postgres://user:password@host/db`.
    pub url: DatabaseUrl,
    /// A file holding the URL (a mounted Secret, so the password is never in configuration or the
    /// environment); when set, its contents replace `url`.
    pub url_file: Option<PathBuf>,
    /// Upper bound of the connection pool.
    pub max_connections: NonZeroU32,
    /// Longest wait for a pooled connection (including opening a new one) before a call fails UNAVAILABLE.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Longest one health check may take to reach the database (opening a connection included) and
    /// confirm its schema; past it the database counts as unreachable. Migrations are not bounded by it.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Apply the embedded migrations when the server starts.
    pub migrate: bool,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: DatabaseUrl("sqlite://orders.db".to_owned()),
            url_file: None,
            max_connections: NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN),
            acquire_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            migrate: true,
        }
    }
}

/// How readiness follows the database.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthSettings {
    /// How often the database is checked.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// Consecutive failed checks before the API reports NOT_SERVING; one success brings it back.
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

/// How clients of this service connect to it: the reference client (`app::client`) and the
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

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceSettings {
    /// ProcessOrders sends a shipment as soon as a destination has this many orders.
    pub shipment_batch_size: NonZeroU32,
    /// The most messages one UpdateOrders stream may carry; they are applied in one transaction.
    pub max_updates_per_stream: NonZeroU32,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            shipment_batch_size: NonZeroU32::new(3).unwrap_or(NonZeroU32::MIN),
            max_updates_per_stream: NonZeroU32::new(1000).unwrap_or(NonZeroU32::MIN),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive string; `RUST_LOG` overrides it.
    pub log_level: LogFilter,
    /// The OTLP/gRPC collector spans go to, e.g. `http://otel-collector:4317`. Empty: the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` when set, else no export.
    pub otlp_endpoint: String,
    /// The share of root traces (calls without a sampled parent) that are recorded; a caller's
    /// sampling decision is followed. `OTEL_TRACES_SAMPLER` replaces this when set.
    pub sample_ratio: f64,
    /// How long shutdown waits for pending spans to reach the collector.
    #[serde(with = "humantime_serde")]
    pub flush_timeout: Duration,
    /// Upper bounds, in seconds, of the `grpc_server_handling_seconds` histogram buckets.
    pub latency_buckets: Vec<f64>,
    /// Proto field names whose values are replaced by `[REDACTED]`, at any depth, in the request and
    /// response messages logged at TRACE (target `app::messages`).
    pub redact_fields: Vec<String>,
}

/// Bucket bounds for a service whose median call takes well under a millisecond: fine steps from
/// 100 us to 10 ms, then coarse ones up to the longest deadlines.
pub const DEFAULT_LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Json,
            log_level: LogFilter("info".to_owned()),
            otlp_endpoint: String::new(),
            sample_ratio: 0.1,
            flush_timeout: Duration::from_secs(5),
            latency_buckets: DEFAULT_LATENCY_BUCKETS.to_vec(),
            // A delivery address is personal data.
            redact_fields: vec!["destination".to_owned()],
        }
    }
}

impl TelemetrySettings {
    fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(format!(
                "telemetry.sample_ratio must be between 0 and 1, not {}",
                self.sample_ratio
            ));
        }
        let buckets = &self.latency_buckets;
        let increasing = buckets.windows(2).all(|pair| pair[0] < pair[1]);
        if buckets.is_empty()
            || !increasing
            || buckets
                .iter()
                .any(|bound| !bound.is_finite() || *bound <= 0.0)
        {
            return Err(format!(
                "telemetry.latency_buckets must be positive seconds in increasing order, not \
                 {buckets:?}"
            ));
        }
        if !self.otlp_endpoint.is_empty() {
            let url = url::Url::parse(&self.otlp_endpoint)
                .map_err(|err| format!("telemetry.otlp_endpoint: {err}"))?;
            // The exporter is built without TLS: spans go to a collector beside the service (a
            // sidecar, a node agent, or across a mesh that encrypts), as OpenTelemetry deployments do.
            if url.scheme() != "http" || url.host().is_none() {
                return Err(format!(
                    "telemetry.otlp_endpoint must be an http:// URL with a host (OTLP over TLS is not \
                     built in: send to a local collector), not {:?}",
                    self.otlp_endpoint
                ));
            }
        }
        Ok(())
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line, for log collectors.
    Json,
    /// Human-readable, for local development.
    Pretty,
}

/// A log filter checked when the configuration is read, so a typo fails at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogFilter(String);

impl LogFilter {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for LogFilter {
    type Err = String;

    fn from_str(directives: &str) -> Result<Self, Self::Err> {
        tracing_subscriber::EnvFilter::builder()
            .parse(directives)
            .map_err(|err| format!("invalid log filter {directives:?}: {err}"))?;
        Ok(Self(directives.to_owned()))
    }
}

impl<'de> Deserialize<'de> for LogFilter {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The database connection URL. It may hold a password, so `Debug` and `Serialize` (used by
/// `print-config`) redact it; only the store reads the real value, through [`DatabaseUrl::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn backend(&self) -> Backend {
        #[cfg(feature = "postgres")]
        if is_postgres(&self.0) {
            return Backend::Postgres;
        }
        Backend::Sqlite
    }

    fn redacted(&self) -> String {
        match url::Url::parse(&self.0) {
            Ok(mut url) if url.password().is_some() => {
                // Setting a password only fails for URLs that cannot carry one, and this one did.
                let _ = url.set_password(Some("REDACTED"));
                url.to_string()
            }
            _ => self.0.clone(),
        }
    }
}

impl FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        if url.starts_with("sqlite:") || (cfg!(feature = "postgres") && is_postgres(url)) {
            Ok(Self(url.to_owned()))
        } else if is_postgres(url) {
            Err("this build has no PostgreSQL support (cargo feature `postgres`)".to_owned())
        } else if cfg!(feature = "postgres") {
            Err("expected a `sqlite://` or `postgres://` URL".to_owned())
        } else {
            Err("expected a `sqlite://` URL".to_owned())
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for DatabaseUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for DatabaseUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The URL in `database.url_file`; surrounding whitespace, such as the newline that
/// `kubectl create secret --from-file` keeps, is not part of it.
fn read_database_url(path: &Path) -> Result<DatabaseUrl, ConfigError> {
    let error = |reason: String| ConfigError::DatabaseUrlFile {
        path: path.to_owned(),
        reason,
    };
    std::fs::read_to_string(path)
        .map_err(|err| error(err.to_string()))?
        .trim()
        .parse()
        .map_err(error)
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres:") || url.starts_with("postgresql:")
}

/// Which store implementation a database URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    #[cfg(feature = "postgres")]
    Postgres,
}

/// Configuration that could not be read; the message names the key and the layer it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Layers(Box<figment::Error>),
    #[error("invalid configuration: RUST_LOG: {0}")]
    RustLog(String),
    #[error("invalid configuration: {0}")]
    Inconsistent(String),
    #[error("invalid configuration: database.url_file {path:?}: {reason}")]
    DatabaseUrlFile { path: PathBuf, reason: String },
}

impl Settings {
    /// Reads and validates the settings from every layer, relative to the working directory.
    pub fn load(config_file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut settings: Self = Self::figment(config_file)
            .extract()
            .map_err(|err| ConfigError::Layers(Box::new(err)))?;
        // RUST_LOG is the convention every Rust developer reaches for, so it beats the file and APP_*.
        if let Some(directives) = std::env::var("RUST_LOG").ok().filter(|d| !d.is_empty()) {
            settings.telemetry.log_level = directives.parse().map_err(ConfigError::RustLog)?;
        }
        if let Some(path) = &settings.database.url_file {
            settings.database.url = read_database_url(path)?;
        }
        settings.check().map_err(ConfigError::Inconsistent)?;
        Ok(settings)
    }

    /// The rules that span several keys; each message names the keys involved.
    pub fn check(&self) -> Result<(), String> {
        let tls = &self.tls;
        match (&tls.cert_file, &tls.key_file) {
            (Some(_), None) | (None, Some(_)) => {
                return Err("tls.cert_file and tls.key_file must be set together".to_owned());
            }
            (None, None) if tls.client_ca_file.is_some() => {
                return Err(
                    "tls.client_ca_file (mutual TLS) needs tls.cert_file and tls.key_file"
                        .to_owned(),
                );
            }
            _ => {}
        }
        if self.client.cert_file.is_some() != self.client.key_file.is_some() {
            return Err("client.cert_file and client.key_file must be set together".to_owned());
        }
        if !(self.client.retry_token_ratio > 0.0 && self.client.retry_token_ratio <= 1.0) {
            return Err("client.retry_token_ratio must be above 0 and at most 1".to_owned());
        }
        if self.auth.mode == AuthMode::Jwt {
            let auth = &self.auth;
            if auth.jwt_secret_file.is_some() == auth.jwt_public_key_file.is_some() {
                return Err(
                    "auth.mode = \"jwt\" needs exactly one of auth.jwt_secret_file (HS256) \
                     and auth.jwt_public_key_file (RS256/ES256)"
                        .to_owned(),
                );
            }
            if auth.issuer.is_empty() || auth.audience.is_empty() {
                return Err("auth.mode = \"jwt\" needs auth.issuer and auth.audience".to_owned());
            }
        }
        let must_be_positive = [
            ("tls.reload_interval", self.tls.reload_interval),
            ("tls.handshake_timeout", self.tls.handshake_timeout),
            ("server.preface_timeout", self.server.preface_timeout),
            ("server.keepalive_timeout", self.server.keepalive_timeout),
            ("health.check_interval", self.health.check_interval),
            ("client.timeout", self.client.timeout),
            ("client.resolve_interval", self.client.resolve_interval),
            ("client.keepalive_timeout", self.client.keepalive_timeout),
            ("telemetry.flush_timeout", self.telemetry.flush_timeout),
        ];
        if let Some((key, _)) = must_be_positive.iter().find(|(_, value)| value.is_zero()) {
            return Err(format!("{key} must be longer than 0s"));
        }
        self.telemetry.check()?;
        if self.server.max_message_bytes == 0 || self.server.max_concurrent_streams == 0 {
            return Err(
                "server.max_message_bytes and server.max_concurrent_streams must be above 0"
                    .to_owned(),
            );
        }
        Ok(())
    }

    fn figment(config_file: Option<&Path>) -> Figment {
        let config_dir = Path::new(CONFIG_DIR);
        // The built-in defaults are a layer of their own, so that a file adding one entry to a table
        // (a method's timeout, say) adds to the built-in entries instead of replacing them all.
        let mut figment = Figment::from(Serialized::defaults(Self::default()))
            .merge(Toml::file(config_dir.join("default.toml")));
        if let Some(app_env) = std::env::var("APP_ENV").ok().filter(|env| !env.is_empty()) {
            figment = figment.merge(Toml::file(config_dir.join(format!("{app_env}.toml"))));
        }
        if let Some(file) = config_file {
            // Unlike the files in `config/`, a file named on the command line must exist.
            figment = figment.merge(Toml::file_exact(file));
        }
        figment.merge(
            Env::prefixed(ENV_PREFIX)
                .split("__")
                // APP_ENV chooses a file; it is not a key.
                .filter(|key| key != "env"),
        )
    }

    /// The merged configuration as TOML, with secrets redacted, for `print-config`.
    pub fn to_redacted_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string_pretty(self)
    }
}
