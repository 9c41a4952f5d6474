//! The overall deadline: the whole exchange with the site, every retry and backoff included,
//! must produce a response head within the route's `timeouts.total` (else the site's), else 504
//! `UpstreamTimeout`. The attempt in flight is dropped (its connection closed), so nothing is
//! left running.
//!
//! Outside the retry layer, which it bounds; per-attempt timeouts are the upstream client's.
//!
//! Kept beside tower-http's `TimeoutLayer`, whose deadline is one duration for the whole
//! service, answered with a bare status: here it is the routed site's own `timeouts.total`
//! (known only once the request is routed), counted against that site, and answered as a 504
//! Frappe envelope naming it. tower-http's `RequestBodyTimeoutLayer` is not used either: the
//! client's body deadline is the buffering layer's `client_body_timeout`, answered 408 and
//! never counted against the site's breaker.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use crate::error::GatewayError;
use crate::layers::route::RouteTarget;
use crate::{Body, BoxError};

/// Bounds each request by its site's total timeout.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Deadline { inner }
    }
}

/// The service of [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for Deadline<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let limit = request
            .extensions()
            .get::<RouteTarget>()
            .map(|t| (t.site.name.clone(), t.total_timeout()));
        DeadlineFuture {
            sleep: limit
                .as_ref()
                .map(|(_, d)| Box::pin(tokio::time::sleep(*d))),
            limit,
            future: self.inner.call(request),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower::ServiceExt;

    use super::*;
    use crate::site::RetrySettings;

    #[tokio::test(start_paused = true)]
    async fn a_request_that_never_answers_ends_at_the_deadline() {
        let retry = RetrySettings {
            max_retries: 0,
            backoff_base: Duration::ZERO,
            backoff_max: Duration::ZERO,
            max_retry_after: Duration::ZERO,
            max_body_bytes: 0,
            budget: tower::retry::budget::TpsBudget::new(Duration::from_secs(10), 1, 0.1),
        };
        let target = crate::layers::route::test_target(retry, Duration::from_secs(7));
        let never = tower::service_fn(|_request: Request<Body>| {
            std::future::pending::<Result<Response<Body>, BoxError>>()
        });
        let mut request = Request::new(crate::empty_body());
        request.extensions_mut().insert(target);
        let start = tokio::time::Instant::now();
        let err = DeadlineLayer
            .layer(never)
            .oneshot(request)
            .await
            .expect_err("the deadline answers");
        assert_eq!(start.elapsed(), Duration::from_secs(7));
        assert!(matches!(
            crate::error::find_cause::<GatewayError>(err.as_ref()),
            Some(GatewayError::UpstreamTimeout { .. })
        ));
    }
}

pin_project! {
    /// The inner future, or 504 when the deadline passes first.
    pub struct DeadlineFuture<F> {
        #[pin]
        future: F,
        sleep: Option<Pin<Box<Sleep>>>,
        limit: Option<(std::sync::Arc<str>, std::time::Duration)>,
    }
}

impl<F> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.future.poll(cx) {
            return Poll::Ready(result);
        }
        if let (Some(sleep), Some((site, timeout))) = (this.sleep.as_mut(), this.limit.as_ref()) {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(GatewayError::UpstreamTimeout {
                    site: site.to_string(),
                    timeout: *timeout,
                }
                .into()));
            }
        }
        Poll::Pending
    }
}
