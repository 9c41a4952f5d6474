//! What ends up in Frappe's `frappe.form_dict`, derived the way Frappe 15 derives it.
//!
//! `frappe/app.py` `make_form_dict`:
//!
//! ```python
//! request_data = request.get_data(as_text=True)
//! if request_data and request.is_json:
//!     args = json.loads(request_data)
//! else:
//!     args = {}
//!     args.update(request.args or {})
//!     args.update(request.form or {})
//! ```
//!
//! So `form_dict` is the JSON body alone when the body is non-empty and werkzeug's `is_json`
//! holds, else the query string overlaid with `request.form` — werkzeug fills that from
//! urlencoded *and* multipart bodies (`formparser.FormDataParser.parse`). erpgate
//! reads every carrier and keeps every occurrence of the keys it acts on; it never needs to guess
//! which one Frappe keeps, because a restricted request is allowed only if all of them are.
//!
//! The keys (see [`FormKey`]): `cmd` (`app.py` `application()` tests `form_dict.cmd` before it
//! routes `/api/`, so a `cmd` in any carrier on any path is an RPC call), `sid`
//! (`frappe/auth.py` `HTTPRequest` / `sessions.py` resume the session it names, and an API key
//! does not override it), `run_method` (`api/v1.py` `read_doc` runs it as a document method),
//! `method` (`frappe/handler.py` `upload_file` calls it), and the query arguments of lists
//! (`fields`, `filters`, `or_filters`, `order_by`, `group_by`, and `fieldname` of
//! `frappe.client.get_value`), which reach SQL through `frappe/model/db_query.py`.

use std::borrow::Cow;

use http::HeaderValue;

use super::python_json::{self, Member, PyJson, PyJsonError};

/// How a request body is encoded, as werkzeug reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/x-www-form-urlencoded`; also `application/x-url-encoded`, which werkzeug
    /// parsed as a form before 3.0 (3.0 dropped it): read as a form anyway, since judging a body
    /// Frappe ignores can only refuse, never grant.
    Form,
    /// `application/json` or `application/*+json` (werkzeug's `is_json`).
    Json,
    /// `multipart/form-data`
    Multipart,
    /// Anything else: werkzeug fills neither `request.form` nor `is_json`, so the body never
    /// reaches `form_dict`.
    Opaque,
}

impl BodyFormat {
    /// The `Content-Type` erpgate forwards a body of this format with, once it has read it:
    /// the plain spelling of the mimetype werkzeug derived from the client's header, with no
    /// parameter (werkzeug 3 decodes JSON and form bodies as UTF-8 whatever `charset` says,
    /// `Request.get_data` / `sansio.utils`), so no parameter the client chose reaches werkzeug.
    /// A multipart body gets its relay's own ([`super::multipart::MultipartRelay::content_type`]);
    /// an opaque one is not read and keeps the client's.
    pub fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Self::Form => "application/x-www-form-urlencoded",
            Self::Json => "application/json",
            Self::Multipart => "multipart/form-data",
            Self::Opaque => "application/octet-stream",
        })
    }
}

/// A `Content-Type` erpgate cannot read exactly as werkzeug would.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the Content-Type header must be printable ASCII")]
pub struct UnreadableContentType;

