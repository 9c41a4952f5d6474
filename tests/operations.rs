//! Operations: hot reload (SIGHUP and file watch) with the real binary under load, an invalid
//! reload rejected, rate-limit state kept across reloads, TLS termination over HTTP/1.1 and
//! HTTP/2, and the drain delay on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_erpgate");

/// A third client, added by a reload.
const LATE: Credential = ("ek_late", "late-client-secret");

/// The erpgate binary running `config`, with its public and admin addresses.
struct Binary {
    child: Child,
    base: String,
    admin: String,
}

impl Binary {
    fn start(config_path: &std::path::Path) -> Self {
        let mut child = Command::new(BIN)
            .args(["run", "--config", config_path.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // Built first, so that a failed start still kills and reaps the child (Drop).
        let mut binary = Self {
            child,
            base: String::new(),
            admin: String::new(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("gateway did not start");
            let log: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if log["message"] == "erpgate listening" {
                binary.base = format!("http://{}", log["listen_addr"].as_str().unwrap());
                binary.admin = format!("http://{}", log["admin_addr"].as_str().unwrap());
                return binary;
            }
        }
    }

    fn signal(&self, name: &str) {
        // The shell's kill builtin: no dependency on a kill binary being installed.
        let status = Command::new("sh")
            .args(["-c", &format!("kill -{name} {}", self.child.id())])
            .status()
            .unwrap();
        assert!(status.success());
    }

    async fn metrics(&self) -> String {
        let reply = send(
            Method::GET,
            &format!("{}/metrics", self.admin),
            &[],
            Bytes::new(),
        )
        .await;
        reply.text()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json_logs(config: &str) -> String {
    config.replace(
        "log: { format: pretty, level: warn }",
        "log: { format: json, level: info }",
    )
}

/// `config` with the ToDo-reader client replaced by `LATE`.
fn with_late_client_instead_of_reader(config: &str) -> String {
    config
        .replace(TODO_READER.0, LATE.0)
        .replace(&sha256_hex(TODO_READER.1), &sha256_hex(LATE.1))
        .replace("todo-reader:", "late:")
}

async fn wait_for(mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..400 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("condition not reached in 10 s");
}

#[tokio::test]
async fn sighup_under_load_adds_a_client_and_revokes_another_with_no_failed_request() {
    let up = upstream().await;
    let config = json_logs(&base_config(&up)).replace("clients:\n", "rate_limit: null\nclients:\n");
    let path = scratch_file("sighup.yaml", &config);
    let gw = Arc::new(Binary::start(&path));
    assert_eq!(
        get(&format!("{}/api/resource/ToDo", gw.base), TODO_READER)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        get(&format!("{}/api/resource/ToDo", gw.base), LATE)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );

    // Steady load from the client that stays, on keep-alive connections, throughout: each
    // worker keeps its pooled connection across the reload, and any error counts as a failure.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (gw, stop, sent, failed) = (gw.clone(), stop.clone(), sent.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            let url = format!("{}/api/resource/ToDo", gw.base);
            while !stop.load(Ordering::SeqCst) {
                let request = Request::get(&url)
                    .header("authorization", token(FULL))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let ok = match client.request(request).await {
                    Ok(response) => {
                        let status = response.status();
                        response.into_body().collect().await.is_ok() && status == StatusCode::OK
                    }
                    Err(_) => false,
                };
                if !ok {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                sent.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    wait_for(async || sent.load(Ordering::SeqCst) >= 100).await;

    std::fs::write(&path, with_late_client_instead_of_reader(&config)).unwrap();
    gw.signal("HUP");
    let url = format!("{}/api/resource/ToDo", gw.base);
    wait_for(async || get(&url, LATE).await.status == StatusCode::OK).await;
    assert_eq!(
        get(&url, TODO_READER).await.status,
        StatusCode::UNAUTHORIZED
    );

    let after = sent.load(Ordering::SeqCst);
    wait_for(async || sent.load(Ordering::SeqCst) >= after + 100).await;
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }
    assert!(sent.load(Ordering::SeqCst) >= 200);
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "requests failed across the reload"
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(&m, "erpgate_config_reloads_total", &[("result", "success")]),
        1.0
    );
    assert_eq!(
        m.lines()
            .filter(|l| l.starts_with("erpgate_config_info{"))
            .count(),
        1
    );
}

#[tokio::test]
async fn an_invalid_config_on_reload_is_rejected_and_the_old_one_keeps_serving() {
    let up = upstream().await;
    let config = json_logs(&base_config(&up));
    let path = scratch_file("invalid-reload.yaml", &config);
    let gw = Binary::start(&path);
    let info_before: Vec<String> = gw
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("erpgate_config_info{"))
        .map(str::to_owned)
        .collect();
    // One at a time: signals that arrive together are delivered once.
    for (n, broken) in [
        config.replace("site: erp\n", "site: nowhere\n"),
        config.replace("sites:", "sites: [\n"),
    ]
    .into_iter()
    .enumerate()
    {
        std::fs::write(&path, broken).unwrap();
        gw.signal("HUP");
        let want = (n + 1) as f64;
        wait_for(async || {
            metric_value(
                &gw.metrics().await,
                "erpgate_config_reloads_total",
                &[("result", "failure")],
            ) == want
        })
        .await;
    }
    let reply = get(&format!("{}/api/resource/ToDo", gw.base), FULL).await;
    assert_eq!(reply.status, StatusCode::OK);
    let m = gw.metrics().await;
    let info_after: Vec<String> = m
        .lines()
        .filter(|l| l.starts_with("erpgate_config_info{"))
        .map(str::to_owned)
        .collect();
    assert_eq!(info_before, info_after);
    assert_eq!(
        metric_value(&m, "erpgate_config_reloads_total", &[("result", "success")]),
        0.0
    );
}

#[tokio::test]
async fn a_watched_config_file_reloads_when_it_changes() {
    let up = upstream().await;
    let config = json_logs(&base_config(&up)).replace(
        "clients:\n",
        "reload: { watch: true, interval: 100ms }\nclients:\n",
    );
    let path = scratch_file("watched.yaml", &config);
    let gw = Binary::start(&path);
    let url = format!("{}/api/resource/ToDo", gw.base);
    assert_eq!(get(&url, LATE).await.status, StatusCode::UNAUTHORIZED);
    std::fs::write(&path, with_late_client_instead_of_reader(&config)).unwrap();
    wait_for(async || get(&url, LATE).await.status == StatusCode::OK).await;
}

#[tokio::test]
async fn a_reload_keeps_the_rate_limit_state_of_unchanged_clients() {
    let up = upstream().await;
    let config = base_config(&up).replace(
        "    service_account: sync\n  todo-reader:",
        "    service_account: sync\n    rate_limit: { per_minute: 3 }\n  todo-reader:",
    );
    let gw = Gateway::start(&config).await;
    let url = gw.url("/api/resource/ToDo");
    for _ in 0..2 {
        assert_eq!(get(&url, FULL).await.status, StatusCode::OK);
    }
    // Another client changes; `full` does not: its spent quota stays spent.
    let changed = config.replace(
        "resources: { ToDo: [read] }",
        "resources: { ToDo: [read, create] }",
    );
    gw.running
        .reload(erpgate::config::Config::from_yaml(&changed, "t").unwrap())
        .await
        .unwrap();
    assert_eq!(get(&url, FULL).await.status, StatusCode::OK);
    let refused = get(&url, FULL).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    // The other client's new rule is in force.
    let created = send_json(Method::POST, &url, TODO_READER, "{}").await;
    assert_eq!(created.status, StatusCode::OK);

    // Changing `full`'s own quota starts it afresh.
    let raised = changed.replace("per_minute: 3", "per_minute: 5");
    gw.running
        .reload(erpgate::config::Config::from_yaml(&raised, "t").unwrap())
        .await
        .unwrap();
    assert_eq!(get(&url, FULL).await.status, StatusCode::OK);
}

fn tls_client(
    ca_pem: &str,
    http2: bool,
) -> Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    // ALPN offers only the protocol under test.
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = if http2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build(connector)
}

#[tokio::test]
async fn tls_clients_reach_the_gateway_over_http1_and_http2() {
    let up = upstream().await;
    let (ca, cert, key) = test_certificates();
    let cert_file = scratch_file("tls-cert.pem", &cert);
    let key_file = scratch_file("tls-key.pem", &key);
    let config = base_config(&up).replace(
        "clients:\n",
        &format!(
            "tls: {{ cert_file: {}, key_file: {} }}\nclients:\n",
            cert_file.display(),
            key_file.display()
        ),
    );
    let gw = Gateway::start(&config).await;
    let url = format!(
        "https://{}/api/method/frappe.auth.get_logged_user",
        gw.running.listen_addr
    );
    for (http2, version) in [(false, Version::HTTP_11), (true, Version::HTTP_2)] {
        let request = Request::get(&url)
            .header("authorization", token(FULL))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = tls_client(&ca, http2).request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), version);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("sync@example.com"));
    }
    // Frappe is told the client came over HTTPS.
    for seen in up.received() {
        assert_eq!(seen.headers["x-forwarded-proto"], "https");
    }
    assert_eq!(up.count(), 2);
    // Plain HTTP to a TLS listener gets nowhere.
    let plain = Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>()
        .request(
            Request::get(format!(
                "http://{}/api/resource/ToDo",
                gw.running.listen_addr
            ))
            .body(Full::new(Bytes::new()))
            .unwrap(),
        )
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != StatusCode::OK);
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn sigterm_turns_readyz_503_at_once_and_keeps_accepting_for_the_drain_delay() {
    let up = upstream().await;
    let config = json_logs(&base_config(&up)).replace(
        "limits: { max_body_bytes: 64MiB, max_inspected_body_bytes: 1MiB }",
        "limits: { max_body_bytes: 64MiB, max_inspected_body_bytes: 1MiB, drain_delay: 1s, shutdown_grace: 5s }",
    );
    let path = scratch_file("drain.yaml", &config);
    let mut gw = Binary::start(&path);
    let slow = tokio::spawn({
        let url = format!("{}/api/method/test.slow?ms=1500", gw.base);
        async move { get(&url, FULL).await }
    });
    wait_for(async || up.count() == 1).await;
    gw.signal("TERM");
    let readyz = format!("{}/readyz", gw.admin);
    wait_for(async || {
        send(Method::GET, &readyz, &[], Bytes::new()).await.status
            == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    // Within the drain delay a new connection is still served (Kubernetes may still send some).
    let late = get(&format!("{}/api/resource/ToDo", gw.base), FULL).await;
    assert_eq!(late.status, StatusCode::OK);
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    let status = tokio::task::spawn_blocking(move || gw.child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_reload_picks_up_a_renewed_certificate() {
    let up = upstream().await;
    let tls_config = |name: &str| {
        let (ca, cert, key) = test_certificates();
        let cert_file = scratch_file(&format!("{name}-cert.pem"), &cert);
        let key_file = scratch_file(&format!("{name}-key.pem"), &key);
        let yaml = base_config(&up).replace(
            "clients:\n",
            &format!(
                "tls: {{ cert_file: {}, key_file: {} }}\nclients:\n",
                cert_file.display(),
                key_file.display()
            ),
        );
        (ca, yaml)
    };
    let (old_ca, old_yaml) = tls_config("old");
    let (new_ca, new_yaml) = tls_config("new");
    let gw = Gateway::start(&old_yaml).await;
    let url = format!("https://{}/api/method/ping", gw.running.listen_addr);
    let ping = |ca: String| {
        let url = url.clone();
        async move {
            let request = Request::get(&url)
                .header("authorization", token(FULL))
                .body(Full::new(Bytes::new()))
                .unwrap();
            tls_client(&ca, false).request(request).await.is_ok()
        }
    };
    assert!(ping(old_ca.clone()).await);
    assert!(!ping(new_ca.clone()).await);
    gw.running
        .reload(erpgate::config::Config::from_yaml(&new_yaml, "t").unwrap())
        .await
        .unwrap();
    assert!(ping(new_ca).await);
    assert!(!ping(old_ca).await);
}

/// Access lines go through a bounded buffer a writer thread drains: with nobody reading the
/// gateway's stdout (a stalled log pipe), requests are still answered at once, and the lines
/// that did not fit are dropped and counted. (With a write per line on the worker, the first
/// full pipe would hold every request.)
#[tokio::test]
async fn a_stalled_log_pipe_never_holds_a_request_and_dropped_lines_are_counted() {
    let up = upstream().await;
    let config = json_logs(&base_config(&up)).replace(
        "log: { format: json, level: info }",
        "log: { format: json, level: info, buffer_lines: 64 }\nrate_limit: null",
    );
    let path = scratch_file("stalled-log.yaml", &config);
    let mut child = Command::new(BIN)
        .args(["run", "--config", path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Read up to the line saying where it listens, then never again (the pipe stays open).
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let (mut base, mut admin) = (String::new(), String::new());
    let mut line = String::new();
    while base.is_empty() {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "gateway did not start"
        );
        let log: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if log["message"] == "erpgate listening" {
            base = format!("http://{}", log["listen_addr"].as_str().unwrap());
            admin = format!("http://{}", log["admin_addr"].as_str().unwrap());
        }
    }
    // ~3,000 access lines of ~300 bytes: far more than the pipe (64 KiB) and the buffer hold.
    let auth = token(FULL);
    let started = std::time::Instant::now();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    for _ in 0..3000 {
        let request = Request::get(format!("{base}/api/method/ping"))
            .header("authorization", &auth)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(5), client.request(request))
            .await
            .expect("a request was held by the stalled log pipe")
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.into_body().collect().await.unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(60));
    let metrics = send(Method::GET, &format!("{admin}/metrics"), &[], Bytes::new())
        .await
        .text();
    let dropped = metric_value(&metrics, "erpgate_log_lines_dropped_total", &[]);
    assert!(dropped > 1000.0, "dropped {dropped}");
    let _ = child.kill();
    let _ = child.wait();
    drop(stdout);
}

#[tokio::test]
async fn a_request_target_the_parser_refuses_is_counted_and_logged_not_silent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    // What `curl -g '.../api/resource/ToDo?fields=["name"]'` sends: a raw `"` in the target.
    let mut stream = tokio::net::TcpStream::connect(gw.running.listen_addr)
        .await
        .unwrap();
    stream
        .write_all(b"GET /api/resource/ToDo?fields=[\"name\"] HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // The connection task records the refusal as it ends.
    let mut counted = 0.0;
    for _ in 0..50 {
        counted = metric_value(
            &gw.metrics().await,
            "erpgate_unparseable_requests_total",
            &[],
        );
        if counted == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counted, 1.0);
    assert_eq!(up.count(), 0);
    // Percent-encoded, the same request is served.
    let reply = get(&gw.url("/api/resource/ToDo?fields=%5B%22name%22%5D"), FULL).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}
