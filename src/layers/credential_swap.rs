//! The credential swap and header hygiene, both ways.
//!
//! Upstream-bound: hop-by-hop headers, the client's `Cookie`, `Frappe-Authorization-Source`,
//! `X-Use-X-Accel-Redirect`, any `X-Frappe-Site-Name`, every header whose name has `_`
//! (`SCRIPT_NAME`, `PATH_INFO`, ...) and gunicorn's other scheme headers go; the site's service-account
//! `Authorization: token key:secret`, `X-Frappe-Site-Name`, `Host`, `X-Forwarded-For` (the peer,
//! appended to the incoming list only when the peer is a trusted proxy) and `X-Forwarded-Proto`
//! are set. Client-bound: `Set-Cookie` (Frappe sets Guest cookies on every answer) and hop-by-hop
//! headers go, and unless the site sets `expose_tracebacks`, Python tracebacks in JSON error
//! bodies are cut to one line.
//!
//! Innermost before the client, so no layer above ever holds an ERPNext secret.

use std::net::{IpAddr, Ipv4Addr};
use std::task::{Context, Poll};

use http::{header, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Limited};
use tower::{Layer, Service};

use crate::error::GatewayError;
use crate::forwarding::{ArrivedOverTls, PeerAddr, TrustedProxies};
use crate::frappe::envelope::scrub_tracebacks;
use crate::frappe::headers::{
    remove_client_identity, remove_hop_by_hop, remove_wsgi_specials, X_FORWARDED_FOR,
    X_FORWARDED_PROTO, X_FRAPPE_SITE_NAME,
};
use crate::layers::route::RouteTarget;
use crate::layers::BoxResponseFuture;
use crate::site::Site;
use crate::{full_body, Body, BoxError};

/// Largest upstream error body read to remove tracebacks; Frappe's are a few KiB.
const MAX_ERROR_BODY: usize = 1 << 20;

/// Swaps credentials and cleans headers.
#[derive(Debug, Clone)]
pub struct CredentialSwapLayer {
    trusted: TrustedProxies,
}

impl CredentialSwapLayer {
    /// Believes `X-Forwarded-*` only from `trusted` peers.
    pub fn new(trusted: TrustedProxies) -> Self {
        Self { trusted }
    }
}

impl<S> Layer<S> for CredentialSwapLayer {
    type Service = CredentialSwap<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CredentialSwap {
            inner,
            trusted: self.trusted.clone(),
        }
    }
}

/// The service of [`CredentialSwapLayer`].
#[derive(Debug, Clone)]
pub struct CredentialSwap<S> {
    inner: S,
    trusted: TrustedProxies,
}

impl<S> CredentialSwap<S> {
    fn sign(&self, request: &mut Request<Body>, target: &RouteTarget) {
        let headers = request.headers_mut();
        remove_hop_by_hop(headers);
        remove_client_identity(headers);
        remove_wsgi_specials(headers);
        headers.insert(header::AUTHORIZATION, target.account.authorization.clone());
        address_to_site(request, &target.site, &self.trusted);
    }
}

/// Addresses a request to `site` (`X-Frappe-Site-Name`, `Host`) and says where it came from
/// (`X-Forwarded-For`: the peer, appended to the incoming list only when the peer is a trusted
/// proxy; `X-Forwarded-Proto`).
pub(crate) fn address_to_site(request: &mut Request<Body>, site: &Site, trusted: &TrustedProxies) {
    let peer = request
        .extensions()
        .get::<PeerAddr>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.0.ip());
    let from_proxy = trusted.contains(peer);
    let proto = match request.extensions().get::<ArrivedOverTls>() {
        Some(_) => HeaderValue::from_static("https"),
        None => HeaderValue::from_static("http"),
    };
    let headers = request.headers_mut();
    headers.insert(X_FRAPPE_SITE_NAME.clone(), site.site_name.clone());
    headers.insert(header::HOST, site.host.clone());
    let incoming: Vec<&str> = if from_proxy {
        headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    } else {
        Vec::new()
    };
    let peer = peer.to_string();
    let forwarded_for = if incoming.is_empty() {
        peer
    } else {
        format!("{}, {peer}", incoming.join(", "))
    };
    if let Ok(value) = HeaderValue::try_from(forwarded_for) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    if !(from_proxy && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO.clone(), proto);
    }
}

/// Cleans an upstream response for the client; `keep_cookies` only on a public route's answer
/// (the OAuth sign-in flow needs its session).
pub(crate) async fn clean_response(
    mut response: Response<Body>,
    expose_tracebacks: bool,
    keep_cookies: bool,
) -> Result<Response<Body>, BoxError> {
    let headers = response.headers_mut();
    if !keep_cookies {
        headers.remove(header::SET_COOKIE);
    }
    remove_hop_by_hop(headers);
    let is_json = headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes()
            .windows(4)
            .any(|w| w.eq_ignore_ascii_case(b"json"))
    });
    let status = response.status();
    if expose_tracebacks || !is_json || !(status.is_client_error() || status.is_server_error()) {
        return Ok(response);
    }
    let (mut parts, body) = response.into_parts();
    let bytes = match Limited::new(body, MAX_ERROR_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            tracing::warn!(error = %e, "upstream error body unreadable or too large to clean");
            return Err(GatewayError::BadGateway {
                site: "upstream".into(),
            }
            .into());
        }
    };
    let bytes = scrub_tracebacks(&bytes).unwrap_or(bytes);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Ok(Response::from_parts(parts, full_body(bytes)))
}

impl<S> Service<Request<Body>> for CredentialSwap<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let Some(target) = request.extensions().get::<RouteTarget>().cloned() else {
            return Box::pin(async { Err("request reached the credential swap unrouted".into()) });
        };
        self.sign(&mut request, &target);
        let expose = target.site.expose_tracebacks;
        let future = self.inner.call(request);
        Box::pin(async move { clean_response(future.await?, expose, false).await })
    }
}
