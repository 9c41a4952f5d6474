//! THE place the request path is assembled: configuration in, one Tower service out, with the
//! layers in request order and the reason for each position next to it.
//!
//! ```text
//! client ─► sensitive headers ─► request id ─► observe ─► [server span] ─► [CORS]
//!        ─► compression ─► catch panic ─► error edge ─► body limit ─► webhooks (cache purge,
//!           [event relay] intake) ─► [public routes] ─► authenticate (gateway keys, OAuth
//!           access tokens) ─► [event feed] ─► OpenAPI document ─► route ─► classify ─► method route ─► rate limit ─► concurrency ─► authorize ─► cache
//!        ─► idempotency ─► buffer ─► deadline ─► retry ─► circuit breaker ─► credential swap
//!        ─► [attempt span] ─► forward (pooled client) ─► site
//! ```

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use tower::util::BoxCloneSyncService;
use tower::ServiceBuilder;

use crate::config::{Config, LoadedConfig};
use crate::events::{EventRelay, Subscriber};
use crate::forwarding::TrustedProxies;
use crate::frappe::acl::parse_operations;
use crate::frappe::auth_header::token_header;
use crate::frappe::{AccessRules, CanonicalPath, MethodName, MethodSet};
use crate::layers::attempt_span::AttemptSpanLayer;
use crate::layers::auth::{AuthFailureLimiter, AuthLayer, Client, ClientTable};
use crate::layers::authorize::AuthorizeLayer;
use crate::layers::body_limit::BodyLimitLayer;
use crate::layers::breaker::BreakerLayer;
use crate::layers::buffer::{BufferLayer, BufferSettings, MemoryReader};
use crate::layers::buffer_budget::{BudgetLimits, BudgetMetrics, BufferBudget};
use crate::layers::cache::rules::{CacheRule, CacheRules, Subject};
use crate::layers::cache::{Cache, CacheLayer};
use crate::layers::classify::ClassifyLayer;
use crate::layers::compression::{CompressionLayer, Settings as CompressionSettings};
use crate::layers::concurrency::{ConcurrencyLayer, InFlight};
use crate::layers::cors::CorsLayer;
use crate::layers::credential_swap::CredentialSwapLayer;
use crate::layers::deadline::DeadlineLayer;
use crate::layers::error_response::ErrorResponseLayer;
use crate::layers::event_feed::EventFeedLayer;
use crate::layers::forward::Forward;
use crate::layers::idempotency::{IdempotencyLayer, IdempotencyStore, MemoryStore, SharedStore};
use crate::layers::method_route::MethodRouteLayer;
use crate::layers::observe::ObserveLayer;
use crate::layers::openapi::{MetadataCache, OpenApiLayer};
use crate::layers::public_routes::{PublicRoutes, PublicRoutesLayer};
use crate::layers::rate_limit::{ClientQuotas, QuotaPolicy, RateLimitLayer};
use crate::layers::request_id::RequestIdLayer;
use crate::layers::retry::RetryPolicy;
use crate::layers::route::RouteLayer;
use crate::layers::server_span::ServerSpanLayer;
use crate::layers::webhook::WebhookLayer;
use crate::metrics::Metrics;
use crate::oauth::{App, OAuthApps};
use crate::routing::{Route, RouteTimeouts, Router};
use crate::shared_state::{Listener, SharedState};
use crate::site::breaker::{Breaker, BreakerSettings};
use crate::site::{identity_of, RetrySettings, ServiceAccount, Site};
use crate::telemetry::{ExportMetrics, Telemetry};
use crate::upstream::{Upstream, UpstreamBuildError, UpstreamOptions};
use crate::{Body, BoxError};
use tower::retry::budget::TpsBudget;
use tower::retry::RetryLayer;

/// The assembled request path.
pub type GatewayService = BoxCloneSyncService<Request<Body>, Response<Body>, BoxError>;

