//! The event relay: one Frappe webhook in, a signed delivery to every subscription that wants
//! it out, and the same events on a pull feed (README "Events").
//!
//! An event received on a doctype's signed webhook URL (the doctype is the URL's; a body naming
//! another is refused: [`crate::frappe::webhook::bound_target`]) is persisted ([`store`]) with
//! one delivery per matching subscription *before* Frappe hears 200 — at-least-once from then
//! on. A worker
//! per subscription ([`delivery`]) sends each with Standard Webhooks headers ([`signature`]),
//! retries failures with exponential backoff and jitter for `retry_for`, then buries them as
//! dead letters the admin listener lists and replays.
//!
//! Who receives what is the client's own rules: a subscription gets an event only of a site
//! its client may use and of a doctype its `allow` rules let it read (checked when the event is
//! accepted and again before each delivery, so a reload that narrows the rules stops what is
//! queued); the pull feed filters the same way.

pub mod delivery;
pub mod disk;
pub mod redis_streams;
pub mod signature;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde_json::value::RawValue;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::EventsConfig;
use crate::frappe::webhook::WebhookTarget;
use crate::layers::auth::Client;
use crate::metrics::EventMetrics;
use crate::shared_state::{Listener, Message, SharedState};
use signature::SigningKey;
pub use store::{Event, EventStore, StoreError};

/// How often an idle worker looks for due deliveries (retries, other replicas' events).
const IDLE_POLL: Duration = Duration::from_millis(250);
/// How long a webhook body is remembered to recognise a repeat.
const REPEAT_WINDOW: Duration = Duration::from_secs(300);
/// Bodies remembered at most (32 bytes each).
const RECENT_BODIES: u64 = 100_000;
/// Housekeeping rounds between two trims of the dead letters.
const DEAD_LETTER_TRIM_ROUNDS: u64 = 30;
/// How often the feed is trimmed (one cheap look at its oldest entry when nothing is due).
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// One subscription, as the relay runs it.
pub struct Subscriber {
    /// `client/name`: its key in the store.
    pub key: String,
    /// The subscribing client (its sites and rules decide what it gets).
    pub client: Arc<Client>,
    /// The subscription's name.
    pub name: String,
    /// Where deliveries go.
    pub url: http::Uri,
    /// Doctypes wanted (`*`: all).
    pub doctypes: Vec<String>,
    /// Events wanted (empty: all).
    pub events: Vec<String>,
    /// The signing key.
    pub key_hmac: SigningKey,
    /// Time one delivery may take.
    pub timeout: Duration,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("key", &self.key)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Whether `client` may read `event`: a site it has an account on, and a doctype its `allow`
/// rules grant read on. A request's answer is Frappe's decision under the service account; an
/// event is relayed by erpgate alone, which cannot know what that account may read in Frappe.
/// So an event needs an explicit grant: a client without `allow` rules gets none. (Frappe's
/// row-level User Permissions and field permission levels are not applied either: a subscriber
/// gets the fields the site's Webhook body lists — README "Events".)
pub fn may_read(client: &Client, event: &Event) -> bool {
    client.account_on(&event.site).is_some()
        && client
            .rules
            .as_ref()
            .is_some_and(|rules| rules.may_read(&event.doctype))
}

impl Subscriber {
    /// How long a delivery another replica took may stay unsettled before it is presumed dead:
    /// longer than any live attempt and its bookkeeping.
    pub fn claim_after(&self) -> Duration {
        self.timeout * 2 + Duration::from_secs(5)
    }

