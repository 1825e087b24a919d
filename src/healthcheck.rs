//! The `healthcheck` command: a probe for container runtimes that have no gRPC health probe of their
//! own; it asks the server on `server.grpc_addr` for the overall status.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    #[error("cannot reach {addr}: {source}")]
    Unreachable {
        addr: SocketAddr,
        source: tonic::transport::Error,
    },
    #[error("health check failed: {0}")]
    Failed(#[from] tonic::Status),
    #[error("server reports {0:?}")]
    NotServing(ServingStatus),
}

/// Succeeds when the server listening on `addr` reports SERVING for the whole server.
pub async fn check(addr: SocketAddr) -> Result<(), HealthcheckError> {
    let addr = reachable(addr);
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|source| HealthcheckError::Unreachable { addr, source })?
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT)
        .connect()
        .await
        .map_err(|source| HealthcheckError::Unreachable { addr, source })?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await?
        .into_inner()
        .status();
    match status {
        ServingStatus::Serving => Ok(()),
        other => Err(HealthcheckError::NotServing(other)),
    }
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
