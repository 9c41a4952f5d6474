//! Frappe webhooks: how they are signed and what they name.
//!
//! With "Enable Security" set, Frappe sends `X-Frappe-Webhook-Signature:
//! base64(HMAC-SHA256(webhook secret, raw body))`; the body is JSON whatever the "Request
//! Structure" (Frappe `json.dumps` the data in both cases). The payload is what the Webhook
//! defines, so the document it is about is read from `doctype` and `name` keys at the top level.
//! Only the body is signed (Frappe sends no timestamp), so nothing outside it — the URL's query
//! least of all — may choose what is purged: a captured webhook replayed with `?doctype=User`
//! must purge only what it was signed for.
//!
//! A signature proves the site's Webhook sent the body, not that the body says what the
//! Webhook's author meant: Frappe renders `webhook_json` with Jinja without autoescaping
//! (`frappe/utils/jinja.py` `get_jenv`: a `SandboxedEnvironment` with no `autoescape`) and then
//! `json.loads` it (`frappe/integrations/doctype/webhook/webhook.py` `get_webhook_data`), so a
//! template writing `"{{ doc.title }}"` lets a Note titled `x", "doctype": "ToDo` add a
//! `doctype` key, and Python keeps the last one. Events are therefore bound to the Webhook that
//! sent them: its URL names the doctype ([`bound_target`]), and a body naming another one is
//! refused. Templates should write every value with Jinja's `tojson` filter, which that
//! environment keeps (`set_filters` only adds to Jinja's default filters).

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::frappe::python_json::{self, PyJson};

/// Frappe's document events a Webhook can fire on (`webhook_docevent`). The render context of
/// a Webhook's JSON body is only `doc` and `utils` (`frappe/integrations/doctype/webhook/
/// webhook.py`, `get_context`), so the event is not in it: each Webhook is for one event and its
/// body names that event literally (`"event": "on_update"`).
pub const DOC_EVENTS: [&str; 7] = [
    "after_insert",
    "on_update",
    "on_submit",
    "on_cancel",
    "on_trash",
    "on_update_after_submit",
    "on_change",
];

/// The header Frappe signs webhooks in.
pub const SIGNATURE_HEADER: &str = "x-frappe-webhook-signature";

/// A signature checked while the body streams in: feed it chunks, then ask.
pub struct SignatureCheck(Hmac<Sha256>);

impl std::fmt::Debug for SignatureCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignatureCheck")
    }
}

impl SignatureCheck {
    /// A check under `secret`.
    pub fn new(secret: &[u8]) -> Option<Self> {
        Hmac::<Sha256>::new_from_slice(secret).ok().map(Self)
    }

    /// Adds body bytes.
    pub fn update(&mut self, chunk: &[u8]) {
        self.0.update(chunk);
    }

    /// Whether `signature` (base64, as Frappe sends it) signs what was fed, in constant time.
    pub fn verify(self, signature: &[u8]) -> bool {
        use base64::Engine as _;
        match base64::engine::general_purpose::STANDARD.decode(signature.trim_ascii()) {
            Ok(given) => self.0.verify_slice(&given).is_ok(),
            Err(_) => false,
        }
    }
}

/// The document a webhook is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookTarget {
    /// Its doctype.
    pub doctype: String,
    /// Its name, when the payload gives one.
    pub name: Option<String>,
    /// The document event, when the payload names one (`event`).
    pub event: Option<String>,
    /// The document's `modified` timestamp, when the payload carries it: Frappe sets it anew on
    /// every save, submit and cancel, so two bodies with the same one are the same change.
    pub modified: Option<String>,
}

/// Reads the doctype and name from a signed webhook body. A repeated key is read as Python
/// reads it, the last one winning (serde_json's `Value` keeps the last one too).
pub fn target(body: &[u8]) -> Option<WebhookTarget> {
    let payload: Value = serde_json::from_slice(body).ok()?;
    let field = |key: &str| match payload.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    let doctype = field("doctype")?;
    Some(WebhookTarget {
        doctype,
        name: field("name"),
        event: field("event"),
        modified: field("modified"),
    })
}

