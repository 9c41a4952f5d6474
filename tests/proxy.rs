//! The core request path over real sockets: credential swap, header hygiene, envelopes,
//! routing, streaming, limits, upstream failures, request ids, HTTP/2 and metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use sha2::{Digest, Sha256};
use support::*;

fn exc_of(reply: &Reply) -> Vec<String> {
    let v = reply.json();
    serde_json::from_str(v["exc"].as_str().expect("exc is a string"))
        .expect("exc holds a JSON list")
}

#[tokio::test]
async fn upstream_sees_the_service_token_and_never_the_clients() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;

    let reply = get(&gw.url("/api/method/frappe.auth.get_logged_user"), FULL).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["message"], "sync@example.com");
    // Frappe's Guest cookies never reach the client.
    assert!(reply.headers.get("set-cookie").is_none());

    let seen = up.received();
    assert_eq!(seen.len(), 1);
    let headers = &seen[0].headers;
    assert_eq!(
        headers["authorization"],
        format!("token {SYNC_KEY}:{SYNC_SECRET}").as_str()
    );
    assert_eq!(headers["x-frappe-site-name"], SITE);
    assert_eq!(headers["host"], SITE);
    for value in headers.values() {
        assert!(
            !value.to_str().unwrap_or_default().contains(FULL.1),
            "client secret leaked upstream"
        );
    }
    // And no ERPNext secret reaches the client.
    assert!(!reply.text().contains(SYNC_SECRET));
    assert!(reply
        .headers
        .values()
        .all(|v| !v.to_str().unwrap_or_default().contains(SYNC_SECRET)));
}

