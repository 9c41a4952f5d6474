//! OAuth apps: a `Bearer` access token issued by a site's own OAuth 2.0 provider is checked at
//! that site (RFC 7662 introspection, see [`crate::frappe::oauth`]) and, when it is an active,
//! unexpired token of a configured app, the request goes on as that app, with the user's own
//! token sent to Frappe (so Frappe applies the user's permissions).
//!
//! - **Cheap**: answers are remembered, keyed by a SHA-256 of the token (never the token) in
//!   the case-folded form Frappe's case-insensitive lookup finds it by
//!   ([`crate::frappe::oauth::token_lookup_form`]), bounded in bytes, each for
//!   `min(exp, introspection_ttl)` (an inactive answer for the longest ttl, so a stranger's
//!   garbage tokens do not each cost the site a call); concurrent first uses of one token
//!   make one call (moka's `try_get_with`).
//! - **Prompt**: a revoked token stops working once its answer expires (30 s by default).
//! - **Never a guess**: an introspection that fails (site down, breaker open, timeout, an answer
//!   that is not one) is a 503 for that request, never an accepted token, and is not
//!   remembered. Calls go through the site's circuit breaker, under its `timeouts.total`.
//! - **Per user**: each token is one user (its `sub` with the `openid` scope, else the hash of
//!   its case-folded form, so case variants are one user); the user's key keys per-user
//!   quotas and the cache (see `layers::route`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::{header, HeaderValue, Request};
use http_body_util::BodyExt;
use prometheus::IntCounterVec;
use sha2::{Digest, Sha256};

use crate::error::GatewayError;
use crate::frappe::headers::X_FRAPPE_SITE_NAME;
use crate::frappe::oauth::{
    introspection_body, parse_introspection, token_lookup_form, INTROSPECT_PATH,
};
use crate::frappe::CanonicalPath;
use crate::full_body;
use crate::layers::auth::Client;
use crate::routing::Router;
use crate::site::{ServiceAccount, Site};

/// A configured app.
#[derive(Debug)]
pub struct App {
    /// The app as the layers inside see a client: name, rules, quotas, in-flight slots.
    pub client: Arc<Client>,
    /// How long an introspection is trusted.
    pub ttl: Duration,
    /// Each user's own quota, when configured.
    pub per_user: Option<DefaultKeyedRateLimiter<[u8; 32]>>,
    /// Users seen since the per-user limiter last forgot idle ones.
    since_sweep: AtomicU32,
}

impl App {
    /// An app for `client`, trusting introspections for `ttl`, with an optional per-user quota.
    pub fn new(client: Client, ttl: Duration, per_user: Option<Quota>) -> Self {
        Self {
            client: Arc::new(client),
            ttl,
            per_user: per_user.map(RateLimiter::keyed),
            since_sweep: AtomicU32::new(0),
        }
    }
}

/// The signed-in user of an OAuth request, in its extensions for routing.
#[derive(Debug, Clone)]
pub struct OAuthUser {
    /// The user's own `Authorization: Bearer <token>`, marked sensitive: what Frappe gets.
    pub authorization: HeaderValue,
    /// Who the user is, as a hash: of the `sub` claim, else of the token's case-folded form.
    pub key: [u8; 32],
}

impl OAuthUser {
    /// The identity the user's requests are signed (and their answers cached) as on `site`:
    /// never shared with a service account's or another user's.
    pub fn account(&self, site: &Site, app: &str) -> ServiceAccount {
        ServiceAccount {
            name: app.into(),
            authorization: self.authorization.clone(),
            identity: crate::site::identity_of(&[
                site.site_name.as_bytes(),
                site.host.as_bytes(),
                b"oauth-user",
                &self.key,
            ]),
        }
    }
}

/// What the site said, remembered.
#[derive(Debug)]
enum Verdict {
    Active {
        client_id: String,
        /// Unix seconds.
        exp: Option<i64>,
        user: [u8; 32],
    },
    Inactive,
}

