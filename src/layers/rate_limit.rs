//! Per-client rate limits: a GCRA quota (governor) for all requests, and an optional separate
//! quota for writes. Each client's limiters are its own, so one client exhausting its quota
//! never affects another. Every response to a limited client carries the IETF
//! `RateLimit-Policy` / `RateLimit` headers (draft-ietf-httpapi-ratelimit-headers) and the
//! common `X-RateLimit-Limit/Remaining/Reset`; an exhausted quota gets 429
//! `TooManyRequestsError` with `Retry-After`.
//!
//! After classification (a write quota needs to know what a request does) and before the
//! access rules, so that probing the rules costs quota too.
//!
//! With `shared_state`, the quotas hold across all replicas: the same GCRA runs in Redis (one
//! script, one round trip for both quotas, see [`crate::shared_state::gcra`]) and the headers
//! are computed from the shared state. While Redis is down each replica falls back to its own
//! limiter (counted in `erpgate_shared_state_fallbacks_total{what="quota"}`): up to the quota
//! per replica, until Redis answers again.
//!
//! How GCRA maps to the headers: the quota `q` is the burst, the window `w` the time to refill
//! a whole burst, the remaining `r` the burst capacity left now, and the reset `t` the seconds
//! until the capacity is whole again (or, when exhausted, until the next request is allowed).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response};
use pin_project_lite::pin_project;
use prometheus::IntCounterVec;
use tower::{Layer, Service};

use crate::error::{GatewayError, WithHeaders};
use crate::frappe::FrappeRequest;
use crate::layers::auth::Client;
use crate::layers::route::RouteTarget;
use crate::layers::BoxResponseFuture;
use crate::shared_state::gcra::{Charge, Mode, Verdict};
use crate::shared_state::lease::{Fetching, Lease, SharedView};
use crate::shared_state::SharedState;
use crate::{Body, BoxError};

type DirectLimiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// One named quota of one client.
pub struct QuotaPolicy {
    name: &'static str,
    limiter: DirectLimiter,
    burst: u32,
    interval: Duration,
    /// `"name";q=..;w=..`, made once: it never changes.
    policy: HeaderValue,
    /// Its key in the shared state; the quota's shape is part of it, so a changed quota
    /// starts afresh.
    shared_key: String,
    /// Requests leased from the shared quota (`shared_state.quota_batch` > 1).
    lease: Lease,
}

impl std::fmt::Debug for QuotaPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuotaPolicy")
            .field("name", &self.name)
            .field("burst", &self.burst)
            .finish()
    }
}

