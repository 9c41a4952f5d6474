//! Frappe's database error text as a data channel, over real sockets: MariaDB's message in a
//! database error's summary (an `extractvalue` XPATH error quotes the value it was given, a
//! duplicate key its value) and tracebacks in a method's `message` never reach a restricted
//! reader — a client with access rules, an OAuth app's user, a public route's caller — who gets
//! a fixed line naming its request id instead, in the v1 and the v2 envelope alike, whatever
//! `expose_tracebacks` says. Full-access clients see what they saw before.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::Value;
use support::frappe::XPATH_ERROR;
use support::*;

/// The base config with the ToDo reader also allowed the test methods.
fn config(up: &FrappeUpstream) -> String {
    base_config(up).replace(
        "      methods: [frappe.client.get_list]\n",
        "      methods: [frappe.client.get_list, \"test.*\"]\n",
    )
}

fn exposing(yaml: &str) -> String {
    yaml.replace(
        "    timeouts:",
        "    expose_tracebacks: true\n    timeouts:",
    )
}

async fn call(gw: &Gateway, path: &str, credential: Credential, request_id: &str) -> Reply {
    call_as(gw, path, Some(&token(credential)), request_id).await
}

/// GET `path` with `X-Request-Id`, and `Authorization` when given (a public route's caller
/// sends none).
async fn call_as(gw: &Gateway, path: &str, authorization: Option<&str>, request_id: &str) -> Reply {
    let mut headers = vec![("x-request-id", request_id)];
    if let Some(authorization) = authorization {
        headers.push(("authorization", authorization));
    }
    send(Method::GET, &gw.url(path), &headers, Bytes::new()).await
}

fn list(v: &Value, key: &str) -> Vec<String> {
    serde_json::from_str(v[key].as_str().expect("a JSON string")).expect("of a list")
}

/// Nothing of the database's message, its error code or the traceback is anywhere in `reply`.
fn assert_no_database_text(reply: &Reply) {
    let text = reply.text();
    for leak in [
        "secretapikey",
        "secretname",
        "XPATH",
        "1105",
        "1062",
        "Duplicate entry",
    ] {
        assert!(!text.contains(leak), "{leak} leaked: {text}");
    }
    assert!(
        !text.contains("Traceback") && !text.contains("pymysql"),
        "{text}"
    );
}

const FIXED: &str = "database error; see the gateway log for request";

/// `reply`'s v1 `exception` is the fixed line of an `exc_type` naming `request_id`, and
/// nothing of the database's text is anywhere in it.
fn assert_fixed_line(reply: &Reply, exc_type: &str, request_id: &str) {
    assert_eq!(
        reply.json()["exception"],
        format!("{exc_type}: {FIXED} {request_id}")
    );
    assert_no_database_text(reply);
}

#[tokio::test]
async fn a_restricted_client_gets_a_fixed_line_with_its_request_id_in_v1() {
    let up = upstream().await;
    for yaml in [config(&up), exposing(&config(&up))] {
        let gw = Gateway::start(&yaml).await;
        up.clear();
        let reply = call(&gw, "/api/method/test.db_error", TODO_READER, "rid-db-1").await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
        let v = reply.json();
        assert_eq!(v["exc_type"], "OperationalError");
        let line = format!("OperationalError: {FIXED} rid-db-1");
        assert_eq!(v["exception"], line.as_str());
        assert_eq!(list(&v, "exc"), vec![line]);
        assert_eq!(reply.header("x-request-id"), Some("rid-db-1"));
        assert_no_database_text(&reply);
        // The request reached Frappe once, signed as the client's service account.
        let received = up.received();
        assert_eq!(received.len(), 1);
        assert_eq!(received[0].path_and_query, "/api/method/test.db_error");
        assert_eq!(
            received[0].headers["authorization"],
            format!("token {READER_KEY}:{READER_SECRET}")
        );

        // The driver's message in `_server_messages` too; the other messages stay.
        let reply = call(
            &gw,
            "/api/method/test.db_error?messages=1",
            TODO_READER,
            "rid-db-2",
        )
        .await;
        assert_no_database_text(&reply);
        let messages = list(&reply.json(), "_server_messages");
        assert_eq!(messages.len(), 2);
        assert!(messages[0].contains("Saved earlier rows"));
        let replaced: Value = serde_json::from_str(&messages[1]).unwrap();
        assert_eq!(replaced["message"], format!("{FIXED} rid-db-2"));

        // A duplicate key's value, inside Frappe's DuplicateEntryError: the class still says
        // what happened, the value is gone.
        let reply = call(
            &gw,
            "/api/method/test.db_error?kind=duplicate",
            TODO_READER,
            "rid-db-3",
        )
        .await;
        assert_eq!(reply.status, StatusCode::CONFLICT);
        assert_eq!(reply.json()["exc_type"], "DuplicateEntryError");
        assert_fixed_line(&reply, "DuplicateEntryError", "rid-db-3");
    }
}

