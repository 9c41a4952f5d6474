//! `GatewayError`, what every layer returns when it stops a request, and the one conversion of
//! an error into a response, in Frappe's envelope.
//!
//! Layers return errors boxed; [`error_response`] finds a `GatewayError` anywhere in the chain
//! (or recognises a body-limit error raised while streaming) and renders it. Anything else is an
//! internal error whose detail is logged, never sent.

use std::time::Duration;

use http::{header, HeaderValue, Response, StatusCode};

use crate::frappe::envelope::error_body;
use crate::frappe::ApiVersion;
use crate::{full_body, Body, BoxError};

/// Why the gateway answered instead of the upstream. `Clone`, so an idempotency record can
/// replay it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// No, malformed, unknown or wrong gateway credential. The reason is logged, not sent.
    #[error("invalid or missing gateway credentials")]
    Unauthenticated(&'static str),
    /// Too many failed authentications from this address.
    #[error("too many failed authentication attempts; retry later")]
    AuthThrottled { retry_after: Duration },
    /// An access rule refused the request.
    #[error("{0}")]
    Forbidden(#[from] crate::frappe::Denied),
    /// The route leads to a site the client has no service account on.
    #[error("this client may not use site {0}")]
    SiteNotAllowed(String),
    /// The request itself is unusable (path, body encoding).
    #[error("{0}")]
    BadRequest(String),
    /// A gateway endpoint for something that does not exist (a webhook for an unknown site).
    #[error("{0}")]
    NotFound(String),
    /// The request body is over a configured limit.
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    /// werkzeug's `max_form_parts`: a multipart body with more parts than Frappe would read.
    #[error("a multipart body may have at most {0} parts")]
    TooManyParts(usize),
    /// No backend of the site accepted a connection.
    #[error("site {site} is unreachable")]
    UpstreamUnreachable { site: String },
    /// A client quota or concurrency cap is exhausted (the quota's headers travel with it in
    /// a [`WithHeaders`]).
    #[error("{message}")]
    TooManyRequests {
        message: &'static str,
        retry_after: Duration,
    },
    /// The site's circuit breaker is open: answered without touching the network.
    #[error("site {site} is unavailable; retry later")]
    BreakerOpen { site: String, retry_after: Duration },
    /// The same `Idempotency-Key` is still being processed.
    #[error("a request with this Idempotency-Key is still in progress")]
    IdempotencyInFlight,
    /// The same `Idempotency-Key` was used for a different request.
    #[error("this Idempotency-Key was used for a different request")]
    IdempotencyMismatch,
    /// The site did not answer in time.
    #[error("site {site} did not answer within {timeout:?}")]
    UpstreamTimeout { site: String, timeout: Duration },
    /// The connection to the site failed after the request was sent.
    #[error("site {site} failed to answer")]
    BadGateway { site: String },
    /// An `Idempotency-Key` request while the shared records cannot be reached: exactly-once
    /// cannot be promised, so it is not run.
    #[error("Idempotency-Key requests cannot be accepted right now (shared state unavailable); retry later")]
    SharedStateUnavailable { retry_after: Duration },
    /// The event store could not record or read (disk error, Redis down): a webhook is not
    /// acknowledged, so Frappe retries it.
    #[error("events cannot be stored or read right now; retry later")]
    EventsUnavailable { retry_after: Duration },
    /// A gateway endpoint this kind of credential may not use.
    #[error("{0}")]
    NotPermitted(&'static str),
    /// The client did not send its request body in time: the client's slowness, never the
    /// site's, so no breaker counts it.
    #[error("the request body was not received within {timeout:?}")]
    ClientTimeout { timeout: Duration },
    /// Holding this body would go over the budget for buffered bodies (everyone's, or this
    /// client's share of it): refused before the body is read, so nothing reached the site.
    #[error("the gateway is holding too many request and response bodies right now; retry later")]
    BufferBudgetExhausted { retry_after: Duration },
    /// A body could not be held in the buffering directory (disk full, not writable, missing).
    /// The cause is logged where it happened, not sent. `after_site`: it was the site's answer
    /// that could not be held (the site did act); otherwise the request never reached it.
    #[error("the gateway cannot hold this body right now; retry later")]
    BufferStorageFailed {
        retry_after: Duration,
        after_site: bool,
    },
}

impl GatewayError {
    fn status_and_type(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "AuthenticationError"),
            Self::AuthThrottled { .. } => (StatusCode::TOO_MANY_REQUESTS, "TooManyRequestsError"),
            Self::Forbidden(_) | Self::SiteNotAllowed(_) | Self::NotPermitted(_) => {
                (StatusCode::FORBIDDEN, "PermissionError")
            }
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "ValidationError"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "DoesNotExistError"),
            Self::PayloadTooLarge { .. } | Self::TooManyParts(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLarge")
            }
            Self::UpstreamUnreachable { .. } | Self::BadGateway { .. } => {
                (StatusCode::BAD_GATEWAY, "BadGateway")
            }
            Self::UpstreamTimeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "UpstreamTimeout"),
            Self::ClientTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, "RequestTimeout"),
            Self::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "TooManyRequestsError"),
            Self::BreakerOpen { .. } => (StatusCode::SERVICE_UNAVAILABLE, "UpstreamUnavailable"),
            Self::SharedStateUnavailable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "SharedStateUnavailable")
            }
            Self::EventsUnavailable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "EventsUnavailable")
            }
            Self::BufferBudgetExhausted { .. } | Self::BufferStorageFailed { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "InsufficientStorage")
            }
            Self::IdempotencyInFlight => (StatusCode::CONFLICT, "IdempotencyKeyInUse"),
            Self::IdempotencyMismatch => {
                (StatusCode::UNPROCESSABLE_ENTITY, "IdempotencyKeyMismatch")
            }
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::AuthThrottled { retry_after }
            | Self::TooManyRequests { retry_after, .. }
            | Self::BreakerOpen { retry_after, .. }
            | Self::SharedStateUnavailable { retry_after }
            | Self::EventsUnavailable { retry_after }
            | Self::BufferBudgetExhausted { retry_after }
            | Self::BufferStorageFailed { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// Finds an error of type `T` in `err` or its sources.
pub fn find_cause<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// The one place an error becomes a response.
pub fn error_response(
    err: &BoxError,
    api: Option<ApiVersion>,
    request_id: &str,
    body_limit: u64,
) -> Response<Body> {
    let gateway_error;
    let known = match find_cause::<GatewayError>(err.as_ref()) {
        Some(e) => Some(e),
        // A body over the limit is only noticed while streaming, deep inside the client.
        None if find_cause::<http_body_util::LengthLimitError>(err.as_ref()).is_some() => {
            gateway_error = GatewayError::PayloadTooLarge { limit: body_limit };
            Some(&gateway_error)
        }
        None => None,
    };
    let (status, exc_type, message) = match known {
        Some(e) => {
            let (status, exc_type) = e.status_and_type();
            (status, exc_type, e.to_string())
        }
        None => {
            tracing::error!(error = %err, request_id, "internal error");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "internal gateway error".to_owned(),
            )
        }
    };
    let mut response = Response::new(full_body(error_body(api, exc_type, &message, request_id)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(after) = known.and_then(GatewayError::retry_after) {
        // Whole seconds, rounded up: a client waiting this long will be let in.
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    if let Some(with) = find_cause::<WithHeaders>(err.as_ref()) {
        headers.extend(with.headers.clone());
    }
    response.extensions_mut().insert(ErrorKind(exc_type));
    response
}

/// An error that passed a layer describing the request in headers (the client's rate-limit
/// state): its response carries them too, like any other response would.
#[derive(Debug)]
pub struct WithHeaders {
    /// Added to the error response.
    pub headers: http::HeaderMap,
    /// The error itself.
    pub source: BoxError,
}

impl std::fmt::Display for WithHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.source.fmt(f)
    }
}

impl std::error::Error for WithHeaders {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

/// Marks a response the gateway made from an error, for the access log.
#[derive(Debug, Clone, Copy)]
pub struct ErrorKind(pub &'static str);
