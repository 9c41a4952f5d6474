//! Observation: the in-flight gauge, `erpgate_requests_total`, the duration histogram and one
//! access-log line per request.
//!
//! Second from the outside: inside the request id (so the log line has it), outside everything
//! that can refuse a request (so refusals are counted). It puts an empty [`RequestTags`] in the
//! request for inner layers to fill in with the client, site and kind.
//!
//! Kept beside tower-http's `TraceLayer`, which opens a `tracing` span per request and emits
//! events through callbacks: erpgate's access log is one line per request with fields learnt by
//! inner layers (client, site, kind, trace id) only known once the response is back, and its
//! metrics are labelled by them; a span per request through the `tracing` subscriber would cost
//! every request when only the line is wanted. OpenTelemetry spans are `layers::server_span`.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Method, Request, Response};
use pin_project_lite::pin_project;
use prometheus::{Histogram, IntCounter};
use rustc_hash::FxHashMap;
use tower::{Layer, Service};

use crate::error::ErrorKind;
use crate::layers::request_id::X_REQUEST_ID;
use crate::metrics::Metrics;
use crate::tags::RequestTags;
use crate::{Body, BoxError};

/// The handles this layer reports into, shared: one reference count per request, not one per
/// metric.
struct Handles {
    requests: prometheus::IntCounterVec,
    request_duration: prometheus::HistogramVec,
    inflight: prometheus::IntGauge,
}

/// A label value by identity: the address of a configured name (`Arc<str>` from the config,
/// kept alive by the entry) or of a `&'static str` kind. No string is hashed or compared.
type Name = usize;

fn name_of(name: Option<&Arc<str>>) -> Name {
    name.map_or(0, |n| Arc::as_ptr(n).cast::<u8>() as usize)
}

/// One serving worker's metric handles by label set, so a request finds its counter and
/// histogram without hashing label strings or taking the metric family's lock, which every
/// worker would otherwise touch on every request (prometheus' `with_label_values`). Each
/// entry holds the names it is keyed by, so their addresses cannot be reused while it lives.
#[derive(Default)]
struct WorkerHandles {
    /// Which `Handles` these belong to (tests run several gateways on one thread), held so
    /// its address is not reused by another while these are cached.
    owner: Option<Arc<Handles>>,
    requests: FxHashMap<(Name, Name, Name, u16), CachedCounter>,
    durations: FxHashMap<(Name, Name), CachedHistogram>,
}

/// `erpgate_requests_total` of one (site, client, kind, code), with the site and client names.
type CachedCounter = (IntCounter, [Option<Arc<str>>; 2]);
/// `erpgate_request_duration_seconds` of one (site, kind), with the site name.
type CachedHistogram = (Histogram, Option<Arc<str>>);

/// More entries than any configuration makes (sites × clients × kinds × codes seen): a worker
/// that reaches it (reloads renaming clients many times) starts afresh.
const MAX_CACHED_HANDLES: usize = 16_384;

thread_local! {
    static WORKER_HANDLES: RefCell<WorkerHandles> = RefCell::new(WorkerHandles::default());
}

impl Handles {
    /// Counts one answer and its duration, through this worker's cached handles.
    fn record(
        self: &Arc<Self>,
        site: Option<&Arc<str>>,
        client: Option<&Arc<str>>,
        kind: &'static str,
        status: u16,
        elapsed: f64,
    ) {
        let site_label = site.map_or("none", |s| s.as_ref());
        let client_label = client.map_or("none", |c| c.as_ref());
        WORKER_HANDLES.with(|cell| {
            let Ok(mut cached) = cell.try_borrow_mut() else {
                // Re-entered from a drop inside a drop: report without the cache.
                let mut code = itoa::Buffer::new();
                self.requests
                    .with_label_values(&[site_label, client_label, kind, code.format(status)])
                    .inc();
                self.request_duration
                    .with_label_values(&[site_label, kind])
                    .observe(elapsed);
                return;
            };
            let mine = cached.owner.as_ref().is_some_and(|o| Arc::ptr_eq(o, self));
            if !mine || cached.requests.len() + cached.durations.len() > MAX_CACHED_HANDLES {
                *cached = WorkerHandles {
                    owner: Some(self.clone()),
                    ..WorkerHandles::default()
                };
            }
            let kind_name = kind.as_ptr() as usize;
            let (site_name, client_name) = (name_of(site), name_of(client));
            cached
                .requests
                .entry((site_name, client_name, kind_name, status))
                .or_insert_with(|| {
                    let mut code = itoa::Buffer::new();
                    let counter = self.requests.with_label_values(&[
                        site_label,
                        client_label,
                        kind,
                        code.format(status),
                    ]);
                    (counter, [site.cloned(), client.cloned()])
                })
                .0
                .inc();
            cached
                .durations
                .entry((site_name, kind_name))
                .or_insert_with(|| {
                    let histogram = self.request_duration.with_label_values(&[site_label, kind]);
                    (histogram, site.cloned())
                })
                .0
                .observe(elapsed);
        });
    }
}

/// Observes requests.
#[derive(Clone)]
pub struct ObserveLayer {
    handles: Arc<Handles>,
}

impl ObserveLayer {
    /// Reports into `metrics`.
    pub fn new(metrics: Metrics) -> Self {
        Self {
            handles: Arc::new(Handles {
                requests: metrics.requests,
                request_duration: metrics.request_duration,
                inflight: metrics.inflight,
            }),
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            handles: self.handles.clone(),
        }
    }
}

/// The service of [`ObserveLayer`].
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    handles: Arc<Handles>,
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
        self.handles.inflight.inc();
        let record = Record {
            handles: self.handles.clone(),
            tags,
            started: Instant::now(),
            method: request.method().clone(),
            // Shared, not copied; only the path is logged, never the query (it may carry `sid`).
            uri: request.uri().clone(),
            request_id: request.headers().get(&X_REQUEST_ID).cloned(),
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
    handles: Arc<Handles>,
    tags: Arc<RequestTags>,
    started: Instant,
    method: Method,
    uri: http::Uri,
    request_id: Option<http::HeaderValue>,
    done: bool,
}

impl Record {
    fn finish(&mut self, status: u16, error: Option<&str>) {
        self.done = true;
        self.handles.inflight.dec();
        let kind = self.tags.kind.get().copied().unwrap_or("unclassified");
        let elapsed = self.started.elapsed();
        self.handles.record(
            self.tags.site.get(),
            self.tags.client.get(),
            kind,
            status,
            elapsed.as_secs_f64(),
        );
        let client = self.tags.client.get().map_or("none", |c| c.as_ref());
        let site = self.tags.site.get().map_or("none", |s| s.as_ref());
        let request_id = self
            .request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        tracing::info!(
            target: "erpgate::access",
            request_id,
            client,
            site,
            kind,
            method = %self.method,
            path = self.uri.path(),
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            error = error.unwrap_or(""),
            trace_id = %TraceId(self.tags.trace_id.get()),
        );
    }
}

/// A trace id as W3C Trace Context writes it (32 lowercase hex digits), or nothing when the
/// request is not traced; formatted straight into the log line.
struct TraceId<'a>(Option<&'a [u8; 16]>);

impl std::fmt::Display for TraceId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in self.0.into_iter().flatten() {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
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
