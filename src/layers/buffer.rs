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
//! Below idempotency and above the deadline, retries and the breaker: the site's deadline
//! starts once the request is whole, and what the breaker sees is the site, not the client.
//!
//! ```ignore
//! ServiceBuilder::new().layer(BufferLayer::new(settings)).service(inner)
//! ```

use std::path::PathBuf;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::Either;
use futures_util::TryStreamExt;
use http::{header, HeaderMap, HeaderValue, Request, Response};
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, StreamBody};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tower::{Layer, Service};

use crate::error::GatewayError;
use crate::layers::route::RouteTarget;
use crate::layers::BoxResponseFuture;
use crate::upstream::{HeldBody, ReplayableBody};
use crate::{full_body, Body, BoxError};

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
}

/// Buffers request and response bodies.
#[derive(Debug, Clone)]
pub struct BufferLayer {
    settings: std::sync::Arc<BufferSettings>,
}

impl BufferLayer {
    /// Buffers as `settings` say.
    pub fn new(settings: BufferSettings) -> Self {
        Self {
            settings: std::sync::Arc::new(settings),
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
    settings: std::sync::Arc<BufferSettings>,
}

/// A body read whole.
enum Spooled {
    Memory(Bytes),
    File { file: tokio::fs::File, len: u64 },
}

/// Who is slow when a body stalls.
#[derive(Clone, Copy)]
enum Sender {
    Client(Duration),
    Site { site_timeout: Duration },
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

/// Reads `body` whole: in memory up to `memory` bytes, the rest in a temporary file.
async fn spool(
    mut body: Body,
    settings: &BufferSettings,
    sender: Sender,
) -> Result<Spooled, BoxError> {
    // A body that arrives as one frame (the usual small answer) is kept as it came, uncopied.
    let mut single: Option<Bytes> = None;
    let mut memory = BytesMut::new();
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
        if file.is_none() && memory.is_empty() && single.is_none() && data.len() <= settings.memory
        {
            single = Some(data);
            continue;
        }
        if let Some(first) = single.take() {
            memory.extend_from_slice(&first);
        }
        match &mut file {
            None if memory.len() + data.len() <= settings.memory => memory.extend_from_slice(&data),
            None => {
                let mut spill = temporary_file(&settings.directory).await?;
                spill.write_all(&memory).await?;
                spill.write_all(&data).await?;
                file = Some((spill, (memory.len() + data.len()) as u64));
                memory = BytesMut::new();
            }
            Some((spill, len)) => {
                spill.write_all(&data).await?;
                *len += data.len() as u64;
            }
        }
    }
    Ok(match file {
        None => Spooled::Memory(single.unwrap_or_else(|| memory.freeze())),
        Some((mut spill, len)) => {
            spill.flush().await?;
            spill.seek(std::io::SeekFrom::Start(0)).await?;
            Spooled::File { file: spill, len }
        }
    })
}

/// The body to send for a spooled one, its headers set to its exact length.
fn spooled_body(spooled: Spooled, headers: &mut HeaderMap) -> (Body, Option<Bytes>) {
    headers.remove(header::TRANSFER_ENCODING);
    match spooled {
        Spooled::Memory(bytes) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            (full_body(bytes.clone()), Some(bytes))
        }
        Spooled::File { file, len } => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            let stream =
                tokio_util::io::ReaderStream::new(tokio::io::AsyncReadExt::take(file, len))
                    .map_ok(Frame::data)
                    .map_err(BoxError::from);
            (Body::new(StreamBody::new(stream)), None)
        }
    }
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
        let site_timeout = target.map_or(Duration::from_secs(60), |t| t.site.total_timeout);
        // The ready service goes into the future; a fresh clone stays for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Either::Right(Box::pin(async move {
            let request = if buffer_request {
                let (mut parts, body) = request.into_parts();
                let sender = Sender::Client(settings.client_body_timeout);
                let spooled = spool(body, &settings, sender).await?;
                let (body, bytes) = spooled_body(spooled, &mut parts.headers);
                if let Some(bytes) = bytes {
                    parts.extensions.insert(ReplayableBody(bytes));
                }
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
            let spooled = spool(body, &settings, Sender::Site { site_timeout }).await?;
            let (body, _) = spooled_body(spooled, &mut parts.headers);
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
        }
    }

    async fn read(body: Body) -> Vec<u8> {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn small_bodies_stay_in_memory_and_large_ones_go_to_an_unlinked_file() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut headers = HeaderMap::new();
        let spooled = spool(
            full_body(data.clone()),
            &settings(1 << 20),
            Sender::Client(Duration::from_secs(1)),
        )
        .await
        .unwrap();
        assert!(matches!(spooled, Spooled::Memory(_)));
        let (body, bytes) = spooled_body(spooled, &mut headers);
        assert_eq!(bytes.as_deref(), Some(&data[..]));
        assert_eq!(read(body).await, data);

        let spooled = spool(
            full_body(data.clone()),
            &settings(1000),
            Sender::Client(Duration::from_secs(1)),
        )
        .await
        .unwrap();
        assert!(matches!(spooled, Spooled::File { len: 100_000, .. }));
        let (body, bytes) = spooled_body(spooled, &mut headers);
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
            let spooled = spool(
                Body::new(StreamBody::new(frames())),
                &settings(memory),
                Sender::Client(Duration::from_secs(1)),
            )
            .await
            .unwrap();
            let (body, _) = spooled_body(spooled, &mut HeaderMap::new());
            assert_eq!(read(body).await, b"abcdef", "memory {memory}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_client_body_is_a_client_timeout() {
        let stalled = futures_util::stream::pending::<Result<Frame<Bytes>, BoxError>>();
        let result = spool(
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
}
