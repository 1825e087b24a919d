//! Bearer tokens, scopes and the verified-token cache, without a server.

use super::*;

#[test]
fn bearer_tokens_are_read_from_the_authorization_header() {
    let mut headers = http::HeaderMap::new();
    fn code(headers: &http::HeaderMap) -> Result<String, Code> {
        bearer_token(headers)
            .map(str::to_owned)
            .map_err(|status| status.code())
    }
    assert_eq!(code(&headers), Err(Code::Unauthenticated));
    headers.insert(
        "authorization",
        "Bearer abc.def.ghi".parse().expect("value"),
    );
    assert_eq!(code(&headers).as_deref(), Ok("abc.def.ghi"));
    headers.insert("authorization", "bearer  xyz".parse().expect("value"));
    assert_eq!(code(&headers).as_deref(), Ok("xyz"));
    for bad in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "token"] {
        headers.insert("authorization", bad.parse().expect("value"));
        assert_eq!(code(&headers), Err(Code::Unauthenticated), "{bad}");
    }
}

fn policy(scopes: &[(String, &'static str)]) -> AuthPolicy {
    let dir = std::env::temp_dir().join(format!("auth-test-{}", uuid::Uuid::new_v4()));
    std::fs::write(&dir, b"secret").expect("write secret");
    let settings = AuthSettings {
        mode: AuthMode::Jwt,
        jwt_secret_file: Some(dir.clone()),
        issuer: "iss".to_owned(),
        audience: "aud".to_owned(),
        ..AuthSettings::default()
    };
    let built = AuthPolicy::new(&settings, &crate::testing::served_methods(), scopes);
    let _ = std::fs::remove_file(dir);
    built.unwrap_or_else(|err| panic!("policy: {err}"))
}

#[test]
fn a_served_method_without_a_scope_is_closed_to_everyone() {
    let service = "platform.testing.v1.EchoService";
    let scopes = [
        (format!("{service}/Say"), "echo.write"),
        (format!("{service}/Repeat"), "echo.read"),
    ];
    let policy = policy(&scopes);
    assert_eq!(
        policy.access.get(&format!("/{service}/Collect")),
        Some(&Access::Undeclared)
    );
    assert_eq!(
        policy.access.get("/grpc.health.v1.Health/Check"),
        Some(&Access::Public)
    );
    assert_eq!(
        policy.access.get(&format!("/{service}/Say")),
        Some(&Access::Scope("echo.write"))
    );
}

#[test]
fn a_cached_token_is_checked_for_expiry_on_every_use() {
    let settings = AuthSettings {
        mode: AuthMode::Jwt,
        issuer: "iss".to_owned(),
        audience: "aud".to_owned(),
        ..AuthSettings::default()
    };
    let key = jsonwebtoken::EncodingKey::from_secret(b"secret");
    let verifier = JwtVerifier {
        key: DecodingKey::from_secret(b"secret"),
        validation: {
            let mut validation = Validation::new(Algorithm::HS256);
            validation.set_issuer(&[&settings.issuer]);
            validation.set_audience(&[&settings.audience]);
            validation.set_required_spec_claims(&["exp", "iss", "aud"]);
            validation.validate_nbf = true;
            validation.leeway = 30;
            validation
        },
        verified: VerifiedTokens {
            tokens: Mutex::new(HashMap::new()),
        },
    };
    let now = jsonwebtoken::get_current_timestamp();
    let claims = serde_json::json!({
        "sub": "alice", "iss": "iss", "aud": "aud", "exp": now + 60, "nbf": now, "scope": "x",
    });
    let token =
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("sign");

    let first = verifier.verify_at(&token, now).expect("valid");
    assert_eq!(first.sub.as_deref(), Some("alice"));
    assert!(
        verifier.verified.get(&token).is_some(),
        "kept after verifying"
    );
    verifier
        .verify_at(&token, now + 60 + 30)
        .expect("within the leeway");
    let status = verifier
        .verify_at(&token, now + 60 + 31)
        .expect_err("expired while cached");
    assert_eq!(
        crate::status::error_reason(&status),
        "UNAUTHENTICATED_TOKEN_EXPIRED"
    );
    // A different token is never answered from the cache: one changed signature character
    // (mid-signature, where every bit counts).
    let position = token.len() - 10;
    let changed = if token.as_bytes()[position] == b'A' {
        "B"
    } else {
        "A"
    };
    let mut forged = token.clone();
    forged.replace_range(position..=position, changed);
    assert!(verifier.verify_at(&forged, now).is_err());
}

#[test]
fn scopes_are_space_separated() {
    let claims = Claims {
        sub: None,
        scope: "echo.read  echo.write".to_owned(),
        exp: 0,
        nbf: None,
    };
    assert!(claims.has_scope("echo.write"));
    assert!(!claims.has_scope("echo"));
}
