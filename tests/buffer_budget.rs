//! The budget for buffered bodies, over real sockets: what all clients' bodies may hold in
//! memory and on disk, and one client's share of it.
//!
//! Finding reproduced: one client's ten slow 100 MB uploads held 990 MB of temporary files; when
//! the disk filled, another client's upload got a bare 500. Now a body that would go over the
//! budget is refused with 503 and `Retry-After` before it is read, one client cannot take the
//! whole budget, and a failing buffering directory is a 503 envelope. JSON bodies, read whole by
//! classification before any buffering, count against the same memory budget.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

/// A third unrestricted client, so two can compete for the budget.
const OTHER: Credential = ("ek_other", "other-client-secret");

const UPLOAD: &str = "/api/method/upload_file";

/// `base_config` with a small budget, `share` of it per client, 16 KiB of a body in memory.
fn config(up: &FrappeUpstream, share: f64) -> String {
    base_config(up).replace(
        "clients:\n",
        &format!(
            "clients:\n  other:\n    key_id: {}\n    secret_sha256: \"{}\"\n    site: erp\n    service_account: sync\n",
            OTHER.0,
            sha256_hex(OTHER.1)
        ),
    ) + &format!(
        "buffering: {{ memory: 16KiB, max_memory: 64KiB, max_disk: 256KiB, max_client_share: {share} }}\n"
    )
}

const OCTET_STREAM: &str = "application/octet-stream";

/// POSTs `body` to `path` as `content_type`, signed by `who` or keyless, its length declared
/// when `length` is given.
async fn post(
    gw: &Gateway,
    path: &str,
    who: Option<Credential>,
    content_type: &str,
    length: Option<usize>,
    body: ClientBody,
) -> Reply {
    let auth = who.map(token);
    let length = length.map(|len| len.to_string());
    let mut headers = vec![("content-type", content_type)];
    if let Some(length) = &length {
        headers.push(("content-length", length));
    }
    if let Some(auth) = &auth {
        headers.push(("authorization", auth));
    }
    send_body(Method::POST, &gw.url(path), &headers, body).await
}

/// A body that sends `first` at once and `rest` when `go` is notified, so the request holds
/// its reservation until then.
fn held_body(first: Bytes, rest: Bytes, go: Arc<Notify>) -> ClientBody {
    let stream = futures_util::stream::unfold(0u8, move |step| {
        let (go, first, rest) = (go.clone(), first.clone(), rest.clone());
        async move {
            let chunk = match step {
                0 => first,
                1 => {
                    go.notified().await;
                    rest
                }
                _ => return None,
            };
            Some((Ok::<_, Infallible>(http_body::Frame::data(chunk)), step + 1))
        }
    });
    StreamBody::new(stream).boxed()
}

/// An upload of `len` bytes with its length declared: all but its last byte at once (held, as
/// they arrived), the last when `go` is notified.
fn held_upload(
    gw: &Arc<Gateway>,
    who: Credential,
    len: usize,
    go: Arc<Notify>,
) -> tokio::task::JoinHandle<Reply> {
    let gw = gw.clone();
    tokio::spawn(async move {
        let body = held_body(
            Bytes::from(vec![b'a'; len - 1]),
            Bytes::from_static(b"b"),
            go,
        );
        post(&gw, UPLOAD, Some(who), OCTET_STREAM, Some(len), body).await
    })
}

/// A whole upload of `len` bytes.
async fn upload(gw: &Gateway, who: Credential, len: usize) -> Reply {
    let body = Full::new(Bytes::from(vec![b'z'; len])).boxed();
    post(gw, UPLOAD, Some(who), OCTET_STREAM, None, body).await
}

/// An upload of `chunks` × 10 KiB, chunked (its length not declared).
async fn chunked_upload(gw: &Gateway, who: Credential, chunks: usize) -> Reply {
    let frames =
        futures_util::stream::iter((0..chunks).map(|_| {
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(vec![b'c'; 10 << 10])))
        }));
    let body = StreamBody::new(frames).boxed();
    post(gw, UPLOAD, Some(who), OCTET_STREAM, None, body).await
}

