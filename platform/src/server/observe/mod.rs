//! The one layer that observes every RPC, feeding the log line, the metrics and the span from the same
//! facts: the method and its kind, gathered once from the path; the final status; the duration; the
//! messages in and out.
//!
//! Written by hand because a gRPC status is not where HTTP middleware looks: it arrives in the response
//! headers (trailers-only errors), in the trailers after the last message (everything else), or never
//! (the client went away, which counts as CANCELLED). tower-http's `TraceLayer` reports those through
//! three callbacks, none of which sees all three; the OpenTelemetry and Prometheus layers published
//! for tonic read the headers only and end the call when its headers leave, not its last message.
//!
//! Cost: a hash lookup of the path (every method's series and names are resolved when the server is
//! built), a few atomic additions, and one log line. The span is created only when spans are
//! exported; without it the layer allocates nothing per call.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http::HeaderMap;
use opentelemetry::trace::TraceContextExt;
use pin_project_lite::pin_project;
use prost_reflect::MessageDescriptor;
use tonic::Code;
use tower::{Layer, Service};
use tracing::{Level, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use self::body::{CountedBody, ObservedBody};
use self::body::{MESSAGES_TARGET, MessageCounter, MessageTap};
use super::connection::Peer;
use crate::{
    auth::Subject,
    methods::{Method, MethodKind},
    telemetry::{
        self, CALL_SPAN_TARGET, CallIds, UNSAMPLED_CALL_SPAN_TARGET,
        metrics::{Metrics, MetricsError, RpcMetrics, go_code_name},
        otel::{self, CallSampling},
    },
    tls::ClientIdentity,
};

/// What the layer knows of each path, built once from the served methods.
#[derive(Debug)]
pub struct Catalogue {
    methods: HashMap<String, Arc<Observed>>,
    /// Every path nobody serves shares this entry, so an unknown path never adds a series.
    unknown: Arc<Observed>,
    /// Fields whose values never reach the log.
    redacted: Arc<HashSet<String>>,
}

/// One method: its names, and its series when metrics are on.
struct Observed {
    service: Box<str>,
    method: Box<str>,
    /// `package.Service/Method`, the span name.
    full_name: Box<str>,
    /// Health probes log at DEBUG: one every few seconds must not drown the log.
    health: bool,
    metrics: Option<RpcMetrics>,
    /// The request and response types, to log messages at TRACE; `None` for types the log cannot
    /// decode (reflection's, an unknown path's).
    messages: Option<(MessageDescriptor, MessageDescriptor)>,
}

impl std::fmt::Debug for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.full_name)
    }
}

impl Catalogue {
    /// The catalogue of `methods`, with their series in `metrics` (none when metrics are off), and
    /// their messages logged at TRACE without the values of the `redacted` fields.
    pub fn new(
        methods: &[Method],
        pool: &prost_reflect::DescriptorPool,
        metrics: Option<&Metrics>,
        redacted: &[String],
    ) -> Result<Self, MetricsError> {
        let observed = |service: &str, method: &str, kind: MethodKind, messages| {
            Ok::<_, MetricsError>(Arc::new(Observed {
                service: service.into(),
                method: method.into(),
                full_name: format!("{service}/{method}").into(),
                health: service == "grpc.health.v1.Health",
                metrics: metrics
                    .map(|metrics| metrics.rpc(kind, service, method))
                    .transpose()?,
                messages,
            }))
        };
        let mut by_path = HashMap::with_capacity(methods.len());
        for method in methods {
            let messages = pool
                .get_message_by_name(&method.input)
                .zip(pool.get_message_by_name(&method.output));
            by_path.insert(
                method.path(),
                observed(&method.service, &method.name, method.kind, messages)?,
            );
        }
        Ok(Self {
            methods: by_path,
            // Unary is as good a guess as any: the kind of a method nobody serves is unknown.
            unknown: observed("unknown", "unknown", MethodKind::Unary, None)?,
            redacted: Arc::new(redacted.iter().cloned().collect()),
        })
    }

    fn lookup(&self, path: &str) -> &Arc<Observed> {
        self.methods.get(path).unwrap_or(&self.unknown)
    }
}

