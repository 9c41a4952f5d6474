//! The cache key: everything a Frappe answer to a read depends on.
//!
//! Site and upstream service account (Frappe answers as that user, through its permissions),
//! method, the canonical path routing put in place (so percent-encoding variants are one key),
//! the query parameters decoded and in a canonical order, and the `Accept-Language`, `Accept`
//! and `Accept-Encoding` headers (translations, formats, and a compressing proxy in front of
//! gunicorn). The parts are length-prefixed and hashed with SHA-256: a fixed-size key that
//! cannot be made to collide across service accounts.

use http::{header, HeaderMap, Method};
use sha2::{Digest, Sha256};

/// A cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

/// The parts of a request the key is made of.
#[derive(Debug)]
pub struct KeyParts<'a> {
    /// The site's configured name.
    pub site: &'a str,
    /// The service account the request is signed as.
    pub account: &'a [u8],
    /// GET or HEAD.
    pub method: &'a Method,
    /// The canonical path, as forwarded.
    pub path: &'a str,
    /// The raw query string.
    pub query: Option<&'a str>,
    /// The request headers.
    pub headers: &'a HeaderMap,
}

fn part(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

impl CacheKey {
    /// The key of a request.
    pub fn of(parts: &KeyParts<'_>) -> Self {
        let mut hasher = Sha256::new();
        part(&mut hasher, parts.site.as_bytes());
        part(&mut hasher, parts.account);
        part(&mut hasher, parts.method.as_str().as_bytes());
        part(&mut hasher, parts.path.as_bytes());
        let mut pairs: Vec<(String, String)> = parts
            .query
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        // Stable: repeated keys keep their order, which Frappe may depend on.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        hasher.update((pairs.len() as u64).to_le_bytes());
        for (key, value) in &pairs {
            part(&mut hasher, key.as_bytes());
            part(&mut hasher, value.as_bytes());
        }
        for name in [
            header::ACCEPT_LANGUAGE,
            header::ACCEPT,
            header::ACCEPT_ENCODING,
        ] {
            let values = parts.headers.get_all(&name);
            hasher.update((values.iter().count() as u64).to_le_bytes());
            for value in values {
                part(&mut hasher, value.as_bytes());
            }
        }
        Self(hasher.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(account: &str, query: Option<&str>, language: Option<&str>) -> CacheKey {
        let account = account.as_bytes();
        let mut headers = HeaderMap::new();
        if let Some(l) = language {
            headers.insert(header::ACCEPT_LANGUAGE, l.parse().unwrap());
        }
        CacheKey::of(&KeyParts {
            site: "erp",
            account,
            method: &Method::GET,
            path: "/api/resource/Item",
            query,
            headers: &headers,
        })
    }

    #[test]
    fn equivalent_queries_share_a_key() {
        let a = key("sync", Some("fields=%5B%22name%22%5D&limit=5"), None);
        let b = key("sync", Some("limit=5&fields=[%22name%22]"), None);
        assert_eq!(a, b);
        assert_ne!(a, key("sync", Some("limit=6&fields=[%22name%22]"), None));
        // Repeated keys keep their order.
        assert_ne!(
            key("sync", Some("a=1&a=2"), None),
            key("sync", Some("a=2&a=1"), None)
        );
    }

    #[test]
    fn accounts_and_languages_never_share() {
        assert_ne!(key("sync", None, None), key("reader", None, None));
        assert_ne!(key("sync", None, Some("de")), key("sync", None, Some("fr")));
        assert_ne!(key("sync", None, Some("de")), key("sync", None, None));
        // Length prefixes: moving a byte between parts changes the key.
        let a = CacheKey::of(&KeyParts {
            site: "erp",
            account: b"xsync",
            method: &Method::GET,
            path: "/p",
            query: None,
            headers: &HeaderMap::new(),
        });
        let b = CacheKey::of(&KeyParts {
            site: "erpx",
            account: b"sync",
            method: &Method::GET,
            path: "/p",
            query: None,
            headers: &HeaderMap::new(),
        });
        assert_ne!(a, b);
    }
}
