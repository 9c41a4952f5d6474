//! Frappe webhooks that purge the cache: `POST /_erpgate/webhooks/frappe/<site>` on the public
//! listener (a prefix no Frappe route uses), so edits made in the ERPNext desk, by scheduled
//! jobs or by other integrations reach the cache too.
//!
//! The body (at most [`MAX_WEBHOOK_BYTES`]) must carry a valid `X-Frappe-Webhook-Signature`
//! under the site's webhook secret, compared in constant time; otherwise 401 and nothing is
//! invalidated. The document named in the payload (`doctype`, `name`; the doctype may also come
//! as `?doctype=` in the URL) is dropped with its doctype's lists; without a name, the whole
//! doctype. Answers 200 `{"message": "ok"}`.
//!
//! Before authentication: Frappe holds no gateway key; the signature is the credential.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{header, HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use tower::{Layer, Service};

use crate::error::{find_cause, GatewayError};
use crate::frappe::form_dict::query_value;
use crate::frappe::webhook::{signature_valid, target, SIGNATURE_HEADER};
use crate::layers::cache::Cache;
use crate::layers::BoxResponseFuture;
use crate::{full_body, Body, BoxError};

/// The reserved path prefix.
pub const WEBHOOK_PREFIX: &str = "/_erpgate/webhooks/frappe/";

/// Largest webhook body read.
pub const MAX_WEBHOOK_BYTES: usize = 1 << 20;

/// Receives webhooks for the sites in `secrets`.
#[derive(Clone)]
pub struct WebhookLayer {
    cache: Arc<Cache>,
    secrets: Arc<HashMap<String, Vec<u8>>>,
}

impl std::fmt::Debug for WebhookLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookLayer")
            .field("sites", &self.secrets.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl WebhookLayer {
    /// Webhooks invalidate `cache`; `secrets` are the sites' webhook secrets by site name.
    pub fn new(cache: Arc<Cache>, secrets: HashMap<String, Vec<u8>>) -> Self {
        Self {
            cache,
            secrets: Arc::new(secrets),
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
        request: Request<Body>,
    ) -> Result<Response<Body>, BoxError> {
        if request.method() != Method::POST {
            return Err(GatewayError::BadRequest("webhooks are POST requests".into()).into());
        }
        let Some(secret) = self.secrets.get(&site) else {
            return Err(GatewayError::NotFound(format!(
                "no webhook is configured for site {site}"
            ))
            .into());
        };
        let signature = request.headers().get(SIGNATURE_HEADER).cloned();
        let url_doctype = query_value(request.uri().query(), "doctype");
        let body = match Limited::new(request.into_body(), MAX_WEBHOOK_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e) if find_cause::<http_body_util::LengthLimitError>(e.as_ref()).is_some() => {
                return Err(GatewayError::PayloadTooLarge {
                    limit: MAX_WEBHOOK_BYTES as u64,
                }
                .into())
            }
            Err(e) => return Err(e),
        };
        let signed = signature.is_some_and(|s| signature_valid(secret, &body, s.as_bytes()));
        if !signed {
            tracing::warn!(site, "webhook with a missing or wrong signature refused");
            return Err(GatewayError::Unauthenticated("bad webhook signature").into());
        }
        let Some(target) = target(&body, url_doctype.as_deref()) else {
            return Err(GatewayError::BadRequest(
                "webhook payload names no doctype (a JSON object with \"doctype\" and \"name\")"
                    .into(),
            )
            .into());
        };
        match &target.name {
            Some(name) => self
                .cache
                .invalidate_document(&site, &target.doctype, name, "webhook"),
            None => self
                .cache
                .invalidate_doctype(&site, &target.doctype, "webhook"),
        }
        let mut response = Response::new(full_body(r#"{"message":"ok"}"#));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(response)
    }
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
        let site = request
            .uri()
            .path()
            .strip_prefix(WEBHOOK_PREFIX)
            .map(|rest| rest.trim_end_matches('/').to_owned());
        match site {
            Some(site) => Either::Right(Box::pin(self.layer.clone().receive(site, request))),
            None => Either::Left(self.inner.call(request)),
        }
    }
}
