//! The gRPC server: one `Application` (services, reflection, health and layers) that `serve` and the
//! tests both run, and the lifecycle around it: readiness from the database, graceful shutdown.

mod access_log;

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{
    Server,
    server::{Connected, Router, TcpIncoming},
};
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::layer::util::{Identity, Stack};

pub use self::access_log::AccessLogLayer;
use crate::{
    api,
    config::Settings,
    health::{self, WatchSettings},
    service::OrderApi,
    shutdown,
    store::{self, OrderStore},
};

/// The middleware every call passes through, outermost first.
pub type Layers = Stack<AccessLogLayer, Identity>;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::error::Error),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The complete server, ready to serve on any connection source.
pub struct Application {
    router: Router<Layers>,
    store: Arc<dyn OrderStore>,
    health: HealthReporter,
    watch: WatchSettings,
}

impl Application {
    /// Builds the server on the store that `settings.database` selects. Connects to nothing yet.
    pub async fn build(settings: &Settings) -> Result<Self, ServerError> {
        let store = store::connect(&settings.database)?;
        Self::with_store(store, settings).await
    }

    /// Builds the server on a given store; the tests use it to pick an isolated database.
    pub async fn with_store(
        store: Arc<dyn OrderStore>,
        settings: &Settings,
    ) -> Result<Self, ServerError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        // Nothing is ready until the database is: the watch started by `serve` flips this.
        health::set_all(&health, ServingStatus::NotServing).await;

        let (reflection_v1, reflection_v1alpha) = if settings.server.reflection {
            let builder = || {
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(api::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            };
            (
                Some(builder().build_v1()?),
                Some(builder().build_v1alpha()?),
            )
        } else {
            (None, None)
        };

        let router = Server::builder()
            .layer(AccessLogLayer)
            .add_service(health_service)
            .add_service(OrderApi::new(Arc::clone(&store), &settings.service).into_server())
            .add_optional_service(reflection_v1)
            .add_optional_service(reflection_v1alpha);

        Ok(Self {
            router,
            store,
            health,
            watch: WatchSettings {
                migrate: settings.database.migrate,
                interval: settings.server.health_check_interval,
                check_timeout: settings.database.connect_timeout,
            },
        })
    }

    /// Serves connections from `incoming` until `shutdown` completes, then reports NOT_SERVING, lets
    /// in-flight calls finish and closes the database pool.
    pub async fn serve_with_incoming<I, IO, IE>(
        self,
        incoming: I,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError>
    where
        I: futures::Stream<Item = Result<IO, IE>>,
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Connected + Unpin + Send + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stop_watching = CancellationToken::new();
        // However serving ends, the watch ends with it.
        let _stop_watching_on_exit = stop_watching.clone().drop_guard();
        let watcher = tokio::spawn(health::watch_database(
            Arc::clone(&self.store),
            self.health.clone(),
            self.watch,
            stop_watching.clone(),
        ));

        let health = self.health;
        let stopping = async move {
            shutdown.await;
            // Stop the watch first so it cannot report SERVING again, then tell clients and load
            // balancers to go elsewhere while the calls already running finish.
            stop_watching.cancel();
            if let Err(err) = watcher.await {
                tracing::error!(error = %err, "health watch task failed");
            }
            health::set_all(&health, ServingStatus::NotServing).await;
            tracing::info!("draining in-flight calls");
        };
        let served = self
            .router
            .serve_with_incoming_shutdown(incoming, stopping)
            .await;
        self.store.close().await;
        tracing::info!("server stopped");
        Ok(served?)
    }
}

/// The `serve` command: listens on `server.grpc_addr` until SIGINT or SIGTERM.
pub async fn run(settings: &Settings) -> Result<(), ServerError> {
    let addr = settings.server.grpc_addr;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;
    let application = Application::build(settings).await?;
    tracing::info!(addr = %local_addr, "serving gRPC");
    application
        .serve_with_incoming(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown::signal(),
        )
        .await
}
