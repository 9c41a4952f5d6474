//! Cache-hit throughput against uncached throughput through the same gateway, as a ratio.
//!
//! One process: the Frappe-compatible test upstream, a gateway with a cache rule for the
//! benchmarked method and one without, and a closed-loop load of keep-alive HTTP/1.1 clients on
//! 127.0.0.1. Run with `cargo bench --bench cache_hit`; figures go to BENCHMARKS.md. The
//! upstream answers `test.slow?ms=N` after N ms: 0 ms shows the gateway's own cost, 20 ms is a
//! modest Frappe `get_count`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::*;

const CONCURRENCY: usize = 32;
const DURATION: Duration = Duration::from_secs(5);

type BenchClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// One GET that must answer 200, body read.
async fn get_ok(client: &BenchClient, url: &str, auth: &str) {
    let request = Request::get(url)
        .header("authorization", auth)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
}

/// Requests per second over `DURATION` with `CONCURRENCY` clients looping on `url`.
async fn throughput(url: &str) -> f64 {
    let client: BenchClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CONCURRENCY)
        .build_http();
    let done = Arc::new(AtomicU64::new(0));
    let auth = token(FULL);
    // Warm up connections and the cache.
    for _ in 0..CONCURRENCY {
        get_ok(&client, url, &auth).await;
    }
    let deadline = Instant::now() + DURATION;
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, done, url, auth) =
            (client.clone(), done.clone(), url.to_owned(), auth.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                get_ok(&client, &url, &auth).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let up = upstream().await;
        // No rate limit, a generous cap: the bench measures the path, not the quotas.
        let base = base_config(&up)
            .replace("level: warn", "level: error")
            .replace(
                "clients:\n",
                "rate_limit: null\nmax_in_flight: 1024\nclients:\n",
            );
        let uncached = Gateway::start(&base).await;
        let cached = Gateway::start(&format!(
            "{base}cache:\n  rules:\n    - {{ method: test.slow, ttl: 600s }}\n"
        ))
        .await;
        println!("| upstream latency | uncached req/s | cache-hit req/s | hit ÷ uncached |");
        println!("|---|---|---|---|");
        for ms in [0, 20] {
            let path = format!("/api/method/test.slow?ms={ms}");
            let miss = throughput(&uncached.url(&path)).await;
            let hit = throughput(&cached.url(&path)).await;
            println!("| {ms} ms | {miss:.0} | {hit:.0} | {:.1}× |", hit / miss);
        }
    });
}
