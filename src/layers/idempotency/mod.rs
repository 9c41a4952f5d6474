//! `Idempotency-Key` (IETF httpapi draft) on POST, PUT, PATCH and DELETE: no duplicate Sales
//! Orders when an integration repeats a request it is unsure about.
//!
//! The first request with a key runs; its outcome is kept per (client, key) for `ttl` with a
//! fingerprint of method, path, query and body. A repeat with the same fingerprint gets the kept
//! response again with `Idempotent-Replayed: true`; a repeat while the first is still running
//! gets 409; the same key with a different request gets 422. Requests without the header pass
//! untouched.
//!
//! The first request runs on its own task, so a client that hangs up does not leave its key
//! stuck "in flight": the outcome is recorded anyway and the repeat replays it. An outcome that
//! proves the request never reached Frappe (refused connection, open breaker, a limit) is not
//! kept, so the repeat runs; a timeout or broken connection (Frappe may have acted) is kept and
//! replayed. A response body over `max_response_bytes` is passed through but only its status and
//! headers are kept: a repeat gets them with an empty body.
//!
//! The records sit behind [`IdempotencyStore`]: in memory ([`MemoryStore`]), each client has
//! its own byte budget (one client's traffic never evicts another's records, and a request
//! still running is never evicted at all); with `shared_state` ([`SharedStore`]) they are in
//! Redis, so a repeat reaching any replica gets the same answer. There a claim has a lease of
//! the site's `timeouts.total` plus [`LEASE_MARGIN`]: a replica that dies mid-request frees
//! the key when it runs out, and the next repeat runs again (Frappe may have acted on the
//! first). When the records cannot be reached, a keyed request gets 503 with `Retry-After`
//! (exactly-once cannot be promised) unless the operator chose to run it unprotected.
//!
//! After the access rules (a refused request is never recorded) and before the deadline and
//! retries (a replay costs nothing upstream).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{header, HeaderName, HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use sha2::{Digest, Sha256};
use tower::{Layer, Service};

use crate::error::{find_cause, GatewayError};
use crate::layers::auth::Client;
use crate::layers::buffer::{held_bytes, MemoryReader};
use crate::layers::route::RouteTarget;
use crate::layers::BoxResponseFuture;
use crate::upstream::ReplayableBody;
use crate::{empty_body, full_body, Body, BoxError};

/// Added to the site's `timeouts.total` for a claim's lease: time to read and record the
/// response after the deadline.
pub const LEASE_MARGIN: Duration = Duration::from_secs(30);

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
mod store;

pub use store::{
    Begin, IdempotencyStore, MemoryStore, Outcome, RecordKey, SharedStore, StoreFuture,
};

/// Applies `Idempotency-Key`.
#[derive(Clone)]
pub struct IdempotencyLayer {
    store: Arc<dyn IdempotencyStore>,
    reader: MemoryReader,
    max_response_bytes: u64,
    /// A claim's lease when no site is known.
    ttl: Duration,
}

impl IdempotencyLayer {
    /// Keeps records in `store` for `ttl`; fingerprints bodies read whole with `reader` (on the
    /// buffering budget, larger than its limit: 413); keeps response bodies up to
    /// `max_response_bytes`.
    pub fn new(
        store: Arc<dyn IdempotencyStore>,
        reader: MemoryReader,
        max_response_bytes: u64,
        ttl: Duration,
    ) -> Self {
        Self {
            store,
            reader,
            max_response_bytes,
            ttl,
        }
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`IdempotencyLayer`].
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    layer: IdempotencyLayer,
}

