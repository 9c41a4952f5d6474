//! The response cache: opt-in rules per doctype and per read-only method, keyed so that answers
//! are only ever shared between requests Frappe would answer alike.
//!
//! - Reads (GET/HEAD) a rule matches are looked up by [`key::CacheKey`]; a fresh entry is
//!   served without touching the site (`X-Cache: HIT`). Only 200 answers are stored, and not
//!   those the site marks `no-store` or `private` (unless the rule overrides it) or whose
//!   `Vary` names a header the key does not hold.
//! - Concurrent misses for one key make one upstream request: the first runs it on its own task
//!   (so its client hanging up does not fail the others) and the rest wait for its answer.
//! - When the site fails (5xx, timeout, unreachable, breaker open), an entry within its
//!   `stale_if_error` window is served instead (`X-Cache: STALE`).
//! - A successful write through the gateway invalidates its doctype on its site; Frappe
//!   webhooks ([`crate::layers::webhook`]) and the admin purge invalidate by tag too
//!   ([`invalidation`]): constant time, no scan.
//! - Entries carry a strong `ETag`; a matching `If-None-Match` gets 304.
//!
//! After the access rules (a client only ever gets what it may read) and the rate limits; outside
//! idempotency, retries and the breaker, so cached answers survive an outage.

pub mod invalidation;
pub mod key;
pub mod rules;
pub mod store;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, BodyStream, StreamBody};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tower::{Layer, Service, ServiceExt};

use crate::config::ContentCoding;
use crate::frappe::form_dict::BodyFormat;
use crate::frappe::writes::doctypes_written;
use crate::frappe::FrappeRequest;
use crate::layers::compression::{add_vary_accept_encoding, token, Negotiated, Settings};
use crate::layers::route::RouteTarget;
use crate::layers::BoxResponseFuture;
use crate::metrics::Metrics;
use crate::shared_state::{Listener, Message, SharedState};
use crate::upstream::ReplayableBody;
use crate::{empty_body, full_body, Body, BoxError};

use invalidation::{doctype_tag, document_tag, lists_tag, site_tag, Invalidations, Tag};
use key::{CacheKey, KeyParts};
use rules::CacheRules;
use store::{Entry, Store};

static X_CACHE: HeaderName = HeaderName::from_static("x-cache");
static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// How an answer was produced, for `X-Cache`, `Cache-Status` and the events metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Hit,
    /// Fetched; `collapsed` when it waited for another request's fetch.
    Miss {
        stored: bool,
        collapsed: bool,
    },
    Stale {
        upstream_status: Option<StatusCode>,
    },
    Bypass,
}

impl Outcome {
    fn x_cache(self) -> &'static str {
        match self {
            Self::Hit => "HIT",
            Self::Miss { .. } => "MISS",
            Self::Stale { .. } => "STALE",
            Self::Bypass => "BYPASS",
        }
    }

    fn event(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss {
                collapsed: true, ..
            } => "collapsed",
            Self::Miss { .. } => "miss",
            Self::Stale { .. } => "stale",
            Self::Bypass => "bypass",
        }
    }

    /// RFC 9211 `Cache-Status`.
    fn cache_status(self, entry: Option<&Entry>) -> String {
        let ttl = entry.map(|e| e.ttl.as_secs() as i64 - e.age().as_secs() as i64);
        match self {
            Self::Hit => format!("erpgate; hit; ttl={}", ttl.unwrap_or(0)),
            Self::Miss { stored, collapsed } => format!(
                "erpgate; fwd=miss{}{}",
                if stored { "; stored" } else { "" },
                if collapsed { "; collapsed" } else { "" }
            ),
            Self::Stale { upstream_status } => format!(
                "erpgate; fwd=stale{}; ttl={}; detail=stale-if-error",
                upstream_status
                    .map(|s| format!("; fwd-status={}", s.as_u16()))
                    .unwrap_or_default(),
                ttl.unwrap_or(0)
            ),
            Self::Bypass => "erpgate; fwd=bypass".into(),
        }
    }
}

