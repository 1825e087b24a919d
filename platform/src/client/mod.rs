//! The reference client: how a caller of a service on this platform should call it, following gRPC's
//! production checklist for clients. Generic over the call: a service wraps its own methods around
//! [`Client::unary`], as the generated tonic client's methods.
//!
//! - One long-lived connection per server address, shared by every call (a `Client` is cheap to
//!   clone; never build one per request), with HTTP/2 keepalive so dead connections are noticed.
//! - A deadline on every call (`client.timeout`, or [`CallOptions::timeout`]), retries included.
//! - Retries only for codes that say "try again": UNAVAILABLE, RESOURCE_EXHAUSTED (after the
//!   server's `grpc-retry-pushback-ms` or `RetryInfo` delay when it sends one) and ABORTED, and
//!   DEADLINE_EXCEEDED for reads only; and for a connection that closed under the call; exponential backoff with full jitter; at most
//!   `client.max_attempts`; and a retry budget (gRPC's retry throttling) so that a failing backend
//!   is not hammered. Writes are retried only when they carry their own idempotency key
//!   ([`Idempotency::Keyed`]), which every retry repeats.
//! - Calls spread round robin over every address of `client.targets` (static `host:port`, or
//!   `dns:///host:port` re-resolved every `client.resolve_interval`); an address whose connection
//!   fails is left out for a while, then tried again.
//! - TLS and mutual TLS (`client.ca_file`, `client.cert_file`), a bearer token
//!   (`client.token_file`), and the W3C trace context of the current span on every call.
//!
//! Written by hand rather than with tonic's balance channel, which picks by power of two choices
//! without a way to steer a retry away from the address that just failed or to bring a failed one
//! back; and tonic has no retry policy of its own.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex, PoisonError, RwLock, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tonic::{
    Code, Request, Status,
    metadata::{AsciiMetadataValue, MetadataKey, MetadataMap, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_types::StatusExt;

use crate::config::ClientSettings;

/// How long an address whose connection failed is left out of the rotation.
const EJECT_FOR: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("client.targets is empty")]
    NoTargets,
    #[error("invalid target {target:?}: {reason}")]
    Target { target: String, reason: String },
    #[error("cannot read {key} {path:?}: {source}")]
    File {
        key: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the token in client.token_file is not a valid header value")]
    Token,
    #[error("invalid TLS settings: {0}")]
    Tls(tonic::transport::Error),
}

/// Whether a call may be retried after DEADLINE_EXCEEDED, when it may have done its work already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// Reads: repeating them changes nothing, whatever the first attempt did.
    Read,
    /// Writes that carry their own idempotency key (a `request_id`): repeated after a code that
    /// says the server did not act (or will answer the same), not after a timeout.
    Keyed,
}

/// Per-call settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallOptions {
    /// The call's deadline, retries included; `client.timeout` when `None`.
    pub timeout: Option<Duration>,
}

/// A client of one service over one or more servers. Clone it freely: clones share the
/// connections, the rotation and the retry budget.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    settings: ClientSettings,
    tls: Option<ClientTlsConfig>,
    token: Option<AsciiMetadataValue>,
    targets: Mutex<Vec<Target>>,
    backends: RwLock<Arc<Vec<Arc<Backend>>>>,
    next: AtomicUsize,
    budget: RetryBudget,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Static(String),
    Dns { host: String, port: u16 },
}

/// One server address, and its connection.
struct Backend {
    addr: String,
    channel: Channel,
    ejected_until: Mutex<Option<Instant>>,
}

impl Backend {
    fn is_ejected(&self, now: Instant) -> bool {
        lock(&self.ejected_until).is_some_and(|until| until > now)
    }

