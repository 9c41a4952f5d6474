//! The connections to one site's backends, and round-robin over them.
//!
//! Each serving worker keeps its own idle HTTP/1.1 connections to each backend, built on
//! `hyper::client::conn`: a request takes a ready connection from its worker's list (a lock no
//! other thread takes), and its response body gives the connection back once read to the end.
//! No pool task, no per-request spawn, no key hashing: what hyper-util's pooled client did per
//! request (a checkout future, a spawned task waiting for the connection to be idle again, a
//! oneshot to delay the body's end) is gone. Each connection is driven by its own task on the
//! worker that opened it, so a request and its connection never wake another thread.
//!
//! A backend that refuses a connection is skipped for a short cool-down, and a request whose
//! body can be sent again (empty, or already buffered for inspection) moves on to the next
//! backend at once: a refused connection proves the request never reached Frappe. An idle
//! connection that turns out closed when a request is handed to it gives the request back
//! unsent (hyper's `try_send_request`), which then goes out on a fresh connection. Once bytes
//! may have reached a backend, the request is never sent again from here.

use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Response, Uri};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use prometheus::Histogram;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::error::{find_cause, GatewayError};
use crate::{full_body, Body, BoxError};

thread_local! {
    /// Which serving worker this thread is (see `server`): it picks that worker's connections.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks this thread as serving worker `index`: its requests use that worker's connections,
/// so a request and its upstream connection never wake another thread.
pub fn set_worker_index(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// How long a backend that refused a connection is skipped.
const BACKEND_COOL_DOWN: Duration = Duration::from_secs(2);

/// An idle connection unused this long is closed (nginx's upstream `keepalive_timeout` is 60s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Idle connections kept per worker and backend; past this the oldest is closed. Enough for
/// every gunicorn worker of a large site, small enough that a burst does not pin sockets.
const MAX_IDLE_PER_BACKEND: usize = 256;

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
    authority: Authority,
    /// `host:port` as the resolver takes it (the scheme's port when the URL has none).
    address: String,
    /// The name its certificate must carry, for `https://` backends.
    tls_name: Option<ServerName<'static>>,
    /// `Host` for a request that has none (the stack always sets the site's).
    host: HeaderValue,
    /// Milliseconds since `Upstream::epoch` before which the backend is skipped.
    down_until_ms: AtomicU64,
}

/// One serving worker's share: its round-robin turn and its idle connections per backend.
/// Aligned so that two workers' counters never share a cache line.
#[derive(Debug)]
#[repr(align(128))]
struct WorkerConnections {
    next: AtomicUsize,
    idle: Vec<Arc<IdleConnections>>,
}

/// One worker's idle connections to one backend, freshest last.
#[derive(Debug, Default)]
struct IdleConnections {
    list: Mutex<Vec<IdleConnection>>,
    /// Whether the task closing connections idle too long runs.
    reaper: AtomicBool,
}

#[derive(Debug)]
struct IdleConnection {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

impl IdleConnections {
    /// The freshest idle connection, if any (closed or expired ones are dropped on the way).
    fn take(&self) -> Option<http1::SendRequest<Body>> {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(idle) = list.pop() {
            if !idle.sender.is_closed() && idle.since.elapsed() < IDLE_TIMEOUT {
                return Some(idle.sender);
            }
        }
        None
    }

    /// Keeps a connection whose last response was read whole.
    fn give_back(&self, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if list.len() >= MAX_IDLE_PER_BACKEND {
            list.remove(0);
        }
        list.push(IdleConnection {
            sender,
            since: Instant::now(),
        });
    }

    /// Closes, on this worker, connections idle longer than [`IDLE_TIMEOUT`], until the site's
    /// connections are dropped (a reload that rebuilt them, or shutdown).
    fn start_reaper(self: &Arc<Self>) {
        if self.reaper.swap(true, Ordering::Relaxed) {
            return;
        }
        let idle: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_TIMEOUT / 4);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(idle) = idle.upgrade() else { return };
                let mut list = idle.list.lock().unwrap_or_else(|e| e.into_inner());
                list.retain(|c| !c.sender.is_closed() && c.since.elapsed() < IDLE_TIMEOUT);
            }
        });
    }
}

