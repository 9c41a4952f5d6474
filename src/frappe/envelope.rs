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

/// The `exc_type` Frappe gives an error of `status` (`frappe/exceptions.py`: the status each
/// exception class sets), for an envelope erpgate writes in place of one of Frappe's pages.
pub fn exc_type_of_status(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "AuthenticationError",
        403 => "PermissionError",
        404 => "DoesNotExistError",
        409 => "DuplicateEntryError",
        417 => "ValidationError",
        429 => "TooManyRequestsError",
        _ if status.is_client_error() => "ValidationError",
        _ => "ServerError",
    }
}

/// Replaces every traceback in a Frappe error body with a one-line summary. Returns `None` when
/// the body is not a JSON object or has nothing to replace, so the caller sends it unchanged.
pub fn scrub_tracebacks(body: &[u8]) -> Option<Bytes> {
    scrub(
        body,
        Scrub {
            tracebacks: true,
            database_text: None,
        },
    )
    .map(|s| s.body)
}

/// What the reader of an upstream answer may see of Frappe's error text.
#[derive(Debug, Clone, Copy)]
pub struct Scrub<'a> {
    /// Cut Python tracebacks (`exc`, v2 `exception`) to their one-line summary.
    pub tracebacks: bool,
    /// For a restricted reader: the request id. The text of Frappe's database errors is then
    /// replaced by a fixed line naming it (whatever `tracebacks` says), tracebacks in `message`
    /// members are cut as `exc` is (when `tracebacks`), and the site's SQL log
    /// (`_debug_messages`, v2 `debug`) is dropped.
    pub database_text: Option<&'a str>,
}

/// A cleaned body, and the database error text withheld from it, for the gateway's log.
#[derive(Debug)]
pub struct Scrubbed {
    /// The body to send.
    pub body: Bytes,
    /// Each summary line replaced by the fixed database-error line.
    pub withheld: Vec<String>,
}

/// The text a restricted reader gets in place of a database error's.
pub fn database_error_line(request_id: &str) -> String {
    format!("database error; see the gateway log for request {request_id}")
}

/// Where a Python traceback starts (`traceback.format_exc`).
const TRACEBACK: &str = "Traceback (most recent call last)";

/// The PEP 249 exception classes every database driver Frappe 15 uses raises: `pymysql.err.X`
/// (MariaDB, `frappe/database/mariadb/database.py` `MariaDBExceptionUtil`: ProgrammingError,
/// OperationalError, InternalError, DataError; IntegrityError on a duplicate key), `MySQLdb.X`
/// (mysqlclient, older benches), `psycopg2.errors.*` subclasses of them (Postgres). Their
/// messages are the server's own, and hold data: `XPATH syntax error: '<value>'` from
/// `extractvalue`, the value in `Duplicate entry '<value>' for key`, a column's value in a
/// conversion error.
const DRIVER_EXCEPTIONS: [&str; 8] = [
    "OperationalError",
    "ProgrammingError",
    "DataError",
    "InternalError",
    "IntegrityError",
    "DatabaseError",
    "NotSupportedError",
    "InterfaceError",
];

/// Modules whose exceptions are the database's: a `psycopg2.errors.UndefinedColumn` is named by
/// its module only.
const DRIVER_MODULES: [&str; 5] = [
    "pymysql.",
    "MySQLdb.",
    "psycopg2.",
    "mariadb.",
    "frappe.database.",
];

/// Frappe's own exceptions made from a driver's, with its message in their arguments
/// (`frappe/database/database.py` `Database.sql`: `raise frappe.QueryDeadlockError(e)`,
/// `frappe.QueryTimeoutError(e)`). `DuplicateEntryError(doctype, name, e)` is caught by the
/// `IntegrityError(...)` in its text.
const FRAPPE_WRAPPERS: [&str; 2] = ["QueryDeadlockError", "QueryTimeoutError"];

/// Whether `text` (an `exc_type`, an exception line, a message) names a database error.
pub fn names_database_error(text: &str) -> bool {
    DRIVER_MODULES.iter().any(|m| text.contains(m))
        || DRIVER_EXCEPTIONS
            .iter()
            .chain(&FRAPPE_WRAPPERS)
            .any(|name| contains_word(text, name))
}

/// `word` in `text` with no identifier character on either side.
fn contains_word(text: &str, word: &str) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    text.match_indices(word).any(|(at, _)| {
        !text[..at].chars().next_back().is_some_and(ident)
            && !text[at + word.len()..].chars().next().is_some_and(ident)
    })
}

/// Whether a traceback (or any text) holds a database error: an exception line (Python prints
/// them unindented, `File` and source lines indented) naming one, chained causes included.
fn traceback_names_database_error(text: &str) -> bool {
    text.lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('\t'))
        .any(names_database_error)
}

