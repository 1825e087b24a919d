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

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use opentelemetry::trace::TraceContextExt;
use pin_project_lite::pin_project;
use prost_reflect::{DynamicMessage, MessageDescriptor, SerializeOptions};
use tonic::Code;
use tower::{Layer, Service};
use tracing::{Level, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

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

pin_project! {
    /// The response body, whose messages are counted and whose trailers end the call.
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        call: Option<RpcCall>,
        messages: MessageCounter,
        tap: Option<Box<MessageTap>>,
    }
}

impl<B: Body<Data = Bytes>> Body for ObservedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = {
            // A streaming handler does its work as its messages are polled: in the call's span.
            let _in_span = this.call.as_ref().map(|call| call.span.enter());
            this.inner.poll_frame(cx)
        };
        match &frame {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(call) = this.call.as_ref()
                    && (call.observed.metrics.is_some() || this.tap.is_some())
                    && let Some(data) = frame.data_ref()
                {
                    let sent = this.messages.count(data, this.tap.as_deref_mut());
                    if let Some(metrics) = &call.observed.metrics {
                        metrics.sent(sent);
                    }
                }
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(call) = this.call.take()
                {
                    call.finish(status_code(trailers).unwrap_or(Code::Unknown));
                }
            }
            Poll::Ready(Some(Err(_)) | None) => {
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

impl<B: Default> Default for ObservedBody<B> {
    fn default() -> Self {
        Self {
            inner: B::default(),
            call: None,
            messages: MessageCounter::default(),
            tap: None,
        }
    }
}

pin_project! {
    /// The request body, whose messages are counted as they arrive (when metrics are on).
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        messages: MessageCounter,
        observed: Option<Arc<Observed>>,
        tap: Option<Box<MessageTap>>,
    }
}

impl<B: Body<Data = Bytes>> Body for CountedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &frame
            && let Some(observed) = this.observed.as_ref()
            && let Some(data) = frame.data_ref()
        {
            let received = this.messages.count(data, this.tap.as_deref_mut());
            if let Some(metrics) = &observed.metrics {
                metrics.received(received);
            }
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

/// Counts the gRPC messages in a body from its data frames, which split and join messages at will:
/// each message is a 5-byte prefix (compression flag, big-endian length) and its bytes.
#[derive(Debug, Default)]
struct MessageCounter {
    /// Bytes of the current prefix read so far (0 to 4).
    prefix_read: u8,
    /// Whether the current message is compressed (its prefix's flag).
    compressed: bool,
    /// The length being read from the prefix.
    length: u32,
    /// Bytes of the current message still to come.
    remaining: u32,
}

impl MessageCounter {
    /// Reads `data` and returns how many messages it completed, handing each message's bytes to
    /// `tap` when there is one.
    fn count(&mut self, mut data: &[u8], mut tap: Option<&mut MessageTap>) -> u64 {
        let mut completed = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let taken = data
                    .len()
                    .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                if let Some(tap) = tap.as_deref_mut() {
                    tap.buffer.extend_from_slice(&data[..taken]);
                }
                data = &data[taken..];
                self.remaining -= u32::try_from(taken).unwrap_or(self.remaining);
                if self.remaining == 0 {
                    completed += 1;
                    if let Some(tap) = tap.as_deref_mut() {
                        tap.log(self.compressed);
                    }
                }
                continue;
            }
            let byte = data[0];
            data = &data[1..];
            if self.prefix_read == 0 {
                self.compressed = byte != 0;
            } else {
                self.length = (self.length << 8) | u32::from(byte);
            }
            self.prefix_read += 1;
            if self.prefix_read == 5 {
                self.remaining = std::mem::take(&mut self.length);
                self.prefix_read = 0;
                if self.remaining == 0 {
                    completed += 1;
                    if let Some(tap) = tap.as_deref_mut() {
                        tap.log(self.compressed);
                    }
                }
            }
        }
        completed
    }
}

/// The target of the request and response messages, logged at TRACE.
pub const MESSAGES_TARGET: &str = "app::messages";

/// Logs one direction's messages of a call at TRACE, as proto JSON without the redacted fields'
/// values. Exists only while TRACE is on for `app::messages`.
struct MessageTap {
    observed: Arc<Observed>,
    descriptor: MessageDescriptor,
    direction: &'static str,
    redacted: Arc<HashSet<String>>,
    /// The current message's bytes so far.
    buffer: Vec<u8>,
}

impl MessageTap {
    /// Logs the message in `buffer`, and empties it.
    fn log(&mut self, compressed: bool) {
        let message = if compressed {
            format!("(compressed, {} bytes)", self.buffer.len())
        } else {
            match DynamicMessage::decode(self.descriptor.clone(), self.buffer.as_slice()) {
                Ok(message) => {
                    let options = SerializeOptions::new().use_proto_field_name(true);
                    match message.serialize_with_options(serde_json::value::Serializer, &options) {
                        Ok(mut json) => {
                            redact(&mut json, &self.redacted);
                            json.to_string()
                        }
                        Err(err) => format!("(cannot render: {err})"),
                    }
                }
                Err(err) => format!("(undecodable, {} bytes: {err})", self.buffer.len()),
            }
        };
        self.buffer.clear();
        tracing::event!(target: MESSAGES_TARGET, Level::TRACE,
            rpc.service = &*self.observed.service, rpc.method = &*self.observed.method,
            direction = self.direction, message, "message");
    }
}

