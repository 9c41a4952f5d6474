//! Response compression over real sockets: negotiated from `Accept-Encoding` with q-values,
//! only what is worth it, never a 406 after the request ran, the site always asked for
//! identity, and cached entries served from their own encoded copies with an `ETag` per
//! encoding.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Read as _;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;

const LIST: &str = "/api/method/frappe.client.get_list?doctype=ToDo&limit_page_length=100";

fn decode(reply: &Reply) -> Vec<u8> {
    let body = &reply.body[..];
    match reply.header("content-encoding") {
        None => body.to_vec(),
        Some("gzip") => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .unwrap();
            out
        }
        Some("br") => {
            let mut out = Vec::new();
            brotli::BrotliDecompress(&mut &body[..], &mut out).unwrap();
            out
        }
        Some("zstd") => zstd::decode_all(body).unwrap(),
        Some(other) => panic!("unexpected content-encoding {other}"),
    }
}

async fn fetch(gw: &Gateway, path: &str, accept: &str, extra: &[(&str, &str)]) -> Reply {
    let auth = token(FULL);
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("accept-encoding", accept),
    ];
    headers.extend_from_slice(extra);
    send(Method::GET, &gw.url(path), &headers, Bytes::new()).await
}

#[tokio::test]
async fn responses_are_compressed_as_negotiated_and_the_site_is_asked_for_identity() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;

    let identity = fetch(&gw, LIST, "", &[]).await;
    assert_eq!(identity.status, StatusCode::OK);
    assert_eq!(identity.header("content-encoding"), None);
    let plain = identity.body.to_vec();
    assert!(plain.len() > 4000, "{}", plain.len());

    for (accept, expect) in [
        ("gzip, deflate, br, zstd", "zstd"),
        ("gzip, br", "br"),
        ("gzip", "gzip"),
        ("zstd", "zstd"),
        ("gzip;q=1.0, br;q=0.5", "gzip"),
        ("zstd;q=0, *;q=0.1", "br"),
    ] {
        let reply = fetch(&gw, LIST, accept, &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("content-encoding"), Some(expect), "{accept}");
        assert!(reply.header("vary").unwrap().contains("accept-encoding"));
        assert!(
            reply.body.len() * 4 < plain.len(),
            "{accept}: {}",
            reply.body.len()
        );
        assert_eq!(decode(&reply), plain, "{accept}");
    }
    // A HEAD answer describes the identity representation.
    let head = send(
        Method::HEAD,
        &gw.url(LIST),
        &[("authorization", &token(FULL)), ("accept-encoding", "gzip")],
        Bytes::new(),
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("content-encoding"), None);
    // Small answers go as they are.
    let ping = fetch(&gw, "/api/method/ping", "gzip", &[]).await;
    assert_eq!(ping.header("content-encoding"), None);

    // The site always got identity, whatever the client accepted.
    let received = up.received();
    assert!(received
        .iter()
        .all(|r| r.headers["accept-encoding"] == "identity"));

    // Bytes saved are counted per encoding.
    let metrics = gw.metrics().await;
    let before = metric_value(
        &metrics,
        "erpgate_compression_bytes_total",
        &[("encoding", "gzip"), ("stage", "identity")],
    );
    let after = metric_value(
        &metrics,
        "erpgate_compression_bytes_total",
        &[("encoding", "gzip"), ("stage", "encoded")],
    );
    assert_eq!(before, 2.0 * plain.len() as f64, "{metrics}");
    assert!(after > 0.0 && after * 4.0 < before, "{after} of {before}");
}

#[tokio::test]
async fn a_client_refusing_every_coding_gets_identity_not_406_after_frappe_acted() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let description = "x".repeat(3000);
    let reply = send(
        Method::POST,
        &gw.url("/api/resource/ToDo"),
        &[
            ("authorization", &token(FULL)),
            ("content-type", "application/json"),
            ("accept-encoding", "identity;q=0, deflate"),
        ],
        format!(r#"{{"description":"{description}"}}"#),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.header("content-encoding"), None);
    assert_eq!(reply.json()["data"]["description"], description.as_str());
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn a_cache_hit_is_served_from_its_encoded_copy_with_an_etag_per_encoding() {
    let up = upstream().await;
    let yaml = format!(
        "{}cache:\n  rules:\n    - {{ method: frappe.client.get_list, ttl: 60s }}\n",
        base_config(&up)
    );
    let gw = Gateway::start(&yaml).await;

    let first = fetch(&gw, LIST, "gzip", &[]).await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert_eq!(first.header("content-encoding"), Some("gzip"));
    let gzip_etag = first.header("etag").unwrap().to_owned();
    assert!(gzip_etag.ends_with("-gzip\""), "{gzip_etag}");

    let hit = fetch(&gw, LIST, "gzip", &[]).await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_eq!(hit.header("content-encoding"), Some("gzip"));
    assert_eq!(hit.header("etag"), Some(gzip_etag.as_str()));
    // The stored copy, whole: its length is known up front (a body compressed on the way out
    // is sent chunked).
    assert_eq!(
        hit.header("content-length"),
        Some(hit.body.len().to_string().as_str())
    );
    assert_eq!(hit.body, first.body);

    let br = fetch(&gw, LIST, "br", &[]).await;
    assert_eq!(br.header("x-cache"), Some("HIT"));
    assert_eq!(br.header("content-encoding"), Some("br"));
    let br_etag = br.header("etag").unwrap();
    assert!(br_etag.ends_with("-br\"") && br_etag != gzip_etag);

    let identity = fetch(&gw, LIST, "", &[]).await;
    assert_eq!(identity.header("content-encoding"), None);
    let identity_etag = identity.header("etag").unwrap();
    assert!(!identity_etag.contains('-'));
    assert!(identity.header("vary").unwrap().contains("accept-encoding"));
    assert_eq!(decode(&br), identity.body.to_vec());
    assert_eq!(decode(&hit), identity.body.to_vec());

    // A validator matches only its own encoding.
    let same = fetch(&gw, LIST, "gzip", &[("if-none-match", &gzip_etag)]).await;
    assert_eq!(same.status, StatusCode::NOT_MODIFIED);
    let other = fetch(&gw, LIST, "br", &[("if-none-match", &gzip_etag)]).await;
    assert_eq!(other.status, StatusCode::OK);

    assert_eq!(up.count(), 1, "one fetch from the site for every encoding");
}

#[tokio::test]
async fn with_compression_off_nothing_is_encoded_and_accept_encoding_passes() {
    let up = upstream().await;
    let yaml = format!("{}compression: {{ enabled: false }}\n", base_config(&up));
    let gw = Gateway::start(&yaml).await;
    let reply = fetch(&gw, LIST, "gzip, br", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-encoding"), None);
    assert_eq!(up.received()[0].headers["accept-encoding"], "gzip, br");
}
