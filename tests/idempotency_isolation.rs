//! Idempotency-Key records are private to each client in memory too: one client's traffic
//! never evicts another's, and a request still running is never evicted.
//!
//! Finding reproduced: all clients shared one LRU; 220 large keyed requests from client A
//! evicted client B's record, and B's retry created a second document.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{Method, StatusCode};
use support::*;

const OTHER: Credential = ("ek_other", "other-client-secret");

fn config(up: &FrappeUpstream) -> String {
    base_config(up)
        + &format!(
            "  other:\n    key_id: {}\n    secret_sha256: \"{}\"\n    site: erp\n    service_account: sync\nidempotency: {{ max_bytes: 64KiB }}\n",
            OTHER.0,
            sha256_hex(OTHER.1)
        )
}

#[tokio::test]
async fn one_clients_flood_never_evicts_another_clients_record() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    let order = r#"{"description": "the one order"}"#;
    let first = keyed_post(&gw, "/api/resource/ToDo", OTHER, "order-42", order).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());

    // Client A floods its own budget with large kept answers.
    for i in 0..220 {
        let reply = keyed_post(
            &gw,
            &format!("/api/method/test.big?size=2000&i={i}"),
            FULL,
            &format!("flood-{i}"),
            "{}",
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
    }

    // B's retry is a replay: still one document in the database.
    let retry = keyed_post(&gw, "/api/resource/ToDo", OTHER, "order-42", order).await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.json(), first.json());
    let creates = up
        .received()
        .iter()
        .filter(|r| r.method == Method::POST && r.path_and_query == "/api/resource/ToDo")
        .count();
    assert_eq!(creates, 1);

    // A's own oldest records went, counted for A alone.
    let metrics = gw.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "erpgate_idempotency_evictions_total",
            &[("client", "full")]
        ) > 0.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "erpgate_idempotency_evictions_total",
            &[("client", "other")]
        ),
        0.0
    );
    let again = keyed_post(
        &gw,
        "/api/method/test.big?size=2000&i=0",
        FULL,
        "flood-0",
        "{}",
    )
    .await;
    assert_eq!(
        again.header("idempotent-replayed"),
        None,
        "A's oldest record was kept"
    );
}

#[tokio::test]
async fn a_request_still_running_is_never_evicted() {
    let up = upstream().await;
    let gw = std::sync::Arc::new(Gateway::start(&config(&up)).await);
    // A slow keyed request is in flight...
    let slow = {
        let gw = gw.clone();
        tokio::spawn(async move {
            keyed_post(&gw, "/api/method/test.slow?ms=1500", FULL, "slow-1", "{}").await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // ...while the same client fills its budget many times over.
    for i in 0..100 {
        keyed_post(
            &gw,
            &format!("/api/method/test.big?size=2000&i={i}"),
            FULL,
            &format!("fill-{i}"),
            "{}",
        )
        .await;
    }
    // A repeat of the running one is still told it is in flight: never run a second time.
    let repeat = keyed_post(&gw, "/api/method/test.slow?ms=1500", FULL, "slow-1", "{}").await;
    assert_eq!(repeat.status, StatusCode::CONFLICT, "{}", repeat.text());
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    let slow_runs = up
        .received()
        .iter()
        .filter(|r| r.path_and_query.starts_with("/api/method/test.slow"))
        .count();
    assert_eq!(slow_runs, 1);
}
