//! Capabilities, not method names: a restricted client's call is judged as the *function* Frappe
//! will run (any alias of it) with each argument that function receives, by the kind the
//! capability catalog gives that argument. Each test sends what an attacker would and asserts
//! what the client saw and what reached the test upstream (which, like Frappe, resolves any
//! alias and passes what `get_newargs` keeps).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{Method, StatusCode};
use serde_json::json;
use support::*;

/// A payload that reads another table if it reaches SQL text (as found on a real site).
const SUBQUERY: &str = "substring((select group_concat(api_key) from tabUser), 1, 40)";

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The base config with the restricted client's `allow` block replaced.
fn with_rules(up: &support::frappe::FrappeUpstream, resources: &str, methods: &str) -> String {
    base_config(up).replace(
        "      resources: { ToDo: [read] }\n      methods: [frappe.client.get_list]\n",
        &format!("      resources: {{ {resources} }}\n      methods: {methods}\n"),
    )
}

/// A 403 whose message names `needle` (the argument, method or doctype refused).
fn assert_refused(reply: &Reply, needle: &str) {
    assert_eq!(
        reply.status,
        StatusCode::FORBIDDEN,
        "{needle}: {}",
        reply.text()
    );
    let envelope = reply.json();
    let exc_type = match envelope.get("errors") {
        Some(errors) => &errors[0]["type"], // v2
        None => &envelope["exc_type"],
    };
    assert_eq!(exc_type, "PermissionError", "{}", reply.text());
    assert!(
        reply.text().contains(needle),
        "the refusal should name '{needle}': {}",
        reply.text()
    );
}

#[tokio::test]
async fn an_alias_is_judged_as_the_function_it_reaches() {
    let up = upstream().await;
    // `frappe.email.inbox` imports `set_value` from `frappe.client`: the same function.
    let alias = "/api/method/frappe.email.inbox.set_value?doctype=ToDo&name=t1&fieldname=status&value=Closed";
    let gw = Gateway::start(&base_config(&up)).await;
    assert_refused(
        &get(&gw.url(alias), TODO_READER).await,
        "frappe.email.inbox.set_value",
    );
    drop(gw);

    // Granted set_value, the alias is set_value, and ToDo is only readable.
    let gw = Gateway::start(&with_rules(
        &up,
        "ToDo: [read]",
        "[frappe.client.set_value]",
    ))
    .await;
    assert_refused(&get(&gw.url(alias), TODO_READER).await, "update ToDo");
    assert_eq!(up.count(), 0, "{:?}", up.received());
    drop(gw);

    // A rule naming the alias grants the function, under any name.
    let gw = Gateway::start(&with_rules(
        &up,
        "ToDo: [read, update]",
        "[frappe.email.inbox.set_value]",
    ))
    .await;
    let direct = alias.replace("frappe.email.inbox", "frappe.client");
    for path in [alias, direct.as_str()] {
        let reply = get(&gw.url(path), TODO_READER).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(
            reply.json()["message"]["function"],
            "frappe.client.set_value"
        );
    }
    let received = up.received();
    assert_eq!(received.len(), 2);
    assert!(received[0]
        .path_and_query
        .starts_with("/api/method/frappe.email.inbox.set_value?"));
}

