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

use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service};

use crate::layers::route::RouteTarget;
use crate::layers::BoxResponseFuture;
use crate::{Body, BoxError};

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
        site.through_breaker(|| self.inner.call(request))
    }
}