/// Listener settings a reload changes for new connections.
#[derive(Debug, Clone, Copy)]
pub struct ServerSettings {
    /// Time a client has to send its request headers.
    pub header_read_timeout: Duration,
    /// Largest HTTP/1.1 request head, and so a connection's read buffer.
    pub max_request_head_bytes: usize,
    /// Time in-flight requests get on shutdown.
    pub shutdown_grace: Duration,
    /// Time the listener keeps accepting after SIGTERM.
    pub drain_delay: Duration,
    /// Open public connections at most, over all workers.
    pub max_connections: usize,
    /// A connection with nothing in flight for this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/2 streams per connection.
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 keep-alive ping interval.
    pub http2_keepalive_interval: Duration,
}

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
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Everything built from one config.
pub struct Gateway {
    /// The request path.
    pub service: GatewayService,
    /// Sites and routes.
    pub router: Arc<Router>,
    /// The response cache, when rules are configured.
    pub cache: Option<Arc<Cache>>,
    /// The shared state, when configured.
    pub shared_state: Option<Arc<SharedState>>,
    /// TLS for the public listener, when configured.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// `/readyz` follows the breakers.
    pub readyz_requires_closed_breakers: bool,
    /// The configuration's hash.
    pub config_hash: String,
    /// Listener settings.
    pub server: ServerSettings,
    /// The event relay, when configured.
    pub events: Option<Arc<EventRelay>>,
    /// The sites' DocType metadata the OpenAPI documents are built from.
    pub openapi_metadata: MetadataCache,
    /// What `POST /cache/purge` on the admin listener requires as a bearer token, if set.
    pub admin_token: Option<String>,
    /// File watching.
    pub reload: crate::config::ReloadConfig,
    /// State a reload keeps when its settings did not change.
    kept: Kept,
}

/// Stateful parts a reload carries over when their configuration is unchanged: the clients'
/// limiters (by client), the auth-failure limiter, the idempotency records and the cache.
struct Kept {
    shared: (String, Option<Arc<SharedState>>),
    clients: Arc<ClientTable>,
    failures: (String, Arc<AuthFailureLimiter>),
    idempotency: (String, Arc<dyn IdempotencyStore>),
    cache: (String, Option<Arc<Cache>>),
    telemetry: (String, Option<Arc<Telemetry>>),
    oauth: Option<(String, Arc<OAuthApps>)>,
    events: (String, Option<Arc<EventRelay>>),
    buffer_budget: (String, Arc<BufferBudget>),
}

/// Builds the gateway from a validated config; on a reload, `previous` is the gateway being
/// replaced, whose state is kept where its settings did not change.
pub fn build(
    loaded: &LoadedConfig,
    metrics: &Metrics,
    previous: Option<&Gateway>,
) -> Result<Gateway, BuildError> {
    build_with(loaded, metrics, previous, Forward)
}

