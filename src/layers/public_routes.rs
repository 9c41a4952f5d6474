//! Public routes: a site's OAuth 2.0 sign-in flow (`authorize`, `approve`, `get_token`,
//! `revoke_token`, `openid_profile`, `/.well-known/openid-configuration`) passes without a
//! gateway key, as the operator lists it (`sites.<name>.public`, off unless listed).
//!
//! What passes is judged as Frappe will act on it: the request is classified on its canonical
//! path and its whole `form_dict` (query, JSON or urlencoded body: `app.py` runs `form_dict.cmd`
//! instead of the path, so a request naming any other method is not public), and only an
//! exact listed method with nothing embedded, or an exact listed path, is forwarded. It goes
//! with the caller's own `Cookie` and `Authorization` (the user's session, or the OAuth
//! client's credentials at the token endpoint) and none of the gateway's; the answer keeps its
//! `Set-Cookie` (the consent screen needs the session) and its `Location`, and loses hop-by-hop
//! headers and tracebacks like any other. Bounded per source address; through the site's
//! breaker and under its `timeouts.total`.
//!
//! A door with no key is judged at least as strictly as a keyed one, by the same parts: the
//! same classification (the whole `form_dict` from every carrier, multipart re-encoded under
//! erpgate's own boundary and Content-Type, `sid` removed from the query and every body, the
//! same body bounds and part cap) and the same buffering (`buffering.requests`: the body is
//! read whole before the site sees a byte, with `client_body_timeout` between reads, so
//! clients trickling bodies into `get_token` hold no gunicorn worker). Only the allow-list is
//! its own and fixed: the listed method and nothing else — a `cmd` in any carrier (`login`
//! included), a multipart field not yet read, or any other method makes it keyed.
//!
//! Before authentication (these requests carry no gateway key), after the body limit. A request
//! carrying a configured client's key is never public: it goes the keyed way.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::uri::PathAndQuery;
use http::{header, Request, Response};
use tower::{Layer, Service, ServiceExt};

use crate::config::PublicRoutesConfig;
use crate::error::GatewayError;
use crate::forwarding::TrustedProxies;
use crate::frappe::auth_header::parse_credential;
use crate::frappe::headers::repeated_singleton;
use crate::frappe::headers::{remove_hop_by_hop, remove_overrides, remove_wsgi_specials};
use crate::frappe::{CanonicalPath, FrappeRequest, MethodName, RequestKind};
use crate::layers::auth::ClientTable;
use crate::layers::breaker::BreakerLayer;
use crate::layers::buffer::{BufferLayer, MemoryReader};
use crate::layers::classify::ClassifyLayer;
use crate::layers::credential_swap::{address_to_site, clean_response};
use crate::layers::deadline::DeadlineLayer;
use crate::layers::forward::Forward;
use crate::layers::route::RouteTarget;
use crate::layers::{BoxResponseFuture, EarlyReturn};
use crate::routing::Router;
use crate::site::{ServiceAccount, Site};
use crate::{Body, BoxError};

/// One site's public routes.
struct PublicSite {
    methods: HashSet<String>,
    paths: HashSet<String>,
    per_address: DefaultKeyedRateLimiter<IpAddr>,
    since_sweep: AtomicU32,
}

/// Everything the layer decides with.
pub struct PublicRoutes {
    sites: HashMap<String, PublicSite>,
    /// The one site with public routes, where a request no route matches goes.
    only_site: Option<String>,
    router: Arc<Router>,
    clients: Arc<ClientTable>,
    trusted: TrustedProxies,
    reader: MemoryReader,
    buffer: BufferLayer,
}

impl PublicRoutes {
    /// From each site's `public` section; `None` when no site has one.
    pub fn new<'a>(
        sites: impl Iterator<Item = (&'a String, &'a PublicRoutesConfig)>,
        router: Arc<Router>,
        clients: Arc<ClientTable>,
        trusted: TrustedProxies,
        reader: MemoryReader,
        buffer: BufferLayer,
    ) -> Option<Self> {
        let one = NonZeroU32::MIN;
        let sites: HashMap<String, PublicSite> = sites
            .map(|(name, public)| {
                let quota = Quota::per_minute(NonZeroU32::new(public.per_minute).unwrap_or(one))
                    .allow_burst(NonZeroU32::new(public.burst).unwrap_or(one));
                let site = PublicSite {
                    methods: public
                        .methods
                        .iter()
                        .map(|m| MethodName::new(m).as_str().to_owned())
                        .collect(),
                    paths: public.paths.iter().cloned().collect(),
                    per_address: RateLimiter::keyed(quota),
                    since_sweep: AtomicU32::new(0),
                };
                (name.clone(), site)
            })
            .collect();
        if sites.is_empty() {
            return None;
        }
        let only_site = (sites.len() == 1)
            .then(|| sites.keys().next().cloned())
            .flatten();
        Some(Self {
            sites,
            only_site,
            router,
            clients,
            trusted,
            reader,
            buffer,
        })
    }

    /// The site and canonical path of a request that may be public, judged on its path alone
    /// (its `form_dict` is judged once read).
    fn candidate<B>(&self, request: &Request<B>) -> Option<(Arc<Site>, CanonicalPath)> {
        // A configured client's key: the keyed way, never public.
        if let Ok(credential) = parse_credential(request.headers().get(header::AUTHORIZATION)) {
            if self.clients.by_key_id(&credential.key_id).is_some() {
                return None;
            }
        }
        let mut path = CanonicalPath::parse(request.uri().path()).ok()?;
        let host = request.uri().authority().map(|a| a.as_str()).or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        });
        let fallback = self.only_site.as_deref().unwrap_or("");
        let site = self.router.route(host, &mut path, fallback)?.site;
        let public = self.sites.get(&*site.name)?;
        let listed = match path
            .segments()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["api", "method", name] | ["api", "v1" | "v2", "method", name] => {
                public.methods.contains(MethodName::new(name).as_str())
            }
            _ => public.paths.contains(&path.encode()),
        };
        listed.then_some((site, path))
    }
}

