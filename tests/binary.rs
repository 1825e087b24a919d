//! The real binary, started as a process on a free loopback port and called over TCP.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
};

use app::api::{
    self, CreateOrderRequest, GetOrderRequest, order_service_client::OrderServiceClient,
};
use app::health::ORDER_SERVICE_NAME;
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
        if name.starts_with("APP_") || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    command
}

struct RunningServer {
    child: Child,
    addr: String,
    /// What the server logged before it started serving.
    startup: Vec<serde_json::Value>,
    log: Lines<BufReader<ChildStdout>>,
}

impl RunningServer {
    async fn start(dir: &Path) -> Self {
        let mut child = command(dir)
            .arg("serve")
            .env("APP_SERVER__GRPC_ADDR", "127.0.0.1:0")
            .env("APP_SERVER__HEALTH_CHECK_INTERVAL", "100ms")
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
        Self {
            child,
            addr,
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
            .watch(HealthCheckRequest::default())
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
    let created = orders
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
        .expect("order");

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
async fn migrate_subcommand_prepares_the_database() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = command(dir.path())
        .arg("migrate")
        .env("APP_DATABASE__URL", "sqlite://migrated.db")
        .output()
        .await
        .expect("migrate runs");
    assert!(output.status.success(), "{output:?}");

    let mut settings = app::config::Settings::default();
    settings.database.url = format!("sqlite://{}", dir.path().join("migrated.db").display())
        .parse()
        .expect("URL");
    let store = app::store::connect(&settings.database, &Default::default()).expect("store");
    store
        .check_ready()
        .await
        .expect("every migration is applied");
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
        .env("APP_SERVER__HEALTH_CHECK_INTERVAL", "100ms")
        .env("APP_TLS__CERT_FILE", "tls.crt")
        .env("APP_TLS__KEY_FILE", "tls.key")
        // Only SIGHUP can make this reload within the test.
        .env("APP_TLS__RELOAD_INTERVAL", "1h")
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
