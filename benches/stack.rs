//! Micro-benchmarks: one request through the whole in-process stack to an upstream service
//! that answers at once (no sockets), and each layer alone over the same service, so that a
//! regression points at its layer. `cargo bench --bench stack`.
//!
//! Each per-layer request carries the extensions the layers above it would have set (captured
//! from one pass through the full stack). `baseline` is the no-op service alone with the same
//! request building: subtract it from a layer's figure for the layer's own cost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::System;

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

/// Counts heap allocations, so the bench can say how many one request makes.
#[global_allocator]
static ALLOCATOR: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{header, Extensions, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tower::{Layer, Service, ServiceExt};

use erpgate::config::Config;
use erpgate::forwarding::{PeerAddr, TrustedProxies};
use erpgate::layers;
use erpgate::layers::auth::{AuthFailureLimiter, AuthLayer, Client, ClientTable};
use erpgate::layers::rate_limit::{ClientQuotas, QuotaPolicy};
use erpgate::metrics::Metrics;
use erpgate::stack::build_with;
use erpgate::{full_body, Body, BoxError};

const SECRET: &str = "bench-client-secret";

/// A ~1 KB Frappe-style answer.
fn answer() -> Bytes {
    let rows: Vec<String> = (0..24)
        .map(|i| format!(r#"{{"name":"TODO-{i:04}","status":"Open"}}"#))
        .collect();
    Bytes::from(format!(r#"{{"data":[{}]}}"#, rows.join(",")))
}

fn config(cache: bool) -> String {
    let hash = hex::encode(Sha256::digest(SECRET.as_bytes()));
    let cache = if cache {
        "cache:\n  rules:\n    - { doctype: ToDo, ttl: 600s }\n"
    } else {
        ""
    };
    format!(
        r#"
listen: 127.0.0.1:0
log: {{ level: error }}
rate_limit: {{ per_second: 1000000000, burst: 1000000000 }}
sites:
  erp:
    backends: [http://127.0.0.1:9]
    site_name: erp.localhost
    service_accounts:
      sync: {{ api_key: key, api_secret: secret }}
clients:
  shop:
    key_id: ek_shop
    secret_sha256: "{hash}"
    site: erp
    service_account: sync
    allow:
      resources: {{ ToDo: [read, write], Item: [read] }}
      methods: [frappe.client.get_list]
{cache}"#
    )
}

type Upstream = tower::util::BoxCloneSyncService<Request<Body>, Response<Body>, BoxError>;

fn upstream(body: Bytes, captured: Arc<Mutex<Option<Extensions>>>) -> Upstream {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |request: Request<Body>| {
        let body = body.clone();
        if let Ok(mut slot) = captured.try_lock() {
            if slot.is_none() {
                *slot = Some(request.extensions().clone());
            }
        }
        async move {
            let mut response = Response::new(full_body(body));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok::<_, BoxError>(response)
        }
    }))
}

fn request(extensions: Option<&Extensions>) -> Request<Body> {
    let mut request = Request::get("/api/resource/ToDo?limit=20")
        .header(header::AUTHORIZATION, format!("token ek_shop:{SECRET}"))
        .header(header::HOST, "gw.example.com")
        .body(erpgate::empty_body())
        .unwrap();
    match extensions {
        Some(e) => *request.extensions_mut() = e.clone(),
        None => {
            request
                .extensions_mut()
                .insert(PeerAddr("10.1.2.3:40000".parse().unwrap()));
        }
    }
    request
}

async fn call<S>(service: &S, request: Request<Body>)
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone,
{
    let response = service.clone().oneshot(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(!body.is_empty());
}

/// Prints the heap allocations one request through `service` makes, averaged over enough
/// requests to hide one-off growth.
fn allocations<S>(
    runtime: &tokio::runtime::Runtime,
    name: &str,
    service: &S,
    extensions: Option<&Extensions>,
) where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone,
{
    const REQUESTS: usize = 10_000;
    let region = Region::new(ALLOCATOR);
    runtime.block_on(async {
        for _ in 0..REQUESTS {
            call(service, request(extensions)).await;
        }
    });
    let stats = region.change();
    // What the service's own future holds (what a layer above it that boxes it copies).
    let future_bytes = std::mem::size_of_val(&service.clone().call(request(extensions)));
    println!(
        "{name}: {:.1} allocations, {:.0} bytes allocated per request; its future {future_bytes} bytes",
        (stats.allocations + stats.reallocations) as f64 / REQUESTS as f64,
        stats.bytes_allocated as f64 / REQUESTS as f64,
    );
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let body = answer();
    let captured = Arc::new(Mutex::new(None));
    let noop = upstream(body.clone(), Arc::new(Mutex::new(None)));

    let metrics = Metrics::new().unwrap();
    let loaded = Config::from_yaml(&config(false), "bench").unwrap();
    let gateway = build_with(
        &loaded,
        &metrics,
        None,
        upstream(body.clone(), captured.clone()),
    )
    .unwrap();
    let stack = gateway.service.clone();
    runtime.block_on(call(&stack, request(None)));
    let extensions = captured
        .lock()
        .unwrap()
        .take()
        .expect("the stack reached the upstream");

    let cached_metrics = Metrics::new().unwrap();
    let cached_loaded = Config::from_yaml(&config(true), "bench").unwrap();
    let cached = build_with(&cached_loaded, &cached_metrics, None, noop.clone()).unwrap();
    let cached_stack = cached.service.clone();
    runtime.block_on(call(&cached_stack, request(None)));

    for (name, service) in [
        ("full_stack", &stack),
        ("full_stack_cache_hit", &cached_stack),
    ] {
        allocations(&runtime, &format!("stack/{name}"), service, None);
    }

    let mut group = c.benchmark_group("stack");
    group.measurement_time(Duration::from_secs(3));
    group.bench_function("full_stack", |b| {
        b.to_async(&runtime).iter(|| call(&stack, request(None)))
    });
    group.bench_function("full_stack_cache_hit", |b| {
        b.to_async(&runtime)
            .iter(|| call(&cached_stack, request(None)))
    });
    group.finish();

    let mut group = c.benchmark_group("layer");
    group.measurement_time(Duration::from_secs(2));
    let e = Some(&extensions);
    macro_rules! layer {
        ($name:expr, $layer:expr) => {{
            let service = $layer.layer(noop.clone());
            allocations(&runtime, concat!("layer/", $name), &service, e);
            group.bench_function($name, |b| {
                b.to_async(&runtime).iter(|| call(&service, request(e)))
            });
        }};
    }
    allocations(&runtime, "layer/baseline", &noop, e);
    group.bench_function("baseline", |b| {
        b.to_async(&runtime).iter(|| call(&noop, request(e)))
    });
    let m = Metrics::new().unwrap();
    layer!("request_id", layers::request_id::RequestIdLayer);
    layer!("observe", layers::observe::ObserveLayer::new(m.clone()));
    layer!(
        "error_response",
        layers::error_response::ErrorResponseLayer::new(1 << 20)
    );
    layer!(
        "body_limit",
        layers::body_limit::BodyLimitLayer::new(1 << 20)
    );
    let one = NonZeroU32::new(1_000_000).unwrap();
    let quota = governor::Quota::per_second(one).allow_burst(one);
    let clients = ClientTable::new([(
        "ek_shop".to_owned(),
        Client {
            name: "shop".into(),
            secret_sha256: Sha256::digest(SECRET.as_bytes()).into(),
            site: "erp".into(),
            service_account: "sync".into(),
            extra_sites: Default::default(),
            rules: None,
            quotas: ClientQuotas {
                requests: Some(Arc::new(QuotaPolicy::new(
                    "default",
                    quota,
                    "erpgate:rl:bench",
                ))),
                writes: None,
            },
            in_flight: erpgate::layers::concurrency::InFlight::new(1024),
            limits_fingerprint: String::new(),
        },
    )]);
    layer!(
        "auth",
        AuthLayer::new(
            Arc::new(clients),
            Arc::new(AuthFailureLimiter::new(one, one)),
            TrustedProxies::default(),
            m.auth_failures.clone(),
            None,
        )
    );
    layer!(
        "route",
        layers::route::RouteLayer::new(gateway.router.clone())
    );
    let budget = layers::buffer_budget::BufferBudget::new(
        layers::buffer_budget::BudgetLimits {
            max_memory: 1 << 30,
            max_disk: 1 << 30,
            client_share: 1.0,
        },
        &layers::buffer_budget::BudgetMetrics {
            held: m.buffered_bytes.clone(),
            refused: m.buffer_refusals.clone(),
        },
    );
    let reader = layers::buffer::MemoryReader::new(budget, 1 << 20, Duration::from_secs(60));
    layer!(
        "classify",
        layers::classify::ClassifyLayer::new(reader.clone())
    );
    layer!(
        "rate_limit",
        layers::rate_limit::RateLimitLayer::new(m.rate_limited.clone(), None)
    );
    layer!(
        "concurrency",
        layers::concurrency::ConcurrencyLayer::new(m.rate_limited.clone())
    );
    layer!("authorize", layers::authorize::AuthorizeLayer);
    if let Some(cache) = cached.cache.clone() {
        layer!("cache_hit", layers::cache::CacheLayer::new(cache));
    }
    layer!(
        "idempotency_without_key",
        layers::idempotency::IdempotencyLayer::new(
            Arc::new(layers::idempotency::MemoryStore::new(
                Duration::from_secs(60),
                1 << 20,
                m.idempotency_evictions.clone(),
            )),
            reader,
            1 << 20,
            Duration::from_secs(60),
        )
    );
    layer!("deadline", layers::deadline::DeadlineLayer);
    layer!(
        "retry",
        tower::retry::RetryLayer::new(layers::retry::RetryPolicy::new(m.retries.clone()))
    );
    layer!("breaker", layers::breaker::BreakerLayer);
    layer!(
        "credential_swap",
        layers::credential_swap::CredentialSwapLayer::new(TrustedProxies::default())
    );
    group.finish();
}

criterion_group!(stack, benches);
criterion_main!(stack);
