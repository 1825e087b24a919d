//! Completes the statuses that the framework sends on its own (tonic's codec and router, the health
//! and reflection services), so that every error response this server sends carries an `ErrorInfo`
//! and the code the gRPC status-code specification prescribes:
//! - a message over `server.max_message_bytes` is RESOURCE_EXHAUSTED (tonic says OUT_OF_RANGE);
//! - a request that is not valid protobuf (bad wire format, invalid UTF-8 in a string) is the
//!   caller's fault, INVALID_ARGUMENT (tonic says INTERNAL, which would page whoever is on call);
//! - an unknown method is UNIMPLEMENTED with reason METHOD_NOT_FOUND;
//! - any other status without details gets an `ErrorInfo` named after its code, and for INTERNAL
//!   and UNAVAILABLE a fixed message: what a library says about its failure is for the log, not the
//!   caller.
//!
//! Statuses that already have details (all of this service's own) pass untouched, and the OK path
//! costs one header comparison.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::{Code, Status};
use tower::{Layer, Service};

use crate::status::{self, Reason};

#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorDetailsLayer;

impl<S> Layer<S> for ErrorDetailsLayer {
    type Service = ErrorDetails<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ErrorDetails { inner }
    }
}

#[derive(Debug, Clone)]
pub struct ErrorDetails<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for ErrorDetails<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<DetailedBody<ResBody>>;
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
    type Output = Result<http::Response<DetailedBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut response = std::task::ready!(self.project().inner.poll(cx))?;
        // A trailers-only response carries its status in the headers.
        complete(response.headers_mut());
        Poll::Ready(Ok(response.map(|inner| DetailedBody { inner })))
    }
}

pin_project! {
    pub struct DetailedBody<B> {
        #[pin]
        inner: B,
    }
}

impl<B: Default> Default for DetailedBody<B> {
    fn default() -> Self {
        Self {
            inner: B::default(),
        }
    }
}

impl<B: Body> Body for DetailedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut frame = self.project().inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &mut frame
            && let Some(trailers) = frame.trailers_mut()
        {
            complete(trailers);
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

/// Rewrites the error status in `headers` (response headers or trailers) when it needs completing.
fn complete(headers: &mut HeaderMap) {
    match headers.get("grpc-status") {
        Some(code) if code.as_bytes() != b"0" => {}
        _ => return,
    }
    let Some(replacement) = Status::from_header_map(headers).and_then(|status| completed(&status))
    else {
        return;
    };
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        headers.remove(name);
    }
    if replacement.add_header(headers).is_err() {
        headers.insert("grpc-status", (replacement.code() as i32).into());
    }
}

/// The status to send instead of `status`, or `None` to send it as it is.
fn completed(status: &Status) -> Option<Status> {
    const TOO_LARGE: [&str; 2] = [
        "Error, decoded message length too large",
        "Error, encoded message length too large",
    ];
    let message = status.message();
    Some(match status.code() {
        Code::OutOfRange if TOO_LARGE.iter().any(|prefix| message.starts_with(prefix)) => {
            status::error(Code::ResourceExhausted, Reason::MESSAGE_TOO_LARGE, message)
        }
        Code::Internal if message.starts_with("failed to decode Protobuf message") => {
            status::error(Code::InvalidArgument, Reason::MALFORMED_MESSAGE, message)
        }
        _ if !status.details().is_empty() => return None,
        Code::Unimplemented => status::error(
            Code::Unimplemented,
            Reason::METHOD_NOT_FOUND,
            "this server has no such method",
        ),
        code @ (Code::Internal | Code::Unavailable | Code::Unknown | Code::DataLoss) => {
            tracing::warn!(code = ?code, message, "a library answered an error without details");
            let reason = if code == Code::Internal {
                Reason::INTERNAL
            } else {
                Reason::unclassified(code)
            };
            status::error(code, reason, "internal error")
        }
        code => status::error(code, Reason::unclassified(code), message),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::error_reason;

    fn rewritten(status: Status) -> Status {
        let mut headers = HeaderMap::new();
        status.add_header(&mut headers).expect("valid status");
        complete(&mut headers);
        Status::from_header_map(&headers).expect("a status")
    }

    #[test]
    fn oversize_messages_are_resource_exhausted() {
        let status = rewritten(Status::out_of_range(
            "Error, decoded message length too large: found 5 bytes, the limit is: 4 bytes",
        ));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(error_reason(&status), "MESSAGE_TOO_LARGE");
    }

    #[test]
    fn undecodable_requests_are_invalid_arguments() {
        let status = rewritten(Status::internal(
            "failed to decode Protobuf message: invalid string value: data is not UTF-8 encoded",
        ));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(error_reason(&status), "MALFORMED_MESSAGE");
    }

    #[test]
    fn bare_statuses_get_an_error_info_and_detailed_ones_pass() {
        let status = rewritten(Status::unimplemented(""));
        assert_eq!(status.code(), Code::Unimplemented);
        assert_eq!(error_reason(&status), "METHOD_NOT_FOUND");

        let status = rewritten(Status::not_found("service not registered"));
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(error_reason(&status), "NOT_FOUND");
        assert_eq!(status.message(), "service not registered");

        let status = rewritten(Status::internal("h2 protocol error: /var/lib/secret"));
        assert_eq!(status.message(), "internal error");
        assert_eq!(error_reason(&status), "INTERNAL");

        // A service's own reason is kept as it is.
        let own = status::error(
            Code::Unavailable,
            Reason::new("DEPENDENCY_UNAVAILABLE"),
            "retry",
        );
        assert_eq!(error_reason(&rewritten(own)), "DEPENDENCY_UNAVAILABLE");

        let mut ok = HeaderMap::new();
        ok.insert("grpc-status", 0.into());
        complete(&mut ok);
        assert_eq!(ok.len(), 1);
    }
}
