//! The end of a drain: calls still running when `shutdown.drain_timeout` passes (or when a second
//! signal asks for a fast exit) are ended with UNAVAILABLE, so that their clients retry elsewhere
//! instead of holding the shutdown. A handler still working is dropped, so its transaction never
//! commits (the database rolls it back when its connection is closed or reused); a stream, server or
//! bidirectional, ends with UNAVAILABLE trailers after the last whole message it sent.
//!
//! Written by hand because nothing in tonic or tower ends calls from outside: tonic's shutdown waits
//! for every stream without bound. The hot path pays one `Arc` clone per call; a call registers to
//! be woken only while it waits, and `cut` is a single flag for all of them.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::{Notify, futures::OwnedNotified};
use tonic::{Code, Status};
use tower::{Layer, Service};

use super::body::status_trailers;
use crate::status::{self, Reason};

/// Shared by every call: whether the cut has happened, and how many calls it ended.
#[derive(Debug, Default)]
struct Cut {
    /// Health `Watch` streams end: the server has stopped accepting.
    watches: AtomicBool,
    /// Every call ends.
    done: AtomicBool,
    notify: Arc<Notify>,
    ended: AtomicUsize,
}

/// The layer, and the handle that cuts every call it has let in.
#[derive(Debug, Clone, Default)]
pub struct DrainLayer {
    cut: Arc<Cut>,
}

impl DrainLayer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ends the health `Watch` streams with UNAVAILABLE. They were told NOT_SERVING when the drain
    /// started; left open, a watching client would hold the drain until its timeout.
    pub fn end_watches(&self) {
        self.cut.watches.store(true, Ordering::Release);
        self.cut.notify.notify_waiters();
    }

    /// Ends every call still running with UNAVAILABLE, now and from now on whenever one waits.
    pub fn cut(&self) {
        self.cut.done.store(true, Ordering::Release);
        self.cut.notify.notify_waiters();
    }

    /// How many calls (health watches aside) the cut has ended so far.
    pub fn calls_cut(&self) -> usize {
        self.cut.ended.load(Ordering::Acquire)
    }
}

impl<S> Layer<S> for DrainLayer {
    type Service = Drain<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Drain {
            inner,
            cut: Arc::clone(&self.cut),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Drain<S> {
    inner: S,
    cut: Arc<Cut>,
}

const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

fn shutting_down() -> Status {
    status::error(
        Code::Unavailable,
        Reason::SHUTTING_DOWN,
        "the server is shutting down; retry on another instance",
    )
}

/// Waits for the cut. Registered lazily, on the first poll that finds the call waiting, so a call
/// that completes at once never touches the notifier.
struct Waiter {
    cut: Arc<Cut>,
    is_watch: bool,
    notified: Option<Pin<Box<OwnedNotified>>>,
}

impl Waiter {
    fn new(cut: Arc<Cut>, is_watch: bool) -> Self {
        Self {
            cut,
            is_watch,
            notified: None,
        }
    }

    fn is_cut(&self) -> bool {
        self.cut.done.load(Ordering::Acquire)
            || (self.is_watch && self.cut.watches.load(Ordering::Acquire))
    }

    /// Whether the cut has happened; if not, `cx` is woken when it does.
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.is_cut() {
                return self.end();
            }
            let notified = self.notified.get_or_insert_with(|| {
                let mut notified = Box::pin(Arc::clone(&self.cut.notify).notified_owned());
                notified.as_mut().enable();
                notified
            });
            if notified.as_mut().poll(cx).is_pending() {
                // Registered before the flags are read again, so a cut between the two is not
                // missed.
                return self.is_cut() && self.end();
            }
            // Woken by a cut that may not be this call's (the watches'): look, and wait again.
            self.notified = None;
        }
    }

    fn end(&mut self) -> bool {
        self.notified = None;
        // Watches ended at GOAWAY are the drain going as planned, not calls cut short.
        if !self.is_watch {
            self.cut.ended.fetch_add(1, Ordering::AcqRel);
        }
        true
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Drain<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<DrainBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let is_watch = request.uri().path() == HEALTH_WATCH;
        ResponseFuture {
            inner: Some(self.inner.call(request)),
            waiter: Some(Waiter::new(Arc::clone(&self.cut), is_watch)),
        }
    }
}

