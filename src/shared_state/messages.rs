//! What one replica tells the others, over one Redis pub/sub channel (`<prefix>events`):
//! cache invalidations (a write, a signed webhook or an admin purge on any replica) and
//! auth-failure blocks (a key id or address over its failure quota).
//!
//! Pub/sub delivers only to those subscribed at the time, so a replica that is not subscribed
//! (Redis down, the connection lost, just started) may miss messages. It therefore reports
//! itself out of sync (the cache is bypassed, not served), and on every (re)subscription its
//! listeners treat everything as invalidated: no replica serves an entry older than an
//! invalidation it missed.

use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::SharedState;

/// A message between replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    /// Every cached answer of a doctype on a site.
    Doctype { site: String, doctype: String },
    /// One document's answers and its doctype's lists.
    Document {
        site: String,
        doctype: String,
        name: String,
    },
    /// Everything cached for a site.
    Site { site: String },
    /// Everything cached.
    All,
    /// An auth-failure bucket (`address:<ip>`, `key:<id>`, `unknown-keys`) is over its quota
    /// for `millis` more.
    Block { bucket: String, millis: u64 },
    /// An event was stored: feed readers and delivery workers look now, not at their next poll.
    EventsAppended,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    from: String,
    #[serde(flatten)]
    message: Message,
}

/// Hears other replicas.
pub trait Listener: Send + Sync {
    /// Another replica sent `message`.
    fn on_message(&self, message: &Message);
    /// Messages may have been missed (the subscription was lost, or is new).
    fn on_missed(&self);
}

fn listeners(shared: &SharedState, each: impl Fn(&dyn Listener)) {
    for listener in shared.listeners.load().iter() {
        if let Some(listener) = listener.upgrade() {
            each(listener.as_ref());
        }
    }
}

/// Publishes queued messages in order; one that cannot be sent is retried until Redis takes
/// it (a missed invalidation would leave stale answers elsewhere).
pub(super) async fn publish(state: Weak<SharedState>, mut outgoing: mpsc::Receiver<Message>) {
    let mut pending: Option<Message> = None;
    loop {
        let message = match pending.take() {
            Some(message) => message,
            None => match outgoing.recv().await {
                Some(message) => message,
                None => return,
            },
        };
        let Some(shared) = state.upgrade() else {
            return;
        };
        let message = if shared.outbox_overflowed.swap(false, Ordering::AcqRel) {
            Message::All
        } else {
            message
        };
        let envelope = Envelope {
            from: shared.replica.clone(),
            message,
        };
        let Ok(payload) = serde_json::to_vec(&envelope) else {
            continue;
        };
        let channel = shared.channel.clone();
        let sent = shared
            .run("publish", |mut connection| async move {
                redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(&payload)
                    .query_async::<i64>(&mut connection)
                    .await
            })
            .await;
        match sent {
            Ok(_) => shared
                .metrics
                .pubsub_messages
                .with_label_values(&["sent"])
                .inc(),
            Err(_) => {
                pending = Some(envelope.message);
                drop(shared);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Keeps a subscription; on each new one, tells the listeners they may have missed messages.
pub(super) async fn subscribe(state: Weak<SharedState>) {
    loop {
        let Some(shared) = state.upgrade() else {
            return;
        };
        let client = shared.client.clone();
        let channel = shared.channel.clone();
        let timeout = shared.connect_timeout;
        drop(shared);
        let connecting = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = match tokio::time::timeout(timeout * 2, connecting).await {
            Ok(Ok(pubsub)) => pubsub,
            _ => {
                tokio::time::sleep(super::PROBE_INTERVAL).await;
                continue;
            }
        };
        let Some(shared) = state.upgrade() else {
            return;
        };
        // Anything sent before now may have been missed.
        listeners(&shared, |l| l.on_missed());
        shared.subscribed.store(true, Ordering::Release);
        let lost = shared.lost.clone();
        tracing::info!("shared state: subscribed to other replicas' invalidations");
        // A subscription lost while no command failed may mean a Redis that restarted between
        // two requests: look at which server answers now.
        shared.check_server().await;
        drop(shared);
        let mut stream = pubsub.into_on_message();
        loop {
            // Only the weak reference is held while waiting, so a reload can drop the state.
            tokio::select! {
                message = stream.next() => match (message, state.upgrade()) {
                    (Some(message), Some(shared)) => received(&shared, message.get_payload_bytes()),
                    (None, _) => break,
                    (_, None) => return,
                },
                // A command found Redis gone: this connection may be as dead, silently.
                () = lost.notified() => break,
            }
        }
        let Some(shared) = state.upgrade() else {
            return;
        };
        shared.subscribed.store(false, Ordering::Release);
        // From now on, until subscribed again, messages are missed.
        listeners(&shared, |l| l.on_missed());
        tracing::warn!("shared state: subscription lost; the cache is bypassed until it is back");
        drop(shared);
        tokio::time::sleep(super::PROBE_INTERVAL).await;
    }
}

fn received(shared: &SharedState, payload: &[u8]) {
    let Ok(envelope) = serde_json::from_slice::<Envelope>(payload) else {
        tracing::warn!("shared state: ignored a message that is not erpgate's");
        return;
    };
    if envelope.from == shared.replica {
        return;
    }
    shared
        .metrics
        .pubsub_messages
        .with_label_values(&["received"])
        .inc();
    listeners(shared, |l| l.on_message(&envelope.message));
}
