//! Where `Idempotency-Key` records live: [`MemoryStore`] in this process, or [`SharedStore`]
//! in the shared state (Redis), where every replica sees the same claims and outcomes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use prometheus::IntCounterVec;

use crate::config::WhenUnavailable;
use crate::error::GatewayError;
use crate::shared_state::records::Claimed;
use crate::shared_state::{SharedState, Unavailable};

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

/// A store's answer, later.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, Unavailable>> + Send + 'a>>;

/// Where idempotency records live: in this process ([`MemoryStore`]) or shared by every
/// replica ([`SharedStore`]).
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `key` for a request with `fingerprint`, atomically; a claim older than `lease`
    /// (its replica died) is taken over.
    fn begin<'a>(
        &'a self,
        key: &'a RecordKey,
        fingerprint: [u8; 32],
        lease: Duration,
    ) -> StoreFuture<'a, Begin>;
    /// Keeps the outcome of the claimed request.
    fn finish(
        &self,
        key: RecordKey,
        fingerprint: [u8; 32],
        outcome: Outcome,
    ) -> StoreFuture<'_, ()>;
    /// Releases a claim whose request never reached the site.
    fn abandon<'a>(&'a self, key: &'a RecordKey, fingerprint: [u8; 32]) -> StoreFuture<'a, ()>;
    /// Whether a request whose records cannot be reached runs anyway, unrecorded.
    fn run_unprotected(&self) -> bool {
        false
    }
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
    fn begin<'a>(
        &'a self,
        key: &'a RecordKey,
        fingerprint: [u8; 32],
        _lease: Duration,
    ) -> StoreFuture<'a, Begin> {
        Box::pin(std::future::ready(Ok(self.begin_now(key, fingerprint))))
    }

    fn finish(
        &self,
        key: RecordKey,
        fingerprint: [u8; 32],
        outcome: Outcome,
    ) -> StoreFuture<'_, ()> {
        self.finish_now(key, fingerprint, outcome);
        Box::pin(std::future::ready(Ok(())))
    }

    fn abandon<'a>(&'a self, key: &'a RecordKey, _fingerprint: [u8; 32]) -> StoreFuture<'a, ()> {
        self.claims.remove(key);
        Box::pin(std::future::ready(Ok(())))
    }
}

impl MemoryStore {
    /// In memory a running request's claim ends when its task does (the task always
    /// finishes), so the lease is the record's `ttl`: a claim is only taken over if the task
    /// could not record anything.
    fn begin_now(&self, key: &RecordKey, fingerprint: [u8; 32]) -> Begin {
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

    fn finish_now(&self, key: RecordKey, fingerprint: [u8; 32], outcome: Outcome) {
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
}

fn replay_or_mismatch(record: &Record, fingerprint: [u8; 32]) -> Begin {
    if record.fingerprint == fingerprint {
        Begin::Replay(record.outcome.clone())
    } else {
        Begin::Mismatch
    }
}

/// Records in the shared state: claims with a lease, outcomes for `ttl`. Memory there is
/// bounded by `ttl` and `max_response_bytes` per record (and the Redis server's `maxmemory`),
/// not by a per-client budget.
pub struct SharedStore {
    shared: Arc<SharedState>,
    ttl: Duration,
}

impl SharedStore {
    /// Keeps outcomes in `shared` for `ttl`.
    pub fn new(shared: Arc<SharedState>, ttl: Duration) -> Self {
        Self { shared, ttl }
    }
}

impl IdempotencyStore for SharedStore {
    fn begin<'a>(
        &'a self,
        key: &'a RecordKey,
        fingerprint: [u8; 32],
        lease: Duration,
    ) -> StoreFuture<'a, Begin> {
        Box::pin(async move {
            let keys = self.shared.record_keys(&key.client, &key.key);
            Ok(match self.shared.claim(&keys, &fingerprint, lease).await? {
                Claimed::Run => Begin::Run,
                Claimed::Running(held) if held == fingerprint => Begin::InFlight,
                Claimed::Running(_) => Begin::Mismatch,
                Claimed::Done(bytes) => {
                    let (kept, outcome) = decode(&bytes).ok_or(Unavailable)?;
                    if kept == fingerprint {
                        Begin::Replay(outcome)
                    } else {
                        Begin::Mismatch
                    }
                }
            })
        })
    }

