//! A safe grammar for the query arguments of list reads, for restricted clients.
//!
//! Frappe's query layer is not a security boundary. `frappe/model/db_query.py`
//! `DatabaseQuery.parse_args` takes `fields` as `"*"`, a JSON list or a comma-separated string,
//! and `sanitize_fields` only refuses a field that *starts* with a subquery, so
//! `substring((select group_concat(name, api_key) from tabUser), 1, 500) as x` reads another
//! table; `order_by` and `group_by` are SQL fragments; a `filters` entry that is a string is
//! appended to the `WHERE` clause as it is (`build_filter_conditions`). A rule that allows
//! `ToDo: [read]` must not be a window onto `tabUser`, so for restricted clients these
//! arguments are parsed here and allowed only when every part is in this grammar:
//!
//! ```text
//! field    := ws ( "*" | aggregate | column ) [ ws+ "as" ws+ alias ] ws
//! aggregate:= ("count"|"sum"|"avg"|"min"|"max") ws "(" ws ( "*" | ["distinct" ws+] column ) ws ")"
//!             ("*" and "distinct" with count only)
//! column   := name | "`" name "`" | "`tab" doctype "`.`" name "`" | "`tab" doctype "`.*"
//! alias    := name | "`" name "`"
//! order_by := column [ ws+ ("asc"|"desc") ] { "," ... }      group_by := column { "," column }
//! filters  := JSON: {name: value | [op, value]} or [[name, op, value] | [doctype, name, op, value, ...]]
//! ```
//!
//! `name` is `[A-Za-z_][A-Za-z0-9_]*` (not one of MariaDB's niladic functions such as
//! `current_user`), `doctype` is `[A-Za-z0-9 _-]+` and must be readable by the client, `op` is
//! one of Frappe's filter operators, and a filter value is a scalar or a list of scalars, which
//! Frappe escapes as SQL literals. Keywords are case-insensitive, as in SQL. `link.field`
//! (Frappe's implicit join to a linked doctype) is refused: it reads another table.

use super::form_dict::{FormDict, FormKey, FormValue};
use super::python_json::{self, PyJson};

/// A refused query argument; said to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("query argument '{argument}' is not allowed: {reason}")]
pub struct RefusedArgument {
    /// Which argument.
    pub argument: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Frappe 15's filter operators (`frappe/model/db_query.py` `prepare_filter_condition` and
/// `frappe/utils/data.py` `get_filter`), compared lower-cased.
const OPERATORS: &[&str] = &[
    "=",
    "!=",
    ">",
    "<",
    ">=",
    "<=",
    "like",
    "not like",
    "in",
    "not in",
    "is",
    "between",
    "timespan",
    "descendants of",
    "not descendants of",
    "ancestors of",
    "not ancestors of",
    "descendants of (inclusive)",
    "previous",
    "next",
];

/// MariaDB functions that need no parentheses: a bare "column" of that name is a function call.
const NILADIC: &[&str] = &[
    "current_date",
    "current_time",
    "current_timestamp",
    "current_user",
    "current_role",
    "localtime",
    "localtimestamp",
    "utc_date",
    "utc_time",
    "utc_timestamp",
    "null",
    "true",
    "false",
    "default",
];

const AGGREGATES: &[&str] = &["count", "sum", "avg", "min", "max"];

/// Why an argument that looks like JSON but cannot be read exactly as CPython would is refused.
const NOT_READ: &str = "it cannot be read exactly as Frappe would read it (JSON nested deeper \
     than erpgate reads, or malformed); refused rather than guessed";

/// Checks every list argument in `form` (`fieldname` aside: see [`check_fieldname`]);
/// `readable` says whether the client may read a doctype.
pub fn check(form: &FormDict, readable: &dyn Fn(&str) -> bool) -> Result<(), RefusedArgument> {
    for entry in form.entries() {
        let (key, value) = (&entry.key, &entry.value);
        let result = match key {
            FormKey::Fields => fields(value, readable),
            FormKey::Filters | FormKey::OrFilters => filters(value, readable),
            FormKey::OrderBy => list_of(value, readable, true),
            FormKey::GroupBy => list_of(value, readable, false),
            _ => Ok(()),
        };
        result.map_err(|reason| RefusedArgument {
            argument: key.as_str().to_owned(),
            reason,
        })?;
    }
    Ok(())
}

/// Checks `fieldname` of `frappe.client.get_value`: the columns it reads, in the `fields` grammar.
pub fn check_fieldname(
    value: &FormValue,
    readable: &dyn Fn(&str) -> bool,
) -> Result<(), RefusedArgument> {
    fields(value, readable).map_err(|reason| RefusedArgument {
        argument: FormKey::Fieldname.as_str().to_owned(),
        reason,
    })
}

/// How an argument reaches SQL, as a function's catalog entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// `SELECT` columns: `fields`.
    Fields,
    /// `get_value`'s `fieldname`: the `fields` grammar.
    Fieldname,
    /// `ORDER BY`.
    OrderBy,
    /// `GROUP BY`.
    GroupBy,
    /// One column name, pasted: a plain identifier.
    Pluck,
    /// `WHERE`, from Frappe's filter shapes.
    Filters,
}

