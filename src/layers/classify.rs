//! Classification: what the request does to Frappe, as a [`FrappeRequest`] request extension
//! that the rate limiter (is it a write?), the access rules and the retry policy (is it safe to
//! send again?) all read.
//!
//! This layer derives `form_dict` as Frappe will (see [`crate::frappe::form_dict`]): from the
//! query and from JSON, urlencoded and multipart bodies, on every path. JSON and urlencoded
//! bodies are read whole (up to `max_inspected_body_bytes`, 413 above) into memory, against the
//! buffering budget ([`BufferBudget`], the client's share; the anonymous one on public routes):
//! a declared length is judged before a byte is read (503 with `Retry-After` when the budget
//! or the share is taken, 413 when no share could ever hold it), and the bytes are held frame by
//! frame as they arrive; a pause longer than `client_body_timeout` between reads is 408.
//! The bytes read become the forwarded body and its replayable copy, and own the reservation
//! as the buffer layer's do (`held_bytes`): it is given back when the last copy is dropped, and
//! the buffer layer does not read them again. Multipart field values are not counted against
//! the budget (yet): only `max_inspected_body_bytes` per request bounds them. Multipart bodies are
//! re-encoded as they stream ([`MultipartRelay`]): the fields before the first file are read and
//! judged before anything is sent; file content streams; a field after a file is judged by the
//! client's rules when it completes and ends the upstream body if refused. `sid` is removed from
//! the query and every body, for every client: a signed request must never resume a session.
//!
//! A `Content-Type` that is not printable ASCII is refused: werkzeug would still read its
//! mimetype (repeated `Content-Type` headers are refused earlier, by authentication).
//!
//! After routing, so it classifies the canonical, prefix-stripped path Frappe will see.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{header, HeaderValue, Method, Request, Response};
use http_body::Frame;
use http_body_util::StreamBody;
use tower::{Layer, Service};

use crate::error::GatewayError;
use crate::frappe::form_dict::{
    strip_sid_json, strip_sid_urlencoded, BodyFormat, FormDict, FormKey,
};
use crate::frappe::multipart::{self, LateField, MultipartRelay};
use crate::frappe::{CanonicalPath, FrappeRequest};
use crate::layers::auth::Client;
use crate::layers::buffer::{held_bytes, MemoryReader};
use crate::layers::{BoxResponseFuture, EarlyReturn};
use crate::tags::RequestTags;
use crate::upstream::ReplayableBody;
use crate::{full_body, Body, BoxError};

/// Classifies requests.
#[derive(Debug, Clone)]
pub struct ClassifyLayer {
    reader: MemoryReader,
}

impl ClassifyLayer {
    /// Reads JSON and urlencoded bodies with `reader` (whose largest body also bounds the
    /// multipart fields read, and whose pause between reads applies to them too).
    pub fn new(reader: MemoryReader) -> Self {
        Self { reader }
    }
}

impl<S> Layer<S> for ClassifyLayer {
    type Service = Classify<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Classify {
            inner,
            reader: self.reader.clone(),
        }
    }
}

/// The service of [`ClassifyLayer`].
#[derive(Debug, Clone)]
pub struct Classify<S> {
    inner: S,
    reader: MemoryReader,
}

/// Classifies a request, tags it and attaches the [`FrappeRequest`].
fn attach(request: &mut Request<Body>, path: &CanonicalPath, form: FormDict) {
    attach_partial(request, path, form, false);
}

/// [`attach`] for a form of which more is still to come.
fn attach_partial(
    request: &mut Request<Body>,
    path: &CanonicalPath,
    form: FormDict,
    incomplete: bool,
) {
    let mut classified = FrappeRequest::classify_owned(request.method(), path, form);
    classified.form_incomplete = incomplete;
    if let Some(tags) = RequestTags::of(request) {
        let _ = tags.kind.set(classified.kind.label());
    }
    if let Some(span) = request
        .extensions()
        .get::<crate::layers::server_span::ServerSpan>()
    {
        span.describe(&classified.kind);
    }
    request.extensions_mut().insert(classified);
}

/// Removes `sid` from the query string, keeping the rest as sent.
fn strip_sid_from_query(request: &mut Request<Body>) -> Result<(), GatewayError> {
    let Some(query) = request.uri().query() else {
        return Ok(());
    };
    let stripped = strip_sid_urlencoded(query);
    let path = request.uri().path();
    let uri = if stripped.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{stripped}")
    };
    *request.uri_mut() = uri
        .parse()
        .map_err(|_| GatewayError::BadRequest("invalid query string".into()))?;
    Ok(())
}

