//! The innermost service: sends the request to its site's upstream.

use std::task::{Context, Poll};

use http::{Request, Response};
use tower::Service;

use crate::layers::route::RouteTarget;
use crate::layers::BoxResponseFuture;
use crate::{Body, BoxError};

/// Sends each request to the upstream of its [`RouteTarget`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Forward;

impl Service<Request<Body>> for Forward {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let Some(target) = request.extensions().get::<RouteTarget>().cloned() else {
            return Box::pin(async { Err("request reached the upstream unrouted".into()) });
        };
        Box::pin(async move { target.site.upstream.send(request).await })
    }
}
