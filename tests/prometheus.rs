//! A real Prometheus server (the Debian `prometheus` package; `tests/setup.sh` installs it)
//! scrapes a running gateway, and its HTTP API shows that `erpgate_requests_total` arrived.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_gateway() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    for _ in 0..3 {
        assert_eq!(
            get(&gw.url("/api/resource/ToDo"), FULL).await.status,
            StatusCode::OK
        );
    }

    let admin = gw.running.admin_addr;
    let config = scratch_file(
        "prometheus.yml",
        &format!(
            "global: {{ scrape_interval: 1s }}\nscrape_configs:\n  - job_name: erpgate\n    static_configs: [{{ targets: ['{admin}'] }}]\n"
        ),
    );
    let data = config.with_file_name("prometheus-data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", data.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the prometheus binary: run tests/setup.sh, which installs it (apt-get install prometheus)");
    let _prometheus = Prometheus(child);

    let query = format!(
        "http://127.0.0.1:{port}/api/v1/query?query=erpgate_requests_total%7Bclient%3D%22full%22%7D"
    );
    for _ in 0..240 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            continue; // still starting
        }
        let Some(reply) = try_send(&query).await else {
            continue;
        };
        let result = &reply["data"]["result"];
        if let Some(sample) = result.as_array().and_then(|r| r.first()) {
            assert_eq!(sample["metric"]["site"], "erp");
            assert_eq!(sample["metric"]["code"], "200");
            assert_eq!(sample["metric"]["job"], "erpgate");
            let value: f64 = sample["value"][1].as_str().unwrap().parse().unwrap();
            assert_eq!(value, 3.0);
            return;
        }
    }
    panic!("Prometheus never reported erpgate_requests_total");
}

/// A GET that may fail while Prometheus starts.
async fn try_send(url: &str) -> Option<serde_json::Value> {
    let reply = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::spawn({
            let url = url.to_owned();
            async move { send(Method::GET, &url, &[], Bytes::new()).await }
        }),
    )
    .await
    .ok()?
    .ok()?;
    (reply.status == StatusCode::OK).then(|| reply.json())
}