impl BodyFormat {
    /// The format werkzeug gives a `Content-Type`: `Request.mimetype` is the part before the
    /// first `;`, stripped and lower-cased (`sansio/request.py`, `http.parse_options_header`);
    /// `is_json` is `application/json` or `application/*+json`; the form parsers are keyed by
    /// mimetype (`formparser.FormDataParser.parse`). A value with bytes outside
    /// printable ASCII is refused: gunicorn passes it on as latin-1 and werkzeug would still
    /// read its mimetype, so erpgate must not treat it as unreadable-and-opaque.
    pub fn from_content_type(value: Option<&HeaderValue>) -> Result<Self, UnreadableContentType> {
        let Some(value) = value else {
            return Ok(Self::Opaque);
        };
        let bytes = value.as_bytes();
        if !bytes
            .iter()
            .all(|b| (b' '..=b'~').contains(b) || *b == b'\t')
        {
            return Err(UnreadableContentType);
        }
        let text = std::str::from_utf8(bytes).map_err(|_| UnreadableContentType)?;
        let mime = text.split(';').next().unwrap_or_default().trim();
        let is = |name: &str| mime.eq_ignore_ascii_case(name);
        Ok(
            if is("application/x-www-form-urlencoded") || is("application/x-url-encoded") {
                Self::Form
            } else if is("multipart/form-data") {
                Self::Multipart
            } else if is("application/json")
                || (mime.len() >= "application/+json".len()
                    && mime[..12].eq_ignore_ascii_case("application/")
                    && mime[mime.len() - 5..].eq_ignore_ascii_case("+json"))
            {
                Self::Json
            } else {
                Self::Opaque
            },
        )
    }
}

/// The `form_dict` keys erpgate acts on. Every other key is left to Frappe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FormKey {
    /// Runs a whitelisted method instead of the path (`app.py` `application()`).
    Cmd,
    /// Resumes a session (`auth.py`, `sessions.py`): removed for every client.
    Sid,
    /// Runs a document method on a document read (`api/v1.py` `read_doc`).
    RunMethod,
    /// `upload_file` calls this whitelisted method (`handler.py` `upload_file`).
    Method,
    /// Columns of a list (`db_query.py` `DatabaseQuery.parse_args`).
    Fields,
    /// Conditions of a list.
    Filters,
    /// Alternative conditions of a list.
    OrFilters,
    /// SQL `ORDER BY` of a list.
    OrderBy,
    /// SQL `GROUP BY` of a list.
    GroupBy,
    /// The columns `frappe.client.get_value` reads.
    Fieldname,
    /// The doctype a generic method acts on (`frappe/client.py`).
    Doctype,
    /// The document `frappe.client.insert` / `save` / `submit` write, with its `doctype`.
    Doc,
    /// The documents `insert_many` / `bulk_update` write.
    Docs,
    /// The parent doctype of a child-table read (`get_list`, `get`, `get_value`).
    Parent,
    /// The whitelisted method `search_link` / `search_widget` call (`frappe.call(query, ...)`).
    Query,
    /// Any other argument: judged by the kind the called function gives it (see `catalog`).
    Other,
}

impl FormKey {
    /// The key for a `form_dict` name, if erpgate acts on it.
    pub fn of(name: &str) -> Option<Self> {
        Some(match name {
            "cmd" => Self::Cmd,
            "sid" => Self::Sid,
            "run_method" => Self::RunMethod,
            "method" => Self::Method,
            "fields" => Self::Fields,
            "filters" => Self::Filters,
            "or_filters" => Self::OrFilters,
            "order_by" => Self::OrderBy,
            "group_by" => Self::GroupBy,
            "fieldname" => Self::Fieldname,
            "doctype" => Self::Doctype,
            "doc" => Self::Doc,
            "docs" => Self::Docs,
            "parent" => Self::Parent,
            "query" => Self::Query,
            _ => return None,
        })
    }

    /// The key for any `form_dict` name.
    pub fn of_any(name: &str) -> Self {
        Self::of(name).unwrap_or(Self::Other)
    }

    /// The name as Frappe spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cmd => "cmd",
            Self::Sid => "sid",
            Self::RunMethod => "run_method",
            Self::Method => "method",
            Self::Fields => "fields",
            Self::Filters => "filters",
            Self::OrFilters => "or_filters",
            Self::OrderBy => "order_by",
            Self::GroupBy => "group_by",
            Self::Fieldname => "fieldname",
            Self::Doctype => "doctype",
            Self::Doc => "doc",
            Self::Docs => "docs",
            Self::Parent => "parent",
            Self::Query => "query",
            Self::Other => "(other)",
        }
    }
}

