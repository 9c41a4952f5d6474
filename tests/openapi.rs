//! The per-client OpenAPI document, fetched as an integrator would: each client's document
//! describes its own rules, with schemas from the test upstream's Frappe 15 metadata read as
//! the client's service account.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;

use http::{Method, StatusCode};
use serde_json::Value;
use support::*;

const DOC: &str = "/_erpgate/openapi.json";
const WRITER: Credential = ("ek_writer", "writer-client-secret");
const RUNNER: Credential = ("ek_runner", "runner-client-secret");
const USER_READER: Credential = ("ek_user_reader", "user-reader-client-secret");

/// The base config plus a ToDo writer (sync account) and a client granted User on the reader
/// account, which Frappe does not let read User.
fn config(up: &FrappeUpstream, extra: &str) -> String {
    format!(
        r#"{base}
  writer:
    key_id: {writer_id}
    secret_sha256: "{writer_hash}"
    site: erp
    service_account: sync
    allow:
      resources: {{ ToDo: [read, write], User: [read] }}
      methods: [frappe.client.get_list, frappe.client.get_count]
  user-reader:
    key_id: {ur_id}
    secret_sha256: "{ur_hash}"
    site: erp
    service_account: reader
    allow:
      resources: {{ ToDo: [read], User: [read] }}
{extra}"#,
        base = base_config(up),
        writer_id = WRITER.0,
        writer_hash = sha256_hex(WRITER.1),
        ur_id = USER_READER.0,
        ur_hash = sha256_hex(USER_READER.1),
    )
}

/// Every (path, verb) the document offers.
fn operations(doc: &Value) -> BTreeSet<String> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for verb in item.as_object().unwrap().keys() {
            if verb != "parameters" {
                ops.insert(format!("{} {path}", verb.to_uppercase()));
            }
        }
    }
    ops
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

const TODO_READS: &[&str] = &[
    "GET /api/resource/ToDo",
    "GET /api/resource/ToDo/{name}",
    "GET /api/v2/document/ToDo",
    "GET /api/v2/document/ToDo/{name}",
    "GET /api/v2/doctype/ToDo/count",
];

#[tokio::test]
async fn two_clients_get_documents_that_differ_exactly_by_their_rules() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, "")).await;
    let reader = get(&gw.url(DOC), TODO_READER).await;
    assert_eq!(reader.status, StatusCode::OK, "{}", reader.text());
    assert_eq!(reader.header("content-type"), Some("application/json"));
    let reader = reader.json();
    assert_eq!(reader["openapi"], "3.1.0");
    let writer = get(&gw.url(DOC), WRITER).await.json();

    // todo-reader: ToDo [read], frappe.client.get_list.
    let mut expected = set(TODO_READS);
    expected.extend(set(&[
        "GET /api/method/frappe.client.get_list",
        "POST /api/method/frappe.client.get_list",
        "GET /api/v2/method/frappe.client.get_list",
        "POST /api/v2/method/frappe.client.get_list",
    ]));
    assert_eq!(operations(&reader), expected);

    // writer: the same, plus ToDo's writes, User's reads and get_count.
    let writes = set(&[
        "POST /api/resource/ToDo",
        "PUT /api/resource/ToDo/{name}",
        "DELETE /api/resource/ToDo/{name}",
        "POST /api/v2/document/ToDo",
        "PATCH /api/v2/document/ToDo/{name}",
        "DELETE /api/v2/document/ToDo/{name}",
    ]);
    let user_reads: BTreeSet<String> = TODO_READS
        .iter()
        .map(|p| p.replace("ToDo", "User"))
        .collect();
    let get_count = set(&[
        "GET /api/method/frappe.client.get_count",
        "POST /api/method/frappe.client.get_count",
        "GET /api/v2/method/frappe.client.get_count",
        "POST /api/v2/method/frappe.client.get_count",
    ]);
    let extra: BTreeSet<String> = operations(&writer).difference(&expected).cloned().collect();
    let rules: BTreeSet<String> = writes
        .iter()
        .chain(&user_reads)
        .chain(&get_count)
        .cloned()
        .collect();
    assert_eq!(extra, rules);
    assert!(operations(&writer).is_superset(&expected));

    // Each method's parameters come from the capability catalog.
    let params: Vec<&str> = reader["paths"]["/api/method/frappe.client.get_list"]["get"]
        ["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for name in [
        "doctype",
        "fields",
        "filters",
        "order_by",
        "limit_page_length",
    ] {
        assert!(params.contains(&name), "{name} in {params:?}");
    }
    // A doctype argument offers what the client may read, from its own rules.
    let doctype_arg = |doc: &Value| {
        doc["paths"]["/api/method/frappe.client.get_list"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "doctype")
            .unwrap()["schema"]["enum"]
            .clone()
    };
    assert_eq!(doctype_arg(&reader), serde_json::json!(["ToDo"]));
    assert_eq!(doctype_arg(&writer), serde_json::json!(["ToDo", "User"]));
    // The writer's create takes the create schema; the reader has no write schema in use.
    assert_eq!(
        writer["paths"]["/api/resource/ToDo"]["post"]["requestBody"]["content"]["application/json"]
            ["schema"]["$ref"],
        "#/components/schemas/ToDo_create"
    );
}