#[tokio::test]
async fn the_gateways_own_request_id_is_named_when_the_client_sent_none() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    let reply = get(&gw.url("/api/method/test.db_error"), TODO_READER).await;
    let id = reply.header("x-request-id").unwrap().to_owned();
    assert_fixed_line(&reply, "OperationalError", &id);
}

#[tokio::test]
async fn a_restricted_client_gets_the_fixed_line_in_v2() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    let reply = call(
        &gw,
        "/api/v2/method/test.db_error?messages=1",
        TODO_READER,
        "rid-v2",
    )
    .await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    let v = reply.json();
    assert_eq!(v["errors"][0]["type"], "OperationalError");
    assert_eq!(v["errors"][0]["exception"], format!("{FIXED} rid-v2"));
    assert_eq!(v["errors"][0]["message"], format!("{FIXED} rid-v2"));
    assert_eq!(v["messages"][0]["message"], format!("{FIXED} rid-v2"));
    assert_no_database_text(&reply);
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn a_full_access_client_sees_database_errors_as_before() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    let reply = call(&gw, "/api/method/test.db_error", FULL, "rid-full").await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    let v = reply.json();
    assert_eq!(v["exception"], XPATH_ERROR);
    // The traceback is cut to its summary, as for every error.
    assert_eq!(list(&v, "exc"), vec![XPATH_ERROR]);
    assert!(!reply.text().contains("Traceback"));
    let v2 = call(&gw, "/api/v2/method/test.db_error", FULL, "rid-full-2").await;
    assert_eq!(v2.json()["errors"][0]["exception"], XPATH_ERROR);
    // A method's own answer is not touched.
    let console = call(&gw, "/api/method/test.console", FULL, "rid-full-3").await;
    assert_eq!(console.status, StatusCode::OK);
    let output = console.json()["message"]["output"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(output.starts_with("Traceback (most recent call last)"));
    assert!(output.contains(XPATH_ERROR));

    let gw = Gateway::start(&exposing(&config(&up))).await;
    let reply = call(&gw, "/api/method/test.db_error", FULL, "rid-full-4").await;
    assert!(list(&reply.json(), "exc")[0].starts_with("Traceback (most recent call last)"));
    assert_eq!(reply.json()["exception"], XPATH_ERROR);
}

#[tokio::test]
async fn tracebacks_in_a_methods_message_are_cut_for_a_restricted_client() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    let reply = call(&gw, "/api/method/test.console", TODO_READER, "rid-c1").await;
    assert_eq!(reply.status, StatusCode::OK);
    let v = reply.json();
    assert_eq!(v["message"]["output"], format!("{FIXED} rid-c1"));
    assert_eq!(v["message"]["doctype"], "System Console");
    assert_no_database_text(&reply);
    let plain = call(
        &gw,
        "/api/method/test.console?kind=plain",
        TODO_READER,
        "rid-c2",
    )
    .await;
    assert_eq!(
        plain.json()["message"]["output"],
        "NameError: name 'x' is not defined"
    );
    // An ordinary answer passes unchanged.
    let rows = call(
        &gw,
        "/api/method/frappe.client.get_list?doctype=ToDo&limit_page_length=3",
        TODO_READER,
        "rid-c3",
    )
    .await;
    assert_eq!(rows.status, StatusCode::OK);
    assert_eq!(rows.json()["message"].as_array().unwrap().len(), 3);

    // With tracebacks exposed, a non-database traceback passes, a database one never does.
    let gw = Gateway::start(&exposing(&config(&up))).await;
    let plain = call(
        &gw,
        "/api/method/test.console?kind=plain",
        TODO_READER,
        "rid-c4",
    )
    .await;
    assert!(plain.json()["message"]["output"]
        .as_str()
        .unwrap()
        .starts_with("Traceback (most recent call last)"));
    let db = call(&gw, "/api/method/test.console", TODO_READER, "rid-c5").await;
    assert_eq!(db.json()["message"]["output"], format!("{FIXED} rid-c5"));
    assert_no_database_text(&db);
}

