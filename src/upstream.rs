//! The connections to one site's backends, and round-robin over them.
//!
//! Each serving worker keeps its own connections to each backend, built on
//! `hyper::client::conn`, so a request and its connection never wake another thread: each
//! connection is driven by its own task on the worker that opened it, and the per-worker state
//! sits behind locks no other thread takes. A site speaks one of two protocols to its backends
//! (`upstream_protocol`):
//!
//! - HTTP/1.1 (the default): a request takes a ready idle connection from its worker's list,
//!   and its response body gives the connection back once read to the end. No pool task, no
//!   per-request spawn, no key hashing: what hyper-util's pooled client did per request (a
//!   checkout future, a spawned task waiting for the connection to be idle again, a oneshot to
//!   delay the body's end) is gone. An idle connection that turns out closed when a request is
//!   handed to it gives the request back unsent (hyper's `try_send_request`), which then goes
//!   out on a fresh connection.
//! - HTTP/2: each worker keeps one connection per backend and multiplexes all its requests on
//!   it (up to the backend's concurrent-stream limit; more wait for a stream). hyper drives each
//!   stream in a task of its own, spawned on the same worker. Requests that find no open
//!   connection wait for one connect, started in a task of its own, rather than each opening
//!   their own. Keep-alive pings, idle too, notice a backend gone silent; a connection that
//!   closed (or said GOAWAY) is replaced by the next request, and one that closed as a request
//!   was handed to it gives the request back unsent, as above. For `https://` backends ALPN
//!   must pick `h2`, else the connect fails. The response body needs no give-back.
//!
//! A backend that refuses a connection is skipped for a short cool-down, and a request whose
//! body can be sent again (empty, or already buffered for inspection) moves on to the next
//! backend at once: a refused connection proves the request never reached Frappe. Once bytes
//! may have reached a backend, the request is never sent again from here.

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{FutureExt as _, Shared};
use http::header;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::Histogram;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::config::UpstreamProtocol;
use crate::error::{find_cause, GatewayError};
use crate::frappe::headers::remove_hop_by_hop;
use crate::{full_body, Body, BoxError};

/// How long a backend that refused a connection is skipped.
const BACKEND_COOL_DOWN: Duration = Duration::from_secs(2);

/// An idle connection unused this long is closed (nginx's upstream `keepalive_timeout` is 60s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Idle connections kept per worker and backend; past this the oldest is closed. Enough for
/// every gunicorn worker of a large site, small enough that a burst does not pin sockets.
const MAX_IDLE_PER_BACKEND: usize = 256;

/// HTTP/2 ping interval on upstream connections, idle ones too: a backend gone silent (a
/// half-open connection after a crash or a network change) is noticed within this plus hyper's
/// 20 s ping timeout, and the next request connects anew instead of waiting on a dead one.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// The HTTP/2 connection-level receive window: 16 streams' default windows.
const HTTP2_CONNECTION_WINDOW: u32 = 32 << 20;

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
    #[error("backend {0}: its host is not a name a TLS certificate can carry")]
    TlsName(String),
}

/// How a site's backends are reached.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamOptions<'a> {
    /// HTTP/1.1, or HTTP/2 (h2 by ALPN for `https://`, h2c with prior knowledge for `http://`).
    pub protocol: UpstreamProtocol,
    /// TCP (and TLS) connect.
    pub connect_timeout: Duration,
    /// One attempt, from sending the request to the response head.
    pub request_timeout: Duration,
    /// PEM file of extra CA certificates trusted for `https://` backends.
    pub ca_file: Option<&'a Path>,
}

#[derive(Debug)]
struct Backend {
    scheme: Scheme,
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

/// One serving worker's share: its round-robin turn and its connections per backend.
/// Aligned so that two workers' counters never share a cache line.
#[derive(Debug)]
#[repr(align(128))]
struct WorkerConnections {
    next: AtomicUsize,
    connections: Connections,
}

/// One worker's connections to each backend, in `Upstream::backends` order.
#[derive(Debug)]
enum Connections {
    Http1(Vec<Arc<IdleConnections>>),
    Http2(Vec<SharedConnection>),
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

/// One worker's HTTP/2 connection to one backend, which all its requests share.
#[derive(Debug, Default)]
struct SharedConnection {
    state: Mutex<SharedState>,
}

/// A connect under way, which every request needing the connection meanwhile waits for.
type Connecting = Shared<
    Pin<Box<dyn Future<Output = Result<http2::SendRequest<Body>, Arc<str>>> + Send + 'static>>,
>;

#[derive(Default)]
struct SharedState {
    /// Counts connects, so that a request that found its connection closed forgets that one,
    /// not a newer one another request already put in its place.
    generation: u64,
    current: Current,
}

#[derive(Default)]
enum Current {
    #[default]
    None,
    Connecting(Connecting),
    Open(http2::SendRequest<Body>),
}

impl fmt::Debug for SharedState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = match self.current {
            Current::None => "none",
            Current::Connecting(_) => "connecting",
            Current::Open(_) => "open",
        };
        f.debug_struct("SharedState")
            .field("generation", &self.generation)
            .field("current", &current)
            .finish()
    }
}

