//! OAuth apps over real sockets: a user's access token from the site's own OAuth provider is
//! checked at the site (introspection, as Frappe 15 answers it) and, for an app configured
//! here, goes to Frappe as the user's own `Authorization`; the app's rules and quotas apply,
//! per user too; answers are remembered briefly, looked up once for many concurrent first uses,
//! never shared between users in the cache; a site outage is 503, never an accepted token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;

const APP: &str = "mobile-client-id";

/// The base config and an app `mobile` on `erp`, plus `extra` lines in its block.
fn oauth_config(up: &FrappeUpstream, extra: &str) -> String {
    format!(
        "{}oauth_apps:\n  mobile:\n    site: erp\n    client_id: {APP}\n    \
         allow: {{ resources: {{ ToDo: [read] }}, methods: [frappe.auth.get_logged_user] }}\n{extra}",
        base_config(up)
    )
}

async fn bearer(gw: &Gateway, token: &str, path: &str) -> Reply {
    send(
        Method::GET,
        &gw.url(path),
        &[("authorization", &format!("Bearer {token}"))],
        Bytes::new(),
    )
    .await
}

const WHO: &str = "/api/method/frappe.auth.get_logged_user";

#[tokio::test]
async fn an_active_token_of_a_configured_app_reaches_frappe_as_the_users_own() {
    let up = upstream().await;
    up.issue_oauth_token("tok-alice", APP, "alice@example.com", 3600, "all openid");
    let gw = Gateway::start(&oauth_config(&up, "")).await;

    let reply = bearer(&gw, "tok-alice", WHO).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["message"], "alice@example.com");
    // The other hygiene rules hold: the client's cookie, sid and key-source switch never reach
    // Frappe, its cookies never come back.
    let list = send(
        Method::GET,
        &gw.url("/api/resource/ToDo?sid=stolen"),
        &[
            ("authorization", "Bearer tok-alice"),
            ("cookie", "sid=someone-elses"),
            ("frappe-authorization-source", "Password"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text());
    assert!(list.header("set-cookie").is_none());

    let received = up.received();
    let calls: Vec<_> = received
        .iter()
        .filter(|r| !r.path_and_query.contains("introspect_token"))
        .collect();
    assert_eq!(calls.len(), 2);
    for call in calls {
        assert_eq!(call.headers["authorization"], "Bearer tok-alice");
        assert_eq!(call.headers["x-frappe-site-name"], SITE);
        assert!(call.headers.get("cookie").is_none());
        assert!(call.headers.get("frappe-authorization-source").is_none());
        assert!(
            !call.path_and_query.contains("sid="),
            "{}",
            call.path_and_query
        );
    }
    // The introspection: a guest POST with the token, as Frappe's endpoint takes it.
    let introspection = received
        .iter()
        .find(|r| r.path_and_query.contains("introspect_token"))
        .unwrap();
    assert_eq!(introspection.method, Method::POST);
    assert!(introspection.headers.get("authorization").is_none());
    assert_eq!(
        introspection.body.as_deref().unwrap(),
        b"token=tok-alice&token_type_hint=access_token"
    );
    assert_eq!(
        up.introspections(),
        1,
        "the second request used the remembered answer"
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "erpgate_oauth_introspections_total",
            &[("site", "erp"), ("outcome", "active")]
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "erpgate_requests_total",
            &[("client", "mobile"), ("code", "200")]
        ),
        2.0
    );
}

