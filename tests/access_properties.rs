//! Property tests of the access rules, through the whole stack in process (thousands of cases,
//! so no sockets), with an upstream that records the request exactly as it would be sent.
//!
//! Requests are generated from path spellings, verbs, content types and `cmd` / `sid` /
//! `run_method` keys in every carrier (query, JSON, urlencoded, multipart before and after a
//! file). For each request that reaches the upstream, this file derives what Frappe would act on
//! *from the forwarded bytes*, with its own small model of werkzeug and Frappe (mimetype before
//! `;` lower-cased; JSON body alone when non-empty and JSON, else query overlaid with the form;
//! multipart split wherever werkzeug splits: `\r\n`, `\n` or `\r` before `--boundary`; the
//! function a name reaches by `get_attr`, any alias, and the arguments `get_newargs` passes it,
//! from the catalog's facts), and checks that the restricted client's rules cover it. Requests carrying nothing dangerous must
//! pass. No input may panic the gateway.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use tower::ServiceExt;

use erpgate::config::Config;
use erpgate::forwarding::PeerAddr;
use erpgate::metrics::Metrics;
use erpgate::stack::{build_with, GatewayService};
use erpgate::{full_body, Body, BoxError};

const SECRET: &str = "property-client-secret";
const BOUNDARY: &str = "PropBoundary42";
/// A method the client may call, and one it may not.
const ALLOWED: &str = "frappe.client.get_list";
const FORBIDDEN: &str = "frappe.client.insert";

/// What the upstream received: method, path and query, body.
/// What reached the upstream: method, target, the Content-Type erpgate sent, body.
type Seen = Arc<Mutex<Vec<(Method, String, Option<String>, Bytes)>>>;

fn gateway(seen: Seen) -> GatewayService {
    let hash = hex::encode(Sha256::digest(SECRET.as_bytes()));
    let yaml = format!(
        r#"
listen: 127.0.0.1:0
log: {{ level: error }}
rate_limit: null
sites:
  erp:
    backends: [http://127.0.0.1:9]
    site_name: erp.localhost
    service_accounts:
      sync: {{ api_key: key, api_secret: secret }}
clients:
  reader:
    key_id: ek_reader
    secret_sha256: "{hash}"
    site: erp
    service_account: sync
    allow:
      resources: {{ ToDo: [read] }}
      methods: [{ALLOWED}]
"#
    );
    let loaded = Config::from_yaml(&yaml, "properties").unwrap();
    let upstream =
        tower::util::BoxCloneSyncService::new(tower::service_fn(move |request: Request<Body>| {
            let seen = seen.clone();
            async move {
                let (parts, body) = request.into_parts();
                let body = body.collect().await?.to_bytes();
                let target = parts.uri.path_and_query().unwrap().to_string();
                let content_type = parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .map(|v| v.to_str().unwrap().to_owned());
                seen.lock()
                    .unwrap()
                    .push((parts.method, target, content_type, body));
                Ok::<_, BoxError>(Response::new(full_body(r#"{"data":[]}"#)))
            }
        }));
    build_with(&loaded, &Metrics::new().unwrap(), None, upstream)
        .unwrap()
        .service
}

// === what Frappe would do with the forwarded bytes (the test's own model) ===

/// `form_dict` as (key, value) pairs, as Frappe's `make_form_dict` builds it.
fn frappe_form_dict(query: &str, content_type: Option<&str>, body: &[u8]) -> Vec<(String, String)> {
    let (mime, options) = support::werkzeug::parse_options_header(content_type.unwrap_or_default());
    let mime = mime.to_lowercase();
    let is_json =
        mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"));
    if !body.is_empty() && is_json {
        let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        return value
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().map_or(v.to_string(), str::to_owned)))
                    .collect()
            })
            .unwrap_or_default();
    }
    let mut pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    if mime == "application/x-www-form-urlencoded" || mime == "application/x-url-encoded" {
        pairs.extend(form_urlencoded::parse(body).into_owned());
    }
    if mime == "multipart/form-data" {
        // Split at the boundary werkzeug reads from the Content-Type it is given.
        if let Some(boundary) = options.get("boundary") {
            pairs.extend(support::werkzeug::multipart_fields(body, boundary));
        }
    }
    pairs
}