#[tokio::test]
async fn sql_fragments_are_refused_in_every_parameter_that_reaches_sql() {
    let up = upstream().await;
    let gw = Gateway::start(&with_rules(
        &up,
        "ToDo: [read]",
        "[frappe.client.get_list, frappe.client.get_value, frappe.desk.reportview.get, \
         frappe.desk.search.search_widget]",
    ))
    .await;
    let list = |args: &str| format!("/api/method/frappe.client.get_list?doctype=ToDo&{args}");
    let report = |args: &str| format!("/api/method/frappe.desk.reportview.get?doctype=ToDo&{args}");
    let q = enc(SUBQUERY);
    let fields = enc(&format!("[\"name\", \"{SUBQUERY}\"]"));
    let attacks = [
        // reportview pastes `pluck` as a column (an attack found on a real site).
        (report(&format!("pluck={q}")), "pluck"),
        (report(&format!("fields={fields}")), "fields"),
        (report(&format!("order_by={q}")), "order_by"),
        (list(&format!("fields={fields}")), "fields"),
        (list(&format!("order_by={q}")), "order_by"),
        (list(&format!("group_by={q}")), "group_by"),
        // A string filter is raw SQL to `build_filter_conditions`.
        (list(&format!("filters={}", enc(&format!("[\"{SUBQUERY} > 0\"]")))), "filters"),
        // `debug` sends the SQL back in `_debug_messages`.
        (list("debug=1"), "debug"),
        (
            format!("/api/method/frappe.client.get_value?doctype=ToDo&filters=t1&fieldname={q}"),
            "fieldname",
        ),
        // `search_widget` pastes `filter_fields` and `searchfield` into its SELECT.
        (
            format!("/api/method/frappe.desk.search.search_widget?doctype=ToDo&txt=a&filter_fields={fields}"),
            "filter_fields",
        ),
        (
            format!("/api/method/frappe.desk.search.search_widget?doctype=ToDo&txt=a&searchfield={q}"),
            "searchfield",
        ),
    ];
    for (path, argument) in &attacks {
        assert_refused(&get(&gw.url(path), TODO_READER).await, argument);
    }
    // The same in a JSON body and a form body.
    let reply = send_json(
        Method::POST,
        &gw.url("/api/method/frappe.desk.reportview.get"),
        TODO_READER,
        &json!({"doctype": "ToDo", "pluck": SUBQUERY}).to_string(),
    )
    .await;
    assert_refused(&reply, "pluck");
    assert_eq!(up.count(), 0, "{:?}", up.received());

    // What the grammar admits goes through, and reaches the function.
    for path in [
        report("pluck=name"),
        list(&format!(
            "fields={}&order_by=modified%20desc",
            enc("[\"name\", \"status\"]")
        )),
        "/api/method/frappe.client.get_value?doctype=ToDo&filters=t1&fieldname=status".into(),
        "/api/method/frappe.desk.search.search_widget?doctype=ToDo&txt=a&searchfield=description"
            .into(),
    ] {
        let reply = get(&gw.url(&path), TODO_READER).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
    }
    assert_eq!(up.count(), 4);
}

