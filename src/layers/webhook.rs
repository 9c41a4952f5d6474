//! Frappe webhooks on the public listener (a prefix no Frappe route uses), so edits made in the
//! ERPNext desk, by scheduled jobs or by other integrations reach the cache, and the event
//! relay's subscribers:
//!
//! - `POST /_erpgate/webhooks/frappe/<site>/<doctype>` (the doctype percent-encoded, e.g.
//!   `Sales%20Order`): one Webhook's intake. The signed body must name exactly that doctype
//!   (its last `doctype` key, as Python reads it) and repeat no key, else 400 and nothing is
//!   purged or relayed ([`bound_target`]): a Webhook whose template renders a field unescaped
//!   cannot be made by a document's text to speak for another doctype. The event relayed
//!   carries the URL's doctype.
//! - `POST /_erpgate/webhooks/frappe/<site>`: cache purge only, as it always was; it never feeds
//!   the event relay, since nothing but the body names its doctype there.
//!
//! The body must carry a valid `X-Frappe-Webhook-Signature` under the site's webhook secret,
//! compared in constant time; otherwise 401 and nothing is invalidated or relayed. The document
//! named in the signed payload (`doctype`, `name`) is dropped from the cache with its doctype's
//! lists; without a name, the whole doctype. Nothing unsigned chooses the target (Frappe signs
//! only the body; the URL's doctype only refuses, it never widens what a body names). With the
//! event relay on, the event is persisted with its deliveries before the answer: 200
//! `{"message": "ok"}` means it is kept; a store failure is 503, which Frappe retries (its
//! webhook job tries three times).
//!
//! Before authentication: Frappe holds no gateway key, the signature is the credential, so the
//! endpoint is open to strangers and bounded accordingly: at most [`MAX_CONCURRENT`] bodies are
//! read at once (more get 429 at once), each must arrive within [`READ_DEADLINE`] (408) and is
//! at most [`MAX_WEBHOOK_BYTES`] (413) — the signature is computed while the body streams, so
//! only the small JSON is held —, one source address reads at most
//! [`MAX_CONCURRENT_PER_SOURCE`] at once (so a stranger trickling bodies cannot take every slot
//! from Frappe), and purges are limited per site ([`PURGES_PER_SECOND`]: 429 above, or with the
//! event kept, a purge of the whole doctype instead, since Frappe must hear 200). A flood of
//! strangers therefore holds at most `MAX_CONCURRENT × MAX_WEBHOOK_BYTES`.

use std::collections::HashMap;
use std::net::IpAddr;

use dashmap::DashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use http::{header, HeaderValue, Method, Request, Response};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tower::{Layer, Service};

use crate::error::GatewayError;
use crate::events::EventRelay;
use crate::forwarding::TrustedProxies;
use crate::frappe::webhook::{bound_target, target, SignatureCheck, SIGNATURE_HEADER};
use crate::layers::cache::Cache;
use crate::layers::BoxResponseFuture;
use crate::tags::RequestTags;
use crate::{full_body, Body, BoxError};

/// The reserved path prefix.
pub const WEBHOOK_PREFIX: &str = "/_erpgate/webhooks/frappe/";

/// Largest webhook body read: a purge names a doctype and a document.
pub const MAX_WEBHOOK_BYTES: usize = 64 << 10;

/// Webhook bodies read at once, over all sites; more are refused with 429 before reading.
pub const MAX_CONCURRENT: usize = 32;

/// Time a sender has to deliver the whole body.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);

/// Webhook bodies read at once from one source address (IPv6: one /64).
pub const MAX_CONCURRENT_PER_SOURCE: usize = 8;

/// One source's share of the bodies being read; given back on drop.
struct SourceSlot<'a> {
    slots: &'a DashMap<IpAddr, usize>,
    source: IpAddr,
}

