//! Delivering: one worker per subscription takes due deliveries from the store, POSTs each,
//! and records the outcome — delivered, retried later, a dead letter, or (on 410 Gone) the end
//! of everything queued for that subscription. One log line per final outcome.
//!
//! The body is the event in the Standard Webhooks shape (`type`, `timestamp`, `data`); the
//! feed answers the same objects.

use std::sync::Weak;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::signature::sign;
use super::store::{Delivery, Event};
use super::{now_ms, EventRelay, Subscriber, IDLE_POLL};

/// The client deliveries go out on (HTTP/1.1, TLS by the system's roots).
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the delivery client.
pub fn http_client() -> Result<HttpClient, crate::upstream::UpstreamBuildError> {
    let connector = crate::upstream::https_connector(Duration::from_secs(5), None)?;
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector))
}

/// The JSON object of one event, as delivered and as the feed lists it: serialized straight
/// from the stored event, Frappe's body copied as it came (never parsed again).
#[derive(Debug, serde::Serialize)]
pub struct EventObject<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: String,
    timestamp: String,
    data: EventData<'a>,
}

#[derive(Debug, serde::Serialize)]
struct EventData<'a> {
    site: &'a str,
    doctype: &'a str,
    name: Option<&'a str>,
    event: &'a str,
    doc: &'a serde_json::value::RawValue,
}

impl<'a> EventObject<'a> {
    /// Event `id` as subscribers and the feed see it.
    pub fn new(id: &'a str, event: &'a Event) -> Self {
        let timestamp = std::time::UNIX_EPOCH + Duration::from_millis(event.received_ms);
        Self {
            id,
            kind: format!("erpnext.{}", event.event),
            timestamp: humantime::format_rfc3339_millis(timestamp).to_string(),
            data: EventData {
                site: &event.site,
                doctype: &event.doctype,
                name: event.name.as_deref(),
                event: &event.event,
                doc: &event.payload,
            },
        }
    }

    /// About how many bytes it serializes to.
    pub fn size_hint(event: &Event) -> usize {
        event.payload.get().len() + event.doctype.len() + 256
    }
}

/// What one attempt came to.
enum Attempt {
    Delivered,
    Gone,
    Failed(String),
}

async fn attempt(relay: &EventRelay, subscriber: &Subscriber, delivery: &Delivery) -> Attempt {
    let body = match serde_json::to_vec(&EventObject::new(&delivery.event_id, &delivery.event)) {
        Ok(body) => body,
        Err(e) => return Attempt::Failed(e.to_string()),
    };
    let id = format!("evt_{}", delivery.event_id);
    let timestamp = now_ms() / 1000;
    let signature = sign(&subscriber.key_hmac, &id, timestamp, &body);
    let request = Request::builder()
        .method(Method::POST)
        .uri(subscriber.url.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::USER_AGENT, "erpgate")
        .header("webhook-id", &id)
        .header("webhook-timestamp", itoa::Buffer::new().format(timestamp))
        .header("webhook-signature", signature)
        .body(Full::new(Bytes::from(body)));
    let request = match request {
        Ok(request) => request,
        Err(e) => return Attempt::Failed(e.to_string()),
    };
    let exchange = async {
        let response = relay.client.request(request).await?;
        let status = response.status();
        // Read (a little of) the answer so the connection can be reused.
        let _ = http_body_util::Limited::new(response.into_body(), 64 << 10)
            .collect()
            .await;
        Ok::<_, hyper_util::client::legacy::Error>(status)
    };
    match tokio::time::timeout(subscriber.timeout, exchange).await {
        Ok(Ok(status)) if status.is_success() => Attempt::Delivered,
        Ok(Ok(StatusCode::GONE)) => Attempt::Gone,
        Ok(Ok(status)) => Attempt::Failed(format!("answered {}", status.as_u16())),
        Ok(Err(e)) => Attempt::Failed(format!("request failed: {e}")),
        Err(_) => Attempt::Failed(format!("no answer within {:?}", subscriber.timeout)),
    }
}

