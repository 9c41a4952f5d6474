//! `Idempotency-Key` (IETF httpapi draft) on POST, PUT, PATCH and DELETE: no duplicate Sales
//! Orders when an integration repeats a request it is unsure about.
//!
//! The first request with a key runs; its outcome is kept per (client, key) for `ttl` with a
//! fingerprint of method, path, query and body. A repeat with the same fingerprint gets the kept
//! response again with `Idempotent-Replayed: true`; a repeat while the first is still running
//! gets 409; the same key with a different request gets 422. Requests without the header pass
//! untouched.
//!
//! The first request runs on its own task, so a client that hangs up does not leave its key
//! stuck "in flight": the outcome is recorded anyway and the repeat replays it. An outcome that
//! proves the request never reached Frappe (refused connection, open breaker, a limit) is not
//! kept, so the repeat runs; a timeout or broken connection (Frappe may have acted) is kept and
//! replayed. A response body over `max_response_bytes` is passed through but only its status and
//! headers are kept: a repeat gets them with an empty body.
//!
//! The records sit behind [`IdempotencyStore`], so a shared store can replace the in-memory one.
//! In memory, each client has its own byte budget: one client's traffic never evicts another's
//! records, and a request still running is never evicted at all.
//!
//! After the access rules (a refused request is never recorded) and before the deadline and
//! retries (a replay costs nothing upstream).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use prometheus::IntCounterVec;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use sha2::{Digest, Sha256};
use tower::{Layer, Service};

use crate::error::{find_cause, GatewayError};
use crate::layers::auth::Client;
use crate::layers::BoxResponseFuture;
use crate::upstream::ReplayableBody;
use crate::{empty_body, full_body, Body, BoxError};

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Whose key: keys are private to each client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordKey {
    /// The client's configured name.
    pub client: Arc<str>,
    /// The `Idempotency-Key` value.
    pub key: String,
}

/// A kept outcome.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A response, whole.
    Response {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    /// A response whose body was too large to keep.
    Truncated {
        status: StatusCode,
        headers: HeaderMap,
    },
    /// A gateway error after the request may have reached Frappe.
    Error(GatewayError),
}

impl Outcome {
    fn weight(&self) -> usize {
        let headers = |h: &HeaderMap| {
            h.iter()
                .map(|(k, v)| k.as_str().len() + v.len())
                .sum::<usize>()
        };
        match self {
            Self::Response {
                headers: h, body, ..
            } => headers(h) + body.len(),
            Self::Truncated { headers: h, .. } => headers(h),
            Self::Error(_) => 64,
        }
    }
}

/// What a store says about a key when a request arrives.
#[derive(Debug)]
pub enum Begin {
    /// New key: run the request, then `finish` or `abandon`.
    Run,
    /// Done before: replay.
    Replay(Outcome),
    /// Still running.
    InFlight,
    /// Used for a different request.
    Mismatch,
}

/// Where idempotency records live.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `key` for a request with `fingerprint`, atomically.
    fn begin(&self, key: &RecordKey, fingerprint: [u8; 32]) -> Begin;
    /// Keeps the outcome of the claimed request.
    fn finish(&self, key: RecordKey, fingerprint: [u8; 32], outcome: Outcome);
    /// Releases a claim whose request never reached the site.
    fn abandon(&self, key: &RecordKey);
}

#[derive(Debug)]
struct Record {
    fingerprint: [u8; 32],
    outcome: Outcome,
}

/// A request running under a key: never evicted, it lives until it finishes, is abandoned, or
/// its lease ends (a claim older than the lease is taken over).
#[derive(Debug, Clone, Copy)]
struct Claim {
    fingerprint: [u8; 32],
    since: Instant,
}

/// Records in memory: kept outcomes in one byte-bounded LRU *per client* (one client's traffic
/// can never evict another's records), each for `ttl`; claims in flight apart, never evicted by
/// size.
pub struct MemoryStore {
    ttl: Duration,
    max_bytes_per_client: u64,
    /// Outcomes, by client, then by key.
    done: DashMap<Arc<str>, moka::sync::Cache<String, Arc<Record>>>,
    /// Requests running now.
    claims: DashMap<RecordKey, Claim>,
    /// Records evicted for room, by client.
    evictions: IntCounterVec,
}