/// The key of a request that carries one, or why it is unusable.
fn record_key(request: &Request<Body>) -> Option<Result<RecordKey, GatewayError>> {
    if !matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) {
        return None;
    }
    let value = request.headers().get(&IDEMPOTENCY_KEY)?;
    let client = request.extensions().get::<Arc<Client>>()?;
    // The draft makes it a structured-field string ("..."); bare tokens are common too.
    let text = value.to_str().unwrap_or_default();
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    let ok = !text.is_empty() && text.len() <= 255 && text.bytes().all(|b| b.is_ascii_graphic());
    // An OAuth app's users share the app's name: each user's keys are their own.
    let key = match request.extensions().get::<crate::oauth::OAuthUser>() {
        Some(user) => format!("user:{}:{text}", hex::encode(&user.key[..16])),
        None => text.to_owned(),
    };
    Some(if ok {
        Ok(RecordKey {
            client: client.name.clone(),
            key,
        })
    } else {
        Err(GatewayError::BadRequest(
            "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        ))
    })
}

fn fingerprint(request: &Request<Body>, body: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(request.method().as_str());
    hash.update([0]);
    hash.update(request.uri().path_and_query().map_or("", |p| p.as_str()));
    hash.update([0]);
    hash.update(body);
    hash.finalize().into()
}

fn replay(outcome: Outcome) -> Result<Response<Body>, BoxError> {
    let (status, headers, body) = match outcome {
        Outcome::Response {
            status,
            headers,
            body,
        } => (status, headers, full_body(body)),
        Outcome::Truncated {
            status,
            mut headers,
        } => {
            headers.remove(header::CONTENT_LENGTH);
            (status, headers, empty_body())
        }
        Outcome::Error(e) => return Err(e.into()),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response.headers_mut().insert(
        IDEMPOTENT_REPLAYED.clone(),
        HeaderValue::from_static("true"),
    );
    Ok(response)
}

/// A record that could not be written leaves the claim to its lease: until then a repeat gets
/// 409, after it the repeat runs again.
fn kept(result: Result<(), crate::shared_state::Unavailable>) {
    if result.is_err() {
        tracing::warn!("idempotency: the outcome could not be recorded (shared state unavailable)");
    }
}

/// Keeps what a finished request produced; returns what to send the client now.
async fn record(
    store: &dyn IdempotencyStore,
    key: RecordKey,
    fingerprint: [u8; 32],
    result: Result<Response<Body>, BoxError>,
    max_response_bytes: u64,
) -> Result<Response<Body>, BoxError> {
    let response = match result {
        Ok(response) => response,
        Err(e) => {
            match find_cause::<GatewayError>(e.as_ref()) {
                // Provably never reached Frappe: let the repeat run.
                None
                | Some(
                    GatewayError::UpstreamUnreachable { .. }
                    | GatewayError::BreakerOpen { .. }
                    | GatewayError::TooManyRequests { .. }
                    | GatewayError::PayloadTooLarge { .. }
                    | GatewayError::BufferBudgetExhausted { .. }
                    | GatewayError::BufferStorageFailed {
                        after_site: false, ..
                    },
                ) => kept(store.abandon(&key, fingerprint).await),
                Some(other) => kept(
                    store
                        .finish(key, fingerprint, Outcome::Error(other.clone()))
                        .await,
                ),
            }
            return Err(e);
        }
    };
    let (parts, body) = response.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_none_or(|n| n > max_response_bytes) {
        let outcome = Outcome::Truncated {
            status: parts.status,
            headers: parts.headers.clone(),
        };
        kept(store.finish(key, fingerprint, outcome).await);
        return Ok(Response::from_parts(parts, body));
    }
    let limit = usize::try_from(max_response_bytes).unwrap_or(usize::MAX);
    match Limited::new(body, limit).collect().await {
        Ok(collected) => {
            let bytes = collected.to_bytes();
            let outcome = Outcome::Response {
                status: parts.status,
                headers: parts.headers.clone(),
                body: bytes.clone(),
            };
            kept(store.finish(key, fingerprint, outcome).await);
            Ok(Response::from_parts(parts, full_body(bytes)))
        }
        Err(e) => {
            let site_failed = GatewayError::BadGateway {
                site: "upstream".into(),
            };
            kept(
                store
                    .finish(key, fingerprint, Outcome::Error(site_failed.clone()))
                    .await,
            );
            tracing::warn!(error = %e, "upstream response body failed");
            Err(site_failed.into())
        }
    }
}

impl<S> Service<Request<Body>> for Idempotency<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = futures_util::future::Either<S::Future, BoxResponseFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        use futures_util::future::Either;
        let key = match record_key(&request) {
            None => return Either::Left(self.inner.call(request)),
            Some(Ok(key)) => key,
            Some(Err(e)) => return Either::Right(Box::pin(async move { Err(e.into()) })),
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Either::Right(Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes = match parts.extensions.get::<ReplayableBody>() {
                Some(ReplayableBody(bytes)) => bytes.clone(),
                // A multipart or opaque body, not read yet: whole, held against the budget.
                None => {
                    let client = parts.extensions.get::<Arc<Client>>().map(|c| &**c);
                    let (bytes, reservation) =
                        layer.reader.read(body, &parts.headers, client).await?;
                    held_bytes(bytes, reservation)
                }
            };
            let mut request = Request::from_parts(parts, full_body(bytes.clone()));
            request
                .extensions_mut()
                .insert(ReplayableBody(bytes.clone()));
            let fingerprint = fingerprint(&request, &bytes);
            let lease = request
                .extensions()
                .get::<RouteTarget>()
                .map_or(layer.ttl, RouteTarget::total_timeout)
                .saturating_add(LEASE_MARGIN);
            let begin = match layer.store.begin(&key, fingerprint, lease).await {
                Ok(begin) => begin,
                Err(_) if layer.store.run_unprotected() => return inner.call(request).await,
                Err(_) => {
                    return Err(GatewayError::SharedStateUnavailable {
                        retry_after: Duration::from_secs(1),
                    }
                    .into())
                }
            };
            match begin {
                Begin::Replay(outcome) => replay(outcome),
                Begin::InFlight => Err(GatewayError::IdempotencyInFlight.into()),
                Begin::Mismatch => Err(GatewayError::IdempotencyMismatch.into()),
                Begin::Run => {
                    let future: BoxResponseFuture = Box::pin(inner.call(request));
                    // On its own task: the outcome is recorded even if this client hangs up.
                    let store = layer.store.clone();
                    let max = layer.max_response_bytes;
                    let task = tokio::spawn(async move {
                        record(store.as_ref(), key, fingerprint, future.await, max).await
                    });
                    task.await.map_err(|e| -> BoxError {
                        format!("idempotent request task failed: {e}").into()
                    })?
                }
            }
        }))
    }
}
