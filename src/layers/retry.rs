//! Retries, as a `tower::retry::Policy`.
//!
//! What is retried: any request that provably never reached the site (every backend refused
//! the connection, or the connect timed out); and, when sending it again cannot change data, a
//! GET, HEAD or call of a read-only method (by name, the site's `retry.read_only_methods`)
//! also after a timeout, a broken connection or a 502/503/504. Never a write that may have
//! reached Frappe; never a 429 (Frappe's own limiter is not retried into); never past an open
//! breaker. Backoff is exponential with full jitter; an upstream `Retry-After` is honoured up
//! to `max_retry_after` (longer: not retried). A per-site budget (tower's `TpsBudget`: a
//! percentage of recent requests plus a small floor) keeps retries from multiplying an outage.
//! Only bodies the gateway already holds (up to `max_body_bytes`) or empty ones can be sent
//! again; streamed uploads are never retried.
//!
//! How many retries: the site's `retry.max_retries`, or its route's own; a route with its own
//! timeouts has none unless it sets them (a two-minute report cut at its timeout is not run
//! again).
//!
//! Outside the breaker, so every attempt is counted by it and an open breaker ends the retries;
//! inside the overall deadline, which bounds all attempts together.

use std::collections::HashSet;
use std::time::Duration;

use http::{header, Method, Request, Response, StatusCode};
use http_body::Body as _;
use prometheus::IntCounterVec;
use tower::retry::budget::Budget;
use tower::retry::Policy;

use crate::error::{find_cause, GatewayError};
use crate::frappe::{FrappeRequest, RequestKind};
use crate::layers::route::RouteTarget;
pub use crate::site::RetrySettings;
use crate::upstream::ReplayableBody;
use crate::{empty_body, full_body, Body, BoxError};

/// Why a request is retried (the `reason` label of `erpgate_retries_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Connect,
    Timeout,
    Reset,
    Status,
}

impl Reason {
    fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
            Self::Status => "status",
        }
    }
}

/// True when sending the request again cannot change data.
fn safe_to_repeat(
    method: &Method,
    classified: Option<&FrappeRequest>,
    read_only: &HashSet<String>,
) -> bool {
    if method == Method::GET || method == Method::HEAD {
        return true;
    }
    matches!(classified, Some(FrappeRequest { kind: RequestKind::Method(m), embedded_methods, .. })
        if read_only.contains(m.as_str()) && embedded_methods.iter().all(|e| read_only.contains(e.as_str())))
}

/// Whether (and why) a result may be retried, and the upstream's `Retry-After`.
fn retryable(result: &Result<Response<Body>, BoxError>, safe: bool) -> Option<(Reason, Duration)> {
    match result {
        Err(e) => match find_cause::<GatewayError>(e.as_ref())? {
            GatewayError::UpstreamUnreachable { .. } => Some((Reason::Connect, Duration::ZERO)),
            GatewayError::UpstreamTimeout { .. } if safe => Some((Reason::Timeout, Duration::ZERO)),
            GatewayError::BadGateway { .. } if safe => Some((Reason::Reset, Duration::ZERO)),
            _ => None,
        },
        Ok(response) => match response.status() {
            StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
                if safe =>
            {
                let after = response
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map_or(Duration::ZERO, Duration::from_secs);
                Some((Reason::Status, after))
            }
            _ => None,
        },
    }
}

/// Exponential backoff with full jitter: uniform in `[0, min(max, base * 2^retry))`.
fn jittered_backoff(base: Duration, max: Duration, retry: u32) -> Duration {
    let ceiling = base
        .saturating_mul(1u32.checked_shl(retry).unwrap_or(u32::MAX))
        .min(max);
    ceiling.mul_f64(rand::random::<f64>())
}

/// Copies the per-connection facts the credential swap reads (peer address, TLS), the held
/// body and the request's trace span and tags into a retry's copy.
fn for_each_forwarded_extension(from: &http::Extensions, to: &mut http::Extensions) {
    if let Some(peer) = from.get::<crate::forwarding::PeerAddr>() {
        to.insert(*peer);
    }
    if let Some(tls) = from.get::<crate::forwarding::ArrivedOverTls>() {
        to.insert(*tls);
    }
    if let Some(body) = from.get::<ReplayableBody>() {
        to.insert(body.clone());
    }
    // Each attempt is traced under the request's span and counted in its tags.
    if let Some(span) = from.get::<crate::layers::server_span::ServerSpan>() {
        to.insert(span.clone());
    }
    if let Some(tags) = from.get::<std::sync::Arc<crate::tags::RequestTags>>() {
        to.insert(tags.clone());
    }
}