    fn finish(
        &self,
        key: RecordKey,
        fingerprint: [u8; 32],
        outcome: Outcome,
    ) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let keys = self.shared.record_keys(&key.client, &key.key);
            let bytes = encode(fingerprint, &outcome);
            self.shared
                .keep(&keys, &fingerprint, &bytes, self.ttl)
                .await
        })
    }

    fn abandon<'a>(&'a self, key: &'a RecordKey, fingerprint: [u8; 32]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let keys = self.shared.record_keys(&key.client, &key.key);
            self.shared.release(&keys, &fingerprint).await
        })
    }

    fn run_unprotected(&self) -> bool {
        let unprotected = self.shared.when_unavailable() == WhenUnavailable::Unprotected;
        self.shared.count_fallback(if unprotected {
            "idempotency_unprotected"
        } else {
            "idempotency_refused"
        });
        unprotected
    }
}

// The stored form: the fingerprint, then a tag. Responses: status, header count, each header
// as (name length, name, value length, value), then the body. Errors: which one, then its
// fields. Lengths are big-endian u32; nothing is trusted on the way back.
const RESPONSE: u8 = 1;
const TRUNCATED: u8 = 2;
const ERROR: u8 = 3;

fn encode(fingerprint: [u8; 32], outcome: &Outcome) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + outcome.weight());
    out.extend_from_slice(&fingerprint);
    let put = |out: &mut Vec<u8>, bytes: &[u8]| {
        out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(bytes);
    };
    let head = |out: &mut Vec<u8>, status: StatusCode, headers: &HeaderMap| {
        out.extend_from_slice(&status.as_u16().to_be_bytes());
        out.extend_from_slice(&u32::try_from(headers.len()).unwrap_or(0).to_be_bytes());
        for (name, value) in headers {
            put(out, name.as_str().as_bytes());
            put(out, value.as_bytes());
        }
    };
    match outcome {
        Outcome::Response {
            status,
            headers,
            body,
        } => {
            out.push(RESPONSE);
            head(&mut out, *status, headers);
            out.extend_from_slice(body);
        }
        Outcome::Truncated { status, headers } => {
            out.push(TRUNCATED);
            head(&mut out, *status, headers);
        }
        Outcome::Error(error) => {
            out.push(ERROR);
            let (code, site, millis) = match error {
                GatewayError::UpstreamTimeout { site, timeout } => (1, site.as_str(), *timeout),
                GatewayError::ClientTimeout { timeout } => (2, "", *timeout),
                GatewayError::BadGateway { site } => (3, site.as_str(), Duration::ZERO),
                // Nothing else is kept (the rest never reach the site); if one were, a bad
                // gateway is what the client saw of it.
                _ => (3, "upstream", Duration::ZERO),
            };
            out.push(code);
            out.extend_from_slice(&u64::try_from(millis.as_millis()).unwrap_or(0).to_be_bytes());
            put(&mut out, site.as_bytes());
        }
    }
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<usize> {
        usize::try_from(u32::from_be_bytes(self.take(4)?.try_into().ok()?)).ok()
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn chunk(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()?;
        self.take(n)
    }
    fn head(&mut self) -> Option<(StatusCode, HeaderMap)> {
        let status = StatusCode::from_u16(self.u16()?).ok()?;
        let count = self.u32()?;
        let mut headers = HeaderMap::with_capacity(count.min(64));
        for _ in 0..count {
            let name = HeaderName::from_bytes(self.chunk()?).ok()?;
            let value = HeaderValue::from_bytes(self.chunk()?).ok()?;
            headers.append(name, value);
        }
        Some((status, headers))
    }
}

