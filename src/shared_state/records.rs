//! `Idempotency-Key` records in Redis: a claim (`SET NX` with a lease, holding the request's
//! fingerprint) while the first request runs, then the kept outcome for the record's TTL.
//! Whichever replica a repeat reaches reads the same two keys.
//!
//! The lease is what frees a key whose replica died mid-request: it runs out and the next
//! repeat runs again (Frappe may have acted on the first; the README says so).

use std::sync::LazyLock;
use std::time::Duration;

use super::{SharedState, Unavailable};

/// Claims a key, or reads what holds it: `KEYS[1]` the outcome, `KEYS[2]` the claim, `ARGV[1]`
/// the fingerprint, `ARGV[2]` the lease in ms. Returns `{0}` (run), `{1, outcome}` or
/// `{2, fingerprint of the running request}`.
static CLAIM: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local done = redis.call('GET', KEYS[1])
if done then return {1, done} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0} end
local running = redis.call('GET', KEYS[2])
if not running then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return {0}
end
return {2, running}
"#,
    )
});

/// Keeps an outcome and ends the claim, if it is still this request's: `KEYS[1]` outcome,
/// `KEYS[2]` claim, `ARGV[1]` fingerprint, `ARGV[2]` outcome, `ARGV[3]` TTL in ms.
static KEEP: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"#,
    )
});

/// Ends a claim if it is still this request's: `KEYS[1]` claim, `ARGV[1]` fingerprint.
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#,
    )
});

/// What holds a key when a request arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// Nothing: this request now holds the claim.
    Run,
    /// A kept outcome, as [`SharedState::keep`] stored it.
    Done(Vec<u8>),
    /// A request running now, with this fingerprint.
    Running(Vec<u8>),
}

/// The two Redis keys of one record. `client` and `key` are length-prefixed, so no choice of
/// names makes two clients' keys meet.
pub struct RecordKeys {
    done: String,
    claim: String,
}

impl SharedState {
    /// The Redis keys for `client`'s `key`.
    pub fn record_keys(&self, client: &str, key: &str) -> RecordKeys {
        let base = self.key(&format!("idem:{}:{client}:{key}", client.len()));
        RecordKeys {
            done: format!("{base}:done"),
            claim: format!("{base}:claim"),
        }
    }

    /// Claims `keys` for a request with `fingerprint` for `lease`, atomically.
    pub async fn claim(
        &self,
        keys: &RecordKeys,
        fingerprint: &[u8; 32],
        lease: Duration,
    ) -> Result<Claimed, Unavailable> {
        let values: Vec<redis::Value> = self
            .run("idempotency_claim", |mut connection| async move {
                CLAIM
                    .key(&keys.done)
                    .key(&keys.claim)
                    .arg(&fingerprint[..])
                    .arg(millis(lease))
                    .invoke_async(&mut connection)
                    .await
            })
            .await?;
        let bytes = |v: Option<&redis::Value>| match v {
            Some(redis::Value::BulkString(b)) => Ok(b.clone()),
            _ => Err(Unavailable),
        };
        match values.first() {
            Some(redis::Value::Int(0)) => Ok(Claimed::Run),
            Some(redis::Value::Int(1)) => bytes(values.get(1)).map(Claimed::Done),
            Some(redis::Value::Int(2)) => bytes(values.get(1)).map(Claimed::Running),
            _ => Err(Unavailable),
        }
    }

    /// Keeps `outcome` for `ttl` and ends this request's claim.
    pub async fn keep(
        &self,
        keys: &RecordKeys,
        fingerprint: &[u8; 32],
        outcome: &[u8],
        ttl: Duration,
    ) -> Result<(), Unavailable> {
        self.run("idempotency_keep", |mut connection| async move {
            KEEP.key(&keys.done)
                .key(&keys.claim)
                .arg(&fingerprint[..])
                .arg(outcome)
                .arg(millis(ttl))
                .invoke_async::<i64>(&mut connection)
                .await
        })
        .await
        .map(drop)
    }

    /// Ends this request's claim without an outcome (it never reached the site).
    pub async fn release(
        &self,
        keys: &RecordKeys,
        fingerprint: &[u8; 32],
    ) -> Result<(), Unavailable> {
        self.run("idempotency_release", |mut connection| async move {
            RELEASE
                .key(&keys.claim)
                .arg(&fingerprint[..])
                .invoke_async::<i64>(&mut connection)
                .await
        })
        .await
        .map(drop)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
