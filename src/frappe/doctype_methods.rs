//! Generic methods that act on a doctype named in their arguments.
//!
//! `frappe/client.py`, `frappe/desk/reportview.py`, `frappe/desk/search.py` and
//! `frappe/desk/form/*.py` expose whitelisted methods such as `frappe.client.get_list(doctype,
//! ...)` or `frappe.client.insert(doc)`: the method name says nothing about which documents it
//! touches, so a client allowed `frappe.client.get_list` for `Item` could list `User` with it.
//! For a restricted client, a call to one of these methods therefore needs, besides the method
//! rule, the resource rule for every doctype it names and the operation it performs; a call
//! whose doctype cannot be read from its arguments is refused. Frappe's own checks still apply
//! behind that, except where it has none: `frappe.client.get_count` checks no permission at all
//! in Frappe 15.
//!
//! Where the doctype comes from (Frappe 15 signatures):
//! - an argument: `doctype` (`get_list`, `get_count`, `get`, `get_value`, `get_single_value`,
//!   `set_value`, `rename_doc`, `cancel`, `delete`, `has_permission`, `get_doc_permissions`,
//!   `get_password`, `is_document_amended`, `validate_link`, `attach_file`, reportview's `get`,
//!   `get_count`, `get_list`, `export_query`, `delete_items`, `get_stats`, search's
//!   `search_link`, `search_widget`, form `getdoc`, `getdoctype`);
//! - the `doctype` key of the `doc` argument (`insert`, `save`, `submit`, form `savedocs`);
//! - the `doctype` key of every document in `docs` (`insert_many`, `bulk_update`).
//!
//! `parent` (the parent doctype of a child-table read) must be readable too, and the `query`
//! argument of `search_link` / `search_widget` names a whitelisted method Frappe calls
//! (`frappe.call(query, ...)`), so it must be an allowed method.

use super::classify::Operation;
use super::form_dict::{FormDict, FormKey, FormValue};
use super::python_json::{self, PyJson};

/// Where a method finds its doctype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoctypeSource {
    /// The `doctype` argument.
    Argument,
    /// `doc["doctype"]`.
    Doc,
    /// `d["doctype"]` for every `d` in `docs`.
    Docs,
}

/// A generic doctype method: what it does, and where its doctype is.
#[derive(Debug, Clone, Copy)]
pub struct DoctypeMethod {
    /// Canonical dotted name.
    pub name: &'static str,
    /// Every operation the call needs on its doctype.
    pub operations: &'static [Operation],
    /// Where the doctype is.
    pub source: DoctypeSource,
    /// Whether its `query` argument is a method Frappe calls.
    pub calls_query: bool,
}

const fn method(
    name: &'static str,
    operations: &'static [Operation],
    source: DoctypeSource,
) -> DoctypeMethod {
    DoctypeMethod {
        name,
        operations,
        source,
        calls_query: false,
    }
}

use DoctypeSource::{Argument, Doc, Docs};
use Operation::{Create, Delete, Read, Update};

