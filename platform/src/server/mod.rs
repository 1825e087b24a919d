//! The gRPC server: one [`Server`] (the services a service crate registers, reflection, health and the
//! layers every call passes through) that `serve` and the tests both run, and the lifecycle around
//! it: connections, readiness from the registered dependencies, certificate reloads, graceful
//! shutdown.

mod body;
mod builder;
mod connection;
mod deadline;
mod drain;
mod error_details;
mod in_flight;
mod metrics_endpoint;
mod observe;
mod panic_guard;
mod rate_limit;

use std::{
    net::SocketAddr,
    pin::{Pin, pin},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::service::Routes;
use tonic_health::server::HealthReporter;

pub use self::{
    builder::{Policy, ServerBuilder},
    connection::{Peer, Socket},
    deadline::{Deadline, parse_grpc_timeout},
};
use self::{
    connection::{ConnectionOptions, Stop},
    deadline::DeadlineService,
    drain::{Drain, DrainLayer},
    error_details::ErrorDetails,
    in_flight::{InFlightLimit, InFlightLimitLayer},
    observe::Observe,
    panic_guard::PanicGuard,
    rate_limit::RateLimit,
};
use crate::{
    auth::{AuthError, Authenticate},
    config::{AuthMode, PlatformSettings},
    health::{self, Readiness, WatchSettings},
    telemetry::metrics::{Metrics, MetricsError},
    tls::{ServerTls, TlsError},
};

/// Picks the calls (by path) a limit lets through untouched.
type Exempt = fn(&str) -> bool;

/// Whether a call is a health probe (`Health/Check`), which load shedding and rate limits never
/// refuse: probes must keep answering while the server is busy, or orchestrators restart a busy pod.
/// `Health/Watch` is a stream that stays open, so it counts like any other call.
fn is_health_check(path: &str) -> bool {
    path == "/grpc.health.v1.Health/Check"
}

/// A configured duration where `0s` means "none".
fn non_zero(duration: Duration) -> Option<Duration> {
    (!duration.is_zero()).then_some(duration)
}

/// Every call's path through the server, outermost first: the observing layer (log line, metrics,
/// span) sees the final status of everything below it; the drain can end any call; load shedding
/// refuses before any work; the deadline bounds authentication and the handler alike; the rate
/// limit keys on the authenticated caller; panics become INTERNAL; and the framework's own statuses
/// get their details before anyone logs them.
pub type CallStack = Observe<
    Drain<
        InFlightLimit<DeadlineService<Authenticate<RateLimit<PanicGuard<ErrorDetails<Routes>>>>>>,
    >,
>;

/// At the end of the drain timeout, how long calls ended with UNAVAILABLE get to send it before
/// their connections are dropped.
const CUT_GRACE: Duration = Duration::from_secs(1);

/// How long closing a dependency may take. A statement of a cut call may still be running on a
/// database connection; the pool is then left to the process's exit, which closes it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the metrics endpoint may take to finish its last scrapes.
const METRICS_STOP_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The service's own start-up failed (its store, say).
    #[error(transparent)]
    Service(Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("the shutdown did not go cleanly: {0}")]
    Shutdown(String),
    #[error("cannot set up the metrics: {0}")]
    Metrics(#[from] MetricsError),
}

/// The complete server, ready to serve on any connection source; made by [`Server::builder`].
pub struct Server {
    calls: CallStack,
    readiness: Vec<Readiness>,
    health: HealthReporter,
    watch: WatchSettings,
    tls: Option<Arc<ServerTls>>,
    tls_reload_interval: Duration,
    connections: Arc<ConnectionOptions>,
    metrics: Option<Arc<Metrics>>,
    drain: DrainLayer,
    in_flight: InFlightLimitLayer,
    settings: PlatformSettings,
}

impl Server {
    /// The metrics registry, when metrics are on; `run` serves it on `server.metrics_addr`.
    pub fn metrics(&self) -> Option<Arc<Metrics>> {
        self.metrics.clone()
    }

    /// The TLS configuration in service, when TLS is on; `reload` on it does what the reload timer
    /// and SIGHUP do.
    pub fn tls(&self) -> Option<Arc<ServerTls>> {
        self.tls.clone()
    }

    /// Serves connections from `incoming` until `shutdown` completes, then drains as
    /// [`serve_until`](Self::serve_until) does (with no second signal to cut it short).
    pub async fn serve_with_incoming<I, IO, IE>(
        self,
        incoming: I,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError>
    where
        I: Stream<Item = Result<IO, IE>>,
        IO: Socket,
        IE: std::fmt::Display,
    {
        self.serve_until(incoming, futures::stream::once(shutdown))
            .await
    }

    /// Serves connections from `incoming` until the first item of `shutdown_requests`, then drains:
    /// 1. every health status turns NOT_SERVING (open `Watch` streams are told);
    /// 2. for `shutdown.drain_delay` the server still accepts and serves, while load balancers take
    ///    it out;
    /// 3. it stops accepting, sends GOAWAY, and lets calls finish for up to `shutdown.drain_timeout`;
    /// 4. calls still running then end with UNAVAILABLE (handlers cancelled, transactions rolled
    ///    back), connections close, the pool closes and the background tasks stop.
    ///
    /// A second item skips what is left of steps 2 and 3. Each step is logged with its duration.
    pub async fn serve_until<I, IO, IE>(
        self,
        incoming: I,
        shutdown_requests: impl Stream<Item = ()>,
    ) -> Result<(), ServerError>
    where
        I: Stream<Item = Result<IO, IE>>,
        IO: Socket,
        IE: std::fmt::Display,
    {
        let background = CancellationToken::new();
        // However serving ends, the background tasks end with it.
        let _stop_background_on_exit = background.clone().drop_guard();
        // Certificate reloads first: SIGHUP is handled from here on, before anything reports SERVING.
        tokio::spawn(crate::tls::watch(
            self.tls.clone(),
            self.tls_reload_interval,
            background.child_token(),
        ));
        let stop_health_watch = background.child_token();
        let watchers: Vec<_> = self
            .readiness
            .iter()
            .map(|readiness| {
                tokio::spawn(health::watch(
                    readiness.clone(),
                    self.health.clone(),
                    self.watch.clone(),
                    stop_health_watch.clone(),
                ))
            })
            .collect();

        let connections = TaskTracker::new();
        let stop = Stop::default();
        // Boxed so that it can be dropped, closing the listener, once accepting stops.
        let mut incoming = Box::pin(incoming);
        let mut requests = pin!(shutdown_requests);
        self.accept_until(
            &mut incoming,
            pin!(next_request(&mut requests)),
            &connections,
            &stop,
        )
        .await;

        // 1. Stop the watch first so that it cannot report SERVING again, then tell everyone.
        let drain_started = Instant::now();
        stop_health_watch.cancel();
        let mut failure = None;
        for watcher in watchers {
            if let Err(err) = watcher.await {
                tracing::error!(error = %err, "health watch task failed");
                failure = Some(format!("the health watch task failed: {err}"));
            }
        }
        health::draining(&self.health, &self.readiness).await;
        tracing::info!(
            step = "not_serving",
            duration_ms = millis_since(drain_started),
            in_flight = self.in_flight.in_flight(),
            connections = connections.len(),
            drain_delay = ?self.settings.shutdown.drain_delay,
            "drain: health reports NOT_SERVING; still serving for the drain delay"
        );

        // 2. Keep serving while load balancers catch up.
        let step = Instant::now();
        let mut fast = {
            let mut delay_over = pin!(async {
                tokio::select! {
                    () = tokio::time::sleep(self.settings.shutdown.drain_delay) => false,
                    () = next_request(&mut requests) => true,
                }
            });
            match self
                .accept_until(&mut incoming, delay_over.as_mut(), &connections, &stop)
                .await
            {
                Some(fast) => fast,
                None => delay_over.await,
            }
        };
        drop(incoming); // The listener closes: new connections are refused from here on.
        stop.go_away.cancel();
        self.drain.end_watches();
        connections.close();
        tracing::info!(
            step = "drain_delay",
            duration_ms = millis_since(step),
            fast,
            in_flight = self.in_flight.in_flight(),
            connections = connections.len(),
            drain_timeout = ?self.settings.shutdown.drain_timeout,
            "drain: stopped accepting and sent GOAWAY; calls in progress may finish"
        );

        // 3. Let the calls in progress finish, within the timeout.
        let step = Instant::now();
        let finished = !fast
            && tokio::select! {
                () = connections.wait() => true,
                // The cut's grace comes out of the timeout, so that the whole step keeps to it.
                () = tokio::time::sleep(self.settings.shutdown.drain_timeout.saturating_sub(CUT_GRACE)) => false,
                () = next_request(&mut requests) => {
                    fast = true;
                    false
                }
            };
        if finished {
            tracing::info!(
                step = "drain",
                duration_ms = millis_since(step),
                "drain: every call finished"
            );
        } else {
            // 4. End what is left.
            tracing::warn!(
                step = "drain",
                duration_ms = millis_since(step),
                fast,
                in_flight = self.in_flight.in_flight(),
                connections = connections.len(),
                "drain: ending the calls still in progress with UNAVAILABLE"
            );
            let step = Instant::now();
            self.drain.cut();
            if tokio::time::timeout(CUT_GRACE, connections.wait())
                .await
                .is_err()
            {
                stop.abort.cancel();
                connections.wait().await;
            }
            tracing::warn!(
                step = "cancel",
                duration_ms = millis_since(step),
                calls_ended = self.drain.calls_cut(),
                "drain: calls in progress ended; their transactions never commit"
            );
        }

        let step = Instant::now();
        for readiness in &self.readiness {
            let dependency = &readiness.dependency;
            if tokio::time::timeout(CLOSE_TIMEOUT, dependency.close())
                .await
                .is_err()
            {
                tracing::warn!(timeout = ?CLOSE_TIMEOUT, "{} not closed in time", dependency.name());
            }
        }
        tracing::info!(
            step = "close_pool",
            duration_ms = millis_since(step),
            "drain: dependencies closed"
        );
        background.cancel();
        tracing::info!(duration_ms = millis_since(drain_started), "server stopped");
        match failure {
            None => Ok(()),
            Some(failure) => Err(ServerError::Shutdown(failure)),
        }
    }

    /// Accepts connections from `incoming` until `until` completes (its output) or `incoming` ends
    /// (`None`).
    async fn accept_until<I, IO, IE, T>(
        &self,
        incoming: &mut Pin<Box<I>>,
        mut until: Pin<&mut impl Future<Output = T>>,
        connections: &TaskTracker,
        stop: &Stop,
    ) -> Option<T>
    where
        I: Stream<Item = Result<IO, IE>>,
        IO: Socket,
        IE: std::fmt::Display,
    {
        loop {
            let accepted = tokio::select! {
                output = until.as_mut() => return Some(output),
                accepted = incoming.next() => accepted,
            };
            match accepted {
                Some(Ok(io)) => {
                    connections.spawn(connection::serve(
                        io,
                        self.tls.clone(),
                        self.calls.clone(),
                        Arc::clone(&self.connections),
                        stop.clone(),
                    ));
                }
                Some(Err(err)) => {
                    // Usually out of file descriptors: pause rather than spin, then accept again.
                    tracing::warn!(error = %err, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                None => return None,
            }
        }
    }
}

/// Completes on the next shutdown request; never, once there can be none.
async fn next_request(requests: &mut Pin<&mut impl Stream<Item = ()>>) {
    if requests.next().await.is_none() {
        std::future::pending::<()>().await;
    }
}

fn millis_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Server {
    /// The `serve` command: listens on `server.grpc_addr`, and serves metrics on
    /// `server.metrics_addr`, until SIGINT or SIGTERM.
    pub async fn run(self) -> Result<(), ServerError> {
        run(self).await
    }
}

async fn run(server: Server) -> Result<(), ServerError> {
    let settings = server.settings.clone();
    let (listener, local_addr) = bind(settings.server.grpc_addr).await?;
    for warning in exposure_warnings(&settings, local_addr) {
        tracing::warn!(addr = %local_addr, "{warning}");
    }
    let stop_metrics = CancellationToken::new();
    let metrics_endpoint = match (settings.server.metrics_addr, server.metrics()) {
        (Some(addr), Some(metrics)) => {
            let (metrics_listener, metrics_addr) = bind(addr).await?;
            tracing::info!(addr = %metrics_addr, "serving metrics at /metrics");
            Some(tokio::spawn(metrics_endpoint::serve(
                metrics_listener,
                metrics,
                stop_metrics.clone(),
            )))
        }
        _ => None,
    };
    tracing::info!(addr = %local_addr, tls = server.tls.is_some(), "serving gRPC");
    let mut served = server
        .serve_until(incoming(listener), crate::shutdown::requests())
        .await;
    // Scrapes go on while the calls drain, so the last of them are counted; then the endpoint stops.
    stop_metrics.cancel();
    if let Some(mut endpoint) = metrics_endpoint {
        let step = Instant::now();
        match tokio::time::timeout(METRICS_STOP_TIMEOUT, &mut endpoint).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::error!(error = %err, "metrics endpoint task failed");
                served = served.and(Err(ServerError::Shutdown(format!(
                    "the metrics endpoint task failed: {err}"
                ))));
            }
            // A scraper that stopped reading must not hold the exit.
            Err(_) => endpoint.abort(),
        }
        tracing::info!(
            step = "stop_metrics",
            duration_ms = millis_since(step),
            "drain: metrics endpoint stopped"
        );
    }
    served
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServerError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;
    Ok((listener, local_addr))
}

/// The connections `listener` accepts, with TCP_NODELAY set: gRPC messages are small and
/// latency-bound, so they are never held back to be coalesced.
pub fn incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(error = %err, "cannot set TCP_NODELAY");
            }
        })
    })
}