/// What one upstream fetch for a key produced, shared by everyone who waited for it.
enum Fetched {
    /// A 200 that was stored.
    Stored(Arc<Entry>),
    /// A whole answer that was not stored (another status, `no-store`, ...).
    Passed {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    /// Too large to keep: the first request got it streamed; the others fetch on their own.
    TooLarge,
    /// The site failed.
    Failed(Arc<BoxError>),
}

type Flight = Shared<BoxFuture<'static, Arc<Fetched>>>;

/// An error shared by every request that waited for one fetch; the edge finds the
/// `GatewayError` inside through `source()`.
#[derive(Debug)]
struct SharedError(Arc<BoxError>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref().as_ref())
    }
}

impl Listener for Cache {
    fn on_message(&self, message: &Message) {
        self.apply(message, "replica");
    }

    fn on_missed(&self) {
        // Whatever was missed, nothing older than now is trusted.
        self.apply(&Message::All, "resync");
    }
}

/// What `GET /cache/stats` reports.
#[derive(Debug, Clone, Copy)]
pub struct CacheStats {
    /// Entries held.
    pub entries: u64,
    /// Bytes held.
    pub bytes: u64,
    /// The byte bound.
    pub max_bytes: u64,
}

/// The cache: rules, store, invalidation marks and the fetches in flight.
pub struct Cache {
    rules: CacheRules,
    store: Store,
    marks: Invalidations,
    max_entry_bytes: usize,
    in_flight: DashMap<CacheKey, Flight>,
    metrics: Metrics,
    /// The other replicas, told of every invalidation; while this replica may miss theirs, it
    /// bypasses the cache.
    peers: Option<Arc<SharedState>>,
    /// Response compression, when on: entries serve their own encoded copies.
    compression: Option<Arc<Settings>>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("rules", &self.rules)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// A cache for `rules`, holding at most `max_bytes`, each body at most `max_entry_bytes`;
    /// invalidations are shared with `peers` when given.
    pub fn new(
        rules: CacheRules,
        max_bytes: u64,
        max_entry_bytes: u64,
        metrics: Metrics,
        peers: Option<Arc<SharedState>>,
        compression: Option<Arc<Settings>>,
    ) -> Self {
        Self {
            peers,
            compression,
            marks: Invalidations::new(rules.longest_life()),
            rules,
            store: Store::new(max_bytes, metrics.cache_evictions.clone()),
            max_entry_bytes: usize::try_from(max_entry_bytes).unwrap_or(usize::MAX),
            in_flight: DashMap::new(),
            metrics,
        }
    }

    fn invalidate(&self, site: &str, tag: Tag, reason: &str) {
        self.marks.invalidate(tag);
        self.metrics
            .cache_invalidations
            .with_label_values(&[site, reason])
            .inc();
    }

    /// Drops every entry of `doctype` on `site`, here and on every replica.
    pub fn invalidate_doctype(&self, site: &str, doctype: &str, reason: &str) {
        self.apply_and_share(
            Message::Doctype {
                site: site.to_owned(),
                doctype: doctype.to_owned(),
            },
            reason,
        );
    }

    /// Drops one document's entries and the lists of its doctype on `site`, here and on
    /// every replica.
    pub fn invalidate_document(&self, site: &str, doctype: &str, name: &str, reason: &str) {
        self.apply_and_share(
            Message::Document {
                site: site.to_owned(),
                doctype: doctype.to_owned(),
                name: name.to_owned(),
            },
            reason,
        );
    }

    /// Admin purge: a site's doctype, a whole site, or everything; here and on every replica.
    pub fn purge(&self, site: Option<&str>, doctype: Option<&str>) {
        let message = match (site, doctype) {
            (Some(site), Some(doctype)) => Message::Doctype {
                site: site.to_owned(),
                doctype: doctype.to_owned(),
            },
            (Some(site), None) => Message::Site {
                site: site.to_owned(),
            },
            _ => Message::All,
        };
        self.apply_and_share(message, "purge");
    }

    fn apply_and_share(&self, message: Message, reason: &str) {
        self.apply(&message, reason);
        if let Some(peers) = &self.peers {
            peers.broadcast(message);
        }
    }

