//! The real binary, started as a process on a free loopback port and called over TCP.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
};

use app::api::ORDER_SERVICE_NAME;
use app::api::{
    self, CreateOrderRequest, GetOrderRequest, order_service_client::OrderServiceClient,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStdout, Command},
};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The service binary. Found by package name rather than `env!("CARGO_BIN_EXE_<name>")`, so this file
/// stays the same in every service generated from the template: cargo builds it beside `deps/`.
fn binary() -> PathBuf {
    let test_exe = std::env::current_exe().expect("test executable path");
    let profile_dir = test_exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    profile_dir.join(format!(
        "{}{}",
        env!("CARGO_PKG_NAME"),
        std::env::consts::EXE_SUFFIX
    ))
}

/// A command for the binary in `dir`, with no configuration from the surrounding environment.
fn command(dir: &Path) -> Command {
    let mut command = Command::new(binary());
    command.current_dir(dir).kill_on_drop(true);
    for (name, _) in std::env::vars() {
        if name.starts_with("APP_") || name.starts_with("OTEL_") || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    command
}

struct RunningServer {
    child: Child,
    addr: String,
    /// Where `/metrics` is served, when it is.
    metrics_addr: Option<String>,
    /// What the server logged before it started serving.
    startup: Vec<serde_json::Value>,
    log: Lines<BufReader<ChildStdout>>,
}

impl RunningServer {
    async fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[]).await
    }

    /// Starts the binary with the environment variables `env` added.
    async fn start_with(dir: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = command(dir)
            .arg("serve")
            .env("APP_SERVER__GRPC_ADDR", "127.0.0.1:0")
            .env("APP_SERVER__METRICS_ADDR", "127.0.0.1:0")
            .env("APP_HEALTH__CHECK_INTERVAL", "100ms")
            // No load balancer to wait for; the drain tests set their own.
            .env("APP_SHUTDOWN__DRAIN_DELAY", "0s")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .expect("binary starts");
        let mut log = BufReader::new(child.stdout.take().expect("stdout")).lines();
        // The port is chosen by the OS; the server logs the address it bound.
        let mut startup = Vec::new();
        let addr = loop {
            let line = log
                .next_line()
                .await
                .expect("read log")
                .expect("server logs its address before exiting");
            let entry: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
            if entry["message"] == "serving gRPC" {
                break entry["addr"].as_str().expect("addr field").to_owned();
            }
            startup.push(entry);
        };
        let metrics_addr = startup
            .iter()
            .find(|entry| entry["message"] == "serving metrics at /metrics")
            .and_then(|entry| entry["addr"].as_str())
            .map(str::to_owned);
        Self {
            child,
            addr,
            metrics_addr,
            startup,
            log,
        }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("URI")
            .connect()
            .await
            .expect("TCP connection")
    }

    async fn wait_until_serving(&self) {
        let mut health = HealthClient::new(self.channel().await);
        let mut updates = health
            .watch(HealthCheckRequest {
                service: ORDER_SERVICE_NAME.to_owned(),
            })
            .await
            .expect("watch")
            .into_inner();
        while let Some(update) = updates.message().await.expect("watch continues") {
            if update.status() == ServingStatus::Serving {
                return;
            }
        }
        panic!("health watch ended before SERVING");
    }

    /// Sends `signal` (`TERM`, `INT`) and returns the rest of the log once the process has exited
    /// successfully.
    async fn stop_with(mut self, signal: &str) -> Vec<serde_json::Value> {
        let pid = self.child.id().expect("running").to_string();
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .await
            .expect("kill runs");
        assert!(sent.success());
        let mut entries = Vec::new();
        while let Some(line) = self.log.next_line().await.expect("read log") {
            entries.push(serde_json::from_str(&line).expect("JSON log line"));
        }
        let status = self.child.wait().await.expect("exit status");
        assert!(status.success(), "clean exit after SIG{signal}: {status}");
        entries
    }
}

#[tokio::test]
async fn binary_serves_over_tcp_persists_to_sqlite_and_stops_on_sigterm_or_sigint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = RunningServer::start(dir.path()).await;
    assert!(
        server.startup.iter().any(|entry| entry["level"] == "WARN"
            && entry["message"]
                .as_str()
                .is_some_and(|message| message.starts_with("TLS is off"))),
        "plaintext is announced at start-up: {:?}",
        server.startup
    );
    server.wait_until_serving().await;

    let mut orders = OrderServiceClient::new(server.channel().await);
    let created = create_order(&mut orders).await;

    // An error sent as a trailers-only response, and a server stream ending in trailers: both logged.
    let invalid = orders
        .get_order(GetOrderRequest { id: "bad".into() })
        .await
        .expect_err("invalid id");
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    let mut matches = orders
        .search_orders(api::SearchOrdersRequest {
            query: "widget".into(),
        })
        .await
        .expect("search")
        .into_inner();
    while matches.message().await.expect("search stream").is_some() {}

    let healthcheck = command(dir.path())
        .arg("healthcheck")
        .env("APP_SERVER__GRPC_ADDR", &server.addr)
        .output()
        .await
        .expect("healthcheck runs");
    assert!(healthcheck.status.success(), "{healthcheck:?}");

    let log = server.stop_with("TERM").await;
    let rpc_lines = |method: &str| -> Vec<&serde_json::Value> {
        log.iter()
            .filter(|entry| entry["message"] == "rpc finished" && entry["rpc.method"] == method)
            .collect()
    };
    for (method, code) in [("CreateOrder", 0), ("GetOrder", 3), ("SearchOrders", 0)] {
        let lines = rpc_lines(method);
        assert_eq!(lines.len(), 1, "one log line per {method} call: {lines:?}");
        assert_eq!(lines[0]["rpc.service"], ORDER_SERVICE_NAME);
        assert_eq!(lines[0]["rpc.grpc.status_code"], code, "{method}");
        assert!(lines[0]["duration_ms"].is_number());
    }
    assert!(log.iter().any(|entry| entry["signal"] == "SIGTERM"));
    assert!(log.iter().any(|entry| entry["message"] == "server stopped"));
    assert!(
        dir.path().join("orders.db").exists(),
        "the default database is a file in the working directory"
    );

    // The order survives a restart; Ctrl-C stops the server as cleanly as SIGTERM.
    let server = RunningServer::start(dir.path()).await;
    server.wait_until_serving().await;
    let fetched = OrderServiceClient::new(server.channel().await)
        .get_order(GetOrderRequest {
            id: created.id.clone(),
        })
        .await
        .expect("get after restart")
        .into_inner()
        .order;
    assert_eq!(fetched, Some(created));
    let log = server.stop_with("INT").await;
    assert!(log.iter().any(|entry| entry["signal"] == "SIGINT"));
    assert!(log.iter().any(|entry| entry["message"] == "server stopped"));
}