/// A request's handle on a worker's HTTP/2 connection.
struct Http2Sender {
    sender: http2::SendRequest<Body>,
    generation: u64,
    /// Whether this request started the connect: nobody can have found the connection closed
    /// before it, so a request it gives back unsent is not tried on another one.
    opened_here: bool,
}

impl SharedConnection {
    fn lock(&self) -> MutexGuard<'_, SharedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open connection; else the connect under way; else a connect begun with `connect`.
    async fn sender(&self, connect: impl FnOnce() -> Connecting) -> Result<Http2Sender, BoxError> {
        let (connecting, generation, opened_here) = {
            let mut state = self.lock();
            match &state.current {
                // hyper's HTTP/2 sender is ready exactly when its connection is not closed;
                // streams beyond the backend's limit wait inside the connection.
                Current::Open(sender) if !sender.is_closed() => {
                    return Ok(Http2Sender {
                        sender: sender.clone(),
                        generation: state.generation,
                        opened_here: false,
                    });
                }
                Current::Connecting(connecting) => (connecting.clone(), state.generation, false),
                Current::Open(_) | Current::None => {
                    let connecting = connect();
                    state.generation += 1;
                    state.current = Current::Connecting(connecting.clone());
                    (connecting, state.generation, true)
                }
            }
        };
        let result = connecting.await;
        let mut state = self.lock();
        let ours =
            state.generation == generation && matches!(state.current, Current::Connecting(_));
        match result {
            Ok(sender) => {
                if ours {
                    state.current = Current::Open(sender.clone());
                }
                Ok(Http2Sender {
                    sender,
                    generation,
                    opened_here,
                })
            }
            Err(e) => {
                if ours {
                    state.current = Current::None;
                }
                Err(e.to_string().into())
            }
        }
    }

    /// Forgets connection `generation` if it is still the current one: it closed under a
    /// request.
    fn discard(&self, generation: u64) {
        let mut state = self.lock();
        if state.generation == generation {
            state.current = Current::None;
        }
    }
}

/// Why one attempt failed.
enum AttemptError {
    /// No connection could be made: the request never left.
    Connect(BoxError),
    /// The exchange on a connection failed.
    Exchange(BoxError),
}

