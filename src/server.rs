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

use crate::config::LoadedConfig;
use crate::forwarding::PeerAddr;
use crate::layers::cache::Cache;
use crate::metrics::Metrics;
use crate::routing::Router;
use crate::stack::{build, BuildError, GatewayService};
use crate::{full_body, Body};

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
    draining: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
    public: JoinHandle<()>,
    admin: JoinHandle<()>,
}

impl RunningGateway {
    /// Builds the stack from `loaded`, binds both listeners and starts serving.
    pub async fn start(loaded: LoadedConfig) -> Result<Self, StartError> {
        let metrics = Metrics::new()?;
        let gateway = build(&loaded, &metrics)?;
        let config = &loaded.config;
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        let public = bind(config.listen).await?;
        let admin = bind(config.admin_listen).await?;
        let listen_addr = public.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
            addr: config.admin_listen,
            source,
        })?;
        let draining = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = watch::channel(false);

        let public = tokio::spawn(serve_public(
            public,
            gateway.service,
            config.limits.header_read_timeout,
            config.limits.shutdown_grace,
            stopped,
        ));
        let readiness = Readiness {
            draining: draining.clone(),
            breakers: config
                .readyz_requires_closed_breakers
                .then(|| gateway.router.clone()),
        };
        let admin = tokio::spawn(serve_admin(
            admin,
            Admin {
                metrics: metrics.clone(),
                readiness,
                cache: gateway.cache.clone(),
            },
        ));
        tracing::info!(%listen_addr, %admin_addr, sites = config.sites.len(), clients = config.clients.len(), "erpgate listening");
        Ok(Self {
            listen_addr,
            admin_addr,
            metrics,
            draining,
            stop,
            public,
            admin,
        })
    }

    /// Starts draining: `/readyz` answers 503, no new connections are accepted, and in-flight
    /// requests finish within the grace period.
    pub fn begin_shutdown(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let _ = self.stop.send(true);
    }

    /// Waits until the public listener has drained (or the grace period ran out), then stops the
    /// admin listener.
    pub async fn wait(self) {
        if let Err(e) = self.public.await {
            tracing::error!(error = %e, "public listener task failed");
        }
        self.admin.abort();
    }
}

async fn serve_public(
    listener: TcpListener,
    service: GatewayService,
    header_read_timeout: Duration,
    grace: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
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
                let service = service.clone();
                let hyper_service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let mut request = request.map(Body::new);
                    request.extensions_mut().insert(PeerAddr(peer));
                    let future = service.clone().oneshot(request);
                    // The stack renders its own errors; one escaping means a broken layer, and
                    // the client still gets an answer rather than a dropped connection.
                    async move {
                        Ok::<_, Infallible>(future.await.unwrap_or_else(|e| {
                            tracing::error!(error = %e, "unhandled error reached the listener");
                            let mut response = Response::new(full_body("internal gateway error\n"));
                            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                            response
                        }))
                    }
                });
                let connection = builder.serve_connection(TokioIo::new(stream), hyper_service).into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    tracing::info!(grace = ?grace, "draining: no longer accepting connections");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("drained: all connections closed"),
        _ = tokio::time::sleep(grace) => tracing::warn!("grace period over; closing remaining connections"),
    }
}

/// What `/readyz` looks at.
#[derive(Clone)]
struct Readiness {
    draining: Arc<AtomicBool>,
    /// When set, an open breaker on any of these sites makes the gateway unready.
    breakers: Option<Arc<Router>>,
}

impl Readiness {
    fn unready_reason(&self) -> Option<String> {
        if self.draining.load(Ordering::SeqCst) {
            return Some("draining".into());
        }
        let router = self.breakers.as_ref()?;
        let open: Vec<&str> = router
            .sites()
            .filter(|s| s.breaker.as_ref().is_some_and(|b| b.is_open()))
            .map(|s| s.name.as_ref())
            .collect();
        (!open.is_empty()).then(|| format!("circuit open: {}", open.join(", ")))
    }
}

/// What the admin listener serves from.
#[derive(Clone)]
struct Admin {
    metrics: Metrics,
    readiness: Readiness,
    cache: Option<Arc<Cache>>,
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
        let text = |status, body: String| (status, "text/plain", full_body(body));
        let (status, content_type, body) = match (request.method(), request.uri().path()) {
            (_, "/metrics") => {
                if let Some(cache) = &self.cache {
                    cache.stats().await;
                }
                (
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    full_body(self.metrics.encode()),
                )
            }
            (_, "/healthz") => text(StatusCode::OK, "ok\n".into()),
            (_, "/readyz") => match self.readiness.unready_reason() {
                Some(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
                None => text(StatusCode::OK, "ready\n".into()),
            },
            (_, "/cache/stats" | "/cache/purge") if self.cache.is_none() => text(
                StatusCode::NOT_FOUND,
                "no cache rules are configured\n".into(),
            ),
            (&Method::GET, "/cache/stats") => {
                let stats = match &self.cache {
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
                let param = |name: &str| {
                    request.uri().query().and_then(|q| {
                        form_urlencoded::parse(q.as_bytes())
                            .find(|(k, _)| k == name)
                            .map(|(_, v)| v.into_owned())
                    })
                };
                let (site, doctype) = (param("site"), param("doctype"));
                if doctype.is_some() && site.is_none() {
                    text(
                        StatusCode::BAD_REQUEST,
                        "doctype needs site: POST /cache/purge?site=S&doctype=D\n".into(),
                    )
                } else {
                    if let Some(cache) = &self.cache {
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
