//! CORS over real sockets: preflights answered by the gateway without a key and never
//! forwarded, bounded per source address; actual responses carry `Access-Control-Allow-Origin`
//! only for an origin the authenticated client allows; off unless configured.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;

const APP: &str = "https://app.example";
const READER_APP: &str = "http://reader.example:3000";

/// The base config with CORS on: every client may be called from `APP`, except the ToDo reader,
/// which lists only `READER_APP`; 3 preflights per address, then one a minute.
fn cors_config(up: &FrappeUpstream) -> String {
    let yaml = base_config(up).replace(
        "    service_account: reader\n",
        &format!("    service_account: reader\n    allowed_origins: [\"{READER_APP}\"]\n"),
    );
    format!(
        "{yaml}cors:\n  allowed_origins: [\"{APP}\"]\n  max_age: 5m\n  \
         preflights_per_minute: 1\n  preflight_burst: 3\n"
    )
}

/// A keyed GET of `path` sent from a page on `origin`.
async fn from_page(gw: &Gateway, credential: Credential, origin: &str, path: &str) -> Reply {
    send(
        Method::GET,
        &gw.url(path),
        &[("authorization", &token(credential)), ("origin", origin)],
        Bytes::new(),
    )
    .await
}

async fn preflight(gw: &Gateway, origin: &str) -> Reply {
    send(
        Method::OPTIONS,
        &gw.url("/api/resource/ToDo"),
        &[
            ("origin", origin),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization,content-type,idempotency-key",
            ),
        ],
        Bytes::new(),
    )
    .await
}

