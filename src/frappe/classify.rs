//! What a request does to a Frappe site: which doctype and operation, which whitelisted method,
//! file access, login, or something else.
//!
//! The routes are Frappe v15's (`frappe/api/v1.py`, `frappe/api/v2.py`, `frappe/app.py`):
//! v1 at `/api/` and `/api/v1/`, v2 at `/api/v2/`. Classification works on the canonical path
//! (see [`super::path`]) plus the `form_dict` keys from the query and the body (see
//! [`super::form_dict`]), so that `cmd` in any carrier on any path, `run_method` on a document
//! and `method` on `upload_file` are seen.

use http::Method;

use super::form_dict::{FormDict, FormKey};
use super::path::CanonicalPath;

/// Which Frappe REST API a path belongs to; decides the error envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiVersion {
    /// `/api/...` and `/api/v1/...`
    V1,
    /// `/api/v2/...`
    V2,
}

impl ApiVersion {
    /// The API a canonical path belongs to, if any.
    pub fn of(path: &CanonicalPath) -> Option<Self> {
        match path.segments() {
            [api, v2, ..] if api == "api" && v2 == "v2" => Some(Self::V2),
            [api, ..] if api == "api" => Some(Self::V1),
            _ => None,
        }
    }
}

/// What a resource request does to documents of its doctype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// List, get, count, meta.
    Read,
    /// Insert a new document.
    Create,
    /// Save changes to a document.
    Update,
    /// Delete a document.
    Delete,
    /// Run a whitelisted document or controller method (`run_method`, POST on a document, v2
    /// `/method/`); it can do anything the method does, so it is its own permission.
    DocMethod,
    /// A verb Frappe does not route for this path; never allowed to a restricted client.
    Unsupported,
}

impl Operation {
    /// The name used in `allow.resources` rules.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Create => "create",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::DocMethod => "doc_method",
            Self::Unsupported => "unsupported",
        }
    }
}

/// The canonical name of a whitelisted method. Frappe resolves a name without a dot in
/// `frappe.handler` (`ping`, `upload_file`, `logout`), so both spellings map to one name here.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MethodName(String);

impl MethodName {
    /// Canonicalises a method name as Frappe's `handler.get_attr` resolves it.
    pub fn new(raw: &str) -> Self {
        if raw.contains(['.', '/']) || raw == "login" {
            Self(raw.to_owned())
        } else {
            Self(format!("frappe.handler.{raw}"))
        }
    }

    /// A function of a doctype's controller module, as `/api/v2/method/<doctype>/<attr>` names
    /// it: `doctype/attr` (a `/` never occurs in a dotted name). `api/v2.py` `handle_rpc_call`
    /// runs `<controller module>.<attr>` through `frappe.call`: a module-level whitelisted
    /// function, not a document method; the catalog says which (`call::resolve`).
    pub fn of_controller(doctype: &str, attr: &str) -> Self {
        Self(format!("{doctype}/{attr}"))
    }

    /// The canonical dotted name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The kind of thing a request does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// A document API call on a doctype, optionally one document.
    Resource {
        /// The doctype as sent (Frappe matches it case-insensitively).
        doctype: String,
        /// The document name, if the path names one.
        name: Option<String>,
        /// What is done to it.
        operation: Operation,
    },
    /// A whitelisted method call.
    Method(MethodName),
    /// Uploading a file (`upload_file`).
    FileUpload,
    /// Downloading `/files/...` or `/private/files/...`.
    FileDownload,
    /// `/api/method/login` or `cmd=login`: creates a session.
    Login,
    /// Anything else: desk pages, website routes, unknown `/api/` paths.
    Other,
}

impl RequestKind {
    /// A fixed label for metrics and logs; never request text.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Resource {
                operation: Operation::Read,
                ..
            } => "resource_read",
            Self::Resource { .. } => "resource_write",
            Self::Method(_) => "method",
            Self::FileUpload | Self::FileDownload => "file",
            Self::Login => "login",
            Self::Other => "other",
        }
    }
}

