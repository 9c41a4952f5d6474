//! What a site's answers to `erpgate check --sites` mean, in Frappe 15's terms.
//!
//! - `frappe.auth.get_logged_user` answers `{"message": "<user>"}` for a valid API key
//!   (`frappe/auth.py`); a key Frappe does not accept is 401 `AuthenticationError`
//!   (`validate_auth` → `validate_api_key_secret`), and a site name the bench does not have is
//!   werkzeug's HTML 404 "<site> does not exist" (`frappe/app.py` `init_request`:
//!   `raise NotFound` when the site's config has no `db_name`).
//! - `frappe.core.doctype.user.user.get_roles` answers the session user's roles (`uid` unset).

/// The question "who am I signed in as".
pub const WHO_AM_I: &str = "/api/method/frappe.auth.get_logged_user";
/// The question "what roles do I have".
pub const MY_ROLES: &str = "/api/method/frappe.core.doctype.user.user.get_roles";

/// Roles that make a service account all-powerful: access rules are then the only limit.
pub const ALL_POWERFUL: &[&str] = &["Administrator", "System Manager"];

/// What an answer to [`WHO_AM_I`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignIn {
    /// Signed in as this user.
    As(String),
    /// The bench has no site by the name erpgate sent.
    NoSuchSite,
    /// Frappe refused the API key and secret.
    Refused,
    /// Anything else: the status and the start of the body.
    Unexpected(u16, String),
}

/// Reads an answer to [`WHO_AM_I`].
pub fn sign_in(status: u16, body: &[u8]) -> SignIn {
    let text = String::from_utf8_lossy(body);
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    match status {
        200 => match json.as_ref().and_then(|j| j["message"].as_str()) {
            Some(user) => SignIn::As(user.to_owned()),
            None => SignIn::Unexpected(status, excerpt(&text)),
        },
        404 if json.is_none() && text.contains("does not exist") => SignIn::NoSuchSite,
        401 | 403 => SignIn::Refused,
        _ => SignIn::Unexpected(status, excerpt(&text)),
    }
}

/// Reads an answer to [`MY_ROLES`].
pub fn roles(body: &[u8]) -> Option<Vec<String>> {
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    json["message"]
        .as_array()?
        .iter()
        .map(|r| r.as_str().map(str::to_owned))
        .collect()
}

fn excerpt(text: &str) -> String {
    text.chars()
        .take(160)
        .collect::<String>()
        .replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_as_frappe_means_them() {
        assert_eq!(
            sign_in(200, br#"{"message": "a@b.c"}"#),
            SignIn::As("a@b.c".into())
        );
        let page =
            b"<!doctype html>\n<title>404 Not Found</title>\n<p>erp.localhost does not exist</p>";
        assert_eq!(sign_in(404, page), SignIn::NoSuchSite);
        assert_eq!(
            sign_in(401, br#"{"exc_type": "AuthenticationError"}"#),
            SignIn::Refused
        );
        assert!(matches!(
            sign_in(502, b"bad gateway"),
            SignIn::Unexpected(502, _)
        ));
        assert_eq!(
            roles(br#"{"message": ["Sales User", "All"]}"#),
            Some(vec!["Sales User".into(), "All".into()])
        );
    }
}