    /// Applies an invalidation here only.
    fn apply(&self, message: &Message, reason: &str) {
        match message {
            Message::Doctype { site, doctype } => {
                tracing::debug!(site, doctype, reason, "cache: doctype invalidated");
                self.invalidate(site, doctype_tag(site, doctype), reason);
            }
            Message::Document {
                site,
                doctype,
                name,
            } => {
                tracing::debug!(site, doctype, reason, "cache: document invalidated");
                self.marks.invalidate(document_tag(site, doctype, name));
                self.invalidate(site, lists_tag(site, doctype), reason);
            }
            Message::Site { site } => self.invalidate(site, site_tag(site), reason),
            Message::All => {
                self.marks.invalidate_all();
                self.store.clear();
                self.metrics
                    .cache_invalidations
                    .with_label_values(&["*", reason])
                    .inc();
            }
            Message::Block { .. } | Message::EventsAppended => {}
        }
    }

    /// Whether answers may be served and stored now: always alone; with other replicas,
    /// only while this one hears their invalidations.
    fn in_sync(&self) -> bool {
        match &self.peers {
            None => true,
            Some(peers) if peers.in_sync() => true,
            Some(peers) => {
                peers.count_fallback("cache_bypass");
                false
            }
        }
    }

    /// Size of the store; also updates the gauges.
    pub async fn stats(&self) -> CacheStats {
        let (entries, bytes) = self.store.size().await;
        self.metrics
            .cache_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.metrics
            .cache_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        CacheStats {
            entries,
            bytes,
            max_bytes: self.store.max_bytes(),
        }
    }

    fn count(&self, site: &str, outcome: Outcome) {
        self.metrics
            .cache_events
            .with_label_values(&[site, outcome.event()])
            .inc();
    }

    async fn handle<S>(
        self: Arc<Self>,
        inner: S,
        request: Request<Body>,
    ) -> Result<Response<Body>, BoxError>
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Send + 'static,
        S::Future: Send,
    {
        // Borrowed, not cloned: only the site name and account identity outlive the request.
        let (Some(target), Some(classified)) = (
            request.extensions().get::<RouteTarget>(),
            request.extensions().get::<FrappeRequest>(),
        ) else {
            return inner.oneshot(request).await;
        };
        let site = target.site.name.clone();
        let account = target.account.identity;
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let doctypes = written_doctypes(&request, classified);
            return self.write_through(inner, request, &site, doctypes).await;
        }
        let query = request.uri().query();
        // Frappe reads `form_dict` from a GET's body too, and the key holds no body: a read
        // with a body is never cached.
        let has_body = !request.body().is_end_stream()
            || request
                .extensions()
                .get::<ReplayableBody>()
                .is_some_and(|b| !b.0.is_empty());
        let matched = self
            .rules
            .find(&site, classified, query)
            .filter(|_| !has_body && !directive(request.headers(), "no-store") && self.in_sync());
        let Some(matched) = matched else {
            self.count(&site, Outcome::Bypass);
            let mut response = inner.oneshot(request).await?;
            mark(response.headers_mut(), Outcome::Bypass, None);
            return Ok(response);
        };
        let rule = matched.rule;
        // HEAD is answered from the GET entry; a HEAD miss is passed on and stores nothing.
        let head = request.method() == Method::HEAD;
        let key = CacheKey::of(&KeyParts {
            site: &site,
            account: &account,
            method: &Method::GET,
            path: request.uri().path(),
            query,
            headers: request.headers(),
        });
        let if_none_match = request.headers().get(header::IF_NONE_MATCH).cloned();
        let encoding = self
            .compression
            .clone()
            .zip(request.extensions().get::<Negotiated>().map(|n| n.0));
        let serve = |entry: &Entry, outcome| {
            serve(
                entry,
                outcome,
                if_none_match.as_ref(),
                head,
                encoding.as_ref(),
            )
        };
        // `Cache-Control: no-cache` from the client: fetch again (and store the answer).
        let revalidate = directive(request.headers(), "no-cache")
            || request
                .headers()
                .get(header::PRAGMA)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"));