/// A request as Frappe will understand it.
#[derive(Debug, Clone, PartialEq)]
pub struct FrappeRequest {
    /// The REST API version, if the path is under `/api/`.
    pub api: Option<ApiVersion>,
    /// What the path (or, off `/api/`, the `cmd`) asks for.
    pub kind: RequestKind,
    /// Every other method the request makes Frappe run by name: each `cmd` in any carrier
    /// (Frappe 15's `app.py` runs `form_dict.cmd` *instead of* any path, `/api/` included, so
    /// which one it picks does not matter: all must be allowed). Methods a function calls
    /// because an argument names them (`upload_file`'s `method`, `search_link`'s `query`) are
    /// that argument's kind in the catalog, judged with the call.
    pub embedded_methods: Vec<MethodName>,
    /// The `form_dict` keys erpgate acts on, from every carrier: the access rules judge the
    /// list arguments in it.
    pub form: FormDict,
    /// More of `form` is still to come (multipart fields after a file part): what only a later
    /// field could supply, a generic method's doctype, is not missing yet.
    pub form_incomplete: bool,
    /// The function a resource path runs with the request's arguments, judged as its call:
    /// a document list (`api/v1.py` / `api/v2.py` `document_list`) is
    /// `frappe.client.get_list(doctype, **form_dict)`, `/api/v2/doctype/<doctype>/count` is
    /// `frappe.desk.reportview.get_count()` over `form_dict` (`api/v2.py` `count`).
    pub implied_call: Option<&'static str>,
    /// A body came that erpgate did not read (a Content-Type werkzeug does not parse): Frappe
    /// can still read it where it reads the raw body (`api/v1.py` `get_request_form_data`).
    pub unread_body: bool,
}

impl FrappeRequest {
    /// Classifies a request from its method, canonical path and the `form_dict` it carries.
    pub fn classify(method: &Method, path: &CanonicalPath, form: &FormDict) -> Self {
        Self::classify_owned(method, path, form.clone())
    }

    /// [`Self::classify`], keeping `form` without a copy (the request path's own).
    pub fn classify_owned(method: &Method, path: &CanonicalPath, form: FormDict) -> Self {
        let keys = &form;
        let segments: Vec<&str> = path.segments().iter().map(String::as_str).collect();
        let (api, kind) = match segments.as_slice() {
            ["api", "v2", rest @ ..] => (Some(ApiVersion::V2), classify_v2(method, rest, keys)),
            ["api", "v1", rest @ ..] | ["api", rest @ ..] => {
                (Some(ApiVersion::V1), classify_v1(method, rest, keys))
            }
            ["files", _, ..] | ["private", "files", _, ..] => (None, RequestKind::FileDownload),
            _ => (None, RequestKind::Other),
        };
        // Off `/api/`, the `cmd` Frappe reads *is* the request (`/?cmd=...`, the Python
        // frappe-client). A `cmd` Frappe does not read (a query under a JSON body) cannot stand
        // for the path, which is then judged as it is; every `cmd` is still judged.
        let read = keys.read_by_frappe(FormKey::Cmd).next();
        let (kind, stands_for_path) = match (api, kind, read) {
            (None, RequestKind::Other, Some(cmd)) => (method_kind(&cmd.text()), Some(cmd)),
            (_, kind, _) => (kind, None),
        };
        let embedded: Vec<RequestKind> = keys
            .values(FormKey::Cmd)
            .filter(|v| !stands_for_path.is_some_and(|s| std::ptr::eq(s, *v)))
            .map(|c| method_kind(&c.text()))
            .collect();
        let read = matches!(
            &kind,
            RequestKind::Resource {
                name: None,
                operation: Operation::Read,
                ..
            }
        );
        let implied_call = match segments.as_slice() {
            _ if !read => None,
            ["api", "v2", "document", _]
            | ["api", "resource", _]
            | ["api", "v1", "resource", _] => Some("frappe.client.get_list"),
            ["api", "v2", "doctype", _, "count"] => Some("frappe.desk.reportview.get_count"),
            _ => None,
        };
        let embedded_methods = embedded
            .into_iter()
            .map(|k| match k {
                RequestKind::Method(m) => m,
                RequestKind::Login => MethodName::new("login"),
                _ => MethodName::new("frappe.handler.upload_file"),
            })
            .collect();
        Self {
            api,
            kind,
            embedded_methods,
            form,
            form_incomplete: false,
            implied_call,
            unread_body: false,
        }
    }
}

