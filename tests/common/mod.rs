//! The in-memory test harness: the same `Server` that `main` serves, over `tokio::io::duplex`
//! pipes instead of TCP (the Rust counterpart of Go's bufconn). Interceptors, serialisation, metadata
//! and HTTP/2 flow control are all real; only the socket is missing.
//!
//! Each test gets its own database: a fresh in-memory SQLite database, or a fresh schema in the
//! PostgreSQL database named by `TEST_POSTGRES_URL`.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::{str::FromStr, sync::Arc, time::Duration};

use app::{
    api::ORDER_SERVICE_NAME,
    api::{self, order_service_client::OrderServiceClient},
    config::{DatabaseUrl, Settings},
    store::{OrderStore, SqliteStore},
};
use hyper_util::rt::TokioIo;
use platform::{
    server::{Server, ServerError},
    telemetry::metrics::{Metrics, StoreInstruments},
};
use tokio::{io::DuplexStream, sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The environment variable naming the PostgreSQL server the Postgres half of the suite uses.
pub const POSTGRES_URL_VAR: &str = "TEST_POSTGRES_URL";

/// Runs each named `async fn(Backend)` test once per backend, as `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! backend_tests {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::common::Backend::Sqlite).await;
                }
            )*
        }
        #[cfg(feature = "postgres")]
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::common::Backend::Postgres).await;
                }
            )*
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    #[cfg(feature = "postgres")]
    Postgres,
}

/// The longest a test waits for a health status that should come within milliseconds.
const STATUS_CHANGE_LIMIT: Duration = Duration::from_secs(60);

/// The server's end of each new in-memory connection.
type Connections = mpsc::UnboundedSender<Result<DuplexStream, std::io::Error>>;

/// A running in-memory server and clients connected to it.
pub struct TestApp {
    pub orders: OrderServiceClient<Channel>,
    pub health: HealthClient<Channel>,
    pub channel: Channel,
    pub store: Arc<dyn OrderStore>,
    /// The server's metrics registry (`None` with `server.metrics_addr = ""`).
    pub metrics: Option<Arc<Metrics>>,
    connections: Connections,
    stop: CancellationToken,
    server: Option<JoinHandle<Result<(), ServerError>>>,
    _database: TestDatabase,
}

impl TestApp {
    /// A migrated, serving app on `backend` with default settings; `None` when PostgreSQL is asked for
    /// and not configured (outside CI).
    pub async fn spawn(backend: Backend) -> Option<Self> {
        Self::spawn_with(backend, |_| {}).await
    }

    /// Like `spawn`, with settings changed by `configure` first.
    pub async fn spawn_with(
        backend: Backend,
        configure: impl FnOnce(&mut Settings),
    ) -> Option<Self> {
        let app = Self::start(backend, configure, true).await?;
        app.wait_for_status(ORDER_SERVICE_NAME, ServingStatus::Serving)
            .await;
        Some(app)
    }

    /// Like `spawn`, with the application's store wrapped by `wrap`, so a test can watch what the
    /// service asks of the database.
    pub async fn spawn_wrapping(
        backend: Backend,
        wrap: impl FnOnce(Arc<dyn OrderStore>) -> Arc<dyn OrderStore>,
    ) -> Option<Self> {
        Self::spawn_wrapping_with(backend, |_| {}, wrap).await
    }

    /// `spawn_wrapping` with settings changed by `configure` first.
    pub async fn spawn_wrapping_with(
        backend: Backend,
        configure: impl FnOnce(&mut Settings),
        wrap: impl FnOnce(Arc<dyn OrderStore>) -> Arc<dyn OrderStore>,
    ) -> Option<Self> {
        let app = Self::start_wrapping(backend, configure, true, wrap).await?;
        app.wait_for_status(ORDER_SERVICE_NAME, ServingStatus::Serving)
            .await;
        Some(app)
    }

    /// Starts an app without migrating its database first and without waiting for it to be ready.
    pub async fn start(
        backend: Backend,
        configure: impl FnOnce(&mut Settings),
        migrate_first: bool,
    ) -> Option<Self> {
        Self::start_wrapping(backend, configure, migrate_first, |store| store).await
    }

