//! The gateway's Tower layers, one per file. Their order is decided in [`crate::stack`] alone.

pub mod attempt_span;
pub mod auth;
pub mod authorize;
pub mod body_limit;
pub mod breaker;
pub mod buffer;
pub mod buffer_budget;
pub mod cache;
pub mod catch_panic;
pub mod classify;
pub mod compression;
pub mod concurrency;
pub mod cors;
pub mod credential_swap;
pub mod deadline;
pub mod error_response;
pub mod event_feed;
pub mod forward;
pub mod idempotency;
pub mod method_route;
pub mod observe;
pub mod openapi;
pub mod public_routes;
pub mod rate_limit;
pub mod request_id;
pub mod retry;
pub mod route;
pub mod sensitive_headers;
pub mod server_span;
pub mod webhook;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use crate::{Body, BoxError};

/// A boxed response future, for the steps that must await something of their own.
pub type BoxResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

pin_project! {
    /// The future of a layer that may stop a request early: either an answer ready now (an
    /// error the edge will render) or the inner service's future, as tower-http's `limit` does.
    #[project = EarlyProj]
    pub enum EarlyReturn<F> {
        /// Stopped here.
        Ready { answer: Option<Result<Response<Body>, BoxError>> },
        /// Passed on.
        Inner { #[pin] future: F },
    }
}

impl<F> EarlyReturn<F> {
    /// Stops the request with `err`.
    pub fn error(err: impl Into<BoxError>) -> Self {
        Self::Ready {
            answer: Some(Err(err.into())),
        }
    }

    /// Passes the request on.
    pub fn inner(future: F) -> Self {
        Self::Inner { future }
    }
}

impl<F> Future for EarlyReturn<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            EarlyProj::Ready { answer } => Poll::Ready(
                answer
                    .take()
                    .unwrap_or_else(|| Err("EarlyReturn polled after completion".into())),
            ),
            EarlyProj::Inner { future } => future.poll(cx),
        }
    }
}