#[tokio::test]
async fn basic_and_bearer_credentials_work_like_token() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", FULL.0, FULL.1))
    );
    let bearer = format!("Bearer {}:{}", FULL.0, FULL.1);
    for auth in [basic, bearer] {
        let reply = send(
            Method::GET,
            &gw.url("/api/method/frappe.auth.get_logged_user"),
            &[("authorization", &auth)],
            Bytes::new(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{auth}");
        assert_eq!(reply.json()["message"], "sync@example.com");
    }
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn bad_credentials_get_401_in_the_frappe_envelope_and_reach_nothing() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let wrong = format!("token {}:nope", FULL.0);
    let unknown = "token ek_nobody:whatever".to_owned();
    let cases: [&[(&str, &str)]; 4] = [
        &[],
        &[("authorization", &wrong)],
        &[("authorization", &unknown)],
        &[("authorization", "token")],
    ];
    for headers in cases {
        let reply = send(
            Method::GET,
            &gw.url("/api/resource/ToDo"),
            headers,
            Bytes::new(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(reply.json()["exc_type"], "AuthenticationError");
        assert_eq!(
            exc_of(&reply).len(),
            1,
            "exc must be a non-empty one-line list"
        );
        assert!(reply.json()["request_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()));
        assert_eq!(reply.header("content-type"), Some("application/json"));
    }
    // The v2 API gets the v2 envelope.
    let reply = send(
        Method::GET,
        &gw.url("/api/v2/document/ToDo"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        reply.json()["errors"][0]["type"],
        "AuthenticationError",
        "{}",
        reply.text()
    );
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn a_key_removed_from_the_config_gets_401() {
    let up = upstream().await;
    let config = base_config(&up);
    let gw = Gateway::start(&config).await;
    assert_eq!(
        get(&gw.url("/api/resource/ToDo"), TODO_READER).await.status,
        StatusCode::OK
    );

    let start = config.find("  todo-reader:").unwrap();
    let without_reader = &config[..start];
    let gw = Gateway::start(without_reader).await;
    let reply = get(&gw.url("/api/resource/ToDo"), TODO_READER).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        get(&gw.url("/api/resource/ToDo"), FULL).await.status,
        StatusCode::OK
    );
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn failed_attempts_are_limited_per_address_and_per_key_id_never_locking_out_valid_keys() {
    let up = upstream().await;
    let config = base_config(&up).replace(
        "limits:",
        "auth_failures: { per_minute: 1, burst: 3 }\nlimits:",
    );
    let gw = Gateway::start(&config).await;
    let url = gw.url("/api/resource/ToDo");
    // Someone behind the same NAT sprays unknown keys until their address is throttled.
    for i in 0..3 {
        let guess = format!("token ek_guess{i}:nope");
        assert_eq!(
            send_from("127.0.0.1", &url, &guess).await,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        send_from("127.0.0.1", &url, "token ek_guess9:nope").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // The integrations behind that address keep working.
    assert_eq!(
        send_from("127.0.0.1", &url, &token(FULL)).await,
        StatusCode::OK
    );
    assert_eq!(
        send_from("127.0.0.1", &url, &token(TODO_READER)).await,
        StatusCode::OK
    );
    assert_eq!(up.count(), 2);

    // Brute force on one key id is throttled on that key id, from any address.
    let wrong = format!("token {}:guess", FULL.0);
    for _ in 0..3 {
        assert_eq!(
            send_from("127.0.0.2", &url, &wrong).await,
            StatusCode::UNAUTHORIZED
        );
    }
    let reply = send(
        Method::GET,
        &url,
        &[("authorization", &wrong)],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.json()["exc_type"], "TooManyRequestsError");
    let retry_after: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    assert_eq!(
        send_from("127.0.0.3", &url, &wrong).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Other keys from the guesser's address are not affected.
    assert_eq!(
        send_from("127.0.0.2", &url, &token(TODO_READER)).await,
        StatusCode::OK
    );
    assert_eq!(up.count(), 3);
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "erpgate_auth_failures_total",
            &[("reason", "wrong_secret")]
        ),
        3.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "erpgate_auth_failures_total",
            &[("reason", "throttled")]
        ),
        3.0
    );
}

#[tokio::test]
async fn wrong_secrets_sent_for_a_key_id_never_lock_its_owner_out() {
    let up = upstream().await;
    let config = base_config(&up).replace(
        "limits:",
        "auth_failures: { per_minute: 1, burst: 3 }\nlimits:",
    );
    let gw = Gateway::start(&config).await;
    let url = gw.url("/api/method/frappe.auth.get_logged_user");
    // Key ids are not secret: anyone can send wrong secrets for one, far past its quota.
    let wrong = format!("token {}:not-the-secret", FULL.0);
    let mut refused = Vec::new();
    for _ in 0..15 {
        refused.push(send_from("127.0.0.4", &url, &wrong).await);
    }
    assert_eq!(refused[..3], [StatusCode::UNAUTHORIZED; 3]);
    assert_eq!(refused[3..], [StatusCode::TOO_MANY_REQUESTS; 12]);
    // A failing attempt from elsewhere is slowed by the key id's quota...
    assert_eq!(
        send_from("127.0.0.5", &url, &wrong).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // ...but the key's owner, from another address and from the guesser's own, is served.
    assert_eq!(
        send_from("127.0.0.5", &url, &token(FULL)).await,
        StatusCode::OK
    );
    assert_eq!(
        send_from("127.0.0.4", &url, &token(FULL)).await,
        StatusCode::OK
    );
    // Exactly those two reached Frappe, as the client's service account.
    let seen = up.received();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        assert_eq!(
            request.path_and_query,
            "/api/method/frappe.auth.get_logged_user"
        );
        assert_eq!(
            request.headers["authorization"],
            format!("token {SYNC_KEY}:{SYNC_SECRET}").as_str()
        );
    }
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "erpgate_auth_failures_total",
            &[("reason", "throttled")]
        ),
        13.0
    );
}

/// A GET from a chosen loopback source address.
async fn send_from(source: &str, url: &str, auth: &str) -> StatusCode {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_local_address(Some(source.parse().unwrap()));
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector);
    let request = http::Request::get(url)
        .header("authorization", auth)
        .body(http_body_util::Empty::new())
        .unwrap();
    client.request(request).await.unwrap().status()
}

#[tokio::test]
async fn client_identity_headers_and_sessions_never_reach_frappe() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let auth = token(FULL);
    let headers = [
        ("authorization", auth.as_str()),
        ("cookie", "sid=stolen-session; system_user=yes"),
        ("frappe-authorization-source", "User"),
        ("x-use-x-accel-redirect", "1"),
        ("x-frappe-site-name", "other.localhost"),
        ("connection", "x-hop"),
        ("x-hop", "1"),
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    let reply = send(
        Method::POST,
        &gw.url("/api/method/test.echo?sid=stolen&x=1"),
        &headers,
        "a=1&sid=stolen2&b=2",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);

    let seen = &up.received()[0];
    for gone in [
        "cookie",
        "frappe-authorization-source",
        "x-use-x-accel-redirect",
        "x-hop",
    ] {
        assert!(
            seen.headers.get(gone).is_none(),
            "{gone} reached the upstream"
        );
    }
    assert_eq!(seen.headers["x-frappe-site-name"], SITE);
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.path_and_query, "/api/method/test.echo?x=1");
    assert_eq!(seen.body.as_deref(), Some(&b"a=1&b=2"[..]));

    // A JSON body loses its `sid` key and nothing else.
    up.clear();
    let reply = send_json(
        Method::POST,
        &gw.url("/api/method/test.echo"),
        FULL,
        r#"{"sid":"x","a":1.50}"#,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        up.received()[0].body.as_deref(),
        Some(&br#"{"a":1.50}"#[..])
    );
}

#[tokio::test]
async fn forwarded_for_is_appended_only_behind_a_trusted_proxy() {
    let up = upstream().await;
    let config = base_config(&up).replace("limits:", "trusted_proxies: [127.0.0.1]\nlimits:");
    let gw = Gateway::start(&config).await;
    let auth = token(FULL);
    let headers = [
        ("authorization", auth.as_str()),
        ("x-forwarded-for", "203.0.113.5"),
        ("x-forwarded-proto", "https"),
    ];
    send(
        Method::GET,
        &gw.url("/api/method/frappe.auth.get_logged_user"),
        &headers,
        Bytes::new(),
    )
    .await;
    let seen = &up.received()[0];
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.5, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn tracebacks_are_cut_to_one_line_unless_the_site_exposes_them() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let reply = get(&gw.url("/api/method/test.traceback"), FULL).await;
    assert_eq!(reply.status, StatusCode::EXPECTATION_FAILED);
    assert_eq!(reply.json()["exc_type"], "ValidationError");
    let exc = exc_of(&reply);
    assert_eq!(
        exc,
        vec![r#"frappe.exceptions.ValidationError: Status cannot be "BogusStatus""#]
    );
    assert!(!reply.text().contains("Traceback") && !reply.text().contains("apps/frappe"));
    assert!(reply.json()["_server_messages"]
        .as_str()
        .unwrap()
        .contains("BogusStatus"));

    let exposed = base_config(&up).replace(
        "    timeouts:",
        "    expose_tracebacks: true\n    timeouts:",
    );
    let gw = Gateway::start(&exposed).await;
    let reply = get(&gw.url("/api/method/test.traceback"), FULL).await;
    assert!(reply.text().contains("Traceback (most recent call last)"));
}

async fn two_site_config() -> (FrappeUpstream, FrappeUpstream, String) {
    let erp = upstream().await;
    let staging = FrappeUpstream::start(
        "staging.localhost",
        &[("stg-key", "stg-secret", "stg@example.com")],
    )
    .await;
    let config = base_config(&erp)
        .replace(
            "clients:",
            &format!(
                "  staging:\n    backends: [{}]\n    site_name: staging.localhost\n    service_accounts:\n      sync: {{ api_key: stg-key, api_secret: stg-secret }}\nroutes:\n  - {{ host: staging.gw.example.com, site: staging }}\n  - {{ path_prefix: /staging, strip_prefix: true, site: staging }}\nclients:",
                staging.url()
            ),
        )
        .replace("    service_account: sync\n", "    service_account: sync\n    extra_sites: { staging: sync }\n");
    (erp, staging, config)
}

#[tokio::test]
async fn routes_by_host_and_by_prefix_with_strip() {
    let (erp, staging, config) = two_site_config().await;
    let gw = Gateway::start(&config).await;
    let auth = token(FULL);

    // By Host header (port ignored, case-insensitive).
    let reply = send(
        Method::GET,
        &gw.url("/api/method/frappe.auth.get_logged_user"),
        &[
            ("authorization", &auth),
            ("host", "Staging.GW.example.com:8080"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.json()["message"], "stg@example.com");
    // By prefix, stripped on whole decoded segments.
    let reply = get(
        &gw.url("/%73taging/api/method/frappe.auth.get_logged_user"),
        FULL,
    )
    .await;
    assert_eq!(reply.json()["message"], "stg@example.com");
    let seen = staging.received();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[1].path_and_query,
        "/api/method/frappe.auth.get_logged_user"
    );
    assert!(seen
        .iter()
        .all(|r| r.headers["authorization"] == "token stg-key:stg-secret"));
    assert!(seen
        .iter()
        .all(|r| r.headers["x-frappe-site-name"] == "staging.localhost"));

    // Unmatched: the client's own site.
    let reply = get(
        &gw.url("/stagingx/api/method/frappe.auth.get_logged_user"),
        FULL,
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND); // erp has no such path; it got there
    assert_eq!(erp.count(), 1);

    // A client without an account on the routed site is refused, and nothing is sent.
    let reply = get(&gw.url("/staging/api/resource/ToDo"), TODO_READER).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.json()["exc_type"], "PermissionError");
    assert_eq!(staging.count(), 2);
}

#[tokio::test]
async fn a_50_mb_upload_streams_through_intact_on_a_streaming_route() {
    fifty_mb_upload(true).await;
}

#[tokio::test]
async fn a_50_mb_upload_is_buffered_whole_then_sent_intact_with_its_length() {
    fifty_mb_upload(false).await;
}

/// 50 MiB to `upload_file`. Streaming: after 5 MiB the client waits until the upstream has
/// received data (a gateway holding the body whole would never forward anything before the
/// end, and this would time out). Buffered: half-way through, the upstream has seen nothing.
async fn fifty_mb_upload(streaming: bool) {
    let up = upstream().await;
    let route = if streaming {
        "routes:\n  - { path_prefix: /api/method/upload_file, site: erp, streaming: true }\n"
    } else {
        ""
    };
    // 50 MB through a shared, busy machine: more time than the suite's usual 3 s.
    let config = base_config(&up).replace("request: 3s", "request: 30s") + route;
    let gw = Gateway::start(&config).await;
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 50;
    let chunk = |i: usize| Bytes::from(vec![(i % 251) as u8; CHUNK]);
    let mut expected = Sha256::new();
    for i in 0..CHUNKS {
        expected.update(chunk(i));
    }
    let expected = hex::encode(expected.finalize());

    let progress = up.clone();
    let stream = futures_util::stream::unfold(0usize, move |i| {
        let progress = progress.clone();
        async move {
            if i == CHUNKS {
                return None;
            }
            if streaming && i == 5 {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                while progress.body_progress() == 0 {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "upstream got nothing before the body ended"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            if !streaming && i == 25 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                assert_eq!(progress.body_progress(), 0, "the body was not held back");
            }
            Some((Ok::<_, Infallible>(http_body::Frame::data(chunk(i))), i + 1))
        }
    });
    let auth = token(FULL);
    let reply = send_body(
        Method::POST,
        &gw.url("/api/method/upload_file"),
        &[
            ("authorization", &auth),
            ("content-type", "application/octet-stream"),
        ],
        StreamBody::new(stream).boxed(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["message"]["size"], CHUNK * CHUNKS);
    let seen = &up.received()[0];
    assert_eq!(seen.body_len, CHUNK * CHUNKS);
    assert_eq!(seen.body_sha256, expected);
    if !streaming {
        assert_eq!(
            seen.headers["content-length"],
            (CHUNK * CHUNKS).to_string().as_str()
        );
    }
}

#[tokio::test]
async fn oversized_bodies_get_413_and_reach_nothing() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let auth = token(FULL);
    // A client that reads the answer while it is still writing (as curl does): a gateway that
    // refuses a body part-way closes the connection, and a client blocked in a write could
    // see the close before the answer.
    let exchange = |head: String, body: Vec<u8>| {
        let addr = gw.running.listen_addr;
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut read, mut write) = socket.into_split();
            let writer = tokio::spawn(async move {
                let _ = write.write_all(head.as_bytes()).await;
                let _ = write.write_all(&body).await;
                write
            });
            let mut answer = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(20), read.read_to_end(&mut answer)).await;
            writer.abort();
            String::from_utf8_lossy(&answer).into_owned()
        }
    };
    let head = |path: &str, content_type: &str, framing: String| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: {auth}\r\nContent-Type: {content_type}\r\n{framing}\r\n"
        )
    };

    // Declared too large: refused before the body is read (only 4 KiB of it is ever sent).
    let answer = exchange(
        head(
            "/api/method/upload_file",
            "application/octet-stream",
            format!("Content-Length: {}\r\n", 65u64 << 20),
        ),
        vec![0u8; 4096],
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("RequestEntityTooLarge"), "{answer}");

    // Chunked, no length: cut off at the limit while streaming.
    let mut chunked = Vec::new();
    for _ in 0..65 {
        chunked.extend_from_slice(format!("{:x}\r\n", 1 << 20).as_bytes());
        chunked.extend_from_slice(&vec![1u8; 1 << 20]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let answer = exchange(
        head(
            "/api/method/upload_file",
            "application/octet-stream",
            "Transfer-Encoding: chunked\r\n".into(),
        ),
        chunked,
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "{}",
        &answer[..answer.len().min(300)]
    );

    // A JSON body the gateway must read is bounded more tightly.
    let big_json = format!(r#"{{"description":"{}"}}"#, "x".repeat(2 << 20));
    let answer = exchange(
        head(
            "/api/resource/ToDo",
            "application/json",
            format!("Content-Length: {}\r\n", big_json.len()),
        ),
        big_json.into_bytes(),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "{}",
        &answer[..answer.len().min(300)]
    );
    assert_eq!(
        up.received().iter().filter(|r| r.body_len > 0).count(),
        0,
        "no oversized body completed upstream"
    );
}

#[tokio::test]
async fn malformed_requests_get_400() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let reply = send_json(
        Method::POST,
        &gw.url("/api/resource/ToDo"),
        FULL,
        "{not json",
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["exc_type"], "ValidationError");
    let reply = get(&gw.url("/api/resource/ToDo/%FF"), FULL).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(up.count(), 0);
}

/// How single failures are reported, whatever the protocol `config` speaks to `up`: nothing
/// listening is 502, a silent site 504, a dropped exchange 502 (in the v2 envelope on the v2
/// API). Returns the gateway with retries and the breaker off, `up` left dropping connections;
/// its count is the caller's to check.
async fn single_failures_are_502_or_504(up: &FrappeUpstream, config: &str) -> Gateway {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = Gateway::start(&config.replace(&up.url(), &format!("http://{dead}"))).await;
    let reply = get(&gw.url("/api/resource/ToDo"), FULL).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.json()["exc_type"], "BadGateway");
    assert_eq!(exc_of(&reply).len(), 1);

    // Retries and the breaker are off: this is about how single failures are reported.
    let config = config.replace(
        "timeouts: { connect: 1s, request: 3s }",
        "timeouts: { connect: 1s, request: 300ms }\n    retry: { max_retries: 0 }\n    breaker: { enabled: false }",
    );
    let gw = Gateway::start(&config).await;
    up.set_behaviour(Behaviour::Stall);
    let reply = get(&gw.url("/api/resource/ToDo"), FULL).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.json()["exc_type"], "UpstreamTimeout");

    up.set_behaviour(Behaviour::Drop);
    let reply = get(&gw.url("/api/resource/ToDo"), FULL).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    // The v2 API gets the v2 envelope for gateway errors too.
    let reply = get(&gw.url("/api/v2/document/ToDo"), FULL).await;
    assert_eq!(reply.json()["errors"][0]["type"], "BadGateway");
    gw
}

#[tokio::test]
async fn an_unreachable_upstream_is_502_and_a_silent_one_504() {
    let up = upstream().await;
    single_failures_are_502_or_504(&up, &base_config(&up)).await;
    assert_eq!(up.count(), 3);
}

#[tokio::test]
async fn round_robin_skips_a_backend_that_refuses_connections() {
    let up = upstream().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = base_config(&up).replace(
        &format!("[{}]", up.url()),
        &format!("[http://{dead}, {}]", up.url()),
    );
    let gw = Gateway::start(&config).await;
    for _ in 0..6 {
        assert_eq!(
            get(&gw.url("/api/resource/ToDo"), FULL).await.status,
            StatusCode::OK
        );
    }
    // A buffered POST body is replayable too: a refused connection proves it was never sent.
    let reply = send_json(
        Method::POST,
        &gw.url("/api/resource/ToDo"),
        FULL,
        r#"{"description":"x"}"#,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(up.count(), 7);
}

#[tokio::test]
async fn request_ids_are_kept_when_sane_and_made_otherwise() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let auth = token(FULL);
    let url = gw.url("/api/method/frappe.auth.get_logged_user");
    let reply = send(
        Method::GET,
        &url,
        &[("authorization", &auth), ("x-request-id", "abc-123.x")],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.header("x-request-id"), Some("abc-123.x"));
    assert_eq!(up.received()[0].headers["x-request-id"], "abc-123.x");

    let reply = send(
        Method::GET,
        &url,
        &[("authorization", &auth), ("x-request-id", "bad id\"")],
        Bytes::new(),
    )
    .await;
    let made = reply.header("x-request-id").unwrap();
    assert_eq!(made.len(), 32);
    assert!(made.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(up.received()[1].headers["x-request-id"], made);

    // Errors carry it in the body too.
    let reply = send(
        Method::GET,
        &url,
        &[("x-request-id", "rid-401")],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.json()["request_id"], "rid-401");
    assert_eq!(reply.header("x-request-id"), Some("rid-401"));
}

#[tokio::test]
async fn http2_with_prior_knowledge_works() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let request = http::Request::get(gw.url("/api/method/frappe.auth.get_logged_user"))
        .header("authorization", token(FULL))
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["message"],
        "sync@example.com"
    );
    // HTTP/2 carries the host as :authority; upstream still gets the site's Host.
    assert_eq!(up.received()[0].headers["host"], SITE);
}

