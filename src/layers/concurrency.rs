//! The per-client concurrency cap: at most `max_in_flight` requests of one client at a time,
//! counted until the response body has been sent, so one client's slow reports cannot occupy
//! every Frappe worker. Over the cap → 429 with `Retry-After: 1`.
//!
//! Right after the rate limiter: both are per-client admission decisions.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use prometheus::IntCounterVec;
use tower::{Layer, Service};

use crate::error::GatewayError;
use crate::layers::auth::Client;
use crate::{Body, BoxError};

/// One client's requests in flight, against its cap.
///
/// A counter, not tokio's `Semaphore`: nothing ever waits for a slot (over the cap is 429 at
/// once), and the semaphore takes its waiters' lock on every release, a lock every worker took
/// for every request of the client.
#[derive(Debug)]
pub struct InFlight {
    count: AtomicUsize,
    cap: usize,
}

impl InFlight {
    /// At most `cap` at once.
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            count: AtomicUsize::new(0),
            cap,
        })
    }

    /// A slot, held until the returned guard is dropped; `None` at the cap.
    pub fn try_acquire(self: &Arc<Self>) -> Option<InFlightSlot> {
        let mut count = self.count.load(Ordering::Relaxed);
        loop {
            if count >= self.cap {
                return None;
            }
            match self.count.compare_exchange_weak(
                count,
                count + 1,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(InFlightSlot(self.clone())),
                Err(now) => count = now,
            }
        }
    }

    /// Requests in flight now.
    pub fn current(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

/// A held slot of an [`InFlight`]; freed on drop.
#[derive(Debug)]
pub struct InFlightSlot(Arc<InFlight>);

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::Release);
    }
}

/// Caps requests in flight per client.
#[derive(Clone)]
pub struct ConcurrencyLayer {
    rejected: IntCounterVec,
}

impl ConcurrencyLayer {
    /// Counts rejections in `rejected{client,reason="concurrency"}`.
    pub fn new(rejected: IntCounterVec) -> Self {
        Self { rejected }
    }
}

impl<S> Layer<S> for ConcurrencyLayer {
    type Service = Concurrency<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Concurrency {
            inner,
            rejected: self.rejected.clone(),
        }
    }
}

/// The service of [`ConcurrencyLayer`].
#[derive(Clone)]
pub struct Concurrency<S> {
    inner: S,
    rejected: IntCounterVec,
}

impl<S> Service<Request<Body>> for Concurrency<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ConcurrencyFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let Some(client) = request.extensions().get::<Arc<Client>>() else {
            return ConcurrencyFuture::Inner {
                future: self.inner.call(request),
                permit: None,
            };
        };
        match client.in_flight.try_acquire() {
            Some(permit) => ConcurrencyFuture::Inner {
                future: self.inner.call(request),
                permit: Some(permit),
            },
            None => {
                self.rejected
                    .with_label_values(&[&client.name, "concurrency"])
                    .inc();
                ConcurrencyFuture::Rejected
            }
        }
    }
}

pin_project! {
    /// Hands the permit to the response body, or answers 429.
    #[project = ConcurrencyProj]
    pub enum ConcurrencyFuture<F> {
        Rejected,
        Inner { #[pin] future: F, permit: Option<InFlightSlot> },
    }
}

impl<F> std::future::Future for ConcurrencyFuture<F>
where
    F: std::future::Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ConcurrencyProj::Rejected => Poll::Ready(Err(GatewayError::TooManyRequests {
                message: "too many requests in flight",
                retry_after: Duration::from_secs(1),
            }
            .into())),
            ConcurrencyProj::Inner { future, permit } => {
                let response = std::task::ready!(future.poll(cx))?;
                Poll::Ready(Ok(match permit.take() {
                    Some(permit) => response.map(|body| {
                        Body::new(HoldingPermit {
                            body,
                            _permit: permit,
                        })
                    }),
                    None => response,
                }))
            }
        }
    }
}

pin_project! {
    /// A response body that keeps its request's slot until it is fully sent or dropped.
    struct HoldingPermit {
        #[pin]
        body: Body,
        _permit: InFlightSlot,
    }
}

impl http_body::Body for HoldingPermit {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_stop_at_the_cap_and_come_back_when_dropped() {
        let in_flight = InFlight::new(2);
        let a = in_flight.try_acquire();
        let b = in_flight.try_acquire();
        assert!(a.is_some() && b.is_some());
        assert!(in_flight.try_acquire().is_none());
        drop(a);
        assert_eq!(in_flight.current(), 1);
        assert!(in_flight.try_acquire().is_some());
    }

    #[test]
    fn racing_threads_never_hold_more_than_the_cap() {
        let in_flight = InFlight::new(3);
        let most = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|scope| {
            for _ in 0..4 {
                let (in_flight, most) = (in_flight.clone(), most.clone());
                scope.spawn(move || {
                    for _ in 0..20_000 {
                        if let Some(slot) = in_flight.try_acquire() {
                            most.fetch_max(in_flight.current(), Ordering::Relaxed);
                            drop(slot);
                        }
                    }
                });
            }
        });
        assert!(most.load(Ordering::Relaxed) <= 3);
        assert_eq!(in_flight.current(), 0);
    }
}
