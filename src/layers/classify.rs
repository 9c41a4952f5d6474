//! Classification: what the request does to Frappe, as a [`FrappeRequest`] request extension
//! that the rate limiter (is it a write?), the access rules and the retry policy (is it safe to
//! send again?) all read.
//!
//! This layer owns `form_dict`: Frappe reads `cmd`, `run_method` and `sid` from the query and
//! from JSON and urlencoded bodies, so such bodies are read here (up to
//! `max_inspected_body_bytes`, 413 above) and every `cmd` in them is checked. `sid` is removed
//! from the query and the body: a signed request must never resume a session instead. Other
//! bodies stream untouched; a multipart body off `/api/` (where Frappe would read a `cmd` from
//! it) is refused to restricted clients rather than buffered.
//!
//! After routing, so it classifies the canonical, prefix-stripped path Frappe will see.

use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Limited};
use tower::{Layer, Service};

use crate::error::{find_cause, GatewayError};
use crate::frappe::form_dict::{strip_sid_json, strip_sid_urlencoded, BodyFormat, FormKeys};
use crate::frappe::{ApiVersion, CanonicalPath, FrappeRequest};
use crate::layers::{BoxResponseFuture, EarlyReturn};
use crate::tags::RequestTags;
use crate::upstream::ReplayableBody;
use crate::{full_body, Body, BoxError};

/// Classifies requests.
#[derive(Debug, Clone, Copy)]
pub struct ClassifyLayer {
    max_inspected: u64,
}

impl ClassifyLayer {
    /// Reads JSON and urlencoded bodies up to `max_inspected` bytes.
    pub fn new(max_inspected: u64) -> Self {
        Self { max_inspected }
    }
}

impl<S> Layer<S> for ClassifyLayer {
    type Service = Classify<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Classify {
            inner,
            max_inspected: self.max_inspected,
        }
    }
}

/// The service of [`ClassifyLayer`].
#[derive(Debug, Clone)]
pub struct Classify<S> {
    inner: S,
    max_inspected: u64,
}

/// Classifies a request, tags it and attaches the [`FrappeRequest`].
fn attach(request: &mut Request<Body>, path: &CanonicalPath, keys: &FormKeys, unread_form: bool) {
    let mut classified = FrappeRequest::classify(request.method(), path, keys);
    classified.unread_form = unread_form;
    if let Some(tags) = RequestTags::of(request) {
        let _ = tags.kind.set(classified.kind.label());
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

/// Reads a JSON or urlencoded body, returning its keys and the body to forward (without `sid`).
async fn read_form(
    body: Body,
    format: BodyFormat,
    max: u64,
) -> Result<(FormKeys, Bytes), BoxError> {
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if find_cause::<http_body_util::LengthLimitError>(e.as_ref()).is_some() => {
            return Err(GatewayError::PayloadTooLarge { limit: max }.into())
        }
        Err(e) => return Err(e),
    };
    let bad =
        |what: &str| GatewayError::BadRequest(format!("the request body is not valid {what}"));
    let keys = match format {
        BodyFormat::Json if bytes.is_empty() => FormKeys::default(),
        BodyFormat::Json => FormKeys::from_json(&bytes).map_err(|_| bad("JSON"))?,
        _ => FormKeys::from_urlencoded(&bytes),
    };
    let bytes = match (keys.sid, format) {
        (false, _) => bytes,
        (true, BodyFormat::Json) => strip_sid_json(&bytes).map_err(|_| bad("JSON"))?,
        (true, _) => {
            let text = std::str::from_utf8(&bytes).map_err(|_| bad("form data"))?;
            Bytes::from(strip_sid_urlencoded(text))
        }
    };
    Ok((keys, bytes))
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
        let mut keys =
            FormKeys::from_urlencoded(request.uri().query().unwrap_or_default().as_bytes());
        if keys.sid {
            if let Err(e) = strip_sid_from_query(&mut request) {
                return EarlyReturn::error(e);
            }
        }
        let format = BodyFormat::from_content_type(request.headers().get(header::CONTENT_TYPE));
        match format {
            BodyFormat::Json | BodyFormat::Form => {
                // The ready service goes into the future; a fresh clone stays for the next call.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let max = self.max_inspected;
                EarlyReturn::inner(Either::Right(Box::pin(async move {
                    let (parts, body) = request.into_parts();
                    let (body_keys, bytes) = read_form(body, format, max).await?;
                    keys.merge(body_keys);
                    let mut request = Request::from_parts(parts, full_body(bytes.clone()));
                    request
                        .headers_mut()
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                    request.extensions_mut().insert(ReplayableBody(bytes));
                    attach(&mut request, &path, &keys, false);
                    let future: BoxResponseFuture = Box::pin(inner.call(request));
                    future.await
                })))
            }
            _ => {
                let unread_form =
                    format == BodyFormat::Multipart && ApiVersion::of(&path).is_none();
                attach(&mut request, &path, &keys, unread_form);
                EarlyReturn::inner(Either::Left(self.inner.call(request)))
            }
        }
    }
}