#[tokio::test]
async fn metrics_count_what_was_sent_and_health_endpoints_answer() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    for _ in 0..3 {
        get(&gw.url("/api/method/frappe.auth.get_logged_user"), FULL).await;
    }
    get(&gw.url("/api/resource/ToDo"), TODO_READER).await;
    send(
        Method::POST,
        &gw.url("/api/resource/ToDo"),
        &[("authorization", &token(TODO_READER))],
        Bytes::new(),
    )
    .await;
    send(
        Method::GET,
        &gw.url("/api/resource/ToDo"),
        &[],
        Bytes::new(),
    )
    .await;

    let m = gw.metrics().await;
    let count = |labels: &[(&str, &str)]| metric_value(&m, "erpgate_requests_total", labels);
    assert_eq!(
        count(&[
            ("site", "erp"),
            ("client", "full"),
            ("kind", "method"),
            ("code", "200")
        ]),
        3.0
    );
    assert_eq!(
        count(&[
            ("client", "todo-reader"),
            ("kind", "resource_read"),
            ("code", "200")
        ]),
        1.0
    );
    assert_eq!(
        count(&[
            ("client", "todo-reader"),
            ("kind", "resource_write"),
            ("code", "403")
        ]),
        1.0
    );
    assert_eq!(count(&[("client", "none"), ("code", "401")]), 1.0);
    assert_eq!(metric_value(&m, "erpgate_inflight_requests", &[]), 0.0);
    assert_eq!(
        metric_value(
            &m,
            "erpgate_upstream_duration_seconds_count",
            &[("site", "erp")]
        ),
        4.0
    );
    assert!(
        metric_value(
            &m,
            "erpgate_request_duration_seconds_count",
            &[("site", "erp")]
        ) >= 5.0
    );
    assert!(m.contains("process_resident_memory_bytes"));
    // No label value comes from request text.
    assert!(!m.contains("ToDo") && !m.contains("get_logged_user"));

    let health = send(
        Method::GET,
        &format!("{}/healthz", gw.admin),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(health.status, StatusCode::OK);
    let ready = send(
        Method::GET,
        &format!("{}/readyz", gw.admin),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(ready.status, StatusCode::OK);
    gw.running.begin_shutdown();
    let ready = send(
        Method::GET,
        &format!("{}/readyz", gw.admin),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
}

/// A test CA and a server certificate for 127.0.0.1 signed by it: (CA PEM, server config).
fn test_pki() -> (String, std::sync::Arc<rustls::ServerConfig>) {
    let (ca, cert, key) = test_certificates();
    let certs = rustls_pemfile::certs(&mut cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut key.as_bytes())
        .unwrap()
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    (ca, std::sync::Arc::new(config))
}

#[tokio::test]
async fn https_upstreams_are_verified_with_the_sites_ca_file() {
    let (ca_pem, tls) = test_pki();
    let up =
        FrappeUpstream::start_tls(SITE, &[(SYNC_KEY, SYNC_SECRET, "sync@example.com")], tls).await;
    let ca_file = std::env::temp_dir().join(format!("erpgate-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_file, ca_pem).unwrap();
    let https = format!("https://127.0.0.1:{}", up.addr.port());
    let config = base_config(&up).replace(&up.url(), &https);

    // Without the CA the certificate is not trusted: nothing is sent.
    let gw = Gateway::start(&config).await;
    let reply = get(&gw.url("/api/method/frappe.auth.get_logged_user"), FULL).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(up.count(), 0);

    let trusting = config.replace(
        "    timeouts:",
        &format!("    ca_file: {}\n    timeouts:", ca_file.display()),
    );
    let gw = Gateway::start(&trusting).await;
    let reply = get(&gw.url("/api/method/frappe.auth.get_logged_user"), FULL).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["message"], "sync@example.com");
    assert_eq!(
        up.received()[0].headers["authorization"],
        format!("token {SYNC_KEY}:{SYNC_SECRET}").as_str()
    );
}

#[tokio::test]
async fn one_connection_carries_many_requests() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let stream = tokio::net::TcpStream::connect(gw.running.listen_addr)
        .await
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    for _ in 0..3 {
        let request = http::Request::get("/api/method/frappe.auth.get_logged_user")
            .header("host", "gateway")
            .header("authorization", token(FULL))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.into_body().collect().await.unwrap();
    }
    assert_eq!(up.count(), 3);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream().await;
    let config = base_config(&up).replace("limits: {", "limits: { header_read_timeout: 300ms,");
    let gw = Gateway::start(&config).await;
    let mut stream = tokio::net::TcpStream::connect(gw.running.listen_addr)
        .await
        .unwrap();
    stream
        .write_all(b"GET /api/resource/ToDo HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    // The gateway closes the connection (with or without a 408); the bound only stops a hang.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "connection still open: slowloris guard missing"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(buf.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(up.count(), 0);
}

/// The site's connections are kept: sequential requests, each on a new client connection, reach
/// the site over one connection (one worker, so one worker's connections).
#[tokio::test]
async fn upstream_connections_are_kept_and_reused() {
    let up = upstream().await;
    let gw = Gateway::start(&format!("workers: 1\n{}", base_config(&up))).await;
    for _ in 0..20 {
        let reply = get(&gw.url("/api/resource/ToDo"), FULL).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(up.count(), 20);
    assert_eq!(up.connections(), 1);
}

/// `base_config` on one worker, the site speaking HTTP/2 to its backends.
fn http2_config(up: &FrappeUpstream) -> String {
    format!("workers: 1\n{}", base_config(up)).replace(
        "    timeouts:",
        "    upstream_protocol: http2\n    timeouts:",
    )
}

/// The sync account's token, as the site must receive it.
fn sync_token() -> String {
    format!("token {SYNC_KEY}:{SYNC_SECRET}")
}

/// A site with `upstream_protocol: http2` reaches an h2c backend over one connection per worker:
/// every request goes out as HTTP/2, signed, with the site's host as `:authority` (werkzeug's
/// `Host` over HTTP/2) and no `Host` header, bodies intact.
#[tokio::test]
async fn an_http2_site_sends_every_request_over_one_h2c_connection() {
    let up = FrappeUpstream::start_h2c(SITE, &[(SYNC_KEY, SYNC_SECRET, "sync@example.com")]).await;
    let gw = Gateway::start(&http2_config(&up)).await;
    for _ in 0..20 {
        let reply = get(&gw.url("/api/method/frappe.auth.get_logged_user"), FULL).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["message"], "sync@example.com");
    }
    let reply = send_json(
        Method::POST,
        &gw.url("/api/resource/ToDo"),
        FULL,
        r#"{"description":"over h2"}"#,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["data"]["description"], "over h2");

    let seen = up.received();
    assert_eq!(seen.len(), 21);
    for r in &seen {
        assert_eq!(r.version, http::Version::HTTP_2);
        assert_eq!(r.authority.as_deref(), Some(SITE));
        assert!(r.headers.get("host").is_none(), "{:?}", r.headers);
        assert_eq!(r.headers["authorization"], sync_token().as_str());
        assert_eq!(r.headers["x-frappe-site-name"], SITE);
    }
    assert_eq!(
        seen[0].path_and_query,
        "/api/method/frappe.auth.get_logged_user"
    );
    assert_eq!(up.connections(), 1);
}

/// Requests in flight at once on one worker share its one HTTP/2 connection, the first of them
/// included: they wait for one connect instead of each opening its own. Each takes 300 ms
/// upstream and the attempt timeout is 3 s, so they cannot have gone one after another.
#[tokio::test]
async fn concurrent_requests_share_one_http2_connection() {
    let up = FrappeUpstream::start_h2c(SITE, &[(SYNC_KEY, SYNC_SECRET, "sync@example.com")]).await;
    let gw = Gateway::start(&http2_config(&up)).await;
    let url = gw.url("/api/method/test.slow?ms=300");
    let replies = futures_util::future::join_all((0..50).map(|_| get(&url, FULL))).await;
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["message"], "slow done");
    }
    assert_eq!(up.count(), 50);
    assert!(up
        .received()
        .iter()
        .all(|r| r.version == http::Version::HTTP_2));
    assert_eq!(up.connections(), 1);
}

/// Failures over HTTP/2 are reported as over HTTP/1.1: nothing listening is 502, a silent
/// backend 504, a stream the backend broke 502. A reset stream costs no connection.
#[tokio::test]
async fn an_http2_site_reports_an_unreachable_upstream_as_502_and_a_silent_one_as_504() {
    let up = FrappeUpstream::start_h2c(SITE, &[(SYNC_KEY, SYNC_SECRET, "sync@example.com")]).await;
    let gw = single_failures_are_502_or_504(&up, &http2_config(&up)).await;

    up.set_behaviour(Behaviour::Normal);
    let reply = get(&gw.url("/api/resource/ToDo"), FULL).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(up.count(), 4);
    assert_eq!(up.connections(), 1);
}

/// Round-robin and its cool-down hold over HTTP/2: a backend refusing connections is skipped,
/// and a request that met it moves on to the next backend, its buffered body too.
#[tokio::test]
async fn an_http2_site_skips_a_backend_that_refuses_connections() {
    let up = FrappeUpstream::start_h2c(SITE, &[(SYNC_KEY, SYNC_SECRET, "sync@example.com")]).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = http2_config(&up).replace(
        &format!("[{}]", up.url()),
        &format!("[http://{dead}, {}]", up.url()),
    );
    let gw = Gateway::start(&config).await;
    for _ in 0..6 {
        let reply = get(&gw.url("/api/resource/ToDo"), FULL).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let reply = send_json(
        Method::POST,
        &gw.url("/api/resource/ToDo"),
        FULL,
        r#"{"description":"x"}"#,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(up.count(), 7);
    assert_eq!(up.connections(), 1);
}

/// A backend that closes its HTTP/2 connection (a GOAWAY, as nginx says after
/// `keepalive_timeout`): the next request connects anew and nothing fails or is sent twice.
#[tokio::test]
async fn an_http2_connection_the_site_closed_is_replaced_and_no_request_fails() {
    let up = FrappeUpstream::start_h2c(SITE, &[(SYNC_KEY, SYNC_SECRET, "sync@example.com")]).await;
    up.set_idle_close(Duration::from_millis(200));
    let gw = Gateway::start(&http2_config(&up)).await;
    for _ in 0..3 {
        let reply = get(&gw.url("/api/resource/ToDo"), FULL).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert_eq!(up.count(), 3);
    assert_eq!(up.connections(), 3);
}

/// A body streamed to an HTTP/2 site and cut off at the size limit is the client's 413, not
/// the site's 502: hyper reports the failing body only as a reset stream.
#[tokio::test]
async fn a_streamed_body_over_the_limit_is_413_on_an_http2_site() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = FrappeUpstream::start_h2c(SITE, &[(SYNC_KEY, SYNC_SECRET, "sync@example.com")]).await;
    let config = http2_config(&up).replace("max_body_bytes: 64MiB", "max_body_bytes: 2MiB")
        + "routes:\n  - { path_prefix: /api/method/upload_file, site: erp, streaming: true }\n";
    let gw = Gateway::start(&config).await;
    let mut body = format!(
        "POST /api/method/upload_file HTTP/1.1\r\nHost: gw\r\nAuthorization: {}\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        token(FULL)
    )
    .into_bytes();
    for _ in 0..4 {
        body.extend_from_slice(format!("{:x}\r\n", 1 << 20).as_bytes());
        body.extend_from_slice(&vec![1u8; 1 << 20]);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    // Read the answer while still writing, as curl does: the gateway refuses part-way.
    let socket = tokio::net::TcpStream::connect(gw.running.listen_addr)
        .await
        .unwrap();
    let (mut read, mut write) = socket.into_split();
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&body).await;
        write
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), read.read_to_end(&mut answer)).await;
    writer.abort();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "{}",
        &answer[..answer.len().min(300)]
    );
    assert!(answer.contains("RequestEntityTooLarge"), "{answer}");
    // The body did start upstream, over HTTP/2: this is the streamed path.
    assert!(up.body_progress() > 0);
}

/// An `https://` HTTP/2 site agrees on h2 by ALPN, the certificate checked with the site's
/// `ca_file`; a backend whose ALPN does not pick h2 is never sent HTTP/2 (the connect fails).
#[tokio::test]
async fn an_https_http2_site_needs_its_backend_to_pick_h2_by_alpn() {
    let (ca_pem, tls) = test_pki();
    let ca_file = scratch_file("http2-ca.pem", &ca_pem);
    let mut h2 = (*tls).clone();
    h2.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tokens = [(SYNC_KEY, SYNC_SECRET, "sync@example.com")];
    let up = FrappeUpstream::start_tls(SITE, &tokens, std::sync::Arc::new(h2)).await;
    let https_config = |up: &FrappeUpstream| {
        http2_config(up)
            .replace(&up.url(), &format!("https://127.0.0.1:{}", up.addr.port()))
            .replace(
                "    timeouts:",
                &format!("    ca_file: {}\n    timeouts:", ca_file.display()),
            )
    };
    let gw = Gateway::start(&https_config(&up)).await;
    for _ in 0..5 {
        let reply = get(&gw.url("/api/method/frappe.auth.get_logged_user"), FULL).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["message"], "sync@example.com");
    }
    for r in up.received() {
        assert_eq!(r.version, http::Version::HTTP_2);
        assert_eq!(r.authority.as_deref(), Some(SITE));
        assert_eq!(r.headers["authorization"], sync_token().as_str());
    }
    assert_eq!(up.count(), 5);
    assert_eq!(up.connections(), 1);

    // No ALPN at all on this one: it would read the HTTP/2 preface as a broken HTTP/1.1 request.
    let h1_only = FrappeUpstream::start_tls(SITE, &tokens, tls).await;
    let gw = Gateway::start(&https_config(&h1_only)).await;
    let reply = get(&gw.url("/api/method/frappe.auth.get_logged_user"), FULL).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(h1_only.count(), 0);
}

