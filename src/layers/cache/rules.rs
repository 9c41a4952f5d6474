//! Which reads are cached, for how long, and the tags their entries carry.

use std::time::Duration;

use crate::frappe::{FrappeRequest, Operation, RequestKind};
use crate::layers::cache::invalidation::{doctype_tag, document_tag, lists_tag, site_tag, Tag};

/// One rule (built from `cache.rules[]`).
#[derive(Debug, Clone)]
pub struct CacheRule {
    /// What it matches.
    pub subject: Subject,
    /// Fresh for this long.
    pub ttl: Duration,
    /// Then served on upstream failure for this long.
    pub stale_if_error: Duration,
    /// Store even when the site says `no-store` or `private`.
    pub override_upstream_cache_control: bool,
    /// Only on these sites (`None`: all).
    pub sites: Option<Vec<String>>,
}

/// What a rule matches.
#[derive(Debug, Clone)]
pub enum Subject {
    /// Reads of a doctype.
    Doctype {
        /// Matched case-insensitively.
        doctype: String,
        /// List reads.
        lists: bool,
        /// Single-document reads.
        documents: bool,
    },
    /// Calls of a method, by canonical dotted name.
    Method(String),
}

/// A matched read: its rule and the tags its entry carries.
#[derive(Debug)]
pub struct Matched<'a> {
    /// The rule.
    pub rule: &'a CacheRule,
    /// Site, doctype, and document or lists tags (0: none).
    pub tags: [Tag; 3],
}

/// All rules, first match wins.
#[derive(Debug, Clone, Default)]
pub struct CacheRules(pub Vec<CacheRule>);

impl CacheRules {
    /// The longest an entry can live (fresh plus stale).
    pub fn longest_life(&self) -> Duration {
        self.0
            .iter()
            .map(|r| r.ttl + r.stale_if_error)
            .max()
            .unwrap_or_default()
    }

    /// The rule for a GET/HEAD `request` to `site` with query string `query`, if any.
    pub fn find(
        &self,
        site: &str,
        request: &FrappeRequest,
        query: Option<&str>,
    ) -> Option<Matched<'_>> {
        // A `cmd` riding along could make Frappe run something else: never cached.
        if !request.embedded_methods.is_empty() {
            return None;
        }
        self.0.iter().find_map(|rule| {
            if rule
                .sites
                .as_ref()
                .is_some_and(|s| !s.iter().any(|s| s == site))
            {
                return None;
            }
            match (&rule.subject, &request.kind) {
                (
                    Subject::Doctype {
                        doctype,
                        lists,
                        documents,
                    },
                    RequestKind::Resource {
                        doctype: asked,
                        name,
                        operation: Operation::Read,
                    },
                ) if doctype.eq_ignore_ascii_case(asked) => match name {
                    None if *lists => Some(Matched {
                        rule,
                        tags: [
                            site_tag(site),
                            doctype_tag(site, asked),
                            lists_tag(site, asked),
                        ],
                    }),
                    Some(name) if *documents => Some(Matched {
                        rule,
                        tags: [
                            site_tag(site),
                            doctype_tag(site, asked),
                            document_tag(site, asked, name),
                        ],
                    }),
                    _ => None,
                },
                (Subject::Method(method), RequestKind::Method(asked))
                    if method == asked.as_str() =>
                {
                    // A method over a doctype (get_count, get_list, get_value) goes with its
                    // lists; one without is only dropped by site or whole purges.
                    let doctype = crate::frappe::form_dict::query_value(query, "doctype");
                    let tags = match doctype {
                        Some(d) => [site_tag(site), doctype_tag(site, &d), lists_tag(site, &d)],
                        None => [site_tag(site), 0, 0],
                    };
                    Some(Matched { rule, tags })
                }
                _ => None,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::*;
    use crate::frappe::form_dict::FormDict;
    use crate::frappe::CanonicalPath;

    fn rules() -> CacheRules {
        let rule = |subject| CacheRule {
            subject,
            ttl: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(300),
            override_upstream_cache_control: false,
            sites: None,
        };
        CacheRules(vec![
            rule(Subject::Doctype {
                doctype: "Item".into(),
                lists: true,
                documents: false,
            }),
            rule(Subject::Method("frappe.client.get_count".into())),
        ])
    }

    fn get(path: &str) -> FrappeRequest {
        FrappeRequest::classify(
            &Method::GET,
            &CanonicalPath::parse(path).unwrap(),
            &FormDict::default(),
        )
    }

    #[test]
    fn matching() {
        let r = rules();
        assert!(r.find("erp", &get("/api/resource/item"), None).is_some());
        assert!(r.find("erp", &get("/api/v2/document/Item"), None).is_some());
        assert!(
            r.find("erp", &get("/api/resource/Item/X"), None).is_none(),
            "documents off"
        );
        assert!(r.find("erp", &get("/api/resource/ToDo"), None).is_none());
        let count = r
            .find(
                "erp",
                &get("/api/method/frappe.client.get_count"),
                Some("doctype=Item"),
            )
            .unwrap();
        assert_eq!(count.tags[2], lists_tag("erp", "item"));
        assert_eq!(r.longest_life(), Duration::from_secs(360));
    }
}