/// Why a token was not accepted.
#[derive(Debug)]
pub enum Refusal {
    /// Not a valid token of a configured app: 401, counted as a failed authentication.
    Invalid(&'static str),
    /// The user is over the app's per-user quota: 429 (the app's name, for the metrics).
    UserQuota(Duration, Arc<str>),
    /// A token not known good, from an address over its failure quota: 429, not looked up.
    Throttled(Duration),
    /// The site could not say: 503.
    Unavailable(GatewayError),
}

/// The apps and what their tokens were found to be.
pub struct OAuthApps {
    apps: HashMap<String, Arc<App>>,
    router: Arc<Router>,
    /// The one site every app is on, if they share one: where a request no route matches goes.
    only_site: Option<String>,
    longest_ttl: Duration,
    verdicts: moka::future::Cache<[u8; 32], Arc<Verdict>>,
    introspections: IntCounterVec,
}

impl std::fmt::Debug for OAuthApps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthApps")
            .field("apps", &self.apps.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Each remembered answer lives for the time it was computed to be valid.
struct VerdictExpiry {
    ttls: HashMap<String, Duration>,
    longest: Duration,
}

impl moka::Expiry<[u8; 32], Arc<Verdict>> for VerdictExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        verdict: &Arc<Verdict>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(match &**verdict {
            Verdict::Inactive => self.longest,
            Verdict::Active { client_id, exp, .. } => {
                let ttl = self.ttls.get(client_id).copied().unwrap_or(self.longest);
                match exp {
                    Some(exp) => ttl.min(Duration::from_secs(
                        u64::try_from(*exp - unix_now()).unwrap_or(0),
                    )),
                    None => ttl,
                }
            }
        })
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl OAuthApps {
    /// `apps` by `client_id`; at most `cache_bytes` of remembered answers;
    /// `introspections{site,outcome}` counts the calls.
    pub fn new(
        apps: HashMap<String, Arc<App>>,
        router: Arc<Router>,
        cache_bytes: u64,
        introspections: IntCounterVec,
    ) -> Self {
        let mut sites: Vec<&str> = apps.values().map(|a| a.client.site.as_str()).collect();
        sites.dedup();
        let only_site = (sites.len() == 1).then(|| sites[0].to_owned());
        let longest_ttl = apps
            .values()
            .map(|a| a.ttl)
            .max()
            .unwrap_or(Duration::from_secs(30));
        let expiry = VerdictExpiry {
            ttls: apps.iter().map(|(id, a)| (id.clone(), a.ttl)).collect(),
            longest: longest_ttl,
        };
        let verdicts = moka::future::Cache::builder()
            .max_capacity(cache_bytes)
            // A key and an answer: the client id and the fixed parts.
            .weigher(|_key: &[u8; 32], verdict: &Arc<Verdict>| match &**verdict {
                Verdict::Active { client_id, .. } => {
                    u32::try_from(128 + client_id.len()).unwrap_or(u32::MAX)
                }
                Verdict::Inactive => 64,
            })
            .expire_after(expiry)
            .build();
        Self {
            apps,
            router,
            only_site,
            longest_ttl,
            verdicts,
            introspections,
        }
    }

    /// The same apps, remembered answers and quota state over a new `router` (a reload that
    /// left the apps' settings alone).
    pub fn with_router(&self, router: Arc<Router>) -> Self {
        Self {
            apps: self.apps.clone(),
            router,
            only_site: self.only_site.clone(),
            longest_ttl: self.longest_ttl,
            verdicts: self.verdicts.clone(),
            introspections: self.introspections.clone(),
        }
    }

    /// Whether any app is configured.
    pub fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }

    /// The app and user of `token`, or why not.
    /// `address_blocked` when the request's address is over its failure quota: only a token
    /// already known passes then (a valid token is not refused for its neighbours' guesses,
    /// and guesses cost the site nothing).
    /// `site` is [`Self::site_for`] the request.
    pub async fn authenticate(
        &self,
        token: &str,
        site: Option<Arc<Site>>,
        address_blocked: Option<Duration>,
    ) -> Result<(Arc<Client>, OAuthUser), Refusal> {
        let site = site.ok_or(Refusal::Invalid("oauth_no_site"))?;
        // Keyed on the form Frappe looks the token up by, so every case variant of one token
        // shares one introspection and (without `sub`) one per-user quota.
        let folded = token_lookup_form(token).ok_or(Refusal::Invalid("malformed"))?;
        let key: [u8; 32] = Sha256::digest(folded.as_bytes()).into();
        if let Some(retry_after) = address_blocked {
            if self.verdicts.get(&key).await.is_none() {
                return Err(Refusal::Throttled(retry_after));
            }
        }
        let verdict = self
            .verdicts
            .try_get_with(key, self.introspect(&site, token, key))
            .await
            .map_err(|e| Refusal::Unavailable((*e).clone()))?;
        let Verdict::Active {
            client_id,
            exp,
            user,
        } = &*verdict
        else {
            return Err(Refusal::Invalid("oauth_inactive"));
        };
        if exp.is_some_and(|exp| exp <= unix_now()) {
            return Err(Refusal::Invalid("oauth_expired"));
        }
        let app = self
            .apps
            .get(client_id)
            .ok_or(Refusal::Invalid("oauth_unknown_app"))?;
        // A token is only good on the site whose provider issued it.
        if *app.client.site != *site.name {
            return Err(Refusal::Invalid("oauth_other_site"));
        }
        if let Some(limiter) = &app.per_user {
            if app.since_sweep.fetch_add(1, Ordering::Relaxed) >= 10_000 {
                app.since_sweep.store(0, Ordering::Relaxed);
                limiter.retain_recent();
            }
            if let Err(not_until) = limiter.check_key(user) {
                use governor::clock::Clock as _;
                let now = governor::clock::DefaultClock::default().now();
                return Err(Refusal::UserQuota(
                    not_until.wait_time_from(now),
                    app.client.name.clone(),
                ));
            }
        }
        let mut authorization = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| Refusal::Invalid("malformed"))?;
        authorization.set_sensitive(true);
        Ok((
            app.client.clone(),
            OAuthUser {
                authorization,
                key: *user,
            },
        ))
    }

