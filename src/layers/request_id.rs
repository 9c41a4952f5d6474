//! `X-Request-Id`: keeps a sane incoming id, else makes one; sends it upstream and back.
//!
//! Outermost, so that every log line, error envelope and upstream request of this request
//! carries the same id.
//!
//! Kept beside tower-http's `SetRequestIdLayer` / `PropagateRequestIdLayer`: those keep any
//! incoming id as it is, and erpgate must not (a client-chosen id of any length or bytes would
//! go into every log line, error envelope and upstream request: `is_sane` bounds it to 128
//! printable characters, else a new one is made); and the pair is two layers and a
//! `MakeRequestId` for what is one header copied three ways here.
//!
//! ```ignore
//! ServiceBuilder::new().layer(RequestIdLayer).service(inner)
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::{Body, BoxError};

/// The header.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// An incoming id is kept when it is 1 to 128 characters of `[A-Za-z0-9._:-]`: enough for
/// UUIDs and trace ids, and nothing that could inject into a log line.
fn is_sane(value: &HeaderValue) -> bool {
    let b = value.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

fn new_id() -> HeaderValue {
    let id = format!("{:032x}", rand::random::<u128>());
    // 32 hex digits are always a valid header value.
    HeaderValue::try_from(id).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Adds request ids.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestId { inner }
    }
}

/// The service of [`RequestIdLayer`].
#[derive(Debug, Clone)]
pub struct RequestId<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for RequestId<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = RequestIdFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let id = match request.headers().get(&X_REQUEST_ID) {
            Some(v) if is_sane(v) => v.clone(),
            _ => new_id(),
        };
        request
            .headers_mut()
            .insert(X_REQUEST_ID.clone(), id.clone());
        RequestIdFuture {
            future: self.inner.call(request),
            id: Some(id),
        }
    }
}

pin_project! {
    /// Copies the id onto the response.
    pub struct RequestIdFuture<F> {
        #[pin]
        future: F,
        id: Option<HeaderValue>,
    }
}

impl<F> Future for RequestIdFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.future.poll(cx))?;
        if let Some(id) = this.id.take() {
            response.headers_mut().insert(X_REQUEST_ID.clone(), id);
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanity() {
        assert!(is_sane(&HeaderValue::from_static("3f1c-aa.b_c:1")));
        assert!(!is_sane(&HeaderValue::from_static("")));
        assert!(!is_sane(&HeaderValue::from_static("a b")));
        assert!(!is_sane(&HeaderValue::from_static("a\"b")));
        assert!(!is_sane(&HeaderValue::try_from("a".repeat(129)).unwrap()));
        assert!(is_sane(&new_id()));
    }
}
