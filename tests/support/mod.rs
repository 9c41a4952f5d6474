//! Test support: the Frappe-compatible upstream, a gateway started on real sockets, and a real
//! HTTP client.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

pub mod frappe;
pub mod redis;
pub mod werkzeug;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};

use erpgate::config::Config;
use erpgate::server::RunningGateway;

pub use frappe::{Behaviour, FrappeUpstream};

pub const SITE: &str = "erp.localhost";
pub const SYNC_KEY: &str = "sync-key";
pub const SYNC_SECRET: &str = "sync-secret-never-leaves";
pub const READER_KEY: &str = "reader-key";
pub const READER_SECRET: &str = "reader-secret-never-leaves";

/// A gateway client credential: `(key_id, secret)`.
pub type Credential = (&'static str, &'static str);
pub const FULL: Credential = ("ek_full", "full-client-secret");
pub const TODO_READER: Credential = ("ek_reader", "reader-client-secret");

/// The upstream most tests use: one site, two service accounts.
pub async fn upstream() -> FrappeUpstream {
    FrappeUpstream::start(
        SITE,
        &[
            (SYNC_KEY, SYNC_SECRET, "sync@example.com"),
            (READER_KEY, READER_SECRET, "reader@example.com"),
        ],
    )
    .await
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// A config with one site on `upstream`, a full client and a ToDo-read-only client.
pub fn base_config(upstream: &FrappeUpstream) -> String {
    format!(
        r#"
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
log: {{ format: pretty, level: warn }}
limits: {{ max_body_bytes: 64MiB, max_inspected_body_bytes: 1MiB }}
sites:
  erp:
    backends: [{url}]
    site_name: {SITE}
    service_accounts:
      sync: {{ api_key: {SYNC_KEY}, api_secret: {SYNC_SECRET} }}
      reader: {{ api_key: {READER_KEY}, api_secret: {READER_SECRET} }}
    timeouts: {{ connect: 1s, request: 3s }}
clients:
  full:
    key_id: {full_id}
    secret_sha256: "{full_hash}"
    site: erp
    service_account: sync
  todo-reader:
    key_id: {reader_id}
    secret_sha256: "{reader_hash}"
    site: erp
    service_account: reader
    allow:
      resources: {{ ToDo: [read] }}
      methods: [frappe.client.get_list]
"#,
        url = upstream.url(),
        full_id = FULL.0,
        full_hash = sha256_hex(FULL.1),
        reader_id = TODO_READER.0,
        reader_hash = sha256_hex(TODO_READER.1),
    )
}

/// A gateway running in this process on real sockets.
pub struct Gateway {
    pub running: RunningGateway,
    pub base: String,
    pub admin: String,
}

impl Gateway {
    pub async fn start(yaml: &str) -> Self {
        let loaded = match Config::from_yaml(yaml, "test") {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        };
        let running = RunningGateway::start(loaded).await.unwrap();
        let base = format!("http://{}", running.listen_addr);
        let admin = format!("http://{}", running.admin_addr);
        Self {
            running,
            base,
            admin,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let r = send(
            Method::GET,
            &format!("{}/metrics", self.admin),
            &[],
            Bytes::new(),
        )
        .await;
        String::from_utf8(r.body.to_vec()).unwrap()
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub type ClientBody = BoxBody<Bytes, Infallible>;

/// Sends one request with a real HTTP/1.1 client.
pub async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    send_body(method, url, headers, Full::new(body.into()).boxed()).await
}

/// Sends one request with a streaming body.
pub async fn send_body(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: ClientBody,
) -> Reply {
    let client: Client<_, ClientBody> = Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(30),
        client.request(request.body(body).unwrap()),
    )
    .await
    .expect("no answer within 30s")
    .expect("request failed");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// `Authorization: token id:secret`.
pub fn token(credential: Credential) -> String {
    format!("token {}:{}", credential.0, credential.1)
}

/// GET with a token.
pub async fn get(url: &str, credential: Credential) -> Reply {
    send(
        Method::GET,
        url,
        &[("authorization", &token(credential))],
        Bytes::new(),
    )
    .await
}

/// A request with a token and a JSON body.
pub async fn send_json(method: Method, url: &str, credential: Credential, body: &str) -> Reply {
    let auth = token(credential);
    send(
        method,
        url,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.to_owned(),
    )
    .await
}

/// The value of a counter or gauge line in Prometheus text whose labels include all of `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A test CA and a leaf certificate for `127.0.0.1` and `localhost` it signed:
/// `(ca_pem, leaf_cert_pem, leaf_key_pem)`.
pub fn test_certificates() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "erpgate test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    (ca.pem(), leaf.pem(), leaf_key.serialize_pem())
}

/// A file in this test process's scratch directory.
pub fn scratch_file(name: &str, contents: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("erpgate-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// POST `body` as JSON with an `Idempotency-Key`.
pub async fn keyed_post(
    gw: &Gateway,
    path: &str,
    credential: Credential,
    key: &str,
    body: &str,
) -> Reply {
    let auth = token(credential);
    send(
        Method::POST,
        &gw.url(path),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("idempotency-key", key),
        ],
        body.to_owned(),
    )
    .await
}

/// The built `erpgate` binary serving a config file, with its JSON log lines (the config must
/// ask for `log: { format: json, level: info }`). Killed when dropped.
pub struct GatewayProcess {
    pub child: std::process::Child,
    logs: std::sync::mpsc::Receiver<String>,
    /// The lines written before it said where it listens, parsed.
    pub startup_logs: Vec<serde_json::Value>,
    pub listen: String,
    pub admin: String,
}

impl GatewayProcess {
    /// Runs `erpgate run --config <path>` and waits for it to say where it listens.
    pub fn start(config: &std::path::Path) -> Self {
        use std::io::BufRead as _;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_erpgate"))
            .args(["run", "--config", config.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, logs) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let mut process = Self {
            child,
            logs,
            startup_logs: Vec::new(),
            listen: String::new(),
            admin: String::new(),
        };
        loop {
            let log = process.next_log();
            if log["message"] == "erpgate listening" {
                process.listen = log["listen_addr"].as_str().unwrap().to_owned();
                process.admin = log["admin_addr"].as_str().unwrap().to_owned();
                return process;
            }
            process.startup_logs.push(log);
        }
    }

    /// The log lines written so far and not yet read, as they are.
    pub fn logs_so_far(&self) -> Vec<String> {
        self.logs.try_iter().collect()
    }

    /// The next log line, parsed (`null` for one that is not JSON); fails after 20 s.
    pub fn next_log(&self) -> serde_json::Value {
        let line = self
            .logs
            .recv_timeout(Duration::from_secs(20))
            .expect("no log line within 20s");
        serde_json::from_str(&line).unwrap_or_default()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (briefly) until the gateway's buffered bodies hold `bytes` in `store`
/// (`erpgate_buffered_bytes`).
pub async fn wait_for_buffered(gw: &Gateway, store: &str, bytes: f64) {
    for _ in 0..100 {
        let held = metric_value(
            &gw.metrics().await,
            "erpgate_buffered_bytes",
            &[("store", store)],
        );
        if held == bytes {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{store} never held {bytes} bytes");
}

/// Bodies are let go when they are dropped, after the answer is sent: wait for both gauges.
pub async fn assert_nothing_buffered(gw: &Gateway) {
    wait_for_buffered(gw, "memory", 0.0).await;
    wait_for_buffered(gw, "disk", 0.0).await;
}

/// Each path, read with `credential`, is not refused by the access rules.
pub async fn assert_none_refused(gw: &Gateway, paths: &[&str], credential: Credential) {
    for path in paths {
        let reply = get(&gw.url(path), credential).await;
        assert_ne!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{path}: {}",
            reply.text()
        );
    }
}
