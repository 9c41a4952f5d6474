//! What a parameter of a whitelisted function carries, and so how erpgate judges it.
//!
//! A kind is written in a review (`reviewed/*.yaml`, see its README) or declared by an operator
//! for an app's own method (`allow.methods: [{ name, args }]`), in the same spelling.

use crate::frappe::classify::Operation;

/// How one argument is judged for a restricted client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgKind {
    /// Names a doctype the function performs these operations on.
    Doctype(Vec<Operation>),
    /// Names the parent doctype of a child-table read: needs read on it.
    Parent,
    /// A document name, bound as a value; its doctype comes from another argument.
    Docname,
    /// Columns or expressions pasted into `SELECT` (the query grammar).
    Fields,
    /// `get_value`'s columns: one, or a JSON list of them (the query grammar).
    Fieldname,
    /// Pasted into `ORDER BY`.
    OrderBy,
    /// Pasted into `GROUP BY`.
    GroupBy,
    /// One column name pasted into SQL: a plain identifier only.
    Pluck,
    /// Filters turned into `WHERE` (the query grammar).
    Filters,
    /// A method Frappe resolves and calls: allowed itself, and judged with what it receives.
    Method(CallsWith),
    /// A JSON document whose doctype (its rows' and `parenttype` too) is judged for these.
    Doc(Vec<Operation>),
    /// A list of such documents.
    Docs(Vec<Operation>),
    /// Bound as a value: never SQL text, never a doctype or method name.
    Scalar,
    /// Free text bound as a value (a search term, a comment).
    Text,
    /// File content or a file name.
    File,
    /// Never from a restricted client, for this reason.
    Refused(String),
    /// Nobody established what happens to it: refused when filled.
    Unreviewed,
}

/// What a method argument's function is called with: the caller's arguments passed by
/// position, then by keyword, then (`**`) every argument the caller does not take itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallsWith {
    /// Caller arguments passed positionally, in order.
    pub positional: Vec<String>,
    /// (keyword of the called function, caller argument).
    pub keywords: Vec<(String, String)>,
    /// The caller's remaining keyword arguments are passed on.
    pub rest: bool,
}

/// A kind spelling that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown argument kind '{0}' (expected doctype:OPS, parent, docname, fields, fieldname, \
     order_by, group_by, pluck, filters, method, doc:OPS, docs:OPS, scalar, text, file, \
     refused:REASON or unreviewed; OPS is read, create, update, delete, doc_method joined by +)"
)]
pub struct UnknownKind(pub String);

impl ArgKind {
    /// Parses a kind as reviews and rules spell it; a `method` kind gets `calls_with` apart.
    pub fn parse(text: &str) -> Result<Self, UnknownKind> {
        let bad = || UnknownKind(text.to_owned());
        let (head, tail) = match text.split_once(':') {
            Some((head, tail)) => (head.trim(), Some(tail.trim())),
            None => (text.trim(), None),
        };
        let ops = || -> Result<Vec<Operation>, UnknownKind> {
            let tail = tail.ok_or_else(bad)?;
            tail.split('+')
                .map(|op| parse_operation(op.trim()).ok_or_else(bad))
                .collect()
        };
        Ok(match (head, tail) {
            ("doctype", _) => Self::Doctype(ops()?),
            ("doc", _) => Self::Doc(ops()?),
            ("docs", _) => Self::Docs(ops()?),
            ("refused", Some(reason)) if !reason.is_empty() => Self::Refused(reason.to_owned()),
            (_, Some(_)) => return Err(bad()),
            ("parent", None) => Self::Parent,
            ("docname", None) => Self::Docname,
            ("fields", None) => Self::Fields,
            ("fieldname", None) => Self::Fieldname,
            ("order_by", None) => Self::OrderBy,
            ("group_by", None) => Self::GroupBy,
            ("pluck", None) => Self::Pluck,
            ("filters", None) => Self::Filters,
            ("method", None) => Self::Method(CallsWith::default()),
            ("scalar", None) => Self::Scalar,
            ("text", None) => Self::Text,
            ("file", None) => Self::File,
            ("unreviewed", None) => Self::Unreviewed,
            _ => return Err(bad()),
        })
    }

