//! Under a low file-descriptor limit the connection cap follows it, with descriptors kept back
//! so the admin listener, upstream connections and accept keep working: a flood of idle
//! connections is closed at once instead of exhausting the process.
//!
//! Its own test binary: it lowers `RLIMIT_NOFILE` of this very process (with `prlimit`), which
//! no other test must share.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use support::*;
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn a_flood_under_a_low_fd_limit_is_refused_and_the_gateway_keeps_serving() {
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string(), "--nofile=320:320"])
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(status.success());
    let up = upstream().await;
    // No cap in the config: the limit alone bounds connections (320 - 256 = 64).
    let gw = Gateway::start(&base_config(&up)).await;
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let mut flood = Vec::new();
    for _ in 0..150 {
        match tokio::net::TcpStream::connect(&addr).await {
            Ok(stream) => flood.push(stream),
            Err(e) => panic!("the test itself ran out of descriptors: {e}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut open = 0;
    for stream in &mut flood {
        let mut buf = [0u8; 16];
        // Still held open by the gateway when the read times out; closed at once otherwise.
        let read = tokio::time::timeout(Duration::from_millis(20), stream.read(&mut buf)).await;
        if read.is_err() {
            open += 1;
        }
    }
    assert!(
        open <= 70,
        "{open} flood connections held under a 320-descriptor limit"
    );
    // The admin listener answers, and with the flood gone a client is served.
    let health = send(
        Method::GET,
        &format!("{}/healthz", gw.admin),
        &[],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(health.status, StatusCode::OK);
    drop(flood);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        get(&gw.url("/api/resource/ToDo"), FULL).await.status,
        StatusCode::OK
    );
    let metrics = gw.metrics().await;
    assert!(metric_value(&metrics, "erpgate_connections_refused_total", &[]) >= 80.0);
}