#[tokio::test]
async fn an_oauth_apps_user_and_a_public_routes_caller_are_restricted_readers() {
    let up = upstream().await;
    up.issue_oauth_token(
        "tok-alice",
        "mobile-client-id",
        "alice@example.com",
        3600,
        "all",
    );
    let yaml = format!(
        "{}oauth_apps:\n  mobile:\n    site: erp\n    client_id: mobile-client-id\n    \
         allow: {{ methods: [\"test.*\"] }}\n",
        config(&up)
    )
    .replace(
        "    timeouts: { connect: 1s, request: 3s }\n",
        "    timeouts: { connect: 1s, request: 3s }\n    public:\n      methods: [test.db_error]\n",
    );
    let gw = Gateway::start(&yaml).await;
    let path = "/api/method/test.db_error";
    let reply = call_as(&gw, path, Some("Bearer tok-alice"), "rid-oauth").await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_fixed_line(&reply, "OperationalError", "rid-oauth");

    let public = call_as(&gw, path, None, "rid-public").await;
    assert_eq!(public.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_fixed_line(&public, "OperationalError", "rid-public");
    // Both reached Frappe: the user's own token, and the caller's request without one.
    let calls: Vec<_> = up
        .received()
        .into_iter()
        .filter(|r| r.path_and_query == "/api/method/test.db_error")
        .collect();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].headers["authorization"], "Bearer tok-alice");
    assert!(calls[1].headers.get("authorization").is_none());
}

/// A restricted reader's success answers are looked at up to 1 MiB; a larger one passes whole
/// and unchanged, what was read first included.
#[tokio::test]
async fn a_large_answer_to_a_restricted_client_passes_whole() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    for size in [900_000usize, 3_000_000] {
        let path = format!("/api/method/test.big?size={size}&i=r");
        let reply = call(&gw, &path, TODO_READER, "rid-big").await;
        assert_eq!(reply.status, StatusCode::OK);
        let full = call(&gw, &path, FULL, "rid-big-full").await;
        assert_eq!(reply.body, full.body, "{size}");
        assert!(reply.body.len() >= size - 100, "{}", reply.body.len());
        assert_eq!(reply.json()["message"]["i"], "r");
    }
}

#[tokio::test]
async fn an_error_page_asked_for_with_accept_text_html_is_replaced() {
    // `Accept: text/html` on an `/api/` path makes Frappe answer a failure with its "Server
    // Error" web page, the traceback (and MariaDB's text) inside.
    let up = upstream().await;
    for yaml in [config(&up), exposing(&config(&up))] {
        let gw = Gateway::start(&yaml).await;
        for (path, credential, request_id, status) in [
            ("/api/method/test.db_error", TODO_READER, "rid-page-1", 500),
            (
                "/api/v2/method/test.db_error",
                TODO_READER,
                "rid-page-2",
                500,
            ),
            // A 4xx page carries the traceback too (a 409 duplicate, a 417 DataError).
            (
                "/api/method/test.db_error?kind=duplicate",
                TODO_READER,
                "rid-page-3",
                409,
            ),
        ] {
            let reply = send(
                Method::GET,
                &gw.url(path),
                &[
                    ("authorization", &token(credential)),
                    ("accept", "text/html,application/xhtml+xml"),
                    ("x-request-id", request_id),
                ],
                Bytes::new(),
            )
            .await;
            assert_eq!(reply.status.as_u16(), status);
            assert_eq!(reply.header("content-type"), Some("application/json"));
            assert!(reply.text().contains(request_id), "{}", reply.text());
            assert_no_database_text(&reply);
        }
        // The site did answer with its page: it is the gateway that withheld it.
        assert!(up.count() >= 3);
    }
    // A full-access client on a site that hides tracebacks gets the envelope too; where the
    // site exposes them, the page as it is.
    for (yaml, page) in [(config(&up), false), (exposing(&config(&up)), true)] {
        let gw = Gateway::start(&yaml).await;
        let reply = send(
            Method::GET,
            &gw.url("/api/method/test.db_error"),
            &[("authorization", &token(FULL)), ("accept", "text/html")],
            Bytes::new(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            reply.text().contains("Server Error</h4>"),
            page,
            "{}",
            reply.text()
        );
        assert_eq!(reply.text().contains("Traceback"), page, "{}", reply.text());
    }
}

#[tokio::test]
async fn the_sites_sql_log_on_a_success_answer_never_reaches_a_restricted_client() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    let restricted = call(&gw, "/api/method/test.debug_log", TODO_READER, "rid-log").await;
    assert_eq!(restricted.status, StatusCode::OK);
    assert_eq!(restricted.json()["message"], "ok");
    assert!(restricted.json().get("_debug_messages").is_none());
    assert_no_database_text(&restricted);
    let full = call(&gw, "/api/method/test.debug_log", FULL, "rid-log-2").await;
    assert!(full.text().contains("secretapikey"), "{}", full.text());
}