impl FrappeRequest {
    /// Every method the request makes Frappe run: its kind's and the embedded ones.
    pub fn methods(&self) -> impl Iterator<Item = &MethodName> {
        let own = match &self.kind {
            RequestKind::Method(m) => Some(m),
            _ => None,
        };
        own.into_iter().chain(&self.embedded_methods)
    }

    /// Whether the request may change data. Frappe decides nothing by HTTP verb for methods (a
    /// whitelisted method accepts GET, POST, PUT and DELETE alike), so methods are read-only
    /// only when `read_only` (canonical names) lists them; resources by their operation.
    pub fn is_write(&self, method: &Method, read_only: &std::collections::HashSet<String>) -> bool {
        let reads = |m: &MethodName| read_only.contains(m.as_str());
        let kind_writes = match &self.kind {
            RequestKind::Resource { operation, .. } => *operation != Operation::Read,
            RequestKind::Method(m) => !reads(m),
            RequestKind::FileDownload => false,
            RequestKind::FileUpload | RequestKind::Login => true,
            RequestKind::Other => !is_read(method),
        };
        kind_writes || self.embedded_methods.iter().any(|m| !reads(m))
    }
}

/// Whitelisted methods named in configuration (a route's `methods`), matched against what a
/// request makes Frappe run, however it is called: `/api/method/<name>`,
/// `/api/v2/method/<name>`, a `cmd` in any carrier, or a resource path's implied call (a list
/// read runs `frappe.client.get_list`). A catalogued function matches under any of its names,
/// so a route naming one alias is not sidestepped by calling another.
#[derive(Debug, Clone, Default)]
pub struct MethodSet {
    /// Canonical names as configured.
    names: std::collections::HashSet<String>,
    /// The catalogued functions they resolve to.
    functions: Vec<&'static super::catalog::Function>,
}

impl MethodSet {
    /// The set of `names` (as Frappe resolves them: `ping` is `frappe.handler.ping`).
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut set = Self::default();
        for name in names {
            let name = MethodName::new(name);
            if let Some(f) = super::call::resolve(name.as_str()) {
                set.functions.push(f);
            }
            set.names.insert(name.0);
        }
        set
    }

    /// Whether `request` makes Frappe run any method of the set.
    pub fn runs_any(&self, request: &FrappeRequest) -> bool {
        let named = |name: &str| {
            self.names.contains(name)
                || super::call::resolve(name)
                    .is_some_and(|f| self.functions.iter().any(|g| std::ptr::eq(*g, f)))
        };
        request.methods().any(|m| named(m.as_str())) || request.implied_call.is_some_and(named)
    }
}

/// The kind of a call to method `raw`.
pub(crate) fn method_kind(raw: &str) -> RequestKind {
    let name = MethodName::new(raw);
    match name.as_str() {
        "login" => RequestKind::Login,
        "frappe.handler.upload_file" | "frappe.handler.uploadfile" => RequestKind::FileUpload,
        _ => RequestKind::Method(name),
    }
}