/// gunicorn closes a keep-alive connection after its `keepalive` seconds without a word: the
/// next request goes out on a new connection and nothing fails or is sent twice.
#[tokio::test]
async fn a_connection_the_site_closed_while_idle_is_replaced_and_no_request_fails() {
    let up = upstream().await;
    up.set_idle_close(Duration::from_millis(200));
    let gw = Gateway::start(&format!("workers: 1\n{}", base_config(&up))).await;
    for _ in 0..3 {
        let reply = get(&gw.url("/api/resource/ToDo"), FULL).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert_eq!(up.count(), 3);
    assert_eq!(up.connections(), 3);
}

/// A response that broke off mid-body leaves no half-read connection behind: the next request
/// gets its own answer on a new connection.
#[tokio::test]
async fn a_response_broken_mid_body_does_not_leave_its_connection_to_the_next_request() {
    let up = upstream().await;
    let gw = Gateway::start(&format!("workers: 1\n{}", base_config(&up))).await;
    up.set_behaviour(Behaviour::BreakBody);
    let broken = get(&gw.url("/api/resource/ToDo"), FULL).await;
    assert_ne!(broken.status, StatusCode::OK);
    up.set_behaviour(Behaviour::Normal);
    let reply = get(&gw.url("/api/method/frappe.auth.get_logged_user"), FULL).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json()["message"],
        "sync@example.com",
        "{}",
        reply.text()
    );
    assert_eq!(up.connections(), 2);
}

