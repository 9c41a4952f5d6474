//! Listeners: the public one (HTTP/1.1 with keep-alive, and HTTP/2 by prior knowledge, both
//! through hyper-util's auto builder) and the admin one (`/metrics`, `/healthz`, `/readyz`), and
//! graceful shutdown: on request, `/readyz` turns 503, the public listener stops accepting, idle
//! connections close, and in-flight requests get up to `limits.shutdown_grace` to finish.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::ServiceExt;

use arc_swap::ArcSwap;

use crate::config::LoadedConfig;
use crate::forwarding::{ArrivedOverTls, PeerAddr};
use crate::metrics::Metrics;
use crate::stack::{build, BuildError, Gateway, ServerSettings};
use crate::{full_body, Body, BoxError};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A gateway serving on its listeners.
pub struct RunningGateway {
    /// The public address actually bound (useful with port 0).
    pub listen_addr: SocketAddr,
    /// The admin address actually bound.
    pub admin_addr: SocketAddr,
    /// The metrics registry.
    pub metrics: Metrics,
    /// The stack in force; a reload swaps it, requests already running keep theirs.
    live: Arc<ArcSwap<Gateway>>,
    /// The addresses the listeners were bound for (a reload cannot move them).
    bound: (SocketAddr, SocketAddr),
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    draining: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
    /// One per serving worker, completed when it has drained.
    workers: Vec<tokio::sync::oneshot::Receiver<()>>,
    admin: JoinHandle<()>,
}

