//! The edge: turns any error from the layers inside into a Frappe-envelope response, through
//! [`crate::error::error_response`], the one conversion there is.
//!
//! It sits just inside observation, so the access log and metrics see the final status, and
//! outside every layer that can fail, so no error escapes as a dropped connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::error::error_response;
use crate::frappe::{ApiVersion, CanonicalPath};
use crate::layers::request_id::X_REQUEST_ID;
use crate::tags::RequestTags;
use crate::{Body, BoxError};

/// Renders errors as responses.
#[derive(Debug, Clone, Copy)]
pub struct ErrorResponseLayer {
    body_limit: u64,
}

impl ErrorResponseLayer {
    /// `body_limit` is named in the 413 raised while a body streams.
    pub fn new(body_limit: u64) -> Self {
        Self { body_limit }
    }
}

impl<S> Layer<S> for ErrorResponseLayer {
    type Service = ErrorResponse<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ErrorResponse {
            inner,
            body_limit: self.body_limit,
        }
    }
}

/// The service of [`ErrorResponseLayer`].
#[derive(Debug, Clone)]
pub struct ErrorResponse<S> {
    inner: S,
    body_limit: u64,
}

impl<S> Service<Request<Body>> for ErrorResponse<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ErrorResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let tags = RequestTags::of(&request).cloned();
        let request_id = request.headers().get(&X_REQUEST_ID).cloned();
        // Cheap (a reference count): needed only if the request fails before routing.
        let uri = request.uri().clone();
        ErrorResponseFuture {
            future: self.inner.call(request),
            tags,
            uri,
            request_id,
            body_limit: self.body_limit,
        }
    }
}

pin_project! {
    /// Maps `Err` to an error response.
    pub struct ErrorResponseFuture<F> {
        #[pin]
        future: F,
        tags: Option<Arc<RequestTags>>,
        uri: http::Uri,
        request_id: Option<http::HeaderValue>,
        body_limit: u64,
    }
}

impl<F> Future for ErrorResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match std::task::ready!(this.future.poll(cx)) {
            Ok(response) => Poll::Ready(Ok(response)),
            Err(err) => {
                // Routing records the API of the canonical path; before routing, read the raw one.
                let api = match this.tags.as_ref().and_then(|t| t.api.get().copied()) {
                    Some(api) => api,
                    None => CanonicalPath::parse(this.uri.path())
                        .ok()
                        .and_then(|p| ApiVersion::of(&p)),
                };
                let id = this
                    .request_id
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                Poll::Ready(Ok(error_response(&err, api, id, *this.body_limit)))
            }
        }
    }
}
