//! Per-client access rules over classified Frappe requests: a client's capabilities.
//!
//! Rules only ever allow. Anything the classifier could not pin down (an unsupported verb, an
//! unread form body, an unknown path) falls outside every rule but `other`, so a mismatch
//! between how the gateway and Frappe read a request can only refuse, never grant. A method
//! rule grants a *function* (every alias of it, see `catalog`), and its arguments are judged by
//! [`Judge`] (`call.rs`), the one place a call's arguments are decided.

use std::collections::{HashMap, HashSet};

use super::call::{self, Capabilities, Grant, Judge};
use super::catalog::{ArgKind, Catalog};
use super::classify::{method_kind, FrappeRequest, MethodName, Operation, RequestKind};
use super::form_dict::{FormKey, FormValue};
use super::query_args;

pub use super::call::Denied;

/// An app method granted by exact name: its declared arguments' kinds, or `None` when it is
/// left to its own code.
pub type AppMethod<'a> = (&'a str, Option<&'a [(String, ArgKind)]>);

/// What a restricted client may do.
#[derive(Debug, Clone, Default)]
pub struct AccessRules {
    /// (lower-cased doctype or `*`, allowed operations). Frappe's database matches doctypes
    /// case-insensitively, so the rules do too.
    resources: Vec<(String, HashSet<Operation>)>,
    /// Each resource rule's doctype as first configured (what Frappe's metadata is asked for).
    spelled: HashMap<String, String>,
    /// Catalogued functions granted, by defining name.
    functions: HashSet<String>,
    /// Methods outside the catalog with declared arguments.
    declared: HashMap<String, Vec<(String, ArgKind)>>,
    /// Methods outside the catalog left to their own code, exact.
    own_code: HashSet<String>,
    /// `prefix.*` rules over namespaces outside the catalog, stored as `prefix.`.
    method_prefixes: Vec<String>,
    files: bool,
    other: bool,
    /// Judge SQL-fragment arguments with [`query_args`]. On unless the client's config turns
    /// it off.
    unchecked_query_arguments: bool,
}

/// An unknown operation name in a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown operation '{0}' (expected read, create, update, delete, doc_method, write or all)"
)]
pub struct UnknownOperation(pub String);

/// A method rule that cannot be granted as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MethodRuleError {
    #[error(
        "'{0}' grants a namespace the capability catalog covers: list the functions it should \
         grant by exact name (each is then judged by its arguments)"
    )]
    PrefixOverCatalog(String),
    #[error(
        "'{0}' is not a whitelisted function of the catalog ({1}): grant an app's own method with \
         its arguments declared ({{ name: {0}, args: {{ arg: kind }} }}) or with \
         judged_by_its_own_code: true"
    )]
    NotCatalogued(String, String),
    #[error("'{name}' ({function}) is never allowed to a restricted client: {reason}")]
    AlwaysRefused {
        name: String,
        function: String,
        reason: String,
    },
    #[error("'{0}' is in the capability catalog: grant it by name, its arguments' kinds come from the catalog")]
    Catalogued(String),
    #[error("login is never allowed through the gateway")]
    Login,
}

/// Parses an operation name from config; `write` is create + update + delete, `all` everything.
pub fn parse_operations(name: &str) -> Result<Vec<Operation>, UnknownOperation> {
    use Operation::*;
    Ok(match name {
        "read" => vec![Read],
        "create" => vec![Create],
        "update" => vec![Update],
        "delete" => vec![Delete],
        "doc_method" => vec![DocMethod],
        "write" => vec![Create, Update, Delete],
        "all" => vec![Read, Create, Update, Delete, DocMethod],
        other => return Err(UnknownOperation(other.to_owned())),
    })
}

impl AccessRules {
    /// Allows `operations` on `doctype` (`*` for every doctype).
    pub fn allow_resource(
        &mut self,
        doctype: &str,
        operations: impl IntoIterator<Item = Operation>,
    ) {
        let key = doctype.to_lowercase();
        self.spelled
            .entry(key.clone())
            .or_insert_with(|| doctype.to_owned());
        match self.resources.iter_mut().find(|(d, _)| *d == key) {
            Some((_, ops)) => ops.extend(operations),
            None => self.resources.push((key, operations.into_iter().collect())),
        }
    }

