//! The response cache over real sockets: hits that never reach the site, keys per service
//! account, invalidation by writes and by signed webhooks, coalescing, stale-if-error, the byte
//! bound, 304s, and no caching without rules. Each test counts what reached the upstream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{Method, StatusCode};
use sha2::Sha256;
use support::*;

use erpgate::config::Config;

const WEBHOOK_SECRET: &str = "webhook-secret-from-frappe";

/// `base_config` with a cache section and a webhook secret on the site; the ToDo-reader
/// client may also read through `test.*` methods.
fn cached_config(up: &FrappeUpstream, cache: &str) -> String {
    base_config(up)
        .replace(
            "    timeouts: { connect: 1s, request: 3s }\n",
            &format!(
                "    timeouts: {{ connect: 1s, request: 3s }}\n    webhook: {{ secret: {WEBHOOK_SECRET} }}\n    retry: {{ max_retries: 0 }}\n"
            ),
        )
        .replace(
            "methods: [frappe.client.get_list]",
            "methods: [frappe.client.get_list, \"test.*\"]",
        )
        + cache
}

const TODO_RULES: &str = r#"
cache:
  rules:
    - { doctype: ToDo, ttl: 60s }
    - { method: test.big, ttl: 60s }
    - { method: test.slow, ttl: 60s }
"#;

async fn create_todo(gw: &Gateway, description: &str) -> String {
    let reply = send_json(
        Method::POST,
        &gw.url("/api/resource/ToDo"),
        FULL,
        &format!(r#"{{"description": "{description}"}}"#),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    reply.json()["data"]["name"].as_str().unwrap().to_owned()
}

/// The `X-Cache` of a GET by the full client.
async fn x_cache(gw: &Gateway, path: &str) -> String {
    let reply = get(&gw.url(path), FULL).await;
    reply.header("x-cache").unwrap_or("none").to_owned()
}

fn gets(up: &FrappeUpstream) -> usize {
    up.received()
        .iter()
        .filter(|r| r.method == Method::GET)
        .count()
}

#[tokio::test]
async fn a_hit_never_reaches_the_site() {
    let up = upstream().await;
    let gw = Gateway::start(&cached_config(&up, TODO_RULES)).await;
    let name = create_todo(&gw, "cached").await;
    let path = format!("/api/resource/ToDo/{name}");

    let first = get(&gw.url(&path), FULL).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert!(first.header("cache-status").unwrap().contains("stored"));
    for _ in 0..5 {
        let hit = get(&gw.url(&path), FULL).await;
        assert_eq!(hit.status, StatusCode::OK);
        assert_eq!(hit.header("x-cache"), Some("HIT"));
        assert_eq!(hit.body, first.body);
        assert!(hit.header("age").is_some());
        assert!(hit
            .header("cache-status")
            .unwrap()
            .starts_with("erpgate; hit; ttl="));
        // Frappe's cookies stay out of cached answers too.
        assert!(hit.headers.get("set-cookie").is_none());
    }
    // The same document in another spelling is the same entry.
    let spelled = get(&gw.url(&format!("/api/resource/%54oDo/{name}")), FULL).await;
    assert_eq!(spelled.header("x-cache"), Some("HIT"));
    assert_eq!(gets(&up), 1);

    // Query parameters in another order are the same entry too; other values are not.
    let list = get(
        &gw.url("/api/resource/ToDo?limit=5&fields=%5B%22name%22%5D"),
        FULL,
    )
    .await;
    assert_eq!(list.header("x-cache"), Some("MISS"));
    let reordered = get(
        &gw.url("/api/resource/ToDo?fields=[%22name%22]&limit=5"),
        FULL,
    )
    .await;
    assert_eq!(reordered.header("x-cache"), Some("HIT"));
    let other = get(
        &gw.url("/api/resource/ToDo?fields=[%22name%22]&limit=6"),
        FULL,
    )
    .await;
    assert_eq!(other.header("x-cache"), Some("MISS"));
    assert_eq!(gets(&up), 3);

    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "erpgate_cache_events_total",
            &[("site", "erp"), ("result", "hit")]
        ),
        7.0
    );
    assert_eq!(
        metric_value(
            &m,
            "erpgate_cache_events_total",
            &[("site", "erp"), ("result", "miss")]
        ),
        3.0
    );
    assert!(metric_value(&m, "erpgate_cache_entries", &[]) >= 3.0);
    assert!(metric_value(&m, "erpgate_cache_bytes", &[]) > 0.0);
}

