//! erpgate: an API gateway for ERPNext / Frappe sites.
//!
//! Clients hold gateway keys; erpgate authenticates them, applies their access rules, routes
//! each request to a Frappe site and signs it with that site's service-account token, so no
//! ERPNext secret ever leaves the gateway. The Tower stack is assembled in [`stack`].

pub mod config;
pub mod doctor;
pub mod error;
pub mod events;
pub mod forwarding;
pub mod frappe;
pub mod layers;
pub mod log_format;
pub mod metrics;
pub mod oauth;
pub mod routing;
pub mod server;
pub mod shared_state;
pub mod site;
pub mod stack;
pub mod tags;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod worker;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

/// The error type passed between layers; turned into a response only at the edge.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every request and response inside the stack: a streaming body, boxed once.
/// `Send` but not `Sync` (nothing shares a body between threads; hyper asks only `Send`), so
/// tower-http's layers, whose bodies are unsync boxes, fit without a wrapper that would hide
/// the size hint.
///
/// A named type rather than an alias of `BoxBody`, so that generic layers holding futures over
/// it across `.await` stay `Send` (the compiler cannot see through `dyn` there, see
/// rust-lang/rust#102211; axum does the same).
#[derive(Debug)]
pub struct Body(UnsyncBoxBody<Bytes, BoxError>);

impl Body {
    /// Wraps any body whose errors convert to [`BoxError`].
    pub fn new<B>(body: B) -> Self
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self(body.map_err(Into::into).boxed_unsync())
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

impl Default for Body {
    /// Empty (tower-http's CORS preflight answer starts from one).
    fn default() -> Self {
        empty_body()
    }
}

/// A body holding `bytes`.
pub fn full_body(bytes: impl Into<Bytes>) -> Body {
    Body::new(Full::new(bytes.into()))
}

/// An empty body.
pub fn empty_body() -> Body {
    Body::new(Empty::<Bytes>::new())
}