    /// Allows a catalogued function by any of its names, or every method under `prefix.*` of a
    /// namespace the catalog does not cover (left to those methods' own code).
    pub fn allow_method(&mut self, rule: &str) -> Result<(), MethodRuleError> {
        let catalog = Catalog::get();
        if let Some(prefix) = rule.strip_suffix('*').filter(|p| p.ends_with('.')) {
            if catalog.covers(prefix.trim_end_matches('.')) {
                return Err(MethodRuleError::PrefixOverCatalog(rule.to_owned()));
            }
            self.method_prefixes.push(prefix.to_owned());
            return Ok(());
        }
        let name = MethodName::new(rule);
        if name.as_str() == "login" {
            return Err(MethodRuleError::Login);
        }
        let Some(function) = call::resolve(name.as_str()) else {
            return Err(MethodRuleError::NotCatalogued(
                rule.to_owned(),
                catalog.sources.join("; "),
            ));
        };
        if let Some(reason) = function.review.as_ref().and_then(|r| r.refused.clone()) {
            return Err(MethodRuleError::AlwaysRefused {
                name: rule.to_owned(),
                function: function.name.clone(),
                reason,
            });
        }
        self.functions.insert(function.name.clone());
        Ok(())
    }

    /// Allows a method outside the catalog: with its arguments' kinds declared, or (`None`)
    /// left to its own code.
    pub fn allow_app_method(
        &mut self,
        name: &str,
        args: Option<Vec<(String, ArgKind)>>,
    ) -> Result<(), MethodRuleError> {
        let name = MethodName::new(name);
        if name.as_str() == "login" {
            return Err(MethodRuleError::Login);
        }
        if call::resolve(name.as_str()).is_some() {
            return Err(MethodRuleError::Catalogued(name.as_str().to_owned()));
        }
        match args {
            Some(args) => {
                self.declared.insert(name.as_str().to_owned(), args);
            }
            None => {
                self.own_code.insert(name.as_str().to_owned());
            }
        }
        Ok(())
    }

    /// Allows file uploads and downloads.
    pub fn allow_files(&mut self, yes: bool) {
        self.files = yes;
    }

    /// Allows paths that are neither resources, methods nor files (desk, website pages).
    pub fn allow_other(&mut self, yes: bool) {
        self.other = yes;
    }

    /// Leaves SQL-fragment arguments (`fields`, `filters`, ...) unjudged, at the price of the
    /// protection.
    pub fn leave_query_arguments_unchecked(&mut self, yes: bool) {
        self.unchecked_query_arguments = yes;
    }

    /// Whether the rules let this client read `doctype`.
    pub fn may_read(&self, doctype: &str) -> bool {
        self.resource(doctype, Operation::Read).is_ok()
    }

    /// The doctypes named in resource rules (not `*`), as configured, with the operations
    /// granted on each (a `*` rule's included), sorted by name.
    pub fn granted_resources(&self) -> Vec<(&str, Vec<Operation>)> {
        let mut granted: Vec<(&str, Vec<Operation>)> = self
            .resources
            .iter()
            .filter(|(d, _)| d != "*")
            .map(|(d, _)| {
                let ops = [
                    Operation::Read,
                    Operation::Create,
                    Operation::Update,
                    Operation::Delete,
                    Operation::DocMethod,
                ]
                .into_iter()
                .filter(|op| self.resource(d, *op).is_ok())
                .collect();
                (self.spelled.get(d).map_or(d.as_str(), String::as_str), ops)
            })
            .collect();
        granted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        granted
    }