    async fn start_wrapping(
        backend: Backend,
        configure: impl FnOnce(&mut Settings),
        migrate_first: bool,
        wrap: impl FnOnce(Arc<dyn OrderStore>) -> Arc<dyn OrderStore>,
    ) -> Option<Self> {
        let mut settings = test_settings();
        configure(&mut settings);
        // As `Server::build` does: the store records its connection waits into the metrics.
        let metrics =
            Server::metrics_for(&settings.platform, &app::SERVICE).expect("metrics registry");
        let instruments = platform::telemetry::metrics::store_instruments(metrics.as_deref());
        let (store, database) = TestDatabase::create(backend, &settings, &instruments).await?;
        if migrate_first {
            store.migrate().await.expect("migrations apply");
        }
        let store = wrap(store);
        let application = app::server::new(Arc::clone(&store), &settings, metrics)
            .await
            .expect("application builds");
        Some(Self::serve(application, store, database).await)
    }

    /// Serves an application built by the test itself, on a store with nothing to clean up.
    pub async fn serve_application(application: Server, store: Arc<dyn OrderStore>) -> Self {
        Self::serve(application, store, TestDatabase::Ephemeral).await
    }

    async fn serve(
        application: Server,
        store: Arc<dyn OrderStore>,
        database: TestDatabase,
    ) -> Self {
        let metrics = application.metrics();
        let (connections, incoming) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let server = tokio::spawn(application.serve_with_incoming(
            UnboundedReceiverStream::new(incoming),
            stop.clone().cancelled_owned(),
        ));
        let channel = connect(&connections, endpoint()).await;

        Self {
            orders: OrderServiceClient::new(channel.clone()),
            health: HealthClient::new(channel.clone()),
            channel,
            store,
            metrics,
            connections,
            stop,
            server: Some(server),
            _database: database,
        }
    }

    /// An OrderService client on a connection of its own that, unlike tonic's `Channel`, does not
    /// enforce `grpc-timeout` itself, so the test sees what the server answers when a deadline passes.
    pub async fn orders_without_client_deadlines(&self) -> OrderServiceClient<RawHttp2> {
        let (client_end, server_end) = tokio::io::duplex(64 * 1024);
        self.connections
            .send(Ok(server_end))
            .expect("the test server runs");
        let (sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(client_end),
        )
        .await
        .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        OrderServiceClient::with_origin(
            RawHttp2(sender),
            http::Uri::from_static("http://in-memory.test"),
        )
    }

    /// A new in-memory channel to the server, with client settings (HTTP/2 windows, say) chosen by
    /// `configure`.
    pub async fn channel_with(&self, configure: impl FnOnce(Endpoint) -> Endpoint) -> Channel {
        connect(&self.connections, configure(endpoint())).await
    }

    /// Waits, via `Health.Watch`, until `service` reports `expected`. Gives up after a minute, which
    /// no correct change of status comes near, so that a status that never comes fails the test
    /// instead of hanging it.
    pub async fn wait_for_status(&self, service: &str, expected: ServingStatus) {
        let mut health = self.health.clone();
        let watched = async {
            let mut updates = health
                .watch(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
                .expect("health watch starts")
                .into_inner();
            while let Some(update) = updates.message().await.expect("health watch continues") {
                if update.status() == expected {
                    return;
                }
            }
            panic!("health watch for {service:?} ended before {expected:?}");
        };
        tokio::time::timeout(STATUS_CHANGE_LIMIT, watched)
            .await
            .unwrap_or_else(|_| panic!("{service:?} did not report {expected:?} within a minute"));
    }

    /// The status `Health.Check` reports for `service`.
    pub async fn health_status(&self, service: &str) -> Result<ServingStatus, tonic::Status> {
        let mut health = self.health.clone();
        Ok(health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await?
            .into_inner()
            .status())
    }

    /// Options that connect to this app's PostgreSQL schema, for a test's own session beside the
    /// service's; `None` on SQLite.
    #[cfg(feature = "postgres")]
    pub fn postgres_options(&self) -> Option<sqlx::postgres::PgConnectOptions> {
        match &self._database {
            TestDatabase::Postgres { url, schema } => Some(
                sqlx::postgres::PgConnectOptions::from_str(url)
                    .expect("valid TEST_POSTGRES_URL")
                    .options([("search_path", schema.as_str())]),
            ),
            TestDatabase::Ephemeral => None,
        }
    }

    /// Signals shutdown and waits for the server to finish.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        self.stop.cancel();
        let server = self.server.take().expect("server runs until shutdown");
        server.await.expect("server task does not panic")
    }