/// Replaces the values of the `redacted` fields, at any depth, with `"[REDACTED]"`.
fn redact(json: &mut serde_json::Value, redacted: &HashSet<String>) {
    match json {
        serde_json::Value::Object(fields) => {
            for (name, value) in fields.iter_mut() {
                if redacted.contains(name) {
                    *value = serde_json::Value::from("[REDACTED]");
                } else {
                    redact(value, redacted);
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                redact(item, redacted);
            }
        }
        _ => {}
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

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, convert::Infallible};

    use futures::executor::block_on;
    use http::{HeaderValue, Response};
    use http_body_util::Empty;
    use tower::{ServiceExt, service_fn};

    use super::*;
    use crate::config::TelemetrySettings;

    /// A response body made of given frames.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn trailers(code: Code) -> Frame<Bytes> {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from(code as i32));
        Frame::trailers(trailers)
    }

    /// One message of `len` bytes, with its prefix.
    fn message(len: usize) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&u32::try_from(len).expect("small").to_be_bytes());
        bytes.resize(5 + len, 7);
        bytes
    }

    fn data(bytes: &[u8]) -> Frame<Bytes> {
        Frame::data(Bytes::copy_from_slice(bytes))
    }

    fn catalogue(metrics: &Metrics) -> Catalogue {
        let methods = [
            Method {
                service: "pkg.Svc".to_owned(),
                name: "Method".to_owned(),
                kind: MethodKind::ServerStream,
                input: "pkg.Request".to_owned(),
                output: "pkg.Response".to_owned(),
            },
            Method {
                service: "grpc.health.v1.Health".to_owned(),
                name: "Check".to_owned(),
                kind: MethodKind::Unary,
                input: "grpc.health.v1.HealthCheckRequest".to_owned(),
                output: "grpc.health.v1.HealthCheckResponse".to_owned(),
            },
        ];
        let pool = crate::methods::descriptor_pool(&crate::methods::PLATFORM_DESCRIPTOR_SETS);
        Catalogue::new(&methods, &pool, Some(metrics), &[]).expect("catalogue")
    }

    /// Runs one call to `path` whose response is `response`, reads its body as far as
    /// `frames_to_read`, and returns the log lines written and the metrics afterwards.
    fn observed(
        path: &str,
        response: fn() -> Response<Frames>,
        frames_to_read: usize,
    ) -> (Vec<serde_json::Value>, String) {
        let metrics =
            Metrics::new(&TelemetrySettings::default(), &crate::testing::SERVICE).expect("metrics");
        let layer = ObserveLayer::new(catalogue(&metrics));
        let lines = crate::telemetry::test_support::json_logs(|| {
            let service = layer.layer(service_fn(
                move |_: http::Request<CountedBody<Empty<Bytes>>>| {
                    std::future::ready(Ok::<_, Infallible>(response()))
                },
            ));
            let request = http::Request::post(path)
                .body(Empty::new())
                .expect("request");
            let mut response = block_on(service.oneshot(request)).expect("response");
            for _ in 0..frames_to_read {
                let body = response.body_mut();
                let _ = block_on(std::future::poll_fn(|cx| {
                    Pin::new(&mut *body).poll_frame(cx)
                }));
            }
        });
        let text = String::from_utf8(metrics.render().expect("render")).expect("UTF-8");
        (lines, text)
    }

    /// The value of the series named exactly `series` (name and labels as rendered).
    fn sample(metrics: &str, series: &str) -> f64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
            .parse()
            .expect("a number")
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
    fn records_the_status_from_the_trailers_once_with_the_messages_sent() {
        let (lines, metrics) = observed(
            "/pkg.Svc/Method",
            || {
                // Two messages in one frame, a third split across two.
                let mut first = message(3);
                first.extend(message(0));
                let third = message(10);
                Response::new(Frames(VecDeque::from([
                    data(&first),
                    data(&third[..7]),
                    data(&third[7..]),
                    trailers(Code::NotFound),
                ])))
            },
            5,
        );
        assert_eq!(codes(&lines), [Code::NotFound as i64]);
        assert_eq!(lines[0]["grpc.code"], "NotFound");
        assert_eq!(lines[0]["level"], "INFO");
        // The text encoder writes labels in name order.
        assert!(
            metrics.contains(r#"grpc_server_handled_total{grpc_code="NotFound",grpc_method="Method",grpc_service="pkg.Svc",grpc_type="server_stream"} 1"#),
            "{metrics}"
        );
        let labels = r#"{grpc_method="Method",grpc_service="pkg.Svc",grpc_type="server_stream"}"#;
        assert_eq!(
            sample(&metrics, &format!("grpc_server_started_total{labels}")),
            1.0
        );
        assert_eq!(
            sample(&metrics, &format!("grpc_server_msg_sent_total{labels}")),
            3.0
        );
        assert_eq!(
            sample(&metrics, &format!("grpc_server_in_flight_rpcs{labels}")),
            0.0
        );
        assert_eq!(
            sample(
                &metrics,
                &format!("grpc_server_handling_seconds_count{labels}")
            ),
            1.0
        );
    }

    #[test]
    fn records_a_trailers_only_response_from_its_headers() {
        let (lines, _) = observed(
            "/pkg.Svc/Method",
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
    fn a_call_abandoned_before_its_status_is_cancelled_and_warned() {
        let (lines, metrics) = observed(
            "/pkg.Svc/Method",
            || {
                Response::new(Frames(VecDeque::from([
                    data(&message(1)),
                    trailers(Code::Ok),
                ])))
            },
            1,
        );
        assert_eq!(codes(&lines), [Code::Cancelled as i64]);
        assert_eq!(lines[0]["level"], "WARN");
        assert!(
            metrics.contains(r#"grpc_server_handled_total{grpc_code="Canceled",grpc_method="Method",grpc_service="pkg.Svc",grpc_type="server_stream"} 1"#),
            "{metrics}"
        );
    }

    #[test]
    fn an_unknown_path_counts_as_the_one_unknown_method_and_logs_its_path() {
        let (lines, metrics) = observed(
            "/no.Such/Thing",
            || Response::new(Frames(VecDeque::from([trailers(Code::Unimplemented)]))),
            1,
        );
        assert_eq!(lines[0]["rpc.service"], "unknown");
        assert_eq!(lines[0]["path"], "/no.Such/Thing");
        assert!(
            metrics.contains(r#"grpc_server_handled_total{grpc_code="Unimplemented",grpc_method="unknown",grpc_service="unknown",grpc_type="unary"} 1"#),
            "{metrics}"
        );
        assert!(!metrics.contains("no.Such"), "{metrics}");
    }

    #[test]
    fn health_checks_log_at_debug_unless_they_fail() {
        let (lines, _) = observed(
            "/grpc.health.v1.Health/Check",
            || Response::new(Frames(VecDeque::from([trailers(Code::Ok)]))),
            1,
        );
        assert_eq!(lines[0]["level"], "DEBUG");
        let (lines, _) = observed(
            "/grpc.health.v1.Health/Check",
            || Response::new(Frames(VecDeque::from([trailers(Code::Internal)]))),
            1,
        );
        assert_eq!(lines[0]["level"], "ERROR");
    }

    #[test]
    fn durations_are_logged_to_the_microsecond() {
        let (lines, _) = observed(
            "/pkg.Svc/Method",
            || Response::new(Frames(VecDeque::from([trailers(Code::Ok)]))),
            1,
        );
        let text = lines[0]["duration_ms"].to_string();
        let decimals = text
            .split_once('.')
            .map_or(0, |(_, fraction)| fraction.len());
        assert!(decimals <= 3, "{text}");
    }

    #[test]
    fn levels_follow_the_code() {
        assert_eq!(level(Code::Ok, false), Level::INFO);
        assert_eq!(level(Code::NotFound, false), Level::INFO);
        assert_eq!(level(Code::PermissionDenied, false), Level::INFO);
        assert_eq!(level(Code::DeadlineExceeded, false), Level::WARN);
        assert_eq!(level(Code::Cancelled, false), Level::WARN);
        for code in [
            Code::Internal,
            Code::Unknown,
            Code::Unavailable,
            Code::DataLoss,
        ] {
            assert_eq!(level(code, false), Level::ERROR);
            assert_eq!(level(code, true), Level::ERROR);
        }
        assert_eq!(level(Code::DeadlineExceeded, true), Level::DEBUG);
    }

    #[test]
    fn redacted_fields_lose_their_values_at_any_depth() {
        let mut json = serde_json::json!({
            "email": "a@example.com",
            "user": {"email": {"domain": "x"}, "roles": ["a"]},
            "users": [{"email": "b@example.com", "age": 3}],
        });
        redact(&mut json, &HashSet::from(["email".to_owned()]));
        assert_eq!(
            json,
            serde_json::json!({
                "email": "[REDACTED]",
                "user": {"email": "[REDACTED]", "roles": ["a"]},
                "users": [{"email": "[REDACTED]", "age": 3}],
            })
        );
    }

    #[test]
    fn messages_are_counted_however_frames_split_them() {
        let mut stream = message(300);
        stream.extend(message(0));
        stream.extend(message(2));
        for chunk in [1, 2, 5, 6, 64, stream.len()] {
            let mut counter = MessageCounter::default();
            let counted: u64 = stream
                .chunks(chunk)
                .map(|part| counter.count(part, None))
                .sum();
            assert_eq!(counted, 3, "chunks of {chunk}");
        }
        // A message is counted when its last byte arrives, not before.
        let mut counter = MessageCounter::default();
        assert_eq!(counter.count(&message(4)[..8], None), 0);
        assert_eq!(counter.count(&[7], None), 1);
    }
}
