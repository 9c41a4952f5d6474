//! Frappe webhooks: how they are signed and what they name.
//!
//! With "Enable Security" set, Frappe sends `X-Frappe-Webhook-Signature:
//! base64(HMAC-SHA256(webhook secret, raw body))`; the body is JSON whatever the "Request
//! Structure" (Frappe `json.dumps` the data in both cases). The payload is what the Webhook
//! defines, so the document it is about is read from `doctype` and `name` keys at the top level.
//! Only the body is signed (Frappe sends no timestamp), so nothing outside it — the URL's query
//! least of all — may choose what is purged: a captured webhook replayed with `?doctype=User`
//! must purge only what it was signed for.

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

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

/// Reads the doctype and name from a signed webhook body.
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
}