#[derive(Debug, Clone)]
pub struct ObserveLayer {
    catalogue: Arc<Catalogue>,
}

impl ObserveLayer {
    pub fn new(catalogue: Catalogue) -> Self {
        Self {
            catalogue: Arc::new(catalogue),
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            catalogue: Arc::clone(&self.catalogue),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    catalogue: Arc<Catalogue>,
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for Observe<S>
where
    S: Service<http::Request<CountedBody<RequestBody>>, Response = http::Response<ResponseBody>>,
{
    type Response = http::Response<ObservedBody<ResponseBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let path = request.uri().path();
        let observed = Arc::clone(self.catalogue.lookup(path));
        let peer = request
            .extensions()
            .get::<Peer>()
            .and_then(|peer| peer.addr);
        let (span, ids) = rpc_span(&observed, &request, peer);
        if let Some(metrics) = &observed.metrics {
            metrics.started();
        }
        let call = RpcCall {
            unknown_path: Arc::ptr_eq(&observed, &self.catalogue.unknown).then(|| path.into()),
            client: request.extensions().get::<ClientIdentity>().cloned(),
            subject: None,
            peer,
            started: Instant::now(),
            span,
            ids,
            finished: false,
            observed,
        };
        // Messages are logged (decoded, redacted) only while TRACE is on for them.
        let taps = tracing::enabled!(target: MESSAGES_TARGET, Level::TRACE)
            .then(|| call.observed.messages.clone())
            .flatten()
            .map(|(input, output)| {
                let tap = |descriptor, direction| {
                    Box::new(MessageTap {
                        observed: Arc::clone(&call.observed),
                        descriptor,
                        direction,
                        redacted: Arc::clone(&self.catalogue.redacted),
                        buffer: Vec::new(),
                    })
                };
                (tap(input, "received"), tap(output, "sent"))
            });
        let (request_tap, response_tap) = taps.unzip();
        let counted = (call.observed.metrics.is_some() || request_tap.is_some())
            .then(|| Arc::clone(&call.observed));
        let request = request.map(|inner| CountedBody {
            inner,
            messages: MessageCounter::default(),
            observed: counted,
            tap: request_tap,
        });
        let inner = {
            let _in_span = call.span.enter();
            self.inner.call(request)
        };
        ResponseFuture {
            inner,
            call: Some(call),
            tap: response_tap,
        }
    }
}

/// The call's span and its trace and span id for the log. A sampled call gets a SERVER span, a
/// child of the caller's when its metadata carries a W3C `traceparent`, with the OpenTelemetry RPC
/// conventions' attributes. An unsampled one gets ids and, when the log wants them for the lines
/// written inside the call, a bare span to carry them. With spans off, neither.
fn rpc_span<B>(
    observed: &Observed,
    request: &http::Request<B>,
    peer: Option<SocketAddr>,
) -> (Span, Option<CallIds>) {
    let parent = match otel::sample_call(request.headers(), &observed.full_name) {
        CallSampling::Off => return (Span::none(), None),
        CallSampling::Unsampled(ids) => {
            let span = tracing::info_span!(target: UNSAMPLED_CALL_SPAN_TARGET, parent: None, "rpc");
            telemetry::keep_call_ids(&span, ids);
            return (span, Some(ids));
        }
        CallSampling::Sampled(parent) => parent,
    };
    let uri = request.uri();
    let span = tracing::info_span!(
        target: CALL_SPAN_TARGET,
        parent: None,
        "rpc",
        otel.name = &*observed.full_name,
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = &*observed.service,
        rpc.method = &*observed.method,
        rpc.grpc.status_code = Empty,
        server.address = uri.host(),
        server.port = uri.port_u16(),
        network.peer.address = peer.map(|peer| tracing::field::display(peer.ip())),
        network.peer.port = peer.map(|peer| peer.port()),
    );
    if span.is_disabled() {
        return (span, None);
    }
    // Fails only when the span has started already, and it has not.
    let _ = span.set_parent(parent);
    let context = span.context();
    let span_context = context.span().span_context().clone();
    let ids = span_context.is_valid().then(|| CallIds {
        trace_id: span_context.trace_id(),
        span_id: span_context.span_id(),
    });
    if let Some(ids) = ids {
        telemetry::keep_call_ids(&span, ids);
    }
    (span, ids)
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        call: Option<RpcCall>,
        tap: Option<Box<MessageTap>>,
    }
}

impl<F, ResponseBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResponseBody>, E>>,
{
    type Output = Result<http::Response<ObservedBody<ResponseBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = {
            let _in_span = this.call.as_ref().map(|call| call.span.enter());
            match this.inner.poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(result) => result,
            }
        };
        let mut call = this.call.take();
        let tap = this.tap.take();
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
                Ok(response.map(|inner| ObservedBody {
                    inner,
                    call,
                    messages: MessageCounter::default(),
                    tap,
                }))
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

fn status_code(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|value| Code::from_bytes(value.as_bytes()))
}