    /// Methods outside the catalog granted by exact name: with their declared arguments, or
    /// `None` when left to their own code; sorted. (`prefix.*` rules name no method.)
    pub fn granted_app_methods(&self) -> Vec<AppMethod<'_>> {
        let mut methods: Vec<AppMethod<'_>> = self
            .declared
            .iter()
            .map(|(name, args)| (name.as_str(), Some(args.as_slice())))
            .chain(self.own_code.iter().map(|name| (name.as_str(), None)))
            .collect();
        methods.sort_unstable_by(|a, b| a.0.cmp(b.0));
        methods
    }

    /// The catalogued functions granted, by defining name, sorted.
    pub fn granted_functions(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.functions.iter().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Decides a request: what its path asks, every method it makes Frappe run with every
    /// argument each receives, and a resource list's query arguments.
    pub fn check(&self, request: &FrappeRequest) -> Result<(), Denied> {
        self.check_kind(&request.kind)?;
        if request
            .embedded_methods
            .iter()
            .any(|m| m.as_str() == "login")
        {
            return Err(Denied::Login);
        }
        let judge = Judge::new(self, request.form_incomplete);
        for method in request.methods() {
            judge.call(method.as_str(), &request.form)?;
        }
        match &request.kind {
            RequestKind::Method(_) => Ok(()),
            // A document body erpgate did not read could say anything (`docstatus`, a parent).
            RequestKind::Resource {
                operation: Operation::Create | Operation::Update,
                ..
            } if request.unread_body => Err(Denied::UnreadBody),
            // The document a create or update writes: what it submits, the parent it saves,
            // the child rows and the doctype it names (`api/v1.py`, `api/v2.py` `create_doc`,
            // `update_doc`).
            RequestKind::Resource {
                doctype,
                operation: operation @ (Operation::Create | Operation::Update),
                ..
            } => judge.written_document(doctype, *operation, &request.form),
            // `upload_file` is granted by `files`; what it receives is judged like any call.
            RequestKind::FileUpload => match call::resolve("frappe.handler.upload_file") {
                Some(upload) => judge.granted_function(upload, &request.form),
                None => Err(Denied::Files),
            },
            // A list or count runs a function over the request's arguments, its doctype the
            // path's (judged above).
            RequestKind::Resource { .. } if request.implied_call.is_some() => {
                match request.implied_call.and_then(call::resolve) {
                    Some(function) => judge.granted_function(function, &request.form),
                    None => Err(Denied::Other),
                }
            }
            _ if self.unchecked_query_arguments => Ok(()),
            _ => {
                let readable = |doctype: &str| self.may_read(doctype);
                Ok(query_args::check(&request.form, &readable)?)
            }
        }
    }

    /// What one `form_dict` entry is refused for whatever else the request carries: a `cmd`
    /// naming a method the rules refuse (every `cmd` in any carrier must be allowed, see
    /// [`Self::check`]). A multipart field after a file part is judged by this once, when it
    /// completes; the whole request is judged by [`Self::check`] once the body is complete,
    /// before Frappe could read any of it. Nothing refused here would be allowed there.
    pub fn check_entry(&self, key: FormKey, value: &FormValue) -> Result<(), Denied> {
        match key {
            FormKey::Cmd => match method_kind(&value.text()) {
                RequestKind::Login => Err(Denied::Login),
                // Standing for the path it needs `files`; embedded, the method rule.
                RequestKind::FileUpload => self
                    .check_kind(&RequestKind::FileUpload)
                    .or_else(|_| self.check_method(&MethodName::new("upload_file"))),
                kind => self.check_kind(&kind),
            },
            _ => Ok(()),
        }
    }

    fn check_kind(&self, kind: &RequestKind) -> Result<(), Denied> {
        match kind {
            RequestKind::Resource {
                doctype, operation, ..
            } => self.resource(doctype, *operation),
            RequestKind::Method(method) => self.check_method(method),
            RequestKind::FileUpload | RequestKind::FileDownload => {
                self.files.then_some(()).ok_or(Denied::Files)
            }
            RequestKind::Login => Err(Denied::Login),
            RequestKind::Other => self.other.then_some(()).ok_or(Denied::Other),
        }
    }

    fn check_method(&self, method: &MethodName) -> Result<(), Denied> {
        self.grant(method.as_str())
            .map(|_| ())
            .ok_or_else(|| Denied::Method(method.as_str().to_owned()))
    }
}

impl Capabilities for AccessRules {
    fn resource(&self, doctype: &str, operation: Operation) -> Result<(), Denied> {
        let key = doctype.to_lowercase();
        let allowed = self
            .resources
            .iter()
            .filter(|(d, _)| *d == key || d == "*")
            .any(|(_, ops)| ops.contains(&operation));
        allowed.then_some(()).ok_or_else(|| Denied::Resource {
            doctype: doctype.to_owned(),
            operation: operation.as_str(),
        })
    }

