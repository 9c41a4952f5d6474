//! What ends up in Frappe's `frappe.form_dict`, as far as the gateway must care.
//!
//! Frappe builds `form_dict` from the JSON body when the request is JSON, else from the query
//! string merged with the form body (urlencoded or multipart). Two keys matter to a gateway:
//! `cmd`, which turns a request on any path into an RPC call (and `cmd=login` into a login), and
//! `sid`, which makes Frappe resume a session instead of using the token the gateway signs with.
//! `run_method` turns a document read into a document method call. The gateway reads every place
//! such a key could come from, and checks all of them, rather than guessing which one Frappe
//! would pick.

use bytes::Bytes;
use http::HeaderValue;
use serde_json::value::RawValue;

/// How a request body is encoded, as far as `form_dict` is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/x-www-form-urlencoded`
    Form,
    /// `application/json` or `application/*+json` (werkzeug's `is_json`)
    Json,
    /// `multipart/form-data`
    Multipart,
    /// Anything else: never read into `form_dict`.
    Opaque,
}

impl BodyFormat {
    /// Reads the format from a `Content-Type` header, case-insensitively as werkzeug does.
    pub fn from_content_type(value: Option<&HeaderValue>) -> Self {
        let Some(value) = value.and_then(|v| v.to_str().ok()) else {
            return Self::Opaque;
        };
        let mime = value
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match mime.as_str() {
            "application/x-www-form-urlencoded" => Self::Form,
            "multipart/form-data" => Self::Multipart,
            "application/json" => Self::Json,
            m if m.starts_with("application/") && m.ends_with("+json") => Self::Json,
            _ => Self::Opaque,
        }
    }
}

/// The `form_dict` keys the gateway acts on, gathered from one source.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FormKeys {
    /// Every `cmd` value seen, in order.
    pub cmds: Vec<String>,
    /// A `run_method` key is present.
    pub run_method: bool,
    /// A `sid` key is present.
    pub sid: bool,
}

impl FormKeys {
    /// Merges the keys of another source into this one.
    pub fn merge(&mut self, other: FormKeys) {
        self.cmds.extend(other.cmds);
        self.run_method |= other.run_method;
        self.sid |= other.sid;
    }

    fn see(&mut self, key: &str, value: impl FnOnce() -> String) {
        match key {
            "cmd" => self.cmds.push(value()),
            "run_method" => self.run_method = true,
            "sid" => self.sid = true,
            _ => {}
        }
    }

    /// Reads an urlencoded query string or form body.
    pub fn from_urlencoded(input: &[u8]) -> Self {
        let mut keys = Self::default();
        for (key, value) in form_urlencoded::parse(input) {
            keys.see(&key, || value.into_owned());
        }
        keys
    }

    /// Reads the top level of a JSON body. A body that is not a JSON object has no keys (Frappe
    /// files a list under `data`).
    pub fn from_json(body: &[u8]) -> Result<Self, serde_json::Error> {
        let mut keys = Self::default();
        let top: &RawValue = serde_json::from_slice(body)?;
        if top.get().starts_with('{') {
            for (key, value) in serde_json::from_str::<JsonObject>(top.get())? {
                keys.see(&key, || match serde_json::from_str::<String>(value.get()) {
                    Ok(s) => s,
                    Err(_) => value.get().to_owned(),
                });
            }
        }
        Ok(keys)
    }
}

/// The top level of a JSON object body, in order, with every value kept as raw text so that
/// rewriting the object changes nothing but the keys removed. A repeated key keeps its last
/// value, as Python's `json.loads` does.
type JsonObject<'a> = indexmap::IndexMap<String, &'a RawValue>;

/// The first value of `name` in a query string, decoded.
pub fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Removes every `sid` pair from an urlencoded string, keeping the rest as sent.
pub fn strip_sid_urlencoded(input: &str) -> String {
    input
        .split('&')
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or_default();
            let decoded: String = form_urlencoded::parse(key.as_bytes())
                .map(|(k, _)| k.into_owned())
                .collect();
            decoded != "sid"
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Removes a top-level `sid` key from a JSON object body.
pub fn strip_sid_json(body: &[u8]) -> Result<Bytes, serde_json::Error> {
    let mut map: JsonObject<'_> = serde_json::from_slice(body)?;
    map.shift_remove("sid");
    Ok(Bytes::from(serde_json::to_vec(&map)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        let f = |s: &'static str| BodyFormat::from_content_type(Some(&HeaderValue::from_static(s)));
        assert_eq!(
            f("application/x-www-form-urlencoded; charset=utf-8"),
            BodyFormat::Form
        );
        assert_eq!(f("Application/JSON"), BodyFormat::Json);
        assert_eq!(f("application/vnd.api+json"), BodyFormat::Json);
        assert_eq!(f("multipart/form-data; boundary=x"), BodyFormat::Multipart);
        assert_eq!(f("text/plain"), BodyFormat::Opaque);
        assert_eq!(BodyFormat::from_content_type(None), BodyFormat::Opaque);
    }

    #[test]
    fn urlencoded_keys_are_decoded() {
        let keys =
            FormKeys::from_urlencoded(b"c%6Dd=frappe.client.insert&cmd=a+b&sid=x&run_method=y");
        assert_eq!(keys.cmds, vec!["frappe.client.insert", "a b"]);
        assert!(keys.sid && keys.run_method);
    }

    #[test]
    fn json_keys() {
        let keys =
            FormKeys::from_json(br#"{"cmd":"frappe.client.insert","sid":"s","n":1}"#).unwrap();
        assert_eq!(keys.cmds, vec!["frappe.client.insert"]);
        assert!(keys.sid);
        assert_eq!(FormKeys::from_json(b"[1,2]").unwrap(), FormKeys::default());
        assert!(FormKeys::from_json(b"{nope").is_err());
    }

    #[test]
    fn sid_is_stripped_and_nothing_else_changes() {
        assert_eq!(strip_sid_urlencoded("a=1&sid=x&s%69d=y&b=2"), "a=1&b=2");
        let out = strip_sid_json(br#"{"b":1.50,"sid":"x","a":{"z":[1]}}"#).unwrap();
        assert_eq!(&out[..], br#"{"b":1.50,"a":{"z":[1]}}"#);
    }
}
