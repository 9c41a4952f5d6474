//! Buffering, as nginx does in front of gunicorn (`proxy_request_buffering`,
//! `proxy_buffering`): a request body is read whole before anything is sent to Frappe, and a
//! response is read whole from Frappe before the client gets it, so neither a client that sends
//! slowly nor one that reads slowly holds one of gunicorn's (few, synchronous) workers.
//!
//! A body is held in memory up to `memory` bytes; beyond that it goes to a temporary file in
//! `directory`, unlinked as soon as it is made (so nothing is left behind, whatever happens),
//! and is sent from there with its `Content-Length`. Request bodies are bounded by the body
//! limit above this layer; a pause longer than `client_body_timeout` between two reads of a
//! client's body is a 408 — the client's slowness, never counted against the site. A route with
//! `streaming: true` opts out: its bodies flow through as they come (the documented trade-off:
//! a slow client then holds a worker).
//!
//! What all bodies held together may take is bounded by a [`BufferBudget`] (in memory, on disk,
//! and one client's share of each): a request's bytes are reserved before they are read — all
//! at once when its length is declared, so a refusal (503 with `Retry-After`, or 413 when no
//! budget could hold it) comes before its body is read — and nothing of a refused request is
//! forwarded. A response over budget is passed on as it comes instead: the site has already
//! acted. A temporary file that cannot be made or written is a 503, its cause logged.
//!
//! Below idempotency and above the deadline, retries and the breaker: the site's deadline
//! starts once the request is whole, and what the breaker sees is the site, not the client.
//!
//! ```ignore
//! ServiceBuilder::new().layer(BufferLayer::new(settings)).service(inner)
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::Either;
use futures_util::{StreamExt, TryStreamExt};
use http::{header, HeaderMap, HeaderValue, Request, Response};
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use pin_project_lite::pin_project;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tower::{Layer, Service};

use crate::error::GatewayError;
use crate::layers::auth::Client;
use crate::layers::buffer_budget::{BufferBudget, Direction, Refusal, Reservation, Store};
use crate::layers::route::RouteTarget;
use crate::layers::BoxResponseFuture;
use crate::upstream::{HeldBody, ReplayableBody};
use crate::{full_body, Body, BoxError};

/// How long a client is asked to wait after the buffering directory failed: long enough for
/// an operator's disk alarm, short enough not to lose the client.
const STORAGE_RETRY_AFTER: Duration = Duration::from_secs(5);

/// What is buffered, and how.
#[derive(Debug, Clone)]
pub struct BufferSettings {
    /// Read request bodies whole first.
    pub requests: bool,
    /// Read responses whole first.
    pub responses: bool,
    /// Bytes of one body held in memory.
    pub memory: usize,
    /// Where temporary files go.
    pub directory: PathBuf,
    /// Longest pause between two reads of a client's body.
    pub client_body_timeout: Duration,
    /// What all bodies held together may take, shared by every layer built from these settings
    /// (clones share it too).
    pub budget: Arc<BufferBudget>,
}

/// Buffers request and response bodies.
#[derive(Debug, Clone)]
pub struct BufferLayer {
    settings: Arc<BufferSettings>,
}

impl BufferLayer {
    /// Buffers as `settings` say.
    pub fn new(settings: BufferSettings) -> Self {
        Self {
            settings: Arc::new(settings),
        }
    }
}

impl<S> Layer<S> for BufferLayer {
    type Service = Buffer<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Buffer {
            inner,
            settings: self.settings.clone(),
        }
    }
}

/// The service of [`BufferLayer`].
#[derive(Debug, Clone)]
pub struct Buffer<S> {
    inner: S,
    settings: Arc<BufferSettings>,
}

/// A body read whole, with its reservation.
enum Spooled {
    Memory {
        bytes: Bytes,
        reservation: Reservation,
    },
    File {
        file: tokio::fs::File,
        len: u64,
        reservation: Reservation,
    },
}

/// What a spool ended with.
enum Spool {
    Whole(Spooled),
    /// A response the budget could not hold whole: what was held, the frame in hand, and the
    /// rest as it comes.
    Partial {
        held: Option<Spooled>,
        pending: Bytes,
        rest: Body,
    },
}

