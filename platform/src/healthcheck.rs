//! The `healthcheck` command: the probe for container runtimes and Kubernetes exec probes in images
//! with no shell and no `grpc_health_probe`. It asks a server's `grpc.health.v1.Health` for one
//! service's status, over TLS (and mutual TLS) whenever the server is configured for it, and says
//! why it failed.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    client::{self, ClientError},
    config::PlatformSettings,
};

/// What to ask, and of whom.
#[derive(Debug, Clone)]
pub struct Probe {
    /// `host:port`; the server's own `server.grpc_addr` (on loopback) when `None`.
    pub addr: Option<String>,
    /// `""` for the whole server (liveness), or a service's full name (readiness of the API).
    pub service: String,
    /// Bound on the whole probe: connecting, the handshake and the call.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    #[error("invalid address {addr:?}: {source}")]
    Address {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error(transparent)]
    ClientSettings(#[from] ClientError),
    #[error(
        "the server uses TLS (tls.cert_file is set): set client.ca_file to the CA that signed it"
    )]
    NoCa,
    #[error("invalid TLS settings: {0}")]
    Tls(tonic::transport::Error),
    #[error("cannot reach {addr}: {source}")]
    Unreachable {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("no answer from {addr} within {timeout:?}")]
    TimedOut { addr: String, timeout: Duration },
    #[error("the server does not know the service {0:?}")]
    UnknownService(String),
    #[error("{addr} closed the connection before answering{hint}")]
    Dropped { addr: String, hint: &'static str },
    #[error("health check failed: {0}")]
    Failed(tonic::Status),
    #[error("{service} is {status}")]
    NotServing {
        service: &'static str,
        status: &'static str,
    },
}

/// Succeeds when the server reports SERVING for `probe.service`; the status otherwise.
pub async fn check(settings: &PlatformSettings, probe: &Probe) -> Result<(), HealthcheckError> {
    let addr = probe
        .addr
        .clone()
        .unwrap_or_else(|| reachable(settings.server.grpc_addr).to_string());
    let endpoint = endpoint(settings, &addr)?
        .connect_timeout(probe.timeout)
        .timeout(probe.timeout);
    let asked = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| HealthcheckError::Unreachable {
                addr: addr.clone(),
                source,
            })?;
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: probe.service.clone(),
            })
            .await
            .map_err(|status| match status.code() {
                tonic::Code::NotFound => HealthcheckError::UnknownService(probe.service.clone()),
                // Under TLS 1.3 a server refusing the client's certificate (or its absence) says so
                // after the client's side of the handshake is done: the call sees the close.
                _ if std::error::Error::source(&status)
                    .is_some_and(|source| source.is::<tonic::transport::Error>()) =>
                {
                    HealthcheckError::Dropped {
                        addr: addr.clone(),
                        hint: if settings.tls.cert_file.is_some()
                            && settings.client.cert_file.is_none()
                        {
                            " (if it requires a client certificate: set client.cert_file and \
                         client.key_file)"
                        } else {
                            ""
                        },
                    }
                }
                _ => HealthcheckError::Failed(status),
            })
    };
    let response = tokio::time::timeout(probe.timeout, asked)
        .await
        .map_err(|_| HealthcheckError::TimedOut {
            addr: addr.clone(),
            timeout: probe.timeout,
        })??;
    let service = if probe.service.is_empty() {
        "the server"
    } else {
        "the service"
    };
    match response.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        status => Err(HealthcheckError::NotServing {
            service,
            status: status.as_str_name(),
        }),
    }
}

/// Plaintext, or TLS when the server has a certificate: verified against `client.ca_file`, with
/// `client.cert_file` presented when set (mutual TLS).
fn endpoint(settings: &PlatformSettings, addr: &str) -> Result<Endpoint, HealthcheckError> {
    let tls = settings.tls.cert_file.is_some();
    let scheme = if tls { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|source| {
        HealthcheckError::Address {
            addr: addr.to_owned(),
            source,
        }
    })?;
    if !tls {
        return Ok(endpoint);
    }
    let config = client::tls_config(&settings.client)?.ok_or(HealthcheckError::NoCa)?;
    endpoint.tls_config(config).map_err(HealthcheckError::Tls)
}

/// A server listening on every interface is reached on loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}