/// The generic methods of Frappe 15 that a restricted client could reach by name.
pub const DOCTYPE_METHODS: &[DoctypeMethod] = &[
    method("frappe.client.get_list", &[Read], Argument),
    method("frappe.client.get_count", &[Read], Argument),
    method("frappe.client.get", &[Read], Argument),
    method("frappe.client.get_value", &[Read], Argument),
    method("frappe.client.get_single_value", &[Read], Argument),
    method("frappe.client.has_permission", &[Read], Argument),
    method("frappe.client.get_doc_permissions", &[Read], Argument),
    method("frappe.client.get_password", &[Read], Argument),
    method("frappe.client.is_document_amended", &[Read], Argument),
    method("frappe.client.validate_link", &[Read], Argument),
    method("frappe.client.set_value", &[Update], Argument),
    method("frappe.client.rename_doc", &[Update], Argument),
    method("frappe.client.cancel", &[Update], Argument),
    method("frappe.client.attach_file", &[Update], Argument),
    method("frappe.client.delete", &[Delete], Argument),
    method("frappe.client.insert", &[Create], Doc),
    method("frappe.client.save", &[Update], Doc),
    method("frappe.client.submit", &[Update], Doc),
    method("frappe.client.insert_many", &[Create], Docs),
    method("frappe.client.bulk_update", &[Update], Docs),
    method("frappe.desk.reportview.get", &[Read], Argument),
    method("frappe.desk.reportview.get_count", &[Read], Argument),
    method("frappe.desk.reportview.get_list", &[Read], Argument),
    method("frappe.desk.reportview.export_query", &[Read], Argument),
    method("frappe.desk.reportview.get_stats", &[Read], Argument),
    method("frappe.desk.reportview.delete_items", &[Delete], Argument),
    DoctypeMethod {
        calls_query: true,
        ..method("frappe.desk.search.search_link", &[Read], Argument)
    },
    DoctypeMethod {
        calls_query: true,
        ..method("frappe.desk.search.search_widget", &[Read], Argument)
    },
    method("frappe.desk.form.load.getdoc", &[Read], Argument),
    method("frappe.desk.form.load.getdoctype", &[Read], Argument),
    method("frappe.desk.form.save.savedocs", &[Create, Update], Doc),
    method("frappe.desk.form.save.cancel", &[Update], Argument),
];

/// The generic doctype method named `name`, if it is one.
pub fn lookup(name: &str) -> Option<&'static DoctypeMethod> {
    DOCTYPE_METHODS.iter().find(|m| m.name == name)
}

impl DoctypeMethod {
    /// Every doctype a call names in `form` (all carriers: each must be allowed), or `None`
    /// when Frappe will not read one (no argument in the carrier Frappe reads, a `doc` that is
    /// not a JSON object with a string `doctype`).
    pub fn doctypes(&self, form: &FormDict) -> Option<Vec<String>> {
        let key = match self.source {
            DoctypeSource::Argument => FormKey::Doctype,
            DoctypeSource::Doc => FormKey::Doc,
            DoctypeSource::Docs => FormKey::Docs,
        };
        form.read_by_frappe(key).next()?;
        let mut found = Vec::new();
        match self.source {
            DoctypeSource::Argument => {
                for value in form.values(FormKey::Doctype) {
                    found.push(value.as_plain_text()?.to_owned());
                }
            }
            DoctypeSource::Doc => {
                for value in form.values(FormKey::Doc) {
                    found.push(doctype_of(&json_of(value)?)?);
                }
            }
            DoctypeSource::Docs => {
                // Every `docs` in every carrier is read: which one Frappe keeps (a JSON body's
                // last repeat, a form value over the query's) is not erpgate's guess to make.
                for value in form.values(FormKey::Docs) {
                    match json_of(value)? {
                        PyJson::Array(docs) => {
                            for doc in &docs {
                                found.push(doctype_of(doc)?);
                            }
                        }
                        _ => return None,
                    }
                }
                // Only lists that are all empty name nothing, and insert nothing.
                return Some(found);
            }
        }
        (!found.is_empty()).then_some(found)
    }
}

impl DoctypeMethod {
    /// The parent doctypes a call's documents name (`parenttype`), each saved by the call:
    /// `frappe/client.py` `insert_doc` inserts a child-table row by
    /// `frappe.get_doc(doc.parenttype, doc.parent)`, appending the row and `parent.save()`, so
    /// a client allowed to create rows of a child table would otherwise update any document
    /// of any doctype. erpgate cannot tell a child table from its name, so every document with
    /// a `parenttype` counts (`null` or absent: none). `None` when one cannot be read (a
    /// `parenttype` that is not a string, a `doc` that is not JSON): the call is refused.
    pub fn parent_doctypes(&self, form: &FormDict) -> Option<Vec<String>> {
        let key = match self.source {
            DoctypeSource::Argument => return Some(Vec::new()),
            DoctypeSource::Doc => FormKey::Doc,
            DoctypeSource::Docs => FormKey::Docs,
        };
        let mut found = Vec::new();
        for value in form.values(key) {
            let json = json_of(value)?;
            let docs = match (&json, self.source) {
                (PyJson::Array(docs), DoctypeSource::Docs) => docs.as_slice(),
                (doc, DoctypeSource::Doc) => std::slice::from_ref(doc),
                _ => return None,
            };
            for doc in docs {
                let PyJson::Object(members) = doc else {
                    return None;
                };
                // The last `parenttype` member is the one a Python dict keeps.
                match members.iter().rev().find(|m| m.key == "parenttype") {
                    None => {}
                    Some(m) => match &m.value {
                        PyJson::Null => {}
                        PyJson::Str(parent) => found.push(parent.clone()),
                        _ => return None,
                    },
                }
            }
        }
        Some(found)
    }
}