/// Checks one argument `name` that reaches SQL as `fragment`.
pub fn check_value(
    fragment: Fragment,
    name: &str,
    value: &FormValue,
    readable: &dyn Fn(&str) -> bool,
) -> Result<(), RefusedArgument> {
    let result = match fragment {
        Fragment::Fields | Fragment::Fieldname => fields(value, readable),
        Fragment::Filters => filters(value, readable),
        Fragment::OrderBy => list_of(value, readable, true),
        Fragment::GroupBy => list_of(value, readable, false),
        Fragment::Pluck => pluck(value),
    };
    result.map_err(|reason| RefusedArgument {
        argument: name.to_owned(),
        reason,
    })
}

/// `pluck`: Frappe pastes it as a column name (`db_query.py` `execute`), so only a plain name.
fn pluck(value: &FormValue) -> Result<(), String> {
    let text = match value {
        FormValue::Json(PyJson::Null) => return Ok(()),
        value => value.as_plain_text().ok_or("must be a string")?,
    };
    let mut c = Cursor::new(text);
    match c.name() {
        Some(name)
            if c.rest().is_empty() && !NILADIC.contains(&name.to_ascii_lowercase().as_str()) =>
        {
            Ok(())
        }
        _ if text.is_empty() => Ok(()),
        _ => Err(format!("'{text}' is not a plain column name")),
    }
}

/// `fields`: `"*"`, a JSON list of field strings, a JSON string of either, or a comma-separated
/// string (`DatabaseQuery.parse_args`).
fn fields(value: &FormValue, readable: &dyn Fn(&str) -> bool) -> Result<(), String> {
    let text = match value {
        FormValue::Text(s) | FormValue::Json(PyJson::Str(s)) => s.as_str(),
        FormValue::Json(PyJson::Array(items)) => return field_items(items, readable),
        FormValue::Json(PyJson::Null) => return Ok(()),
        FormValue::Json(_) => return Err("must be a list of field names".into()),
    };
    if text.trim() == "*" || text.trim().is_empty() {
        return Ok(());
    }
    match python_json::loads(text) {
        Ok(PyJson::Array(items)) => field_items(&items, readable),
        Ok(_) => Err("must be a list of field names".into()),
        Err(e) if e.too_deep() => Err(NOT_READ.into()),
        // `parse_args` splits what `json.loads` refuses (a `ValueError`) at commas.
        Err(_) => text
            .split(',')
            .filter(|f| !f.trim().is_empty())
            .try_for_each(|f| field(f, readable)),
    }
}

