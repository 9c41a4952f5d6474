//! Frappe's OAuth 2.0 provider, as far as erpgate needs it: telling an access token from a
//! gateway key, and asking the site about a token (RFC 7662 introspection).
//!
//! From `frappe/integrations/oauth2.py` (Frappe 15 and later):
//!
//! - `introspect_token(token, token_type_hint=None)` is `@frappe.whitelist(allow_guest=True)`:
//!   no credential is needed. It looks the token up in `OAuth Bearer Token` and answers, as the
//!   whole response body (`frappe.local.response = token_response`, no `message` wrapper),
//!   `client_id`, `trusted_client`, `active` (`status == "Active"`: **not** the expiry),
//!   `exp` (`expiration_time` as a Unix timestamp) and `scope`; with the `openid` scope also the
//!   user's OpenID claims, `sub` among them. Any failure (unknown token) answers
//!   `{"active": false}`, still 200.
//! - so expiry is erpgate's to check: `active` stays true on an expired token until Frappe
//!   revokes it.
//!
//! From `frappe/auth.py` (`validate_auth` → `validate_oauth`): a request whose `Authorization`
//! is `Bearer <token>` runs as the token's user when the token is valid for its scopes, else as
//! Guest. Frappe's access tokens are `frappe.generate_hash(length=30)` (hex); a gateway key
//! presented as Bearer is always `key_id:secret`, with a colon no access token has.

use bytes::Bytes;
use serde::Deserialize;

/// The introspection endpoint (`ENDPOINTS["introspection_endpoint"]` in `oauth2.py`).
pub const INTROSPECT_PATH: &str = "/api/method/frappe.integrations.oauth2.introspect_token";

/// Whether a `Bearer` parameter is an OAuth access token rather than a gateway key: no colon
/// (keys are `key_id:secret`), printable, and of a sane length.
pub fn is_access_token(param: &str) -> bool {
    !param.is_empty()
        && param.len() <= 512
        && !param.contains(':')
        && param.bytes().all(|b| b.is_ascii_graphic())
}

/// The `Bearer` parameter of an `Authorization` value, if it is one and an access token.
pub fn bearer_access_token(authorization: &str) -> Option<&str> {
    let (scheme, param) = authorization.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && is_access_token(param)).then_some(param)
}

/// The form of an access token that Frappe's lookup cannot tell apart from it: its ASCII
/// lower case; `None` (refused) for a token with any byte outside printable ASCII.
///
/// Frappe finds the token's `OAuth Bearer Token` row by name (`frappe/oauth.py`
/// `validate_bearer_token`: `frappe.get_doc("OAuth Bearer Token", token)`; `frappe/auth.py`
/// `validate_oauth`: `frappe.db.get_value("OAuth Bearer Token", token, ...)`; `oauth2.py`
/// `introspect_token`), and MariaDB compares names under the site's `utf8mb4_unicode_ci`
/// collation (`frappe/database/mariadb/database.py` creates tables with it): case-insensitively,
/// trailing spaces ignored. So `AbC` and `abc` are one token at Frappe and must be one key in
/// erpgate's introspection cache and per-user quotas, or each case variant would buy a fresh
/// quota and a fresh introspection. For printable ASCII (which has no spaces) that collation's
/// equality is exactly ASCII case folding. Beyond ASCII, `unicode_ci` also equates accents,
/// ligatures and width variants, which no simple folding reproduces: such a token is refused
/// rather than folded wrongly ([`is_access_token`] already keeps them from reaching here;
/// Frappe's own tokens are `generate_hash` hex). Postgres sites compare names exactly: folding
/// there only merges variants Frappe would treat as Guest, and the token as sent is what Frappe
/// judges.
pub fn token_lookup_form(token: &str) -> Option<String> {
    token
        .bytes()
        .all(|b| b.is_ascii_graphic())
        .then(|| token.to_ascii_lowercase())
}

/// The form body of an introspection request for `token`.
pub fn introspection_body(token: &str) -> Bytes {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("token", token);
    form.append_pair("token_type_hint", "access_token");
    Bytes::from(form.finish())
}

/// What the site said about a token.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Introspection {
    /// `status == "Active"` in `OAuth Bearer Token`.
    #[serde(default)]
    pub active: bool,
    /// The OAuth Client's `client_id`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Expiry, Unix seconds.
    #[serde(default)]
    pub exp: Option<i64>,
    /// Space-separated scopes.
    #[serde(default)]
    pub scope: Option<String>,
    /// The user's OpenID subject, with the `openid` scope.
    #[serde(default)]
    pub sub: Option<String>,
}

/// Reads an introspection answer; `None` when it is not one (a site answering something else
/// is an outage, not an inactive token).
pub fn parse_introspection(body: &[u8]) -> Option<Introspection> {
    let parsed: Introspection = serde_json::from_slice(body).ok()?;
    // Frappe's `active` is a JSON boolean; an answer without the key is not an introspection.
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("active")?.as_bool()?;
    Some(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_tokens_and_gateway_keys_are_told_apart() {
        assert_eq!(bearer_access_token("Bearer 3f9a1c0e5b"), Some("3f9a1c0e5b"));
        assert_eq!(bearer_access_token("bearer 3f9a1c0e5b"), Some("3f9a1c0e5b"));
        assert_eq!(bearer_access_token("Bearer ek_1:secret"), None);
        assert_eq!(bearer_access_token("token 3f9a1c0e5b"), None);
        assert_eq!(bearer_access_token("Bearer "), None);
        assert_eq!(bearer_access_token("Bearer a b"), None);
        assert_eq!(
            bearer_access_token(&format!("Bearer {}", "a".repeat(513))),
            None
        );
    }

    #[test]
    fn case_variants_of_a_token_share_one_lookup_form() {
        assert_eq!(token_lookup_form("Tok-ALICE_9"), Some("tok-alice_9".into()));
        assert_eq!(
            token_lookup_form("tok-alice_9"),
            token_lookup_form("TOK-ALICE_9")
        );
        // Beyond ASCII the collation's equality is not a case folding: refused, not guessed.
        assert_eq!(token_lookup_form("tok-\u{e9}"), None);
        assert_eq!(token_lookup_form("TOK-\u{212a}"), None);
        assert_eq!(token_lookup_form("tok alice"), None);
    }

    #[test]
    fn introspection_answers_read_as_frappe_writes_them() {
        let active = br#"{"client_id":"b1c2","trusted_client":0,"active":true,"exp":1764900000,"scope":"all openid","sub":"0a1b","email":"u@example.com"}"#;
        let parsed = parse_introspection(active).unwrap_or_else(|| panic!("parses"));
        assert!(parsed.active);
        assert_eq!(parsed.client_id.as_deref(), Some("b1c2"));
        assert_eq!(parsed.exp, Some(1_764_900_000));
        assert_eq!(parsed.sub.as_deref(), Some("0a1b"));
        let inactive = parse_introspection(br#"{"active":false}"#).unwrap_or_else(|| panic!());
        assert!(!inactive.active);
        // Anything else is not an answer.
        assert_eq!(parse_introspection(b"<html>502</html>"), None);
        assert_eq!(parse_introspection(br#"{"message":"pong"}"#), None);
        assert_eq!(
            introspection_body("a b&c"),
            Bytes::from("token=a+b%26c&token_type_hint=access_token")
        );
    }
}
