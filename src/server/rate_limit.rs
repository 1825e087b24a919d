//! An optional per-client rate limit (`server.rate_limit`): a token bucket per caller, keyed by the
//! authenticated subject, else the client certificate's identity, else the peer's IP address.
//! A call over the rate is refused with RESOURCE_EXHAUSTED, a `RetryInfo` detail and the
//! `grpc-retry-pushback-ms` trailer, which gRPC clients with a retry policy honour.
//!
//! Health checks are never limited: probes from one node must not use up the node's bucket.
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

use super::{connection::Peer, is_health_check};
use crate::{auth::Subject, config::RateLimitSettings, status};

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
        Self { buckets }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            buckets: self.buckets.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    buckets: Option<Arc<Buckets>>,
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
            && !is_health_check(request.uri().path())
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
    if let Some(subject) = extensions.get::<Subject>() {
        return ClientKey::Subject(subject.as_str().to_owned());
    }
    let peer = extensions.get::<Peer>();
    if let Some(identity) = peer.and_then(|peer| peer.identity.as_ref()) {
        return ClientKey::Certificate(identity.name().to_owned());
    }
    match peer.and_then(|peer| peer.addr) {
        Some(addr) => ClientKey::Address(addr.ip()),
        None => ClientKey::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tower::ServiceExt;

    use super::*;

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
                identity: None,
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