    fn eject(&self) {
        *lock(&self.ejected_until) = Some(Instant::now() + EJECT_FOR);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Client {
    /// A client for `settings.targets`. Resolves the DNS targets once; connects on first use.
    pub async fn new(settings: &ClientSettings) -> Result<Self, ClientError> {
        let targets = parse_targets(&settings.targets)?;
        let tls = tls_config(settings)?;
        let token = match &settings.token_file {
            Some(path) => {
                let token = read("client.token_file", path)?;
                let token = String::from_utf8_lossy(&token).trim().to_owned();
                Some(
                    AsciiMetadataValue::try_from(format!("Bearer {token}"))
                        .map_err(|_| ClientError::Token)?,
                )
            }
            None => None,
        };
        let inner = Arc::new(Inner {
            settings: settings.clone(),
            tls,
            token,
            targets: Mutex::new(targets),
            backends: RwLock::new(Arc::new(Vec::new())),
            next: AtomicUsize::new(0),
            budget: RetryBudget::new(
                f64::from(settings.retry_budget.get()),
                settings.retry_token_ratio,
            ),
        });
        inner.refresh().await?;
        let has_dns = lock(&inner.targets)
            .iter()
            .any(|target| matches!(target, Target::Dns { .. }));
        if has_dns {
            tokio::spawn(re_resolve(Arc::downgrade(&inner)));
        }
        Ok(Self { inner })
    }

    /// Replaces the targets (as `client.targets` writes them), keeping the connections to addresses
    /// that stay.
    pub async fn set_targets(&self, targets: &[String]) -> Result<(), ClientError> {
        *lock(&self.inner.targets) = parse_targets(targets)?;
        self.inner.refresh().await
    }

    /// The addresses calls are spread over now.
    pub fn addresses(&self) -> Vec<String> {
        self.inner
            .current()
            .iter()
            .map(|backend| backend.addr.clone())
            .collect()
    }

    /// Any unary call, with the deadline, metadata, retries and rotation described in the module
    /// documentation. `call` makes one attempt on the channel it is given.
    pub async fn unary<Req, Res, F, Fut>(
        &self,
        idempotency: Idempotency,
        options: CallOptions,
        message: Req,
        call: F,
    ) -> Result<Res, Status>
    where
        Req: Clone,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Res>, Status>>,
    {
        let timeout = options.timeout.unwrap_or(self.inner.settings.timeout);
        let deadline = Instant::now() + timeout;
        let max_attempts = self.inner.settings.max_attempts.get();
        let mut attempt = 1;
        loop {
            let Some(backend) = self.inner.pick() else {
                return Err(Status::unavailable("no server address to call"));
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Status::deadline_exceeded(
                    "deadline exceeded before the call",
                ));
            }
            let request = self.inner.request(message.clone(), remaining);
            let status = match call(backend.channel.clone(), request).await {
                Ok(response) => {
                    self.inner.budget.success();
                    return Ok(response.into_inner());
                }
                Err(status) => status,
            };
            // The connection failed, or the server said it cannot serve (draining, its database
            // down): try the others first for a while.
            if status.code() == Code::Unavailable || is_connection_failure(&status) {
                backend.eject();
            }
            self.inner.budget.failure();
            let Some(delay) = self.retry_delay(&status, idempotency, attempt) else {
                return Err(status);
            };
            if attempt >= max_attempts
                || !self.inner.budget.allows_retry()
                || Instant::now() + delay >= deadline
            {
                return Err(status);
            }
            tracing::debug!(code = ?status.code(), attempt, addr = %backend.addr, ?delay,
                "retrying a call");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// How long to wait before retrying after `status`, or `None` when it must not be retried.
    fn retry_delay(
        &self,
        status: &Status,
        idempotency: Idempotency,
        attempt: u32,
    ) -> Option<Duration> {
        let retryable = match status.code() {
            Code::Unavailable | Code::ResourceExhausted | Code::Aborted => true,
            Code::DeadlineExceeded => idempotency == Idempotency::Read,
            // The connection closed under the call (a server going away), whatever code the
            // transport reported: both kinds of call are safe to send again.
            _ => is_connection_failure(status),
        };
        if !retryable {
            return None;
        }
        // The server's word wins: a pushback below zero means "do not retry".
        if let Some(pushback) = status.metadata().get("grpc-retry-pushback-ms") {
            let millis = pushback.to_str().ok()?.parse::<i64>().ok()?;
            return u64::try_from(millis).ok().map(Duration::from_millis);
        }
        if let Some(delay) = status
            .get_details_retry_info()
            .and_then(|info| info.retry_delay)
        {
            return Some(delay);
        }
        Some(full_jitter(
            self.inner.settings.initial_backoff,
            self.inner.settings.max_backoff,
            attempt,
        ))
    }
}

/// A random wait below `initial * 2^(attempt-1)`, capped at `max`: full jitter spreads retries of
/// many clients failing together.
fn full_jitter(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(1).min(20);
    let ceiling = initial.saturating_mul(1 << exponent).min(max);
    ceiling.mul_f64(fastrand::f64())
}

/// A status that says the connection, not the server's handler, failed.
fn is_connection_failure(status: &Status) -> bool {
    std::error::Error::source(status).is_some_and(|source| source.is::<tonic::transport::Error>())
}

impl Inner {
    fn current(&self) -> Arc<Vec<Arc<Backend>>> {
        Arc::clone(&self.backends.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The next address in rotation that is not left out; any address when all are.
    fn pick(&self) -> Option<Arc<Backend>> {
        let backends = self.current();
        let count = backends.len();
        if count == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        (0..count)
            .map(|offset| &backends[(start + offset) % count])
            .find(|backend| !backend.is_ejected(now))
            .or_else(|| backends.get(start % count))
            .cloned()
    }

    /// One attempt's request: its deadline, the bearer token and the trace context.
    fn request<Req>(&self, message: Req, remaining: Duration) -> Request<Req> {
        let mut request = Request::new(message);
        request.set_timeout(remaining);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        inject_trace_context(request.metadata_mut());
        request
    }

    /// Resolves the targets and installs the new address list, reusing existing connections.
    async fn refresh(&self) -> Result<(), ClientError> {
        let targets = lock(&self.targets).clone();
        let mut addrs = Vec::new();
        for target in &targets {
            match target {
                Target::Static(addr) => addrs.push((addr.clone(), None)),
                Target::Dns { host, port } => {
                    match tokio::net::lookup_host((host.as_str(), *port)).await {
                        Ok(resolved) => addrs.extend(
                            resolved.map(|addr: SocketAddr| (addr.to_string(), Some(host.clone()))),
                        ),
                        // Keep what was resolved before: a DNS blip must not empty the rotation.
                        Err(err) => {
                            tracing::warn!(%host, error = %err, "cannot resolve a client target");
                            let current = self.current();
                            addrs.extend(
                                current
                                    .iter()
                                    .map(|backend| (backend.addr.clone(), Some(host.clone()))),
                            );
                        }
                    }
                }
            }
        }
        addrs.sort();
        addrs.dedup_by(|a, b| a.0 == b.0);
        if addrs.is_empty() {
            return Err(ClientError::NoTargets);
        }
        let current = self.current();
        let mut backends = Vec::with_capacity(addrs.len());
        for (addr, host) in addrs {
            if let Some(existing) = current.iter().find(|backend| backend.addr == addr) {
                backends.push(Arc::clone(existing));
                continue;
            }
            backends.push(Arc::new(Backend {
                channel: self.channel(&addr, host.as_deref())?,
                addr,
                ejected_until: Mutex::new(None),
            }));
        }
        *self
            .backends
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(backends);
        Ok(())
    }

    /// A lazily connected channel to `addr`; `host` is the name its certificate must carry when
    /// `addr` came from resolving it.
    fn channel(&self, addr: &str, host: Option<&str>) -> Result<Channel, ClientError> {
        let settings = &self.settings;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let target_error = |reason: String| ClientError::Target {
            target: addr.to_owned(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|err| target_error(err.to_string()))?
            .connect_timeout(settings.timeout)
            .http2_keep_alive_interval(settings.keepalive_interval)
            .keep_alive_timeout(settings.keepalive_timeout)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            let mut tls = tls.clone();
            if settings.server_name.is_empty()
                && let Some(host) = host
            {
                tls = tls.domain_name(host);
            }
            endpoint = endpoint.tls_config(tls).map_err(ClientError::Tls)?;
        }
        Ok(endpoint.connect_lazy())
    }
}

/// Re-resolves the DNS targets until the client is dropped.
async fn re_resolve(inner: Weak<Inner>) {
    let interval = match inner.upgrade() {
        Some(inner) => inner.settings.resolve_interval,
        None => return,
    };
    loop {
        tokio::time::sleep(interval).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if let Err(err) = inner.refresh().await {
            tracing::warn!(error = %err, "cannot refresh the client's targets");
        }
    }
}

fn parse_targets(targets: &[String]) -> Result<Vec<Target>, ClientError> {
    if targets.is_empty() {
        return Err(ClientError::NoTargets);
    }
    targets
        .iter()
        .map(|target| {
            let error = |reason: &str| ClientError::Target {
                target: target.clone(),
                reason: reason.to_owned(),
            };
            match target.strip_prefix("dns:///") {
                Some(host_port) => {
                    let (host, port) = host_port
                        .rsplit_once(':')
                        .ok_or_else(|| error("write dns:///host:port"))?;
                    let port = port
                        .parse()
                        .map_err(|_| error("the port is not a number"))?;
                    Ok(Target::Dns {
                        host: host.trim_matches(['[', ']']).to_owned(),
                        port,
                    })
                }
                None if target.contains("://") => Err(error("write host:port or dns:///host:port")),
                None => Ok(Target::Static(target.clone())),
            }
        })
        .collect()
}

/// TLS as `settings` configure it: `None` without `client.ca_file`.
pub(crate) fn tls_config(
    settings: &ClientSettings,
) -> Result<Option<ClientTlsConfig>, ClientError> {
    let Some(ca_file) = &settings.ca_file else {
        return Ok(None);
    };
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("client.ca_file", ca_file)?));
    if let (Some(cert), Some(key)) = (&settings.cert_file, &settings.key_file) {
        config = config.identity(Identity::from_pem(
            read("client.cert_file", cert)?,
            read("client.key_file", key)?,
        ));
    }
    if !settings.server_name.is_empty() {
        config = config.domain_name(settings.server_name.clone());
    }
    Ok(Some(config))
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::File {
        key,
        path: path.to_owned(),
        source,
    })
}

/// Puts the current span's W3C trace context (`traceparent`, `tracestate`) into `metadata`, through
/// the propagator the telemetry set up; nothing when there is no trace.
fn inject_trace_context(metadata: &mut MetadataMap) {
    use opentelemetry::propagation::Injector;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    struct MetadataInjector<'a>(&'a mut MetadataMap);

    impl Injector for MetadataInjector<'_> {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(key), Ok(value)) = (
                MetadataKey::from_bytes(key.as_bytes()),
                MetadataValue::try_from(value),
            ) {
                self.0.insert(key, value);
            }
        }
    }

    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata));
    });
}

/// gRPC's retry throttling (A6): `max` tokens to start; each failure takes one, each success gives
/// back `ratio`; retries are allowed while more than half remain.
#[derive(Debug)]
struct RetryBudget {
    tokens: Mutex<f64>,
    max: f64,
    ratio: f64,
}

impl RetryBudget {
    fn new(max: f64, ratio: f64) -> Self {
        Self {
            tokens: Mutex::new(max),
            max,
            ratio,
        }
    }

    fn success(&self) {
        let mut tokens = lock(&self.tokens);
        *tokens = (*tokens + self.ratio).min(self.max);
    }

    fn failure(&self) {
        let mut tokens = lock(&self.tokens);
        *tokens = (*tokens - 1.0).max(0.0);
    }

    fn allows_retry(&self) -> bool {
        *lock(&self.tokens) > self.max / 2.0
    }
}

#[cfg(test)]
mod tests;
