//! An optional per-client rate limit (`server.rate_limit`): a token bucket per caller, keyed by the
//! authenticated subject, else the client certificate's identity, else the peer's IP address.
//! A call over the rate is refused with RESOURCE_EXHAUSTED, a `RetryInfo` detail and the
//! `grpc-retry-pushback-ms` trailer, which gRPC clients with a retry policy honour.
//!
//! Health checks (`Health/Check`) are never limited: probes from one node must not use up the node's bucket.
//!
//! Buckets that have refilled are forgotten every `PRUNE_EVERY` calls, so memory follows the number
//! of recently active clients, not every client ever seen.

use std::{
    net::IpAddr,
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use futures::future::{Either, Ready, ready};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock};
use tower::{Layer, Service};

use super::{Exempt, connection::Peer};
use crate::{auth::Subject, config::RateLimitSettings, status, tls::ClientIdentity};

const PRUNE_EVERY: u64 = 1024;

/// Who a bucket belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ClientKey {
    Subject(String),
    Certificate(String),
    Address(IpAddr),
    /// Calls with no known origin (in-memory connections) share one bucket.
    Unknown,
}

struct Buckets {
    limiter: DefaultKeyedRateLimiter<ClientKey>,
    calls: AtomicU64,
}

/// The layer; without a configured rate it passes every call through untouched.
#[derive(Clone)]
pub struct RateLimitLayer {
    buckets: Option<Arc<Buckets>>,
    exempt: Exempt,
}

impl RateLimitLayer {
    pub fn new(settings: &RateLimitSettings) -> Self {
        let buckets = NonZeroU32::new(settings.per_second).map(|per_second| {
            let burst = NonZeroU32::new(settings.burst).unwrap_or(per_second);
            Arc::new(Buckets {
                limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
                calls: AtomicU64::new(0),
            })
        });
        Self {
            buckets,
            exempt: |_| false,
        }
    }

    /// Calls to the paths `exempt` picks are never limited.
    pub fn exempt(mut self, exempt: Exempt) -> Self {
        self.exempt = exempt;
        self
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            buckets: self.buckets.clone(),
            exempt: self.exempt,
        }
    }
}

#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    buckets: Option<Arc<Buckets>>,
    exempt: Exempt,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RateLimit<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        if let Some(buckets) = &self.buckets
            && !(self.exempt)(request.uri().path())
        {
            let key = client_key(request.extensions());
            if let Err(not_until) = buckets.limiter.check_key(&key) {
                let wait = not_until.wait_time_from(buckets.limiter.clock().now());
                return Either::Right(ready(Ok(status::rate_limited(wait).into_http())));
            }
            if buckets.calls.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
                buckets.limiter.retain_recent();
            }
        }
        Either::Left(self.inner.call(request))
    }
}

fn client_key(extensions: &http::Extensions) -> ClientKey {
    // An empty name identifies nobody: fall through to the next kind of key.
    if let Some(subject) = extensions
        .get::<Subject>()
        .filter(|s| !s.as_str().is_empty())
    {
        return ClientKey::Subject(subject.as_str().to_owned());
    }
    if let Some(identity) = extensions
        .get::<ClientIdentity>()
        .filter(|identity| !identity.name().is_empty())
    {
        return ClientKey::Certificate(identity.name().to_owned());
    }
    match extensions.get::<Peer>().and_then(|peer| peer.addr) {
        Some(addr) => ClientKey::Address(network(addr.ip())),
        None => ClientKey::Unknown,
    }
}

/// The address a client is keyed by: IPv4 as it is, IPv6 by its /64, the block one host is usually
/// given, so a client cannot escape its limit by rotating through its own addresses.
fn network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::from(std::net::Ipv6Addr::from(prefix))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tower::ServiceExt;

    use super::*;

    #[test]
    fn clients_are_keyed_by_subject_then_certificate_then_network() {
        let mut extensions = http::Extensions::new();
        assert_eq!(client_key(&extensions), ClientKey::Unknown);
        let v6: SocketAddr = "[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:443"
            .parse()
            .expect("addr");
        extensions.insert(Peer { addr: Some(v6) });
        assert_eq!(
            client_key(&extensions),
            ClientKey::Address("2001:db8:1:2::".parse().expect("ip"))
        );
        extensions.insert(Subject::from(""));
        assert!(matches!(client_key(&extensions), ClientKey::Address(_)));
        extensions.insert(Subject::from("alice"));
        assert_eq!(
            client_key(&extensions),
            ClientKey::Subject("alice".to_owned())
        );
    }

    #[tokio::test]
    async fn buckets_of_clients_gone_quiet_are_forgotten() {
        let layer = RateLimitLayer::new(&RateLimitSettings {
            per_second: 1_000_000,
            burst: 1,
        });
        let buckets = Arc::clone(layer.buckets.as_ref().expect("limit on"));
        let service = layer.layer(tower::service_fn(|_: http::Request<()>| {
            std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(())))
        }));
        // 4 × PRUNE_EVERY clients, each calling once, from a different address.
        for client in 0..4 * PRUNE_EVERY {
            let mut request = http::Request::new(());
            let ip = IpAddr::from(u32::try_from(client).expect("small").to_be_bytes());
            request.extensions_mut().insert(Peer {
                addr: Some(SocketAddr::new(ip, 1)),
            });
            service.clone().oneshot(request).await.expect("answered");
        }
        assert!(
            buckets.limiter.len() < 2 * usize::try_from(PRUNE_EVERY).expect("small"),
            "{} buckets kept",
            buckets.limiter.len()
        );
    }
}