fn field_items(items: &[PyJson], readable: &dyn Fn(&str) -> bool) -> Result<(), String> {
    items.iter().try_for_each(|item| match item {
        PyJson::Str(f) if f.is_empty() => Ok(()),
        PyJson::Str(f) => field(f, readable),
        PyJson::Null => Ok(()),
        _ => Err("every field must be a string".into()),
    })
}

fn field(text: &str, readable: &dyn Fn(&str) -> bool) -> Result<(), String> {
    let mut c = Cursor::new(text);
    c.spaces();
    if !c.eat("*") && !c.aggregate(readable)? {
        c.column(readable)?;
    }
    let before_alias = c.pos;
    if c.spaces() > 0 && c.keyword("as") {
        if c.spaces() == 0 {
            return Err(format!("'{text}' is not a plain field"));
        }
        c.alias()?;
    } else {
        c.pos = before_alias;
    }
    c.spaces();
    c.end(text)
}

/// `order_by` (columns with an optional direction) and `group_by` (columns), comma-separated.
fn list_of(
    value: &FormValue,
    readable: &dyn Fn(&str) -> bool,
    direction: bool,
) -> Result<(), String> {
    let text = match value {
        FormValue::Text(s) | FormValue::Json(PyJson::Str(s)) => s.as_str(),
        FormValue::Json(PyJson::Null) => return Ok(()),
        FormValue::Json(_) => return Err("must be a string".into()),
    };
    if text.trim().is_empty() {
        return Ok(());
    }
    text.split(',').try_for_each(|item| {
        let mut c = Cursor::new(item);
        c.spaces();
        c.column(readable)?;
        let before = c.pos;
        if !(direction && c.spaces() > 0 && (c.keyword("asc") || c.keyword("desc"))) {
            c.pos = before;
        }
        c.spaces();
        c.end(item)
    })
}

/// `filters` / `or_filters`: a JSON string, dict or list (`DatabaseQuery.parse_args`,
/// `get_filter`, `make_filter_tuple`).
fn filters(value: &FormValue, readable: &dyn Fn(&str) -> bool) -> Result<(), String> {
    let parsed;
    let json = match value {
        FormValue::Text(s) | FormValue::Json(PyJson::Str(s)) => {
            // Text that is not JSON is a document name to `frappe.client.get_value`
            // (`get_safe_filters` falls back to `{"name": text}`, an escaped literal) and an
            // error to `DatabaseQuery.parse_args` (`json.loads`): nothing reaches SQL unescaped.
            // Fail closed: only text that cannot be meant as JSON passes unparsed; a list,
            // object or string that erpgate cannot read (too deep, malformed) is refused.
            match python_json::loads(s) {
                Ok(value) => {
                    parsed = value;
                    &parsed
                }
                Err(e) if e.too_deep() => return Err(NOT_READ.into()),
                Err(_) if s.trim_start().starts_with(['[', '{', '"']) => {
                    return Err(NOT_READ.into())
                }
                Err(_) => return Ok(()),
            }
        }
        FormValue::Json(v) => v,
    };
    match json {
        PyJson::Null => Ok(()),
        PyJson::Object(members) => members
            .iter()
            .try_for_each(|m| dict_filter(&m.key, &m.value)),
        PyJson::Array(items) => items.iter().try_for_each(|item| match item {
            PyJson::Array(parts) => list_filter(parts, readable),
            PyJson::Object(members) => members
                .iter()
                .try_for_each(|m| dict_filter(&m.key, &m.value)),
            // A string filter is raw SQL to Frappe (`build_filter_conditions`).
            _ => Err("every filter must be a list or a dict".into()),
        }),
        _ => Err("must be a JSON list or dict".into()),
    }
}

fn dict_filter(field: &str, value: &PyJson) -> Result<(), String> {
    plain_name(field)?;
    match value {
        PyJson::Array(pair) => match pair.as_slice() {
            [op, operand] => {
                operator(op)?;
                operand_value(operand)
            }
            _ => Err(format!("the filter on '{field}' must be [operator, value]")),
        },
        v if v.is_scalar() => Ok(()),
        _ => Err(format!("the filter on '{field}' has an unsupported value")),
    }
}