/// An answer that comes before the client's upload is done (a refusal, say) leaves that
/// connection busy sending the rest of the upload: the next request must not queue behind it.
#[tokio::test]
async fn a_request_never_waits_behind_an_upload_still_going_on_an_answered_connection() {
    let up = upstream().await;
    let config = format!(
        "workers: 1\n{}routes:\n  - {{ path_prefix: /api/method/upload_file, site: erp, streaming: true }}\n",
        base_config(&up)
    );
    let gw = Gateway::start(&config).await;
    up.set_behaviour(Behaviour::AnswerBeforeBody(417));
    let (parts, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    parts
        .send(Bytes::from_static(b"the first part"))
        .await
        .unwrap();
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        let part = rx.recv().await?;
        Some((Ok::<_, Infallible>(http_body::Frame::data(part)), rx))
    });
    let auth = token(FULL);
    let refused = send_body(
        Method::POST,
        &gw.url("/api/method/upload_file"),
        &[
            ("authorization", &auth),
            ("content-type", "application/octet-stream"),
        ],
        BodyExt::boxed(StreamBody::new(body)),
    )
    .await;
    assert_eq!(refused.status, StatusCode::EXPECTATION_FAILED);

    // The upload is still going on (its sender is open); the next request gets its answer.
    up.set_behaviour(Behaviour::Normal);
    let reply = tokio::time::timeout(
        Duration::from_secs(2),
        get(&gw.url("/api/resource/ToDo"), FULL),
    )
    .await
    .expect("the next request waited behind the upload");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(up.connections(), 2);
    drop(parts);
}

