//! Prometheus metrics, named as go-grpc-prometheus (and go-grpc-middleware's provider) names them, so
//! the dashboards and alerts teams already run work unchanged; database metrics named after the
//! OpenTelemetry database conventions; build and process information.
//!
//! Every series a call touches is created up front, one set per served method plus one `unknown`
//! set for paths nobody serves: label values are bounded, and recording a call is a few atomic
//! additions, with no lookup or lock.

pub use prometheus::Error as MetricsError;
use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tonic::Code;

use crate::{ServiceInfo, config::TelemetrySettings, methods::MethodKind};

/// The content type of [`Metrics::render`]'s output: the Prometheus text format, which every
/// Prometheus version accepts (Prometheus 3 refuses a scrape without a valid one).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every gRPC status code, in number order, as grpc-go's `Code.String()` spells it: the values of
/// the `grpc_code` label.
pub const GO_CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// `code` as grpc-go spells it.
pub fn go_code_name(code: Code) -> &'static str {
    GO_CODE_NAMES
        .get(code as usize)
        .copied()
        .unwrap_or("Unknown")
}

/// The `grpc_type` label value of a method kind.
pub fn grpc_type(kind: MethodKind) -> &'static str {
    match kind {
        MethodKind::Unary => "unary",
        MethodKind::ClientStream => "client_stream",
        MethodKind::ServerStream => "server_stream",
        MethodKind::BidiStream => "bidi_stream",
    }
}

/// Spans the tracing pipeline has lost, by reason; a process-wide count (there is one tracer
/// provider per process) that every registry reports.
pub struct DroppedSpans {
    pub queue_full: std::sync::atomic::AtomicU64,
    pub export_failed: std::sync::atomic::AtomicU64,
}

pub static DROPPED_SPANS: DroppedSpans = DroppedSpans {
    queue_full: std::sync::atomic::AtomicU64::new(0),
    export_failed: std::sync::atomic::AtomicU64::new(0),
};

/// Log lines the writer thread dropped because its queue was full; set once by `telemetry::init`.
static DROPPED_LOG_LINES: OnceLock<tracing_appender::non_blocking::ErrorCounter> = OnceLock::new();

/// Makes every registry report `counter` as `log_lines_dropped_total`.
pub fn count_dropped_log_lines(counter: tracing_appender::non_blocking::ErrorCounter) {
    // Set once per process, by the one `telemetry::init`.
    let _ = DROPPED_LOG_LINES.set(counter);
}