fn bad_body(what: &str) -> GatewayError {
    GatewayError::BadRequest(format!("the request body is not valid {what}"))
}

/// Reads a JSON or urlencoded body, returning its `form_dict` keys and the body to forward
/// (without `sid`), which holds the body's reservation. Both must be UTF-8: werkzeug would
/// decode anything else with replacement characters, and what Frappe reads must be what was
/// judged.
async fn read_form(
    reader: &MemoryReader,
    body: Body,
    headers: &http::HeaderMap,
    client: Option<&Client>,
    format: BodyFormat,
) -> Result<(FormDict, Bytes), BoxError> {
    let (bytes, reservation) = reader.read(body, headers, client).await?;
    let (form, bytes) = parse_form(bytes, format)?;
    // The bytes forwarded (the body as read, or a copy without `sid`, never larger) hold the
    // reservation until their last copy is dropped.
    Ok((form, held_bytes(bytes, reservation)))
}

/// The `form_dict` keys of a JSON or urlencoded body, and the body without `sid`.
fn parse_form(bytes: Bytes, format: BodyFormat) -> Result<(FormDict, Bytes), BoxError> {
    // `make_form_dict` reads a JSON body only when it is non-empty.
    if bytes.is_empty() {
        return Ok((FormDict::default(), bytes));
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| bad_body("UTF-8"))?;
    match format {
        BodyFormat::Json => {
            let (form, members) = FormDict::from_json(text).map_err(|e| {
                GatewayError::BadRequest(format!("the request body is not valid JSON: {e}"))
            })?;
            let bytes = if form.has(FormKey::Sid) {
                Bytes::from(strip_sid_json(text, &members))
            } else {
                bytes
            };
            Ok((form, bytes))
        }
        _ => {
            let form = FormDict::from_urlencoded(text.as_bytes());
            let bytes = if form.has(FormKey::Sid) {
                Bytes::from(strip_sid_urlencoded(text))
            } else {
                bytes
            };
            Ok((form, bytes))
        }
    }
}

/// What a late multipart field is judged with, under the client's rules: each field alone when
/// it completes, and the request as classified with the query and every field once the body is
/// complete (so a body of n fields costs n small judgements and one whole one).
fn late_field_judge(
    method: Method,
    path: CanonicalPath,
    query: FormDict,
    client: Arc<Client>,
) -> multipart::LateFieldJudge {
    Box::new(move |late: LateField<'_>| {
        let Some(rules) = &client.rules else {
            return Ok(());
        };
        let verdict = match late {
            LateField::Entry(key, value) => rules.check_entry(key, value),
            LateField::Complete(fields) => {
                let mut form = query.clone();
                form.merge(fields.clone());
                rules.check(&FrappeRequest::classify(&method, &path, &form))
            }
        };
        verdict.map_err(|denied| {
            tracing::info!(client = %client.name, reason = %denied, "multipart field refused by access rules");
            GatewayError::Forbidden(denied).into()
        })
    })
}

/// A multipart body's refusal as the gateway error it answers with; the client body's own
/// errors (a body limit, a dropped connection) and access refusals pass as they are.
fn multipart_refusal(e: BoxError) -> BoxError {
    match e.downcast::<multipart::MultipartError>() {
        Ok(refusal) => match *refusal {
            multipart::MultipartError::FieldsTooLarge(limit) => {
                GatewayError::PayloadTooLarge { limit }.into()
            }
            multipart::MultipartError::TooManyParts => {
                GatewayError::TooManyParts(multipart::MAX_PARTS).into()
            }
            multipart::MultipartError::Stalled(timeout) => {
                GatewayError::ClientTimeout { timeout }.into()
            }
            other => GatewayError::BadRequest(other.to_string()).into(),
        },
        Err(e) => e,
    }
}