fn is_read(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

fn resource(doctype: &str, name: Option<String>, operation: Operation) -> RequestKind {
    RequestKind::Resource {
        doctype: doctype.to_owned(),
        name,
        operation,
    }
}

fn classify_v1(method: &Method, rest: &[&str], keys: &FormDict) -> RequestKind {
    match rest {
        // `handle_rpc_call` keeps only what precedes the first '/'.
        ["method", name, ..] => method_kind(name),
        ["resource", doctype] => {
            let op = match *method {
                _ if is_read(method) => Operation::Read,
                Method::POST => Operation::Create,
                _ => Operation::Unsupported,
            };
            resource(doctype, None, op)
        }
        ["resource", doctype, name @ ..] => {
            let op = match *method {
                _ if is_read(method) && keys.has(FormKey::RunMethod) => Operation::DocMethod,
                _ if is_read(method) => Operation::Read,
                Method::PUT => Operation::Update,
                Method::DELETE => Operation::Delete,
                Method::POST => Operation::DocMethod,
                _ => Operation::Unsupported,
            };
            resource(doctype, Some(name.join("/")), op)
        }
        _ => RequestKind::Other,
    }
}

fn classify_v2(method: &Method, rest: &[&str], keys: &FormDict) -> RequestKind {
    match rest {
        ["method", name] => method_kind(name),
        // A function of the doctype's controller module, called like any method.
        ["method", doctype, attr] => RequestKind::Method(MethodName::of_controller(doctype, attr)),
        ["document", doctype] => {
            let op = match *method {
                _ if is_read(method) => Operation::Read,
                Method::POST => Operation::Create,
                _ => Operation::Unsupported,
            };
            resource(doctype, None, op)
        }
        // Checked before plain documents: when a name could also end in `/method/x`, the stricter
        // reading wins.
        ["document", doctype, name @ .., "method", _] if !name.is_empty() => {
            resource(doctype, Some(name.join("/")), Operation::DocMethod)
        }
        ["document", doctype, name @ ..] => {
            let op = match *method {
                _ if is_read(method) && keys.has(FormKey::RunMethod) => Operation::DocMethod,
                _ if is_read(method) => Operation::Read,
                Method::PUT | Method::PATCH => Operation::Update,
                Method::DELETE => Operation::Delete,
                _ => Operation::Unsupported,
            };
            resource(doctype, Some(name.join("/")), op)
        }
        ["doctype", doctype, "meta" | "count"] if is_read(method) => {
            resource(doctype, None, Operation::Read)
        }
        ["doctype", doctype, ..] => resource(doctype, None, Operation::Unsupported),
        _ => RequestKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(method: Method, path: &str, query: &str) -> FrappeRequest {
        let path = CanonicalPath::parse(path).unwrap();
        FrappeRequest::classify(&method, &path, &FormDict::from_urlencoded(query.as_bytes()))
    }

    fn res(doctype: &str, name: Option<&str>, operation: Operation) -> RequestKind {
        RequestKind::Resource {
            doctype: doctype.into(),
            name: name.map(Into::into),
            operation,
        }
    }

    #[test]
    fn a_method_set_matches_what_a_request_runs_however_it_is_called() {
        let set = MethodSet::new(["frappe.desk.query_report.run", "ping"]);
        let runs = |r: FrappeRequest| set.runs_any(&r);
        assert!(runs(classify(
            Method::GET,
            "/api/method/frappe.desk.query_report.run",
            ""
        )));
        assert!(runs(classify(
            Method::POST,
            "/api/v2/method/frappe.desk.query_report.run",
            ""
        )));
        // A `cmd` off `/api/` is the request; on `/api/` Frappe may run it instead.
        assert!(runs(classify(
            Method::POST,
            "/",
            "cmd=frappe.desk.query_report.run"
        )));
        assert!(runs(classify(
            Method::GET,
            "/api/method/ping",
            "cmd=frappe.desk.query_report.run"
        )));
        // Another name of the same function, and a name without a dot as Frappe resolves it.
        assert!(runs(classify(
            Method::GET,
            "/api/method/frappe.tests.test_query_report.run",
            ""
        )));
        assert!(runs(classify(
            Method::GET,
            "/api/method/frappe.handler.ping",
            ""
        )));
        // Not a method of the set, nor a prefix of one.
        assert!(!runs(classify(
            Method::GET,
            "/api/method/frappe.desk.query_report.export_query",
            ""
        )));
        assert!(!runs(classify(
            Method::GET,
            "/api/method/frappe.desk.query_report",
            ""
        )));
        assert!(!runs(classify(Method::GET, "/api/resource/Report", "")));
        // A list read runs get_list.
        let lists = MethodSet::new(["frappe.client.get_list"]);
        assert!(lists.runs_any(&classify(Method::GET, "/api/resource/ToDo", "")));
    }

    #[test]
    fn v1_resources() {
        use Operation::*;
        let cases = [
            (
                Method::GET,
                "/api/resource/ToDo",
                "",
                res("ToDo", None, Read),
            ),
            (
                Method::POST,
                "/api/resource/ToDo",
                "",
                res("ToDo", None, Create),
            ),
            (
                Method::GET,
                "/api/v1/resource/Sales%20Order/SO-1",
                "",
                res("Sales Order", Some("SO-1"), Read),
            ),
            (
                Method::PUT,
                "/api/resource/ToDo/a/b",
                "",
                res("ToDo", Some("a/b"), Update),
            ),
            (
                Method::DELETE,
                "/api/resource/ToDo/x",
                "",
                res("ToDo", Some("x"), Delete),
            ),
            (
                Method::POST,
                "/api/resource/ToDo/x",
                "",
                res("ToDo", Some("x"), DocMethod),
            ),
            (
                Method::GET,
                "/api/resource/ToDo/x",
                "run_method=submit",
                res("ToDo", Some("x"), DocMethod),
            ),
            (
                Method::PATCH,
                "/api/resource/ToDo/x",
                "",
                res("ToDo", Some("x"), Unsupported),
            ),
            (
                Method::DELETE,
                "/api/resource/ToDo",
                "",
                res("ToDo", None, Unsupported),
            ),
        ];
        for (method, path, query, kind) in cases {
            let got = classify(method.clone(), path, query);
            assert_eq!(got.kind, kind, "{method} {path}?{query}");
            assert_eq!(got.api, Some(ApiVersion::V1));
        }
    }

    #[test]
    fn v2_resources() {
        use Operation::*;
        let cases = [
            (
                Method::GET,
                "/api/v2/document/ToDo",
                res("ToDo", None, Read),
            ),
            (
                Method::POST,
                "/api/v2/document/ToDo",
                res("ToDo", None, Create),
            ),
            (
                Method::GET,
                "/api/v2/document/ToDo/x/",
                res("ToDo", Some("x"), Read),
            ),
            (
                Method::PATCH,
                "/api/v2/document/ToDo/x",
                res("ToDo", Some("x"), Update),
            ),
            (
                Method::DELETE,
                "/api/v2/document/ToDo/x",
                res("ToDo", Some("x"), Delete),
            ),
            (
                Method::POST,
                "/api/v2/document/ToDo/x/method/submit",
                res("ToDo", Some("x"), DocMethod),
            ),
            (
                Method::GET,
                "/api/v2/doctype/ToDo/count",
                res("ToDo", None, Read),
            ),
            (
                Method::POST,
                "/api/v2/method/ToDo/do_thing",
                RequestKind::Method(MethodName::of_controller("ToDo", "do_thing")),
            ),
        ];
        for (method, path, kind) in cases {
            let got = classify(method.clone(), path, "");
            assert_eq!(got.kind, kind, "{method} {path}");
            assert_eq!(got.api, Some(ApiVersion::V2));
        }
    }

    #[test]
    fn methods_login_and_files() {
        let m = |s: &str| RequestKind::Method(MethodName::new(s));
        assert_eq!(
            classify(Method::GET, "/api/method/frappe.client.get_list", "").kind,
            m("frappe.client.get_list")
        );
        assert_eq!(
            classify(Method::GET, "/api/method/frappe.client.get_list/extra", "").kind,
            m("frappe.client.get_list")
        );
        assert_eq!(
            classify(Method::GET, "/api/method/ping", "").kind,
            m("frappe.handler.ping")
        );
        assert_eq!(
            classify(Method::GET, "/api/v2/method/ping", "").kind,
            m("frappe.handler.ping")
        );
        assert_eq!(
            classify(Method::POST, "/api/method/login", "").kind,
            RequestKind::Login
        );
        assert_eq!(
            classify(Method::POST, "/api/method/upload_file", "").kind,
            RequestKind::FileUpload
        );
        assert_eq!(
            classify(Method::GET, "/files/a.pdf", "").kind,
            RequestKind::FileDownload
        );
        assert_eq!(
            classify(Method::GET, "/private/files/a.pdf", "").kind,
            RequestKind::FileDownload
        );
        assert_eq!(
            classify(Method::GET, "/app/todo", "").kind,
            RequestKind::Other
        );
        assert_eq!(
            classify(Method::GET, "/api/nothing", "").kind,
            RequestKind::Other
        );
    }

    #[test]
    fn writes_are_told_from_reads() {
        let read_only = [
            MethodName::new("frappe.client.get_list")
                .as_str()
                .to_owned(),
            MethodName::new("ping").as_str().to_owned(),
        ]
        .into_iter()
        .collect();
        let w = |m: Method, p: &str, q: &str| classify(m.clone(), p, q).is_write(&m, &read_only);
        assert!(!w(Method::GET, "/api/resource/ToDo", ""));
        assert!(w(Method::POST, "/api/resource/ToDo", ""));
        assert!(w(Method::GET, "/api/resource/ToDo/x", "run_method=submit"));
        assert!(!w(Method::POST, "/api/method/frappe.client.get_list", ""));
        assert!(!w(Method::GET, "/api/method/ping", ""));
        assert!(w(Method::GET, "/api/method/frappe.client.insert", ""));
        assert!(w(
            Method::GET,
            "/api/resource/ToDo",
            "cmd=frappe.client.delete"
        ));
        assert!(!w(Method::GET, "/app/todo", ""));
        assert!(w(Method::POST, "/api/method/upload_file", ""));
    }

    #[test]
    fn cmd_off_api_is_the_request_and_on_api_is_checked_too() {
        let got = classify(Method::POST, "/", "cmd=frappe.client.insert");
        assert_eq!(
            got.kind,
            RequestKind::Method(MethodName::new("frappe.client.insert"))
        );
        assert!(got.embedded_methods.is_empty());

        let got = classify(
            Method::GET,
            "/api/resource/ToDo",
            "cmd=frappe.client.insert",
        );
        assert_eq!(got.kind, res("ToDo", None, Operation::Read));
        assert_eq!(
            got.embedded_methods,
            vec![MethodName::new("frappe.client.insert")]
        );

        // Under a non-empty JSON body Frappe does not read the query: its `cmd` is judged, but
        // the path is judged too, as what Frappe will route.
        let mut form = FormDict::from_urlencoded(b"cmd=frappe.client.get_list");
        form.shadow();
        form.merge(FormDict::from_json(r#"{"x": 1}"#).unwrap().0);
        let got = FrappeRequest::classify(
            &Method::GET,
            &CanonicalPath::parse("/app/user").unwrap(),
            &form,
        );
        assert_eq!(got.kind, RequestKind::Other);
        assert_eq!(
            got.embedded_methods,
            vec![MethodName::new("frappe.client.get_list")]
        );

        let got = classify(Method::GET, "/app", "cmd=login&cmd=x.y");
        assert_eq!(got.kind, RequestKind::Login);
        assert_eq!(got.embedded_methods, vec![MethodName::new("x.y")]);
    }
}