/// The function Frappe runs for a method name: `handler.py` `get_attr` resolves any alias to
/// the function object (a bare name in `frappe.handler`). The facts come from the catalog
/// generated from Frappe's source.
fn frappe_runs(name: &str) -> Option<&'static str> {
    let name = erpgate::frappe::MethodName::new(name);
    erpgate::frappe::call::resolve(name.as_str()).map(|f| f.name.as_str())
}

/// `frappe/__init__.py` `get_newargs`: the arguments of `form` the function receives (those in
/// its signature, all with `**kwargs`; never `ignore_permissions` or `flags`).
fn newargs<'a>(function: &str, form: &'a [(String, String)]) -> Vec<&'a (String, String)> {
    let f = erpgate::frappe::call::resolve(function).unwrap();
    form.iter()
        .filter(|(k, _)| !matches!(k.as_str(), "ignore_permissions" | "flags"))
        .filter(|(k, _)| f.kwargs.is_some() || f.params.iter().any(|p| p.name == *k))
        .collect()
}

/// Whether the restricted client's rules cover what Frappe would run for this request: only
/// `frappe.client.get_list`, under any name, receiving ToDo as its doctype and no `debug`
/// (which sends the SQL back).
fn frappe_would_stay_within_rules(
    method: &Method,
    path: &str,
    form: &[(String, String)],
) -> Result<(), String> {
    if form.iter().any(|(k, _)| k == "sid") {
        return Err("a sid reached Frappe".into());
    }
    let cmds: Vec<&str> = form
        .iter()
        .filter(|(k, v)| k == "cmd" && !v.is_empty())
        .map(|(_, v)| v.as_str())
        .collect();
    let get_list_within_rules = |received: &[&(String, String)]| {
        let doctypes: Vec<&str> = received
            .iter()
            .filter(|(k, _)| k == "doctype")
            .map(|(_, v)| v.as_str())
            .collect();
        let debug = received.iter().any(|(k, v)| k == "debug" && !v.is_empty());
        !debug && doctypes.iter().all(|d| d.eq_ignore_ascii_case("todo"))
    };
    let runs_get_list = |name: &str| {
        frappe_runs(name) == Some(ALLOWED) && {
            let received = newargs(ALLOWED, form);
            received.iter().any(|(k, _)| k == "doctype") && get_list_within_rules(&received)
        }
    };
    if !cmds.is_empty() {
        return if cmds.iter().all(|c| runs_get_list(c)) {
            Ok(())
        } else {
            Err(format!("Frappe would run {cmds:?} on {form:?}"))
        };
    }
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let segments: Vec<&str> = decoded.split('/').filter(|s| !s.is_empty()).collect();
    let read = method == Method::GET || method == Method::HEAD;
    let run_method = form.iter().any(|(k, _)| k == "run_method");
    let ok = match segments.as_slice() {
        ["api", "resource" | "v1", ..] | ["api", "v2", "document", ..] => {
            let at = segments
                .iter()
                .position(|s| *s == "resource" || *s == "document");
            let doctype = at.and_then(|i| segments.get(i + 1));
            // `read_doc` runs `run_method`; a list is `get_list(doctype, **form_dict)`.
            let names_a_document = at.is_some_and(|i| segments.len() > i + 2);
            let list_within_rules =
                names_a_document || get_list_within_rules(&newargs(ALLOWED, form));
            read && doctype.is_some_and(|d| d.eq_ignore_ascii_case("todo"))
                && !(run_method && names_a_document)
                && list_within_rules
        }
        ["api", "method", m, ..] | ["api", "v2", "method", m] => runs_get_list(m),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{method} {path} runs outside the rules"))
    }
}

// === generated requests ===

#[derive(Debug, Clone, Copy, PartialEq)]
enum Carrier {
    Query,
    Body,
    /// In a multipart body, after a file part.
    LateField,
}