impl MemoryStore {
    /// Keeps each client's records for `ttl` in at most about `max_bytes_per_client`, counting
    /// evictions for room in `evictions{client}`.
    pub fn new(ttl: Duration, max_bytes_per_client: u64, evictions: IntCounterVec) -> Self {
        Self {
            ttl,
            max_bytes_per_client,
            done: DashMap::new(),
            claims: DashMap::new(),
            evictions,
        }
    }

    /// The client's records, made on first use.
    fn records(&self, client: &Arc<str>) -> moka::sync::Cache<String, Arc<Record>> {
        if let Some(records) = self.done.get(client) {
            return records.clone();
        }
        let evicted = self.evictions.with_label_values(&[client]);
        self.done
            .entry(client.clone())
            .or_insert_with(|| {
                moka::sync::Cache::builder()
                    .time_to_live(self.ttl)
                    .max_capacity(self.max_bytes_per_client)
                    // LRU admits every new record; moka's default (TinyLFU) may turn one away.
                    .eviction_policy(moka::policy::EvictionPolicy::lru())
                    .weigher(|key: &String, record: &Arc<Record>| {
                        let size = 128 + key.len() + record.outcome.weight();
                        u32::try_from(size).unwrap_or(u32::MAX)
                    })
                    .eviction_listener(move |_, _, cause| {
                        if cause == moka::notification::RemovalCause::Size {
                            evicted.inc();
                        }
                    })
                    .build()
            })
            .clone()
    }
}

impl IdempotencyStore for MemoryStore {
    fn begin(&self, key: &RecordKey, fingerprint: [u8; 32]) -> Begin {
        let records = self.records(&key.client);
        // The claim's shard is held while the outcome is looked up, so a request finishing
        // meanwhile is seen either as running or as done, never as neither.
        match self.claims.entry(key.clone()) {
            dashmap::Entry::Occupied(mut claim) => {
                if let Some(record) = records.get(&key.key) {
                    return replay_or_mismatch(&record, fingerprint);
                }
                if claim.get().since.elapsed() >= self.ttl {
                    claim.insert(Claim {
                        fingerprint,
                        since: Instant::now(),
                    });
                    return Begin::Run;
                }
                if claim.get().fingerprint != fingerprint {
                    return Begin::Mismatch;
                }
                Begin::InFlight
            }
            dashmap::Entry::Vacant(vacant) => {
                if let Some(record) = records.get(&key.key) {
                    return replay_or_mismatch(&record, fingerprint);
                }
                vacant.insert(Claim {
                    fingerprint,
                    since: Instant::now(),
                });
                Begin::Run
            }
        }
    }

    fn finish(&self, key: RecordKey, fingerprint: [u8; 32], outcome: Outcome) {
        let records = self.records(&key.client);
        records.insert(
            key.key.clone(),
            Arc::new(Record {
                fingerprint,
                outcome,
            }),
        );
        self.claims.remove(&key);
    }

    fn abandon(&self, key: &RecordKey) {
        self.claims.remove(key);
    }
}

fn replay_or_mismatch(record: &Record, fingerprint: [u8; 32]) -> Begin {
    if record.fingerprint == fingerprint {
        Begin::Replay(record.outcome.clone())
    } else {
        Begin::Mismatch
    }
}

/// Applies `Idempotency-Key`.
#[derive(Clone)]
pub struct IdempotencyLayer {
    store: Arc<dyn IdempotencyStore>,
    max_request_bytes: u64,
    max_response_bytes: u64,
}

impl IdempotencyLayer {
    /// Keeps records in `store`; fingerprints bodies up to `max_request_bytes` (larger: 413);
    /// keeps response bodies up to `max_response_bytes`.
    pub fn new(
        store: Arc<dyn IdempotencyStore>,
        max_request_bytes: u64,
        max_response_bytes: u64,
    ) -> Self {
        Self {
            store,
            max_request_bytes,
            max_response_bytes,
        }
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`IdempotencyLayer`].
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    layer: IdempotencyLayer,
}