    fn grant(&self, name: &str) -> Option<Grant<'_>> {
        let name = MethodName::new(name);
        let name = name.as_str();
        if let Some(function) = call::resolve(name) {
            return self
                .functions
                .contains(&function.name)
                .then_some(Grant::Function(function));
        }
        // A doctype controller's function the catalog does not know: no app rule can name it
        // (a prefix must not match `doctype/attr`), so it is not granted.
        if name.contains('/') {
            return None;
        }
        if let Some(args) = self.declared.get(name) {
            return Some(Grant::Declared(args));
        }
        let own = self.own_code.contains(name)
            || self
                .method_prefixes
                .iter()
                .any(|p| name.starts_with(p.as_str()));
        own.then_some(Grant::OwnCode)
    }

    fn judges_fragments(&self) -> bool {
        !self.unchecked_query_arguments
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frappe::form_dict::FormDict;
    use crate::frappe::path::CanonicalPath;
    use http::Method;

    fn req(method: Method, path: &str, query: &str) -> FrappeRequest {
        FrappeRequest::classify(
            &method,
            &CanonicalPath::parse(path).unwrap(),
            &FormDict::from_urlencoded(query.as_bytes()),
        )
    }

    fn todo_reader() -> AccessRules {
        let mut rules = AccessRules::default();
        rules.allow_resource("ToDo", parse_operations("read").unwrap());
        rules.allow_method("frappe.client.get_list").unwrap();
        rules.allow_method("myapp.api.*").unwrap();
        rules
    }

    #[test]
    fn resources_by_doctype_and_operation() {
        let rules = todo_reader();
        assert!(rules
            .check(&req(Method::GET, "/api/resource/ToDo", ""))
            .is_ok());
        assert!(rules
            .check(&req(Method::GET, "/api/resource/todo/x", ""))
            .is_ok());
        assert!(rules
            .check(&req(Method::GET, "/api/v2/document/%54oDo", ""))
            .is_ok());
        assert!(rules
            .check(&req(Method::POST, "/api/resource/ToDo", ""))
            .is_err());
        assert!(rules
            .check(&req(Method::GET, "/api/resource/User", ""))
            .is_err());
        assert!(rules
            .check(&req(
                Method::GET,
                "/api/resource/ToDo/x",
                "run_method=delete"
            ))
            .is_err());
    }

    #[test]
    fn methods_exact_and_prefix() {
        let rules = todo_reader();
        assert!(rules
            .check(&req(
                Method::GET,
                "/api/method/frappe.client.get_list",
                "doctype=ToDo"
            ))
            .is_ok());
        assert!(rules
            .check(&req(Method::GET, "/api/method/myapp.api.orders.list", ""))
            .is_ok());
        assert!(rules
            .check(&req(Method::GET, "/api/method/myapp.apix", ""))
            .is_err());
        assert!(rules
            .check(&req(Method::GET, "/api/method/frappe.client.insert", ""))
            .is_err());
        assert!(rules
            .check(&req(Method::POST, "/", "cmd=frappe.client.insert"))
            .is_err());
        assert!(rules
            .check(&req(
                Method::GET,
                "/api/resource/ToDo",
                "cmd=frappe.client.insert"
            ))
            .is_err());
        assert!(rules
            .check(&req(Method::POST, "/api/method/login", ""))
            .is_err());
        assert!(rules.check(&req(Method::GET, "/app/todo", "")).is_err());
        assert!(rules.check(&req(Method::GET, "/files/x.pdf", "")).is_err());
    }

    #[test]
    fn generic_methods_need_the_rule_for_their_doctype() {
        let rules = todo_reader();
        let get_list = "/api/method/frappe.client.get_list";
        assert!(rules
            .check(&req(Method::GET, get_list, "doctype=ToDo"))
            .is_ok());
        assert!(rules
            .check(&req(Method::GET, get_list, "doctype=todo"))
            .is_ok());
        assert_eq!(
            rules.check(&req(Method::GET, get_list, "doctype=User")),
            Err(Denied::Resource {
                doctype: "User".into(),
                operation: "read"
            })
        );
        assert!(matches!(
            rules.check(&req(Method::GET, get_list, "")),
            Err(Denied::DoctypeUnknown(_))
        ));
        assert!(rules
            .check(&req(Method::GET, get_list, "doctype=ToDo&parent=User"))
            .is_err());
        // The same through a `cmd`.
        assert!(rules
            .check(&req(
                Method::GET,
                "/",
                "cmd=frappe.client.get_list&doctype=User"
            ))
            .is_err());
        let mut writer = todo_reader();
        writer.allow_method("frappe.client.insert").unwrap();
        let insert = |doc: &str| {
            let doc: String = form_urlencoded::byte_serialize(doc.as_bytes()).collect();
            req(
                Method::POST,
                "/api/method/frappe.client.insert",
                &format!("doc={doc}"),
            )
        };
        assert!(writer.check(&insert(r#"{"doctype": "ToDo"}"#)).is_err());
        writer.allow_resource("ToDo", parse_operations("create").unwrap());
        assert!(writer.check(&insert(r#"{"doctype": "ToDo"}"#)).is_ok());
        assert!(writer.check(&insert(r#"{"doctype": "User"}"#)).is_err());
    }

    #[test]
    fn a_child_rows_insert_needs_update_on_the_parent_it_saves() {
        let mut rules = todo_reader();
        rules.allow_method("frappe.client.insert").unwrap();
        rules.allow_method("frappe.client.insert_many").unwrap();
        rules.allow_resource("Has Role", parse_operations("create").unwrap());
        let call = |method: &str, key: &str, json: &str| {
            let value: String = form_urlencoded::byte_serialize(json.as_bytes()).collect();
            req(
                Method::POST,
                &format!("/api/method/{method}"),
                &format!("{key}={value}"),
            )
        };
        // The attack: a row of a table the client may create, appended to a User and saved.
        let row = r#"{"doctype": "Has Role", "parenttype": "User", "parent": "a@b.c", "parentfield": "roles", "role": "System Manager"}"#;
        assert_eq!(
            rules.check(&call("frappe.client.insert", "doc", row)),
            Err(Denied::Resource {
                doctype: "User".into(),
                operation: "update"
            })
        );
        let rows = format!(r#"[{{"doctype": "Has Role"}}, {row}]"#);
        assert!(rules
            .check(&call("frappe.client.insert_many", "docs", &rows))
            .is_err());
        // A parenttype that cannot be read is no parenttype at all.
        let odd = r#"{"doctype": "Has Role", "parenttype": ["User"]}"#;
        assert!(matches!(
            rules.check(&call("frappe.client.insert", "doc", odd)),
            Err(Denied::Argument { argument, .. }) if argument == "doc"
        ));
        // Allowed to update the parent, the row goes; a top-level document names none.
        rules.allow_resource("User", parse_operations("update").unwrap());
        assert!(rules
            .check(&call("frappe.client.insert", "doc", row))
            .is_ok());
        let top = r#"{"doctype": "Has Role", "parenttype": null}"#;
        assert!(rules
            .check(&call("frappe.client.insert", "doc", top))
            .is_ok());
    }

    #[test]
    fn what_cannot_be_read_or_named_is_refused() {
        let mut rules = todo_reader();
        rules.allow_resource("ToDo", parse_operations("write").unwrap());
        // A v1 create's `data` that CPython could read and erpgate cannot (malformed, too deep).
        let deep = format!(
            r#"{{"parenttype": "User", "x": {}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        for data in [r#"{"parenttype": "User""#.to_owned(), deep] {
            let data: String = form_urlencoded::byte_serialize(data.as_bytes()).collect();
            let create = req(Method::POST, "/api/resource/ToDo", &format!("data={data}"));
            assert!(matches!(rules.check(&create), Err(Denied::Argument { .. })));
        }
        // Plain text is no document (v1 falls back to form_dict): judged as the form.
        assert!(rules
            .check(&req(
                Method::POST,
                "/api/resource/ToDo",
                "data=hello&description=x"
            ))
            .is_ok());
        assert!(rules
            .check(&req(Method::POST, "/api/resource/ToDo", "parenttype=User"))
            .is_err());
        // A prefix rule never matches a controller route it cannot resolve.
        assert_eq!(
            rules.check(&req(Method::POST, "/api/v2/method/myapp.api/x", "")),
            Err(Denied::Method("myapp.api/x".into()))
        );
    }

    #[test]
    fn unknown_operation_is_an_error() {
        assert_eq!(
            parse_operations("rread"),
            Err(UnknownOperation("rread".into()))
        );
    }
}
