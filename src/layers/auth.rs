//! Authentication: a gateway credential (`token id:secret`, `Basic`, `Bearer`) becomes the
//! request's [`Client`], or the request stops with 401.
//!
//! Secrets are stored only as SHA-256 and compared in constant time; an unknown key id costs the
//! same hash and comparison as a wrong secret. Failed attempts are rate limited per source IP
//! with a GCRA quota (governor): once an address is over it, *every* attempt from it gets 429
//! without the secret being checked, so a throttled guesser learns nothing. The client's
//! `Authorization` header is removed here, so no inner layer sees the client's secret.
//!
//! A request with two `Host`, `Content-Length`, `Authorization` or `Content-Type` headers is a
//! 400 here, before anything reads one of them: gunicorn would keep another than an HTTP
//! library does (see [`crate::frappe::headers`]).
//!
//! First of the deciding layers: identity is needed for routing, access rules and every
//! per-client limit.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::{header, Request, Response};
use prometheus::IntCounterVec;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tower::{Layer, Service};

use crate::error::GatewayError;
use crate::forwarding::{PeerAddr, TrustedProxies};
use crate::frappe::auth_header::parse_credential;
use crate::frappe::headers::repeated_singleton;
use crate::frappe::AccessRules;
use crate::layers::EarlyReturn;
use crate::tags::RequestTags;
use crate::{Body, BoxError};

/// A client of the gateway, as a request extension once authenticated.
#[derive(Debug)]
pub struct Client {
    /// The configured name.
    pub name: Arc<str>,
    /// SHA-256 of the client's secret.
    pub secret_sha256: [u8; 32],
    /// The default site.
    pub site: String,
    /// The service account on the default site.
    pub service_account: String,
    /// Other sites and the service account on each.
    pub extra_sites: HashMap<String, String>,
    /// Access rules; `None` means whatever the service account may.
    pub rules: Option<AccessRules>,
    /// Request and write quotas.
    pub quotas: crate::layers::rate_limit::ClientQuotas,
    /// Slots for requests in flight.
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// What `quotas` and `in_flight` were made from: a reload that leaves it alone keeps them,
    /// and with them the client's rate-limit state.
    pub limits_fingerprint: String,
}

impl Client {
    /// The service account this client uses on `site`, if it may use the site at all.
    pub fn account_on(&self, site: &str) -> Option<&str> {
        if site == self.site {
            Some(&self.service_account)
        } else {
            self.extra_sites.get(site).map(String::as_str)
        }
    }
}

/// Clients by key id.
#[derive(Debug, Default)]
pub struct ClientTable {
    by_key_id: HashMap<String, Arc<Client>>,
}

impl ClientTable {
    /// A table of `(key_id, client)` pairs.
    pub fn new(clients: impl IntoIterator<Item = (String, Client)>) -> Self {
        Self {
            by_key_id: clients.into_iter().map(|(k, c)| (k, Arc::new(c))).collect(),
        }
    }

    /// The client configured as `name`.
    pub fn by_name(&self, name: &str) -> Option<&Arc<Client>> {
        self.by_key_id.values().find(|c| &*c.name == name)
    }
}

/// Failed authentications per source IP.
pub struct AuthFailureLimiter {
    quota: DefaultKeyedRateLimiter<IpAddr>,
    /// Addresses over the quota, until when. Read on every request, written only on failures.
    blocked: DashMap<IpAddr, Instant>,
    /// Set while `blocked` may be non-empty, so the common case costs one atomic load instead
    /// of a read lock on every shard.
    any_blocked: AtomicBool,
    failures: AtomicU64,
}

impl std::fmt::Debug for AuthFailureLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthFailureLimiter")
            .field("blocked", &self.blocked.len())
            .finish()
    }
}

