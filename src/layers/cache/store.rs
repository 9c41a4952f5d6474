//! The store: moka (async), bounded in bytes through a weigher; each entry lives for its fresh
//! time plus its stale-if-error window.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use prometheus::IntCounter;

use crate::config::ContentCoding;
use crate::layers::cache::invalidation::Tag;
use crate::layers::cache::key::CacheKey;
use crate::layers::compression::{encoded_etag, index, Settings};

/// A stored answer (always a 200).
#[derive(Debug)]
pub struct Entry {
    /// Response headers as the site sent them, after the gateway's response hygiene.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Strong validator: a hash of the body.
    pub etag: HeaderValue,
    /// When it was stored.
    pub stored_at: Instant,
    /// The invalidation generation its request started in.
    pub born: u64,
    /// Site, doctype and document-or-lists tags.
    pub tags: [Tag; 3],
    /// Served as fresh for this long.
    pub ttl: Duration,
    /// Then as stale, on upstream failure, for this long.
    pub stale_if_error: Duration,
    /// Whether compression applies to it (type, size, headers).
    pub compressible: bool,
    /// Its encoded copies, made on first demand, with their `ETag`s, by
    /// `compression::index`; `None` when the coding saves too little to keep.
    pub encoded: [OnceLock<Option<(Bytes, HeaderValue)>>; 3],
}

impl Entry {
    /// Time since it was stored.
    pub fn age(&self) -> Duration {
        self.stored_at.elapsed()
    }

    /// Still fresh.
    pub fn is_fresh(&self) -> bool {
        self.age() < self.ttl
    }

    /// Still within its stale-if-error window.
    pub fn may_serve_stale(&self) -> bool {
        self.age() < self.ttl + self.stale_if_error
    }

    /// Bytes it is accounted as: a compressible entry is charged up front for the encoded
    /// copies it may make, each kept only at half the body or less.
    pub fn weight(&self) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        let copies = if self.compressible {
            self.body.len() / 2 * 3
        } else {
            0
        };
        u32::try_from(self.body.len() + copies + headers + 256).unwrap_or(u32::MAX)
    }

    /// Its copy in `coding`, made now if it is the first demand; `None` when not compressible
    /// or when the coding does not halve it.
    pub fn encoded(
        &self,
        coding: ContentCoding,
        settings: &Settings,
    ) -> Option<&(Bytes, HeaderValue)> {
        if !self.compressible {
            return None;
        }
        self.encoded[index(coding)]
            .get_or_init(|| {
                let bytes = settings.encode(coding, &self.body).ok()?;
                if bytes.len() > self.body.len() / 2 {
                    return None;
                }
                Some((bytes, encoded_etag(&self.etag, coding)?))
            })
            .as_ref()
    }
}

struct Lifetime;

impl moka::Expiry<CacheKey, Arc<Entry>> for Lifetime {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        entry: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(entry.ttl + entry.stale_if_error)
    }
}

/// The entries.
#[derive(Clone)]
pub struct Store {
    entries: moka::future::Cache<CacheKey, Arc<Entry>>,
    max_bytes: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// At most `max_bytes` of entries; `evictions` counts those pushed out by the bound.
    pub fn new(max_bytes: u64, evictions: IntCounter) -> Self {
        let entries = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &CacheKey, entry: &Arc<Entry>| entry.weight())
            .expire_after(Lifetime)
            .eviction_listener(move |_key, _entry, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    evictions.inc();
                }
            })
            .build();
        Self { entries, max_bytes }
    }

    /// The entry under `key`.
    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        self.entries.get(key).await
    }

    /// Stores an entry.
    pub async fn insert(&self, key: CacheKey, entry: Arc<Entry>) {
        self.entries.insert(key, entry).await;
    }

    /// Drops one entry.
    pub async fn remove(&self, key: &CacheKey) {
        self.entries.invalidate(key).await;
    }

    /// Drops everything.
    pub fn clear(&self) {
        self.entries.invalidate_all();
    }

    /// Entries and bytes held, after pending bookkeeping is done.
    pub async fn size(&self) -> (u64, u64) {
        self.entries.run_pending_tasks().await;
        (self.entries.entry_count(), self.entries.weighted_size())
    }

    /// The byte bound.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }
}
