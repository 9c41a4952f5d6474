//! Resilience over real sockets against the Frappe-compatible upstream: circuit breaking,
//! deadlines, broken connections, retries and their budget, Idempotency-Key, quotas and the
//! concurrency cap. Each test asserts what the client saw and what reached the upstream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::*;

/// `base_config` with extra top-level lines, the `erp` site's timeouts line replaced by
/// `site` lines, and extra lines for the `full` client. Lines are given without indentation.
fn config(up: &FrappeUpstream, top: &str, site: &str, full_client: &str) -> String {
    let indent = |lines: &str, by: &str| -> String {
        lines
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| format!("{by}{l}\n"))
            .collect()
    };
    let site = if site.contains("timeouts:") {
        site.to_owned()
    } else {
        format!("timeouts: {{ connect: 1s, request: 3s }}\n{site}")
    };
    let yaml = base_config(up)
        .replace("sites:\n", &format!("{}sites:\n", indent(top, "")))
        .replace(
            "    timeouts: { connect: 1s, request: 3s }\n",
            &indent(&site, "    "),
        )
        .replace(
            "    service_account: sync\n",
            &format!("    service_account: sync\n{}", indent(full_client, "    ")),
        );
    assert!(yaml.contains("site_name"), "config template changed");
    yaml
}

fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(text, name, labels)
}

async fn get_path(gw: &Gateway, path: &str, credential: Credential) -> Reply {
    get(&gw.url(path), credential).await
}

fn posts(up: &FrappeUpstream) -> usize {
    up.received()
        .iter()
        .filter(|r| r.method == Method::POST)
        .count()
}

