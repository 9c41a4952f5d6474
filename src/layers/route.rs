//! Routing: puts the request's canonical path in place and picks its site and service account.
//!
//! The path is decoded and canonicalised here (see [`crate::frappe::path`]), a matched prefix is
//! stripped, and the request URI is rewritten to exactly what will be sent upstream. This runs
//! *before* classification so that access rules judge the path Frappe will see, not the one
//! the client typed. A route to a site the client has no service account on stops with 403. An
//! OAuth app's request is signed with its user's own token, as that user (`oauth::OAuthUser`).

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
use crate::routing::Router;
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

impl<S> Route<S> {
    fn target(&self, request: &mut Request<Body>) -> Result<RouteTarget, GatewayError> {
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
        let (site, streaming) = self
            .router
            .route(host, &mut path, &client.site)
            .ok_or_else(|| GatewayError::SiteNotAllowed(client.site.clone()))?;
        let account = match request.extensions().get::<OAuthUser>() {
            // An OAuth app's user is signed as themselves, on the app's site only.
            Some(user) if *site.name == *client.site => user.account(&site, &client.name),
            Some(_) => return Err(GatewayError::SiteNotAllowed(site.name.to_string())),
            None => client
                .account_on(&site.name)
                .and_then(|name| site.accounts.get(name))
                .ok_or_else(|| GatewayError::SiteNotAllowed(site.name.to_string()))?
                .clone(),
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
            let _ = tags.site.set(site.name.clone());
            let _ = tags.api.set(ApiVersion::of(&path));
        }
        request.extensions_mut().insert(path);
        Ok(RouteTarget {
            site,
            streaming,
            account,
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
            Ok(target) => {
                request.extensions_mut().insert(target);
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
    }
}