/// Why a signed body is not taken as an event of the doctype its URL names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unbound {
    /// Not a JSON object naming a doctype.
    #[error(
        "webhook payload is not a JSON object naming a doctype (with \"doctype\" and \"name\")"
    )]
    NoDoctype,
    /// A key appears twice in one object. Frappe sends `json.dumps` of the dict `json.loads`
    /// made of the render, which cannot repeat a key; a repeat means the body did not come from
    /// that path as it is, and subscribers' parsers disagree on which copy counts (Python's,
    /// serde_json's and JavaScript's keep the last, others the first or refuse).
    #[error("webhook payload repeats the key {0:?}")]
    RepeatedKey(String),
    /// The body's doctype (its last `doctype` key, as Python reads it) is not the URL's.
    #[error("webhook payload names doctype {body:?}, but was sent to the URL of {url:?}")]
    OtherDoctype {
        /// The doctype the body names.
        body: String,
        /// The doctype the URL names.
        url: String,
    },
}

impl Unbound {
    /// A short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoDoctype => "no_doctype",
            Self::RepeatedKey(_) => "repeated_key",
            Self::OtherDoctype { .. } => "other_doctype",
        }
    }
}

/// The document a signed body sent to the intake URL of `doctype` is about, or why it is not
/// an event of that doctype.
///
/// Doctypes are compared exactly. MariaDB would match `note` to `Note`, but a genuine render
/// always carries the DocType's own name (`doc.doctype`), so an exact match never refuses a
/// Webhook whose URL is spelled as its DocType is, and a misspelt URL fails loudly (Frappe logs
/// the refusal in its Webhook Request Log) instead of binding a Webhook to a look-alike.
pub fn bound_target(body: &[u8], doctype: &str) -> Result<WebhookTarget, Unbound> {
    let text = std::str::from_utf8(body).map_err(|_| Unbound::NoDoctype)?;
    // Python's reading, every member kept: the repeats are found here.
    let members = match python_json::loads(text) {
        Ok(PyJson::Object(members)) => members,
        _ => return Err(Unbound::NoDoctype),
    };
    if let Some(key) = repeated_key(&members) {
        return Err(Unbound::RepeatedKey(key));
    }
    let named = members
        .iter()
        .rev()
        .find(|m| m.key == "doctype")
        .and_then(|m| m.value.as_str());
    match named {
        Some(named) if named == doctype => {}
        Some(named) if !named.is_empty() => {
            return Err(Unbound::OtherDoctype {
                body: named.to_owned(),
                url: doctype.to_owned(),
            })
        }
        _ => return Err(Unbound::NoDoctype),
    }
    // The relay stores the body as strict JSON; Python's extras (`NaN`) are refused here, as
    // they always were.
    let mut target = target(body).ok_or(Unbound::NoDoctype)?;
    target.doctype = doctype.to_owned();
    Ok(target)
}

/// The first key repeated in one object, at any depth.
fn repeated_key(members: &[python_json::Member]) -> Option<String> {
    let mut seen = std::collections::HashSet::with_capacity(members.len());
    for member in members {
        if !seen.insert(member.key.as_str()) {
            return Some(member.key.clone());
        }
    }
    members.iter().find_map(|m| nested_repeat(&m.value))
}