#[tokio::test]
async fn a_refused_site_opens_the_breaker_fails_fast_and_a_probe_closes_it() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // The config is made for a live upstream, then pointed at the dead port.
    let placeholder = upstream().await;
    let yaml = config(
        &placeholder,
        "readyz_requires_closed_breakers: true",
        "retry: { max_retries: 0 }\nbreaker: { consecutive_failures: 3, open_base: 2s, open_max: 8s }",
        "",
    )
    .replace(&placeholder.url(), &format!("http://{dead}"));
    let gw = Gateway::start(&yaml).await;
    let readyz = || async {
        send(
            Method::GET,
            &format!("{}/readyz", gw.admin),
            &[],
            Bytes::new(),
        )
        .await
    };
    assert_eq!(readyz().await.status, StatusCode::OK);

    for _ in 0..3 {
        let reply = get_path(&gw, "/api/resource/ToDo", FULL).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    }
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "erpgate_breaker_state", &[("site", "erp")]), 2.0);
    assert_eq!(
        metric(
            &m,
            "erpgate_breaker_transitions_total",
            &[("site", "erp"), ("state", "open")]
        ),
        1.0
    );
    let ready = readyz().await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        ready.text().contains("circuit open: erp"),
        "{}",
        ready.text()
    );

    // The site comes back on the same port, but the breaker is still open: nothing reaches it.
    let up =
        FrappeUpstream::start_on(dead, SITE, &[(SYNC_KEY, SYNC_SECRET, "sync@example.com")]).await;
    for _ in 0..5 {
        let reply = get_path(&gw, "/api/resource/ToDo", FULL).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.json()["exc_type"], "UpstreamUnavailable");
        assert!(!reply.json()["exc"].as_str().unwrap().is_empty());
        let after: u64 = reply.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=2).contains(&after), "Retry-After {after}");
    }
    assert_eq!(
        up.count(),
        0,
        "requests reached the site while the breaker was open"
    );

    // After the open period one probe goes through and its success closes the breaker.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let reply = get_path(&gw, "/api/resource/ToDo", FULL).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(up.count(), 1);
    let reply = get_path(&gw, "/api/resource/ToDo", FULL).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(up.count(), 2);
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "erpgate_breaker_state", &[("site", "erp")]), 0.0);
    for state in ["half_open", "closed"] {
        assert_eq!(
            metric(
                &m,
                "erpgate_breaker_transitions_total",
                &[("site", "erp"), ("state", state)]
            ),
            1.0,
            "{state}"
        );
    }
    assert_eq!(readyz().await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_failed_probe_reopens_the_breaker_for_longer() {
    let up = upstream().await;
    let yaml = config(
        &up,
        "",
        "retry: { max_retries: 0 }\nbreaker: { consecutive_failures: 2, open_base: 1s, open_max: 8s }",
        "",
    );
    let gw = Gateway::start(&yaml).await;
    up.set_behaviour(Behaviour::Fail(503));
    for _ in 0..2 {
        assert_eq!(
            get_path(&gw, "/api/resource/ToDo", FULL).await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    assert_eq!(up.count(), 2);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The probe fails: open again, now for twice as long.
    let reply = get_path(&gw, "/api/resource/ToDo", FULL).await;
    assert_eq!(reply.json()["exc_type"], "ServerError");
    assert_eq!(up.count(), 3);
    let reply = get_path(&gw, "/api/resource/ToDo", FULL).await;
    assert_eq!(reply.json()["exc_type"], "UpstreamUnavailable");
    let after: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((2..=3).contains(&after), "Retry-After {after}");
    assert_eq!(up.count(), 3);
}

#[tokio::test]
async fn a_stalled_site_is_504_at_the_deadline_and_nothing_is_left_running() {
    let up = upstream().await;
    // One request in flight per client: a leaked permit would turn the next request into 429.
    let yaml = config(
        &up,
        "max_in_flight: 1",
        "timeouts: { connect: 1s, request: 10s, total: 400ms }",
        "",
    );
    let gw = Gateway::start(&yaml).await;
    up.set_behaviour(Behaviour::Stall);
    let reply = get_path(&gw, "/api/resource/ToDo", FULL).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.json()["exc_type"], "UpstreamTimeout");
    assert_eq!(up.count(), 1);
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "erpgate_inflight_requests", &[]), 0.0);

    up.set_behaviour(Behaviour::Normal);
    let reply = get_path(&gw, "/api/resource/ToDo", FULL).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn per_try_timeouts_are_retried_within_the_overall_deadline() {
    let up = upstream().await;
    let yaml = config(
        &up,
        "",
        "timeouts: { connect: 1s, request: 300ms, total: 500ms }\nretry: { max_retries: 5, backoff_base: 10ms }\nbreaker: { enabled: false }",
        "",
    );
    let gw = Gateway::start(&yaml).await;
    up.set_behaviour(Behaviour::Stall);
    let reply = get_path(&gw, "/api/resource/ToDo", FULL).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    // Without the overall deadline all six attempts would run (1.8 s); it stops the second.
    let attempts = up.count();
    assert!((1..=3).contains(&attempts), "{attempts} attempts");
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "erpgate_retries_total",
            &[("site", "erp"), ("reason", "timeout")]
        ) >= 1.0
    );
}