/// A `form_dict` value: a string from the query, a urlencoded or a multipart field, or a
/// JSON value from a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub enum FormValue {
    /// From the query, an urlencoded body or a multipart field.
    Text(String),
    /// A member of a JSON body.
    Json(PyJson),
}

impl FormValue {
    /// The value when it is a string (a JSON string included), else `None`.
    pub fn as_plain_text(&self) -> Option<&str> {
        match self {
            Self::Text(s) | Self::Json(PyJson::Str(s)) => Some(s),
            Self::Json(_) => None,
        }
    }

    /// The value as a string, when it is one; anything else (a JSON number, list, ...) is
    /// rendered so that it can never equal a method or column name.
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            Self::Text(s) | Self::Json(PyJson::Str(s)) => Cow::Borrowed(s),
            Self::Json(other) => Cow::Owned(format!("<JSON {other:?}>")),
        }
    }
}

/// One `name = value` pair of `form_dict`.
#[derive(Debug, Clone, PartialEq)]
pub struct FormEntry {
    /// The key erpgate knows it by ([`FormKey::Other`] for the rest).
    pub key: FormKey,
    /// The name as Frappe reads it (`Other` keys only; known keys are spelled by their key).
    other_name: Option<Cow<'static, str>>,
    /// The value.
    pub value: FormValue,
}

impl FormEntry {
    /// The argument name, as the called function receives it.
    pub fn name(&self) -> &str {
        self.other_name.as_deref().unwrap_or(self.key.as_str())
    }
}

/// `form_dict` as erpgate reads it: every occurrence of every argument, from every carrier, in
/// order, each marked with whether Frappe will read it (a query under a non-empty JSON body is
/// not read: `make_form_dict` takes the JSON alone). Every argument is kept, because the
/// function a request calls may receive any of them (`get_newargs`, see `catalog`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FormDict {
    entries: Vec<FormEntry>,
    /// How many leading entries Frappe will not read.
    shadowed: usize,
}

impl FormDict {
    /// Adds one `name = value` pair.
    pub fn push(&mut self, name: &str, value: impl FnOnce() -> FormValue) {
        let key = FormKey::of_any(name);
        self.entries.push(FormEntry {
            key,
            other_name: (key == FormKey::Other).then(|| common_name(name)),
            value: value(),
        });
    }

    /// Adds every entry of `other`.
    pub fn merge(&mut self, other: FormDict) {
        self.entries.extend(other.entries);
    }

    /// Marks every entry so far as not read by Frappe: the body that follows is a non-empty
    /// JSON body, which `make_form_dict` reads instead of the query. The entries are still
    /// judged (every one must be allowed); they only cannot stand for the request.
    pub fn shadow(&mut self) {
        self.shadowed = self.entries.len();
    }

    /// The values of `key` that Frappe will read.
    pub fn read_by_frappe(&self, key: FormKey) -> impl Iterator<Item = &FormValue> {
        self.entries[self.shadowed..]
            .iter()
            .filter(move |e| e.key == key)
            .map(|e| &e.value)
    }

    /// Every value of `key`.
    pub fn values(&self, key: FormKey) -> impl Iterator<Item = &FormValue> {
        self.entries
            .iter()
            .filter(move |e| e.key == key)
            .map(|e| &e.value)
    }