/// Who is slow when a body stalls.
#[derive(Clone, Copy)]
enum Sender {
    Client(Duration),
    Site { site_timeout: Duration },
}

/// Frames read into memory, joined in order; a body that arrives as one frame (the usual small
/// one) is kept as it came, uncopied.
#[derive(Default)]
pub(crate) struct JoinedFrames {
    single: Option<Bytes>,
    joined: BytesMut,
}

impl JoinedFrames {
    /// Bytes held so far.
    pub(crate) fn len(&self) -> usize {
        self.single.as_ref().map_or(self.joined.len(), Bytes::len)
    }

    /// Adds a frame's data after what is held.
    pub(crate) fn push(&mut self, data: Bytes) {
        if self.single.is_none() && self.joined.is_empty() {
            self.single = Some(data);
            return;
        }
        if let Some(first) = self.single.take() {
            self.joined.extend_from_slice(&first);
        }
        self.joined.extend_from_slice(&data);
    }

    /// Everything held so far, leaving nothing.
    pub(crate) fn take(&mut self) -> Bytes {
        self.single
            .take()
            .unwrap_or_else(|| self.joined.split().freeze())
    }
}

/// Bytes held in memory together with their reservation.
struct HeldBytes {
    bytes: Bytes,
    _reservation: Reservation,
}

impl AsRef<[u8]> for HeldBytes {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// An unlinked temporary file, readable and writable, for this process only.
async fn temporary_file(directory: &std::path::Path) -> std::io::Result<tokio::fs::File> {
    let name = format!(
        "erpgate-{}-{:016x}.body",
        std::process::id(),
        rand::random::<u64>()
    );
    let path = directory.join(name);
    let mut options = tokio::fs::OpenOptions::new();
    options.read(true).write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let file = options.open(&path).await?;
    // Unlinked at once: the open file lives on, and nothing is left behind on any exit.
    tokio::fs::remove_file(&path).await?;
    Ok(file)
}

/// The error for a failed temporary file, logged here with its cause (the client is told only
/// that the gateway cannot hold its body).
fn storage_failed(e: &std::io::Error, settings: &BufferSettings, sender: Sender) -> BoxError {
    let after_site = matches!(sender, Sender::Site { .. });
    tracing::error!(
        error = %e,
        directory = %settings.directory.display(),
        response = after_site,
        "cannot hold a body in the buffering directory"
    );
    GatewayError::BufferStorageFailed {
        retry_after: STORAGE_RETRY_AFTER,
        after_site,
    }
    .into()
}

/// Reads request bodies whole into memory, for the layers that must see all of one before it
/// goes on: classification judges JSON and urlencoded bodies, idempotency fingerprints a keyed
/// write's. Up to `max` bytes (413 above), on the buffering budget's memory, the client's share
/// (the anonymous one without a client): a declared length is judged before a byte is read
/// (503 with `Retry-After`, or 413 when no share could hold it) and the bytes are held as they
/// arrive; a pause longer than `pause` between two reads is 408, as the buffer layer answers.
#[derive(Debug, Clone)]
pub struct MemoryReader {
    budget: Arc<BufferBudget>,
    max: u64,
    pause: Duration,
}

impl MemoryReader {
    /// Reads up to `max` bytes on `budget`, with `pause` at most between reads.
    pub fn new(budget: Arc<BufferBudget>, max: u64, pause: Duration) -> Self {
        Self { budget, max, pause }
    }

    /// The largest body it reads.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The longest pause it allows between two reads.
    pub fn pause(&self) -> Duration {
        self.pause
    }