#[tokio::test]
async fn healthcheck_fails_when_nothing_is_listening() {
    let dir = tempfile::tempdir().expect("temp dir");
    let free_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port");
    let output = command(dir.path())
        .arg("healthcheck")
        .env("APP_SERVER__GRPC_ADDR", free_port.to_string())
        .output()
        .await
        .expect("healthcheck runs");
    assert!(!output.status.success());
}

#[tokio::test]
async fn migrate_subcommand_prepares_the_database_and_accepts_a_newer_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let migrate = || async {
        let output = command(dir.path())
            .arg("migrate")
            .env("APP_DATABASE__URL", "sqlite://migrated.db")
            .output()
            .await
            .expect("migrate runs");
        assert!(output.status.success(), "{output:?}");
    };
    migrate().await;

    let mut settings = app::config::Settings::default();
    settings.database.url = format!("sqlite://{}", dir.path().join("migrated.db").display())
        .parse()
        .expect("URL");
    let store = app::store::connect(&settings.database, &Default::default()).expect("store");
    store
        .check_ready()
        .await
        .expect("every migration is applied");

    // A rollback: the database has a migration from a newer release. The older binary's `migrate`
    // (the migration Job, or start-up with database.migrate) still succeeds, and it is ready.
    let pool = sqlx::SqlitePool::connect(settings.database.url.expose())
        .await
        .expect("open the database");
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99990101000000, 'from a newer release', TRUE, x'00', 0)",
    )
    .execute(&pool)
    .await
    .expect("record a newer migration");
    pool.close().await;
    migrate().await;
    store
        .check_ready()
        .await
        .expect("ready on the newer schema");
}

#[tokio::test]
async fn print_config_shows_the_merged_configuration_and_bad_configuration_fails() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = command(dir.path())
        .arg("print-config")
        .env("APP_SERVICE__SHIPMENT_BATCH_SIZE", "9")
        .output()
        .await
        .expect("print-config runs");
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).expect("UTF-8");
    assert!(printed.contains("shipment_batch_size = 9"), "{printed}");

    #[cfg(feature = "postgres")]
    {
        let output = command(dir.path())
            .arg("print-config")
            .env("APP_DATABASE__URL", "postgres://svc:hunter2@db/orders")
            .output()
            .await
            .expect("print-config runs");
        let printed = String::from_utf8(output.stdout).expect("UTF-8");
        assert!(
            printed.contains("postgres://svc:REDACTED@db/orders"),
            "{printed}"
        );
        assert!(!printed.contains("hunter2"));
    }

    let output = command(dir.path())
        .env("APP_SERVER__GRPC_ADDR", "nowhere")
        .output()
        .await
        .expect("binary runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("GRPC_ADDR"), "{stderr}");
}

/// Reads log lines until one whose message is `message`, failing after a minute or at the end.
async fn wait_for_log(log: &mut Lines<BufReader<ChildStdout>>, message: &str) -> serde_json::Value {
    let found = async {
        while let Some(line) = log.next_line().await.expect("read log") {
            let entry: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
            if entry["message"] == message {
                return entry;
            }
        }
        panic!("the log ended before {message:?}");
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), found)
        .await
        .unwrap_or_else(|_| panic!("no {message:?} in the log within a minute"))
}

async fn send_signal(child: &Child, signal: &str) {
    let pid = child.id().expect("running").to_string();
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .await
        .expect("kill runs");
    assert!(sent.success());
}

#[tokio::test]
async fn sighup_reloads_the_tls_certificate_and_is_harmless_without_tls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certificate = |name: &str| {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("certificate");
        (cert.pem(), key.serialize_pem())
    };
    let write = |(cert, key): (String, String)| {
        std::fs::write(dir.path().join("tls.crt"), cert).expect("write certificate");
        std::fs::write(dir.path().join("tls.key"), key).expect("write key");
    };
    write(certificate("before"));

    let mut child = command(dir.path())
        .arg("serve")
        .env("APP_SERVER__GRPC_ADDR", "127.0.0.1:0")
        // Never the default 0.0.0.0:9090, which anything else on the machine may hold.
        .env("APP_SERVER__METRICS_ADDR", "127.0.0.1:0")
        .env("APP_HEALTH__CHECK_INTERVAL", "100ms")
        .env("APP_TLS__CERT_FILE", "tls.crt")
        .env("APP_TLS__KEY_FILE", "tls.key")
        // Only SIGHUP can make this reload within the test.
        .env("APP_TLS__RELOAD_INTERVAL", "1h")
        .env("APP_SHUTDOWN__DRAIN_DELAY", "0s")
        .stdout(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let mut log = BufReader::new(child.stdout.take().expect("stdout")).lines();
    wait_for_log(&mut log, "health status changed").await;
    write(certificate("after"));
    send_signal(&child, "HUP").await;
    wait_for_log(&mut log, "TLS certificate reloaded; new connections use it").await;
    send_signal(&child, "TERM").await;
    assert!(child.wait().await.expect("exit").success());

    // Without TLS there is nothing to reload, and SIGHUP must not end the process.
    let mut server = RunningServer::start(dir.path()).await;
    server.wait_until_serving().await;
    send_signal(&server.child, "HUP").await;
    wait_for_log(&mut server.log, "SIGHUP: nothing to reload (TLS is off)").await;
    let log = server.stop_with("TERM").await;
    assert!(log.iter().any(|entry| entry["message"] == "server stopped"));
}

