//! Per-site state, below both the router and the layers: the site itself, its service
//! accounts, its breaker state and its retry settings. Routing picks a [`Site`]; the layers read
//! its state; neither depends on the other.

pub mod breaker;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
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
