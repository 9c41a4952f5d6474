//! Scale-out: two gateway instances with one config, each with its own state, sharing nothing
//! but a real `redis-server`, in front of the test upstream. Quotas, auth-failure limits,
//! `Idempotency-Key` records and cache invalidations hold across both; with Redis killed,
//! requests without a key still pass and keyed writes get 503; with Redis back, shared mode
//! returns by itself. Every test checks what reached the upstream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::{Method, StatusCode};
use sha2::Sha256;
use support::redis::Redis;
use support::*;

const WEBHOOK_SECRET: &str = "webhook-secret-from-frappe";

/// `base_config` with a webhook secret, no retries, a ToDo cache rule, shared state on
/// `redis` under a prefix of its own, and `extra` top-level keys.
fn shared_config(up: &FrappeUpstream, redis: &Redis, extra: &str) -> String {
    let prefix = format!("t{:x}:", rand::random::<u32>());
    base_config(up).replace(
        "    timeouts: { connect: 1s, request: 3s }\n",
        &format!(
            "    timeouts: {{ connect: 1s, request: 3s }}\n    webhook: {{ secret: {WEBHOOK_SECRET} }}\n    retry: {{ max_retries: 0 }}\n"
        ),
    ) + &format!(
        r#"
cache:
  rules:
    - {{ doctype: ToDo, ttl: 60s }}
shared_state:
  redis: {{ url: "{url}", key_prefix: "{prefix}", connect_timeout: 300ms, command_timeout: 200ms }}
{extra}
"#,
        url = redis.url(),
    )
}

/// Two instances of one config, each with its own state, both waiting until Redis is in use.
async fn two_replicas(yaml: &str) -> (Gateway, Gateway) {
    let a = Gateway::start(yaml).await;
    let b = Gateway::start(yaml).await;
    for gw in [&a, &b] {
        wait_for(gw, "erpgate_redis_up", 1.0).await;
    }
    // ... and hearing each other (the subscription logs its start; give it a moment).
    tokio::time::sleep(Duration::from_millis(200)).await;
    (a, b)
}

/// Waits (at most 10 s) for a metric to reach `value`.
async fn wait_for(gw: &Gateway, metric: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = gw.metrics().await;
        if metric_value(&m, metric, &[]) == value {
            return;
        }
        assert!(Instant::now() < deadline, "{metric} never became {value}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn posts_to(up: &FrappeUpstream, path: &str) -> usize {
    up.received()
        .iter()
        .filter(|r| r.method == Method::POST && r.path_and_query.starts_with(path))
        .count()
}

fn sign(body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[tokio::test]
async fn a_quota_holds_across_replicas_and_its_headers_come_from_the_shared_state() {
    let redis = Redis::start();
    let up = upstream().await;
    let yaml = shared_config(&up, &redis, "rate_limit: { per_minute: 10, burst: 10 }");
    let (a, b) = two_replicas(&yaml).await;
    let mut passed = 0;
    let mut remaining = Vec::new();
    let mut refused = None;
    for i in 0..20 {
        let gw = if i % 2 == 0 { &a } else { &b };
        // Not a cached read: every request that passes reaches the site.
        let reply = get(&gw.url("/api/method/ping"), FULL).await;
        match reply.status {
            StatusCode::OK => {
                passed += 1;
                remaining.push(reply.header("x-ratelimit-remaining").unwrap().to_owned());
            }
            StatusCode::TOO_MANY_REQUESTS => refused = Some(reply),
            other => panic!("unexpected {other}: {}", reply.text()),
        }
    }
    // One refill every 6 s: the test may see one.
    assert!((10..=11).contains(&passed), "{passed} of 20 passed");
    assert_eq!(
        up.count(),
        passed,
        "what passed, and only that, reached the site"
    );
    // The remaining count falls across both replicas: one quota.
    assert_eq!(&remaining[..3], ["9", "8", "7"]);
    let refused = refused.unwrap();
    assert_eq!(refused.json()["exc_type"], "TooManyRequestsError");
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=6).contains(&retry_after), "{retry_after}");
    assert_eq!(refused.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"default\";q=10;w=60")
    );
    let m = a.metrics().await;
    assert_eq!(
        metric_value(&m, "erpgate_shared_state_fallbacks_total", &[]),
        0.0
    );
    assert!(
        metric_value(
            &m,
            "erpgate_redis_command_duration_seconds_count",
            &[("command", "gcra")]
        ) >= 10.0
    );
}