/// On a streaming route the answer's body is passed on as it comes: a site that stops sending
/// midway is cut off once it has sent nothing for `timeouts.request`, not waited on for ever.
#[tokio::test]
async fn a_site_that_stalls_mid_body_on_a_streaming_route_is_cut_off_after_the_request_timeout() {
    let up = upstream().await;
    let streaming =
        "routes:\n  - { path_prefix: /api/resource/ToDo, site: erp, streaming: true }\n";
    let config = base_config(&up).replace("request: 3s", "request: 1s") + streaming;
    let gw = Gateway::start(&config).await;
    up.set_behaviour(Behaviour::StallBody);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = Request::get(gw.url("/api/resource/ToDo"))
        .header("authorization", token(FULL))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let started = std::time::Instant::now();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("the stalled body was never cut off");
    assert!(body.is_err(), "a stalled body was passed off as whole");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "cut off after {waited:?}"
    );
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn a_connection_broken_mid_response_reaches_the_client_as_an_error() {
    let up = upstream().await;
    let streaming =
        "routes:\n  - { path_prefix: /api/resource/ToDo, site: erp, streaming: true }\n";
    let gw = Gateway::start(&(base_config(&up) + streaming)).await;
    up.set_behaviour(Behaviour::BreakBody);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = |path: &str| {
        Request::get(gw.url(path))
            .header("authorization", token(FULL))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), async {
        let response = client.request(request("/api/resource/ToDo")).await.unwrap();
        (response.status(), response.into_body().collect().await)
    })
    .await
    .expect("the broken response did not end");
    // Streaming: the head was passed on as it came; the break reaches the client as a broken
    // body.
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_err(), "a truncated body was passed off as whole");
    // Headers had been passed on: too late to retry, even a GET.
    assert_eq!(up.count(), 1);

    // Buffered (the default): the break is seen before anything is sent, and answered 502.
    let reply = get_path(&gw, "/api/method/frappe.auth.get_logged_user", FULL).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(reply.json()["exc_type"], "BadGateway");
    assert_eq!(up.count(), 2);

    up.set_behaviour(Behaviour::Normal);
    let reply = get_path(&gw, "/api/resource/ToDo", FULL).await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn reads_that_get_503_once_are_retried_and_writes_are_not() {
    let up = upstream().await;
    let yaml = config(&up, "", "retry: { backoff_base: 5ms }", "");
    let gw = Gateway::start(&yaml).await;

    up.set_behaviour(Behaviour::FailNext(1, 503));
    let reply = get_path(&gw, "/api/resource/ToDo", FULL).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(up.count(), 2);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "erpgate_retries_total",
            &[("site", "erp"), ("reason", "status")]
        ),
        1.0
    );

    // A read-only method is safe to repeat whatever its verb.
    up.clear();
    up.set_behaviour(Behaviour::FailNext(1, 503));
    let reply = send_json(
        Method::POST,
        &gw.url("/api/method/frappe.auth.get_logged_user"),
        FULL,
        "{}",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(up.count(), 2);

    // A create is not: the 503 is the client's answer and the site saw one POST.
    up.clear();
    up.set_behaviour(Behaviour::FailNext(1, 503));
    let reply = send_json(Method::POST, &gw.url("/api/resource/ToDo"), FULL, "{}").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn a_post_whose_connection_broke_after_sending_is_not_retried() {
    let up = upstream().await;
    let yaml = config(
        &up,
        "",
        "retry: { backoff_base: 5ms }\nbreaker: { enabled: false }",
        "",
    );
    let gw = Gateway::start(&yaml).await;
    up.set_behaviour(Behaviour::Drop);
    let reply = send_json(
        Method::POST,
        &gw.url("/api/resource/ToDo"),
        FULL,
        r#"{"description": "once"}"#,
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.json()["exc_type"], "BadGateway");
    assert_eq!(up.count(), 1, "the POST was sent twice");
    assert_eq!(posts(&up), 1);

    // The same failure on a GET is retried (two retries by default).
    up.clear();
    let reply = get_path(&gw, "/api/resource/ToDo", FULL).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(up.count(), 3);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "erpgate_retries_total",
            &[("site", "erp"), ("reason", "reset")]
        ),
        2.0
    );
}

#[tokio::test]
async fn frappes_own_429_is_passed_on_not_retried_and_does_not_trip_the_breaker() {
    let up = upstream().await;
    let yaml = config(&up, "", "breaker: { consecutive_failures: 2 }", "");
    let gw = Gateway::start(&yaml).await;
    up.set_behaviour(Behaviour::Throttle(7));
    for _ in 0..4 {
        let reply = get_path(&gw, "/api/resource/ToDo", FULL).await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(reply.header("retry-after"), Some("7"));
        assert_eq!(reply.json()["exc_type"], "TooManyRequestsError");
    }
    assert_eq!(up.count(), 4, "a 429 was retried");
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "erpgate_breaker_state", &[("site", "erp")]), 0.0);
    assert_eq!(metric(&m, "erpgate_retries_total", &[]), 0.0);
}

