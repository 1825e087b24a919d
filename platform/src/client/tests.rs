//! The reference client's targets, retries, backoff, budget and trace context, without a server.

use super::*;

#[test]
fn the_budget_stops_retries_while_half_empty_and_refills_with_successes() {
    let budget = RetryBudget::new(10.0, 0.5);
    for _ in 0..4 {
        budget.failure();
    }
    assert!(budget.allows_retry(), "6 of 10 left");
    budget.failure();
    assert!(!budget.allows_retry(), "5 of 10 left: half");
    budget.success();
    assert!(budget.allows_retry(), "5.5 of 10");
    for _ in 0..100 {
        budget.success();
    }
    assert_eq!(*lock(&budget.tokens), 10.0, "capped at the maximum");
}

#[test]
fn full_jitter_stays_below_the_capped_exponential() {
    let (initial, max) = (Duration::from_millis(100), Duration::from_secs(1));
    for attempt in 1..10 {
        let ceiling = (initial * 2u32.pow(attempt - 1)).min(max);
        for _ in 0..50 {
            assert!(full_jitter(initial, max, attempt) <= ceiling);
        }
    }
    assert!(full_jitter(initial, max, u32::MAX) <= max);
}

#[test]
fn targets_are_static_addresses_or_dns_names() {
    let parsed =
        parse_targets(&["10.0.0.1:50051".into(), "dns:///api:50051".into()]).expect("valid");
    assert_eq!(
        parsed,
        [
            Target::Static("10.0.0.1:50051".into()),
            Target::Dns {
                host: "api".into(),
                port: 50051
            }
        ]
    );
    assert!(parse_targets(&[]).is_err());
    assert!(parse_targets(&["dns:///api".into()]).is_err());
    assert!(parse_targets(&["http://api:50051".into()]).is_err());
}

#[test]
fn calls_carry_the_current_spans_w3c_trace_context() {
    use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::layer::SubscriberExt;

    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("caller");
        let _entered = span.enter();
        let context = span.context();
        let span_context = context.span().span_context().clone();
        assert!(span_context.is_valid());
        let mut metadata = MetadataMap::new();
        inject_trace_context(&mut metadata);
        let traceparent = metadata
            .get("traceparent")
            .and_then(|value| value.to_str().ok())
            .expect("a traceparent");
        assert_eq!(
            traceparent,
            format!(
                "00-{}-{}-01",
                span_context.trace_id(),
                span_context.span_id()
            )
        );
    });
    // Outside any trace, nothing is sent.
    let mut metadata = MetadataMap::new();
    inject_trace_context(&mut metadata);
    assert!(metadata.get("traceparent").is_none());
}

async fn client() -> Client {
    Client::new(&ClientSettings {
        targets: vec!["127.0.0.1:1".into()],
        ..ClientSettings::default()
    })
    .await
    .expect("client")
}

#[tokio::test]
async fn only_codes_that_say_try_again_are_retried_and_pushback_wins() {
    let client = client().await;
    let delay = |status: &Status, idempotency| client.retry_delay(status, idempotency, 1);
    assert!(delay(&Status::unavailable("down"), Idempotency::Keyed).is_some());
    assert!(delay(&Status::aborted("conflict"), Idempotency::Keyed).is_some());
    assert!(delay(&Status::deadline_exceeded("slow"), Idempotency::Read).is_some());
    assert!(delay(&Status::deadline_exceeded("slow"), Idempotency::Keyed).is_none());
    assert!(delay(&Status::invalid_argument("bad"), Idempotency::Read).is_none());
    assert!(delay(&Status::internal("bug"), Idempotency::Read).is_none());

    let mut pushback = MetadataMap::new();
    pushback.insert("grpc-retry-pushback-ms", "1500".parse().expect("value"));
    let busy = Status::with_metadata(Code::ResourceExhausted, "busy", pushback);
    assert_eq!(
        delay(&busy, Idempotency::Keyed),
        Some(Duration::from_millis(1500))
    );
    let mut refusal = MetadataMap::new();
    refusal.insert("grpc-retry-pushback-ms", "-1".parse().expect("value"));
    let refused = Status::with_metadata(Code::ResourceExhausted, "stop", refusal);
    assert_eq!(delay(&refused, Idempotency::Keyed), None);

    let with_info = Status::with_error_details(
        Code::Unavailable,
        "later",
        tonic_types::ErrorDetails::with_retry_info(Some(Duration::from_secs(3))),
    );
    assert_eq!(
        delay(&with_info, Idempotency::Read),
        Some(Duration::from_secs(3))
    );
}

#[tokio::test]
async fn rotation_skips_left_out_addresses_until_all_are() {
    let client = client().await;
    client
        .set_targets(&[
            "127.0.0.1:1".into(),
            "127.0.0.1:2".into(),
            "127.0.0.1:3".into(),
        ])
        .await
        .expect("targets");
    let picks: Vec<String> = (0..6)
        .map(|_| client.inner.pick().expect("one").addr.clone())
        .collect();
    assert_eq!(
        picks.iter().filter(|addr| *addr == "127.0.0.1:2").count(),
        2,
        "round robin: {picks:?}"
    );
    let second = client.inner.current()[1].clone();
    second.eject();
    for _ in 0..6 {
        assert_ne!(client.inner.pick().expect("one").addr, second.addr);
    }
    for backend in client.inner.current().iter() {
        backend.eject();
    }
    assert!(client.inner.pick().is_some(), "all left out: still try one");
}
