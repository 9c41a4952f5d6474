//! Frappe's JSON response envelopes: building the gateway's own errors in them, and cutting the
//! Python tracebacks out of upstream errors.
//!
//! v1 errors are `{"exc_type", "exception", "exc", "_server_messages"}`, where `exc` is a JSON
//! string holding a list and `_server_messages` a JSON string holding a list of JSON strings.
//! The Python frappe-client raises only when `exc` is non-empty, so the gateway always fills it
//! (with one line, never a traceback). v2 errors are `{"errors": [{"type", "message", ..}]}`.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::classify::ApiVersion;

/// The body of a gateway-made error in the envelope of `api` (v1 also off `/api/`).
pub fn error_body(
    api: Option<ApiVersion>,
    exc_type: &str,
    message: &str,
    request_id: &str,
) -> Bytes {
    let exception = format!("erpgate.{exc_type}: {message}");
    let server_message = json!({"message": message, "title": "Message", "indicator": "red"});
    let body = match api {
        Some(ApiVersion::V2) => json!({
            "errors": [{
                "type": exc_type,
                "message": message,
                "exception": exception,
                "title": "Message",
                "indicator": "red",
            }],
            "request_id": request_id,
        }),
        _ => json!({
            "exc_type": exc_type,
            "exception": exception,
            "exc": json!([exception]).to_string(),
            "_server_messages": json!([server_message.to_string()]).to_string(),
            "request_id": request_id,
        }),
    };
    Bytes::from(body.to_string())
}

/// Replaces every traceback in a Frappe error body with a one-line summary. Returns `None` when
/// the body is not a JSON object or has nothing to replace, so the caller sends it unchanged.
pub fn scrub_tracebacks(body: &[u8]) -> Option<Bytes> {
    let mut top: Map<String, Value> = serde_json::from_slice(body).ok()?;
    let mut changed = false;
    // v1: `exc` is a JSON list of traceback strings.
    if let Some(Value::String(exc)) = top.get("exc") {
        if exc.contains('\n') || exc.contains("Traceback") {
            let summary = match (top.get("exception"), top.get("exc_type")) {
                (Some(Value::String(e)), _) => first_line(e).to_owned(),
                (_, Some(Value::String(t))) => t.clone(),
                _ => last_traceback_line(exc),
            };
            top.insert("exc".into(), Value::String(json!([summary]).to_string()));
            changed = true;
        }
    }
    // v2: each error may carry `exception` with the traceback.
    if let Some(Value::Array(errors)) = top.get_mut("errors") {
        for error in errors.iter_mut().filter_map(Value::as_object_mut) {
            if let Some(Value::String(tb)) = error.get("exception") {
                if tb.contains('\n') {
                    let summary = last_traceback_line(tb);
                    error.insert("exception".into(), Value::String(summary));
                    changed = true;
                }
            }
        }
    }
    changed.then(|| Bytes::from(Value::Object(top).to_string()))
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

/// The last non-empty line of a traceback, which names the exception.
fn last_traceback_line(tb: &str) -> String {
    // `exc` is itself JSON text of a list; read its strings when it is.
    let text = serde_json::from_str::<Vec<String>>(tb)
        .ok()
        .and_then(|v| v.into_iter().last())
        .unwrap_or_else(|| tb.to_owned());
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("error")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_error_is_what_the_python_client_raises_on() {
        let body = error_body(None, "PermissionError", "not allowed", "rid-1");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["exc_type"], "PermissionError");
        let exc: Vec<String> = serde_json::from_str(v["exc"].as_str().unwrap()).unwrap();
        assert_eq!(exc, vec!["erpgate.PermissionError: not allowed"]);
        let msgs: Vec<String> =
            serde_json::from_str(v["_server_messages"].as_str().unwrap()).unwrap();
        let msg: Value = serde_json::from_str(&msgs[0]).unwrap();
        assert_eq!(msg["message"], "not allowed");
        assert_eq!(v["request_id"], "rid-1");
    }

    #[test]
    fn v2_error() {
        let body = error_body(Some(ApiVersion::V2), "AuthenticationError", "no", "r");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errors"][0]["type"], "AuthenticationError");
        assert_eq!(v["errors"][0]["message"], "no");
    }

    #[test]
    fn v1_traceback_becomes_one_line() {
        let body = br#"{"exception":"frappe.exceptions.ValidationError: Status cannot be \"X\"","exc_type":"ValidationError","exc":"[\"Traceback (most recent call last):\\n  File \\\"apps/frappe/frappe/app.py\\\", line 114\\nfrappe.exceptions.ValidationError: bad\\n\"]","_server_messages":"[\"{}\"]"}"#;
        let out: Value = serde_json::from_slice(&scrub_tracebacks(body).unwrap()).unwrap();
        let exc: Vec<String> = serde_json::from_str(out["exc"].as_str().unwrap()).unwrap();
        assert_eq!(
            exc,
            vec![r#"frappe.exceptions.ValidationError: Status cannot be "X""#]
        );
        assert_eq!(out["_server_messages"], "[\"{}\"]");
        assert!(!out.to_string().contains("apps/frappe"));
    }

    #[test]
    fn v2_traceback_becomes_one_line() {
        let body = br#"{"errors":[{"type":"AuthenticationError","exception":"Traceback (most recent call last):\n  File \"apps/frappe/frappe/app.py\"\nfrappe.exceptions.AuthenticationError\n"}]}"#;
        let out: Value = serde_json::from_slice(&scrub_tracebacks(body).unwrap()).unwrap();
        assert_eq!(
            out["errors"][0]["exception"],
            "frappe.exceptions.AuthenticationError"
        );
    }

    #[test]
    fn nothing_to_scrub() {
        assert!(scrub_tracebacks(br#"{"exc_type":"DoesNotExistError"}"#).is_none());
        assert!(scrub_tracebacks(b"<html>").is_none());
    }
}
