//! The pull feed: `GET /_erpgate/events` with a client's gateway key, for integrations that
//! cannot receive webhooks. It answers the events that client may read (a site it may use, a
//! doctype its rules let it read), oldest first, and the cursor for the next call:
//!
//! ```text
//! GET /_erpgate/events?since=<cursor>&doctype=ToDo&limit=100&wait=30s
//! {"message": {"events": [{"id", "type", "timestamp", "data": {...}}, ...], "next": "<cursor>"}}
//! ```
//!
//! Without `since`, from the oldest event kept; `since=now`, only what comes next. With `wait`
//! (at most [`MAX_WAIT`]) an empty answer waits for an event (long-polling). The cursor moves
//! past events the client may not read too, so a poll never scans them twice.
//!
//! Inside authentication (the client is known), outside routing: the path is erpgate's own,
//! never forwarded. A request costs one unit of the client's request quota and holds one of its
//! in-flight slots while it waits. OAuth apps' users have no feed (their reads are Frappe's
//! per-user permissions, which erpgate cannot evaluate for an event).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::future::Either;
use http::{header, HeaderValue, Method, Request, Response};
use tower::{Layer, Service};

use crate::error::GatewayError;
use crate::events::delivery::EventObject;
use crate::events::store::FeedEntry;
use crate::events::{may_read, EventRelay};
use crate::frappe::form_dict::query_value;
use crate::layers::auth::Client;
use crate::layers::BoxResponseFuture;
use crate::oauth::OAuthUser;
use crate::{full_body, Body, BoxError};

/// The feed's path.
pub const FEED_PATH: &str = "/_erpgate/events";
/// Longest `wait`.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Most events per answer.
pub const MAX_LIMIT: usize = 1000;
/// Stored events one call reads at most looking for readable ones (then it answers with what
/// it found and a cursor past them).
const MAX_SCAN: usize = 2_000;
/// An answer stops growing past about this many bytes (at least one event is always sent).
const MAX_ANSWER_BYTES: usize = 4 << 20;
/// How often a waiting call looks again without a wake-up (another replica's event whose
/// message was missed).
const RECHECK: Duration = Duration::from_secs(1);

/// Serves the feed from `relay`.
#[derive(Debug, Clone)]
pub struct EventFeedLayer {
    relay: Arc<EventRelay>,
}

impl EventFeedLayer {
    /// The feed of `relay`.
    pub fn new(relay: Arc<EventRelay>) -> Self {
        Self { relay }
    }
}

impl<S> Layer<S> for EventFeedLayer {
    type Service = EventFeed<S>;
    fn layer(&self, inner: S) -> Self::Service {
        EventFeed {
            inner,
            relay: self.relay.clone(),
        }
    }
}

/// The service of [`EventFeedLayer`].
#[derive(Debug, Clone)]
pub struct EventFeed<S> {
    inner: S,
    relay: Arc<EventRelay>,
}

impl<S> Service<Request<Body>> for EventFeed<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Either<S::Future, BoxResponseFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let path = request.uri().path();
        if path != FEED_PATH && path != "/_erpgate/events/" {
            return Either::Left(self.inner.call(request));
        }
        Either::Right(Box::pin(serve(self.relay.clone(), request)))
    }
}

/// A feed request, parsed.
struct FeedQuery {
    since: Option<String>,
    doctype: Option<String>,
    limit: usize,
    wait: Duration,
}

fn parse(relay: &EventRelay, query: Option<&str>) -> Result<FeedQuery, GatewayError> {
    let bad = |m: &str| GatewayError::BadRequest(m.to_owned());
    let since = query_value(query, "since").filter(|s| !s.is_empty());
    if let Some(since) = since.as_deref().filter(|s| *s != "now") {
        if !relay.store().valid_cursor(since) {
            return Err(bad("since is not a cursor this feed gave"));
        }
    }
    let limit = match query_value(query, "limit") {
        None => 100,
        Some(n) => n
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| bad("limit must be 1 to 1000"))?,
    };
    let wait = match query_value(query, "wait") {
        None => Duration::ZERO,
        Some(w) => {
            // `30` means seconds, as `30s` does.
            let parsed = w
                .parse::<u64>()
                .map(Duration::from_secs)
                .or_else(|_| humantime::parse_duration(&w));
            parsed
                .ok()
                .filter(|d| *d <= MAX_WAIT)
                .ok_or_else(|| bad("wait must be a duration of at most 60s"))?
        }
    };
    Ok(FeedQuery {
        since,
        doctype: query_value(query, "doctype").filter(|d| !d.is_empty()),
        limit,
        wait,
    })
}

