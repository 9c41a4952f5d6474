//! Observation: the in-flight gauge, `erpgate_requests_total`, the duration histogram and one
//! access-log line per request.
//!
//! Second from the outside: inside the request id (so the log line has it), outside everything
//! that can refuse a request (so refusals are counted). It puts an empty [`RequestTags`] in the
//! request for inner layers to fill in with the client, site and kind.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Method, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::error::ErrorKind;
use crate::layers::request_id::X_REQUEST_ID;
use crate::metrics::Metrics;
use crate::tags::RequestTags;
use crate::{Body, BoxError};

/// Observes requests.
#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Metrics,
}

impl ObserveLayer {
    /// Reports into `metrics`.
    pub fn new(metrics: Metrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service of [`ObserveLayer`].
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: Metrics,
}

impl<S> Service<Request<Body>> for Observe<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let tags = Arc::new(RequestTags::default());
        request.extensions_mut().insert(tags.clone());
        self.metrics.inflight.inc();
        let record = Record {
            metrics: self.metrics.clone(),
            tags,
            started: Instant::now(),
            method: request.method().clone(),
            // The path only, never the query: it may carry `sid` or other secrets.
            path: request.uri().path().to_owned(),
            request_id: request
                .headers()
                .get(&X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            done: false,
        };
        ObserveFuture {
            future: self.inner.call(request),
            record,
        }
    }
}

/// What is reported when the response head is ready, or when the request is dropped.
struct Record {
    metrics: Metrics,
    tags: Arc<RequestTags>,
    started: Instant,
    method: Method,
    path: String,
    request_id: String,
    done: bool,
}

impl Record {
    fn finish(&mut self, status: u16, error: Option<&str>) {
        self.done = true;
        self.metrics.inflight.dec();
        let none: Arc<str> = Arc::from("none");
        let client = self.tags.client.get().unwrap_or(&none);
        let site = self.tags.site.get().unwrap_or(&none);
        let kind = self.tags.kind.get().copied().unwrap_or("unclassified");
        let elapsed = self.started.elapsed();
        let mut code = itoa::Buffer::new();
        self.metrics
            .requests
            .with_label_values(&[site.as_ref(), client.as_ref(), kind, code.format(status)])
            .inc();
        self.metrics
            .request_duration
            .with_label_values(&[site.as_ref(), kind])
            .observe(elapsed.as_secs_f64());
        tracing::info!(
            target: "erpgate::access",
            request_id = %self.request_id,
            client = %client,
            site = %site,
            kind,
            method = %self.method,
            path = %self.path,
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            error = error.unwrap_or(""),
        );
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        // The client went away before an answer: count it as nginx does, 499.
        if !self.done {
            self.finish(499, Some("client closed request"));
        }
    }
}

pin_project! {
    /// Reports when the inner future completes.
    pub struct ObserveFuture<F> {
        #[pin]
        future: F,
        record: Record,
    }
}

impl<F> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.future.poll(cx));
        match &result {
            Ok(response) => {
                let error = response.extensions().get::<ErrorKind>().map(|k| k.0);
                this.record.finish(response.status().as_u16(), error);
            }
            Err(e) => this.record.finish(500, Some(&e.to_string())),
        }
        Poll::Ready(result)
    }
}