/// Where one policy stands after a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    name: &'static str,
    policy: HeaderValue,
    limit: u32,
    remaining: u32,
    reset_secs: u64,
    window_secs: u64,
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl QuotaPolicy {
    /// A policy named `name` (`default` or `writes`) enforcing `quota`; `shared_key` names it
    /// in the shared state (the prefix and the client).
    pub fn new(name: &'static str, quota: Quota, shared_key: &str) -> Self {
        let burst = quota.burst_size().get();
        let interval = quota.replenish_interval();
        let window_secs = ceil_secs(interval * burst);
        let policy = HeaderValue::try_from(format!("\"{name}\";q={burst};w={window_secs}"))
            .unwrap_or_else(|_| HeaderValue::from_static("\"default\""));
        Self {
            name,
            limiter: RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>(),
            burst,
            interval,
            policy,
            shared_key: format!("{shared_key}:{name}:{burst}:{}", interval.as_micros()),
            lease: Lease::default(),
        }
    }

    fn usage(&self, remaining: u32, reset: Duration) -> Usage {
        Usage {
            name: self.name,
            policy: self.policy.clone(),
            limit: self.burst,
            remaining,
            reset_secs: ceil_secs(reset),
            window_secs: ceil_secs(self.interval * self.burst),
        }
    }

    fn charge(&self, want: u32) -> Charge<'_> {
        Charge {
            key: &self.shared_key,
            interval: self.interval,
            burst: self.burst,
            want,
        }
    }

    /// Requests to lease per round trip when `quota_batch` allows `max`: never more than a
    /// twentieth of the burst, so small quotas stay exact.
    fn batch(&self, max: u32) -> u32 {
        max.min(self.burst / 20).max(1)
    }

    /// What to ask Redis for: a batch with the fetch it starts, or this request alone (the
    /// quota is small, or another request of this replica is fetching).
    fn plan(&self, max: u32) -> (u32, Option<Fetching<'_>>) {
        match self.batch(max) {
            1 => (1, None),
            batch => match self.lease.start_fetch() {
                Some(fetch) => (batch, Some(fetch)),
                None => (1, None),
            },
        }
    }

    /// A leased request, if this replica holds one.
    fn take_leased(&self) -> Option<Usage> {
        let (left, view) = self.lease.take()?;
        Some(Usage {
            name: self.name,
            policy: self.policy.clone(),
            limit: self.burst,
            remaining: view.remaining.saturating_add(left).min(self.burst),
            reset_secs: u64::from(view.reset_secs),
            window_secs: ceil_secs(self.interval * self.burst),
        })
    }

    /// Keeps what a verdict granted beyond this request, when this request fetched a batch.
    fn keep_lease(&self, verdict: &Verdict, fetch: Option<&Fetching<'_>>) {
        if let Some(fetch) = fetch.filter(|_| verdict.granted > 1) {
            let view = SharedView {
                remaining: verdict.remaining(self.interval, self.burst),
                reset_secs: u32::try_from(ceil_secs(verdict.fill)).unwrap_or(u32::MAX),
            };
            let window = self.interval * self.burst;
            self.lease.fill(fetch, verdict.granted - 1, window, view);
        }
    }

    /// The usage after a shared verdict, or the usage and the wait. Requests leased with this
    /// one count as remaining: this replica will hand them out.
    fn judge(&self, verdict: &Verdict) -> Result<Usage, (Usage, Duration)> {
        if verdict.allowed {
            let leased = verdict.granted.saturating_sub(1);
            let remaining = verdict.remaining(self.interval, self.burst);
            Ok(self.usage(
                remaining.saturating_add(leased).min(self.burst),
                verdict.fill,
            ))
        } else {
            let mut usage = self.usage(0, verdict.wait);
            usage.reset_secs = usage.reset_secs.max(1);
            Err((usage, verdict.wait))
        }
    }

    /// Takes one request from the quota: its usage after, or the usage and how long to wait.
    pub fn check(&self) -> Result<Usage, (Usage, Duration)> {
        let window_secs = ceil_secs(self.interval * self.burst);
        match self.limiter.check() {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Ok(Usage {
                    name: self.name,
                    policy: self.policy.clone(),
                    limit: self.burst,
                    remaining,
                    reset_secs: ceil_secs(self.interval * (self.burst - remaining)),
                    window_secs,
                })
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                let usage = Usage {
                    name: self.name,
                    policy: self.policy.clone(),
                    limit: self.burst,
                    remaining: 0,
                    reset_secs: ceil_secs(wait).max(1),
                    window_secs,
                };
                Err((usage, wait))
            }
        }
    }
}

