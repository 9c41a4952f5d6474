//! Fail closed, everywhere: the requests an attacker sends to make erpgate judge one thing while
//! werkzeug reads another, or to make one request cost everyone — with a key and without one
//! (a public route is a door with no key). Each test checks what the client saw and what
//! reached the test upstream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GET_TOKEN: &str = "/api/method/frappe.integrations.oauth2.get_token";

/// The base config, with `get_token` public on the site and the ToDo reader allowed files.
fn config(up: &FrappeUpstream) -> String {
    base_config(up)
        .replace(
            "    timeouts: { connect: 1s, request: 3s }\n",
            "    timeouts: { connect: 1s, request: 3s }\n    public:\n      methods: \
             [frappe.integrations.oauth2.get_token]\n      burst: 1000\n",
        )
        .replace(
            "      methods: [frappe.client.get_list]",
            "      methods: [frappe.client.get_list]\n      files: true",
        )
        + "buffering: { client_body_timeout: 1s }\n"
}

/// A body that splits one way at `--good` and another at `--evil`: under `good` it is one
/// harmless field whose value hides, under `evil`, a `cmd` that returns the service account's
/// password and a `sid` that would run as Administrator.
fn smuggling_body() -> String {
    let hidden = "--evil\r\nContent-Disposition: form-data; name=\"cmd\"\r\n\r\nfrappe.client.get_password\r\n\
                  --evil\r\nContent-Disposition: form-data; name=\"sid\"\r\n\r\nadministrator-session\r\n\
                  --evil--\r\n";
    format!(
        "--good\r\nContent-Disposition: form-data; name=\"grant_type\"\r\n\r\n{hidden}\r\n--good--\r\n"
    )
}

#[tokio::test]
async fn a_multipart_boundary_werkzeug_reads_differently_is_refused_with_a_key_or_without() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    // werkzeug 3.0.6 `parse_options_header`: RFC 2231 `boundary*` replaces `boundary`,
    // `boundary*N` continues it, a repeat's last value wins, `boundary = x` is skipped.
    let content_types = [
        "multipart/form-data; boundary=good; boundary*=utf-8''evil",
        "multipart/form-data; boundary=good; boundary*=''evil",
        "multipart/form-data; boundary=good; boundary*0=evil",
        "multipart/form-data; boundary=good; BOUNDARY=evil",
        "multipart/form-data; boundary=good; boundary=evil",
        "multipart/form-data; boundary = evil; boundary=good",
        "multipart/form-data; boundary=good; charset*=utf-8''x",
        "multipart/form-data; boundary=\"go\\\"od\"",
        "multipart/form-data; boundary=go/od",
    ];
    let body = smuggling_body();
    for content_type in content_types {
        for (path, credential) in [
            (GET_TOKEN, None),
            (
                "/api/method/frappe.client.get_list?doctype=ToDo",
                Some(TODO_READER),
            ),
            (
                "/api/method/frappe.client.get_list?doctype=ToDo",
                Some(FULL),
            ),
            ("/api/resource/ToDo", Some(FULL)),
        ] {
            let auth = credential.map(token);
            let mut headers = vec![("content-type", content_type)];
            if let Some(auth) = &auth {
                headers.push(("authorization", auth));
            }
            let reply = send(Method::POST, &gw.url(path), &headers, body.clone()).await;
            assert_eq!(
                reply.status,
                StatusCode::BAD_REQUEST,
                "{content_type} on {path} as {credential:?}: {}",
                reply.text()
            );
            assert!(reply.text().contains("boundary"), "{}", reply.text());
        }
    }
    assert_eq!(up.count(), 0, "{:?}", up.received());
    assert_eq!(up.body_progress(), 0);
}