        let cached = match self.store.get(&key).await {
            Some(entry) if self.marks.valid(entry.born, &entry.tags) => Some(entry),
            Some(_) => {
                self.store.remove(&key).await;
                None
            }
            None => None,
        };
        if let Some(entry) = cached.as_ref().filter(|e| e.is_fresh() && !revalidate) {
            self.count(&site, Outcome::Hit);
            return Ok(serve(entry, Outcome::Hit));
        }
        if head {
            let outcome = Outcome::Miss {
                stored: false,
                collapsed: false,
            };
            self.count(&site, outcome);
            let mut response = inner.oneshot(request).await?;
            mark(response.headers_mut(), outcome, None);
            return Ok(response);
        }

        // A miss (or a stale entry): one fetch per key, whoever comes first runs it.
        let fill = Fill {
            key,
            born: self.marks.now(),
            tags: matched.tags,
            rule_ttl: rule.ttl,
            stale_if_error: rule.stale_if_error,
            override_cache_control: rule.override_upstream_cache_control,
        };
        let (flight, mut waiter, leader) = match self.in_flight.entry(key) {
            dashmap::Entry::Occupied(flight) => {
                (flight.get().clone(), Some((inner, request)), None)
            }
            dashmap::Entry::Vacant(slot) => {
                let (give, take) = oneshot::channel();
                let cache = self.clone();
                let task = tokio::spawn(async move {
                    // However the fill ends, later requests must not join it.
                    let _done = FlightDone(&cache, key);
                    Arc::new(cache.fetch(inner, request, fill, give).await)
                });
                let flight: Flight = async move {
                    task.await.unwrap_or_else(|e| {
                        Arc::new(Fetched::Failed(Arc::new(
                            format!("cache fill task failed: {e}").into(),
                        )))
                    })
                }
                .boxed()
                .shared();
                slot.insert(flight.clone());
                (flight, None, Some(take))
            }
        };
        let collapsed = waiter.is_some();
        let fetched = flight.await;
        // The site failed: a copy within its stale-if-error window answers instead.
        let failed = match &*fetched {
            Fetched::Passed { status, .. } if status.is_server_error() => Some(Some(*status)),
            Fetched::Failed(_) => Some(None),
            _ => None,
        };
        if let (Some(upstream_status), Some(entry)) =
            (failed, cached.filter(|e| e.may_serve_stale()))
        {
            let outcome = Outcome::Stale { upstream_status };
            self.count(&site, outcome);
            return Ok(serve(&entry, outcome));
        }
        let stored = matches!(&*fetched, Fetched::Stored(_));
        let outcome = Outcome::Miss { stored, collapsed };
        self.count(&site, outcome);
        let mut response = match &*fetched {
            Fetched::Stored(entry) => return Ok(serve(entry, outcome)),
            Fetched::Passed {
                status,
                headers,
                body,
            } => {
                let mut response = Response::new(full_body(body.clone()));
                *response.status_mut() = *status;
                *response.headers_mut() = headers.clone();
                response
            }
            Fetched::Failed(err) => return Err(Box::new(SharedError(err.clone()))),
            Fetched::TooLarge => match (leader, waiter.take()) {
                (Some(take), _) => take
                    .await
                    .map_err(|_| -> BoxError { "cache fill ended without an answer".into() })?,
                (None, Some((inner, request))) => inner.oneshot(request).await?,
                (None, None) => return Err("cache fill lost its request".into()),
            },
        };
        mark(response.headers_mut(), outcome, None);
        Ok(response)
    }

    /// Runs the upstream request for a miss, stores a cacheable answer, and hands a too-large
    /// one to the request that started the fetch.
    async fn fetch<S>(
        &self,
        inner: S,
        request: Request<Body>,
        fill: Fill,
        leader: oneshot::Sender<Response<Body>>,
    ) -> Fetched
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
    {
        let response = match inner.oneshot(request).await {
            Ok(response) => response,
            Err(e) => return Fetched::Failed(Arc::new(e)),
        };
        let (parts, mut body) = response.into_parts();
        let mut chunks = Vec::new();
        let mut size = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) => return Fetched::Failed(Arc::new(e)),
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            size += data.len();
            chunks.push(data);
            if size > self.max_entry_bytes {
                let prefix = futures_util::stream::iter(
                    chunks
                        .into_iter()
                        .map(|c| Ok::<_, BoxError>(http_body::Frame::data(c))),
                );
                let rest = futures_util::StreamExt::chain(prefix, BodyStream::new(body));
                let _ = leader.send(Response::from_parts(
                    parts,
                    Body::new(StreamBody::new(rest)),
                ));
                return Fetched::TooLarge;
            }
        }
        let body = match chunks.len() {
            1 => chunks.pop().unwrap_or_default(),
            _ => {
                let mut all = BytesMut::with_capacity(size);
                chunks.iter().for_each(|c| all.extend_from_slice(c));
                all.freeze()
            }
        };
        if parts.status != StatusCode::OK || !storable(&parts.headers, fill.override_cache_control)
        {
            return Fetched::Passed {
                status: parts.status,
                headers: parts.headers,
                body,
            };
        }
        let digest = Sha256::digest(&body);
        let etag = HeaderValue::try_from(format!("\"{}\"", hex::encode(&digest[..16])))
            .unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
        let compressible = self.compression.as_ref().is_some_and(|c| {
            c.compressible(StatusCode::OK, &parts.headers, Some(body.len() as u64))
        });
        let entry = Arc::new(Entry {
            compressible,
            encoded: Default::default(),
            headers: parts.headers,
            body,
            etag,
            stored_at: Instant::now(),
            born: fill.born,
            tags: fill.tags,
            ttl: fill.rule_ttl,
            stale_if_error: fill.stale_if_error,
        });
        self.store.insert(fill.key, entry.clone()).await;
        Fetched::Stored(entry)
    }

    /// Passes a write on; when it succeeds, drops what the cache holds of `doctypes`.
    async fn write_through<S>(
        &self,
        inner: S,
        request: Request<Body>,
        site: &str,
        doctypes: Vec<String>,
    ) -> Result<Response<Body>, BoxError>
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
    {
        let response = inner.oneshot(request).await?;
        if response.status().is_success() {
            for doctype in &doctypes {
                self.invalidate_doctype(site, doctype, "write");
            }
        }
        Ok(response)
    }
}