#[tokio::test]
async fn concurrent_posts_with_one_idempotency_key_create_one_document() {
    let up = upstream().await;
    let gw = std::sync::Arc::new(Gateway::start(&base_config(&up)).await);
    let body = r#"{"description": "order 42"}"#;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            keyed_post(&gw, "/api/resource/ToDo", FULL, "order-42", body).await
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    assert_eq!(posts(&up), 1, "more than one document was created");
    let created: Vec<&Reply> = answers
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .collect();
    assert!(!created.is_empty());
    for reply in &answers {
        match reply.status {
            StatusCode::OK => assert_eq!(reply.body, created[0].body),
            StatusCode::CONFLICT => {
                assert_eq!(reply.json()["exc_type"], "IdempotencyKeyInUse");
            }
            other => panic!("unexpected {other}: {}", reply.text()),
        }
    }
    let name = created[0].json()["data"]["name"]
        .as_str()
        .unwrap()
        .to_owned();

    // A later repeat replays the first answer without reaching the site.
    let replay = keyed_post(&gw, "/api/resource/ToDo", FULL, "order-42", body).await;
    assert_eq!(replay.status, StatusCode::OK);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.json()["data"]["name"], name.as_str());
    assert_eq!(posts(&up), 1);

    // The same key for a different request is refused.
    let other = keyed_post(
        &gw,
        "/api/resource/ToDo",
        FULL,
        "order-42",
        r#"{"description": "x"}"#,
    )
    .await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.json()["exc_type"], "IdempotencyKeyMismatch");
    assert_eq!(posts(&up), 1);

    // Without the header, every POST creates.
    for _ in 0..2 {
        let reply = send_json(Method::POST, &gw.url("/api/resource/ToDo"), FULL, body).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.header("idempotent-replayed").is_none());
    }
    assert_eq!(posts(&up), 3);
}

#[tokio::test]
async fn idempotency_keys_are_private_to_each_client() {
    let up = upstream().await;
    let yaml = base_config(&up).replace(
        "resources: { ToDo: [read] }",
        "resources: { ToDo: [read, create] }",
    );
    let gw = Gateway::start(&yaml).await;
    let body = r#"{"description": "mine"}"#;
    let first = keyed_post(&gw, "/api/resource/ToDo", FULL, "shared-key", body).await;
    assert_eq!(first.status, StatusCode::OK);
    let auth = token(TODO_READER);
    let second = send(
        Method::POST,
        &gw.url("/api/resource/ToDo"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("idempotency-key", "shared-key"),
        ],
        body.to_owned(),
    )
    .await;
    assert_eq!(second.status, StatusCode::OK);
    assert!(second.header("idempotent-replayed").is_none());
    assert_eq!(posts(&up), 2);
}

#[tokio::test]
async fn under_a_failing_site_retries_stay_within_the_budget() {
    let up = upstream().await;
    // 10 % of requests plus a floor of 1/s over tower's 10 s window (10 retries).
    let yaml = config(
        &up,
        "rate_limit: null",
        "retry: { max_retries: 3, backoff_base: 1ms, backoff_max: 2ms, budget_percent: 10, budget_min_per_second: 1 }\nbreaker: { enabled: false }",
        "",
    );
    let gw = std::sync::Arc::new(Gateway::start(&yaml).await);
    up.set_behaviour(Behaviour::Fail(503));
    let requests = 200usize;
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            for _ in (worker..requests).step_by(4) {
                let reply = get_path(&gw, "/api/resource/ToDo", FULL).await;
                assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let attempts = up.count();
    let bound = requests as f64 * (1.0 + 0.10) + 10.0;
    assert!(
        attempts as f64 <= bound,
        "{attempts} upstream attempts for {requests} requests (bound {bound})"
    );
    // Without a budget, max_retries alone would allow 800.
    assert!(attempts > requests);
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "erpgate_retries_total",
            &[("site", "erp"), ("reason", "budget_exhausted")]
        ) > 0.0
    );
}

#[tokio::test]
async fn a_client_over_quota_gets_429_with_headers_while_another_gets_200() {
    let up = upstream().await;
    let yaml = config(&up, "", "", "rate_limit: { per_minute: 3 }");
    let gw = Gateway::start(&yaml).await;
    for remaining in [2, 1, 0] {
        let reply = get_path(&gw, "/api/resource/ToDo", FULL).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("x-ratelimit-limit"), Some("3"));
        assert_eq!(
            reply.header("x-ratelimit-remaining"),
            Some(remaining.to_string().as_str())
        );
        assert_eq!(
            reply.header("ratelimit-policy"),
            Some("\"default\";q=3;w=60")
        );
        assert!(reply
            .header("ratelimit")
            .unwrap()
            .starts_with(&format!("\"default\";r={remaining};t=")));
    }
    let reply = get_path(&gw, "/api/resource/ToDo", FULL).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.json()["exc_type"], "TooManyRequestsError");
    assert!(!reply.json()["exc"].as_str().unwrap().is_empty());
    let after: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&after), "Retry-After {after}");
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(
        reply.header("x-ratelimit-reset"),
        Some(after.to_string().as_str())
    );
    assert_eq!(up.count(), 3);

    // Another client is untouched: its own quota (the default, 100/s with a burst of 200).
    let other = get_path(&gw, "/api/resource/ToDo", TODO_READER).await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(other.header("x-ratelimit-remaining"), Some("199"));
    assert_eq!(
        other.header("ratelimit-policy"),
        Some("\"default\";q=200;w=2")
    );
    assert_eq!(up.count(), 4);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "erpgate_rate_limited_total",
            &[("client", "full"), ("reason", "rate")]
        ),
        1.0
    );
}

