//! The event relay (README "Events"): signed Frappe webhooks fanned out to clients'
//! subscriptions under their rules, retried until the subscriber is back, kept across a
//! SIGKILL, signed in the Standard Webhooks format (checked with the scheme's own Python
//! library), dead letters listed and replayed, two replicas on one Redis delivering each event
//! once, the pull feed with its cursor and long-poll, and events bound to the doctype their
//! Webhook URL names (a signed body naming another is refused). Subscribers are real HTTP
//! servers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use sha2::Sha256;

use support::redis::Redis;
use support::*;

const WEBHOOK_SECRET: &str = "frappe-webhook-secret";

/// A Standard Webhooks secret made of `seed` bytes.
fn whsec(seed: u8) -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode([seed; 32])
    )
}

/// One delivery a subscriber received.
#[derive(Debug, Clone)]
struct Received {
    headers: HashMap<String, String>,
    body: Bytes,
}

impl Received {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
    fn id(&self) -> String {
        self.headers["webhook-id"].clone()
    }
    /// `doctype/name/event` of the delivered event.
    fn what(&self) -> String {
        let data = &self.json()["data"];
        format!(
            "{}/{}/{}",
            data["doctype"].as_str().unwrap(),
            data["name"].as_str().unwrap_or(""),
            data["event"].as_str().unwrap()
        )
    }
}

/// A subscriber: a real HTTP server recording deliveries and answering from a script of
/// statuses (then `otherwise`).
struct Subscriber {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<VecDeque<u16>>>,
    otherwise: Arc<Mutex<u16>>,
    /// Delays before answering, one per request, first first.
    delays: Arc<Mutex<VecDeque<Duration>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    async fn start() -> Self {
        Self::start_on(0).await
    }

