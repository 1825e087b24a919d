//! One client connection, from accept to close: the TLS handshake (bounded, in the connection's own
//! task, never in the accept loop), the HTTP/2 preface deadline, HTTP/2 limits and keepalive, and the
//! connection's end: GOAWAY when it has been idle for `server.max_connection_idle`, when it reaches
//! `server.max_connection_age` (then closed after the grace period), or when the server stops.
//!
//! Served with hyper directly rather than tonic's `Server`, which has no idle limit, no preface
//! deadline and no handshake logging, and whose built-in timeout answers CANCELLED instead of
//! DEADLINE_EXCEEDED. tonic still routes and encodes every call (`tonic::service::Routes`).

use std::{
    convert::Infallible,
    hash::{BuildHasher, RandomState},
    net::SocketAddr,
    pin::{Pin, pin},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::{body::Incoming, server::conn::http2};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use pin_project_lite::pin_project;
use tokio::{
    io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf},
    net::TcpStream,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tower::Service;

use super::{body::GuardedBody, non_zero};
use crate::config::ServerSettings;
use crate::tls::{ClientIdentity, ServerTls};

/// The 24 bytes every HTTP/2 connection starts with.
const PREFACE_LEN: usize = 24;

/// A byte stream a client connected with.
pub trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The client's address, when the transport has one.
    fn peer_addr(&self) -> Option<SocketAddr>;
}

impl Socket for TcpStream {
    fn peer_addr(&self) -> Option<SocketAddr> {
        TcpStream::peer_addr(self).ok()
    }
}

/// The in-memory pipes of the test harness.
impl Socket for DuplexStream {
    fn peer_addr(&self) -> Option<SocketAddr> {
        None
    }
}

/// Where a call's connection comes from; every request carries it as an extension, and, under
/// mutual TLS, the verified [`ClientIdentity`] as another.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
}

/// How every connection is served, fixed at start-up.
pub struct ConnectionOptions {
    http2: http2::Builder<TokioExecutor>,
    preface_timeout: Duration,
    handshake_timeout: Duration,
    max_idle: Duration,
    max_age: Duration,
    age_grace: Duration,
}

impl ConnectionOptions {
    pub fn new(server: &ServerSettings, handshake_timeout: Duration) -> Self {
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(server.max_concurrent_streams)
            .keep_alive_interval(non_zero(server.keepalive_interval))
            .keep_alive_timeout(server.keepalive_timeout)
            // Room for the largest message plus its 5-byte gRPC prefix; frames stay at 16 KiB.
            .max_send_buf_size(
                server
                    .max_message_bytes
                    .saturating_add(5)
                    .min(u32::MAX as usize),
            );
        Self {
            http2,
            preface_timeout: server.preface_timeout,
            handshake_timeout,
            max_idle: non_zero(server.max_connection_idle).unwrap_or(Duration::MAX),
            max_age: non_zero(server.max_connection_age).unwrap_or(Duration::MAX),
            age_grace: server.max_connection_age_grace,
        }
    }
}

/// When a connection must end: `go_away` sends GOAWAY and lets its calls finish; `abort` drops it
/// with whatever is still running (the end of a drain that ran out of time).
#[derive(Debug, Clone, Default)]
pub struct Stop {
    pub go_away: CancellationToken,
    pub abort: CancellationToken,
}

/// Serves one connection until it closes or goes away and its calls finish, or is aborted.
pub async fn serve<IO, S, B>(
    io: IO,
    tls: Option<Arc<ServerTls>>,
    service: S,
    options: Arc<ConnectionOptions>,
    stop: Stop,
) where
    IO: Socket,
    S: Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let addr = io.peer_addr();
    let Some(tls) = tls else {
        return serve_http2(io, Peer { addr }, None, service, &options, &stop).await;
    };
    let handshake = tokio::time::timeout(options.handshake_timeout, tls.accept(io));
    // Operators see failed handshakes here, or nowhere: a client refused by mutual TLS never
    // reaches a handler or the access log.
    let (stream, identity) = tokio::select! {
        () = stop.go_away.cancelled() => return,
        result = handshake => match result {
            Ok(Ok(accepted)) => accepted,
            Ok(Err(err)) => {
                tracing::warn!(peer = ?addr, error = %err, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::warn!(peer = ?addr, timeout = ?options.handshake_timeout, "TLS handshake timed out");
                return;
            }
        },
    };
    serve_http2(stream, Peer { addr }, identity, service, &options, &stop).await;
}