pin_project! {
    /// The handler's future, dropped with UNAVAILABLE at the cut.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<F>,
        waiter: Option<Waiter>,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<DrainBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            // Polled again after it completed: a contract violation that must not panic here.
            return Poll::Pending;
        };
        if let Poll::Ready(response) = inner.poll(cx) {
            this.inner.set(None);
            let waiter = this.waiter.take();
            return Poll::Ready(response.map(|response| {
                response.map(|body| DrainBody {
                    inner: Some(body),
                    waiter,
                })
            }));
        }
        if let Some(waiter) = this.waiter.as_mut()
            && waiter.poll_cut(cx)
        {
            // Dropping the handler's future drops its transaction uncommitted.
            this.inner.set(None);
            let (parts, ()) = shutting_down().into_http::<()>().into_parts();
            return Poll::Ready(Ok(http::Response::from_parts(
                parts,
                DrainBody {
                    inner: None,
                    waiter: None,
                },
            )));
        }
        Poll::Pending
    }
}

pin_project! {
    /// A response body that ends with UNAVAILABLE trailers at the cut, between two messages.
    pub struct DrainBody<B> {
        #[pin]
        inner: Option<B>,
        waiter: Option<Waiter>,
    }
}

impl<B: Body> Body for DrainBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        let frame = inner.poll_frame(cx);
        if frame.is_ready() {
            return frame;
        }
        if let Some(waiter) = this.waiter.as_mut()
            && waiter.poll_cut(cx)
        {
            this.inner.set(None);
            *this.waiter = None;
            return Poll::Ready(Some(Ok(Frame::trailers(status_trailers(&shutting_down())))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Some(inner) => inner.is_end_stream(),
            None => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) => inner.size_hint(),
            None => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use futures::future::poll_fn;
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    type Frames = StreamBody<futures::channel::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>>;

    #[tokio::test]
    async fn a_waiting_handler_is_dropped_with_unavailable_at_the_cut() {
        let layer = DrainLayer::new();
        let mut service = layer.layer(tower::service_fn(|_: http::Request<()>| async {
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(http::Response::new(String::new()))
        }));
        let mut call = std::pin::pin!(service.call(http::Request::new(())));
        assert!(poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx).is_pending())).await);
        layer.cut();
        let response = call.await.expect("a response");
        assert_eq!(response.headers()["grpc-status"], "14");
        assert_eq!(layer.calls_cut(), 1);
    }

    #[tokio::test]
    async fn a_stream_ends_with_unavailable_trailers_after_its_last_message() {
        let layer = DrainLayer::new();
        let (mut frames, receiver) = futures::channel::mpsc::channel(4);
        let body: Frames = StreamBody::new(receiver);
        let mut body = Some(body);
        let mut service = layer.layer(tower::service_fn(move |_: http::Request<()>| {
            let body = body.take().expect("one call");
            async move { Ok::<_, Infallible>(http::Response::new(body)) }
        }));
        let response = service
            .call(http::Request::new(()))
            .await
            .expect("a response");
        let mut body = response.into_body();
        frames
            .try_send(Ok(Frame::data(Bytes::from_static(b"message"))))
            .expect("room");
        let first = body.frame().await.expect("a frame").expect("no error");
        assert_eq!(first.into_data().expect("data"), "message");
        layer.cut();
        let last = body.frame().await.expect("a frame").expect("no error");
        let trailers = last.into_trailers().expect("trailers");
        assert_eq!(trailers["grpc-status"], "14");
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn calls_that_finish_on_their_own_are_untouched() {
        let layer = DrainLayer::new();
        let mut service = layer.layer(tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(String::from("done")))
        }));
        let response = service
            .call(http::Request::new(()))
            .await
            .expect("a response");
        layer.cut();
        let body = response.into_body().collect().await.expect("a body");
        assert_eq!(body.to_bytes(), "done");
        assert_eq!(layer.calls_cut(), 0);
    }
}
