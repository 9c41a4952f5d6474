//! What the relay keeps, and the two places it can keep it: an embedded store on local disk
//! ([`super::disk`]) for one replica, or Redis Streams ([`super::redis_streams`]) shared by
//! every replica of a deployment.
//!
//! Two kinds of record: the *feed* (every accepted event, in order, for the pull feed) and, per
//! subscription, the *deliveries* still to make (each carrying its own copy of the event, so a
//! feed trimmed to its retention never loses an undelivered event) and the *dead letters*.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// One change Frappe reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// The site (a configured name).
    pub site: String,
    /// The document's doctype.
    pub doctype: String,
    /// The document's name, when the webhook named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The document event (`on_update`, ...), or `change` when the webhook named none.
    pub event: String,
    /// When erpgate accepted it, Unix milliseconds.
    pub received_ms: u64,
    /// The JSON body Frappe sent, as it came.
    pub payload: Box<RawValue>,
}

/// An event in the feed.
#[derive(Debug, Clone)]
pub struct FeedEntry {
    /// Its position: the cursor that follows it is this.
    pub id: String,
    /// The event.
    pub event: Arc<Event>,
}

/// One page of the feed.
#[derive(Debug, Default)]
pub struct FeedPage {
    /// Events after the cursor, oldest first.
    pub entries: Vec<FeedEntry>,
    /// The position of the last event read (also of events skipped), if any was.
    pub last: Option<String>,
}

/// A delivery still to make.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The event's id (the same for every subscription and every attempt: `webhook-id`).
    pub event_id: String,
    /// The event.
    pub event: Arc<Event>,
    /// Attempts made so far.
    pub attempts: u32,
    /// The store's own handle on this record.
    pub handle: String,
}

/// A delivery given up on.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// `client/subscription`.
    pub subscription: String,
    /// The event's id.
    pub event_id: String,
    /// Attempts made.
    pub attempts: u32,
    /// Why it was given up (the last failure).
    pub reason: String,
    /// When, Unix milliseconds.
    pub dead_ms: u64,
    /// The event.
    pub event: Arc<Event>,
}

/// How far behind a subscription is.
#[derive(Debug, Default, Clone, Copy)]
pub struct Backlog {
    /// Deliveries not yet made.
    pub pending: u64,
    /// When the oldest of them was accepted, Unix milliseconds.
    pub oldest_ms: Option<u64>,
    /// Dead letters.
    pub dead: u64,
}

/// The store failed (disk error, Redis down): the event or outcome was not recorded.
#[derive(Debug, thiserror::Error)]
#[error("event store: {0}")]
pub struct StoreError(pub String);

impl StoreError {
    pub(crate) fn from<E: std::fmt::Display>(e: E) -> Self {
        Self(e.to_string())
    }
}

/// Where events and deliveries are kept. Every method is one atomic change: a crash between
/// two calls leaves each record either before or after, never lost.
#[async_trait::async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Persists `event` in the feed and one delivery for each of `subscriptions`, durably,
    /// before returning. A subscription already holding `max_pending` deliveries drops its
    /// oldest; returns the event's id and how many were dropped per subscription (same order).
    async fn append(
        &self,
        event: &Event,
        subscriptions: &[String],
        max_pending: u64,
    ) -> Result<(String, Vec<u64>), StoreError>;

    /// Up to `max` deliveries of `subscription` due at `now_ms`, oldest first, none of them
    /// given to another replica at the same time; one another replica took and has not settled
    /// for `claim_after` (it died) is given again.
    async fn due(
        &self,
        subscription: &str,
        now_ms: u64,
        max: usize,
        claim_after: Duration,
    ) -> Result<Vec<Delivery>, StoreError>;

    /// The delivery was made: forget it.
    async fn delivered(&self, subscription: &str, delivery: &Delivery) -> Result<(), StoreError>;

    /// The attempt failed: try again at `at_ms`, one more attempt counted.
    async fn retry_at(
        &self,
        subscription: &str,
        delivery: &Delivery,
        at_ms: u64,
    ) -> Result<(), StoreError>;

    /// Gives the delivery up: it becomes a dead letter.
    async fn bury(
        &self,
        subscription: &str,
        delivery: &Delivery,
        reason: &str,
        now_ms: u64,
    ) -> Result<(), StoreError>;

    /// Every delivery of `subscription` still to make becomes a dead letter (the subscriber
    /// answered 410 Gone). Returns how many.
    async fn bury_all(
        &self,
        subscription: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<u64, StoreError>;

    /// Dead letters of `subscriptions`, oldest first, at most `max`.
    async fn dead_letters(
        &self,
        subscriptions: &[String],
        max: usize,
    ) -> Result<Vec<DeadLetter>, StoreError>;

    /// Dead letters of `subscriptions` (only `event_id`'s when given) become deliveries again,
    /// their attempts reset. Returns how many.
    async fn replay(
        &self,
        subscriptions: &[String],
        event_id: Option<&str>,
    ) -> Result<u64, StoreError>;

    /// Drops the oldest dead letters of `subscription` beyond `max`; returns how many.
    async fn trim_dead(&self, subscription: &str, max: u64) -> Result<u64, StoreError>;

    /// Feed events after `after` (from the oldest kept when `None`), at most `max`.
    async fn feed(&self, after: Option<&str>, max: usize) -> Result<FeedPage, StoreError>;

    /// The position of the newest event (a cursor that skips everything kept).
    async fn tip(&self) -> Result<String, StoreError>;

    /// How many deliveries a worker takes at once.
    fn batch(&self) -> usize {
        16
    }

    /// Whether deliveries come out in order per document (a failed one holds back the
    /// document's later events).
    fn ordered(&self) -> bool {
        false
    }

    /// Whether `cursor` is one this store could have given.
    fn valid_cursor(&self, cursor: &str) -> bool;

    /// How far behind `subscription` is.
    async fn backlog(&self, subscription: &str) -> Result<Backlog, StoreError>;

    /// Drops feed events older than `before_ms` or beyond `max_events`; returns how many.
    async fn trim_feed(&self, before_ms: u64, max_events: u64) -> Result<u64, StoreError>;
}