fn list_filter(parts: &[PyJson], readable: &dyn Fn(&str) -> bool) -> Result<(), String> {
    let (field, op, operand) = match parts {
        [field, op, operand] => (field, op, operand),
        [doctype, field, op, operand, rest @ ..] => {
            let doctype = doctype
                .as_str()
                .ok_or("a filter's doctype must be a string")?;
            if !readable(doctype) {
                return Err(format!("a filter reads doctype '{doctype}'"));
            }
            if !rest.iter().all(PyJson::is_scalar) {
                return Err("a filter has extra parts that are not plain values".into());
            }
            (field, op, operand)
        }
        _ => return Err("a filter must be [field, operator, value]".into()),
    };
    plain_name(field.as_str().ok_or("a filter's field must be a string")?)?;
    operator(op)?;
    operand_value(operand)
}

fn operator(op: &PyJson) -> Result<(), String> {
    let op = op.as_str().ok_or("a filter operator must be a string")?;
    let lower = op.trim().to_lowercase();
    if OPERATORS.contains(&lower.as_str()) {
        Ok(())
    } else {
        Err(format!("unknown filter operator '{op}'"))
    }
}

fn operand_value(value: &PyJson) -> Result<(), String> {
    match value {
        v if v.is_scalar() => Ok(()),
        PyJson::Array(items) if items.iter().all(PyJson::is_scalar) => Ok(()),
        _ => Err("a filter value must be a plain value or a list of them".into()),
    }
}

fn plain_name(name: &str) -> Result<(), String> {
    let mut c = Cursor::new(name);
    match c.name() {
        Some(_) if c.at_end() => Ok(()),
        _ => Err(format!("'{name}' is not a plain field name")),
    }
}

