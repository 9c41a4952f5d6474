//! Authentication: a gateway credential (`token id:secret`, `Basic`, `Bearer`) becomes the
//! request's [`Client`], or the request stops with 401.
//!
//! Secrets are stored only as SHA-256 and compared in constant time; an unknown key id costs the
//! same hash and comparison as a wrong secret. Failed attempts are rate limited with GCRA quotas
//! (governor) per source address (IPv6 per /64, which one host holds) *and* per key id tried
//! (unknown ids share one bucket). Both are consulted only once a credential has failed: a
//! correct secret is always accepted, whatever others did from its address or with its key id.
//! Key ids are not secret, so a limit that refused the right secret too would let anyone lock a
//! client out by sending wrong ones; and it would buy nothing, since keygen secrets are 256-bit
//! and no quota is what stops them being guessed. A failing attempt from an address or on a key
//! id over its quota gets 429 instead of 401, which slows guessing and failing clients alike.
//! The client's `Authorization` header is removed here, so no inner layer sees the client's
//! secret.
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
use tower::{Layer, Service, ServiceExt};

use crate::error::GatewayError;
use crate::forwarding::{PeerAddr, TrustedProxies};
use crate::frappe::auth_header::parse_credential;
use crate::frappe::headers::repeated_singleton;
use crate::frappe::oauth::bearer_access_token;
use crate::frappe::AccessRules;
use crate::layers::{BoxResponseFuture, EarlyReturn};
use crate::oauth::{OAuthApps, Refusal as OAuthRefusal};
use crate::shared_state::gcra::{Charge, Mode};
use crate::shared_state::{Listener, Message, SharedState};
use crate::tags::RequestTags;
use crate::{Body, BoxError};
use futures_util::future::Either;

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
    pub in_flight: Arc<crate::layers::concurrency::InFlight>,
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

    /// The client presenting `key_id`.
    pub fn by_key_id(&self, key_id: &str) -> Option<&Arc<Client>> {
        self.by_key_id.get(key_id)
    }

    /// The client configured as `name`.
    pub fn by_name(&self, name: &str) -> Option<&Arc<Client>> {
        self.by_key_id.values().find(|c| &*c.name == name)
    }
}

/// What failures are counted against: the source address (IPv6 by /64, the block one host
/// holds), and the key id that was tried (unknown key ids share one bucket, so guessing ids
/// costs no memory per guess).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FailureKey {
    /// An IPv4 address, or an IPv6 /64.
    Address(IpAddr),
    /// A configured client's key id.
    KeyId(Arc<str>),
    /// Every key id no client has.
    UnknownKeyIds,
}

impl FailureKey {
    /// Its name between replicas: `address:<ip>`, `key:<id>` or `unknown-keys`.
    pub fn bucket(&self) -> String {
        match self {
            Self::Address(ip) => format!("address:{ip}"),
            Self::KeyId(id) => format!("key:{id}"),
            Self::UnknownKeyIds => "unknown-keys".into(),
        }
    }

    /// The key a bucket name stands for.
    pub fn from_bucket(bucket: &str) -> Option<Self> {
        if let Some(ip) = bucket.strip_prefix("address:") {
            return ip.parse().ok().map(Self::address);
        }
        if let Some(id) = bucket.strip_prefix("key:") {
            return Some(Self::KeyId(id.into()));
        }
        (bucket == "unknown-keys").then_some(Self::UnknownKeyIds)
    }

    /// The address bucket of `ip`: itself for IPv4 (and IPv4-mapped IPv6), its /64 for IPv6.
    pub fn address(ip: IpAddr) -> Self {
        Self::Address(crate::forwarding::source_block(ip))
    }
}

/// Failed authentications, per address and per key id (GCRA quotas).
pub struct AuthFailureLimiter {
    quota: DefaultKeyedRateLimiter<FailureKey>,
    /// Buckets over the quota, until when. Read on every failure or throttled key id, written
    /// only on failures.
    blocked: DashMap<FailureKey, Instant>,
    /// Set while `blocked` may be non-empty, so the common case costs one atomic load instead
    /// of a read lock on every shard.
    any_blocked: AtomicBool,
    failures: AtomicU64,
    interval: Duration,
    burst: u32,
}

impl std::fmt::Debug for AuthFailureLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthFailureLimiter")
            .field("blocked", &self.blocked.len())
            .finish()
    }
}