    /// The site a request goes to: its route's, else the one site all apps share.
    pub fn site_for<B>(&self, request: &Request<B>) -> Option<Arc<Site>> {
        let host = request.uri().authority().map(|a| a.as_str()).or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        });
        let mut path = CanonicalPath::parse(request.uri().path()).ok()?;
        let fallback = self.only_site.as_deref().unwrap_or("");
        self.router
            .route(host, &mut path, fallback)
            .map(|routed| routed.site)
    }

    /// Asks `site` about `token`.
    async fn introspect(
        &self,
        site: &Arc<Site>,
        token: &str,
        key: [u8; 32],
    ) -> Result<Arc<Verdict>, GatewayError> {
        let unavailable = || GatewayError::BreakerOpen {
            site: site.name.to_string(),
            retry_after: Duration::from_secs(1),
        };
        let mut request = Request::post(INTROSPECT_PATH)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(full_body(introspection_body(token)))
            .map_err(|_| unavailable())?;
        let headers = request.headers_mut();
        headers.insert(header::HOST, site.host.clone());
        headers.insert(X_FRAPPE_SITE_NAME.clone(), site.site_name.clone());
        // Introspection is open to guests: no credential goes with it, straight to the site's
        // upstream through its breaker (not through the request path, whose layers sit above).
        let call = site.through_breaker(|| {
            let site = site.clone();
            async move {
                let timeout = site.upstream.request_timeout();
                site.upstream.send(request, timeout).await
            }
        });
        let outcome = match tokio::time::timeout(site.total_timeout, call).await {
            Ok(Ok(response)) if response.status().is_success() => {
                let body = http_body_util::Limited::new(response.into_body(), 64 << 10)
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .ok();
                body.as_deref().and_then(parse_introspection)
            }
            Ok(Ok(response)) => {
                tracing::warn!(site = %site.name, status = %response.status(), "token introspection failed");
                None
            }
            Ok(Err(error)) => {
                tracing::warn!(site = %site.name, %error, "token introspection failed");
                if let Some(e) = crate::error::find_cause::<GatewayError>(error.as_ref()) {
                    self.count(site, "error");
                    return Err(e.clone());
                }
                None
            }
            Err(_) => {
                tracing::warn!(site = %site.name, "token introspection timed out");
                None
            }
        };
        let Some(answer) = outcome else {
            self.count(site, "error");
            return Err(unavailable());
        };
        let verdict = match answer {
            crate::frappe::oauth::Introspection {
                active: true,
                client_id: Some(client_id),
                exp,
                sub,
                ..
            } => {
                self.count(site, "active");
                let user = match sub {
                    Some(sub) => Sha256::digest(format!("sub:{sub}").as_bytes()).into(),
                    None => key,
                };
                Verdict::Active {
                    client_id,
                    exp,
                    user,
                }
            }
            _ => {
                self.count(site, "inactive");
                Verdict::Inactive
            }
        };
        Ok(Arc::new(verdict))
    }

    fn count(&self, site: &Site, outcome: &str) {
        self.introspections
            .with_label_values(&[&site.name, outcome])
            .inc();
    }

    /// The longest time an introspection is trusted.
    pub fn longest_ttl(&self) -> Duration {
        self.longest_ttl
    }
}
