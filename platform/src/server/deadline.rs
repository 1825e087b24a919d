//! Deadlines: each call gets the shorter of the client's `grpc-timeout` and the server's own limit
//! for the method (method > service > default), and ends with DEADLINE_EXCEEDED when it passes,
//! streams included: the response future and the response body are both bounded, so a handler is
//! dropped mid-way (its query cancelled, its transaction rolled back) and a stream ends mid-way.
//!
//! Written by hand because tonic's own timeout answers CANCELLED ("Timeout expired") and stops
//! bounding a call once its response headers are sent.

use std::{
    collections::HashMap,
    convert::Infallible,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::{
    sync::oneshot,
    time::{Instant, Sleep},
};
use tonic::{Code, Status};
use tower::{Layer, Service};

use super::{
    body::{ends_call, status_trailers},
    non_zero,
};
use crate::methods::{Method, MethodKind};
use crate::{
    config::TimeoutSettings,
    status::{self, Reason},
};

/// When the current call must be finished. Handlers read it from the request's extensions to see how
/// much time they have left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(Instant);

impl Deadline {
    pub fn instant(self) -> Instant {
        self.0
    }

    /// Time left; zero once the deadline has passed.
    pub fn remaining(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }
}

/// The server's limit per method path, resolved once from the configuration.
#[derive(Debug, Clone)]
pub struct TimeoutTable {
    by_path: HashMap<String, Limit>,
    default: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limit {
    timeout: Option<Duration>,
    /// The response is a stream, which may outlive its handler and needs a watchdog.
    streams: bool,
}

impl TimeoutTable {
    /// Resolves `settings` for every served method; a service or method name that the server does not
    /// serve is an error, so that a typo cannot silently leave a method without its limit.
    pub fn new(settings: &TimeoutSettings, methods: &[Method]) -> Result<Self, String> {
        for service in settings.services.keys() {
            if !methods.iter().any(|method| &method.service == service) {
                return Err(format!(
                    "server.timeouts.services: no service {service:?} is served"
                ));
            }
        }
        for name in settings.methods.keys() {
            if !methods.iter().any(|method| &method.full_name() == name) {
                return Err(format!(
                    "server.timeouts.methods: no method {name:?} is served \
                     (write \"package.Service/Method\")"
                ));
            }
        }
        let by_path = methods
            .iter()
            .map(|method| {
                let configured = settings
                    .methods
                    .get(&method.full_name())
                    .or_else(|| settings.services.get(&method.service))
                    .copied()
                    .unwrap_or(settings.default);
                let streams = matches!(
                    method.kind,
                    MethodKind::ServerStream | MethodKind::BidiStream
                );
                let limit = Limit {
                    timeout: non_zero(configured),
                    streams,
                };
                (method.path(), limit)
            })
            .collect();
        Ok(Self {
            by_path,
            default: non_zero(settings.default),
        })
    }

    fn for_path(&self, path: &str) -> Limit {
        self.by_path.get(path).copied().unwrap_or(Limit {
            timeout: self.default,
            streams: false,
        })
    }
}

#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    table: std::sync::Arc<TimeoutTable>,
}

impl DeadlineLayer {
    pub fn new(table: TimeoutTable) -> Self {
        Self {
            table: std::sync::Arc::new(table),
        }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService {
            inner,
            table: std::sync::Arc::clone(&self.table),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DeadlineService<S> {
    inner: S,
    table: std::sync::Arc<TimeoutTable>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for DeadlineService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Send + 'static,
{
    type Response = http::Response<DeadlineBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let Limit {
            timeout: server_limit,
            streams,
        } = self.table.for_path(request.uri().path());
        let client_limit = request
            .headers()
            .get("grpc-timeout")
            .and_then(|value| parse_grpc_timeout(value.as_bytes()));
        let timeout = match (server_limit, client_limit) {
            (Some(server), Some(client)) => Some(server.min(client)),
            (limit, None) | (None, limit) => limit,
        };
        let deadline = timeout.map(|timeout| Instant::now() + timeout);
        if let Some(deadline) = deadline {
            request.extensions_mut().insert(Deadline(deadline));
        }
        ResponseFuture {
            inner: self.inner.call(request),
            sleep: deadline.map(|deadline| Box::pin(tokio::time::sleep_until(deadline))),
            watch_stream: streams,
        }
    }
}

fn deadline_exceeded() -> Status {
    status::error(
        Code::DeadlineExceeded,
        Reason::DEADLINE_EXCEEDED,
        "deadline exceeded",
    )
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        sleep: Option<Pin<Box<Sleep>>>,
        watch_stream: bool,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
    ResBody: Send + 'static,
{
    type Output = Result<http::Response<DeadlineBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(response) = this.inner.poll(cx) {
            let sleep = this.sleep.take();
            let watch_stream = *this.watch_stream;
            return Poll::Ready(response.map(|response| {
                response.map(|body| DeadlineBody::new(body, sleep, watch_stream))
            }));
        }
        if let Some(sleep) = this.sleep
            && sleep.as_mut().poll(cx).is_ready()
        {
            // Returning drops the handler's future, and with it its query and transaction.
            let (parts, ()) = deadline_exceeded().into_http::<()>().into_parts();
            return Poll::Ready(Ok(http::Response::from_parts(
                parts,
                DeadlineBody::default(),
            )));
        }
        Poll::Pending
    }
}

/// A response body that ends with DEADLINE_EXCEEDED trailers when the deadline passes before its
/// own end, dropping the rest of the stream (and the handler work behind it).
pub struct DeadlineBody<B> {
    inner: Inner<B>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Dropped with the body, which stops the watchdog.
    _watchdog: Option<oneshot::Sender<Infallible>>,
}

enum Inner<B> {
    Owned(Option<B>),
    /// Shared with a watchdog task. hyper stops polling a body while the client gives the stream no
    /// flow-control window, so a stalled stream would never see its deadline here; the watchdog
    /// drops the handler's stream (its rows, its database connection) at the deadline regardless.
    Watched(Arc<Mutex<Option<B>>>),
}

impl<B> Default for DeadlineBody<B> {
    fn default() -> Self {
        Self {
            inner: Inner::Owned(None),
            sleep: None,
            _watchdog: None,
        }
    }
}

impl<B: Send + 'static> DeadlineBody<B> {
    fn new(body: B, sleep: Option<Pin<Box<Sleep>>>, watch_stream: bool) -> Self {
        let deadline = sleep.as_ref().map(|sleep| sleep.deadline());
        let Some(deadline) = deadline.filter(|_| watch_stream) else {
            return Self {
                inner: Inner::Owned(Some(body)),
                sleep,
                _watchdog: None,
            };
        };
        let slot = Arc::new(Mutex::new(Some(body)));
        let watched = Arc::downgrade(&slot);
        let (stop, stopped) = oneshot::channel::<Infallible>();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    if let Some(slot) = watched.upgrade() {
                        let body = lock(&slot).take();
                        drop(body);
                    }
                }
                _ = stopped => {}
            }
        });
        Self {
            inner: Inner::Watched(slot),
            sleep,
            _watchdog: Some(stop),
        }
    }
}