/// A `doc` argument as Frappe reads it: a JSON string is parsed (`frappe.parse_json`), a JSON
/// body member is taken as it is.
fn json_of(value: &FormValue) -> Option<PyJson> {
    match value {
        FormValue::Text(s) | FormValue::Json(PyJson::Str(s)) => python_json::loads(s).ok(),
        FormValue::Json(v) => Some(v.clone()),
    }
}

fn doctype_of(doc: &PyJson) -> Option<String> {
    match doc {
        // The last `doctype` member is the one a Python dict keeps.
        PyJson::Object(members) => members
            .iter()
            .rev()
            .find(|m| m.key == "doctype")
            .and_then(|m| m.value.as_str())
            .map(str::to_owned),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(query: &str) -> FormDict {
        FormDict::from_urlencoded(query.as_bytes())
    }

    #[test]
    fn doctypes_are_read_from_every_kind_of_argument() {
        let get_list = lookup("frappe.client.get_list").unwrap();
        assert_eq!(
            get_list.doctypes(&form("doctype=User&fields=name")),
            Some(vec!["User".into()])
        );
        assert_eq!(get_list.doctypes(&form("fields=name")), None);
        assert_eq!(
            get_list.doctypes(&form("doctype=Item&doctype=User")),
            Some(vec!["Item".into(), "User".into()])
        );
        let insert = lookup("frappe.client.insert").unwrap();
        let doc = form_urlencoded::byte_serialize(br#"{"doctype": "Item", "doctype": "User"}"#)
            .collect::<String>();
        assert_eq!(
            insert.doctypes(&form(&format!("doc={doc}"))),
            Some(vec!["User".into()])
        );
        assert_eq!(insert.doctypes(&form("doc=nonsense")), None);
        let (json, _) = FormDict::from_json(
            r#"{"docs": [{"doctype": "Item"}, {"doctype": "ToDo", "x": NaN}]}"#,
        )
        .unwrap();
        assert_eq!(
            lookup("frappe.client.insert_many").unwrap().doctypes(&json),
            Some(vec!["Item".into(), "ToDo".into()])
        );
        // An empty `docs` first does not hide the list Frappe keeps (the last repeat).
        let (json, _) =
            FormDict::from_json(r#"{"docs": [], "docs": [{"doctype": "User"}]}"#).unwrap();
        assert_eq!(
            lookup("frappe.client.insert_many").unwrap().doctypes(&json),
            Some(vec!["User".into()])
        );
        let (json, _) = FormDict::from_json(r#"{"docs": []}"#).unwrap();
        assert_eq!(
            lookup("frappe.client.insert_many").unwrap().doctypes(&json),
            Some(vec![])
        );
        let (json, _) = FormDict::from_json(r#"{"docs": [{"name": "x"}]}"#).unwrap();
        assert_eq!(
            lookup("frappe.client.bulk_update").unwrap().doctypes(&json),
            None
        );
        assert!(lookup("frappe.client.get_list.x").is_none());
        // A doctype in a query Frappe does not read (under a JSON body) is no doctype.
        let mut shadowed = form("doctype=ToDo");
        shadowed.shadow();
        shadowed.merge(FormDict::from_json(r#"{"fields": ["name"]}"#).unwrap().0);
        assert_eq!(get_list.doctypes(&shadowed), None);
    }
}