#[derive(Debug, Clone)]
struct Generated {
    method: Method,
    path: String,
    content_type: Option<String>,
    /// (carrier, key, value, key spelled with an escape)
    pairs: Vec<(Carrier, &'static str, &'static str, bool)>,
}

fn path() -> impl Strategy<Value = String> {
    let base = prop::sample::select(vec![
        "/api/resource/ToDo",
        "/api/v1/resource/ToDo",
        "/api/v2/document/ToDo",
        "/api/resource/ToDo/todo0001",
        "/api/v2/document/ToDo/todo0001",
        "/api/method/frappe.client.get_list",
        "/api/v2/method/frappe.client.get_list",
        "/api/method/frappe.client.insert",
        // An alias: `frappe.email.inbox` imports `set_value` from `frappe.client`.
        "/api/method/frappe.email.inbox.set_value",
        "/api/resource/User",
        "/",
        "/app/todo",
    ]);
    (base, any::<u8>(), any::<bool>(), any::<bool>()).prop_map(|(base, encode, slashes, trail)| {
        let mut p: String = base
            .char_indices()
            .map(|(i, c)| {
                if c.is_ascii_alphabetic() && (i as u8).wrapping_mul(encode) % 7 == 1 {
                    format!("%{:02X}", c as u8)
                } else {
                    c.to_string()
                }
            })
            .collect();
        if slashes {
            p = p.replacen('/', "//", 2);
        }
        if trail && !p.ends_with('/') {
            p.push('/');
        }
        p
    })
}

fn content_type() -> impl Strategy<Value = Option<String>> {
    prop::sample::select(vec![
        None,
        Some("application/json".to_owned()),
        Some("Application/JSON; charset=utf-8".to_owned()),
        Some("application/vnd.x+json".to_owned()),
        Some("application/x-www-form-urlencoded".to_owned()),
        Some("application/x-url-encoded".to_owned()),
        Some(format!("multipart/form-data; boundary={BOUNDARY}")),
        Some(format!("MULTIPART/FORM-DATA; boundary=\"{BOUNDARY}\"")),
        Some("text/plain".to_owned()),
        Some("application/octet-stream".to_owned()),
    ])
}

fn pair() -> impl Strategy<Value = (Carrier, &'static str, &'static str, bool)> {
    (
        prop::sample::select(vec![Carrier::Query, Carrier::Body, Carrier::LateField]),
        prop::sample::select(vec![
            "cmd",
            "sid",
            "run_method",
            "doctype",
            "limit",
            "debug",
            "pluck",
        ]),
        prop::sample::select(vec![
            ALLOWED,
            FORBIDDEN,
            "frappe.email.inbox.set_value",
            "login",
            "ToDo",
            "5",
            "",
        ]),
        any::<bool>(),
    )
}

fn generated() -> impl Strategy<Value = Generated> {
    (
        prop::sample::select(vec![Method::GET, Method::POST, Method::PUT, Method::DELETE]),
        path(),
        content_type(),
        prop::collection::vec(pair(), 0..4),
    )
        .prop_map(|(method, path, content_type, pairs)| Generated {
            method,
            path,
            content_type,
            pairs,
        })
}

fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The key as sent: plain, or with one letter escaped in the carrier's own way.
fn spelled(key: &str, escaped: bool, json: bool) -> String {
    match (escaped, json) {
        (false, _) => key.to_owned(),
        (true, false) => format!("%{:02X}{}", key.as_bytes()[0], &key[1..]),
        (true, true) => format!("\\u{:04x}{}", key.as_bytes()[0], &key[1..]),
    }
}

impl Generated {
    fn request(&self) -> Request<Body> {
        let (uri, body) = self.wire();
        let mut request = Request::builder()
            .method(self.method.clone())
            .uri(uri)
            .header(header::AUTHORIZATION, format!("token ek_reader:{SECRET}"))
            .header(header::HOST, "gw.example.com");
        if let Some(ct) = &self.content_type {
            request = request.header(header::CONTENT_TYPE, ct);
        }
        let length = body.len();
        let mut request = request.body(full_body(body)).unwrap();
        request
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        request
            .extensions_mut()
            .insert(PeerAddr("10.1.2.3:40000".parse().unwrap()));
        request
    }

