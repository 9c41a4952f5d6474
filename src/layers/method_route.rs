//! Method routes: decides the route of a request that routes with `methods` matched by host
//! and path, now that classification says what it runs ([`FrappeRequest`], Frappe's own view:
//! `/api/method/<name>`, `/api/v2/method/<name>` or a `cmd` in any carrier, under any alias).
//! The first candidate whose methods the request runs wins; else the route its host and path
//! led to (or its client's site). A request without candidates passes untouched.
//!
//! Right after classification, before the quotas, rules, cache and retries, which all read the
//! [`RouteTarget`]: a route's site, account, timeouts and retries are known before any of them
//! acts. The path needs no change: a method route never strips a prefix, and no route after
//! one does, so the path classified is the one forwarded.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service};

use crate::error::GatewayError;
use crate::frappe::FrappeRequest;
use crate::layers::route::{account_on, PendingRoute, RouteTarget};
use crate::layers::EarlyReturn;
use crate::routing::Router;
use crate::tags::RequestTags;
use crate::{Body, BoxError};

/// Decides pending method routes.
#[derive(Debug, Clone)]
pub struct MethodRouteLayer {
    router: Arc<Router>,
}

impl MethodRouteLayer {
    /// Decides with `router`'s routes (the router the route layer used).
    pub fn new(router: Arc<Router>) -> Self {
        Self { router }
    }
}

impl<S> Layer<S> for MethodRouteLayer {
    type Service = MethodRoute<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MethodRoute {
            inner,
            router: self.router.clone(),
        }
    }
}

/// The service of [`MethodRouteLayer`].
#[derive(Debug, Clone)]
pub struct MethodRoute<S> {
    inner: S,
    router: Arc<Router>,
}

impl<S> MethodRoute<S> {
    fn decide(&self, request: &mut Request<Body>) -> Result<(), GatewayError> {
        let Some(pending) = request.extensions_mut().remove::<PendingRoute>() else {
            return Ok(());
        };
        let won = request
            .extensions()
            .get::<FrappeRequest>()
            .and_then(|runs| {
                pending.candidates.iter().find_map(|&index| {
                    let route = self.router.candidate(index)?;
                    route
                        .methods
                        .as_ref()
                        .is_some_and(|methods| methods.runs_any(runs))
                        .then_some(route)
                })
            });
        let (site, streaming, timeouts) = match won {
            Some(route) => (route.site.clone(), route.streaming, route.timeouts),
            None => (pending.site, pending.streaming, pending.timeouts),
        };
        let account = account_on(request, &site)?;
        if let Some(tags) = RequestTags::of(request) {
            let _ = tags.site.set(site.name.clone());
        }
        request.extensions_mut().insert(RouteTarget {
            site,
            streaming,
            account,
            timeouts,
        });
        Ok(())
    }
}

impl<S> Service<Request<Body>> for MethodRoute<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = EarlyReturn<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        match self.decide(&mut request) {
            Ok(()) => EarlyReturn::inner(self.inner.call(request)),
            Err(e) => EarlyReturn::error(e),
        }
    }
}