/// One site's backends and the workers' connections to them.
#[derive(Debug)]
pub struct Upstream {
    site: Arc<str>,
    backends: Vec<Arc<Backend>>,
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
        options: &UpstreamOptions<'_>,
        duration: Histogram,
    ) -> Result<Self, UpstreamBuildError> {
        let mut tls = tls_config(options.ca_file)?;
        // Only the protocol the site speaks is offered: an HTTP/2 site's backend that does not
        // pick h2 fails the connect, clearly, rather than getting a preface it cannot read.
        tls.alpn_protocols = vec![match options.protocol {
            UpstreamProtocol::Http1 => b"http/1.1".to_vec(),
            UpstreamProtocol::Http2 => b"h2".to_vec(),
        }];
        // Every configured backend is kept or the site fails to build: one silently skipped
        // would shift round-robin, and with none left there would be nothing to pick.
        let backends = backends
            .iter()
            .map(|uri| {
                let unusable = || UpstreamBuildError::TlsName(uri.to_string());
                let authority = uri.authority().ok_or_else(unusable)?.clone();
                let https = uri.scheme() == Some(&Scheme::HTTPS);
                let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
                let host = authority.host();
                Ok(Arc::new(Backend {
                    scheme: if https { Scheme::HTTPS } else { Scheme::HTTP },
                    address: format!("{host}:{port}"),
                    tls_name: if https {
                        let bare = host.trim_start_matches('[').trim_end_matches(']');
                        Some(ServerName::try_from(bare.to_owned()).map_err(|_| unusable())?)
                    } else {
                        None
                    },
                    host: HeaderValue::from_str(authority.as_str()).map_err(|_| unusable())?,
                    authority,
                    down_until_ms: AtomicU64::new(0),
                }))
            })
            .collect::<Result<Vec<_>, UpstreamBuildError>>()?;
        let workers = (0..workers.max(1))
            .map(|_| WorkerConnections {
                next: AtomicUsize::new(0),
                connections: match options.protocol {
                    UpstreamProtocol::Http1 => {
                        Connections::Http1(backends.iter().map(|_| Arc::default()).collect())
                    }
                    UpstreamProtocol::Http2 => {
                        Connections::Http2(backends.iter().map(|_| Default::default()).collect())
                    }
                },
            })
            .collect();
        Ok(Self {
            site,
            backends,
            workers,
            tls: Arc::new(tls),
            connect_timeout: options.connect_timeout,
            request_timeout: options.request_timeout,
            epoch: Instant::now(),
            duration,
        })
    }

    /// How long one attempt may wait on the site (`timeouts.request`).
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// This worker's connections.
    fn worker(&self) -> &WorkerConnections {
        let index = crate::worker::index();
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

    /// Sends a request (its URI holding only path and query) to a backend, each attempt
    /// bounded by `request_timeout` (the route's `timeouts.request`, else the site's).
    pub async fn send(
        &self,
        request: Request<Body>,
        request_timeout: Duration,
    ) -> Result<Response<Body>, BoxError> {
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
        // gateway holds (in memory or spooled to a file) is never the client's doing, and
        // needs no flag (nor its allocation).
        let held = replay.is_some() || parts.extensions.get::<HeldBody>().is_some();
        let sent = (!held).then(|| Arc::new(AtomicBool::new(false)));
        let mut body = Some(match &sent {
            None => body,
            Some(sent) => Body::new(Sent {
                inner: body,
                sent: sent.clone(),
            }),
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
            let mut body_error = None;
            let mut request = Request::new(match (&replay, body.take()) {
                (Some(bytes), _) => full_body(bytes.clone()),
                // HTTP/2 sends a body from a task of hyper's, which reports a failing body
                // only as the stream reset that follows: the body keeps its own error.
                (None, Some(body)) if matches!(worker.connections, Connections::Http2(_)) => {
                    let error = BodyError::default();
                    body_error = Some(error.clone());
                    Body::new(KeepError { inner: body, error })
                }
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
            let started = Instant::now();
            let result = tokio::time::timeout(
                request_timeout,
                self.exchange(worker, index, request, sent.as_ref()),
            )
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
                    let e = body_error.and_then(|error| error.take()).unwrap_or(e);
                    // The client's body failed (over a limit, refused mid-stream by the
                    // access rules, malformed): the client's doing, not the site's.
                    if find_cause::<http_body_util::LengthLimitError>(e.as_ref()).is_some()
                        || find_cause::<GatewayError>(e.as_ref()).is_some()
                    {
                        return Err(e);
                    }
                    tracing::warn!(site = %self.site, backend = %backend.authority, error = %e, "upstream exchange failed");
                    return Err(GatewayError::BadGateway {
                        site: self.site.to_string(),
                    }
                    .into());
                }
                Err(_) if sent.as_ref().is_some_and(|s| !s.load(Ordering::Acquire)) => {
                    return Err(GatewayError::ClientTimeout {
                        timeout: request_timeout,
                    }
                    .into())
                }
                Err(_) => {
                    return Err(GatewayError::UpstreamTimeout {
                        site: self.site.to_string(),
                        timeout: request_timeout,
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

    /// One attempt on backend `index` in the site's protocol.
    async fn exchange(
        &self,
        worker: &WorkerConnections,
        index: usize,
        mut request: Request<Body>,
        sent: Option<&Arc<AtomicBool>>,
    ) -> Result<Response<Body>, AttemptError> {
        let backend = &self.backends[index];
        match &worker.connections {
            Connections::Http1(idle) => {
                if !request.headers().contains_key(header::HOST) {
                    request
                        .headers_mut()
                        .insert(header::HOST, backend.host.clone());
                }
                self.exchange_http1(backend, &idle[index], request, sent)
                    .await
            }
            Connections::Http2(shared) => {
                address_http2(&mut request, backend)
                    .map_err(|e| AttemptError::Exchange(e.into()))?;
                // Boxed: its state (a shared connect, HTTP/2 handshakes) would otherwise
                // size every HTTP/1.1 attempt's future too, and be copied with it.
                Box::pin(self.exchange_http2(backend, &shared[index], request)).await
            }
        }
    }

    /// One HTTP/1.1 attempt on `backend`: on an idle connection of this worker if one is
    /// ready, else on a new one. A request an idle connection gave back unsent (it had just
    /// closed) goes out on the next idle one or a new one.
    async fn exchange_http1(
        &self,
        backend: &Backend,
        idle: &Arc<IdleConnections>,
        mut request: Request<Body>,
        sent: Option<&Arc<AtomicBool>>,
    ) -> Result<Response<Body>, AttemptError> {
        loop {
            let (mut sender, reused) = match idle.take() {
                Some(mut sender) => match sender.ready().await {
                    Ok(()) => (sender, true),
                    Err(_) => continue,
                },
                None => {
                    // Boxed: a connect (TCP, TLS handshake state) is rare, and inline its
                    // state would triple the size of every attempt's future.
                    let sender = Box::pin(self.connect_http1(backend))
                        .await
                        .map_err(AttemptError::Connect)?;
                    idle.start_reaper();
                    (sender, false)
                }
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let (head, incoming) = response.into_parts();
                    let mut body = GiveBackOnEnd {
                        inner: incoming,
                        connection: Some((sender, idle.clone())),
                        request_sent: sent.cloned(),
                    };
                    if body.inner.is_end_stream() {
                        body.give_back();
                    }
                    let body = Body::new(body);
                    return Ok(Response::from_parts(head, body));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => request = unsent,
                    // A new connection that closed before taking the request: the backend
                    // accepted and hung up, and the request provably never left, so it counts
                    // as a refused connection (cool-down, the next backend if replayable).
                    Some(_) => return Err(AttemptError::Connect(e.into_error().into())),
                    None => return Err(AttemptError::Exchange(e.into_error().into())),
                },
            }
        }
    }

    /// One HTTP/2 attempt on `backend`, over this worker's connection to it (opened first if
    /// there is none). A request the connection gave back unsent (it had just closed) goes out
    /// on a new one.
    async fn exchange_http2(
        &self,
        backend: &Arc<Backend>,
        shared: &SharedConnection,
        mut request: Request<Body>,
    ) -> Result<Response<Body>, AttemptError> {
        loop {
            let Http2Sender {
                mut sender,
                generation,
                opened_here,
            } = shared
                .sender(|| self.start_http2_connect(backend))
                .await
                .map_err(AttemptError::Connect)?;
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let (mut head, incoming) = response.into_parts();
                    // The version is the client connection's business, as it is for an
                    // HTTP/1.1 backend's answer (hyper's HTTP/1.1 server would rewrite an
                    // HTTP/2 one, off its fast path).
                    head.version = Version::HTTP_11;
                    return Ok(Response::from_parts(head, Body::new(incoming)));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !opened_here => {
                        shared.discard(generation);
                        request = unsent;
                    }
                    // The connection this request opened closed before taking it: as for
                    // HTTP/1.1, a refused connection.
                    Some(_) => {
                        shared.discard(generation);
                        return Err(AttemptError::Connect(e.into_error().into()));
                    }
                    None => return Err(AttemptError::Exchange(e.into_error().into())),
                },
            }
        }
    }

    /// A new HTTP/1.1 connection to `backend` (TCP, then TLS for `https://`), within the
    /// connect timeout, driven by a task on this worker.
    async fn connect_http1(&self, backend: &Backend) -> Result<http1::SendRequest<Body>, BoxError> {
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let tcp = dial_tcp(backend, deadline, self.connect_timeout).await?;
        let Some(name) = &backend.tls_name else {
            return handshake_http1(TokioIo::new(tcp)).await;
        };
        let tls = dial_tls(&self.tls, name, tcp, deadline, self.connect_timeout).await?;
        handshake_http1(TokioIo::new(tls)).await
    }

    /// Begins a new HTTP/2 connection to `backend` in a task of its own on this worker, so it
    /// completes, and serves the next requests, even if every request waiting for it gives up.
    fn start_http2_connect(&self, backend: &Arc<Backend>) -> Connecting {
        let backend = backend.clone();
        let tls = self.tls.clone();
        let timeout = self.connect_timeout;
        let task = tokio::spawn(async move {
            connect_http2(&backend, &tls, timeout)
                .await
                .map_err(|e| Arc::<str>::from(e.to_string()))
        });
        async move {
            match task.await {
                Ok(result) => result,
                Err(e) => Err(Arc::from(format!("connect task failed: {e}"))),
            }
        }
        .boxed()
        .shared()
    }
}

/// A new HTTP/2 connection to `backend` (TCP, then TLS for `https://` where ALPN must pick
/// h2), within `timeout`, driven by a task on this worker.
async fn connect_http2(
    backend: &Backend,
    tls: &Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<http2::SendRequest<Body>, BoxError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let tcp = dial_tcp(backend, deadline, timeout).await?;
    let Some(name) = &backend.tls_name else {
        return handshake_http2(TokioIo::new(tcp), deadline, timeout).await;
    };
    let tls = dial_tls(tls, name, tcp, deadline, timeout).await?;
    let alpn = tls.get_ref().1.alpn_protocol();
    if alpn != Some(b"h2".as_slice()) {
        let picked = alpn.map_or_else(
            || "none".to_owned(),
            |p| format!("'{}'", String::from_utf8_lossy(p)),
        );
        return Err(format!(
            "{} does not speak HTTP/2 over TLS: ALPN offered h2, the server picked {picked}",
            backend.authority
        )
        .into());
    }
    handshake_http2(TokioIo::new(tls), deadline, timeout).await
}

/// A TCP connection to `backend` by `deadline`.
async fn dial_tcp(
    backend: &Backend,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<TcpStream, BoxError> {
    let tcp = tokio::time::timeout_at(deadline, connect_tcp(&backend.address))
        .await
        .map_err(|_| format!("connect timed out after {timeout:?}"))??;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// TLS over `tcp`, the certificate checked for `name`, by `deadline`.
async fn dial_tls(
    tls: &Arc<rustls::ClientConfig>,
    name: &ServerName<'static>,
    tcp: TcpStream,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, BoxError> {
    let connector = tokio_rustls::TlsConnector::from(tls.clone());
    Ok(
        tokio::time::timeout_at(deadline, connector.connect(name.clone(), tcp))
            .await
            .map_err(|_| format!("TLS handshake timed out after {timeout:?}"))??,
    )
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
async fn handshake_http1<T>(io: T) -> Result<http1::SendRequest<Body>, BoxError>
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

/// Starts HTTP/2 (with prior knowledge, or as agreed by ALPN) on `io` by `deadline`; its
/// connection task runs on this worker until the connection closes, or its senders (the
/// worker's and running requests') are dropped and its last stream ends.
async fn handshake_http2<T>(
    io: T,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<http2::SendRequest<Body>, BoxError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let handshake = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
        // Every request of the worker shares this connection, and window is given back only
        // as each client reads its answer: with hyper's 5 MB connection window, three slow
        // clients with large answers would stall everyone's. Streams keep the 2 MB default.
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .keep_alive_while_idle(true)
        .handshake(io);
    let (sender, connection) = tokio::time::timeout_at(deadline, handshake)
        .await
        .map_err(|_| format!("HTTP/2 handshake timed out after {timeout:?}"))??;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}

/// Makes `request` an HTTP/2 request to `backend`. hyper's HTTP/2 client takes `:scheme` and
/// `:authority` from an absolute URI, so the `Host` the stack set (Frappe picks the site by
/// it) becomes `:authority`, which werkzeug reads as the host. Connection-specific headers are
/// dropped: HTTP/2 forbids them, hyper would strip them with a warning.
fn address_http2(request: &mut Request<Body>, backend: &Backend) -> Result<(), http::Error> {
    let headers = request.headers_mut();
    // Taken first: a `Connection` header naming `Host` must not cost the site its address.
    let authority = headers
        .remove(header::HOST)
        .and_then(|host| Authority::try_from(host.as_bytes()).ok())
        .unwrap_or_else(|| backend.authority.clone());
    // The hop-by-hop set the credential swap already removed, again here because HTTP/2
    // forbids them outright; and `Transfer-Encoding`, which HTTP/1.1 framing kept till now.
    remove_hop_by_hop(headers);
    headers.remove(header::TRANSFER_ENCODING);
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::builder()
        .scheme(backend.scheme.clone())
        .authority(authority)
        .path_and_query(path)
        .build()?;
    *request.version_mut() = Version::HTTP_2;
    Ok(())
}

/// A response body that gives its connection back to the worker's idle list once read to the
/// end. Dropped before then, the connection is dropped too: hyper closes it, as the rest of
/// the response would otherwise be read as the next one.
struct GiveBackOnEnd {
    inner: Incoming,
    connection: Option<(http1::SendRequest<Body>, Arc<IdleConnections>)>,
    /// Whether a streamed request body has been sent whole (`None`: the body was held whole).
    request_sent: Option<Arc<AtomicBool>>,
}

impl GiveBackOnEnd {
    fn give_back(&mut self) {
        if let Some((sender, idle)) = self.connection.take() {
            // An answer that came before the upload ended (a refusal, say) leaves the
            // connection busy sending the rest for as long as the client takes: the next
            // request must not wait on it. Dropped, it closes once the upload is done.
            if self
                .request_sent
                .as_ref()
                .is_none_or(|sent| sent.load(Ordering::Acquire))
            {
                idle.give_back(sender);
            }
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

/// Where a request body sent over HTTP/2 leaves its error.
#[derive(Debug, Clone, Default)]
struct BodyError(Arc<Mutex<Option<BoxError>>>);

impl BodyError {
    fn take(&self) -> Option<BoxError> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// A request body that keeps its error for the attempt sending it: hyper's HTTP/2 client sends
/// a body from a task of its own and, when the body fails, reports only the stream reset that
/// follows, while whose doing the failure was (over the size limit, refused mid-stream by the
/// access rules) decides the answer.
struct KeepError {
    inner: Body,
    error: BodyError,
}

impl http_body::Body for KeepError {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                let reported = format!("request body failed: {e}").into();
                *self.error.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                Poll::Ready(Some(Err(reported)))
            }
            polled => polled,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> UpstreamOptions<'static> {
        UpstreamOptions {
            protocol: UpstreamProtocol::Http1,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            ca_file: None,
        }
    }

    #[test]
    fn a_backend_whose_host_no_certificate_can_name_fails_the_site_instead_of_vanishing() {
        let histogram = Histogram::with_opts(prometheus::HistogramOpts::new("h", "h"))
            .expect("valid histogram");
        let backends: Vec<Uri> = vec![
            "https://erp.example.com".parse().expect("valid uri"),
            "https://bad-.example.com".parse().expect("valid uri"),
        ];
        let built = Upstream::new(2, "erp".into(), &backends, &options(), histogram.clone());
        assert!(
            matches!(built, Err(UpstreamBuildError::TlsName(ref b)) if b.contains("bad-")),
            "{built:?}"
        );
        let fine = Upstream::new(2, "erp".into(), &backends[..1], &options(), histogram);
        assert_eq!(fine.expect("a good backend builds").backends.len(), 1);
    }

    fn backend(url: &str) -> Backend {
        let uri: Uri = url.parse().expect("valid uri");
        let authority = uri.authority().expect("an authority").clone();
        Backend {
            scheme: uri.scheme().expect("a scheme").clone(),
            address: authority.to_string(),
            tls_name: None,
            host: HeaderValue::from_str(authority.as_str()).expect("a valid host"),
            authority,
            down_until_ms: AtomicU64::new(0),
        }
    }

    #[test]
    fn an_http2_request_carries_the_host_as_its_authority_and_no_connection_headers() {
        let mut request = Request::builder()
            .method("POST")
            .uri("/api/method/upload_file?x=1")
            .header("host", "erp.example.com")
            .header("connection", "keep-alive, x-hop, host")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("transfer-encoding", "chunked")
            .header("upgrade", "h2c")
            .header("te", "gzip")
            .header("authorization", "token k:s")
            .body(crate::empty_body())
            .expect("a valid request");
        address_http2(&mut request, &backend("https://10.0.0.5:8443")).expect("addressed");
        assert_eq!(
            request.uri().to_string(),
            "https://erp.example.com/api/method/upload_file?x=1"
        );
        assert_eq!(request.version(), Version::HTTP_2);
        let names: Vec<&str> = request.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["authorization"]);

        // Even `TE: trailers`, which HTTP/2 allows, is hop-by-hop to the gateway (the credential
        // swap drops every TE before this); without a Host, the backend's authority.
        let mut request = Request::builder()
            .uri("/")
            .header("te", "trailers")
            .body(crate::empty_body())
            .expect("a valid request");
        address_http2(&mut request, &backend("http://127.0.0.1:8000")).expect("addressed");
        assert_eq!(request.uri().to_string(), "http://127.0.0.1:8000/");
        assert!(request.headers().is_empty(), "{:?}", request.headers());
    }
}