#[tokio::test]
async fn every_answer_to_a_limited_client_carries_its_quota_even_errors() {
    let up = upstream().await;
    let yaml = config(
        &up,
        "",
        "retry: { max_retries: 0 }\nbreaker: { enabled: false }",
        "rate_limit: { per_second: 10, burst: 20 }",
    );
    let gw = Gateway::start(&yaml).await;
    // A Frappe answer, an upstream error, a gateway error (broken connection: 502).
    let not_found = get_path(&gw, "/api/resource/ToDo/nothing", FULL).await;
    assert_eq!(not_found.status, StatusCode::NOT_FOUND);
    up.set_behaviour(Behaviour::Fail(500));
    let failed = get_path(&gw, "/api/resource/ToDo", FULL).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    up.set_behaviour(Behaviour::Drop);
    let broken = get_path(&gw, "/api/resource/ToDo", FULL).await;
    assert_eq!(broken.status, StatusCode::BAD_GATEWAY);
    assert_eq!(broken.json()["exc_type"], "BadGateway");
    for (reply, remaining) in [(&not_found, "19"), (&failed, "18"), (&broken, "17")] {
        assert_eq!(reply.header("x-ratelimit-limit"), Some("20"));
        assert_eq!(reply.header("x-ratelimit-remaining"), Some(remaining));
        assert_eq!(
            reply.header("ratelimit-policy"),
            Some("\"default\";q=20;w=2")
        );
    }
    // A refusal by the access rules costs quota and says so.
    let yaml = config(&up, "rate_limit: { per_minute: 5 }", "", "");
    let gw = Gateway::start(&yaml).await;
    let refused = get_path(&gw, "/api/resource/User", TODO_READER).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.header("x-ratelimit-remaining"), Some("4"));
    assert_eq!(up.count(), 3);
}

#[tokio::test]
async fn writes_have_their_own_smaller_quota() {
    let up = upstream().await;
    let yaml = config(&up, "write_rate_limit: { per_minute: 1 }", "", "");
    let gw = Gateway::start(&yaml).await;
    let url = gw.url("/api/resource/ToDo");
    let create = || send_json(Method::POST, &url, FULL, "{}");
    assert_eq!(create().await.status, StatusCode::OK);
    let refused = create().await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.header("x-ratelimit-limit"), Some("1"));
    // A non-read-only method is a write; reads still pass.
    let method = send_json(
        Method::POST,
        &gw.url("/api/method/frappe.client.insert"),
        FULL,
        "{}",
    )
    .await;
    assert_eq!(method.status, StatusCode::TOO_MANY_REQUESTS);
    let read = get_path(&gw, "/api/resource/ToDo", FULL).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(posts(&up), 1);
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn the_concurrency_cap_answers_429_retry_after_1() {
    let up = upstream().await;
    let yaml = config(&up, "", "", "max_in_flight: 2");
    let gw = std::sync::Arc::new(Gateway::start(&yaml).await);
    let mut slow = Vec::new();
    for _ in 0..2 {
        let gw = gw.clone();
        slow.push(tokio::spawn(async move {
            get_path(&gw, "/api/method/test.slow?ms=1500", FULL).await
        }));
    }
    for _ in 0..100 {
        if up.count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(up.count(), 2);
    let reply = get_path(&gw, "/api/resource/ToDo", FULL).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(reply.json()["exc_type"], "TooManyRequestsError");
    // Another client is not held up by this one's slow reports.
    let other = get_path(&gw, "/api/resource/ToDo", TODO_READER).await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(up.count(), 3);
    for task in slow {
        assert_eq!(task.await.unwrap().status, StatusCode::OK);
    }
    // The slots are free again.
    let reply = get_path(&gw, "/api/resource/ToDo", FULL).await;
    assert_eq!(reply.status, StatusCode::OK);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "erpgate_rate_limited_total",
            &[("client", "full"), ("reason", "concurrency")]
        ),
        1.0
    );
}

