//! Load shedding: at most `server.max_in_flight` calls run server-wide; one more is refused at once
//! with RESOURCE_EXHAUSTED (clients retry it elsewhere) instead of waiting in a queue without bound.
//!
//! Written by hand because tower's `ConcurrencyLimit` releases its permit when the response headers
//! are ready, so a stream would stop counting while it is still sending, and it queues rather than
//! refuses. Here the permit lives in the response body until the stream's last message.
//! Health checks (`Health/Check`) are never refused: probes must keep answering while the server is
//! busy.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{Either, Ready, ready};
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Code;
use tower::{Layer, Service};

use super::{Exempt, body::GuardedBody};
use crate::status::{self, Reason};

#[derive(Debug, Clone)]
pub struct InFlightLimitLayer {
    permits: Arc<Semaphore>,
    max: usize,
    exempt: Exempt,
}

impl InFlightLimitLayer {
    pub fn new(max_in_flight: usize) -> Self {
        let max = max_in_flight.min(Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            exempt: |_| false,
        }
    }

    /// Calls to the paths `exempt` picks are never refused, and not counted.
    pub fn exempt(mut self, exempt: Exempt) -> Self {
        self.exempt = exempt;
        self
    }

    /// Calls in progress now (health checks aside), for the drain's log lines.
    pub fn in_flight(&self) -> usize {
        self.max.saturating_sub(self.permits.available_permits())
    }
}

impl<S> Layer<S> for InFlightLimitLayer {
    type Service = InFlightLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlightLimit {
            inner,
            permits: Arc::clone(&self.permits),
            exempt: self.exempt,
        }
    }
}

#[derive(Debug, Clone)]
pub struct InFlightLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
    exempt: Exempt,
}

type Response<B> = http::Response<GuardedBody<B, OwnedSemaphorePermit>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for InFlightLimit<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Either<ResponseFuture<S::Future>, Ready<Result<Self::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let permit = if (self.exempt)(request.uri().path()) {
            None
        } else {
            match Arc::clone(&self.permits).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    let refusal = status::error(
                        Code::ResourceExhausted,
                        Reason::OVERLOADED,
                        "the server is at its limit of calls in progress; retry later",
                    );
                    return Either::Right(ready(Ok(refusal.into_http())));
                }
            }
        };
        Either::Left(ResponseFuture {
            inner: self.inner.call(request),
            permit,
        })
    }
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        permit: Option<OwnedSemaphorePermit>,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx))?;
        let permit = this.permit.take();
        Poll::Ready(Ok(GuardedBody::guard(response, permit)))
    }
}