#[tokio::test]
async fn expired_revoked_unknown_and_other_apps_tokens_are_refused_and_never_forwarded() {
    let up = upstream().await;
    up.issue_oauth_token("tok-expired", APP, "alice@example.com", -10, "all");
    up.issue_oauth_token("tok-revoked", APP, "alice@example.com", 3600, "all");
    up.revoke_oauth_token("tok-revoked");
    up.issue_oauth_token(
        "tok-other-app",
        "someone-elses-app",
        "alice@example.com",
        3600,
        "all",
    );
    let gw = Gateway::start(&oauth_config(&up, "")).await;
    for token in ["tok-expired", "tok-revoked", "tok-other-app", "tok-made-up"] {
        let reply = bearer(&gw, token, WHO).await;
        assert_eq!(
            reply.status,
            StatusCode::UNAUTHORIZED,
            "{token}: {}",
            reply.text()
        );
        assert_eq!(reply.json()["exc_type"], "AuthenticationError");
    }
    assert!(up
        .received()
        .iter()
        .all(|r| r.path_and_query.contains("introspect_token")));
    let metrics = gw.metrics().await;
    for reason in ["oauth_expired", "oauth_inactive", "oauth_unknown_app"] {
        assert!(
            metric_value(
                &metrics,
                "erpgate_auth_failures_total",
                &[("reason", reason)]
            ) >= 1.0,
            "{reason}: {metrics}"
        );
    }
}

