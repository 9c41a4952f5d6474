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
use crate::stack::{build, BuildError, Gateway};
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
        let mut workers = Vec::with_capacity(count);
        let mut first = Some(public);
        for index in 0..count {
            let listener = match first.take() {
                Some(listener) => listener,
                None => reuseport_listener(listen_addr).map_err(bind_error(listen_addr))?,
            };
            let (done, drained) = tokio::sync::oneshot::channel();
            let (live, stopped) = (live.clone(), stopped.clone());
            std::thread::Builder::new()
                .name(format!("erpgate-worker-{index}"))
                .spawn(move || serve_worker(index, listener, live, stopped, done))
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
        match crate::config::Config::load(path) {
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
) {
    crate::upstream::set_worker_index(index);
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
            Ok(listener) => serve_public(listener, live, stopped).await,
            Err(e) => tracing::error!(worker = index, error = %e, "cannot register the listener"),
        }
    });
    let _ = done.send(());
}

/// HTTP/1.1 with keep-alive and the slowloris guard, and HTTP/2 by prior knowledge.
fn connection_builder(header_read_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// The per-connection service: every request takes the stack in force when it arrives.
fn connection_service(
    live: Arc<ArcSwap<Gateway>>,
    peer: SocketAddr,
    over_tls: bool,
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
        // The stack renders its own errors; one escaping means a broken layer, and the client
        // still gets an answer rather than a dropped connection.
        async move {
            Ok::<_, Infallible>(future.await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "unhandled error reached the listener");
                let mut response = Response::new(full_body("internal gateway error\n"));
                *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                response
            }))
        }
    })
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
) {
    let graceful = GracefulShutdown::new();
    let mut header_read_timeout = live.load().server.header_read_timeout;
    let mut builder = connection_builder(header_read_timeout);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let current = live.load();
                // One builder per worker, made again only when a reload changed its setting.
                if current.server.header_read_timeout != header_read_timeout {
                    header_read_timeout = current.server.header_read_timeout;
                    builder = connection_builder(header_read_timeout);
                }
                let tls = current.tls.clone();
                let watcher = graceful.watcher();
                let service = connection_service(live.clone(), peer, tls.is_some());
                // Plain and TLS connections are separate tasks: a plain connection's task does
                // not carry room for a TLS session.
                match tls {
                    None => {
                        let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                        tokio::spawn(async move {
                            log_end(peer, watcher.watch(connection).await);
                        });
                    }
                    Some(acceptor) => {
                        let builder = builder.clone();
                        tokio::spawn(async move {
                            // The handshake is bounded like a header read.
                            let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
                            let result = match handshake.await {
                                Ok(Ok(stream)) => {
                                    let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                                    watcher.watch(connection).await
                                }
                                Ok(Err(e)) => Err(e.into()),
                                Err(_) => Err("TLS handshake timed out".into()),
                            };
                            log_end(peer, result);
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

/// Why `/readyz` should say no: draining, or (when the config asks) an open breaker.
fn unready_reason(draining: &AtomicBool, gateway: &Gateway) -> Option<String> {
    if draining.load(Ordering::SeqCst) {
        return Some("draining".into());
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

async fn serve_admin(listener: TcpListener, admin: Admin) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let admin = admin.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let admin = admin.clone();
            async move { Ok::<_, Infallible>(admin.respond(&request).await) }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
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
            (&Method::POST, "/cache/purge") => {
                let param =
                    |name| crate::frappe::form_dict::query_value(request.uri().query(), name);
                let (site, doctype) = (param("site"), param("doctype"));
                if doctype.is_some() && site.is_none() {
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