/// [`build`] with `upstream` in place of the network client: the benchmarks measure the stack
/// alone with a service that answers at once.
pub fn build_with<U>(
    loaded: &LoadedConfig,
    metrics: &Metrics,
    previous: Option<&Gateway>,
    upstream: U,
) -> Result<Gateway, BuildError>
where
    U: tower::Service<Request<Body>, Response = Response<Body>, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    U::Future: Send + 'static,
{
    let config = &loaded.config;
    let kept = previous.map(|p| &p.kept);
    let shared = build_shared_state(loaded, metrics, kept.map(|k| &k.shared))?;
    let prefix = config
        .shared_state
        .as_ref()
        .map_or("", |s| s.redis.key_prefix.as_str());
    let router = Arc::new(build_router(loaded, metrics)?);
    let clients = Arc::new(build_clients(config, prefix, kept.map(|k| &*k.clients))?);
    let trusted = TrustedProxies::new(config.trusted_proxies.iter().map(|p| p.0).collect());
    // Unchanged apps keep their quota state and remembered introspections over a reload.
    let oauth_fingerprint = format!(
        "{:?} {:?} {:?} {} {:?} {prefix}",
        config.oauth_apps,
        config.rate_limit,
        config.write_rate_limit,
        config.max_in_flight,
        config.oauth_token_cache_bytes
    );
    let oauth_apps = match kept.and_then(|k| k.oauth.as_ref()) {
        Some((was, apps)) if *was == oauth_fingerprint => {
            Some(Arc::new(apps.with_router(router.clone())))
        }
        _ => build_oauth_apps(config, &router, metrics, prefix)?,
    };
    let oauth_kept = oauth_apps.clone().map(|apps| (oauth_fingerprint, apps));
    // One budget for every body held; a reload that leaves its limits alone keeps it, with the
    // reservations of the requests still in flight.
    let buffer_budget = reuse(
        kept.map(|k| &k.buffer_budget),
        format!(
            "{:?} {:?} {}",
            config.buffering.max_memory,
            config.buffering.max_disk,
            config.buffering.max_client_share
        ),
        || {
            BufferBudget::new(
                BudgetLimits {
                    max_memory: config.buffering.max_memory.0,
                    max_disk: config.buffering.max_disk.0,
                    client_share: config.buffering.max_client_share,
                },
                &BudgetMetrics {
                    held: metrics.buffered_bytes.clone(),
                    refused: metrics.buffer_refusals.clone(),
                },
            )
        },
    );
    // One buffering layer, for keyed requests and public routes: one budget.
    let buffer = BufferLayer::new(BufferSettings {
        requests: config.buffering.requests,
        responses: config.buffering.responses,
        memory: usize::try_from(config.buffering.memory.0).unwrap_or(usize::MAX),
        directory: config
            .buffering
            .directory
            .clone()
            .unwrap_or_else(std::env::temp_dir),
        client_body_timeout: config.buffering.client_body_timeout,
        budget: buffer_budget.1.clone(),
    });
    // Classification and idempotency read whole bodies into memory before the buffer layer:
    // on its budget, with its pause between reads.
    let reader = MemoryReader::new(
        buffer_budget.1.clone(),
        config.limits.max_inspected_body_bytes.0,
        config.buffering.client_body_timeout,
    );
    let public_routes = PublicRoutes::new(
        config
            .sites
            .iter()
            .filter_map(|(name, site)| site.public.as_ref().map(|p| (name, p))),
        router.clone(),
        clients.clone(),
        trusted.clone(),
        reader.clone(),
        buffer.clone(),
    );
    let failures = reuse(
        kept.map(|k| &k.failures),
        format!("{:?}", config.auth_failures),
        || {
            let one = NonZeroU32::MIN;
            Arc::new(AuthFailureLimiter::new(
                NonZeroU32::new(config.auth_failures.per_minute).unwrap_or(one),
                NonZeroU32::new(config.auth_failures.burst).unwrap_or(one),
            ))
        },
    );
    let max_body = config.limits.max_body_bytes.0;
    let idempotency = reuse(
        kept.map(|k| &k.idempotency),
        format!("{:?} {}", config.idempotency, shared.0),
        || -> Arc<dyn IdempotencyStore> {
            match &shared.1 {
                Some(state) => Arc::new(SharedStore::new(state.clone(), config.idempotency.ttl)),
                None => Arc::new(MemoryStore::new(
                    config.idempotency.ttl,
                    config.idempotency.max_bytes.0,
                    metrics.idempotency_evictions.clone(),
                )),
            }
        },
    );
    let compression = config.compression.enabled.then(|| {
        Arc::new(CompressionSettings::new(
            &config.compression,
            &metrics.compression_bytes,
        ))
    });
    let cache = reuse(
        kept.map(|k| &k.cache),
        format!("{:?} {} {:?}", config.cache, shared.0, config.compression),
        || build_cache(config, metrics, shared.1.clone(), compression.clone()),
    );
    // The relay (its store stays open over a reload that leaves its settings alone); the
    // subscriptions are always the new config's, with the new clients' rules.
    // Keyed by where the store is (the embedded one is a file only one relay may hold open).
    let events_fingerprint = format!(
        "{:?} {}",
        config.events.as_ref().map(|e| &e.directory),
        shared.0
    );
    let events = match kept.map(|k| &k.events) {
        Some((was, relay)) if *was == events_fingerprint => (was.clone(), relay.clone()),
        _ => (
            events_fingerprint,
            match &config.events {
                None => None,
                Some(settings) => Some(
                    EventRelay::start(settings, shared.1.clone(), metrics.events.clone())
                        .map_err(|e| BuildError::Invalid(format!("events: {e}")))?,
                ),
            },
        ),
    };
    if let (Some(relay), Some(settings)) = (&events.1, &config.events) {
        relay.set_settings(settings);
        relay.set_subscribers(build_subscribers(loaded, &clients)?);
    }
    // Other replicas' invalidations reach this cache, their blocks this failure limiter,
    // their events this relay.
    if let Some(state) = &shared.1 {
        let mut listeners: Vec<std::sync::Weak<dyn Listener>> = Vec::new();
        let failures: Arc<dyn Listener> = failures.1.clone();
        listeners.push(Arc::downgrade(&failures));
        if let Some(cache) = &cache.1 {
            let cache: Arc<dyn Listener> = cache.clone();
            listeners.push(Arc::downgrade(&cache));
        }
        if let Some(relay) = &events.1 {
            let relay: Arc<dyn Listener> = relay.clone();
            listeners.push(Arc::downgrade(&relay));
        }
        state.set_listeners(listeners);
    }
    let tls = config.tls.as_ref().map(crate::tls::acceptor).transpose()?;
    let openapi_metadata = MetadataCache::new(config.openapi.metadata_ttl);
    let telemetry = build_telemetry(config, metrics, kept.map(|k| &k.telemetry))?;
    let tracer = telemetry.1.as_ref().map(|t| t.spans.clone());

    let webhooks = (cache.1.is_some() || events.1.is_some()).then(|| {
        let secrets = loaded
            .webhook_secrets
            .iter()
            .map(|(site, secret)| (site.clone(), secret.0.as_bytes().to_vec()))
            .collect();
        WebhookLayer::new(cache.1.clone(), events.1.clone(), secrets, trusted.clone())
    });

    let service = ServiceBuilder::new()
        // Before anything reads a header: credentials are marked sensitive for every layer.
        .layer(crate::layers::sensitive_headers::layer())
        // Every log line, error envelope and upstream request carries the same id.
        .layer(RequestIdLayer)
        // Outside everything that can refuse, so refusals are counted and logged too.
        .layer(ObserveLayer::new(metrics.clone()))
        // Inside observation (whose log line carries the trace id), outside every refusal.
        .option_layer(tracer.clone().map(ServerSpanLayer::new))
        // Preflights answered before any key is asked for; CORS headers on every answer below,
        // refusals included, decided on the client authenticated inside.
        .option_layer(config.cors.as_ref().map(|cors| {
            let clients = config
                .clients
                .iter()
                .map(|(name, c)| (name, c.allowed_origins.as_ref()));
            let apps = config
                .oauth_apps
                .iter()
                .map(|(name, a)| (name, a.allowed_origins.as_ref()));
            CorsLayer::new(cors, clients.chain(apps), trusted.clone(), max_body)
        }))
        // A panic anywhere inside is one request's 500 envelope, counted by observation above.
        // Inside CORS, outside the cache (which serves its own encoded copies): one encoding per
        // answer, negotiated here.
        .option_layer(compression.map(CompressionLayer::new))
        .map_response(|response: Response<_>| response.map(Body::new))
        .layer(crate::layers::catch_panic::layer(max_body))
        // The edge: errors from any layer below become one Frappe-envelope response, here only.
        .layer(ErrorResponseLayer::new(max_body))
        // Before any work is spent on an oversized request.
        .layer(BodyLimitLayer::new(max_body))
        // Frappe's webhooks (cache purges, relayed events) carry a signature, not a gateway
        // key: before auth.
        .option_layer(webhooks)
        // The sites' OAuth sign-in flows carry the user's session, not a gateway key.
        .option_layer(public_routes.map(PublicRoutesLayer::new))
        // Identity first: routing, access rules and per-client limits all need the client.
        .layer(
            AuthLayer::new(
                clients.clone(),
                failures.1.clone(),
                trusted.clone(),
                metrics.auth_failures.clone(),
                shared.1.clone(),
            )
            .with_oauth(oauth_apps.clone()),
        )
        // The pull feed needs the client (its rules filter the events) and is erpgate's own
        // path: before routing, never forwarded.
        .option_layer(events.1.clone().map(EventFeedLayer::new))
        // The client's OpenAPI document needs the client (its rules are the document) and is
        // erpgate's own path: before routing, never forwarded.
        .layer(OpenApiLayer::new(
            router.clone(),
            openapi_metadata.clone(),
            config.openapi.public_url.clone(),
        ))
        // Before classification: the canonical, prefix-stripped path is what Frappe will see,
        // so it is what the rules must judge.
        .layer(RouteLayer::new(router.clone()))
        // What the request does to Frappe: the limits, rules and retries below all ask.
        // Holds JSON and urlencoded bodies in memory: on the buffer layer's budget.
        .layer(ClassifyLayer::new(reader.clone()))
        // Routes with `methods` are decided on what the request runs, before anything below
        // reads its site, account, timeouts or retries.
        .layer(MethodRouteLayer::new(router.clone()))
        // Per-client quotas need the kind (writes have their own); before the rules, so probing
        // them costs quota too.
        .layer(RateLimitLayer::new(
            metrics.rate_limited.clone(),
            shared.1.clone(),
        ))
        // Per-client requests in flight, held until the response body is sent.
        .layer(ConcurrencyLayer::new(metrics.rate_limited.clone()))
        // Whether this client may do it; 403 before anything is sent, recorded, cached or retried.
        .layer(AuthorizeLayer)
        // After the rules (a client only reads what it may), outside retries and the breaker
        // (cached answers survive an outage); writes passing through invalidate.
        .option_layer(cache.1.clone().map(CacheLayer::new))
        // Replays answer without touching the site; only permitted requests are recorded.
        .layer(IdempotencyLayer::new(
            idempotency.1.clone(),
            reader,
            config.idempotency.max_response_bytes.0,
            config.idempotency.ttl,
        ))
        // Whole bodies both ways before and after the site (as nginx in front of gunicorn): a
        // slow client never holds a Frappe worker, and the site's deadline starts once the
        // request is whole.
        .layer(buffer)
        // One deadline over all attempts and backoffs.
        .layer(DeadlineLayer)
        // Outside the breaker: each attempt is counted by it, and an open breaker stops retries.
        .layer(RetryLayer::new(RetryPolicy::new(metrics.retries.clone())))
        // Per site: fail fast while the site is down.
        .layer(BreakerLayer)
        // Last before the network: no layer above ever holds an ERPNext secret.
        .layer(CredentialSwapLayer::new(trusted))
        // One client span per attempt; its traceparent goes to the site.
        .option_layer(tracer.map(AttemptSpanLayer::new))
        .service(upstream);
    Ok(Gateway {
        service: BoxCloneSyncService::new(service),
        router,
        cache: cache.1.clone(),
        shared_state: shared.1.clone(),
        tls,
        readyz_requires_closed_breakers: config.readyz_requires_closed_breakers,
        config_hash: loaded.hash.clone(),
        server: ServerSettings {
            header_read_timeout: config.limits.header_read_timeout,
            max_request_head_bytes: usize::try_from(config.limits.max_request_head_bytes.0)
                .unwrap_or(usize::MAX)
                .clamp(8 << 10, 1 << 20),
            shutdown_grace: config.limits.shutdown_grace,
            drain_delay: config.limits.drain_delay,
            max_connections: usize::try_from(config.limits.max_connections).unwrap_or(usize::MAX),
            idle_timeout: config.limits.idle_timeout,
            http2_max_concurrent_streams: config.limits.http2_max_concurrent_streams,
            http2_keepalive_interval: config.limits.http2_keepalive_interval,
        },
        events: events.1.clone(),
        openapi_metadata,
        admin_token: config.admin_token.as_ref().map(|t| t.0.clone()),
        reload: config.reload.clone(),
        kept: Kept {
            shared,
            clients,
            failures,
            idempotency,
            cache,
            telemetry,
            oauth: oauth_kept,
            events,
            buffer_budget,
        },
    })
}