    pub async fn create(&self, order: api::Order) -> api::Order {
        self.orders
            .clone()
            .create_order(api::CreateOrderRequest {
                order: Some(order),
                request_id: String::new(),
            })
            .await
            .expect("create succeeds")
            .into_inner()
            .order
            .expect("response has an order")
    }

    /// Creates a valid order for `destination`.
    pub async fn create_for(&self, destination: &str) -> api::Order {
        self.create(order_to(destination)).await
    }

    pub async fn get(&self, id: &str) -> Result<api::Order, tonic::Status> {
        Ok(self
            .orders
            .clone()
            .get_order(api::GetOrderRequest { id: id.to_owned() })
            .await?
            .into_inner()
            .order
            .expect("response has an order"))
    }

    /// Every order, read page by page.
    pub async fn list_all(&self) -> Vec<api::Order> {
        self.list_pages(100).await.concat()
    }

    /// Every order, as the pages of `page_size` that ListOrders returns, following the page tokens.
    pub async fn list_pages(&self, page_size: i32) -> Vec<Vec<api::Order>> {
        let mut pages = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .orders
                .clone()
                .list_orders(api::ListOrdersRequest {
                    page_size,
                    page_token,
                })
                .await
                .expect("list succeeds")
                .into_inner();
            pages.push(page.orders);
            if page.next_page_token.is_empty() {
                return pages;
            }
            page_token = page.next_page_token;
        }
    }
}

/// A bare HTTP/2 client connection as a tower service, for `tonic`'s generated clients.
#[derive(Clone)]
pub struct RawHttp2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower::Service<http::Request<tonic::body::Body>> for RawHttp2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}

