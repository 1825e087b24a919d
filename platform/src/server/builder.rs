//! Registering services: each gRPC service comes with its policy (its descriptors and the scope each
//! method needs) and the dependencies its readiness follows; `build` turns them into one [`Server`]
//! with reflection, health and the layers every call passes through.

use std::{convert::Infallible, sync::Arc};

use tonic::{body::Body, server::NamedService, service::RoutesBuilder};
use tower::ServiceBuilder;

use super::{
    Server, ServerError,
    connection::ConnectionOptions,
    deadline::{DeadlineLayer, TimeoutTable},
    drain::DrainLayer,
    error_details::ErrorDetailsLayer,
    in_flight::InFlightLimitLayer,
    is_health_check,
    observe::{Catalogue, ObserveLayer},
    panic_guard::PanicGuardLayer,
    rate_limit::RateLimitLayer,
};
use crate::{
    ServiceInfo,
    auth::{AuthLayer, AuthPolicy},
    config::PlatformSettings,
    health::{self, Dependency, Readiness, WatchSettings},
    methods::{self, PLATFORM_DESCRIPTOR_SETS},
    status,
    telemetry::metrics::Metrics,
    tls::ServerTls,
};

/// What the platform needs to know of a gRPC service beside its handlers.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The service's encoded `FileDescriptorSet` (`tonic::include_file_descriptor_set!`): its methods
    /// and their kinds, its messages for the log, and what reflection serves.
    descriptor_set: &'static [u8],
    /// The scope each method needs, by method name (`"GetUser"`). A method with none is refused to
    /// every caller unless `auth.public_methods` names it.
    scopes: Vec<(&'static str, &'static str)>,
}

impl Policy {
    pub fn new(descriptor_set: &'static [u8]) -> Self {
        Self {
            descriptor_set,
            scopes: Vec::new(),
        }
    }

    /// The scope each method needs, by method name.
    pub fn scopes(mut self, scopes: &[(&'static str, &'static str)]) -> Self {
        self.scopes.extend_from_slice(scopes);
        self
    }
}

/// The services of one server, their policies and their readiness; see [`Server::builder`].
pub struct ServerBuilder {
    settings: PlatformSettings,
    service: ServiceInfo,
    error_domain: &'static str,
    routes: RoutesBuilder,
    descriptor_sets: Vec<&'static [u8]>,
    scopes: Vec<(String, &'static str)>,
    readiness: Vec<Readiness>,
    metrics: Option<Option<Arc<Metrics>>>,
}

impl Server {
    /// A server with `settings`, running as `service` (its name and build, in metrics and traces).
    pub fn builder(settings: &PlatformSettings, service: ServiceInfo) -> ServerBuilder {
        ServerBuilder {
            settings: settings.clone(),
            service,
            error_domain: "",
            routes: RoutesBuilder::default(),
            descriptor_sets: Vec::new(),
            scopes: Vec::new(),
            readiness: Vec::new(),
            metrics: None,
        }
    }

    /// The metrics registry `settings` asks for: none when `server.metrics_addr` is `""`. Made
    /// before the server when the service records into it too (its database client, say); hand it to
    /// [`ServerBuilder::metrics`].
    pub fn metrics_for(
        settings: &PlatformSettings,
        service: &ServiceInfo,
    ) -> Result<Option<Arc<Metrics>>, ServerError> {
        Ok(match settings.server.metrics_addr {
            Some(_) => Some(Arc::new(Metrics::new(&settings.telemetry, service)?)),
            None => None,
        })
    }
}

impl ServerBuilder {
    /// `ErrorInfo.domain` of every error the server sends: the API's proto package.
    pub fn error_domain(mut self, domain: &'static str) -> Self {
        self.error_domain = domain;
        self
    }

