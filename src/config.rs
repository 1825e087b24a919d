//! The order service's own configuration sections, `[database]` and `[service]`, read beside the
//! platform's (`platform::config`) from the same layers.

use std::{
    fmt,
    num::NonZeroU32,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use platform::config::{ConfigError, PlatformSettings, ServiceSections};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Every setting: the platform's (`settings.platform`) and the order service's (`settings.database`,
/// `settings.service`).
pub type Settings = platform::config::Settings<OrderSections>;

/// The order service's top-level sections.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct OrderSections {
    pub database: DatabaseSettings,
    pub service: ServiceSettings,
}

impl ServiceSections for OrderSections {
    fn platform_defaults(platform: &mut PlatformSettings) {
        let service = crate::api::ORDER_SERVICE_NAME;
        let timeouts = &mut platform.server.timeouts;
        timeouts
            .services
            .insert(service.to_owned(), Duration::from_secs(10));
        // A search streams every match: give it longer than the service's unary calls.
        timeouts
            .methods
            .insert(format!("{service}/SearchOrders"), Duration::from_secs(60));
        // A delivery address is personal data.
        platform.telemetry.redact_fields = vec!["destination".to_owned()];
    }

    fn finish(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = &self.database.url_file {
            self.database.url = read_database_url(path)?;
        }
        Ok(())
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
    let error = |reason: String| ConfigError::File {
        key: "database.url_file",
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