#[tokio::test]
async fn clients_on_different_service_accounts_never_share_an_entry() {
    let up = upstream().await;
    let gw = Gateway::start(&cached_config(&up, TODO_RULES)).await;
    // get_logged_user answers with the user the request was signed as.
    let yaml = cached_config(
        &up,
        "cache:\n  rules:\n    - { method: frappe.auth.get_logged_user, ttl: 60s }\n",
    )
    .replace(
        "methods: [frappe.client.get_list, \"test.*\"]",
        "methods: [frappe.client.get_list, frappe.auth.get_logged_user]",
    );
    drop(gw);
    let gw = Gateway::start(&yaml).await;
    let path = "/api/method/frappe.auth.get_logged_user";
    let full = get(&gw.url(path), FULL).await;
    assert_eq!(full.json()["message"], "sync@example.com");
    let reader = get(&gw.url(path), TODO_READER).await;
    assert_eq!(reader.header("x-cache"), Some("MISS"));
    assert_eq!(reader.json()["message"], "reader@example.com");
    // Each account hits its own entry.
    let full_again = get(&gw.url(path), FULL).await;
    assert_eq!(full_again.header("x-cache"), Some("HIT"));
    assert_eq!(full_again.json()["message"], "sync@example.com");
    let reader_again = get(&gw.url(path), TODO_READER).await;
    assert_eq!(reader_again.header("x-cache"), Some("HIT"));
    assert_eq!(reader_again.json()["message"], "reader@example.com");
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn an_entry_is_only_served_to_clients_the_rules_let_read_it() {
    let up = upstream().await;
    let yaml = cached_config(&up, "cache:\n  rules:\n    - { doctype: User, ttl: 60s }\n");
    let gw = Gateway::start(&yaml).await;
    let full = get(&gw.url("/api/resource/User"), FULL).await;
    assert_eq!(full.status, StatusCode::NOT_FOUND); // the test site has no User; not stored
    let refused = get(&gw.url("/api/resource/User"), TODO_READER).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(refused.header("x-cache").is_none());
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn a_write_through_the_gateway_makes_the_next_read_a_miss_with_the_new_value() {
    let up = upstream().await;
    let gw = Gateway::start(&cached_config(&up, TODO_RULES)).await;
    let name = create_todo(&gw, "before").await;
    let path = format!("/api/resource/ToDo/{name}");
    assert_eq!(x_cache(&gw, &path).await, "MISS");
    let list = get(&gw.url("/api/resource/ToDo"), FULL).await;
    assert_eq!(list.header("x-cache"), Some("MISS"));
    assert_eq!(x_cache(&gw, &path).await, "HIT");

    let put = send_json(
        Method::PUT,
        &gw.url(&path),
        FULL,
        r#"{"description": "after"}"#,
    )
    .await;
    assert_eq!(put.status, StatusCode::OK);
    let read = get(&gw.url(&path), FULL).await;
    assert_eq!(read.header("x-cache"), Some("MISS"));
    assert_eq!(read.json()["data"]["description"], "after");
    // The list of the doctype went too.
    assert_eq!(x_cache(&gw, "/api/resource/ToDo").await, "MISS");

    // A write that fails invalidates nothing (the test site answers 417 for a method it lacks).
    let failed = send_json(
        Method::POST,
        &gw.url("/api/method/frappe.client.no_such_method"),
        FULL,
        r#"{"doc": {"doctype": "ToDo", "description": "x"}}"#,
    )
    .await;
    assert_eq!(failed.status, StatusCode::EXPECTATION_FAILED);
    assert_eq!(x_cache(&gw, &path).await, "HIT");
    // frappe.client methods naming the doctype in their arguments invalidate as well.
    let insert = send_json(
        Method::POST,
        &gw.url("/api/method/frappe.client.insert"),
        FULL,
        r#"{"doc": {"doctype": "ToDo", "description": "x"}}"#,
    )
    .await;
    assert_eq!(insert.status, StatusCode::OK);
    assert_eq!(x_cache(&gw, &path).await, "MISS");
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "erpgate_cache_invalidations_total",
            &[("site", "erp"), ("reason", "write")]
        ),
        3.0 // the create at the start, the PUT, then the insert
    );
}