/// A client's quotas; shared, so a reload that leaves a client's limits alone keeps its state.
#[derive(Debug, Default, Clone)]
pub struct ClientQuotas {
    /// Every request.
    pub requests: Option<Arc<QuotaPolicy>>,
    /// Requests that may change data.
    pub writes: Option<Arc<QuotaPolicy>>,
}

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Writes the headers describing `usages` (the tightest one fills the `X-RateLimit-*` trio).
pub fn write_headers(usages: &[Usage], headers: &mut HeaderMap) {
    let Some(tightest) = usages.iter().min_by_key(|u| u.remaining) else {
        return;
    };
    // On every response: no `format!`, one allocation for the state, the policy made once.
    let mut state = String::with_capacity(40 * usages.len());
    let mut number = itoa::Buffer::new();
    for (i, u) in usages.iter().enumerate() {
        if i > 0 {
            state.push_str(", ");
        }
        state.push('"');
        state.push_str(u.name);
        state.push_str("\";r=");
        state.push_str(number.format(u.remaining));
        state.push_str(";t=");
        state.push_str(number.format(u.reset_secs));
    }
    let policy = match usages {
        [one] => Some(one.policy.clone()),
        _ => {
            let joined: Vec<&str> = usages
                .iter()
                .filter_map(|u| u.policy.to_str().ok())
                .collect();
            HeaderValue::try_from(joined.join(", ")).ok()
        }
    };
    if let Some(policy) = policy {
        headers.insert(RATELIMIT_POLICY.clone(), policy);
    }
    if let Ok(state) = HeaderValue::try_from(state) {
        headers.insert(RATELIMIT.clone(), state);
    }
    headers.insert(X_RATELIMIT_LIMIT.clone(), HeaderValue::from(tightest.limit));
    headers.insert(
        X_RATELIMIT_REMAINING.clone(),
        HeaderValue::from(tightest.remaining),
    );
    headers.insert(
        X_RATELIMIT_RESET.clone(),
        HeaderValue::from(tightest.reset_secs),
    );
}

/// Enforces client quotas.
#[derive(Clone)]
pub struct RateLimitLayer {
    rejected: IntCounterVec,
    shared: Option<Arc<SharedState>>,
}

impl RateLimitLayer {
    /// Counts rejections in `rejected{client,reason}`; keeps quota state in `shared` while it
    /// answers.
    pub fn new(rejected: IntCounterVec, shared: Option<Arc<SharedState>>) -> Self {
        Self { rejected, shared }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`RateLimitLayer`].
#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    layer: RateLimitLayer,
}

/// The quotas one request is charged to (at most two), each with its rejection reason, and its
/// client's name: borrowed from the client, so charging takes no reference count.
struct Applicable<'a> {
    policies: [Option<(&'a QuotaPolicy, &'static str)>; 2],
    client: &'a str,
}

/// What a request charged in the shared state keeps across the Redis round trip.
struct Charged {
    client: Arc<Client>,
    is_write: bool,
}

impl Charged {
    fn applicable(&self) -> Applicable<'_> {
        Applicable::of(&self.client, self.is_write)
    }
}

impl<'a> Applicable<'a> {
    fn of(client: &'a Client, is_write: bool) -> Self {
        let quotas = &client.quotas;
        Applicable {
            policies: [
                quotas.requests.as_deref().map(|p| (p, "rate")),
                quotas
                    .writes
                    .as_deref()
                    .filter(|_| is_write)
                    .map(|p| (p, "write_rate")),
            ],
            client: &client.name,
        }
    }

    fn is_empty(&self) -> bool {
        self.policies.iter().all(Option::is_none)
    }
}

impl RateLimitLayer {
    /// Whether `request` counts against its client's write quota (asked only when it has one).
    fn is_write(request: &Request<Body>) -> bool {
        match (
            request.extensions().get::<FrappeRequest>(),
            request.extensions().get::<RouteTarget>(),
        ) {
            (Some(classified), Some(target)) => {
                classified.is_write(request.method(), &target.site.read_only_methods)
            }
            _ => request.method() != Method::GET && request.method() != Method::HEAD,
        }
    }

    /// The usages to report, or the rejection; `judge` gives each policy's verdict.
    fn decide(
        &self,
        applicable: &Applicable<'_>,
        mut judge: impl FnMut(usize, &QuotaPolicy) -> Result<Usage, (Usage, Duration)>,
    ) -> Result<Vec<Usage>, BoxError> {
        let mut usages = Vec::with_capacity(2);
        for (i, (policy, reason)) in applicable.policies.iter().flatten().enumerate() {
            match judge(i, policy) {
                Ok(usage) => usages.push(usage),
                Err((usage, wait)) => {
                    usages.push(usage);
                    self.rejected
                        .with_label_values(&[applicable.client, reason])
                        .inc();
                    let mut headers = HeaderMap::new();
                    write_headers(&usages, &mut headers);
                    let source = GatewayError::TooManyRequests {
                        message: "rate limit exceeded",
                        retry_after: wait,
                    };
                    return Err(Box::new(WithHeaders {
                        headers,
                        source: source.into(),
                    }));
                }
            }
        }
        Ok(usages)
    }

