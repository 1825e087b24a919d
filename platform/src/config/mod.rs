//! Typed settings, read once at start-up from layered sources and passed down; no other module reads
//! the environment.
//!
//! Layers, later wins: built-in defaults < `config/default.toml` < `config/<APP_ENV>.toml` < the file
//! given with `--config` < `APP_*` environment variables (`__` separates nesting levels), and
//! `RUST_LOG`, when set, replaces `telemetry.log_level`. Unknown keys and invalid values fail with the
//! key's name and the layer it came from.
//!
//! The platform owns its sections ([`PlatformSettings`]); a service adds its own top-level sections
//! beside them ([`ServiceSections`]), and [`Settings`] holds both, read from the same layers.

mod client;
mod server;
mod telemetry;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeSet,
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
    value::Value,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub use self::{
    client::ClientSettings,
    server::{
        AuthMode, AuthSettings, HealthSettings, RateLimitSettings, ServerSettings,
        ShutdownSettings, TimeoutSettings, TlsSettings,
    },
    telemetry::{DEFAULT_LATENCY_BUCKETS, LogFilter, LogFormat, TelemetrySettings},
};

/// The directory holding `default.toml` and the per-environment files, relative to the working directory.
pub const CONFIG_DIR: &str = "config";
/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "APP_";

/// The platform's sections. Not `deny_unknown_fields` at the top: the service's sections sit beside
/// these, and [`Settings::load`] refuses a top-level key that neither side knows.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct PlatformSettings {
    pub server: ServerSettings,
    pub tls: TlsSettings,
    pub auth: AuthSettings,
    pub health: HealthSettings,
    pub shutdown: ShutdownSettings,
    pub client: ClientSettings,
    pub telemetry: TelemetrySettings,
}

/// What a service adds to the configuration: its own top-level sections (each a struct with
/// `#[serde(default, deny_unknown_fields)]`), read from the same layers as the platform's.
pub trait ServiceSections:
    Default + Clone + std::fmt::Debug + PartialEq + Serialize + DeserializeOwned
{
    /// The service's defaults for platform keys (its methods' deadlines, the message fields its logs
    /// redact); they are built-in defaults like any other, so every layer overrides them.
    fn platform_defaults(_platform: &mut PlatformSettings) {}

    /// Completes the sections once read (a secret taken from the file a key names, say).
    fn finish(&mut self) -> Result<(), ConfigError> {
        Ok(())
    }

    /// The rules that span several of the service's keys; each message names the keys involved.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Every setting: the platform's sections and the service's own. The service's sections are reached
/// directly (`settings.database`), the platform's through `settings.platform`.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings<S> {
    pub platform: PlatformSettings,
    /// The service's own sections.
    pub own: S,
}

impl<S: ServiceSections> Default for Settings<S> {
    fn default() -> Self {
        let mut platform = PlatformSettings::default();
        S::platform_defaults(&mut platform);
        Self {
            platform,
            own: S::default(),
        }
    }
}

impl<S> Deref for Settings<S> {
    type Target = S;

    fn deref(&self) -> &S {
        &self.own
    }
}

impl<S> DerefMut for Settings<S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.own
    }
}

/// Configuration that could not be read; the message names the key and the layer it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Layers(Box<figment::Error>),
    #[error("invalid configuration: unknown key `{key}` in {layer}")]
    UnknownKey { key: String, layer: String },
    #[error("invalid configuration: RUST_LOG: {0}")]
    RustLog(String),
    #[error("invalid configuration: {0}")]
    Inconsistent(String),
    /// A key naming a file whose contents are the value (a mounted Secret).
    #[error("invalid configuration: {key} {path:?}: {reason}")]
    File {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
}

impl<S: ServiceSections> Settings<S> {
    /// Reads and validates the settings from every layer, relative to the working directory.
    pub fn load(config_file: Option<&Path>) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        let figment = Self::figment(&defaults, config_file);
        refuse_unknown_keys(&figment, &defaults)?;
        let layers = |err| ConfigError::Layers(Box::new(err));
        let mut settings = Self {
            platform: figment.extract().map_err(layers)?,
            own: figment.extract().map_err(layers)?,
        };
        // RUST_LOG is the convention every Rust developer reaches for, so it beats the file and APP_*.
        if let Some(directives) = std::env::var("RUST_LOG").ok().filter(|d| !d.is_empty()) {
            settings.platform.telemetry.log_level =
                directives.parse().map_err(ConfigError::RustLog)?;
        }
        settings.own.finish()?;
        settings.check().map_err(ConfigError::Inconsistent)?;
        Ok(settings)
    }

    /// The rules that span several keys, the platform's and the service's.
    pub fn check(&self) -> Result<(), String> {
        self.platform.check()?;
        self.own.check()
    }

    fn figment(defaults: &Self, config_file: Option<&Path>) -> Figment {
        let config_dir = Path::new(CONFIG_DIR);
        // The built-in defaults are a layer of their own, so that a file adding one entry to a table
        // (a method's timeout, say) adds to the built-in entries instead of replacing them all.
        let mut figment = Figment::from(Serialized::defaults(&defaults.platform))
            .merge(Serialized::defaults(&defaults.own))
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
        #[derive(Serialize)]
        struct Both<'a, S> {
            #[serde(flatten)]
            platform: &'a PlatformSettings,
            #[serde(flatten)]
            own: &'a S,
        }
        toml::to_string_pretty(&Both {
            platform: &self.platform,
            own: &self.own,
        })
    }
}

/// Each section refuses the keys it does not know (`deny_unknown_fields`); this refuses the top-level
/// keys that are no section of the platform's or the service's.
fn refuse_unknown_keys<S: ServiceSections>(
    figment: &Figment,
    defaults: &Settings<S>,
) -> Result<(), ConfigError> {
    let layers = |err| ConfigError::Layers(Box::new(err));
    let top_level_keys = |value: Value| -> BTreeSet<String> {
        value
            .into_dict()
            .map(|dict| dict.into_keys().collect())
            .unwrap_or_default()
    };
    let known: BTreeSet<String> =
        top_level_keys(Value::serialize(&defaults.platform).map_err(layers)?)
            .into_iter()
            .chain(top_level_keys(
                Value::serialize(&defaults.own).map_err(layers)?,
            ))
            .collect();
    let given = figment.extract::<Value>().map_err(layers)?;
    match top_level_keys(given)
        .into_iter()
        .find(|key| !known.contains(key))
    {
        Some(key) => {
            let layer = figment
                .find_metadata(&key)
                .map(|metadata| match &metadata.source {
                    Some(source) => format!("{} {source}", metadata.name),
                    None => metadata.name.to_string(),
                })
                .unwrap_or_else(|| "an unknown layer".to_owned());
            Err(ConfigError::UnknownKey { key, layer })
        }
        None => Ok(()),
    }
}

impl PlatformSettings {
    /// The rules that span several of the platform's keys; each message names the keys involved.
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
}