impl AuthFailureLimiter {
    /// Allows `per_minute` sustained failures with bursts of `burst`, per address and per key
    /// id alike.
    pub fn new(per_minute: NonZeroU32, burst: NonZeroU32) -> Self {
        let quota = Quota::per_minute(per_minute).allow_burst(burst);
        Self {
            interval: quota.replenish_interval(),
            burst: burst.get(),
            quota: RateLimiter::keyed(quota),
            blocked: DashMap::new(),
            any_blocked: AtomicBool::new(false),
            failures: AtomicU64::new(0),
        }
    }

    /// How long `key` is still blocked, if it is.
    pub fn blocked_for(&self, key: &FailureKey) -> Option<Duration> {
        if !self.any_blocked.load(Ordering::SeqCst) {
            return None;
        }
        let until = *self.blocked.get(key)?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            self.blocked.remove(key);
            None
        } else {
            Some(left)
        }
    }

    /// Counts a failure against `key`; returns how long it is now blocked if this one went
    /// over the quota.
    pub fn record_failure(&self, key: FailureKey) -> Option<Duration> {
        // Forget idle buckets now and then, so memory follows the active attackers only.
        if self.failures.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            self.quota.retain_recent();
            let now = Instant::now();
            self.blocked.retain(|_, until| *until > now);
            if self.blocked.is_empty() {
                self.any_blocked.store(false, Ordering::SeqCst);
                // A bucket blocked meanwhile must not go unseen.
                if !self.blocked.is_empty() {
                    self.any_blocked.store(true, Ordering::SeqCst);
                }
            }
        }
        let not_until = self.quota.check_key(&key).err()?;
        let wait = not_until
            .wait_time_from(DefaultClock::default().now())
            .max(Duration::from_secs(1));
        self.block(key, wait);
        Some(wait)
    }

    /// Blocks `key` for `wait` (another replica found it over the shared quota, or this one did).
    pub fn block(&self, key: FailureKey, wait: Duration) {
        let until = Instant::now() + wait;
        self.blocked
            .entry(key)
            .and_modify(|was| *was = (*was).max(until))
            .or_insert(until);
        self.any_blocked.store(true, Ordering::SeqCst);
    }
}

impl Listener for AuthFailureLimiter {
    fn on_message(&self, message: &Message) {
        if let Message::Block { bucket, millis } = message {
            if let Some(key) = FailureKey::from_bucket(bucket) {
                // A replica's word is bounded: no message blocks a bucket for over an hour.
                let wait = Duration::from_millis(*millis).min(Duration::from_secs(3600));
                self.block(key, wait);
            }
        }
    }

    fn on_missed(&self) {}
}

/// Authenticates requests.
#[derive(Clone)]
pub struct AuthLayer {
    clients: Arc<ClientTable>,
    failures: Arc<AuthFailureLimiter>,
    trusted: TrustedProxies,
    failure_metric: IntCounterVec,
    /// Failure quotas shared by every replica, while the shared state answers.
    shared: Option<Arc<SharedState>>,
    /// The failure quota's refill interval and burst, for the shared quotas.
    failure_quota: (Duration, u32),
    /// OAuth apps, whose users' access tokens are checked at their site.
    oauth: Option<Arc<OAuthApps>>,
}

impl AuthLayer {
    /// Authenticates against `clients`, counting failures in `failure_metric{reason}`, in
    /// `shared` while it answers, else in `failures`.
    pub fn new(
        clients: Arc<ClientTable>,
        failures: Arc<AuthFailureLimiter>,
        trusted: TrustedProxies,
        failure_metric: IntCounterVec,
        shared: Option<Arc<SharedState>>,
    ) -> Self {
        let failure_quota = (failures.interval, failures.burst);
        Self {
            clients,
            failures,
            trusted,
            failure_metric,
            shared,
            failure_quota,
            oauth: None,
        }
    }

