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
    headers.remove(&FRAPPE_AUTHORIZATION_SOURCE);
    headers.remove(&X_USE_X_ACCEL_REDIRECT);
    headers.remove(&X_FRAPPE_SITE_NAME);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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