/// The server on a real loopback socket (127.0.0.1, a free port), for what only a socket shows: TLS,
/// HTTP/2 connection behaviour, raw bytes. It serves an in-memory SQLite database.
pub struct TcpServer {
    pub addr: std::net::SocketAddr,
    pub tls: Option<Arc<platform::tls::ServerTls>>,
    pub store: Arc<dyn OrderStore>,
    stop: CancellationToken,
    server: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TcpServer {
    pub async fn start(configure: impl FnOnce(&mut Settings)) -> Self {
        Self::start_wrapping(configure, |store| store).await
    }

    pub async fn start_wrapping(
        configure: impl FnOnce(&mut Settings),
        wrap: impl FnOnce(Arc<dyn OrderStore>) -> Arc<dyn OrderStore>,
    ) -> Self {
        let mut settings = test_settings();
        configure(&mut settings);
        let (store, _) = TestDatabase::create(Backend::Sqlite, &settings, &Default::default())
            .await
            .expect("SQLite needs no configuration");
        store.migrate().await.expect("migrations apply");
        let store = wrap(store);
        let application = app::server::with_store(Arc::clone(&store), &settings)
            .await
            .expect("application builds");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let tls = application.tls();
        let stop = CancellationToken::new();
        let server = tokio::spawn(application.serve_with_incoming(
            platform::server::incoming(listener),
            stop.clone().cancelled_owned(),
        ));
        Self {
            addr,
            tls,
            store,
            stop,
            server: Some(server),
        }
    }

    pub fn plaintext_endpoint(&self) -> Endpoint {
        Endpoint::from_shared(format!("http://{}", self.addr)).expect("valid URI")
    }

    /// An endpoint that speaks TLS to the server as `localhost`, trusting `ca_pem`, and presenting
    /// `identity` (certificate and key PEM) when given.
    pub fn tls_endpoint(&self, ca_pem: &str, identity: Option<(&str, &str)>) -> Endpoint {
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .domain_name("localhost")
            .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem));
        if let Some((cert, key)) = identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        Endpoint::from_shared(format!("https://localhost:{}", self.addr.port()))
            .expect("valid URI")
            .tls_config(tls)
            .expect("valid TLS configuration")
    }

    /// Connects `endpoint` to this server's loopback address, whatever host its URI names.
    pub async fn connect(&self, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
        let addr = self.addr;
        endpoint
            .connect_timeout(Duration::from_secs(10))
            .connect_with_connector(tower::service_fn(move |_| async move {
                let stream = tokio::net::TcpStream::connect(addr).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }))
            .await
    }

    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(server) = self.server.take() {
            server
                .await
                .expect("server task does not panic")
                .expect("server stops cleanly");
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts a search for `query`, reads its first match and returns the rest of the stream unread.
pub async fn search_and_take_one(
    client: &mut OrderServiceClient<Channel>,
    query: &str,
) -> tonic::Streaming<api::SearchOrdersResponse> {
    let mut matches = client
        .search_orders(api::SearchOrdersRequest {
            query: query.to_owned(),
        })
        .await
        .expect("search starts")
        .into_inner();
    let first = matches.message().await.expect("stream continues");
    assert!(first.is_some(), "a first match");
    matches
}

/// A GetOrder for an order that does not exist: NOT_FOUND proves the call reached the handler.
pub async fn probe(channel: Channel) -> Result<(), tonic::Status> {
    let status = OrderServiceClient::new(channel)
        .get_order(api::GetOrderRequest {
            id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .expect_err("no such order");
    if status.code() == tonic::Code::NotFound {
        Ok(())
    } else {
        Err(status)
    }
}

/// The `ErrorInfo.reason` of `status`, checking its domain on the way.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    let details = status.get_error_details();
    let info = details
        .error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, app::status::ERROR_DOMAIN);
    info.reason.clone()
}

/// Log lines the tests' process writes, as JSON, to search for what a test caused.
pub mod logs {
    use std::sync::{Arc, Mutex, OnceLock};

    static LINES: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

    /// Starts capturing (once per test binary) every log line at DEBUG and above.
    pub fn capture() {
        capture_at(tracing::Level::DEBUG);
    }

    /// Starts capturing (once per test binary; the first level asked for wins) every log line at
    /// `level` and above, from every crate.
    pub fn capture_at(level: tracing::Level) {
        LINES.get_or_init(|| {
            let buffer = Arc::new(Mutex::new(Vec::new()));
            let writer = {
                let buffer = Arc::clone(&buffer);
                move || Writer(Arc::clone(&buffer))
            };
            let _ = tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_max_level(level)
                .with_writer(writer)
                .try_init();
            buffer
        });
    }

    /// The captured lines for which `matches` holds.
    pub fn find(matches: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
        let Some(buffer) = LINES.get() else {
            return Vec::new();
        };
        let text = String::from_utf8_lossy(&buffer.lock().expect("log buffer")).into_owned();
        text.lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .filter(|line| matches(line))
            .collect()
    }

    struct Writer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Writer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}

/// Waits until `condition` holds, checking every 20 ms, and fails the test after `limit`.
pub async fn eventually<F: Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut condition: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn endpoint() -> Endpoint {
    Endpoint::from_static("http://in-memory.test")
}

/// Connects `endpoint` over in-memory pipes: every connection the channel opens is one end of a fresh
/// pipe, and the server gets the other end through `connections`.
async fn connect(connections: &Connections, endpoint: Endpoint) -> Channel {
    let connections = connections.clone();
    endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let (client_end, server_end) = tokio::io::duplex(64 * 1024);
            let sent = connections.send(Ok(server_end));
            async move {
                sent.map_err(|_| std::io::Error::other("the test server has stopped"))?;
                Ok::<_, std::io::Error>(TokioIo::new(client_end))
            }
        }))
        .await
        .expect("in-memory connection")
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A valid order, for `destination`.
pub fn order_to(destination: &str) -> api::Order {
    api::Order {
        items: vec!["widget".to_owned(), "gadget".to_owned()],
        description: "two useful things".to_owned(),
        price_cents: 4200,
        destination: destination.to_owned(),
        ..Default::default()
    }
}

