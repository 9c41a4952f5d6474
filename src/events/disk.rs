//! The embedded event store: one [redb](https://docs.rs/redb) file under `events.directory`.
//! redb commits are atomic and durable (fsync before `commit` returns, copy-on-write pages,
//! so a crash at any point leaves the last committed state), which is what "persisted before
//! Frappe hears 200" needs; a killed gateway finds every accepted event and undelivered delivery
//! on restart. One process owns the file (redb locks it), so one replica: with several, use
//! Redis.
//!
//! Every call runs on Tokio's blocking pool: a commit waits for the disk.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::store::{
    Backlog, DeadLetter, Delivery, Event, EventStore, FeedEntry, FeedPage, StoreError,
};

/// Pending records one look for due deliveries reads at most (their heads only): a long
/// backlog waiting for retries is not all read every time.
const SCAN_LIMIT: usize = 4096;

/// Every accepted event by sequence number.
const FEED: TableDefinition<u64, &[u8]> = TableDefinition::new("feed");
/// Deliveries still to make by (subscription, event sequence number).
const PENDING: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("pending");
/// Dead letters by (subscription, event sequence number).
const DEAD: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dead");
/// Pending deliveries per subscription, kept with them (the cap is checked on every append).
const COUNTS: TableDefinition<&str, u64> = TableDefinition::new("counts");
/// The next sequence number.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// A pending delivery: a small fixed head — attempts (u32), next attempt (u64, ms), the
/// document key's length (u16) and the key (`doctype \0 name`) — then the event's JSON. The
/// scheduler reads heads only, never the events it does not send.
struct PendingRecord {
    attempts: u32,
    next_ms: u64,
    event: Arc<Event>,
}

impl PendingRecord {
    fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let key = document_key(&self.event);
        let length = u16::try_from(key.len()).map_err(err)?;
        let mut out = Vec::with_capacity(14 + key.len() + self.event.payload.get().len() + 128);
        out.extend_from_slice(&self.attempts.to_be_bytes());
        out.extend_from_slice(&self.next_ms.to_be_bytes());
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&key);
        serde_json::to_writer(&mut out, &*self.event).map_err(err)?;
        Ok(out)
    }

    /// Attempts, next attempt and document key, without reading the event.
    fn head(bytes: &[u8]) -> Result<(u32, u64, &[u8]), StoreError> {
        let bad = || StoreError("corrupt pending record".into());
        let attempts =
            u32::from_be_bytes(bytes.get(0..4).ok_or_else(bad)?.try_into().map_err(err)?);
        let next_ms =
            u64::from_be_bytes(bytes.get(4..12).ok_or_else(bad)?.try_into().map_err(err)?);
        let length =
            u16::from_be_bytes(bytes.get(12..14).ok_or_else(bad)?.try_into().map_err(err)?);
        let key = bytes.get(14..14 + usize::from(length)).ok_or_else(bad)?;
        Ok((attempts, next_ms, key))
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let (attempts, next_ms, key) = Self::head(bytes)?;
        let event: Event = serde_json::from_slice(&bytes[14 + key.len()..]).map_err(err)?;
        Ok(Self {
            attempts,
            next_ms,
            event: Arc::new(event),
        })
    }
}

/// What identifies a document for ordering: doctype and name.
fn document_key(event: &Event) -> Vec<u8> {
    let mut key = event.doctype.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(event.name.as_deref().unwrap_or("").as_bytes());
    key.truncate(u16::MAX.into());
    key
}

#[derive(Serialize, Deserialize)]
struct DeadRecord {
    attempts: u32,
    reason: String,
    dead_ms: u64,
    event: Arc<Event>,
}

/// The embedded store.
pub struct DiskStore {
    db: Arc<Database>,
}

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiskStore")
    }
}

fn err<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::from(e)
}

impl DiskStore {
    /// Opens (or creates) `directory/events.redb`.
    pub fn open(directory: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(directory)
            .map_err(|e| StoreError(format!("{}: {e}", directory.display())))?;
        let path = directory.join("events.redb");
        let db =
            Database::create(&path).map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(err)?;
        txn.open_table(FEED).map_err(err)?;
        for table in [PENDING, DEAD] {
            txn.open_table(table).map_err(err)?;
        }
        for table in [COUNTS, META] {
            txn.open_table(table).map_err(err)?;
        }
        txn.commit().map_err(err)?;
        Ok(Self { db: Arc::new(db) })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || work(&db))
            .await
            .map_err(err)?
    }
}

fn seq_of(handle: &str) -> Result<u64, StoreError> {
    handle
        .parse()
        .map_err(|_| StoreError(format!("bad handle {handle}")))
}