impl AuthFailureLimiter {
    /// Allows `per_minute` sustained failures with bursts of `burst` per address.
    pub fn new(per_minute: NonZeroU32, burst: NonZeroU32) -> Self {
        Self {
            quota: RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(burst)),
            blocked: DashMap::new(),
            any_blocked: AtomicBool::new(false),
            failures: AtomicU64::new(0),
        }
    }

    /// How long `ip` is still blocked, if it is.
    fn blocked_for(&self, ip: IpAddr) -> Option<Duration> {
        if !self.any_blocked.load(Ordering::SeqCst) {
            return None;
        }
        let until = *self.blocked.get(&ip)?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            self.blocked.remove(&ip);
            None
        } else {
            Some(left)
        }
    }

    /// Counts a failure; returns how long `ip` is now blocked if this one went over the quota.
    fn record_failure(&self, ip: IpAddr) -> Option<Duration> {
        // Forget idle addresses now and then, so memory follows the active attackers only.
        if self.failures.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            self.quota.retain_recent();
            let now = Instant::now();
            self.blocked.retain(|_, until| *until > now);
            if self.blocked.is_empty() {
                self.any_blocked.store(false, Ordering::SeqCst);
                // An address blocked meanwhile must not go unseen.
                if !self.blocked.is_empty() {
                    self.any_blocked.store(true, Ordering::SeqCst);
                }
            }
        }
        let not_until = self.quota.check_key(&ip).err()?;
        let wait = not_until
            .wait_time_from(DefaultClock::default().now())
            .max(Duration::from_secs(1));
        self.blocked.insert(ip, Instant::now() + wait);
        self.any_blocked.store(true, Ordering::SeqCst);
        Some(wait)
    }
}

/// Authenticates requests.
#[derive(Clone)]
pub struct AuthLayer {
    clients: Arc<ClientTable>,
    failures: Arc<AuthFailureLimiter>,
    trusted: TrustedProxies,
    failure_metric: IntCounterVec,
}

impl AuthLayer {
    /// Authenticates against `clients`, counting failures in `failure_metric{reason}`.
    pub fn new(
        clients: Arc<ClientTable>,
        failures: Arc<AuthFailureLimiter>,
        trusted: TrustedProxies,
        failure_metric: IntCounterVec,
    ) -> Self {
        Self {
            clients,
            failures,
            trusted,
            failure_metric,
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`AuthLayer`].
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

/// Hash compared against when the key id is unknown, so both failures cost the same.
const DECOY_HASH: [u8; 32] = [0x5a; 32];

impl AuthLayer {
    fn authenticate<B>(&self, request: &Request<B>) -> Result<Arc<Client>, &'static str> {
        let credential = parse_credential(request.headers().get(header::AUTHORIZATION)).map_err(
            |e| match e {
                crate::frappe::auth_header::CredentialError::Missing => "missing",
                crate::frappe::auth_header::CredentialError::Malformed => "malformed",
            },
        )?;
        let client = self.clients.by_key_id.get(&credential.key_id);
        let expected = client.map_or(&DECOY_HASH, |c| &c.secret_sha256);
        let presented: [u8; 32] = Sha256::digest(credential.secret.as_bytes()).into();
        let matches: bool = presented.ct_eq(expected).into();
        match client {
            Some(client) if matches => Ok(client.clone()),
            Some(_) => Err("wrong_secret"),
            None => Err("unknown_key"),
        }
    }
}

impl<S> Service<Request<Body>> for Auth<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = EarlyReturn<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        if let Some(name) = repeated_singleton(request.headers()) {
            return EarlyReturn::error(GatewayError::BadRequest(format!(
                "the {name} header must appear once"
            )));
        }
        let peer = request
            .extensions()
            .get::<PeerAddr>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.0.ip());
        let ip = self.layer.trusted.client_ip(peer, request.headers());
        if let Some(retry_after) = self.layer.failures.blocked_for(ip) {
            self.layer
                .failure_metric
                .with_label_values(&["throttled"])
                .inc();
            return EarlyReturn::error(GatewayError::AuthThrottled { retry_after });
        }
        match self.layer.authenticate(&request) {
            Ok(client) => {
                if let Some(tags) = RequestTags::of(&request) {
                    let _ = tags.client.set(client.name.clone());
                }
                request.headers_mut().remove(header::AUTHORIZATION);
                request.extensions_mut().insert(client);
                EarlyReturn::inner(self.inner.call(request))
            }
            Err(reason) => {
                self.layer.failure_metric.with_label_values(&[reason]).inc();
                tracing::info!(%ip, reason, "authentication failed");
                match self.layer.failures.record_failure(ip) {
                    Some(retry_after) => {
                        EarlyReturn::error(GatewayError::AuthThrottled { retry_after })
                    }
                    None => EarlyReturn::error(GatewayError::Unauthenticated(reason)),
                }
            }
        }
    }
}