/// One warning per risk that the configuration leaves open, logged at start-up.
fn exposure_warnings(settings: &PlatformSettings, addr: SocketAddr) -> Vec<&'static str> {
    let mut warnings = Vec::new();
    if settings.tls.cert_file.is_none() {
        warnings.push(
            "TLS is off (tls.cert_file is not set): calls, tokens and data cross the network in \
             plaintext; use it only for local development or behind a mesh that encrypts",
        );
    }
    if settings.auth.mode == AuthMode::None && !addr.ip().is_loopback() {
        warnings.push(
            "authentication is off (auth.mode = \"none\") on a non-loopback address: anyone who \
             can reach the port can call every method",
        );
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nodelay_set() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut accepted = Box::pin(incoming(listener));
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let stream = accepted
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        assert!(stream.nodelay().expect("socket option"));
    }

    #[test]
    fn start_up_warns_about_plaintext_and_about_no_auth_beyond_loopback() {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 50051));
        let everywhere = SocketAddr::from(([0, 0, 0, 0], 50051));
        let mut settings = PlatformSettings::default();
        assert_eq!(exposure_warnings(&settings, loopback).len(), 1);
        assert_eq!(exposure_warnings(&settings, everywhere).len(), 2);
        settings.tls.cert_file = Some("tls.crt".into());
        settings.tls.key_file = Some("tls.key".into());
        assert!(exposure_warnings(&settings, loopback).is_empty());
        let warnings = exposure_warnings(&settings, everywhere);
        assert!(warnings[0].contains("auth.mode"), "{warnings:?}");
        settings.auth.mode = AuthMode::Jwt;
        assert!(exposure_warnings(&settings, everywhere).is_empty());
    }
}