/// An RPC in progress. Dropped before it finished, it ends as CANCELLED: the client reset the stream
/// or the connection closed before the server sent a status.
struct RpcCall {
    observed: Arc<Observed>,
    /// The path, for the log, when no served method has it.
    unknown_path: Option<Box<str>>,
    peer: Option<SocketAddr>,
    client: Option<ClientIdentity>,
    subject: Option<Subject>,
    started: Instant,
    span: Span,
    ids: Option<CallIds>,
    finished: bool,
}

/// Codes that are the server's fault, for which OpenTelemetry marks a server span as an error.
fn is_server_fault(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// The level of a call's log line, by its code, as go-grpc-middleware's logging levels them: the
/// server's failures at ERROR, calls cut short at WARN, answers (OK or a client's error) at INFO;
/// health probes at DEBUG unless they failed.
fn level(code: Code, health: bool) -> Level {
    match code {
        Code::Unknown | Code::Internal | Code::Unavailable | Code::DataLoss => Level::ERROR,
        _ if health => Level::DEBUG,
        Code::DeadlineExceeded | Code::Cancelled | Code::Unimplemented => Level::WARN,
        _ => Level::INFO,
    }
}

impl RpcCall {
    fn finish(mut self, code: Code) {
        self.finished = true;
        self.end(code);
    }

    fn end(&self, code: Code) {
        let elapsed = self.started.elapsed();
        if let Some(metrics) = &self.observed.metrics {
            metrics.handled(code, elapsed.as_secs_f64());
        }
        self.span.record("rpc.grpc.status_code", code as i64);
        if is_server_fault(code) {
            self.span.record("otel.status_code", "ERROR");
        }
        // Microseconds, in milliseconds: 0.365, not 0.36461099999999996.
        let duration_ms = (elapsed.as_secs_f64() * 1e6).round() / 1e3;
        let observed = &*self.observed;
        let path = self.unknown_path.as_deref();
        let peer = self.peer.map(tracing::field::display);
        let client = self.client.as_ref().map(ClientIdentity::name);
        let subject = self.subject.as_ref().map(Subject::as_str);
        let trace_id = self.ids.map(|ids| tracing::field::display(ids.trace_id));
        let span_id = self.ids.map(|ids| tracing::field::display(ids.span_id));
        let code_name = go_code_name(code);
        let code_number = code as i32;
        // `event!` takes its level as a constant: one expansion per level. No parent: the line is
        // the call's summary, not an event inside its span.
        macro_rules! rpc_finished {
            ($level:expr) => {
                tracing::event!(parent: None, $level, rpc.service = &*observed.service,
                    rpc.method = &*observed.method, path, grpc.code = code_name,
                    rpc.grpc.status_code = code_number, duration_ms, peer, client, subject,
                    trace_id, span_id, "rpc finished")
            };
        }
        match level(code, observed.health) {
            Level::ERROR => rpc_finished!(Level::ERROR),
            Level::WARN => rpc_finished!(Level::WARN),
            Level::INFO => rpc_finished!(Level::INFO),
            _ => rpc_finished!(Level::DEBUG),
        }
    }
}

impl Drop for RpcCall {
    fn drop(&mut self) {
        if !self.finished {
            self.end(Code::Cancelled);
        }
    }
}

mod body;
#[cfg(test)]
mod tests;