/// The retry policy; tower clones it per request, so `attempts` counts this request's retries.
#[derive(Clone)]
pub struct RetryPolicy {
    attempts: u32,
    /// Set on the first `clone_request`, which sees the original request.
    deposited: bool,
    /// Whether sending it again cannot change data, judged from the original request (the
    /// copies kept for retries carry only what the layers below need).
    safe: bool,
    retries: IntCounterVec,
}

impl RetryPolicy {
    /// Counts retries in `retries{site,reason}`.
    pub fn new(retries: IntCounterVec) -> Self {
        Self {
            attempts: 0,
            deposited: false,
            safe: false,
            retries,
        }
    }
}

impl Policy<Request<Body>, Response<Body>, BoxError> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        request: &mut Request<Body>,
        result: &mut Result<Response<Body>, BoxError>,
    ) -> Option<Self::Future> {
        let target = request.extensions().get::<RouteTarget>()?;
        let (site, max_retries) = (&target.site, target.max_retries());
        let settings = &site.retry;
        if self.attempts >= max_retries {
            return None;
        }
        let (reason, retry_after) = retryable(result, self.safe)?;
        if retry_after > settings.max_retry_after {
            return None;
        }
        if !settings.budget.withdraw() {
            self.retries
                .with_label_values(&[&site.name, "budget_exhausted"])
                .inc();
            return None;
        }
        let delay = jittered_backoff(settings.backoff_base, settings.backoff_max, self.attempts)
            .max(retry_after);
        self.attempts += 1;
        self.retries
            .with_label_values(&[&site.name, reason.label()])
            .inc();
        tracing::debug!(site = %site.name, reason = reason.label(), attempt = self.attempts, ?delay, "retrying");
        Some(tokio::time::sleep(delay))
    }

    fn clone_request(&mut self, request: &Request<Body>) -> Option<Request<Body>> {
        let target = request.extensions().get::<RouteTarget>()?;
        let site = &target.site;
        let settings = &site.retry;
        if !self.deposited {
            settings.budget.deposit();
            self.deposited = true;
            self.safe = safe_to_repeat(
                request.method(),
                request.extensions().get::<FrappeRequest>(),
                &site.read_only_methods,
            );
        }
        // A route's own retries (none on a route with its own timeouts) over the site's.
        if self.attempts >= target.max_retries() {
            return None;
        }
        let body = match request.extensions().get::<ReplayableBody>() {
            Some(ReplayableBody(bytes)) if bytes.len() as u64 <= settings.max_body_bytes => {
                full_body(bytes.clone())
            }
            Some(_) => return None,
            None if request.body().is_end_stream() => empty_body(),
            None => return None,
        };
        let mut copy = Request::new(body);
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        // Only what the layers below read: cloning every extension (the classified request,
        // the client, ...) would cost allocations on every request, retried or not.
        copy.extensions_mut().insert(RouteTarget::clone(
            request.extensions().get::<RouteTarget>()?,
        ));
        for_each_forwarded_extension(request.extensions(), copy.extensions_mut());
        Some(copy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frappe::form_dict::FormDict;
    use crate::frappe::CanonicalPath;

    fn err(e: GatewayError) -> Result<Response<Body>, BoxError> {
        Err(e.into())
    }

    fn status(code: u16, retry_after: Option<&str>) -> Result<Response<Body>, BoxError> {
        let mut r = Response::new(empty_body());
        *r.status_mut() = StatusCode::from_u16(code).unwrap();
        if let Some(a) = retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, a.parse().unwrap());
        }
        Ok(r)
    }

    #[test]
    fn what_is_retried() {
        let unreachable = || err(GatewayError::UpstreamUnreachable { site: "s".into() });
        let timeout = || {
            err(GatewayError::UpstreamTimeout {
                site: "s".into(),
                timeout: Duration::from_secs(1),
            })
        };
        let reset = || err(GatewayError::BadGateway { site: "s".into() });
        let open = || {
            err(GatewayError::BreakerOpen {
                site: "s".into(),
                retry_after: Duration::from_secs(1),
            })
        };
        // Never reached the site: always.
        assert_eq!(
            retryable(&unreachable(), false).map(|r| r.0),
            Some(Reason::Connect)
        );
        // May have reached it: only when safe to repeat.
        assert_eq!(
            retryable(&timeout(), true).map(|r| r.0),
            Some(Reason::Timeout)
        );
        assert_eq!(retryable(&timeout(), false), None);
        assert_eq!(retryable(&reset(), false), None);
        assert_eq!(retryable(&status(503, None), false), None);
        assert_eq!(
            retryable(&status(503, Some("1")), true),
            Some((Reason::Status, Duration::from_secs(1)))
        );
        // Never: Frappe's own 429, client errors, an open breaker.
        assert_eq!(retryable(&status(429, Some("1")), true), None);
        assert_eq!(retryable(&status(417, None), true), None);
        assert_eq!(retryable(&open(), true), None);
    }

    #[test]
    fn read_only_methods_are_safe_whatever_the_verb() {
        let read_only: HashSet<String> =
            ["frappe.client.get_list".to_owned()].into_iter().collect();
        let classify = |m: &Method, p: &str| {
            FrappeRequest::classify(m, &CanonicalPath::parse(p).unwrap(), &FormDict::default())
        };
        let post = Method::POST;
        assert!(safe_to_repeat(
            &post,
            Some(&classify(&post, "/api/method/frappe.client.get_list")),
            &read_only
        ));
        assert!(!safe_to_repeat(
            &post,
            Some(&classify(&post, "/api/method/frappe.client.insert")),
            &read_only
        ));
        assert!(!safe_to_repeat(
            &post,
            Some(&classify(&post, "/api/resource/ToDo")),
            &read_only
        ));
        assert!(safe_to_repeat(&Method::GET, None, &read_only));
    }

    /// A retry stack over a scripted site; returns the answer, the attempts made and the
    /// (paused) time taken.
    async fn run_script(
        settings: RetrySettings,
        script: Vec<(u16, Option<&'static str>)>,
    ) -> (StatusCode, usize, Duration) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use tower::{ServiceBuilder, ServiceExt};

        let target = crate::layers::route::test_target(settings, Duration::from_secs(60));
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let script = Arc::new(script);
        let inner = tower::service_fn(move |_request: Request<Body>| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            let (code, after) = script[n.min(script.len() - 1)];
            async move { status(code, after) }
        });
        let retries =
            IntCounterVec::new(prometheus::Opts::new("r", "r"), &["site", "reason"]).unwrap();
        let service = ServiceBuilder::new()
            .layer(tower::retry::RetryLayer::new(RetryPolicy::new(retries)))
            .service(inner);
        let mut request = Request::new(empty_body());
        request.extensions_mut().insert(target);
        let start = tokio::time::Instant::now();
        let response = service.oneshot(request).await.unwrap();
        (
            response.status(),
            calls.load(Ordering::SeqCst),
            start.elapsed(),
        )
    }

    fn settings(max_retries: u32, base_ms: u64, max_ms: u64) -> RetrySettings {
        RetrySettings {
            max_retries,
            backoff_base: Duration::from_millis(base_ms),
            backoff_max: Duration::from_millis(max_ms),
            max_retry_after: Duration::from_secs(2),
            max_body_bytes: 1024,
            budget: tower::retry::budget::TpsBudget::new(Duration::from_secs(10), 100, 1.0),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_retry_after_is_waited_for_up_to_the_cap() {
        // 503 with Retry-After: 1, then 200: the retry waits the second (backoff is at most 100 ms).
        let (status, calls, took) =
            run_script(settings(2, 100, 100), vec![(503, Some("1")), (200, None)]).await;
        assert_eq!((status, calls), (StatusCode::OK, 2));
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_millis(1100),
            "{took:?}"
        );

        // Retry-After: 5 is over the 2 s cap: the 503 is the answer, at once.
        let (status, calls, took) =
            run_script(settings(2, 100, 100), vec![(503, Some("5")), (200, None)]).await;
        assert_eq!((status, calls), (StatusCode::SERVICE_UNAVAILABLE, 1));
        assert_eq!(took, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_to_its_cap_and_retries_stop_at_the_maximum() {
        // Ceilings 100, 200, 300, 300 ms: four retries take at most 900 ms in all.
        let (status, calls, took) = run_script(settings(4, 100, 300), vec![(502, None)]).await;
        assert_eq!((status, calls), (StatusCode::BAD_GATEWAY, 5));
        assert!(took <= Duration::from_millis(900), "{took:?}");
        // A 4xx is an answer, not a failure.
        let (status, calls, _) = run_script(settings(4, 100, 300), vec![(404, None)]).await;
        assert_eq!((status, calls), (StatusCode::NOT_FOUND, 1));
    }

    #[test]
    fn backoff_is_jittered_below_an_exponential_ceiling() {
        let (base, max) = (Duration::from_millis(50), Duration::from_millis(300));
        for retry in 0..8 {
            let ceiling = base.saturating_mul(1 << retry).min(max);
            for _ in 0..100 {
                assert!(jittered_backoff(base, max, retry) <= ceiling);
            }
        }
    }
}
