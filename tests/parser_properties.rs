//! Fuzzing the parsers the access rules stand on, with proptest: path canonicalisation,
//! `form_dict` parsing (query, urlencoded, Python-compatible JSON), multipart scanning and the
//! query-argument grammar. None may panic on any input, and what is allowed through must decode
//! to the same thing when read again: the canonical path parses back to itself, JSON written
//! out parses back to the same value, and a re-encoded multipart body holds exactly the fields
//! that were judged, split the way werkzeug splits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use futures_util::StreamExt;
use proptest::prelude::*;

use erpgate::frappe::form_dict::{FormDict, FormKey, FormValue};
use erpgate::frappe::multipart::MultipartRelay;
use erpgate::frappe::python_json::{self, PyJson};
use erpgate::frappe::query_args;
use erpgate::frappe::CanonicalPath;

const BOUNDARY: &str = "fuzzB0undary";

fn json_value() -> impl Strategy<Value = PyJson> {
    let leaf = prop_oneof![
        Just(PyJson::Null),
        any::<bool>().prop_map(PyJson::Bool),
        prop::sample::select(vec![
            "0",
            "-1",
            "3.25",
            "1e9",
            "NaN",
            "Infinity",
            "-Infinity"
        ])
        .prop_map(|n| PyJson::Number(n.to_owned())),
        "\\PC{0,8}".prop_map(PyJson::Str),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(PyJson::Array),
            prop::collection::vec(("[a-z_]{1,6}", inner), 0..4).prop_map(|members| {
                PyJson::Object(
                    members
                        .into_iter()
                        .map(|(key, value)| python_json::Member {
                            key,
                            value,
                            span: (0, 0),
                        })
                        .collect(),
                )
            }),
        ]
    })
}

fn write_json(value: &PyJson, out: &mut String) {
    match value {
        PyJson::Null => out.push_str("null"),
        PyJson::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        PyJson::Number(n) => out.push_str(n),
        PyJson::Str(s) => out.push_str(&serde_json::to_string(s).unwrap()),
        PyJson::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json(item, out);
            }
            out.push(']');
        }
        PyJson::Object(members) => {
            out.push('{');
            for (i, m) in members.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(&m.key).unwrap());
                out.push_str(": ");
                write_json(&m.value, out);
            }
            out.push('}');
        }
    }
}

/// Values equal but for member spans (which depend on the text).
fn same(a: &PyJson, b: &PyJson) -> bool {
    match (a, b) {
        (PyJson::Array(x), PyJson::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (PyJson::Object(x), PyJson::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|(a, b)| a.key == b.key && same(&a.value, &b.value))
        }
        _ => a == b,
    }
}

/// A multipart body from parts that may hold anything, delimiters and CRs included.
fn multipart_body() -> impl Strategy<Value = Vec<u8>> {
    let content = prop_oneof![
        "[a-z0-9 ]{0,12}",
        Just(format!(
            "x\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"cmd\"\r\n\r\nlogin"
        )),
        Just(format!("\r--{BOUNDARY}")),
        Just("\r\n\r\n".to_owned()),
        "\\PC{0,6}",
    ];
    let name = prop::sample::select(vec!["cmd", "sid", "a", "c%6Dd", "q\"x", "run_method"]);
    prop::collection::vec((name, any::<bool>(), content), 0..5).prop_map(|parts| {
        let mut body = Vec::new();
        for (name, file, content) in parts {
            let filename = if file { "; filename=\"f.txt\"" } else { "" };
            body.extend_from_slice(
                format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"{filename}\r\n\r\n{content}\r\n")
                    .as_bytes(),
            );
        }
        body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        body
    })
}

/// A body relayed as erpgate forwards it: the fields judged, the bytes written and the boundary
/// werkzeug reads from the Content-Type written with them.
async fn relay_with(
    body: Vec<u8>,
    boundary: &str,
) -> Result<(FormDict, Vec<u8>, String), erpgate::BoxError> {
    let mut relay = MultipartRelay::new(erpgate::full_body(body), boundary.into(), 1 << 16);
    let content_type = relay.content_type().to_str().unwrap().to_owned();
    let (mime, options) = support::werkzeug::parse_options_header(&content_type);
    assert_eq!(mime, "multipart/form-data");
    relay
        .read_fields_before_files(std::time::Duration::from_secs(5))
        .await?;
    let mut out = Vec::new();
    while let Some(chunk) = relay.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok((relay.form().clone(), out, options["boundary"].clone()))
}

async fn relay(body: Vec<u8>) -> Result<(FormDict, Vec<u8>, String), erpgate::BoxError> {
    relay_with(body, BOUNDARY).await
}