/// The previous value when it was made from the same settings (`fingerprint`), else a new one.
fn reuse<T: Clone>(
    previous: Option<&(String, T)>,
    fingerprint: String,
    make: impl FnOnce() -> T,
) -> (String, T) {
    match previous {
        Some((was, value)) if *was == fingerprint => (fingerprint, value.clone()),
        _ => (fingerprint, make()),
    }
}

/// The connection to the shared state, when configured; kept over a reload that leaves its
/// settings (and password) alone.
fn build_shared_state(
    loaded: &LoadedConfig,
    metrics: &Metrics,
    previous: Option<&(String, Option<Arc<SharedState>>)>,
) -> Result<(String, Option<Arc<SharedState>>), BuildError> {
    let password = loaded.redis_password.as_ref().map(|p| {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(p.0.as_bytes()))
    });
    let fingerprint = format!("{:?} {password:?}", loaded.config.shared_state);
    if let Some((was, state)) = previous.filter(|(was, _)| *was == fingerprint) {
        return Ok((was.clone(), state.clone()));
    }
    let state = match &loaded.config.shared_state {
        None => None,
        Some(shared) => Some(
            SharedState::start(shared, loaded, metrics.redis.clone())
                .map_err(|e| BuildError::Invalid(e.to_string()))?,
        ),
    };
    Ok((fingerprint, state))
}