impl<'a> SourceSlot<'a> {
    fn take(slots: &'a DashMap<IpAddr, usize>, source: IpAddr) -> Option<Self> {
        let mut held = slots.entry(source).or_insert(0);
        if *held >= MAX_CONCURRENT_PER_SOURCE {
            return None;
        }
        *held += 1;
        Some(Self { slots, source })
    }
}

impl Drop for SourceSlot<'_> {
    fn drop(&mut self) {
        // Empty entries go, so the table holds only sources reading now.
        self.slots.remove_if_mut(&self.source, |_, held| {
            *held = held.saturating_sub(1);
            *held == 0
        });
    }
}

/// Purges per second per site (with a burst of twice that); a signed webhook replayed in a
/// loop cannot keep a site's cache empty.
pub const PURGES_PER_SECOND: u32 = 50;

/// Receives webhooks for the sites in `secrets`.
#[derive(Clone)]
pub struct WebhookLayer {
    cache: Option<Arc<Cache>>,
    events: Option<Arc<EventRelay>>,
    trusted: TrustedProxies,
    reading_by_source: Arc<DashMap<IpAddr, usize>>,
    secrets: Arc<HashMap<String, Vec<u8>>>,
    reading: Arc<Semaphore>,
    purges: Arc<DefaultKeyedRateLimiter<String>>,
}

impl std::fmt::Debug for WebhookLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookLayer")
            .field("sites", &self.secrets.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl WebhookLayer {
    /// Webhooks invalidate `cache` and are relayed by `events`; `secrets` are the sites' webhook
    /// secrets by site name.
    pub fn new(
        cache: Option<Arc<Cache>>,
        events: Option<Arc<EventRelay>>,
        secrets: HashMap<String, Vec<u8>>,
        trusted: TrustedProxies,
    ) -> Self {
        let per_second = NonZeroU32::new(PURGES_PER_SECOND).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(PURGES_PER_SECOND * 2).unwrap_or(NonZeroU32::MIN);
        Self {
            cache,
            events,
            trusted,
            reading_by_source: Arc::new(DashMap::new()),
            secrets: Arc::new(secrets),
            reading: Arc::new(Semaphore::new(MAX_CONCURRENT)),
            purges: Arc::new(governor::RateLimiter::keyed(
                Quota::per_second(per_second).allow_burst(burst),
            )),
        }
    }
}

impl<S> Layer<S> for WebhookLayer {
    type Service = Webhook<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Webhook {
            inner,
            layer: self.clone(),
        }
    }
}

/// Which intake a webhook URL names, after the site.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Intake {
    /// `<site>`: cache purge only.
    PurgeOnly,
    /// `<site>/<doctype>`: the events of one doctype (decoded), and their purges.
    Doctype(String),
    /// `<site>/<something>` that is not one doctype name.
    Unusable,
}

impl Intake {
    /// Splits what follows [`WEBHOOK_PREFIX`] into the site and its intake.
    fn parse(rest: &str) -> (String, Self) {
        let rest = rest.trim_end_matches('/');
        let Some((site, doctype)) = rest.split_once('/') else {
            return (rest.to_owned(), Self::PurgeOnly);
        };
        // One segment, decoded once: a doctype name never holds a `/` (Frappe's DocType names
        // are letters, digits, spaces, `-` and `_`), so neither a second segment nor `%2F` is
        // guessed at.
        let decoded = percent_encoding::percent_decode_str(doctype).decode_utf8();
        let intake = match decoded {
            Ok(name) if !doctype.contains('/') && !name.is_empty() && !name.contains('/') => {
                Self::Doctype(name.into_owned())
            }
            _ => Self::Unusable,
        };
        (site.to_owned(), intake)
    }
}

/// The service of [`WebhookLayer`].
#[derive(Debug, Clone)]
pub struct Webhook<S> {
    inner: S,
    layer: WebhookLayer,
}

