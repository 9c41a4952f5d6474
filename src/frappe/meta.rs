//! DocType metadata as Frappe 15 answers it, and its fields as JSON Schema.
//!
//! `GET /api/v2/doctype/<doctype>/meta` (`api/v2.py` `get_meta`) answers
//! `{"data": {"name": ..., "is_submittable": 0|1, "istable": 0|1, "fields": [DocField, ...]}}`
//! as the signed-in user, after `frappe.has_permission(doctype, "read")`: a doctype the account
//! cannot read is a 403 `PermissionError`, one that does not exist a 404 `DoesNotExistError`.
//! Each DocField has `fieldname`, `fieldtype`, `options` (a Select's choices, one a line; a
//! Link's or Table's doctype; a Dynamic Link's field naming the doctype), `reqd`, `read_only`,
//! `is_virtual` (`core/doctype/docfield/docfield.json`).

use serde_json::{json, Map, Value};

/// The metadata path for `doctype` (percent-encoded: doctype names have spaces).
pub fn meta_path(doctype: &str) -> String {
    let encoded: String =
        percent_encoding::utf8_percent_encode(doctype, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    format!("/api/v2/doctype/{encoded}/meta")
}

/// What a schema needs of one DocType.
#[derive(Debug, Clone, PartialEq)]
pub struct DocTypeMeta {
    /// The doctype's name as Frappe spells it.
    pub name: String,
    /// Whether documents are submitted and cancelled (`docstatus` 1 and 2).
    pub is_submittable: bool,
    /// A child table's doctype (rows of a parent's Table field).
    pub is_table: bool,
    /// The fields, in form order.
    pub fields: Vec<DocField>,
}

/// One field of a doctype.
#[derive(Debug, Clone, PartialEq)]
pub struct DocField {
    pub fieldname: String,
    pub fieldtype: String,
    pub options: Option<String>,
    pub reqd: bool,
    pub read_only: bool,
    pub is_virtual: bool,
    pub label: Option<String>,
}

/// Fieldtypes that only lay out the form or show something: no value is stored or accepted
/// (`frappe/model/__init__.py` `no_value_fields` and `display_fieldtypes`).
const LAYOUT: &[&str] = &[
    "Section Break",
    "Column Break",
    "Tab Break",
    "HTML",
    "Button",
    "Image",
    "Fold",
    "Heading",
];

/// The fields every document has (`frappe/model/__init__.py` `default_fields`), described
/// once in the document and not repeated per doctype.
pub const STANDARD_FIELDS: &[&str] = &[
    "name",
    "owner",
    "creation",
    "modified",
    "modified_by",
    "docstatus",
    "idx",
];

/// Frappe's datetime text: `2023-10-05 07:44:38.476400`, a space and no offset (not RFC 3339).
const DATETIME_PATTERN: &str = r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d{1,6})?$";
const TIME_PATTERN: &str = r"^\d{1,2}:\d{2}(:\d{2}(\.\d{1,6})?)?$";

fn flag(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_i64().unwrap_or(0) != 0,
        _ => false,
    }
}

impl DocTypeMeta {
    /// Reads a `/api/v2/doctype/<doctype>/meta` answer (also accepts the bare meta object).
    pub fn parse(body: &[u8]) -> Option<Self> {
        let json: Value = serde_json::from_slice(body).ok()?;
        let meta = json.get("data").unwrap_or(&json);
        let name = meta.get("name")?.as_str()?.to_owned();
        let fields = meta
            .get("fields")?
            .as_array()?
            .iter()
            .filter_map(|f| {
                Some(DocField {
                    fieldname: f.get("fieldname")?.as_str()?.to_owned(),
                    fieldtype: f.get("fieldtype")?.as_str()?.to_owned(),
                    options: f
                        .get("options")
                        .and_then(Value::as_str)
                        .filter(|o| !o.is_empty())
                        .map(str::to_owned),
                    reqd: f.get("reqd").is_some_and(flag),
                    read_only: f.get("read_only").is_some_and(flag),
                    is_virtual: f.get("is_virtual").is_some_and(flag),
                    label: f.get("label").and_then(Value::as_str).map(str::to_owned),
                })
            })
            .collect();
        Some(Self {
            is_submittable: meta.get("is_submittable").is_some_and(flag),
            is_table: meta.get("istable").is_some_and(flag),
            name,
            fields,
        })
    }

    /// Fields that hold a value (no layout), minus the standard ones.
    pub fn data_fields(&self) -> impl Iterator<Item = &DocField> {
        self.fields.iter().filter(|f| {
            !LAYOUT.contains(&f.fieldtype.as_str())
                && !STANDARD_FIELDS.contains(&f.fieldname.as_str())
        })
    }

    /// The child doctypes its Table fields hold.
    pub fn child_doctypes(&self) -> Vec<&str> {
        self.data_fields()
            .filter(|f| is_table(&f.fieldtype))
            .filter_map(|f| f.options.as_deref())
            .collect()
    }
}