/// The key of a request that carries one, or why it is unusable.
fn record_key(request: &Request<Body>) -> Option<Result<RecordKey, GatewayError>> {
    if !matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) {
        return None;
    }
    let value = request.headers().get(&IDEMPOTENCY_KEY)?;
    let client = request.extensions().get::<Arc<Client>>()?;
    // The draft makes it a structured-field string ("..."); bare tokens are common too.
    let text = value.to_str().unwrap_or_default();
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    let ok = !text.is_empty() && text.len() <= 255 && text.bytes().all(|b| b.is_ascii_graphic());
    Some(if ok {
        Ok(RecordKey {
            client: client.name.clone(),
            key: text.to_owned(),
        })
    } else {
        Err(GatewayError::BadRequest(
            "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        ))
    })
}

fn fingerprint(request: &Request<Body>, body: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(request.method().as_str());
    hash.update([0]);
    hash.update(request.uri().path_and_query().map_or("", |p| p.as_str()));
    hash.update([0]);
    hash.update(body);
    hash.finalize().into()
}

fn replay(outcome: Outcome) -> Result<Response<Body>, BoxError> {
    let (status, headers, body) = match outcome {
        Outcome::Response {
            status,
            headers,
            body,
        } => (status, headers, full_body(body)),
        Outcome::Truncated {
            status,
            mut headers,
        } => {
            headers.remove(header::CONTENT_LENGTH);
            (status, headers, empty_body())
        }
        Outcome::Error(e) => return Err(e.into()),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response.headers_mut().insert(
        IDEMPOTENT_REPLAYED.clone(),
        HeaderValue::from_static("true"),
    );
    Ok(response)
}

/// Keeps what a finished request produced; returns what to send the client now.
async fn record(
    store: &dyn IdempotencyStore,
    key: RecordKey,
    fingerprint: [u8; 32],
    result: Result<Response<Body>, BoxError>,
    max_response_bytes: u64,
) -> Result<Response<Body>, BoxError> {
    let response = match result {
        Ok(response) => response,
        Err(e) => {
            match find_cause::<GatewayError>(e.as_ref()) {
                // Provably never reached Frappe: let the repeat run.
                None
                | Some(
                    GatewayError::UpstreamUnreachable { .. }
                    | GatewayError::BreakerOpen { .. }
                    | GatewayError::TooManyRequests { .. }
                    | GatewayError::PayloadTooLarge { .. },
                ) => store.abandon(&key),
                Some(other) => store.finish(key, fingerprint, Outcome::Error(other.clone())),
            }
            return Err(e);
        }
    };
    let (parts, body) = response.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_none_or(|n| n > max_response_bytes) {
        let outcome = Outcome::Truncated {
            status: parts.status,
            headers: parts.headers.clone(),
        };
        store.finish(key, fingerprint, outcome);
        return Ok(Response::from_parts(parts, body));
    }
    let limit = usize::try_from(max_response_bytes).unwrap_or(usize::MAX);
    match Limited::new(body, limit).collect().await {
        Ok(collected) => {
            let bytes = collected.to_bytes();
            let outcome = Outcome::Response {
                status: parts.status,
                headers: parts.headers.clone(),
                body: bytes.clone(),
            };
            store.finish(key, fingerprint, outcome);
            Ok(Response::from_parts(parts, full_body(bytes)))
        }
        Err(e) => {
            let site_failed = GatewayError::BadGateway {
                site: "upstream".into(),
            };
            store.finish(key, fingerprint, Outcome::Error(site_failed.clone()));
            tracing::warn!(error = %e, "upstream response body failed");
            Err(site_failed.into())
        }
    }
}

impl<S> Service<Request<Body>> for Idempotency<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = futures_util::future::Either<S::Future, BoxResponseFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        use futures_util::future::Either;
        let key = match record_key(&request) {
            None => return Either::Left(self.inner.call(request)),
            Some(Ok(key)) => key,
            Some(Err(e)) => return Either::Right(Box::pin(async move { Err(e.into()) })),
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Either::Right(Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes = match parts.extensions.get::<ReplayableBody>() {
                Some(ReplayableBody(bytes)) => bytes.clone(),
                None => {
                    let limit = usize::try_from(layer.max_request_bytes).unwrap_or(usize::MAX);
                    match Limited::new(body, limit).collect().await {
                        Ok(collected) => collected.to_bytes(),
                        Err(e)
                            if find_cause::<http_body_util::LengthLimitError>(e.as_ref())
                                .is_some() =>
                        {
                            return Err(GatewayError::PayloadTooLarge {
                                limit: layer.max_request_bytes,
                            }
                            .into())
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            let mut request = Request::from_parts(parts, full_body(bytes.clone()));
            request
                .extensions_mut()
                .insert(ReplayableBody(bytes.clone()));
            let fingerprint = fingerprint(&request, &bytes);
            match layer.store.begin(&key, fingerprint) {
                Begin::Replay(outcome) => replay(outcome),
                Begin::InFlight => Err(GatewayError::IdempotencyInFlight.into()),
                Begin::Mismatch => Err(GatewayError::IdempotencyMismatch.into()),
                Begin::Run => {
                    let future: BoxResponseFuture = Box::pin(inner.call(request));
                    // On its own task: the outcome is recorded even if this client hangs up.
                    let store = layer.store.clone();
                    let max = layer.max_response_bytes;
                    let task = tokio::spawn(async move {
                        record(store.as_ref(), key, fingerprint, future.await, max).await
                    });
                    task.await.map_err(|e| -> BoxError {
                        format!("idempotent request task failed: {e}").into()
                    })?
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> RecordKey {
        RecordKey {
            client: "shop".into(),
            key: k.into(),
        }
    }

    fn store(max_bytes: u64) -> MemoryStore {
        let evictions = IntCounterVec::new(prometheus::Opts::new("e", "e"), &["client"]).unwrap();
        MemoryStore::new(Duration::from_secs(60), max_bytes, evictions)
    }

    fn big() -> Outcome {
        Outcome::Response {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![0u8; 1024]),
        }
    }

    #[test]
    fn a_key_runs_once_then_replays_and_refuses_other_requests() {
        let store = store(1 << 20);
        assert!(matches!(store.begin(&key("a"), [1; 32]), Begin::Run));
        assert!(matches!(store.begin(&key("a"), [1; 32]), Begin::InFlight));
        assert!(matches!(store.begin(&key("a"), [2; 32]), Begin::Mismatch));
        let outcome = Outcome::Response {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"{}"),
        };
        store.finish(key("a"), [1; 32], outcome);
        assert!(matches!(
            store.begin(&key("a"), [1; 32]),
            Begin::Replay(Outcome::Response { .. })
        ));
        // Keys are per client.
        let other = RecordKey {
            client: "other".into(),
            key: "a".into(),
        };
        assert!(matches!(store.begin(&other, [2; 32]), Begin::Run));
        store.abandon(&other);
        assert!(matches!(store.begin(&other, [3; 32]), Begin::Run));
    }

    #[test]
    fn memory_is_bounded_per_client_and_one_client_never_evicts_another() {
        let store = store(64 * 1024);
        let b = RecordKey {
            client: "b".into(),
            key: "k".into(),
        };
        assert!(matches!(store.begin(&b, [7; 32]), Begin::Run));
        store.finish(b.clone(), [7; 32], big());
        // A claim of A's that is still running survives A's own flood.
        assert!(matches!(store.begin(&key("running"), [9; 32]), Begin::Run));
        for i in 0..1000 {
            store.finish(key(&i.to_string()), [0; 32], big());
        }
        let shop = store.records(&"shop".into());
        shop.run_pending_tasks();
        assert!(
            shop.weighted_size() <= 64 * 1024,
            "{}",
            shop.weighted_size()
        );
        assert!(store.evictions.with_label_values(&["shop"]).get() > 900);
        assert!(matches!(store.begin(&b, [7; 32]), Begin::Replay(_)));
        assert_eq!(store.evictions.with_label_values(&["b"]).get(), 0);
        assert!(matches!(
            store.begin(&key("running"), [9; 32]),
            Begin::InFlight
        ));
    }
}