/// The worker of subscription `key`: runs while the relay lives and the subscription is
/// configured.
pub async fn work(relay: Weak<EventRelay>, key: String) {
    let mut appended = match relay.upgrade() {
        Some(relay) => relay.appended(),
        None => return,
    };
    loop {
        let Some(relay) = relay.upgrade() else {
            return;
        };
        let Some(subscriber) = relay.subscriber(&key) else {
            return;
        };
        appended.mark_unchanged();
        let due = match relay
            .store
            .due(
                &key,
                now_ms(),
                relay.store.batch(),
                subscriber.claim_after(),
            )
            .await
        {
            Ok(due) => due,
            Err(e) => {
                tracing::debug!(subscription = key, error = %e, "event store unavailable");
                Vec::new()
            }
        };
        if due.is_empty() {
            drop(relay);
            let _ = tokio::time::timeout(IDLE_POLL, appended.changed()).await;
            continue;
        }
        // A document whose delivery failed holds its later events back (in the embedded
        // store, which keeps them in order).
        let mut held: Vec<(String, Option<String>)> = Vec::new();
        for delivery in due {
            let document = (delivery.event.doctype.clone(), delivery.event.name.clone());
            if relay.store.ordered() && held.contains(&document) {
                continue;
            }
            match handle(&relay, &subscriber, &delivery).await {
                Handled::Settled => {}
                Handled::Again => held.push(document),
                // Everything queued, the rest of this batch included, is a dead letter now.
                Handled::Ended => break,
            }
        }
    }
}

/// What became of one delivery.
enum Handled {
    /// Delivered, withdrawn or buried: done with.
    Settled,
    /// To be tried again.
    Again,
    /// The subscriber said 410 Gone: everything queued for it ended.
    Ended,
}

/// Makes one delivery and records its outcome.
async fn handle(relay: &EventRelay, subscriber: &Subscriber, delivery: &Delivery) -> Handled {
    let store = &relay.store;
    let key = subscriber.key.as_str();
    let count = |outcome: &str, n: u64| {
        relay
            .metrics
            .deliveries
            .with_label_values(&[&*subscriber.client.name, &subscriber.name, outcome])
            .inc_by(n);
    };
    let event = &delivery.event;
    if !subscriber.wants(event) {
        // The rules changed since it was queued: the client may no longer read it.
        if store.delivered(key, delivery).await.is_ok() {
            count("forbidden", 1);
            tracing::info!(
                subscription = key,
                id = delivery.event_id,
                doctype = event.doctype,
                "event delivery withdrawn: the client may no longer read this doctype"
            );
        }
        return Handled::Settled;
    }
    match attempt(relay, subscriber, delivery).await {
        Attempt::Delivered => {
            if store.delivered(key, delivery).await.is_ok() {
                count("delivered", 1);
                tracing::info!(
                    subscription = key,
                    id = delivery.event_id,
                    doctype = event.doctype,
                    name = event.name,
                    event = event.event,
                    attempts = delivery.attempts + 1,
                    "event delivered"
                );
            }
            Handled::Settled
        }
        Attempt::Gone => {
            let now = now_ms();
            let buried = store.bury_all(key, "410 Gone", now).await.unwrap_or(0);
            count("gone", buried);
            tracing::warn!(
                subscription = key,
                ended = buried,
                "subscriber answered 410 Gone: its queued deliveries are dead letters"
            );
            Handled::Ended
        }
        Attempt::Failed(reason) => {
            count("failed", 1);
            let now = now_ms();
            let wait = relay.backoff(delivery.attempts);
            let deadline = event
                .received_ms
                .saturating_add(u64::try_from(relay.settings().retry_for.as_millis()).unwrap_or(0));
            let next = now.saturating_add(u64::try_from(wait.as_millis()).unwrap_or(0));
            if next > deadline {
                if store.bury(key, delivery, &reason, now).await.is_ok() {
                    count("dead_lettered", 1);
                    tracing::warn!(
                        subscription = key,
                        id = delivery.event_id,
                        doctype = event.doctype,
                        name = event.name,
                        attempts = delivery.attempts + 1,
                        reason,
                        "event delivery given up: now a dead letter"
                    );
                }
            } else {
                let _ = store.retry_at(key, delivery, next).await;
                tracing::debug!(
                    subscription = key,
                    id = delivery.event_id,
                    reason,
                    "event delivery failed; retrying"
                );
            }
            Handled::Again
        }
    }
}
