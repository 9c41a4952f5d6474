//! The catalog of Frappe's and ERPNext's whitelisted functions: what a method name reaches.
//!
//! Frappe resolves a dotted name with `frappe.get_attr` (`getattr(import_module(module),
//! attr)`) and checks the *function object* against `frappe.whitelisted` (`frappe/handler.py`
//! `execute_cmd` → `is_whitelisted`), so one function answers under its defining module and
//! every module that imports it (`frappe.email.inbox.set_value` is `frappe.client.set_value`).
//! `frappe.call` passes the request's `form_dict` through `get_newargs` (`frappe/__init__.py`):
//! an argument not in the signature is dropped unless the function takes `**kwargs`, and
//! `ignore_permissions` / `flags` never reach it.
//!
//! `functions.jsonl` holds those facts for every whitelisted function, generated from the
//! source by `generate.py` (its header lines name the versions); `reviewed/*.yaml` holds, for
//! the functions integrations call, what each argument carries ([`ArgKind`]) with the line of
//! Frappe's code that shows it. Both are compiled in and read once.

pub mod kinds;

use std::collections::HashMap;
use std::sync::OnceLock;

use indexmap::IndexMap;
use serde::Deserialize;

pub use kinds::{ArgKind, CallsWith, UnknownKind};

use super::classify::Operation;

const FUNCTIONS: &str = include_str!("functions.jsonl");

/// The reviewed files, by name.
const REVIEWS: &[(&str, &str)] = &[
    (
        "frappe_client.yaml",
        include_str!("reviewed/frappe_client.yaml"),
    ),
    (
        "frappe_desk.yaml",
        include_str!("reviewed/frappe_desk.yaml"),
    ),
    (
        "frappe_model.yaml",
        include_str!("reviewed/frappe_model.yaml"),
    ),
    ("erpnext.yaml", include_str!("reviewed/erpnext.yaml")),
    (
        "erpnext_more.yaml",
        include_str!("reviewed/erpnext_more.yaml"),
    ),
];

/// Keyword arguments `get_newargs` removes before any function sees them.
pub const NEVER_PASSED: &[&str] = &["ignore_permissions", "flags"];

/// One whitelisted function.
#[derive(Debug)]
pub struct Function {
    /// Defining module + name.
    pub name: String,
    /// The app it belongs to (`frappe`, `erpnext`).
    pub app: String,
    /// `file:line` of its `def`.
    pub source: String,
    /// Callable without a session (`allow_guest=True`).
    pub allow_guest: bool,
    /// HTTP verbs `frappe.whitelist(methods=...)` admits.
    pub methods: Vec<String>,
    /// Keyword-passable parameters, in order.
    pub params: Vec<Param>,
    /// The name of its `**kwargs`, if it takes one.
    pub kwargs: Option<String>,
    /// Every other dotted name that reaches it.
    pub aliases: Vec<String>,
    /// What each argument carries, when reviewed.
    pub review: Option<Review>,
    /// It reads `frappe.form_dict` itself (found in its source by `generate.py`): every
    /// argument of the request reaches it, whatever its signature.
    pub reads_form_dict: bool,
}

/// A parameter as `inspect.signature` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct Param {
    /// Its name.
    pub name: String,
    /// No default.
    #[serde(default)]
    pub required: bool,
    /// The annotation's source text.
    #[serde(default)]
    pub annotation: Option<String>,
    /// The default's source text.
    #[serde(default)]
    pub default: Option<String>,
}

/// A reviewed function.
#[derive(Debug)]
pub struct Review {
    /// `file:line` of the def.
    pub source: String,
    /// What it does, in a few words.
    pub does: String,
    /// Doctypes it acts on whatever the request says, and the operations.
    pub doctypes: Vec<(String, Vec<Operation>)>,
    /// Never callable by a restricted client, for this reason.
    pub refused: Option<String>,
    /// The kind of every argument outside its signature that reaches it (through `**kwargs`, or
    /// because it reads `frappe.form_dict` itself); `None`: such arguments are refused.
    pub extra: Option<ArgKind>,
    /// Each argument's kind and the line that shows it.
    pub args: Vec<ReviewedArg>,
}