#[tokio::test]
async fn guessed_tokens_are_bounded_per_address_and_cost_the_site_nothing_once_blocked() {
    let up = upstream().await;
    up.issue_oauth_token("tok-alice", APP, "alice@example.com", 3600, "all");
    let yaml = oauth_config(&up, "").replace(
        "limits:",
        "auth_failures: { per_minute: 1, burst: 3 }\nlimits:",
    );
    let gw = Gateway::start(&yaml).await;
    // A known-good token first, so it is remembered.
    assert_eq!(bearer(&gw, "tok-alice", WHO).await.status, StatusCode::OK);
    let mut statuses = Vec::new();
    for i in 0..10 {
        statuses.push(bearer(&gw, &format!("guess{i}"), WHO).await.status);
    }
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::UNAUTHORIZED)
            .count(),
        3
    );
    assert!(statuses[4..]
        .iter()
        .all(|s| *s == StatusCode::TOO_MANY_REQUESTS));
    assert!(up.introspections() <= 5, "{}", up.introspections());
    // The good token, already known, still passes from the blocked address.
    assert_eq!(bearer(&gw, "tok-alice", WHO).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_revoked_token_stops_working_within_the_introspection_ttl() {
    let up = upstream().await;
    up.issue_oauth_token("tok-alice", APP, "alice@example.com", 3600, "all");
    let gw = Gateway::start(&oauth_config(&up, "    introspection_ttl: 1s\n")).await;
    assert_eq!(bearer(&gw, "tok-alice", WHO).await.status, StatusCode::OK);
    up.revoke_oauth_token("tok-alice");
    let deadline = std::time::Instant::now() + Duration::from_millis(2500);
    loop {
        let status = bearer(&gw, "tok-alice", WHO).await.status;
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert_eq!(status, StatusCode::OK);
        assert!(
            std::time::Instant::now() < deadline,
            "still accepted after the ttl"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_hundred_concurrent_first_uses_of_a_token_make_one_introspection() {
    let up = upstream().await;
    up.issue_oauth_token("tok-alice", APP, "alice@example.com", 3600, "all");
    let yaml = oauth_config(
        &up,
        "    rate_limit: { per_second: 10000, burst: 10000 }\n    max_in_flight: 200\n",
    );
    let gw = Gateway::start(&yaml).await;
    let url = gw.url(WHO);
    let calls = (0..100).map(|_| {
        let url = url.clone();
        tokio::spawn(async move {
            send(
                Method::GET,
                &url,
                &[("authorization", "Bearer tok-alice")],
                Bytes::new(),
            )
            .await
            .status
        })
    });
    for call in calls.collect::<Vec<_>>() {
        assert_eq!(call.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(up.introspections(), 1);
}

#[tokio::test]
async fn the_apps_rules_and_quotas_apply_per_app_and_per_user() {
    let up = upstream().await;
    for user in ["alice", "bob", "carol", "dave"] {
        up.issue_oauth_token(
            &format!("tok-{user}"),
            APP,
            &format!("{user}@example.com"),
            3600,
            "all",
        );
    }
    let yaml = oauth_config(
        &up,
        "    rate_limit: { per_minute: 6, burst: 6 }\n    per_user_rate_limit: { per_minute: 1, burst: 2 }\n",
    );
    let gw = Gateway::start(&yaml).await;
    // The app's rules: ToDo read only.
    let refused = bearer(&gw, "tok-alice", "/api/resource/Sales%20Invoice").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(!up
        .received()
        .iter()
        .any(|r| r.path_and_query.contains("Sales")));
    // Alice's own quota (2, of which the refusal took one), then Bob's, then the app's.
    assert_eq!(bearer(&gw, "tok-alice", WHO).await.status, StatusCode::OK);
    let alice_over = bearer(&gw, "tok-alice", WHO).await;
    assert_eq!(alice_over.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(alice_over.text().contains("this user"));
    assert_eq!(bearer(&gw, "tok-bob", WHO).await.status, StatusCode::OK);
    assert_eq!(bearer(&gw, "tok-bob", WHO).await.status, StatusCode::OK);
    assert_eq!(
        bearer(&gw, "tok-bob", WHO).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // The app's quota over all its users: 6, of which 4 are spent.
    assert_eq!(bearer(&gw, "tok-carol", WHO).await.status, StatusCode::OK);
    assert_eq!(bearer(&gw, "tok-carol", WHO).await.status, StatusCode::OK);
    let app_over = bearer(&gw, "tok-dave", WHO).await;
    assert_eq!(app_over.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(app_over.header("x-ratelimit-limit").is_some());
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "erpgate_requests_total",
            &[("client", "mobile"), ("code", "429")]
        ),
        3.0
    );
}

#[tokio::test]
async fn cached_answers_are_never_shared_between_users_or_with_service_accounts() {
    let up = upstream().await;
    for user in ["alice", "bob"] {
        up.issue_oauth_token(
            &format!("tok-{user}"),
            APP,
            &format!("{user}@example.com"),
            3600,
            "all openid",
        );
    }
    let yaml = format!(
        "{}cache:\n  rules:\n    - {{ method: frappe.auth.get_logged_user, ttl: 60s }}\n",
        oauth_config(&up, "")
    );
    let gw = Gateway::start(&yaml).await;
    let alice = bearer(&gw, "tok-alice", WHO).await;
    assert_eq!(alice.json()["message"], "alice@example.com");
    let alice_again = bearer(&gw, "tok-alice", WHO).await;
    assert_eq!(alice_again.header("x-cache"), Some("HIT"));
    let bob = bearer(&gw, "tok-bob", WHO).await;
    assert_eq!(bob.json()["message"], "bob@example.com");
    assert_eq!(bob.header("x-cache"), Some("MISS"));
    let service = get(&gw.url(WHO), FULL).await;
    assert_eq!(service.json()["message"], "sync@example.com");
    assert_eq!(service.header("x-cache"), Some("MISS"));
}

#[tokio::test]
async fn a_site_outage_is_503_never_401_and_never_an_accepted_token() {
    let up = upstream().await;
    up.issue_oauth_token("tok-alice", APP, "alice@example.com", 3600, "all");
    let gw = Gateway::start(&oauth_config(&up, "")).await;
    up.set_behaviour(Behaviour::Fail(503));
    let reply = bearer(&gw, "tok-alice", WHO).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert!(reply.header("retry-after").is_some());
    // Only the introspection went out; the failure was not remembered.
    assert!(up
        .received()
        .iter()
        .all(|r| r.path_and_query.contains("introspect_token")));
    up.set_behaviour(Behaviour::Normal);
    assert_eq!(bearer(&gw, "tok-alice", WHO).await.status, StatusCode::OK);
    let metrics = gw.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "erpgate_oauth_introspections_total",
            &[("site", "erp"), ("outcome", "error")]
        ) >= 1.0
    );
}

#[tokio::test]
async fn gateway_keys_sent_as_bearer_still_work_beside_oauth_apps() {
    let up = upstream().await;
    let gw = Gateway::start(&oauth_config(&up, "")).await;
    let reply = send(
        Method::GET,
        &gw.url(WHO),
        &[("authorization", &format!("Bearer {}:{}", FULL.0, FULL.1))],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["message"], "sync@example.com");
    assert_eq!(up.introspections(), 0);
}

/// The OAuth flow's endpoints public on `erp`, at most `burst` at once per address.
fn flow_config(up: &FrappeUpstream, burst: u32) -> String {
    oauth_config(up, "").replace(
        "    timeouts: { connect: 1s, request: 3s }\n",
        &format!(
            "    timeouts: {{ connect: 1s, request: 3s }}\n    public:\n      methods: \
             [frappe.integrations.oauth2.authorize, frappe.integrations.oauth2.get_token, \
             frappe.integrations.oauth2.revoke_token, frappe.integrations.oauth2.openid_profile]\n      \
             paths: [/.well-known/openid-configuration]\n      burst: {burst}\n"
        ),
    )
}

#[tokio::test]
async fn the_sign_in_flow_passes_without_a_key_with_its_cookies_and_redirects() {
    let up = upstream().await;
    let gw = Gateway::start(&flow_config(&up, 30)).await;
    let authorize = "/api/method/frappe.integrations.oauth2.authorize?client_id=mobile-client-id\
                     &response_type=code&scope=all%20openid&state=s1&redirect_uri=https%3A%2F%2Fapp.example%2Fcb";
    // Not signed in: Frappe sends the browser to its login page; the redirect is left alone.
    let guest = send(Method::GET, &gw.url(authorize), &[], Bytes::new()).await;
    assert_eq!(guest.status, StatusCode::FOUND, "{}", guest.text());
    assert!(guest
        .header("location")
        .unwrap()
        .starts_with("/login?redirect-to="));
    // Signed in (the session cookie goes to Frappe): back to the app with a code, and the
    // session's Set-Cookie reaches the browser.
    let signed_in = send(
        Method::GET,
        &gw.url(authorize),
        &[("cookie", "sid=alice-session")],
        Bytes::new(),
    )
    .await;
    assert_eq!(signed_in.status, StatusCode::FOUND);
    assert_eq!(
        signed_in.header("location"),
        Some("https://app.example/cb?code=good-code&state=s1")
    );
    assert!(signed_in.headers.get_all("set-cookie").iter().count() > 0);
    assert_eq!(up.received()[1].headers["cookie"], "sid=alice-session");

    // The app trades the code at the token endpoint with its own client credentials.
    let token = send(
        Method::POST,
        &gw.url("/api/method/frappe.integrations.oauth2.get_token"),
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("authorization", "Basic bW9iaWxlLWNsaWVudC1pZDpzM2NyZXQ="),
        ],
        "grant_type=authorization_code&code=good-code&client_id=mobile-client-id\
         &redirect_uri=https%3A%2F%2Fapp.example%2Fcb",
    )
    .await;
    assert_eq!(token.status, StatusCode::OK, "{}", token.text());
    let access_token = token.json()["access_token"].as_str().unwrap().to_owned();
    let at_frappe = up.received().pop().unwrap();
    assert_eq!(
        at_frappe.headers["authorization"],
        "Basic bW9iaWxlLWNsaWVudC1pZDpzM2NyZXQ="
    );
    assert_eq!(at_frappe.headers["x-frappe-site-name"], SITE);

    // ... and calls the API with the user's token.
    let who = bearer(&gw, &access_token, WHO).await;
    assert_eq!(who.json()["message"], "alice@example.com");
    assert!(
        who.header("set-cookie").is_none(),
        "no cookies on the API's answers"
    );

    let config = send(
        Method::GET,
        &gw.url("/.well-known/openid-configuration"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(config.status, StatusCode::OK);
    assert!(config.json()["token_endpoint"].is_string());
}

#[tokio::test]
async fn only_the_listed_routes_pass_without_a_key_however_the_request_is_spelled() {
    let up = upstream().await;
    let gw = Gateway::start(&flow_config(&up, 30)).await;
    let form = "application/x-www-form-urlencoded";
    let json = "application/json";
    let refused: Vec<(Method, &str, Option<&str>, &str)> = vec![
        // A cmd rides along: Frappe would run it instead of the path.
        (
            Method::POST,
            "/api/method/frappe.integrations.oauth2.get_token?cmd=frappe.client.delete",
            None,
            "",
        ),
        (
            Method::POST,
            "/api/method/frappe.integrations.oauth2.get_token",
            Some(form),
            "cmd=frappe.client.delete&doctype=ToDo&name=x",
        ),
        (
            Method::POST,
            "/api/method/frappe.integrations.oauth2.get_token",
            Some(json),
            r#"{"cmd":"frappe.client.insert"}"#,
        ),
        // Not listed.
        (
            Method::GET,
            "/api/method/frappe.integrations.oauth2.introspect_token",
            None,
            "",
        ),
        (
            Method::GET,
            "/api/method/frappe.client.get_list?doctype=ToDo",
            None,
            "",
        ),
        (Method::GET, "/api/resource/ToDo", None, ""),
        (
            Method::GET,
            "/.well-known/openid-configuration/../../api/resource/ToDo",
            None,
            "",
        ),
        (Method::GET, "/login", None, ""),
    ];
    // A cmd after a file part of a multipart body: not yet read when the request would go.
    let multipart = "--b\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.txt\"\r\n\r\nx\r\n--b\r\nContent-Disposition: form-data; name=\"cmd\"\r\n\r\nfrappe.client.delete\r\n--b--\r\n";
    let reply = send(
        Method::POST,
        &gw.url("/api/method/frappe.integrations.oauth2.get_token"),
        &[("content-type", "multipart/form-data; boundary=b")],
        multipart,
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    for (method, path, content_type, body) in refused {
        let mut headers = vec![("cookie", "sid=alice-session")];
        headers.extend(content_type.map(|c| ("content-type", c)));
        let reply = send(method.clone(), &gw.url(path), &headers, body.to_owned()).await;
        assert_eq!(
            reply.status,
            StatusCode::UNAUTHORIZED,
            "{method} {path} {body}: {}",
            reply.text()
        );
    }
    assert_eq!(up.count(), 0, "{:?}", up.received());
    // Differently spelled but the same listed method passes, canonical at Frappe.
    let spelled = send(
        Method::GET,
        &gw.url("//api//method/frappe.integrations.oauth2.%61uthorize?client_id=x"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(spelled.status, StatusCode::FOUND);
    assert_eq!(
        up.received()[0].path_and_query,
        "/api/method/frappe.integrations.oauth2.authorize?client_id=x"
    );
}

/// What an attacker would send to a public route: a `cmd` in every carrier Frappe reads, under
/// Content-Types spelled as werkzeug still parses them, a repeated Content-Type or Host, and
/// headers gunicorn or Frappe would act on. Asserts what reached the upstream.
#[tokio::test]
async fn a_public_route_judges_every_carrier_and_spelling_an_attacker_would_use() {
    let up = upstream().await;
    let gw = Gateway::start(&flow_config(&up, 100)).await;
    let url = gw.url("/api/method/frappe.integrations.oauth2.get_token");
    let cmd_json = r#"{"cmd": "frappe.client.delete", "doctype": "ToDo", "name": "x"}"#;
    let cmd_form = "cmd=frappe.client.delete&doctype=ToDo&name=x";
    // werkzeug judges the mimetype lower-cased before `;`, and `application/*+json` is JSON.
    let refused = [
        ("Application/JSON; charset=utf-8", cmd_json.to_owned()),
        ("application/merge-patch+json", cmd_json.to_owned()),
        ("application/x-www-form-urlencoded; charset=UTF-8", cmd_form.to_owned()),
        ("APPLICATION/X-WWW-FORM-URLENCODED", cmd_form.to_owned()),
        (
            "multipart/form-data; boundary=b",
            "--b\r\nContent-Disposition: form-data; name=\"cmd\"\r\n\r\nfrappe.client.delete\r\n--b--\r\n"
                .to_owned(),
        ),
    ];
    for (content_type, body) in refused {
        let reply = send(
            Method::POST,
            &url,
            &[("content-type", content_type)],
            body.clone(),
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::UNAUTHORIZED,
            "{content_type} {body}: {}",
            reply.text()
        );
    }
    // Two Content-Types (the classifier would read one, gunicorn another), two Hosts: 400.
    for headers in [
        vec![
            ("content-type", "text/plain"),
            ("content-type", "application/json"),
        ],
        vec![("host", "erp.localhost"), ("host", "other.localhost")],
    ] {
        let reply = send(Method::POST, &url, &headers, cmd_json.to_owned()).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{headers:?}: {}",
            reply.text()
        );
    }
    assert_eq!(up.count(), 0, "{:?}", up.received());

    // A body werkzeug does not parse (text/plain) carries no cmd for Frappe: the route passes,
    // and headers gunicorn or Frappe would act on are gone.
    let reply = send(
        Method::POST,
        &url,
        &[
            ("content-type", "text/plain"),
            ("script_name", "/api/method/frappe.client.delete"),
            ("path_info", "/api/method/frappe.client.delete"),
            ("x-frappe-site-name", "other.localhost"),
            ("frappe-authorization-source", "token"),
            ("x-forwarded-ssl", "on"),
            ("x-forwarded-protocol", "https"),
        ],
        cmd_form,
    )
    .await;
    assert_ne!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    let received = up.received();
    assert_eq!(received.len(), 1);
    let seen = &received[0];
    assert_eq!(
        seen.path_and_query,
        "/api/method/frappe.integrations.oauth2.get_token"
    );
    for name in [
        "script_name",
        "path_info",
        "frappe-authorization-source",
        "x-forwarded-ssl",
        "x-forwarded-protocol",
    ] {
        assert!(seen.headers.get(name).is_none(), "{name} reached the site");
    }
    assert_eq!(seen.headers["x-frappe-site-name"], SITE);
}

#[tokio::test]
async fn the_public_routes_are_bounded_per_source_address() {
    let up = upstream().await;
    let gw = Gateway::start(&flow_config(&up, 3)).await;
    let path = "/.well-known/openid-configuration";
    for _ in 0..3 {
        assert_eq!(
            send(Method::GET, &gw.url(path), &[], Bytes::new())
                .await
                .status,
            StatusCode::OK
        );
    }
    let over = send(Method::GET, &gw.url(path), &[], Bytes::new()).await;
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(up.count(), 3);
    // Keyed requests from the same address are not touched.
    assert_eq!(get(&gw.url(WHO), FULL).await.status, StatusCode::OK);
}

#[tokio::test]
async fn without_a_public_section_the_flow_needs_a_key() {
    let up = upstream().await;
    let gw = Gateway::start(&oauth_config(&up, "")).await;
    let reply = send(
        Method::GET,
        &gw.url("/.well-known/openid-configuration"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn idempotency_keys_are_each_users_own_within_an_app() {
    let up = upstream().await;
    for user in ["alice", "bob"] {
        up.issue_oauth_token(
            &format!("tok-{user}"),
            APP,
            &format!("{user}@example.com"),
            3600,
            "all",
        );
    }
    let yaml = oauth_config(&up, "").replace("ToDo: [read]", "ToDo: [read, create]");
    let gw = Gateway::start(&yaml).await;
    let create = |token: &'static str| {
        let url = gw.url("/api/resource/ToDo");
        async move {
            send(
                Method::POST,
                &url,
                &[
                    ("authorization", &format!("Bearer {token}")),
                    ("content-type", "application/json"),
                    ("idempotency-key", "same-key-1"),
                ],
                r#"{"description":"x"}"#,
            )
            .await
        }
    };
    let alice = create("tok-alice").await;
    let bob = create("tok-bob").await;
    assert_eq!((alice.status, bob.status), (StatusCode::OK, StatusCode::OK));
    assert!(
        bob.header("idempotent-replayed").is_none(),
        "bob never gets alice's answer"
    );
    assert_eq!(bob.json()["data"]["owner"], "bob@example.com");
    // Alice's own repeat is a replay.
    let again = create("tok-alice").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    let creates = up
        .received()
        .iter()
        .filter(|r| r.method == Method::POST && r.path_and_query == "/api/resource/ToDo")
        .count();
    assert_eq!(creates, 2);
}

#[tokio::test]
async fn a_single_page_app_on_its_own_origin_reads_its_users_answers() {
    let up = upstream().await;
    up.issue_oauth_token("tok-alice", APP, "alice@example.com", 3600, "all");
    let yaml = format!(
        "{}cors: {{}}\n",
        oauth_config(&up, "    allowed_origins: [\"https://field.example\"]\n")
    );
    let gw = Gateway::start(&yaml).await;
    let from = |origin: &'static str| {
        let url = gw.url(WHO);
        async move {
            send(
                Method::GET,
                &url,
                &[("authorization", "Bearer tok-alice"), ("origin", origin)],
                Bytes::new(),
            )
            .await
        }
    };
    let own = from("https://field.example").await;
    assert_eq!(own.status, StatusCode::OK);
    assert_eq!(
        own.header("access-control-allow-origin"),
        Some("https://field.example")
    );
    let other = from("https://elsewhere.example").await;
    assert_eq!(other.header("access-control-allow-origin"), None);
}

#[tokio::test]
async fn a_reload_that_leaves_the_apps_alone_keeps_what_they_learnt() {
    use erpgate::config::Config;
    use erpgate::forwarding::PeerAddr;
    use erpgate::metrics::Metrics;
    use tower::ServiceExt;

    let up = upstream().await;
    up.issue_oauth_token("tok-alice", APP, "alice@example.com", 3600, "all");
    let yaml = oauth_config(
        &up,
        "    per_user_rate_limit: { per_minute: 1, burst: 1 }\n",
    );
    let metrics = Metrics::new().unwrap();
    let call = |gateway: &erpgate::stack::Gateway| {
        let mut request = http::Request::get(WHO)
            .header("authorization", "Bearer tok-alice")
            .header("host", "gw.example.com")
            .body(erpgate::empty_body())
            .unwrap();
        request
            .extensions_mut()
            .insert(PeerAddr("127.0.0.1:40000".parse().unwrap()));
        gateway.service.clone().oneshot(request)
    };
    let first =
        erpgate::stack::build(&Config::from_yaml(&yaml, "t").unwrap(), &metrics, None).unwrap();
    assert_eq!(call(&first).await.unwrap().status(), StatusCode::OK);
    // Same apps, another client added: the user's quota and the introspection carry over.
    let changed = yaml.replace("clients:\n", "clients:\n  late:\n    key_id: ek_late\n    secret_sha256: \"00000000000000000000000000000000000000000000000000000000000000aa\"\n    site: erp\n    service_account: sync\n");
    let second = erpgate::stack::build(
        &Config::from_yaml(&changed, "t").unwrap(),
        &metrics,
        Some(&first),
    )
    .unwrap();
    assert_eq!(
        call(&second).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(up.introspections(), 1);
    // Changed apps start afresh.
    let other = yaml.replace("burst: 1 }", "burst: 5 }");
    let third = erpgate::stack::build(
        &Config::from_yaml(&other, "t").unwrap(),
        &metrics,
        Some(&second),
    )
    .unwrap();
    assert_eq!(call(&third).await.unwrap().status(), StatusCode::OK);
    assert_eq!(up.introspections(), 2);
}

/// The event feed is for gateway keys: an app's user, whose reads Frappe judges per user,
/// gets 403 from it, and nothing but the token's introspection reaches the site.
#[tokio::test]
async fn an_oauth_token_has_no_event_feed() {
    let up = upstream().await;
    up.issue_oauth_token("tok-alice", APP, "alice@example.com", 3600, "all openid");
    let directory = std::env::temp_dir().join(format!(
        "erpgate-oauth-feed-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let events = format!("events: {{ directory: \"{}\" }}\n", directory.display());
    let gw = Gateway::start(&oauth_config(&up, &events)).await;
    for path in ["/_erpgate/events", "/_erpgate/events/?since=now&wait=1s"] {
        let reply = bearer(&gw, "tok-alice", path).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{path}: {}",
            reply.text()
        );
    }
    let forwarded: Vec<String> = up
        .received()
        .into_iter()
        .map(|r| r.path_and_query)
        .filter(|p| !p.contains("introspect_token"))
        .collect();
    assert!(forwarded.is_empty(), "{forwarded:?}");
}

/// Frappe finds `OAuth Bearer Token` rows case-insensitively (MariaDB's `utf8mb4_unicode_ci`),
/// so case variants of one token are one token: one introspection, one per-user quota, with or
/// without the `openid` scope's `sub` to tell the user by.
#[tokio::test]
async fn case_variants_of_a_token_share_one_introspection_and_one_user_quota() {
    const VARIANTS: usize = 12;
    for scopes in ["all", "all openid"] {
        let up = upstream().await;
        up.issue_oauth_token("tok-alice", APP, "alice@example.com", 3600, scopes);
        let yaml = oauth_config(
            &up,
            &format!(
                "    rate_limit: {{ per_second: 1000, burst: 1000 }}\n    \
                 per_user_rate_limit: {{ per_minute: 1, burst: {VARIANTS} }}\n"
            ),
        );
        let gw = Gateway::start(&yaml).await;
        // Each variant spells "tok-alice" with a different set of letters upper-cased.
        let variants: Vec<String> = (1..=VARIANTS + 1)
            .map(|mask| {
                "tok-alice"
                    .chars()
                    .enumerate()
                    .map(|(i, c)| {
                        if mask >> i & 1 == 1 {
                            c.to_ascii_uppercase()
                        } else {
                            c
                        }
                    })
                    .collect()
            })
            .collect();
        for token in &variants[..VARIANTS] {
            let reply = bearer(&gw, token, WHO).await;
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "{scopes} {token}: {}",
                reply.text()
            );
            assert_eq!(reply.json()["message"], "alice@example.com");
        }
        let over = bearer(&gw, &variants[VARIANTS], WHO).await;
        assert_eq!(
            over.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{scopes}: {}",
            over.text()
        );
        assert!(over.text().contains("this user"), "{}", over.text());
        assert_eq!(up.introspections(), 1, "{scopes}");
        // What reached Frappe: the one introspection and the variants within the quota, each
        // with the token as the client spelled it.
        let received = up.received();
        let calls: Vec<_> = received
            .iter()
            .filter(|r| !r.path_and_query.contains("introspect_token"))
            .collect();
        assert_eq!(calls.len(), VARIANTS, "{scopes}");
        for (call, token) in calls.iter().zip(&variants) {
            assert_eq!(call.headers["authorization"], format!("Bearer {token}"));
        }
        assert_eq!(received.len(), VARIANTS + 1);
    }
}