/// A position in one argument's text.
struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(s: &'a str) -> Self {
        Self { s, pos: 0 }
    }

    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn at_end(&self) -> bool {
        self.pos == self.s.len()
    }

    fn end(&self, whole: &str) -> Result<(), String> {
        if self.at_end() {
            Ok(())
        } else {
            Err(format!("'{whole}' is not a plain field"))
        }
    }

    fn spaces(&mut self) -> usize {
        let n = self.rest().len() - self.rest().trim_start_matches(' ').len();
        self.pos += n;
        n
    }

    fn eat(&mut self, token: &str) -> bool {
        if self.rest().starts_with(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    /// A case-insensitive keyword that is not the start of a longer name.
    fn keyword(&mut self, word: &str) -> bool {
        // Compared as bytes: the text may hold any characters, and `word` is ASCII, so a match
        // ends on a character boundary.
        let rest = self.rest().as_bytes();
        let matches = rest
            .get(..word.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(word.as_bytes()))
            && !rest
                .get(word.len())
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_');
        if matches {
            self.pos += word.len();
        }
        matches
    }

    /// `[A-Za-z_][A-Za-z0-9_]*`
    fn name(&mut self) -> Option<&'a str> {
        let rest = self.rest();
        if !rest.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
            return None;
        }
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        self.pos += len;
        Some(&rest[..len])
    }

    /// A backquoted name of `allowed` characters.
    fn quoted(&mut self, allowed: impl Fn(char) -> bool) -> Option<&'a str> {
        let rest = self.rest().strip_prefix('`')?;
        let len = rest.find('`')?;
        let inner = &rest[..len];
        if inner.is_empty() || !inner.chars().all(allowed) {
            return None;
        }
        self.pos += len + 2;
        Some(inner)
    }

    fn alias(&mut self) -> Result<(), String> {
        let ok = if self.rest().starts_with('`') {
            self.quoted(|c| c.is_ascii_alphanumeric() || c == '_' || c == ' ')
                .is_some()
        } else {
            self.name().is_some()
        };
        ok.then_some(()).ok_or_else(|| "bad alias".to_owned())
    }

    fn column(&mut self, readable: &dyn Fn(&str) -> bool) -> Result<(), String> {
        let start = self.pos;
        let bad = |c: &Self| format!("'{}' is not a plain field", c.s.trim());
        if self.rest().starts_with('`') {
            let doctype_char = |c: char| c.is_ascii_alphanumeric() || " _-".contains(c);
            let Some(quoted) = self.quoted(doctype_char) else {
                return Err(bad(self));
            };
            match quoted.strip_prefix("tab") {
                Some(doctype) if self.rest().starts_with('.') => {
                    self.pos += 1;
                    if !readable(doctype) {
                        return Err(format!("reads doctype '{doctype}'"));
                    }
                    let column_char = |c: char| c.is_ascii_alphanumeric() || c == '_';
                    if !(self.eat("*") || self.quoted(column_char).is_some()) {
                        return Err(bad(self));
                    }
                }
                _ if quoted.contains([' ', '-']) => return Err(bad(self)),
                _ => {}
            }
            return Ok(());
        }
        match self.name() {
            Some(name) if NILADIC.iter().any(|n| n.eq_ignore_ascii_case(name)) => {
                Err(format!("'{name}' is an SQL function"))
            }
            // `link_field.field` joins the linked doctype's table.
            Some(_) if self.rest().starts_with(['.', '(']) => {
                self.pos = start;
                Err(bad(self))
            }
            Some(_) => Ok(()),
            None => Err(bad(self)),
        }
    }

    /// An aggregate over a column, if the text starts with one.
    fn aggregate(&mut self, readable: &dyn Fn(&str) -> bool) -> Result<bool, String> {
        let start = self.pos;
        let Some(function) = self.name() else {
            return Ok(false);
        };
        let function = function.to_ascii_lowercase();
        self.spaces();
        if !self.eat("(") {
            self.pos = start;
            return Ok(false);
        }
        if !AGGREGATES.contains(&function.as_str()) {
            return Err(format!("'{function}()' is not an allowed function"));
        }
        self.spaces();
        let count = function == "count";
        if !(count && self.eat("*")) {
            let before = self.pos;
            if !(count && self.keyword("distinct") && self.spaces() > 0) {
                self.pos = before;
            }
            self.column(readable)?;
        }
        self.spaces();
        if self.eat(")") {
            Ok(true)
        } else {
            Err(format!("'{}' is not a plain aggregate", self.s.trim()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(doctype: &str) -> bool {
        doctype.eq_ignore_ascii_case("ToDo") || doctype == "ToDo Child"
    }

    fn form(pairs: &[(&str, &str)]) -> FormDict {
        let mut form = FormDict::default();
        for (k, v) in pairs {
            form.push(k, || FormValue::Text((*v).to_owned()));
        }
        form
    }

    fn ok(key: &str, value: &str) -> bool {
        check(&form(&[(key, value)]), &readable).is_ok()
    }

    #[test]
    fn plain_fields_pass() {
        for f in [
            "*",
            r#"["name", "status as s", "`description`", "count(*) as n"]"#,
            r#"["`tabToDo`.`name`", "`tabToDo`.*", "sum(`tabToDo`.`idx`)", "COUNT( DISTINCT name )"]"#,
            "name, status, max(modified) AS `last one`",
            r#"["name", "", null]"#,
            r#"["`tabToDo Child`.`item`"]"#,
            "",
        ] {
            assert!(ok("fields", f), "{f}");
        }
    }

    #[test]
    fn anything_else_in_fields_is_refused() {
        for f in [
            r#"["substring((select group_concat(name,0x3a,api_key) from `tabUser`),1,500) as x"]"#,
            r#"["(select 1)"]"#,
            r#"["name from tabUser -- "]"#,
            r#"["name; drop table x"]"#,
            r#"["`tabUser`.`api_key`"]"#,
            r#"["owner.api_key"]"#,
            r#"["current_user"]"#,
            r#"["sleep(5)"]"#,
            r#"["count(*) as"]"#,
            r#"["sum(*)"]"#,
            r#"["name /* x */"]"#,
            r#"["`na`me`"]"#,
            r#"[1]"#,
            r#"{"a": 1}"#,
            r#""name""#,
            "name\nfrom",
            "name,(select 1)",
            "@@version",
            "`tabToDo`.`name`.x",
            // Found by the fuzzer: a keyword check once sliced inside a character.
            "name 𝒞s x",
            "𝒞",
            "name aé",
        ] {
            assert!(!ok("fields", f), "{f}");
        }
        let value = FormValue::Text(r#"["(select 1)"]"#.into());
        assert!(check_fieldname(&value, &readable).is_err());
        assert!(
            ok("fieldname", r#"["(select 1)"]"#),
            "only get_value's is judged"
        );
    }

    #[test]
    fn what_cannot_be_read_as_cpython_would_is_refused_never_passed() {
        let depth = python_json::MAX_DEPTH + 1;
        // The attack shape: a subquery at the bottom of a filter nested past the parser's cap,
        // which CPython (recursion limit ~1000) still reads.
        let deep_filter = format!(
            "{}[\"ifnull((select api_secret from tabUser limit 1),1)\", \"=\", 1]{}",
            "[".repeat(depth - 1),
            "]".repeat(depth - 1)
        );
        let deep_fields = format!("{}\"name\"{}", "[".repeat(depth), "]".repeat(depth));
        let deep_object = format!("{}1{}", "{\"a\": ".repeat(depth), "}".repeat(depth));
        for (key, value) in [
            ("filters", deep_filter.as_str()),
            ("or_filters", deep_filter.as_str()),
            ("filters", deep_object.as_str()),
            ("fields", deep_fields.as_str()),
            ("filters", r#"[["name", "=", "x"]"#),
            ("filters", r#"{"name": "x""#),
            ("filters", r#""(select 1)"#),
            ("filters", " [1,]"),
        ] {
            let refused = check(&form(&[(key, value)]), &readable).unwrap_err();
            assert_eq!(refused.argument, key);
            assert!(refused.reason.contains("cannot be read"), "{refused}");
        }
        // A document name, which get_value takes as `{"name": text}`, is still fine.
        assert!(ok("filters", "TODO-0001"));
    }

    #[test]
    fn order_and_group_by() {
        assert!(ok("order_by", "modified desc, `tabToDo`.`name` ASC"));
        assert!(ok("group_by", "status, `tabToDo`.`owner`"));
        assert!(!ok("group_by", "status desc"));
        for bad in [
            "(select 1)",
            "modified desc limit 1",
            "if(1,name,owner)",
            "name,",
            "`tabUser`.`name`",
        ] {
            assert!(!ok("order_by", bad), "{bad}");
        }
    }

    #[test]
    fn filters_in_every_shape() {
        for f in [
            r#"{"status": "Open", "name": ["in", ["a", "b"]], "x": ["is", "set"]}"#,
            r#"[["status", "=", "Open"], ["ToDo", "modified", ">", "2024-01-01", false]]"#,
            r#"[{"status": "Open"}]"#,
            r#"[["ToDo Child", "item", "like", "%(select 1)%"]]"#,
            "",
            "null",
            "TODO-0001",
            "status=Open",
        ] {
            assert!(ok("filters", f), "{f}");
            assert!(ok("or_filters", f), "{f}");
        }
        for f in [
            r#"["1=1 or name in (select name from tabUser)"]"#,
            r#"[["User", "name", "=", "x"]]"#,
            r#"[["name`) or (1=1", "=", "x"]]"#,
            r#"[["status", "regexp", "x"]]"#,
            r#"{"status": ["=", {"a": 1}]}"#,
            r#"{"status": ["="]}"#,
            r#"{"ifnull(status,'')": "x"}"#,
            "7",
            r#""a string is iterated character by character""#,
        ] {
            assert!(!ok("filters", f), "{f}");
        }
    }
}
