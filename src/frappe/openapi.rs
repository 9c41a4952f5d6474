//! A client's OpenAPI 3.1 document: what its rules let it call, described with the site's own
//! metadata. Only granted operations appear; a doctype is described only when its metadata
//! could be read (as the client's account), so a document never names a doctype the client
//! may not read.

use serde_json::{json, Map, Value};

use super::catalog::{ArgKind, Function, Reach};
use super::classify::Operation;
use super::meta::{self, DocTypeMeta};

/// One granted doctype: its metadata (read as the client's account) and the operations the
/// rules grant on it.
#[derive(Debug)]
pub struct GrantedDoctype<'a> {
    pub meta: &'a DocTypeMeta,
    pub operations: Vec<Operation>,
}

/// What a document is built from.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// The client's name (in the title).
    pub client: &'a str,
    /// Granted doctypes, in the order to describe them.
    pub doctypes: Vec<GrantedDoctype<'a>>,
    /// Child doctypes' metadata, for Table fields.
    pub children: Vec<&'a DocTypeMeta>,
    /// Catalogued functions granted.
    pub functions: Vec<&'a Function>,
    /// Methods outside the catalog: with their declared arguments, or `None` (left to their
    /// own code).
    pub app_methods: Vec<super::acl::AppMethod<'a>>,
    /// The public URL integrators reach erpgate at, if configured.
    pub public_url: Option<&'a str>,
}

