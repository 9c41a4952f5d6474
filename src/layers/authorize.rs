//! Access rules: whether this client may do what the request does ([`FrappeRequest`], attached
//! by classification). Refused → 403 `PermissionError`, nothing sent upstream.
//!
//! After the rate limiter, so that probing the rules costs quota like any other request, and
//! before idempotency and retries, so a refused request is never recorded or repeated.
//!
//! ```ignore
//! ServiceBuilder::new().layer(AuthorizeLayer).service(inner)
//! ```

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service};

use crate::error::GatewayError;
use crate::frappe::FrappeRequest;
use crate::layers::auth::Client;
use crate::layers::EarlyReturn;
use crate::{Body, BoxError};

/// Checks access rules.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthorizeLayer;

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authorize { inner }
    }
}

/// The service of [`AuthorizeLayer`].
#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
}

fn check(request: &Request<Body>) -> Result<(), GatewayError> {
    let client = request
        .extensions()
        .get::<Arc<Client>>()
        .ok_or(GatewayError::Unauthenticated("no client"))?;
    let Some(rules) = &client.rules else {
        return Ok(());
    };
    let classified = request
        .extensions()
        .get::<FrappeRequest>()
        .ok_or_else(|| GatewayError::BadRequest("request could not be classified".into()))?;
    rules.check(classified).map_err(|denied| {
        tracing::info!(client = %client.name, reason = %denied, "request refused by access rules");
        GatewayError::Forbidden(denied)
    })
}

impl<S> Service<Request<Body>> for Authorize<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = EarlyReturn<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        match check(&request) {
            Ok(()) => EarlyReturn::inner(self.inner.call(request)),
            Err(e) => EarlyReturn::error(e),
        }
    }
}