/// Content-Type parameter lists as an attacker would vary them: RFC 2231 names, continuations,
/// repeats in any case, spaces around `=`, escapes, unquoted characters werkzeug stops at.
fn content_type_header() -> impl Strategy<Value = String> {
    let name = prop::sample::select(vec![
        "boundary",
        "BOUNDARY",
        "Boundary",
        "boundary*",
        "boundary*0",
        "boundary*1",
        "boundary*0*",
        "charset",
        "charset*",
        "x",
    ]);
    let value = prop::sample::select(vec![
        "good",
        "evil",
        "\"good\"",
        "\"evil\"",
        "utf-8''evil",
        "UTF-8'en'ev%69l",
        "koi8''evil",
        "''evil",
        "\"a\\\"b\"",
        "\"ab",
        "a/b",
        "good junk",
        "\"g%22d\"",
        "",
        "g'd",
    ]);
    let equals = prop::sample::select(vec!["=", " =", "= "]);
    let separator = prop::sample::select(vec!["; ", ";", " ; ", ";; ", ";\t"]);
    prop::collection::vec((separator, name, equals, value), 0..4).prop_map(|params| {
        let mut header = "multipart/form-data".to_owned();
        for (separator, name, equals, value) in params {
            header.push_str(&format!("{separator}{name}{equals}{value}"));
        }
        header
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn canonical_paths_parse_back_to_themselves(raw in "/[a-zA-Z0-9%/._~ -]{0,40}") {
        if let Ok(path) = CanonicalPath::parse(&raw) {
            let again = CanonicalPath::parse(&path.encode()).unwrap();
            prop_assert_eq!(again.segments(), path.segments());
            prop_assert_eq!(again.encode(), path.encode());
        }
    }

    #[test]
    fn any_bytes_as_a_path_never_panic(raw in prop::collection::vec(any::<u8>(), 0..40)) {
        let _ = CanonicalPath::parse(&String::from_utf8_lossy(&raw));
    }

    #[test]
    fn python_json_never_panics_and_reads_back_what_it_wrote(text in "\\PC{0,40}", value in json_value()) {
        let _ = python_json::loads(&text);
        let _ = FormDict::from_json(&text);
        let mut written = String::new();
        write_json(&value, &mut written);
        let read = python_json::loads(&written).unwrap();
        prop_assert!(same(&read, &value), "{written}");
    }

    #[test]
    fn urlencoded_forms_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..60)) {
        let form = FormDict::from_urlencoded(&bytes);
        for entry in form.entries() {
            prop_assert_eq!(FormKey::of_any(entry.name()), entry.key);
            let _ = entry.value.text();
        }
    }

    #[test]
    fn the_query_grammar_never_panics(text in "\\PC{0,30}", structured in "[a-z`(),.* ]{0,24}") {
        let readable = |d: &str| d == "ToDo";
        for input in [&text, &structured] {
            let mut form = FormDict::default();
            for key in ["fields", "filters", "or_filters", "order_by", "group_by"] {
                form.push(key, || FormValue::Text(input.clone()));
            }
            let _ = query_args::check(&form, &readable);
            let _ = query_args::check_fieldname(&FormValue::Text(input.clone()), &readable);
        }
    }

    #[test]
    fn a_relayed_multipart_body_holds_exactly_the_judged_fields(body in multipart_body()) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        if let Ok((form, out, written)) = runtime.block_on(relay(body)) {
            prop_assert_ne!(&written, BOUNDARY);
            let seen = support::werkzeug::multipart_fields(&out, &written);
            // No sid survives; every cmd werkzeug finds was judged; nothing else is invented.
            prop_assert!(seen.iter().all(|(name, _)| name != "sid"));
            let judged: Vec<String> = form.values(FormKey::Cmd).map(|v| v.text().into_owned()).collect();
            let found: Vec<String> = seen.iter().filter(|(n, _)| n == "cmd").map(|(_, v)| v.clone()).collect();
            prop_assert_eq!(judged, found);
            // Read again, the forwarded body gives the same fields, byte for byte but for the
            // boundary.
            let (again, out2, written2) = runtime.block_on(relay_with(out.clone(), &written)).unwrap();
            prop_assert_eq!(again, form);
            prop_assert_eq!(String::from_utf8_lossy(&out2).replace(&written2, &written), String::from_utf8_lossy(&out));
        }
    }

    #[test]
    fn a_content_type_erpgate_accepts_is_read_alike_by_werkzeug(header in content_type_header()) {
        use erpgate::frappe::multipart::boundary;
        let (_, options) = support::werkzeug::parse_options_header(&header);
        if let Ok(read) = boundary(&header) {
            // No parameter set splits the client's body one way for erpgate and another for
            // werkzeug (and erpgate forwards its own Content-Type anyway).
            prop_assert_eq!(Some(&read), options.get("boundary"), "{}", header);
            prop_assert!(!header.contains('*'), "{}", header);
        }
    }
}

/// The model reads the attacks the way werkzeug 3.0.6 does (checked against its source).
#[test]
fn the_werkzeug_model_reads_rfc_2231_repeats_and_stops_as_werkzeug_does() {
    let read = |h: &str| {
        support::werkzeug::parse_options_header(h)
            .1
            .get("boundary")
            .cloned()
    };
    assert_eq!(
        read("multipart/form-data; boundary=good; boundary*=utf-8''evil").as_deref(),
        Some("evil")
    );
    assert_eq!(
        read("multipart/form-data; boundary*0=ev; boundary*1=il").as_deref(),
        Some("evil")
    );
    assert_eq!(
        read("multipart/form-data; boundary=a; BOUNDARY=b").as_deref(),
        Some("b")
    );
    assert_eq!(read("multipart/form-data; boundary = a"), None);
    assert_eq!(
        read("multipart/form-data; boundary=a/b").as_deref(),
        Some("a")
    );
    assert_eq!(
        read("multipart/form-data; boundary=\"a\\\"b\"").as_deref(),
        Some("a\"b")
    );
    assert_eq!(
        read("multipart/form-data; boundary=\"g%22d\"").as_deref(),
        Some("g\"d")
    );
}