/// The fields named by the `BadRequest` detail of `status`.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .bad_request()
        .map(|bad_request| {
            bad_request
                .field_violations
                .iter()
                .map(|violation| violation.field.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Defaults, with a fast health check so tests never wait long for a status change.
pub fn test_settings() -> Settings {
    let mut settings = Settings::default();
    settings.platform.health.check_interval = Duration::from_millis(50);
    // No load balancer to wait for in memory: the drain starts at once.
    settings.platform.shutdown.drain_delay = Duration::ZERO;
    settings.database.max_connections = 5.try_into().expect("non-zero");
    settings
}

#[cfg(feature = "postgres")]
/// The URL of the PostgreSQL server for tests. Absent, the Postgres tests say so and pass, except
/// under CI, where a missing database must not turn into a green run that tested nothing.
pub fn postgres_url() -> Option<String> {
    use std::io::Write;
    static SKIP_NOTICE: std::sync::Once = std::sync::Once::new();
    match std::env::var(POSTGRES_URL_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|ci| ci == "true") => {
            panic!("{POSTGRES_URL_VAR} must be set under CI=true: the PostgreSQL tests cannot run")
        }
        _ => {
            // Straight to stderr: libtest captures `eprintln!` of passing tests, and a skip must show.
            SKIP_NOTICE.call_once(|| {
                let _ = writeln!(
                    std::io::stderr(),
                    "note: {POSTGRES_URL_VAR} is not set; PostgreSQL tests are skipped"
                );
            });
            None
        }
    }
}

/// A database only one test uses, removed when the test ends.
pub enum TestDatabase {
    /// Gone with its pool (in-memory SQLite), or never created.
    Ephemeral,
    /// A schema of its own in the PostgreSQL test database.
    #[cfg(feature = "postgres")]
    Postgres { url: String, schema: String },
}

impl TestDatabase {
    pub async fn create(
        backend: Backend,
        settings: &Settings,
        instruments: &StoreInstruments,
    ) -> Option<(Arc<dyn OrderStore>, TestDatabase)> {
        match backend {
            Backend::Sqlite => {
                let mut database = settings.database.clone();
                database.url = DatabaseUrl::from_str("sqlite::memory:").expect("valid URL");
                let store =
                    SqliteStore::connect_lazy(&database, instruments).expect("SQLite store");
                Some((Arc::new(store), TestDatabase::Ephemeral))
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres => {
                let (options, database) = Self::postgres_schema().await?;
                let store = app::store::PostgresStore::with_options(
                    options,
                    &settings.database,
                    instruments,
                );
                Some((Arc::new(store), database))
            }
        }
    }

    /// A fresh schema in the PostgreSQL test database, and options that connect into it.
    #[cfg(feature = "postgres")]
    pub async fn postgres_schema() -> Option<(sqlx::postgres::PgConnectOptions, TestDatabase)> {
        let url = postgres_url()?;
        let schema = format!("test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = connect_admin(&url).await;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut admin)
            .await
            .expect("create test schema");
        let options = sqlx::postgres::PgConnectOptions::from_str(&url)
            .expect("valid TEST_POSTGRES_URL")
            .options([("search_path", schema.as_str())]);
        Some((options, TestDatabase::Postgres { url, schema }))
    }
}

#[cfg(feature = "postgres")]
async fn connect_admin(url: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(url)
        .await
        .unwrap_or_else(|err| panic!("cannot connect to {POSTGRES_URL_VAR}: {err}"))
}

#[cfg(feature = "postgres")]
impl Drop for TestDatabase {
    fn drop(&mut self) {
        let TestDatabase::Postgres { url, schema } = self else {
            return;
        };
        let (url, schema_name) = (url.clone(), schema.clone());
        // Drop runs inside the test's runtime, which cannot block on async work: drop the schema from
        // a thread with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = connect_admin(&url).await;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {schema_name} CASCADE"
                )))
                .execute(&mut admin)
                .await
                .map(drop)
                .map_err(std::io::Error::other)
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "warning: test schema {schema} was not dropped"
            );
        }
    }
}