    /// Also accepts the access tokens of `oauth`'s apps.
    pub fn with_oauth(mut self, oauth: Option<Arc<OAuthApps>>) -> Self {
        self.oauth = oauth.filter(|o| !o.is_empty());
        self
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

/// Why a credential was not accepted: missing, malformed, unknown or wrong (the `reason` label
/// of the failure metric).
#[derive(Debug, Clone, Copy)]
struct Refusal(&'static str);

/// Hash compared against when the key id is unknown, so both failures cost the same.
const DECOY_HASH: [u8; 32] = [0x5a; 32];

impl AuthLayer {
    /// The client, or why not; and the key-id bucket a failure counts against (`None` when
    /// no key id could be read).
    fn authenticate<B>(
        &self,
        request: &Request<B>,
    ) -> (Result<Arc<Client>, Refusal>, Option<FailureKey>) {
        let credential = match parse_credential(request.headers().get(header::AUTHORIZATION)) {
            Ok(credential) => credential,
            Err(crate::frappe::auth_header::CredentialError::Missing) => {
                return (Err(Refusal("missing")), None)
            }
            Err(crate::frappe::auth_header::CredentialError::Malformed) => {
                return (Err(Refusal("malformed")), None)
            }
        };
        let client = self.clients.by_key_id.get(&credential.key_id);
        let bucket = match client {
            Some(c) => FailureKey::KeyId(c.name.clone()),
            None => FailureKey::UnknownKeyIds,
        };
        // The secret is checked before any failure quota is looked at: a key id over its quota
        // must not refuse the secret that matches (see the module docs).
        let expected = client.map_or(&DECOY_HASH, |c| &c.secret_sha256);
        let presented: [u8; 32] = Sha256::digest(credential.secret.as_bytes()).into();
        let matches: bool = presented.ct_eq(expected).into();
        let result = match client {
            Some(client) if matches => Ok(client.clone()),
            Some(_) => Err(Refusal("wrong_secret")),
            None => Err(Refusal("unknown_key")),
        };
        (result, Some(bucket))
    }
}

impl<S> Service<Request<Body>> for Auth<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Either<EarlyReturn<S::Future>, BoxResponseFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        if let Some(name) = repeated_singleton(request.headers()) {
            return Either::Left(EarlyReturn::error(GatewayError::BadRequest(format!(
                "the {name} header must appear once"
            ))));
        }
        let peer = request
            .extensions()
            .get::<PeerAddr>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.0.ip());
        let ip = self.layer.trusted.client_ip(peer, request.headers());
        let address = FailureKey::address(ip);
        // A Bearer access token of the site's OAuth provider, not a gateway key.
        if let Some(oauth) = self.layer.oauth.clone() {
            let token = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer_access_token)
                .map(str::to_owned);
            if let Some(token) = token {
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                let layer = self.layer.clone();
                return Either::Right(Box::pin(
                    layer.oauth_request(oauth, token, request, address, ip, inner),
                ));
            }
        }
        let (result, key_bucket) = self.layer.authenticate(&request);
        match result {
            // A valid credential is never refused for what others did from its address or with
            // its key id.
            Ok(client) => {
                if let Some(tags) = RequestTags::of(&request) {
                    let _ = tags.client.set(client.name.clone());
                }
                request.headers_mut().remove(header::AUTHORIZATION);
                request.extensions_mut().insert(client);
                Either::Left(EarlyReturn::inner(self.inner.call(request)))
            }
            Err(Refusal(reason)) => {
                tracing::info!(%ip, reason, "authentication failed");
                match self.layer.shared.clone().filter(|s| s.is_up()) {
                    None => {
                        let throttled = self.layer.count_locally(address, key_bucket);
                        Either::Left(EarlyReturn::error(self.layer.refusal(reason, throttled)))
                    }
                    Some(shared) => {
                        let layer = self.layer.clone();
                        Either::Right(Box::pin(async move {
                            let throttled = layer.count_shared(&shared, address, key_bucket).await;
                            Err(layer.refusal(reason, throttled).into())
                        }))
                    }
                }
            }
        }
    }
}

impl AuthLayer {
    /// An OAuth request: the token's app and user, then the layers inside; or its refusal (a
    /// bad token counts as a failed authentication of its address, as a bad key does).
    async fn oauth_request<S>(
        self,
        oauth: Arc<OAuthApps>,
        token: String,
        mut request: Request<Body>,
        address: FailureKey,
        ip: IpAddr,
        inner: S,
    ) -> Result<Response<Body>, BoxError>
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
    {
        let blocked = self.failures.blocked_for(&address);
        let site = oauth.site_for(&request);
        match oauth.authenticate(&token, site, blocked).await {
            Ok((client, user)) => {
                if let Some(tags) = RequestTags::of(&request) {
                    let _ = tags.client.set(client.name.clone());
                }
                request.headers_mut().remove(header::AUTHORIZATION);
                request.extensions_mut().insert(client);
                request.extensions_mut().insert(user);
                inner.oneshot(request).await
            }
            Err(OAuthRefusal::Invalid(reason)) => {
                tracing::info!(%ip, reason, "authentication failed");
                let throttled = match self.shared.clone().filter(|s| s.is_up()) {
                    None => self.count_locally(address, None),
                    Some(shared) => self.count_shared(&shared, address, None).await,
                };
                Err(self.refusal(reason, throttled).into())
            }
            Err(OAuthRefusal::Throttled(retry_after)) => {
                Err(self.refusal("throttled", Some(retry_after)).into())
            }
            Err(OAuthRefusal::UserQuota(retry_after, app)) => {
                if let Some(tags) = RequestTags::of(&request) {
                    let _ = tags.client.set(app);
                }
                Err(GatewayError::TooManyRequests {
                    message: "this user is over the app's request quota",
                    retry_after,
                }
                .into())
            }
            Err(OAuthRefusal::Unavailable(error)) => Err(error.into()),
        }
    }