/// One reviewed argument.
#[derive(Debug)]
pub struct ReviewedArg {
    /// The parameter (or `form_dict` key) name.
    pub name: String,
    /// What it carries.
    pub kind: ArgKind,
    /// Where Frappe's code shows it.
    pub cite: String,
}

/// How an argument a request sends reaches a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach<'a> {
    /// `get_newargs` drops it: the function never sees it.
    Dropped,
    /// It is passed, and carries this.
    Passed(&'a ArgKind),
    /// It is passed and nobody established what it carries.
    Unjudged,
}

static UNREVIEWED: ArgKind = ArgKind::Unreviewed;

impl Function {
    /// How the request argument `name` reaches this function. A reviewed argument has its
    /// reviewed kind, an unreviewed function's parameter its inferred kind (kept in `inferred`).
    pub fn reach<'a>(&'a self, name: &str, inferred: &'a mut Option<ArgKind>) -> Reach<'a> {
        if NEVER_PASSED.contains(&name) {
            return Reach::Dropped;
        }
        if let Some(review) = &self.review {
            if let Some(arg) = review.args.iter().find(|a| a.name == name) {
                return Reach::Passed(&arg.kind);
            }
            let passed = self.kwargs.is_some() || self.reads_form_dict;
            return match (&review.extra, passed) {
                (_, false) => Reach::Dropped,
                (Some(kind), true) => Reach::Passed(kind),
                (None, true) => Reach::Unjudged,
            };
        }
        if self.params.iter().any(|p| p.name == name) {
            let kind = inferred.insert(ArgKind::inferred(name));
            return match kind {
                ArgKind::Unreviewed => Reach::Passed(&UNREVIEWED),
                kind => Reach::Passed(kind),
            };
        }
        if self.kwargs.is_some() || self.reads_form_dict {
            Reach::Unjudged
        } else {
            Reach::Dropped
        }
    }

    /// Its keyword-passable parameters' names, in order.
    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }
}

/// Where the catalog was generated from, and what it holds.
#[derive(Debug)]
pub struct Catalog {
    functions: Vec<Function>,
    by_name: HashMap<String, usize>,
    /// `scrubbed_doctype.attr` → the functions a doctype's controller module exposes under
    /// `attr` (defined there or imported), for `/api/v2/method/<doctype>/<attr>`.
    by_controller: HashMap<String, Vec<String>>,
    /// The last segment of every name that reaches a function (`insert`, `get_list`, ...).
    attrs: std::collections::HashSet<String>,
    /// `app version (commit, origin)` per app, from the data's header.
    pub sources: Vec<String>,
    /// `override_whitelisted_methods` of the apps: (name called, name run).
    pub overrides: Vec<(String, String)>,
}

/// The data does not load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("capability catalog: {0}")]
pub struct CatalogError(String);