fn lock<B>(slot: &Mutex<Option<B>>) -> MutexGuard<'_, Option<B>> {
    // A panic while polling is caught further in (the panic guard); the slot itself stays whole.
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<B: Body + Unpin> Body for DeadlineBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        // The deadline is checked before each message, so a stream that is ready to send still stops.
        if let Some(sleep) = this.sleep.as_mut()
            && sleep.as_mut().poll(cx).is_ready()
        {
            this.sleep = None;
            this.inner = Inner::Owned(None);
            return Poll::Ready(Some(Ok(Frame::trailers(status_trailers(
                &deadline_exceeded(),
            )))));
        }
        let frame = match &mut this.inner {
            Inner::Owned(Some(body)) => Pin::new(body).poll_frame(cx),
            Inner::Owned(None) => return Poll::Ready(None),
            Inner::Watched(slot) => {
                let mut slot = lock(slot);
                let Some(body) = slot.as_mut() else {
                    // Only the watchdog empties the slot, at the deadline.
                    drop(slot);
                    this.sleep = None;
                    this.inner = Inner::Owned(None);
                    return Poll::Ready(Some(Ok(Frame::trailers(status_trailers(
                        &deadline_exceeded(),
                    )))));
                };
                Pin::new(body).poll_frame(cx)
            }
        };
        if ends_call(&frame) {
            // The call has its status: nothing is left to bound.
            this.sleep = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Owned(body) => body.as_ref().is_none_or(Body::is_end_stream),
            Inner::Watched(slot) => lock(slot).as_ref().is_some_and(Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Owned(Some(body)) => body.size_hint(),
            Inner::Owned(None) => SizeHint::with_exact(0),
            Inner::Watched(slot) => lock(slot)
                .as_ref()
                .map_or_else(SizeHint::default, Body::size_hint),
        }
    }
}