    /// The answer to a refused credential: 429 while throttled, else 401.
    fn refusal(&self, reason: &'static str, throttled: Option<Duration>) -> GatewayError {
        match throttled {
            Some(retry_after) => {
                self.failure_metric.with_label_values(&["throttled"]).inc();
                GatewayError::AuthThrottled { retry_after }
            }
            None => {
                self.failure_metric.with_label_values(&[reason]).inc();
                GatewayError::Unauthenticated(reason)
            }
        }
    }

    /// Counts a failure against its address and key id here (each unless already blocked); how
    /// long they are now blocked, if they are.
    fn count_locally(&self, address: FailureKey, key: Option<FailureKey>) -> Option<Duration> {
        let limiter = &self.failures;
        let count = |bucket: FailureKey| {
            limiter
                .blocked_for(&bucket)
                .or_else(|| limiter.record_failure(bucket))
        };
        let by_address = count(address);
        let by_key = key.and_then(count);
        by_address.max(by_key)
    }

    /// [`Self::count_locally`] on quotas shared by every replica: a bucket found over its
    /// quota is blocked here and, by message, on every other replica.
    async fn count_shared(
        &self,
        shared: &SharedState,
        address: FailureKey,
        key: Option<FailureKey>,
    ) -> Option<Duration> {
        let limiter = &self.failures;
        let mut already = None;
        let mut buckets: Vec<FailureKey> = Vec::with_capacity(2);
        for bucket in std::iter::once(address.clone()).chain(key.clone()) {
            match limiter.blocked_for(&bucket) {
                Some(wait) => already = already.max(Some(wait)),
                None => buckets.push(bucket),
            }
        }
        if buckets.is_empty() {
            return already;
        }
        let names: Vec<String> = buckets
            .iter()
            .map(|b| {
                shared.key(&format!(
                    "af:{}:{}:{}",
                    b.bucket(),
                    self.failure_quota.1,
                    self.failure_quota.0.as_micros()
                ))
            })
            .collect();
        let charges: Vec<Charge<'_>> = names
            .iter()
            .map(|name| Charge {
                key: name,
                interval: self.failure_quota.0,
                burst: self.failure_quota.1,
                want: 1,
            })
            .collect();
        let Ok(verdicts) = shared.charge(&charges, Mode::Each).await else {
            shared.count_fallback("auth_failures");
            return self.count_locally(address, key);
        };
        let mut throttled = already;
        for (bucket, verdict) in buckets.into_iter().zip(verdicts) {
            if !verdict.allowed {
                let wait = verdict.wait.max(Duration::from_secs(1));
                shared.broadcast(Message::Block {
                    bucket: bucket.bucket(),
                    millis: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                });
                limiter.block(bucket, wait);
                throttled = throttled.max(Some(wait));
            }
        }
        throttled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_share_their_slash_64_and_ipv4_stands_alone() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(FailureKey::address(a), FailureKey::address(b));
        assert_ne!(FailureKey::address(a), FailureKey::address(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(
            FailureKey::address(mapped),
            FailureKey::Address("192.0.2.7".parse().unwrap())
        );
        assert_ne!(
            FailureKey::address("192.0.2.7".parse().unwrap()),
            FailureKey::address("192.0.2.8".parse().unwrap())
        );
    }

    #[test]
    fn a_rotating_ipv6_guesser_is_throttled_on_its_slash_64() {
        let limiter = AuthFailureLimiter::new(NonZeroU32::MIN, NonZeroU32::new(3).unwrap());
        let mut throttled = false;
        for i in 0..4u16 {
            let ip: IpAddr = format!("2001:db8:1:2::{i:x}").parse().unwrap();
            throttled = limiter.record_failure(FailureKey::address(ip)).is_some();
        }
        assert!(throttled);
        let elsewhere: IpAddr = "2001:db8:9::1".parse().unwrap();
        assert!(limiter
            .blocked_for(&FailureKey::address(elsewhere))
            .is_none());
    }
}