fn sign(body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

async fn webhook(gw: &Gateway, site: &str, body: &str, signature: Option<&str>) -> Reply {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(s) = signature {
        headers.push(("x-frappe-webhook-signature", s));
    }
    send(
        Method::POST,
        &gw.url(&format!("/_erpgate/webhooks/frappe/{site}")),
        &headers,
        body.to_owned(),
    )
    .await
}

#[tokio::test]
async fn a_signed_webhook_invalidates_and_a_wrongly_signed_one_changes_nothing() {
    let up = upstream().await;
    let gw = Gateway::start(&cached_config(&up, TODO_RULES)).await;
    let name = create_todo(&gw, "desk").await;
    let path = format!("/api/resource/ToDo/{name}");
    assert_eq!(x_cache(&gw, &path).await, "MISS");
    // Someone edits it in the ERPNext desk: the cache does not know yet.
    up.edit_todo(&name, "description", "edited in the desk");
    let stale = get(&gw.url(&path), FULL).await;
    assert_eq!(stale.header("x-cache"), Some("HIT"));
    assert_eq!(stale.json()["data"]["description"], "desk");

    let body = format!(r#"{{"doctype": "ToDo", "name": "{name}", "event": "on_update"}}"#);
    for bad in [
        None,
        Some("bm90IGEgc2lnbmF0dXJl"),
        Some(sign("{}").as_str()),
    ] {
        let reply = webhook(&gw, "erp", &body, bad).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{bad:?}");
        assert_eq!(reply.json()["exc_type"], "AuthenticationError");
        assert_eq!(x_cache(&gw, &path).await, "HIT");
    }
    let unknown = webhook(&gw, "nosuchsite", &body, Some(&sign(&body))).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    let reply = webhook(&gw, "erp", &body, Some(&sign(&body))).await;
    assert_eq!(reply.status, StatusCode::OK);
    let fresh = get(&gw.url(&path), FULL).await;
    assert_eq!(fresh.header("x-cache"), Some("MISS"));
    assert_eq!(fresh.json()["data"]["description"], "edited in the desk");
    // The webhook never reached the site, nor did the refused ones.
    assert!(up
        .received()
        .iter()
        .all(|r| !r.path_and_query.contains("_erpgate")));
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "erpgate_cache_invalidations_total",
            &[("site", "erp"), ("reason", "webhook")]
        ),
        1.0
    );

    // An oversized webhook body is refused before anything is checked.
    let huge = "x".repeat(2 << 20);
    let reply = webhook(&gw, "erp", &huge, Some(&sign(&huge))).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn a_hundred_concurrent_misses_make_one_upstream_request() {
    let up = upstream().await;
    // Above the default cap of 64 requests in flight per client.
    let yaml =
        cached_config(&up, TODO_RULES).replace("clients:\n", "max_in_flight: 128\nclients:\n");
    let gw = Arc::new(Gateway::start(&yaml).await);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            get(&gw.url("/api/method/test.slow?ms=500"), FULL).await
        }));
    }
    let mut bodies = Vec::new();
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert!(matches!(reply.header("x-cache"), Some("MISS" | "HIT")));
        bodies.push(reply.body);
    }
    assert_eq!(up.count(), 1, "the misses were not coalesced");
    assert!(bodies.iter().all(|b| *b == bodies[0]));
    let m = gw.metrics().await;
    let collapsed = metric_value(&m, "erpgate_cache_events_total", &[("result", "collapsed")]);
    let hits = metric_value(&m, "erpgate_cache_events_total", &[("result", "hit")]);
    assert_eq!(collapsed + hits, 99.0);
}

