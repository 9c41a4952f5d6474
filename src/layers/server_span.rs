//! One OpenTelemetry server span per request, a child of the caller's `traceparent` when it
//! sent one (W3C Trace Context), with the HTTP semantic-convention attributes and erpgate's
//! own: client, site, kind, doctype or method, cache result, retries, breaker and rate-limit
//! outcome.
//!
//! Just inside observation, which writes the span's trace id into the access log line; outside
//! everything that can refuse, so refusals are traced too. The span's context travels in the
//! request's extensions ([`ServerSpan`]): the classifier names the doctype or method on it, and
//! each attempt to the site is a child span (`layers::attempt_span`).
//!
//! This is written here rather than with tower-http's `TraceLayer`, which makes `tracing`
//! spans: their export to OpenTelemetry goes through `tracing-opentelemetry` and a subscriber
//! layer that every request's span and event would pay for, while this layer costs nothing
//! when tracing is off (it is not in the stack) and little for an unsampled request (its
//! attributes are only built when the span records).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use http::{Request, Response};
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::error::ErrorKind;
use crate::forwarding::{ArrivedOverTls, PeerAddr};
use crate::frappe::RequestKind;
use crate::tags::RequestTags;
use crate::telemetry::SpanStarter;
use crate::{Body, BoxError};

/// The server span's context, in the request's extensions for the layers inside.
#[derive(Clone, Debug)]
pub struct ServerSpan(pub Context);

impl ServerSpan {
    /// Names the doctype or method a classified request acts on.
    pub fn describe(&self, kind: &RequestKind) {
        let span = self.0.span();
        if !span.is_recording() {
            return;
        }
        match kind {
            RequestKind::Resource { doctype, .. } => {
                span.set_attribute(KeyValue::new("erpgate.doctype", doctype.clone()));
            }
            RequestKind::Method(method) => {
                span.set_attribute(KeyValue::new("erpgate.method", method.as_str().to_owned()));
            }
            _ => {}
        }
    }
}

/// The layer.
#[derive(Clone)]
pub struct ServerSpanLayer {
    spans: SpanStarter,
}

impl ServerSpanLayer {
    /// Starts spans with `spans`.
    pub fn new(spans: SpanStarter) -> Self {
        Self { spans }
    }
}

impl<S> Layer<S> for ServerSpanLayer {
    type Service = ServerSpanService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ServerSpanService {
            inner,
            spans: self.spans.clone(),
        }
    }
}

/// The service.
#[derive(Clone)]
pub struct ServerSpanService<S> {
    inner: S,
    spans: SpanStarter,
}

impl<S> Service<Request<Body>> for ServerSpanService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ServerSpanFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
        let cx = self
            .spans
            .start(request.method(), SpanKind::Server, &parent);
        let span = cx.span();
        let tags = RequestTags::of(&request).cloned();
        if let Some(tags) = &tags {
            let _ = tags.trace_id.set(span.span_context().trace_id().to_bytes());
        }
        if span.is_recording() {
            let mut attributes = vec![
                KeyValue::new("http.request.method", request.method().as_str().to_owned()),
                KeyValue::new("url.path", request.uri().path().to_owned()),
                KeyValue::new(
                    "url.scheme",
                    if request.extensions().get::<ArrivedOverTls>().is_some() {
                        "https"
                    } else {
                        "http"
                    },
                ),
                KeyValue::new(
                    "network.protocol.version",
                    match request.version() {
                        http::Version::HTTP_2 => "2",
                        http::Version::HTTP_10 => "1.0",
                        _ => "1.1",
                    },
                ),
            ];
            if let Some(peer) = request.extensions().get::<PeerAddr>() {
                attributes.push(KeyValue::new(
                    "network.peer.address",
                    peer.0.ip().to_string(),
                ));
            }
            if let Some(agent) = request
                .headers()
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
            {
                attributes.push(KeyValue::new("user_agent.original", agent.to_owned()));
            }
            span.set_attributes(attributes);
        }
        request.extensions_mut().insert(ServerSpan(cx.clone()));
        let request_method = request.method().clone();
        ServerSpanFuture {
            future: self.inner.call(request),
            end: EndSpan {
                cx,
                method: request_method,
                tags,
                done: false,
            },
        }
    }
}

