//! Per-client access rules over classified Frappe requests.
//!
//! Rules only ever allow. Anything the classifier could not pin down (an unsupported verb, an
//! unread form body, an unknown path) falls outside every rule but `other`, so a mismatch
//! between how the gateway and Frappe read a request can only refuse, never grant.

use std::collections::HashSet;

use super::classify::{method_kind, FrappeRequest, MethodName, Operation, RequestKind};
use super::doctype_methods;
use super::form_dict::{FormDict, FormKey, FormValue};
use super::query_args::{self, RefusedArgument};

/// `frappe.client.get_value` reads the columns named by `fieldname` (`frappe/client.py`); other
/// methods use `fieldname` for other things (`set_value` takes a dict of values).
const GET_VALUE: &str = "frappe.client.get_value";

/// What a restricted client may do.
#[derive(Debug, Clone, Default)]
pub struct AccessRules {
    /// (lower-cased doctype or `*`, allowed operations). Frappe's database matches doctypes
    /// case-insensitively, so the rules do too.
    resources: Vec<(String, HashSet<Operation>)>,
    exact_methods: HashSet<String>,
    /// `prefix.*` rules, stored as `prefix.`.
    method_prefixes: Vec<String>,
    files: bool,
    other: bool,
    /// Judge `fields`, `filters`, `or_filters`, `order_by`, `group_by` (and `fieldname` of
    /// `get_value`) with [`query_args`]. On unless the client's config turns it off.
    unchecked_query_arguments: bool,
}

/// Why a request was refused; said to the client, so it names only what the client sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("not allowed to {operation} {doctype}")]
    Resource {
        doctype: String,
        operation: &'static str,
    },
    #[error("not allowed to call {0}")]
    Method(String),
    #[error("not allowed to access files")]
    Files,
    #[error("not allowed to log in through the gateway")]
    Login,
    #[error("not allowed to access this path")]
    Other,
    #[error(transparent)]
    QueryArgument(#[from] RefusedArgument),
    #[error("{0} needs a doctype the gateway can read from its arguments")]
    DoctypeUnknown(String),
}

