//! Which doctypes a successful write changes, so the cache can drop what it holds of them.
//!
//! A document API write (create, update, delete, doc method; v1 and v2) names its doctype in the
//! path. The `frappe.client` write methods name it in their arguments, which Frappe reads from
//! `form_dict` (query string, JSON or urlencoded body): `doctype` (set_value, delete, cancel,
//! rename_doc, submit by name), `doc` (insert, save, submit: a document as JSON text or object,
//! with a `doctype` field) and `docs` (insert_many, bulk_update: a list of such documents).

use serde_json::Value;

use crate::frappe::{FrappeRequest, RequestKind};

/// `frappe.client` methods that change documents.
const WRITE_METHODS: [&str; 10] = [
    "frappe.client.insert",
    "frappe.client.insert_many",
    "frappe.client.save",
    "frappe.client.set_value",
    "frappe.client.delete",
    "frappe.client.submit",
    "frappe.client.cancel",
    "frappe.client.rename_doc",
    "frappe.client.bulk_update",
    "frappe.client.delete_doc",
];

/// The doctypes a successful `request` changed (empty for reads and unknown methods).
/// `query` is the raw query string; `body` a JSON or urlencoded body the gateway read.
pub fn doctypes_written(
    request: &FrappeRequest,
    query: Option<&str>,
    body: Option<(&[u8], bool)>,
) -> Vec<String> {
    match &request.kind {
        RequestKind::Resource {
            doctype, operation, ..
        } if *operation != crate::frappe::Operation::Read => vec![doctype.clone()],
        RequestKind::Method(m) if WRITE_METHODS.contains(&m.as_str()) => {
            let mut found = Vec::new();
            if let Some(q) = query {
                from_urlencoded(q.as_bytes(), &mut found);
            }
            match body {
                Some((bytes, true)) => {
                    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(bytes) {
                        for (key, value) in map {
                            from_argument(&key, value, &mut found);
                        }
                    }
                }
                Some((bytes, false)) => from_urlencoded(bytes, &mut found),
                None => {}
            }
            found.sort();
            found.dedup();
            found
        }
        _ => Vec::new(),
    }
}

fn from_urlencoded(input: &[u8], found: &mut Vec<String>) {
    for (key, value) in form_urlencoded::parse(input) {
        // Form values are text; `doc` and `docs` hold JSON in it.
        let value = match key.as_ref() {
            "doc" | "docs" => serde_json::from_str(&value).unwrap_or(Value::Null),
            _ => Value::String(value.into_owned()),
        };
        from_argument(&key, value, found);
    }
}

fn from_argument(key: &str, value: Value, found: &mut Vec<String>) {
    match (key, value) {
        ("doctype", Value::String(d)) => found.push(d),
        ("doc", Value::String(text)) => {
            if let Ok(doc) = serde_json::from_str::<Value>(&text) {
                from_argument("doc", doc, found);
            }
        }
        ("doc", Value::Object(doc)) => {
            if let Some(Value::String(d)) = doc.get("doctype") {
                found.push(d.clone());
            }
        }
        ("docs", Value::String(text)) => {
            if let Ok(docs) = serde_json::from_str::<Value>(&text) {
                from_argument("docs", docs, found);
            }
        }
        ("docs", Value::Array(docs)) => {
            for doc in docs {
                from_argument("doc", doc, found);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::*;
    use crate::frappe::form_dict::FormDict;
    use crate::frappe::CanonicalPath;

    fn classify(method: Method, path: &str) -> FrappeRequest {
        FrappeRequest::classify(
            &method,
            &CanonicalPath::parse(path).unwrap(),
            &FormDict::default(),
        )
    }

    #[test]
    fn document_api_writes_name_their_doctype() {
        for (m, p) in [
            (Method::POST, "/api/resource/Sales Order"),
            (Method::PUT, "/api/resource/Sales Order/SO-1"),
            (Method::DELETE, "/api/v2/document/Sales Order/SO-1"),
        ] {
            assert_eq!(
                doctypes_written(&classify(m, p), None, None),
                vec!["Sales Order"]
            );
        }
        let read = classify(Method::GET, "/api/resource/Sales Order");
        assert!(doctypes_written(&read, None, None).is_empty());
    }

    #[test]
    fn client_methods_name_it_in_their_arguments() {
        let post = |p: &str| classify(Method::POST, p);
        let insert = post("/api/method/frappe.client.insert");
        assert_eq!(
            doctypes_written(
                &insert,
                None,
                Some((br#"{"doc": {"doctype": "Item", "item_code": "X"}}"#, true))
            ),
            vec!["Item"]
        );
        // frappe-client sends `doc` as JSON text in a form body.
        let form = b"doc=%7B%22doctype%22%3A%22Item%22%7D";
        assert_eq!(
            doctypes_written(&insert, None, Some((form, false))),
            vec!["Item"]
        );
        let set_value = post("/api/method/frappe.client.set_value");
        assert_eq!(
            doctypes_written(
                &set_value,
                Some("doctype=Customer&name=C-1&fieldname=x"),
                None
            ),
            vec!["Customer"]
        );
        let bulk = post("/api/method/frappe.client.bulk_update");
        assert_eq!(
            doctypes_written(
                &bulk,
                None,
                Some((br#"{"docs": "[{\"doctype\": \"Item\"}, {\"doctype\": \"ToDo\"}, {\"doctype\": \"Item\"}]"}"#, true))
            ),
            vec!["Item", "ToDo"]
        );
        let read = post("/api/method/frappe.client.get_list");
        assert!(doctypes_written(&read, Some("doctype=Item"), None).is_empty());
    }
}