/// A component name for `doctype` (OpenAPI allows `[A-Za-z0-9._-]` only).
pub fn component_name(doctype: &str) -> String {
    doctype
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn path_segment(doctype: &str) -> String {
    percent_encoding::utf8_percent_encode(doctype, percent_encoding::NON_ALPHANUMERIC).to_string()
}

const LIST_GRAMMAR: &str = "erpgate judges these arguments for restricted clients and refuses \
    anything outside this grammar with 403: `fields` is a JSON list of `*`, column names \
    (`name`, `` `name` ``, `` `tabDoctype`.`name` ``), `count|sum|avg|min|max(column)` and \
    `count(*)`, each optionally `as alias`; `order_by` is `column [asc|desc]`, comma-separated; \
    `filters` and `or_filters` are JSON, `{\"field\": value}`, `{\"field\": [op, value]}` or \
    `[[field, op, value], [doctype, field, op, value]]` with Frappe's operators and scalar \
    values. A column of a linked doctype (`link.field`) and a doctype the client cannot read \
    are refused.";

fn list_parameters(v2: bool) -> Value {
    let json_text = |d: &str| json!({"type": "string", "description": d});
    let mut params = vec![
        json!({"name": "fields", "in": "query", "schema": json_text("JSON list of fields, e.g. [\"name\",\"status\"]."), "description": LIST_GRAMMAR}),
        json!({"name": "filters", "in": "query", "schema": json_text("JSON filters, e.g. {\"status\":\"Open\"}.")}),
        json!({"name": "or_filters", "in": "query", "schema": json_text("JSON filters, any of which matches.")}),
        json!({"name": "order_by", "in": "query", "schema": json_text("e.g. `modified desc`.")}),
        json!({"name": "limit_start", "in": "query", "schema": {"type": "integer", "minimum": 0}}),
        json!({"name": "limit_page_length", "in": "query", "schema": {"type": "integer", "minimum": 0}, "description": "0 for all rows; Frappe's default is 20."}),
    ];
    if v2 {
        params[4] =
            json!({"name": "start", "in": "query", "schema": {"type": "integer", "minimum": 0}});
        params[5] = json!({"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 0}, "description": "Frappe's default is 20."});
    } else {
        params.push(json!({"name": "as_dict", "in": "query", "schema": {"type": "integer", "enum": [0, 1]}, "description": "1 (the default): rows as objects; 0: rows as lists."}));
    }
    Value::Array(params)
}

/// The answers every operation may get besides its own 200.
fn common_responses(mut ok: Map<String, Value>) -> Value {
    let error = |d: &str| {
        json!({"description": d, "headers": {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}},
               "content": {"application/json": {"schema": schema_ref("Error")}}})
    };
    ok.insert(
        "400".into(),
        error("A request erpgate or Frappe could not read."),
    );
    ok.insert("401".into(), error("No or a wrong credential."));
    ok.insert(
        "403".into(),
        error("Not permitted (by erpgate's rules or Frappe's)."),
    );
    ok.insert("404".into(), error("No such document."));
    ok.insert(
        "417".into(),
        error("Frappe refused the request (ValidationError and the like)."),
    );
    ok.insert(
        "429".into(),
        json!({"description": "A quota is exhausted.", "headers": {
            "Retry-After": {"$ref": "#/components/headers/Retry-After"},
            "X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}},
            "content": {"application/json": {"schema": schema_ref("Error")}}}),
    );
    ok.insert(
        "default".into(),
        error("Any other error, in Frappe's envelope."),
    );
    Value::Object(ok)
}

fn ok_response(description: &str, schema: Value) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(
        "200".into(),
        json!({"description": description, "headers": {
            "RateLimit": {"$ref": "#/components/headers/RateLimit"},
            "X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}},
            "content": {"application/json": {"schema": schema}}}),
    );
    m
}

fn envelope(key: &str, inner: Value) -> Value {
    json!({"type": "object", "properties": {key: inner}, "required": [key]})
}

fn operation(id: String, tag: &str, summary: String, responses: Value) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("operationId".into(), json!(id));
    m.insert("tags".into(), json!([tag]));
    m.insert("summary".into(), json!(summary));
    m.insert(
        "parameters".into(),
        json!([{"$ref": "#/components/parameters/X-Request-Id"}]),
    );
    m.insert("responses".into(), responses);
    m
}

fn with_body(mut op: Map<String, Value>, schema: Value, idempotent: bool) -> Map<String, Value> {
    op.insert(
        "requestBody".into(),
        json!({"required": true, "content": {"application/json": {"schema": schema}}}),
    );
    if idempotent {
        if let Some(Value::Array(p)) = op.get_mut("parameters") {
            p.push(json!({"$ref": "#/components/parameters/Idempotency-Key"}));
        }
    }
    op
}

fn with_params(mut op: Map<String, Value>, extra: &Value) -> Map<String, Value> {
    if let (Some(Value::Array(p)), Value::Array(extra)) = (op.get_mut("parameters"), extra) {
        p.extend(extra.iter().cloned());
    }
    op
}

const NAME_PARAM: &str = "#/components/parameters/DocumentName";

/// Builds the document.
pub fn document(inputs: &Inputs<'_>) -> Value {
    let mut schemas = Map::new();
    schemas.insert("StandardFields".into(), meta::standard_fields_schema());
    schemas.insert("Error".into(), error_schema());
    let child_ref = |doctype: &str| {
        inputs
            .children
            .iter()
            .chain(inputs.doctypes.iter().map(|d| &d.meta))
            .any(|m| m.name == doctype)
            .then(|| schema_ref(&component_name(doctype)))
    };
    let write_child_ref = |doctype: &str| {
        child_ref(doctype).map(|_| schema_ref(&format!("{}_write", component_name(doctype))))
    };
    let mut described: Vec<&DocTypeMeta> = inputs.doctypes.iter().map(|d| d.meta).collect();
    described.extend(inputs.children.iter().copied());
    for m in &described {
        let name = component_name(&m.name);
        if schemas.contains_key(&name) {
            continue;
        }
        let mut read_props = meta::read_properties(m, child_ref);
        if m.is_table {
            for parent in ["parent", "parentfield", "parenttype"] {
                read_props.insert(parent.into(), json!({"type": ["string", "null"]}));
            }
        }
        schemas.insert(
            name.clone(),
            json!({"allOf": [schema_ref("StandardFields"), {"type": "object", "properties": read_props}],
                   "description": format!("A {} document as Frappe answers it (a list row holds only the fields asked for).", m.name)}),
        );
        let (write_props, required) = meta::write_properties(m, write_child_ref);
        schemas.insert(
            format!("{name}_write"),
            json!({"type": "object", "properties": write_props,
                   "description": format!("Fields of {} a client may set.", m.name)}),
        );
        schemas.insert(
            format!("{name}_create"),
            json!({"allOf": [schema_ref(&format!("{name}_write"))], "required": required}),
        );
    }

    let mut paths = Map::new();
    let mut tags = Vec::new();
    for granted in &inputs.doctypes {
        let m = granted.meta;
        let dt = &m.name;
        let comp = component_name(dt);
        let seg = path_segment(dt);
        tags.push(json!({"name": dt}));
        let may = |op: Operation| granted.operations.contains(&op);
        let doc = schema_ref(&comp);
        let mut v1_coll = Map::new();
        let mut v1_doc = Map::new();
        let mut v2_coll = Map::new();
        let mut v2_doc = Map::new();
        if may(Operation::Read) {
            let list1 = ok_response(
                &format!("{dt} rows"),
                envelope(
                    "data",
                    json!({"type": "array", "items": {"anyOf": [doc, {"type": "array"}]}}),
                ),
            );
            v1_coll.insert(
                "get".into(),
                Value::Object(with_params(
                    operation(
                        format!("list_{comp}"),
                        dt,
                        format!("List {dt}"),
                        common_responses(list1),
                    ),
                    &list_parameters(false),
                )),
            );
            let mut list2_schema = envelope("data", json!({"type": "array", "items": doc}));
            list2_schema["properties"]["has_next_page"] = json!({"type": "boolean"});
            v2_coll.insert(
                "get".into(),
                Value::Object(with_params(
                    operation(
                        format!("list_{comp}_v2"),
                        dt,
                        format!("List {dt} (v2)"),
                        common_responses(ok_response(&format!("{dt} rows"), list2_schema)),
                    ),
                    &list_parameters(true),
                )),
            );
            let one = || ok_response(&format!("One {dt}"), envelope("data", doc.clone()));
            v1_doc.insert(
                "get".into(),
                Value::Object(operation(
                    format!("get_{comp}"),
                    dt,
                    format!("Get one {dt}"),
                    common_responses(one()),
                )),
            );
            v2_doc.insert(
                "get".into(),
                Value::Object(operation(
                    format!("get_{comp}_v2"),
                    dt,
                    format!("Get one {dt} (v2)"),
                    common_responses(one()),
                )),
            );
            let count = ok_response(
                &format!("How many {dt} match"),
                envelope("data", json!({"type": "integer", "minimum": 0})),
            );
            let filters = json!([
                {"name": "filters", "in": "query", "schema": {"type": "string"}, "description": LIST_GRAMMAR},
            ]);
            let mut count_path = Map::new();
            count_path.insert(
                "get".into(),
                Value::Object(with_params(
                    operation(
                        format!("count_{comp}_v2"),
                        dt,
                        format!("Count {dt} (v2)"),
                        common_responses(count),
                    ),
                    &filters,
                )),
            );
            paths.insert(
                format!("/api/v2/doctype/{seg}/count"),
                Value::Object(count_path),
            );
        }
        if may(Operation::Create) {
            let created = || ok_response(&format!("The new {dt}"), envelope("data", doc.clone()));
            let body = schema_ref(&format!("{comp}_create"));
            v1_coll.insert(
                "post".into(),
                Value::Object(with_body(
                    operation(
                        format!("create_{comp}"),
                        dt,
                        format!("Create a {dt}"),
                        common_responses(created()),
                    ),
                    body.clone(),
                    true,
                )),
            );
            v2_coll.insert(
                "post".into(),
                Value::Object(with_body(
                    operation(
                        format!("create_{comp}_v2"),
                        dt,
                        format!("Create a {dt} (v2)"),
                        common_responses(created()),
                    ),
                    body,
                    true,
                )),
            );
        }
        if may(Operation::Update) {
            let saved = || ok_response(&format!("The saved {dt}"), envelope("data", doc.clone()));
            let body = schema_ref(&format!("{comp}_write"));
            v1_doc.insert(
                "put".into(),
                Value::Object(with_body(
                    operation(
                        format!("update_{comp}"),
                        dt,
                        format!("Update a {dt}"),
                        common_responses(saved()),
                    ),
                    body.clone(),
                    true,
                )),
            );
            v2_doc.insert(
                "patch".into(),
                Value::Object(with_body(
                    operation(
                        format!("update_{comp}_v2"),
                        dt,
                        format!("Update a {dt} (v2)"),
                        common_responses(saved()),
                    ),
                    body,
                    true,
                )),
            );
        }
        if may(Operation::Delete) {
            let v1 = ok_response("Deleted", envelope("message", json!({"type": "string"})));
            let v2 = ok_response("Deleted", envelope("data", json!({"type": "string"})));
            v1_doc.insert(
                "delete".into(),
                Value::Object(operation(
                    format!("delete_{comp}"),
                    dt,
                    format!("Delete a {dt}"),
                    common_responses(v1),
                )),
            );
            v2_doc.insert(
                "delete".into(),
                Value::Object(operation(
                    format!("delete_{comp}_v2"),
                    dt,
                    format!("Delete a {dt} (v2)"),
                    common_responses(v2),
                )),
            );
        }
        if may(Operation::DocMethod) {
            // A whitelisted method of the document's class (`run_method`); submit and cancel
            // are two of them on a submittable doctype.
            let mut choices = json!({"type": "string", "description": "A whitelisted method of the document's controller."});
            if m.is_submittable {
                choices["examples"] = json!(["submit", "cancel"]);
            }
            let ran = ok_response("What the method returned", envelope("data", json!({})));
            let mut run = Map::new();
            run.insert(
                "post".into(),
                Value::Object(with_params(
                    operation(format!("run_method_{comp}_v2"), dt, format!("Run a method of a {dt} (v2){}", if m.is_submittable { "; submit and cancel included" } else { "" }), common_responses(ran)),
                    &json!([{"$ref": NAME_PARAM}, {"name": "method", "in": "path", "required": true, "schema": choices}]),
                )),
            );
            paths.insert(
                format!("/api/v2/document/{seg}/{{name}}/method/{{method}}"),
                Value::Object(run),
            );
            // v1: `POST /api/resource/<doctype>/<name>?run_method=<method>` (`api/v1.py`
            // `execute_doc_method`).
            let ran = ok_response("What the method returned", envelope("message", json!({})));
            v1_doc.insert(
                "post".into(),
                Value::Object(with_params(
                    operation(format!("run_method_{comp}"), dt, format!("Run a method of a {dt}"), common_responses(ran)),
                    &json!([{"name": "run_method", "in": "query", "required": true, "schema": choices}]),
                )),
            );
        }
        let doc_params = json!([{"$ref": NAME_PARAM}]);
        let mut insert = |path: String, mut ops: Map<String, Value>, with_name: bool| {
            if ops.is_empty() {
                return;
            }
            if with_name {
                ops.insert("parameters".into(), doc_params.clone());
            }
            paths.insert(path, Value::Object(ops));
        };
        insert(format!("/api/resource/{seg}"), v1_coll, false);
        insert(format!("/api/resource/{seg}/{{name}}"), v1_doc, true);
        insert(format!("/api/v2/document/{seg}"), v2_coll, false);
        insert(format!("/api/v2/document/{seg}/{{name}}"), v2_doc, true);
    }
    for function in &inputs.functions {
        let (tag, name) = ("Methods", &function.name);
        // Each parameter as the capability catalog says erpgate judges it: a doctype argument
        // offers only the doctypes the client may use that way, an argument a restricted client
        // may never fill is left out, and a function needing one is left out altogether.
        let mut properties = Map::new();
        let mut required = Vec::new();
        let mut query = Vec::new();
        let mut callable = true;
        for p in &function.params {
            let mut inferred = None;
            let kind = match function.reach(&p.name, &mut inferred) {
                Reach::Passed(kind) => Some(kind),
                Reach::Unjudged => None,
                Reach::Dropped => Some(&ArgKind::Scalar),
            };
            let Some(mut schema) = kind.and_then(|k| kind_schema(k, &inputs.doctypes)) else {
                callable &= !p.required;
                continue;
            };
            if let Some(a) = &p.annotation {
                if schema.get("description").is_none() {
                    schema["description"] = json!(format!("Python annotation: {a}"));
                }
            }
            if p.required {
                required.push(p.name.clone());
            }
            query.push(
                json!({"name": p.name, "in": "query", "required": p.required, "schema": schema}),
            );
            properties.insert(p.name.clone(), schema);
        }
        if !callable {
            continue;
        }
        if !tags.iter().any(|t| t["name"] == tag) {
            tags.push(json!({"name": tag}));
        }
        let body = json!({"type": "object", "properties": properties, "required": required});
        for (prefix, key, suffix) in [
            ("/api/method/", "message", ""),
            ("/api/v2/method/", "data", "_v2"),
        ] {
            let mut ops = Map::new();
            // GET and POST, the two every client library sends a whitelisted method with (a
            // function that admits PUT or DELETE too runs the same either way).
            for verb in function
                .methods
                .iter()
                .filter(|m| m.eq_ignore_ascii_case("GET") || m.eq_ignore_ascii_case("POST"))
            {
                let verb = verb.to_ascii_lowercase();
                let id = format!("{}{suffix}_{verb}", component_name(name));
                let ok = ok_response(&format!("What {name} returned"), envelope(key, json!({})));
                let op = operation(id, tag, format!("Call {name}"), common_responses(ok));
                let op = match verb.as_str() {
                    "get" => with_params(op, &Value::Array(query.clone())),
                    _ => with_body(op, body.clone(), true),
                };
                ops.insert(verb, Value::Object(op));
            }
            if !ops.is_empty() {
                paths.insert(format!("{prefix}{name}"), Value::Object(ops));
            }
        }
    }
    // Methods outside the catalog: with their declared arguments, or (left to their own
    // code) with whatever the caller sends.
    for (name, args) in &inputs.app_methods {
        let mut properties = Map::new();
        let mut query = Vec::new();
        for (arg, kind) in args.iter().flat_map(|a| a.iter()) {
            if let Some(schema) = kind_schema(kind, &inputs.doctypes) {
                query.push(json!({"name": arg, "in": "query", "schema": schema}));
                properties.insert(arg.clone(), schema);
            }
        }
        let body = match args {
            Some(_) => json!({"type": "object", "properties": properties}),
            None => json!({"type": "object", "description": "Judged by the method's own code."}),
        };
        if !tags.iter().any(|t| t["name"] == "Methods") {
            tags.push(json!({"name": "Methods"}));
        }
        for (prefix, key, suffix) in [
            ("/api/method/", "message", ""),
            ("/api/v2/method/", "data", "_v2"),
        ] {
            let ok = || ok_response(&format!("What {name} returned"), envelope(key, json!({})));
            let id = |verb: &str| format!("{}{suffix}_{verb}", component_name(name));
            let mut ops = Map::new();
            let get = operation(
                id("get"),
                "Methods",
                format!("Call {name}"),
                common_responses(ok()),
            );
            ops.insert(
                "get".into(),
                Value::Object(with_params(get, &Value::Array(query.clone()))),
            );
            let post = operation(
                id("post"),
                "Methods",
                format!("Call {name}"),
                common_responses(ok()),
            );
            ops.insert(
                "post".into(),
                Value::Object(with_body(post, body.clone(), true)),
            );
            paths.insert(format!("{prefix}{name}"), Value::Object(ops));
        }
    }
    // A Link to a doctype the client may not read is described without its target's name:
    // the document names no doctype the client cannot read.
    let nameable: Vec<String> = described
        .iter()
        .map(|m| m.name.to_lowercase())
        .filter(|name| {
            inputs
                .children
                .iter()
                .any(|c| c.name.to_lowercase() == *name)
                || inputs.doctypes.iter().any(|d| {
                    d.meta.name.to_lowercase() == *name && d.operations.contains(&Operation::Read)
                })
        })
        .collect();
    for schema in schemas.values_mut() {
        hide_unreadable_links(schema, &nameable);
    }
    let servers = match inputs.public_url {
        Some(url) => json!([{"url": url.trim_end_matches('/')}]),
        None => json!([{"url": "/"}]),
    };
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": format!("erpgate: {}", inputs.client),
            "version": "1",
            "description": "What this client may call through erpgate, described from the site's own \
                DocType metadata. Requests outside it are refused with 403.",
        },
        "servers": servers,
        "security": [{"token": []}, {"basic": []}, {"bearer": []}],
        "tags": tags,
        "paths": paths,
        "components": {
            "schemas": schemas,
            "parameters": {
                "DocumentName": {"name": "name", "in": "path", "required": true, "schema": {"type": "string"}},
                "X-Request-Id": {"name": "X-Request-Id", "in": "header", "required": false, "schema": {"type": "string"},
                    "description": "Carried to the site and into every log line; erpgate makes one when absent."},
                "Idempotency-Key": {"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "maxLength": 255},
                    "description": "A write repeated with the same key gets the first answer again, without reaching the site."},
            },
            "headers": {
                "RateLimit": {"schema": {"type": "string"}, "description": "The quota left (draft-ietf-httpapi-ratelimit-headers), with RateLimit-Policy."},
                "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait before retrying."},
                "X-Request-Id": {"schema": {"type": "string"}, "description": "The request's id."},
            },
            "securitySchemes": {
                "token": {"type": "apiKey", "in": "header", "name": "Authorization",
                    "description": "`Authorization: token <key_id>:<secret>`, Frappe's own form."},
                "basic": {"type": "http", "scheme": "basic", "description": "The key id and secret as Basic credentials."},
                "bearer": {"type": "http", "scheme": "bearer",
                    "description": "`Bearer <key_id>:<secret>`, or an OAuth app's user access token issued by the site."},
            },
        },
    })
}

