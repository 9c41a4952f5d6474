//! The request body limit: a declared `Content-Length` over the limit is refused at once (413,
//! nothing sent upstream); a body without one is counted as it streams and cut off at the limit,
//! which the edge reports as 413 too.
//!
//! Before authentication, so an oversized upload is refused without any work spent on it.
//!
//! Kept beside tower-http's `RequestBodyLimitLayer`, which does the same two checks but answers
//! with its own plain-text 413 and wraps the body in its own type: here the refusal is an error
//! the edge turns into Frappe's envelope (with the request id and API version, as every other
//! refusal), and the body stays erpgate's [`Body`] for the layers inside.

use std::task::{Context, Poll};

use http::{header, Request, Response};
use http_body_util::Limited;
use tower::{Layer, Service};

use crate::error::GatewayError;
use crate::layers::EarlyReturn;
use crate::{Body, BoxError};

/// Limits request bodies to `max_bytes`.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimitLayer {
    max_bytes: u64,
}

impl BodyLimitLayer {
    /// Bodies up to `max_bytes` pass.
    pub fn new(max_bytes: u64) -> Self {
        Self { max_bytes }
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BodyLimit {
            inner,
            max_bytes: self.max_bytes,
        }
    }
}

/// The service of [`BodyLimitLayer`].
#[derive(Debug, Clone)]
pub struct BodyLimit<S> {
    inner: S,
    max_bytes: u64,
}

impl<S> Service<Request<Body>> for BodyLimit<S>
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
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_bytes) {
            return EarlyReturn::error(GatewayError::PayloadTooLarge {
                limit: self.max_bytes,
            });
        }
        let limit = usize::try_from(self.max_bytes).unwrap_or(usize::MAX);
        let request = request.map(|body| Body::new(Limited::new(body, limit)));
        EarlyReturn::inner(self.inner.call(request))
    }
}
