//! The requests an attacker with a restricted key would send, over real sockets, each checked
//! for what the client saw and what reached the test upstream. The restricted client may read
//! ToDo and call `frappe.client.get_list`; its service account could do anything.
//!
//! Classes: `cmd` / `sid` / `run_method` / `login` carried in multipart fields (Frappe merges
//! `request.form` into `form_dict` on every path); Content-Types read differently by erpgate and
//! werkzeug; headers gunicorn turns into WSGI environ (`SCRIPT_NAME`, `PATH_INFO`, `_` names);
//! list arguments that reach SQL (`fields`, `filters`, `order_by`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BOUNDARY: &str = "erpgateTestBoundary7MA4YWxk";

/// One multipart part: name, filename (a file part when given), content.
type Part<'a> = (&'a str, Option<&'a str>, &'a [u8]);

/// A multipart body in the plain form erpgate itself writes: `(name, filename, content)`.
fn multipart(parts: &[Part<'_>]) -> (String, Vec<u8>) {
    let mut body = Vec::new();
    for (name, filename, content) in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        let disposition = match filename {
            Some(f) => format!(
                "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n"
            ),
            None => format!("Content-Disposition: form-data; name=\"{name}\"\r\n"),
        };
        body.extend_from_slice(disposition.as_bytes());
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={BOUNDARY}"), body)
}

/// The boundary erpgate wrote a multipart body under, as werkzeug reads it from the
/// Content-Type the site received (erpgate's own, never the client's).
fn own_boundary(seen: &support::frappe::Received) -> String {
    let content_type = seen.headers["content-type"].to_str().unwrap();
    let (mime, options) = support::werkzeug::parse_options_header(content_type);
    assert_eq!((mime.as_str(), options.len()), ("multipart/form-data", 1));
    let own = options["boundary"].clone();
    assert!(
        own.starts_with("erpgate-") && own != BOUNDARY,
        "{content_type}"
    );
    own
}

/// `sent` (written with [`BOUNDARY`]) as the site must have received it from erpgate.
fn under_own_boundary(sent: &[u8], seen: &support::frappe::Received) -> Vec<u8> {
    let own = format!("--{}", own_boundary(seen));
    let ours = format!("--{BOUNDARY}");
    let mut out = Vec::with_capacity(sent.len());
    let mut rest = sent;
    while let Some(i) = memchr::memmem::find(rest, ours.as_bytes()) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(own.as_bytes());
        rest = &rest[i + ours.len()..];
    }
    out.extend_from_slice(rest);
    out
}

