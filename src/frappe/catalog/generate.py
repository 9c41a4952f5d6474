#!/usr/bin/env python3
"""Generate erpgate's catalog of Frappe/ERPNext whitelisted functions.

Reads the Python *source* of Frappe apps with the `ast` module (Frappe itself is
never imported) and writes a JSON-lines catalog of every function that
`frappe.handler.execute_cmd` can reach by a dotted name, with its signature as
`frappe.get_newargs` sees it and every other dotted name reaching the same
function object.

Usage:
    python3 src/frappe/catalog/generate.py \
        --app frappe=/path/to/frappe/checkout \
        --app erpnext=/path/to/erpnext/checkout \
        --out src/frappe/catalog/functions.jsonl

    Optional, per app:
        --app-version erpnext=15.90.0@<commit>   (overrides __version__ / git HEAD)
        --app-from erpnext="github.com/frappe/erpnext branch version-15"

Everything the rules below model was read in the Frappe version-15 source
(frappe 15.55.1, commit 2115b6410c54bdd3689302327fb1bcefeab7000b). References
are "file:function".

Standard library only.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------
# Facts copied from the Frappe v15 source
# ---------------------------------------------------------------------------

# frappe/__init__.py:whitelist(allow_guest=False, xss_safe=False, methods=None):
#     if not methods:
#         methods = ["GET", "POST", "PUT", "DELETE"]
# Note `if not methods`: an explicit empty list also falls back to the default.
DEFAULT_METHODS = ["GET", "POST", "PUT", "DELETE"]

# Positional order of frappe.whitelist's parameters (same function), so that
# `@frappe.whitelist(True)` is read correctly too.
WHITELIST_PARAMS = ["allow_guest", "xss_safe", "methods"]

# Decorators seen stacked under @frappe.whitelist() in Frappe 15 / ERPNext 15
# whose wrappers use functools.wraps, so `inspect.signature` (used by
# frappe/__init__.py:get_newargs) follows `__wrapped__` back to the original
# `def` and the signature read from source is the one Frappe sees. Checked in:
#   frappe/__init__.py:validate_and_sanitize_search_inputs, frappe/__init__.py:read_only,
#   frappe/rate_limiter.py:rate_limit, frappe/recorder.py:do_not_record / administrator_only,
#   frappe/utils/caching.py:site_cache / redis_cache, frappe/utils/dashboard.py:cache_source,
#   frappe/utils/deprecations.py:deprecated.
# whitelist() itself wraps with frappe/utils/typing_validations.py:validate_argument_types,
# which also uses functools.wraps.
# Any other decorator is reported with "signature_uncertain": true.
SIGNATURE_PRESERVING_DECORATORS = {
    "validate_and_sanitize_search_inputs",
    "read_only",
    "rate_limit",
    "do_not_record",
    "administrator_only",
    "site_cache",
    "redis_cache",
    "cache_source",
    "deprecated",
    # frappe/desk/doctype/system_health_report/system_health_report.py:no_wait is a
    # @contextlib.contextmanager; used as a decorator it goes through
    # contextlib.ContextDecorator.__call__, which applies functools.wraps.
    "no_wait",
}

# Notes for functions whitelisted through a helper decorator (a module-level
# function that returns `frappe.whitelist(...)(fn)`), keyed by the helper's
# dotted name.
VIA_NOTES = {
    "frappe.tests.ui_test_helpers.whitelist_for_tests": (
        "whitelisted only where frappe/tests/ui_test_helpers.py:whitelist_for_tests "
        "does not throw at import: it raises when serving a request unless "
        "frappe.flags.in_test or frappe.local.dev_server (UI-test helper, not production)"
    ),
}

# frappe/handler.py:execute_cmd:
#     if method != run_doc_method:
#         is_whitelisted(method)
#         is_valid_http_method(method)
# run_doc_method is NOT decorated with @frappe.whitelist, yet it is reachable as
# `run_doc_method` / `frappe.handler.run_doc_method`; it then checks
# is_whitelisted()/is_valid_http_method() on the *document* method it runs.
SPECIAL_ENTRIES = {
    "frappe.handler.run_doc_method": {
        "note": (
            "not decorated with @frappe.whitelist: frappe/handler.py:execute_cmd skips "
            "is_whitelisted/is_valid_http_method for it; run_doc_method applies both to the "
            "controller method it calls (guest access and HTTP methods depend on that "
            "method's own @frappe.whitelist)"
        ),
    },
}

# Module in which frappe/handler.py:get_attr resolves a dot-less cmd via
# `globals()[cmd]`. Its module-level bindings are therefore also reachable by
# bare name; they are recorded as `frappe.handler.<attr>` aliases (they are
# module attributes anyway).
HANDLER_MODULE = "frappe.handler"


# ---------------------------------------------------------------------------
# Reachability model
# ---------------------------------------------------------------------------
# frappe/__init__.py:get_attr(method_string):
#     modulename = ".".join(method_string.split(".")[:-1])
#     methodname = method_string.split(".")[-1]
#     return getattr(get_module(modulename), methodname)
# (get_module = importlib.import_module). frappe/handler.py:get_attr(cmd) calls
# frappe.get_attr for dotted cmds, globals()[cmd] otherwise, and
# frappe/handler.py:execute_cmd then requires `method in frappe.whitelisted`
# (frappe/__init__.py:is_whitelisted compares function objects).
# Consequences encoded below:
#   * only *module attributes* are reachable: a method of a class is never
#     `getattr(module, name)`, so class-level @frappe.whitelist() functions are
#     not catalogued (they are reached via run_doc_method / REST run_method);
#   * every module-level name bound to the same whitelisted function object is
#     an equally valid dotted name (an alias);
#   * the object in `frappe.whitelisted` is what whitelist()'s innerfn returned,
#     so the module attribute must be bound to *that* object: a bare
#     `frappe.whitelist()(fn)` statement whitelists a wrapper nobody can reach,
#     and a decorator placed *above* @frappe.whitelist() rebinds the name to a
#     different object (both are reported as problems).


@dataclass
class WL:
    """Arguments of one frappe.whitelist(...) call."""

    allow_guest: object = False  # bool, or source text if not a literal
    methods: object = None  # list[str], or source text if not a literal
    via: str | None = None  # helper decorator dotted name, if any
    problems: list = field(default_factory=list)


@dataclass
class Func:
    """A module-level function object (a `def`, or the result of whitelist()(fn))."""

    module: str
    name: str  # attribute name it was created under
    file: str
    line: int
    node: ast.AST | None  # FunctionDef / AsyncFunctionDef / Lambda
    wl: WL | None = None
    decorators: list = field(default_factory=list)  # other decorators, outermost first
    wl_decorator: WL | None = None  # set if this def is a helper returning whitelist(...)(arg)

    @property
    def key(self):
        return (self.module, self.name)


class Other:
    """Any binding that is not a function we track (class, constant, ...)."""


OTHER = Other()


@dataclass
class ModRef:
    """A name bound to a module object (`import a.b as c`)."""

    module: str


@dataclass
class AttrRef:
    """A name bound to `module.attr` (from-import or `g = mod.f`), resolved lazily."""

    module: str
    attr: str


class Catalog:
    def __init__(self):
        self.modules = {}  # dotted module name -> (app, relpath, ast.Module)
        self.is_package = {}  # module -> bool
        self.ns_cache = {}
        self.in_progress = set()
        self._partial = {}  # module -> namespace being built (circular imports)
        self.funcs = {}  # (module, name) -> Func (every module-level def seen)
        self.whitelisted = {}  # (module, name) -> Func with wl
        self.problems = []  # human-readable notes for the report
        self.class_wl = []  # (module, qualname) whitelisted inside classes
        self.nested_wl = []  # whitelisted defs nested in functions
        self.parse_failures = {}  # app -> [relpath]

    # -- loading -----------------------------------------------------------

    def load_app(self, app, checkout):
        pkg_dir = os.path.join(checkout, app)
        if not os.path.isfile(os.path.join(pkg_dir, "__init__.py")):
            sys.exit(f"{pkg_dir}/__init__.py not found (is --app {app}=<checkout> right?)")
        self.parse_failures[app] = []
        count = 0
        for dirpath, dirnames, filenames in os.walk(pkg_dir):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "node_modules") and not d.startswith("."))
            for fn in sorted(filenames):
                if not fn.endswith(".py"):
                    continue
                path = os.path.join(dirpath, fn)
                rel = os.path.relpath(path, checkout).replace(os.sep, "/")
                parts = rel[:-3].split("/")
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modname = ".".join(parts)
                count += 1
                try:
                    with open(path, encoding="utf-8") as f:
                        tree = ast.parse(f.read(), filename=rel)
                except (SyntaxError, UnicodeDecodeError, ValueError) as e:
                    self.parse_failures[app].append(f"{rel}: {e}")
                    continue
                self.modules[modname] = (app, rel, tree)
                self.is_package[modname] = fn == "__init__.py"
        return count

    # -- helpers -----------------------------------------------------------

    def resolve_relative(self, module, level, name):
        """Absolute module for `from <level dots><name> import ...` inside `module`."""
        if level == 0:
            return name
        base = module if self.is_package.get(module) else module.rpartition(".")[0]
        for _ in range(level - 1):
            base = base.rpartition(".")[0]
        return f"{base}.{name}" if name else base

    @staticmethod
    def module_level_stmts(body):
        """Statements executed at import time, in order.

        Descends into if/try/with/for bodies (still module level), but skips
        `if TYPE_CHECKING:` bodies (never executed at runtime) and `except`
        handlers (assume the guarded import succeeds)."""
        for st in body:
            if isinstance(st, ast.If):
                test = ast.unparse(st.test)
                if test in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                    yield from Catalog.module_level_stmts(st.orelse)
                    continue
                yield from Catalog.module_level_stmts(st.body)
                yield from Catalog.module_level_stmts(st.orelse)
            elif isinstance(st, ast.Try) or (hasattr(ast, "TryStar") and isinstance(st, ast.TryStar)):
                yield from Catalog.module_level_stmts(st.body)
                yield from Catalog.module_level_stmts(st.orelse)
                yield from Catalog.module_level_stmts(st.finalbody)
            elif isinstance(st, (ast.With, ast.For, ast.While)):
                yield from Catalog.module_level_stmts(st.body)
            else:
                yield st

    def eval_expr(self, module, ns, expr):
        """What a module-level name would be bound to by `name = expr`."""
        if isinstance(expr, ast.Name):
            return ns.get(expr.id, OTHER)
        if isinstance(expr, ast.Attribute):
            chain = []
            e = expr
            while isinstance(e, ast.Attribute):
                chain.append(e.attr)
                e = e.value
            if not isinstance(e, ast.Name):
                return OTHER
            chain.reverse()
            base = ns.get(e.id)
            if isinstance(base, AttrRef):
                base = self.resolve(base)
            if not isinstance(base, ModRef):
                return OTHER
            cur = base.module
            for a in chain[:-1]:
                cur = f"{cur}.{a}"  # submodule attribute (set when the submodule is imported)
            return AttrRef(cur, chain[-1])
        return OTHER

    def resolve(self, target, seen=None):
        """Follow AttrRef chains to a Func / ModRef / OTHER."""
        seen = seen or set()
        while isinstance(target, AttrRef):
            k = (target.module, target.attr)
            if k in seen:
                return OTHER
            seen.add(k)
            if target.module in self.modules:
                ns = self.namespace(target.module)
                if target.attr in ns:
                    target = ns[target.attr]
                    continue
            sub = f"{target.module}.{target.attr}"
            if sub in self.modules:
                return ModRef(sub)
            return OTHER  # outside the scanned apps (stdlib, 3rd party) or missing
        return target

    def whitelist_call(self, module, ns, expr):
        """If `expr` is a call `frappe.whitelist(...)` (or `whitelist(...)` bound
        to frappe.whitelist), return its WL; else None."""
        if not isinstance(expr, ast.Call):
            return None
        func = self.resolve(self.eval_expr(module, ns, expr.func))
        if not (isinstance(func, Func) and func.key == ("frappe", "whitelist")):
            return None
        wl = WL()
        values = dict(zip(WHITELIST_PARAMS, expr.args))
        values.update({k.arg: k.value for k in expr.keywords if k.arg})
        if "allow_guest" in values:
            try:
                wl.allow_guest = bool(ast.literal_eval(values["allow_guest"]))
            except ValueError:
                wl.allow_guest = ast.unparse(values["allow_guest"])
                wl.problems.append(f"allow_guest is not a literal: {wl.allow_guest}")
        if "methods" in values:
            try:
                m = ast.literal_eval(values["methods"])
                wl.methods = list(m) if m else None  # `if not methods:` -> default
            except ValueError:
                wl.methods = ast.unparse(values["methods"])
                wl.problems.append(f"methods is not a literal: {wl.methods}")
        return wl

    def is_bare_whitelist(self, module, ns, expr):
        func = self.resolve(self.eval_expr(module, ns, expr))
        return isinstance(func, Func) and func.key == ("frappe", "whitelist")

    def helper_wl(self, module, ns, fnode):
        """A module-level helper `def deco(fn): ... return frappe.whitelist(...)(fn)`
        (e.g. frappe/tests/ui_test_helpers.py:whitelist_for_tests) acts as a
        whitelisting decorator."""
        params = fnode.args.posonlyargs + fnode.args.args
        if not params:
            return None
        for st in ast.walk(fnode):
            if isinstance(st, ast.Return) and isinstance(st.value, ast.Call):
                c = st.value
                if (
                    len(c.args) == 1
                    and isinstance(c.args[0], ast.Name)
                    and c.args[0].id == params[0].arg
                ):
                    wl = self.whitelist_call(module, ns, c.func)
                    if wl:
                        return wl
        return None

    # -- namespace ---------------------------------------------------------

    def namespace(self, module):
        """Module globals at the end of import: name -> Func|ModRef|AttrRef|OTHER."""
        if module in self.ns_cache:
            return self.ns_cache[module]
        if module in self.in_progress:
            # circular import: Python would also see a partially initialised
            # module; use what is bound so far.
            return self._partial[module]
        app, rel, tree = self.modules[module]
        ns = {}
        self.in_progress.add(module)
        self._partial[module] = ns
        for st in self.module_level_stmts(tree.body):
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.bind_def(module, rel, ns, st)
            elif isinstance(st, ast.ClassDef):
                self.scan_class(module, rel, st, st.name)
                ns[st.name] = OTHER
            elif isinstance(st, ast.Import):
                for a in st.names:
                    if a.asname:
                        ns[a.asname] = ModRef(a.name)  # `import x.y as z`: a module, no attribute alias
                    else:
                        top = a.name.split(".")[0]
                        ns[top] = ModRef(top)
            elif isinstance(st, ast.ImportFrom):
                src = self.resolve_relative(module, st.level, st.module or "")
                for a in st.names:
                    if a.name == "*":
                        # `from X import *` binds X.__all__ if defined, else X's
                        # public (non-underscore) globals.
                        for n, t in self.star_exports(src).items():
                            ns[n] = t
                    else:
                        ns[a.asname or a.name] = AttrRef(src, a.name)
            elif isinstance(st, (ast.Assign, ast.AnnAssign)):
                targets = st.targets if isinstance(st, ast.Assign) else [st.target]
                if st.value is None:
                    continue
                val = self.eval_assign_value(module, rel, ns, st, targets)
                for t in targets:
                    if isinstance(t, ast.Name):
                        ns[t.id] = val
                    else:
                        for n in ast.walk(t):
                            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                                ns[n.id] = OTHER
            elif isinstance(st, ast.Expr):
                # bare `frappe.whitelist()(fn)`: whitelists a wrapper object that
                # no module attribute holds -> unreachable (see model above).
                v = st.value
                if isinstance(v, ast.Call) and self.whitelist_call(module, ns, v.func):
                    self.problems.append(
                        f"{rel}:{st.lineno}: bare `{ast.unparse(v)}` result is not bound; not reachable"
                    )
            elif isinstance(st, ast.Delete):
                for t in st.targets:
                    if isinstance(t, ast.Name):
                        ns.pop(t.id, None)
        self.in_progress.discard(module)
        self.ns_cache[module] = ns
        return ns

    def eval_assign_value(self, module, rel, ns, st, targets):
        v = st.value
        # `x = frappe.whitelist(...)(fn)` at module level: x is the whitelisted wrapper.
        if isinstance(v, ast.Call) and len(v.args) == 1:
            wl = self.whitelist_call(module, ns, v.func)
            if wl:
                name = targets[0].id if isinstance(targets[0], ast.Name) else "?"
                arg = v.args[0]
                node = arg if isinstance(arg, ast.Lambda) else None
                inner = self.resolve(self.eval_expr(module, ns, arg)) if node is None else None
                if isinstance(inner, Func):
                    node = inner.node
                f = Func(module, name, rel, st.lineno, node, wl=wl)
                if node is None:
                    self.problems.append(f"{rel}:{st.lineno}: cannot resolve function in {ast.unparse(v)}")
                self.whitelisted[f.key] = f
                return f
        return self.eval_expr(module, ns, v)

    def star_exports(self, src):
        if src not in self.modules:
            return {}
        ns = self.namespace(src)
        _, _, tree = self.modules[src]
        all_names = None
        for st in tree.body:
            if isinstance(st, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in st.targets):
                try:
                    all_names = list(ast.literal_eval(st.value))
                except ValueError:
                    self.problems.append(f"{src}: __all__ not a literal; using public names")
        if all_names is not None:
            return {n: ns.get(n, AttrRef(src, n)) for n in all_names}
        return {n: t for n, t in ns.items() if not n.startswith("_")}

    def bind_def(self, module, rel, ns, node):
        f = Func(module, node.name, rel, node.lineno, node)
        self.funcs[f.key] = f
        decos = node.decorator_list
        wl_index = None
        for i, d in enumerate(decos):
            wl = self.whitelist_call(module, ns, d)
            if wl is None:
                # helper decorator returning whitelist(...)(fn)
                target = self.resolve(self.eval_expr(module, ns, d))
                if isinstance(target, Func) and target.wl_decorator:
                    wl = WL(
                        allow_guest=target.wl_decorator.allow_guest,
                        methods=target.wl_decorator.methods,
                        via=f"{target.module}.{target.name}",
                    )
                elif self.is_bare_whitelist(module, ns, d):
                    self.problems.append(
                        f"{rel}:{d.lineno}: `@{ast.unparse(d)}` without call; binds whitelist's innerfn, not reachable"
                    )
            if wl is not None:
                f.wl = wl
                wl_index = i
        if f.wl is not None:
            f.decorators = [ast.unparse(d) for j, d in enumerate(decos) if j != wl_index]
            if wl_index != 0:
                f.wl.problems.append(
                    "decorators above @whitelist rebind the name to another object: "
                    + ", ".join(ast.unparse(d) for d in decos[:wl_index])
                )
            self.whitelisted[f.key] = f
        else:
            hw = self.helper_wl(module, ns, node)
            if hw:
                f.wl_decorator = hw
        ns[node.name] = f

    def scan_class(self, module, rel, cls, qual):
        """Count (not catalogue) @frappe.whitelist() in class bodies: methods are
        not reachable through frappe.get_attr (see model above)."""
        for st in self.module_level_stmts(cls.body):
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if any(self._looks_whitelisted(d) for d in st.decorator_list):
                    self.class_wl.append(f"{module}:{qual}.{st.name}")
            elif isinstance(st, ast.ClassDef):
                self.scan_class(module, rel, st, f"{qual}.{st.name}")

    @staticmethod
    def _looks_whitelisted(d):
        s = ast.unparse(d.func if isinstance(d, ast.Call) else d)
        return s in ("frappe.whitelist", "whitelist")

    def scan_nested(self):
        """Count whitelist decorators on functions nested in functions (unreachable:
        a local name is never a module attribute)."""
        for module, (_, rel, tree) in self.modules.items():
            top = set()
            for st in self.module_level_stmts(tree.body):
                top.add(id(st))
            for st in ast.walk(tree):
                if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)) and id(st) not in top:
                    for sub in ast.walk(st):
                        if sub is not st and isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            if any(self._looks_whitelisted(d) for d in sub.decorator_list):
                                self.nested_wl.append(f"{rel}:{sub.lineno}:{sub.name}")


# ---------------------------------------------------------------------------
# Signature (frappe/__init__.py:get_newargs uses inspect.signature(fn))
# ---------------------------------------------------------------------------


FORM_DICT_NAMES = {"form_dict", "get_request_form_data"}


def reads_form_dict(cat, memo, f, depth=0):
    """Whether a function reads the request's arguments itself, not only through its
    parameters: it names `form_dict` (`frappe.form_dict`, `frappe.local.form_dict`) or
    `get_request_form_data`, or calls a function of the scanned apps that does (followed
    through module-level names and imports, 4 calls deep). Such a function receives every
    argument of the request whatever its signature, so erpgate judges them all (frappe/app.py
    `make_form_dict` fills `frappe.local.form_dict` for the whole request)."""
    if f.key in memo:
        return memo[f.key]
    memo[f.key] = False  # a cycle reads nothing by itself
    if f.node is None or depth > 4:
        return False
    found = False
    ns = cat.namespace(f.module)
    for n in ast.walk(f.node):
        if isinstance(n, ast.Attribute) and n.attr in FORM_DICT_NAMES:
            found = True
        elif isinstance(n, ast.Name) and n.id in FORM_DICT_NAMES:
            found = True
        elif isinstance(n, ast.Call):
            target = cat.resolve(cat.eval_expr(f.module, ns, n.func))
            if isinstance(target, Func) and reads_form_dict(cat, memo, target, depth + 1):
                found = True
        if found:
            break
    memo[f.key] = found
    return found


def signature(node):
    """params / varargs / kwargs as inspect.signature reports them for `node`.

    get_newargs passes a form_dict key through if it names any parameter other
    than **kwargs (or if **kwargs exists). Positional-only parameters are listed
    (marked) because inspect lists them too, although Python would reject them
    as keywords."""
    a = node.args
    out = []
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)

    def ann(x):
        return ast.unparse(x.annotation) if getattr(x, "annotation", None) is not None else None

    for i, (p, d) in enumerate(zip(positional, defaults)):
        e = {"name": p.arg, "required": d is None, "annotation": ann(p)}
        if d is not None:
            e["default"] = ast.unparse(d)
        if i < len(a.posonlyargs):
            e["positional_only"] = True
        out.append(e)
    for p, d in zip(a.kwonlyargs, a.kw_defaults):
        e = {"name": p.arg, "required": d is None, "annotation": ann(p)}
        if d is not None:
            e["default"] = ast.unparse(d)
        e["keyword_only"] = True
        out.append(e)
    return out, (a.vararg.arg if a.vararg else None), (a.kwarg.arg if a.kwarg else None)


# ---------------------------------------------------------------------------
# App metadata
# ---------------------------------------------------------------------------


def read_version(checkout, app):
    with open(os.path.join(checkout, app, "__init__.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for st in tree.body:
        if isinstance(st, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__version__" for t in st.targets):
            return ast.literal_eval(st.value)
    return None


def read_commit(checkout):
    if not os.path.exists(os.path.join(checkout, ".git")):
        return None
    try:
        return subprocess.run(
            ["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def read_overrides(checkout, app):
    """hooks.py `override_whitelisted_methods = {old: new}`.

    frappe/handler.py:execute_cmd (also frappe/api/v2.py:handle_rpc_call and
    frappe/model/mapper.py:make_mapped_doc) replaces cmd by the LAST hook value
    registered for it across installed apps before get_attr(cmd)."""
    path = os.path.join(checkout, app, "hooks.py")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    out = []
    for st in tree.body:
        if (
            isinstance(st, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "override_whitelisted_methods" for t in st.targets)
        ):
            for k, v in ast.literal_eval(st.value).items():
                vs = v if isinstance(v, list) else [v]
                for w in vs:
                    e = {"override": k, "with": w, "app": app}
                    # dot-less: frappe/handler.py:get_attr -> globals()[cmd] of frappe.handler
                    e["resolves_to"] = w if "." in w else f"{HANDLER_MODULE}.{w}"
                    out.append(e)
    return out


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_kv(items, what):
    out = {}
    for it in items or []:
        if "=" not in it:
            sys.exit(f"--{what} expects NAME=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out[k] = v
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--app", action="append", required=True, help="APP=/path/to/checkout (package dir is <checkout>/APP)")
    ap.add_argument("--app-version", action="append", help="APP=VERSION[@COMMIT]")
    ap.add_argument("--app-from", action="append", help="APP=where the source came from (free text)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    apps = []
    for it in args.app:
        if "=" not in it:
            sys.exit(f"--app expects APP=PATH, got {it!r}")
        name, path = it.split("=", 1)
        apps.append((name, os.path.abspath(path)))
    versions = parse_kv(args.app_version, "app-version")
    froms = parse_kv(args.app_from, "app-from")
    if "frappe" not in [a for a, _ in apps]:
        sys.exit("the frappe app must be scanned too (whitelist() is resolved in it)")

    cat = Catalog()
    headers, scans, overrides = [], [], []
    file_counts = {}
    for app, checkout in apps:
        file_counts[app] = cat.load_app(app, checkout)
        version, commit = read_version(checkout, app), read_commit(checkout)
        if app in versions:
            v = versions[app]
            version, _, c = v.partition("@")
            commit = c or commit
        h = {"source": app, "version": version, "commit": commit}
        if app in froms:
            h["from"] = froms[app]
        headers.append(h)
        overrides += read_overrides(checkout, app)

    for module in sorted(cat.modules):
        cat.namespace(module)
    cat.scan_nested()

    # Every module-level binding, in every module, that resolves to a whitelisted object.
    reach = {k: [] for k in cat.whitelisted}
    for module in sorted(cat.modules):
        for name, t in cat.namespace(module).items():
            r = cat.resolve(t)
            if isinstance(r, Func) and r.key in reach and r.wl is not None:
                reach[r.key].append(f"{module}.{name}")

    entries = []
    form_dict_memo = {}
    for key, f in cat.whitelisted.items():
        canonical = f"{f.module}.{f.name}"
        names = sorted(set(reach[key]))
        e = {
            "name": canonical,
            "app": cat.modules[f.module][0],
            "file": f.file,
            "line": f.line,
            "allow_guest": f.wl.allow_guest,
            "methods": f.wl.methods if f.wl.methods is not None else list(DEFAULT_METHODS),
        }
        if f.node is not None:
            params, varargs, kwargs = signature(f.node)
        else:
            params, varargs, kwargs = None, None, None
        e["params"] = params
        if varargs:
            e["varargs"] = varargs
        e["kwargs"] = kwargs
        if reads_form_dict(cat, form_dict_memo, f):
            e["reads_form_dict"] = True
        e["aliases"] = [n for n in names if n != canonical]
        if f.decorators:
            e["decorators"] = f.decorators
            bare = [d.split("(")[0].split(".")[-1] for d in f.decorators]
            if any(b not in SIGNATURE_PRESERVING_DECORATORS for b in bare):
                e["signature_uncertain"] = True
        if f.wl.via:
            e["via"] = f.wl.via
            if f.wl.via in VIA_NOTES:
                e["note"] = VIA_NOTES[f.wl.via]
        if canonical not in names:
            e["shadowed"] = True  # the defining module rebinds the name later
            cat.problems.append(f"{canonical}: name rebound later in its module; reachable only via aliases {names}")
        for p in f.wl.problems:
            cat.problems.append(f"{canonical}: {p}")
        entries.append(e)

    for name, extra in SPECIAL_ENTRIES.items():
        module, _, attr = name.rpartition(".")
        f = cat.funcs.get((module, attr))
        if f is None or (module, attr) in cat.whitelisted:
            continue
        params, varargs, kwargs = signature(f.node)
        e = {
            "name": name,
            "app": cat.modules[module][0],
            "file": f.file,
            "line": f.line,
            "allow_guest": False,
            "methods": list(DEFAULT_METHODS),
            "params": params,
        }
        if varargs:
            e["varargs"] = varargs
        e["kwargs"] = kwargs
        if reads_form_dict(cat, form_dict_memo, f):
            e["reads_form_dict"] = True
        e["aliases"] = []
        e["whitelisted"] = False
        e.update(extra)
        entries.append(e)

    entries.sort(key=lambda e: e["name"])

    for app, checkout in apps:
        pkg_modules = sorted({m.split(".")[0] for m in cat.modules if cat.modules[m][0] == app})
        per_app = [e for e in entries if e["app"] == app]
        scans.append(
            {
                "scan": app,
                "package_dirs": [f"{p}/" for p in pkg_modules],
                "py_files": file_counts[app],
                "parse_failures": len(cat.parse_failures[app]),
                "functions": len(per_app),
                "aliases": sum(len(e["aliases"]) for e in per_app),
                "class_level_whitelisted_not_catalogued": sum(
                    1 for c in cat.class_wl if cat.modules[c.split(":")[0]][0] == app
                ),
            }
        )
    # Is the override target in the catalog (as a name or an alias)? Is the
    # overridden name itself still a whitelisted function?
    reachable = {e["name"] for e in entries} | {a for e in entries for a in e["aliases"]}
    for o in overrides:
        o["target_catalogued"] = o["resolves_to"] in reachable
        o["overridden_name_catalogued"] = o["override"] in reachable
        if not o["target_catalogued"]:
            cat.problems.append(f"override target {o['resolves_to']} (for {o['override']}) not in catalog")
    overrides.sort(key=lambda o: (o["override"], o["app"]))

    with open(args.out, "w", encoding="utf-8") as out:
        for line in headers + scans + overrides + entries:
            out.write(json.dumps(line, ensure_ascii=False) + "\n")

    # Report to stderr (not part of the data file).
    for s in scans:
        print(json.dumps(s), file=sys.stderr)
    for app, fails in cat.parse_failures.items():
        for x in fails:
            print(f"parse failure [{app}]: {x}", file=sys.stderr)
    if cat.nested_wl:
        print(f"whitelisted defs nested in functions (unreachable): {cat.nested_wl}", file=sys.stderr)
    for p in sorted(set(cat.problems)):
        print(f"note: {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
