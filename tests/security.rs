//! Facing a production network: TLS and mutual TLS with rotation (over real loopback sockets), JWT
//! authentication and scopes, limits and load shedding, deadlines, panics, and hostile input.
//! Certificates and keys are made here, at test time; none is committed.

mod common;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use app::api::order_service_client::OrderServiceClient;
use app::{
    api,
    config::Settings,
    domain::{Order, OrderDetails, OrderId, OrderUpdate, RequestId},
    store::{OrderStore, OrderStream, Page, PageCursor},
};
use common::{
    Backend, TcpServer, TestApp, eventually, logs, order_to, probe, reason, search_and_take_one,
};
use futures::StreamExt;
use platform::{config::AuthMode, tls::Reload};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::Notify,
};
use tonic::{Code, Request, transport::Channel};

/// The longest any awaited event may take before the test fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// A throwaway certificate authority.
struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
struct Pem {
    cert: String,
    key: String,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn server(&self) -> Pem {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate with a common name, a SPIFFE id and a DNS name.
    fn client(&self, common_name: &str) -> Pem {
        let mut params = CertificateParams::new(vec!["client.test".to_owned()]).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.subject_alt_names.push(SanType::URI(
            "spiffe://test.local/ns/shop/sa/checkout"
                .try_into()
                .expect("URI"),
        ));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn expired_client(&self) -> Pem {
        let mut params = CertificateParams::new(vec!["client.test".to_owned()]).expect("params");
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Pem {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// The server's TLS files in a directory of their own, rewritten in place as a rotation would.
struct TlsFiles {
    dir: tempfile::TempDir,
}

impl TlsFiles {
    fn new(server: &Pem, client_ca: Option<&str>) -> Self {
        let files = Self {
            dir: tempfile::tempdir().expect("temporary directory"),
        };
        files.write(server);
        if let Some(ca) = client_ca {
            std::fs::write(files.path("ca.pem"), ca).expect("write CA");
        }
        files
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, server: &Pem) {
        std::fs::write(self.path("cert.pem"), &server.cert).expect("write certificate");
        std::fs::write(self.path("key.pem"), &server.key).expect("write key");
    }

    fn configure(&self, settings: &mut Settings, mutual: bool) {
        settings.platform.tls.cert_file = Some(self.path("cert.pem"));
        settings.platform.tls.key_file = Some(self.path("key.pem"));
        if mutual {
            settings.platform.tls.client_ca_file = Some(self.path("ca.pem"));
        }
        // Only the test's explicit reloads apply changes, unless a test asks for the timer.
        settings.platform.tls.reload_interval = Duration::from_secs(3600);
    }
}

/// Whether a fresh connection from `endpoint` is served.
async fn served(server: &TcpServer, endpoint: tonic::transport::Endpoint) -> bool {
    match server.connect(endpoint).await {
        Ok(channel) => probe(channel).await.is_ok(),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------------
// TLS and mutual TLS
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_server_serves_tls_clients_and_refuses_plaintext() {
    let ca = TestCa::new("CA");
    let files = TlsFiles::new(&ca.server(), None);
    let server = TcpServer::start(|s| files.configure(s, false)).await;

    assert!(served(&server, server.tls_endpoint(&ca.pem(), None)).await);
    assert!(
        !served(&server, server.plaintext_endpoint()).await,
        "a plaintext client must not be served by a TLS server"
    );
    // A client that does not trust the server's CA refuses it, as it should.
    let stranger = TestCa::new("Other CA");
    assert!(!served(&server, server.tls_endpoint(&stranger.pem(), None)).await);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate_from_the_client_ca() {
    logs::capture();
    let ca = TestCa::new("CA");
    let files = TlsFiles::new(&ca.server(), Some(&ca.pem()));
    let server = TcpServer::start(|s| files.configure(s, true)).await;
    let other = TestCa::new("Other CA");

    let no_certificate = server.tls_endpoint(&ca.pem(), None);
    assert!(
        !served(&server, no_certificate).await,
        "no client certificate"
    );
    let foreign = other.client("intruder");
    let foreign = server.tls_endpoint(&ca.pem(), Some((&foreign.cert, &foreign.key)));
    assert!(
        !served(&server, foreign).await,
        "certificate from another CA"
    );
    let expired = ca.expired_client();
    let expired = server.tls_endpoint(&ca.pem(), Some((&expired.cert, &expired.key)));
    assert!(!served(&server, expired).await, "expired certificate");

    // Refused handshakes are visible to operators: WARN, with the peer and the reason. Under TLS 1.3
    // the client's side of the handshake ends before the server has judged its certificate, so the
    // last line may come just after the client saw the refusal.
    let refusals = || {
        logs::find(|line| {
            line["message"] == "TLS handshake failed"
                && line["level"] == "WARN"
                && line["peer"]
                    .as_str()
                    .is_some_and(|peer| peer.contains("127.0.0.1"))
                && line["error"].is_string()
        })
    };
    eventually("three handshake failures logged", LIMIT, || {
        let logged = refusals().len() >= 3;
        async move { logged }
    })
    .await;

    let good = ca.client("checkout");
    let good = server.tls_endpoint(&ca.pem(), Some((&good.cert, &good.key)));
    assert!(
        served(&server, good).await,
        "a client with a good certificate"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_certificate_identity_reaches_every_call() {
    logs::capture();
    let ca = TestCa::new("CA");
    let files = TlsFiles::new(&ca.server(), Some(&ca.pem()));
    let server = TcpServer::start(|s| files.configure(s, true)).await;
    let client = ca.client("identity-test-client");
    let channel = server
        .connect(server.tls_endpoint(&ca.pem(), Some((&client.cert, &client.key))))
        .await
        .expect("mutual TLS connection");
    probe(channel).await.expect("served");

    // The access log reads the identity from the request extension handlers get; the SPIFFE id is
    // the most specific name the certificate carries.
    eventually("the call's log line names the client", LIMIT, || async {
        !logs::find(|line| {
            line["message"] == "rpc finished"
                && line["client"] == "spiffe://test.local/ns/shop/sa/checkout"
                && line["rpc.method"] == "GetOrder"
        })
        .is_empty()
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_serves_new_connections_while_open_ones_keep_working() {
    let old_ca = TestCa::new("Old CA");
    let files = TlsFiles::new(&old_ca.server(), None);
    let server = TcpServer::start(|s| files.configure(s, false)).await;
    let tls = server.tls.clone().expect("TLS is on");

    let open = server
        .connect(server.tls_endpoint(&old_ca.pem(), None))
        .await
        .expect("connection before the rotation");
    probe(open.clone())
        .await
        .expect("served before the rotation");

    let new_ca = TestCa::new("New CA");
    files.write(&new_ca.server());
    assert!(matches!(tls.reload(), Reload::Applied));
    assert!(matches!(tls.reload(), Reload::Unchanged));

    assert!(
        served(&server, server.tls_endpoint(&new_ca.pem(), None)).await,
        "a new connection gets the new certificate"
    );
    assert!(
        !served(&server, server.tls_endpoint(&old_ca.pem(), None)).await,
        "and no longer the old one"
    );
    probe(open)
        .await
        .expect("the open connection keeps working");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_ca_decides_new_connections() {
    let ca = TestCa::new("CA");
    let files = TlsFiles::new(&ca.server(), Some(&ca.pem()));
    let server = TcpServer::start(|s| files.configure(s, true)).await;
    let tls = server.tls.clone().expect("TLS is on");
    let old_client = ca.client("old");
    let new_ca = TestCa::new("New client CA");
    let new_client = new_ca.client("new");
    let endpoint = |client: &Pem| server.tls_endpoint(&ca.pem(), Some((&client.cert, &client.key)));

    assert!(served(&server, endpoint(&old_client)).await);
    assert!(!served(&server, endpoint(&new_client)).await);
    std::fs::write(files.path("ca.pem"), new_ca.pem()).expect("write client CA");
    assert!(matches!(tls.reload(), Reload::Applied));
    assert!(
        served(&server, endpoint(&new_client)).await,
        "the new CA's clients"
    );
    assert!(
        !served(&server, endpoint(&old_client)).await,
        "no longer the old CA's"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_rotation_keeps_the_old_certificate_in_service() {
    let ca = TestCa::new("CA");
    let served_pem = ca.server();
    let files = TlsFiles::new(&served_pem, None);
    let server = TcpServer::start(|s| files.configure(s, false)).await;
    let tls = server.tls.clone().expect("TLS is on");

    // Half-written: the certificate cut off mid-way.
    let half = &served_pem.cert[..served_pem.cert.len() / 2];
    std::fs::write(files.path("cert.pem"), half).expect("write");
    assert!(matches!(tls.reload(), Reload::Rejected(_)));
    assert!(served(&server, server.tls_endpoint(&ca.pem(), None)).await);

    // A new certificate beside the old key: they do not match.
    let other = ca.server();
    std::fs::write(files.path("cert.pem"), &other.cert).expect("write");
    std::fs::write(files.path("key.pem"), &served_pem.key).expect("write");
    assert!(matches!(tls.reload(), Reload::Rejected(_)));
    assert!(served(&server, server.tls_endpoint(&ca.pem(), None)).await);

    // Garbage, and a file that is gone mid-rotation.
    std::fs::write(files.path("key.pem"), b"not a key").expect("write");
    assert!(matches!(tls.reload(), Reload::Rejected(_)));
    std::fs::remove_file(files.path("cert.pem")).expect("remove");
    assert!(matches!(tls.reload(), Reload::Rejected(_)));
    assert!(
        matches!(tls.reload(), Reload::Unchanged),
        "a missing file is reported once"
    );
    assert!(served(&server, server.tls_endpoint(&ca.pem(), None)).await);

    // A good set after the bad ones is applied.
    let new_ca = TestCa::new("New CA");
    files.write(&new_ca.server());
    assert!(matches!(tls.reload(), Reload::Applied));
    assert!(served(&server, server.tls_endpoint(&new_ca.pem(), None)).await);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reload_timer_picks_up_a_rotation_by_itself() {
    let old_ca = TestCa::new("Old CA");
    let files = TlsFiles::new(&old_ca.server(), None);
    let server = TcpServer::start(|s| {
        files.configure(s, false);
        s.platform.tls.reload_interval = Duration::from_millis(50);
    })
    .await;
    let new_ca = TestCa::new("New CA");
    files.write(&new_ca.server());
    eventually("new connections get the rotated certificate", LIMIT, || {
        served(&server, server.tls_endpoint(&new_ca.pem(), None))
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_handshake_is_dropped_and_others_are_served() {
    let ca = TestCa::new("CA");
    let files = TlsFiles::new(&ca.server(), None);
    let server = TcpServer::start(|s| {
        files.configure(s, false);
        s.platform.tls.handshake_timeout = Duration::from_millis(200);
    })
    .await;
    // Connects and says nothing: its handshake runs in a task of its own, so the accept loop goes
    // on, and the timeout closes it.
    let mut silent = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    assert!(served(&server, server.tls_endpoint(&ca.pem(), None)).await);
    let mut buffer = Vec::new();
    tokio::time::timeout(LIMIT, silent.read_to_end(&mut buffer))
        .await
        .expect("closed after the handshake timeout")
        .ok();
    server.shutdown().await;
}

#[tokio::test]
async fn bad_tls_settings_stop_start_up_naming_the_key_and_path() {
    let ca = TestCa::new("CA");
    let files = TlsFiles::new(&ca.server(), None);
    let mut settings = common::test_settings();
    files.configure(&mut settings, false);
    settings.platform.tls.key_file = Some(files.path("missing.pem"));
    let err = platform::tls::ServerTls::load(&settings.platform.tls)
        .err()
        .expect("missing key file");
    let message = err.to_string();
    assert!(
        message.contains("tls.key_file") && message.contains("missing.pem"),
        "{message}"
    );

    let mut settings = common::test_settings();
    settings.platform.tls.cert_file = Some(files.path("cert.pem"));
    let message = settings.check().expect_err("cert without key");
    assert!(
        message.contains("tls.cert_file") && message.contains("tls.key_file"),
        "{message}"
    );
}

// ---------------------------------------------------------------------------------------------
// JWT authentication and scopes
// ---------------------------------------------------------------------------------------------

const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "orders-api";
const SECRET: &[u8] = b"a development secret of enough length";

#[derive(serde::Serialize, Clone)]
struct Claims {
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    scope: String,
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn claims(scope: &str) -> Claims {
    Claims {
        sub: Some("alice".to_owned()),
        iss: Some(ISSUER.to_owned()),
        aud: Some(AUDIENCE.to_owned()),
        exp: Some(now() + 600),
        nbf: Some(now() - 10),
        scope: scope.to_owned(),
    }
}

fn hs256(claims: &Claims, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("sign token")
}

/// An app with JWT on, verifying with `key` written to a file (a secret or a PEM public key).
async fn jwt_app(key_file: &Path, secret: bool) -> TestApp {
    let key_file = key_file.to_owned();
    TestApp::spawn_with(Backend::Sqlite, move |s| {
        s.platform.auth.mode = AuthMode::Jwt;
        if secret {
            s.platform.auth.jwt_secret_file = Some(key_file);
        } else {
            s.platform.auth.jwt_public_key_file = Some(key_file);
        }
        s.platform.auth.issuer = ISSUER.to_owned();
        s.platform.auth.audience = AUDIENCE.to_owned();
    })
    .await
    .expect("SQLite app")
}

async fn get_with(app: &TestApp, token: Option<&str>) -> Result<(), tonic::Status> {
    let mut request = Request::new(api::GetOrderRequest {
        id: uuid::Uuid::new_v4().to_string(),
    });
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("metadata"),
        );
    }
    match app.orders.clone().get_order(request).await {
        Err(status) if status.code() == Code::NotFound => Ok(()),
        Err(status) => Err(status),
        Ok(_) => panic!("no order has a random id"),
    }
}

async fn create_with(app: &TestApp, token: &str) -> Result<api::Order, tonic::Status> {
    let mut request = Request::new(api::CreateOrderRequest {
        order: Some(order_to("Oslo")),
        request_id: String::new(),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("metadata"),
    );
    let response = app.orders.clone().create_order(request).await?;
    Ok(response.into_inner().order.expect("order"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_tokens_are_checked_for_signature_time_issuer_and_audience() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let secret_file = dir.path().join("secret");
    // A trailing newline, as `echo` writes it, is not part of the secret.
    std::fs::write(&secret_file, [SECRET, b"\n"].concat()).expect("write secret");
    let app = jwt_app(&secret_file, true).await;

    let unauthenticated = |result: Result<(), tonic::Status>| {
        let status = result.expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        reason(&status)
    };
    assert_eq!(
        unauthenticated(get_with(&app, None).await),
        "UNAUTHENTICATED_TOKEN_MISSING"
    );
    assert_eq!(
        unauthenticated(get_with(&app, Some("not-a-jwt")).await),
        "UNAUTHENTICATED_TOKEN_MALFORMED"
    );
    let mut expired = claims("orders.read");
    expired.exp = Some(now() - 3600);
    assert_eq!(
        unauthenticated(get_with(&app, Some(&hs256(&expired, SECRET))).await),
        "UNAUTHENTICATED_TOKEN_EXPIRED"
    );
    let mut early = claims("orders.read");
    early.nbf = Some(now() + 3600);
    assert_eq!(
        unauthenticated(get_with(&app, Some(&hs256(&early, SECRET))).await),
        "UNAUTHENTICATED_TOKEN_NOT_YET_VALID"
    );
    let forged = hs256(&claims("orders.read"), b"another secret of enough length!!");
    assert_eq!(
        unauthenticated(get_with(&app, Some(&forged)).await),
        "UNAUTHENTICATED_TOKEN_INVALID"
    );
    let mut foreign = claims("orders.read");
    foreign.iss = Some("https://elsewhere.test".to_owned());
    assert_eq!(
        unauthenticated(get_with(&app, Some(&hs256(&foreign, SECRET))).await),
        "UNAUTHENTICATED_TOKEN_INVALID"
    );
    let mut misdirected = claims("orders.read");
    misdirected.aud = Some("another-api".to_owned());
    assert_eq!(
        unauthenticated(get_with(&app, Some(&hs256(&misdirected, SECRET))).await),
        "UNAUTHENTICATED_TOKEN_INVALID"
    );
    for missing in ["exp", "iss", "aud"] {
        let mut partial = claims("orders.read");
        match missing {
            "exp" => partial.exp = None,
            "iss" => partial.iss = None,
            _ => partial.aud = None,
        }
        assert_eq!(
            unauthenticated(get_with(&app, Some(&hs256(&partial, SECRET))).await),
            "UNAUTHENTICATED_TOKEN_INVALID",
            "a token without {missing}"
        );
    }
    // Within the leeway an expired token still passes: clocks drift.
    let mut just_expired = claims("orders.read");
    just_expired.exp = Some(now() - 5);
    get_with(&app, Some(&hs256(&just_expired, SECRET)))
        .await
        .expect("within the leeway");

    get_with(&app, Some(&hs256(&claims("orders.read"), SECRET)))
        .await
        .expect("a valid token is served");
}

/// The access tokens of Auth0, Google and Keycloak: `iss`, `aud` (a string or an array), `exp`, `iat`,
/// `sub` and `scope`, and no `nbf`, which RFC 7519 makes optional.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standard_access_token_without_nbf_is_accepted_and_aud_may_be_an_array() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, SECRET).expect("write secret");
    let app = jwt_app(&secret_file, true).await;
    let sign = |claims: serde_json::Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET),
        )
        .expect("sign token")
    };

    let without_nbf = sign(serde_json::json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "scope": "orders.read",
        "iat": now(), "exp": now() + 600,
    }));
    get_with(&app, Some(&without_nbf))
        .await
        .expect("a token without nbf is served");
    // Served again from the verified-token cache, which must not require nbf either.
    get_with(&app, Some(&without_nbf))
        .await
        .expect("a token without nbf is served again");

    let audiences = sign(serde_json::json!({
        "iss": ISSUER, "aud": ["https://userinfo.test", AUDIENCE], "sub": "alice",
        "scope": "orders.read", "iat": now(), "exp": now() + 600,
    }));
    get_with(&app, Some(&audiences))
        .await
        .expect("an audience array naming this service is served");
    let other_audiences = sign(serde_json::json!({
        "iss": ISSUER, "aud": ["https://userinfo.test", "another-api"], "sub": "alice",
        "scope": "orders.read", "iat": now(), "exp": now() + 600,
    }));
    let status = get_with(&app, Some(&other_audiences))
        .await
        .expect_err("an audience array without this service");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // nbf, when present, is still checked.
    let early = sign(serde_json::json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "scope": "orders.read",
        "iat": now(), "exp": now() + 7200, "nbf": now() + 3600,
    }));
    let status = get_with(&app, Some(&early)).await.expect_err("nbf ahead");
    assert_eq!(reason(&status), "UNAUTHENTICATED_TOKEN_NOT_YET_VALID");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_decide_reads_and_writes_and_public_methods_need_no_token() {
    logs::capture();
    let dir = tempfile::tempdir().expect("temporary directory");
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, SECRET).expect("write secret");
    let app = jwt_app(&secret_file, true).await;

    let reader = hs256(&claims("orders.read"), SECRET);
    let mut writer_claims = claims("profile orders.write");
    writer_claims.sub = Some("scope-test-writer".to_owned());
    let writer = hs256(&writer_claims, SECRET);

    let status = create_with(&app, &reader).await.expect_err("read-only");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "PERMISSION_DENIED");
    let status = get_with(&app, Some(&writer)).await.expect_err("write-only");
    assert_eq!(status.code(), Code::PermissionDenied);
    create_with(&app, &writer).await.expect("a writer creates");
    get_with(&app, Some(&reader)).await.expect("a reader reads");

    // Health and reflection are public by default.
    assert_eq!(
        app.health_status("").await.ok(),
        Some(tonic_health::pb::health_check_response::ServingStatus::Serving)
    );
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            app.channel.clone(),
        );
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("reflection without a token")
        .into_inner();
    assert!(responses.message().await.expect("listing").is_some());

    // The subject is logged with the call; the token never is.
    eventually("the call's log line names the subject", LIMIT, || async {
        !logs::find(|line| {
            line["message"] == "rpc finished"
                && line["subject"] == "scope-test-writer"
                && line["rpc.method"] == "CreateOrder"
        })
        .is_empty()
    })
    .await;
    assert!(
        logs::find(|line| line.to_string().contains(&writer)).is_empty(),
        "a token value reached the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_tokens_verify_with_a_public_key_file() {
    let key = KeyPair::generate().expect("P-256 key");
    let dir = tempfile::tempdir().expect("temporary directory");
    let public_key_file = dir.path().join("public.pem");
    std::fs::write(&public_key_file, key.public_key_pem()).expect("write public key");
    let app = jwt_app(&public_key_file, false).await;

    let signing_key =
        jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("EC key");
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims("orders.read"),
        &signing_key,
    )
    .expect("sign");
    get_with(&app, Some(&token)).await.expect("ES256 token");

    // An HS256 token "signed" with the public key's text: the classic algorithm confusion.
    let confused = hs256(&claims("orders.read"), key.public_key_pem().as_bytes());
    let status = get_with(&app, Some(&confused)).await.expect_err("refused");
    assert_eq!(reason(&status), "UNAUTHENTICATED_TOKEN_INVALID");
}

#[test]
fn jwt_settings_need_exactly_one_key_and_an_issuer_and_audience() {
    let mut settings = Settings::default();
    settings.platform.auth.mode = AuthMode::Jwt;
    settings.platform.auth.issuer = ISSUER.to_owned();
    settings.platform.auth.audience = AUDIENCE.to_owned();
    let message = settings.check().expect_err("no key");
    assert!(message.contains("auth.jwt_secret_file"), "{message}");
    settings.platform.auth.jwt_secret_file = Some("secret".into());
    settings.platform.auth.jwt_public_key_file = Some("public.pem".into());
    assert!(settings.check().is_err(), "two keys");
    settings.platform.auth.jwt_public_key_file = None;
    settings.check().expect("one key");
    settings.platform.auth.audience.clear();
    let message = settings.check().expect_err("no audience");
    assert!(message.contains("auth.audience"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// A store that misbehaves on demand, for limits, deadlines and panics
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Faults {
    /// `get` waits until released (or forever), noting when its future is dropped.
    get_waits: AtomicBool,
    /// `get` panics.
    get_panics: AtomicBool,
    /// `search` yields its first order, then waits forever.
    search_stalls: AtomicBool,
    /// `search` yields its first order, then panics.
    search_panics: AtomicBool,
    release: Notify,
    gets_waiting: AtomicUsize,
    gets_dropped: AtomicUsize,
    /// Searches whose row stream was dropped before it ended.
    searches_dropped: Arc<AtomicUsize>,
}

struct Faulty {
    inner: Arc<dyn OrderStore>,
    faults: Arc<Faults>,
}

/// Counts a search whose rows were dropped before their end.
struct SearchDropWatch(Arc<AtomicUsize>, bool);

impl Drop for SearchDropWatch {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Counts a waiting `get` whose future was dropped before it finished.
struct DropWatch(Arc<Faults>, bool);

impl Drop for DropWatch {
    fn drop(&mut self) {
        if !self.1 {
            self.0.gets_dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[async_trait::async_trait]
impl OrderStore for Faulty {
    async fn create(
        &self,
        details: &OrderDetails,
        request_id: Option<&RequestId>,
    ) -> app::error::Result<Order> {
        self.inner.create(details, request_id).await
    }

    async fn get(&self, id: OrderId) -> app::error::Result<Order> {
        assert!(
            !self.faults.get_panics.load(Ordering::SeqCst),
            "injected panic in get"
        );
        if self.faults.get_waits.load(Ordering::SeqCst) {
            let mut watch = DropWatch(Arc::clone(&self.faults), false);
            let released = self.faults.release.notified();
            self.faults.gets_waiting.fetch_add(1, Ordering::SeqCst);
            released.await;
            watch.1 = true;
        }
        self.inner.get(id).await
    }

    async fn list(&self, after: Option<PageCursor>, page_size: u32) -> app::error::Result<Page> {
        self.inner.list(after, page_size).await
    }

    fn search(&self, query: &str) -> OrderStream {
        let stalls = self.faults.search_stalls.load(Ordering::SeqCst);
        let panics = self.faults.search_panics.load(Ordering::SeqCst);
        let rows = self.inner.search(query);
        let rows = if stalls || panics {
            rows.take(1).boxed()
        } else {
            rows
        };
        let rest = futures::stream::once(async move {
            assert!(!panics, "injected panic in a stream");
            if stalls {
                std::future::pending::<()>().await;
            }
        })
        .filter_map(|()| async { None });
        let watch = SearchDropWatch(Arc::clone(&self.faults.searches_dropped), false);
        rows.chain(rest)
            .chain(
                futures::stream::once(async move {
                    let mut watch = watch;
                    watch.1 = true;
                })
                .filter_map(|()| async { None }),
            )
            .boxed()
    }

    async fn update(&self, updates: &[OrderUpdate]) -> app::error::Result<()> {
        self.inner.update(updates).await
    }

    async fn ship(&self, ids: &[OrderId]) -> app::error::Result<Vec<Order>> {
        self.inner.ship(ids).await
    }

    async fn migrate(&self) -> app::error::Result<()> {
        self.inner.migrate().await
    }

    async fn check_ready(&self) -> app::error::Result<()> {
        self.inner.check_ready().await
    }

    async fn close(&self) {
        self.inner.close().await;
    }

    fn system(&self) -> &'static str {
        self.inner.system()
    }

    fn pool_status(&self) -> platform::telemetry::metrics::PoolStatus {
        self.inner.pool_status()
    }
}

async fn faulty_app(
    backend: Backend,
    configure: impl FnOnce(&mut Settings),
) -> Option<(TestApp, Arc<Faults>)> {
    let faults = Arc::new(Faults::default());
    let wrapped = Arc::clone(&faults);
    let app = TestApp::spawn_wrapping_with(backend, configure, move |inner| {
        Arc::new(Faulty {
            inner,
            faults: wrapped,
        })
    })
    .await?;
    Some((app, faults))
}

fn search(query: &str) -> api::SearchOrdersRequest {
    api::SearchOrdersRequest {
        query: query.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Limits and overload
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_max_in_flight_are_refused_at_once_and_health_still_answers() {
    let (app, faults) = faulty_app(Backend::Sqlite, |s| {
        s.platform.server.max_in_flight = 1.try_into().expect("non-zero");
    })
    .await
    .expect("SQLite app");
    wait_until_nothing_is_in_flight(&app).await;
    faults.get_waits.store(true, Ordering::SeqCst);
    let waiting = tokio::spawn(probe(app.channel.clone()));
    eventually("a call waits in the store", LIMIT, || async {
        faults.gets_waiting.load(Ordering::SeqCst) == 1
    })
    .await;

    let status = app
        .get(&OrderId::generate().to_string())
        .await
        .expect_err("over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "OVERLOADED");
    assert_eq!(
        app.health_status("").await.ok(),
        Some(tonic_health::pb::health_check_response::ServingStatus::Serving),
        "health is never shed"
    );

    faults.get_waits.store(false, Ordering::SeqCst);
    faults.release.notify_waiters();
    waiting
        .await
        .expect("task")
        .expect("the waiting call finishes");
    probe(app.channel.clone()).await.expect("room again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_counts_as_in_flight_until_its_body_ends() {
    let (app, faults) = faulty_app(Backend::Sqlite, |s| {
        s.platform.server.max_in_flight = 1.try_into().expect("non-zero");
    })
    .await
    .expect("SQLite app");
    wait_until_nothing_is_in_flight(&app).await;
    app.create_for("Oslo").await;
    faults.search_stalls.store(true, Ordering::SeqCst);
    let stream = search_and_take_one(&mut app.orders.clone(), "").await;

    // The handler returned long ago; the stream is still sending, so it still counts.
    let status = probe(app.channel.clone())
        .await
        .expect_err("over the limit");
    assert_eq!(reason(&status), "OVERLOADED");

    drop(stream);
    eventually("the abandoned stream's place is free", LIMIT, || async {
        probe(app.channel.clone()).await.is_ok()
    })
    .await;
}

/// Waits until a call goes through: the harness's start-up health watch, dropped by then, counts
/// as in flight until the server has seen it go.
async fn wait_until_nothing_is_in_flight(app: &TestApp) {
    eventually("the start-up health watch lets go", LIMIT, || async {
        probe(app.channel.clone()).await.is_ok()
    })
    .await;
}

/// Probes until the rate limit refuses one, and returns how many passed and the refusal.
async fn probe_until_limited(app: &TestApp, token: Option<&str>) -> (usize, tonic::Status) {
    for passed in 0..20 {
        if let Err(status) = get_with(app, token).await {
            return (passed, status);
        }
    }
    panic!("20 calls in a row passed a limit of 1 per second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_health_watch_counts_as_a_call_in_flight() {
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        s.platform.server.max_in_flight = 1.try_into().expect("non-zero");
    })
    .await
    .expect("SQLite app");
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel.clone());
    // The harness's own watch, dropped after start-up, may hold the place for a moment longer:
    // try for up to 30 s.
    let mut started = None;
    for _ in 0..1500 {
        match health
            .watch(tonic_health::pb::HealthCheckRequest::default())
            .await
        {
            Ok(watch) => {
                started = Some(watch.into_inner());
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let mut watch = started.expect("a watch starts");
    watch.message().await.expect("first status");
    let status = probe(app.channel.clone())
        .await
        .expect_err("the watch holds the only place");
    assert_eq!(reason(&status), "OVERLOADED");
    drop(watch);
    eventually("the watch's place is free again", LIMIT, || async {
        probe(app.channel.clone()).await.is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_refuses_with_retry_info_and_pushback() {
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        s.platform.server.rate_limit.per_second = 1;
        s.platform.server.rate_limit.burst = 3;
    })
    .await
    .expect("SQLite app");
    // The harness's own health Watch may have taken a token from the same (anonymous) bucket.
    let (passed, status) = probe_until_limited(&app, None).await;
    assert!(
        (2..=3).contains(&passed),
        "{passed} calls passed a burst of 3"
    );
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "RATE_LIMITED");
    use tonic_types::StatusExt;
    let retry = status
        .get_error_details()
        .retry_info()
        .and_then(|info| info.retry_delay)
        .expect("RetryInfo");
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(1),
        "{retry:?}"
    );
    let pushback: u64 = status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
        .expect("grpc-retry-pushback-ms");
    assert!(pushback <= 1000, "{pushback}");
    assert_eq!(
        app.health_status("").await.ok(),
        Some(tonic_health::pb::health_check_response::ServingStatus::Serving),
        "health checks are never limited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_authenticated_subject_has_a_bucket_of_its_own() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, SECRET).expect("write secret");
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        s.platform.auth.mode = AuthMode::Jwt;
        s.platform.auth.jwt_secret_file = Some(secret_file);
        s.platform.auth.issuer = ISSUER.to_owned();
        s.platform.auth.audience = AUDIENCE.to_owned();
        s.platform.server.rate_limit.per_second = 1;
        s.platform.server.rate_limit.burst = 2;
    })
    .await
    .expect("SQLite app");
    let token = |subject: &str| {
        let mut claims = claims("orders.read");
        claims.sub = Some(subject.to_owned());
        hs256(&claims, SECRET)
    };
    let (alice, bob) = (token("alice"), token("bob"));
    let (passed, status) = probe_until_limited(&app, Some(&alice)).await;
    assert_eq!(passed, 2, "alice's burst");
    assert_eq!(reason(&status), "RATE_LIMITED");
    get_with(&app, Some(&bob))
        .await
        .expect("bob's bucket is his own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_request_is_resource_exhausted_and_the_connection_carries_on() {
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        s.platform.server.max_message_bytes = 64 * 1024
    })
    .await
    .expect("SQLite app");
    let mut order = order_to("Oslo");
    order.description = "x".repeat(100 * 1024);
    let status = app
        .orders
        .clone()
        .create_order(api::CreateOrderRequest {
            order: Some(order),
            request_id: String::new(),
        })
        .await
        .expect_err("too large");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "MESSAGE_TOO_LARGE");
    probe(app.channel.clone())
        .await
        .expect("the same connection serves on");
    assert!(app.list_all().await.is_empty(), "nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_response_is_resource_exhausted_too() {
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        s.platform.server.max_message_bytes = 4 * 1024
    })
    .await
    .expect("SQLite app");
    // Each order fits in a message; a page of three does not.
    for _ in 0..3 {
        let mut order = order_to("Oslo");
        order.description = "d".repeat(1500);
        app.create(order).await;
    }
    let status = app
        .orders
        .clone()
        .list_orders(api::ListOrdersRequest {
            page_size: 3,
            page_token: String::new(),
        })
        .await
        .expect_err("the page is too large to send");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "MESSAGE_TOO_LARGE");
}

// ---------------------------------------------------------------------------------------------
// Deadlines
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_deadline_ends_the_call_and_drops_its_work() {
    let (app, faults) = faulty_app(Backend::Sqlite, |_| {})
        .await
        .expect("SQLite app");
    faults.get_waits.store(true, Ordering::SeqCst);
    let mut request = Request::new(api::GetOrderRequest {
        id: OrderId::generate().to_string(),
    });
    request.set_timeout(Duration::from_millis(200));
    let status = app
        .orders_without_client_deadlines()
        .await
        .get_order(request)
        .await
        .expect_err("past its deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(reason(&status), "DEADLINE_EXCEEDED");
    eventually("the store call is dropped", LIMIT, || async {
        faults.gets_dropped.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_own_deadline_applies_method_over_service_over_default() {
    let service = app::api::ORDER_SERVICE_NAME;
    let (app, faults) = faulty_app(Backend::Sqlite, |s| {
        // The service's limit is long; the method's own is short and wins.
        s.platform
            .server
            .timeouts
            .services
            .insert(service.to_owned(), Duration::from_secs(3600));
        s.platform
            .server
            .timeouts
            .methods
            .insert(format!("{service}/GetOrder"), Duration::from_millis(200));
    })
    .await
    .expect("SQLite app");
    faults.get_waits.store(true, Ordering::SeqCst);
    // The client sends no deadline at all.
    let status = probe(app.channel.clone())
        .await
        .expect_err("server deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded);
    // A shorter client deadline still wins over the server's.
    let mut request = Request::new(api::GetOrderRequest {
        id: OrderId::generate().to_string(),
    });
    request.set_timeout(Duration::from_millis(50));
    let status = app
        .orders_without_client_deadlines()
        .await
        .get_order(request)
        .await
        .expect_err("late");
    assert_eq!(status.code(), Code::DeadlineExceeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stream_is_cut_mid_way_with_deadline_exceeded() {
    let service = app::api::ORDER_SERVICE_NAME;
    let (app, faults) = faulty_app(Backend::Sqlite, |s| {
        s.platform.server.timeouts.methods.insert(
            format!("{service}/SearchOrders"),
            Duration::from_millis(300),
        );
    })
    .await
    .expect("SQLite app");
    app.create_for("Oslo").await;
    faults.search_stalls.store(true, Ordering::SeqCst);
    let mut stream = search_and_take_one(&mut app.orders.clone(), "").await;
    let status = stream.message().await.expect_err("cut at the deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(reason(&status), "DEADLINE_EXCEEDED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_stops_reading_is_still_dropped_at_its_deadline() {
    let service = app::api::ORDER_SERVICE_NAME;
    let (app, faults) = faulty_app(Backend::Sqlite, |s| {
        s.platform.server.timeouts.methods.insert(
            format!("{service}/SearchOrders"),
            Duration::from_millis(500),
        );
    })
    .await
    .expect("SQLite app");
    // About 80 KB of matches: more than tonic buffers (32 KiB) and the window together.
    for _ in 0..40 {
        let mut order = order_to("Oslo");
        order.description = "d".repeat(1900);
        app.create(order).await;
    }
    // A 1 KiB stream window that the client never opens again: the server fills it and hyper stops
    // polling the response, so only the watchdog can end the search.
    let stingy = app
        .channel_with(|endpoint| endpoint.initial_stream_window_size(1024))
        .await;
    let stalled = OrderServiceClient::new(stingy)
        .search_orders(search(""))
        .await
        .expect("stream starts")
        .into_inner();
    eventually("the stalled search is dropped", LIMIT, || async {
        faults.searches_dropped.load(Ordering::SeqCst) == 1
    })
    .await;
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_client_stream_applies_nothing_when_its_deadline_passes() {
    let app = TestApp::spawn(Backend::Sqlite).await.expect("SQLite app");
    let created = app.create_for("Oslo").await;
    let (updates, messages) = tokio::sync::mpsc::channel(4);
    let mut changed = created.clone();
    changed.destination = "Bergen".to_owned();
    updates
        .send(api::UpdateOrdersRequest {
            order: Some(changed),
        })
        .await
        .expect("queue update");
    // The client never half-closes: the stream is unfinished when its deadline passes.
    let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(messages));
    request.set_timeout(Duration::from_millis(300));
    let status = app
        .orders_without_client_deadlines()
        .await
        .update_orders(request)
        .await
        .expect_err("past its deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded);
    drop(updates);
    assert_eq!(
        app.get(&created.id).await.expect("get").destination,
        "Oslo",
        "nothing from the unfinished stream is applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bidi_stream_is_cut_when_its_deadline_passes() {
    let service = app::api::ORDER_SERVICE_NAME;
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        s.platform.server.timeouts.methods.insert(
            format!("{service}/ProcessOrders"),
            Duration::from_millis(300),
        );
    })
    .await
    .expect("SQLite app");
    let created = app.create_for("Oslo").await;
    let (requests, messages) = tokio::sync::mpsc::channel(4);
    requests
        .send(api::ProcessOrdersRequest {
            order_id: created.id.clone(),
        })
        .await
        .expect("queue request");
    // One order of a batch of three, and the client never half-closes: nothing ships by itself.
    let mut shipments = app
        .orders
        .clone()
        .process_orders(tokio_stream::wrappers::ReceiverStream::new(messages))
        .await
        .expect("stream starts")
        .into_inner();
    let status = shipments.message().await.expect_err("cut at the deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded);
    drop(requests);
    assert_eq!(
        app.get(&created.id).await.expect("get").status(),
        api::OrderStatus::Pending,
        "nothing shipped"
    );
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_in_progress_rolls_back_when_the_deadline_passes() {
    use sqlx::Connection;

    let Some(app) = TestApp::spawn(Backend::Postgres).await else {
        return;
    };
    let first = app.create_for("Oslo").await;
    let second = app.create_for("Oslo").await;

    // Another session locks the second order, so the service's transaction updates the first and
    // then waits on the second when the deadline passes.
    let options = app.postgres_options().expect("a PostgreSQL app");
    let mut locker = sqlx::PgConnection::connect_with(&options)
        .await
        .expect("connect");
    let mut lock = locker.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE")
        .bind(uuid::Uuid::parse_str(&second.id).expect("UUID"))
        .execute(&mut *lock)
        .await
        .expect("lock the second order");

    let updates = [&first, &second].map(|order| {
        let mut changed = order.clone();
        changed.destination = "Bergen".to_owned();
        api::UpdateOrdersRequest {
            order: Some(changed),
        }
    });
    let mut request = Request::new(futures::stream::iter(updates));
    request.set_timeout(Duration::from_millis(500));
    let status = app
        .orders_without_client_deadlines()
        .await
        .update_orders(request)
        .await
        .expect_err("blocked past its deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded);
    lock.rollback().await.expect("release the lock");

    for order in [&first, &second] {
        assert_eq!(
            app.get(&order.id).await.expect("get").destination,
            "Oslo",
            "the interrupted transaction rolled back"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Panics
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_answers_internal_and_everything_else_goes_on() {
    let (app, faults) = faulty_app(Backend::Sqlite, |_| {})
        .await
        .expect("SQLite app");
    let created = app.create_for("Oslo").await;
    faults.get_panics.store(true, Ordering::SeqCst);
    let status = app.get(&created.id).await.expect_err("panicked");
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(status.message(), "internal error", "no panic text leaks");
    assert_eq!(reason(&status), "INTERNAL");

    faults.get_panics.store(false, Ordering::SeqCst);
    assert_eq!(
        app.get(&created.id).await.expect("same connection"),
        created
    );
    assert_eq!(app.list_all().await, [created]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_stream_ends_with_internal_after_what_it_sent() {
    let (app, faults) = faulty_app(Backend::Sqlite, |_| {})
        .await
        .expect("SQLite app");
    app.create_for("Oslo").await;
    faults.search_panics.store(true, Ordering::SeqCst);
    let mut stream = search_and_take_one(&mut app.orders.clone(), "").await;
    let status = stream.message().await.expect_err("panicked");
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(reason(&status), "INTERNAL");
    probe(app.channel.clone())
        .await
        .expect("the server goes on");
}

// ---------------------------------------------------------------------------------------------
// Hostile input over a socket
// ---------------------------------------------------------------------------------------------

/// Sends raw bytes as a unary call's request message, so a test can send what no client would.
#[derive(Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Self::Item,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Self::Item>, Self::Error> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

async fn raw_call(
    channel: Channel,
    path: &str,
    message: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
    let path = path.parse().expect("path");
    Ok(grpc
        .unary(Request::new(message), path, RawCodec)
        .await?
        .into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_their_codes_and_the_server_keeps_serving() {
    let server = TcpServer::start(|s| s.platform.server.max_message_bytes = 64 * 1024).await;
    let channel = server
        .connect(server.plaintext_endpoint())
        .await
        .expect("connect");
    let get_order = format!("/{}/GetOrder", app::api::ORDER_SERVICE_NAME);

    // Field 1 (id), a string, holding bytes that are not UTF-8.
    let status = raw_call(channel.clone(), &get_order, vec![0x0a, 0x02, 0xff, 0xfe])
        .await
        .expect_err("invalid UTF-8");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "MALFORMED_MESSAGE");

    // Not protobuf at all: a length that runs past the end.
    let status = raw_call(channel.clone(), &get_order, vec![0x0a, 0xff, 0x01])
        .await
        .expect_err("garbage");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let status = raw_call(channel.clone(), &get_order, vec![0; 100 * 1024])
        .await
        .expect_err("oversize");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "MESSAGE_TOO_LARGE");

    for unknown in [
        format!("/{}/NoSuchMethod", app::api::ORDER_SERVICE_NAME),
        "/no.such.v1.Service/Call".to_owned(),
    ] {
        let status = raw_call(channel.clone(), &unknown, Vec::new())
            .await
            .expect_err("unknown method");
        assert_eq!(status.code(), Code::Unimplemented, "{unknown}");
        assert_eq!(reason(&status), "METHOD_NOT_FOUND");
    }

    // Raw garbage instead of HTTP/2: the server closes that connection and no other.
    let mut garbage = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    garbage
        .write_all(&[0x16, 0x03, 0x01, 0xde, 0xad, 0xbe, 0xef].repeat(200))
        .await
        .expect("write garbage");
    let mut rest = Vec::new();
    tokio::time::timeout(LIMIT, garbage.read_to_end(&mut rest))
        .await
        .expect("the server closes a garbage connection")
        .ok();

    probe(channel)
        .await
        .expect("the first connection still serves");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_streams_on_one_connection_wait_for_room_and_all_succeed() {
    let server = TcpServer::start(|s| s.platform.server.max_concurrent_streams = 100).await;
    let channel = server
        .connect(server.plaintext_endpoint())
        .await
        .expect("one connection");
    let calls = (0..2000).map(|_| probe(channel.clone()));
    let results = futures::future::join_all(calls).await;
    let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 connection management, seen from a raw socket
// ---------------------------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
const GOAWAY: u8 = 7;
const PING: u8 = 6;

/// Reads HTTP/2 frames until one of type `wanted` arrives; `false` if the connection closes first.
async fn read_until_frame(stream: &mut tokio::net::TcpStream, wanted: u8) -> bool {
    loop {
        let mut header = [0u8; 9];
        if stream.read_exact(&mut header).await.is_err() {
            return false;
        }
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; length];
        if stream.read_exact(&mut payload).await.is_err() {
            return false;
        }
        if header[3] == wanted {
            return true;
        }
    }
}

async fn open_h2(server: &TcpServer) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    stream.write_all(PREFACE).await.expect("preface");
    stream.write_all(&EMPTY_SETTINGS).await.expect("settings");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_answer_pings_is_disconnected() {
    let server = TcpServer::start(|s| {
        s.platform.server.keepalive_interval = Duration::from_millis(100);
        s.platform.server.keepalive_timeout = Duration::from_millis(200);
    })
    .await;
    let mut stream = open_h2(&server).await;
    // This peer reads but never acknowledges a PING; no frame type 255 exists, so this reads until
    // the server closes the connection.
    let closed = tokio::time::timeout(LIMIT, read_until_frame(&mut stream, 255)).await;
    assert_eq!(closed.ok(), Some(false), "closed for an unanswered PING");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_announces_its_stream_limit() {
    let server = TcpServer::start(|s| s.platform.server.max_concurrent_streams = 37).await;
    let mut stream = open_h2(&server).await;
    // The server's first frame is its SETTINGS: 6-byte entries of a 16-bit id and a 32-bit value.
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).await.expect("frame header");
    assert_eq!(header[3], 4, "SETTINGS first");
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload).await.expect("settings");
    let max_concurrent_streams = payload
        .chunks_exact(6)
        .find(|entry| entry[..2] == [0, 3])
        .map(|entry| u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]));
    assert_eq!(max_concurrent_streams, Some(37));
    drop(stream);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_no_preface_is_closed() {
    let server =
        TcpServer::start(|s| s.platform.server.preface_timeout = Duration::from_millis(200)).await;
    let mut silent = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let mut buffer = Vec::new();
    tokio::time::timeout(LIMIT, silent.read_to_end(&mut buffer))
        .await
        .expect("closed after the preface timeout")
        .ok();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_sent_goaway() {
    let server =
        TcpServer::start(|s| s.platform.server.max_connection_idle = Duration::from_millis(200))
            .await;
    let mut stream = open_h2(&server).await;
    let goaway = tokio::time::timeout(LIMIT, read_until_frame(&mut stream, GOAWAY))
        .await
        .expect("within the limit");
    assert!(goaway, "GOAWAY before the connection closed");
    drop(stream); // A real client hangs up after GOAWAY; this one would keep shutdown waiting.
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_connection_is_sent_goaway_then_closed_after_its_grace() {
    let server = TcpServer::start(|s| {
        s.platform.server.max_connection_idle = Duration::ZERO;
        s.platform.server.max_connection_age = Duration::from_millis(200);
        s.platform.server.max_connection_age_grace = Duration::from_millis(200);
    })
    .await;
    let mut stream = open_h2(&server).await;
    let goaway = tokio::time::timeout(LIMIT, read_until_frame(&mut stream, GOAWAY))
        .await
        .expect("within the limit");
    assert!(goaway, "GOAWAY at the connection's age");
    // No frame type 255 exists: this reads until the server closes the connection.
    let closed = tokio::time::timeout(LIMIT, read_until_frame(&mut stream, 255)).await;
    assert_eq!(closed.ok(), Some(false), "closed after the grace period");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_connections_are_pinged() {
    let server = TcpServer::start(|s| {
        s.platform.server.keepalive_interval = Duration::from_millis(100);
        s.platform.server.keepalive_timeout = Duration::from_secs(20);
    })
    .await;
    let mut stream = open_h2(&server).await;
    let pinged = tokio::time::timeout(LIMIT, read_until_frame(&mut stream, PING))
        .await
        .expect("within the limit");
    assert!(pinged, "a keepalive PING");
    drop(stream);
    server.shutdown().await;
}