    /// `body` whole, and the reservation its bytes hold: the caller makes the bytes it keeps
    /// own it ([`held_bytes`]), so it is given back when their last copy is dropped.
    pub(crate) async fn read(
        &self,
        mut body: Body,
        headers: &HeaderMap,
        client: Option<&Client>,
    ) -> Result<(Bytes, Reservation), BoxError> {
        let (max, pause) = (self.max, self.pause);
        let mut reservation = self.budget.reservation(client);
        let refused = |refusal: Refusal| {
            self.budget.count(refusal, Direction::Request);
            BoxError::from(refusal.into_error())
        };
        if let Some(len) = known_length(&body, headers).filter(|n| *n > 0) {
            if len > max {
                return Err(GatewayError::PayloadTooLarge { limit: max }.into());
            }
            reservation.admit(Store::Memory, len).map_err(refused)?;
        }
        let mut joined = JoinedFrames::default();
        let mut held = 0u64;
        loop {
            let frame = tokio::time::timeout(pause, body.frame())
                .await
                .map_err(|_| GatewayError::ClientTimeout { timeout: pause })?;
            let Some(frame) = frame else { break };
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            held += data.len() as u64;
            if held > max {
                return Err(GatewayError::PayloadTooLarge { limit: max }.into());
            }
            reservation
                .reserve_up_to(Store::Memory, held)
                .map_err(refused)?;
            joined.push(data);
        }
        Ok((joined.take(), reservation))
    }
}

/// Bytes in memory, owning `reservation`: it is given back when the last copy is dropped (the
/// forwarded body and the replayable copy the retries keep). Classification holds the JSON and
/// urlencoded bodies it reads the same way.
pub(crate) fn held_bytes(bytes: Bytes, reservation: Reservation) -> Bytes {
    if bytes.is_empty() {
        return bytes;
    }
    Bytes::from_owner(HeldBytes {
        bytes,
        _reservation: reservation,
    })
}

/// Reads `body` whole: in memory up to `memory` bytes, the rest in a temporary file, each byte
/// reserved in the budget (on `reservation`, empty) before it is kept, so a body holds only what
/// has arrived; the temporary file is made when the body first outgrows memory.
///
/// A client's body the budget refuses is an error (nothing of it is forwarded); a response is
/// passed on as it comes instead ([`Spool::Partial`]), as it is when no temporary file can be
/// made for it: the site has already acted, and its answer is not thrown away.
async fn spool(
    mut body: Body,
    settings: &BufferSettings,
    sender: Sender,
    mut reservation: Reservation,
) -> Result<Spool, BoxError> {
    let per_body = settings.memory as u64;
    let direction = match sender {
        Sender::Client(_) => Direction::Request,
        Sender::Site { .. } => Direction::Response,
    };
    let mut memory = JoinedFrames::default();
    let mut file: Option<(tokio::fs::File, u64)> = None;
    loop {
        let pause = match sender {
            Sender::Client(timeout) => timeout,
            Sender::Site { site_timeout } => site_timeout,
        };
        let frame = match tokio::time::timeout(pause, body.frame()).await {
            Ok(frame) => frame,
            Err(_) => {
                return Err(match sender {
                    Sender::Client(timeout) => GatewayError::ClientTimeout { timeout }.into(),
                    Sender::Site { site_timeout } => GatewayError::UpstreamTimeout {
                        site: "upstream".into(),
                        timeout: site_timeout,
                    }
                    .into(),
                })
            }
        };
        let Some(frame) = frame else { break };
        let frame = match (frame, sender) {
            (Ok(frame), _) => frame,
            // A response cut short: the site's doing, told as such (nothing was sent yet).
            (Err(e), Sender::Site { .. }) => {
                tracing::warn!(error = %e, "upstream response body broke");
                return Err(GatewayError::BadGateway {
                    site: "upstream".into(),
                }
                .into());
            }
            (Err(e), Sender::Client(_)) => return Err(e),
        };
        // Trailers are not kept: neither Frappe nor gunicorn sends or reads them.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        let held = match &file {
            Some((_, len)) => *len,
            None => memory.len() as u64,
        };
        let store = match reservation.reserve_body(held + data.len() as u64, per_body) {
            Ok(store) => store,
            Err(refusal) => {
                settings.budget.count(refusal, direction);
                if direction == Direction::Request {
                    return Err(refusal.into_error().into());
                }
                // The response goes on as it comes, from what is held so far.
                let held = match file {
                    Some((spill, len)) => {
                        Some(rewound(spill, len, reservation, settings, sender).await?)
                    }
                    None => Some(Spooled::Memory {
                        bytes: memory.take(),
                        reservation,
                    }),
                };
                return Ok(Spool::Partial {
                    held,
                    pending: data,
                    rest: body,
                });
            }
        };
        if store == Store::Memory {
            memory.push(data);
            continue;
        }
        match &mut file {
            None => {
                let mut spill = match temporary_file(&settings.directory).await {
                    Ok(spill) => spill,
                    Err(e) if direction == Direction::Response => {
                        tracing::warn!(error = %e, directory = %settings.directory.display(),
                            "cannot hold a response in the buffering directory; passing it on as it comes");
                        reservation.release(Store::Disk);
                        return Ok(Spool::Partial {
                            held: Some(Spooled::Memory {
                                bytes: memory.take(),
                                reservation,
                            }),
                            pending: data,
                            rest: body,
                        });
                    }
                    Err(e) => return Err(storage_failed(&e, settings, sender)),
                };
                let held = memory.take();
                let written = async {
                    spill.write_all(&held).await?;
                    spill.write_all(&data).await
                };
                written
                    .await
                    .map_err(|e| storage_failed(&e, settings, sender))?;
                file = Some((spill, (held.len() + data.len()) as u64));
                // The bytes moved to disk, which holds their reservation now.
                reservation.release(Store::Memory);
            }
            Some((spill, len)) => {
                spill
                    .write_all(&data)
                    .await
                    .map_err(|e| storage_failed(&e, settings, sender))?;
                *len += data.len() as u64;
            }
        }
    }
    Ok(Spool::Whole(match file {
        None => Spooled::Memory {
            bytes: memory.take(),
            reservation,
        },
        Some((spill, len)) => rewound(spill, len, reservation, settings, sender).await?,
    }))
}