#[tokio::test]
async fn a_restricted_client_s_document_names_no_doctype_it_cannot_read() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, "")).await;
    // Granted User, but its account (a Sales User on the site) may not read it.
    let reply = get(&gw.url(DOC), USER_READER).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let text = reply.text();
    assert!(!text.contains("User"), "names User: {text}");
    // Nor the doctypes ToDo links to (DocType, Role): not granted to it.
    assert!(!text.contains("\"Role\"") && !text.contains("\"DocType\""));
    assert_eq!(operations(&reply.json()), set(TODO_READS));
    // The same rules on an account that may read User describe it, with its Has Role rows.
    let writer = get(&gw.url(DOC), WRITER).await.json();
    assert!(writer["components"]["schemas"]["User"].is_object());
    assert_eq!(
        writer["components"]["schemas"]["User"]["allOf"][1]["properties"]["roles"]["items"]["$ref"],
        "#/components/schemas/Has_Role"
    );
    assert_eq!(
        writer["components"]["schemas"]["Has_Role"]["allOf"][1]["properties"]["role"]
            ["description"],
        "The name of a document of a doctype this client cannot read."
    );
}

#[tokio::test]
async fn schemas_come_from_the_site_metadata_read_as_the_client_account() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, "")).await;
    let doc = get(&gw.url(DOC), TODO_READER).await.json();
    let schemas = &doc["components"]["schemas"];
    let read = &schemas["ToDo"]["allOf"][1]["properties"];
    assert_eq!(
        read["status"]["enum"],
        serde_json::json!(["Open", "Closed", "Cancelled", "", null])
    );
    assert_eq!(read["date"]["format"], "date");
    assert!(
        read["assignment_rule"].is_object(),
        "read-only fields are read"
    );
    assert!(
        read.get("column_break_2").is_none(),
        "layout fields are not"
    );
    let write = &schemas["ToDo_write"]["properties"];
    assert!(
        write.get("assignment_rule").is_none(),
        "read_only is not written"
    );
    assert!(
        write.get("assigned_by_full_name").is_none(),
        "Read Only is not written"
    );
    assert!(write["description"].is_object());
    assert_eq!(
        schemas["ToDo_create"]["required"],
        serde_json::json!(["description"])
    );
    // Standard fields described once.
    assert!(schemas["StandardFields"]["properties"]["docstatus"].is_object());
    assert!(read.get("name").is_none());

    let asked: Vec<_> = up
        .received()
        .into_iter()
        .filter(|r| r.path_and_query.ends_with("/meta"))
        .collect();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].path_and_query, "/api/v2/doctype/ToDo/meta");
    assert_eq!(
        asked[0].headers["authorization"],
        format!("token {READER_KEY}:{READER_SECRET}").as_str()
    );
}