async fn serve(relay: Arc<EventRelay>, request: Request<Body>) -> Result<Response<Body>, BoxError> {
    if request.extensions().get::<OAuthUser>().is_some() {
        return Err(GatewayError::NotPermitted(
            "the event feed takes a gateway key; OAuth access tokens have no feed",
        )
        .into());
    }
    let Some(client) = request.extensions().get::<Arc<Client>>().cloned() else {
        return Err(GatewayError::Unauthenticated("no client").into());
    };
    if client.rules.is_none() {
        return Err(GatewayError::NotPermitted(
            "the event feed lists only doctypes the client's allow rules grant read on; this \
             client has no allow rules",
        )
        .into());
    }
    if request.method() != Method::GET {
        return Err(GatewayError::BadRequest("the event feed is read with GET".into()).into());
    }
    let query = parse(&relay, request.uri().query())?;
    if let Some(quota) = &client.quotas.requests {
        if let Err((_, wait)) = quota.check() {
            return Err(GatewayError::TooManyRequests {
                message: "request quota exhausted; retry later",
                retry_after: wait.max(Duration::from_millis(1)),
            }
            .into());
        }
    }
    let Some(_slot) = client.in_flight.try_acquire() else {
        return Err(GatewayError::TooManyRequests {
            message: "too many requests in flight for this client",
            retry_after: Duration::from_secs(1),
        }
        .into());
    };
    let unavailable = |e: crate::events::StoreError| -> BoxError {
        tracing::warn!(error = %e, "event feed unavailable");
        GatewayError::EventsUnavailable {
            retry_after: Duration::from_secs(1),
        }
        .into()
    };
    let mut cursor = match query.since.as_deref() {
        Some("now") => Some(relay.store().tip().await.map_err(unavailable)?),
        other => other.map(str::to_owned),
    };
    let deadline = Instant::now() + query.wait;
    let mut appended = relay.appended();
    let mut events: Vec<FeedEntry> = Vec::new();
    let mut bytes = 0;
    loop {
        appended.mark_unchanged();
        let mut scanned = 0;
        while events.len() < query.limit && bytes < MAX_ANSWER_BYTES && scanned < MAX_SCAN {
            let page = relay
                .store()
                .feed(cursor.as_deref(), query.limit.clamp(20, 100))
                .await
                .map_err(unavailable)?;
            let Some(last) = page.last else { break };
            scanned += page.entries.len().max(1);
            let mut stopped_at = None;
            for entry in page.entries {
                if events.len() == query.limit || bytes >= MAX_ANSWER_BYTES {
                    stopped_at = Some(());
                    break;
                }
                cursor = Some(entry.id.clone());
                let wanted = query
                    .doctype
                    .as_deref()
                    .is_none_or(|d| d.eq_ignore_ascii_case(&entry.event.doctype))
                    && may_read(&client, &entry.event);
                if wanted {
                    bytes += EventObject::size_hint(&entry.event);
                    events.push(entry);
                }
            }
            if stopped_at.is_none() {
                cursor = Some(last);
            }
        }
        let now = Instant::now();
        if !events.is_empty() || now >= deadline {
            break;
        }
        let _ = tokio::time::timeout((deadline - now).min(RECHECK), appended.changed()).await;
    }
    // Without any event kept, the cursor is the tip: a next call gets only what comes later.
    let next = match cursor {
        Some(cursor) => cursor,
        None => relay.store().tip().await.map_err(unavailable)?,
    };
    #[derive(serde::Serialize)]
    struct Page<'a> {
        events: Vec<EventObject<'a>>,
        next: &'a str,
    }
    #[derive(serde::Serialize)]
    struct Answer<'a> {
        message: Page<'a>,
    }
    let answer = Answer {
        message: Page {
            events: events
                .iter()
                .map(|e| EventObject::new(&e.id, &e.event))
                .collect(),
            next: &next,
        },
    };
    let body = serde_json::to_vec(&answer).map_err(|e| -> BoxError { e.into() })?;
    let mut response = Response::new(full_body(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
