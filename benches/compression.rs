//! What compression costs and saves: a 100-row ToDo `frappe.client.get_list` answer (hash
//! names, as Frappe's) through the whole in-process stack, identity against gzip, br and zstd,
//! uncached and as a cache hit. The difference per request is compression's CPU cost on one
//! core; the sizes are printed once. `cargo bench --bench compression`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{header, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tower::ServiceExt;

use erpgate::config::Config;
use erpgate::forwarding::PeerAddr;
use erpgate::metrics::Metrics;
use erpgate::stack::{build_with, GatewayService};
use erpgate::{full_body, Body, BoxError};

const SECRET: &str = "bench-client-secret";
const PATH: &str = "/api/method/frappe.client.get_list?doctype=ToDo&limit_page_length=100";

/// The list as Frappe 15 sends it for `fields=["name","status","description"]`.
fn todo_list() -> Bytes {
    let rows: Vec<String> = (0..100)
        .map(|i| {
            let hash = hex::encode(Sha256::digest(i.to_string().as_bytes()));
            format!(
                r#"{{"name":"{}","status":"Open","description":"Follow up {i}"}}"#,
                &hash[..10]
            )
        })
        .collect();
    Bytes::from(format!(r#"{{"message":[{}]}}"#, rows.join(",")))
}

/// The gateway, with `extra` appended to its config.
fn gateway(extra: &str) -> GatewayService {
    let hash = hex::encode(Sha256::digest(SECRET.as_bytes()));
    let yaml = format!(
        "listen: 127.0.0.1:0\nlog: {{ level: error }}\nrate_limit: null\n\
         sites:\n  erp:\n    backends: [http://127.0.0.1:9]\n    site_name: erp.localhost\n    \
         service_accounts:\n      sync: {{ api_key: key, api_secret: secret }}\n\
         clients:\n  shop:\n    key_id: ek_shop\n    secret_sha256: \"{hash}\"\n    site: erp\n    \
         service_account: sync\n{extra}"
    );
    let loaded = Config::from_yaml(&yaml, "bench").unwrap();
    let body = todo_list();
    let upstream =
        tower::util::BoxCloneSyncService::new(tower::service_fn(move |_: Request<Body>| {
            let mut response = Response::new(full_body(body.clone()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            async move { Ok::<_, BoxError>(response) }
        }));
    build_with(&loaded, &Metrics::new().unwrap(), None, upstream)
        .unwrap()
        .service
}

/// One request; the bytes the client would receive.
async fn call(service: &GatewayService, accept: &str) -> usize {
    let mut request = Request::get(PATH)
        .header(header::AUTHORIZATION, format!("token ek_shop:{SECRET}"))
        .header(header::HOST, "gw.example.com")
        .body(erpgate::empty_body())
        .unwrap();
    if !accept.is_empty() {
        request.headers_mut().insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_str(accept).unwrap(),
        );
    }
    request
        .extensions_mut()
        .insert(PeerAddr("10.1.2.3:40000".parse().unwrap()));
    let response = service.clone().oneshot(request).await.unwrap();
    response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .len()
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let uncached = gateway("");
    let cached = gateway("cache:\n  rules:\n    - { method: frappe.client.get_list, ttl: 600s }\n");
    for accept in ["", "gzip", "br", "zstd"] {
        let bytes = runtime.block_on(call(&uncached, accept));
        println!("compression: {PATH} with Accept-Encoding {accept:?}: {bytes} bytes");
    }
    let mut group = c.benchmark_group("compression");
    group.measurement_time(Duration::from_secs(3));
    for (name, accept) in [
        ("identity", ""),
        ("gzip", "gzip"),
        ("br", "br"),
        ("zstd", "zstd"),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| call(&uncached, accept));
        });
        group.bench_function(format!("{name}_cache_hit"), |b| {
            b.to_async(&runtime).iter(|| call(&cached, accept));
        });
    }
    group.finish();
}

criterion_group!(group, benches);
criterion_main!(group);