/// The trace exporter, when tracing is configured; kept over a reload that leaves its settings
/// (and header values) alone.
fn build_telemetry(
    config: &Config,
    metrics: &Metrics,
    previous: Option<&(String, Option<Arc<Telemetry>>)>,
) -> Result<(String, Option<Arc<Telemetry>>), BuildError> {
    let headers: Vec<String> = config
        .tracing
        .iter()
        .flat_map(|t| t.headers.values())
        .map(|v| {
            use sha2::Digest as _;
            hex::encode(sha2::Sha256::digest(v.0.as_bytes()))
        })
        .collect();
    let fingerprint = format!("{:?} {headers:?}", config.tracing);
    if let Some((was, telemetry)) = previous.filter(|(was, _)| *was == fingerprint) {
        return Ok((was.clone(), telemetry.clone()));
    }
    let telemetry = match &config.tracing {
        None => None,
        Some(tracing) => Some(Arc::new(
            Telemetry::start(
                tracing,
                ExportMetrics::new(&metrics.trace_exports, &metrics.trace_spans_dropped),
            )
            .map_err(|e| BuildError::Invalid(e.to_string()))?,
        )),
    };
    Ok((fingerprint, telemetry))
}

/// The cache, unless no rule is configured.
fn build_cache(
    config: &Config,
    metrics: &Metrics,
    shared: Option<Arc<SharedState>>,
    compression: Option<Arc<CompressionSettings>>,
) -> Option<Arc<Cache>> {
    let c = &config.cache;
    if c.rules.is_empty() {
        return None;
    }
    let rules = c
        .rules
        .iter()
        .map(|r| CacheRule {
            subject: match (&r.doctype, &r.method) {
                (Some(doctype), _) => Subject::Doctype {
                    doctype: doctype.clone(),
                    lists: r.reads.contains(&crate::config::CacheReads::List),
                    documents: r.reads.contains(&crate::config::CacheReads::Document),
                },
                (None, method) => Subject::Method(
                    MethodName::new(method.as_deref().unwrap_or_default())
                        .as_str()
                        .to_owned(),
                ),
            },
            ttl: r.ttl,
            stale_if_error: r.stale_if_error,
            override_upstream_cache_control: r.override_upstream_cache_control,
            sites: (!r.sites.is_empty()).then(|| r.sites.clone()),
        })
        .collect();
    Some(Arc::new(Cache::new(
        CacheRules(rules),
        c.max_bytes.0,
        c.max_entry_bytes.0,
        metrics.clone(),
        shared,
        compression,
    )))
}