    /// The kind a parameter name suggests, for functions nobody reviewed. Only kinds that come
    /// with a judgement are inferred, and a doctype needs every operation (what the function does
    /// with it is unknown); every other name is [`ArgKind::Unreviewed`].
    pub fn inferred(name: &str) -> Self {
        use Operation::*;
        let all = || vec![Read, Create, Update, Delete, DocMethod];
        match name {
            "doctype" | "dt" | "ref_doctype" | "reference_doctype" | "parenttype"
            | "parent_doctype" | "link_doctype" | "document_type" => Self::Doctype(all()),
            "fields" => Self::Fields,
            "fieldname" => Self::Fieldname,
            "filters" | "or_filters" => Self::Filters,
            "order_by" => Self::OrderBy,
            "group_by" => Self::GroupBy,
            "pluck" => Self::Pluck,
            "doc" => Self::Doc(all()),
            "docs" => Self::Docs(all()),
            _ => Self::Unreviewed,
        }
    }

    /// The spelling reviews and rules use.
    pub fn spelling(&self) -> String {
        let ops = |ops: &[Operation]| ops.iter().map(|o| o.as_str()).collect::<Vec<_>>().join("+");
        match self {
            Self::Doctype(o) => format!("doctype:{}", ops(o)),
            Self::Doc(o) => format!("doc:{}", ops(o)),
            Self::Docs(o) => format!("docs:{}", ops(o)),
            Self::Refused(reason) => format!("refused:{reason}"),
            Self::Parent => "parent".into(),
            Self::Docname => "docname".into(),
            Self::Fields => "fields".into(),
            Self::Fieldname => "fieldname".into(),
            Self::OrderBy => "order_by".into(),
            Self::GroupBy => "group_by".into(),
            Self::Pluck => "pluck".into(),
            Self::Filters => "filters".into(),
            Self::Method(_) => "method".into(),
            Self::Scalar => "scalar".into(),
            Self::Text => "text".into(),
            Self::File => "file".into(),
            Self::Unreviewed => "unreviewed".into(),
        }
    }
}

impl CallsWith {
    /// Parses `calls_with: [a, b, "name=c", "**"]`.
    pub fn parse(items: &[String]) -> Result<Self, UnknownKind> {
        let mut out = Self::default();
        for (i, item) in items.iter().enumerate() {
            if item == "**" {
                if i + 1 != items.len() {
                    return Err(UnknownKind(format!(
                        "calls_with: '**' must come last in {items:?}"
                    )));
                }
                out.rest = true;
            } else if let Some((keyword, arg)) = item.split_once('=') {
                out.keywords
                    .push((keyword.trim().to_owned(), arg.trim().to_owned()));
            } else if out.keywords.is_empty() {
                out.positional.push(item.trim().to_owned());
            } else {
                return Err(UnknownKind(format!(
                    "calls_with: positional '{item}' after a keyword in {items:?}"
                )));
            }
        }
        Ok(out)
    }
}

fn parse_operation(name: &str) -> Option<Operation> {
    Some(match name {
        "read" => Operation::Read,
        "create" => Operation::Create,
        "update" => Operation::Update,
        "delete" => Operation::Delete,
        "doc_method" => Operation::DocMethod,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_as_written_and_spell_back() {
        for text in [
            "doctype:read",
            "doctype:create+update",
            "doc:create",
            "docs:update",
            "parent",
            "fields",
            "pluck",
            "refused:runs code",
            "unreviewed",
        ] {
            assert_eq!(ArgKind::parse(text).unwrap().spelling(), text);
        }
        for bad in ["doctype", "doctype:write", "scalar:x", "refused:", "sql"] {
            assert!(ArgKind::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn inference_only_adds_judgements() {
        assert_eq!(ArgKind::inferred("txt"), ArgKind::Unreviewed);
        assert_eq!(ArgKind::inferred("name"), ArgKind::Unreviewed);
        assert!(matches!(ArgKind::inferred("dt"), ArgKind::Doctype(ops) if ops.len() == 5));
        assert_eq!(ArgKind::inferred("pluck"), ArgKind::Pluck);
    }

    #[test]
    fn calls_with_positions_keywords_and_the_rest() {
        let c = CallsWith::parse(&["doctype".into(), "parent".into(), "**".into()]).unwrap();
        assert_eq!(c.positional, ["doctype", "parent"]);
        assert!(c.rest);
        assert!(CallsWith::parse(&["**".into(), "a".into()]).is_err());
        assert!(CallsWith::parse(&["x=a".into(), "b".into()]).is_err());
    }
}