    /// The request target and body as sent.
    fn wire(&self) -> (String, String) {
        let query: Vec<String> = self
            .pairs
            .iter()
            .filter(|p| p.0 == Carrier::Query)
            .map(|(_, k, v, e)| format!("{}={}", spelled(k, *e, false), encode(v)))
            .collect();
        let in_body: Vec<_> = self
            .pairs
            .iter()
            .filter(|p| p.0 != Carrier::Query)
            .collect();
        let mime = self.content_type.clone().unwrap_or_default().to_lowercase();
        let body = if mime.contains("json") {
            let members: Vec<String> = in_body
                .iter()
                .map(|(_, k, v, e)| format!("\"{}\": \"{v}\"", spelled(k, *e, true)))
                .collect();
            if members.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", members.join(", "))
            }
        } else if mime.starts_with("multipart") {
            let part = |name: &str, file: bool, value: &str| {
                let filename = if file { "; filename=\"f.bin\"" } else { "" };
                format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"{filename}\r\n\r\n{value}\r\n")
            };
            let mut body = String::new();
            for (_, k, v, _) in in_body.iter().filter(|p| p.0 == Carrier::Body) {
                body += &part(k, false, v);
            }
            body += &part("file", true, "file content");
            for (_, k, v, _) in in_body.iter().filter(|p| p.0 == Carrier::LateField) {
                body += &part(k, false, v);
            }
            body + &format!("--{BOUNDARY}--\r\n")
        } else {
            in_body
                .iter()
                .map(|(_, k, v, e)| format!("{}={}", spelled(k, *e, false), encode(v)))
                .collect::<Vec<_>>()
                .join("&")
        };
        let uri = if query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, query.join("&"))
        };
        (uri, body)
    }

    /// Nothing in any carrier that could make Frappe do more than the path says, and every
    /// key spelled plainly (an escaped key is still a key, but the check below reads plainly).
    fn harmless(&self) -> bool {
        self.pairs.iter().all(|(_, k, v, escaped)| {
            !matches!(*k, "cmd" | "sid" | "run_method" | "debug")
                && !escaped
                && (*k != "doctype" || *v == "ToDo")
        })
    }
}

/// One runtime and one gateway for every case; the record is cleared before each.
fn shared() -> &'static (tokio::runtime::Runtime, GatewayService, Seen) {
    static SHARED: OnceLock<(tokio::runtime::Runtime, GatewayService, Seen)> = OnceLock::new();
    SHARED.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let seen: Seen = Arc::default();
        let service = {
            let _guard = runtime.enter();
            gateway(seen.clone())
        };
        (runtime, service, seen)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

    #[test]
    fn a_restricted_client_never_makes_frappe_run_what_its_rules_do_not_allow(g in generated()) {
        let (runtime, service, seen) = shared();
        seen.lock().unwrap().clear();
        let service = service.clone();
        let request = g.request();
        let status = runtime.block_on(async {
            let response = service.oneshot(request).await.unwrap();
            let status = response.status();
            let _ = response.into_body().collect().await;
            status
        });
        let seen = seen.lock().unwrap();
        if let Some((method, target, content_type, body)) = seen.first() {
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            // Frappe reads the body with the Content-Type the gateway sent with it.
            let form = frappe_form_dict(query, content_type.as_deref(), body);
            prop_assert!(
                frappe_would_stay_within_rules(method, path, &form).is_ok(),
                "{:?} reached Frappe as {method} {target} {:?}: {:?}",
                g, String::from_utf8_lossy(body), frappe_would_stay_within_rules(method, path, &form)
            );
        } else if g.harmless() {
            // Refusing a harmless request is only right when Frappe would act outside the rules
            // (or not at all) on what was sent.
            let (target, body) = g.wire();
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            let form = frappe_form_dict(query, g.content_type.as_deref(), body.as_bytes());
            prop_assert!(
                frappe_would_stay_within_rules(&g.method, path, &form).is_err()
                    || status == StatusCode::BAD_REQUEST,
                "a harmless request was refused with {status}: {g:?}"
            );
        }
    }
}
