//! Sites and routes: which Frappe site a request goes to, and as which service account.
//!
//! Routes are tried in order (host, path prefix, the methods the request runs; first match
//! wins); a request no route matches goes to its client's own site. Routing works on the
//! canonical path, so a prefix is matched on whole, decoded segments and stripping it leaves
//! exactly what Frappe will see.
//!
//! What a request runs is known only once it is classified, which needs its routed path and
//! its body: so a route with `methods` is only a candidate here, decided after classification
//! (`layers::method_route`). Such a route never strips a prefix, and no route after one does
//! (configuration refuses both), so the path classified is the path forwarded whichever
//! candidate wins.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::frappe::{CanonicalPath, MethodSet};
use crate::site::Site;

/// A route's own timeouts and retries, in place of its site's. Set when the route sets
/// `timeouts` or `retry`; missing values are the site's, except retries, which a route with
/// timeouts turns off unless it sets them: a long report cut by its timeout is not run again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteTimeouts {
    /// One attempt, to the response head (and each wait for more of a streamed body).
    pub request: Duration,
    /// All attempts and backoffs.
    pub total: Duration,
    /// Most retries per request.
    pub max_retries: u32,
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
    /// Matches only requests that run one of these (decided once classified).
    pub methods: Option<MethodSet>,
    /// The route's own timeouts and retries, if it sets any.
    pub timeouts: Option<RouteTimeouts>,
    /// Where matching requests go.
    pub site: Arc<Site>,
}

impl Route {
    /// Whether `host` (port stripped) and `path` match.
    fn matches(&self, host: Option<&str>, path: &CanonicalPath) -> bool {
        let host_ok = match (&self.host, host) {
            (None, _) => true,
            (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
            (Some(_), None) => false,
        };
        host_ok
            && self
                .path_prefix
                .as_ref()
                .is_none_or(|p| path.starts_with(p))
    }
}

/// Where a request goes, as far as its host and path tell.
#[derive(Debug)]
pub struct Routed {
    /// The first matching route without `methods` (or the client's own site).
    pub site: Arc<Site>,
    /// Its bodies stream.
    pub streaming: bool,
    /// Its own timeouts, if any.
    pub timeouts: Option<RouteTimeouts>,
    /// Routes with `methods` before it whose host and path match, in order (indices for
    /// [`Router::candidate`]): the first whose methods the request runs wins over it.
    pub candidates: Vec<usize>,
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
    /// so, and whether its bodies stream, with the method routes still to be decided. `host` is
    /// the request's host (port allowed); `default_site` the client's own (buffered).
    pub fn route(
        &self,
        host: Option<&str>,
        path: &mut CanonicalPath,
        default_site: &str,
    ) -> Option<Routed> {
        let host = host.map(strip_port);
        // No allocation unless a method route matches.
        let mut candidates = Vec::new();
        for (index, route) in self.routes.iter().enumerate() {
            if !route.matches(host, path) {
                continue;
            }
            if route.methods.is_some() {
                candidates.push(index);
                continue;
            }
            if let (true, Some(prefix)) = (route.strip_prefix, &route.path_prefix) {
                path.strip_prefix(prefix);
            }
            return Some(Routed {
                site: route.site.clone(),
                streaming: route.streaming,
                timeouts: route.timeouts,
                candidates,
            });
        }
        self.sites.get(default_site).map(|site| Routed {
            site: site.clone(),
            streaming: false,
            timeouts: None,
            candidates,
        })
    }

    /// The route at `index` (from [`Routed::candidates`]).
    pub fn candidate(&self, index: usize) -> Option<&Route> {
        self.routes.get(index)
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