fn is_table(fieldtype: &str) -> bool {
    matches!(fieldtype, "Table" | "Table MultiSelect")
}

impl DocField {
    /// Whether a client may send it: not computed (`Read Only`, virtual) and not read-only.
    pub fn writable(&self) -> bool {
        !self.read_only && !self.is_virtual && self.fieldtype != "Read Only"
    }

    /// Its value's JSON Schema; `child_ref` names the schema of a Table's child doctype
    /// (`None`: the child doctype could not be read, rows are described as plain objects).
    pub fn schema(&self, child_ref: Option<Value>) -> Value {
        let options = self.options.as_deref();
        let mut schema = match self.fieldtype.as_str() {
            "Int" | "Long Int" => json!({"type": "integer"}),
            "Float" | "Currency" | "Percent" | "Rating" | "Duration" => json!({"type": "number"}),
            // Frappe stores and answers checks as 0 or 1.
            "Check" => json!({"type": "integer", "enum": [0, 1]}),
            "Date" => json!({"type": "string", "format": "date"}),
            "Datetime" => json!({"type": "string", "pattern": DATETIME_PATTERN}),
            "Time" => json!({"type": "string", "pattern": TIME_PATTERN}),
            "Select" => {
                // One choice a line; an empty line is the "not set" choice.
                let choices: Vec<&str> = options.map_or(Vec::new(), |o| {
                    let mut c: Vec<&str> = o.split('\n').map(str::trim).collect();
                    c.dedup();
                    c
                });
                let mut choices: Vec<&str> =
                    choices.into_iter().filter(|c| !c.is_empty()).collect();
                if choices.is_empty() {
                    json!({"type": "string"})
                } else {
                    // Frappe keeps "" for a Select not set.
                    choices.push("");
                    json!({"type": "string", "enum": choices})
                }
            }
            "Link" => json!({
                "type": "string",
                "description": format!("The name of a {} document.", options.unwrap_or("linked")),
                "x-frappe-link": options,
            }),
            "Dynamic Link" => json!({
                "type": "string",
                "description": format!(
                    "The name of a document of the doctype named in field `{}`.",
                    options.unwrap_or("?")
                ),
                "x-frappe-dynamic-link": options,
            }),
            // The child doctype is named only when its metadata was readable (`child_ref`).
            "Table" | "Table MultiSelect" => match child_ref {
                Some(items) => json!({
                    "type": "array",
                    "items": items,
                    "x-frappe-child-doctype": options,
                }),
                None => json!({"type": "array", "items": {"type": "object"}}),
            },
            "Attach" | "Attach Image" => json!({
                "type": "string",
                "format": "uri-reference",
                "description": "A file URL (`/files/...` or `/private/files/...`).",
            }),
            "JSON" => json!({"type": "object"}),
            // Data, Small Text, Text, Long Text, Text Editor, Code, Password, Color, Phone,
            // Autocomplete, Read Only, ...: text.
            _ => json!({"type": "string"}),
        };
        let Value::Object(map) = &mut schema else {
            return schema;
        };
        if !map.contains_key("description") {
            if let Some(label) = &self.label {
                map.insert("description".into(), Value::String(label.clone()));
            }
        }
        map.insert("x-frappe-fieldtype".into(), json!(self.fieldtype));
        schema
    }
}

/// Makes `schema` also accept `null`: Frappe answers unset fields as null.
pub fn nullable(schema: Value) -> Value {
    let mut schema = schema;
    if let Value::Object(map) = &mut schema {
        if let Some(Value::String(t)) = map.get("type").cloned() {
            map.insert("type".into(), json!([t, "null"]));
            if let Some(Value::Array(choices)) = map.get_mut("enum") {
                choices.push(Value::Null);
            }
        }
    }
    schema
}

/// The standard fields' schema, described once (`components.schemas.StandardFields`).
pub fn standard_fields_schema() -> Value {
    let datetime = json!({"type": "string", "pattern": DATETIME_PATTERN});
    json!({
        "type": "object",
        "description": "Fields every Frappe document has.",
        "properties": {
            "name": {"type": "string", "description": "The document's unique name."},
            "owner": {"type": "string", "description": "The user who created it."},
            "creation": datetime,
            "modified": datetime,
            "modified_by": {"type": "string"},
            "docstatus": {
                "type": "integer",
                "enum": [0, 1, 2],
                "description": "0 draft, 1 submitted, 2 cancelled.",
            },
            "idx": {"type": "integer"},
        },
    })
}

/// The properties of a document as read: every value field, nullable.
pub fn read_properties(
    meta: &DocTypeMeta,
    child_ref: impl Fn(&str) -> Option<Value>,
) -> Map<String, Value> {
    meta.data_fields()
        .map(|f| {
            let child = f.options.as_deref().filter(|_| is_table(&f.fieldtype));
            let schema = f.schema(child.and_then(&child_ref));
            let schema = if is_table(&f.fieldtype) {
                schema
            } else {
                nullable(schema)
            };
            (f.fieldname.clone(), schema)
        })
        .collect()
}