#[derive(Deserialize)]
struct FunctionLine {
    name: String,
    app: String,
    file: String,
    line: u32,
    #[serde(default)]
    allow_guest: bool,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    params: Vec<Param>,
    #[serde(default)]
    kwargs: Option<String>,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    reads_form_dict: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewYaml {
    source: String,
    does: String,
    #[serde(default)]
    doctypes: IndexMap<String, String>,
    #[serde(default)]
    refused: Option<String>,
    #[serde(default)]
    kwargs: Option<String>,
    #[serde(default)]
    args: IndexMap<String, ArgYaml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ArgYaml {
    kind: String,
    cite: String,
    #[serde(default)]
    calls_with: Vec<String>,
}

impl Catalog {
    /// The compiled-in catalog. Its data is checked by this module's tests; should it ever
    /// not load, erpgate stops while loading its config (every method rule is compiled against
    /// it there), never mid-request.
    pub fn get() -> &'static Catalog {
        static CATALOG: OnceLock<Catalog> = OnceLock::new();
        CATALOG.get_or_init(|| match Self::load(FUNCTIONS, REVIEWS) {
            Ok(catalog) => catalog,
            Err(e) => panic!("{e}"),
        })
    }

    /// Reads the generated lines and the reviews.
    pub fn load(functions: &str, reviews: &[(&str, &str)]) -> Result<Self, CatalogError> {
        let mut catalog = Catalog {
            functions: Vec::new(),
            by_name: HashMap::new(),
            by_controller: HashMap::new(),
            attrs: Default::default(),
            sources: Vec::new(),
            overrides: Vec::new(),
        };
        for (n, line) in functions.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |e: &dyn std::fmt::Display| CatalogError(format!("line {}: {e}", n + 1));
            let value: serde_json::Value = serde_json::from_str(line).map_err(|e| at(&e))?;
            if let Some(app) = value.get("source").and_then(|s| s.as_str()) {
                let field = |k: &str| value.get(k).and_then(|v| v.as_str()).unwrap_or("?");
                catalog.sources.push(format!(
                    "{app} {} ({} {})",
                    field("version"),
                    field("from"),
                    field("commit")
                ));
                continue;
            }
            if let Some(old) = value.get("override").and_then(|s| s.as_str()) {
                let new = value
                    .get("with")
                    .and_then(|s| s.as_str())
                    .unwrap_or_default();
                catalog.overrides.push((old.to_owned(), new.to_owned()));
                continue;
            }
            if value.get("name").is_none() {
                continue; // another header line
            }
            let f: FunctionLine = serde_json::from_value(value).map_err(|e| at(&e))?;
            let index = catalog.functions.len();
            for name in std::iter::once(&f.name).chain(&f.aliases) {
                let (module, attr) = name.rsplit_once('.').unwrap_or(("", name));
                catalog.attrs.insert(attr.to_owned());
                // `<app>.<module>.doctype.<scrub>.<scrub>`: a doctype's controller module.
                let mut segments = module.rsplit('.');
                if let (Some(a), Some(b), Some("doctype")) =
                    (segments.next(), segments.next(), segments.next())
                {
                    if a == b {
                        let key = format!("{a}.{attr}");
                        catalog
                            .by_controller
                            .entry(key)
                            .or_default()
                            .push(name.clone());
                    }
                }
                if let Some(other) = catalog.by_name.insert(name.clone(), index) {
                    let other = &catalog.functions[other].name;
                    return Err(at(&format!("{name} reaches both {other} and {}", f.name)));
                }
            }
            catalog.functions.push(Function {
                review: None,
                reads_form_dict: f.reads_form_dict,
                name: f.name,
                app: f.app,
                source: format!("{}:{}", f.file, f.line),
                allow_guest: f.allow_guest,
                methods: f.methods,
                params: f.params,
                kwargs: f.kwargs,
                aliases: f.aliases,
            });
        }
        for (file, text) in reviews {
            let reviews: IndexMap<String, ReviewYaml> = serde_yaml::from_str(text)
                .map_err(|e| CatalogError(format!("reviewed/{file}: {e}")))?;
            for (name, review) in reviews {
                catalog
                    .add_review(&name, review)
                    .map_err(|e| CatalogError(format!("reviewed/{file}: {name}: {}", e.0)))?;
            }
        }
        Ok(catalog)
    }