fn nested_repeat(value: &PyJson) -> Option<String> {
    match value {
        PyJson::Object(members) => repeated_key(members),
        PyJson::Array(items) => items.iter().find_map(nested_repeat),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(body);
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    }

    fn signature_valid(secret: &[u8], body: &[u8], signature: &[u8]) -> bool {
        let mut check = SignatureCheck::new(secret).unwrap();
        check.update(body);
        check.verify(signature)
    }

    #[test]
    fn signatures() {
        let body = br#"{"doctype": "Item", "name": "X"}"#;
        let good = sign(b"s3cret", body);
        assert!(signature_valid(b"s3cret", body, good.as_bytes()));
        assert!(!signature_valid(b"other", body, good.as_bytes()));
        assert!(!signature_valid(b"s3cret", b"{}", good.as_bytes()));
        assert!(!signature_valid(b"s3cret", body, b"not base64!"));
        assert!(!signature_valid(b"s3cret", body, b""));
    }

    #[test]
    fn targets() {
        assert_eq!(
            target(br#"{"doctype": "Item", "name": "X", "x": 1}"#),
            Some(WebhookTarget {
                doctype: "Item".into(),
                name: Some("X".into()),
                event: None,
                modified: None,
            })
        );
        assert_eq!(
            target(br#"{"doctype": "Item", "name": "X", "event": "on_update"}"#)
                .and_then(|t| t.event),
            Some("on_update".into())
        );
        assert_eq!(target(br#"{"name": "X"}"#).map(|t| t.doctype), None);
        assert_eq!(target(br#"{"name": "X"}"#), None);
        assert_eq!(target(b"not json"), None);
    }

    #[test]
    fn a_repeated_key_reads_as_python_reads_it() {
        // serde_json's Value keeps the last of two keys, as CPython's json does; the purge-only
        // URL relies on it.
        let body = br#"{"doctype": "Note", "name": "x", "doctype": "ToDo"}"#;
        assert_eq!(target(body).map(|t| t.doctype), Some("ToDo".into()));
        let loaded = python_json::loads(std::str::from_utf8(body).unwrap()).unwrap();
        let PyJson::Object(members) = loaded else {
            panic!("an object")
        };
        assert_eq!(members.last().unwrap().value.as_str(), Some("ToDo"));
    }

    #[test]
    fn bound_targets() {
        let body = br#"{"doctype": "Sales Order", "name": "SO-1", "event": "on_submit"}"#;
        let bound = bound_target(body, "Sales Order").unwrap();
        assert_eq!(bound.doctype, "Sales Order");
        assert_eq!(bound.name.as_deref(), Some("SO-1"));
        assert_eq!(bound.event.as_deref(), Some("on_submit"));
        // Exact: the DocType's own spelling only.
        assert_eq!(
            bound_target(body, "sales order"),
            Err(Unbound::OtherDoctype {
                body: "Sales Order".into(),
                url: "sales order".into()
            })
        );
        // The rendered injection: the last doctype is ToDo.
        let injected = br#"{"doctype": "Note", "name": "x", "title": "x", "doctype": "ToDo"}"#;
        assert_eq!(
            bound_target(injected, "Note"),
            Err(Unbound::RepeatedKey("doctype".into()))
        );
        // The same after Frappe's json.loads + json.dumps: one key, the wrong doctype.
        let dumped = br#"{"doctype": "ToDo", "name": "x", "title": "x"}"#;
        assert_eq!(
            bound_target(dumped, "Note").map_err(|e| e.reason()),
            Err("other_doctype")
        );
        // A repeat whose last copy matches is refused too, and so is one spelt with an escape
        // or one inside a nested object.
        for body in [
            &br#"{"doctype": "ToDo", "name": "x", "doctype": "Note"}"#[..],
            br#"{"doctype": "Note", "name": "x", "doc\u0074ype": "Note"}"#,
            br#"{"doctype": "Note", "name": "x", "name": "y"}"#,
            br#"{"doctype": "Note", "items": [{"a": 1, "a": 2}]}"#,
        ] {
            assert_eq!(
                bound_target(body, "Note").map_err(|e| e.reason()),
                Err("repeated_key"),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        for body in [
            &br#"{"name": "x"}"#[..],
            br#"{"doctype": "", "name": "x"}"#,
            br#"{"doctype": 1}"#,
            br#"["Note"]"#,
            b"not json",
            br#"{"doctype": "Note", "n": NaN}"#,
        ] {
            assert_eq!(
                bound_target(body, "Note"),
                Err(Unbound::NoDoctype),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