/// `config` with `routes` (YAML lines, unindented) added before the clients.
fn with_routes(yaml: String, routes: &str) -> String {
    yaml.replace("clients:\n", &format!("routes:\n{routes}clients:\n"))
}

/// A route's own timeouts replace its site's for what it matches: a report beyond the site's
/// deadline but within the route's is answered; everything else is still cut at the site's.
#[tokio::test]
async fn a_long_route_is_not_cut_at_the_sites_deadline_and_other_requests_still_are() {
    let up = upstream().await;
    let yaml = config(
        &up,
        "",
        "timeouts: { connect: 1s, request: 400ms, total: 400ms }",
        "",
    );
    let yaml = with_routes(
        yaml,
        "  - methods: [test.slow]\n    site: erp\n    timeouts: { request: 10s, total: 10s }\n",
    );
    let gw = Gateway::start(&yaml).await;

    let reply = get_path(&gw, "/api/method/test.slow?ms=1200", FULL).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["message"], "slow done");

    // A request the route does not match, on a stalled site: 504 at the site's deadline, long
    // before the route's 10 s.
    up.set_behaviour(Behaviour::Stall);
    let started = std::time::Instant::now();
    let reply = get_path(&gw, "/api/method/ping", FULL).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.json()["exc_type"], "UpstreamTimeout");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not the site's deadline"
    );
}

/// A route's timeouts may be shorter than its site's too; a `path_prefix` route is enough for a
/// method always called by its path.
#[tokio::test]
async fn a_route_can_shorten_its_sites_timeouts() {
    let up = upstream().await;
    let yaml = config(&up, "", "", "");
    let yaml = with_routes(
        yaml,
        "  - path_prefix: /api/method/test.slow\n    site: erp\n    timeouts: { total: 300ms }\n",
    );
    let gw = Gateway::start(&yaml).await;
    // The site's 3 s request timeout would let this through; the route's 300 ms does not.
    let reply = get_path(&gw, "/api/method/test.slow?ms=2000", FULL).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(up.count(), 1);
    let reply = get_path(&gw, "/api/method/ping", FULL).await;
    assert_eq!(reply.status, StatusCode::OK);
}

/// A GET timing out is retried on its site; on a route with its own timeouts it is not (a
/// two-minute report is not run again), unless the route sets its own retries.
#[tokio::test]
async fn a_request_on_a_long_route_is_not_retried_after_its_timeout() {
    let site = "timeouts: { connect: 1s, request: 300ms, total: 5s }\nretry: { max_retries: 3, backoff_base: 10ms, backoff_max: 10ms }\nbreaker: { enabled: false }";
    let route =
        "  - methods: [test.slow]\n    site: erp\n    timeouts: { request: 300ms, total: 5s }\n";

    // The site alone retries the timed-out GET.
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, "", site, "")).await;
    let reply = get_path(&gw, "/api/method/test.slow?ms=2000", FULL).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(up.count(), 4, "the site's retries");

    // The long route: one attempt reached the site.
    let up = upstream().await;
    let gw = Gateway::start(&with_routes(config(&up, "", site, ""), route)).await;
    let reply = get_path(&gw, "/api/method/test.slow?ms=2000", FULL).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(up.count(), 1, "a long route's request was retried");
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "erpgate_retries_total",
            &[("site", "erp"), ("reason", "timeout")]
        ),
        0.0
    );

    // Unless the route asks for retries.
    let up = upstream().await;
    let route = format!("{route}    retry: {{ max_retries: 1 }}\n");
    let gw = Gateway::start(&with_routes(config(&up, "", site, ""), &route)).await;
    let reply = get_path(&gw, "/api/method/test.slow?ms=2000", FULL).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(up.count(), 2);
}