impl WebhookLayer {
    async fn receive(
        self,
        site: String,
        intake: Intake,
        request: Request<Body>,
    ) -> Result<Response<Body>, BoxError> {
        // The access line and metrics name the site, when it is a configured one (a name from
        // the URL alone is request text, never a label).
        if let (Some(tags), Some((name, _))) =
            (RequestTags::of(&request), self.secrets.get_key_value(&site))
        {
            let _ = tags.site.set(Arc::from(name.as_str()));
        }
        if request.method() != Method::POST {
            return Err(GatewayError::BadRequest("webhooks are POST requests".into()).into());
        }
        let Some(secret) = self.secrets.get(&site) else {
            return Err(GatewayError::NotFound(format!(
                "no webhook is configured for site {site}"
            ))
            .into());
        };
        match intake {
            Intake::Unusable => {
                return Err(GatewayError::NotFound(format!(
                    "webhook URLs are /_erpgate/webhooks/frappe/{site}/<doctype>, the doctype \
                     percent-encoded as one path segment"
                ))
                .into())
            }
            // Without a cache the purge-only URL does nothing; a 200 would hide that events
            // sent there are not relayed.
            Intake::PurgeOnly if self.cache.is_none() => {
                return Err(GatewayError::NotFound(format!(
                    "/_erpgate/webhooks/frappe/{site} purges the cache only, and no cache is \
                     configured; events are received at /_erpgate/webhooks/frappe/{site}/<doctype>"
                ))
                .into())
            }
            _ => {}
        }
        let Some(signature) = request.headers().get(SIGNATURE_HEADER).cloned() else {
            tracing::warn!(site, "webhook without a signature refused");
            return Err(GatewayError::Unauthenticated("bad webhook signature").into());
        };
        let source = self.trusted.source_of(&request);
        let busy = || -> BoxError {
            GatewayError::TooManyRequests {
                message: "too many webhooks are being received; retry later",
                retry_after: Duration::from_secs(1),
            }
            .into()
        };
        // Per source first: a stranger trickling bodies holds at most its own share.
        let Some(_from_source) = SourceSlot::take(&self.reading_by_source, source) else {
            return Err(busy());
        };
        let Ok(_reading) = self.reading.clone().try_acquire_owned() else {
            return Err(busy());
        };
        let read = read_signed(request.into_body(), secret);
        let (body, check) = match tokio::time::timeout(READ_DEADLINE, read).await {
            Ok(read) => read?,
            Err(_) => {
                return Err(GatewayError::ClientTimeout {
                    timeout: READ_DEADLINE,
                }
                .into())
            }
        };
        drop(_reading);
        if !check.verify(signature.as_bytes()) {
            tracing::warn!(site, "webhook with a wrong signature refused");
            return Err(GatewayError::Unauthenticated("bad webhook signature").into());
        }
        let target = match &intake {
            Intake::Doctype(doctype) => match bound_target(&body, doctype) {
                Ok(target) => target,
                Err(unbound) => {
                    // Signed, so sent by the site's Webhook (or with its secret): a template
                    // rendering a value unescaped, or a misspelt URL. Worth an operator's look.
                    tracing::warn!(
                        site,
                        doctype,
                        reason = unbound.reason(),
                        error = %unbound,
                        "signed webhook refused: not an event of its URL's doctype"
                    );
                    if let Some(events) = &self.events {
                        events.refused(&site, unbound.reason());
                    }
                    return Err(GatewayError::BadRequest(unbound.to_string()).into());
                }
            },
            _ => match target(&body) {
                Some(target) => target,
                None => {
                    return Err(GatewayError::BadRequest(
                        "webhook payload names no doctype (a JSON object with \"doctype\" and \
                         \"name\")"
                            .into(),
                    )
                    .into())
                }
            },
        };
        // The event first: it is kept whatever the purge limit says (Frappe retries a webhook
        // only a few times, so a refused one in a burst would be an event lost). Only a
        // doctype's URL feeds the relay: on the purge-only URL the body alone names the doctype.
        let relay = match (&self.events, &intake) {
            (Some(events), Intake::Doctype(_)) => Some(events),
            (Some(_), _) => {
                tracing::info!(
                    site,
                    doctype = target.doctype,
                    "webhook on the purge-only URL: purged, not relayed (events are received at \
                     /_erpgate/webhooks/frappe/<site>/<doctype>)"
                );
                None
            }
            (None, _) => None,
        };
        let stored = match relay {
            None => false,
            Some(events) => match events.accept(&site, &target, &body).await {
                Ok(true) => true,
                // The same change seen within minutes (a Frappe retry, or a replay): kept and
                // purged the first time already.
                Ok(false) => return Ok(ok_response()),
                Err(e) => {
                    tracing::error!(site, error = %e, "webhook event not stored; Frappe will retry");
                    return Err(GatewayError::EventsUnavailable {
                        retry_after: Duration::from_secs(5),
                    }
                    .into());
                }
            },
        };
        if let Some(cache) = &self.cache {
            match (self.purges.check_key(&site), &target.name) {
                (Ok(()), Some(name)) => {
                    cache.invalidate_document(&site, &target.doctype, name, "webhook")
                }
                (Ok(()), None) => cache.invalidate_doctype(&site, &target.doctype, "webhook"),
                // Over the purge rate with the event kept: the answer must be 200 (a refusal
                // would have Frappe send it again), so the purge widens to the doctype, which
                // a flood of replays cannot turn into more work than one purge.
                (Err(_), _) if stored => {
                    cache.invalidate_doctype(&site, &target.doctype, "webhook")
                }
                (Err(not_until), _) => {
                    let wait = not_until.wait_time_from(DefaultClock::default().now());
                    return Err(GatewayError::TooManyRequests {
                        message: "too many purges for this site; retry later",
                        retry_after: wait.max(Duration::from_millis(1)),
                    }
                    .into());
                }
            }
        }
        Ok(ok_response())
    }
}