/// Parses a `grpc-timeout` header: at most 8 digits and a unit (H, M, S, m, u, n), as the gRPC
/// HTTP/2 protocol defines it; anything else is ignored, as if no timeout was sent.
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::served_methods;

    const ECHO: &str = "platform.testing.v1.EchoService";

    /// The defaults, plus the deadlines a service would give its own methods.
    fn timeouts() -> TimeoutSettings {
        let mut settings = TimeoutSettings::default();
        settings
            .services
            .insert(ECHO.to_owned(), Duration::from_secs(10));
        settings
            .methods
            .insert(format!("{ECHO}/Repeat"), Duration::from_secs(60));
        settings
    }

    #[test]
    fn grpc_timeout_headers_parse_as_the_protocol_defines() {
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_grpc_timeout(b"250m"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            parse_grpc_timeout(b"99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout(b"7n"), Some(Duration::from_nanos(7)));
        for bad in [
            &b""[..],
            b"S",
            b"123456789S",
            b"12x",
            b"-1S",
            b"1.5S",
            b"\xff",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_most_specific_timeout_wins_and_zero_means_none() {
        let table =
            TimeoutTable::new(&timeouts(), &served_methods()).expect("they name served methods");
        let path = |method: &str| format!("/{ECHO}/{method}");
        let timeout = |path: &str| table.for_path(path).timeout;
        assert_eq!(timeout(&path("Repeat")), Some(Duration::from_secs(60)));
        assert_eq!(timeout(&path("Say")), Some(Duration::from_secs(10)));
        assert_eq!(
            timeout("/grpc.health.v1.Health/Check"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(timeout("/grpc.health.v1.Health/Watch"), None);
        assert_eq!(
            timeout("/no.such.Service/Call"),
            Some(Duration::from_secs(30))
        );
        assert!(table.for_path(&path("Repeat")).streams);
        assert!(table.for_path(&path("Chat")).streams);
        assert!(!table.for_path(&path("Collect")).streams);
    }

    #[test]
    fn unknown_names_in_the_table_are_refused() {
        let mut settings = TimeoutSettings::default();
        settings
            .services
            .insert(format!("{ECHO}Typo"), Duration::from_secs(1));
        let err = TimeoutTable::new(&settings, &served_methods()).expect_err("typo");
        assert!(err.contains("Typo"), "{err}");

        let mut settings = TimeoutSettings::default();
        settings
            .methods
            .insert(format!("{ECHO}/Says"), Duration::from_secs(1));
        let err = TimeoutTable::new(&settings, &served_methods()).expect_err("typo");
        assert!(err.contains("Says"), "{err}");
    }

    #[tokio::test]
    async fn handlers_read_their_deadline_from_the_request() {
        use std::sync::{Arc, Mutex};

        use tower::ServiceExt;

        let table =
            TimeoutTable::new(&timeouts(), &served_methods()).expect("they name served methods");
        let seen = Arc::new(Mutex::new(None));
        let handler = {
            let seen = Arc::clone(&seen);
            tower::service_fn(move |request: http::Request<()>| {
                let deadline = request.extensions().get::<Deadline>().copied();
                *seen.lock().expect("lock") = deadline.map(Deadline::remaining);
                std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(())))
            })
        };
        let service = DeadlineLayer::new(table).layer(handler);
        // The client allows 2 s; the server's own limit for an unknown path is the 30 s default.
        let request = http::Request::post("/no.such.Service/Call")
            .header("grpc-timeout", "2S")
            .body(())
            .expect("request");
        service.oneshot(request).await.expect("response");
        let remaining = seen.lock().expect("lock").expect("a deadline");
        assert!(remaining <= Duration::from_secs(2), "{remaining:?}");
        assert!(remaining > Duration::ZERO, "{remaining:?}");
    }
}