/// A written temporary file, ready to be read from its start.
async fn rewound(
    mut spill: tokio::fs::File,
    len: u64,
    reservation: Reservation,
    settings: &BufferSettings,
    sender: Sender,
) -> Result<Spooled, BoxError> {
    let ready = async {
        spill.flush().await?;
        spill.seek(std::io::SeekFrom::Start(0)).await
    };
    if let Err(e) = ready.await {
        return Err(storage_failed(&e, settings, sender));
    }
    Ok(Spooled::File {
        file: spill,
        len,
        reservation,
    })
}

/// The frames of a spooled body; its reservation goes with the stream.
fn spooled_frames(
    spooled: Spooled,
) -> futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, BoxError>> {
    match spooled {
        Spooled::Memory { bytes, reservation } => {
            let frame = (!bytes.is_empty()).then(|| Ok(Frame::data(bytes)));
            futures_util::stream::iter(frame)
                .map(move |frame| {
                    // Held by the stream: given back when the body is dropped, sent or not.
                    let _held = &reservation;
                    frame
                })
                .boxed()
        }
        Spooled::File {
            file,
            len,
            reservation,
        } => tokio_util::io::ReaderStream::new(tokio::io::AsyncReadExt::take(file, len))
            .map_ok(move |chunk| {
                let _held = &reservation;
                Frame::data(chunk)
            })
            .map_err(BoxError::from)
            .boxed(),
    }
}

pin_project! {
    /// A body holding a reservation until it has been read to its end or dropped.
    struct Reserved<B> {
        #[pin]
        body: B,
        reservation: Option<Reservation>,
    }
}

impl<B: http_body::Body> http_body::Body for Reserved<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.body.poll_frame(cx));
        if frame.is_none() {
            this.reservation.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The body to send for a spooled one, its headers set to its exact length; with `replayable`
/// (a request's), a body in memory also comes back as bytes to send again.
///
/// Replayable bytes own their reservation (given back when the last copy goes: the retries
/// hold copies). A response's does not: layers above (cache, idempotency) may keep its bytes
/// for long under their own bounds, so the budget lets go once the body has been passed on.
fn spooled_body(
    spooled: Spooled,
    headers: &mut HeaderMap,
    replayable: bool,
) -> (Body, Option<Bytes>) {
    headers.remove(header::TRANSFER_ENCODING);
    match spooled {
        Spooled::Memory { bytes, reservation } => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            if replayable {
                let bytes = held_bytes(bytes, reservation);
                (full_body(bytes.clone()), Some(bytes))
            } else {
                let body = Reserved {
                    body: http_body_util::Full::new(bytes),
                    reservation: Some(reservation),
                };
                (Body::new(body), None)
            }
        }
        Spooled::File {
            file,
            len,
            reservation,
        } => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            let spooled = Spooled::File {
                file,
                len,
                reservation,
            };
            (Body::new(StreamBody::new(spooled_frames(spooled))), None)
        }
    }
}