/// Sends only `head` (a request's head, its blank line included) and reads the answer: an
/// answer at all shows it was given before the body was read.
async fn answer_to_head(gw: &Gateway, head: &str) -> String {
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("no answer before the body was sent")
        .unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

/// The answer to only the head of an upload declaring `len` bytes.
async fn head_only_upload(gw: &Gateway, who: Credential, len: usize) -> String {
    let head = format!(
        "POST {UPLOAD} HTTP/1.1\r\nHost: gw\r\nAuthorization: {}\r\nContent-Type: {OCTET_STREAM}\r\nContent-Length: {len}\r\n\r\n",
        token(who)
    );
    answer_to_head(gw, &head).await
}

fn refusals(metrics: &str, direction: &str, reason: &str) -> f64 {
    metric_value(
        metrics,
        "erpgate_buffer_refusals_total",
        &[("direction", direction), ("reason", reason)],
    )
}

/// The budget's refusal of a body it has no room for now: 503 `InsufficientStorage`, and
/// `Retry-After: 1` (held bodies are let go within a request's time).
fn assert_over_budget(reply: &Reply) {
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(reply.json()["exc_type"], "InsufficientStorage");
}

/// The same refusal as `assert_over_budget`, in a raw HTTP/1.1 answer read off the socket.
fn assert_over_budget_answer(answer: &str) {
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1\r\n"),
        "{answer}"
    );
    assert!(
        answer.contains(r#""exc_type":"InsufficientStorage""#),
        "{answer}"
    );
}

#[tokio::test]
async fn a_client_holding_the_budget_gets_others_large_bodies_refused_before_they_are_read() {
    let up = upstream().await;
    let gw = Arc::new(Gateway::start(&config(&up, 0.75)).await);
    // One client's slow upload holds 192 KiB of the 256 KiB of disk (its whole share).
    let go = Arc::new(Notify::new());
    let slow = held_upload(&gw, FULL, 192 << 10, go.clone());
    wait_for_buffered(&gw, "disk", f64::from((192 << 10) - 1)).await;

    // Another client's 100 KiB upload: refused from its head alone, with Retry-After.
    let answer = head_only_upload(&gw, OTHER, 100 << 10).await;
    assert_over_budget_answer(&answer);
    // The same with the body sent whole.
    let reply = upload(&gw, OTHER, 100 << 10).await;
    assert_over_budget(&reply);
    // Chunked, its length unknown: refused once what it sent would go over.
    let reply = chunked_upload(&gw, OTHER, 10).await;
    assert_over_budget(&reply);
    // A small one (held in memory, which has room) still passes.
    let reply = upload(&gw, OTHER, 4 << 10).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["message"]["size"], 4 << 10);
    // Nothing of the refused uploads reached the site (nor of the slow one, still held).
    assert_eq!(up.count(), 1);
    assert!(up.received().iter().all(|r| r.body_len == 4 << 10));
    let metrics = gw.metrics().await;
    assert_eq!(refusals(&metrics, "request", "budget"), 3.0);

    // Once the slow upload is through, the budget is free again.
    go.notify_one();
    let reply = slow.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["message"]["size"], 192 << 10);
    assert_nothing_buffered(&gw).await;
    let reply = upload(&gw, OTHER, 100 << 10).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(up.received().last().unwrap().body_len, 100 << 10);
    assert_nothing_buffered(&gw).await;
}