/// Cleans a Frappe answer for its reader. Returns `None` when the body is not a JSON object or
/// has nothing to change, so the caller sends it unchanged.
///
/// Frappe 15 writes errors in `frappe/app.py` `handle_exception` → `frappe/utils/response.py`
/// `report_error`: v1 `exc_type` = the exception class's `__name__`, `exception` = the
/// traceback's last line, `exc` = JSON of the traceback list (`errprint`), `_server_messages` =
/// JSON of the `msgprint` log; v2 `errors: [{type, exception, message}]` and `messages`. A
/// database error's last line is the driver's, e.g. `pymysql.err.OperationalError: (1105,
/// "XPATH syntax error: '...'")`: for a restricted reader every place that text can be is
/// replaced. `exc_type` (a class name, no data) is kept, so clients still tell a
/// `DuplicateEntryError` from an `OperationalError`.
pub fn scrub(body: &[u8], how: Scrub<'_>) -> Option<Scrubbed> {
    let mut top: Map<String, Value> = serde_json::from_slice(body).ok()?;
    let mut changed = false;
    let mut withheld = Vec::new();
    if let Some(request_id) = how.database_text {
        let line = database_error_line(request_id);
        changed |= withhold_database_text(&mut top, &line, &mut withheld);
        // Frappe's SQL log, sent only with `logging` in the site config: the queries and
        // their values.
        changed |= top.remove("_debug_messages").is_some() | top.remove("debug").is_some();
        if let Some(message) = top.get_mut("message") {
            changed |= scrub_message(message, how.tracebacks, &line, &mut withheld, 0);
        }
    }
    if how.tracebacks {
        changed |= trim_tracebacks(&mut top);
    }
    changed.then(|| Scrubbed {
        body: Bytes::from(Value::Object(top).to_string()),
        withheld,
    })
}

/// v1 `exc`, v2 `exception`: each traceback cut to one line.
fn trim_tracebacks(top: &mut Map<String, Value>) -> bool {
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
    changed
}

/// Replaces a database error's text in a v1 or v2 error envelope with `line`; what it held
/// goes to `withheld`.
fn withhold_database_text(
    top: &mut Map<String, Value>,
    line: &str,
    withheld: &mut Vec<String>,
) -> bool {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_owned();
    let exc_type = text(top.get("exc_type"));
    let exception = text(top.get("exception"));
    let exc = text(top.get("exc"));
    let mut changed = false;
    // v1.
    if names_database_error(&exc_type)
        || names_database_error(&exception)
        || traceback_names_database_error(&exc_list_text(&exc))
    {
        withheld.push(if exception.is_empty() {
            last_traceback_line(&exc)
        } else {
            exception.clone()
        });
        // `__name__` is an identifier; anything else is not Frappe's and is not passed on.
        let exc_type = if !exc_type.is_empty()
            && exc_type.len() <= 64
            && exc_type
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            exc_type
        } else {
            "DatabaseError".to_owned()
        };
        let summary = format!("{exc_type}: {line}");
        if !exc.is_empty() {
            top.insert("exc".into(), Value::String(json!([summary]).to_string()));
        }
        top.insert("exception".into(), Value::String(summary));
        top.insert("exc_type".into(), Value::String(exc_type));
        changed = true;
    }
    // v2 `errors`: objects naming a database error.
    if let Some(Value::Array(entries)) = top.get_mut("errors") {
        for entry in entries.iter_mut().filter_map(Value::as_object_mut) {
            changed |= withhold_in_entry(entry, line, withheld, &traceback_names_database_error);
        }
    }
    if withheld.is_empty() {
        return changed;
    }
    // Messages (`msgprint`s) of a database error may hold the driver's message without its
    // class: matched by that text, or by the shape pymysql gives it, `(errno, "message")`.
    let details: Vec<String> = withheld.iter().flat_map(|w| driver_messages(w)).collect();
    let mentions = |text: &str| {
        traceback_names_database_error(text)
            || has_driver_tuple(text)
            || details.iter().any(|d| text.contains(d.as_str()))
    };
    // v1 `_server_messages`: a JSON string of a list of JSON strings.
    if let Some(Value::String(messages)) = top.get("_server_messages") {
        if let Ok(mut list) = serde_json::from_str::<Vec<String>>(messages) {
            let mut any = false;
            for entry in &mut list {
                let decoded = serde_json::from_str::<Value>(entry).ok();
                let texts = decoded
                    .as_ref()
                    .and_then(Value::as_object)
                    .into_iter()
                    .flat_map(|m| m.values().filter_map(Value::as_str));
                if mentions(entry) || texts.into_iter().any(&mentions) {
                    withheld.push(entry.clone());
                    *entry = json!({"message": line, "title": "Message", "indicator": "red"})
                        .to_string();
                    any = true;
                }
            }
            if any {
                top.insert(
                    "_server_messages".into(),
                    Value::String(json!(list).to_string()),
                );
                changed = true;
            }
        }
    }
    // v2 `messages`: objects.
    if let Some(Value::Array(entries)) = top.get_mut("messages") {
        for entry in entries.iter_mut().filter_map(Value::as_object_mut) {
            changed |= withhold_in_entry(entry, line, withheld, &mentions);
        }
    }
    changed
}

