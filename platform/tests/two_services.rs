//! One server, two gRPC services registered side by side, each with its own scopes, deadlines and
//! readiness: what a service crate gets from the platform, shown on the platform's test services
//! over a loopback port.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use platform::{
    config::{AuthMode, PlatformSettings},
    health::Dependency,
    server::{Policy, Server},
};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

mod testing {
    include!(concat!(env!("OUT_DIR"), "/platform.testing.v1.rs"));

    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("testing_descriptor");
}

use testing::{
    AddRequest, AddResponse, ChatRequest, ChatResponse, CollectRequest, CollectResponse,
    RepeatRequest, RepeatResponse, SayRequest, SayResponse,
    counter_service_client::CounterServiceClient,
    counter_service_server::{CounterService, CounterServiceServer},
    echo_service_client::EchoServiceClient,
    echo_service_server::{EchoService, EchoServiceServer},
};

const ECHO: &str = "platform.testing.v1.EchoService";
const COUNTER: &str = "platform.testing.v1.CounterService";
const SECRET: &[u8] = b"a test secret of enough length for HS256";
const SERVICE: platform::ServiceInfo = platform::ServiceInfo {
    name: "two-services",
    version: "0.0.0",
    revision: "test",
    rustc: "test",
};

/// How long a call asked to be slow (`text` or `amount` "slow") takes: past the counter's deadline,
/// well within the echo's.
const SLOW: Duration = Duration::from_millis(300);

struct Echo;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl EchoService for Echo {
    async fn say(&self, request: Request<SayRequest>) -> Result<Response<SayResponse>, Status> {
        let text = request.into_inner().text;
        if text == "slow" {
            tokio::time::sleep(SLOW).await;
        }
        Ok(Response::new(SayResponse { text }))
    }

    type RepeatStream = BoxStream<RepeatResponse>;

    async fn repeat(
        &self,
        request: Request<RepeatRequest>,
    ) -> Result<Response<Self::RepeatStream>, Status> {
        let RepeatRequest { text, count } = request.into_inner();
        let replies = (0..count).map(move |_| Ok(RepeatResponse { text: text.clone() }));
        Ok(Response::new(Box::pin(futures::stream::iter(replies))))
    }

    async fn collect(
        &self,
        request: Request<Streaming<CollectRequest>>,
    ) -> Result<Response<CollectResponse>, Status> {
        let mut stream = request.into_inner();
        let mut texts = Vec::new();
        while let Some(message) = stream.next().await {
            texts.push(message?.text);
        }
        Ok(Response::new(CollectResponse {
            text: texts.join(" "),
        }))
    }

    type ChatStream = BoxStream<ChatResponse>;

    async fn chat(
        &self,
        request: Request<Streaming<ChatRequest>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        let replies = request
            .into_inner()
            .map(|message| message.map(|message| ChatResponse { text: message.text }));
        Ok(Response::new(Box::pin(replies)))
    }
}

#[derive(Default)]
struct Counter {
    total: AtomicI64,
}

#[tonic::async_trait]
impl CounterService for Counter {
    async fn add(&self, request: Request<AddRequest>) -> Result<Response<AddResponse>, Status> {
        let amount = request.into_inner().amount;
        if amount == 0 {
            tokio::time::sleep(SLOW).await;
        }
        let total = self.total.fetch_add(amount, Ordering::SeqCst) + amount;
        Ok(Response::new(AddResponse { total }))
    }
}

/// A dependency whose checks pass once `up` is set.
struct Switch {
    up: AtomicBool,
}

#[async_trait]
impl Dependency for Switch {
    fn name(&self) -> &str {
        "switch"
    }

    async fn check(&self) -> Result<(), String> {
        if self.up.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("switched off".to_owned())
        }
    }
}

struct TwoServices {
    channel: Channel,
    counter_dependency: Arc<Switch>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<Result<(), platform::server::ServerError>>,
    _secret: tempfile::NamedTempFile,
}

impl TwoServices {
    async fn start() -> Self {
        let secret = tempfile::NamedTempFile::new().expect("temporary file");
        std::fs::write(secret.path(), SECRET).expect("write the secret");
        let mut settings = PlatformSettings::default();
        settings.server.metrics_addr = None;
        settings.auth.mode = AuthMode::Jwt;
        settings.auth.jwt_secret_file = Some(secret.path().to_owned());
        settings.auth.issuer = "https://issuer.test".to_owned();
        settings.auth.audience = "two-services".to_owned();
        // Each service its own deadline: the counter's calls get 100 ms, the echo's 10 s.
        let timeouts = &mut settings.server.timeouts;
        timeouts
            .services
            .insert(ECHO.to_owned(), Duration::from_secs(10));
        timeouts
            .services
            .insert(COUNTER.to_owned(), Duration::from_millis(100));
        settings.health.check_interval = Duration::from_millis(20);
        settings.health.failure_threshold = std::num::NonZeroU32::MIN;

        let echo_dependency = Arc::new(Switch {
            up: AtomicBool::new(true),
        });
        let counter_dependency = Arc::new(Switch {
            up: AtomicBool::new(false),
        });
        let server = Server::builder(&settings, SERVICE)
            .error_domain("platform.testing.v1")
            .service(
                EchoServiceServer::new(Echo),
                Policy::new(testing::FILE_DESCRIPTOR_SET).scopes(&[
                    ("Say", "echo.read"),
                    ("Repeat", "echo.read"),
                    ("Collect", "echo.write"),
                    ("Chat", "echo.write"),
                ]),
            )
            .service(
                CounterServiceServer::new(Counter::default()),
                Policy::new(testing::FILE_DESCRIPTOR_SET).scopes(&[("Add", "counter.write")]),
            )
            .readiness(&[ECHO], echo_dependency)
            .readiness(
                &[COUNTER],
                Arc::clone(&counter_dependency) as Arc<dyn Dependency>,
            )
            .build()
            .await
            .expect("the server builds");

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let stop = CancellationToken::new();
        let server = tokio::spawn(server.serve_with_incoming(
            platform::server::incoming(listener),
            stop.clone().cancelled_owned(),
        ));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        Self {
            channel,
            counter_dependency,
            stop,
            server,
            _secret: secret,
        }
    }

