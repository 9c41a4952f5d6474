//! Routing: puts the request's canonical path in place and picks its site and service account.
//!
//! The path is decoded and canonicalised here (see [`crate::frappe::path`]), a matched prefix is
//! stripped, and the request URI is rewritten to exactly what will be sent upstream. This runs
//! *before* classification so that access rules judge the path Frappe will see, not the one
//! the client typed. A route to a site the client has no service account on stops with 403. An
//! OAuth app's request is signed with its user's own token, as that user (`oauth::OAuthUser`).
//!
//! When routes with `methods` match the host and path, the route is not known until the
//! request is classified: a [`PendingRoute`] goes on instead of a [`RouteTarget`], and the
//! method-route layer decides (see `crate::routing`).

use std::sync::Arc;
use std::task::{Context, Poll};

use http::uri::PathAndQuery;
use http::{header, Request, Response};
use tower::{Layer, Service};

use crate::error::GatewayError;
use crate::frappe::{ApiVersion, CanonicalPath};
use crate::layers::auth::Client;
use crate::layers::EarlyReturn;
use crate::oauth::OAuthUser;
use crate::routing::{RouteTimeouts, Router};
use crate::site::{ServiceAccount, Site};
use crate::tags::RequestTags;
use crate::{Body, BoxError};

/// Where a request goes: a request extension set by routing.
#[derive(Debug, Clone)]
pub struct RouteTarget {
    /// The site.
    pub site: Arc<Site>,
    /// The route streams bodies instead of buffering them.
    pub streaming: bool,
    /// The service account the request is signed as there.
    pub account: ServiceAccount,
    /// The route's own timeouts and retries; `None`: the site's.
    pub timeouts: Option<RouteTimeouts>,
}

impl RouteTarget {
    /// How long one attempt may wait on the site.
    pub fn request_timeout(&self) -> std::time::Duration {
        self.timeouts
            .map_or_else(|| self.site.upstream.request_timeout(), |t| t.request)
    }

    /// The deadline for the whole exchange, retries included.
    pub fn total_timeout(&self) -> std::time::Duration {
        self.timeouts.map_or(self.site.total_timeout, |t| t.total)
    }

    /// Most retries.
    pub fn max_retries(&self) -> u32 {
        self.timeouts
            .map_or(self.site.retry.max_retries, |t| t.max_retries)
    }
}

/// Where a request goes when no method route wins: a request extension set by routing when
/// routes with `methods` matched its host and path, replaced by a [`RouteTarget`] once the
/// request is classified.
#[derive(Debug, Clone)]
pub struct PendingRoute {
    /// Indices of the candidate method routes, in order.
    pub candidates: Vec<usize>,
    /// The site the host and path lead to.
    pub site: Arc<Site>,
    /// Its route streams.
    pub streaming: bool,
    /// Its route's timeouts.
    pub timeouts: Option<RouteTimeouts>,
}

/// The account `request`'s client (or OAuth user) is signed as on `site`; 403 when it has none
/// there.
pub(crate) fn account_on(
    request: &Request<Body>,
    site: &Arc<Site>,
) -> Result<ServiceAccount, GatewayError> {
    let client = request
        .extensions()
        .get::<Arc<Client>>()
        .ok_or(GatewayError::Unauthenticated("no client"))?;
    match request.extensions().get::<OAuthUser>() {
        // An OAuth app's user is signed as themselves, on the app's site only.
        Some(user) if *site.name == *client.site => Ok(user.account(site, &client.name)),
        Some(_) => Err(GatewayError::SiteNotAllowed(site.name.to_string())),
        None => client
            .account_on(&site.name)
            .and_then(|name| site.accounts.get(name))
            .cloned()
            .ok_or_else(|| GatewayError::SiteNotAllowed(site.name.to_string())),
    }
}

/// Routes requests.
#[derive(Debug, Clone)]
pub struct RouteLayer {
    router: Arc<Router>,
}

impl RouteLayer {
    /// Routes with `router`.
    pub fn new(router: Arc<Router>) -> Self {
        Self { router }
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = Route<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Route {
            inner,
            router: self.router.clone(),
        }
    }
}