impl RunningGateway {
    /// Builds the stack from `loaded`, binds both listeners and starts serving.
    pub async fn start(loaded: LoadedConfig) -> Result<Self, StartError> {
        let metrics = Metrics::new()?;
        let gateway = build(&loaded, &metrics, None)?;
        let config = &loaded.config;
        let bind_error = |addr: SocketAddr| move |source| StartError::Bind { addr, source };
        // The first public socket fixes the address (port 0 picks one); the other workers bind
        // the same address, and the kernel spreads connections over them (SO_REUSEPORT).
        let public = reuseport_listener(config.listen).map_err(bind_error(config.listen))?;
        let listen_addr = public.local_addr().map_err(bind_error(config.listen))?;
        let admin = TcpListener::bind(config.admin_listen)
            .await
            .map_err(bind_error(config.admin_listen))?;
        let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
            addr: config.admin_listen,
            source,
        })?;
        metrics
            .config_info
            .with_label_values(&[&gateway.config_hash])
            .set(1);
        let live = Arc::new(ArcSwap::from_pointee(gateway));
        let draining = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = watch::channel(false);

        let count = config.workers();
        let budget = ConnectionBudget::new(&metrics);
        let mut workers = Vec::with_capacity(count);
        let mut first = Some(public);
        for index in 0..count {
            let listener = match first.take() {
                Some(listener) => listener,
                None => reuseport_listener(listen_addr).map_err(bind_error(listen_addr))?,
            };
            let (done, drained) = tokio::sync::oneshot::channel();
            let (live, stopped, budget) = (live.clone(), stopped.clone(), budget.clone());
            std::thread::Builder::new()
                .name(format!("erpgate-worker-{index}"))
                .spawn(move || serve_worker(index, listener, live, stopped, done, budget))
                .map_err(bind_error(listen_addr))?;
            workers.push(drained);
        }
        let admin = tokio::spawn(serve_admin(
            admin,
            Admin {
                metrics: metrics.clone(),
                draining: draining.clone(),
                live: live.clone(),
            },
        ));
        tracing::info!(%listen_addr, %admin_addr, tls = config.tls.is_some(), sites = config.sites.len(), clients = config.clients.len(), "erpgate listening");
        Ok(Self {
            listen_addr,
            admin_addr,
            metrics,
            live,
            bound: (config.listen, config.admin_listen),
            reloading: tokio::sync::Mutex::new(()),
            draining,
            stop,
            workers,
            admin,
        })
    }

    /// Puts `loaded` in force for new requests; requests already running finish on the old
    /// configuration and no connection is dropped. Clients whose limits did not change keep
    /// their rate-limit state. On error the old configuration stays.
    pub async fn reload(&self, loaded: LoadedConfig) -> Result<(), BuildError> {
        let _one_at_a_time = self.reloading.lock().await;
        let current = self.live.load_full();
        let result = build(&loaded, &self.metrics, Some(&current));
        let outcome = if result.is_ok() { "success" } else { "failure" };
        self.metrics
            .config_reloads
            .with_label_values(&[outcome])
            .inc();
        let gateway = result?;
        let config = &loaded.config;
        if (config.listen, config.admin_listen) != self.bound {
            tracing::warn!(
                "listen and admin_listen changes take effect only on a restart; keeping the listeners"
            );
        }
        self.metrics.config_info.reset();
        self.metrics
            .config_info
            .with_label_values(&[&gateway.config_hash])
            .set(1);
        tracing::info!(hash = %gateway.config_hash, sites = config.sites.len(), clients = config.clients.len(), "configuration reloaded");
        self.live.store(Arc::new(gateway));
        Ok(())
    }

    /// Reads `path` and reloads; a config that does not load or build is logged, counted, and
    /// leaves the old one serving. True when the new one is in force.
    pub async fn reload_file(&self, path: &std::path::Path) -> bool {
        match crate::config::Config::load_and_probe(path) {
            Ok(loaded) => match self.reload(loaded).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, "reload refused; the previous configuration keeps serving");
                    false
                }
            },
            Err(e) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["failure"])
                    .inc();
                tracing::error!(error = %e, "reload refused; the previous configuration keeps serving");
                false
            }
        }
    }

    /// Whether the configuration in force asks for the file to be watched, and how often.
    pub fn watch_interval(&self) -> Option<Duration> {
        let live = self.live.load();
        live.reload.watch.then_some(live.reload.interval)
    }

    /// Starts draining: `/readyz` answers 503 at once; after `limits.drain_delay` the listener
    /// stops accepting, and in-flight requests get `limits.shutdown_grace` to finish.
    pub fn begin_shutdown(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let delay = self.live.load().server.drain_delay;
        if delay.is_zero() {
            let _ = self.stop.send(true);
            return;
        }
        let stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = stop.send(true);
        });
    }

    /// Waits until every worker has drained (or the grace period ran out), then stops the admin
    /// listener.
    pub async fn wait(mut self) {
        for drained in std::mem::take(&mut self.workers) {
            let _ = drained.await;
        }
        self.admin.abort();
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        // Dropped without a shutdown (tests): the workers stop accepting and drain.
        let _ = self.stop.send(true);
        self.admin.abort();
    }
}

/// A non-blocking listening socket on `addr` that other workers may bind too. Called on a
/// runtime; the socket is handed over to a worker's runtime as a std listener.
fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(4096)?.into_std()
}

/// One serving worker: its own single-threaded event loop on its own listening socket.
fn serve_worker(
    index: usize,
    listener: std::net::TcpListener,
    live: Arc<ArcSwap<Gateway>>,
    stopped: watch::Receiver<bool>,
    done: tokio::sync::oneshot::Sender<()>,
    budget: Arc<ConnectionBudget>,
) {
    crate::worker::set_index(index);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(worker = index, error = %e, "cannot start a worker's event loop");
            return;
        }
    };
    runtime.block_on(async move {
        match TcpListener::from_std(listener) {
            Ok(listener) => serve_public(listener, live, stopped, budget).await,
            Err(e) => tracing::error!(worker = index, error = %e, "cannot register the listener"),
        }
    });
    let _ = done.send(());
}

