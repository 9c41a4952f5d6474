//! CORS for browser apps: a page on an allowed origin calls erpgate with a gateway key.
//!
//! Two halves, because they are decided on different facts:
//!
//! - **Preflights** (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) carry no key
//!   (the Fetch standard forbids credentials on them), so no client is known. erpgate answers
//!   them itself, 204, for an origin that *any* client allows, and never forwards them; they
//!   are bounded per source address, not per client, and counted under their own kind,
//!   `preflight`. tower-http's `Cors` writes the answer's headers.
//! - **Actual responses** carry `Access-Control-Allow-Origin` only when the *authenticated*
//!   client allows the request's `Origin`, and `Vary: Origin` whenever an `Origin` was sent.
//!   This half is written here rather than with tower-http's `Cors`, whose origin predicate runs
//!   on the request before the inner layers have authenticated it, and whose headers are lost
//!   on an error that the edge inside turns into a response. Sitting outside the error edge, this
//!   layer decorates refusals (403, 429) too, so a page can read why it was refused.
//!
//! Any `Access-Control-*` header from Frappe (its own `allow_cors` site setting) is removed:
//! with CORS on, erpgate alone decides which origins may read a response.
//!
//! Inside observation (preflights are counted and logged), outside the panic catcher and the
//! error edge (their answers are decorated like any other).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tower_http::cors::{AllowOrigin, Cors as PreflightCors, CorsLayer as PreflightLayer};

use crate::config::CorsConfig;
use crate::error::{error_response, GatewayError};
use crate::forwarding::TrustedProxies;
use crate::tags::RequestTags;
use crate::{Body, BoxError};

/// Why `origin` is not an exact origin as a browser serialises it (`scheme://host[:port]`,
/// lowercase, no path); `Ok` when it is one.
pub fn check_origin(origin: &str) -> Result<(), &'static str> {
    if origin.contains('*') {
        return Err("wildcards are not allowed; list each origin");
    }
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or("must start with https:// or http://")?;
    if rest.is_empty() {
        return Err("has no host");
    }
    if rest.contains(['/', '?', '#', '@', ' ']) {
        return Err("must be scheme://host[:port], without a path, query or user");
    }
    if origin
        .bytes()
        .any(|b| b.is_ascii_uppercase() || !b.is_ascii_graphic())
    {
        return Err("must be lowercase ASCII, as browsers send it (punycode for IDNs)");
    }
    Ok(())
}

/// Everything the layer decides with, built once per configuration.
pub struct Policy {
    /// Answers preflights for the union of every client's origins.
    preflight: PreflightLayer,
    /// Each client's allowed origins, by client name.
    by_client: HashMap<Arc<str>, HashSet<HeaderValue>>,
    allow_credentials: bool,
    exposed: Option<HeaderValue>,
    preflights: DefaultKeyedRateLimiter<IpAddr>,
    /// Preflights since the limiter last forgot idle addresses.
    since_sweep: AtomicU32,
    trusted: TrustedProxies,
    body_limit: u64,
}

/// The layer.
#[derive(Clone)]
pub struct CorsLayer {
    policy: Arc<Policy>,
}

impl CorsLayer {
    /// Built from the validated `cors` section and each client's (and OAuth app's) own
    /// `allowed_origins`, by name.
    pub fn new<'a>(
        cors: &CorsConfig,
        clients: impl Iterator<Item = (&'a String, Option<&'a Vec<String>>)>,
        trusted: TrustedProxies,
        body_limit: u64,
    ) -> Self {
        let value = |s: &str| HeaderValue::from_str(s).ok();
        let defaults: HashSet<HeaderValue> = cors
            .allowed_origins
            .iter()
            .filter_map(|o| value(o))
            .collect();
        let by_client: HashMap<Arc<str>, HashSet<HeaderValue>> = clients
            .map(|(name, client)| {
                let origins = match client {
                    Some(own) => own.iter().filter_map(|o| value(o)).collect(),
                    None => defaults.clone(),
                };
                (Arc::from(name.as_str()), origins)
            })
            .collect();
        let union: HashSet<HeaderValue> = by_client.values().flatten().cloned().collect();
        let names = |list: &[String]| -> Vec<HeaderName> {
            list.iter()
                .filter_map(|n| HeaderName::try_from(n.as_str()).ok())
                .collect()
        };
        let preflight = PreflightLayer::new()
            .allow_origin(AllowOrigin::list(union))
            .allow_methods([
                Method::GET,
                Method::HEAD,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers(names(&cors.allowed_headers))
            .allow_credentials(cors.allow_credentials)
            .max_age(cors.max_age);
        let exposed = (!cors.exposed_headers.is_empty())
            .then(|| value(&cors.exposed_headers.join(", ")))
            .flatten();
        let one = NonZeroU32::MIN;
        let quota = Quota::per_minute(NonZeroU32::new(cors.preflights_per_minute).unwrap_or(one))
            .allow_burst(NonZeroU32::new(cors.preflight_burst).unwrap_or(one));
        Self {
            policy: Arc::new(Policy {
                preflight,
                by_client,
                allow_credentials: cors.allow_credentials,
                exposed,
                preflights: RateLimiter::keyed(quota),
                since_sweep: AtomicU32::new(0),
                trusted,
                body_limit,
            }),
        }
    }
}

impl<S> Layer<S> for CorsLayer {
    type Service = Cors<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Cors {
            inner,
            preflight: self.policy.preflight.layer(NeverCalled),
            policy: self.policy.clone(),
        }
    }
}