/// The doctypes a write names (read before it is sent, from the query and the body the
/// classifier already holds; nothing is copied).
fn written_doctypes(request: &Request<Body>, classified: &FrappeRequest) -> Vec<String> {
    let json = BodyFormat::from_content_type(request.headers().get(header::CONTENT_TYPE))
        == Ok(BodyFormat::Json);
    let body = request
        .extensions()
        .get::<ReplayableBody>()
        .map(|b| (&b.0[..], json));
    doctypes_written(classified, request.uri().query(), body)
}

/// Takes a finished fill out of the in-flight map, even if it panicked.
struct FlightDone<'a>(&'a Cache, CacheKey);

impl Drop for FlightDone<'_> {
    fn drop(&mut self) {
        self.0.in_flight.remove(&self.1);
    }
}

/// What a fetch stores its entry with.
#[derive(Debug, Clone, Copy)]
struct Fill {
    key: CacheKey,
    born: u64,
    tags: [Tag; 3],
    rule_ttl: std::time::Duration,
    stale_if_error: std::time::Duration,
    override_cache_control: bool,
}

/// True when a request or response `Cache-Control` carries `name`.
fn directive(headers: &HeaderMap, name: &str) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| {
            d.split('=')
                .next()
                .unwrap_or_default()
                .trim()
                .eq_ignore_ascii_case(name)
        })
}

/// Whether an upstream 200 may be stored: not `no-store` or `private` (unless overridden), and
/// no `Vary` on a header the key does not hold.
fn storable(headers: &HeaderMap, override_cache_control: bool) -> bool {
    if !override_cache_control && (directive(headers, "no-store") || directive(headers, "private"))
    {
        return false;
    }
    headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .all(|v| {
            ["accept", "accept-language", "accept-encoding"]
                .iter()
                .any(|known| v.eq_ignore_ascii_case(known))
        })
}

