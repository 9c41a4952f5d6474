//! `GET /_erpgate/openapi.json` (or `?format=yaml`, or `/_erpgate/openapi.yaml`): the calling
//! client's own OpenAPI 3.1 document, answered here and never forwarded. It describes only
//! what the client's rules allow, with schemas from the site's DocType metadata read as the
//! client's service account (an OAuth app's: as its user), so a doctype that account cannot
//! read is left out. Metadata is kept per site and account for `openapi.metadata_ttl`; the admin
//! listener's `POST /openapi/purge` forgets it. A request costs one unit of the client's request
//! quota, as the event feed's does.
//!
//! Inside authentication (the client is known), outside routing: the path is erpgate's own.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use http::{header, HeaderValue, Method, Request, Response};
use http_body_util::BodyExt;
use tower::{Layer, Service};

use crate::error::GatewayError;
use crate::frappe::catalog::Catalog;
use crate::frappe::headers::X_FRAPPE_SITE_NAME;
use crate::frappe::meta::{meta_path, DocTypeMeta};
use crate::frappe::openapi::{document, GrantedDoctype, Inputs};
use crate::layers::auth::Client;
use crate::layers::BoxResponseFuture;
use crate::oauth::OAuthUser;
use crate::routing::Router;
use crate::site::{ServiceAccount, Site};
use crate::{full_body, Body, BoxError};

/// The document's paths.
pub const JSON_PATH: &str = "/_erpgate/openapi.json";
pub const YAML_PATH: &str = "/_erpgate/openapi.yaml";
/// Largest metadata answer read (User's is ~140 KB).
const MAX_META_BYTES: usize = 4 << 20;

/// A metadata read: `None` when the account may not read the doctype (or it does not exist).
type Meta = Option<Arc<DocTypeMeta>>;

/// Sites' DocType metadata, per site, account and doctype, for a while.
#[derive(Clone)]
pub struct MetadataCache {
    entries: moka::future::Cache<(Arc<str>, [u8; 32], String), Meta>,
}

impl std::fmt::Debug for MetadataCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataCache")
            .field("entries", &self.entries.entry_count())
            .finish()
    }
}

impl MetadataCache {
    /// A cache keeping metadata for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            entries: moka::future::Cache::builder()
                .time_to_live(ttl)
                .max_capacity(10_000)
                .build(),
        }
    }

    /// Forgets everything: the next document reads the sites' metadata again.
    pub fn purge(&self) {
        self.entries.invalidate_all();
    }

    async fn get(
        &self,
        site: &Arc<Site>,
        account: &ServiceAccount,
        doctype: &str,
    ) -> Result<Meta, GatewayError> {
        let key = (site.name.clone(), account.identity, doctype.to_lowercase());
        // Concurrent misses share one read; a failed read is not kept.
        self.entries
            .try_get_with(key, read_meta(site, account, doctype))
            .await
            .map_err(|e: Arc<GatewayError>| (*e).clone())
    }
}

/// Asks `site` for `doctype`'s metadata as `account`, through the site's breaker.
async fn read_meta(
    site: &Arc<Site>,
    account: &ServiceAccount,
    doctype: &str,
) -> Result<Meta, GatewayError> {
    let unavailable = || GatewayError::BreakerOpen {
        site: site.name.to_string(),
        retry_after: Duration::from_secs(1),
    };
    let mut request = Request::get(meta_path(doctype))
        .body(crate::empty_body())
        .map_err(|_| unavailable())?;
    let headers = request.headers_mut();
    headers.insert(header::HOST, site.host.clone());
    headers.insert(X_FRAPPE_SITE_NAME.clone(), site.site_name.clone());
    headers.insert(header::AUTHORIZATION, account.authorization.clone());
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    let call = site.through_breaker(|| {
        let site = site.clone();
        async move {
            let timeout = site.upstream.request_timeout();
            site.upstream.send(request, timeout).await
        }
    });
    let response = match tokio::time::timeout(site.total_timeout, call).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            tracing::warn!(site = %site.name, doctype, %error, "doctype metadata unavailable");
            return Err(crate::error::find_cause::<GatewayError>(error.as_ref())
                .cloned()
                .unwrap_or_else(unavailable));
        }
        Err(_) => {
            tracing::warn!(site = %site.name, doctype, "doctype metadata timed out");
            return Err(unavailable());
        }
    };
    let status = response.status();
    // 403 PermissionError (not readable) and 404 DoesNotExistError: left out of the document.
    if status == http::StatusCode::FORBIDDEN || status == http::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !status.is_success() {
        tracing::warn!(site = %site.name, doctype, %status, "doctype metadata refused");
        return Err(unavailable());
    }
    let body = http_body_util::Limited::new(response.into_body(), MAX_META_BYTES)
        .collect()
        .await
        .map_err(|_| unavailable())?
        .to_bytes();
    match DocTypeMeta::parse(&body) {
        Some(meta) => Ok(Some(Arc::new(meta))),
        None => {
            tracing::warn!(site = %site.name, doctype, "doctype metadata unreadable");
            Err(unavailable())
        }
    }
}

