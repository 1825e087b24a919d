//! Typed settings, read once at start-up from layered sources and passed down; no other module reads
//! the environment.
//!
//! Layers, later wins: built-in defaults < `config/default.toml` < `config/<APP_ENV>.toml` < the file
//! given with `--config` < `APP_*` environment variables (`__` separates nesting levels), and
//! `RUST_LOG`, when set, replaces `telemetry.log_level`. Unknown keys and invalid values fail with the key's name and the
//! layer it came from.

use std::{fmt, net::SocketAddr, num::NonZeroU32, path::Path, str::FromStr, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
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
    pub database: DatabaseSettings,
    pub service: ServiceSettings,
    pub telemetry: TelemetrySettings,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Where the gRPC server listens.
    pub grpc_addr: SocketAddr,
    /// Where the Prometheus metrics endpoint listens.
    pub metrics_addr: SocketAddr,
    /// Serve `grpc.reflection.v1` and `v1alpha` so tools can discover the API.
    pub reflection: bool,
    /// How often the health service re-checks the database.
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([0, 0, 0, 0], 50051)),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 9090)),
            reflection: true,
            health_check_interval: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite://<file>` (created if missing) or `postgres://user:password@host/db`.
    pub url: DatabaseUrl,
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
            max_connections: NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN),
            acquire_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            migrate: true,
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
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Json,
            log_level: LogFilter("info".to_owned()),
        }
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
        Ok(settings)
    }

    fn figment(config_file: Option<&Path>) -> Figment {
        let config_dir = Path::new(CONFIG_DIR);
        let mut figment = Figment::new().merge(Toml::file(config_dir.join("default.toml")));
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