/// The service of [`RouteLayer`].
#[derive(Debug, Clone)]
pub struct Route<S> {
    inner: S,
    router: Arc<Router>,
}

/// What routing decided: the target, or the method routes still to be tried.
enum Decision {
    Target(RouteTarget),
    Pending(PendingRoute),
}

impl<S> Route<S> {
    fn target(&self, request: &mut Request<Body>) -> Result<Decision, GatewayError> {
        let mut path = CanonicalPath::parse(request.uri().path())
            .map_err(|e| GatewayError::BadRequest(format!("invalid path: {e}")))?;
        let client = request
            .extensions()
            .get::<Arc<Client>>()
            .ok_or(GatewayError::Unauthenticated("no client"))?;
        let host = request.uri().authority().map(|a| a.as_str()).or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        });
        let routed = self
            .router
            .route(host, &mut path, &client.site)
            .ok_or_else(|| GatewayError::SiteNotAllowed(client.site.clone()))?;
        // With method routes pending, the account is judged on the route that wins.
        let account = match routed.candidates.is_empty() {
            true => Some(account_on(request, &routed.site)?),
            false => None,
        };

        // Already canonical (the usual case): the URI stays as it came, nothing to rebuild.
        let encoded = path.encode();
        if encoded != request.uri().path() || request.uri().authority().is_some() {
            let encoded = match request.uri().query() {
                Some(query) => format!("{encoded}?{query}"),
                None => encoded,
            };
            let path_and_query = PathAndQuery::try_from(encoded)
                .map_err(|e| GatewayError::BadRequest(format!("invalid path: {e}")))?;
            *request.uri_mut() = http::Uri::from(path_and_query);
        }
        if let Some(tags) = RequestTags::of(request) {
            if account.is_some() {
                let _ = tags.site.set(routed.site.name.clone());
            }
            let _ = tags.api.set(ApiVersion::of(&path));
        }
        request.extensions_mut().insert(path);
        Ok(match account {
            Some(account) => Decision::Target(RouteTarget {
                site: routed.site,
                streaming: routed.streaming,
                account,
                timeouts: routed.timeouts,
            }),
            None => Decision::Pending(PendingRoute {
                candidates: routed.candidates,
                site: routed.site,
                streaming: routed.streaming,
                timeouts: routed.timeouts,
            }),
        })
    }
}

impl<S> Service<Request<Body>> for Route<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = EarlyReturn<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        match self.target(&mut request) {
            Ok(decision) => {
                match decision {
                    Decision::Target(target) => {
                        request.extensions_mut().insert(target);
                    }
                    Decision::Pending(pending) => {
                        request.extensions_mut().insert(pending);
                    }
                }
                EarlyReturn::inner(self.inner.call(request))
            }
            Err(e) => EarlyReturn::error(e),
        }
    }
}

/// A route target on a site on an unused local port with no breaker, for layer unit tests.
#[cfg(test)]
pub(crate) fn test_target(
    retry: crate::site::RetrySettings,
    total_timeout: std::time::Duration,
) -> RouteTarget {
    use crate::site::identity_of;
    use crate::upstream::{Upstream, UpstreamOptions};
    use http::HeaderValue;
    use std::collections::HashMap;
    use std::time::Duration;
    let histogram = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("h", "h"))
        .expect("valid histogram");
    let backend: http::Uri = "http://127.0.0.1:9".parse().expect("valid uri");
    let upstream = Upstream::new(
        1,
        "erp".into(),
        &[backend],
        &UpstreamOptions {
            protocol: crate::config::UpstreamProtocol::Http1,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            ca_file: None,
        },
        histogram,
    )
    .expect("upstream builds");
    let site = Arc::new(Site {
        name: "erp".into(),
        site_name: HeaderValue::from_static("erp.localhost"),
        host: HeaderValue::from_static("erp.localhost"),
        accounts: HashMap::new(),
        expose_tracebacks: false,
        upstream,
        breaker: None,
        retry,
        read_only_methods: Default::default(),
        total_timeout,
    });
    RouteTarget {
        site,
        streaming: false,
        account: ServiceAccount {
            name: "sync".into(),
            authorization: HeaderValue::from_static("token key:secret"),
            identity: identity_of(&[b"test", b"key"]),
        },
        timeouts: None,
    }
}