/// One server's metrics registry and the families in it.
pub struct Metrics {
    registry: Registry,
    started: IntCounterVec,
    handled: IntCounterVec,
    received: IntCounterVec,
    sent: IntCounterVec,
    handling: HistogramVec,
    in_flight: IntGaugeVec,
    store: StoreInstruments,
    pool_usage: IntGaugeVec,
    pool_max: IntGauge,
    dropped_spans: IntCounterVec,
    dropped_log_lines: IntCounter,
    leveling: std::sync::Mutex<()>,
    /// Where the pool gauges are read at each scrape; set once the store is known.
    pool: OnceLock<Arc<dyn Fn() -> PoolStatus + Send + Sync>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

const RPC_LABELS: [&str; 3] = ["grpc_type", "grpc_service", "grpc_method"];

impl Metrics {
    pub fn new(settings: &TelemetrySettings, service: &ServiceInfo) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels)?,
            )
        };
        let histogram = |name: &str,
                         help: &str,
                         buckets: Vec<f64>,
                         labels: &[&str]|
         -> Result<_, MetricsError> {
            register(
                &registry,
                HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?,
            )
        };
        let handled_labels = ["grpc_type", "grpc_service", "grpc_method", "grpc_code"];
        let metrics = Self {
            started: counter(
                "grpc_server_started_total",
                "Total number of RPCs started on the server.",
                &RPC_LABELS,
            )?,
            handled: counter(
                "grpc_server_handled_total",
                "Total number of RPCs completed on the server, regardless of success or failure.",
                &handled_labels,
            )?,
            received: counter(
                "grpc_server_msg_received_total",
                "Total number of RPC stream messages received on the server.",
                &RPC_LABELS,
            )?,
            sent: counter(
                "grpc_server_msg_sent_total",
                "Total number of gRPC stream messages sent by the server.",
                &RPC_LABELS,
            )?,
            handling: histogram(
                "grpc_server_handling_seconds",
                "Histogram of response latency (seconds) of gRPC that had been application-level \
                 handled by the server.",
                settings.latency_buckets.clone(),
                &RPC_LABELS,
            )?,
            in_flight: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "grpc_server_in_flight_rpcs",
                        "RPCs in progress on the server (streams until their last message).",
                    ),
                    &RPC_LABELS,
                )?,
            )?,
            store: StoreInstruments {
                operation: histogram(
                    "db_client_operation_duration_seconds",
                    "Duration of database operations, from taking a connection to the result.",
                    DATABASE_BUCKETS.to_vec(),
                    &["db_system", "db_operation", "db_collection_name"],
                )?,
                wait: histogram(
                    "db_client_connections_wait_time_seconds",
                    "Time it took to obtain a connection from the pool.",
                    DATABASE_BUCKETS.to_vec(),
                    &[],
                )?
                .get_metric_with_label_values::<&str>(&[])?,
            },
            pool_usage: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "db_client_connections_usage",
                        "Connections in the pool, by state (idle or used).",
                    ),
                    &["state"],
                )?,
            )?,
            pool_max: register(
                &registry,
                IntGauge::new(
                    "db_client_connections_max",
                    "The most connections the pool opens.",
                )?,
            )?,
            dropped_spans: counter(
                "otel_spans_dropped_total",
                "Spans that never reached the trace collector: the export queue was full, or \
                 the export failed.",
                &["reason"],
            )?,
            dropped_log_lines: register(
                &registry,
                IntCounter::new(
                    "log_lines_dropped_total",
                    "Log lines dropped because the log writer's queue was full (stdout too slow).",
                )?,
            )?,
            leveling: std::sync::Mutex::new(()),
            pool: OnceLock::new(),
            registry,
        };
        metrics.register_build_info(service)?;
        // The prometheus crate reads process facts from /proc: Linux only.
        #[cfg(target_os = "linux")]
        metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(metrics)
    }

    /// `<package>_build_info{version,revision,rustc} 1`, so dashboards show what runs where.
    fn register_build_info(&self, service: &ServiceInfo) -> Result<(), MetricsError> {
        let name = format!("{}_build_info", service.name.replace('-', "_"));
        let gauge = IntGaugeVec::new(
            Opts::new(
                name,
                "The version, commit and compiler of the running build; always 1.",
            ),
            &["version", "revision", "rustc"],
        )?;
        gauge
            .get_metric_with_label_values(&[service.version, service.revision, service.rustc])?
            .set(1);
        self.registry.register(Box::new(gauge))
    }

    /// The series of one method, all created now (every code of `handled` too, as go-grpc-prometheus
    /// does, so that rates over them exist before the first error).
    pub fn rpc(
        &self,
        kind: MethodKind,
        service: &str,
        method: &str,
    ) -> Result<RpcMetrics, MetricsError> {
        let labels = [grpc_type(kind), service, method];
        let mut handled = Vec::with_capacity(GO_CODE_NAMES.len());
        for code in GO_CODE_NAMES {
            handled.push(
                self.handled
                    .get_metric_with_label_values(&[labels[0], service, method, code])?,
            );
        }
        Ok(RpcMetrics {
            started: self.started.get_metric_with_label_values(&labels)?,
            handled: handled.into(),
            received: self.received.get_metric_with_label_values(&labels)?,
            sent: self.sent.get_metric_with_label_values(&labels)?,
            handling: self.handling.get_metric_with_label_values(&labels)?,
            in_flight: self.in_flight.get_metric_with_label_values(&labels)?,
        })
    }

    /// The instruments the store records its operations and connection waits into.
    pub fn store_instruments(&self) -> StoreInstruments {
        self.store.clone()
    }

    /// Reads the pool gauges from `status` at each scrape.
    pub fn watch_pool(&self, status: impl Fn() -> PoolStatus + Send + Sync + 'static) {
        // Set once per server; a second store would be a wiring defect, and the first one stays.
        let _ = self.pool.set(Arc::new(status));
    }

    /// Everything, in the Prometheus text format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> Result<Vec<u8>, MetricsError> {
        if let Some(status) = self.pool.get() {
            let status = status();
            self.pool_usage
                .get_metric_with_label_values(&["idle"])?
                .set(i64::from(status.idle));
            self.pool_usage
                .get_metric_with_label_values(&["used"])?
                .set(i64::from(status.size.saturating_sub(status.idle)));
            self.pool_max.set(i64::from(status.max));
        }
        // One scrape at a time brings the counters level: two at once would both add the gap.
        let _level = self
            .leveling
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (reason, total) in [
            ("queue_full", &DROPPED_SPANS.queue_full),
            ("export_failed", &DROPPED_SPANS.export_failed),
        ] {
            let counter = self.dropped_spans.get_metric_with_label_values(&[reason])?;
            level(&counter, total.load(std::sync::atomic::Ordering::Relaxed));
        }
        if let Some(dropped) = DROPPED_LOG_LINES.get() {
            let total = u64::try_from(dropped.dropped_lines()).unwrap_or(u64::MAX);
            level(&self.dropped_log_lines, total);
        }
        let mut text = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut text)?;
        Ok(text)
    }
}