    /// Charges the quotas in this replica's limiters.
    fn charge_locally(&self, applicable: &Applicable<'_>) -> Result<Vec<Usage>, BoxError> {
        self.decide(applicable, |_, policy| policy.check())
    }

    /// Hands out a leased request for every quota of the request, or none (a request
    /// charged to two quotas may find only one leased: that one is given back).
    fn take_leased(applicable: &Applicable<'_>) -> Option<Vec<Usage>> {
        let mut usages = Vec::with_capacity(2);
        for (policy, _) in applicable.policies.iter().flatten() {
            match policy.take_leased() {
                Some(usage) => usages.push(usage),
                None => {
                    for (taken, _) in applicable.policies.iter().flatten().take(usages.len()) {
                        taken.lease.give_back();
                    }
                    return None;
                }
            }
        }
        Some(usages)
    }

    /// Charges the quotas in the shared state, or locally when it does not answer. With
    /// `quota_batch` > 1, a request that finds no fetch under way asks for a batch and leaves
    /// the rest of what is granted to this replica's lease.
    async fn charge_shared(
        &self,
        shared: &SharedState,
        applicable: &Applicable<'_>,
    ) -> Result<Vec<Usage>, BoxError> {
        let max = shared.quota_batch();
        if max > 1 {
            // A batch may have arrived since the request looked.
            if let Some(usages) = Self::take_leased(applicable) {
                return Ok(usages);
            }
        }
        let (charged, fetches) = match applicable.policies {
            [Some((a, _)), Some((b, _))] => {
                let ((want_a, fetch_a), (want_b, fetch_b)) = (a.plan(max), b.plan(max));
                let charges = [a.charge(want_a), b.charge(want_b)];
                (shared.charge(&charges, Mode::All).await, [fetch_a, fetch_b])
            }
            [Some((one, _)), None] | [None, Some((one, _))] => {
                let (want, fetch) = one.plan(max);
                (
                    shared.charge(&[one.charge(want)], Mode::All).await,
                    [fetch, None],
                )
            }
            [None, None] => return Ok(Vec::new()),
        };
        match charged {
            Ok(verdicts) => self.decide(applicable, |i, policy| match verdicts.get(i) {
                Some(verdict) => {
                    policy.keep_lease(verdict, fetches[i].as_ref());
                    policy.judge(verdict)
                }
                None => policy.check(),
            }),
            Err(_) => {
                shared.count_fallback("quota");
                self.charge_locally(applicable)
            }
        }
    }
}

impl<S> Service<Request<Body>> for RateLimit<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = futures_util::future::Either<RateLimitFuture<S::Future>, BoxResponseFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        use futures_util::future::Either;
        let passed = |future| {
            Either::Left(RateLimitFuture::Inner {
                future,
                usages: Vec::new(),
            })
        };
        let Some(client) = request.extensions().get::<Arc<Client>>() else {
            return passed(self.inner.call(request));
        };
        let is_write = client.quotas.writes.is_some() && RateLimitLayer::is_write(&request);
        let applicable = Applicable::of(client, is_write);
        if applicable.is_empty() {
            return passed(self.inner.call(request));
        }
        match self.layer.shared.as_ref().filter(|s| s.is_up()) {
            None => {
                let charged = self.layer.charge_locally(&applicable);
                Either::Left(match charged {
                    Ok(usages) => RateLimitFuture::Inner {
                        future: self.inner.call(request),
                        usages,
                    },
                    Err(e) => RateLimitFuture::Ready { error: Some(e) },
                })
            }
            Some(shared) => {
                if shared.quota_batch() > 1 {
                    if let Some(usages) = RateLimitLayer::take_leased(&applicable) {
                        return Either::Left(RateLimitFuture::Inner {
                            future: self.inner.call(request),
                            usages,
                        });
                    }
                }
                let shared = shared.clone();
                let charged = Charged {
                    client: client.clone(),
                    is_write,
                };
                // The inner service was made ready by `poll_ready`: it goes with the request.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let layer = self.layer.clone();
                Either::Right(Box::pin(async move {
                    let usages = layer.charge_shared(&shared, &charged.applicable()).await?;
                    RateLimitFuture::Inner {
                        future: inner.call(request),
                        usages,
                    }
                    .await
                }))
            }
        }
    }
}

