//! Per-client access rules over real sockets: a client allowed only `ToDo: [read]` and
//! `frappe.client.get_list` is refused everything else, however the request is spelled, and the
//! upstream never sees a refused request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;

#[tokio::test]
async fn allowed_requests_pass_in_any_spelling_and_arrive_canonical() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let spellings = [
        "/api/resource/ToDo",
        "/api/resource/%54oDo",
        "//api//resource/ToDo",
        "/api/v1/resource/ToDo",
        "/api/resource/todo",
        "/api/v2/document/ToDo",
        "/api/method/frappe.client.get_list?doctype=ToDo",
    ];
    for path in spellings {
        let reply = get(&gw.url(path), TODO_READER).await;
        assert_ne!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{path}: {}",
            reply.text()
        );
    }
    let seen: Vec<String> = up
        .received()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    assert_eq!(
        seen,
        vec![
            "/api/resource/ToDo",
            "/api/resource/ToDo",
            "/api/resource/ToDo",
            "/api/v1/resource/ToDo",
            "/api/resource/todo",
            "/api/v2/document/ToDo",
            "/api/method/frappe.client.get_list?doctype=ToDo",
        ]
    );
    // Every one was signed as the client's own service account.
    assert!(up
        .received()
        .iter()
        .all(|r| r.headers["authorization"]
            == format!("token {READER_KEY}:{READER_SECRET}").as_str()));
}

#[tokio::test]
async fn everything_else_is_refused_with_403_and_never_reaches_frappe() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let auth = token(TODO_READER);
    let form = "application/x-www-form-urlencoded";
    let json = "application/json";
    // (method, path, content type, body)
    let refused: Vec<(Method, &str, Option<&str>, &str)> = vec![
        (Method::POST, "/api/resource/ToDo", Some(json), r#"{"description":"x"}"#),
        (Method::POST, "/", Some(form), "cmd=frappe.client.insert&doc=%7B%7D"),
        (Method::POST, "/?cmd=frappe.client.insert", None, ""),
        (Method::GET, "/app?c%6Dd=frappe.client.insert", None, ""),
        (Method::POST, "/", Some("Application/JSON; charset=utf-8"), r#"{"cmd":"frappe.client.insert"}"#),
        (Method::POST, "/api/resource/%54oDo", Some(json), "{}"),
        (Method::POST, "//api//resource//ToDo/", Some(json), "{}"),
        (Method::POST, "/api/v1/resource/todo", Some(json), "{}"),
        (Method::POST, "/api/v2/document/ToDo", Some(json), "{}"),
        (Method::PUT, "/api/resource/ToDo/todo0001", Some(json), "{}"),
        (Method::PATCH, "/api/v2/document/ToDo/todo0001", Some(json), "{}"),
        (Method::DELETE, "/api/resource/ToDo/todo0001", None, ""),
        (Method::POST, "/api/resource/ToDo/todo0001", None, ""),
        (Method::GET, "/api/resource/ToDo/todo0001?run_method=delete", None, ""),
        (Method::POST, "/api/v2/document/ToDo/todo0001/method/submit", None, ""),
        (Method::GET, "/api/resource/ToDo?cmd=frappe.client.insert", None, ""),
        (Method::GET, "/api/resource/ToDo", Some(form), "cmd=frappe.client.delete"),
        (Method::GET, "/api/resource/User", None, ""),
        (Method::GET, "/api/resource/Sales%20Order", None, ""),
        (Method::GET, "/api/method/frappe.client.insert", None, ""),
        (Method::GET, "/api/method/frappe.client.get_list.evil", None, ""),
        (Method::GET, "/api/method/Frappe.Client.get_list", None, ""),
        (Method::POST, "/api/method/login", Some(form), "usr=Administrator&pwd=x"),
        (Method::POST, "/api/method/frappe.client.get_list", Some(form), "cmd=login"),
        (Method::POST, "/api/method/upload_file", Some("application/octet-stream"), "file"),
        (Method::GET, "/files/secret.pdf", None, ""),
        (Method::GET, "/private/files/secret.pdf", None, ""),
        (Method::GET, "/app/todo", None, ""),
        (Method::POST, "/", Some("multipart/form-data; boundary=x"), "--x\r\nContent-Disposition: form-data; name=\"cmd\"\r\n\r\nfrappe.client.insert\r\n--x--\r\n"),
    ];
    for (method, path, content_type, body) in refused {
        let mut headers = vec![("authorization", auth.as_str())];
        if let Some(ct) = content_type {
            headers.push(("content-type", ct));
        }
        let reply = send(method.clone(), &gw.url(path), &headers, body.to_owned()).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{method} {path} {body}: {}",
            reply.text()
        );
        let envelope = reply.json();
        if path.starts_with("/api/v2/") {
            assert_eq!(envelope["errors"][0]["type"], "PermissionError");
        } else {
            assert_eq!(envelope["exc_type"], "PermissionError", "{path}");
            assert!(!envelope["exc"].as_str().unwrap().is_empty());
        }
    }
    // Paths Frappe would resolve differently from a proxy in between are refused outright.
    for path in [
        "/api/resource/ToDo/../User",
        "/api/resource/ToDo/%2e%2e/User",
        "/api/resource/ToDo%00",
    ] {
        let reply = get(&gw.url(path), TODO_READER).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{path}");
    }
    assert_eq!(
        up.count(),
        0,
        "the upstream saw a refused request: {:?}",
        up.received()
            .iter()
            .map(|r| &r.path_and_query)
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_client_without_rules_may_do_what_its_account_may() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let reply = send_json(
        Method::POST,
        &gw.url("/api/resource/ToDo"),
        FULL,
        r#"{"description":"from the gateway"}"#,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let name = reply.json()["data"]["name"].as_str().unwrap().to_owned();
    assert_eq!(reply.json()["data"]["owner"], "sync@example.com");
    let reply = send_json(
        Method::PUT,
        &gw.url(&format!("/api/resource/ToDo/{name}")),
        FULL,
        r#"{"status":"Closed"}"#,
    )
    .await;
    assert_eq!(reply.json()["data"]["status"], "Closed");
    let reply = send(
        Method::DELETE,
        &gw.url(&format!("/api/resource/ToDo/{name}")),
        &[("authorization", &token(FULL))],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let reply = get(&gw.url(&format!("/api/resource/ToDo/{name}")), FULL).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.json()["exc_type"], "DoesNotExistError");
    assert_eq!(up.count(), 4);
}

#[tokio::test]
async fn method_prefix_rules_and_file_and_other_switches() {
    let up = upstream().await;
    let config = base_config(&up).replace(
        "      methods: [frappe.client.get_list]",
        "      methods: [\"test.*\"]\n      files: true\n      other: true",
    );
    let gw = Gateway::start(&config).await;
    assert_eq!(
        get(&gw.url("/api/method/test.echo"), TODO_READER)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        get(&gw.url("/api/method/testx.echo"), TODO_READER)
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let auth = token(TODO_READER);
    let reply = send(
        Method::POST,
        &gw.url("/api/method/upload_file"),
        &[
            ("authorization", &auth),
            ("content-type", "application/octet-stream"),
        ],
        "data",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    // `other: true` opens desk pages, but a `cmd` on them is still a method call checked as such.
    assert_ne!(
        get(&gw.url("/app/todo"), TODO_READER).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        get(&gw.url("/app/todo?cmd=frappe.client.insert"), TODO_READER)
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(up.count(), 3);
}