#[tokio::test]
async fn a_method_argument_must_be_granted_and_is_judged_with_what_it_receives() {
    let up = upstream().await;
    let note = enc(r#"{"doctype": "Note", "title": "x"}"#);
    let mapped = format!(
        "/api/method/frappe.model.mapper.make_mapped_doc?method=frappe.client.insert&source_name={note}"
    );
    // Only make_mapped_doc: the method it would call is not granted.
    let gw = Gateway::start(&with_rules(
        &up,
        "ToDo: [read], Note: [read]",
        "[frappe.model.mapper.make_mapped_doc]",
    ))
    .await;
    assert_refused(
        &get(&gw.url(&mapped), TODO_READER).await,
        "frappe.client.insert",
    );
    drop(gw);

    // Granted both: insert receives `source_name` as its `doc`, a Note the client may not create.
    let gw = Gateway::start(&with_rules(
        &up,
        "ToDo: [read], Note: [read]",
        "[frappe.model.mapper.make_mapped_doc, frappe.client.insert, frappe.client.get_list, \
         frappe.desk.search.search_widget]",
    ))
    .await;
    assert_refused(&get(&gw.url(&mapped), TODO_READER).await, "create Note");
    // `search_widget` calls `query(doctype, txt, searchfield, ...)` by position: get_list
    // receives `txt` as its `fields`.
    let search = format!(
        "/api/method/frappe.desk.search.search_widget?doctype=ToDo&query=frappe.client.get_list&txt={}",
        enc(SUBQUERY)
    );
    assert_refused(&get(&gw.url(&search), TODO_READER).await, "fields");
    // A method it names that is never allowed, or login, are refused as such.
    let login = "/api/method/frappe.desk.search.search_widget?doctype=ToDo&txt=a&query=login";
    assert_refused(&get(&gw.url(login), TODO_READER).await, "log in");
    assert_eq!(up.count(), 0, "{:?}", up.received());

    // A harmless search through a granted query method passes.
    let fine = "/api/method/frappe.desk.search.search_widget?doctype=ToDo&txt=name&query=frappe.client.get_list";
    let reply = get(&gw.url(fine), TODO_READER).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn documents_are_judged_by_every_doctype_they_name() {
    let up = upstream().await;
    let gw = Gateway::start(&with_rules(
        &up,
        "ToDo: [read, create]",
        "[frappe.client.insert, frappe.client.insert_many]",
    ))
    .await;
    let insert = |doc: serde_json::Value| {
        format!(
            "/api/method/frappe.client.insert?doc={}",
            enc(&doc.to_string())
        )
    };
    let attacks = [
        (
            insert(json!({"doctype": "User", "email": "x@y.z"})),
            "create User",
        ),
        // The last `doctype` member is the one Python keeps.
        (
            format!(
                "/api/method/frappe.client.insert?doc={}",
                enc(r#"{"doctype": "ToDo", "doctype": "User"}"#)
            ),
            "create User",
        ),
        // A row appended to a parent saves the parent.
        (
            insert(json!({"doctype": "ToDo", "parenttype": "User", "parent": "a@b.c"})),
            "update User",
        ),
        // docstatus 1 submits on insert: an update.
        (
            insert(json!({"doctype": "ToDo", "docstatus": 1})),
            "update ToDo",
        ),
        (
            format!(
                "/api/method/frappe.client.insert_many?docs={}",
                enc(&json!([{"doctype": "ToDo"}, {"doctype": "User"}]).to_string())
            ),
            "create User",
        ),
        (
            "/api/method/frappe.client.insert?doc=not-json".into(),
            "doc",
        ),
    ];
    for (path, needle) in &attacks {
        assert_refused(&get(&gw.url(path), TODO_READER).await, needle);
    }
    assert_eq!(up.count(), 0, "{:?}", up.received());
    let reply = get(
        &gw.url(&insert(
            json!({"doctype": "ToDo", "description": "call back", "docstatus": 0}),
        )),
        TODO_READER,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["message"]["function"], "frappe.client.insert");
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn arguments_nobody_reviewed_are_refused_when_filled() {
    let up = upstream().await;
    let gw = Gateway::start(&with_rules(
        &up,
        "ToDo: [all]",
        "[frappe.desk.reportview.get, frappe.recorder.status, frappe.utils.print_format.download_pdf, \
         frappe.core.api.file.get_attached_images, frappe.client.get_list]",
    ))
    .await;
    let refused = [
        // reportview.get reads the whole form_dict: an argument its review does not cover.
        (
            "/api/method/frappe.desk.reportview.get?doctype=ToDo&x=1",
            "'x'",
        ),
        // A **kwargs function receives any argument.
        (
            "/api/method/frappe.recorder.status?anything=1",
            "'anything'",
        ),
        // Not reviewed: `name` has no kind it could be judged by.
        (
            "/api/method/frappe.utils.print_format.download_pdf?doctype=ToDo&name=t1",
            "'name'",
        ),
        // It reads the whole request itself (`frappe.form_dict`), so an argument outside its
        // signature reaches it too.
        (
            "/api/method/frappe.utils.print_format.download_pdf?doctype=ToDo&zzz=1",
            "'zzz'",
        ),
        // Not reviewed: `names` has no kind it could be judged by (`doctype` has one by its name:
        // every operation, which this client holds on ToDo).
        (
            "/api/method/frappe.core.api.file.get_attached_images?doctype=ToDo&names=t1",
            "'names'",
        ),
    ];
    for (path, needle) in refused {
        assert_refused(&get(&gw.url(path), TODO_READER).await, needle);
    }
    assert_eq!(up.count(), 0, "{:?}", up.received());
    // An argument the function does not take is dropped by `get_newargs`: no judgement needed.
    assert_none_refused(
        &gw,
        &[
            "/api/method/frappe.recorder.status",
            "/api/method/frappe.client.get_list?doctype=ToDo&not_a_parameter=1",
            "/api/method/frappe.core.api.file.get_attached_images?doctype=ToDo",
        ],
        TODO_READER,
    )
    .await;
}

#[tokio::test]
async fn an_apps_own_method_is_judged_by_the_kinds_its_rule_declares() {
    let up = upstream().await;
    let gw = Gateway::start(&with_rules(
        &up,
        "ToDo: [read, create]",
        "[{ name: test.echo, args: { doctype: \"doctype:read\", payload: \"doc:create\", note: text } }, \
         { name: test.big, judged_by_its_own_code: true }]",
    ))
    .await;
    let ok_path = format!(
        "/api/method/test.echo?doctype=ToDo&note=hi&payload={}",
        enc(r#"{"doctype": "ToDo"}"#)
    );
    let reply = get(&gw.url(&ok_path), TODO_READER).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let refused = [
        ("/api/method/test.echo?doctype=User".to_owned(), "read User"),
        (
            format!(
                "/api/method/test.echo?payload={}",
                enc(r#"{"doctype": "User"}"#)
            ),
            "create User",
        ),
        ("/api/method/test.echo?other=1".to_owned(), "'other'"),
    ];
    for (path, needle) in &refused {
        assert_refused(&get(&gw.url(path), TODO_READER).await, needle);
    }
    let reply = get(
        &gw.url("/api/method/test.big?size=100&anything=1"),
        TODO_READER,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(up.count(), 2);
}

#[test]
fn rules_that_cannot_say_what_they_grant_are_refused_at_load() {
    let up_url = "http://127.0.0.1:9";
    let config = |methods: &str| {
        format!(
            "sites:\n  erp:\n    backends: [{up_url}]\n    site_name: erp.example.com\n    service_accounts:\n      s: {{ api_key: k, api_secret: s }}\n\
             clients:\n  c:\n    key_id: abcdef0123456789\n    secret_sha256: \"{}\"\n    site: erp\n    service_account: s\n\
             \x20   allow:\n      methods: {methods}\n",
            sha256_hex("x")
        )
    };
    let refused = [
        ("[\"frappe.desk.*\"]", "catalog covers"),
        ("[\"erpnext.*\"]", "catalog covers"),
        ("[frappe.client.get_password]", "never allowed"),
        (
            "[frappe.desk.doctype.system_console.system_console.execute_code]",
            "never allowed",
        ),
        ("[frappe.handler.run_doc_method]", "never allowed"),
        ("[frappe.desk.treeview.get_all_nodes]", "never allowed"),
        ("[login]", "login"),
        ("[myapp.api.sync_orders]", "judged_by_its_own_code"),
        (
            "[frappe.client.no_such_function]",
            "not a whitelisted function",
        ),
        (
            "[{ name: frappe.client.get_list, judged_by_its_own_code: true }]",
            "in the capability catalog",
        ),
        (
            "[{ name: myapp.api.x, args: { a: sql } }]",
            "unknown argument kind",
        ),
        (
            "[{ name: myapp.api.x }]",
            "either args or judged_by_its_own_code",
        ),
    ];
    for (methods, needle) in refused {
        let yaml = config(methods);
        let error = match erpgate::config::Config::from_yaml(&yaml, "t") {
            Ok(_) => panic!("{methods} should be refused"),
            Err(e) => e.to_string(),
        };
        assert!(error.contains(needle), "{methods}: {error}");
    }
    for methods in [
        "[\"myapp.*\", frappe.client.get_list, frappe.email.inbox.set_value, ping]",
        "[{ name: myapp.api.x, args: { doctype: \"doctype:read\" } }, { name: myapp.api.y, judged_by_its_own_code: true }]",
    ] {
        let loaded = erpgate::config::Config::from_yaml(&config(methods), "t");
        assert!(loaded.is_ok(), "{methods}: {:?}", loaded.err().map(|e| e.to_string()));
    }
}

#[tokio::test]
async fn creating_a_document_that_submits_needs_update_too() {
    let up = upstream().await;
    let gw = Gateway::start(&with_rules(&up, "ToDo: [read, create]", "[]")).await;
    // `insert` submits a document whose docstatus is 1: an update of the doctype.
    for (path, body) in [
        (
            "/api/resource/ToDo",
            json!({"description": "x", "docstatus": 1}),
        ),
        (
            "/api/v2/document/ToDo",
            json!({"description": "x", "docstatus": "1"}),
        ),
        (
            "/api/resource/ToDo",
            json!({"data": json!({"description": "x", "docstatus": 1}).to_string()}),
        ),
    ] {
        let reply = send_json(Method::POST, &gw.url(path), TODO_READER, &body.to_string()).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{path} {body}: {}",
            reply.text()
        );
        assert!(reply.text().contains("update ToDo"), "{}", reply.text());
    }
    assert_eq!(up.count(), 0, "{:?}", up.received());
    let draft = json!({"description": "x", "docstatus": 0}).to_string();
    let reply = send_json(
        Method::POST,
        &gw.url("/api/resource/ToDo"),
        TODO_READER,
        &draft,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn a_doctype_method_route_is_the_controller_modules_function() {
    let up = upstream().await;
    // `/api/v2/method/<doctype>/<attr>` runs `<controller module>.<attr>` (`api/v2.py`
    // `handle_rpc_call`): a function, judged as one, not a document method.
    let gw = Gateway::start(&with_rules(
        &up,
        "\"*\": [doc_method], Sales Order: [read], Sales Invoice: [create]",
        "[erpnext.selling.doctype.sales_order.sales_order.make_sales_invoice]",
    ))
    .await;
    for path in [
        "/api/v2/method/User/generate_keys?user=Administrator",
        "/api/v2/method/System%20Console/execute_code",
        "/api/v2/method/Sales%20Order/make_purchase_order_for_default_supplier?source_name=SO-1",
        "/api/v2/method/ToDo/no_such_function",
    ] {
        let reply = get(&gw.url(path), TODO_READER).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{path}: {}",
            reply.text()
        );
        assert!(
            reply.text().contains("not allowed to call"),
            "{}",
            reply.text()
        );
    }
    assert_eq!(up.count(), 0, "{:?}", up.received());
    let reply = get(
        &gw.url("/api/v2/method/Sales%20Order/make_sales_invoice?source_name=SO-1"),
        TODO_READER,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.json()["data"]["function"],
        "erpnext.selling.doctype.sales_order.sales_order.make_sales_invoice"
    );
}

#[tokio::test]
async fn a_written_document_is_judged_for_the_parent_and_doctype_it_names() {
    let up = upstream().await;
    let gw = Gateway::start(&with_rules(
        &up,
        "ToDo: [read, create, update], Has Role: [create]",
        "[]",
    ))
    .await;
    // A row of a child table created on its own is appended to the parent it names, which
    // Frappe saves (`has_child_permission`): an update of User.
    let row = json!({"parenttype": "User", "parent": "victim@x", "parentfield": "roles", "role": "System Manager"});
    let attacks = [
        (
            Method::POST,
            "/api/v2/document/Has%20Role",
            row.to_string(),
            "update User",
        ),
        (
            Method::POST,
            "/api/resource/Has%20Role",
            row.to_string(),
            "update User",
        ),
        (
            Method::PUT,
            "/api/resource/ToDo/t1",
            json!({"parenttype": "User"}).to_string(),
            "update User",
        ),
        (
            Method::POST,
            "/api/resource/ToDo",
            json!({"doctype": "User", "email": "x@y.z"}).to_string(),
            "create User",
        ),
    ];
    for (method, path, body, needle) in attacks {
        let reply = send_json(method, &gw.url(path), TODO_READER, &body).await;
        assert_refused(&reply, needle);
    }
    // A body erpgate does not read is read by Frappe's v1 `get_request_form_data` anyway.
    let reply = send(
        Method::POST,
        &gw.url("/api/resource/ToDo"),
        &[
            ("authorization", &token(TODO_READER)),
            ("content-type", "text/plain"),
        ],
        json!({"description": "x", "docstatus": 1}).to_string(),
    )
    .await;
    assert_refused(&reply, "must come as JSON");
    assert_eq!(up.count(), 0, "{:?}", up.received());
    // Rows of table fields name their table's doctype whatever they say (`_init_child`).
    let with_rows = json!({"description": "x", "roles": [{"doctype": "Has Role", "role": "x"}]});
    let reply = send_json(
        Method::POST,
        &gw.url("/api/resource/ToDo"),
        TODO_READER,
        &with_rows.to_string(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test]
async fn what_a_route_or_a_default_runs_is_judged_too() {
    let up = upstream().await;
    let gw = Gateway::start(&with_rules(
        &up,
        "ToDo: [read], Address: [read], Contact: [read], Price List: [read], \
         POS Profile: [read], Tax Rule: [read], Company: [read]",
        "[erpnext.accounts.party.get_party_details, \"myapp.*\", \
         { name: other.api.insert, judged_by_its_own_code: true }]",
    ))
    .await;
    let refused = [
        // `/api/v2/doctype/<dt>/count` is reportview.get_count over the whole request.
        ("/api/v2/doctype/ToDo/count?debug=1", "debug"),
        // `party_type` defaults to Customer: the default is what Frappe reads.
        (
            "/api/method/erpnext.accounts.party.get_party_details?party=C-1",
            "read Customer",
        ),
        // An app module may import a catalogued function under its own name.
        (
            "/api/method/myapp.api.get_list?doctype=User",
            "frappe.client.get_list",
        ),
        ("/api/method/other.api.insert", "frappe.client.insert"),
    ];
    for (path, needle) in refused {
        let reply = get(&gw.url(path), TODO_READER).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{path}: {}",
            reply.text()
        );
        assert!(reply.text().contains(needle), "{path}: {}", reply.text());
    }
    assert_eq!(up.count(), 0, "{:?}", up.received());
    assert_none_refused(
        &gw,
        &[
            "/api/v2/doctype/ToDo/count",
            "/api/method/myapp.api.sync_orders_now",
        ],
        TODO_READER,
    )
    .await;
}

#[tokio::test]
async fn a_functions_argument_is_judged_in_every_carrier_and_under_every_name() {
    let up = upstream().await;
    let gw = Gateway::start(&with_rules(
        &up,
        "ToDo: [read, create], Has Role: [create]",
        "[frappe.desk.reportview.get, frappe.client.insert]",
    ))
    .await;
    let auth = token(TODO_READER);
    let pluck = enc(SUBQUERY);
    let multipart = |path: &str, fields: &[(&str, &str)]| {
        let mut body = String::from(
            "--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\nx\r\n",
        );
        for (name, value) in fields {
            body += &format!(
                "--b\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            );
        }
        (path.to_owned(), body + "--b--\r\n")
    };
    let form = (
        "application/x-www-form-urlencoded",
        "/api/method/frappe.desk.reportview.get".to_owned(),
        format!("doctype=ToDo&pluck={pluck}"),
    );
    // `cmd` off /api/ is the call; in a body on any path it is a call too.
    let cmd_form = (
        "application/x-www-form-urlencoded",
        "/".to_owned(),
        format!("cmd=frappe.desk.reportview.get&doctype=ToDo&pluck={pluck}"),
    );
    let (late_path, late_body) = multipart(
        "/api/method/frappe.desk.reportview.get",
        &[("doctype", "ToDo"), ("pluck", SUBQUERY)],
    );
    let late = ("multipart/form-data; boundary=b", late_path, late_body);
    // A `cmd` in a multipart field after the file part, on a path the client may use: the
    // document it inserts is judged when the body completes (a row saving a User).
    let row = r#"{"doctype": "Has Role", "parenttype": "User", "parent": "a@b.c", "role": "System Manager"}"#;
    let (cmd_late_path, cmd_late_body) = multipart(
        "/api/resource/ToDo",
        &[("cmd", "frappe.client.insert"), ("doc", row)],
    );
    let cmd_late = (
        "multipart/form-data; boundary=b",
        cmd_late_path,
        cmd_late_body,
    );
    for (content_type, path, body) in [form, cmd_form, late, cmd_late] {
        let reply = send(
            Method::POST,
            &gw.url(&path),
            &[("authorization", &auth), ("content-type", content_type)],
            body.clone(),
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{path} {body}: {}",
            reply.text()
        );
        assert!(
            reply.text().contains("pluck") || reply.text().contains("update User"),
            "{path}: {}",
            reply.text()
        );
    }
    // Nothing complete reached the site (a multipart body refused late is cut before its end).
    assert!(
        up.received()
            .iter()
            .all(|r| !r.body.as_deref().is_some_and(|b| b.ends_with(b"--\r\n"))),
        "{:?}",
        up.received()
    );
}