/// A route with `methods` is matched on what classification says the request runs, not on its
/// raw path: a `cmd` posted to `/` runs the method as much as its `/api/method/` path does.
#[tokio::test]
async fn a_method_route_matches_what_the_request_runs_however_it_is_called() {
    let (erp, staging, config) = two_site_config().await;
    let config = config.replace(
        "\nclients:",
        "\n  - { methods: [frappe.auth.get_logged_user], site: staging }\nclients:",
    );
    let gw = Gateway::start(&config).await;

    let reply = get(&gw.url("/api/method/frappe.auth.get_logged_user"), FULL).await;
    assert_eq!(reply.json()["message"], "stg@example.com");
    // Frappe's app.py runs a `cmd` whatever the path: the method route takes it too.
    let reply = send_json(
        Method::POST,
        &gw.url("/"),
        FULL,
        r#"{"cmd": "frappe.auth.get_logged_user"}"#,
    )
    .await;
    assert_ne!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    let to_staging: Vec<String> = staging
        .received()
        .iter()
        .map(|r| r.path_and_query.clone())
        .collect();
    assert_eq!(to_staging, ["/api/method/frappe.auth.get_logged_user", "/"]);
    // Anything else goes where host and path lead.
    let reply = get(&gw.url("/api/method/ping"), FULL).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(staging.count(), 2);
    assert_eq!(erp.count(), 1);
}
