//! Per-site state, below both the router and the layers: the site itself, its service
//! accounts, its breaker state and its retry settings. Routing picks a [`Site`]; the layers read
//! its state; neither depends on the other.

pub mod breaker;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};

use crate::error::{find_cause, GatewayError};
use crate::{Body, BoxError};
use breaker::{Admission, Outcome};
use tower::retry::budget::TpsBudget;

use crate::upstream::Upstream;

/// An ERPNext user the gateway signs requests as, on one site.
#[derive(Clone)]
pub struct ServiceAccount {
    /// The account's configured name (in logs, never the key).
    pub name: Arc<str>,
    /// `token api_key:api_secret`, marked sensitive.
    pub authorization: HeaderValue,
    /// Who Frappe answers as: a hash of the site's `site_name`, `host` and backends and this
    /// account's API key. Cached answers are keyed by it, not by the names, which an operator
    /// may keep while changing what they point at.
    pub identity: [u8; 32],
}

/// A hash of `parts`, each length-prefixed so no two lists hash alike.
pub fn identity_of(parts: &[&[u8]]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// One Frappe site and how to reach it.
#[derive(Debug)]
pub struct Site {
    /// The configured name (in logs and metrics).
    pub name: Arc<str>,
    /// Sent as `X-Frappe-Site-Name`, always overwriting the client's.
    pub site_name: HeaderValue,
    /// Sent as `Host`.
    pub host: HeaderValue,
    /// Service accounts by configured name.
    pub accounts: HashMap<String, ServiceAccount>,
    /// Pass Python tracebacks through to clients.
    pub expose_tracebacks: bool,
    /// The pooled client and backends.
    pub upstream: Upstream,
    /// The circuit breaker, unless turned off.
    pub breaker: Option<breaker::Breaker>,
    /// Retry settings and budget.
    pub retry: RetrySettings,
    /// Canonical names of methods that only read (safe to retry, not writes).
    pub read_only_methods: std::collections::HashSet<String>,
    /// The deadline for the whole exchange, retries included.
    pub total_timeout: std::time::Duration,
}

/// A site's retry settings and budget.
#[derive(Debug)]
pub struct RetrySettings {
    /// Most retries per request.
    pub max_retries: u32,
    /// First backoff (doubling, full jitter).
    pub backoff_base: Duration,
    /// Backoff cap.
    pub backoff_max: Duration,
    /// Longest upstream `Retry-After` waited for.
    pub max_retry_after: Duration,
    /// Largest held body that may be sent again.
    pub max_body_bytes: u64,
    /// Shared by all requests to the site.
    pub budget: TpsBudget,
}

// === the breaker around a call to the site ===

impl Site {
    /// Runs `call` (a request to this site) through its breaker: refused at once with 503
    /// `UpstreamUnavailable` while the breaker is open, without calling it; its outcome recorded
    /// otherwise. The breaker layer does this for routed requests, and the gateway's own calls to
    /// a site (token introspection) do it without being routed.
    pub fn through_breaker<F>(
        self: &Arc<Self>,
        call: impl FnOnce() -> F,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>
    where
        F: Future<Output = Result<Response<Body>, BoxError>> + Send + 'static,
    {
        let Some(breaker) = &self.breaker else {
            return Box::pin(call());
        };
        let guard = match breaker.admit() {
            None => {
                let err = GatewayError::BreakerOpen {
                    site: self.name.to_string(),
                    retry_after: breaker.retry_after(),
                };
                return Box::pin(async move { Err(err.into()) });
            }
            Some(Admission::Probe) => Some(ProbeGuard(self.clone())),
            Some(Admission::Normal) => None,
        };
        let future = call();
        let site = self.clone();
        Box::pin(async move {
            let result = future.await;
            if let Some(breaker) = &site.breaker {
                breaker.record(outcome(&result));
            }
            drop(guard);
            result
        })
    }
}

/// Releases the probe slot however the probe ends, even if its future is dropped.
struct ProbeGuard(Arc<Site>);

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if let Some(breaker) = &self.0.breaker {
            breaker.release_probe();
        }
    }
}

/// What a call's result says about the site: connect errors, timeouts, broken connections and
/// 502/503/504 answers are failures; anything else shows the site alive.
fn outcome(result: &Result<Response<Body>, BoxError>) -> Outcome {
    match result {
        Ok(response) => match response.status() {
            StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => Outcome::Failure,
            _ => Outcome::Success,
        },
        Err(e) => match find_cause::<GatewayError>(e.as_ref()) {
            Some(
                GatewayError::UpstreamUnreachable { .. }
                | GatewayError::UpstreamTimeout { .. }
                | GatewayError::BadGateway { .. },
            ) => Outcome::Failure,
            // A client's own body errors say nothing about the site.
            _ => Outcome::Neither,
        },
    }
}