    /// The registry to record into, made with [`Server::metrics_for`]; one is made from the
    /// settings when this is not called.
    pub fn metrics(mut self, metrics: Option<Arc<Metrics>>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Serves `service` (a generated `…Server`) under `policy`.
    pub fn service<S>(mut self, service: S, policy: Policy) -> Self
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.scopes.extend(
            policy
                .scopes
                .iter()
                .map(|(method, scope)| (format!("{}/{method}", S::NAME), *scope)),
        );
        // Services compiled from one proto directory share one set: each set is read once.
        if !self.descriptor_sets.contains(&policy.descriptor_set) {
            self.descriptor_sets.push(policy.descriptor_set);
        }
        self.routes.add_service(service);
        self
    }

    /// The readiness of `services` (full names, as health checks ask for them) follows `dependency`:
    /// NOT_SERVING until it is prepared and its first check passes.
    pub fn readiness(mut self, services: &[&str], dependency: Arc<dyn Dependency>) -> Self {
        self.readiness.push(Readiness {
            services: services.iter().map(|name| (*name).to_owned()).collect(),
            dependency,
        });
        self
    }

    /// The server, ready to serve on any connection source. Connects to nothing yet.
    pub async fn build(self) -> Result<Server, ServerError> {
        let Self {
            settings,
            service,
            error_domain,
            mut routes,
            descriptor_sets,
            scopes,
            readiness,
            metrics,
        } = self;
        // `Settings::load` checks this too; settings built in code must not skip it (a certificate
        // without its key would otherwise leave TLS silently off).
        settings.check().map_err(ServerError::Config)?;
        status::set_error_domain(error_domain);
        let metrics = match metrics {
            Some(metrics) => metrics,
            None => Server::metrics_for(&settings, &service)?,
        };
        let limit = settings.server.max_message_bytes;
        let (reporter, health_service) = tonic_health::server::health_reporter();
        // Alive, but not ready until the dependencies are: the watches started by `serve` flip that.
        health::starting(&reporter, &readiness).await;
        routes.add_service(
            health_service
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        );

        let mut all_sets = descriptor_sets.clone();
        all_sets.extend(PLATFORM_DESCRIPTOR_SETS);
        if settings.server.reflection {
            let builder = || {
                let mut builder = tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
                for set in &descriptor_sets {
                    builder = builder.register_encoded_file_descriptor_set(set);
                }
                builder
            };
            routes
                .add_service(
                    builder()
                        .build_v1()?
                        .max_decoding_message_size(limit)
                        .max_encoding_message_size(limit),
                )
                .add_service(
                    builder()
                        .build_v1alpha()?
                        .max_decoding_message_size(limit)
                        .max_encoding_message_size(limit),
                );
        }

        let methods = methods::methods_in(&all_sets);
        let timeouts =
            TimeoutTable::new(&settings.server.timeouts, &methods).map_err(ServerError::Config)?;
        let auth = AuthPolicy::new(&settings.auth, &methods, &scopes)?;
        let max_in_flight =
            usize::try_from(settings.server.max_in_flight.get()).unwrap_or(usize::MAX);
        let catalogue = Catalogue::new(
            &methods,
            &methods::descriptor_pool(&all_sets),
            metrics.as_deref(),
            &settings.telemetry.redact_fields,
        )?;
        let drain = DrainLayer::new();
        let in_flight = InFlightLimitLayer::new(max_in_flight).exempt(is_health_check);
        let calls = ServiceBuilder::new()
            .layer(ObserveLayer::new(catalogue))
            .layer(drain.clone())
            .layer(in_flight.clone())
            .layer(DeadlineLayer::new(timeouts))
            .layer(AuthLayer::new(auth))
            .layer(RateLimitLayer::new(&settings.server.rate_limit).exempt(is_health_check))
            .layer(PanicGuardLayer)
            .layer(ErrorDetailsLayer)
            .service(routes.routes().prepare());

        let tls = ServerTls::load(&settings.tls)?;
        Ok(Server {
            calls,
            readiness,
            health: reporter,
            watch: WatchSettings {
                interval: settings.health.check_interval,
                failure_threshold: settings.health.failure_threshold.get(),
            },
            tls,
            tls_reload_interval: settings.tls.reload_interval,
            connections: Arc::new(ConnectionOptions::new(
                &settings.server,
                settings.tls.handshake_timeout,
            )),
            metrics,
            drain,
            in_flight,
            settings,
        })
    }
}
