//! What Frappe will run for a method call, judged argument by argument.
//!
//! `frappe/handler.py` `execute_cmd` resolves the name (after `override_whitelisted_methods`)
//! to a function object and runs `frappe.call(function, **frappe.form_dict)`; `get_newargs`
//! (`frappe/__init__.py`) passes each argument the function's signature names, every argument
//! when it takes `**kwargs`, and never `ignore_permissions` or `flags`. So a call is judged as
//! the *function* (whatever alias named it, see [`Catalog`]) with each argument it will receive,
//! by the kind its catalog entry gives that argument. What cannot be judged is refused: an
//! argument nobody reviewed, an argument a `**kwargs` function would receive that its review
//! does not cover, a value of the wrong shape, a method reference erpgate cannot follow.
//!
//! The judge is the one place a method's arguments are decided; [`Capabilities`] is what it
//! asks of a client's rules (`acl.rs`).

use super::catalog::{ArgKind, CallsWith, Catalog, Function, Reach};
use super::classify::Operation;
use super::form_dict::{FormDict, FormKey, FormValue};
use super::python_json::{self, PyJson};
use super::query_args::{self, Fragment, RefusedArgument};

/// How deep method arguments may nest (a method whose argument names a method ...): Frappe has
/// no limit; erpgate refuses beyond this rather than follow on.
const MAX_NESTING: u8 = 4;

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
    #[error("{function} is never allowed through the gateway for this client: {reason}")]
    Refused { function: String, reason: String },
    #[error("argument '{argument}' of {function} is not allowed: {reason}")]
    Argument {
        function: String,
        argument: String,
        reason: String,
    },
    #[error(
        "argument '{argument}' of {function} is not reviewed: erpgate cannot judge what {function} \
         does with it, so a request that fills it is refused"
    )]
    Unreviewed { function: String, argument: String },
    #[error(
        "{function} would receive argument '{argument}' (it takes **kwargs or reads the whole \
         request), which its review does not cover"
    )]
    UnknownArgument { function: String, argument: String },
    #[error("method arguments nest deeper than erpgate follows ({0} levels)")]
    TooDeep(u8),
    #[error(
        "a document must come as JSON or a form erpgate reads (application/json, \
         application/x-www-form-urlencoded or multipart/form-data)"
    )]
    UnreadBody,
    #[error(
        "{name} is granted to its own code, but {function} is a catalogued function under the \
         same name an app module may have imported: declare its arguments in the rule instead"
    )]
    Ambiguous { name: String, function: String },
}

/// A method the client's rules grant, as they grant it.
#[derive(Debug, Clone, Copy)]
pub enum Grant<'a> {
    /// A catalogued function: judged by its catalog entry.
    Function(&'static Function),
    /// A method outside the catalog whose arguments the operator declared: any other argument
    /// is refused.
    Declared(&'a [(String, ArgKind)]),
    /// A method outside the catalog the operator left to its own code.
    OwnCode,
}

/// What the judge asks of a client's rules.
pub trait Capabilities {
    /// Whether the client may perform `operation` on `doctype`.
    fn resource(&self, doctype: &str, operation: Operation) -> Result<(), Denied>;
    /// How a method name (any alias) is granted, if it is.
    fn grant(&self, name: &str) -> Option<Grant<'_>>;
    /// Whether SQL-fragment arguments are judged by the query grammar (on unless turned off).
    fn judges_fragments(&self) -> bool;
}

/// The function a method name reaches in Frappe: the override an app's hooks name, then the
/// catalogued function under any of its aliases; `None` outside the catalog.
pub fn resolve(name: &str) -> Option<&'static Function> {
    let catalog = Catalog::get();
    // `/api/v2/method/<doctype>/<attr>` (see [`MethodName::of_controller`]).
    let expanded;
    let name = match name.split_once('/') {
        Some((doctype, attr)) => {
            expanded = catalog.controller_name(doctype, attr)?;
            expanded
        }
        None => name,
    };
    let name = catalog
        .overrides
        .iter()
        .find(|(from, _)| from == name)
        .map_or(name, |(_, to)| to.as_str());
    catalog.lookup(name)
}

/// Judges calls under one client's capabilities.
#[derive(Debug)]
pub struct Judge<'r, C> {
    caps: &'r C,
    /// More arguments are still to come (multipart fields after a file part): a missing
    /// doctype is not missing yet.
    incomplete: bool,
}

impl<'r, C: Capabilities> Judge<'r, C> {
    /// A judge for `caps`; `incomplete` when the request's arguments are not all read yet.
    pub fn new(caps: &'r C, incomplete: bool) -> Self {
        Self { caps, incomplete }
    }

