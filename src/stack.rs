//! THE place the request path is assembled: configuration in, one Tower service out, with the
//! layers in request order and the reason for each position next to it.
//!
//! ```text
//! client ─► request id ─► observe ─► error edge ─► body limit ─► authenticate ─► route
//!        ─► classify + authorize ─► credential swap ─► forward (pooled client) ─► Frappe site
//! ```

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use http::{HeaderValue, Request, Response};
use tower::util::BoxCloneService;
use tower::ServiceBuilder;

use crate::config::{Config, LoadedConfig};
use crate::forwarding::TrustedProxies;
use crate::frappe::acl::parse_operations;
use crate::frappe::auth_header::token_header;
use crate::frappe::{AccessRules, CanonicalPath};
use crate::layers::auth::{AuthFailureLimiter, AuthLayer, Client, ClientTable};
use crate::layers::authorize::AuthorizeLayer;
use crate::layers::body_limit::BodyLimitLayer;
use crate::layers::classify::ClassifyLayer;
use crate::layers::credential_swap::CredentialSwapLayer;
use crate::layers::error_response::ErrorResponseLayer;
use crate::layers::forward::Forward;
use crate::layers::observe::ObserveLayer;
use crate::layers::request_id::RequestIdLayer;
use crate::layers::route::RouteLayer;
use crate::metrics::Metrics;
use crate::routing::{Route, Router, ServiceAccount, Site};
use crate::upstream::{Upstream, UpstreamBuildError};
use crate::{Body, BoxError};

/// The assembled request path.
pub type GatewayService = BoxCloneService<Request<Body>, Response<Body>, BoxError>;