/// Redis round trips for quotas, on both replicas.
async fn gcra_calls(a: &Gateway, b: &Gateway) -> f64 {
    let mut total = 0.0;
    for gw in [a, b] {
        let m = gw.metrics().await;
        total += metric_value(
            &m,
            "erpgate_redis_command_duration_seconds_count",
            &[("command", "gcra")],
        );
    }
    total
}

#[tokio::test]
async fn with_quota_batch_replicas_lease_requests_and_the_quota_still_holds() {
    let redis = Redis::start();
    let up = upstream().await;
    // A burst of 100: batches of min(quota_batch, 100 / 20) = 5.
    let yaml = shared_config(&up, &redis, "rate_limit: { per_minute: 100, burst: 100 }")
        .replace("shared_state:\n", "shared_state:\n  quota_batch: 8\n");
    let (a, b) = two_replicas(&yaml).await;
    let mut passed = 0;
    let mut calls_for_90 = None;
    for i in 0..200 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let reply = get(&gw.url("/api/method/ping"), FULL).await;
        match reply.status {
            StatusCode::OK => {
                passed += 1;
                let remaining: u32 = reply
                    .header("x-ratelimit-remaining")
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(remaining < 100, "{remaining}");
            }
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(reply.json()["exc_type"], "TooManyRequestsError");
            }
            other => panic!("unexpected {other}: {}", reply.text()),
        }
        if i == 89 {
            calls_for_90 = Some(gcra_calls(&a, &b).await);
        }
    }
    // Every leased request was charged in Redis: the quota holds across both replicas, up to
    // a refill (one per 0.6 s) while the 200 requests run.
    assert!((97..=104).contains(&passed), "{passed} of 200 passed");
    assert_eq!(
        up.count(),
        passed,
        "what passed, and only that, reached the site"
    );
    // ... in a fifth of the round trips: batches of 5 (exactly: 90).
    let calls = calls_for_90.unwrap();
    assert!(calls <= 20.0, "{calls} Redis calls for 90 requests");
}