/// Settings the document is built with.
#[derive(Debug, Clone)]
pub struct OpenApiLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    router: Arc<Router>,
    cache: MetadataCache,
    public_url: Option<String>,
}

impl OpenApiLayer {
    /// Serves documents for the sites of `router`, metadata from `cache`.
    pub fn new(router: Arc<Router>, cache: MetadataCache, public_url: Option<String>) -> Self {
        Self {
            shared: Arc::new(Shared {
                router,
                cache,
                public_url,
            }),
        }
    }
}

impl<S> Layer<S> for OpenApiLayer {
    type Service = OpenApi<S>;
    fn layer(&self, inner: S) -> Self::Service {
        OpenApi {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service of [`OpenApiLayer`].
#[derive(Debug, Clone)]
pub struct OpenApi<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Service<Request<Body>> for OpenApi<S>
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
        if path != JSON_PATH && path != YAML_PATH {
            return Either::Left(self.inner.call(request));
        }
        Either::Right(Box::pin(serve(self.shared.clone(), request)))
    }
}

async fn serve(shared: Arc<Shared>, request: Request<Body>) -> Result<Response<Body>, BoxError> {
    let Some(client) = request.extensions().get::<Arc<Client>>().cloned() else {
        return Err(GatewayError::Unauthenticated("no client").into());
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Err(
            GatewayError::BadRequest("the OpenAPI document is read with GET".into()).into(),
        );
    }
    let yaml = request.uri().path() == YAML_PATH
        || crate::frappe::form_dict::query_value(request.uri().query(), "format").as_deref()
            == Some("yaml");
    if let Some(quota) = &client.quotas.requests {
        if let Err((_, wait)) = quota.check() {
            return Err(GatewayError::TooManyRequests {
                message: "request quota exhausted; retry later",
                retry_after: wait.max(Duration::from_millis(1)),
            }
            .into());
        }
    }
    let Some(rules) = &client.rules else {
        // Without rules a client may do whatever its service account may: that is the site's
        // own permissions, which erpgate does not enumerate.
        return Err(GatewayError::NotPermitted(
            "the OpenAPI document describes a client's allow rules; this client has none",
        )
        .into());
    };
    let Some(site) = shared.router.site(&client.site).cloned() else {
        return Err(GatewayError::NotPermitted("the client's site is not configured").into());
    };
    let account = match request.extensions().get::<OAuthUser>() {
        Some(user) => user.account(&site, &client.name),
        None => match site.accounts.get(&client.service_account) {
            Some(account) => account.clone(),
            None => {
                return Err(GatewayError::NotPermitted(
                    "the client's service account is not configured",
                )
                .into())
            }
        },
    };
    let mut granted = Vec::new();
    for (doctype, operations) in rules.granted_resources() {
        if operations.is_empty() {
            continue;
        }
        if let Some(meta) = shared.cache.get(&site, &account, doctype).await? {
            granted.push((meta, operations));
        }
    }
    // Child tables of what is granted, as their rows are read and written with the parent.
    let mut children: Vec<Arc<DocTypeMeta>> = Vec::new();
    let wanted: Vec<String> = granted
        .iter()
        .flat_map(|(m, _)| m.child_doctypes())
        .map(str::to_owned)
        .collect();
    for child in wanted {
        if granted.iter().any(|(m, _)| m.name == child) || children.iter().any(|m| m.name == child)
        {
            continue;
        }
        if let Some(meta) = shared.cache.get(&site, &account, &child).await? {
            children.push(meta);
        }
    }
    let catalog = Catalog::get();
    let inputs = Inputs {
        client: &client.name,
        doctypes: granted
            .iter()
            .map(|(meta, operations)| GrantedDoctype {
                meta,
                operations: operations.clone(),
            })
            .collect(),
        children: children.iter().map(|m| &**m).collect(),
        functions: rules
            .granted_functions()
            .into_iter()
            .filter_map(|name| catalog.lookup(name))
            .collect(),
        app_methods: rules.granted_app_methods(),
        public_url: shared.public_url.as_deref(),
    };
    let doc = document(&inputs);
    let (body, content_type) = if yaml {
        (
            serde_yaml::to_string(&doc)
                .map_err(|e| -> BoxError { e.into() })?
                .into_bytes(),
            "application/yaml",
        )
    } else {
        (
            serde_json::to_vec(&doc).map_err(|e| -> BoxError { e.into() })?,
            "application/json",
        )
    };
    let mut response = Response::new(full_body(body));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