/// The driver's own message in a database error's summary line: what follows the class (`(1105,
/// "XPATH syntax error: '...'")`), and each quoted message in a pymysql `(errno, "message")`
/// inside it (`XPATH syntax error: '...'`), as a `msgprint` of it would show them.
fn driver_messages(summary: &str) -> Vec<String> {
    let mut found = Vec::new();
    if let Some((_, rest)) = summary.split_once(": ") {
        found.push(rest.trim().to_owned());
    }
    let bytes = summary.as_bytes();
    for at in 0..bytes.len() {
        if let Some(quote_at) = driver_tuple_at(bytes, at) {
            let quote = char::from(bytes[quote_at]);
            let body = &summary[quote_at + 1..];
            if let Some(end) = body.find(&format!("{quote})")) {
                found.push(body[..end].to_owned());
            }
        }
    }
    // Too short to tell apart from ordinary text.
    found.retain(|d| d.len() >= 6);
    found
}

/// Whether `text` holds pymysql's rendering of a server error, `(errno, "message")`.
fn has_driver_tuple(text: &str) -> bool {
    let bytes = text.as_bytes();
    (0..bytes.len()).any(|at| driver_tuple_at(bytes, at).is_some())
}

/// At `at`, `(` four digits `, ` and a quote: where the quote is.
fn driver_tuple_at(bytes: &[u8], at: usize) -> Option<usize> {
    let window = bytes.get(at..at + 8)?;
    (window[0] == b'('
        && window[1..5].iter().all(u8::is_ascii_digit)
        && &window[5..7] == b", "
        && matches!(window[7], b'"' | b'\''))
    .then_some(at + 7)
}

/// A v2 error or message in which `names` finds a database error: every text in it but `type`
/// becomes `line`.
fn withhold_in_entry(
    entry: &mut Map<String, Value>,
    line: &str,
    withheld: &mut Vec<String>,
    names: &dyn Fn(&str) -> bool,
) -> bool {
    if !entry.values().any(|v| v.as_str().is_some_and(names)) {
        return false;
    }
    for (key, value) in entry.iter_mut() {
        if key == "type" {
            continue;
        }
        if let Value::String(text) = value {
            if key == "message" || key == "exception" || names(text) {
                let was = std::mem::replace(text, line.to_owned());
                withheld.push(if was.contains('\n') {
                    last_traceback_line(&was)
                } else {
                    was
                });
            }
        }
    }
    entry
        .entry("message")
        .or_insert_with(|| Value::String(line.to_owned()));
    true
}

/// Tracebacks in `message` (a method's answer: `system_console`'s `execute_code` returns the
/// traceback of the code it ran in `message.output`, on a 200): each cut to its last line when
/// `tracebacks`, and replaced by `line` when it is a database error's. Nested values too, to a
/// bounded depth.
fn scrub_message(
    value: &mut Value,
    tracebacks: bool,
    line: &str,
    withheld: &mut Vec<String>,
    depth: usize,
) -> bool {
    if depth > 8 {
        return false;
    }
    match value {
        Value::String(text) if text.contains(TRACEBACK) => {
            if traceback_names_database_error(text) {
                withheld.push(last_traceback_line(text));
                *text = line.to_owned();
                true
            } else if tracebacks {
                *text = last_traceback_line(text);
                true
            } else {
                false
            }
        }
        Value::Object(map) => map.values_mut().fold(false, |changed, v| {
            scrub_message(v, tracebacks, line, withheld, depth + 1) | changed
        }),
        Value::Array(list) => list.iter_mut().fold(false, |changed, v| {
            scrub_message(v, tracebacks, line, withheld, depth + 1) | changed
        }),
        _ => false,
    }
}

