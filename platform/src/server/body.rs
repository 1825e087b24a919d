//! Response-body pieces the layers share.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Status;

pin_project! {
    /// A response body that keeps `guard` until the call is over: until the body yields its trailers
    /// or ends, or is dropped (the call abandoned), not merely until the handler returns. Released
    /// as the status is produced, before it reaches the client, so a client that has its answer
    /// never finds the call still counted.
    pub struct GuardedBody<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> GuardedBody<B, G> {
    /// Guards `response`'s body; a trailers-only response (its status in the headers) is over
    /// already, so its guard is released at once.
    pub fn guard(response: http::Response<B>, guard: Option<G>) -> http::Response<Self> {
        let over = response.headers().contains_key("grpc-status");
        response.map(|inner| Self {
            inner,
            guard: if over { None } else { guard },
        })
    }
}

impl<B: Default, G> Default for GuardedBody<B, G> {
    fn default() -> Self {
        Self {
            inner: B::default(),
            guard: None,
        }
    }
}

impl<B: Body, G> Body for GuardedBody<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if ends_call(&frame) {
            *this.guard = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether a polled frame is the last of the call: its trailers, an error, or the end of the body.
pub fn ends_call<D, E>(frame: &Poll<Option<Result<Frame<D>, E>>>) -> bool {
    match frame {
        Poll::Ready(None | Some(Err(_))) => true,
        Poll::Ready(Some(Ok(frame))) => frame.is_trailers(),
        Poll::Pending => false,
    }
}

/// The trailers that end a call with `status`.
pub fn status_trailers(status: &Status) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    // Only a status whose message or details cannot become header values fails, and ours all can;
    // should one ever fail, the bare code still ends the call.
    if status.add_header(&mut trailers).is_err() {
        trailers.insert("grpc-status", (status.code() as i32).into());
    }
    trailers
}
