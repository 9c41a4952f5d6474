//! CORS in a real browser: headless Chromium loads a page from an origin the client allows and
//! one no client allows; each page calls erpgate with `fetch` and the client's key (list, then
//! create, a ToDo). The allowed page succeeds and can read the exposed rate-limit header; the
//! browser blocks the other one; no preflight reaches the upstream, and the blocked page's
//! requests never do either. Chromium comes from Debian (`tests/setup.sh` installs it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use support::*;

/// Serves the page `html` will hold (set once the gateway's address is known) at every path on
/// 127.0.0.1; the port.
async fn page_server(html: Arc<OnceLock<String>>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let html = html.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_: Request<Incoming>| {
                    let page = html.get().cloned().unwrap_or_default();
                    let mut response = Response::new(Full::new(Bytes::from(page)));
                    response
                        .headers_mut()
                        .insert("content-type", "text/html; charset=utf-8".parse().unwrap());
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

/// A page that lists ToDos and creates one through the gateway at `gateway` with the full
/// client's key, and writes what happened as JSON into `#out`.
fn page(gateway: &str) -> String {
    let key = format!("token {}:{}", FULL.0, FULL.1);
    format!(
        r#"<!doctype html><html><body><pre id="out">pending</pre><script>
(async () => {{
  const headers = {{ "Authorization": "{key}", "Content-Type": "application/json" }};
  const result = {{}};
  try {{
    const list = await fetch("{gateway}/api/resource/ToDo", {{ headers }});
    result.list = list.status;
    result.remaining = list.headers.get("x-ratelimit-remaining");
    await list.json();
    const created = await fetch("{gateway}/api/resource/ToDo", {{
      method: "POST", headers, body: JSON.stringify({{ description: "from " + location.origin }})
    }});
    result.create = created.status;
    result.name = (await created.json()).data.name;
  }} catch (e) {{
    result.error = String(e);
  }}
  document.getElementById("out").textContent = JSON.stringify(result);
}})();
</script></body></html>"#
    )
}

/// Loads `url` in headless Chromium and returns what the page wrote into `#out`.
fn load_in_chromium(url: &str) -> serde_json::Value {
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok())
        .expect("Chromium is needed (tests/setup.sh installs Debian's `chromium`)");
    let profile = std::env::temp_dir().join(format!(
        "erpgate-chromium-{}-{}",
        std::process::id(),
        url.len() + url.bytes().map(usize::from).sum::<usize>()
    ));
    let output = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--virtual-time-budget=15000",
            "--timeout=30000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", url])
        .output()
        .expect("chromium runs");
    let _ = std::fs::remove_dir_all(&profile);
    let dom = String::from_utf8_lossy(&output.stdout);
    let out = dom
        .split("<pre id=\"out\">")
        .nth(1)
        .and_then(|rest| rest.split("</pre>").next())
        .unwrap_or_else(|| {
            panic!(
                "no #out in the page: {dom}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    serde_json::from_str(&out.replace("&quot;", "\"")).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_origin_works_in_chromium_and_another_is_blocked_by_it() {
    let up = upstream().await;
    // The page servers first: the allowed origin goes into the config, the gateway's address
    // into the page.
    let html = Arc::new(OnceLock::new());
    let allowed = page_server(html.clone()).await;
    let blocked = page_server(html.clone()).await;
    let yaml = base_config(&up).replace(
        "    service_account: sync\n",
        &format!(
            "    service_account: sync\n    allowed_origins: [\"http://127.0.0.1:{allowed}\"]\n"
        ),
    );
    let gw = Gateway::start(&format!("{yaml}cors: {{}}\n")).await;
    html.set(page(&gw.base)).unwrap();

    let ok = tokio::task::spawn_blocking(move || {
        load_in_chromium(&format!("http://127.0.0.1:{allowed}/app.html"))
    })
    .await
    .unwrap();
    assert_eq!(ok["list"], 200, "{ok}");
    assert_eq!(ok["create"], 200, "{ok}");
    assert!(ok["name"].as_str().unwrap().starts_with("todo"), "{ok}");
    assert!(
        ok["remaining"].as_str().is_some(),
        "exposed header readable: {ok}"
    );

    // Another origin (another port is another origin): the browser refuses.
    let refused = tokio::task::spawn_blocking(move || {
        load_in_chromium(&format!("http://localhost:{blocked}/app.html"))
    })
    .await
    .unwrap();
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or_default()
            .contains("Failed to fetch"),
        "{refused}"
    );
    assert!(refused.get("list").is_none(), "{refused}");

    // Frappe saw the allowed page's two requests and nothing else: no preflight, nothing from
    // the refused page.
    let seen: Vec<(Method, String)> = up
        .received()
        .into_iter()
        .map(|r| (r.method, r.path_and_query))
        .collect();
    assert_eq!(
        seen,
        vec![
            (Method::GET, "/api/resource/ToDo".to_owned()),
            (Method::POST, "/api/resource/ToDo".to_owned()),
        ]
    );
    let metrics = gw.metrics().await;
    let preflights = metric_value(
        &metrics,
        "erpgate_requests_total",
        &[("kind", "preflight"), ("code", "204")],
    );
    assert!(preflights >= 2.0, "both pages preflighted: {metrics}");
}