/// Adds `collector` to `registry` and hands it back for recording.
fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> Result<C, MetricsError> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

/// Brings `counter` up to `total`, a count kept elsewhere (it only ever grows).
fn level(counter: &IntCounter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

/// The store's instruments in `metrics`, or unregistered ones when metrics are off.
pub fn store_instruments(metrics: Option<&Metrics>) -> StoreInstruments {
    metrics.map(Metrics::store_instruments).unwrap_or_default()
}

/// Bucket bounds for database waits and operations: from 100 us (an in-process SQLite read) to the
/// acquire timeout's order of magnitude.
const DATABASE_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// One method's series.
#[derive(Clone)]
pub struct RpcMetrics {
    started: IntCounter,
    handled: Arc<[IntCounter]>,
    received: IntCounter,
    sent: IntCounter,
    handling: Histogram,
    in_flight: IntGauge,
}

impl RpcMetrics {
    pub fn started(&self) {
        self.started.inc();
        self.in_flight.inc();
    }

    pub fn handled(&self, code: Code, seconds: f64) {
        if let Some(counter) = self.handled.get(code as usize) {
            counter.inc();
        }
        self.handling.observe(seconds);
        self.in_flight.dec();
    }

    pub fn received(&self, messages: u64) {
        self.received.inc_by(messages);
    }

    pub fn sent(&self, messages: u64) {
        self.sent.inc_by(messages);
    }
}

/// How many connections a database pool holds, and how many it may hold: the store reports it, the
/// metrics render it at each scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    /// Open connections, idle or in use.
    pub size: u32,
    pub idle: u32,
    pub max: u32,
}

/// What the store records: the duration of each operation and the wait for a pool connection.
/// `Default` gives instruments that belong to no registry, for stores nobody scrapes.
#[derive(Clone)]
pub struct StoreInstruments {
    operation: HistogramVec,
    wait: Histogram,
}

impl std::fmt::Debug for StoreInstruments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreInstruments").finish_non_exhaustive()
    }
}

impl Default for StoreInstruments {
    fn default() -> Self {
        let histogram =
            |name: &str, labels: &[&str]| HistogramVec::new(HistogramOpts::new(name, name), labels);
        // Both names and label sets are fixed and valid; the vectors cannot fail to build.
        let operation = histogram(
            "db_operation",
            &["db_system", "db_operation", "db_collection_name"],
        )
        .unwrap_or_else(|_| unreachable!("fixed, valid histogram options"));
        let wait = histogram("db_wait", &[])
            .and_then(|family| family.get_metric_with_label_values::<&str>(&[]))
            .unwrap_or_else(|_| unreachable!("fixed, valid histogram options"));
        Self { operation, wait }
    }
}

impl StoreInstruments {
    /// The histogram of one kind of operation.
    pub fn operation(
        &self,
        system: &str,
        operation: &str,
        collection: &str,
    ) -> Result<Histogram, MetricsError> {
        self.operation
            .get_metric_with_label_values(&[system, operation, collection])
    }

    /// Records how long taking a connection from the pool took.
    pub fn connection_wait(&self, seconds: f64) {
        self.wait.observe(seconds);
    }
}
