//! The order service on the platform: its store, its API registered with its policy, and the
//! database its readiness follows. `main` and the tests build the server here, the same way.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use platform::{
    health::Dependency,
    server::{Policy, Server, ServerError},
    telemetry::metrics::{self, Metrics},
};

use crate::{
    api::{self, ORDER_SERVICE_NAME},
    config::Settings,
    service::{self, OrderApi},
    store::{self, Instrumented, OrderStore},
};

/// Builds the server on the store that `settings.database` selects. Connects to nothing yet.
pub async fn build(settings: &Settings) -> Result<Server, ServerError> {
    let metrics = Server::metrics_for(&settings.platform, &crate::SERVICE)?;
    let instruments = metrics::store_instruments(metrics.as_deref());
    let store = store::connect(&settings.database, &instruments)
        .map_err(|err| ServerError::Service(Box::new(err)))?;
    new(store, settings, metrics).await
}

/// Builds the server on a given store, with the metrics `settings` asks for; the tests use it to
/// pick an isolated database.
pub async fn with_store(
    store: Arc<dyn OrderStore>,
    settings: &Settings,
) -> Result<Server, ServerError> {
    let metrics = Server::metrics_for(&settings.platform, &crate::SERVICE)?;
    new(store, settings, metrics).await
}

/// Builds the server on a given store and metrics registry (the one the store's connection waits
/// are recorded into).
pub async fn new(
    store: Arc<dyn OrderStore>,
    settings: &Settings,
    metrics: Option<Arc<Metrics>>,
) -> Result<Server, ServerError> {
    let instruments = metrics::store_instruments(metrics.as_deref());
    let store: Arc<dyn OrderStore> = Arc::new(Instrumented::new(store, &instruments)?);
    if let Some(metrics) = &metrics {
        let store = Arc::clone(&store);
        metrics.watch_pool(move || store.pool_status());
    }
    let limit = settings.platform.server.max_message_bytes;
    let orders = OrderApi::new(Arc::clone(&store), &settings.service)
        .into_server()
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let database = Arc::new(Database {
        store,
        migrate: settings.database.migrate,
        check_timeout: settings.database.connect_timeout,
    });
    Server::builder(&settings.platform, crate::SERVICE)
        .error_domain(crate::status::ERROR_DOMAIN)
        .metrics(metrics)
        .service(
            orders,
            Policy::new(api::FILE_DESCRIPTOR_SET).scopes(&service::METHOD_SCOPES),
        )
        .readiness(&[ORDER_SERVICE_NAME], database)
        .build()
        .await
}

/// The order store as readiness sees it: migrated (when `database.migrate` is on) before the first
/// check, then checked for its schema, and closed at the end of the drain.
struct Database {
    store: Arc<dyn OrderStore>,
    migrate: bool,
    /// Longest one check may take before the database counts as unreachable.
    check_timeout: Duration,
}

#[async_trait]
impl Dependency for Database {
    fn name(&self) -> &str {
        "database"
    }

    async fn prepare(&self) -> Result<(), String> {
        if self.migrate {
            self.store
                .migrate()
                .await
                .map_err(|err| format!("cannot apply database migrations yet: {err}"))?;
            tracing::info!("database migrations applied");
        }
        Ok(())
    }

    async fn check(&self) -> Result<(), String> {
        match tokio::time::timeout(self.check_timeout, self.store.check_ready()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(format!("database not ready: {err}")),
            Err(_) => Err(format!(
                "database check timed out after {:?}",
                self.check_timeout
            )),
        }
    }

    async fn close(&self) {
        self.store.close().await;
    }
}