/// The layer.
#[derive(Clone)]
pub struct PublicRoutesLayer {
    routes: Arc<PublicRoutes>,
}

impl PublicRoutesLayer {
    /// Passes `routes`.
    pub fn new(routes: PublicRoutes) -> Self {
        Self {
            routes: Arc::new(routes),
        }
    }
}

impl<S> Layer<S> for PublicRoutesLayer {
    type Service = PublicRoutesService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        PublicRoutesService {
            inner,
            routes: self.routes.clone(),
        }
    }
}

/// The service.
#[derive(Clone)]
pub struct PublicRoutesService<S> {
    inner: S,
    routes: Arc<PublicRoutes>,
}

impl<S> Service<Request<Body>> for PublicRoutesService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Either<S::Future, EarlyReturn<BoxResponseFuture>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let Some((site, path)) = self.routes.candidate(&request) else {
            return Either::Left(self.inner.call(request));
        };
        let routes = &self.routes;
        let Some(public) = routes.sites.get(&*site.name) else {
            return Either::Left(self.inner.call(request));
        };
        // Before authentication, so the same check: two Content-Types (or Hosts, or
        // Content-Lengths) would let the classifier read one while gunicorn reads another.
        if let Some(name) = repeated_singleton(request.headers()) {
            return Either::Right(EarlyReturn::error(GatewayError::BadRequest(format!(
                "the {name} header must appear once"
            ))));
        }
        let source = routes.trusted.source_of(&request);
        if public.since_sweep.fetch_add(1, Ordering::Relaxed) >= 10_000 {
            public.since_sweep.store(0, Ordering::Relaxed);
            public.per_address.retain_recent();
        }
        if let Err(not_until) = public.per_address.check_key(&source) {
            use governor::clock::Clock as _;
            let now = governor::clock::DefaultClock::default().now();
            return Either::Right(EarlyReturn::error(GatewayError::TooManyRequests {
                message: "too many sign-in requests from this address; retry later",
                retry_after: not_until.wait_time_from(now),
            }));
        }
        // Frappe gets the canonical path that was judged.
        let encoded = match request.uri().query() {
            Some(query) => format!("{}?{query}", path.encode()),
            None => path.encode(),
        };
        match PathAndQuery::try_from(encoded) {
            Ok(pq) => *request.uri_mut() = http::Uri::from(pq),
            Err(e) => {
                return Either::Right(EarlyReturn::error(GatewayError::BadRequest(format!(
                    "invalid path: {e}"
                ))))
            }
        }
        let forward = ClassifyLayer::new(routes.reader.clone()).layer(PublicForward {
            site,
            path: path.encode(),
            methods: Arc::new(public.methods.clone()),
            paths: Arc::new(public.paths.clone()),
            trusted: routes.trusted.clone(),
            buffer: routes.buffer.clone(),
        });
        request.extensions_mut().insert(path);
        Either::Right(EarlyReturn::inner(Box::pin(forward.oneshot(request))))
    }
}

/// After classification: forwards what is exactly public, refuses the rest.
#[derive(Clone)]
struct PublicForward {
    site: Arc<Site>,
    path: String,
    methods: Arc<HashSet<String>>,
    paths: Arc<HashSet<String>>,
    trusted: TrustedProxies,
    buffer: BufferLayer,
}

impl Service<Request<Body>> for PublicForward {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let public = request
            .extensions()
            .get::<FrappeRequest>()
            .is_some_and(|c| {
                // Multipart fields after a file part are not read yet: a `cmd` may still come.
                c.embedded_methods.is_empty()
                    && !c.form_incomplete
                    && match &c.kind {
                        RequestKind::Method(m) => self.methods.contains(m.as_str()),
                        RequestKind::Other => self.paths.contains(&self.path),
                        _ => false,
                    }
            });
        if !public {
            // Something else rides along (a `cmd`): it needs a key like any request.
            return Box::pin(async { Err(GatewayError::Unauthenticated("not_public").into()) });
        }
        let site = self.site.clone();
        let headers = request.headers_mut();
        remove_hop_by_hop(headers);
        remove_overrides(headers);
        remove_wsgi_specials(headers);
        address_to_site(&mut request, &site, &self.trusted);
        request.extensions_mut().insert(RouteTarget {
            site: site.clone(),
            streaming: false,
            // The caller's own credentials travel; the gateway adds none.
            account: ServiceAccount {
                name: "public".into(),
                authorization: http::HeaderValue::from_static(""),
                identity: [0; 32],
            },
            timeouts: None,
        });
        let expose = crate::layers::credential_swap::Audience::of(&request);
        // As keyed requests go: the body whole first, then the site's deadline, its breaker.
        let forward = tower::ServiceBuilder::new()
            .layer(self.buffer.clone())
            .layer(DeadlineLayer)
            .layer(BreakerLayer)
            .service(Forward);
        Box::pin(async move {
            let response = forward.oneshot(request).await?;
            clean_response(response, expose, true).await
        })
    }
}