#[tokio::test]
async fn one_client_cannot_take_the_whole_budget() {
    let up = upstream().await;
    let gw = Arc::new(Gateway::start(&config(&up, 0.5)).await);
    // Half the disk budget (128 KiB) is one client's share; two of its uploads fill it.
    let go = Arc::new(Notify::new());
    let first = held_upload(&gw, FULL, 64 << 10, go.clone());
    let second = held_upload(&gw, FULL, 64 << 10, go.clone());
    wait_for_buffered(&gw, "disk", f64::from((128 << 10) - 2)).await;
    // Its third is refused, though the budget itself has room...
    let answer = head_only_upload(&gw, FULL, 20 << 10).await;
    assert_over_budget_answer(&answer);
    // ...which another client still gets.
    let reply = upload(&gw, OTHER, 100 << 10).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(up.count(), 1);
    assert_eq!(up.received()[0].body_len, 100 << 10);
    let metrics = gw.metrics().await;
    assert_eq!(refusals(&metrics, "request", "client_share"), 1.0);

    go.notify_waiters();
    for held in [first, second] {
        let reply = held.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    assert_nothing_buffered(&gw).await;
    // Its share is its own again.
    let reply = upload(&gw, FULL, 120 << 10).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_nothing_buffered(&gw).await;
}

#[tokio::test]
async fn a_body_no_budget_could_hold_is_413_and_never_reaches_the_site() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, 0.5)).await;
    // Declared: refused from its head.
    let answer = head_only_upload(&gw, FULL, 200 << 10).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains(r#""exc_type":"RequestEntityTooLarge""#),
        "{answer}"
    );
    // Chunked: refused once it has sent more than its share could hold.
    let reply = chunked_upload(&gw, FULL, 20).await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text()
    );
    assert_eq!(reply.json()["exc_type"], "RequestEntityTooLarge");
    assert_eq!(up.count(), 0);
    assert_eq!(up.body_progress(), 0);
    assert_eq!(refusals(&gw.metrics().await, "request", "too_large"), 2.0);
    assert_nothing_buffered(&gw).await;
}

#[tokio::test]
async fn a_response_over_the_budget_is_passed_on_unheld() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, 0.5)).await;
    let reply = get(&gw.url("/api/method/test.big?size=300000"), FULL).await;
    assert_eq!(reply.status, StatusCode::OK);
    // Whole, as the site sent it (its filler is the size asked for, less the JSON around it).
    assert_eq!(
        reply.json()["message"]["filler"].as_str().unwrap().len(),
        300_000 - 40
    );
    assert_eq!(refusals(&gw.metrics().await, "response", "too_large"), 1.0);
    assert_nothing_buffered(&gw).await;
}

#[tokio::test]
async fn a_buffering_directory_that_cannot_be_written_is_a_503_envelope_not_a_500() {
    let up = upstream().await;
    // A regular file where the directory should be (tests run as root: modes would not bite).
    let not_a_directory = scratch_file("buffer-budget-not-a-dir", "x");
    let yaml = config(&up, 0.5).replace(
        "buffering: { memory: 16KiB,",
        &format!(
            "buffering: {{ directory: {}, memory: 16KiB,",
            not_a_directory.display()
        ),
    );
    let gw = Gateway::start(&yaml).await;
    let reply = upload(&gw, FULL, 100 << 10).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert_eq!(reply.json()["exc_type"], "InsufficientStorage");
    assert!(reply.header("retry-after").is_some());
    assert_eq!(up.count(), 0);
    // A body small enough for memory needs no file.
    let reply = upload(&gw, FULL, 4 << 10).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // A response that needs a file goes on as it comes: the site has already answered.
    let reply = get(&gw.url("/api/method/test.big?size=100000"), FULL).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json()["message"]["filler"].as_str().unwrap().len(),
        100_000 - 40
    );
    assert_nothing_buffered(&gw).await;
}

