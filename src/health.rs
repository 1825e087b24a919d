//! Health as `grpc.health.v1.Health` reports it, in two meanings:
//! - liveness, the whole server (`""`): the process is alive and not draining. It stays SERVING through
//!   a database outage, because restarting the process would not bring the database back;
//! - readiness, the order API ([`ORDER_SERVICE_NAME`]): ready to serve orders. A background task
//!   applies migrations (when configured to), then keeps checking the database; this status follows
//!   it.
//!
//! Both turn NOT_SERVING when the drain starts.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::store::OrderStore;

/// The service name that health checks use for the order API.
pub const ORDER_SERVICE_NAME: &str = crate::api::order_service_server::SERVICE_NAME;

/// The name whose status is the whole server's liveness.
pub const LIVENESS: &str = "";

/// The names whose status follows the database.
const READINESS: [&str; 1] = [ORDER_SERVICE_NAME];

/// Liveness SERVING, readiness NOT_SERVING: how the server starts, until the database answers.
pub async fn starting(reporter: &HealthReporter) {
    reporter
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    set_readiness(reporter, ServingStatus::NotServing).await;
}

/// Every status NOT_SERVING, and `Watch` streams told: the drain has started.
pub async fn draining(reporter: &HealthReporter) {
    reporter
        .set_service_status(LIVENESS, ServingStatus::NotServing)
        .await;
    set_readiness(reporter, ServingStatus::NotServing).await;
}

async fn set_readiness(reporter: &HealthReporter, status: ServingStatus) {
    for service in READINESS {
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
    /// Consecutive failed checks before NOT_SERVING.
    pub failure_threshold: u32,
    /// Longest one check may take before the database counts as unreachable.
    pub check_timeout: Duration,
}

/// Readiness from consecutive check results: NOT_SERVING until the first success, then SERVING
/// until `threshold` checks in a row fail; one success brings it back.
#[derive(Debug)]
struct Readiness {
    threshold: u32,
    failures: u32,
    serving: Option<bool>,
}

impl Readiness {
    fn new(threshold: u32) -> Self {
        Self {
            threshold: threshold.max(1),
            failures: 0,
            serving: None,
        }
    }

    /// Takes one check's result; returns the new status when it changes.
    fn observe(&mut self, ready: bool) -> Option<ServingStatus> {
        if ready {
            self.failures = 0;
            if self.serving == Some(true) {
                return None;
            }
            self.serving = Some(true);
            return Some(ServingStatus::Serving);
        }
        self.failures = self.failures.saturating_add(1);
        // Not yet ready at all, or failing long enough: NOT_SERVING, once.
        let failing = self.serving.is_none() || self.failures >= self.threshold;
        if failing && self.serving != Some(false) {
            self.serving = Some(false);
            return Some(ServingStatus::NotServing);
        }
        None
    }
}

/// Runs until `stop` is cancelled. Readiness starts NOT_SERVING and follows the checks' results with
/// `failure_threshold`; each change is logged once, with its cause.
pub async fn watch_database(
    store: Arc<dyn OrderStore>,
    reporter: HealthReporter,
    settings: WatchSettings,
    stop: CancellationToken,
) {
    let mut migrated = !settings.migrate;
    let mut readiness = Readiness::new(settings.failure_threshold);
    let mut ticks = tokio::time::interval(settings.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let check = check_once(store.as_ref(), &settings, &mut migrated);
        let outcome = tokio::select! {
            () = stop.cancelled() => return,
            outcome = check => outcome,
        };
        let failures_before = readiness.failures;
        match (readiness.observe(outcome.is_ok()), &outcome) {
            (Some(status), Ok(())) => {
                tracing::info!(
                    ?status,
                    cause = "database check succeeded",
                    "health status changed"
                );
                set_readiness(&reporter, status).await;
            }
            (Some(status), Err(cause)) => {
                tracing::warn!(?status, %cause, failures = readiness.failures,
                    "health status changed");
                set_readiness(&reporter, status).await;
            }
            // The first failure of a run below the threshold: worth a line, not yet a change.
            (None, Err(cause)) if failures_before == 0 => {
                tracing::warn!(%cause, threshold = settings.failure_threshold,
                    "database check failed; still serving until the threshold");
            }
            (None, _) => {}
        }
    }
}

/// Applies migrations if that is still to do, then checks the database; the cause when it is not
/// ready.
async fn check_once(
    store: &dyn OrderStore,
    settings: &WatchSettings,
    migrated: &mut bool,
) -> Result<(), String> {
    if !*migrated {
        // Not bounded by `check_timeout`: a long migration is progress, not an outage.
        match store.migrate().await {
            Ok(()) => {
                tracing::info!("database migrations applied");
                *migrated = true;
            }
            Err(err) => return Err(format!("cannot apply database migrations yet: {err}")),
        }
    }
    match tokio::time::timeout(settings.check_timeout, store.check_ready()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(format!("database not ready: {err}")),
        Err(_) => Err(format!(
            "database check timed out after {:?}",
            settings.check_timeout
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_the_threshold_of_failures_and_one_success() {
        let mut readiness = Readiness::new(3);
        // Not ready until the first success, and said so once.
        assert_eq!(readiness.observe(false), Some(ServingStatus::NotServing));
        assert_eq!(readiness.observe(false), None);
        assert_eq!(readiness.observe(true), Some(ServingStatus::Serving));
        // Two failures in a row do not flap it; a success resets the count.
        assert_eq!(readiness.observe(false), None);
        assert_eq!(readiness.observe(false), None);
        assert_eq!(readiness.observe(true), None);
        assert_eq!(readiness.observe(false), None);
        assert_eq!(readiness.observe(false), None);
        assert_eq!(readiness.observe(false), Some(ServingStatus::NotServing));
        assert_eq!(readiness.observe(false), None);
        assert_eq!(readiness.observe(true), Some(ServingStatus::Serving));
    }

    #[test]
    fn a_threshold_of_one_follows_every_check() {
        let mut readiness = Readiness::new(1);
        assert_eq!(readiness.observe(true), Some(ServingStatus::Serving));
        assert_eq!(readiness.observe(false), Some(ServingStatus::NotServing));
        assert_eq!(readiness.observe(true), Some(ServingStatus::Serving));
    }
}
