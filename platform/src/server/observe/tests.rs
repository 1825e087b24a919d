//! The observing layer's log line, metrics and message counting, on calls made in process.

use std::{collections::VecDeque, convert::Infallible};

use bytes::Bytes;
use futures::executor::block_on;
use http::{HeaderValue, Response};
use http_body::{Body, Frame};
use http_body_util::Empty;
use tower::{ServiceExt, service_fn};

use super::{body::redact, *};
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