    /// The values of the argument `name` that Frappe will read.
    pub fn read_by_frappe_named<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = &'a FormValue> {
        self.entries[self.shadowed..]
            .iter()
            .filter(move |e| e.name() == name)
            .map(|e| &e.value)
    }

    /// Every value of the argument `name`.
    pub fn values_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a FormValue> {
        self.entries
            .iter()
            .filter(move |e| e.name() == name)
            .map(|e| &e.value)
    }

    /// Whether `key` occurs at all.
    pub fn has(&self, key: FormKey) -> bool {
        self.entries.iter().any(|e| e.key == key)
    }

    /// Every entry, in order.
    pub fn entries(&self) -> &[FormEntry] {
        &self.entries
    }

    /// Reads an urlencoded query string or form body as werkzeug 3 does: `parse_qsl(text,
    /// keep_blank_values=True, errors="werkzeug.url_quote")` (`sansio/request.py` `args`,
    /// `formparser._parse_urlencoded`): split on `&` only, a pair without `=` has an empty
    /// value, `+` is a space, percent-decoding, and bytes that are not UTF-8 once decoded are
    /// quoted back as `%XX` (werkzeug's error handler), not replaced: `filters=%FF` is the
    /// text `%FF` to Frappe, and so to the rules.
    pub fn from_urlencoded(input: &[u8]) -> Self {
        let mut form = Self::default();
        for pair in input.split(|b| *b == b'&').filter(|p| !p.is_empty()) {
            let (key, value) = match pair.iter().position(|b| *b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &b""[..]),
            };
            let key = unquote_plus(key);
            form.push(&key, || FormValue::Text(unquote_plus(value).into_owned()));
        }
        form
    }

    /// Reads a JSON body as `json.loads` does. A body that is a list becomes
    /// `form_dict["data"]`; a scalar is refused by Frappe.
    pub fn from_json(body: &str) -> Result<(Self, Vec<Member>), PyJsonError> {
        let mut form = Self::default();
        let members = match python_json::loads(body)? {
            PyJson::Object(members) => members,
            // `make_form_dict`: a list body is `form_dict["data"]`; it reaches a function that
            // takes `data` or `**kwargs`, so it is judged like any argument.
            list @ PyJson::Array(_) => {
                form.push("data", || FormValue::Json(list));
                return Ok((form, Vec::new()));
            }
            _ => Vec::new(),
        };
        for member in &members {
            form.push(&member.key, || FormValue::Json(member.value.clone()));
        }
        Ok((form, members))
    }
}

/// Argument names requests carry most, kept without a copy of their own.
const COMMON_NAMES: &[&str] = &[
    "limit",
    "limit_page_length",
    "limit_start",
    "page_length",
    "start",
    "as_dict",
    "name",
    "docname",
    "txt",
    "value",
    "searchfield",
    "reference_doctype",
    "data",
    "docstatus",
    "debug",
    "pluck",
    "_",
];

fn common_name(name: &str) -> Cow<'static, str> {
    match COMMON_NAMES.iter().find(|n| **n == name) {
        Some(n) => Cow::Borrowed(n),
        None => Cow::Owned(name.to_owned()),
    }
}

/// Python's `unquote_plus(text, errors="werkzeug.url_quote")`: `+` is a space, `%XX` a byte,
/// and a byte sequence that is not UTF-8 is written back as `%XX` per byte (Python's decoder
/// and Rust's `utf8_chunks` cut invalid sequences alike: the maximal invalid subpart).
fn unquote_plus(raw: &[u8]) -> Cow<'_, str> {
    if !raw.iter().any(|b| matches!(b, b'+' | b'%')) {
        if let Ok(text) = std::str::from_utf8(raw) {
            return Cow::Borrowed(text);
        }
    }
    let spaced: Vec<u8> = raw
        .iter()
        .map(|b| if *b == b'+' { b' ' } else { *b })
        .collect();
    let bytes: Vec<u8> = percent_encoding::percent_decode(&spaced).collect();
    let mut text = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        text.push_str(chunk.valid());
        for b in chunk.invalid() {
            text.push_str(&format!("%{b:02X}"));
        }
    }
    Cow::Owned(text)
}