    fn add_review(&mut self, name: &str, review: ReviewYaml) -> Result<(), CatalogError> {
        let err = |s: String| CatalogError(s);
        let index = *self
            .by_name
            .get(name)
            .ok_or_else(|| err("not a whitelisted function in the catalog".into()))?;
        let function = &mut self.functions[index];
        if function.name != name {
            return Err(err(format!(
                "review it under its defining name {}",
                function.name
            )));
        }
        if function.review.is_some() {
            return Err(err("reviewed twice".into()));
        }
        // A review that names arguments outside the signature says the function reads them
        // from `form_dict` itself.
        function.reads_form_dict |= review
            .args
            .keys()
            .any(|a| !function.params.iter().any(|p| p.name == *a));
        let reads_form_dict = function.reads_form_dict;
        for param in &function.params {
            if !review.args.contains_key(&param.name) {
                return Err(err(format!(
                    "parameter {} has no reviewed kind",
                    param.name
                )));
            }
        }
        let mut args = Vec::new();
        for (arg, spec) in review.args {
            let mut kind = ArgKind::parse(&spec.kind).map_err(|e| err(format!("{arg}: {e}")))?;
            match (&mut kind, spec.calls_with.is_empty()) {
                (ArgKind::Method(calls), _) => {
                    *calls = CallsWith::parse(&spec.calls_with)
                        .map_err(|e| err(format!("{arg}: {e}")))?
                }
                (_, false) => return Err(err(format!("{arg}: calls_with on a non-method kind"))),
                _ => {}
            }
            args.push(ReviewedArg {
                name: arg,
                kind,
                cite: spec.cite,
            });
        }
        let mut doctypes = Vec::new();
        for (doctype, ops) in review.doctypes {
            match ArgKind::parse(&format!("doctype:{ops}")) {
                Ok(ArgKind::Doctype(ops)) => doctypes.push((doctype, ops)),
                _ => return Err(err(format!("doctypes: {doctype}: bad operations '{ops}'"))),
            }
        }
        let extra = match review.kwargs {
            Some(kind) if function.kwargs.is_some() || reads_form_dict => {
                Some(ArgKind::parse(&kind).map_err(|e| err(format!("kwargs: {e}")))?)
            }
            Some(_) => return Err(err("kwargs: it takes no **kwargs".into())),
            None => None,
        };
        function.review = Some(Review {
            source: review.source,
            does: review.does,
            doctypes,
            refused: review.refused,
            extra,
            args,
        });
        Ok(())
    }

    /// The function a dotted name reaches (a bare name is `frappe.handler.<name>`, as
    /// `frappe/handler.py` `get_attr` resolves it in its own globals).
    pub fn lookup(&self, name: &str) -> Option<&Function> {
        let index = match self.by_name.get(name) {
            Some(i) => *i,
            None if !name.contains('.') => *self.by_name.get(&format!("frappe.handler.{name}"))?,
            None => return None,
        };
        Some(&self.functions[index])
    }

    /// The function `/api/v2/method/<doctype>/<attr>` runs: `api/v2.py` `handle_rpc_call`
    /// expands it to `load_doctype_module(doctype).__name__ + "." + attr`, the doctype's
    /// controller module `<app>.<module>.doctype.<scrub(doctype)>.<scrub(doctype)>`
    /// (`modules/utils.py` `get_module_name`, `scrub`: spaces and hyphens to `_`, lower case).
    /// The dotted name it expands to; `None` when no catalogued controller has it, or more than
    /// one app could.
    pub fn controller_name(&self, doctype: &str, attr: &str) -> Option<&str> {
        let scrubbed = doctype.replace([' ', '-'], "_").to_lowercase();
        match self
            .by_controller
            .get(&format!("{scrubbed}.{attr}"))?
            .as_slice()
        {
            [one] => Some(one),
            _ => None,
        }
    }

    /// Whether some catalogued function is reachable under the attribute name `attr`: an
    /// app's module that imports it exposes it under that name too.
    pub fn has_attr(&self, attr: &str) -> bool {
        self.attrs.contains(attr)
    }

    /// Every function.
    pub fn functions(&self) -> &[Function] {
        &self.functions
    }

    /// Whether the dotted namespace `prefix` (`frappe`, `frappe.desk`, `myapp.api`) lies in an
    /// app the catalog covers: there, a `prefix.*` rule would grant catalogued functions
    /// wholesale, so rules must name them.
    pub fn covers(&self, prefix: &str) -> bool {
        let app = prefix.split('.').next().unwrap_or(prefix);
        self.functions.iter().any(|f| f.app == app)
    }
}

#[cfg(test)]
mod tests;
