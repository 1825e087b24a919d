//! One log line per RPC, with its method, gRPC status code, duration, and who called: the peer's
//! address, the client certificate's identity (mutual TLS) and the token's subject (JWT).
//!
//! Written by hand because a gRPC status is not where HTTP middleware looks: it arrives in the response
//! headers (trailers-only errors), in the trailers after the last message (everything else), or never
//! (the client went away). tower-http's `TraceLayer` reports those through three different callbacks,
//! none of which sees all three cases, so it cannot write a single line with the final code.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Code;
use tower::{Layer, Service};

use super::connection::Peer;
use crate::{auth::Subject, tls::ClientIdentity};

#[derive(Debug, Clone, Copy, Default)]
pub struct AccessLogLayer;

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessLog { inner }
    }
}

#[derive(Debug, Clone)]
pub struct AccessLog<S> {
    inner: S,
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for AccessLog<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
{
    type Response = http::Response<LoggedBody<ResponseBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let call = RpcCall {
            path: request.uri().path().to_owned(),
            peer: request
                .extensions()
                .get::<Peer>()
                .and_then(|peer| peer.addr),
            client: request.extensions().get::<ClientIdentity>().cloned(),
            subject: None,
            started: Instant::now(),
            finished: false,
        };
        ResponseFuture {
            inner: self.inner.call(request),
            call: Some(call),
        }
    }
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        call: Option<RpcCall>,
    }
}

impl<F, ResponseBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResponseBody>, E>>,
{
    type Output = Result<http::Response<LoggedBody<ResponseBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(result) => result,
        };
        let mut call = this.call.take();
        Poll::Ready(match response {
            Ok(response) => {
                if let Some(call) = &mut call {
                    call.subject = response.extensions().get::<Subject>().cloned();
                }
                // A trailers-only response carries its status in the headers: the call is over.
                let call = match (status_code(response.headers()), call) {
                    (Some(code), Some(call)) => {
                        call.finish(code);
                        None
                    }
                    (_, call) => call,
                };
                Ok(response.map(|inner| LoggedBody { inner, call }))
            }
            Err(err) => {
                if let Some(call) = call {
                    call.finish(Code::Unknown);
                }
                Err(err)
            }
        })
    }
}

pin_project! {
    /// The response body, watched for the trailers that end the call.
    pub struct LoggedBody<B> {
        #[pin]
        inner: B,
        call: Option<RpcCall>,
    }
}

impl<B: Body> Body for LoggedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        match &frame {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(call) = this.call.take()
                {
                    call.finish(status_code(trailers).unwrap_or(Code::Unknown));
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => {
                if let Some(call) = this.call.take() {
                    call.finish(Code::Unknown);
                }
            }
            Poll::Pending => {}
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

fn status_code(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|value| Code::from_bytes(value.as_bytes()))
}

/// An RPC in progress. Dropped before it finished, it is logged as cancelled: the client reset the
/// stream or the connection closed before the server sent a status.
#[derive(Debug)]
struct RpcCall {
    path: String,
    peer: Option<std::net::SocketAddr>,
    client: Option<ClientIdentity>,
    subject: Option<Subject>,
    started: Instant,
    finished: bool,
}

impl RpcCall {
    fn finish(mut self, code: Code) {
        self.finished = true;
        self.log(code);
    }

    fn log(&self, code: Code) {
        let path = self.path.as_str();
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((path, ""));
        let duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let code_number = code as i32;
        let peer_addr = self.peer.map(tracing::field::display);
        let client = self.client.as_ref().map(ClientIdentity::name);
        let subject = self.subject.as_ref().map(Subject::as_str);
        if matches!(
            code,
            Code::Unknown
                | Code::Internal
                | Code::DataLoss
                | Code::Unavailable
                | Code::Unimplemented
        ) {
            tracing::warn!(rpc.system = "grpc", rpc.service = service, rpc.method = method,
                rpc.grpc.status_code = code_number, grpc.code = ?code, duration_ms,
                peer = peer_addr, client, subject, "rpc finished");
        } else {
            tracing::info!(rpc.system = "grpc", rpc.service = service, rpc.method = method,
                rpc.grpc.status_code = code_number, grpc.code = ?code, duration_ms,
                peer = peer_addr, client, subject, "rpc finished");
        }
    }
}

impl Drop for RpcCall {
    fn drop(&mut self) {
        if !self.finished {
            self.log(Code::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, convert::Infallible};

    use futures::executor::block_on;
    use http::{HeaderValue, Response};
    use tower::{ServiceExt, service_fn};

    use super::*;

    /// A response body made of given frames.
    struct Frames(VecDeque<Frame<&'static [u8]>>);

    impl Body for Frames {
        type Data = &'static [u8];
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn trailers(code: Code) -> Frame<&'static [u8]> {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from(code as i32));
        Frame::trailers(trailers)
    }

    /// Runs one call whose response is `response`, reads its body as far as `frames_to_read`, and
    /// returns the log lines written.
    fn logged(response: fn() -> Response<Frames>, frames_to_read: usize) -> Vec<serde_json::Value> {
        crate::telemetry::test_support::json_logs(|| {
            let service = AccessLogLayer.layer(service_fn(move |_: http::Request<()>| {
                std::future::ready(Ok::<_, Infallible>(response()))
            }));
            let request = http::Request::get("/pkg.Svc/Method")
                .body(())
                .expect("request");
            let mut response = block_on(service.oneshot(request)).expect("response");
            for _ in 0..frames_to_read {
                let body = response.body_mut();
                let _ = block_on(std::future::poll_fn(|cx| {
                    Pin::new(&mut *body).poll_frame(cx)
                }));
            }
        })
    }

    fn codes(lines: &[serde_json::Value]) -> Vec<i64> {
        lines
            .iter()
            .map(|line| {
                assert_eq!(line["rpc.service"], "pkg.Svc");
                assert_eq!(line["rpc.method"], "Method");
                assert!(line["duration_ms"].is_number());
                line["rpc.grpc.status_code"].as_i64().expect("code")
            })
            .collect()
    }

    #[test]
    fn logs_the_status_from_the_trailers_once() {
        let lines = logged(
            || {
                Response::new(Frames(VecDeque::from([
                    Frame::data(&b"message"[..]),
                    trailers(Code::NotFound),
                ])))
            },
            3,
        );
        assert_eq!(codes(&lines), [Code::NotFound as i64]);
    }

    #[test]
    fn logs_a_trailers_only_response_from_its_headers() {
        let lines = logged(
            || {
                let mut response = Response::new(Frames(VecDeque::new()));
                response.headers_mut().insert(
                    "grpc-status",
                    HeaderValue::from(Code::InvalidArgument as i32),
                );
                response
            },
            0,
        );
        assert_eq!(codes(&lines), [Code::InvalidArgument as i64]);
    }

    #[test]
    fn logs_a_call_abandoned_before_its_status_as_cancelled() {
        let lines = logged(
            || {
                Response::new(Frames(VecDeque::from([
                    Frame::data(&b"message"[..]),
                    trailers(Code::Ok),
                ])))
            },
            1,
        );
        assert_eq!(codes(&lines), [Code::Cancelled as i64]);
    }
}
