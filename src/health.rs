//! Readiness from real dependency state: a background task applies migrations (when configured to),
//! then keeps checking the database and reports the result through `grpc.health.v1.Health`, for the
//! whole server (`""`) and for the order API.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{api::order_service_server::OrderServiceServer, service::OrderApi, store::OrderStore};

/// The service name that health checks use for the order API.
pub const ORDER_SERVICE_NAME: &str = <OrderServiceServer<OrderApi> as NamedService>::NAME;

/// The names whose status follows the database: the whole server and the order API.
const REPORTED_SERVICES: [&str; 2] = ["", ORDER_SERVICE_NAME];

pub async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    for service in REPORTED_SERVICES {
        reporter.set_service_status(service, status).await;
    }
}

/// How the dependency watch behaves.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// Apply migrations before reporting SERVING; otherwise only check that they were applied.
    pub migrate: bool,
    /// Time between checks.
    pub interval: Duration,
    /// Longest one check may take before the database counts as unreachable.
    pub check_timeout: Duration,
}

/// Runs until `stop` is cancelled. Statuses start NOT_SERVING and follow each check's result.
pub async fn watch_database(
    store: Arc<dyn OrderStore>,
    reporter: HealthReporter,
    settings: WatchSettings,
    stop: CancellationToken,
) {
    let mut migrated = !settings.migrate;
    let mut serving = None;
    let mut ticks = tokio::time::interval(settings.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let check = check_once(store.as_ref(), &settings, &mut migrated);
        let ready = tokio::select! {
            () = stop.cancelled() => return,
            ready = check => ready,
        };
        if serving != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            tracing::info!(?status, "health status changed");
            set_all(&reporter, status).await;
            serving = Some(ready);
        }
    }
}

/// Applies migrations if that is still to do, then checks the database; true when it is ready.
async fn check_once(store: &dyn OrderStore, settings: &WatchSettings, migrated: &mut bool) -> bool {
    if !*migrated {
        // Not bounded by `check_timeout`: a long migration is progress, not an outage.
        match store.migrate().await {
            Ok(()) => {
                tracing::info!("database migrations applied");
                *migrated = true;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot apply database migrations yet");
                return false;
            }
        }
    }
    match tokio::time::timeout(settings.check_timeout, store.check_ready()).await {
        Ok(Ok(())) => true,
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "database not ready");
            false
        }
        Err(_) => {
            tracing::warn!(timeout = ?settings.check_timeout, "database check timed out");
            false
        }
    }
}