fn header(value: &str, what: &str) -> Result<HeaderValue, BuildError> {
    HeaderValue::try_from(value)
        .map_err(|_| BuildError::Invalid(format!("{what} is not a valid header value")))
}

fn build_router(loaded: &LoadedConfig, metrics: &Metrics) -> Result<Router, BuildError> {
    let config = &loaded.config;
    let mut sites = HashMap::new();
    for (name, site) in &config.sites {
        let site_name = &site.site_name.0;
        let host = site.host.as_ref().map_or(site_name, |h| &h.0);
        let backends: Vec<_> = site.backends.iter().map(|b| b.0.clone()).collect();
        let backend_texts: Vec<String> = backends.iter().map(ToString::to_string).collect();
        let mut site_parts: Vec<&[u8]> = vec![site_name.as_bytes(), host.as_bytes()];
        site_parts.extend(backend_texts.iter().map(|b| b.as_bytes()));
        let site_identity = identity_of(&site_parts);
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
                    identity: identity_of(&[&site_identity, creds.api_key.0.as_bytes()]),
                },
            );
        }
        let upstream = Upstream::new(
            config.workers(),
            name.as_str().into(),
            &backends,
            &UpstreamOptions {
                protocol: site.upstream_protocol,
                connect_timeout: site.timeouts.connect,
                request_timeout: site.timeouts.request,
                ca_file: site.ca_file.as_deref(),
            },
            metrics.upstream_duration.with_label_values(&[name]),
        )
        .map_err(|source| BuildError::Upstream {
            site: name.clone(),
            source,
        })?;
        let b = &site.breaker;
        let breaker = b.enabled.then(|| {
            let settings = BreakerSettings {
                consecutive_failures: b.consecutive_failures,
                failure_rate: b
                    .failure_rate
                    .as_ref()
                    .map(|r| (r.threshold, r.min_requests, r.window)),
                open_base: b.open_base,
                open_max: b.open_max,
            };
            Breaker::new(
                name.as_str().into(),
                &settings,
                metrics.breaker_state.with_label_values(&[name]),
                metrics.breaker_transitions.clone(),
            )
        });
        let r = &site.retry;
        let retry = RetrySettings {
            max_retries: r.max_retries,
            backoff_base: r.backoff_base,
            backoff_max: r.backoff_max,
            max_retry_after: r.max_retry_after,
            max_body_bytes: r.max_body_bytes.0,
            // Retries over the last 10 s may add `percent` of the requests, plus the floor.
            budget: TpsBudget::new(
                Duration::from_secs(10),
                r.budget_min_per_second,
                r.budget_percent as f32 / 100.0,
            ),
        };
        let read_only_methods = r
            .read_only_methods
            .iter()
            .map(|m| MethodName::new(m).as_str().to_owned())
            .collect();
        let built = Site {
            name: name.as_str().into(),
            site_name: header(site_name, "site_name")?,
            host: header(host, "host")?,
            accounts,
            expose_tracebacks: site.expose_tracebacks,
            upstream,
            breaker,
            retry,
            read_only_methods,
            total_timeout: site.timeouts.total,
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
        let site_timeouts = &config.sites[&route.site].timeouts;
        // Retries are off on a route with its own timeouts unless it sets them: what needs a
        // long timeout is rarely safe or cheap to run twice.
        let timeouts = (route.timeouts.is_some() || route.retry.is_some()).then(|| {
            let own = route.timeouts.as_ref();
            let total = own.and_then(|t| t.total).unwrap_or(site_timeouts.total);
            RouteTimeouts {
                // The site's, but never past the route's own total.
                request: own
                    .and_then(|t| t.request)
                    .unwrap_or(site_timeouts.request.min(total)),
                total,
                max_retries: match (&route.retry, own) {
                    (Some(retry), _) => retry.max_retries,
                    (None, Some(_)) => 0,
                    (None, None) => site.retry.max_retries,
                },
            }
        });
        routes.push(Route {
            host: route.host.as_ref().map(|h| h.to_ascii_lowercase()),
            path_prefix,
            strip_prefix: route.strip_prefix,
            streaming: route.streaming,
            methods: route
                .methods
                .as_ref()
                .map(|names| MethodSet::new(names.iter().map(String::as_str))),
            timeouts,
            site,
        });
    }
    Ok(Router::new(sites, routes))
}