#[tokio::test]
async fn what_reaches_the_site_is_the_body_and_content_type_erpgate_wrote() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    let auth = token(FULL);
    // A plain multipart body under a quoted boundary with an extra parameter: accepted, and
    // re-encoded under erpgate's own boundary.
    let body = "--good\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n\
                --good\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x.txt\"\r\n\r\nfile --good- text\r\n\
                --good\r\nContent-Disposition: form-data; name=\"sid\"\r\n\r\nstolen\r\n--good--\r\n";
    let reply = send(
        Method::POST,
        &gw.url("/api/method/upload_file"),
        &[
            ("authorization", &auth),
            (
                "content-type",
                "multipart/form-data; charset=utf-8; boundary=\"good\"",
            ),
        ],
        body,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = up.received().pop().unwrap();
    let content_type = seen.headers["content-type"].to_str().unwrap().to_owned();
    let (mime, options) = support::werkzeug::parse_options_header(&content_type);
    assert_eq!(mime, "multipart/form-data");
    assert_eq!(options.len(), 1, "{content_type}");
    let own = &options["boundary"];
    assert_ne!(own, "good");
    let forwarded = seen.body.unwrap();
    assert_eq!(
        support::werkzeug::multipart_fields(&forwarded, own),
        vec![("a".to_owned(), "1".to_owned())]
    );
    let text = String::from_utf8_lossy(&forwarded);
    assert!(
        text.contains("file --good- text") && !text.contains("stolen"),
        "{text}"
    );
    assert!(!text.contains("\r\n--good\r\n"), "{text}");

    // JSON and urlencoded bodies go with their plain mimetype and no parameter of the client's.
    for (sent, body, forwarded) in [
        (
            "Application/Merge-Patch+JSON; charset=utf-8; boundary*=utf-8''x",
            r#"{"doctype": "ToDo"}"#,
            "application/json",
        ),
        (
            "application/x-www-form-urlencoded; charset*=utf-8''x",
            "doctype=ToDo",
            "application/x-www-form-urlencoded",
        ),
    ] {
        up.clear();
        let reply = send(
            Method::POST,
            &gw.url("/api/method/ping"),
            &[("authorization", &auth), ("content-type", sent)],
            body,
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let seen = up.received().pop().unwrap();
        assert_eq!(seen.headers["content-type"], forwarded);
        assert_eq!(seen.body.as_deref(), Some(body.as_bytes()));
    }
}

/// Sends a request head and the first `first` bytes of `body` on a raw connection; the caller
/// sends the rest.
async fn start_slow_body(
    gw: &Gateway,
    head: &str,
    body: &[u8],
    first: usize,
) -> tokio::net::TcpStream {
    let addr = gw.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..first]).await.unwrap();
    stream
}

