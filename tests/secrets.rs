//! Secrets stay out of the logs at every level: with everything logged down to TRACE (tonic, hyper
//! and h2 included), no line holds a bearer token or the JWT secret. A test binary of its own, so
//! that TRACE logging slows no other test.

mod common;

use app::api;
use common::{Backend, TestApp, logs};
use platform::config::AuthMode;
use tonic::Request;

const SECRET: &str = "never-log-this-secret-0123456789abcdef";

fn token(scope: &str) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = serde_json::json!({
        "sub": "secret-test",
        "iss": "issuer",
        "aud": "audience",
        "exp": now + 600,
        "nbf": now - 10,
        "scope": scope,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_at_any_level_holds_a_token_or_the_secret() {
    logs::capture_at(tracing::Level::TRACE);
    let dir = tempfile::tempdir().expect("temporary directory");
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, SECRET).expect("write secret");
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        s.platform.auth.mode = AuthMode::Jwt;
        s.platform.auth.jwt_secret_file = Some(secret_file);
        s.platform.auth.issuer = "issuer".to_owned();
        s.platform.auth.audience = "audience".to_owned();
    })
    .await
    .expect("SQLite app");

    let allowed = token("orders.read");
    let denied = token("profile");
    let forged = format!("{}x", token("orders.read"));
    for bearer in [&allowed, &denied, &forged] {
        let mut request = Request::new(api::GetOrderRequest {
            id: uuid::Uuid::new_v4().to_string(),
        });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {bearer}").parse().expect("metadata"),
        );
        let status = app
            .orders
            .clone()
            .get_order(request)
            .await
            .expect_err("no such order, or refused");
        assert_ne!(status.code(), tonic::Code::Ok);
    }

    // Messages are logged at TRACE, without the values of the redacted fields (the destination, by
    // default).
    let address = "Never Log Street 7";
    let mut request = Request::new(api::CreateOrderRequest {
        order: Some(api::Order {
            items: vec!["a traced widget".to_owned()],
            destination: address.to_owned(),
            price_cents: 100,
            ..Default::default()
        }),
        request_id: String::new(),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token("orders.write"))
            .parse()
            .expect("metadata"),
    );
    app.orders
        .clone()
        .create_order(request)
        .await
        .expect("created");
    let messages =
        logs::find(|line| line["target"] == "app::messages" && line["rpc.method"] == "CreateOrder");
    let directions: Vec<&str> = messages
        .iter()
        .filter_map(|line| line["direction"].as_str())
        .collect();
    assert_eq!(directions, ["received", "sent"], "{messages:?}");
    for line in &messages {
        let message = line["message"].as_str().expect("message text");
        assert!(message.contains("a traced widget"), "{message}");
        assert!(
            message.contains(r#""destination":"[REDACTED]""#),
            "{message}"
        );
    }
    let leaked = logs::find(|line| line.to_string().contains(address));
    assert!(leaked.is_empty(), "a redacted field in the log: {leaked:?}");

    let lines = logs::find(|_| true);
    assert!(
        lines.iter().any(|line| line["message"] == "rpc finished"),
        "the calls were logged at all"
    );
    assert!(
        lines.iter().any(|line| line["level"] == "TRACE"
            && line["target"]
                .as_str()
                .is_some_and(|target| target.starts_with("h2"))),
        "HTTP/2 frames were traced too"
    );
    // A token's signature is its secret part; its payload alone would also identify the caller.
    for bearer in [&allowed, &denied, &forged] {
        let signature = bearer.rsplit('.').next().expect("JWT");
        let leaked = logs::find(|line| line.to_string().contains(signature));
        assert!(leaked.is_empty(), "a token in the log: {leaked:?}");
    }
    let leaked = logs::find(|line| line.to_string().contains(SECRET));
    assert!(leaked.is_empty(), "the secret in the log: {leaked:?}");
}