fn quota_policy(
    name: &'static str,
    quota: Option<&crate::config::QuotaConfig>,
    shared_key: &str,
) -> Result<Option<Arc<QuotaPolicy>>, BuildError> {
    quota
        .map(|q| {
            q.quota()
                .map(|quota| Arc::new(QuotaPolicy::new(name, quota, shared_key)))
                .map_err(BuildError::Invalid)
        })
        .transpose()
}

fn build_clients(
    config: &Config,
    shared_prefix: &str,
    previous: Option<&ClientTable>,
) -> Result<ClientTable, BuildError> {
    let mut table = Vec::new();
    for (name, client) in &config.clients {
        let requests = client.rate_limit.as_ref().or(config.rate_limit.as_ref());
        let writes = client
            .write_rate_limit
            .as_ref()
            .or(config.write_rate_limit.as_ref());
        let max_in_flight = client.max_in_flight.unwrap_or(config.max_in_flight);
        // Length-prefixed: no two client names share a key.
        let shared_key = format!("{shared_prefix}rl:{}:{name}", name.len());
        let limits_fingerprint = format!("{requests:?} {writes:?} {max_in_flight} {shared_key}");
        // A client whose limits did not change keeps its limiters and in-flight slots.
        let (quotas, in_flight) = match previous.and_then(|p| p.by_name(name)) {
            Some(was) if was.limits_fingerprint == limits_fingerprint => {
                (was.quotas.clone(), was.in_flight.clone())
            }
            _ => (
                ClientQuotas {
                    requests: quota_policy("default", requests, &shared_key)?,
                    writes: quota_policy("writes", writes, &shared_key)?,
                },
                InFlight::new(max_in_flight as usize),
            ),
        };
        let mut secret_sha256 = [0u8; 32];
        hex::decode_to_slice(&client.secret_sha256.0, &mut secret_sha256).map_err(|_| {
            BuildError::Invalid(format!("clients.{name}.secret_sha256 is not 64 hex digits"))
        })?;
        let rules = access_rules(client.allow.as_ref())?;
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
                quotas,
                in_flight,
                limits_fingerprint,
            },
        ));
    }
    Ok(ClientTable::new(table))
}

/// The clients' subscriptions, each with its client as just built (its sites and rules).
fn build_subscribers(
    loaded: &LoadedConfig,
    clients: &ClientTable,
) -> Result<Vec<Arc<Subscriber>>, BuildError> {
    let mut subscribers = Vec::new();
    for (client_name, config) in &loaded.config.clients {
        let Some(client) = clients.by_name(client_name) else {
            continue;
        };
        for (name, subscription) in &config.subscriptions {
            let at = format!("clients.{client_name}.subscriptions.{name}");
            let secret = loaded
                .subscription_secrets
                .get(&(client_name.clone(), name.clone()))
                .ok_or_else(|| BuildError::Invalid(format!("{at}.secret is missing")))?;
            let key_hmac = crate::events::signature::signing_key(&secret.0)
                .map_err(|e| BuildError::Invalid(format!("{at}.secret: {e}")))?;
            let url = subscription
                .url
                .0
                .parse()
                .map_err(|_| BuildError::Invalid(format!("{at}.url is not a URL")))?;
            subscribers.push(Arc::new(Subscriber {
                key: format!("{client_name}/{name}"),
                client: client.clone(),
                name: name.clone(),
                url,
                doctypes: subscription.doctypes.clone(),
                events: subscription.events.clone(),
                key_hmac,
                timeout: subscription.timeout,
            }));
        }
    }
    Ok(subscribers)
}

