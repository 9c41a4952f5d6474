//! The innermost service: sends the request to its site's upstream.
//!
//! On a streaming route the answer's body is passed on as it arrives, so nothing above bounds
//! how long it may take; a site that sends the head and then nothing would hold the client's
//! connection and an upstream connection for ever. Each wait for the next part of such a body
//! is bounded by `timeouts.request`, the route's or else the site's (nginx's `proxy_read_timeout`): time the client takes to
//! read does not count, only time spent waiting on the site. Buffered answers are read whole
//! within `timeouts.total` by the buffer layer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use tower::Service;

use crate::error::GatewayError;
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
        Box::pin(async move {
            let upstream = &target.site.upstream;
            let timeout = target.request_timeout();
            let response = upstream.send(request, timeout).await?;
            if !target.streaming {
                return Ok(response);
            }
            let site = target.site.name.clone();
            Ok(response.map(|body| {
                Body::new(StallBound {
                    inner: body,
                    timeout,
                    site,
                    waiting: None,
                })
            }))
        })
    }
}

/// A response body whose every wait on the site is bounded.
struct StallBound {
    inner: Body,
    timeout: Duration,
    site: std::sync::Arc<str>,
    /// The deadline of the wait under way, set when the site last had nothing to give.
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for StallBound {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                // The next wait starts when the client asks for more, not now.
                this.waiting = None;
                Poll::Ready(frame)
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this
                    .waiting
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                tracing::warn!(site = %this.site, ?timeout, "the site stopped sending an answer's body");
                Poll::Ready(Some(Err(GatewayError::UpstreamTimeout {
                    site: this.site.to_string(),
                    timeout,
                }
                .into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