/// Why one attempt failed.
enum AttemptError {
    /// No connection could be made: the request never left.
    Connect(BoxError),
    /// The exchange on a connection failed.
    Exchange(hyper::Error),
}

/// One site's backends and the workers' connections to them.
#[derive(Debug)]
pub struct Upstream {
    site: Arc<str>,
    backends: Vec<Backend>,
    workers: Vec<WorkerConnections>,
    tls: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
    request_timeout: Duration,
    epoch: Instant,
    duration: Histogram,
}

impl Upstream {
    /// Sets up `backends` (base URLs already validated by the config) for `workers` serving
    /// workers; no connection is made until a request needs one.
    pub fn new(
        workers: usize,
        site: Arc<str>,
        backends: &[Uri],
        connect_timeout: Duration,
        request_timeout: Duration,
        ca_file: Option<&Path>,
        duration: Histogram,
    ) -> Result<Self, UpstreamBuildError> {
        let mut tls = tls_config(ca_file)?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let backends: Vec<Backend> = backends
            .iter()
            .filter_map(|uri| {
                let authority = uri.authority()?.clone();
                let https = uri.scheme() == Some(&Scheme::HTTPS);
                let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
                let host = authority.host();
                Some(Backend {
                    address: format!("{host}:{port}"),
                    tls_name: if https {
                        let bare = host.trim_start_matches('[').trim_end_matches(']');
                        Some(ServerName::try_from(bare.to_owned()).ok()?)
                    } else {
                        None
                    },
                    host: HeaderValue::from_str(authority.as_str()).ok()?,
                    authority,
                    down_until_ms: AtomicU64::new(0),
                })
            })
            .collect();
        let workers = (0..workers.max(1))
            .map(|_| WorkerConnections {
                next: AtomicUsize::new(0),
                idle: backends.iter().map(|_| Arc::default()).collect(),
            })
            .collect();
        Ok(Self {
            site,
            backends,
            workers,
            tls: Arc::new(tls),
            connect_timeout,
            request_timeout,
            epoch: Instant::now(),
            duration,
        })
    }

    /// This worker's connections.
    fn worker(&self) -> &WorkerConnections {
        let index = WORKER.with(std::cell::Cell::get);
        &self.workers[index % self.workers.len()]
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The next backend in this worker's turn that is not cooling down (or the next in turn if
    /// all are).
    fn pick(&self, worker: &WorkerConnections) -> usize {
        let n = self.backends.len();
        let start = worker.next.fetch_add(1, Ordering::Relaxed);
        if n == 1 {
            return 0;
        }
        let now = self.now_ms();
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| self.backends[i].down_until_ms.load(Ordering::Relaxed) <= now)
            .unwrap_or(start % n)
    }