fn decode(bytes: &[u8]) -> Option<([u8; 32], Outcome)> {
    let mut r = Reader(bytes);
    let fingerprint: [u8; 32] = r.take(32)?.try_into().ok()?;
    let outcome = match r.take(1)?[0] {
        RESPONSE => {
            let (status, headers) = r.head()?;
            Outcome::Response {
                status,
                headers,
                body: Bytes::copy_from_slice(r.0),
            }
        }
        TRUNCATED => {
            let (status, headers) = r.head()?;
            Outcome::Truncated { status, headers }
        }
        ERROR => {
            let code = r.take(1)?[0];
            let duration = Duration::from_millis(r.u64()?);
            let site = String::from_utf8(r.chunk()?.to_vec()).ok()?;
            Outcome::Error(match code {
                1 => GatewayError::UpstreamTimeout {
                    site,
                    timeout: duration,
                },
                2 => GatewayError::ClientTimeout { timeout: duration },
                _ => GatewayError::BadGateway { site },
            })
        }
        _ => return None,
    };
    Some((fingerprint, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_survive_the_stored_form_and_garbage_is_refused() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        let outcomes = [
            Outcome::Response {
                status: StatusCode::CREATED,
                headers: headers.clone(),
                body: Bytes::from_static(b"{\"data\": {}}"),
            },
            Outcome::Truncated {
                status: StatusCode::OK,
                headers,
            },
            Outcome::Error(GatewayError::UpstreamTimeout {
                site: "erp".into(),
                timeout: Duration::from_secs(3),
            }),
            Outcome::Error(GatewayError::BadGateway { site: "erp".into() }),
        ];
        for outcome in outcomes {
            let bytes = encode([7; 32], &outcome);
            let (fingerprint, back) = decode(&bytes).unwrap();
            assert_eq!(fingerprint, [7; 32]);
            assert_eq!(format!("{back:?}"), format!("{outcome:?}"));
            for cut in 0..bytes.len().min(60) {
                let _ = decode(&bytes[..cut]);
            }
        }
        assert!(decode(b"short").is_none());
    }

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
        assert!(matches!(store.begin_now(&key("a"), [1; 32]), Begin::Run));
        assert!(matches!(
            store.begin_now(&key("a"), [1; 32]),
            Begin::InFlight
        ));
        assert!(matches!(
            store.begin_now(&key("a"), [2; 32]),
            Begin::Mismatch
        ));
        let outcome = Outcome::Response {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"{}"),
        };
        store.finish_now(key("a"), [1; 32], outcome);
        assert!(matches!(
            store.begin_now(&key("a"), [1; 32]),
            Begin::Replay(Outcome::Response { .. })
        ));
        // Keys are per client.
        let other = RecordKey {
            client: "other".into(),
            key: "a".into(),
        };
        assert!(matches!(store.begin_now(&other, [2; 32]), Begin::Run));
        store.claims.remove(&other);
        assert!(matches!(store.begin_now(&other, [3; 32]), Begin::Run));
    }

    #[test]
    fn memory_is_bounded_per_client_and_one_client_never_evicts_another() {
        let store = store(64 * 1024);
        let b = RecordKey {
            client: "b".into(),
            key: "k".into(),
        };
        assert!(matches!(store.begin_now(&b, [7; 32]), Begin::Run));
        store.finish_now(b.clone(), [7; 32], big());
        // A claim of A's that is still running survives A's own flood.
        assert!(matches!(
            store.begin_now(&key("running"), [9; 32]),
            Begin::Run
        ));
        for i in 0..1000 {
            store.finish_now(key(&i.to_string()), [0; 32], big());
        }
        let shop = store.records(&"shop".into());
        shop.run_pending_tasks();
        assert!(
            shop.weighted_size() <= 64 * 1024,
            "{}",
            shop.weighted_size()
        );
        assert!(store.evictions.with_label_values(&["shop"]).get() > 900);
        assert!(matches!(store.begin_now(&b, [7; 32]), Begin::Replay(_)));
        assert_eq!(store.evictions.with_label_values(&["b"]).get(), 0);
        assert!(matches!(
            store.begin_now(&key("running"), [9; 32]),
            Begin::InFlight
        ));
    }
}