#[tokio::test]
async fn stale_is_served_while_the_site_is_down_and_fresh_again_after() {
    let up = upstream().await;
    let rules = "cache:\n  rules:\n    - { doctype: ToDo, ttl: 1s, stale_if_error: 60s }\n";
    let yaml = cached_config(&up, rules).replace(
        "    retry: { max_retries: 0 }\n",
        "    retry: { max_retries: 0 }\n    breaker: { consecutive_failures: 2, open_base: 3s }\n",
    );
    let gw = Gateway::start(&yaml).await;
    let name = create_todo(&gw, "kept").await;
    let path = format!("/api/resource/ToDo/{name}");
    let first = get(&gw.url(&path), FULL).await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // The site fails: 503 answers, then the breaker opens; the stale copy is served throughout.
    up.set_behaviour(Behaviour::Fail(503));
    for _ in 0..4 {
        let reply = get(&gw.url(&path), FULL).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("x-cache"), Some("STALE"));
        assert_eq!(reply.body, first.body);
        assert!(reply
            .header("cache-status")
            .unwrap()
            .contains("detail=stale-if-error"));
    }
    // Two 503s reached the site, then the breaker kept the rest away.
    assert_eq!(gets(&up), 3);
    // Something never cached still fails as before.
    let uncached = get(&gw.url("/api/resource/ToDo"), FULL).await;
    assert_eq!(uncached.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(uncached.json()["exc_type"], "UpstreamUnavailable");

    // The site comes back; once the breaker lets its probe through, the answer is fresh again.
    up.set_behaviour(Behaviour::Normal);
    up.edit_todo(&name, "description", "newer");
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let fresh = get(&gw.url(&path), FULL).await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert_eq!(fresh.header("x-cache"), Some("MISS"));
    assert_eq!(fresh.json()["data"]["description"], "newer");
    assert_eq!(gets(&up), 4);
}