    /// Judges a call of method `name` with the request's `form` as its arguments.
    pub fn call(&self, name: &str, form: &FormDict) -> Result<(), Denied> {
        self.call_at(name, form, 0)
    }

    /// Judges the arguments of catalogued function `f`, granted by another rule than a method
    /// rule (`upload_file` by `files`).
    /// The rule that grants it grants what it does to its fixed doctypes (`files` is the File
    /// capability) and names its doctype (a list's path); its arguments are judged as always.
    pub fn granted_function(&self, f: &Function, form: &FormDict) -> Result<(), Denied> {
        self.arguments(f, form, 0)
    }

    fn call_at(&self, name: &str, form: &FormDict, depth: u8) -> Result<(), Denied> {
        if depth > MAX_NESTING {
            return Err(Denied::TooDeep(MAX_NESTING));
        }
        match self.caps.grant(name) {
            None => Err(Denied::Method(name.to_owned())),
            // An app module that imports a catalogued function exposes it under its own name
            // (`frappe.get_attr` finds it, `is_whitelisted` checks the function object):
            // such a name cannot be left to "its own code" unjudged.
            Some(Grant::OwnCode) => match name.rsplit('.').next().and_then(same_named) {
                Some(function) => Err(Denied::Ambiguous {
                    name: name.to_owned(),
                    function: function.to_owned(),
                }),
                None => Ok(()),
            },
            Some(Grant::Declared(args)) => self.declared(name, args, form, depth),
            Some(Grant::Function(function)) => self.function(function, form, depth),
        }
    }

    /// A catalogued function: its fixed doctypes, then each argument it receives.
    fn function(&self, f: &Function, form: &FormDict, depth: u8) -> Result<(), Denied> {
        if let Some(reason) = f.review.as_ref().and_then(|r| r.refused.as_ref()) {
            return Err(Denied::Refused {
                function: f.name.clone(),
                reason: reason.clone(),
            });
        }
        for (doctype, ops) in f.review.iter().flat_map(|r| &r.doctypes) {
            for &op in ops {
                self.caps.resource(doctype, op)?;
            }
        }
        self.arguments(f, form, depth)?;
        self.required_doctypes(f, form)
    }

    /// Each argument `f` receives, by its kind.
    fn arguments(&self, f: &Function, form: &FormDict, depth: u8) -> Result<(), Denied> {
        for entry in form.entries() {
            let name = entry.name();
            if not_an_argument(entry) {
                continue;
            }
            let mut inferred = None;
            match f.reach(name, &mut inferred) {
                Reach::Dropped => {}
                Reach::Unjudged => {
                    return Err(Denied::UnknownArgument {
                        function: f.name.clone(),
                        argument: name.to_owned(),
                    })
                }
                Reach::Passed(kind) => {
                    self.argument(&f.name, name, kind, &entry.value, Some(f), form, depth)?
                }
            }
        }
        Ok(())
    }

