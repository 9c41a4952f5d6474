//! The circuit breaker, one per site (failsafe): connect errors, timeouts, broken connections
//! and 502/503/504 answers count as failures; everything else (a 404, a 417, a 429 from
//! Frappe's own limiter) shows the site is alive. After `consecutive_failures` in a row, or a
//! failure rate over a window, the breaker opens for an exponential backoff with a cap; while
//! open, requests get 503 `UpstreamUnavailable` with `Retry-After` at once, without touching the
//! network. Then one probe is let through (half-open): success closes the breaker, failure opens
//! it again for longer.
//!
//! Inside the retry layer, so every attempt is counted and an open breaker stops retrying; the
//! cache (outside) can keep serving while it is open. The breaker's state lives with the site
//! ([`crate::site::breaker`]); this layer applies it to requests.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use tower::{Layer, Service};

use crate::error::{find_cause, GatewayError};
use crate::layers::route::RouteTarget;
use crate::layers::BoxResponseFuture;
use crate::site::breaker::{Admission, Outcome};
use crate::site::Site;
use crate::{Body, BoxError};

/// Releases the probe slot however the probe ends, even if its future is dropped.
struct ProbeGuard(Arc<Site>);

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if let Some(breaker) = &self.0.breaker {
            breaker.release_probe();
        }
    }
}

fn outcome(result: &Result<Response<Body>, BoxError>) -> Outcome {
    match result {
        Ok(response) => match response.status() {
            StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => Outcome::Failure,
            _ => Outcome::Success,
        },
        Err(e) => match find_cause::<GatewayError>(e.as_ref()) {
            Some(
                GatewayError::UpstreamUnreachable { .. }
                | GatewayError::UpstreamTimeout { .. }
                | GatewayError::BadGateway { .. },
            ) => Outcome::Failure,
            // A client's own body errors say nothing about the site.
            _ => Outcome::Neither,
        },
    }
}

/// Applies each site's breaker.
#[derive(Debug, Clone, Copy, Default)]
pub struct BreakerLayer;

impl<S> Layer<S> for BreakerLayer {
    type Service = BreakerService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BreakerService { inner }
    }
}

/// The service of [`BreakerLayer`].
#[derive(Debug, Clone)]
pub struct BreakerService<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for BreakerService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let Some(site) = request
            .extensions()
            .get::<RouteTarget>()
            .map(|t| t.site.clone())
        else {
            return Box::pin(self.inner.call(request));
        };
        let Some(breaker) = &site.breaker else {
            return Box::pin(self.inner.call(request));
        };
        let guard = match breaker.admit() {
            None => {
                let err = GatewayError::BreakerOpen {
                    site: site.name.to_string(),
                    retry_after: breaker.retry_after(),
                };
                return Box::pin(async move { Err(err.into()) });
            }
            Some(Admission::Probe) => Some(ProbeGuard(site.clone())),
            Some(Admission::Normal) => None,
        };
        let future: BoxResponseFuture = Box::pin(self.inner.call(request));
        Box::pin(async move {
            let result = future.await;
            if let Some(breaker) = &site.breaker {
                breaker.record(outcome(&result));
            }
            drop(guard);
            result
        })
    }
}