/// Why the stack could not be built from a validated config.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("site {site}: {source}")]
    Upstream {
        site: String,
        source: UpstreamBuildError,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Everything built from one config.
pub struct Gateway {
    /// The request path.
    pub service: GatewayService,
    /// Sites and routes.
    pub router: Arc<Router>,
}

/// Builds the gateway from a validated config.
pub fn build(loaded: &LoadedConfig, metrics: &Metrics) -> Result<Gateway, BuildError> {
    let config = &loaded.config;
    let router = Arc::new(build_router(loaded, metrics)?);
    let clients = Arc::new(build_clients(config)?);
    let trusted = TrustedProxies::new(config.trusted_proxies.iter().map(|p| p.0).collect());
    let one = NonZeroU32::MIN;
    let failures = Arc::new(AuthFailureLimiter::new(
        NonZeroU32::new(config.auth_failures.per_minute).unwrap_or(one),
        NonZeroU32::new(config.auth_failures.burst).unwrap_or(one),
    ));
    let max_body = config.limits.max_body_bytes.0;

    let service = ServiceBuilder::new()
        // Outermost: every log line, error envelope and upstream request carries the same id.
        .layer(RequestIdLayer)
        // Outside everything that can refuse, so refusals are counted and logged too.
        .layer(ObserveLayer::new(metrics.clone()))
        // The edge: errors from any layer below become one Frappe-envelope response, here only.
        .layer(ErrorResponseLayer::new(max_body))
        // Before any work is spent on an oversized request.
        .layer(BodyLimitLayer::new(max_body))
        // Identity first: routing, access rules and per-client limits all need the client.
        .layer(AuthLayer::new(
            clients,
            failures,
            trusted.clone(),
            metrics.auth_failures.clone(),
        ))
        // Before classification: the canonical, prefix-stripped path is what Frappe will see,
        // so it is what the rules must judge.
        .layer(RouteLayer::new(router.clone()))
        // What the request does to Frappe: the limits, rules and retries below all ask.
        .layer(ClassifyLayer::new(config.limits.max_inspected_body_bytes.0))
        // Whether this client may do it; 403 before anything is sent.
        .layer(AuthorizeLayer)
        // Last before the network: no layer above ever holds an ERPNext secret.
        .layer(CredentialSwapLayer::new(trusted))
        .service(Forward);
    Ok(Gateway {
        service: BoxCloneService::new(service),
        router,
    })
}

fn header(value: &str, what: &str) -> Result<HeaderValue, BuildError> {
    HeaderValue::try_from(value)
        .map_err(|_| BuildError::Invalid(format!("{what} is not a valid header value")))
}

fn build_router(loaded: &LoadedConfig, metrics: &Metrics) -> Result<Router, BuildError> {
    let config = &loaded.config;
    let mut sites = HashMap::new();
    for (name, site) in &config.sites {
        let mut accounts = HashMap::new();
        for (account, creds) in &site.service_accounts {
            let secret = loaded
                .secrets
                .get(&(name.clone(), account.clone()))
                .ok_or_else(|| {
                    BuildError::Invalid(format!(
                        "sites.{name}.service_accounts.{account}: no secret"
                    ))
                })?;
            let authorization = token_header(&creds.api_key.0, &secret.0).map_err(|_| {
                BuildError::Invalid(format!(
                    "sites.{name}.service_accounts.{account}: invalid credentials"
                ))
            })?;
            accounts.insert(
                account.clone(),
                ServiceAccount {
                    name: account.as_str().into(),
                    authorization,
                },
            );
        }
        let site_name = &site.site_name.0;
        let host = site.host.as_ref().map_or(site_name, |h| &h.0);
        let backends: Vec<_> = site.backends.iter().map(|b| b.0.clone()).collect();
        let upstream = Upstream::new(
            name.as_str().into(),
            &backends,
            site.timeouts.connect,
            site.timeouts.request,
            site.ca_file.as_deref(),
            metrics.upstream_duration.with_label_values(&[name]),
        )
        .map_err(|source| BuildError::Upstream {
            site: name.clone(),
            source,
        })?;
        let built = Site {
            name: name.as_str().into(),
            site_name: header(site_name, "site_name")?,
            host: header(host, "host")?,
            accounts,
            expose_tracebacks: site.expose_tracebacks,
            upstream,
        };
        sites.insert(name.clone(), Arc::new(built));
    }
    let mut routes = Vec::new();
    for route in &config.routes {
        let site = sites
            .get(&route.site)
            .ok_or_else(|| BuildError::Invalid(format!("route to unknown site {}", route.site)))?
            .clone();
        let path_prefix = match &route.path_prefix {
            Some(p) => Some(
                CanonicalPath::parse(p)
                    .map_err(|e| BuildError::Invalid(format!("path_prefix {p}: {e}")))?,
            ),
            None => None,
        };
        routes.push(Route {
            host: route.host.as_ref().map(|h| h.to_ascii_lowercase()),
            path_prefix,
            strip_prefix: route.strip_prefix,
            site,
        });
    }
    Ok(Router::new(sites, routes))
}

fn build_clients(config: &Config) -> Result<ClientTable, BuildError> {
    let mut table = Vec::new();
    for (name, client) in &config.clients {
        let mut secret_sha256 = [0u8; 32];
        hex::decode_to_slice(&client.secret_sha256.0, &mut secret_sha256).map_err(|_| {
            BuildError::Invalid(format!("clients.{name}.secret_sha256 is not 64 hex digits"))
        })?;
        let rules = match &client.allow {
            None => None,
            Some(allow) => {
                let mut rules = AccessRules::default();
                for (doctype, ops) in &allow.resources {
                    for op in ops {
                        let ops =
                            parse_operations(op).map_err(|e| BuildError::Invalid(e.to_string()))?;
                        rules.allow_resource(doctype, ops);
                    }
                }
                for method in &allow.methods {
                    rules.allow_method(method);
                }
                rules.allow_files(allow.files);
                rules.allow_other(allow.other);
                Some(rules)
            }
        };
        table.push((
            client.key_id.clone(),
            Client {
                name: name.as_str().into(),
                secret_sha256,
                site: client.site.clone(),
                service_account: client.service_account.clone(),
                extra_sites: client
                    .extra_sites
                    .iter()
                    .map(|(s, a)| (s.clone(), a.clone()))
                    .collect(),
                rules,
            },
        ));
    }
    Ok(ClientTable::new(table))
}