/// HTTP/1.1 with keep-alive and the slowloris guard, and HTTP/2 by prior knowledge with limits
/// sized for a gateway (streams per connection, flow-control windows, keep-alive pings).
fn connection_builder(settings: &ServerSettings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        // The read buffer never grows past the largest head allowed: what an idle keep-alive
        // connection holds (bodies are read through it in chunks of at most this).
        .max_buf_size(settings.max_request_head_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.http2_max_concurrent_streams)
        .initial_stream_window_size(256 << 10)
        .initial_connection_window_size(1 << 20)
        .max_header_list_size(64 << 10)
        .keep_alive_interval(Some(settings.http2_keepalive_interval))
        .keep_alive_timeout(settings.http2_keepalive_interval);
    builder
}

/// What a connection has been doing, for its deadlines: a first request head within
/// `header_read_timeout` of accept (whatever the protocol turns out to be: a silent socket or
/// half an HTTP/2 preface is cut off too), and no more than `idle_timeout` with nothing in
/// flight afterwards (HTTP/1.1 keep-alive and HTTP/2 alike).
#[derive(Debug)]
struct Activity {
    accepted: std::time::Instant,
    seen_request: AtomicBool,
    in_flight: std::sync::atomic::AtomicUsize,
    /// Milliseconds after `accepted` when the last request ended.
    last_end_ms: std::sync::atomic::AtomicU64,
    /// Wakes the deadline watcher when a request ends, to start the idle clock.
    changed: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            accepted: std::time::Instant::now(),
            seen_request: AtomicBool::new(false),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            last_end_ms: std::sync::atomic::AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
        })
    }

    /// A request began; it ends when the returned guard drops (answered, or its future
    /// dropped by a client that reset the stream or hung up).
    fn started(self: &Arc<Self>) -> RequestInFlight {
        self.seen_request.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        RequestInFlight(self.clone())
    }

    fn ended(&self) {
        let now = u64::try_from(self.accepted.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_end_ms.store(now, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// How long until the connection may be closed, or `None` if it should be closed now.
    fn time_left(&self, head: Duration, idle: Duration) -> Option<Duration> {
        let elapsed = self.accepted.elapsed();
        if !self.seen_request.load(Ordering::Relaxed) {
            return head.checked_sub(elapsed).filter(|d| !d.is_zero());
        }
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Some(idle);
        }
        let last = Duration::from_millis(self.last_end_ms.load(Ordering::Relaxed));
        (last + idle).checked_sub(elapsed).filter(|d| !d.is_zero())
    }
}

/// One request in flight on a connection.
struct RequestInFlight(Arc<Activity>);

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        self.0.ended();
    }
}

/// Drives a connection until it ends or its deadlines say to close it.
async fn with_deadlines<F>(
    connection: F,
    activity: Arc<Activity>,
    head: Duration,
    idle: Duration,
) -> Option<BoxError>
where
    F: std::future::Future<Output = Result<(), BoxError>>,
{
    tokio::pin!(connection);
    loop {
        let Some(left) = activity.time_left(head, idle) else {
            // Dropping the connection closes its socket.
            return None;
        };
        tokio::select! {
            result = &mut connection => {
                return result.err();
            }
            _ = tokio::time::sleep(left) => {}
            _ = activity.changed.notified() => {}
        }
    }
}

/// Open public connections over all workers, against a cap; refusals logged once a second.
#[derive(Debug)]
struct ConnectionBudget {
    open: std::sync::atomic::AtomicUsize,
    /// The cap the file-descriptor limit allows, whatever the config says.
    fd_cap: usize,
    refused: std::sync::atomic::AtomicU64,
    last_report_s: std::sync::atomic::AtomicU64,
    started: std::time::Instant,
    refused_metric: prometheus::IntCounter,
    open_metric: prometheus::IntGauge,
    unparseable: prometheus::IntCounter,
}

/// A held connection slot; freed on drop.
struct ConnectionSlot(Arc<ConnectionBudget>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.open_metric.dec();
    }
}

/// File descriptors kept back from public connections for upstream connections, temporary
/// files, the admin listener and its scrapes, logs: an eighth of the limit, at least this many.
/// (Idle client connections need no upstream connection: the pools are shared and bounded by
/// the requests actually in flight.)
const FD_RESERVE_MIN: usize = 256;

