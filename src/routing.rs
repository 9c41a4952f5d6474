//! Sites and routes: which Frappe site a request goes to, and as which service account.
//!
//! Routes are tried in order (host, path prefix, or both; first match wins); a request no route
//! matches goes to its client's own site. Routing works on the canonical path, so a prefix is
//! matched on whole, decoded segments and stripping it leaves exactly what Frappe will see.

use std::collections::HashMap;
use std::sync::Arc;

use crate::frappe::CanonicalPath;
use crate::site::Site;

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
            None => self
                .sites
                .get(default_site)
                .map(|site| (site.clone(), false)),
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