/// The text of an `exc` (JSON of a list of tracebacks), joined; the string itself when it is
/// not one.
fn exc_list_text(exc: &str) -> String {
    serde_json::from_str::<Vec<String>>(exc)
        .map(|v| v.join("\n"))
        .unwrap_or_else(|_| exc.to_owned())
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
    fn database_errors_are_known_in_every_drivers_spelling() {
        for text in [
            "OperationalError",
            "pymysql.err.OperationalError: (1105, \"XPATH syntax error: 'x'\")",
            "MySQLdb.IntegrityError: (1062, \"Duplicate entry 'x' for key 'PRIMARY'\")",
            "_mysql_exceptions.DataError: (1406, \"Data too long for column 'x'\")",
            "psycopg2.errors.UndefinedColumn: column \"x\" does not exist",
            "frappe.exceptions.DuplicateEntryError: ('ToDo', 'x', IntegrityError(1062, 'x'))",
            "frappe.exceptions.QueryTimeoutError: (1969, 'Query execution was interrupted')",
        ] {
            assert!(names_database_error(text), "{text}");
        }
        for text in [
            "ValidationError",
            "frappe.exceptions.ValidationError: Status cannot be \"X\"",
            "MyOperationalErrorX",
            "PermissionError",
        ] {
            assert!(!names_database_error(text), "{text}");
        }
        assert!(has_driver_tuple("(1105, \"XPATH syntax error: 'x'\")"));
        assert!(!has_driver_tuple("(11, \"x\")"));
        assert_eq!(
            driver_messages("pymysql.err.OperationalError: (1105, \"XPATH syntax error: 'v'\")"),
            vec![
                "(1105, \"XPATH syntax error: 'v'\")".to_owned(),
                "XPATH syntax error: 'v'".to_owned()
            ]
        );
    }

    fn restricted(body: &[u8], tracebacks: bool) -> (Value, Vec<String>) {
        let how = Scrub {
            tracebacks,
            database_text: Some("rid-9"),
        };
        let out = scrub(body, how).unwrap_or_else(|| panic!("changed"));
        (serde_json::from_slice(&out.body).unwrap(), out.withheld)
    }

    #[test]
    fn a_database_errors_text_is_withheld_from_a_restricted_reader() {
        let tb = "Traceback (most recent call last):\n  File \"apps/frappe/frappe/database/database.py\", line 247, in sql\npymysql.err.OperationalError: (1105, \"XPATH syntax error: '~s3cr3t'\")\n";
        let last = "pymysql.err.OperationalError: (1105, \"XPATH syntax error: '~s3cr3t'\")";
        let body = json!({
            "exc_type": "OperationalError",
            "exception": last,
            "exc": json!([tb]).to_string(),
            "_server_messages": json!([json!({"message": "XPATH syntax error: '~s3cr3t'"}).to_string()]).to_string(),
            "_debug_messages": "[\"select ...\"]",
        })
        .to_string();
        for tracebacks in [true, false] {
            let (v, withheld) = restricted(body.as_bytes(), tracebacks);
            let line = "OperationalError: database error; see the gateway log for request rid-9";
            assert_eq!(v["exception"], line);
            assert_eq!(v["exc"], json!([line]).to_string());
            assert!(!v.to_string().contains("s3cr3t"), "{v}");
            assert!(v.get("_debug_messages").is_none());
            assert_eq!(withheld[0], last);
        }
        // The same body for a full-access reader: only the traceback is cut.
        let full = scrub_tracebacks(body.as_bytes()).unwrap();
        let v: Value = serde_json::from_slice(&full).unwrap();
        assert_eq!(v["exception"], last);
        assert_eq!(v["exc"], json!([last]).to_string());
    }

    #[test]
    fn a_chained_database_error_under_another_is_found() {
        let tb = "Traceback (most recent call last):\n  File \"a.py\", line 1, in f\npymysql.err.DataError: (1406, \"Data too long for column 'x' at row 1: s3cr3t\")\n\nDuring handling of the above exception, another exception occurred:\n\nTraceback (most recent call last):\n  File \"b.py\", line 2, in g\nfrappe.exceptions.ValidationError: could not save\n";
        let body =
            json!({"exc_type": "ValidationError", "exc": json!([tb]).to_string()}).to_string();
        let (v, _) = restricted(body.as_bytes(), false);
        assert!(!v.to_string().contains("s3cr3t"), "{v}");
        assert_eq!(v["exc_type"], "ValidationError");
    }

    #[test]
    fn other_errors_keep_their_text_for_a_restricted_reader() {
        let body = br#"{"exc_type":"ValidationError","exception":"frappe.exceptions.ValidationError: Status cannot be "X"","_server_messages":"["{\"message\": \"Status cannot be X\"}"]"}"#;
        let how = Scrub {
            tracebacks: true,
            database_text: Some("rid"),
        };
        assert!(scrub(body, how).is_none());
    }

    #[test]
    fn nothing_to_scrub() {
        assert!(scrub_tracebacks(br#"{"exc_type":"DoesNotExistError"}"#).is_none());
        assert!(scrub_tracebacks(b"<html>").is_none());
    }
}