/// True when an `If-None-Match` value matches `etag` (weak comparison, RFC 9110 13.1.2).
fn etag_matches(if_none_match: &HeaderValue, etag: &HeaderValue) -> bool {
    let Ok(list) = if_none_match.to_str() else {
        return false;
    };
    let etag = etag.to_str().unwrap_or_default();
    list.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == etag)
}

fn mark(headers: &mut HeaderMap, outcome: Outcome, entry: Option<&Entry>) {
    headers.insert(X_CACHE.clone(), HeaderValue::from_static(outcome.x_cache()));
    if let Ok(v) = HeaderValue::try_from(outcome.cache_status(entry)) {
        headers.insert(CACHE_STATUS.clone(), v);
    }
}

/// An answer from an entry: the body (its copy in the negotiated `encoding` when it has one),
/// or 304 when the client has that already.
fn serve(
    entry: &Entry,
    outcome: Outcome,
    if_none_match: Option<&HeaderValue>,
    head: bool,
    encoding: Option<&(Arc<Settings>, ContentCoding)>,
) -> Response<Body> {
    let copy = encoding.and_then(|(settings, coding)| {
        entry
            .encoded(*coding, settings)
            .map(|copy| (settings, *coding, copy))
    });
    let etag = copy.map_or(&entry.etag, |(_, _, (_, etag))| etag);
    let not_modified = if_none_match.is_some_and(|v| etag_matches(v, etag));
    let mut response = if not_modified {
        let mut response = Response::new(empty_body());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        let body = copy.map_or(&entry.body, |(_, _, (bytes, _))| bytes);
        let mut response = Response::new(if head {
            empty_body()
        } else {
            full_body(body.clone())
        });
        *response.headers_mut() = entry.headers.clone();
        if let Some((settings, coding, (bytes, _))) = copy {
            let headers = response.headers_mut();
            headers.remove(header::CONTENT_LENGTH);
            headers.insert(
                header::CONTENT_ENCODING,
                HeaderValue::from_static(token(coding)),
            );
            if !head {
                settings.count(coding, entry.body.len() as u64, bytes.len() as u64);
            }
        }
        response
    };
    let headers = response.headers_mut();
    // Whichever copy this is, the answer depended on Accept-Encoding.
    if entry.compressible {
        add_vary_accept_encoding(headers);
    }
    headers.insert(header::ETAG, etag.clone());
    headers.insert(header::AGE, HeaderValue::from(entry.age().as_secs()));
    mark(headers, outcome, Some(entry));
    response
}

/// Puts the cache in the stack.
#[derive(Debug, Clone)]
pub struct CacheLayer {
    cache: Arc<Cache>,
}

impl CacheLayer {
    /// Serves reads from `cache`.
    pub fn new(cache: Arc<Cache>) -> Self {
        Self { cache }
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = CacheService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CacheService {
            inner,
            cache: self.cache.clone(),
        }
    }
}

/// The service of [`CacheLayer`].
#[derive(Debug, Clone)]
pub struct CacheService<S> {
    inner: S,
    cache: Arc<Cache>,
}

impl<S> Service<Request<Body>> for CacheService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The readied service goes with this request (a fill may outlive the caller).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(self.cache.clone().handle(inner, request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_match_weakly_and_lists() {
        let etag = HeaderValue::from_static("\"abc\"");
        let m = |s: &'static str| etag_matches(&HeaderValue::from_static(s), &etag);
        assert!(m("\"abc\""));
        assert!(m("W/\"abc\""));
        assert!(m("\"x\", \"abc\""));
        assert!(m("*"));
        assert!(!m("\"abd\""));
    }

    #[test]
    fn what_may_be_stored() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (k, v) in pairs {
                headers.append(*k, HeaderValue::from_static(v));
            }
            headers
        };
        assert!(storable(&h(&[]), false));
        assert!(!storable(
            &h(&[("cache-control", "private, max-age=60")]),
            false
        ));
        assert!(!storable(&h(&[("cache-control", "no-store")]), false));
        assert!(storable(&h(&[("cache-control", "no-store")]), true));
        assert!(storable(&h(&[("vary", "Accept-Language, accept")]), false));
        assert!(!storable(&h(&[("vary", "Cookie")]), false));
        assert!(!storable(&h(&[("vary", "*")]), false));
    }
}