/// The service.
#[derive(Clone)]
pub struct Cors<S> {
    inner: S,
    preflight: PreflightCors<NeverCalled>,
    policy: Arc<Policy>,
}

/// The inner service of the preflight answerer, which answers every `OPTIONS` itself.
#[derive(Debug, Clone, Copy)]
pub struct NeverCalled;

impl Service<Request<Body>> for NeverCalled {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Body>) -> Self::Future {
        std::future::ready(Err("a preflight reached the gateway's inner stack".into()))
    }
}

fn is_preflight<B>(request: &Request<B>) -> bool {
    request.method() == Method::OPTIONS
        && request.headers().contains_key(header::ORIGIN)
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

impl<S> Service<Request<Body>> for Cors<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = CorsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if is_preflight(&request) {
            if let Some(tags) = RequestTags::of(&request) {
                let _ = tags.kind.set("preflight");
            }
            let policy = &self.policy;
            // Per IPv4 address or IPv6 /64, as failed authentications are.
            let ip = policy.trusted.source_of(&request);
            // Forget idle addresses now and then, so strangers cannot grow the table forever.
            if policy.since_sweep.fetch_add(1, Ordering::Relaxed) >= 10_000 {
                policy.since_sweep.store(0, Ordering::Relaxed);
                policy.preflights.retain_recent();
            }
            if let Err(not_until) = policy.preflights.check_key(&ip) {
                use governor::clock::Clock as _;
                let retry_after =
                    not_until.wait_time_from(governor::clock::DefaultClock::default().now());
                let error: BoxError = GatewayError::TooManyRequests {
                    message: "too many CORS preflights from this address; retry later",
                    retry_after,
                }
                .into();
                return CorsFuture::Answered {
                    response: Some(error_response(&error, None, "", policy.body_limit)),
                };
            }
            return CorsFuture::Preflight {
                future: self.preflight.call(request),
            };
        }
        match request.headers().get(header::ORIGIN) {
            None => CorsFuture::Plain {
                future: self.inner.call(request),
            },
            Some(origin) => {
                let origin = origin.clone();
                let tags = RequestTags::of(&request).cloned();
                CorsFuture::Actual {
                    future: self.inner.call(request),
                    origin,
                    tags,
                    policy: self.policy.clone(),
                }
            }
        }
    }
}

pin_project! {
    /// The response future.
    #[project = Projected]
    pub enum CorsFuture<F> {
        /// Answered here (a refused preflight).
        Answered { response: Option<Response<Body>> },
        /// A preflight, answered by tower-http's `Cors`.
        Preflight {
            #[pin]
            future: tower_http::cors::ResponseFuture<std::future::Ready<Result<Response<Body>, BoxError>>>,
        },
        /// No `Origin`: not a CORS request.
        Plain { #[pin] future: F },
        /// A CORS request, decorated once answered.
        Actual {
            #[pin]
            future: F,
            origin: HeaderValue,
            tags: Option<Arc<RequestTags>>,
            policy: Arc<Policy>,
        },
    }
}

impl<F> Future for CorsFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Answered { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => Poll::Ready(Err("polled after completion".into())),
            },
            Projected::Preflight { future } => {
                let mut response = std::task::ready!(future.poll(cx))?;
                *response.status_mut() = StatusCode::NO_CONTENT;
                Poll::Ready(Ok(response))
            }
            Projected::Plain { future } => future.poll(cx),
            Projected::Actual {
                future,
                origin,
                tags,
                policy,
            } => {
                let mut response = std::task::ready!(future.poll(cx))?;
                let client = tags.as_ref().and_then(|t| t.client.get());
                let allowed = client
                    .and_then(|c| policy.by_client.get(c))
                    .is_some_and(|origins| origins.contains(origin));
                decorate(response.headers_mut(), origin, allowed, policy);
                Poll::Ready(Ok(response))
            }
        }
    }
}

/// The CORS headers of an actual response to a request from `origin`.
fn decorate(headers: &mut HeaderMap, origin: &HeaderValue, allowed: bool, policy: &Policy) {
    // Frappe's own CORS answer (its `allow_cors` setting) never reaches the browser.
    let from_frappe = |name: &HeaderName| name.as_str().starts_with("access-control-");
    if headers.keys().any(from_frappe) {
        let names: Vec<HeaderName> = headers.keys().filter(|n| from_frappe(n)).cloned().collect();
        for name in names {
            headers.remove(name);
        }
    }
    headers.append(header::VARY, HeaderValue::from_static("origin"));
    if !allowed {
        return;
    }
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    if policy.allow_credentials {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    if let Some(exposed) = &policy.exposed {
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, exposed.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_exact_serialised_origins() {
        for good in [
            "https://app.example.com",
            "http://localhost:3000",
            "https://xn--bcher-kva.example",
        ] {
            assert_eq!(check_origin(good), Ok(()), "{good}");
        }
        for bad in [
            "*",
            "https://*.example.com",
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://App.Example.com",
            "https://user@app.example.com",
            "null",
            "https://",
            "ftp://app.example.com",
        ] {
            assert!(check_origin(bad).is_err(), "{bad}");
        }
    }
}