    async fn health(&self, service: &str) -> ServingStatus {
        let response = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("health answers");
        response.into_inner().status()
    }

    /// Waits (bounded) until `service` reports `wanted`.
    async fn wait_for(&self, service: &str, wanted: ServingStatus) {
        for _ in 0..250 {
            if self.health(service).await == wanted {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{service} never reported {wanted:?}");
    }

    async fn stop(self) {
        self.stop.cancel();
        self.server
            .await
            .expect("the server task")
            .expect("the server stops cleanly");
    }
}

fn token(scope: &str) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = serde_json::json!({
        "iss": "https://issuer.test", "aud": "two-services", "sub": "tester",
        "scope": scope, "iat": now, "exp": now + 600,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET),
    )
    .expect("sign")
}

fn with_token<T>(message: T, scope: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token(scope))
            .parse()
            .expect("metadata"),
    );
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_has_its_own_readiness() {
    let server = TwoServices::start().await;
    server.wait_for(ECHO, ServingStatus::Serving).await;
    assert_eq!(server.health(COUNTER).await, ServingStatus::NotServing);
    assert_eq!(server.health("").await, ServingStatus::Serving, "alive");

    server.counter_dependency.up.store(true, Ordering::SeqCst);
    server.wait_for(COUNTER, ServingStatus::Serving).await;
    server.counter_dependency.up.store(false, Ordering::SeqCst);
    server.wait_for(COUNTER, ServingStatus::NotServing).await;
    assert_eq!(server.health(ECHO).await, ServingStatus::Serving);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_has_its_own_scopes() {
    let server = TwoServices::start().await;
    let mut echo = EchoServiceClient::new(server.channel.clone());
    let mut counter = CounterServiceClient::new(server.channel.clone());

    let said = echo
        .say(with_token(SayRequest { text: "hi".into() }, "echo.read"))
        .await
        .expect("an echo reader says");
    assert_eq!(said.into_inner().text, "hi");
    let refused = counter
        .add(with_token(AddRequest { amount: 1 }, "echo.read"))
        .await
        .expect_err("an echo reader cannot add");
    assert_eq!(refused.code(), Code::PermissionDenied);

    let added = counter
        .add(with_token(AddRequest { amount: 2 }, "counter.write"))
        .await
        .expect("a counter writer adds");
    assert_eq!(added.into_inner().total, 2);
    let refused = echo
        .say(with_token(
            SayRequest { text: "hi".into() },
            "counter.write",
        ))
        .await
        .expect_err("a counter writer cannot say");
    assert_eq!(refused.code(), Code::PermissionDenied);

    let anonymous = echo
        .say(SayRequest { text: "hi".into() })
        .await
        .expect_err("no token");
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_has_its_own_deadline_and_every_call_kind_is_served() {
    let server = TwoServices::start().await;
    let mut echo = EchoServiceClient::new(server.channel.clone());
    let mut counter = CounterServiceClient::new(server.channel.clone());

    let slow_add = counter
        .add(with_token(AddRequest { amount: 0 }, "counter.write"))
        .await
        .expect_err("past the counter's 100 ms");
    assert_eq!(slow_add.code(), Code::DeadlineExceeded);
    let slow_say = echo
        .say(with_token(
            SayRequest {
                text: "slow".into(),
            },
            "echo.read",
        ))
        .await
        .expect("well within the echo's 10 s");
    assert_eq!(slow_say.into_inner().text, "slow");

    let repeated: Vec<String> = echo
        .repeat(with_token(
            RepeatRequest {
                text: "x".into(),
                count: 3,
            },
            "echo.read",
        ))
        .await
        .expect("a server stream")
        .into_inner()
        .map(|reply| reply.expect("a reply").text)
        .collect()
        .await;
    assert_eq!(repeated, ["x", "x", "x"]);
    let words = ["a", "b"].map(|text| CollectRequest { text: text.into() });
    let collected = echo
        .collect(with_token(futures::stream::iter(words), "echo.write"))
        .await
        .expect("a client stream");
    assert_eq!(collected.into_inner().text, "a b");
    let chat = ["c", "d"].map(|text| ChatRequest { text: text.into() });
    let replies: Vec<String> = echo
        .chat(with_token(futures::stream::iter(chat), "echo.write"))
        .await
        .expect("a bidi stream")
        .into_inner()
        .map(|reply| reply.expect("a reply").text)
        .collect()
        .await;
    assert_eq!(replies, ["c", "d"]);
    server.stop().await;
}