/// An unknown operation name in a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown operation '{0}' (expected read, create, update, delete, doc_method, write or all)"
)]
pub struct UnknownOperation(pub String);

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
        match self.resources.iter_mut().find(|(d, _)| *d == key) {
            Some((_, ops)) => ops.extend(operations),
            None => self.resources.push((key, operations.into_iter().collect())),
        }
    }

    /// Allows a method by exact name, or every method under `prefix.*`.
    pub fn allow_method(&mut self, rule: &str) {
        match rule.strip_suffix('*') {
            Some(prefix) if prefix.ends_with('.') => self.method_prefixes.push(prefix.to_owned()),
            _ => {
                self.exact_methods
                    .insert(MethodName::new(rule).as_str().to_owned());
            }
        }
    }

    /// Allows file uploads and downloads.
    pub fn allow_files(&mut self, yes: bool) {
        self.files = yes;
    }

    /// Allows paths that are neither resources, methods nor files (desk, website pages).
    pub fn allow_other(&mut self, yes: bool) {
        self.other = yes;
    }

    /// Leaves list arguments (`fields`, `filters`, ...) unjudged: for clients whose own methods
    /// take arguments of those names in other shapes, at the price of the protection.
    pub fn leave_query_arguments_unchecked(&mut self, yes: bool) {
        self.unchecked_query_arguments = yes;
    }

    /// Whether the rules let this client read `doctype`.
    pub fn may_read(&self, doctype: &str) -> bool {
        let key = doctype.to_lowercase();
        self.resources
            .iter()
            .filter(|(d, _)| *d == key || d == "*")
            .any(|(_, ops)| ops.contains(&Operation::Read))
    }

    /// Decides a request: what its path asks, every embedded method, and its list arguments.
    pub fn check(&self, request: &FrappeRequest) -> Result<(), Denied> {
        self.check_kind(&request.kind)?;
        for method in &request.embedded_methods {
            if method.as_str() == "login" {
                return Err(Denied::Login);
            }
            self.check_method(method)?;
        }
        for method in request.methods() {
            self.check_doctype_method(method, request)?;
        }
        if self.unchecked_query_arguments {
            return Ok(());
        }
        let readable = |doctype: &str| self.may_read(doctype);
        query_args::check(&request.form, &readable)?;
        if request.methods().any(|m| m.as_str() == GET_VALUE) {
            for value in request.form.values(FormKey::Fieldname) {
                query_args::check_fieldname(value, &readable)?;
            }
        }
        Ok(())
    }

    /// What one `form_dict` entry is refused for whatever else the request carries: a `cmd`
    /// naming a method the rules refuse (every `cmd` in any carrier must be allowed, see
    /// [`Self::check`]), or a list argument outside the query grammar (judged on every entry).
    /// A multipart field after a file part is judged by this once, when it completes; the
    /// whole request is judged by [`Self::check`] once the body is complete, before Frappe
    /// could read any of it. Nothing refused here would be allowed there.
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
            FormKey::Fields
            | FormKey::Filters
            | FormKey::OrFilters
            | FormKey::OrderBy
            | FormKey::GroupBy
                if !self.unchecked_query_arguments =>
            {
                let mut one = FormDict::default();
                one.push(key.as_str(), || value.clone());
                query_args::check(&one, &|doctype: &str| self.may_read(doctype))?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A generic method (`frappe.client.get_list`, `insert`, ...) also needs the resource rule
    /// for each doctype it names and its parent doctype's read rule (its `query` method is an
    /// embedded method, judged like any other).
    fn check_doctype_method(
        &self,
        method: &MethodName,
        request: &FrappeRequest,
    ) -> Result<(), Denied> {
        let Some(generic) = doctype_methods::lookup(method.as_str()) else {
            return Ok(());
        };
        let doctypes = match generic.doctypes(&request.form) {
            Some(doctypes) => doctypes,
            None if request.form_incomplete => Vec::new(),
            None => return Err(Denied::DoctypeUnknown(method.as_str().to_owned())),
        };
        for doctype in &doctypes {
            for &operation in generic.operations {
                self.check_kind(&RequestKind::Resource {
                    doctype: doctype.clone(),
                    name: None,
                    operation,
                })?;
            }
        }
        // A child-table row names the document its insert saves.
        let saved_parents = generic
            .parent_doctypes(&request.form)
            .ok_or_else(|| Denied::DoctypeUnknown(method.as_str().to_owned()))?;
        for parent in saved_parents {
            self.check_kind(&RequestKind::Resource {
                doctype: parent,
                name: None,
                operation: Operation::Update,
            })?;
        }
        for parent in request.form.values(FormKey::Parent) {
            let parent = parent
                .as_plain_text()
                .ok_or_else(|| Denied::DoctypeUnknown(method.as_str().to_owned()))?;
            self.check_kind(&RequestKind::Resource {
                doctype: parent.to_owned(),
                name: None,
                operation: Operation::Read,
            })?;
        }
        Ok(())
    }

    fn check_kind(&self, kind: &RequestKind) -> Result<(), Denied> {
        match kind {
            RequestKind::Resource {
                doctype, operation, ..
            } => {
                let key = doctype.to_lowercase();
                let allowed = self
                    .resources
                    .iter()
                    .filter(|(d, _)| *d == key || d == "*")
                    .any(|(_, ops)| ops.contains(operation));
                allowed.then_some(()).ok_or_else(|| Denied::Resource {
                    doctype: doctype.clone(),
                    operation: operation.as_str(),
                })
            }
            RequestKind::Method(method) => self.check_method(method),
            RequestKind::FileUpload | RequestKind::FileDownload => {
                self.files.then_some(()).ok_or(Denied::Files)
            }
            RequestKind::Login => Err(Denied::Login),
            RequestKind::Other => self.other.then_some(()).ok_or(Denied::Other),
        }
    }

    fn check_method(&self, method: &MethodName) -> Result<(), Denied> {
        let name = method.as_str();
        let allowed = self.exact_methods.contains(name)
            || self
                .method_prefixes
                .iter()
                .any(|p| name.starts_with(p.as_str()));
        allowed
            .then_some(())
            .ok_or_else(|| Denied::Method(name.to_owned()))
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
        rules.allow_method("frappe.client.get_list");
        rules.allow_method("myapp.api.*");
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
        writer.allow_method("frappe.client.insert");
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
        rules.allow_method("frappe.client.insert");
        rules.allow_method("frappe.client.insert_many");
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
            Err(Denied::DoctypeUnknown(_))
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
    fn unknown_operation_is_an_error() {
        assert_eq!(
            parse_operations("rread"),
            Err(UnknownOperation("rread".into()))
        );
    }
}
