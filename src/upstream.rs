//! The pooled HTTP(S) client of one site, and round-robin over its backends.
//!
//! A backend that refuses a connection is skipped for a short cool-down, and a request whose
//! body can be sent again (empty, or already buffered for inspection) moves on to the next
//! backend at once: a refused connection proves the request never reached Frappe. Once bytes may
//! have reached a backend, the request is never sent again from here.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::Body as _;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus::Histogram;

use crate::error::{find_cause, GatewayError};
use crate::{full_body, Body, BoxError};

thread_local! {
    /// Which serving worker this thread is (see `server`): it picks that worker's pool.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks this thread as serving worker `index`: its requests use that worker's connection
/// pools, so a request and its upstream connection never wake another thread.
pub fn set_worker_index(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// How long a backend that refused a connection is skipped.
const BACKEND_COOL_DOWN: Duration = Duration::from_secs(2);

/// A request extension: the request body, already read whole, so it can be sent again.
#[derive(Debug, Clone)]
pub struct ReplayableBody(pub Bytes);

/// Why a site's client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamBuildError {
    #[error("cannot read CA file {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("no usable certificate in CA file {0}")]
    NoCertificates(String),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

#[derive(Debug)]
struct Backend {
    scheme: Scheme,
    authority: Authority,
    /// Milliseconds since `Upstream::epoch` before which the backend is skipped.
    down_until_ms: AtomicU64,
}

/// One site's backends and pooled client.
#[derive(Debug)]
pub struct Upstream {
    site: Arc<str>,
    /// One pooled client per serving worker.
    clients: Vec<Client<HttpsConnector<HttpConnector>, Body>>,
    backends: Vec<Backend>,
    next: AtomicUsize,
    request_timeout: Duration,
    epoch: Instant,
    duration: Histogram,
}

impl Upstream {
    /// Builds the clients for `backends` (base URLs already validated by the config), one per
    /// serving worker.
    pub fn new(
        workers: usize,
        site: Arc<str>,
        backends: &[Uri],
        connect_timeout: Duration,
        request_timeout: Duration,
        ca_file: Option<&Path>,
        duration: Histogram,
    ) -> Result<Self, UpstreamBuildError> {
        let connector = https_connector(connect_timeout, ca_file)?;
        let clients = (0..workers.max(1))
            .map(|_| {
                Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(Duration::from_secs(60))
                    .build(connector.clone())
            })
            .collect();
        let backends = backends
            .iter()
            .filter_map(|uri| {
                Some(Backend {
                    scheme: uri.scheme()?.clone(),
                    authority: uri.authority()?.clone(),
                    down_until_ms: AtomicU64::new(0),
                })
            })
            .collect();
        Ok(Self {
            site,
            clients,
            backends,
            next: AtomicUsize::new(0),
            request_timeout,
            epoch: Instant::now(),
            duration,
        })
    }

    /// This worker's client.
    fn client(&self) -> &Client<HttpsConnector<HttpConnector>, Body> {
        let index = WORKER.with(std::cell::Cell::get);
        &self.clients[index % self.clients.len()]
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The next backend in turn that is not cooling down (or the next in turn if all are).
    fn pick(&self) -> usize {
        let n = self.backends.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| self.backends[i].down_until_ms.load(Ordering::Relaxed) <= now)
            .unwrap_or(start % n)
    }

    /// Sends a request (its URI holding only path and query) to a backend.
    pub async fn send(&self, request: Request<Body>) -> Result<Response<Body>, BoxError> {
        let (parts, body) = request.into_parts();
        let replay = match parts.extensions.get::<ReplayableBody>() {
            Some(ReplayableBody(bytes)) => Some(bytes.clone()),
            None if body.is_end_stream() => Some(Bytes::new()),
            None => None,
        };
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        // A body streamed from the client (a `streaming: true` route) reports when it has all
        // been sent: a timeout before then is the client's slowness, not the site's. A body the
        // gateway holds (in memory or spooled to a file) is never the client's doing.
        let held = replay.is_some() || parts.extensions.get::<HeldBody>().is_some();
        let sent = Arc::new(std::sync::atomic::AtomicBool::new(held));
        let mut body = Some(if held {
            body
        } else {
            Body::new(Sent {
                inner: body,
                sent: sent.clone(),
            })
        });
        let attempts = if replay.is_some() {
            self.backends.len()
        } else {
            1
        };
        for attempt in 1..=attempts {
            let index = self.pick();
            let backend = &self.backends[index];
            let uri = Uri::builder()
                .scheme(backend.scheme.clone())
                .authority(backend.authority.clone())
                .path_and_query(path.clone())
                .build()?;
            let mut request = Request::builder()
                .method(parts.method.clone())
                .uri(uri)
                .version(http::Version::HTTP_11)
                .body(match (&replay, body.take()) {
                    (Some(bytes), _) => full_body(bytes.clone()),
                    (None, Some(body)) => body,
                    (None, None) => break,
                })?;
            *request.headers_mut() = parts.headers.clone();
            let started = Instant::now();
            let result =
                tokio::time::timeout(self.request_timeout, self.client().request(request)).await;
            self.duration.observe(started.elapsed().as_secs_f64());
            match result {
                Ok(Ok(response)) => return Ok(response.map(Body::new)),
                Ok(Err(e)) if e.is_connect() => {
                    backend.down_until_ms.store(
                        self.now_ms() + BACKEND_COOL_DOWN.as_millis() as u64,
                        Ordering::Relaxed,
                    );
                    tracing::warn!(site = %self.site, backend = %backend.authority, attempt, error = %e, "backend refused connection");
                }
                Ok(Err(e)) => {
                    // The client's body failed (over a limit, refused mid-stream by the
                    // access rules, malformed): the client's doing, not the site's.
                    if find_cause::<http_body_util::LengthLimitError>(&e).is_some()
                        || find_cause::<GatewayError>(&e).is_some()
                    {
                        return Err(e.into());
                    }
                    tracing::warn!(site = %self.site, backend = %backend.authority, error = %e, "upstream exchange failed");
                    return Err(GatewayError::BadGateway {
                        site: self.site.to_string(),
                    }
                    .into());
                }
                Err(_) if !sent.load(Ordering::Acquire) => {
                    return Err(GatewayError::ClientTimeout {
                        timeout: self.request_timeout,
                    }
                    .into())
                }
                Err(_) => {
                    return Err(GatewayError::UpstreamTimeout {
                        site: self.site.to_string(),
                        timeout: self.request_timeout,
                    }
                    .into())
                }
            }
        }
        Err(GatewayError::UpstreamUnreachable {
            site: self.site.to_string(),
        }
        .into())
    }
}

/// Marks a request whose body the gateway already holds whole (spooled by the buffer layer): how
/// fast it goes out is up to the site, not the client.
#[derive(Debug, Clone, Copy)]
pub struct HeldBody;

/// A request body that says when it has been sent whole.
struct Sent {
    inner: Body,
    sent: Arc<std::sync::atomic::AtomicBool>,
}

impl http_body::Body for Sent {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) {
            self.sent.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.sent.store(true, Ordering::Release);
        }
        end
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// System roots plus the PEM certificates in `ca_file`.
/// An HTTP/1.1 connector for `http://` and `https://` (rustls with the system's roots, plus
/// `ca_file`), connecting within `connect_timeout`.
pub fn https_connector(
    connect_timeout: Duration,
    ca_file: Option<&Path>,
) -> Result<HttpsConnector<HttpConnector>, UpstreamBuildError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(root_store(ca_file)?)
    .with_no_client_auth();
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}

pub(crate) fn root_store(
    ca_file: Option<&Path>,
) -> Result<rustls::RootCertStore, UpstreamBuildError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let name = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| UpstreamBuildError::CaFile {
            path: name.clone(),
            source,
        })?;
        let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
            .filter_map(Result::ok)
            .collect();
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(UpstreamBuildError::NoCertificates(name));
        }
    }
    Ok(roots)
}