pin_project! {
    /// Adds the rate-limit headers to the inner response, or answers 429.
    #[project = RateLimitProj]
    pub enum RateLimitFuture<F> {
        Ready { error: Option<BoxError> },
        Inner { #[pin] future: F, usages: Vec<Usage> },
    }
}

impl<F> std::future::Future for RateLimitFuture<F>
where
    F: std::future::Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RateLimitProj::Ready { error } => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| "polled after completion".into()))),
            RateLimitProj::Inner { future, usages } => {
                Poll::Ready(match std::task::ready!(future.poll(cx)) {
                    Ok(mut response) => {
                        write_headers(usages, response.headers_mut());
                        Ok(response)
                    }
                    // Error answers (403, 502, 503, 504) describe the quota too.
                    Err(source) if !usages.is_empty() => {
                        let mut headers = HeaderMap::new();
                        write_headers(usages, &mut headers);
                        Err(Box::new(WithHeaders { headers, source }))
                    }
                    Err(source) => Err(source),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    #[test]
    fn a_burst_is_spent_then_refused_with_a_wait() {
        let policy = QuotaPolicy::new(
            "default",
            Quota::per_second(NonZeroU32::new(2).unwrap()).allow_burst(NonZeroU32::new(3).unwrap()),
            "erpgate:rl:shop",
        );
        let remaining: Vec<u32> = (0..3).map(|_| policy.check().unwrap().remaining).collect();
        assert_eq!(remaining, vec![2, 1, 0]);
        let (usage, wait) = policy.check().unwrap_err();
        assert_eq!(usage.remaining, 0);
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert_eq!(usage.window_secs, 2); // 3 requests at 2/s refill in 1.5 s
    }

    #[test]
    fn small_quotas_are_never_leased_in_batches() {
        let quota = |burst| {
            QuotaPolicy::new(
                "default",
                Quota::per_minute(NonZeroU32::new(burst).unwrap()),
                "erpgate:rl:shop",
            )
        };
        assert_eq!(quota(10).batch(50), 1);
        assert_eq!(quota(100).batch(50), 5);
        assert_eq!(quota(100_000).batch(50), 50);
        assert_eq!(quota(100_000).batch(1), 1);
    }

    #[test]
    fn headers() {
        let usages = [
            Usage {
                name: "default",
                policy: HeaderValue::from_static("\"default\";q=40;w=2"),
                limit: 40,
                remaining: 39,
                reset_secs: 1,
                window_secs: 2,
            },
            Usage {
                name: "writes",
                policy: HeaderValue::from_static("\"writes\";q=5;w=5"),
                limit: 5,
                remaining: 2,
                reset_secs: 3,
                window_secs: 5,
            },
        ];
        let mut h = HeaderMap::new();
        write_headers(&usages, &mut h);
        assert_eq!(
            h["ratelimit-policy"],
            "\"default\";q=40;w=2, \"writes\";q=5;w=5"
        );
        assert_eq!(h["ratelimit"], "\"default\";r=39;t=1, \"writes\";r=2;t=3");
        assert_eq!(h["x-ratelimit-limit"], "5");
        assert_eq!(h["x-ratelimit-remaining"], "2");
        assert_eq!(h["x-ratelimit-reset"], "3");
    }
}