async fn serve_http2<IO, S, B>(
    io: IO,
    peer: Peer,
    identity: Option<ClientIdentity>,
    service: S,
    options: &ConnectionOptions,
    stop: &Stop,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let addr = peer.addr;
    let preface_seen = Arc::new(AtomicBool::new(false));
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(PrefaceWatch {
        io,
        read: 0,
        seen: Arc::clone(&preface_seen),
    });
    let service = TowerToHyperService::new(ConnectionService {
        inner: service,
        peer,
        identity,
        activity: Arc::clone(&activity),
    });
    let mut connection = pin!(options.http2.serve_connection(io, service));

    let mut preface_deadline = pin!(tokio::time::sleep(options.preface_timeout));
    let mut idle_check = pin!(tokio::time::sleep(options.max_idle));
    let mut too_old = pin!(tokio::time::sleep(jittered(options.max_age)));
    let mut grace_over = pin!(tokio::time::sleep(Duration::MAX));
    let (mut preface_checked, mut going_away, mut in_grace) = (false, false, false);
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(peer = ?addr, error = %err, "connection ended with an error");
                }
                return;
            }
            () = &mut preface_deadline, if !preface_checked => {
                preface_checked = true;
                if !preface_seen.load(Ordering::Acquire) {
                    tracing::warn!(peer = ?addr, timeout = ?options.preface_timeout,
                        "closing a connection that sent no HTTP/2 preface");
                    return;
                }
            }
            () = &mut idle_check, if !going_away => match activity.idle_for() {
                Some(idle) if idle >= options.max_idle => {
                    tracing::debug!(peer = ?addr, "closing an idle connection");
                    connection.as_mut().graceful_shutdown();
                    going_away = true;
                    // A client that ignores GOAWAY is closed after the same grace as an old one.
                    in_grace = true;
                    grace_over.as_mut().reset(Instant::now() + options.age_grace);
                }
                idle => {
                    let wait = options.max_idle - idle.unwrap_or_default();
                    idle_check.as_mut().reset(Instant::now() + wait);
                }
            },
            () = &mut too_old, if !going_away => {
                // Clients reconnect, possibly to another replica; calls running now get the grace
                // period to finish.
                connection.as_mut().graceful_shutdown();
                going_away = true;
                in_grace = true;
                grace_over.as_mut().reset(Instant::now() + options.age_grace);
            }
            () = &mut grace_over, if in_grace => {
                tracing::debug!(peer = ?addr, "closing a connection past its age and grace");
                return;
            }
            () = stop.go_away.cancelled(), if !going_away => {
                connection.as_mut().graceful_shutdown();
                going_away = true;
            }
            () = stop.abort.cancelled() => {
                tracing::debug!(peer = ?addr, "closing a connection the drain ran out of time for");
                return;
            }
        }
    }
}

/// `age` ± 10 %, so connections opened together (after a deploy) do not all go away together.
fn jittered(age: Duration) -> Duration {
    if age == Duration::MAX {
        return age;
    }
    // Any well-mixed bits do: the standard library's randomly seeded hasher gives them without a
    // random-number crate.
    let random = RandomState::new().hash_one(Instant::now());
    let fraction = 0.9 + (random % 2001) as f64 / 10_000.0;
    age.mul_f64(fraction)
}

pin_project! {
    /// The connection's byte stream, noting when the client has sent the HTTP/2 preface's length.
    struct PrefaceWatch<IO> {
        #[pin]
        io: IO,
        read: usize,
        seen: Arc<AtomicBool>,
    }
}

impl<IO: AsyncRead> AsyncRead for PrefaceWatch<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let result = this.io.poll_read(cx, buf);
        if *this.read < PREFACE_LEN {
            *this.read += buf.filled().len() - before;
            if *this.read >= PREFACE_LEN {
                this.seen.store(true, Ordering::Release);
            }
        }
        result
    }
}

impl<IO: AsyncWrite> AsyncWrite for PrefaceWatch<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

/// Calls in progress on one connection, and since when it has had none.
struct Activity {
    epoch: Instant,
    active: AtomicUsize,
    idle_since_micros: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            active: AtomicUsize::new(0),
            idle_since_micros: AtomicU64::new(0),
        }
    }

    fn start(self: &Arc<Self>) -> ActiveCall {
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveCall(Arc::clone(self))
    }

    /// How long the connection has had no call; `None` while one runs.
    fn idle_for(&self) -> Option<Duration> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_micros(self.idle_since_micros.load(Ordering::Acquire));
        Some(self.epoch.elapsed().saturating_sub(since))
    }
}

/// A call in progress; the connection is idle again when the last one is dropped with its body.
pub struct ActiveCall(Arc<Activity>);

impl Drop for ActiveCall {
    fn drop(&mut self) {
        let activity = &self.0;
        let now = u64::try_from(activity.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        activity.idle_since_micros.store(now, Ordering::Release);
        activity.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The per-connection front of the service: gives every request its `Peer` (and `ClientIdentity`)
/// and counts it as activity until its response body ends.
#[derive(Clone)]
struct ConnectionService<S> {
    inner: S,
    peer: Peer,
    identity: Option<ClientIdentity>,
    activity: Arc<Activity>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for ConnectionService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<GuardedBody<ResBody, ActiveCall>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let call = self.activity.start();
        let extensions = request.extensions_mut();
        if let Some(identity) = &self.identity {
            extensions.insert(identity.clone());
        }
        extensions.insert(self.peer);
        ResponseFuture {
            inner: self.inner.call(request),
            call: Some(call),
        }
    }
}

pin_project! {
    struct ResponseFuture<F> {
        #[pin]
        inner: F,
        call: Option<ActiveCall>,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<GuardedBody<ResBody, ActiveCall>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx))?;
        let call = this.call.take();
        Poll::Ready(Ok(GuardedBody::guard(response, call)))
    }
}