impl<S> Service<Request<Body>> for Classify<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = EarlyReturn<futures_util::future::Either<S::Future, BoxResponseFuture>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        use futures_util::future::Either;
        let path = match request.extensions_mut().remove::<CanonicalPath>() {
            Some(path) => path,
            None => match CanonicalPath::parse(request.uri().path()) {
                Ok(path) => path,
                Err(e) => {
                    return EarlyReturn::error(GatewayError::BadRequest(format!(
                        "invalid path: {e}"
                    )))
                }
            },
        };
        let content_type = request.headers().get(header::CONTENT_TYPE).cloned();
        let format = match BodyFormat::from_content_type(content_type.as_ref()) {
            Ok(format) => format,
            Err(e) => return EarlyReturn::error(GatewayError::BadRequest(e.to_string())),
        };
        let mut query =
            FormDict::from_urlencoded(request.uri().query().unwrap_or_default().as_bytes());
        if query.has(FormKey::Sid) {
            if let Err(e) = strip_sid_from_query(&mut request) {
                return EarlyReturn::error(e);
            }
        }
        let has_body = !http_body::Body::is_end_stream(request.body());
        // The ready service goes into the future; a fresh clone stays for the next call.
        let mut take_inner = || {
            let clone = self.inner.clone();
            std::mem::replace(&mut self.inner, clone)
        };
        let reader = self.reader.clone();
        let (max, pause) = (reader.max(), reader.pause());
        match format {
            BodyFormat::Json | BodyFormat::Form => {
                let mut inner = take_inner();
                EarlyReturn::inner(Either::Right(Box::pin(async move {
                    let (parts, body) = request.into_parts();
                    // Whose share the body counts against; none (a public route) is the
                    // anonymous share.
                    let client = parts.extensions.get::<Arc<Client>>().map(|c| &**c);
                    let (body_form, bytes) =
                        read_form(&reader, body, &parts.headers, client, format).await?;
                    if format == BodyFormat::Json && !bytes.is_empty() {
                        query.shadow();
                    }
                    query.merge(body_form);
                    let mut request = Request::from_parts(parts, full_body(bytes.clone()));
                    let headers = request.headers_mut();
                    // Sent whole with its length: the client's chunking is not the site's.
                    headers.remove(header::TRANSFER_ENCODING);
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                    headers.insert(header::CONTENT_TYPE, format.content_type());
                    request.extensions_mut().insert(ReplayableBody(bytes));
                    attach(&mut request, &path, query);
                    let future: BoxResponseFuture = Box::pin(inner.call(request));
                    future.await
                })))
            }
            BodyFormat::Multipart if has_body => {
                let boundary = content_type
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .ok_or(multipart::MultipartError::Boundary)
                    .and_then(multipart::boundary);
                let boundary = match boundary {
                    Ok(b) => b,
                    Err(e) => return EarlyReturn::error(GatewayError::BadRequest(e.to_string())),
                };
                let mut inner = take_inner();
                EarlyReturn::inner(Either::Right(Box::pin(async move {
                    let (mut parts, body) = request.into_parts();
                    let mut relay = MultipartRelay::new(body, boundary, max);
                    relay
                        .read_fields_before_files(pause)
                        .await
                        .map_err(multipart_refusal)?;
                    let mut form = query.clone();
                    form.merge(relay.form().clone());
                    let incomplete = !relay.is_complete();
                    if let Some(client) = parts.extensions.get::<Arc<Client>>() {
                        if client.rules.is_some() {
                            relay.judge_later_fields(late_field_judge(
                                parts.method.clone(),
                                path.clone(),
                                query,
                                client.clone(),
                            ));
                        }
                    }
                    // Re-encoded under erpgate's own boundary, with the Content-Type that names
                    // it: the client's parameters (`boundary*=`, ...) never reach werkzeug.
                    parts
                        .headers
                        .insert(header::CONTENT_TYPE, relay.content_type());
                    // A new length, sent chunked (said explicitly: hyper sends a GET
                    // body of unknown length as no body at all).
                    parts.headers.remove(header::CONTENT_LENGTH);
                    parts.headers.insert(
                        header::TRANSFER_ENCODING,
                        HeaderValue::from_static("chunked"),
                    );
                    let body = relay.map_ok(Frame::data).map_err(multipart_refusal);
                    let body = Body::new(StreamBody::new(body));
                    let mut request = Request::from_parts(parts, body);
                    attach_partial(&mut request, &path, form, incomplete);
                    let future: BoxResponseFuture = Box::pin(inner.call(request));
                    future.await
                })))
            }
            _ => {
                attach(&mut request, &path, query);
                if has_body {
                    // Frappe may still read it (`api/v1.py` `get_request_form_data` parses any
                    // body as the document): the rules must know erpgate did not.
                    if let Some(classified) = request.extensions_mut().get_mut::<FrappeRequest>() {
                        classified.unread_body = true;
                    }
                }
                EarlyReturn::inner(Either::Left(self.inner.call(request)))
            }
        }
    }
}