fn adjust_count(
    counts: &mut redb::Table<&str, u64>,
    subscription: &str,
    delta: i64,
) -> Result<(), StoreError> {
    let now = counts
        .get(subscription)
        .map_err(err)?
        .map_or(0, |v| v.value());
    let next = now.saturating_add_signed(delta);
    if next == 0 {
        counts.remove(subscription).map_err(err)?;
    } else {
        counts.insert(subscription, next).map_err(err)?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl EventStore for DiskStore {
    async fn append(
        &self,
        event: &Event,
        subscriptions: &[String],
        max_pending: u64,
    ) -> Result<(String, Vec<u64>), StoreError> {
        let event = Arc::new(event.clone());
        let subscriptions = subscriptions.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(err)?;
            let mut dropped = Vec::with_capacity(subscriptions.len());
            let seq;
            {
                let mut meta = txn.open_table(META).map_err(err)?;
                seq = meta.get("next_seq").map_err(err)?.map_or(1, |v| v.value());
                meta.insert("next_seq", seq + 1).map_err(err)?;
                let mut feed = txn.open_table(FEED).map_err(err)?;
                let bytes = serde_json::to_vec(&*event).map_err(err)?;
                feed.insert(seq, bytes.as_slice()).map_err(err)?;
                let mut pending = txn.open_table(PENDING).map_err(err)?;
                let mut counts = txn.open_table(COUNTS).map_err(err)?;
                let record = PendingRecord {
                    attempts: 0,
                    next_ms: 0,
                    event: event.clone(),
                }
                .encode()?;
                for subscription in &subscriptions {
                    let sub = subscription.as_str();
                    let mut count = counts.get(sub).map_err(err)?.map_or(0, |v| v.value());
                    let mut gone = 0;
                    while count >= max_pending {
                        let oldest = pending
                            .range((sub, 0)..=(sub, u64::MAX))
                            .map_err(err)?
                            .next()
                            .transpose()
                            .map_err(err)?
                            .map(|(k, _)| k.value().1);
                        let Some(oldest) = oldest else { break };
                        pending.remove((sub, oldest)).map_err(err)?;
                        count -= 1;
                        gone += 1;
                    }
                    pending.insert((sub, seq), record.as_slice()).map_err(err)?;
                    counts.insert(sub, count + 1).map_err(err)?;
                    dropped.push(gone);
                }
            }
            txn.commit().map_err(err)?;
            Ok((seq.to_string(), dropped))
        })
        .await
    }

    async fn due(
        &self,
        subscription: &str,
        now_ms: u64,
        max: usize,
        _claim_after: std::time::Duration,
    ) -> Result<Vec<Delivery>, StoreError> {
        let sub = subscription.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(err)?;
            let pending = txn.open_table(PENDING).map_err(err)?;
            let mut due = Vec::new();
            // Per-document order: a document whose earlier event waits for a retry holds its
            // later events back.
            let mut waiting: Vec<Vec<u8>> = Vec::new();
            for entry in pending
                .range((sub.as_str(), 0)..=(sub.as_str(), u64::MAX))
                .map_err(err)?
                .take(SCAN_LIMIT)
            {
                let (key, value) = entry.map_err(err)?;
                let bytes = value.value();
                let (_, next_ms, document) = PendingRecord::head(bytes)?;
                if next_ms > now_ms || waiting.iter().any(|w| w == document) {
                    if !waiting.iter().any(|w| w == document) {
                        waiting.push(document.to_vec());
                    }
                    continue;
                }
                let record = PendingRecord::decode(bytes)?;
                due.push(Delivery {
                    event_id: key.value().1.to_string(),
                    event: record.event,
                    attempts: record.attempts,
                    handle: key.value().1.to_string(),
                });
                if due.len() >= max {
                    break;
                }
            }
            Ok(due)
        })
        .await
    }

    async fn delivered(&self, subscription: &str, delivery: &Delivery) -> Result<(), StoreError> {
        let sub = subscription.to_owned();
        let seq = seq_of(&delivery.handle)?;
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(err)?;
            {
                let mut pending = txn.open_table(PENDING).map_err(err)?;
                if pending.remove((sub.as_str(), seq)).map_err(err)?.is_some() {
                    let mut counts = txn.open_table(COUNTS).map_err(err)?;
                    adjust_count(&mut counts, &sub, -1)?;
                }
            }
            txn.commit().map_err(err)
        })
        .await
    }

    async fn retry_at(
        &self,
        subscription: &str,
        delivery: &Delivery,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        let sub = subscription.to_owned();
        let seq = seq_of(&delivery.handle)?;
        let record = PendingRecord {
            attempts: delivery.attempts + 1,
            next_ms: at_ms,
            event: delivery.event.clone(),
        }
        .encode()?;
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(err)?;
            {
                let mut pending = txn.open_table(PENDING).map_err(err)?;
                // Only while still pending: a delivery dropped meanwhile stays dropped.
                let present = pending.get((sub.as_str(), seq)).map_err(err)?.is_some();
                if present {
                    pending
                        .insert((sub.as_str(), seq), record.as_slice())
                        .map_err(err)?;
                }
            }
            txn.commit().map_err(err)
        })
        .await
    }

    async fn bury(
        &self,
        subscription: &str,
        delivery: &Delivery,
        reason: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let sub = subscription.to_owned();
        let seq = seq_of(&delivery.handle)?;
        let record = serde_json::to_vec(&DeadRecord {
            attempts: delivery.attempts + 1,
            reason: reason.to_owned(),
            dead_ms: now_ms,
            event: delivery.event.clone(),
        })
        .map_err(err)?;
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(err)?;
            {
                let mut pending = txn.open_table(PENDING).map_err(err)?;
                if pending.remove((sub.as_str(), seq)).map_err(err)?.is_some() {
                    let mut counts = txn.open_table(COUNTS).map_err(err)?;
                    adjust_count(&mut counts, &sub, -1)?;
                    let mut dead = txn.open_table(DEAD).map_err(err)?;
                    dead.insert((sub.as_str(), seq), record.as_slice())
                        .map_err(err)?;
                }
            }
            txn.commit().map_err(err)
        })
        .await
    }

    async fn bury_all(
        &self,
        subscription: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let sub = subscription.to_owned();
        let reason = reason.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(err)?;
            let mut buried = 0;
            {
                let mut pending = txn.open_table(PENDING).map_err(err)?;
                let mut dead = txn.open_table(DEAD).map_err(err)?;
                let taken = pending
                    .extract_from_if((sub.as_str(), 0)..=(sub.as_str(), u64::MAX), |_, _| true)
                    .map_err(err)?;
                for entry in taken {
                    let (key, value) = entry.map_err(err)?;
                    let record = PendingRecord::decode(value.value())?;
                    let bytes = serde_json::to_vec(&DeadRecord {
                        attempts: record.attempts,
                        reason: reason.clone(),
                        dead_ms: now_ms,
                        event: record.event,
                    })
                    .map_err(err)?;
                    dead.insert((sub.as_str(), key.value().1), bytes.as_slice())
                        .map_err(err)?;
                    buried += 1;
                }
                let mut counts = txn.open_table(COUNTS).map_err(err)?;
                counts.remove(sub.as_str()).map_err(err)?;
            }
            txn.commit().map_err(err)?;
            Ok(buried)
        })
        .await
    }

    async fn dead_letters(
        &self,
        subscriptions: &[String],
        max: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let subscriptions = subscriptions.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(err)?;
            let dead = txn.open_table(DEAD).map_err(err)?;
            let mut letters = Vec::new();
            for entry in dead.iter().map_err(err)? {
                let (key, value) = entry.map_err(err)?;
                if !subscriptions.iter().any(|s| s == key.value().0) {
                    continue;
                }
                let record: DeadRecord = serde_json::from_slice(value.value()).map_err(err)?;
                letters.push(DeadLetter {
                    subscription: key.value().0.to_owned(),
                    event_id: key.value().1.to_string(),
                    attempts: record.attempts,
                    reason: record.reason,
                    dead_ms: record.dead_ms,
                    event: record.event,
                });
            }
            letters.sort_by_key(|l| l.dead_ms);
            letters.truncate(max);
            Ok(letters)
        })
        .await
    }

    async fn replay(
        &self,
        subscriptions: &[String],
        event_id: Option<&str>,
    ) -> Result<u64, StoreError> {
        let subscriptions = subscriptions.to_vec();
        let seq = event_id.map(seq_of).transpose()?;
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(err)?;
            let mut replayed = 0;
            {
                let mut dead = txn.open_table(DEAD).map_err(err)?;
                let mut pending = txn.open_table(PENDING).map_err(err)?;
                let mut counts = txn.open_table(COUNTS).map_err(err)?;
                let taken = dead
                    .extract_if(|key, _| {
                        subscriptions.iter().any(|s| key.0 == s) && seq.is_none_or(|n| key.1 == n)
                    })
                    .map_err(err)?;
                for entry in taken {
                    let (key, value) = entry.map_err(err)?;
                    let (name, seq) = key.value();
                    let record: DeadRecord = serde_json::from_slice(value.value()).map_err(err)?;
                    let bytes = PendingRecord {
                        attempts: 0,
                        next_ms: 0,
                        event: record.event,
                    }
                    .encode()?;
                    pending.insert((name, seq), bytes.as_slice()).map_err(err)?;
                    adjust_count(&mut counts, name, 1)?;
                    replayed += 1;
                }
            }
            txn.commit().map_err(err)?;
            Ok(replayed)
        })
        .await
    }

    async fn trim_dead(&self, subscription: &str, max: u64) -> Result<u64, StoreError> {
        let sub = subscription.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(err)?;
            let mut trimmed = 0;
            {
                let mut dead = txn.open_table(DEAD).map_err(err)?;
                let range = (sub.as_str(), 0)..=(sub.as_str(), u64::MAX);
                let held = dead.range(range.clone()).map_err(err)?.count() as u64;
                if held > max {
                    // Keys order by event sequence: the oldest events go first.
                    let excess = held - max;
                    let gone = dead
                        .extract_from_if(range, |_, _| {
                            trimmed += 1;
                            trimmed <= excess
                        })
                        .map_err(err)?;
                    trimmed = gone.count() as u64;
                }
            }
            txn.commit().map_err(err)?;
            Ok(trimmed)
        })
        .await
    }

    async fn feed(&self, after: Option<&str>, max: usize) -> Result<FeedPage, StoreError> {
        let start = match after {
            Some(cursor) => seq_of(cursor)?.saturating_add(1),
            None => 0,
        };
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(err)?;
            let feed = txn.open_table(FEED).map_err(err)?;
            let mut page = FeedPage::default();
            for entry in feed.range(start..).map_err(err)?.take(max) {
                let (key, value) = entry.map_err(err)?;
                let event: Event = serde_json::from_slice(value.value()).map_err(err)?;
                let id = key.value().to_string();
                page.last = Some(id.clone());
                page.entries.push(FeedEntry {
                    id,
                    event: Arc::new(event),
                });
            }
            Ok(page)
        })
        .await
    }

    async fn tip(&self) -> Result<String, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(err)?;
            let meta = txn.open_table(META).map_err(err)?;
            let next = meta.get("next_seq").map_err(err)?.map_or(1, |v| v.value());
            Ok((next - 1).to_string())
        })
        .await
    }

    fn ordered(&self) -> bool {
        true
    }

    fn valid_cursor(&self, cursor: &str) -> bool {
        cursor.parse::<u64>().is_ok()
    }

    async fn backlog(&self, subscription: &str) -> Result<Backlog, StoreError> {
        let sub = subscription.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(err)?;
            let counts = txn.open_table(COUNTS).map_err(err)?;
            let pending = txn.open_table(PENDING).map_err(err)?;
            let dead = txn.open_table(DEAD).map_err(err)?;
            let range = (sub.as_str(), 0)..=(sub.as_str(), u64::MAX);
            let oldest = match pending.range(range.clone()).map_err(err)?.next() {
                Some(entry) => {
                    let (_, value) = entry.map_err(err)?;
                    let record = PendingRecord::decode(value.value())?;
                    Some(record.event.received_ms)
                }
                None => None,
            };
            Ok(Backlog {
                pending: counts
                    .get(sub.as_str())
                    .map_err(err)?
                    .map_or(0, |v| v.value()),
                oldest_ms: oldest,
                dead: dead.range(range).map_err(err)?.count() as u64,
            })
        })
        .await
    }

    async fn trim_feed(&self, before_ms: u64, max_events: u64) -> Result<u64, StoreError> {
        /// Only the arrival time of a stored event, not its body.
        #[derive(Deserialize)]
        struct ReceivedAt {
            received_ms: u64,
        }
        let expired = move |bytes: &[u8]| {
            serde_json::from_slice::<ReceivedAt>(bytes).map_or(true, |e| e.received_ms < before_ms)
        };
        self.blocking(move |db| {
            // A look first: most rounds trim nothing, and a write transaction is a disk sync.
            {
                let txn = db.begin_read().map_err(err)?;
                let feed = txn.open_table(FEED).map_err(err)?;
                let oldest_expired = feed
                    .first()
                    .map_err(err)?
                    .is_some_and(|(_, v)| expired(v.value()));
                if feed.len().map_err(err)? <= max_events && !oldest_expired {
                    return Ok(0);
                }
            }
            let txn = db.begin_write().map_err(err)?;
            let mut trimmed = 0;
            {
                let mut feed = txn.open_table(FEED).map_err(err)?;
                let mut len = feed.len().map_err(err)?;
                loop {
                    let Some((seq, old)) = feed
                        .first()
                        .map_err(err)?
                        .map(|(k, v)| (k.value(), expired(v.value())))
                    else {
                        break;
                    };
                    if len <= max_events && !old {
                        break;
                    }
                    feed.remove(seq).map_err(err)?;
                    len -= 1;
                    trimmed += 1;
                }
            }
            txn.commit().map_err(err)?;
            Ok(trimmed)
        })
        .await
    }
}