    /// Sends a request (its URI holding only path and query) to a backend.
    pub async fn send(&self, request: Request<Body>) -> Result<Response<Body>, BoxError> {
        let (mut parts, body) = request.into_parts();
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
        let sent = Arc::new(AtomicBool::new(held));
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
        let worker = self.worker();
        for attempt in 1..=attempts {
            let index = self.pick(worker);
            let backend = &self.backends[index];
            let mut request = Request::new(match (&replay, body.take()) {
                (Some(bytes), _) => full_body(bytes.clone()),
                (None, Some(body)) => body,
                (None, None) => break,
            });
            *request.method_mut() = parts.method.clone();
            *request.uri_mut() = Uri::from(path.clone());
            // The last attempt takes the headers; an earlier one, which may be followed by
            // another, copies them.
            *request.headers_mut() = if attempt == attempts {
                std::mem::take(&mut parts.headers)
            } else {
                parts.headers.clone()
            };
            if !request.headers().contains_key(header::HOST) {
                request
                    .headers_mut()
                    .insert(header::HOST, backend.host.clone());
            }
            let idle = &worker.idle[index];
            let started = Instant::now();
            let result =
                tokio::time::timeout(self.request_timeout, self.exchange(backend, idle, request))
                    .await;
            self.duration.observe(started.elapsed().as_secs_f64());
            match result {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(AttemptError::Connect(e))) => {
                    backend.down_until_ms.store(
                        self.now_ms() + BACKEND_COOL_DOWN.as_millis() as u64,
                        Ordering::Relaxed,
                    );
                    tracing::warn!(site = %self.site, backend = %backend.authority, attempt, error = %e, "backend refused connection");
                }
                Ok(Err(AttemptError::Exchange(e))) => {
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

    /// One attempt on `backend`: on an idle connection of this worker if one is ready, else on
    /// a new one. A request an idle connection gave back unsent (it had just closed) goes out
    /// on the next idle one or a new one.
    async fn exchange(
        &self,
        backend: &Backend,
        idle: &Arc<IdleConnections>,
        mut request: Request<Body>,
    ) -> Result<Response<Body>, AttemptError> {
        loop {
            let (mut sender, reused) = match idle.take() {
                Some(mut sender) => match sender.ready().await {
                    Ok(()) => (sender, true),
                    Err(_) => continue,
                },
                None => {
                    let sender = self.connect(backend).await.map_err(AttemptError::Connect)?;
                    idle.start_reaper();
                    (sender, false)
                }
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let (head, incoming) = response.into_parts();
                    let body = if incoming.is_end_stream() {
                        idle.give_back(sender);
                        Body::new(incoming)
                    } else {
                        Body::new(GiveBackOnEnd {
                            inner: incoming,
                            connection: Some((sender, idle.clone())),
                        })
                    };
                    return Ok(Response::from_parts(head, body));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(AttemptError::Exchange(e.into_error())),
                },
            }
        }
    }

    /// A new HTTP/1.1 connection to `backend` (TCP, then TLS for `https://`), within the
    /// connect timeout, driven by a task on this worker.
    async fn connect(&self, backend: &Backend) -> Result<http1::SendRequest<Body>, BoxError> {
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let tcp = tokio::time::timeout_at(deadline, connect_tcp(&backend.address))
            .await
            .map_err(|_| format!("connect timed out after {:?}", self.connect_timeout))??;
        tcp.set_nodelay(true)?;
        let Some(name) = &backend.tls_name else {
            return handshake(TokioIo::new(tcp)).await;
        };
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let tls = tokio::time::timeout_at(deadline, connector.connect(name.clone(), tcp))
            .await
            .map_err(|_| format!("TLS handshake timed out after {:?}", self.connect_timeout))??;
        handshake(TokioIo::new(tls)).await
    }
}

/// The first address of `address` that accepts a TCP connection.
async fn connect_tcp(address: &str) -> Result<TcpStream, BoxError> {
    let mut last: Option<std::io::Error> = None;
    for addr in tokio::net::lookup_host(address).await? {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => e.into(),
        None => format!("{address} resolves to no address").into(),
    })
}

/// Starts HTTP/1.1 on `io`; its connection task runs on this worker until the connection
/// closes or its sender (held by a request or the idle list) is dropped.
async fn handshake<T>(io: T) -> Result<http1::SendRequest<Body>, BoxError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new().handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}

/// A response body that gives its connection back to the worker's idle list once read to the
/// end. Dropped before then, the connection is dropped too: hyper closes it, as the rest of
/// the response would otherwise be read as the next one.
struct GiveBackOnEnd {
    inner: Incoming,
    connection: Option<(http1::SendRequest<Body>, Arc<IdleConnections>)>,
}

impl GiveBackOnEnd {
    fn give_back(&mut self) {
        if let Some((sender, idle)) = self.connection.take() {
            idle.give_back(sender);
        }
    }
}

impl http_body::Body for GiveBackOnEnd {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
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
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(ca_file)?)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}

/// TLS to upstreams: the system's roots plus `ca_file`.
fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, UpstreamBuildError> {
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(root_store(ca_file)?)
    .with_no_client_auth())
}

/// System roots plus the PEM certificates in `ca_file`.
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
