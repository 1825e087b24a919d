//! Deadlines: each call gets the shorter of the client's `grpc-timeout` and the server's own limit
//! for the method (method > service > default), and ends with DEADLINE_EXCEEDED when it passes,
//! streams included: the response future and the response body are both bounded, so a handler is
//! dropped mid-way (its query cancelled, its transaction rolled back) and a stream ends mid-way.
//!
//! Written by hand because tonic's own timeout answers CANCELLED ("Timeout expired") and stops
//! bounding a call once its response headers are sent.

use std::{
    collections::HashMap,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tonic::{Code, Status};
use tower::{Layer, Service};

use super::body::status_trailers;
use crate::{
    api::Method,
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
    by_path: HashMap<String, Option<Duration>>,
    default: Option<Duration>,
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
        let limit = |duration: Duration| (!duration.is_zero()).then_some(duration);
        let by_path = methods
            .iter()
            .map(|method| {
                let configured = settings
                    .methods
                    .get(&method.full_name())
                    .or_else(|| settings.services.get(&method.service))
                    .copied()
                    .unwrap_or(settings.default);
                (method.path(), limit(configured))
            })
            .collect();
        Ok(Self {
            by_path,
            default: limit(settings.default),
        })
    }

    fn for_path(&self, path: &str) -> Option<Duration> {
        self.by_path.get(path).copied().unwrap_or(self.default)
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
{
    type Response = http::Response<DeadlineBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let server_limit = self.table.for_path(request.uri().path());
        let client_limit = request
            .headers()
            .get("grpc-timeout")
            .and_then(|value| parse_grpc_timeout(value.as_bytes()));
        let timeout = match (server_limit, client_limit) {
            (Some(server), Some(client)) => Some(server.min(client)),
            (limit, None) | (None, limit) => limit,
        };
        let sleep = timeout.map(|timeout| {
            let deadline = Instant::now() + timeout;
            request.extensions_mut().insert(Deadline(deadline));
            Box::pin(tokio::time::sleep_until(deadline))
        });
        ResponseFuture {
            inner: self.inner.call(request),
            sleep,
        }
    }
}

fn deadline_exceeded() -> Status {
    status::error(
        Code::DeadlineExceeded,
        Reason::DeadlineExceeded,
        "deadline exceeded",
    )
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        sleep: Option<Pin<Box<Sleep>>>,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<DeadlineBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(response) = this.inner.poll(cx) {
            let sleep = this.sleep.take();
            return Poll::Ready(response.map(|response| {
                response.map(|body| DeadlineBody {
                    inner: Some(body),
                    sleep,
                })
            }));
        }
        if let Some(sleep) = this.sleep
            && sleep.as_mut().poll(cx).is_ready()
        {
            // Returning drops the handler's future, and with it its query and transaction.
            return Poll::Ready(Ok(deadline_exceeded().into_http::<()>().map(|()| {
                DeadlineBody {
                    inner: None,
                    sleep: None,
                }
            })));
        }
        Poll::Pending
    }
}

pin_project! {
    /// A response body that ends with DEADLINE_EXCEEDED trailers when the deadline passes before its
    /// own end, dropping the rest of the stream (and the handler work behind it).
    pub struct DeadlineBody<B> {
        #[pin]
        inner: Option<B>,
        sleep: Option<Pin<Box<Sleep>>>,
    }
}

impl<B> Default for DeadlineBody<B> {
    fn default() -> Self {
        Self {
            inner: None,
            sleep: None,
        }
    }
}

impl<B: Body> Body for DeadlineBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        // The deadline is checked before each message, so a stream that is ready to send still stops.
        if let Some(sleep) = this.sleep.as_mut()
            && sleep.as_mut().poll(cx).is_ready()
        {
            *this.sleep = None;
            this.inner.set(None);
            return Poll::Ready(Some(Ok(Frame::trailers(status_trailers(
                &deadline_exceeded(),
            )))));
        }
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        let frame = inner.poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = &frame {
            *this.sleep = None;
        } else if let Poll::Ready(Some(Ok(frame))) = &frame
            && frame.is_trailers()
        {
            // The call has its status: nothing is left to bound.
            *this.sleep = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
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
    use crate::api::served_methods;

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
        let service = crate::health::ORDER_SERVICE_NAME;
        let table = TimeoutTable::new(&TimeoutSettings::default(), &served_methods())
            .expect("defaults name served methods");
        let path = |method: &str| format!("/{service}/{method}");
        assert_eq!(
            table.for_path(&path("SearchOrders")),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            table.for_path(&path("GetOrder")),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            table.for_path("/grpc.health.v1.Health/Check"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(table.for_path("/grpc.health.v1.Health/Watch"), None);
        assert_eq!(
            table.for_path("/no.such.Service/Call"),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn unknown_names_in_the_table_are_refused() {
        let mut settings = TimeoutSettings::default();
        settings.services.insert(
            format!("{}Typo", crate::health::ORDER_SERVICE_NAME),
            Duration::from_secs(1),
        );
        let err = TimeoutTable::new(&settings, &served_methods()).expect_err("typo");
        assert!(err.contains("Typo"), "{err}");

        let mut settings = TimeoutSettings::default();
        settings.methods.insert(
            format!("{}/GetOrders", crate::health::ORDER_SERVICE_NAME),
            Duration::from_secs(1),
        );
        let err = TimeoutTable::new(&settings, &served_methods()).expect_err("typo");
        assert!(err.contains("GetOrders"), "{err}");
    }

    #[tokio::test]
    async fn handlers_read_their_deadline_from_the_request() {
        use std::sync::{Arc, Mutex};

        use tower::ServiceExt;

        let table = TimeoutTable::new(&TimeoutSettings::default(), &served_methods())
            .expect("defaults name served methods");
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
