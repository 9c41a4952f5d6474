//! Slow clients against a site with two sync workers (as a bench's gunicorn has): buffering
//! keeps them from holding the workers, and their slowness is never the site's failure.
//!
//! Finding reproduced: a client sent bodies at 1 byte per interval; they streamed to gunicorn
//! and held both workers (another client's `ping` waited), and their timeouts opened the
//! breaker for every client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use support::*;

/// A body of `n` bytes, one every `every`.
fn trickle(n: usize, every: Duration) -> ClientBody {
    let stream = futures_util::stream::unfold(0usize, move |i| async move {
        if i == n {
            return None;
        }
        tokio::time::sleep(every).await;
        Some((
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"x"))),
            i + 1,
        ))
    });
    StreamBody::new(stream).boxed()
}

async fn slow_post(gw: &Gateway, path: &str, n: usize, every: Duration) -> Reply {
    let auth = token(FULL);
    send_body(
        Method::POST,
        &gw.url(path),
        &[
            ("authorization", &auth),
            ("content-type", "application/octet-stream"),
        ],
        trickle(n, every),
    )
    .await
}

#[tokio::test]
async fn slow_senders_never_hold_the_sites_workers() {
    let up = upstream().await;
    up.set_sync_workers(2);
    let gw = std::sync::Arc::new(Gateway::start(&base_config(&up)).await);
    // Four slow uploads, ~6 s each.
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let gw = gw.clone();
            tokio::spawn(async move {
                slow_post(
                    &gw,
                    "/api/method/upload_file",
                    30,
                    Duration::from_millis(200),
                )
                .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Meanwhile another client is served at once: no worker is held by a slow sender.
    let started = Instant::now();
    let reply = get(&gw.url("/api/method/frappe.auth.get_logged_user"), FULL).await;
    let waited = started.elapsed();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(
        waited < Duration::from_secs(3),
        "a bystander waited {waited:?} behind slow senders"
    );
    assert_eq!(
        up.body_progress(),
        0,
        "a slow body reached the site before it was whole"
    );
    for upload in slow {
        let reply = upload.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["message"]["size"], 30);
    }
    assert_eq!(up.count(), 5);
}

#[tokio::test]
async fn a_client_too_slow_for_the_deadline_is_its_own_timeout_never_the_sites() {
    let up = upstream().await;
    // Streamed to the site (the opt-out), with a short site timeout and a breaker that would
    // open after two failures.
    let config = base_config(&up).replace(
        "    timeouts: { connect: 1s, request: 3s }\n",
        "    timeouts: { connect: 1s, request: 1s }\n    breaker: { consecutive_failures: 2 }\n",
    )
        + "routes:\n  - { path_prefix: /api/method/upload_file, site: erp, streaming: true }\n";
    let gw = Gateway::start(&config).await;
    for _ in 0..3 {
        let reply = slow_post(
            &gw,
            "/api/method/upload_file",
            30,
            Duration::from_millis(100),
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::REQUEST_TIMEOUT,
            "{}",
            reply.text()
        );
        assert_eq!(reply.json()["exc_type"], "RequestTimeout");
    }
    // Buffered (the default), a pause longer than client_body_timeout is a 408 too.
    let config = base_config(&up) + "buffering: { client_body_timeout: 300ms }\n";
    let buffered = Gateway::start(&config).await;
    let reply = slow_post(
        &buffered,
        "/api/method/upload_file",
        3,
        Duration::from_millis(600),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::REQUEST_TIMEOUT,
        "{}",
        reply.text()
    );
    // The breaker never opened: everyone else is served.
    let reply = get(&gw.url("/api/method/frappe.auth.get_logged_user"), FULL).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(&metrics, "erpgate_breaker_state", &[("site", "erp")]),
        0.0
    );
}

#[tokio::test]
async fn slow_readers_never_hold_the_sites_workers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream().await;
    up.set_sync_workers(2);
    // A long attempt timeout: were the workers held, the bystander would wait the readers out
    // (they read only after it is answered) and hit the bound below, not a 504 that could also
    // come from a loaded machine.
    let config = base_config(&up).replace("request: 3s", "request: 60s");
    let gw = Gateway::start(&config).await;
    let addr = gw.base.trim_start_matches("http://").to_owned();
    // Two clients ask for 24 MB answers and then read nothing for a while.
    let mut readers = Vec::new();
    for i in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let request = format!(
            "GET /api/method/test.big?size=24000000&i={i} HTTP/1.1\r\nHost: gw\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
            token(FULL)
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        readers.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    // A bound against a hang, not a benchmark (shared machines are slow at times): held workers
    // would keep the bystander waiting for as long as the readers do not read, forever.
    let started = Instant::now();
    let reply = tokio::time::timeout(
        Duration::from_secs(20),
        get(&gw.url("/api/method/frappe.auth.get_logged_user"), FULL),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "a bystander waited {:?} behind slow readers",
            started.elapsed()
        )
    });
    assert_eq!(reply.status, StatusCode::OK);
    // The slow readers still get everything.
    for mut stream in readers {
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(answer.len() > 24_000_000);
        assert!(answer.starts_with(b"HTTP/1.1 200"));
    }
}
