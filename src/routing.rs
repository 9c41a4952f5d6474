//! Sites and routes: which Frappe site a request goes to, and as which service account.
//!
//! Routes are tried in order (host, path prefix, or both; first match wins); a request no route
//! matches goes to its client's own site. Routing works on the canonical path, so a prefix is
//! matched on whole, decoded segments and stripping it leaves exactly what Frappe will see.

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderValue;

use crate::frappe::CanonicalPath;
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
    pub breaker: Option<crate::layers::breaker::Breaker>,
    /// Retry settings and budget.
    pub retry: crate::layers::retry::RetrySettings,
    /// Canonical names of methods that only read (safe to retry, not writes).
    pub read_only_methods: std::collections::HashSet<String>,
    /// The deadline for the whole exchange, retries included.
    pub total_timeout: std::time::Duration,
}

/// One route.
#[derive(Debug)]
pub struct Route {
    /// Lower-cased host without port.
    pub host: Option<String>,
    /// Canonical path prefix.
    pub path_prefix: Option<CanonicalPath>,
    /// Remove the prefix before forwarding.
    pub strip_prefix: bool,
    /// Stream bodies instead of buffering them.
    pub streaming: bool,
    /// Where matching requests go.
    pub site: Arc<Site>,
}

/// All sites and routes.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
    sites: HashMap<String, Arc<Site>>,
}

impl Router {
    /// A router over `sites` with `routes` in order.
    pub fn new(sites: HashMap<String, Arc<Site>>, routes: Vec<Route>) -> Self {
        Self { routes, sites }
    }

    /// A site by configured name.
    pub fn site(&self, name: &str) -> Option<&Arc<Site>> {
        self.sites.get(name)
    }

    /// All sites.
    pub fn sites(&self) -> impl Iterator<Item = &Arc<Site>> {
        self.sites.values()
    }

    /// Picks the site for a request, stripping a matched prefix from `path` when the route says
    /// so, and whether its bodies stream. `host` is the request's host (port allowed);
    /// `default_site` the client's own (buffered).
    pub fn route(
        &self,
        host: Option<&str>,
        path: &mut CanonicalPath,
        default_site: &str,
    ) -> Option<(Arc<Site>, bool)> {
        let host = host.map(strip_port);
        let matched = self.routes.iter().find(|route| {
            let host_ok = match (&route.host, host) {
                (None, _) => true,
                (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                (Some(_), None) => false,
            };
            let path_ok = route
                .path_prefix
                .as_ref()
                .is_none_or(|p| path.starts_with(p));
            host_ok && path_ok
        });
        match matched {
            Some(route) => {
                if let (true, Some(prefix)) = (route.strip_prefix, &route.path_prefix) {
                    path.strip_prefix(prefix);
                }
                Some((route.site.clone(), route.streaming))
            }
            None => self.sites.get(default_site).map(|site| (site.clone(), false)),
        }
    }
}

/// `host:port` → `host`, also for `[v6]:port`.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// A route target on a site on an unused local port with no breaker, for layer unit tests.
#[cfg(test)]
pub(crate) fn test_target(
    retry: crate::layers::retry::RetrySettings,
    total_timeout: std::time::Duration,
) -> crate::layers::route::RouteTarget {
    use std::time::Duration;
    let histogram = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("h", "h"))
        .expect("valid histogram");
    let backend: http::Uri = "http://127.0.0.1:9".parse().expect("valid uri");
    let upstream = Upstream::new(
        1,
        "erp".into(),
        &[backend],
        Duration::from_secs(1),
        Duration::from_secs(1),
        None,
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
    crate::layers::route::RouteTarget {
        site,
        streaming: false,
        account: ServiceAccount {
            name: "sync".into(),
            authorization: HeaderValue::from_static("token key:secret"),
            identity: identity_of(&[b"test", b"key"]),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("erp.example.com:8080"), "erp.example.com");
        assert_eq!(strip_port("erp.example.com"), "erp.example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}