/// Creates an order for a widget to Oslo.
async fn create_order(orders: &mut OrderServiceClient<Channel>) -> api::Order {
    orders
        .create_order(CreateOrderRequest {
            order: Some(api::Order {
                items: vec!["widget".into()],
                destination: "Oslo".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .expect("create over TCP")
        .into_inner()
        .order
        .expect("order")
}

/// An OTLP collector on a loopback port: the `TraceService` of `opentelemetry-proto`, keeping every
/// export it receives.
mod collector {
    use std::sync::{Arc, Mutex, PoisonError};

    use opentelemetry_proto::tonic::{
        collector::trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
        resource::v1::Resource,
        trace::v1::Span,
    };

    #[derive(Clone, Default)]
    pub struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(request.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    impl Collector {
        /// Serves on a free loopback port until the test ends; returns the collector and its URL.
        pub async fn start() -> (Self, String) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let url = format!("http://{}", listener.local_addr().expect("address"));
            let collector = Self::default();
            let service = TraceServiceServer::new(collector.clone());
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            (collector, url)
        }

        fn exports(&self) -> Vec<ExportTraceServiceRequest> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        }

        /// Every span received, in the order they arrived.
        pub fn spans(&self) -> Vec<Span> {
            self.exports()
                .into_iter()
                .flat_map(|export| export.resource_spans)
                .flat_map(|resource| resource.scope_spans)
                .flat_map(|scope| scope.spans)
                .collect()
        }

        /// The resource of the first spans received: who sent them.
        pub fn resource(&self) -> Option<Resource> {
            self.exports()
                .into_iter()
                .flat_map(|export| export.resource_spans)
                .next()
                .and_then(|spans| spans.resource)
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A key's value among OTLP attributes, as JSON-ish text: strings bare, numbers as digits.
fn attribute(
    attributes: &[opentelemetry_proto::tonic::common::v1::KeyValue],
    key: &str,
) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let value = attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match value {
        Value::StringValue(text) => text.clone(),
        Value::IntValue(number) => number.to_string(),
        Value::BoolValue(flag) => flag.to_string(),
        Value::DoubleValue(number) => number.to_string(),
        other => format!("{other:?}"),
    })
}

#[tokio::test]
async fn spans_reach_the_otlp_collector_and_the_log_lines_carry_their_ids() {
    use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode};

    let (collector, url) = collector::Collector::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = RunningServer::start_with(
        dir.path(),
        &[
            ("APP_TELEMETRY__OTLP_ENDPOINT", &url),
            // Root calls are never sampled: only the caller's decision records a trace.
            ("APP_TELEMETRY__SAMPLE_RATIO", "0"),
            // Nothing is sent before shutdown: what arrives, the shutdown flush sent.
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
            ("POD_NAME", "orders-7d9f-abcde"),
            ("POD_NAMESPACE", "shop"),
        ],
    )
    .await;
    server.wait_until_serving().await;
    let channel = server.channel().await;
    let mut orders = OrderServiceClient::new(channel.clone());
    let created = create_order(&mut orders).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(GetOrderRequest {
        id: created.id.clone(),
    });
    let metadata = request.metadata_mut();
    metadata.insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01")
            .parse()
            .expect("ASCII"),
    );
    metadata.insert(
        "authorization",
        "Bearer not-to-be-logged".parse().expect("ASCII"),
    );
    orders.get_order(request).await.expect("get");

    // A call nobody serves, in a sampled trace of its own: its span is an error.
    let unknown_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let mut request = tonic::Request::new(());
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{unknown_trace}-b7ad6b7169203331-01")
            .parse()
            .expect("ASCII"),
    );
    let unimplemented = grpc
        .unary::<(), (), _>(
            request,
            "/no.such.Service/Method".parse().expect("path"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("nobody serves it");
    assert_eq!(unimplemented.code(), tonic::Code::Unimplemented);

    let grpc_port = server
        .addr
        .rsplit_once(':')
        .map(|(_, port)| port.to_owned());
    let log = server.stop_with("TERM").await;
    let spans = collector.spans();

    // The resource says who sent the spans.
    let resource = collector.resource().expect("a resource");
    let resource_attribute = |key| attribute(&resource.attributes, key);
    assert_eq!(
        resource_attribute("service.name").as_deref(),
        Some(env!("CARGO_PKG_NAME"))
    );
    assert_eq!(
        resource_attribute("service.version").as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert!(resource_attribute("service.instance.id").is_some());
    assert_eq!(
        resource_attribute("k8s.pod.name").as_deref(),
        Some("orders-7d9f-abcde")
    );
    assert_eq!(
        resource_attribute("k8s.namespace.name").as_deref(),
        Some("shop")
    );

    // The GetOrder span continues the caller's trace.
    let get_name = format!("{ORDER_SERVICE_NAME}/GetOrder");
    let rpc = spans
        .iter()
        .find(|span| span.name == get_name)
        .unwrap_or_else(|| panic!("no {get_name} span among {spans:#?}"));
    assert_eq!(rpc.kind, SpanKind::Server as i32);
    assert_eq!(hex(&rpc.trace_id), trace_id);
    assert_eq!(hex(&rpc.parent_span_id), caller_span);
    let rpc_attribute = |key| attribute(&rpc.attributes, key);
    assert_eq!(rpc_attribute("rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        rpc_attribute("rpc.service").as_deref(),
        Some(ORDER_SERVICE_NAME)
    );
    assert_eq!(rpc_attribute("rpc.method").as_deref(), Some("GetOrder"));
    assert_eq!(rpc_attribute("rpc.grpc.status_code").as_deref(), Some("0"));
    assert_eq!(
        rpc_attribute("server.address").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(rpc_attribute("server.port"), grpc_port);
    assert_eq!(
        rpc_attribute("network.peer.address").as_deref(),
        Some("127.0.0.1")
    );
    assert_ne!(
        rpc.status.as_ref().map(|status| status.code),
        Some(StatusCode::Error as i32)
    );
    assert!(rpc.end_time_unix_nano >= rpc.start_time_unix_nano);

    // Its database call is a CLIENT child, without the bound id.
    let db = spans
        .iter()
        .find(|span| span.parent_span_id == rpc.span_id)
        .unwrap_or_else(|| panic!("no child of the GetOrder span among {spans:#?}"));
    assert_eq!(db.name, "SELECT orders");
    assert_eq!(db.kind, SpanKind::Client as i32);
    assert_eq!(db.trace_id, rpc.trace_id);
    assert_eq!(
        attribute(&db.attributes, "db.system").as_deref(),
        Some("sqlite")
    );
    assert_eq!(
        attribute(&db.attributes, "db.operation").as_deref(),
        Some("SELECT")
    );
    assert_eq!(
        attribute(&db.attributes, "db.collection.name").as_deref(),
        Some("orders")
    );
    let exported = format!("{spans:?}");
    assert!(
        !exported.contains(&created.id),
        "bound values stay out of spans"
    );
    assert!(!exported.contains("not-to-be-logged"));

    // The call nobody serves is a server-side error span.
    let unknown = spans
        .iter()
        .find(|span| hex(&span.trace_id) == unknown_trace)
        .expect("the unknown method's span");
    assert_eq!(
        unknown.status.as_ref().map(|status| status.code),
        Some(StatusCode::Error as i32)
    );
    assert_eq!(
        attribute(&unknown.attributes, "rpc.grpc.status_code").as_deref(),
        Some("12")
    );

    // Only the two sampled calls sent spans: no database span of an unsampled call went out as a
    // trace of its own.
    for span in &spans {
        let trace = hex(&span.trace_id);
        assert!(
            trace == trace_id || trace == unknown_trace,
            "{} in {trace}",
            span.name
        );
    }

    // The unsampled CreateOrder sent no span, but its log line still has a trace id.
    let create_name = format!("{ORDER_SERVICE_NAME}/CreateOrder");
    assert!(!spans.iter().any(|span| span.name == create_name));
    let line = |method: &str| {
        log.iter()
            .find(|entry| entry["message"] == "rpc finished" && entry["rpc.method"] == method)
            .unwrap_or_else(|| panic!("no log line for {method} in {log:#?}"))
    };
    let create_line = line("CreateOrder");
    assert!(
        create_line["trace_id"]
            .as_str()
            .is_some_and(|id| id.len() == 32 && id != "0".repeat(32)),
        "{create_line}"
    );

    // The GetOrder line joins its span, and has the call's facts.
    let get_line = line("GetOrder");
    assert_eq!(get_line["trace_id"], trace_id);
    assert_eq!(get_line["span_id"], hex(&rpc.span_id));
    assert_eq!(get_line["level"], "INFO");
    assert_eq!(get_line["rpc.service"], ORDER_SERVICE_NAME);
    assert_eq!(get_line["grpc.code"], "OK");
    assert_eq!(get_line["rpc.grpc.status_code"], 0);
    assert!(get_line["duration_ms"].is_number());
    assert!(
        get_line["peer"]
            .as_str()
            .is_some_and(|peer| peer.starts_with("127.0.0.1:"))
    );
    assert!(
        !log.iter().any(|line| line["target"] == "app::messages"),
        "messages are logged only at TRACE"
    );
    let all_log = serde_json::to_string(&log).expect("JSON");
    assert!(
        !all_log.contains("not-to-be-logged"),
        "tokens are never logged"
    );
    assert!(!all_log.to_lowercase().contains("authorization"));
}

#[tokio::test]
async fn an_absent_collector_neither_fails_start_up_nor_slows_calls_nor_blocks_shutdown() {
    // A port that was free a moment ago: nothing listens there.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", listener.local_addr().expect("address"))
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let server = RunningServer::start_with(
        dir.path(),
        &[
            ("APP_TELEMETRY__OTLP_ENDPOINT", &dead),
            ("APP_TELEMETRY__SAMPLE_RATIO", "1"),
            ("APP_TELEMETRY__FLUSH_TIMEOUT", "1s"),
        ],
    )
    .await;
    server.wait_until_serving().await;
    let mut orders = OrderServiceClient::new(server.channel().await);
    for _ in 0..20 {
        let missing = orders
            .get_order(GetOrderRequest {
                id: uuid::Uuid::new_v4().to_string(),
            })
            .await
            .expect_err("no such order");
        assert_eq!(missing.code(), tonic::Code::NotFound);
    }
    let log = server.stop_with("TERM").await;
    assert!(log.iter().any(|entry| entry["message"] == "server stopped"));
}

/// `GET path` on `addr` over HTTP/1.1: the status code, the content type and the body.
async fn http_get(addr: &str, path: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("headers end");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    let content_type = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

#[tokio::test]
async fn metrics_are_served_on_their_own_port_and_can_be_turned_off() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = RunningServer::start(dir.path()).await;
    server.wait_until_serving().await;
    let metrics_addr = server
        .metrics_addr
        .clone()
        .expect("metrics are served by default");
    let mut orders = OrderServiceClient::new(server.channel().await);
    orders
        .get_order(GetOrderRequest { id: "bad".into() })
        .await
        .expect_err("invalid id");

    let (status, content_type, body) = http_get(&metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    // Prometheus 3 refuses a scrape without a valid content type.
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    // Built without doubled-brace escapes, which the template check would take for Liquid.
    let labels = format!(
        "grpc_code=\"InvalidArgument\",grpc_method=\"GetOrder\",grpc_service=\"{ORDER_SERVICE_NAME}\",grpc_type=\"unary\""
    );
    let invalid = ["grpc_server_handled_total{", &labels, "} 1"].concat();
    assert!(body.lines().any(|line| line == invalid), "{body}");
    assert!(body.contains("process_resident_memory_bytes"));
    let (status, _, _) = http_get(&metrics_addr, "/").await;
    assert_eq!(status, 404);
    server.stop_with("TERM").await;

    let server = RunningServer::start_with(dir.path(), &[("APP_SERVER__METRICS_ADDR", "")]).await;
    assert!(server.metrics_addr.is_none(), "{:?}", server.startup);
    server.wait_until_serving().await;
    server.stop_with("TERM").await;
}

#[tokio::test]
async fn the_standard_otel_variables_are_honoured_and_a_stream_span_lasts_to_its_last_message() {
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

    let (collector, url) = collector::Collector::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = RunningServer::start_with(
        dir.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &url),
            ("OTEL_SERVICE_NAME", "renamed-by-otel"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=ci"),
            // Replaces telemetry.sample_ratio: every root call is traced.
            ("OTEL_TRACES_SAMPLER", "always_on"),
            ("APP_TELEMETRY__SAMPLE_RATIO", "0"),
        ],
    )
    .await;
    server.wait_until_serving().await;
    let mut orders = OrderServiceClient::new(server.channel().await);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let created = create_order(&mut orders).await;
        ids.push(created.id);
    }
    // A bidi stream whose requests arrive 150 ms apart: it lasts at least 300 ms, though its
    // response headers left at once.
    let requests = async_stream::stream! {
        for (position, id) in ids.into_iter().enumerate() {
            if position > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(150)).await;
            }
            yield api::ProcessOrdersRequest { order_id: id };
        }
    };
    let shipments = orders
        .process_orders(requests)
        .await
        .expect("processing starts")
        .into_inner();
    let shipments: Vec<_> = futures::StreamExt::collect::<Vec<_>>(shipments).await;
    assert_eq!(shipments.len(), 1, "{shipments:?}");
    server.stop_with("TERM").await;

    let resource = collector.resource().expect("a resource");
    assert_eq!(
        attribute(&resource.attributes, "service.name").as_deref(),
        Some("renamed-by-otel")
    );
    assert_eq!(
        attribute(&resource.attributes, "deployment.environment.name").as_deref(),
        Some("ci")
    );
    let spans = collector.spans();
    let create_name = format!("{ORDER_SERVICE_NAME}/CreateOrder");
    assert_eq!(
        spans.iter().filter(|span| span.name == create_name).count(),
        3,
        "root calls sampled by OTEL_TRACES_SAMPLER"
    );
    let process_name = format!("{ORDER_SERVICE_NAME}/ProcessOrders");
    let process = spans
        .iter()
        .find(|span| span.name == process_name)
        .expect("the ProcessOrders span");
    assert_eq!(process.kind, SpanKind::Server as i32);
    let lasted = process.end_time_unix_nano - process.start_time_unix_nano;
    assert!(lasted >= 300_000_000, "the span lasted {lasted} ns");
}

/// SIGTERM and SIGINT drain the real binary: NOT_SERVING at once, serving through the drain delay,
/// then no new connections, calls in progress finishing (or, past the drain timeout, ended with
/// UNAVAILABLE and rolled back), and a clean exit. Calls are made slow by holding a PostgreSQL lock
/// that their writes wait on, which the test releases when it chooses: no sleeps that guess.
#[cfg(feature = "postgres")]
mod drain {
    use std::time::Duration;

    use app::{
        api::ORDER_SERVICE_NAME,
        api::{self, ProcessOrdersRequest, order_service_client::OrderServiceClient},
    };
    use sqlx::{Connection, PgConnection};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::{Code, transport::Channel};
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    use super::{RunningServer, create_order, send_signal, wait_for_log};
    use crate::common::{self, TestDatabase, eventually};

    /// A schema of the test database for one server, its URL, and a connection into it.
    async fn database() -> Option<(String, PgConnection, TestDatabase)> {
        let (_, database) = TestDatabase::postgres_schema().await?;
        let TestDatabase::Postgres { url, schema } = &database else {
            unreachable!("a PostgreSQL schema");
        };
        let separator = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{separator}options=-c%20search_path%3D{schema}");
        let conn = PgConnection::connect(&url).await.expect("test connection");
        Some((url, conn, database))
    }

    /// Waits, bounded, for the server to exit, and checks that it exited 0.
    async fn exits_cleanly(server: &mut RunningServer, why: &str) {
        let exit = tokio::time::timeout(Duration::from_secs(60), server.child.wait())
            .await
            .unwrap_or_else(|_| panic!("no exit within a minute: {why}"))
            .expect("exit status");
        assert!(exit.success(), "{why}: {exit}");
    }

    /// A server on a schema of its own, with the drain delay and timeout given; the connection is
    /// the test's own, into the same schema.
    async fn start_on_postgres(
        dir: &std::path::Path,
        drain_delay: &str,
        drain_timeout: &str,
    ) -> Option<(RunningServer, String, PgConnection, TestDatabase)> {
        let (url, conn, database) = database().await?;
        let server = RunningServer::start_with(
            dir,
            &[
                ("APP_DATABASE__URL", &url),
                ("APP_SHUTDOWN__DRAIN_DELAY", drain_delay),
                ("APP_SHUTDOWN__DRAIN_TIMEOUT", drain_timeout),
            ],
        )
        .await;
        server.wait_until_serving().await;
        Some((server, url, conn, database))
    }

    /// Holds a lock on `orders` that lets reads through and makes every write wait, until the
    /// returned transaction ends.
    async fn block_writes(conn: &mut PgConnection) -> sqlx::Transaction<'_, sqlx::Postgres> {
        let mut tx = conn.begin().await.expect("begin");
        sqlx::query("LOCK TABLE orders IN SHARE MODE")
            .execute(&mut *tx)
            .await
            .expect("lock orders");
        tx
    }

    /// Waits until `count` statements wait for the lock on `orders`.
    async fn writes_waiting(url: &str, count: i64) {
        let observer = sqlx::PgPool::connect(url).await.expect("observer pool");
        eventually(
            "writes waiting for the lock",
            Duration::from_secs(30),
            || {
                let observer = observer.clone();
                async move {
                    sqlx::query_scalar::<_, i64>(
                        "SELECT count(*) FROM pg_locks \
                     WHERE NOT granted AND relation = 'orders'::regclass",
                    )
                    .fetch_one(&observer)
                    .await
                    .expect("pg_locks")
                        >= count
                }
            },
        )
        .await;
        observer.close().await;
    }

    async fn order_exists(conn: &mut PgConnection, id: &str) -> bool {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders WHERE id::text = $1")
            .bind(id)
            .fetch_one(conn)
            .await
            .expect("count")
            == 1
    }

    fn slow_create(
        channel: &Channel,
    ) -> tokio::task::JoinHandle<Result<api::Order, tonic::Status>> {
        let mut orders = OrderServiceClient::new(channel.clone());
        tokio::spawn(async move {
            let response = orders
                .create_order(api::CreateOrderRequest {
                    order: Some(api::Order {
                        items: vec!["slow".into()],
                        destination: "Lima".into(),
                        ..Default::default()
                    }),
                    request_id: uuid::Uuid::new_v4().to_string(),
                })
                .await?;
            Ok(response.into_inner().order.unwrap_or_default())
        })
    }

    fn order_ids(orders: &[api::Order]) -> Vec<ProcessOrdersRequest> {
        orders
            .iter()
            .map(|order| ProcessOrdersRequest {
                order_id: order.id.clone(),
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigterm_reports_not_serving_serves_through_the_delay_and_lets_calls_finish() {
        let dir = tempfile::tempdir().expect("temp dir");
        let Some((mut server, url, mut conn, _database)) =
            start_on_postgres(dir.path(), "3s", "60s").await
        else {
            return;
        };
        let channel = server.channel().await;
        let mut orders = OrderServiceClient::new(channel.clone());
        let batch = [
            create_order(&mut orders).await,
            create_order(&mut orders).await,
            create_order(&mut orders).await,
        ];

        // In flight when the signal comes: a bidirectional stream, and a create waiting for the lock.
        let (requests, receiver) = mpsc::channel(4);
        let mut shipments = orders
            .process_orders(ReceiverStream::new(receiver))
            .await
            .expect("stream opens")
            .into_inner();
        requests
            .send(order_ids(&batch[..1]).remove(0))
            .await
            .expect("send");
        let lock = block_writes(&mut conn).await;
        let slow = slow_create(&channel);
        writes_waiting(&url, 1).await;
        let mut watch = HealthClient::new(channel.clone())
            .watch(HealthCheckRequest::default())
            .await
            .expect("watch")
            .into_inner();
        assert_eq!(
            watch.message().await.expect("watch").map(|r| r.status()),
            Some(ServingStatus::Serving)
        );

        send_signal(&server.child, "TERM").await;
        // 1. NOT_SERVING at once, told to open watches, for liveness and readiness alike.
        assert_eq!(
            watch.message().await.expect("watch").map(|r| r.status()),
            Some(ServingStatus::NotServing)
        );
        let mut health = HealthClient::new(channel.clone());
        for service in ["", ORDER_SERVICE_NAME] {
            let status = health
                .check(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
                .expect("health answers during the delay")
                .into_inner()
                .status();
            assert_eq!(status, ServingStatus::NotServing, "{service:?}");
        }
        // 2. Still serving during the delay, new connections included.
        let fresh = server.channel().await;
        let read = OrderServiceClient::new(fresh)
            .get_order(api::GetOrderRequest {
                id: batch[0].id.clone(),
            })
            .await
            .expect("served during the drain delay");
        assert_eq!(read.into_inner().order.as_ref(), Some(&batch[0]));

        // 3. After it, new connections are refused while the calls in progress go on.
        let stopped_accepting = wait_for_log(
            &mut server.log,
            "drain: stopped accepting and sent GOAWAY; calls in progress may finish",
        )
        .await;
        // The stream and the create (and the health watch, unless already ended).
        assert!(
            stopped_accepting["in_flight"].as_u64() >= Some(2),
            "{stopped_accepting}"
        );
        let refused = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
            .expect("URI")
            .connect()
            .await;
        assert!(refused.is_err(), "no new connection after the drain delay");
        for request in order_ids(&batch[1..]) {
            requests
                .send(request)
                .await
                .expect("the stream still reads");
        }
        drop(requests);
        lock.commit().await.expect("release the lock");

        let created = slow
            .await
            .expect("task")
            .expect("the slow call completes with OK");
        let shipment = shipments
            .message()
            .await
            .expect("the stream completes with OK")
            .expect("one shipment");
        assert_eq!(shipment.shipment.map(|s| s.orders.len()), Some(3));
        assert!(shipments.message().await.expect("OK").is_none());

        exits_cleanly(&mut server, "exits within delay + timeout").await;
        assert!(order_exists(&mut conn, &created.id).await);
        let mut steps = Vec::new();
        while let Some(line) = server.log.next_line().await.expect("log") {
            let entry: serde_json::Value = serde_json::from_str(&line).expect("JSON");
            if let Some(step) = entry["step"].as_str() {
                assert!(entry["duration_ms"].is_number(), "{entry}");
                steps.push(step.to_owned());
            }
        }
        assert_eq!(steps, ["drain", "close_pool", "stop_metrics"], "{steps:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_still_running_at_the_drain_timeout_end_with_unavailable_and_roll_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let Some((mut server, url, mut conn, _database)) =
            start_on_postgres(dir.path(), "0s", "1s").await
        else {
            return;
        };
        let channel = server.channel().await;
        let mut orders = OrderServiceClient::new(channel.clone());
        // A stream that never ends: its client never half-closes.
        let (_requests, receiver) = mpsc::channel::<ProcessOrdersRequest>(1);
        let mut endless = orders
            .process_orders(ReceiverStream::new(receiver))
            .await
            .expect("stream opens")
            .into_inner();
        let lock = block_writes(&mut conn).await;
        let slow = slow_create(&channel);
        writes_waiting(&url, 1).await;

        send_signal(&server.child, "TERM").await;
        let cut = endless.message().await.expect_err("cut");
        assert_eq!(cut.code(), Code::Unavailable, "{cut:?}");
        assert_eq!(common::reason(&cut), "SHUTTING_DOWN");
        let cancelled = slow.await.expect("task").expect_err("cancelled");
        assert_eq!(cancelled.code(), Code::Unavailable, "{cancelled:?}");

        exits_cleanly(&mut server, "exits despite the endless stream").await;
        let ended = wait_for_log(
            &mut server.log,
            "drain: calls in progress ended; their transactions never commit",
        )
        .await;
        assert_eq!(ended["calls_ended"], 2, "{ended}");
        // The create waited inside its transaction: nothing of it remains.
        lock.commit().await.expect("release the lock");
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE 'slow' = ANY(items)")
            .fetch_one(&mut conn)
            .await
            .expect("count");
        assert_eq!(rows, 0, "no half-written order");
    }

    /// Two instances on one database, the reference client spreading CreateOrder and GetOrder over
    /// both; one is stopped mid-run and replaced by a third on a fresh port that the client is told
    /// about. No call fails, and every acknowledged order is readable afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rolling_restart_under_load_fails_no_call_and_loses_no_order() {
        use std::sync::{
            Arc, Mutex,
            atomic::{AtomicBool, Ordering},
        };

        use app::client::OrderCalls;
        use platform::client::{CallOptions, Client};

        let Some((url, _conn, _database)) = database().await else {
            return;
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let env = [
            ("APP_DATABASE__URL", url.as_str()),
            ("APP_SHUTDOWN__DRAIN_DELAY", "1s"),
            ("APP_SHUTDOWN__DRAIN_TIMEOUT", "10s"),
        ];
        let mut first = RunningServer::start_with(dir.path(), &env).await;
        let second = RunningServer::start_with(dir.path(), &env).await;
        first.wait_until_serving().await;
        second.wait_until_serving().await;
        let settings = platform::config::ClientSettings {
            targets: vec![first.addr.clone(), second.addr.clone()],
            timeout: Duration::from_secs(10),
            ..Default::default()
        };
        let client = Client::new(&settings).await.expect("client");

        // Callers: create, then read back, until told to stop (bounded by the test's end).
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(Mutex::new(Vec::<api::Order>::new()));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (client, stop, acknowledged) =
                    (client.clone(), Arc::clone(&stop), Arc::clone(&acknowledged));
                tokio::spawn(async move {
                    let (mut calls, mut failures, mut worst) = (0u32, Vec::new(), Duration::ZERO);
                    while !stop.load(Ordering::Relaxed) {
                        let started = std::time::Instant::now();
                        let created = client
                            .create_order(
                                api::CreateOrderRequest {
                                    order: Some(api::Order {
                                        items: vec!["rolling".into()],
                                        destination: "Oslo".into(),
                                        ..Default::default()
                                    }),
                                    request_id: String::new(),
                                },
                                CallOptions::default(),
                            )
                            .await;
                        worst = worst.max(started.elapsed());
                        calls += 1;
                        let order = match created {
                            Ok(response) => response.order.expect("order"),
                            Err(status) => {
                                failures.push(status);
                                continue;
                            }
                        };
                        acknowledged.lock().expect("list").push(order.clone());
                        let started = std::time::Instant::now();
                        let read = client
                            .get_order(
                                api::GetOrderRequest {
                                    id: order.id.clone(),
                                },
                                CallOptions::default(),
                            )
                            .await;
                        worst = worst.max(started.elapsed());
                        calls += 1;
                        if let Err(status) = read {
                            failures.push(status);
                        }
                    }
                    (calls, failures, worst)
                })
            })
            .collect();

        let acknowledged_count = || acknowledged.lock().expect("list").len();
        let at_least = |count: usize| {
            eventually("orders acknowledged", Duration::from_secs(60), move || {
                let reached = acknowledged_count() >= count;
                async move { reached }
            })
        };
        at_least(50).await;
        // The rolling restart: the first instance drains and exits while the client still has it
        // in its list (as with a DNS answer not yet expired), so calls meet its refusals and retry
        // elsewhere; then its replacement comes up on a new port and the client learns of it.
        send_signal(&first.child, "TERM").await;
        exits_cleanly(&mut first, "the first instance drains and exits").await;
        let during = acknowledged_count();
        at_least(during + 50).await;
        let replacement = RunningServer::start_with(dir.path(), &env).await;
        replacement.wait_until_serving().await;
        client
            .set_targets(&[second.addr.clone(), replacement.addr.clone()])
            .await
            .expect("new targets");
        let before = acknowledged_count();
        at_least(before + 100).await;
        stop.store(true, Ordering::Relaxed);

        let (mut calls, mut failures, mut worst) = (0, Vec::new(), Duration::ZERO);
        for worker in workers {
            let (worker_calls, worker_failures, worker_worst) = worker.await.expect("worker");
            calls += worker_calls;
            failures.extend(worker_failures);
            worst = worst.max(worker_worst);
        }
        // Reported, not asserted: timings belong to benchmarks.
        eprintln!("rolling restart: {calls} calls, worst latency {worst:?}");
        assert!(failures.is_empty(), "failed calls: {failures:?}");
        let acknowledged = acknowledged.lock().expect("list").clone();
        for order in &acknowledged {
            let read = client
                .get_order(
                    api::GetOrderRequest {
                        id: order.id.clone(),
                    },
                    CallOptions::default(),
                )
                .await
                .expect("every acknowledged order is readable");
            assert_eq!(read.order.as_ref(), Some(order));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_signal_during_the_drain_exits_at_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let Some((mut server, url, mut conn, _database)) =
            start_on_postgres(dir.path(), "1h", "1h").await
        else {
            return;
        };
        let lock = block_writes(&mut conn).await;
        let slow = slow_create(&server.channel().await);
        writes_waiting(&url, 1).await;

        send_signal(&server.child, "TERM").await;
        wait_for_log(
            &mut server.log,
            "drain: health reports NOT_SERVING; still serving for the drain delay",
        )
        .await;
        send_signal(&server.child, "INT").await;
        exits_cleanly(&mut server, "exits long before the hour-long drain").await;
        let cancelled = slow.await.expect("task").expect_err("cancelled");
        assert_eq!(cancelled.code(), Code::Unavailable, "{cancelled:?}");
        lock.commit().await.expect("release the lock");
    }
}

/// The `healthcheck` probe against the real server under mutual TLS: it presents the client
/// certificate `client.*` names, asks for liveness or a service's readiness, and says why it fails.
#[tokio::test]
async fn healthcheck_speaks_mutual_tls_asks_per_service_and_says_why_it_fails() {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair,
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "probe test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("CA certificate");
    let issue = |name: &str, purpose: ExtendedKeyUsagePurpose| {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params.extended_key_usages = vec![purpose];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &ca).expect("sign");
        std::fs::write(dir.path().join(format!("{name}.crt")), cert.pem()).expect("write");
        std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).expect("write");
    };
    issue("server", ExtendedKeyUsagePurpose::ServerAuth);
    issue("client", ExtendedKeyUsagePurpose::ClientAuth);
    std::fs::write(dir.path().join("ca.crt"), ca.pem()).expect("write CA");

    let tls = [
        ("APP_TLS__CERT_FILE", "server.crt"),
        ("APP_TLS__KEY_FILE", "server.key"),
        ("APP_TLS__CLIENT_CA_FILE", "ca.crt"),
        ("APP_CLIENT__CA_FILE", "ca.crt"),
        ("APP_CLIENT__SERVER_NAME", "localhost"),
    ];
    let mut server_env = tls.to_vec();
    // Long enough to probe the draining server; a second signal ends it.
    server_env.push(("APP_SHUTDOWN__DRAIN_DELAY", "1h"));
    let mut server = RunningServer::start_with(dir.path(), &server_env).await;
    let addr = server.addr.clone();
    let probe = |extra_env: &'static [(&'static str, &'static str)], args: Vec<String>| {
        let mut command = command(dir.path());
        command
            .arg("healthcheck")
            .arg("--addr")
            .arg(&addr)
            .args(args)
            .envs(tls)
            .envs(extra_env.iter().copied());
        async move {
            let output = command.output().await.expect("healthcheck runs");
            (
                output.status.success(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        }
    };
    const IDENTITY: &[(&str, &str)] = &[
        ("APP_CLIENT__CERT_FILE", "client.crt"),
        ("APP_CLIENT__KEY_FILE", "client.key"),
    ];
    let readiness = || vec!["--service".to_owned(), ORDER_SERVICE_NAME.to_owned()];
    common::eventually(
        "the API ready",
        std::time::Duration::from_secs(30),
        || async { probe(IDENTITY, readiness()).await.0 },
    )
    .await;

    let (ok, stdout, stderr) = probe(IDENTITY, Vec::new()).await;
    assert!(ok, "liveness over mutual TLS: {stderr}");
    assert_eq!(stdout.trim(), "SERVING");

    let (ok, _, stderr) = probe(&[], readiness()).await;
    assert!(!ok, "no client certificate, no answer");
    assert!(stderr.contains("set client.cert_file"), "{stderr}");

    let (ok, _, stderr) = probe(IDENTITY, vec!["--service".into(), "no.such.Service".into()]).await;
    assert!(!ok);
    assert!(
        stderr.contains("does not know the service \"no.such.Service\""),
        "{stderr}"
    );

    let (ok, _, stderr) = probe(IDENTITY, vec!["--timeout".into(), "soon".into()]).await;
    assert!(!ok, "a malformed timeout is refused");
    assert!(stderr.contains("--timeout"), "{stderr}");

    // Draining: liveness turns NOT_SERVING, and the probe says so.
    send_signal(&server.child, "TERM").await;
    wait_for_log(
        &mut server.log,
        "drain: health reports NOT_SERVING; still serving for the drain delay",
    )
    .await;
    let (ok, _, stderr) = probe(IDENTITY, Vec::new()).await;
    assert!(!ok, "a draining server is not live");
    assert!(stderr.contains("the server is NOT_SERVING"), "{stderr}");
    send_signal(&server.child, "INT").await;
    assert!(server.child.wait().await.expect("exit").success());
}