/// The properties a client may send, and which of them `create` requires.
pub fn write_properties(
    meta: &DocTypeMeta,
    child_ref: impl Fn(&str) -> Option<Value>,
) -> (Map<String, Value>, Vec<String>) {
    let mut required = Vec::new();
    let properties = meta
        .data_fields()
        .filter(|f| f.writable())
        .map(|f| {
            if f.reqd {
                required.push(f.fieldname.clone());
            }
            let child = f.options.as_deref().filter(|_| is_table(&f.fieldtype));
            (f.fieldname.clone(), f.schema(child.and_then(&child_ref)))
        })
        .collect();
    (properties, required)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(fieldname: &str, fieldtype: &str, options: Option<&str>) -> Value {
        json!({"fieldname": fieldname, "fieldtype": fieldtype, "options": options, "reqd": 0,
               "read_only": 0, "is_virtual": 0})
    }

    #[test]
    fn fieldtypes_map_to_json_schema() {
        let body = json!({"data": {"name": "Thing", "is_submittable": 1, "istable": 0, "fields": [
            field("title", "Data", None),
            field("notes", "Small Text", None),
            field("body", "Text Editor", None),
            field("qty", "Int", None),
            field("rate", "Currency", None),
            field("ratio", "Percent", None),
            field("weight", "Float", None),
            field("done", "Check", None),
            field("due", "Date", None),
            field("at", "Datetime", None),
            field("when", "Time", None),
            field("status", "Select", Some("\nOpen\nClosed")),
            field("owner_user", "Link", Some("User")),
            field("ref_type", "Link", Some("DocType")),
            field("ref_name", "Dynamic Link", Some("ref_type")),
            field("items", "Table", Some("Thing Item")),
            field("file", "Attach", None),
            field("extra", "JSON", None),
            field("sb", "Section Break", None),
            field("cb", "Column Break", None),
            field("tb", "Tab Break", None),
            field("html", "HTML", None),
            field("btn", "Button", None),
            {"fieldname": "total", "fieldtype": "Currency", "read_only": 1},
            {"fieldname": "computed", "fieldtype": "Data", "is_virtual": 1},
            {"fieldname": "shown", "fieldtype": "Read Only"},
            {"fieldname": "must", "fieldtype": "Data", "reqd": 1},
            field("name", "Data", None),
        ]}});
        let meta = DocTypeMeta::parse(body.to_string().as_bytes()).unwrap();
        assert!(meta.is_submittable && !meta.is_table);
        assert_eq!(meta.child_doctypes(), vec!["Thing Item"]);
        let child = |d: &str| Some(json!({"$ref": format!("#/x/{d}")}));
        let read = read_properties(&meta, child);
        let t = |k: &str| read[k]["type"].clone();
        assert_eq!(t("title"), json!(["string", "null"]));
        assert_eq!(t("notes"), json!(["string", "null"]));
        assert_eq!(t("body"), json!(["string", "null"]));
        assert_eq!(t("qty"), json!(["integer", "null"]));
        for n in ["rate", "ratio", "weight"] {
            assert_eq!(t(n), json!(["number", "null"]), "{n}");
        }
        assert_eq!(read["done"]["enum"], json!([0, 1, null]));
        assert_eq!(read["due"]["format"], "date");
        assert!(read["at"]["pattern"].is_string());
        assert!(read["when"]["pattern"].is_string());
        assert_eq!(read["status"]["enum"], json!(["Open", "Closed", "", null]));
        assert_eq!(read["owner_user"]["x-frappe-link"], "User");
        assert_eq!(read["ref_name"]["x-frappe-dynamic-link"], "ref_type");
        assert_eq!(read["items"]["type"], "array");
        assert_eq!(read["items"]["items"]["$ref"], "#/x/Thing Item");
        assert_eq!(read["file"]["format"], "uri-reference");
        assert_eq!(t("extra"), json!(["object", "null"]));
        for layout in ["sb", "cb", "tb", "html", "btn", "name"] {
            assert!(!read.contains_key(layout), "{layout}");
        }
        assert!(read.contains_key("total") && read.contains_key("shown"));

        let (write, required) = write_properties(&meta, child);
        for computed in ["total", "computed", "shown", "sb", "html", "btn", "name"] {
            assert!(!write.contains_key(computed), "{computed}");
        }
        assert_eq!(write["title"]["type"], "string");
        assert_eq!(required, vec!["must"]);
    }

    #[test]
    fn reads_frappe_15_meta() {
        let sample = include_str!("../../tests/support/meta/todo.json");
        let meta = DocTypeMeta::parse(sample.as_bytes()).unwrap();
        assert_eq!(meta.name, "ToDo");
        let (write, required) = write_properties(&meta, |_| None);
        assert_eq!(required, vec!["description"]);
        assert!(!write.contains_key("assignment_rule"), "read_only");
        assert!(!write.contains_key("assigned_by_full_name"), "Read Only");
        assert_eq!(
            write["status"]["enum"],
            json!(["Open", "Closed", "Cancelled", ""])
        );
    }
}