/// Ends the span when the answer is ready, or when the request is dropped unanswered.
struct EndSpan {
    cx: Context,
    method: http::Method,
    tags: Option<Arc<RequestTags>>,
    done: bool,
}

impl EndSpan {
    fn finish(&mut self, response: Option<&Response<Body>>) {
        self.done = true;
        let span = self.cx.span();
        if !span.is_recording() {
            span.end();
            return;
        }
        let mut attributes = Vec::with_capacity(10);
        let kind = self.tags.as_ref().and_then(|t| t.kind.get().copied());
        if let Some(tags) = &self.tags {
            if let Some(client) = tags.client.get() {
                attributes.push(KeyValue::new("erpgate.client", client.to_string()));
            }
            if let Some(site) = tags.site.get() {
                attributes.push(KeyValue::new("erpgate.site", site.to_string()));
            }
            if let Some(kind) = kind {
                attributes.push(KeyValue::new("erpgate.kind", kind));
            }
            let attempts = tags.attempts.load(std::sync::atomic::Ordering::Relaxed);
            attributes.push(KeyValue::new(
                "erpgate.retries",
                i64::from(attempts.saturating_sub(1)),
            ));
        }
        match response {
            None => {
                attributes.push(KeyValue::new("error.type", "client_closed_request"));
                span.set_status(Status::error("the client closed the request"));
            }
            Some(response) => {
                let status = response.status();
                attributes.push(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status.as_u16()),
                ));
                let headers = response.headers();
                if let Some(cache) = headers.get("x-cache").and_then(|v| v.to_str().ok()) {
                    attributes.push(KeyValue::new("erpgate.cache", cache.to_owned()));
                }
                let refused_as = response.extensions().get::<ErrorKind>().map(|e| e.0);
                // The breaker's verdict: it refused, or let the request through to the site.
                if refused_as == Some("UpstreamUnavailable") {
                    attributes.push(KeyValue::new("erpgate.breaker", "open"));
                } else if self
                    .tags
                    .as_ref()
                    .is_some_and(|t| t.attempts.load(std::sync::atomic::Ordering::Relaxed) > 0)
                {
                    attributes.push(KeyValue::new("erpgate.breaker", "passed"));
                }
                let limited = status == http::StatusCode::TOO_MANY_REQUESTS
                    && refused_as == Some("TooManyRequestsError");
                if limited {
                    attributes.push(KeyValue::new("erpgate.rate_limit", "limited"));
                } else if let Some(remaining) = headers
                    .get("x-ratelimit-remaining")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i64>().ok())
                {
                    attributes.push(KeyValue::new("erpgate.rate_limit", "allowed"));
                    attributes.push(KeyValue::new("erpgate.rate_limit.remaining", remaining));
                }
                if let Some(exc_type) = refused_as {
                    attributes.push(KeyValue::new("erpgate.error", exc_type));
                }
                if status.is_server_error() {
                    attributes.push(KeyValue::new("error.type", status.as_u16().to_string()));
                    span.set_status(Status::error(refused_as.unwrap_or("server error")));
                }
            }
        }
        span.set_attributes(attributes);
        // `{method} {kind}`: low-cardinality, as the HTTP conventions want of a span name.
        if let Some(kind) = kind {
            span.update_name(format!("{} {kind}", self.method));
        }
        span.end();
    }
}

impl Drop for EndSpan {
    fn drop(&mut self) {
        if !self.done {
            self.finish(None);
        }
    }
}

pin_project! {
    /// Ends the span with the answer.
    pub struct ServerSpanFuture<F> {
        #[pin]
        future: F,
        end: EndSpan,
    }
}

impl<F> Future for ServerSpanFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.future.poll(cx));
        match &result {
            Ok(response) => this.end.finish(Some(response)),
            Err(_) => this.end.finish(None),
        }
        Poll::Ready(result)
    }
}