/// An argument's schema as erpgate judges its kind; `None`: a restricted client may not fill
/// it (refused, unreviewed, or a doctype argument no granted doctype satisfies).
fn kind_schema(kind: &ArgKind, doctypes: &[GrantedDoctype<'_>]) -> Option<Value> {
    match kind {
        ArgKind::Refused(_) | ArgKind::Unreviewed => None,
        ArgKind::Doctype(needed) => {
            let names: Vec<&str> = doctypes
                .iter()
                .filter(|d| needed.iter().all(|op| d.operations.contains(op)))
                .map(|d| d.meta.name.as_str())
                .collect();
            (!names.is_empty()).then(|| json!({"type": "string", "enum": names}))
        }
        ArgKind::Fields | ArgKind::Filters | ArgKind::OrderBy | ArgKind::GroupBy => {
            Some(json!({"type": "string", "description": LIST_GRAMMAR}))
        }
        _ => Some(json!({"type": "string"})),
    }
}

fn hide_unreadable_links(value: &mut Value, nameable: &[String]) {
    match value {
        Value::Object(map) => {
            let hidden = map
                .get("x-frappe-link")
                .and_then(Value::as_str)
                .is_some_and(|target| !nameable.contains(&target.to_lowercase()));
            if hidden {
                map.remove("x-frappe-link");
                map.insert(
                    "description".into(),
                    json!("The name of a document of a doctype this client cannot read."),
                );
            }
            for v in map.values_mut() {
                hide_unreadable_links(v, nameable);
            }
        }
        Value::Array(items) => {
            for v in items {
                hide_unreadable_links(v, nameable);
            }
        }
        _ => {}
    }
}

/// Frappe's error envelopes: v1 (`exc_type`, `exception`, `_server_messages`) and v2
/// (`errors`).
fn error_schema() -> Value {
    json!({
        "type": "object",
        "description": "Frappe's error envelope (v1 or v2); erpgate's own refusals use the same shape.",
        "properties": {
            "exc_type": {"type": "string", "description": "The exception class, e.g. PermissionError."},
            "exception": {"type": "string"},
            "exc": {"type": "string", "description": "A traceback, only when the site exposes them."},
            "_server_messages": {"type": "string", "description": "A JSON list of JSON messages."},
            "message": {},
            "errors": {"type": "array", "items": {"type": "object", "properties": {
                "type": {"type": "string"}, "message": {"type": "string"}, "exception": {"type": "string"}}}},
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, submittable: bool) -> DocTypeMeta {
        let body = json!({"data": {"name": name, "is_submittable": submittable as u8, "fields": [
            {"fieldname": "customer", "fieldtype": "Link", "options": "Customer"},
            {"fieldname": "company", "fieldtype": "Link", "options": "Company"},
        ]}});
        DocTypeMeta::parse(body.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn doc_methods_and_links_follow_the_rules() {
        let order = meta("Sales Order", true);
        let customer = meta("Customer", false);
        let doc = document(&Inputs {
            client: "c",
            doctypes: vec![
                GrantedDoctype {
                    meta: &order,
                    operations: vec![Operation::DocMethod],
                },
                GrantedDoctype {
                    meta: &customer,
                    operations: vec![Operation::Read],
                },
            ],
            children: vec![],
            functions: vec![],
            app_methods: vec![],
            public_url: None,
        });
        let paths = doc["paths"].as_object().unwrap();
        let run = &paths["/api/v2/document/Sales%20Order/{name}/method/{method}"]["post"];
        assert!(run["summary"]
            .as_str()
            .unwrap()
            .contains("submit and cancel"));
        let v1 = paths["/api/resource/Sales%20Order/{name}"]
            .as_object()
            .unwrap();
        assert_eq!(v1["post"]["parameters"][1]["name"], "run_method");
        // DocMethod alone grants no read or write of Sales Order.
        assert!(!paths.contains_key("/api/resource/Sales%20Order"));
        assert_eq!(
            v1.keys().collect::<Vec<_>>(),
            vec!["post", "parameters"],
            "only the method call"
        );
        // A Link to a readable doctype names it; one to a doctype not granted does not.
        let props = &doc["components"]["schemas"]["Sales_Order"]["allOf"][1]["properties"];
        assert_eq!(props["customer"]["x-frappe-link"], "Customer");
        assert!(props["company"].get("x-frappe-link").is_none());
        assert!(!doc.to_string().contains("Company"));
    }
}