    /// A function that acts on a doctype its arguments must name: when the request names
    /// none, the call is refused rather than left to whatever Frappe does without one; when the
    /// parameter has a default doctype (`party_type="Customer"`), the default is judged.
    fn required_doctypes(&self, f: &Function, form: &FormDict) -> Result<(), Denied> {
        if self.incomplete {
            return Ok(());
        }
        let Some(review) = &f.review else {
            return Ok(());
        };
        for arg in &review.args {
            // Only a carrier Frappe reads can supply it (a query under a JSON body cannot).
            if form.read_by_frappe_named(&arg.name).next().is_some() {
                continue;
            }
            let Some(param) = f.params.iter().find(|p| p.name == arg.name) else {
                continue;
            };
            let default = param.default.as_deref().and_then(python_string);
            match (&arg.kind, default) {
                (ArgKind::Doctype(ops), Some(doctype)) => {
                    for &op in ops {
                        self.caps.resource(doctype, op)?;
                    }
                }
                (ArgKind::Doctype(_) | ArgKind::Doc(_) | ArgKind::Docs(_), _) if param.required => {
                    return Err(Denied::DoctypeUnknown(f.name.clone()))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The document a resource create or update writes to `doctype`: the request's arguments
    /// (`api/v2.py` `create_doc` / `update_doc` take `form_dict`; `api/v1.py`
    /// `get_request_form_data` takes its `data` argument when there is one). Judged as a
    /// document of that doctype: a `docstatus` that submits needs update, a `parenttype` is
    /// the parent saved (a row created on its own, `permissions.py` `has_child_permission`),
    /// and a `doctype` member other than the path's needs the operation too.
    pub fn written_document(
        &self,
        doctype: &str,
        operation: Operation,
        form: &FormDict,
    ) -> Result<(), Denied> {
        let refuse = |reason: &str| Denied::Argument {
            function: format!("the {doctype} document"),
            argument: "data".into(),
            reason: reason.to_owned(),
        };
        if operation == Operation::Create && submits_on_create(form) {
            self.caps.resource(doctype, Operation::Update)?;
        }
        // The members named `doctype` and `parenttype`, wherever the document comes from; read
        // in place (a form value as a JSON string), nothing copied.
        let judge = |key: &str, value: Option<&PyJson>, text: Option<&str>| {
            let named = text.or_else(|| value.and_then(PyJson::as_str));
            match (key, named, value) {
                ("doctype", Some(named), _) if !named.eq_ignore_ascii_case(doctype) => {
                    self.caps.resource(named, operation)
                }
                ("parenttype", Some(parent), _) => self.caps.resource(parent, Operation::Update),
                ("doctype", Some(_), _) | (_, None, Some(PyJson::Null)) => Ok(()),
                ("doctype" | "parenttype", _, _) => {
                    Err(refuse("a doctype or parenttype must be a string"))
                }
                // Rows of table fields: their doctype is the table's (`_init_child`).
                _ => Ok(()),
            }
        };
        for entry in form.entries() {
            match &entry.value {
                FormValue::Text(text) => judge(entry.name(), None, Some(text))?,
                FormValue::Json(value) => judge(entry.name(), Some(value), None)?,
            }
        }
        for data in form.values_named("data") {
            match json_of(data) {
                Some(PyJson::Object(members)) => {
                    for member in &members {
                        judge(&member.key, Some(&member.value), None)?;
                    }
                }
                // Not a document: v1 falls back to `form_dict`, judged above.
                Some(PyJson::Str(_)) => {}
                // Text Frappe could read as JSON and erpgate cannot (too deep, malformed):
                // refused, never guessed.
                None if looks_like_json(data) => {
                    return Err(refuse("it cannot be read exactly as Frappe would read it"))
                }
                None => {}
                Some(_) => return Err(refuse("it must be a JSON document")),
            }
        }
        Ok(())
    }

    /// A method outside the catalog with declared arguments: each argument the request sends
    /// must be declared (its signature is unknown to erpgate) and within its kind.
    fn declared(
        &self,
        name: &str,
        args: &[(String, ArgKind)],
        form: &FormDict,
        depth: u8,
    ) -> Result<(), Denied> {
        for entry in form.entries() {
            if not_an_argument(entry) {
                continue;
            }
            let argument = entry.name();
            let Some((_, kind)) = args.iter().find(|(n, _)| n == argument) else {
                return Err(Denied::UnknownArgument {
                    function: name.to_owned(),
                    argument: argument.to_owned(),
                });
            };
            self.argument(name, argument, kind, &entry.value, None, form, depth)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn argument(
        &self,
        function: &str,
        name: &str,
        kind: &ArgKind,
        value: &FormValue,
        caller: Option<&Function>,
        form: &FormDict,
        depth: u8,
    ) -> Result<(), Denied> {
        let refuse = |reason: &str| Denied::Argument {
            function: function.to_owned(),
            argument: name.to_owned(),
            reason: reason.to_owned(),
        };
        let fragment = |fragment: Fragment| -> Result<(), Denied> {
            if !self.caps.judges_fragments() {
                return Ok(());
            }
            let readable = |doctype: &str| self.caps.resource(doctype, Operation::Read).is_ok();
            Ok(query_args::check_value(fragment, name, value, &readable)?)
        };
        match kind {
            ArgKind::Doctype(ops) => {
                let doctype = value
                    .as_plain_text()
                    .ok_or_else(|| refuse("it must name a doctype as a string"))?;
                for &op in ops {
                    self.caps.resource(doctype, op)?;
                }
                Ok(())
            }
            ArgKind::Parent => {
                let doctype = value
                    .as_plain_text()
                    .ok_or_else(|| refuse("it must name a doctype as a string"))?;
                self.caps.resource(doctype, Operation::Read)
            }
            // `frappe.get_doc(doctype, name)` reads a dict `name` as filters: a name is a string.
            ArgKind::Docname => match value {
                FormValue::Json(PyJson::Array(_) | PyJson::Object(_)) => {
                    Err(refuse("a document name must be a string"))
                }
                _ => Ok(()),
            },
            ArgKind::Scalar | ArgKind::Text | ArgKind::File => Ok(()),
            ArgKind::Fields => fragment(Fragment::Fields),
            ArgKind::Fieldname => fragment(Fragment::Fieldname),
            ArgKind::OrderBy => fragment(Fragment::OrderBy),
            ArgKind::GroupBy => fragment(Fragment::GroupBy),
            ArgKind::Pluck => fragment(Fragment::Pluck),
            ArgKind::Filters => fragment(Fragment::Filters),
            ArgKind::Doc(ops) => self.documents(value, false, ops, &refuse),
            ArgKind::Docs(ops) => self.documents(value, true, ops, &refuse),
            ArgKind::Method(calls) => {
                let target = value
                    .as_plain_text()
                    .ok_or_else(|| refuse("it must name a method as a string"))?;
                if super::classify::MethodName::new(target).as_str() == "login" {
                    return Err(Denied::Login);
                }
                if self.caps.grant(target).is_none() {
                    return Err(Denied::Method(target.to_owned()));
                }
                // Some callers apply `override_whitelisted_methods` to the name (the mapper),
                // some do not (`search_widget`): for an overridden name erpgate cannot tell
                // which function runs.
                if Catalog::get()
                    .overrides
                    .iter()
                    .any(|(from, _)| from == target)
                {
                    return Err(refuse(
                        "the method it names is overridden by an app's hooks",
                    ));
                }
                let passed = pass_on(calls, caller, form, resolve(target));
                let passed = passed.ok_or_else(|| {
                    refuse("erpgate cannot tell which arguments the method it names receives")
                })?;
                self.call_at(target, &passed, depth + 1)
            }
            ArgKind::Refused(reason) => Err(refuse(reason)),
            ArgKind::Unreviewed => Err(Denied::Unreviewed {
                function: function.to_owned(),
                argument: name.to_owned(),
            }),
        }
    }

    /// A `doc` / `docs` argument: every document's `doctype`, every child row's, and the
    /// `parenttype` a row names (`frappe/client.py` `insert_doc` appends such a row to
    /// `frappe.get_doc(parenttype, parent)` and saves that parent: an update of it).
    fn documents(
        &self,
        value: &FormValue,
        list: bool,
        ops: &[Operation],
        refuse: &dyn Fn(&str) -> Denied,
    ) -> Result<(), Denied> {
        let json = json_of(value).ok_or_else(|| refuse("it is not a JSON document"))?;
        let docs = match (&json, list) {
            (PyJson::Array(docs), true) => docs.as_slice(),
            (PyJson::Null, _) => return Ok(()),
            (doc, false) => std::slice::from_ref(doc),
            _ => return Err(refuse("it must be a JSON list of documents")),
        };
        for doc in docs {
            let PyJson::Object(members) = doc else {
                return Err(refuse("every document must be a JSON object"));
            };
            let doctype = last(members, "doctype")
                .and_then(PyJson::as_str)
                .ok_or_else(|| refuse("a document must name its doctype as a string"))?;
            for &op in ops {
                self.caps.resource(doctype, op)?;
            }
            // A document inserted with `docstatus` 1 is submitted by its insert
            // (`frappe/model/document.py` `insert` → `run_before_save_methods` / `submit`
            // hooks), 2 cancels: both are updates, which `create` alone does not grant.
            let submits = !is_draft(last(members, "docstatus"));
            if submits && !ops.contains(&Operation::Update) {
                self.caps.resource(doctype, Operation::Update)?;
            }
            match last(members, "parenttype") {
                None | Some(PyJson::Null) => {}
                Some(PyJson::Str(parent)) => self.caps.resource(parent, Operation::Update)?,
                Some(_) => return Err(refuse("a parenttype must be a string")),
            }
            // Child rows need nothing of their own: Frappe gives a row its table field's
            // doctype and the document as parent, whatever the row says
            // (`model/base_document.py` `_init_child`).
        }
        Ok(())
    }
}

/// Entries no function receives as an argument to judge: `cmd` is the call itself (judged as
/// one), `sid` never reaches Frappe (removed), and `_` is popped from `form_dict` by
/// `frappe/app.py` `make_form_dict` (jQuery's cache buster).
fn not_an_argument(entry: &super::form_dict::FormEntry) -> bool {
    matches!(entry.key, FormKey::Cmd | FormKey::Sid) || entry.name() == "_"
}

/// Whether a document-create request carries a `docstatus` that is not a draft, wherever
/// Frappe reads the new document from: `form_dict` itself (`api/v2.py` `create_doc`; `api/v1.py`
/// `get_request_form_data` falls back to it) or its `data` argument, a JSON document (v1).
/// A `data` that is not a JSON object counts as not a draft: erpgate cannot tell.
pub fn submits_on_create(form: &FormDict) -> bool {
    let top = form.values_named("docstatus").any(|v| match json_of(v) {
        Some(docstatus) => !is_draft(Some(&docstatus)),
        None => true,
    });
    let in_data = form.values_named("data").any(|data| match json_of(data) {
        Some(PyJson::Object(members)) => !is_draft(last(&members, "docstatus")),
        _ => true,
    });
    top || in_data
}

/// Whether a `docstatus` member leaves a document a draft: absent, `null`, or 0 (any spelling
/// of the number zero; anything else, a string included, is read as not a draft).
fn is_draft(docstatus: Option<&PyJson>) -> bool {
    match docstatus {
        None | Some(PyJson::Null) => true,
        Some(PyJson::Number(n)) => n.parse::<f64>().is_ok_and(|v| v == 0.0),
        Some(PyJson::Bool(b)) => !b,
        _ => false,
    }
}

/// The catalogued function reachable under the attribute name `attr`, if any.
fn same_named(attr: &str) -> Option<&'static str> {
    let catalog = Catalog::get();
    if !catalog.has_attr(attr) {
        return None;
    }
    catalog
        .functions()
        .iter()
        .find(|f| {
            std::iter::once(&f.name)
                .chain(&f.aliases)
                .any(|n| n.rsplit('.').next() == Some(attr))
        })
        .map(|f| f.name.as_str())
}

/// A Python string literal's value (`'Customer'`, `"Customer"`), as a parameter default is
/// written; `None` for anything else (`None`, a number, an expression).
fn python_string(source: &str) -> Option<&str> {
    let inner = source
        .strip_prefix('\'')
        .and_then(|s| s.strip_suffix('\''))
        .or_else(|| source.strip_prefix('"').and_then(|s| s.strip_suffix('"')))?;
    (!inner.contains(['\\', '\'', '"'])).then_some(inner)
}

/// Whether a text value opens like JSON (`{`, `[` or `"`): what erpgate cannot parse of such a
/// value, CPython might.
fn looks_like_json(value: &FormValue) -> bool {
    value
        .as_plain_text()
        .is_some_and(|t| t.trim_start().starts_with(['{', '[', '"']))
}

/// The last member named `key`: the one a Python dict keeps.
fn last<'a>(members: &'a [python_json::Member], key: &str) -> Option<&'a PyJson> {
    members
        .iter()
        .rev()
        .find(|m| m.key == key)
        .map(|m| &m.value)
}

/// A `doc` argument as Frappe reads it: a JSON string is parsed (`frappe.parse_json`), a JSON
/// body member is taken as it is.
fn json_of(value: &FormValue) -> Option<PyJson> {
    match value {
        FormValue::Text(s) | FormValue::Json(PyJson::Str(s)) => python_json::loads(s).ok(),
        FormValue::Json(v) => Some(v.clone()),
    }
}

/// The arguments the method named by an argument receives, as `calls_with` describes the call:
/// the caller's arguments by position onto the called function's parameters, by keyword, and
/// (`**`) every argument the caller does not take itself. `None` when the called method's
/// parameters are unknown (outside the catalog) and something is passed by position.
fn pass_on(
    calls: &CallsWith,
    caller: Option<&Function>,
    form: &FormDict,
    target: Option<&Function>,
) -> Option<FormDict> {
    let mut passed = FormDict::default();
    // A function that reads `form_dict` itself sees the whole request whatever it is passed.
    if target.is_some_and(|t| t.reads_form_dict) {
        passed = form.clone();
    }
    for (i, argument) in calls.positional.iter().enumerate() {
        let param = target?.params.get(i)?;
        for value in form.values_named(argument) {
            passed.push(&param.name, || value.clone());
        }
    }
    for (keyword, argument) in &calls.keywords {
        for value in form.values_named(argument) {
            passed.push(keyword, || value.clone());
        }
    }
    if calls.rest {
        let caller = caller?;
        let own = |name: &str| {
            caller.param_names().any(|p| p == name)
                || caller
                    .review
                    .iter()
                    .flat_map(|r| &r.args)
                    .any(|a| a.name == name)
        };
        for entry in form.entries() {
            if !own(entry.name()) && !matches!(entry.key, FormKey::Sid) && entry.name() != "_" {
                passed.push(entry.name(), || entry.value.clone());
            }
        }
    }
    Some(passed)
}