async fn send_multipart(
    gw: &Gateway,
    method: Method,
    path: &str,
    credential: Credential,
    parts: &[Part<'_>],
) -> Reply {
    let (content_type, body) = multipart(parts);
    let auth = token(credential);
    send(
        method,
        &gw.url(path),
        &[("authorization", &auth), ("content-type", &content_type)],
        body,
    )
    .await
}

/// Sends raw bytes (for what an HTTP library will not send) and reads the answer to the end.
async fn raw(gw: &Gateway, request: &[u8]) -> String {
    let addr = gw.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

fn assert_refused(reply: &Reply, path: &str, what: &str) {
    assert_eq!(
        reply.status,
        StatusCode::FORBIDDEN,
        "{what} on {path}: {}",
        reply.text()
    );
    let envelope = reply.json();
    if path.starts_with("/api/v2/") {
        assert_eq!(envelope["errors"][0]["type"], "PermissionError", "{what}");
    } else {
        assert_eq!(envelope["exc_type"], "PermissionError", "{what}");
    }
}

#[tokio::test]
async fn cmd_run_method_and_login_in_multipart_fields_are_refused_on_allowed_paths() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let file: Part = ("file", Some("a.txt"), b"harmless");
    let cases: Vec<(Method, &str, Vec<Part>)> = vec![
        (
            Method::GET,
            "/api/resource/ToDo",
            vec![("cmd", None, b"frappe.client.insert")],
        ),
        (
            Method::GET,
            "/api/v2/document/ToDo",
            vec![("cmd", None, b"frappe.client.insert")],
        ),
        (
            Method::POST,
            "/api/method/frappe.client.get_list",
            vec![
                ("doctype", None, b"ToDo"),
                ("cmd", None, b"frappe.client.delete"),
            ],
        ),
        (
            Method::POST,
            "/api/v2/method/frappe.client.get_list",
            vec![
                ("doctype", None, b"ToDo"),
                ("cmd", None, b"frappe.client.get_password"),
            ],
        ),
        (
            Method::POST,
            "/api/method/frappe.client.get_list",
            vec![
                ("cmd", None, b"login"),
                ("usr", None, b"Administrator"),
                ("pwd", None, b"admin"),
            ],
        ),
        (
            Method::GET,
            "/api/resource/ToDo/todo0001",
            vec![("run_method", None, b"delete")],
        ),
        (
            Method::GET,
            "/api/v2/document/ToDo/todo0001",
            vec![("run_method", None, b"submit")],
        ),
        (
            Method::POST,
            "/",
            vec![("cmd", None, b"frappe.client.insert")],
        ),
        // A field after a file is judged when it completes.
        (
            Method::GET,
            "/api/resource/ToDo",
            vec![file, ("cmd", None, b"frappe.client.insert")],
        ),
        (
            Method::POST,
            "/api/method/frappe.client.get_list",
            vec![file, ("cmd", None, b"login")],
        ),
        (
            Method::GET,
            "/api/resource/ToDo/todo0001",
            vec![file, ("run_method", None, b"delete")],
        ),
    ];
    for (method, path, parts) in &cases {
        let reply = send_multipart(&gw, method.clone(), path, TODO_READER, parts).await;
        assert_refused(
            &reply,
            path,
            &format!("{method} multipart {:?}", parts.last().unwrap().0),
        );
    }
    // Nothing complete reached Frappe: a body refused part-way ends in an error, so werkzeug's
    // `get_data` raises before `form_dict` exists.
    assert_eq!(up.count(), 0, "{:?}", up.received());
}

#[tokio::test]
async fn sid_is_removed_from_every_carrier_for_every_client() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    for credential in [FULL, TODO_READER] {
        let auth = token(credential);
        let list = "/api/method/frappe.client.get_list";
        let reply = send(
            Method::GET,
            &gw.url("/api/resource/ToDo?sid=abc&limit=5&s%69d=def"),
            &[
                ("authorization", &auth),
                ("cookie", "sid=abc; user_id=Administrator"),
            ],
            Bytes::new(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let reply = send(
            Method::POST,
            &gw.url(list),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            r#"{"doctype": "ToDo", "sid": "abc", "s\u0069d": "def", "limit": NaN}"#,
        )
        .await;
        assert_ne!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
        assert_ne!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
        let reply = send(
            Method::POST,
            &gw.url(list),
            &[
                ("authorization", &auth),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            "sid=abc&doctype=ToDo",
        )
        .await;
        assert_ne!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
        let reply = send_multipart(
            &gw,
            Method::POST,
            list,
            credential,
            &[("sid", None, b"abc"), ("doctype", None, b"ToDo")],
        )
        .await;
        assert_ne!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    }
    let received = up.received();
    assert_eq!(received.len(), 8);
    for r in &received {
        let mut body = String::from_utf8_lossy(r.body.as_deref().unwrap_or_default()).into_owned();
        // erpgate's multipart boundary is random hex, which may spell `abc` by chance.
        if r.headers
            .get("content-type")
            .is_some_and(|t| t.as_bytes().starts_with(b"multipart/"))
        {
            body = body.replace(&own_boundary(r), "");
        }
        assert!(!r.path_and_query.contains("sid"), "{}", r.path_and_query);
        assert!(!body.contains("sid") && !body.contains("abc"), "{body}");
        assert!(!r.headers.contains_key("cookie"));
    }
    // What else was sent arrives as it was.
    assert_eq!(received[0].path_and_query, "/api/resource/ToDo?limit=5");
    assert_eq!(
        received[1].body.as_deref(),
        Some(&br#"{"doctype": "ToDo","limit": NaN}"#[..])
    );
    assert_eq!(received[2].body.as_deref(), Some(&b"doctype=ToDo"[..]));
    let sent = multipart(&[("doctype", None, b"ToDo")]).1;
    assert_eq!(
        received[3].body.as_deref(),
        Some(&under_own_boundary(&sent, &received[3])[..])
    );
}

#[tokio::test]
async fn content_types_are_read_as_werkzeug_reads_them_or_refused() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let auth = token(TODO_READER);
    let request = |headers: &str, body: &str| {
        format!(
            "GET /api/resource/ToDo HTTP/1.1\r\nHost: gw\r\nAuthorization: {auth}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    // gunicorn keeps the last Content-Type, a proxy library the first.
    let answer = raw(
        &gw,
        &request(
            "Content-Type: application/octet-stream\r\nContent-Type: application/x-www-form-urlencoded\r\n",
            "cmd=frappe.client.insert",
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // werkzeug reads the mimetype before `;` whatever bytes follow.
    let mut high = request("", r#"{"cmd":"frappe.client.insert"}"#);
    let at = high.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    high.splice(
        at..at,
        b"Content-Type: application/json; x=\xff\r\n"
            .iter()
            .copied(),
    );
    let answer = raw(&gw, &high).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // Repeated singletons.
    for repeated in [
        "Host: other\r\n".to_owned(),
        format!("Authorization: {auth}\r\n"),
    ] {
        let answer = raw(&gw, &request(&repeated, "")).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{repeated}: {answer}");
    }
    // Mimetypes werkzeug parses as forms or JSON, in any case.
    for content_type in [
        "application/x-url-encoded",
        "APPLICATION/X-WWW-FORM-URLENCODED; charset=latin-1",
        "application/vnd.erp+JSON",
        " application/json ;",
    ] {
        let body = if content_type.to_lowercase().contains("json") {
            r#"{"cmd": "frappe.client.insert"}"#
        } else {
            "cmd=frappe.client.insert"
        };
        let reply = send(
            Method::GET,
            &gw.url("/api/resource/ToDo"),
            &[("authorization", &auth), ("content-type", content_type)],
            body,
        )
        .await;
        assert_refused(&reply, "/api/resource/ToDo", content_type);
    }
    assert_eq!(up.count(), 0, "{:?}", up.received());
}

#[tokio::test]
async fn a_cmd_frappe_does_not_read_cannot_stand_for_the_path() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let auth = token(TODO_READER);
    // Under a non-empty JSON body Frappe ignores the query: no `cmd`, so it renders the desk
    // page the path names, which this client may not see.
    for path in [
        "/app/user?cmd=frappe.client.get_list",
        "/?cmd=frappe.client.get_list",
    ] {
        let reply = send(
            Method::GET,
            &gw.url(path),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            r#"{"x": 1}"#,
        )
        .await;
        assert_refused(&reply, path, "cmd in the query under a JSON body");
    }
    // Without the body, the `cmd` is what Frappe runs, and it is allowed.
    let reply = get(
        &gw.url("/?cmd=frappe.client.get_list&doctype=ToDo"),
        TODO_READER,
    )
    .await;
    assert_ne!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn headers_that_become_wsgi_environ_never_reach_the_upstream() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let auth = token(TODO_READER);
    // gunicorn strips a trusted SCRIPT_NAME from the path: Frappe would route the rest.
    let reply = send(
        Method::GET,
        &gw.url("/api/method/frappe.client.get_list/api/method/frappe.client.insert?doctype=ToDo"),
        &[
            ("authorization", &auth),
            ("script_name", "/api/method/frappe.client.get_list"),
            ("path_info", "/api/method/frappe.client.insert"),
            ("x-forwarded_for", "203.0.113.66"),
            ("x_frappe_site_name", "other.site"),
            ("x-forwarded-ssl", "on"),
            ("x-forwarded-protocol", "ssl"),
            ("x-frappe-site-name", "other.site"),
        ],
        Bytes::new(),
    )
    .await;
    assert_ne!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    let seen = &up.received()[0];
    for (name, _) in seen.headers.iter() {
        assert!(!name.as_str().contains('_'), "{name} reached the upstream");
    }
    assert!(!seen.headers.contains_key("x-forwarded-ssl"));
    assert!(!seen.headers.contains_key("x-forwarded-protocol"));
    let all = |name: &str| -> Vec<String> {
        seen.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(all("x-frappe-site-name"), vec![SITE.to_owned()]);
    assert_eq!(all("host").len(), 1);
    assert_eq!(all("x-forwarded-for"), vec!["127.0.0.1".to_owned()]);
    assert_eq!(all("x-forwarded-proto"), vec!["http".to_owned()]);
}

#[tokio::test]
async fn list_arguments_outside_the_grammar_are_refused_for_restricted_clients() {
    let up = upstream().await;
    let gw = Gateway::start(&base_config(&up)).await;
    let auth = token(TODO_READER);
    let leak =
        r#"["substring((select group_concat(name,0x3a,api_key) from `tabUser`),1,500) as x"]"#;
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let refused = [
        (format!("/api/resource/ToDo?fields={}", enc(leak)), "fields"),
        (
            format!("/api/v2/document/ToDo?fields={}", enc(leak)),
            "fields",
        ),
        (
            format!(
                "/api/resource/ToDo?fields={}",
                enc(r#"["`tabUser`.`api_key`"]"#)
            ),
            "fields",
        ),
        (
            format!("/api/resource/ToDo?fields={}", enc(r#"["owner.api_key"]"#)),
            "fields",
        ),
        (
            format!(
                "/api/resource/ToDo?order_by={}",
                enc("(select api_key from tabUser limit 1)")
            ),
            "order_by",
        ),
        (
            format!("/api/resource/ToDo?group_by={}", enc("name, sleep(5)")),
            "group_by",
        ),
        (
            format!(
                "/api/resource/ToDo?filters={}",
                enc(r#"["1=1 or name in (select name from tabUser)"]"#)
            ),
            "filters",
        ),
        (
            format!(
                "/api/resource/ToDo?or_filters={}",
                enc(r#"[["User","api_key","like","a%"]]"#)
            ),
            "or_filters",
        ),
        (
            format!(
                "/api/v2/doctype/ToDo/count?filters={}",
                enc(r#"{"name`) or (1=1": "x"}"#)
            ),
            "filters",
        ),
        (
            format!(
                "/api/method/frappe.client.get_list?doctype=ToDo&fields={}",
                enc(leak)
            ),
            "fields",
        ),
    ];
    for (path, argument) in &refused {
        let reply = get(&gw.url(path), TODO_READER).await;
        assert_refused(&reply, path, argument);
        assert!(reply.text().contains(argument), "{path}: {}", reply.text());
    }
    // In a JSON or form body, the same.
    let reply = send(
        Method::POST,
        &gw.url("/api/method/frappe.client.get_list"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        format!(r#"{{"doctype": "ToDo", "fields": {leak}}}"#),
    )
    .await;
    assert_refused(&reply, "/api/method/frappe.client.get_list", "JSON fields");
    let reply = send(
        Method::POST,
        &gw.url("/api/method/frappe.client.get_list"),
        &[
            ("authorization", &auth),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        format!(
            "doctype=ToDo&filters={}",
            enc(r#"{"status": ["=", "x"], "x": "y"}"#)
        ) + "&order_by=modified%20desc%3B%20select%201",
    )
    .await;
    assert_refused(
        &reply,
        "/api/method/frappe.client.get_list",
        "form order_by",
    );
    assert_eq!(up.count(), 0, "{:?}", up.received());

    // Plain lists pass, in every carrier.
    let fine = format!(
        "/api/resource/ToDo?fields={}&filters={}&order_by={}",
        enc(r#"["name", "status as s", "count(*) as n", "`tabToDo`.`modified`"]"#),
        enc(r#"[["status", "=", "Open"], ["ToDo", "modified", ">", "2024-01-01"]]"#),
        enc("`tabToDo`.`modified` desc, name")
    );
    assert_eq!(
        get(&gw.url(&fine), TODO_READER).await.status,
        StatusCode::OK
    );
    let reply = send(
        Method::POST,
        &gw.url("/api/method/frappe.client.get_list"),
        &[("authorization", &auth), ("content-type", "application/json")],
        r#"{"doctype": "ToDo", "fields": ["name"], "filters": {"status": ["in", ["Open", "Closed"]]}, "limit_page_length": Infinity}"#,
    )
    .await;
    assert_ne!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert_ne!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_eq!(up.count(), 2);
    // An unrestricted client is not judged: its service account's permissions are the limit.
    let reply = get(&gw.url(&refused[0].0), FULL).await;
    assert_ne!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(up.count(), 3);
}

#[tokio::test]
async fn the_query_grammar_can_be_turned_off_per_client() {
    let up = upstream().await;
    let config = base_config(&up).replace(
        "      methods: [frappe.client.get_list]",
        "      methods: [frappe.client.get_list]\n      check_query_arguments: false",
    );
    let gw = Gateway::start(&config).await;
    let reply = get(
        &gw.url("/api/resource/ToDo?order_by=%28select%201%29"),
        TODO_READER,
    )
    .await;
    assert_ne!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    // The rest of the rules still hold.
    let reply = get(&gw.url("/api/resource/User?order_by=name"), TODO_READER).await;
    assert_refused(&reply, "/api/resource/User", "doctype");
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn generic_methods_are_judged_by_their_doctype() {
    let up = upstream().await;
    let config = base_config(&up).replace(
        "      methods: [frappe.client.get_list]",
        "      methods: [frappe.client.get_list, frappe.client.get_count, frappe.client.insert, frappe.desk.search.search_link]",
    );
    let gw = Gateway::start(&config).await;
    let auth = token(TODO_READER);
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let refused = [
        "/api/method/frappe.client.get_list?doctype=User".to_owned(),
        "/api/method/frappe.client.get_count?doctype=User".to_owned(),
        "/api/v2/method/frappe.client.get_count?doctype=Sales%20Invoice".to_owned(),
        "/api/method/frappe.client.get_list".to_owned(),
        "/api/method/frappe.client.get_list?doctype=ToDo&doctype=User".to_owned(),
        "/api/method/frappe.client.get_list?doctype=ToDo&parent=User".to_owned(),
        "/?cmd=frappe.client.get_count&doctype=User".to_owned(),
        format!(
            "/api/method/frappe.client.insert?doc={}",
            enc(r#"{"doctype": "ToDo"}"#)
        ),
        format!(
            "/api/method/frappe.client.insert?doc={}",
            enc(r#"{"doctype": "User", "name": "x"}"#)
        ),
        "/api/method/frappe.desk.search.search_link?doctype=ToDo&txt=a&query=frappe.client.insert"
            .to_owned(),
    ];
    for path in &refused {
        let reply = get(&gw.url(path), TODO_READER).await;
        assert_refused(&reply, path, "generic method");
    }
    let reply = send(
        Method::POST,
        &gw.url("/api/method/frappe.client.get_count"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        r#"{"doctype": "ToDo", "doctype": "User"}"#,
    )
    .await;
    assert_refused(
        &reply,
        "/api/method/frappe.client.get_count",
        "JSON doctype",
    );
    assert_eq!(up.count(), 0, "{:?}", up.received());
    for path in [
        "/api/method/frappe.client.get_list?doctype=ToDo",
        "/api/method/frappe.client.get_count?doctype=todo",
        "/api/method/frappe.desk.search.search_link?doctype=ToDo&txt=a",
    ] {
        let reply = get(&gw.url(path), TODO_READER).await;
        assert_ne!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{path}: {}",
            reply.text()
        );
    }
    assert_eq!(up.count(), 3);
}

/// A client that may upload files and attach them to ToDo (`upload_file` checks write
/// permission on the doctype a file is attached to: an update).
fn uploader_config(up: &FrappeUpstream) -> String {
    base_config(up)
        .replace(
            "      methods: [frappe.client.get_list]",
            "      methods: [frappe.client.get_list]\n      files: true",
        )
        .replace("ToDo: [read]", "ToDo: [read, update]")
}

#[tokio::test]
async fn multipart_uploads_keep_working_and_cannot_call_other_methods() {
    let up = upstream().await;
    let gw = Gateway::start(&uploader_config(&up)).await;
    let parts: [Part; 3] = [
        (
            "file",
            Some("report 2024.pdf"),
            b"%PDF-1.4 \x00\x01\xff binary",
        ),
        ("is_private", None, b"1"),
        ("doctype", None, b"ToDo"),
    ];
    for path in ["/api/method/upload_file", "/api/v2/method/upload_file"] {
        let reply = send_multipart(&gw, Method::POST, path, TODO_READER, &parts).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
    }
    // The plain form erpgate writes is what was sent: it arrives byte for byte, but under
    // erpgate's own boundary, named by the Content-Type erpgate wrote.
    let sent = multipart(&parts).1;
    for seen in up.received() {
        let sent = under_own_boundary(&sent, &seen);
        assert_eq!(seen.body.as_deref(), Some(&sent[..]));
        // Buffered whole, so sent with its length.
        assert_eq!(
            seen.headers["content-length"],
            sent.len().to_string().as_str()
        );
    }
    // `upload_file` calls its `method` argument: it must be allowed like any other method.
    for method_part in [
        vec![("method", None, &b"frappe.client.insert"[..]), parts[0]],
        vec![parts[0], ("method", None, &b"frappe.client.insert"[..])],
    ] {
        let reply = send_multipart(
            &gw,
            Method::POST,
            "/api/method/upload_file",
            TODO_READER,
            &method_part,
        )
        .await;
        assert_refused(&reply, "/api/method/upload_file", "upload_file method");
    }
    // `upload_file` calls its `method` with no arguments (`method()`, frappe/handler.py), so
    // get_list would run without a doctype, wherever the field comes: refused, the body cut.
    let get_list: Part = ("method", None, b"frappe.client.get_list");
    let todo: Part = ("doctype", None, b"ToDo");
    for (order, allowed) in [
        (vec![parts[0], get_list, todo], false),
        (vec![get_list, parts[0], todo], false),
        (vec![get_list, parts[0]], false),
        (vec![parts[0], get_list, ("doctype", None, b"User")], false),
        (vec![parts[0], todo], true),
    ] {
        let reply = send_multipart(
            &gw,
            Method::POST,
            "/api/method/upload_file",
            TODO_READER,
            &order,
        )
        .await;
        if allowed {
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        } else {
            assert_refused(&reply, "/api/method/upload_file", "get_list without ToDo");
        }
    }
    // The two plain uploads above and the one without a method.
    assert_eq!(up.count(), 3);
}

#[tokio::test]
async fn a_50_mb_multipart_upload_streams_through_intact() {
    let up = upstream().await;
    // Uploads buffer by default; a streaming route lets them flow, judged on the way.
    let config = uploader_config(&up).replace("request: 3s", "request: 30s")
        + "routes:\n  - { path_prefix: /api/method/upload_file, site: erp, streaming: true }\n";
    let gw = Gateway::start(&config).await;
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 50;
    let chunk = |i: usize| Bytes::from(vec![(i % 251) as u8; CHUNK]);
    let head = |b: &str| {
        format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"is_private\"\r\n\r\n0\r\n--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    };
    let tail = |b: &str| format!("\r\n--{b}--\r\n");
    // What the site must get: the same bytes under erpgate's own boundary.
    let expected = |b: &str| {
        let mut expected = Sha256::new();
        expected.update(head(b).as_bytes());
        for i in 0..CHUNKS {
            expected.update(chunk(i));
        }
        expected.update(tail(b).as_bytes());
        let total = head(b).len() + CHUNK * CHUNKS + tail(b).len();
        (hex::encode(expected.finalize()), total)
    };

    let progress = up.clone();
    let (head, tail) = (Bytes::from(head(BOUNDARY)), Bytes::from(tail(BOUNDARY)));
    let stream = futures_util::stream::unfold(0usize, move |i| {
        let progress = progress.clone();
        let (head, tail) = (head.clone(), tail.clone());
        async move {
            let frame = |b: Bytes| Ok::<_, Infallible>(http_body::Frame::data(b));
            match i {
                0 => Some((frame(head), 1)),
                i if i <= CHUNKS => {
                    // Half-way, wait until the upstream has bytes: a gateway that held the
                    // body whole would never send any before the end.
                    if i == 6 {
                        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                        while progress.body_progress() == 0 {
                            assert!(tokio::time::Instant::now() < deadline, "nothing streamed");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    Some((frame(chunk(i - 1)), i + 1))
                }
                i if i == CHUNKS + 1 => Some((frame(tail), i + 1)),
                _ => None,
            }
        }
    });
    let auth = token(TODO_READER);
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    let reply = send_body(
        Method::POST,
        &gw.url("/api/method/upload_file"),
        &[("authorization", &auth), ("content-type", &content_type)],
        StreamBody::new(stream).boxed(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = &up.received()[0];
    let (expected, total) = expected(&own_boundary(seen));
    assert_eq!(seen.body_len, total);
    assert_eq!(seen.body_sha256, expected);
}