/// A JSON body of exactly `len` bytes (at least 11).
fn json_of_len(len: usize) -> Vec<u8> {
    let mut body = br#"{"data":""#.to_vec();
    body.resize(len - 2, b'x');
    body.extend_from_slice(br#""}"#);
    body
}

/// A JSON POST of `len` bytes to `path` with its length declared (signed by `who`, or keyless):
/// all but its last byte at once, the last when `go` is notified.
fn held_json(
    gw: &Arc<Gateway>,
    who: Option<Credential>,
    path: &'static str,
    len: usize,
    go: Arc<Notify>,
) -> tokio::task::JoinHandle<Reply> {
    let gw = gw.clone();
    tokio::spawn(async move {
        let mut first = Bytes::from(json_of_len(len));
        let rest = first.split_off(len - 1);
        let body = held_body(first, rest, go);
        post(&gw, path, who, "application/json", Some(len), body).await
    })
}

/// A whole JSON POST of `len` bytes to `path`, signed by `who` or keyless.
async fn post_json(gw: &Gateway, who: Option<Credential>, path: &str, len: usize) -> Reply {
    let body = Full::new(Bytes::from(json_of_len(len))).boxed();
    post(gw, path, who, "application/json", None, body).await
}

#[tokio::test]
async fn json_bodies_read_for_classification_draw_on_the_memory_budget() {
    let up = upstream().await;
    // 64 KiB of memory, 48 KiB of it one client's share.
    let gw = Arc::new(Gateway::start(&config(&up, 0.75)).await);
    // One client's slow JSON body (40 KiB declared, half of it sent) holds memory while
    // classification reads it, before any buffering.
    let go = Arc::new(Notify::new());
    let slow = held_json(&gw, Some(FULL), UPLOAD, 40 << 10, go.clone());
    wait_for_buffered(&gw, "memory", f64::from((40 << 10) - 1)).await;

    // Another client's 30 KiB JSON fits its share but not what is left: 503 with Retry-After.
    let reply = post_json(&gw, Some(OTHER), UPLOAD, 30 << 10).await;
    assert_over_budget(&reply);
    // A small one still passes.
    let reply = post_json(&gw, Some(OTHER), UPLOAD, 4 << 10).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["message"]["size"], 4 << 10);
    // Only the small one reached the site: nothing of the refused one, nor of the slow one.
    assert_eq!(up.count(), 1);
    assert_eq!(up.received()[0].body_len, 4 << 10);
    assert_eq!(refusals(&gw.metrics().await, "request", "budget"), 1.0);

    // Once the slow one is through, its bytes are let go.
    go.notify_one();
    let reply = slow.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["message"]["size"], 40 << 10);
    assert_nothing_buffered(&gw).await;
    let reply = post_json(&gw, Some(OTHER), UPLOAD, 30 << 10).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_nothing_buffered(&gw).await;
}

const GET_TOKEN: &str = "/api/method/frappe.integrations.oauth2.get_token";

#[tokio::test]
async fn public_json_bodies_share_the_anonymous_part_of_the_memory_budget() {
    let up = upstream().await;
    let yaml = config(&up, 0.5).replace(
        "    timeouts: { connect: 1s, request: 3s }\n",
        "    timeouts: { connect: 1s, request: 3s }\n    public:\n      methods: \
         [frappe.integrations.oauth2.get_token]\n      burst: 30\n",
    );
    let gw = Arc::new(Gateway::start(&yaml).await);
    // A keyless body larger than the anonymous share (32 KiB) could never be held: 413 from
    // its head alone.
    let head = format!(
        "POST {GET_TOKEN} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        40 << 10
    );
    let answer = answer_to_head(&gw, &head).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Declaring is not holding: keyless heads that declare the whole anonymous share and send
    // nothing hold nothing, and deny no one (the attack: a few stalled heads shutting every
    // public route).
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let declared = format!(
        "POST {GET_TOKEN} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        30 << 10
    );
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream.write_all(declared.as_bytes()).await.unwrap();
        stalled.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    wait_for_buffered(&gw, "memory", 0.0).await;
    let reply = post_json(&gw, None, GET_TOKEN, 10 << 10).await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "the site's own answer: {}",
        reply.text()
    );
    assert_eq!(up.count(), 1);
    drop(stalled);
    up.clear();

    // A slow keyless body holds 30 KiB of the anonymous share...
    let go = Arc::new(Notify::new());
    let slow = held_json(&gw, None, GET_TOKEN, 30 << 10, go.clone());
    wait_for_buffered(&gw, "memory", f64::from((30 << 10) - 1)).await;
    // ...so another keyless one waits, while a client's own share is untouched.
    let reply = post_json(&gw, None, GET_TOKEN, 10 << 10).await;
    assert_over_budget(&reply);
    let reply = post_json(&gw, Some(FULL), UPLOAD, 10 << 10).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(up.count(), 1);
    let metrics = gw.metrics().await;
    assert_eq!(refusals(&metrics, "request", "client_share"), 1.0);
    assert_eq!(refusals(&metrics, "request", "too_large"), 1.0);

    // The slow one reaches the site whole (which refuses its grant), and lets go of its bytes.
    go.notify_one();
    let reply = slow.await.unwrap();
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_eq!(up.count(), 2);
    assert_eq!(up.received()[1].body_len, 30 << 10);
    assert_nothing_buffered(&gw).await;
}
