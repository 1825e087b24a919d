//! Health as `grpc.health.v1.Health` reports it, in two meanings:
//! - liveness, the whole server (`""`): the process is alive and not draining. It stays SERVING through
//!   an outage of what the service depends on, because restarting the process would not bring that
//!   back;
//! - readiness, each registered service by its full name: ready to serve. A background task per
//!   [`Dependency`] prepares it (applies migrations, say), then keeps checking it; the statuses of the
//!   services that depend on it follow.
//!
//! Every status turns NOT_SERVING when the drain starts.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

/// The name whose status is the whole server's liveness.
pub const LIVENESS: &str = "";

/// Something a service needs in order to serve (its database, say): checked for readiness while the
/// server runs, and closed once its calls are done.
#[async_trait]
pub trait Dependency: Send + Sync + 'static {
    /// What it is, for the log: "database".
    fn name(&self) -> &str;

    /// Work before the first check (applying migrations): tried again at each interval until it
    /// succeeds, and not bounded like a check, since a long migration is progress, not an outage.
    async fn prepare(&self) -> Result<(), String> {
        Ok(())
    }

    /// Whether it can serve now; the cause when it cannot. Bound its own duration: a check that
    /// hangs holds readiness where it is.
    async fn check(&self) -> Result<(), String>;

    /// Closes it, at the end of the drain.
    async fn close(&self) {}
}

/// The services whose readiness follows one dependency.
#[derive(Clone)]
pub struct Readiness {
    pub services: Vec<String>,
    pub dependency: Arc<dyn Dependency>,
}

/// Liveness SERVING, readiness NOT_SERVING: how the server starts, until its dependencies answer.
pub async fn starting(reporter: &HealthReporter, readiness: &[Readiness]) {
    reporter
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    for group in readiness {
        set_readiness(reporter, &group.services, ServingStatus::NotServing).await;
    }
}

/// Every status NOT_SERVING, and `Watch` streams told: the drain has started.
pub async fn draining(reporter: &HealthReporter, readiness: &[Readiness]) {
    reporter
        .set_service_status(LIVENESS, ServingStatus::NotServing)
        .await;
    for group in readiness {
        set_readiness(reporter, &group.services, ServingStatus::NotServing).await;
    }
}

async fn set_readiness(reporter: &HealthReporter, services: &[String], status: ServingStatus) {
    for service in services {
        reporter.set_service_status(service, status).await;
    }
}

/// How the watch of a dependency behaves.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// Time between checks.
    pub interval: Duration,
    /// Consecutive failed checks before NOT_SERVING.
    pub failure_threshold: u32,
}

/// Readiness from consecutive check results: NOT_SERVING until the first success, then SERVING
/// until `threshold` checks in a row fail; one success brings it back.
#[derive(Debug)]
struct Streak {
    threshold: u32,
    failures: u32,
    serving: Option<bool>,
}

impl Streak {
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

/// Runs until `stop` is cancelled. The services' readiness starts NOT_SERVING and follows the
/// dependency's checks with `failure_threshold`; each change is logged once, with its cause.
pub async fn watch(
    readiness: Readiness,
    reporter: HealthReporter,
    settings: WatchSettings,
    stop: CancellationToken,
) {
    let Readiness {
        services,
        dependency,
    } = readiness;
    let name = dependency.name().to_owned();
    let mut prepared = false;
    let mut streak = Streak::new(settings.failure_threshold);
    let mut ticks = tokio::time::interval(settings.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let check = check_once(dependency.as_ref(), &mut prepared);
        let outcome = tokio::select! {
            () = stop.cancelled() => return,
            outcome = check => outcome,
        };
        let failures_before = streak.failures;
        match (streak.observe(outcome.is_ok()), &outcome) {
            (Some(status), Ok(())) => {
                tracing::info!(
                    ?status,
                    cause = format!("{name} check succeeded"),
                    "health status changed"
                );
                set_readiness(&reporter, &services, status).await;
            }
            (Some(status), Err(cause)) => {
                tracing::warn!(?status, %cause, failures = streak.failures,
                    "health status changed");
                set_readiness(&reporter, &services, status).await;
            }
            // The first failure of a run below the threshold: worth a line, not yet a change.
            (None, Err(cause)) if failures_before == 0 => {
                tracing::warn!(%cause, threshold = settings.failure_threshold,
                    "{name} check failed; still serving until the threshold");
            }
            (None, _) => {}
        }
    }
}

/// Prepares the dependency if that is still to do, then checks it; the cause when it is not ready.
async fn check_once(dependency: &dyn Dependency, prepared: &mut bool) -> Result<(), String> {
    if !*prepared {
        dependency.prepare().await?;
        *prepared = true;
    }
    dependency.check().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_the_threshold_of_failures_and_one_success() {
        let mut streak = Streak::new(3);
        // Not ready until the first success, and said so once.
        assert_eq!(streak.observe(false), Some(ServingStatus::NotServing));
        assert_eq!(streak.observe(false), None);
        assert_eq!(streak.observe(true), Some(ServingStatus::Serving));
        // Two failures in a row do not flap it; a success resets the count.
        assert_eq!(streak.observe(false), None);
        assert_eq!(streak.observe(false), None);
        assert_eq!(streak.observe(true), None);
        assert_eq!(streak.observe(false), None);
        assert_eq!(streak.observe(false), None);
        assert_eq!(streak.observe(false), Some(ServingStatus::NotServing));
        assert_eq!(streak.observe(false), None);
        assert_eq!(streak.observe(true), Some(ServingStatus::Serving));
    }

    #[test]
    fn a_threshold_of_one_follows_every_check() {
        let mut streak = Streak::new(1);
        assert_eq!(streak.observe(true), Some(ServingStatus::Serving));
        assert_eq!(streak.observe(false), Some(ServingStatus::NotServing));
        assert_eq!(streak.observe(true), Some(ServingStatus::Serving));
    }
}
