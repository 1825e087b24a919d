//! A panic in a handler, or in a response stream after the handler returned, becomes INTERNAL for that
//! one call; the connection and every other call go on. The panic's message and location are logged
//! by the panic hook that `telemetry::init` installs; the client sees only "internal error".
//!
//! Written by hand because tower-http's `CatchPanicLayer` catches panics in the response future only,
//! and a panicking stream would otherwise end the call with no status at all. The service also
//! guards its own response streams (`service::guarded`), so that the messages a stream produced
//! before panicking are still sent; this layer is the backstop for every other body.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    pin::Pin,
    task::{Context, Poll},
};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::body::status_trailers;
use crate::status;

#[derive(Debug, Clone, Copy, Default)]
pub struct PanicGuardLayer;

impl<S> Layer<S> for PanicGuardLayer {
    type Service = PanicGuard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PanicGuard { inner }
    }
}

#[derive(Debug, Clone)]
pub struct PanicGuard<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for PanicGuard<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<GuardedStream<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(request),
        }
    }
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<GuardedStream<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(response)) => Poll::Ready(
                response.map(|response| response.map(|body| GuardedStream { inner: Some(body) })),
            ),
            Err(_panic) => {
                let (parts, ()) = status::panicked().into_http::<()>().into_parts();
                Poll::Ready(Ok(http::Response::from_parts(
                    parts,
                    GuardedStream::default(),
                )))
            }
        }
    }
}

pin_project! {
    /// A response body that turns a panic while producing a message into INTERNAL trailers.
    pub struct GuardedStream<B> {
        #[pin]
        inner: Option<B>,
    }
}

impl<B> Default for GuardedStream<B> {
    fn default() -> Self {
        Self { inner: None }
    }
}

impl<B: Body> Body for GuardedStream<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        match catch_unwind(AssertUnwindSafe(|| inner.poll_frame(cx))) {
            Ok(frame) => frame,
            Err(_panic) => {
                // The stream is unusable after a panic: drop it, then end the call.
                let status = status::panicked();
                this.inner.set(None);
                Poll::Ready(Some(Ok(Frame::trailers(status_trailers(&status)))))
            }
        }
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