#[tokio::test]
async fn the_document_is_answered_here_cached_and_costs_quota() {
    let up = upstream().await;
    let yaml = config(&up, "").replace(
        "      resources: { ToDo: [read] }\n      methods: [frappe.client.get_list]\n",
        "      resources: { ToDo: [read] }\n      methods: [frappe.client.get_list]\n    rate_limit: { per_minute: 3, burst: 3 }\n",
    );
    let gw = Gateway::start(&yaml).await;
    let first = get(&gw.url(DOC), TODO_READER).await;
    assert_eq!(first.status, StatusCode::OK);
    let as_yaml = get(&gw.url(&format!("{DOC}?format=yaml")), TODO_READER).await;
    assert_eq!(as_yaml.status, StatusCode::OK);
    assert_eq!(as_yaml.header("content-type"), Some("application/yaml"));
    let parsed: Value = serde_yaml::from_slice(&as_yaml.body).unwrap();
    assert_eq!(parsed, first.json());
    // Never forwarded; the metadata read once, then kept.
    let paths: Vec<String> = up
        .received()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    assert_eq!(paths, vec!["/api/v2/doctype/ToDo/meta".to_owned()]);
    // The third costs the last unit; the fourth is over the quota.
    assert_eq!(get(&gw.url(DOC), TODO_READER).await.status, StatusCode::OK);
    let refused = get(&gw.url(DOC), TODO_READER).await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.text()
    );
    assert!(refused.header("retry-after").is_some());

    // The admin purge forgets the metadata: the next document reads it again.
    let purge = send(
        Method::POST,
        &format!("{}/openapi/purge", gw.admin),
        &[("x-erpgate-admin", "1")],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(purge.status, StatusCode::OK);
    assert_eq!(get(&gw.url(DOC), WRITER).await.status, StatusCode::OK);
    let metas = up
        .received()
        .into_iter()
        .filter(|r| r.path_and_query == "/api/v2/doctype/ToDo/meta")
        .count();
    assert_eq!(metas, 2);
}

#[tokio::test]
async fn a_client_without_rules_or_credentials_gets_no_document() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, "")).await;
    let full = get(&gw.url(DOC), FULL).await;
    assert_eq!(full.status, StatusCode::FORBIDDEN, "{}", full.text());
    let anonymous = send(Method::GET, &gw.url(DOC), &[], bytes::Bytes::new()).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn servers_name_the_configured_public_url() {
    let up = upstream().await;
    let gw = Gateway::start(&config(
        &up,
        "openapi: { public_url: \"https://api.example.com/\", metadata_ttl: 1m }\n",
    ))
    .await;
    let doc = get(&gw.url(DOC), TODO_READER).await.json();
    assert_eq!(doc["servers"][0]["url"], "https://api.example.com");
}

