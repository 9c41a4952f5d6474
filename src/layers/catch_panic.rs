//! A panic in any layer inside becomes a 500 Frappe envelope for that request; the worker and
//! every other request carry on. tower-http's `CatchPanicLayer` does the catching (around
//! `call` and every poll of its future); this module gives it erpgate's answer.
//!
//! Just inside observation, so the 500 is counted and logged like any other answer, and
//! outside the error edge, so a panic while an error is being rendered is caught too. The
//! envelope carries no request id (the panic handler sees no request); the `X-Request-Id`
//! response header, set outside, still does.

use std::any::Any;

use http::Response;
use tower_http::catch_panic::{CatchPanicLayer, ResponseForPanic};

use crate::error::error_response;
use crate::{Body, BoxError};

/// Answers a panic with erpgate's 500 envelope.
#[derive(Debug, Clone, Copy)]
pub struct PanicResponse {
    body_limit: u64,
}

impl ResponseForPanic for PanicResponse {
    type ResponseBody = Body;

    fn response_for_panic(&mut self, panic: Box<dyn Any + Send + 'static>) -> Response<Body> {
        let message = panic
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("a panic without a message");
        tracing::error!(panic = message, "a layer panicked; answered 500");
        let error: BoxError = "a layer panicked".into();
        error_response(&error, None, "", self.body_limit)
    }
}

/// The layer; `body_limit` as for the error edge.
pub fn layer(body_limit: u64) -> CatchPanicLayer<PanicResponse> {
    CatchPanicLayer::custom(PanicResponse { body_limit })
}
