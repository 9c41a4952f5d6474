//! The credential swap and header hygiene, both ways.
//!
//! Upstream-bound: hop-by-hop headers, the client's `Cookie`, `Frappe-Authorization-Source`,
//! `X-Use-X-Accel-Redirect`, any `X-Frappe-Site-Name`, every header whose name has `_`
//! (`SCRIPT_NAME`, `PATH_INFO`, ...) and gunicorn's other scheme headers go; the site's service-account
//! `Authorization: token key:secret`, `X-Frappe-Site-Name`, `Host`, `X-Forwarded-For` (the peer,
//! appended to the incoming list only when the peer is a trusted proxy) and `X-Forwarded-Proto`
//! are set. Client-bound: `Set-Cookie` (Frappe sets Guest cookies on every answer) and hop-by-hop
//! headers go, and unless the site sets `expose_tracebacks`, Python tracebacks in JSON error
//! bodies are cut to one line. Restricted readers (clients with access rules, OAuth apps'
//! users, public routes' callers) never get the text of Frappe's database errors (see
//! [`Audience`]).
//!
//! Innermost before the client, so no layer above ever holds an ERPNext secret.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{header, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Limited};
use tower::{Layer, Service};

use crate::error::GatewayError;
use crate::forwarding::{ArrivedOverTls, PeerAddr, TrustedProxies};
use crate::frappe::envelope::{error_body, exc_type_of_status, scrub, Scrub};
use crate::frappe::headers::{
    remove_client_identity, remove_hop_by_hop, remove_wsgi_specials, X_FORWARDED_FOR,
    X_FORWARDED_PROTO, X_FRAPPE_SITE_NAME,
};
use crate::frappe::{ApiVersion, FrappeRequest};
use crate::layers::auth::Client;
use crate::layers::buffer::JoinedFrames;
use crate::layers::request_id::X_REQUEST_ID;
use crate::layers::route::RouteTarget;
use crate::layers::BoxResponseFuture;
use crate::oauth::OAuthUser;
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

/// Who reads an upstream answer, as far as cleaning it goes.
#[derive(Debug, Clone)]
pub(crate) struct Audience {
    /// The site passes Python tracebacks through (`sites.<name>.expose_tracebacks`).
    expose_tracebacks: bool,
    /// The route streams bodies: success answers are not held to be looked at.
    streaming: bool,
    /// A restricted reader: database error text is withheld from it.
    restricted: bool,
    /// The request id, named where erpgate withholds or replaces something (a clone of the
    /// header the request id layer set: no copy, no allocation per request).
    request_id: HeaderValue,
    /// The API of the request, for the envelope of a replaced error page.
    api: Option<ApiVersion>,
}

impl Audience {
    /// The reader of `request`'s answer, on its [`RouteTarget`]'s site. Restricted unless the
    /// request's client is a gateway key without access rules: a client with `allow` rules, an
    /// OAuth app's user and a public route's caller (no client at all) are restricted. For
    /// those, Frappe's database error text is never passed on, `expose_tracebacks` or not: it
    /// is MariaDB's message and carries data (an `extractvalue` XPATH error quotes the value
    /// it was given, a duplicate key its value), a channel around the access rules.
    pub(crate) fn of<B>(request: &Request<B>) -> Self {
        let target = request.extensions().get::<RouteTarget>();
        let full_access = request
            .extensions()
            .get::<Arc<Client>>()
            .is_some_and(|c| c.rules.is_none())
            && request.extensions().get::<OAuthUser>().is_none();
        let request_id = request
            .headers()
            .get(&X_REQUEST_ID)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("unknown"));
        Self {
            expose_tracebacks: target.is_some_and(|t| t.site.expose_tracebacks),
            streaming: target.is_some_and(|t| t.streaming),
            restricted: !full_access,
            request_id,
            api: request
                .extensions()
                .get::<FrappeRequest>()
                .and_then(|c| c.api),
        }
    }
}