    /// Whether this subscription gets `event`.
    pub fn wants(&self, event: &Event) -> bool {
        self.doctypes
            .iter()
            .any(|d| d == "*" || d.eq_ignore_ascii_case(&event.doctype))
            && (self.events.is_empty() || self.events.contains(&event.event))
            && may_read(&self.client, event)
    }
}

/// The relay: its store, its subscribers and their workers.
pub struct EventRelay {
    store: Arc<dyn EventStore>,
    settings: ArcSwap<EventsConfig>,
    subscribers: ArcSwap<Vec<Arc<Subscriber>>>,
    /// Bumped on every append here or on another replica: wakes workers and feed readers.
    appended: watch::Sender<u64>,
    shared: Option<Arc<SharedState>>,
    metrics: EventMetrics,
    client: delivery::HttpClient,
    workers: Mutex<HashMap<String, JoinHandle<()>>>,
    housekeeping: Mutex<Option<JoinHandle<()>>>,
    /// Hashes of the webhook bodies accepted lately, per site: Frappe signs no timestamp, so a
    /// captured webhook can be sent again; a repeat within [`REPEAT_WINDOW`] of a body that
    /// carries the document's `modified` (new on every save, so a same body is the same change)
    /// is acknowledged and not stored again (on this replica). Bodies without it are all kept:
    /// a minimal body is the same for two different saves.
    recent: moka::sync::Cache<[u8; 32], ()>,
}

impl std::fmt::Debug for EventRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRelay").finish_non_exhaustive()
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl EventRelay {
    /// Opens the store (Redis Streams with `shared`, else the embedded one) and starts
    /// housekeeping. Must run inside the gateway's long-lived Tokio runtime.
    pub fn start(
        settings: &EventsConfig,
        shared: Option<Arc<SharedState>>,
        metrics: EventMetrics,
    ) -> Result<Arc<Self>, StoreError> {
        let store: Arc<dyn EventStore> = match (&shared, &settings.directory) {
            (Some(state), _) => Arc::new(redis_streams::RedisStore::new(state.clone())),
            (None, Some(directory)) => Arc::new(disk::DiskStore::open(directory)?),
            (None, None) => return Err(StoreError("events.directory is required".into())),
        };
        let relay = Arc::new(Self {
            store,
            settings: ArcSwap::from_pointee(settings.clone()),
            subscribers: ArcSwap::from_pointee(Vec::new()),
            appended: watch::Sender::new(0),
            shared,
            metrics,
            client: delivery::http_client().map_err(StoreError::from)?,
            workers: Mutex::new(HashMap::new()),
            housekeeping: Mutex::new(None),
            recent: moka::sync::Cache::builder()
                .max_capacity(RECENT_BODIES)
                .time_to_live(REPEAT_WINDOW)
                .build(),
        });
        let task = tokio::spawn(housekeeping(Arc::downgrade(&relay)));
        if let Ok(mut slot) = relay.housekeeping.lock() {
            *slot = Some(task);
        }
        Ok(relay)
    }

    /// Takes a reload's retry, retention and cap settings (the store stays where it is).
    pub fn set_settings(&self, settings: &EventsConfig) {
        self.settings.store(Arc::new(settings.clone()));
    }

    /// The settings in force.
    fn settings(&self) -> Arc<EventsConfig> {
        self.settings.load_full()
    }

    /// Replaces the subscriptions (a reload): workers start for new ones, stop for removed
    /// ones; deliveries already stored for a removed one wait for it to come back.
    pub fn set_subscribers(self: &Arc<Self>, subscribers: Vec<Arc<Subscriber>>) {
        self.subscribers.store(Arc::new(subscribers));
        let Ok(mut workers) = self.workers.lock() else {
            return;
        };
        let current = self.subscribers.load();
        workers.retain(|key, task| {
            let keep = current.iter().any(|s| s.key == *key) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for subscriber in current.iter() {
            if !workers.contains_key(&subscriber.key) {
                let task =
                    tokio::spawn(delivery::work(Arc::downgrade(self), subscriber.key.clone()));
                workers.insert(subscriber.key.clone(), task);
            }
        }
    }

    /// The subscription `key`, while configured.
    fn subscriber(&self, key: &str) -> Option<Arc<Subscriber>> {
        self.subscribers
            .load()
            .iter()
            .find(|s| s.key == key)
            .cloned()
    }

    /// Keys of the configured subscriptions.
    fn subscription_keys(&self) -> Vec<String> {
        self.subscribers
            .load()
            .iter()
            .map(|s| s.key.clone())
            .collect()
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// Persists a signed webhook's event with its deliveries; only then may Frappe hear 200.
    /// False for a repeat of a body (with `modified`) accepted within the last minutes.
    pub async fn accept(
        &self,
        site: &str,
        target: &WebhookTarget,
        body: &[u8],
    ) -> Result<bool, StoreError> {
        // Only bodies carrying `modified` can be told apart from a second save: only they are
        // remembered, and only they pay for the hash.
        let fingerprint: Option<[u8; 32]> = target.modified.is_some().then(|| {
            use sha2::Digest as _;
            let mut hash = sha2::Sha256::new();
            hash.update(site.as_bytes());
            hash.update([0]);
            hash.update(body);
            hash.finalize().into()
        });
        if fingerprint.is_some_and(|f| self.recent.contains_key(&f)) {
            self.metrics.repeats.with_label_values(&[site]).inc();
            tracing::info!(
                site,
                doctype = target.doctype,
                "repeated webhook body: kept once already"
            );
            return Ok(false);
        }
        let payload = serde_json::from_slice::<&RawValue>(body)
            .map_err(StoreError::from)?
            .to_owned();
        let event = Event {
            site: site.to_owned(),
            doctype: target.doctype.clone(),
            name: target.name.clone(),
            event: target.event.clone().unwrap_or_else(|| "change".to_owned()),
            received_ms: now_ms(),
            payload,
        };
        let subscribers = self.subscribers.load();
        let wanted: Vec<&Arc<Subscriber>> =
            subscribers.iter().filter(|s| s.wants(&event)).collect();
        let keys: Vec<String> = wanted.iter().map(|s| s.key.clone()).collect();
        let (id, dropped) = self
            .store
            .append(&event, &keys, self.settings().max_pending_per_subscription)
            .await?;
        self.metrics.received.with_label_values(&[site]).inc();
        for (subscriber, dropped) in wanted.iter().zip(dropped) {
            if dropped > 0 {
                self.metrics
                    .deliveries
                    .with_label_values(&[&*subscriber.client.name, &subscriber.name, "dropped"])
                    .inc_by(dropped);
                tracing::warn!(
                    subscription = subscriber.key,
                    dropped,
                    "event deliveries dropped: the subscription holds max_pending_per_subscription"
                );
            }
        }
        tracing::info!(
            site,
            doctype = event.doctype,
            event = event.event,
            id,
            subscriptions = keys.len(),
            "event accepted"
        );
        if let Some(fingerprint) = fingerprint {
            self.recent.insert(fingerprint, ());
        }
        self.wake();
        if let Some(shared) = &self.shared {
            shared.broadcast(Message::EventsAppended);
        }
        Ok(true)
    }

    /// Counts a signed webhook refused at a doctype's intake URL.
    pub fn refused(&self, site: &str, reason: &str) {
        self.metrics
            .refused
            .with_label_values(&[site, reason])
            .inc();
    }

    /// Wakes workers and feed readers here.
    fn wake(&self) {
        self.appended.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes on every append (here, or another replica's when shared).
    pub fn appended(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// Dead letters of the configured subscriptions, oldest first.
    pub async fn dead_letters(&self, max: usize) -> Result<Vec<store::DeadLetter>, StoreError> {
        self.store
            .dead_letters(&self.subscription_keys(), max)
            .await
    }

    /// Replays dead letters of `subscription` (every configured one when `None`), or one event.
    pub async fn replay(
        &self,
        subscription: Option<&str>,
        event_id: Option<&str>,
    ) -> Result<u64, StoreError> {
        let keys: Vec<String> = self
            .subscription_keys()
            .into_iter()
            .filter(|k| subscription.is_none_or(|s| s == k))
            .collect();
        let replayed = self.store.replay(&keys, event_id).await?;
        self.wake();
        Ok(replayed)
    }

    /// Backoff before attempt `attempts + 1`: exponential from `initial_backoff`, capped, with
    /// jitter over its upper half so retries of many subscriptions do not move in step.
    fn backoff(&self, attempts: u32) -> Duration {
        let settings = self.settings();
        let base = settings
            .initial_backoff
            .saturating_mul(1u32 << attempts.min(20))
            .min(settings.max_backoff);
        let half = base / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

impl Drop for EventRelay {
    fn drop(&mut self) {
        if let Ok(workers) = self.workers.get_mut() {
            for task in workers.values() {
                task.abort();
            }
        }
        if let Ok(Some(task)) = self.housekeeping.get_mut().map(Option::take) {
            task.abort();
        }
    }
}

impl Listener for EventRelay {
    fn on_message(&self, message: &Message) {
        if matches!(message, Message::EventsAppended) {
            self.wake();
        }
    }

    fn on_missed(&self) {
        // Workers and feed readers poll anyway; a missed wake-up only delays them.
        self.wake();
    }
}

impl EventRelay {
    /// Sets the backlog, oldest-undelivered and dead-letter gauges from the store (on every
    /// scrape of `/metrics`, so they are exact when read).
    pub async fn refresh_gauges(&self) {
        let now = now_ms();
        for subscriber in self.subscribers.load().iter() {
            let Ok(backlog) = self.store.backlog(&subscriber.key).await else {
                continue;
            };
            let labels = [&*subscriber.client.name, subscriber.name.as_str()];
            let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            let metrics = &self.metrics;
            metrics
                .backlog
                .with_label_values(&labels)
                .set(to_i64(backlog.pending));
            metrics
                .dead_letters
                .with_label_values(&labels)
                .set(to_i64(backlog.dead));
            let age = backlog
                .oldest_ms
                .map_or(0.0, |at| now.saturating_sub(at) as f64 / 1000.0);
            metrics
                .oldest_undelivered
                .with_label_values(&labels)
                .set(age);
        }
    }
}

/// Trims the feed to its retention and cap.
async fn housekeeping(relay: std::sync::Weak<EventRelay>) {
    let mut round: u64 = 0;
    loop {
        tokio::time::sleep(HOUSEKEEPING).await;
        round += 1;
        let Some(relay) = relay.upgrade() else {
            return;
        };
        let now = now_ms();
        let settings = relay.settings();
        let retention = u64::try_from(settings.feed_retention.as_millis()).unwrap_or(0);
        if let Err(e) = relay
            .store
            .trim_feed(now.saturating_sub(retention), settings.max_feed_events)
            .await
        {
            tracing::debug!(error = %e, "event feed not trimmed");
        }
        // Dead letters are bounded like pending deliveries: the oldest go beyond the cap.
        if round % DEAD_LETTER_TRIM_ROUNDS == 0 {
            for subscriber in relay.subscribers.load().iter() {
                let cap = settings.max_pending_per_subscription;
                if let Ok(trimmed @ 1..) = relay.store.trim_dead(&subscriber.key, cap).await {
                    tracing::warn!(
                        subscription = subscriber.key,
                        trimmed,
                        "oldest dead letters dropped: over max_pending_per_subscription"
                    );
                }
            }
        }
    }
}