/// Runs `script` with `input` on stdin; its stdout, or a panic with its stderr.
fn python(script: &str, input: &[u8]) -> String {
    use std::io::Write as _;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (tests/setup.sh installs what it needs)");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn every_client_s_document_is_valid_openapi_3_1() {
    let up = upstream().await;
    // A client granted every operation, document methods included.
    let runner = format!(
        "  runner:\n    key_id: {}\n    secret_sha256: \"{}\"\n    site: erp\n    \
         service_account: sync\n    allow:\n      resources: {{ ToDo: [all], User: [read] }}\n      \
         methods:\n        - {{ name: myapp.api.sync_orders, args: {{ doctype: \"doctype:create\", \
         payload: \"doc:create\" }} }}\n        - {{ name: myapp.api.ping, judged_by_its_own_code: true }}\n\
         openapi: {{ public_url: \"https://api.example.com\" }}\n",
        RUNNER.0,
        sha256_hex(RUNNER.1)
    );
    let gw = Gateway::start(&config(&up, &runner)).await;
    let mut documents = Vec::new();
    for client in [TODO_READER, WRITER, USER_READER, RUNNER] {
        let reply = get(&gw.url(DOC), client).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        documents.push(reply.json());
        if client == RUNNER {
            let paths = &documents.last().unwrap()["paths"];
            assert!(paths["/api/resource/ToDo/{name}"]["post"].is_object());
            assert!(paths["/api/v2/document/ToDo/{name}/method/{method}"]["post"].is_object());
            // An app's own methods: declared arguments as judged (a doctype argument offers
            // what the client may create), or whatever its own code takes.
            let sync = &paths["/api/method/myapp.api.sync_orders"];
            let doctype = &sync["post"]["requestBody"]["content"]["application/json"]["schema"]
                ["properties"]["doctype"];
            assert_eq!(doctype["enum"], serde_json::json!(["ToDo"]));
            assert!(paths["/api/v2/method/myapp.api.ping"]["post"].is_object());
        }
    }
    let yaml = get(&gw.url("/_erpgate/openapi.yaml"), WRITER).await;
    documents.push(serde_yaml::from_slice(&yaml.body).unwrap());
    // openapi-spec-validator (PyPI), the validator most OpenAPI tooling uses.
    let script = r#"
import json, sys
from openapi_spec_validator import validate
from openapi_spec_validator.validation.validators import OpenAPIV31SpecValidator
for line in sys.stdin:
    validate(json.loads(line), cls=OpenAPIV31SpecValidator)
    print("valid")
"#;
    let lines: String = documents.iter().map(|d| format!("{d}\n")).collect();
    assert_eq!(
        python(script, lines.as_bytes()),
        "valid\n".repeat(documents.len())
    );
}

/// Schemathesis (PyPI), driven by a client's document against erpgate in front of the test
/// upstream: no 5xx from erpgate, and every answer within the documented statuses, content
/// types and schemas.
async fn schemathesis(client: Credential) {
    let up = upstream().await;
    // Quotas would answer 429s the fuzzer's volume earned; they are tested above.
    let gw = Gateway::start(&config(&up, "rate_limit: null\n")).await;
    let doc = get(&gw.url(DOC), client).await;
    assert_eq!(doc.status, StatusCode::OK, "{}", doc.text());
    let file = scratch_file(&format!("openapi-{}.json", client.0), &doc.text());
    let base = gw.base.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("st")
            // Its own state directory (`.schemathesis/`) goes beside the document, not into
            // the worktree.
            .current_dir(file.parent().unwrap())
            .args(["run", file.to_str().unwrap(), "--url", &base])
            .args(["-H", &format!("Authorization: {}", token(client))])
            .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"])
            .args(["--mode", "positive", "--max-examples", "5", "--seed", "1"])
            .args(["--phases", "examples,coverage,fuzzing", "--no-shrink", "--workers", "1"])
            .output()
            .expect("schemathesis (tests/setup.sh installs it)")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_outside_a_reader_s_document() {
    schemathesis(TODO_READER).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_outside_a_writer_s_document() {
    schemathesis(WRITER).await;
}

#[tokio::test]
async fn an_oauth_app_s_document_is_read_as_its_user() {
    let up = upstream().await;
    up.issue_oauth_token(
        "tok-alice",
        "mobile-client-id",
        "alice@example.com",
        3600,
        "all",
    );
    let gw = Gateway::start(&format!(
        "{}oauth_apps:\n  mobile:\n    site: erp\n    client_id: mobile-client-id\n    \
         allow: {{ resources: {{ ToDo: [read, create], User: [read] }} }}\n",
        config(&up, "")
    ))
    .await;
    let reply = send(
        Method::GET,
        &gw.url(DOC),
        &[("authorization", "Bearer tok-alice")],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // Alice may not read User on the site: the app's document leaves it out.
    assert!(!reply.text().contains("User"));
    let mut expected = set(TODO_READS);
    expected.extend(set(&[
        "POST /api/resource/ToDo",
        "POST /api/v2/document/ToDo",
    ]));
    assert_eq!(operations(&reply.json()), expected);
    let asked: Vec<_> = up
        .received()
        .into_iter()
        .filter(|r| r.path_and_query.ends_with("/meta"))
        .map(|r| r.headers["authorization"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(asked, vec!["Bearer tok-alice"; 2]);
}