impl ConnectionBudget {
    fn new(metrics: &Metrics) -> Arc<Self> {
        let fd_cap =
            open_files_limit().map_or(usize::MAX, |n| n.saturating_sub(FD_RESERVE_MIN.max(n / 8)));
        Arc::new(Self {
            open: std::sync::atomic::AtomicUsize::new(0),
            fd_cap: fd_cap.max(16),
            refused: std::sync::atomic::AtomicU64::new(0),
            last_report_s: std::sync::atomic::AtomicU64::new(0),
            started: std::time::Instant::now(),
            refused_metric: metrics.connections_refused.clone(),
            open_metric: metrics.open_connections.clone(),
            unparseable: metrics.unparseable_requests.clone(),
        })
    }

    fn take(self: &Arc<Self>, max: usize) -> Option<ConnectionSlot> {
        let cap = max.min(self.fd_cap);
        let mut open = self.open.load(Ordering::Relaxed);
        loop {
            if open >= cap {
                self.refused(cap);
                return None;
            }
            match self.open.compare_exchange_weak(
                open,
                open + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.open_metric.inc();
                    return Some(ConnectionSlot(self.clone()));
                }
                Err(now) => open = now,
            }
        }
    }

    fn refused(&self, cap: usize) {
        self.refused_metric.inc();
        let count = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        self.report(|| {
            tracing::warn!(
                cap,
                refused_so_far = count,
                "connection cap reached: new connections are closed at once"
            )
        });
    }

    /// Runs `log` at most once a second.
    fn report(&self, log: impl FnOnce()) {
        let now = self.started.elapsed().as_secs() + 1;
        let last = self.last_report_s.load(Ordering::Relaxed);
        if now > last
            && self
                .last_report_s
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log();
        }
    }
}

