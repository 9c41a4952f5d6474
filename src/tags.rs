//! Facts about a request that inner layers learn and outer layers report: the client, the site,
//! the request kind and the API version. The observing layer puts an `Arc<RequestTags>` in the
//! request's extensions; inner layers fill it in; the access log, the metrics and the error
//! envelope read it once the response is back.

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, OnceLock};

use crate::frappe::ApiVersion;

/// Per-request facts, each set at most once.
#[derive(Debug, Default)]
pub struct RequestTags {
    /// The authenticated client's configured name.
    pub client: OnceLock<Arc<str>>,
    /// The configured name of the site the request was routed to.
    pub site: OnceLock<Arc<str>>,
    /// A fixed label for what the request does (see `RequestKind::label`).
    pub kind: OnceLock<&'static str>,
    /// The Frappe API version of the (canonical) path.
    pub api: OnceLock<Option<ApiVersion>>,
    /// The OpenTelemetry trace the request belongs to, when tracing is on (for the access log).
    pub trace_id: OnceLock<[u8; 16]>,
    /// Attempts sent to the site (retries are the attempts after the first).
    pub attempts: AtomicU32,
}

impl RequestTags {
    /// Tags found in a request's extensions, if the observing layer put them there.
    pub fn of<B>(request: &http::Request<B>) -> Option<&Arc<RequestTags>> {
        request.extensions().get::<Arc<RequestTags>>()
    }
}