/// Grants one `allow.methods` rule, or says why it cannot be granted.
pub fn allow_method_rule(
    rules: &mut AccessRules,
    rule: &crate::config::MethodRule,
) -> Result<(), String> {
    use crate::config::MethodRule;
    use crate::frappe::catalog::ArgKind;
    match rule {
        MethodRule::Name(name) => {
            let wildcard_ok = match name.find('*') {
                None => true,
                Some(pos) => pos == name.len() - 1 && name.ends_with(".*") && name.len() > 2,
            };
            if name.is_empty() || !wildcard_ok {
                return Err(format!("'{name}' is not a method name or 'prefix.*'"));
            }
            rules.allow_method(name).map_err(|e| e.to_string())
        }
        MethodRule::App(app) => {
            let args = match (&app.args, app.judged_by_its_own_code) {
                (Some(_), true) | (None, false) => {
                    return Err(format!(
                        "'{}': give either args or judged_by_its_own_code: true",
                        app.name
                    ))
                }
                (None, true) => None,
                (Some(args), false) => {
                    let mut kinds = Vec::new();
                    for (arg, kind) in args {
                        let kind = ArgKind::parse(kind).map_err(|e| format!("args.{arg}: {e}"))?;
                        if matches!(kind, ArgKind::Method(_)) {
                            return Err(format!(
                                "args.{arg}: a method argument of an app's own method cannot be \
                                 followed (erpgate does not know what it passes on)"
                            ));
                        }
                        kinds.push((arg.clone(), kind));
                    }
                    Some(kinds)
                }
            };
            rules
                .allow_app_method(&app.name, args)
                .map_err(|e| e.to_string())
        }
    }
}

/// A client's (or app's) access rules; `None` without an `allow` block.
fn access_rules(
    allow: Option<&crate::config::AllowConfig>,
) -> Result<Option<AccessRules>, BuildError> {
    let Some(allow) = allow else {
        return Ok(None);
    };
    let mut rules = AccessRules::default();
    for (doctype, ops) in &allow.resources {
        for op in ops {
            let ops = parse_operations(op).map_err(|e| BuildError::Invalid(e.to_string()))?;
            rules.allow_resource(doctype, ops);
        }
    }
    for method in &allow.methods {
        allow_method_rule(&mut rules, method).map_err(BuildError::Invalid)?;
    }
    rules.allow_files(allow.files);
    rules.allow_other(allow.other);
    rules.leave_query_arguments_unchecked(!allow.check_query_arguments);
    Ok(Some(rules))
}

/// The OAuth apps, when any is configured: each as a client (rules, quotas, in-flight slots)
/// whose requests are signed with its users' own tokens.
fn build_oauth_apps(
    config: &Config,
    router: &Arc<Router>,
    metrics: &Metrics,
    shared_prefix: &str,
) -> Result<Option<Arc<OAuthApps>>, BuildError> {
    if config.oauth_apps.is_empty() {
        return Ok(None);
    }
    let mut apps = HashMap::new();
    for (name, app) in &config.oauth_apps {
        let requests = app.rate_limit.as_ref().or(config.rate_limit.as_ref());
        let writes = app
            .write_rate_limit
            .as_ref()
            .or(config.write_rate_limit.as_ref());
        let max_in_flight = app.max_in_flight.unwrap_or(config.max_in_flight);
        let shared_key = format!("{shared_prefix}rl:oauth:{}:{name}", name.len());
        let client = Client {
            name: name.as_str().into(),
            // Never compared: apps are found by their tokens' client_id, not by a secret.
            secret_sha256: [0; 32],
            site: app.site.clone(),
            service_account: String::new(),
            extra_sites: HashMap::new(),
            rules: access_rules(app.allow.as_ref())?,
            quotas: ClientQuotas {
                requests: quota_policy("default", requests, &shared_key)?,
                writes: quota_policy("writes", writes, &shared_key)?,
            },
            in_flight: InFlight::new(max_in_flight as usize),
            limits_fingerprint: String::new(),
        };
        let per_user = app
            .per_user_rate_limit
            .as_ref()
            .map(|q| q.quota().map_err(BuildError::Invalid))
            .transpose()?;
        apps.insert(
            app.client_id.clone(),
            Arc::new(App::new(client, app.introspection_ttl, per_user)),
        );
    }
    Ok(Some(Arc::new(OAuthApps::new(
        apps,
        router.clone(),
        config.oauth_token_cache_bytes.0,
        metrics.oauth_introspections.clone(),
    ))))
}
