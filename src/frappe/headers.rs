//! Headers that must not cross the gateway.

use http::header::{self, HeaderMap, HeaderName};

/// `Frappe-Authorization-Source` switches the doctype Frappe looks API keys up in.
pub static FRAPPE_AUTHORIZATION_SOURCE: HeaderName =
    HeaderName::from_static("frappe-authorization-source");
/// Makes Frappe answer private file downloads with an empty body and an nginx-internal redirect.
pub static X_USE_X_ACCEL_REDIRECT: HeaderName = HeaderName::from_static("x-use-x-accel-redirect");
/// Frappe picks the site from this header and trusts it blindly.
pub static X_FRAPPE_SITE_NAME: HeaderName = HeaderName::from_static("x-frappe-site-name");
/// The client's address, used by Frappe for login lockouts and `@rate_limit`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// The scheme the client used.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Hop-by-hop headers (RFC 9110 §7.6.1), plus the legacy ones proxies still see.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Headers gunicorn turns into one WSGI value that Frappe or routing reads (`CONTENT_TYPE`,
/// `CONTENT_LENGTH`, `HTTP_HOST`, `HTTP_AUTHORIZATION`): sent twice, gunicorn keeps the last or
/// joins them (`gunicorn/http/wsgi.py` `create`) while an HTTP library keeps the first, so a
/// repeat is refused rather than guessed at.
const SINGLETONS: [HeaderName; 4] = [
    header::HOST,
    header::CONTENT_LENGTH,
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
];

/// gunicorn's `secure_scheme_headers` (`gunicorn/config.py`): believed from a trusted peer (the
/// gateway is one) to set `wsgi.url_scheme`, and contradicting values are a 400. erpgate sets
/// `X-Forwarded-Proto` itself and drops the others.
const SCHEME_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("x-forwarded-protocol"),
    HeaderName::from_static("x-forwarded-ssl"),
];

/// The first singleton header that appears more than once.
pub fn repeated_singleton(headers: &HeaderMap) -> Option<&'static str> {
    SINGLETONS
        .iter()
        .find(|name| headers.get_all(*name).iter().nth(1).is_some())
        .map(HeaderName::as_str)
}

/// Removes the headers a WSGI server treats specially: every name with `_` (gunicorn maps `-`
/// and `_` to one environ key, and trusts `SCRIPT_NAME` and `PATH_INFO` headers from
/// `forwarded_allow_ips`, so `SCRIPT_NAME: /api/method/x` would re-route a judged path — nginx
/// drops such names by default too) and the scheme headers.
pub fn remove_wsgi_specials(headers: &mut HeaderMap) {
    if headers.keys().any(|name| name.as_str().contains('_')) {
        let underscored: Vec<HeaderName> = headers
            .keys()
            .filter(|name| name.as_str().contains('_'))
            .cloned()
            .collect();
        for name in &underscored {
            headers.remove(name);
        }
    }
    for name in &SCHEME_HEADERS {
        headers.remove(name);
    }
}

/// Removes hop-by-hop headers, including every header the `Connection` header names.
/// `Transfer-Encoding` is left to hyper, which owns message framing.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry no `Connection` header: no list to build then.
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP.iter() {
        headers.remove(name);
    }
}

/// Removes every request header that would let a client change who Frappe thinks it is or how
/// it answers: the client's credentials and session, the key-source switch, the accel redirect.
pub fn remove_client_identity(headers: &mut HeaderMap) {
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::COOKIE);
    remove_overrides(headers);
}

/// Removes the request headers that change how Frappe reads credentials or answers (the
/// key-source switch, the accel redirect, the site choice), keeping the caller's own
/// credentials and session: what a public route (the OAuth sign-in flow) forwards.
pub fn remove_overrides(headers: &mut HeaderMap) {
    headers.remove(&FRAPPE_AUTHORIZATION_SOURCE);
    headers.remove(&X_USE_X_ACCEL_REDIRECT);
    headers.remove(&X_FRAPPE_SITE_NAME);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn wsgi_specials_go_and_repeats_are_found() {
        let mut h = HeaderMap::new();
        h.insert("script_name", HeaderValue::from_static("/api/method/x"));
        h.insert("path_info", HeaderValue::from_static("/x"));
        h.insert("x-forwarded_for", HeaderValue::from_static("1.2.3.4"));
        h.insert("x-forwarded-ssl", HeaderValue::from_static("on"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        remove_wsgi_specials(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(repeated_singleton(&h), None);
        h.append(header::CONTENT_TYPE, HeaderValue::from_static("a/b"));
        h.append(header::CONTENT_TYPE, HeaderValue::from_static("a/b"));
        assert_eq!(repeated_singleton(&h), Some("content-type"));
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::ACCEPT));
    }
}