/// The soft limit on open files, from `/proc/self/limits` (Linux).
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The per-connection service: every request takes the stack in force when it arrives.
fn connection_service(
    live: Arc<ArcSwap<Gateway>>,
    peer: SocketAddr,
    over_tls: bool,
    activity: Arc<Activity>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone
       + Send {
    hyper::service::service_fn(move |request: Request<Incoming>| {
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(PeerAddr(peer));
        if over_tls {
            request.extensions_mut().insert(ArrivedOverTls);
        }
        let future = live.load().service.clone().oneshot(request);
        let in_flight = activity.started();
        // The stack renders its own errors; one escaping means a broken layer, and the client
        // still gets an answer rather than a dropped connection.
        async move {
            let result = future.await;
            drop(in_flight);
            Ok::<_, Infallible>(result.unwrap_or_else(|e| {
                tracing::error!(error = %e, "unhandled error reached the listener");
                let mut response = Response::new(full_body("internal gateway error\n"));
                *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                response
            }))
        }
    })
}

/// How a public connection ended: a request the HTTP parser refused (hyper answered 400 with
/// no body and closed; no layer saw it) is logged with the peer and counted, since a client
/// sending a raw `"` or space in a URL otherwise fails with nothing to show for it.
fn connection_ended(
    peer: SocketAddr,
    error: Option<BoxError>,
    unparseable: &prometheus::IntCounter,
) {
    let Some(error) = error else { return };
    let parse = std::iter::successors(Some(&*error as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
    .any(|e| {
        e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse)
    });
    if parse {
        unparseable.inc();
        tracing::warn!(%peer, error = %error, "request refused by the HTTP parser (400): \
            clients must percent-encode '\"', spaces, '<', '>', '{{', '}}', '|', '\\', '^', '`' in URLs");
    } else {
        tracing::debug!(%peer, error = %error, "connection ended with an error");
    }
}

fn log_end(peer: SocketAddr, result: Result<(), BoxError>) {
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

async fn serve_public(
    listener: TcpListener,
    live: Arc<ArcSwap<Gateway>>,
    mut stop: watch::Receiver<bool>,
    budget: Arc<ConnectionBudget>,
) {
    let graceful = GracefulShutdown::new();
    let mut settings = live.load().server;
    let mut builder = connection_builder(&settings);
    let mut accept_errors: u64 = 0;
    let mut backoff = Duration::from_millis(10);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => {
                        backoff = Duration::from_millis(10);
                        pair
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off (growing, capped)
                        // instead of spinning, and say so once a second, with a count.
                        accept_errors += 1;
                        let errors = accept_errors;
                        budget.report(|| tracing::warn!(error = %e, failures = errors, "accept failed; backing off"));
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                };
                let current = live.load();
                // One builder per worker, made again only when a reload changed its settings.
                if !same_listener_settings(&current.server, &settings) {
                    settings = current.server;
                    builder = connection_builder(&settings);
                }
                // Over the cap: closed at once, before any memory is spent on it.
                let Some(slot) = budget.take(settings.max_connections) else {
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let tls = current.tls.clone();
                let watcher = graceful.watcher();
                let activity = Activity::new();
                let service = connection_service(live.clone(), peer, tls.is_some(), activity.clone());
                let (head, idle) = (settings.header_read_timeout, settings.idle_timeout);
                // Plain and TLS connections are separate tasks: a plain connection's task does
                // not carry room for a TLS session.
                match tls {
                    None => {
                        // Boxed once: the task's nested futures then each hold a pointer, not a
                        // copy of the connection's state (5.4 KiB per idle connection unboxed,
                        // 2.1 KiB boxed, measured with `size_of_val`).
                        let connection = Box::pin(watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned()));
                        let unparseable = budget.unparseable.clone();
                        tokio::spawn(async move {
                            let error = with_deadlines(connection, activity, head, idle).await;
                            connection_ended(peer, error, &unparseable);
                            drop(slot);
                        });
                    }
                    Some(acceptor) => {
                        let builder = builder.clone();
                        let unparseable = budget.unparseable.clone();
                        tokio::spawn(async move {
                            // The handshake is bounded like a header read.
                            let handshake = tokio::time::timeout(head, acceptor.accept(stream));
                            match handshake.await {
                                Ok(Ok(stream)) => {
                                    let connection = Box::pin(watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned()));
                                    let error = with_deadlines(connection, activity, head, idle).await;
                                    connection_ended(peer, error, &unparseable);
                                }
                                Ok(Err(e)) => log_end(peer, Err(e.into())),
                                Err(_) => log_end(peer, Err("TLS handshake timed out".into())),
                            }
                            drop(slot);
                        });
                    }
                }
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    let grace = live.load().server.shutdown_grace;
    tracing::info!(grace = ?grace, "draining: no longer accepting connections");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("drained: all connections closed"),
        _ = tokio::time::sleep(grace) => tracing::warn!("grace period over; closing remaining connections"),
    }
}

/// Whether a worker's connection builder still fits the settings in force.
fn same_listener_settings(a: &ServerSettings, b: &ServerSettings) -> bool {
    a.header_read_timeout == b.header_read_timeout
        && a.max_request_head_bytes == b.max_request_head_bytes
        && a.http2_max_concurrent_streams == b.http2_max_concurrent_streams
        && a.http2_keepalive_interval == b.http2_keepalive_interval
}

/// Why `/readyz` should say no: draining, or (when the config asks) an open breaker or Redis
/// down.
fn unready_reason(draining: &AtomicBool, gateway: &Gateway) -> Option<String> {
    if draining.load(Ordering::SeqCst) {
        return Some("draining".into());
    }
    if let Some(shared) = &gateway.shared_state {
        if shared.readyz_requires_redis() && !shared.is_up() {
            return Some("shared state (Redis) unavailable".into());
        }
    }
    if !gateway.readyz_requires_closed_breakers {
        return None;
    }
    let open: Vec<&str> = gateway
        .router
        .sites()
        .filter(|s| s.breaker.as_ref().is_some_and(|b| b.is_open()))
        .map(|s| s.name.as_ref())
        .collect();
    (!open.is_empty()).then(|| format!("circuit open: {}", open.join(", ")))
}

/// What the admin listener serves from.
#[derive(Clone)]
struct Admin {
    metrics: Metrics,
    draining: Arc<AtomicBool>,
    live: Arc<ArcSwap<Gateway>>,
}

/// Admin connections open at once; more are closed at once (Prometheus and a probe need few).
const MAX_ADMIN_CONNECTIONS: usize = 64;

async fn serve_admin(listener: TcpListener, admin: Admin) {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if open.fetch_add(1, Ordering::Relaxed) >= MAX_ADMIN_CONNECTIONS {
            open.fetch_sub(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        let admin = admin.clone();
        let activity = Activity::new();
        let tracked = activity.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let admin = admin.clone();
            let in_flight = tracked.started();
            async move {
                let response = admin.respond(&request).await;
                drop(in_flight);
                Ok::<_, Infallible>(response)
            }
        });
        let head = Duration::from_secs(10);
        let open = open.clone();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(head)
                .serve_connection(TokioIo::new(stream), service);
            let connection = async move { connection.await.map_err(BoxError::from) };
            let _ = with_deadlines(connection, activity, head, Duration::from_secs(60)).await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Whether a state-changing admin request carries what no web page can send cross-origin
/// without a CORS preflight (which the admin listener never grants): the admin token when one
/// is configured, else the `X-Erpgate-Admin: 1` header.
fn admin_request_allowed(request: &Request<Incoming>, token: Option<&str>) -> bool {
    let headers = request.headers();
    match token {
        Some(token) => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| {
                use subtle::ConstantTimeEq;
                bool::from(given.as_bytes().ct_eq(token.as_bytes()))
            }),
        None => headers
            .get("x-erpgate-admin")
            .is_some_and(|v| v.as_bytes() == b"1"),
    }
}

impl Admin {
    async fn respond(&self, request: &Request<Incoming>) -> Response<Body> {
        let live = self.live.load_full();
        let cache = &live.cache;
        let text = |status, body: String| (status, "text/plain", full_body(body));
        let (status, content_type, body) = match (request.method(), request.uri().path()) {
            (_, "/metrics") => {
                if let Some(cache) = cache {
                    cache.stats().await;
                }
                if let Some(relay) = &live.events {
                    relay.refresh_gauges().await;
                }
                (
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    full_body(self.metrics.encode()),
                )
            }
            (_, "/healthz") => text(StatusCode::OK, "ok\n".into()),
            (_, "/readyz") => match unready_reason(&self.draining, &live) {
                Some(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
                None => text(StatusCode::OK, "ready\n".into()),
            },
            (_, "/cache/stats" | "/cache/purge") if cache.is_none() => text(
                StatusCode::NOT_FOUND,
                "no cache rules are configured\n".into(),
            ),
            (&Method::GET, "/cache/stats") => {
                let stats = match cache {
                    Some(cache) => cache.stats().await,
                    None => return Response::new(crate::empty_body()),
                };
                let body = serde_json::json!({
                    "entries": stats.entries,
                    "bytes": stats.bytes,
                    "max_bytes": stats.max_bytes,
                });
                (
                    StatusCode::OK,
                    "application/json",
                    full_body(body.to_string()),
                )
            }
            (&Method::POST, "/cache/purge")
                if !admin_request_allowed(request, live.admin_token.as_deref()) =>
            {
                text(
                    StatusCode::FORBIDDEN,
                    "state-changing admin requests need the header X-Erpgate-Admin: 1 (or the admin token as a bearer token, when one is configured)\n".into(),
                )
            }
            (&Method::POST, "/cache/purge") => {
                let param =
                    |name| crate::frappe::form_dict::query_value(request.uri().query(), name);
                let (site, doctype) = (param("site"), param("doctype"));
                if site.as_deref().is_some_and(|s| live.router.site(s).is_none()) {
                    // Only configured names: a site name becomes a metric label.
                    text(StatusCode::NOT_FOUND, "no such site\n".into())
                } else if doctype.is_some() && site.is_none() {
                    text(
                        StatusCode::BAD_REQUEST,
                        "doctype needs site: POST /cache/purge?site=S&doctype=D\n".into(),
                    )
                } else {
                    if let Some(cache) = cache {
                        cache.purge(site.as_deref(), doctype.as_deref());
                    }
                    tracing::info!(site, doctype, "cache purged");
                    text(StatusCode::OK, "purged\n".into())
                }
            }
            (_, "/cache/stats" | "/cache/purge") => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "GET /cache/stats, POST /cache/purge\n".into(),
            ),
            (&Method::POST, "/openapi/purge")
                if !admin_request_allowed(request, live.admin_token.as_deref()) =>
            {
                text(
                    StatusCode::FORBIDDEN,
                    "state-changing admin requests need the header X-Erpgate-Admin: 1 (or the admin token as a bearer token, when one is configured)\n".into(),
                )
            }
            (&Method::POST, "/openapi/purge") => {
                live.openapi_metadata.purge();
                tracing::info!("openapi metadata purged");
                text(StatusCode::OK, "purged\n".into())
            }
            (_, "/events/dead-letters" | "/events/replay") if live.events.is_none() => text(
                StatusCode::NOT_FOUND,
                "no event relay is configured\n".into(),
            ),
            (&Method::GET, "/events/dead-letters")
                if !admin_request_allowed(request, live.admin_token.as_deref()) =>
            {
                // Dead letters hold documents' data: as guarded as the state-changing calls.
                text(
                    StatusCode::FORBIDDEN,
                    "dead letters need the header X-Erpgate-Admin: 1 (or the admin token as a bearer token, when one is configured)\n".into(),
                )
            }
            (&Method::GET, "/events/dead-letters") => {
                let relay = live.events.as_ref();
                let limit = crate::frappe::form_dict::query_value(request.uri().query(), "limit")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(1000usize);
                match relay.map(|r| r.dead_letters(limit)) {
                    Some(listing) => match listing.await {
                        Ok(letters) => {
                            let letters: Vec<_> = letters
                                .iter()
                                .map(|l| {
                                    serde_json::json!({
                                        "subscription": l.subscription,
                                        "event_id": l.event_id,
                                        "attempts": l.attempts,
                                        "reason": l.reason,
                                        "dead_ms": l.dead_ms,
                                        "event": crate::events::delivery::EventObject::new(&l.event_id, &l.event),
                                    })
                                })
                                .collect();
                            let body = serde_json::json!({ "dead_letters": letters });
                            (
                                StatusCode::OK,
                                "application/json",
                                full_body(body.to_string()),
                            )
                        }
                        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
                    },
                    None => text(StatusCode::NOT_FOUND, "no event relay\n".into()),
                }
            }
            (&Method::POST, "/events/replay")
                if !admin_request_allowed(request, live.admin_token.as_deref()) =>
            {
                text(
                    StatusCode::FORBIDDEN,
                    "state-changing admin requests need the header X-Erpgate-Admin: 1 (or the admin token as a bearer token, when one is configured)\n".into(),
                )
            }
            (&Method::POST, "/events/replay") => {
                let param =
                    |name| crate::frappe::form_dict::query_value(request.uri().query(), name);
                let (subscription, event) = (param("subscription"), param("event"));
                let replayed = match live.events.as_ref() {
                    Some(relay) => Some(
                        relay
                            .replay(subscription.as_deref(), event.as_deref())
                            .await,
                    ),
                    None => None,
                };
                match replayed {
                    Some(replayed) => match replayed {
                        Ok(replayed) => {
                            tracing::info!(subscription, event, replayed, "dead letters replayed");
                            let body = serde_json::json!({ "replayed": replayed });
                            (
                                StatusCode::OK,
                                "application/json",
                                full_body(body.to_string()),
                            )
                        }
                        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
                    },
                    None => text(StatusCode::NOT_FOUND, "no event relay\n".into()),
                }
            }
            (_, "/events/dead-letters" | "/events/replay") => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "GET /events/dead-letters, POST /events/replay\n".into(),
            ),
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
    }
}