#[tokio::test]
async fn the_byte_bound_holds_for_ten_thousand_large_entries() {
    let up = upstream().await;
    let rules = "cache:\n  max_bytes: 2MiB\n  max_entry_bytes: 64KiB\n  rules:\n    - { method: test.big, ttl: 600s }\n";
    let gw = Arc::new(
        Gateway::start(
            &cached_config(&up, rules).replace("clients:\n", "rate_limit: null\nclients:\n"),
        )
        .await,
    );
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            for i in (worker..10_000).step_by(8) {
                let reply = get(
                    &gw.url(&format!("/api/method/test.big?size=20000&i={i}")),
                    FULL,
                )
                .await;
                assert_eq!(reply.status, StatusCode::OK);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let stats = send(
        Method::GET,
        &format!("{}/cache/stats", gw.admin),
        &[],
        Bytes::new(),
    )
    .await;
    let stats = stats.json();
    let bytes = stats["bytes"].as_u64().unwrap();
    assert!(bytes <= 2 << 20, "the store holds {bytes} bytes");
    assert!(bytes > 1 << 20, "the store is barely used: {bytes} bytes");
    let entries = stats["entries"].as_u64().unwrap();
    assert!(entries < 200, "{entries} entries of 20 kB in 2 MiB");
    let m = gw.metrics().await;
    assert!(metric_value(&m, "erpgate_cache_evictions_total", &[]) > 9000.0);

    // A body over max_entry_bytes passes through whole but is not stored.
    let big = get(&gw.url("/api/method/test.big?size=100000&i=big"), FULL).await;
    assert!(big.body.len() > 64 * 1024);
    assert_eq!(big.header("x-cache"), Some("MISS"));
    let again = get(&gw.url("/api/method/test.big?size=100000&i=big"), FULL).await;
    assert_eq!(again.header("x-cache"), Some("MISS"));
    assert_eq!(again.body, big.body);
}

#[tokio::test]
async fn a_matching_if_none_match_gets_304() {
    let up = upstream().await;
    let gw = Gateway::start(&cached_config(&up, TODO_RULES)).await;
    let first = get(&gw.url("/api/method/test.big?size=500"), FULL).await;
    let etag = first.header("etag").unwrap().to_owned();
    assert!(etag.starts_with('"') && !etag.starts_with("W/"));
    let auth = token(FULL);
    let not_modified = send(
        Method::GET,
        &gw.url("/api/method/test.big?size=500"),
        &[("authorization", &auth), ("if-none-match", &etag)],
        Bytes::new(),
    )
    .await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    assert!(not_modified.body.is_empty());
    assert_eq!(not_modified.header("etag"), Some(etag.as_str()));
    let changed = send(
        Method::GET,
        &gw.url("/api/method/test.big?size=500"),
        &[("authorization", &auth), ("if-none-match", "\"other\"")],
        Bytes::new(),
    )
    .await;
    assert_eq!(changed.status, StatusCode::OK);
    assert_eq!(changed.body, first.body);
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn upstream_no_store_and_private_are_respected_unless_overridden() {
    let up = upstream().await;
    let gw = Gateway::start(&cached_config(&up, TODO_RULES)).await;
    for cc in ["no-store", "private"] {
        for _ in 0..2 {
            let reply = get(
                &gw.url(&format!("/api/method/test.big?size=100&cc={cc}")),
                FULL,
            )
            .await;
            assert_eq!(reply.header("x-cache"), Some("MISS"));
        }
    }
    assert_eq!(up.count(), 4);
    let rules = "cache:\n  rules:\n    - { method: test.big, ttl: 60s, override_upstream_cache_control: true }\n";
    let gw = Gateway::start(&cached_config(&up, rules)).await;
    let url = gw.url("/api/method/test.big?size=100&cc=no-store");
    assert_eq!(get(&url, FULL).await.header("x-cache"), Some("MISS"));
    assert_eq!(get(&url, FULL).await.header("x-cache"), Some("HIT"));
    assert_eq!(up.count(), 5);
}

#[tokio::test]
async fn without_rules_nothing_is_cached() {
    let up = upstream().await;
    let gw = Gateway::start(&cached_config(&up, "")).await;
    for _ in 0..3 {
        let reply = get(&gw.url("/api/resource/ToDo"), FULL).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.header("x-cache").is_none());
        assert!(reply.header("etag").is_none());
    }
    assert_eq!(up.count(), 3);
    let stats = send(
        Method::GET,
        &format!("{}/cache/stats", gw.admin),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(stats.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_admin_purge_drops_by_site_doctype_or_everything() {
    let up = upstream().await;
    let gw = Gateway::start(&cached_config(&up, TODO_RULES)).await;
    let admin = |path: &str| {
        let url = format!("{}{path}", gw.admin);
        async move {
            send(
                Method::POST,
                &url,
                &[("x-erpgate-admin", "1")],
                Bytes::new(),
            )
            .await
        }
    };
    let todo = gw.url("/api/resource/ToDo");
    let big = gw.url("/api/method/test.big?size=100");
    for url in [&todo, &big] {
        assert_eq!(get(url, FULL).await.header("x-cache"), Some("MISS"));
    }
    assert_eq!(
        admin("/cache/purge?site=erp&doctype=ToDo").await.status,
        StatusCode::OK
    );
    assert_eq!(get(&todo, FULL).await.header("x-cache"), Some("MISS"));
    assert_eq!(get(&big, FULL).await.header("x-cache"), Some("HIT"));
    assert_eq!(admin("/cache/purge?site=erp").await.status, StatusCode::OK);
    assert_eq!(get(&big, FULL).await.header("x-cache"), Some("MISS"));
    assert_eq!(admin("/cache/purge").await.status, StatusCode::OK);
    assert_eq!(get(&todo, FULL).await.header("x-cache"), Some("MISS"));
    assert_eq!(
        admin("/cache/purge?doctype=ToDo").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(up.count(), 5);

    // A request any web page could send (CORS-simple: no custom header) changes nothing.
    assert_eq!(get(&big, FULL).await.header("x-cache"), Some("MISS"));
    for headers in [vec![], vec![("content-type", "text/plain")]] {
        let url = format!("{}/cache/purge", gw.admin);
        let reply = send(Method::POST, &url, &headers, Bytes::new()).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
    }
    assert_eq!(get(&big, FULL).await.header("x-cache"), Some("HIT"));
    // Only configured sites are names: no metric label is made from junk.
    assert_eq!(
        admin("/cache/purge?site=junk").await.status,
        StatusCode::NOT_FOUND
    );
    assert!(!gw.metrics().await.contains("junk"));
}

#[tokio::test]
async fn with_an_admin_token_the_purge_needs_it() {
    let up = upstream().await;
    let config = cached_config(&up, TODO_RULES) + "admin_token: s3cret-admin\n";
    let gw = Gateway::start(&config).await;
    let url = format!("{}/cache/purge", gw.admin);
    let with = |headers: Vec<(&'static str, &'static str)>| {
        let url = url.clone();
        async move {
            send(Method::POST, &url, &headers, Bytes::new())
                .await
                .status
        }
    };
    assert_eq!(
        with(vec![("x-erpgate-admin", "1")]).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        with(vec![("authorization", "Bearer wrong")]).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        with(vec![("authorization", "Bearer s3cret-admin")]).await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn head_is_answered_from_the_get_entry_and_reads_with_a_body_are_never_cached() {
    let up = upstream().await;
    let gw = Gateway::start(&cached_config(&up, TODO_RULES)).await;
    let url = gw.url("/api/method/test.big?size=300");
    let auth = token(FULL);
    let head = send(
        Method::HEAD,
        &url,
        &[("authorization", &auth)],
        Bytes::new(),
    )
    .await;
    assert_eq!(head.header("x-cache"), Some("MISS"));
    let first = get(&url, FULL).await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    let head = send(
        Method::HEAD,
        &url,
        &[("authorization", &auth)],
        Bytes::new(),
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("x-cache"), Some("HIT"));
    assert!(head.body.is_empty());
    assert_eq!(head.header("etag"), first.header("etag"));
    assert_eq!(up.count(), 2);

    // Frappe reads form_dict from a GET's JSON body: such a read is passed on every time.
    for _ in 0..2 {
        let reply = send(
            Method::GET,
            &url,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            r#"{"i": "from the body"}"#,
        )
        .await;
        assert_eq!(reply.header("x-cache"), Some("BYPASS"));
    }
    assert_eq!(up.count(), 4);
}

#[tokio::test]
async fn a_changed_service_account_never_serves_the_old_identitys_entries() {
    const NEW_KEY: &str = "sync-key-rotated";
    const NEW_SECRET: &str = "sync-secret-rotated";
    let up = FrappeUpstream::start(
        SITE,
        &[
            (SYNC_KEY, SYNC_SECRET, "sync@example.com"),
            (READER_KEY, READER_SECRET, "reader@example.com"),
            (NEW_KEY, NEW_SECRET, "other@example.com"),
        ],
    )
    .await;
    let rules = TODO_RULES.replace("ttl: 60s }", "ttl: 60s, stale_if_error: 60s }");
    let config = cached_config(&up, &rules);
    let gw = Gateway::start(&config).await;
    let name = create_todo(&gw, "before").await;
    let path = format!("/api/resource/ToDo/{name}");
    assert_eq!(x_cache(&gw, &path).await, "MISS");
    assert_eq!(x_cache(&gw, &path).await, "HIT");
    // The operator points the same account name at another ERPNext user and reloads.
    let rotated = config.replace(
        &format!("sync: {{ api_key: {SYNC_KEY}, api_secret: {SYNC_SECRET} }}"),
        &format!("sync: {{ api_key: {NEW_KEY}, api_secret: {NEW_SECRET} }}"),
    );
    assert_ne!(rotated, config);
    gw.running
        .reload(Config::from_yaml(&rotated, "rotated").unwrap())
        .await
        .unwrap();
    // While the site fails, the old identity's entry is not served, not even stale.
    up.set_behaviour(Behaviour::Fail(503));
    let reply = get(&gw.url(&path), FULL).await;
    assert_ne!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_ne!(reply.header("x-cache"), Some("STALE"));
    // Once it answers, the new identity fetches its own.
    up.set_behaviour(Behaviour::Normal);
    let before = gets(&up);
    let reply = get(&gw.url(&path), FULL).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-cache"), Some("MISS"));
    assert_eq!(gets(&up), before + 1);
    let last = up.received().pop().unwrap();
    assert_eq!(
        last.headers["authorization"],
        format!("token {NEW_KEY}:{NEW_SECRET}").as_str()
    );
}

#[tokio::test]
async fn document_purges_match_names_as_frappes_database_does() {
    let up = upstream().await;
    let gw = Gateway::start(&cached_config(&up, TODO_RULES)).await;
    let name = create_todo(&gw, "spelled").await;
    let spellings = [name.clone(), name.to_uppercase(), format!("{name}%20%20")];
    for spelling in &spellings {
        let path = format!("/api/resource/ToDo/{spelling}");
        assert_eq!(x_cache(&gw, &path).await, "MISS", "{path}");
        assert_eq!(x_cache(&gw, &path).await, "HIT", "{path}");
    }
    // Frappe signs a webhook for one spelling: every spelling's entry goes.
    let body = format!(
        r#"{{"doctype": "ToDo", "name": "{} ", "event": "on_update"}}"#,
        name.to_uppercase()
    );
    assert_eq!(
        webhook(&gw, "erp", &body, Some(&sign(&body))).await.status,
        StatusCode::OK
    );
    for spelling in &spellings {
        let path = format!("/api/resource/ToDo/{spelling}");
        assert_eq!(x_cache(&gw, &path).await, "MISS", "{path}");
    }
}

#[tokio::test]
async fn only_the_signed_body_chooses_what_a_webhook_purges() {
    let up = upstream().await;
    let gw = Gateway::start(&cached_config(&up, TODO_RULES)).await;
    let name = create_todo(&gw, "kept").await;
    let path = format!("/api/resource/ToDo/{name}");
    assert_eq!(x_cache(&gw, &path).await, "MISS");
    // A captured webhook that names no doctype, replayed with one in the URL: refused.
    let body = format!(r#"{{"name": "{name}"}}"#);
    let reply = send(
        Method::POST,
        &gw.url("/_erpgate/webhooks/frappe/erp?doctype=ToDo"),
        &[
            ("content-type", "application/json"),
            ("x-frappe-webhook-signature", &sign(&body)),
        ],
        body.clone(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_eq!(x_cache(&gw, &path).await, "HIT");
    // A signed one for another doctype, with this one in the URL, purges only its own.
    let other = r#"{"doctype": "Item", "name": "X"}"#;
    let reply = send(
        Method::POST,
        &gw.url("/_erpgate/webhooks/frappe/erp?doctype=ToDo"),
        &[
            ("content-type", "application/json"),
            ("x-frappe-webhook-signature", &sign(other)),
        ],
        other,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(x_cache(&gw, &path).await, "HIT");
}

/// Resident memory of this process, from /proc.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test]
async fn a_flood_of_slow_webhook_bodies_is_bounded_in_count_time_and_memory() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream().await;
    let gw = Gateway::start(&cached_config(&up, TODO_RULES)).await;
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let before = rss_bytes();
    // 200 strangers each promise a 60 kB body and send one byte.
    let mut held = Vec::new();
    for _ in 0..200 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /_erpgate/webhooks/frappe/erp HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nX-Frappe-Webhook-Signature: {}\r\nContent-Length: 60000\r\n\r\n{{",
            sign("{}")
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        held.push(stream);
    }
    // Most are refused at once; the rest are cut off at the read deadline.
    let started = std::time::Instant::now();
    let mut refused_at_once = 0;
    let mut timed_out = 0;
    let mut answers = Vec::new();
    for mut stream in held {
        answers.push(tokio::spawn(async move {
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
                .await;
            (
                String::from_utf8_lossy(&answer).into_owned(),
                std::time::Instant::now(),
            )
        }));
    }
    let during = rss_bytes();
    // A client with a key is served meanwhile.
    let reply = get(&gw.url("/api/method/ping"), FULL).await;
    assert_eq!(reply.status, StatusCode::OK);
    for answer in answers {
        let (answer, at) = answer.await.unwrap();
        if answer.starts_with("HTTP/1.1 429") && at.duration_since(started) < Duration::from_secs(3)
        {
            refused_at_once += 1;
        } else if answer.starts_with("HTTP/1.1 408") {
            timed_out += 1;
        } else {
            panic!("unexpected answer: {answer}");
        }
    }
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(timed_out <= 32, "{timed_out} bodies were read at once");
    assert_eq!(refused_at_once + timed_out, 200);
    let after = rss_bytes();
    eprintln!(
        "RSS before {} KiB, during {} KiB, after {} KiB",
        before / 1024,
        during / 1024,
        after / 1024
    );
    assert!(
        during.saturating_sub(before) < 64 << 20,
        "the flood took {} KiB",
        (during - before) / 1024
    );
    // Nothing was purged and nothing reached the site.
    assert_eq!(up.count(), 1);
}