/// The body of a spool that stopped part-way: what was held, then the rest as it comes. Its
/// headers are the sender's own, still true of it.
fn partial_body(held: Option<Spooled>, pending: Bytes, rest: Body) -> Body {
    let held = held.map(spooled_frames);
    let pending = (!pending.is_empty()).then(|| Ok(Frame::data(pending)));
    let stream = futures_util::stream::iter(held)
        .flatten()
        .chain(futures_util::stream::iter(pending))
        .chain(BodyStream::new(rest));
    Body::new(StreamBody::new(stream))
}

/// The length of a body, when its sender said.
pub(crate) fn known_length(body: &Body, headers: &HeaderMap) -> Option<u64> {
    body.size_hint().exact().or_else(|| {
        headers
            .get(header::CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .parse()
            .ok()
    })
}

/// Whether a body still has to be read: not empty, not already whole in memory.
fn unread(body: &Body, extensions: &http::Extensions) -> bool {
    !body.is_end_stream() && extensions.get::<ReplayableBody>().is_none()
}

impl<S> Service<Request<Body>> for Buffer<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Either<S::Future, BoxResponseFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let settings = self.settings.clone();
        let target = request.extensions().get::<RouteTarget>();
        let streaming = target.is_none_or(|t| t.streaming);
        let buffer_request = settings.requests && unread(request.body(), request.extensions());
        if streaming || !(buffer_request || settings.responses) {
            return Either::Left(self.inner.call(request));
        }
        let site_timeout = target.map_or(Duration::from_secs(60), RouteTarget::total_timeout);
        // Whose share the bodies count against; none (a public route) is the anonymous share.
        let client = request.extensions().get::<Arc<Client>>().cloned();
        // The ready service goes into the future; a fresh clone stays for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Either::Right(Box::pin(async move {
            let per_body = settings.memory as u64;
            let request = if buffer_request {
                let (mut parts, body) = request.into_parts();
                let mut reservation = settings.budget.reservation(client.as_deref());
                // A length known up front is judged before a byte is read (a refusal then costs
                // the client nothing but its request head); what arrives is held as it arrives.
                if let Some(len) = known_length(&body, &parts.headers).filter(|n| *n > 0) {
                    if let Err(refusal) = reservation.admit_body(len, per_body) {
                        settings.budget.count(refusal, Direction::Request);
                        return Err(refusal.into_error().into());
                    }
                }
                let sender = Sender::Client(settings.client_body_timeout);
                let body = match spool(body, &settings, sender, reservation).await? {
                    Spool::Whole(spooled) => {
                        let (body, bytes) = spooled_body(spooled, &mut parts.headers, true);
                        if let Some(bytes) = bytes {
                            parts.extensions.insert(ReplayableBody(bytes));
                        }
                        body
                    }
                    // Never for a client's body (a refusal is an error); were it one, the body
                    // would still go whole, only streamed.
                    Spool::Partial {
                        held,
                        pending,
                        rest,
                    } => partial_body(held, pending, rest),
                };
                parts.extensions.insert(HeldBody);
                Request::from_parts(parts, body)
            } else {
                request
            };
            let response = inner.call(request).await?;
            if !settings.responses || response.body().is_end_stream() {
                return Ok(response);
            }
            let (mut parts, body) = response.into_parts();
            let mut reservation = settings.budget.reservation(client.as_deref());
            // A response over budget is passed on as it comes rather than refused: the site
            // has acted (perhaps written), and its answer is worth a held worker.
            if let Some(len) = known_length(&body, &parts.headers).filter(|n| *n > 0) {
                if let Err(refusal) = reservation.admit_body(len, per_body) {
                    settings.budget.count(refusal, Direction::Response);
                    return Ok(Response::from_parts(parts, body));
                }
            }
            let body =
                match spool(body, &settings, Sender::Site { site_timeout }, reservation).await? {
                    Spool::Whole(spooled) => spooled_body(spooled, &mut parts.headers, false).0,
                    Spool::Partial {
                        held,
                        pending,
                        rest,
                    } => partial_body(held, pending, rest),
                };
            Ok(Response::from_parts(parts, body))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(memory: usize) -> BufferSettings {
        BufferSettings {
            requests: true,
            responses: true,
            memory,
            directory: std::env::temp_dir(),
            client_body_timeout: Duration::from_secs(1),
            budget: budget(1 << 30, 1 << 30),
        }
    }

    fn budget(max_memory: u64, max_disk: u64) -> Arc<BufferBudget> {
        let metrics = crate::layers::buffer_budget::BudgetMetrics {
            held: prometheus::IntGaugeVec::new(prometheus::Opts::new("h", "h"), &["store"])
                .unwrap(),
            refused: prometheus::IntCounterVec::new(
                prometheus::Opts::new("r", "r"),
                &["direction", "reason"],
            )
            .unwrap(),
        };
        BufferBudget::new(
            crate::layers::buffer_budget::BudgetLimits {
                max_memory,
                max_disk,
                client_share: 1.0,
            },
            &metrics,
        )
    }

    /// Spools `body` as a client's, whole.
    async fn spool_whole(
        body: Body,
        settings: &BufferSettings,
        sender: Sender,
    ) -> Result<Spooled, BoxError> {
        let reservation = settings.budget.reservation(None);
        match spool(body, settings, sender, reservation).await? {
            Spool::Whole(spooled) => Ok(spooled),
            Spool::Partial { .. } => panic!("stopped part-way"),
        }
    }

    async fn read(body: Body) -> Vec<u8> {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn small_bodies_stay_in_memory_and_large_ones_go_to_an_unlinked_file() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut headers = HeaderMap::new();
        let spooled = spool_whole(
            full_body(data.clone()),
            &settings(1 << 20),
            Sender::Client(Duration::from_secs(1)),
        )
        .await
        .unwrap();
        assert!(matches!(spooled, Spooled::Memory { .. }));
        let (body, bytes) = spooled_body(spooled, &mut headers, true);
        assert_eq!(bytes.as_deref(), Some(&data[..]));
        assert_eq!(read(body).await, data);

        let spooled = spool_whole(
            full_body(data.clone()),
            &settings(1000),
            Sender::Client(Duration::from_secs(1)),
        )
        .await
        .unwrap();
        assert!(matches!(spooled, Spooled::File { len: 100_000, .. }));
        let (body, bytes) = spooled_body(spooled, &mut headers, true);
        assert!(bytes.is_none());
        assert_eq!(headers[header::CONTENT_LENGTH], "100000");
        assert_eq!(read(body).await, data);
        let leftovers = std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("erpgate-{}-", std::process::id()))
            })
            .count();
        assert_eq!(leftovers, 0);
    }

    #[tokio::test]
    async fn frames_are_joined_in_order() {
        let frames = || {
            futures_util::stream::iter(
                [&b"ab"[..], b"", b"cde", b"f"]
                    .map(|f| Ok::<_, BoxError>(Frame::data(Bytes::from_static(f)))),
            )
        };
        for memory in [1 << 20, 4] {
            let spooled = spool_whole(
                Body::new(StreamBody::new(frames())),
                &settings(memory),
                Sender::Client(Duration::from_secs(1)),
            )
            .await
            .unwrap();
            let (body, _) = spooled_body(spooled, &mut HeaderMap::new(), true);
            assert_eq!(read(body).await, b"abcdef", "memory {memory}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_client_body_is_a_client_timeout() {
        let stalled = futures_util::stream::pending::<Result<Frame<Bytes>, BoxError>>();
        let result = spool_whole(
            Body::new(StreamBody::new(stalled)),
            &settings(1000),
            Sender::Client(Duration::from_secs(1)),
        )
        .await;
        let e = result.err().unwrap();
        assert!(matches!(
            crate::error::find_cause::<GatewayError>(e.as_ref()),
            Some(GatewayError::ClientTimeout { .. })
        ));
    }

    fn frames(parts: &'static [&'static [u8]]) -> Body {
        Body::new(StreamBody::new(futures_util::stream::iter(
            parts
                .iter()
                .map(|f| Ok::<_, BoxError>(Frame::data(Bytes::from_static(f)))),
        )))
    }

    #[tokio::test]
    async fn held_bytes_give_back_their_reservation_when_the_last_copy_goes() {
        let mut settings = settings(1 << 20);
        settings.budget = budget(1000, 1000);
        let spooled = spool_whole(
            frames(&[b"0123456789", b"abcdefghij"]),
            &settings,
            Sender::Client(Duration::from_secs(1)),
        )
        .await
        .unwrap();
        assert_eq!(settings.budget.held(Store::Memory), 20);
        let (body, bytes) = spooled_body(spooled, &mut HeaderMap::new(), true);
        drop(body);
        // The replayable copy still holds the bytes, so they are still counted.
        assert_eq!(settings.budget.held(Store::Memory), 20);
        drop(bytes);
        assert_eq!(settings.budget.held(Store::Memory), 0);

        // A response's bytes are let go once passed on, even if a layer above keeps them.
        let spooled = spool_whole(
            frames(&[b"0123456789"]),
            &settings,
            Sender::Site {
                site_timeout: Duration::from_secs(1),
            },
        )
        .await
        .unwrap();
        assert_eq!(settings.budget.held(Store::Memory), 10);
        let (body, bytes) = spooled_body(spooled, &mut HeaderMap::new(), false);
        assert!(bytes.is_none());
        let kept = body.collect().await.unwrap().to_bytes();
        assert_eq!(settings.budget.held(Store::Memory), 0);
        assert_eq!(kept, "0123456789");

        // On disk: held by the file's stream until it is dropped.
        settings.memory = 4;
        let spooled = spool_whole(
            frames(&[b"0123456789", b"abcdefghij"]),
            &settings,
            Sender::Client(Duration::from_secs(1)),
        )
        .await
        .unwrap();
        assert_eq!(settings.budget.held(Store::Memory), 0);
        assert_eq!(settings.budget.held(Store::Disk), 20);
        let (body, _) = spooled_body(spooled, &mut HeaderMap::new(), true);
        assert_eq!(read(body).await, b"0123456789abcdefghij");
        assert_eq!(settings.budget.held(Store::Disk), 0);
    }

    #[tokio::test]
    async fn a_client_body_over_the_budget_is_refused_and_a_response_passed_on() {
        let mut settings = settings(8);
        settings.budget = budget(8, 20);
        let parts: &'static [&'static [u8]] = &[b"01234567", b"89abcdef", b"ghijklmn"];
        // Someone else holds 10 of the 20 bytes of disk.
        let mut other = settings.budget.reservation(None);
        other.reserve_up_to(Store::Disk, 10).unwrap();
        let refused = spool(
            frames(parts),
            &settings,
            Sender::Client(Duration::from_secs(1)),
            settings.budget.reservation(None),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(
            crate::error::find_cause::<GatewayError>(refused.as_ref()),
            Some(GatewayError::BufferBudgetExhausted { .. })
        ));
        assert_eq!(settings.budget.held(Store::Memory), 0);
        assert_eq!(settings.budget.held(Store::Disk), 10);

        let partial = spool(
            frames(parts),
            &settings,
            Sender::Site {
                site_timeout: Duration::from_secs(1),
            },
            settings.budget.reservation(None),
        )
        .await
        .unwrap();
        let Spool::Partial {
            held,
            pending,
            rest,
        } = partial
        else {
            panic!("a response over budget was held whole");
        };
        // What was held when the budget ran out (the first frame, in memory) stays reserved
        // until it is sent.
        assert_eq!(settings.budget.held(Store::Memory), 8);
        assert_eq!(
            read(partial_body(held, pending, rest)).await,
            b"0123456789abcdefghijklmn"
        );
        drop(other);
        assert_eq!(settings.budget.held(Store::Disk), 0);
        assert_eq!(settings.budget.held(Store::Memory), 0);
    }
}
