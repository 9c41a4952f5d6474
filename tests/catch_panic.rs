//! A panic inside the stack (here in the service behind every layer, as a bug in any layer
//! would) answers that one request with a 500 Frappe envelope, is counted like any answer, and
//! the same gateway goes on serving. Both kinds: a panic while the request is being handed on
//! (`call`) and one while its answer is awaited (a poll).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use erpgate::config::Config;
use erpgate::forwarding::PeerAddr;
use erpgate::metrics::Metrics;
use erpgate::stack::{build_with, GatewayService};
use erpgate::{full_body, Body, BoxError};
use support::{base_config, upstream, FULL};

/// A gateway whose upstream panics in `call` for `/api/method/panic_in_call`, in its future
/// for `/api/method/panic_in_poll`, and answers everything else; `served` counts those answers.
/// The config is the tests' usual one (its backend is never dialled here).
async fn gateway(metrics: &Metrics, served: Arc<AtomicUsize>) -> GatewayService {
    let yaml = base_config(&upstream().await);
    let loaded = Config::from_yaml(&yaml, "catch_panic").unwrap();
    let upstream =
        tower::util::BoxCloneSyncService::new(tower::service_fn(move |request: Request<Body>| {
            assert!(
                !request.uri().path().ends_with("panic_in_call"),
                "a bug in call"
            );
            let served = served.clone();
            async move {
                assert!(
                    !request.uri().path().ends_with("panic_in_poll"),
                    "a bug in a poll"
                );
                served.fetch_add(1, Ordering::SeqCst);
                Ok::<_, BoxError>(Response::new(full_body(r#"{"message":"pong"}"#)))
            }
        }));
    build_with(&loaded, metrics, None, upstream)
        .unwrap()
        .service
}

fn request(path: &str) -> Request<Body> {
    let mut request = Request::post(path)
        .header(
            header::AUTHORIZATION,
            format!("token {}:{}", FULL.0, FULL.1),
        )
        .header(header::HOST, "gw.example.com")
        .body(full_body(""))
        .unwrap();
    request
        .extensions_mut()
        .insert(PeerAddr("10.1.2.3:40000".parse().unwrap()));
    request
}

#[tokio::test]
async fn a_panic_in_any_layer_is_that_requests_500_envelope_and_the_gateway_goes_on() {
    let metrics = Metrics::new().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let service = gateway(&metrics, served.clone()).await;
    for path in ["/api/method/panic_in_call", "/api/method/panic_in_poll"] {
        let response = service.clone().oneshot(request(path)).await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::INTERNAL_SERVER_ERROR,
            "{path}"
        );
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(envelope["exc_type"], "InternalError", "{path}: {envelope}");
        assert!(
            !String::from_utf8_lossy(&body).contains("a bug"),
            "no panic text leaks"
        );

        // The same gateway serves the next request.
        let response = service
            .clone()
            .oneshot(request("/api/method/ping"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(
        served.load(Ordering::SeqCst),
        2,
        "the two pings, nothing else"
    );
    // Counted like any answer, by the observation outside.
    let text = String::from_utf8(metrics.encode()).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("erpgate_requests_total{")
                && l.contains("code=\"500\"")
                && l.ends_with(" 2")),
        "{text}"
    );
}
