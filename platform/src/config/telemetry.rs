//! `[telemetry]`: logs, metrics and traces.

use std::{str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, Serialize};

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
            // The service names its own personal data (`ServiceSections::platform_defaults`).
            redact_fields: Vec::new(),
        }
    }
}

impl TelemetrySettings {
    pub(super) fn check(&self) -> Result<(), String> {
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