#[tokio::test]
async fn a_preflight_is_answered_by_the_gateway_without_a_key_and_never_forwarded() {
    let up = upstream().await;
    let gw = Gateway::start(&cors_config(&up)).await;

    let allowed = preflight(&gw, APP).await;
    assert_eq!(allowed.status, StatusCode::NO_CONTENT, "{}", allowed.text());
    assert_eq!(allowed.header("access-control-allow-origin"), Some(APP));
    assert_eq!(
        allowed.header("access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(allowed.header("access-control-max-age"), Some("300"));
    let methods = allowed.header("access-control-allow-methods").unwrap();
    assert!(
        methods.contains("POST") && methods.contains("DELETE"),
        "{methods}"
    );
    let headers = allowed
        .header("access-control-allow-headers")
        .unwrap()
        .to_ascii_lowercase();
    for name in [
        "authorization",
        "content-type",
        "idempotency-key",
        "x-frappe-csrf-token",
        "accept",
    ] {
        assert!(headers.contains(name), "{name} in {headers}");
    }
    assert!(allowed.header("vary").unwrap().contains("origin"));

    // An origin another client lists is fine for the preflight (no key, no client known yet).
    let readers = preflight(&gw, READER_APP).await;
    assert_eq!(
        readers.header("access-control-allow-origin"),
        Some(READER_APP)
    );

    // An origin no client lists: answered, but without the header the browser needs.
    let stranger = preflight(&gw, "https://evil.example").await;
    assert_eq!(stranger.status, StatusCode::NO_CONTENT);
    assert_eq!(stranger.header("access-control-allow-origin"), None);

    assert_eq!(up.count(), 0, "no preflight reaches Frappe");
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "erpgate_requests_total",
            &[("kind", "preflight"), ("code", "204")]
        ),
        3.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn preflights_are_bounded_per_source_address_not_per_client() {
    let up = upstream().await;
    let gw = Gateway::start(&cors_config(&up)).await;
    for _ in 0..3 {
        assert_eq!(preflight(&gw, APP).await.status, StatusCode::NO_CONTENT);
    }
    let over = preflight(&gw, APP).await;
    assert_eq!(
        over.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        over.text()
    );
    assert!(over.header("retry-after").is_some());
    assert_eq!(over.json()["exc_type"], "TooManyRequestsError");
    // The same address's keyed requests are not touched by its preflight budget.
    let keyed = from_page(&gw, FULL, APP, "/api/resource/ToDo").await;
    assert_eq!(keyed.status, StatusCode::OK, "{}", keyed.text());
    assert_eq!(up.count(), 1, "only the keyed request reached Frappe");
}

#[tokio::test]
async fn an_actual_response_allows_only_the_origins_of_the_authenticated_client() {
    let up = upstream().await;
    let gw = Gateway::start(&cors_config(&up)).await;

    let full = from_page(&gw, FULL, APP, "/api/resource/ToDo").await;
    assert_eq!(full.status, StatusCode::OK);
    assert_eq!(full.header("access-control-allow-origin"), Some(APP));
    assert_eq!(
        full.header("access-control-allow-credentials"),
        Some("true")
    );
    let exposed = full.header("access-control-expose-headers").unwrap();
    for name in [
        "x-ratelimit-remaining",
        "ratelimit",
        "x-request-id",
        "x-cache",
        "retry-after",
    ] {
        assert!(
            exposed.split(", ").any(|n| n == name),
            "{name} in {exposed}"
        );
    }
    assert!(full
        .headers
        .get_all("vary")
        .iter()
        .any(|v| v.to_str().unwrap().contains("origin")));

    // The reader lists only its own origin: the default does not apply to it.
    let reader_elsewhere = from_page(&gw, TODO_READER, APP, "/api/resource/ToDo").await;
    assert_eq!(reader_elsewhere.status, StatusCode::OK);
    assert_eq!(reader_elsewhere.header("access-control-allow-origin"), None);
    assert!(reader_elsewhere.header("vary").unwrap().contains("origin"));
    // The full client does not list the reader's origin.
    let full_elsewhere = from_page(&gw, FULL, READER_APP, "/api/resource/ToDo").await;
    assert_eq!(full_elsewhere.header("access-control-allow-origin"), None);

    // A refusal to an allowed origin is readable by the page, so it can say why.
    let refused = from_page(
        &gw,
        TODO_READER,
        READER_APP,
        "/api/resource/Sales%20Invoice",
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(
        refused.header("access-control-allow-origin"),
        Some(READER_APP)
    );

    // No key: no client, so no origin is allowed.
    let anonymous = send(
        Method::GET,
        &gw.url("/api/resource/ToDo"),
        &[("origin", APP)],
        Bytes::new(),
    )
    .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(anonymous.header("access-control-allow-origin"), None);

    // Without an Origin nothing CORS is added.
    let plain = get(&gw.url("/api/resource/ToDo"), FULL).await;
    assert_eq!(plain.header("access-control-allow-origin"), None);
    assert!(plain.header("vary").is_none_or(|v| !v.contains("origin")));

    let paths: Vec<String> = up
        .received()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    assert_eq!(
        paths.len(),
        4,
        "the refused and the anonymous never reached Frappe: {paths:?}"
    );
}

#[tokio::test]
async fn without_a_cors_section_an_options_request_needs_a_key() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let reply = preflight(&gw, APP).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.header("access-control-allow-origin"), None);
    let keyed = from_page(&gw, FULL, APP, "/api/resource/ToDo").await;
    assert_eq!(keyed.status, StatusCode::OK);
    assert_eq!(keyed.header("access-control-allow-origin"), None);
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn an_ipv6_host_is_one_source_for_the_preflight_bound_whichever_address_of_its_64_it_uses() {
    let up = upstream().await;
    let config = cors_config(&up).replace("limits:", "trusted_proxies: [127.0.0.1]\nlimits:");
    let gw = Gateway::start(&config).await;
    let from = |address: &'static str| {
        let url = gw.url("/api/resource/ToDo");
        async move {
            send(
                Method::OPTIONS,
                &url,
                &[
                    ("origin", APP),
                    ("access-control-request-method", "GET"),
                    ("x-forwarded-for", address),
                ],
                Bytes::new(),
            )
            .await
            .status
        }
    };
    for address in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"] {
        assert_eq!(from(address).await, StatusCode::NO_CONTENT, "{address}");
    }
    assert_eq!(from("2001:db8:1:2::4").await, StatusCode::TOO_MANY_REQUESTS);
    // Another /64 is another source.
    assert_eq!(from("2001:db8:1:3::1").await, StatusCode::NO_CONTENT);
}