#[tokio::test]
async fn a_brute_forced_key_id_is_slowed_on_every_replica_and_its_owner_is_not() {
    let redis = Redis::start();
    let up = upstream().await;
    let yaml = shared_config(&up, &redis, "auth_failures: { per_minute: 1, burst: 3 }");
    let (a, b) = two_replicas(&yaml).await;
    let wrong = (FULL.0, "not-the-secret");
    let mut statuses = Vec::new();
    for i in 0..4 {
        let gw = if i % 2 == 0 { &a } else { &b };
        statuses.push(get(&gw.url("/api/resource/ToDo"), wrong).await.status);
    }
    // A burst of three failures in all, not three per replica (which would be four 401s).
    assert_eq!(
        statuses,
        [
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    // Further wrong secrets get 429 on both replicas...
    tokio::time::sleep(Duration::from_millis(200)).await;
    for gw in [&a, &b] {
        let reply = get(&gw.url("/api/resource/ToDo"), wrong).await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    }
    assert_eq!(up.count(), 0);
    // ...while the key's right secret passes on both: key ids are not secret, so a block on
    // one must not lock its owner out.
    for gw in [&a, &b] {
        let reply = get(&gw.url("/api/resource/ToDo"), FULL).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    // The address is over its shared quota too, yet another client's valid credential from it
    // passes on both replicas: a block never refuses a credential that checks out.
    for gw in [&a, &b] {
        let reply = get(&gw.url("/api/resource/ToDo"), TODO_READER).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    assert_eq!(
        up.count(),
        4,
        "only the four valid requests reached the site"
    );
}

#[tokio::test]
async fn an_idempotency_key_is_one_request_whichever_replica_it_reaches() {
    let redis = Redis::start();
    let up = upstream().await;
    let (a, b) = two_replicas(&shared_config(&up, &redis, "")).await;
    let body = r#"{"description": "order 42"}"#;
    let first = keyed_post(&a, "/api/resource/ToDo", FULL, "order-42", body).await;
    assert_eq!(first.status, StatusCode::OK);
    // The client retries; the Service sends it to the other replica.
    let again = keyed_post(&b, "/api/resource/ToDo", FULL, "order-42", body).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("content-type"), first.header("content-type"));
    let other = keyed_post(
        &b,
        "/api/resource/ToDo",
        FULL,
        "order-42",
        "{\"description\": \"x\"}",
    )
    .await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.json()["exc_type"], "IdempotencyKeyMismatch");
    assert_eq!(posts_to(&up, "/api/resource/ToDo"), 1, "one document only");

    // While A still runs a request, the same key on B is 409; afterwards B replays A's answer.
    let slow = "/api/method/test.slow?ms=1500";
    let running = {
        let a_url = a.url(slow);
        let auth = token(FULL);
        tokio::spawn(async move {
            send(
                Method::POST,
                &a_url,
                &[("authorization", &auth), ("idempotency-key", "slow-1")],
                "",
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let auth = token(FULL);
    let keyed = [
        ("authorization", auth.as_str()),
        ("idempotency-key", "slow-1"),
    ];
    let during = send(Method::POST, &b.url(slow), &keyed, "").await;
    assert_eq!(during.status, StatusCode::CONFLICT);
    assert_eq!(during.json()["exc_type"], "IdempotencyKeyInUse");
    let finished = running.await.unwrap();
    assert_eq!(finished.status, StatusCode::OK);
    let after = send(Method::POST, &b.url(slow), &keyed, "").await;
    assert_eq!(after.status, StatusCode::OK);
    assert_eq!(after.header("idempotent-replayed"), Some("true"));
    assert_eq!(after.body, finished.body);
    assert_eq!(posts_to(&up, "/api/method/test.slow"), 1);

    // Keys are the client's own, on every replica.
    let reader = keyed_post(
        &b,
        "/api/method/frappe.client.get_list",
        TODO_READER,
        "order-42",
        "{\"doctype\": \"ToDo\"}",
    )
    .await;
    assert_ne!(reader.header("idempotent-replayed"), Some("true"));
}

#[tokio::test]
async fn a_claim_of_a_replica_that_died_runs_out_with_its_lease() {
    let redis = Redis::start();
    let up = upstream().await;
    // The lease is the site's total timeout plus a margin: a claim left by a dead replica
    // (written here as that replica would have) blocks repeats until then, and no longer.
    let yaml = shared_config(&up, &redis, "");
    let (a, _b) = two_replicas(&yaml).await;
    let prefix = yaml
        .split("key_prefix: \"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_owned();
    let body = r#"{"description": "orphan"}"#;
    // What the dead replica's claim looked like: this request's fingerprint, a short lease.
    let claim = format!("{prefix}idem:4:full:orphan-1:claim");
    let fingerprint = {
        use sha2::Digest;
        let mut h = Sha256::new();
        h.update("POST");
        h.update([0]);
        h.update("/api/resource/ToDo");
        h.update([0]);
        h.update(body);
        h.finalize()
    };
    let hex: String = fingerprint.iter().map(|b| format!("\\x{b:02x}")).collect();
    let set = redis.command(&format!("SET {claim} \"{hex}\" PX 1500"));
    assert!(set.starts_with("+OK"), "{set}");
    let blocked = keyed_post(&a, "/api/resource/ToDo", FULL, "orphan-1", body).await;
    assert_eq!(blocked.status, StatusCode::CONFLICT);
    assert_eq!(posts_to(&up, "/api/resource/ToDo"), 0);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let ran = keyed_post(&a, "/api/resource/ToDo", FULL, "orphan-1", body).await;
    assert_eq!(ran.status, StatusCode::OK);
    assert_eq!(posts_to(&up, "/api/resource/ToDo"), 1);
    // The claim this replica made has the lease of timeouts.total (60 s) plus 30 s.
    let ttl: i64 = redis
        .command(&format!("PTTL {prefix}idem:4:full:orphan-1:done"))
        .trim_start_matches(':')
        .trim()
        .parse()
        .unwrap();
    assert!(
        ttl > 23 * 3600 * 1000,
        "the outcome is kept for idempotency.ttl: {ttl}"
    );
}

/// Reads `path` from `gw` until it is a MISS with `description` (at most 1 s); the time taken.
async fn until_fresh(gw: &Gateway, path: &str, description: &str) -> Duration {
    let started = Instant::now();
    loop {
        let reply = get(&gw.url(path), FULL).await;
        if reply.header("x-cache") == Some("MISS")
            && reply.json()["data"]["description"] == description
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "still {:?} {} after 1 s",
            reply.header("x-cache"),
            reply.json()["data"]["description"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_webhook_or_a_write_through_one_replica_invalidates_the_other_within_a_second() {
    let redis = Redis::start();
    let up = upstream().await;
    let (a, b) = two_replicas(&shared_config(&up, &redis, "")).await;
    let created = send_json(
        Method::POST,
        &a.url("/api/resource/ToDo"),
        FULL,
        r#"{"description": "v1"}"#,
    )
    .await;
    let name = created.json()["data"]["name"].as_str().unwrap().to_owned();
    let path = format!("/api/resource/ToDo/{name}");
    assert_eq!(
        get(&b.url(&path), FULL).await.header("x-cache"),
        Some("MISS")
    );
    assert_eq!(
        get(&b.url(&path), FULL).await.header("x-cache"),
        Some("HIT")
    );

    // Edited in the desk; Frappe's webhook reaches A only.
    up.edit_todo(&name, "description", "v2");
    let hook = format!(r#"{{"doctype": "ToDo", "name": "{name}", "event": "on_update"}}"#);
    let reply = send(
        Method::POST,
        &a.url("/_erpgate/webhooks/frappe/erp"),
        &[
            ("content-type", "application/json"),
            ("x-frappe-webhook-signature", &sign(&hook)),
        ],
        hook.clone(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    until_fresh(&b, &path, "v2").await;
    let gets_before = up
        .received()
        .iter()
        .filter(|r| r.method == Method::GET)
        .count();
    assert_eq!(
        get(&b.url(&path), FULL).await.header("x-cache"),
        Some("HIT")
    );

    // A write through A.
    let put = send_json(Method::PUT, &a.url(&path), FULL, r#"{"description": "v3"}"#).await;
    assert_eq!(put.status, StatusCode::OK);
    until_fresh(&b, &path, "v3").await;
    // B's fresh copies came from the site, not from A.
    let gets_after = up
        .received()
        .iter()
        .filter(|r| r.method == Method::GET)
        .count();
    assert!(gets_after > gets_before);
    let m = b.metrics().await;
    assert!(
        metric_value(
            &m,
            "erpgate_redis_pubsub_messages_total",
            &[("direction", "received")]
        ) >= 2.0
    );
    assert!(
        metric_value(
            &m,
            "erpgate_cache_invalidations_total",
            &[("reason", "replica")]
        ) >= 2.0
    );
}

#[tokio::test]
async fn with_redis_killed_unkeyed_requests_pass_keyed_writes_get_503_and_all_comes_back() {
    let mut redis = Redis::start();
    let up = upstream().await;
    let (a, b) = two_replicas(&shared_config(
        &up,
        &redis,
        "rate_limit: { per_second: 1000, burst: 1000 }",
    ))
    .await;
    let created = send_json(
        Method::POST,
        &a.url("/api/resource/ToDo"),
        FULL,
        r#"{"description": "kept"}"#,
    )
    .await;
    let name = created.json()["data"]["name"].as_str().unwrap().to_owned();
    let path = format!("/api/resource/ToDo/{name}");
    get(&b.url(&path), FULL).await;
    assert_eq!(
        get(&b.url(&path), FULL).await.header("x-cache"),
        Some("HIT")
    );

    // Load on both replicas while Redis dies under it.
    let load = {
        let urls = [a.url("/api/resource/ToDo"), b.url("/api/resource/ToDo")];
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..200 {
                let started = Instant::now();
                let reply = get(&urls[i % 2], FULL).await;
                statuses.push((reply.status, started.elapsed()));
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    redis.kill();
    let statuses = load.await.unwrap();
    for (status, took) in &statuses {
        assert_eq!(
            *status,
            StatusCode::OK,
            "no request without a key fails for Redis"
        );
        assert!(*took < Duration::from_secs(2), "held {took:?}");
    }
    wait_for(&a, "erpgate_redis_up", 0.0).await;
    wait_for(&b, "erpgate_redis_up", 0.0).await;

    let posts_before = posts_to(&up, "/api/resource/ToDo");
    let keyed = keyed_post(
        &b,
        "/api/resource/ToDo",
        FULL,
        "while-down",
        r#"{"description": "x"}"#,
    )
    .await;
    assert_eq!(keyed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(keyed.json()["exc_type"], "SharedStateUnavailable");
    assert_eq!(keyed.header("retry-after"), Some("1"));
    assert_eq!(
        posts_to(&up, "/api/resource/ToDo"),
        posts_before,
        "not sent: exactly-once could not be kept"
    );
    // Unkeyed writes still pass; the cache is bypassed (it could miss invalidations).
    let plain = send_json(
        Method::POST,
        &b.url("/api/resource/ToDo"),
        FULL,
        r#"{"description": "y"}"#,
    )
    .await;
    assert_eq!(plain.status, StatusCode::OK);
    assert_eq!(
        get(&b.url(&path), FULL).await.header("x-cache"),
        Some("BYPASS")
    );
    let m = b.metrics().await;
    assert!(
        metric_value(
            &m,
            "erpgate_shared_state_fallbacks_total",
            &[("what", "quota")]
        ) >= 1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "erpgate_shared_state_fallbacks_total",
            &[("what", "idempotency_refused")]
        ),
        1.0
    );
    assert!(metric_value(&m, "erpgate_redis_errors_total", &[]) >= 1.0);
    // /readyz does not follow Redis unless asked.
    let ready = send(Method::GET, &format!("{}/readyz", b.admin), &[], "").await;
    assert_eq!(ready.status, StatusCode::OK);

    // Redis returns: shared mode comes back by itself; the caches were dropped on resubscribe.
    redis.restart();
    wait_for(&a, "erpgate_redis_up", 1.0).await;
    wait_for(&b, "erpgate_redis_up", 1.0).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = get(&b.url(&path), FULL).await;
        match reply.header("x-cache") {
            Some("BYPASS") if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => {
                assert_eq!(other, Some("MISS"), "the old entry was not served");
                break;
            }
        }
    }
    let keyed = keyed_post(
        &a,
        "/api/resource/ToDo",
        FULL,
        "after",
        r#"{"description": "z"}"#,
    )
    .await;
    assert_eq!(keyed.status, StatusCode::OK);
    let replay = keyed_post(
        &b,
        "/api/resource/ToDo",
        FULL,
        "after",
        r#"{"description": "z"}"#,
    )
    .await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
}

#[tokio::test]
async fn the_operator_may_run_keyed_writes_unprotected_and_tie_readiness_to_redis() {
    let mut redis = Redis::start();
    let up = upstream().await;
    let yaml = shared_config(&up, &redis, "").replace(
        "command_timeout: 200ms }",
        "command_timeout: 200ms, idempotency_when_unavailable: unprotected, readyz_requires_redis: true }",
    );
    let (a, _b) = two_replicas(&yaml).await;
    let ready = send(Method::GET, &format!("{}/readyz", a.admin), &[], "").await;
    assert_eq!(ready.status, StatusCode::OK);
    redis.kill();
    // The first command after the kill finds Redis gone.
    get(&a.url("/api/resource/ToDo"), FULL).await;
    wait_for(&a, "erpgate_redis_up", 0.0).await;
    let keyed = keyed_post(
        &a,
        "/api/resource/ToDo",
        FULL,
        "k",
        r#"{"description": "x"}"#,
    )
    .await;
    assert_eq!(keyed.status, StatusCode::OK);
    assert_eq!(posts_to(&up, "/api/resource/ToDo"), 1);
    let m = a.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "erpgate_shared_state_fallbacks_total",
            &[("what", "idempotency_unprotected")]
        ),
        1.0
    );
    let ready = send(Method::GET, &format!("{}/readyz", a.admin), &[], "").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn a_gateway_starts_and_serves_with_redis_absent() {
    let mut redis = Redis::start();
    redis.kill();
    let up = upstream().await;
    let gw = Gateway::start(&shared_config(&up, &redis, "")).await;
    let reply = get(&gw.url("/api/resource/ToDo"), FULL).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(up.count(), 1);
    redis.restart();
    wait_for(&gw, "erpgate_redis_up", 1.0).await;
}

#[tokio::test]
async fn a_redis_restart_between_requests_is_logged_counted_and_served_through() {
    let mut redis = Redis::start();
    let up = upstream().await;
    let config = shared_config(&up, &redis, "").replace(
        "log: { format: pretty, level: warn }",
        "log: { format: json, level: info }",
    );
    let gateway = GatewayProcess::start(&scratch_file("redis-restart.yaml", &config));
    let base = format!("http://{}", gateway.listen);
    let metrics_url = format!("http://{}/metrics", gateway.admin);
    let mut logs = gateway.startup_logs.clone();
    // A healthy connection is news at `info`, not `warn`.
    let connected = next_log_where(&gateway, &mut logs, |l| {
        l["message"] == "shared state: connected to Redis"
    });
    assert_eq!(connected["level"], "INFO");
    assert!(connected["run_id"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));
    let reachable = next_log_where(&gateway, &mut logs, |l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("shared state: Redis reachable"))
    });
    assert_eq!(reachable["level"], "INFO");
    wait_for_metric(&metrics_url, "erpgate_redis_up", 1.0).await;
    assert_eq!(
        metric_value(
            &fetch_text(&metrics_url).await,
            "erpgate_redis_restarts_total",
            &[]
        ),
        0.0
    );

    let auth = token(FULL);
    let todo = format!("{base}/api/resource/ToDo");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("idempotency-key", "before-the-restart"),
    ];
    let keyed = || {
        send(
            Method::POST,
            &todo,
            &headers,
            r#"{"description": "order 7"}"#.to_owned(),
        )
    };
    assert_eq!(keyed().await.status, StatusCode::OK);
    let replayed = keyed().await;
    assert_eq!(replayed.header("idempotent-replayed"), Some("true"));
    assert_eq!(posts_to(&up, "/api/resource/ToDo"), 1);

    // Redis restarts (killed, started again empty on the same port) between two requests.
    redis.kill();
    redis.restart();
    assert_eq!(get(&todo, FULL).await.status, StatusCode::OK);

    wait_for_metric(&metrics_url, "erpgate_redis_restarts_total", 1.0).await;
    let restarted = next_log_where(&gateway, &mut logs, |l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("shared state: Redis restarted"))
    });
    assert_eq!(restarted["level"], "WARN");
    assert_ne!(restarted["run_id"], connected["run_id"]);
    assert_eq!(restarted["previous_run_id"], connected["run_id"]);
    for lost in ["quota", "Idempotency-Key", "events"] {
        assert!(
            restarted["message"].as_str().unwrap().contains(lost),
            "the warning names what was lost ({lost}): {restarted}"
        );
    }
    wait_for_metric(&metrics_url, "erpgate_redis_up", 1.0).await;
    assert_eq!(get(&todo, FULL).await.status, StatusCode::OK);
    // The restart cost the key's record: the same write runs again, as the warning said.
    let again = keyed().await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.header("idempotent-replayed"), None);
    assert_eq!(posts_to(&up, "/api/resource/ToDo"), 2);
    // And the record is shared again: a repeat now is a replay.
    assert_eq!(keyed().await.header("idempotent-replayed"), Some("true"));
    assert_eq!(posts_to(&up, "/api/resource/ToDo"), 2);
    // Reconnecting to the same server is no restart.
    assert_eq!(
        metric_value(
            &fetch_text(&metrics_url).await,
            "erpgate_redis_restarts_total",
            &[]
        ),
        1.0
    );
}

/// The first line of `seen` (taken out of it) or else the next of `gateway`'s log lines that
/// `wanted` picks; lines read meanwhile are kept in `seen`.
fn next_log_where(
    gateway: &GatewayProcess,
    seen: &mut Vec<serde_json::Value>,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    if let Some(at) = seen.iter().position(&wanted) {
        return seen.remove(at);
    }
    loop {
        let line = gateway.next_log();
        if wanted(&line) {
            return line;
        }
        seen.push(line);
    }
}

async fn fetch_text(url: &str) -> String {
    send(Method::GET, url, &[], bytes::Bytes::new())
        .await
        .text()
}

/// Waits (at most 10 s) for a metric at the admin `url` to reach `value`.
async fn wait_for_metric(url: &str, metric: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_value(&fetch_text(url).await, metric, &[]) != value {
        assert!(Instant::now() < deadline, "{metric} never became {value}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