async fn answer(mut stream: tokio::net::TcpStream) -> String {
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_keyless_body_is_read_whole_before_the_site_sees_a_byte() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    // A body werkzeug leaves alone (text/plain), so nothing in it is judged: only buffering
    // stands between a trickling client and one of gunicorn's few workers.
    let body = b"grant_type=authorization_code&code=good-code&client_id=app";
    let head = format!(
        "POST {GET_TOKEN} HTTP/1.1\r\nHost: {SITE}\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut slow = start_slow_body(&gw, &head, body, 10).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(up.body_progress(), 0, "the site saw part of a keyless body");
    assert_eq!(up.count(), 0);
    slow.write_all(&body[10..]).await.unwrap();
    let reply = answer(slow).await;
    // The site's own answer, once the body was whole.
    assert!(reply.contains("server: gunicorn"), "{reply}");
    let seen = up.received();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body.as_deref(), Some(&body[..]));
    // Sent with its length, not trickled on.
    assert_eq!(
        seen[0].headers["content-length"],
        body.len().to_string().as_str()
    );

    // A keyless body that stalls is the client's timeout, and nothing reaches the site: one
    // werkzeug leaves alone (the buffer layer reads it), one it parses as a form and a multipart
    // one (classification reads them, holding budget while it does).
    let multipart = "--b\r\nContent-Disposition: form-data; name=\"grant_type\"\r\n\r\nauthorization_code\r\n--b--\r\n";
    for (content_type, body) in [
        ("text/plain", &body[..]),
        ("application/x-www-form-urlencoded", &body[..]),
        ("multipart/form-data; boundary=b", multipart.as_bytes()),
    ] {
        up.clear();
        let progress = up.body_progress();
        let head = format!(
            "POST {GET_TOKEN} HTTP/1.1\r\nHost: {SITE}\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let stalled = start_slow_body(&gw, &head, body, 10).await;
        let reply = answer(stalled).await;
        assert!(reply.starts_with("HTTP/1.1 408"), "{content_type}: {reply}");
        assert_eq!(up.count(), 0);
        assert_eq!(up.body_progress(), progress);
    }
    // Nothing of them is held any more.
    assert_nothing_buffered(&gw).await;
}

/// A multipart body: a file part (when `file_first`), then `fields` small fields.
fn many_parts(fields: usize, file_first: bool) -> Vec<u8> {
    let mut body = Vec::with_capacity(fields * 60);
    if file_first {
        body.extend_from_slice(
            b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f.txt\"\r\n\r\ndata\r\n",
        );
    }
    for i in 0..fields {
        // Arguments `upload_file` takes (it reads the whole form): judged, each once.
        let name = if i % 2 == 0 { "folder" } else { "is_private" };
        body.extend_from_slice(
            format!("--b\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\nname\r\n")
                .as_bytes(),
        );
    }
    body.extend_from_slice(b"--b--\r\n");
    body
}

#[tokio::test]
async fn thirty_thousand_parts_stop_at_werkzeugs_cap_while_a_bystander_is_served() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    let auth = token(TODO_READER);
    let upload = gw.url("/api/method/upload_file");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "multipart/form-data; boundary=b"),
    ];
    for file_first in [true, false] {
        up.clear();
        let attack = send(
            Method::POST,
            &upload,
            &headers,
            Bytes::from(many_parts(30_000, file_first)),
        );
        let bystander = async {
            // Each judged field is judged once: the bystander's answers come as usual while the
            // attack is read (before, this attack took a minute of CPU).
            let started = Instant::now();
            let reply = get(&gw.url("/api/resource/ToDo"), FULL).await;
            (reply.status, started.elapsed())
        };
        let (attack, (bystander, waited)) = tokio::join!(attack, bystander);
        assert_eq!(
            attack.status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{}",
            attack.text()
        );
        assert!(attack.text().contains("1000 parts"), "{}", attack.text());
        assert_eq!(bystander, StatusCode::OK);
        // A bound against a hang, not a benchmark: seconds, where the quadratic judge took
        // a minute.
        assert!(
            waited < Duration::from_secs(10),
            "bystander waited {waited:?}"
        );
        // Nothing complete reached the site from the attack: only the bystander's read.
        let received = up.received();
        assert_eq!(received.len(), 1, "{file_first}");
        assert_eq!(received[0].path_and_query, "/api/resource/ToDo");
    }
    // Within the cap, the same shape passes whole.
    up.clear();
    let reply = send(
        Method::POST,
        &upload,
        &headers,
        Bytes::from(many_parts(999, true)),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(up.count(), 1);
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn list_arguments_that_cannot_be_read_exactly_are_refused_in_every_carrier() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    let depth = erpgate::frappe::python_json::MAX_DEPTH + 1;
    // The attack: CPython reads this filter (its limit is the recursion limit), and the
    // `ifnull(...)` column reaches SQL with a subquery.
    let deep_filter = format!(
        "{}[\"ifnull((select api_secret from tabUser limit 1),1)\", \"=\", 1]{}",
        "[".repeat(depth - 1),
        "]".repeat(depth - 1)
    );
    let deep_fields = format!("{}\"name\"{}", "[".repeat(depth), "]".repeat(depth));
    let cases = [
        ("filters", deep_filter.clone()),
        ("or_filters", deep_filter.clone()),
        ("fields", deep_fields),
        ("filters", r#"[["name", "=", "x"]"#.to_owned()),
        ("filters", "{\"name\": (select 1)}".to_owned()),
    ];
    let auth = token(TODO_READER);
    for (argument, value) in &cases {
        // The query, a urlencoded body, a JSON body member (a string Frappe json.loads), and a
        // multipart field after a file part.
        let query = format!("/api/resource/ToDo?{argument}={}", urlencode(value));
        let get_list = "/api/method/frappe.client.get_list";
        let form = format!("doctype=ToDo&{argument}={}", urlencode(value));
        let json = serde_json::json!({"doctype": "ToDo", *argument: value}).to_string();
        let multipart = format!(
            "--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\nx\r\n\
             --b\r\nContent-Disposition: form-data; name=\"{argument}\"\r\n\r\n{value}\r\n--b--\r\n"
        );
        let replies = [
            get(&gw.url(&query), TODO_READER).await,
            send(
                Method::POST,
                &gw.url(get_list),
                &[
                    ("authorization", &auth),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                form,
            )
            .await,
            send(
                Method::POST,
                &gw.url(get_list),
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                json,
            )
            .await,
            send(
                Method::POST,
                &gw.url("/api/method/upload_file"),
                &[
                    ("authorization", &auth),
                    ("content-type", "multipart/form-data; boundary=b"),
                ],
                multipart,
            )
            .await,
        ];
        for (carrier, reply) in ["query", "form", "json", "multipart"].iter().zip(replies) {
            assert_eq!(
                reply.status,
                StatusCode::FORBIDDEN,
                "{argument} in {carrier}: {}",
                reply.text()
            );
            assert!(
                reply.text().contains(&format!("'{argument}'")),
                "{argument} in {carrier}: {}",
                reply.text()
            );
        }
    }
    // Nothing complete reached the site (the multipart file part may have started streaming;
    // its body was cut before its end).
    assert_eq!(up.count(), 0, "{:?}", up.received());
    // A document name, which get_value takes as {"name": text}, still passes.
    let reply = get(&gw.url("/api/resource/ToDo?filters=TODO-0001"), TODO_READER).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test]
async fn a_keyed_writes_body_read_for_its_idempotency_key_is_held_on_the_budget_and_may_not_stall()
{
    // Idempotency reads a multipart or opaque write's body whole to fingerprint it, before the
    // buffer layer: on the same budget, with the same pause between reads.
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    let body = vec![b'x'; 20_000];
    let head = format!(
        "POST /api/method/upload_file HTTP/1.1\r\nHost: {SITE}\r\nAuthorization: {}\r\n\
         Idempotency-Key: upload-1\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        token(FULL),
        body.len()
    );
    let stalled = start_slow_body(&gw, &head, &body, 1000).await;
    // Held as it arrived: the thousand bytes sent, not the twenty thousand declared.
    wait_for_buffered(&gw, "memory", 1000.0).await;
    let reply = answer(stalled).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert_eq!(up.count(), 0);
    assert_nothing_buffered(&gw).await;
}

#[tokio::test]
async fn a_child_row_cannot_save_a_parent_the_client_may_not_update() {
    // `insert_doc` appends a child-table row to `frappe.get_doc(parenttype, parent)` and saves
    // that parent: a client allowed to create rows of `Has Role` would grant any user a role.
    let up = upstream().await;
    let yaml = base_config(&up)
        .replace(
            "      resources: { ToDo: [read] }",
            "      resources: { ToDo: [read], \"Has Role\": [create] }",
        )
        .replace(
            "      methods: [frappe.client.get_list]",
            "      methods: [frappe.client.insert, frappe.client.insert_many]",
        );
    let gw = Gateway::start(&yaml).await;
    let row = r#"{"doctype": "Has Role", "parenttype": "User", "parent": "a@b.c", "parentfield": "roles", "role": "System Manager"}"#;
    let auth = token(TODO_READER);
    for (method, body) in [
        ("frappe.client.insert", format!(r#"{{"doc": {row}}}"#)),
        (
            "frappe.client.insert",
            format!(r#"{{"doc": {}}}"#, serde_json::json!(row)),
        ),
        (
            "frappe.client.insert_many",
            format!(r#"{{"docs": [{{"doctype": "Has Role"}}, {row}]}}"#),
        ),
    ] {
        let reply = send(
            Method::POST,
            &gw.url(&format!("/api/method/{method}")),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body.clone(),
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{body}: {}",
            reply.text()
        );
        assert!(reply.text().contains("update User"), "{}", reply.text());
    }
    assert_eq!(up.count(), 0, "{:?}", up.received());
}

#[tokio::test]
async fn arguments_naming_doctypes_in_odd_deep_or_oversized_shapes_are_refused() {
    let up = upstream().await;
    let yaml = base_config(&up).replace(
        "      methods: [frappe.client.get_list]",
        "      methods: [frappe.client.get_list, frappe.client.insert, frappe.client.insert_many]",
    );
    let gw = Gateway::start(&yaml).await;
    let auth = token(TODO_READER);
    let depth = erpgate::frappe::python_json::MAX_DEPTH;
    let deep_doc = format!(
        r#"{{"doctype": "ToDo", "x": {}1{}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    for (method, body) in [
        // A doctype that is not a string, and a doc or docs that cannot be read: no doctype
        // erpgate can name, so no rule can allow the call.
        (
            "frappe.client.get_list",
            r#"{"doctype": ["ToDo"]}"#.to_owned(),
        ),
        (
            "frappe.client.get_list",
            r#"{"doctype": "ToDo", "parent": {"x": 1}}"#.to_owned(),
        ),
        (
            "frappe.client.insert",
            format!(r#"{{"doc": {}}}"#, serde_json::json!(deep_doc)),
        ),
        (
            "frappe.client.insert",
            r#"{"doc": "{\"doctype\": \"ToDo\""}"#.to_owned(),
        ),
        (
            "frappe.client.insert_many",
            r#"{"docs": "[{\"doctype\": \"ToDo\"}"}"#.to_owned(),
        ),
        (
            "frappe.client.insert_many",
            r#"{"docs": {"doctype": "ToDo"}}"#.to_owned(),
        ),
    ] {
        let reply = send(
            Method::POST,
            &gw.url(&format!("/api/method/{method}")),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body.clone(),
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{body}: {}",
            reply.text()
        );
        // The refusal names the argument (or says no doctype can be read from it).
        assert!(
            reply
                .text()
                .contains("needs a doctype the gateway can read")
                || reply.text().contains("argument 'doc")
                || reply.text().contains("argument 'parent'"),
            "{body}: {}",
            reply.text()
        );
    }
    // A whole JSON body nested past what erpgate reads: 400, whoever sends it.
    let deep_body = format!(
        r#"{{"doctype": "ToDo", "filters": {}1{}}}"#,
        "[".repeat(depth + 1),
        "]".repeat(depth + 1)
    );
    for credential in [TODO_READER, FULL] {
        let reply = send(
            Method::POST,
            &gw.url("/api/method/frappe.client.get_list"),
            &[
                ("authorization", &token(credential)),
                ("content-type", "application/json"),
            ],
            deep_body.clone(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    }
    // Oversized: a body past `max_inspected_body_bytes` (1 MiB here) is 413 from its head, a
    // query past the head limit 431.
    let big = format!(
        r#"{{"doctype": "ToDo", "filters": "{}"}}"#,
        "x".repeat(2 << 20)
    );
    let reply = send(
        Method::POST,
        &gw.url("/api/method/frappe.client.get_list"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        big,
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text()
    );
    let long = gw.url(&format!(
        "/api/resource/ToDo?filters={}",
        "x".repeat(16 << 10)
    ));
    assert_eq!(
        get(&long, TODO_READER).await.status,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    assert_eq!(up.count(), 0, "{:?}", up.received());
}
