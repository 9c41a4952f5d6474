//! Every public connection is bounded from accept: a first request head within
//! `header_read_timeout` whatever the protocol, no more than `idle_timeout` with nothing in
//! flight, and no more than `max_connections` open at once — while the admin listener keeps
//! answering.
//!
//! Finding reproduced: connections that sent nothing, half an HTTP/2 preface, or a preface and
//! no stream were never closed; 20,000 of them exhausted the file descriptors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(up: &FrappeUpstream, limits: &str) -> String {
    base_config(up).replace(
        "limits: { max_body_bytes: 64MiB, max_inspected_body_bytes: 1MiB }",
        &format!("limits: {{ max_body_bytes: 64MiB, max_inspected_body_bytes: 1MiB, {limits} }}"),
    )
}

/// How long until the server closes `stream` (reads until EOF or error), at most `limit`.
async fn closed_after(mut stream: TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(
            limit.saturating_sub(started.elapsed()),
            stream.read(&mut buf),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

async fn connect(gw: &Gateway) -> TcpStream {
    TcpStream::connect(gw.base.trim_start_matches("http://"))
        .await
        .unwrap()
}

#[tokio::test]
async fn silent_sockets_and_half_http2_prefaces_are_closed_at_the_head_deadline() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, "header_read_timeout: 1s, idle_timeout: 2s")).await;
    let silent = connect(&gw).await;
    let mut half = connect(&gw).await;
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut preface = connect(&gw).await;
    // The whole client preface and an empty SETTINGS frame, then no stream.
    preface
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    for (what, stream) in [
        ("silent", silent),
        ("half preface", half),
        ("preface only", preface),
    ] {
        let closed = closed_after(stream, Duration::from_secs(5)).await;
        let closed = closed.unwrap_or_else(|| panic!("{what}: never closed"));
        assert!(
            closed < Duration::from_secs(3),
            "{what}: closed after {closed:?}"
        );
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, "idle_timeout: 1s")).await;
    let mut stream = connect(&gw).await;
    let request = format!(
        "GET /api/resource/ToDo HTTP/1.1\r\nHost: gw\r\nAuthorization: {}\r\n\r\n",
        token(FULL)
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let closed = closed_after(stream, Duration::from_secs(5))
        .await
        .expect("never closed");
    assert!(closed < Duration::from_secs(3), "closed after {closed:?}");
}

#[tokio::test]
async fn over_the_connection_cap_new_connections_are_closed_at_once_and_admin_answers() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, "max_connections: 20, header_read_timeout: 2s")).await;
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(connect(&gw).await);
    }
    let started = Instant::now();
    let results = futures_util::future::join_all(
        held.into_iter()
            .map(|s| closed_after(s, Duration::from_millis(800))),
    )
    .await;
    let closed_at_once = results.iter().filter(|r| r.is_some()).count();
    assert!(
        (20..=25).contains(&closed_at_once),
        "{closed_at_once} of 40 closed at once (cap 20)"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // The admin listener is its own: it answers throughout.
    let health = send(
        Method::GET,
        &format!("{}/healthz", gw.admin),
        &[],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(health.status, StatusCode::OK);
    let metrics = gw.metrics().await;
    assert!(metric_value(&metrics, "erpgate_connections_refused_total", &[]) >= 15.0);
    // Once the silent ones are cut off at the head deadline, real clients get in again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        get(&gw.url("/api/resource/ToDo"), FULL).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn an_admin_connection_that_sends_nothing_is_closed() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let admin = TcpStream::connect(gw.admin.trim_start_matches("http://"))
        .await
        .unwrap();
    // The admin listener's head deadline is 10 s.
    let closed = closed_after(admin, Duration::from_secs(15))
        .await
        .expect("an idle admin connection was never closed");
    assert!(closed >= Duration::from_secs(5), "closed after {closed:?}");
}

/// A connection's read buffer is bounded by `limits.max_request_head_bytes` (8 KiB by
/// default): a larger HTTP/1.1 head gets 431 and reaches nothing, a smaller one passes, and the
/// limit can be raised. A body larger than it still streams through whole.
#[tokio::test]
async fn the_request_head_is_bounded_by_max_request_head_bytes() {
    let up = upstream().await;
    let auth = token(FULL);
    let head_of = |pad: usize| "p".repeat(pad);
    let default = Gateway::start(&config(&up, "header_read_timeout: 5s")).await;
    let small = head_of(6 << 10);
    let reply = send(
        Method::GET,
        &default.url("/api/method/ping"),
        &[("authorization", &auth), ("x-pad", &small)],
        "",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let before = up.count();
    let large = head_of(9 << 10);
    let reply = send(
        Method::GET,
        &default.url("/api/method/ping"),
        &[("authorization", &auth), ("x-pad", &large)],
        "",
    )
    .await;
    assert_eq!(reply.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(up.count(), before, "nothing reached the upstream");
    // A body far larger than the buffer is read through it, whole.
    let body = format!(r#"{{"description": "{}"}}"#, "b".repeat(200 << 10));
    let reply = send_json(
        Method::POST,
        &default.url("/api/resource/ToDo"),
        FULL,
        &body,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let raised = Gateway::start(&config(&up, "max_request_head_bytes: 32KiB")).await;
    let reply = send(
        Method::GET,
        &raised.url("/api/method/ping"),
        &[("authorization", &auth), ("x-pad", &large)],
        "",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
}