    async fn start_on(port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::new()));
        let otherwise = Arc::new(Mutex::new(200));
        let delays = Arc::new(Mutex::new(VecDeque::new()));
        let (r, s, o, d) = (
            received.clone(),
            script.clone(),
            otherwise.clone(),
            delays.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (r, s, o, d) = (r.clone(), s.clone(), o.clone(), d.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<_>| {
                        let (r, s, o, d) = (r.clone(), s.clone(), o.clone(), d.clone());
                        async move {
                            let (parts, body) = request.into_parts();
                            let body = BodyExt::collect(body).await.unwrap().to_bytes();
                            let headers = parts
                                .headers
                                .iter()
                                .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
                                .collect();
                            r.lock().unwrap().push(Received { headers, body });
                            let delay = d.lock().unwrap().pop_front();
                            if let Some(delay) = delay {
                                tokio::time::sleep(delay).await;
                            }
                            let status =
                                s.lock().unwrap().pop_front().unwrap_or(*o.lock().unwrap());
                            let mut response = Response::new(Full::new(Bytes::new()));
                            *response.status_mut() = StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            received,
            script,
            otherwise,
            delays,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Deliveries answered 2xx, by what they carried.
    fn answer(&self, statuses: &[u16]) {
        self.script.lock().unwrap().extend(statuses);
    }

    /// The next requests are answered after these delays.
    fn delay(&self, delays: &[Duration]) {
        self.delays.lock().unwrap().extend(delays);
    }

    fn always(&self, status: u16) {
        *self.otherwise.lock().unwrap() = status;
    }

    /// Waits until `done` holds of what was received (at most 20 s).
    async fn until(&self, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let received = self.received();
            if done(&received) {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within 20s; received {:?}",
                received.iter().map(Received::what).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The admin listener's dead letters.
async fn dead_letters(gw: &Gateway) -> Vec<serde_json::Value> {
    let url = format!("{}/events/dead-letters", gw.admin);
    let unguarded = send(Method::GET, &url, &[], Bytes::new()).await;
    assert_eq!(unguarded.status, 403, "dead letters hold documents' data");
    let reply = send(Method::GET, &url, &[("x-erpgate-admin", "1")], Bytes::new()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["dead_letters"].as_array().unwrap().clone()
}

/// A free loopback port nobody listens on (yet).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scratch_dir(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!(
        "erpgate-events-{}-{name}-{}",
        std::process::id(),
        rand_suffix()
    ));
    dir.to_str().unwrap().to_owned()
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// `base_config` with a webhook secret on the site, an `events` section (`events`), and
/// `subscriptions` blocks spliced into the two clients; the full client may read every doctype
/// (events need an explicit grant).
fn config(up: &FrappeUpstream, events: &str, full_subs: &str, reader_subs: &str) -> String {
    base_config(up)
        .replace(
            "    timeouts: { connect: 1s, request: 3s }\n",
            &format!(
                "    timeouts: {{ connect: 1s, request: 3s }}\n    webhook: {{ secret: {WEBHOOK_SECRET} }}\n"
            ),
        )
        .replace(
            "    service_account: sync\n",
            &format!(
                "    service_account: sync\n    allow: {{ resources: {{ \"*\": [read] }} }}\n{full_subs}"
            ),
        )
        .replace(
            "      methods: [frappe.client.get_list]\n",
            &format!("      methods: [frappe.client.get_list]\n{reader_subs}"),
        )
        + events
}

fn subscription(name: &str, url: &str, doctypes: &str, extra: &str, seed: u8) -> String {
    format!(
        "    subscriptions:\n      {name}: {{ url: \"{url}\", doctypes: {doctypes}, secret: \"{}\"{extra} }}\n",
        whsec(seed)
    )
}

/// A gateway config whose full client has one subscription `all` to `url`.
fn one_subscription(
    up: &FrappeUpstream,
    store: &str,
    url: &str,
    doctypes: &str,
    seed: u8,
) -> String {
    config(
        up,
        &fast_events(&scratch_dir(store)),
        &subscription("all", url, doctypes, "", seed),
        "",
    )
}

fn fast_events(directory: &str) -> String {
    format!("events: {{ directory: \"{directory}\", initial_backoff: 50ms, max_backoff: 200ms }}\n")
}

fn sign(body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

fn frappe_body(doctype: &str, name: &str, event: &str) -> String {
    format!(
        r#"{{"doctype": "{doctype}", "name": "{name}", "event": "{event}", "description": "changed {name}", "modified": "2026-12-04 10:00:00.000000"}}"#
    )
}

/// Sends a webhook as Frappe does and expects it accepted (stored).
async fn accepted(base: &str, doctype: &str, name: &str, event: &str) {
    let reply = frappe_webhook(base, doctype, name, event).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// Sends what Frappe sends: the body signed with the site's webhook secret, to the doctype's
/// intake URL.
async fn frappe_webhook(base: &str, doctype: &str, name: &str, event: &str) -> Reply {
    signed_webhook(
        base,
        &intake("erp", doctype),
        &frappe_body(doctype, name, event),
    )
    .await
}

/// The path of `site`'s intake URL for `doctype`.
fn intake(site: &str, doctype: &str) -> String {
    format!(
        "/_erpgate/webhooks/frappe/{site}/{}",
        doctype.replace(' ', "%20")
    )
}

/// Posts `body` to `path`, signed with the site's webhook secret as Frappe signs what it sends.
async fn signed_webhook(base: &str, path: &str, body: &str) -> Reply {
    send(
        Method::POST,
        &format!("{base}{path}"),
        &[
            ("content-type", "application/json"),
            ("x-frappe-webhook-signature", &sign(body)),
        ],
        body.to_owned(),
    )
    .await
}

/// The events site `erp`'s webhooks fed in, in the `/metrics` text `m`.
fn events_received(m: &str) -> f64 {
    metric_value(m, "erpgate_events_received_total", &[("site", "erp")])
}

#[tokio::test]
async fn one_webhook_reaches_every_subscription_that_wants_it_and_that_its_client_may_read() {
    let up = upstream().await;
    let (all, reader_all, reader_inserts) = (
        Subscriber::start().await,
        Subscriber::start().await,
        Subscriber::start().await,
    );
    let yaml = config(
        &up,
        &fast_events(&scratch_dir("fanout")),
        &subscription("all", &all.url(), "[\"*\"]", "", 1),
        &format!(
            "{}      inserts: {{ url: \"{}\", doctypes: [ToDo], events: [after_insert], secret: \"{}\" }}\n",
            subscription("everything", &reader_all.url(), "[\"*\"]", "", 2),
            reader_inserts.url(),
            whsec(3)
        ),
    );
    let gw = Gateway::start(&yaml).await;
    for (doctype, name, event) in [
        ("ToDo", "T1", "on_update"),
        ("User", "someone@example.com", "on_update"),
        ("ToDo", "T2", "after_insert"),
    ] {
        let reply = frappe_webhook(&gw.base, doctype, name, event).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let got = all
        .until("all three to the full client", |r| r.len() >= 3)
        .await;
    let whats: Vec<String> = got.iter().map(Received::what).collect();
    assert_eq!(
        whats,
        [
            "ToDo/T1/on_update",
            "User/someone@example.com/on_update",
            "ToDo/T2/after_insert"
        ]
    );
    reader_all
        .until("the ToDo events to the reader", |r| r.len() >= 2)
        .await;
    reader_inserts
        .until("the insert to the reader's inserts", |r| !r.is_empty())
        .await;
    // Give any wrong delivery the time to arrive, then check nothing more came.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let whats: Vec<String> = reader_all.received().iter().map(Received::what).collect();
    assert_eq!(
        whats,
        ["ToDo/T1/on_update", "ToDo/T2/after_insert"],
        "a client without read on User gets no User event"
    );
    let whats: Vec<String> = reader_inserts
        .received()
        .iter()
        .map(Received::what)
        .collect();
    assert_eq!(whats, ["ToDo/T2/after_insert"]);
    assert_eq!(all.received().len(), 3);
    // The delivered body carries what Frappe sent, as it sent it.
    let first = &got[0].json();
    assert_eq!(first["type"], "erpnext.on_update");
    assert_eq!(first["data"]["site"], "erp");
    assert_eq!(first["data"]["doc"]["description"], "changed T1");
    // Nothing reached the upstream: events are erpgate's.
    assert_eq!(up.count(), 0, "nothing reaches the upstream");
    let m = gw.metrics().await;
    assert_eq!(events_received(&m), 3.0);
    assert_eq!(
        metric_value(
            &m,
            "erpgate_event_deliveries_total",
            &[
                ("client", "todo-reader"),
                ("subscription", "everything"),
                ("outcome", "delivered")
            ]
        ),
        2.0
    );
}

#[tokio::test]
async fn an_unsigned_or_wrongly_signed_webhook_is_neither_stored_nor_delivered() {
    let up = upstream().await;
    let sub = Subscriber::start().await;
    let yaml = one_subscription(&up, "unsigned", &sub.url(), "[\"*\"]", 1);
    let gw = Gateway::start(&yaml).await;
    let body = frappe_body("ToDo", "T1", "on_update");
    for signature in [None, Some(sign("{}"))] {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(s) = &signature {
            headers.push(("x-frappe-webhook-signature", s));
        }
        let reply = send(
            Method::POST,
            &gw.url("/_erpgate/webhooks/frappe/erp/ToDo"),
            &headers,
            body.clone(),
        )
        .await;
        assert_eq!(reply.status, 401);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(sub.received().is_empty());
    let feed = get(&gw.url("/_erpgate/events"), FULL).await;
    assert_eq!(feed.json()["message"]["events"], serde_json::json!([]));
}

#[tokio::test]
async fn failed_deliveries_are_retried_with_the_same_id_until_the_subscriber_is_back() {
    let up = upstream().await;
    let sub = Subscriber::start().await;
    // Down for four attempts (a 503, a 500, a 429, a redirect), then back.
    sub.answer(&[503, 500, 429, 302]);
    let yaml = one_subscription(&up, "retry", &sub.url(), "[ToDo]", 1);
    let gw = Gateway::start(&yaml).await;
    accepted(&gw.base, "ToDo", "T1", "on_update").await;
    let got = sub.until("five attempts", |r| r.len() >= 5).await;
    let ids: Vec<String> = got.iter().map(Received::id).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    // Each attempt is signed anew (its own timestamp), the body is the same.
    assert!(got.iter().all(|r| r.body == got[0].body));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(sub.received().len(), 5, "delivered once it succeeded");
    let m = gw.metrics().await;
    let outcome = |o| {
        metric_value(
            &m,
            "erpgate_event_deliveries_total",
            &[("client", "full"), ("subscription", "all"), ("outcome", o)],
        )
    };
    assert_eq!(outcome("failed"), 4.0);
    assert_eq!(outcome("delivered"), 1.0);
}

#[tokio::test]
async fn deliveries_carry_standard_webhooks_signatures_that_the_reference_library_accepts() {
    let up = upstream().await;
    let sub = Subscriber::start().await;
    let yaml = one_subscription(&up, "signatures", &sub.url(), "[\"*\"]", 7);
    let gw = Gateway::start(&yaml).await;
    for name in ["T1", "T2 with spaces", "T3-ü"] {
        accepted(&gw.base, "ToDo", name, "on_update").await;
    }
    let got = sub.until("three deliveries", |r| r.len() >= 3).await;
    // Verified by the Standard Webhooks Python library (tests/setup.sh installs it): one line
    // per delivery in, "ok" or the library's error out. A tampered copy must fail.
    let mut lines = String::new();
    for r in &got {
        for (body, secret) in [
            (String::from_utf8(r.body.to_vec()).unwrap(), whsec(7)),
            (
                String::from_utf8(r.body.to_vec())
                    .unwrap()
                    .replace("T", "X"),
                whsec(7),
            ),
            (String::from_utf8(r.body.to_vec()).unwrap(), whsec(8)),
        ] {
            lines.push_str(
                &serde_json::json!({ "secret": secret, "headers": r.headers, "body": body })
                    .to_string(),
            );
            lines.push('\n');
        }
    }
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
for line in sys.stdin:
    item = json.loads(line)
    try:
        Webhook(item["secret"]).verify(item["body"], item["headers"])
        print("ok")
    except Exception as e:
        print("refused: " + type(e).__name__)
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let verdicts: Vec<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(verdicts.len(), 9, "{verdicts:?}");
    for (i, verdict) in verdicts.iter().enumerate() {
        if i % 3 == 0 {
            assert_eq!(verdict, "ok", "delivery {} not verified", i / 3);
        } else {
            assert!(verdict.starts_with("refused"), "{verdicts:?}");
        }
    }
    for r in &got {
        assert!(r.headers["webhook-id"].starts_with("evt_"));
        assert!(r.headers["webhook-signature"].starts_with("v1,"));
        assert_eq!(r.headers["content-type"], "application/json");
    }
}

/// Where a test keeps its events: the embedded store, or Redis Streams.
enum TestStore {
    Disk(String),
    Redis(Redis, String),
}

impl TestStore {
    fn disk(name: &str) -> Self {
        Self::Disk(scratch_dir(name))
    }

    fn redis() -> Self {
        Self::Redis(Redis::start(), format!("ev{}:", rand_suffix()))
    }

    /// The `events` section with fast retries and `extra` keys (`, key: value`), and the
    /// `shared_state` section for Redis.
    fn yaml(&self, extra: &str) -> String {
        match self {
            Self::Disk(directory) => format!(
                "events: {{ directory: \"{directory}\", initial_backoff: 50ms, max_backoff: 100ms{extra} }}\n"
            ),
            Self::Redis(redis, prefix) => format!(
                "events: {{ initial_backoff: 50ms, max_backoff: 100ms{extra} }}\nshared_state:\n  redis: {{ url: \"{}\", key_prefix: \"{prefix}\", connect_timeout: 300ms, command_timeout: 500ms }}\n",
                redis.url()
            ),
        }
    }

    /// Waits until the gateway's store answers (Redis is connected in the background).
    async fn ready(&self, gw: &Gateway) {
        if let Self::Redis(..) = self {
            let deadline = Instant::now() + Duration::from_secs(10);
            while metric_value(&gw.metrics().await, "erpgate_redis_up", &[]) != 1.0 {
                assert!(Instant::now() < deadline, "Redis not up within 10s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn dead_letters_are_listed_and_replayed(store: TestStore) {
    let up = upstream().await;
    let sub = Subscriber::start().await;
    sub.always(500);
    let yaml = config(
        &up,
        &store.yaml(", retry_for: 1s"),
        &subscription("all", &sub.url(), "[ToDo]", "", 1),
        "",
    );
    let gw = Gateway::start(&yaml).await;
    store.ready(&gw).await;
    accepted(&gw.base, "ToDo", "T1", "on_update").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let letters = loop {
        let letters = dead_letters(&gw).await;
        if !letters.is_empty() {
            break letters;
        }
        assert!(Instant::now() < deadline, "no dead letter within 10s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["subscription"], "full/all");
    assert_eq!(letters[0]["reason"], "answered 500");
    assert_eq!(letters[0]["event"]["data"]["name"], "T1");
    assert_eq!(
        letters[0]["event"]["data"]["doc"]["description"],
        "changed T1"
    );
    let m = gw.metrics().await;
    let labels = [("client", "full"), ("subscription", "all")];
    assert_eq!(metric_value(&m, "erpgate_event_dead_letters", &labels), 1.0);
    assert_eq!(metric_value(&m, "erpgate_event_backlog", &labels), 0.0);
    let attempts = sub.received().len();
    assert!(attempts >= 3, "retried for retry_for: {attempts}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(sub.received().len(), attempts, "no attempt after burial");

    // Replay needs the admin header; then the (mended) subscriber gets it, once.
    sub.always(200);
    let refused = send(
        Method::POST,
        &format!("{}/events/replay", gw.admin),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(refused.status, 403);
    let replayed = send(
        Method::POST,
        &format!("{}/events/replay?subscription=full/all", gw.admin),
        &[("x-erpgate-admin", "1")],
        Bytes::new(),
    )
    .await;
    assert_eq!(replayed.json()["replayed"], 1);
    let got = sub
        .until("the replayed delivery", |r| r.len() > attempts)
        .await;
    assert_eq!(got.last().unwrap().what(), "ToDo/T1/on_update");
    assert_eq!(got.last().unwrap().id(), got[0].id(), "the same webhook-id");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(sub.received().len(), attempts + 1);
    assert!(dead_letters(&gw).await.is_empty());
}

#[tokio::test]
async fn an_undeliverable_event_becomes_a_dead_letter_that_the_admin_lists_and_replays() {
    dead_letters_are_listed_and_replayed(TestStore::disk("dead")).await;
}

#[tokio::test]
async fn an_undeliverable_event_becomes_a_dead_letter_that_the_admin_lists_and_replays_on_redis() {
    dead_letters_are_listed_and_replayed(TestStore::redis()).await;
}

/// A gateway (on `store`, with `extra` events keys) whose full client subscribes to ToDo events
/// at a port nobody listens on yet: the subscriber is down until the test starts it there.
async fn gateway_with_subscriber_down(
    store: &TestStore,
    extra: &str,
) -> (FrappeUpstream, Gateway, u16) {
    let up = upstream().await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let yaml = config(
        &up,
        &store.yaml(extra),
        &subscription("all", &url, "[ToDo]", "", 1),
        "",
    );
    let gw = Gateway::start(&yaml).await;
    store.ready(&gw).await;
    (up, gw, port)
}

async fn a_410_ends_queued_deliveries(store: TestStore) {
    // Down while three events queue up, then back answering 410 Gone.
    let (_up, gw, port) = gateway_with_subscriber_down(&store, "").await;
    for name in ["T1", "T2", "T3"] {
        accepted(&gw.base, "ToDo", name, "on_update").await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sub = Subscriber::start_on(port).await;
    sub.always(410);
    sub.until("a first attempt", |r| !r.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    // One 410 ends all three: nothing more is sent.
    assert_eq!(sub.received().len(), 1);
    let letters = dead_letters(&gw).await;
    assert_eq!(letters.len(), 3, "{letters:?}");
    assert!(letters.iter().all(|l| l["reason"] == "410 Gone"));
    let m = gw.metrics().await;
    let labels = [("client", "full"), ("subscription", "all")];
    assert_eq!(metric_value(&m, "erpgate_event_backlog", &labels), 0.0);
    assert_eq!(metric_value(&m, "erpgate_event_dead_letters", &labels), 3.0);
}

#[tokio::test]
async fn a_subscriber_answering_410_ends_its_queued_deliveries() {
    a_410_ends_queued_deliveries(TestStore::disk("gone")).await;
}

#[tokio::test]
async fn a_subscriber_answering_410_ends_its_queued_deliveries_on_redis() {
    a_410_ends_queued_deliveries(TestStore::redis()).await;
}

async fn the_cap_drops_the_oldest(store: TestStore) {
    let (_up, gw, port) =
        gateway_with_subscriber_down(&store, ", max_pending_per_subscription: 3").await;
    for n in 1..=5 {
        accepted(&gw.base, "ToDo", &format!("T{n}"), "on_update").await;
    }
    let m = gw.metrics().await;
    let labels = [("client", "full"), ("subscription", "all")];
    assert_eq!(
        metric_value(
            &m,
            "erpgate_event_deliveries_total",
            &[labels[0], labels[1], ("outcome", "dropped")]
        ),
        2.0
    );
    assert_eq!(metric_value(&m, "erpgate_event_backlog", &labels), 3.0);
    assert!(metric_value(&m, "erpgate_event_oldest_undelivered_seconds", &labels) > 0.0);
    let sub = Subscriber::start_on(port).await;
    let got = sub.until("the three kept", |r| r.len() >= 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut whats: Vec<String> = sub.received().iter().map(Received::what).collect();
    whats.sort();
    assert_eq!(
        whats,
        [
            "ToDo/T3/on_update",
            "ToDo/T4/on_update",
            "ToDo/T5/on_update"
        ],
        "{got:?}"
    );
}

#[tokio::test]
async fn a_subscription_keeps_at_most_its_cap_dropping_the_oldest_and_counting() {
    the_cap_drops_the_oldest(TestStore::disk("cap")).await;
}

#[tokio::test]
async fn a_subscription_keeps_at_most_its_cap_dropping_the_oldest_and_counting_on_redis() {
    the_cap_drops_the_oldest(TestStore::redis()).await;
}

/// The gateway binary killed with SIGKILL while its subscriber is down: every event it
/// answered 200 for is delivered by the next process on the same store.
#[tokio::test]
async fn accepted_events_survive_a_sigkill_and_are_delivered_after_restart() {
    let up = upstream().await;
    let port = free_port();
    let directory = scratch_dir("sigkill");
    let url = format!("http://127.0.0.1:{port}/hook");
    let yaml = config(
        &up,
        &fast_events(&directory),
        &subscription("all", &url, "[ToDo]", "", 1),
        "",
    )
    .replace(
        "log: { format: pretty, level: warn }",
        "log: { format: json, level: info }",
    );
    let path = scratch_file(&format!("events-sigkill-{}.yaml", rand_suffix()), &yaml);
    let mut first = GatewayProcess::start(&path);
    let base = format!("http://{}", first.listen);
    for n in 0..20 {
        let reply = frappe_webhook(&base, "ToDo", &format!("T{n}"), "on_update").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    first.child.kill().unwrap(); // SIGKILL: no shutdown, no flush
    first.child.wait().unwrap();
    drop(first);

    let sub = Subscriber::start_on(port).await;
    let second = GatewayProcess::start(&path);
    let got = sub
        .until("all 20 accepted events", |r| {
            let mut names: Vec<String> = r.iter().map(Received::what).collect();
            names.sort();
            names.dedup();
            names.len() >= 20
        })
        .await;
    let mut names: Vec<String> = got.iter().map(Received::what).collect();
    names.sort();
    names.dedup();
    let mut expected: Vec<String> = (0..20).map(|n| format!("ToDo/T{n}/on_update")).collect();
    expected.sort();
    assert_eq!(names, expected);
    // The feed kept them too.
    let feed = get(
        &format!("http://{}/_erpgate/events?limit=100", second.listen),
        FULL,
    )
    .await;
    assert_eq!(
        feed.json()["message"]["events"].as_array().unwrap().len(),
        20
    );
}

#[tokio::test]
async fn the_pull_feed_pages_with_a_cursor_filters_by_rules_and_long_polls() {
    let up = upstream().await;
    let yaml = config(&up, &fast_events(&scratch_dir("feed")), "", "");
    let gw = Gateway::start(&yaml).await;
    for (doctype, name) in [("ToDo", "T1"), ("User", "u@example.com"), ("ToDo", "T2")] {
        accepted(&gw.base, doctype, name, "on_update").await;
    }
    let names = |reply: &Reply| -> Vec<String> {
        reply.json()["message"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["data"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    // Full client: everything, in pages of two.
    let page = get(&gw.url("/_erpgate/events?limit=2"), FULL).await;
    assert_eq!(page.status, 200);
    assert_eq!(names(&page), ["T1", "u@example.com"]);
    let next = page.json()["message"]["next"].as_str().unwrap().to_owned();
    let page = get(&gw.url(&format!("/_erpgate/events?since={next}")), FULL).await;
    assert_eq!(names(&page), ["T2"]);
    // The ToDo reader never sees the User event; a doctype filter narrows further.
    let reader = get(&gw.url("/_erpgate/events"), TODO_READER).await;
    assert_eq!(names(&reader), ["T1", "T2"]);
    let users = get(&gw.url("/_erpgate/events?doctype=User"), TODO_READER).await;
    assert_eq!(names(&users), Vec::<String>::new());
    // Long-poll: a call at the tip waits, and answers as soon as an event comes.
    let tip = page.json()["message"]["next"].as_str().unwrap().to_owned();
    let url = gw.url(&format!("/_erpgate/events?since={tip}&wait=10s"));
    let started = Instant::now();
    let waiting = tokio::spawn(async move { get(&url, TODO_READER).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "answered before any event");
    frappe_webhook(&gw.base, "ToDo", "T3", "after_insert").await;
    let reply = waiting.await.unwrap();
    assert_eq!(names(&reply), ["T3"]);
    assert!(started.elapsed() < Duration::from_secs(5));
    // since=now with a short wait: nothing, and a cursor at the tip.
    let empty = get(&gw.url("/_erpgate/events?since=now&wait=200ms"), FULL).await;
    assert_eq!(names(&empty), Vec::<String>::new());
    // Without a key: 401; a bad cursor: 400.
    let anonymous = send(Method::GET, &gw.url("/_erpgate/events"), &[], Bytes::new()).await;
    assert_eq!(anonymous.status, 401);
    let bad = get(&gw.url("/_erpgate/events?since=abc"), FULL).await;
    assert_eq!(bad.status, 400);
    // Nothing of it reached the upstream.
    assert_eq!(up.count(), 0, "nothing reaches the upstream");
}

/// Two replicas on one Redis: webhooks to either, each event delivered exactly once per
/// subscription; the feed is the same from both.
#[tokio::test]
async fn two_replicas_on_one_redis_deliver_each_event_once_per_subscription() {
    let redis = Redis::start();
    let up = upstream().await;
    let (sub_a, sub_b) = (Subscriber::start().await, Subscriber::start().await);
    let prefix = format!("ev{}:", rand_suffix());
    let events = format!(
        "events: {{ initial_backoff: 50ms, max_backoff: 200ms }}\nshared_state:\n  redis: {{ url: \"{}\", key_prefix: \"{prefix}\", connect_timeout: 300ms, command_timeout: 500ms }}\n",
        redis.url()
    );
    let yaml = config(
        &up,
        &events,
        &subscription("all", &sub_a.url(), "[ToDo]", "", 1),
        &subscription("todos", &sub_b.url(), "[ToDo]", "", 2),
    );
    let a = Gateway::start(&yaml).await;
    let b = Gateway::start(&yaml).await;
    // Both find Redis first.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for n in 0..20 {
        let gw = if n % 2 == 0 { &a } else { &b };
        let reply = frappe_webhook(&gw.base, "ToDo", &format!("T{n}"), "on_update").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    for sub in [&sub_a, &sub_b] {
        sub.until("20 deliveries", |r| r.len() >= 20).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for sub in [&sub_a, &sub_b] {
        let got = sub.received();
        let mut ids: Vec<String> = got.iter().map(Received::id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(got.len(), 20, "each event exactly once");
        assert_eq!(ids.len(), 20);
    }
    // Each delivery was counted by the one replica that made it.
    let delivered_by = |m: &str| {
        metric_value(
            m,
            "erpgate_event_deliveries_total",
            &[
                ("client", "full"),
                ("subscription", "all"),
                ("outcome", "delivered"),
            ],
        )
    };
    let (ma, mb) = (a.metrics().await, b.metrics().await);
    assert_eq!(delivered_by(&ma) + delivered_by(&mb), 20.0);
    let feed_a = get(&a.url("/_erpgate/events?limit=100"), FULL).await;
    let feed_b = get(&b.url("/_erpgate/events?limit=100"), FULL).await;
    assert_eq!(
        feed_a.json()["message"]["events"].as_array().unwrap().len(),
        20
    );
    assert_eq!(feed_a.json()["message"], feed_b.json()["message"]);
    // The largest stream id has nothing after it: refused, and Redis stays in use.
    let bad = get(
        &a.url("/_erpgate/events?since=18446744073709551615-18446744073709551615"),
        FULL,
    )
    .await;
    assert_eq!(bad.status, 400);
    let late = get(
        &a.url("/_erpgate/events?since=18446744073709551615-0"),
        FULL,
    )
    .await;
    assert_eq!(late.status, 200, "{}", late.text());
    assert_eq!(
        metric_value(&a.metrics().await, "erpgate_redis_up", &[]),
        1.0
    );
    // With Redis gone, a webhook is not acknowledged: Frappe retries it.
    drop(redis);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reply = frappe_webhook(&a.base, "ToDo", "T99", "on_update").await;
    assert_eq!(reply.status, 503, "{}", reply.text());
}

#[tokio::test]
async fn a_document_whose_delivery_failed_holds_its_later_events_back_and_others_pass() {
    let up = upstream().await;
    let sub = Subscriber::start().await;
    sub.answer(&[500]);
    let yaml = one_subscription(&up, "order", &sub.url(), "[ToDo]", 1);
    let gw = Gateway::start(&yaml).await;
    accepted(&gw.base, "ToDo", "T1", "on_update").await;
    accepted(&gw.base, "ToDo", "T1", "on_submit").await;
    accepted(&gw.base, "ToDo", "T2", "on_update").await;
    sub.until("four requests", |r| r.len() >= 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let whats: Vec<String> = sub.received().iter().map(Received::what).collect();
    assert_eq!(
        whats,
        [
            "ToDo/T1/on_update", // answered 500
            "ToDo/T2/on_update", // another document passes
            "ToDo/T1/on_update", // the retry
            "ToDo/T1/on_submit", // only after it
        ]
    );
}

#[tokio::test]
async fn a_subscriber_slower_than_its_timeout_is_tried_again() {
    let up = upstream().await;
    let sub = Subscriber::start().await;
    sub.delay(&[Duration::from_secs(3)]);
    let yaml = config(
        &up,
        &fast_events(&scratch_dir("timeout")),
        &subscription("all", &sub.url(), "[ToDo]", ", timeout: 300ms", 1),
        "",
    );
    let gw = Gateway::start(&yaml).await;
    let started = Instant::now();
    accepted(&gw.base, "ToDo", "T1", "on_update").await;
    let got = sub.until("a second attempt", |r| r.len() >= 2).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the timeout cut the first"
    );
    assert_eq!(got[0].id(), got[1].id());
    let m = gw.metrics().await;
    let outcome = |o| {
        metric_value(
            &m,
            "erpgate_event_deliveries_total",
            &[("client", "full"), ("subscription", "all"), ("outcome", o)],
        )
    };
    assert_eq!(outcome("failed"), 1.0);
    assert_eq!(outcome("delivered"), 1.0);
}

/// A replica killed with SIGKILL in the middle of a delivery: another replica on the same Redis
/// takes the delivery over once it has been left unsettled too long, and makes it.
#[tokio::test]
async fn a_delivery_a_killed_replica_was_making_is_made_by_another() {
    let redis = Redis::start();
    let up = upstream().await;
    let sub = Subscriber::start().await;
    // The first attempt hangs (the replica making it is killed meanwhile).
    sub.delay(&[Duration::from_secs(30)]);
    let prefix = format!("evk{}:", rand_suffix());
    let events = format!(
        "events: {{ initial_backoff: 50ms, max_backoff: 200ms }}\nshared_state:\n  redis: {{ url: \"{}\", key_prefix: \"{prefix}\", connect_timeout: 300ms, command_timeout: 500ms }}\n",
        redis.url()
    );
    let yaml = config(
        &up,
        &events,
        &subscription("all", &sub.url(), "[ToDo]", ", timeout: 1s", 1),
        "",
    )
    .replace(
        "log: { format: pretty, level: warn }",
        "log: { format: json, level: info }",
    );
    let path = scratch_file(&format!("events-claim-{}.yaml", rand_suffix()), &yaml);
    let mut first = GatewayProcess::start(&path);
    let base = format!("http://{}", first.listen);
    // Redis found before the webhook comes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = frappe_webhook(&base, "ToDo", "T1", "on_update").await;
        if reply.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", reply.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sub.until("the first attempt", |r| !r.is_empty()).await;
    let second = GatewayProcess::start(&path);
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let killed_at = Instant::now();
    let got = sub.until("the delivery made again", |r| r.len() >= 2).await;
    // Not before the claim delay (2 × 1s + 5s after the first took it).
    assert!(killed_at.elapsed() > Duration::from_secs(3));
    assert_eq!(got[0].id(), got[1].id());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sub.received().len(), 2);
    let metrics = send(
        Method::GET,
        &format!("http://{}/metrics", second.admin),
        &[],
        Bytes::new(),
    )
    .await
    .text();
    assert_eq!(
        metric_value(
            &metrics,
            "erpgate_event_deliveries_total",
            &[
                ("client", "full"),
                ("subscription", "all"),
                ("outcome", "delivered")
            ]
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "erpgate_event_backlog",
            &[("client", "full"), ("subscription", "all")]
        ),
        0.0
    );
}

#[tokio::test]
async fn the_feed_keeps_at_most_max_feed_events_the_newest() {
    let up = upstream().await;
    let directory = scratch_dir("retention");
    let events = format!("events: {{ directory: \"{directory}\", max_feed_events: 2 }}\n");
    let gw = Gateway::start(&config(&up, &events, "", "")).await;
    for name in ["T1", "T2", "T3"] {
        accepted(&gw.base, "ToDo", name, "on_update").await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let feed = get(&gw.url("/_erpgate/events"), FULL).await;
        let names: Vec<String> = feed.json()["message"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["data"]["name"].as_str().unwrap().to_owned())
            .collect();
        if names == ["T2", "T3"] {
            break;
        }
        assert!(Instant::now() < deadline, "still {names:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_client_without_allow_rules_has_no_feed() {
    let up = upstream().await;
    let yaml = base_config(&up).replace(
        "    timeouts: { connect: 1s, request: 3s }\n",
        &format!(
            "    timeouts: {{ connect: 1s, request: 3s }}\n    webhook: {{ secret: {WEBHOOK_SECRET} }}\n"
        ),
    ) + &fast_events(&scratch_dir("norules"));
    let gw = Gateway::start(&yaml).await;
    accepted(&gw.base, "ToDo", "T1", "on_update").await;
    let unrestricted = get(&gw.url("/_erpgate/events"), FULL).await;
    assert_eq!(unrestricted.status, 403, "{}", unrestricted.text());
    assert!(!unrestricted.text().contains("T1"));
    let reader = get(&gw.url("/_erpgate/events"), TODO_READER).await;
    assert_eq!(reader.status, 200);
    assert_eq!(reader.json()["message"]["events"][0]["data"]["name"], "T1");
}

#[tokio::test]
async fn a_client_gets_no_event_of_a_site_it_has_no_account_on() {
    let up = upstream().await;
    let sub = Subscriber::start().await;
    let other_site = format!(
        "  other:\n    backends: [{}]\n    site_name: other.localhost\n    service_accounts:\n      sync: {{ api_key: {SYNC_KEY}, api_secret: {SYNC_SECRET} }}\n    webhook: {{ secret: {WEBHOOK_SECRET} }}\nclients:\n",
        up.url()
    );
    let yaml = one_subscription(&up, "sites", &sub.url(), "[\"*\"]", 1).replacen(
        "clients:\n",
        &other_site,
        1,
    );
    let gw = Gateway::start(&yaml).await;
    let body = frappe_body("ToDo", "elsewhere", "on_update");
    let reply = signed_webhook(&gw.base, &intake("other", "ToDo"), &body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    accepted(&gw.base, "ToDo", "here", "on_update").await;
    let got = sub
        .until("the event of its own site", |r| !r.is_empty())
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let whats: Vec<String> = sub.received().iter().map(Received::what).collect();
    assert_eq!(whats, ["ToDo/here/on_update"], "{got:?}");
    let feed = get(&gw.url("/_erpgate/events"), FULL).await;
    let sites: Vec<String> = feed.json()["message"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"]["site"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sites, ["erp"]);
}

#[tokio::test]
async fn a_burst_over_the_purge_rate_keeps_every_event_and_a_repeat_is_kept_once() {
    let up = upstream().await;
    let yaml = config(&up, &fast_events(&scratch_dir("burst")), "", "")
        + "cache: { rules: [{ doctype: ToDo, ttl: 60s }] }\n";
    let gw = Gateway::start(&yaml).await;
    // 150 different changes, eight at a time (a bench's background workers): far over the 50
    // purges/s (burst 100) of the site.
    let mut replies = Vec::new();
    for chunk in (0..150).collect::<Vec<_>>().chunks(8) {
        let sends = chunk.iter().map(|n| {
            let base = gw.base.clone();
            async move { frappe_webhook(&base, "ToDo", &format!("B{n}"), "on_update").await }
        });
        replies.extend(futures_util::future::join_all(sends).await);
    }
    let refused: Vec<u16> = replies
        .iter()
        .map(|r| r.status.as_u16())
        .filter(|s| *s != 200)
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
    let feed = get(&gw.url("/_erpgate/events?limit=1000"), FULL).await;
    assert_eq!(
        feed.json()["message"]["events"].as_array().unwrap().len(),
        150
    );
    // The same signed body again (a Frappe retry, or a replay): acknowledged, kept once.
    accepted(&gw.base, "ToDo", "B0", "on_update").await;
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(&m, "erpgate_events_repeated_total", &[("site", "erp")]),
        1.0
    );
    assert_eq!(events_received(&m), 150.0);
    // A body without `modified` may be the same for two saves: each is kept.
    for _ in 0..2 {
        let body = r#"{"doctype": "ToDo", "name": "M1", "event": "on_update"}"#;
        let reply = signed_webhook(&gw.base, &intake("erp", "ToDo"), body).await;
        assert_eq!(reply.status, 200);
    }
    let m = gw.metrics().await;
    assert_eq!(events_received(&m), 152.0);
}

#[tokio::test]
async fn one_source_trickling_webhook_bodies_cannot_take_every_slot() {
    use tokio::io::AsyncWriteExt as _;
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, &fast_events(&scratch_dir("slow")), "", "")).await;
    let addr = gw.base.trim_start_matches("http://").to_owned();
    // Eight requests whose bodies never come hold this address's eight slots...
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(
                b"POST /_erpgate/webhooks/frappe/erp/ToDo HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-frappe-webhook-signature: AAAA\r\ncontent-length: 100\r\n\r\n{",
            )
            .await
            .unwrap();
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...so a ninth from it is refused at once, and nothing is stored.
    let reply = frappe_webhook(&gw.base, "ToDo", "T1", "on_update").await;
    assert_eq!(reply.status, 429, "{}", reply.text());
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    accepted(&gw.base, "ToDo", "T1", "on_update").await;
}

/// `yaml` with a ToDo cache rule, the full client allowed to create ToDos too (to have one
/// cached).
fn with_todo_cache(yaml: &str) -> String {
    yaml.replace(
        r#"allow: { resources: { "*": [read] } }"#,
        r#"allow: { resources: { "*": [read], ToDo: [read, create] } }"#,
    ) + "cache: { rules: [{ doctype: ToDo, ttl: 60s }] }
"
}

/// Creates a ToDo through the gateway and reads it twice, so its answer is cached; its name.
async fn cached_todo(gw: &Gateway) -> String {
    let reply = send_json(
        Method::POST,
        &gw.url("/api/resource/ToDo"),
        FULL,
        r#"{"description": "cached"}"#,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let name = reply.json()["data"]["name"].as_str().unwrap().to_owned();
    assert_eq!(todo_x_cache(gw, &name).await, "MISS");
    assert_eq!(todo_x_cache(gw, &name).await, "HIT");
    name
}

/// The `X-Cache` of the full client's read of ToDo `name`.
async fn todo_x_cache(gw: &Gateway, name: &str) -> String {
    let reply = get(&gw.url(&format!("/api/resource/ToDo/{name}")), FULL).await;
    reply.header("x-cache").unwrap_or("none").to_owned()
}

/// The cache purges site `erp`'s webhooks made, in the `/metrics` text `m`.
fn webhook_purges(m: &str) -> f64 {
    metric_value(
        m,
        "erpgate_cache_invalidations_total",
        &[("site", "erp"), ("reason", "webhook")],
    )
}

/// Names of the events in a client's feed.
async fn feed_names(gw: &Gateway, credential: Credential) -> Vec<String> {
    let feed = get(&gw.url("/_erpgate/events"), credential).await;
    assert_eq!(feed.status, 200, "{}", feed.text());
    feed.json()["message"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"]["name"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// A Frappe Webhook on Note whose template writes `"title": "{{ doc.title }}"` (no `tojson`),
/// and a Note titled `x", "doctype": "ToDo`: Frappe renders, `json.loads` (the last `doctype`
/// wins), `json.dumps` and signs. Sent to the Note URL, neither that body nor the raw render
/// (with both keys), nor a repeat whose last copy says Note, nor a Note body sent to the ToDo
/// URL, nor a doctype spelt in another case, reaches a subscriber, a feed or the cache.
#[tokio::test]
async fn a_signed_body_naming_another_doctype_than_its_url_is_refused_and_reaches_no_one() {
    let up = upstream().await;
    let (todos, everything) = (Subscriber::start().await, Subscriber::start().await);
    let yaml = with_todo_cache(&config(
        &up,
        &fast_events(&scratch_dir("bound")),
        &subscription("todos", &todos.url(), "[ToDo]", "", 1),
        &subscription("everything", &everything.url(), "[\"*\"]", "", 2),
    ));
    let gw = Gateway::start(&yaml).await;
    let todo = cached_todo(&gw).await;
    let upstream_before = up.count();

    let note = intake("erp", "Note");
    let to_do = intake("erp", "ToDo");
    let attacks = [
        // What Frappe signs and sends: json.dumps(json.loads(render)), one doctype, ToDo.
        (
            &note,
            format!(
                r#"{{"doctype": "ToDo", "name": "{todo}", "event": "on_update", "title": "x"}}"#
            ),
            "other_doctype",
        ),
        // The render itself, both keys (the last, ToDo, is what Python keeps).
        (
            &note,
            format!(
                r#"{{"doctype": "Note", "name": "{todo}", "event": "on_update", "title": "x", "doctype": "ToDo"}}"#
            ),
            "repeated_key",
        ),
        // A repeat whose last copy is the URL's doctype: a parser keeping the first reads ToDo.
        (
            &note,
            format!(
                r#"{{"doctype": "ToDo", "name": "{todo}", "event": "on_update", "doctype": "Note"}}"#
            ),
            "repeated_key",
        ),
        // The ToDo Webhook's URL, a body naming Note.
        (
            &to_do,
            r#"{"doctype": "Note", "name": "N1", "event": "on_update"}"#.to_owned(),
            "other_doctype",
        ),
        // Exact names only.
        (
            &intake("erp", "todo"),
            format!(r#"{{"doctype": "ToDo", "name": "{todo}", "event": "on_update"}}"#),
            "other_doctype",
        ),
    ];
    for (path, body, _) in &attacks {
        let reply = signed_webhook(&gw.base, path, body).await;
        assert_eq!(reply.status, 400, "{path} {body}: {}", reply.text());
        assert!(
            reply.text().contains("doctype"),
            "the refusal says why: {}",
            reply.text()
        );
    }

    // Nothing was purged, stored, relayed or forwarded.
    assert_eq!(todo_x_cache(&gw, &todo).await, "HIT");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(todos.received().is_empty(), "{:?}", todos.received());
    assert!(everything.received().is_empty());
    assert_eq!(feed_names(&gw, FULL).await, Vec::<String>::new());
    assert_eq!(feed_names(&gw, TODO_READER).await, Vec::<String>::new());
    assert_eq!(up.count(), upstream_before, "nothing reaches the upstream");
    let m = gw.metrics().await;
    assert_eq!(events_received(&m), 0.0);
    for reason in ["other_doctype", "repeated_key"] {
        let expected = attacks.iter().filter(|(_, _, r)| *r == reason).count();
        assert_eq!(
            metric_value(
                &m,
                "erpgate_events_refused_total",
                &[("site", "erp"), ("reason", reason)]
            ),
            expected as f64,
            "{reason}"
        );
    }
    assert_eq!(webhook_purges(&m), 0.0);

    // The ToDo Webhook's own body at its own URL is relayed and purges.
    let body = format!(r#"{{"doctype": "ToDo", "name": "{todo}", "event": "on_update"}}"#);
    let reply = signed_webhook(&gw.base, &to_do, &body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let got = todos
        .until("the genuine ToDo event", |r| !r.is_empty())
        .await;
    assert_eq!(got[0].what(), format!("ToDo/{todo}/on_update"));
    everything
        .until("the genuine ToDo event", |r| !r.is_empty())
        .await;
    assert_eq!(feed_names(&gw, TODO_READER).await, [todo.as_str()]);
    assert_eq!(todo_x_cache(&gw, &todo).await, "MISS");
}

/// The per-doctype URL of a doctype with a space in its name: the event carries the URL's
/// doctype and Frappe's body as sent.
#[tokio::test]
async fn a_doctypes_own_url_relays_its_events() {
    let up = upstream().await;
    let orders = Subscriber::start().await;
    let yaml = one_subscription(&up, "orders", &orders.url(), "[Sales Order]", 1);
    let gw = Gateway::start(&yaml).await;
    let reply = frappe_webhook(&gw.base, "Sales Order", "SO-0001", "on_submit").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), serde_json::json!({"message": "ok"}));
    // A trailing slash is the same URL.
    let body = frappe_body("Sales Order", "SO-0002", "on_submit");
    let path = format!("{}/", intake("erp", "Sales Order"));
    assert_eq!(signed_webhook(&gw.base, &path, &body).await.status, 200);
    let got = orders.until("both orders", |r| r.len() >= 2).await;
    let whats: Vec<String> = got.iter().map(Received::what).collect();
    assert_eq!(
        whats,
        [
            "Sales Order/SO-0001/on_submit",
            "Sales Order/SO-0002/on_submit"
        ]
    );
    let first = got[0].json();
    assert_eq!(first["data"]["doctype"], "Sales Order");
    assert_eq!(first["data"]["doc"]["description"], "changed SO-0001");
    assert_eq!(feed_names(&gw, FULL).await, ["SO-0001", "SO-0002"]);
    // More than one segment after the site names no doctype: refused before reading.
    let reply = signed_webhook(&gw.base, &format!("{path}extra"), &body).await;
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert_eq!(up.count(), 0, "nothing reaches the upstream");
}

/// The site-only URL purges the cache as it always did, but feeds no event: only a doctype's
/// URL binds a body to a doctype. Without a cache it does nothing, and says so.
#[tokio::test]
async fn the_purge_only_url_purges_the_cache_but_relays_no_event() {
    let up = upstream().await;
    let sub = Subscriber::start().await;
    let yaml = with_todo_cache(&one_subscription(
        &up,
        "purge-only",
        &sub.url(),
        "[\"*\"]",
        1,
    ));
    let gw = Gateway::start(&yaml).await;
    let todo = cached_todo(&gw).await;
    let body = format!(r#"{{"doctype": "ToDo", "name": "{todo}", "event": "on_update"}}"#);
    let reply = signed_webhook(&gw.base, "/_erpgate/webhooks/frappe/erp", &body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(todo_x_cache(&gw, &todo).await, "MISS", "purged");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(sub.received().is_empty(), "{:?}", sub.received());
    assert_eq!(feed_names(&gw, FULL).await, Vec::<String>::new());
    let m = gw.metrics().await;
    assert_eq!(events_received(&m), 0.0);
    assert_eq!(webhook_purges(&m), 1.0);

    // Events without a cache: the site-only URL has nothing to do, and refuses.
    let bare = Gateway::start(&one_subscription(&up, "no-cache", &sub.url(), "[\"*\"]", 1)).await;
    let reply = signed_webhook(&bare.base, "/_erpgate/webhooks/frappe/erp", &body).await;
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert!(reply
        .text()
        .contains("/_erpgate/webhooks/frappe/erp/<doctype>"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(sub.received().is_empty());
    assert_eq!(feed_names(&bare, FULL).await, Vec::<String>::new());
}

/// Webhook access lines name the site whose intake URL was called, once it is a configured
/// site: the doctype intake (events), the purge-only one (cache), and a refused signature
/// alike; a site no config names stays `none` (a URL is request text, never a name).
#[tokio::test]
async fn webhook_access_lines_name_the_site() {
    let up = upstream().await;
    let url = format!("http://127.0.0.1:{}/hook", free_port());
    let yaml = one_subscription(&up, "access-site", &url, "[ToDo]", 1).replace(
        "log: { format: pretty, level: warn }",
        "log: { format: json, level: info }",
    ) + "cache:\n  rules:\n    - { doctype: ToDo, ttl: 60s }\n";
    let path = scratch_file(&format!("events-access-{}.yaml", rand_suffix()), &yaml);
    let gateway = GatewayProcess::start(&path);
    let base = format!("http://{}", gateway.listen);
    accepted(&base, "ToDo", "T1", "on_update").await;
    let purge = signed_webhook(
        &base,
        "/_erpgate/webhooks/frappe/erp",
        &frappe_body("ToDo", "T1", "on_update"),
    )
    .await;
    assert_eq!(purge.status, 200, "{}", purge.text());
    let forged = send(
        Method::POST,
        &format!("{base}{}", intake("erp", "ToDo")),
        &[("x-frappe-webhook-signature", "Zm9yZ2Vk")],
        frappe_body("ToDo", "T2", "on_update"),
    )
    .await;
    assert_eq!(forged.status, 401);
    let unknown = signed_webhook(&base, &intake("elsewhere", "ToDo"), "{}").await;
    assert_eq!(unknown.status, 404);

    let mut access = Vec::new();
    while access.len() < 4 {
        let line = gateway.next_log();
        if line["target"] == "erpgate::access" {
            access.push(line);
        }
    }
    let seen: Vec<(&str, &str, u64)> = access
        .iter()
        .map(|l| {
            (
                l["path"].as_str().unwrap(),
                l["site"].as_str().unwrap(),
                l["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("/_erpgate/webhooks/frappe/erp/ToDo", "erp", 200),
            ("/_erpgate/webhooks/frappe/erp", "erp", 200),
            ("/_erpgate/webhooks/frappe/erp/ToDo", "erp", 401),
            ("/_erpgate/webhooks/frappe/elsewhere/ToDo", "none", 404),
        ]
    );
    // Nothing of it reached the site.
    assert_eq!(up.count(), 0);
}