/// The first value of `name` in a query string, decoded.
pub fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Removes every `sid` pair from an urlencoded string, keeping the rest as sent.
pub fn strip_sid_urlencoded(input: &str) -> String {
    input
        .split('&')
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or_default();
            unquote_plus(key.as_bytes()) != "sid"
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Removes every top-level `sid` member from a JSON object body, the rest kept byte for byte.
pub fn strip_sid_json(body: &str, members: &[Member]) -> String {
    python_json::without_members(body, members, |key| key == "sid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(form: &FormDict, key: FormKey) -> Vec<String> {
        form.values(key).map(|v| v.text().into_owned()).collect()
    }

    #[test]
    fn content_types_as_werkzeug_reads_them() {
        let f = |s: &'static str| BodyFormat::from_content_type(Some(&HeaderValue::from_static(s)));
        assert_eq!(
            f("application/x-www-form-urlencoded; charset=utf-8"),
            Ok(BodyFormat::Form)
        );
        assert_eq!(f("application/x-url-encoded"), Ok(BodyFormat::Form));
        assert_eq!(f("Application/JSON"), Ok(BodyFormat::Json));
        assert_eq!(f(" application/json ; x=1"), Ok(BodyFormat::Json));
        assert_eq!(f("application/vnd.api+json"), Ok(BodyFormat::Json));
        assert_eq!(f("application/+json"), Ok(BodyFormat::Json));
        assert_eq!(
            f("multipart/form-data; boundary=x"),
            Ok(BodyFormat::Multipart)
        );
        assert_eq!(f("text/plain"), Ok(BodyFormat::Opaque));
        assert_eq!(BodyFormat::from_content_type(None), Ok(BodyFormat::Opaque));
        let high = HeaderValue::from_bytes(b"application/json; x=\xff").unwrap();
        assert_eq!(
            BodyFormat::from_content_type(Some(&high)),
            Err(UnreadableContentType)
        );
    }

    #[test]
    fn urlencoded_keys_are_decoded() {
        let form =
            FormDict::from_urlencoded(b"c%6Dd=frappe.client.insert&cmd=a+b&sid=x&run_method=y&z=1");
        assert_eq!(
            texts(&form, FormKey::Cmd),
            vec!["frappe.client.insert", "a b"]
        );
        assert!(form.has(FormKey::Sid) && form.has(FormKey::RunMethod));
        assert_eq!(form.entries().len(), 5);
        assert_eq!(form.entries()[4].name(), "z");
        assert_eq!(form.values_named("z").count(), 1);
    }

    #[test]
    fn bytes_that_are_not_utf8_stay_quoted_as_werkzeug_keeps_them() {
        // parse_qsl(..., errors="werkzeug.url_quote"): "%FF" stays "%FF", a truncated sequence
        // is quoted byte by byte, valid sequences decode.
        let form = FormDict::from_urlencoded(b"filters=%FF%5B&fields=a%E2%82&cmd=%E2%82%AC&sid");
        assert_eq!(texts(&form, FormKey::Filters), vec!["%FF["]);
        assert_eq!(texts(&form, FormKey::Fields), vec!["a%E2%82"]);
        assert_eq!(texts(&form, FormKey::Cmd), vec!["\u{20ac}"]);
        assert_eq!(texts(&form, FormKey::Sid), vec![""]);
        assert!(!FormDict::from_urlencoded(b"s%69d%FF=1").has(FormKey::Sid));
    }

    #[test]
    fn json_keys_and_values() {
        let (form, _) =
            FormDict::from_json(r#"{"cmd":"frappe.client.insert","sid":"s","n":NaN,"cmd":7}"#)
                .unwrap();
        assert_eq!(
            texts(&form, FormKey::Cmd),
            vec!["frappe.client.insert", "<JSON Number(\"7\")>"]
        );
        assert!(form.has(FormKey::Sid));
        assert_eq!(form.values_named("n").count(), 1);
        assert_eq!(
            FormDict::from_json("[1,2]").unwrap().0.entries()[0].name(),
            "data"
        );
        assert!(FormDict::from_json("{nope").is_err());
    }

    #[test]
    fn sid_is_stripped_and_nothing_else_changes() {
        assert_eq!(strip_sid_urlencoded("a=1&sid=x&s%69d=y&b=2"), "a=1&b=2");
        let body = r#"{"b":1.50,"sid":"x","a":{"z":[1]}}"#;
        let (_, members) = FormDict::from_json(body).unwrap();
        assert_eq!(
            strip_sid_json(body, &members),
            r#"{"b":1.50,"a":{"z":[1]}}"#
        );
    }
}