/// Cleans an upstream response for its `audience`; `keep_cookies` only on a public route's
/// answer (the OAuth sign-in flow needs its session).
///
/// JSON error answers (4xx, 5xx) have their tracebacks cut to one line unless the site exposes
/// them; for a restricted reader the text of a database error is replaced by a fixed line with
/// the request id (the original is logged at `debug` under it), and JSON success answers up to
/// [`MAX_ERROR_BODY`] are looked at too, for tracebacks in `message` (a larger or streamed
/// one passes as it is).
pub(crate) async fn clean_response(
    mut response: Response<Body>,
    audience: Audience,
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
    let is_error = status.is_client_error() || status.is_server_error();
    // The request id layer writes ids of printable ASCII only.
    let request_id = audience.request_id.to_str().unwrap_or("unknown");
    let restricted = audience.restricted.then_some(request_id);
    if is_error && !is_json {
        return replace_error_page(response, &audience).await;
    }
    let look = match (is_error, restricted) {
        _ if !is_json => false,
        (true, None) => !audience.expose_tracebacks,
        (true, Some(_)) => true,
        (false, Some(_)) => status.is_success() && !audience.streaming,
        (false, None) => false,
    };
    if !look {
        return Ok(response);
    }
    let (mut parts, body) = response.into_parts();
    let bytes = if is_error {
        match Limited::new(body, MAX_ERROR_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                tracing::warn!(error = %e, "upstream error body unreadable or too large to clean");
                return Err(GatewayError::BadGateway {
                    site: "upstream".into(),
                }
                .into());
            }
        }
    } else {
        match read_up_to(body, MAX_ERROR_BODY).await? {
            Ok(bytes) => bytes,
            Err(whole) => return Ok(Response::from_parts(parts, whole)),
        }
    };
    // A success answer is parsed only when it holds a traceback or the site's SQL log at all.
    let worth_parsing = contains(&bytes, b"Traceback (most recent call last)")
        || contains(&bytes, b"\"_debug_messages\"")
        || contains(&bytes, b"\"debug\"");
    if !is_error && !worth_parsing {
        return Ok(Response::from_parts(parts, full_body(bytes)));
    }
    let how = Scrub {
        tracebacks: !audience.expose_tracebacks,
        database_text: restricted,
    };
    let bytes = match scrub(&bytes, how) {
        Some(scrubbed) => {
            for original in &scrubbed.withheld {
                tracing::debug!(
                    request_id = restricted.unwrap_or_default(),
                    original = %original,
                    "database error text withheld from a restricted client"
                );
            }
            scrubbed.body
        }
        None => bytes,
    };
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Ok(Response::from_parts(parts, full_body(bytes)))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

/// An error Frappe answered with a web page rather than JSON: `app.py` `handle_exception` does
/// so when the request's `Accept` asks for text (`text/html` on an `/api/` path included), and
/// for every status but 401, 403, 404 and 429 (a 417 `DataError`, a 409 duplicate, a 500) the
/// "Server Error" page holds the escaped traceback whenever the System Settings'
/// `allow_error_traceback` is on (the default) — database error text with it. For a restricted
/// reader such a page is always replaced by erpgate's own envelope (same status, a fixed line
/// naming the request id; the page is logged at `debug`); for anyone else only when it holds a
/// traceback and the site does not expose them. Pages without a traceback pass to full-access
/// clients as they are.
async fn replace_error_page(
    response: Response<Body>,
    audience: &Audience,
) -> Result<Response<Body>, BoxError> {
    if !audience.restricted && audience.expose_tracebacks {
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    // A page too large to look at is replaced whole (it cannot be shown to hold nothing).
    let page = read_up_to(body, MAX_ERROR_BODY).await?.ok();
    let traceback = page
        .as_deref()
        .is_some_and(|p| contains(p, b"Traceback (most recent call last)"));
    if !audience.restricted && !traceback {
        if let Some(page) = page {
            return Ok(Response::from_parts(parts, full_body(page)));
        }
    }
    let request_id = audience.request_id.to_str().unwrap_or("unknown");
    tracing::debug!(
        request_id = %request_id,
        page = %page.as_deref().map(String::from_utf8_lossy).unwrap_or_default(),
        "upstream error page replaced"
    );
    let what = if parts.status.is_server_error() {
        "the site failed to answer this request"
    } else {
        "the site refused this request"
    };
    let message = format!("{what}; see the gateway log for request {request_id}");
    let exc_type = exc_type_of_status(parts.status);
    let body = error_body(audience.api, exc_type, &message, request_id);
    let mut response = Response::from_parts(parts, full_body(body.clone()));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.remove(header::CONTENT_ENCODING);
    Ok(response)
}

/// The whole of `body` when it is at most `limit` bytes (`Ok(Ok)`); else a body that gives
/// what was read and then the rest (`Ok(Err)`), nothing lost.
async fn read_up_to(mut body: Body, limit: usize) -> Result<Result<Bytes, Body>, BoxError> {
    // The usual answer comes as one frame and is kept as it came, uncopied.
    let mut read = JoinedFrames::default();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(data) => read.push(data),
            // Trailers: a body Frappe does not send; pass it on as it is.
            Err(frame) => {
                let head = futures_util::stream::iter([
                    Ok::<_, BoxError>(http_body::Frame::data(read.take())),
                    Ok(frame),
                ]);
                let rest = head.chain(http_body_util::BodyStream::new(body));
                return Ok(Err(Body::new(http_body_util::StreamBody::new(rest))));
            }
        }
        if read.len() > limit {
            let head = futures_util::stream::iter([Ok::<_, BoxError>(http_body::Frame::data(
                read.take(),
            ))]);
            let rest = head.chain(http_body_util::BodyStream::new(body));
            return Ok(Err(Body::new(http_body_util::StreamBody::new(rest))));
        }
    }
    Ok(Ok(read.take()))
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
        let audience = Audience::of(&request);
        self.sign(&mut request, &target);
        let future = self.inner.call(request);
        Box::pin(async move { clean_response(future.await?, audience, false).await })
    }
}