/// `{"message": "ok"}`.
fn ok_response() -> Response<Body> {
    let mut response = Response::new(full_body(r#"{"message":"ok"}"#));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Reads a webhook body of at most [`MAX_WEBHOOK_BYTES`], computing its signature as it
/// arrives.
async fn read_signed(mut body: Body, secret: &[u8]) -> Result<(Vec<u8>, SignatureCheck), BoxError> {
    let mut check = SignatureCheck::new(secret)
        .ok_or_else(|| GatewayError::BadRequest("unusable webhook secret".into()))?;
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        if kept.len() + data.len() > MAX_WEBHOOK_BYTES {
            return Err(GatewayError::PayloadTooLarge {
                limit: MAX_WEBHOOK_BYTES as u64,
            }
            .into());
        }
        check.update(&data);
        kept.extend_from_slice(&data);
    }
    Ok((kept, check))
}

impl<S> Service<Request<Body>> for Webhook<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    // Only webhooks pay for a boxed future; everything else passes through as it is.
    type Future = Either<S::Future, BoxResponseFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let intake = request
            .uri()
            .path()
            .strip_prefix(WEBHOOK_PREFIX)
            .map(Intake::parse);
        match intake {
            Some((site, intake)) => {
                Either::Right(Box::pin(self.layer.clone().receive(site, intake, request)))
            }
            None => Either::Left(self.inner.call(request)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intake_urls() {
        let doctype = |name: &str| Intake::Doctype(name.to_owned());
        for (rest, site, intake) in [
            ("erp", "erp", Intake::PurgeOnly),
            ("erp/", "erp", Intake::PurgeOnly),
            ("erp/Note", "erp", doctype("Note")),
            ("erp/Sales%20Order/", "erp", doctype("Sales Order")),
            ("erp/Sales Order", "erp", doctype("Sales Order")),
            ("erp/Note/extra", "erp", Intake::Unusable),
            ("erp/a%2Fb", "erp", Intake::Unusable),
            ("erp/%FF", "erp", Intake::Unusable),
            ("erp//", "erp", Intake::PurgeOnly),
            ("erp//Note", "erp", Intake::Unusable),
        ] {
            assert_eq!(Intake::parse(rest), (site.to_owned(), intake), "{rest}");
        }
    }
}
