//! OpenTelemetry traces against a real OTLP/HTTP receiver started here (the protobuf decoded
//! with the OpenTelemetry protocol crate): one server span per request, a child of the caller's
//! `traceparent`; one client span per attempt, whose context is what reaches Frappe; sampling
//! follows the caller; the trace id is in the access log line; an unreachable collector fails
//! nothing and is counted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use support::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

/// An OTLP/HTTP traces receiver on 127.0.0.1: every span it is sent, decoded.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Collector {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let spans = Arc::new(Mutex::new(Vec::new()));
        let store = spans.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let store = store.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let store = store.clone();
                        async move {
                            assert_eq!(request.uri().path(), "/v1/traces");
                            assert_eq!(request.headers()["content-type"], "application/x-protobuf");
                            let body = request.into_body().collect().await.unwrap().to_bytes();
                            let export = ExportTraceServiceRequest::decode(body).unwrap();
                            let mut spans = store.lock().unwrap();
                            for resource in export.resource_spans {
                                for scope in resource.scope_spans {
                                    spans.extend(scope.spans);
                                }
                            }
                            Ok::<_, std::convert::Infallible>(Response::new(
                                Full::new(Bytes::new()),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { url, spans }
    }

    /// The spans received once at least `n` have come, waiting up to 10 s.
    async fn wait_for(&self, n: usize) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let spans = self.spans.lock().unwrap().clone();
            if spans.len() >= n || Instant::now() > deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn traced_config(up: &FrappeUpstream, endpoint: &str, ratio: f64) -> String {
    format!(
        "{}tracing: {{ endpoint: \"{endpoint}\", sample_ratio: {ratio}, export_interval: 100ms, \
         export_timeout: 2s, service_name: erpgate-test }}\n",
        base_config(up)
    )
}

fn attribute(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|v| v.value)
}

fn text(span: &Span, key: &str) -> String {
    match attribute(span, key) {
        Some(Value::StringValue(s)) => s,
        other => panic!("{key}: {other:?} in {:?}", span.attributes),
    }
}

fn int(span: &Span, key: &str) -> i64 {
    match attribute(span, key) {
        Some(Value::IntValue(i)) => i,
        other => panic!("{key}: {other:?} in {:?}", span.attributes),
    }
}

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

#[tokio::test]
async fn a_request_is_one_server_span_under_the_callers_and_one_client_span_per_attempt() {
    let collector = Collector::start().await;
    let up = upstream().await;
    let gw = Gateway::start(&traced_config(&up, &collector.url, 1.0)).await;
    let traceparent = format!("00-{TRACE}-{CALLER}-01");
    let reply = send(
        Method::GET,
        &gw.url("/api/resource/ToDo"),
        &[
            ("authorization", &token(FULL)),
            ("traceparent", &traceparent),
            ("tracestate", "vendor=caller"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);

    let spans = collector.wait_for(2).await;
    assert_eq!(spans.len(), 2, "{spans:?}");
    let server = spans
        .iter()
        .find(|s| s.kind == SERVER)
        .expect("a server span");
    let client = spans
        .iter()
        .find(|s| s.kind == CLIENT)
        .expect("a client span");
    assert_eq!(hex::encode(&server.trace_id), TRACE);
    assert_eq!(hex::encode(&server.parent_span_id), CALLER);
    assert_eq!(server.name, "GET resource_read");
    assert_eq!(text(server, "http.request.method"), "GET");
    assert_eq!(text(server, "url.path"), "/api/resource/ToDo");
    assert_eq!(int(server, "http.response.status_code"), 200);
    assert_eq!(text(server, "erpgate.client"), "full");
    assert_eq!(text(server, "erpgate.site"), "erp");
    assert_eq!(text(server, "erpgate.kind"), "resource_read");
    assert_eq!(text(server, "erpgate.doctype"), "ToDo");
    assert_eq!(text(server, "erpgate.rate_limit"), "allowed");
    assert_eq!(text(server, "erpgate.breaker"), "passed");
    assert_eq!(int(server, "erpgate.retries"), 0);

    assert_eq!(client.trace_id, server.trace_id);
    assert_eq!(client.parent_span_id, server.span_id);
    assert_eq!(client.name, "GET");
    assert_eq!(int(client, "http.response.status_code"), 200);
    assert_eq!(text(client, "server.address"), SITE);

    // Frappe got the attempt's context, not the caller's; the caller's tracestate carried on.
    let received = &up.received()[0];
    assert_eq!(
        received.headers["traceparent"],
        format!("00-{TRACE}-{}-01", hex::encode(&client.span_id)).as_str()
    );
    assert_eq!(received.headers["tracestate"], "vendor=caller");
    // The exporter counts the export once the collector's answer is in, which may be just
    // after the collector has the spans.
    let mut exported = 0.0;
    for _ in 0..100 {
        let metrics = gw.metrics().await;
        exported = metric_value(
            &metrics,
            "erpgate_trace_exports_total",
            &[("outcome", "ok")],
        );
        if exported >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(exported >= 1.0, "{exported} exports counted ok");
}

#[tokio::test]
async fn a_retried_request_has_a_client_span_per_attempt_and_a_refusal_is_traced_too() {
    let collector = Collector::start().await;
    let up = upstream().await;
    let gw = Gateway::start(&traced_config(&up, &collector.url, 1.0)).await;
    up.set_behaviour(support::frappe::Behaviour::FailNext(1, 502));
    let reply = get(&gw.url("/api/resource/ToDo"), FULL).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let refused = get(&gw.url("/api/resource/Sales%20Invoice"), TODO_READER).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);

    let spans = collector.wait_for(4).await;
    let servers: Vec<&Span> = spans.iter().filter(|s| s.kind == SERVER).collect();
    let clients: Vec<&Span> = spans.iter().filter(|s| s.kind == CLIENT).collect();
    assert_eq!((servers.len(), clients.len()), (2, 2), "{spans:?}");
    let retried = servers
        .iter()
        .find(|s| text(s, "erpgate.client") == "full")
        .unwrap();
    assert_eq!(int(retried, "erpgate.retries"), 1);
    assert!(clients.iter().all(|c| c.parent_span_id == retried.span_id));
    let resends: Vec<Option<Value>> = clients
        .iter()
        .map(|c| attribute(c, "http.request.resend_count"))
        .collect();
    assert!(resends.contains(&Some(Value::IntValue(1))), "{resends:?}");
    assert!(clients.iter().any(
        |c| int(c, "http.response.status_code") == 502 && c.status.as_ref().unwrap().code == 2
    ));

    let forbidden = servers
        .iter()
        .find(|s| text(s, "erpgate.client") == "todo-reader")
        .unwrap();
    assert_eq!(int(forbidden, "http.response.status_code"), 403);
    assert_eq!(text(forbidden, "erpgate.error"), "PermissionError");
    assert_eq!(text(forbidden, "erpgate.doctype"), "Sales Invoice");
}

#[tokio::test]
async fn sampling_follows_the_caller_and_the_ratio_applies_to_new_traces() {
    let collector = Collector::start().await;
    let up = upstream().await;
    // Ratio 0: no new trace is recorded, a caller's sampled one is.
    let gw = Gateway::start(&traced_config(&up, &collector.url, 0.0)).await;
    let unsampled_caller = format!("00-{TRACE}-{CALLER}-00");
    for traceparent in [None, Some(unsampled_caller.as_str())] {
        let auth = token(FULL);
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend(traceparent.map(|t| ("traceparent", t)));
        let reply = send(
            Method::GET,
            &gw.url("/api/method/ping"),
            &headers,
            Bytes::new(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let sampled = format!("00-{TRACE}-{CALLER}-01");
    let reply = send(
        Method::GET,
        &gw.url("/api/method/ping"),
        &[("authorization", &token(FULL)), ("traceparent", &sampled)],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let spans = collector.wait_for(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let spans_later = collector.spans.lock().unwrap().len();
    assert_eq!((spans.len(), spans_later), (2, 2), "{spans:?}");
    assert!(spans.iter().all(|s| hex::encode(&s.trace_id) == TRACE));
    // Unrecorded requests still carry a context to Frappe: the caller's trace, not sampled.
    let received = up.received();
    assert!(received[1].headers["traceparent"]
        .to_str()
        .unwrap()
        .starts_with(&format!("00-{TRACE}-")));
    assert!(received[1].headers["traceparent"]
        .to_str()
        .unwrap()
        .ends_with("-00"));
    assert!(received[0].headers["traceparent"]
        .to_str()
        .unwrap()
        .ends_with("-00"));
}

#[tokio::test]
async fn an_unreachable_collector_fails_no_request_and_is_counted() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}/v1/traces", dead.local_addr().unwrap());
    drop(dead);
    let up = upstream().await;
    let gw = Gateway::start(&traced_config(&up, &endpoint, 1.0)).await;
    for _ in 0..20 {
        assert_eq!(
            get(&gw.url("/api/resource/ToDo"), FULL).await.status,
            StatusCode::OK
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = gw.metrics().await;
        let failed = metric_value(
            &metrics,
            "erpgate_trace_exports_total",
            &[("outcome", "error")],
        );
        let dropped = metric_value(&metrics, "erpgate_trace_spans_dropped_total", &[]);
        if failed >= 1.0 && dropped >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(up.count(), 20);
}

#[test]
fn the_access_log_line_carries_the_trace_id() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (up, collector) = runtime.block_on(async { (upstream().await, Collector::start().await) });
    let config = traced_config(&up, &collector.url, 1.0).replace(
        "log: { format: pretty, level: warn }",
        "log: { format: json, level: info }",
    );
    let path = scratch_file("otel-run.yaml", &config);
    let gateway = GatewayProcess::start(&path);
    let listen = gateway.listen.clone();
    let traceparent = format!("00-{TRACE}-{CALLER}-01");
    let reply = runtime.block_on(send(
        Method::GET,
        &format!("http://{listen}/api/method/ping"),
        &[
            ("authorization", &token(FULL)),
            ("traceparent", &traceparent),
        ],
        Bytes::new(),
    ));
    assert_eq!(reply.status, StatusCode::OK);
    let access = loop {
        let log = gateway.next_log();
        if log["target"] == "erpgate::access" || log["path"] == "/api/method/ping" {
            break log;
        }
    };
    drop(gateway);
    let line = access.to_string();
    assert!(
        line.contains(&format!("\"trace_id\":\"{TRACE}\"")),
        "{line}"
    );
}
