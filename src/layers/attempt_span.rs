//! One OpenTelemetry client span per attempt sent to a site, a child of the request's server
//! span; the attempt's `traceparent` and `tracestate` replace the caller's, so Frappe's own
//! traces (and logs) hang under the attempt that reached it.
//!
//! Last before the network, below the retries and the breaker: each retry is an attempt of its
//! own (`http.request.resend_count`), and a request the breaker refuses makes none.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context as TaskContext, Poll};

use http::{Request, Response};
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::HeaderInjector;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::layers::server_span::ServerSpan;
use crate::tags::RequestTags;
use crate::telemetry::SpanStarter;
use crate::{Body, BoxError};

/// The layer.
#[derive(Clone)]
pub struct AttemptSpanLayer {
    spans: SpanStarter,
}

impl AttemptSpanLayer {
    /// Starts spans with `spans`.
    pub fn new(spans: SpanStarter) -> Self {
        Self { spans }
    }
}

impl<S> Layer<S> for AttemptSpanLayer {
    type Service = AttemptSpan<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AttemptSpan {
            inner,
            spans: self.spans.clone(),
        }
    }
}

/// The service.
#[derive(Clone)]
pub struct AttemptSpan<S> {
    inner: S,
    spans: SpanStarter,
}

impl<S> Service<Request<Body>> for AttemptSpan<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = AttemptFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let resends = RequestTags::of(&request)
            .map_or(0, |tags| tags.attempts.fetch_add(1, Ordering::Relaxed));
        let parent = request
            .extensions()
            .get::<ServerSpan>()
            .map_or_else(Context::new, |s| s.0.clone());
        let cx = self
            .spans
            .start(request.method(), SpanKind::Client, &parent);
        let span = cx.span();
        if span.is_recording() {
            let mut attributes = vec![
                KeyValue::new("http.request.method", request.method().as_str().to_owned()),
                KeyValue::new("url.path", request.uri().path().to_owned()),
            ];
            if let Some(host) = request
                .headers()
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
            {
                attributes.push(KeyValue::new("server.address", host.to_owned()));
            }
            if resends > 0 {
                attributes.push(KeyValue::new(
                    "http.request.resend_count",
                    i64::from(resends),
                ));
            }
            span.set_attributes(attributes);
        }
        let headers = request.headers_mut();
        headers.remove("traceparent");
        headers.remove("tracestate");
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
        AttemptFuture {
            future: self.inner.call(request),
            cx,
        }
    }
}

pin_project! {
    /// Ends the attempt's span with its outcome (when dropped unfinished, the span ends then).
    pub struct AttemptFuture<F> {
        #[pin]
        future: F,
        cx: Context,
    }
}

impl<F> Future for AttemptFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.future.poll(cx));
        let span = this.cx.span();
        match &result {
            Ok(response) => {
                let status = response.status();
                span.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status.as_u16()),
                ));
                if status.is_server_error() {
                    span.set_attribute(KeyValue::new("error.type", status.as_u16().to_string()));
                    span.set_status(Status::error("server error"));
                }
            }
            Err(error) => {
                span.set_attribute(KeyValue::new("error.type", "transport"));
                span.set_status(Status::error(error.to_string()));
            }
        }
        span.end();
        Poll::Ready(result)
    }
}
