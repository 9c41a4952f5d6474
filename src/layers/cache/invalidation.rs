//! Invalidation by tag, in constant time: no scan of the store.
//!
//! Every entry carries a few tags (the whole cache, its site, its doctype on that site, and its
//! document or "the lists" of that doctype) and the generation at which its request *started*.
//! Invalidating a tag records the next generation for it; an entry is valid while every one of
//! its tags was last invalidated no later than the entry's start. So a read that raced a write
//! (started before the write's invalidation, finished after) is never served, and nothing has
//! to find the entries: they fail the check when next looked up, and are dropped then.
//!
//! Marks are kept for as long as the longest-lived entry can live, then forgotten. Should the
//! mark table ever be full, evicting a mark invalidates everything, never nothing.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A tag: a hash of what it names (a collision only over-invalidates).
pub type Tag = u64;

/// Most marks remembered.
const MAX_MARKS: u64 = 1_000_000;

fn tag_of(parts: &[&str]) -> Tag {
    let mut hasher = DefaultHasher::new();
    for part in parts {
        part.hash(&mut hasher);
    }
    // 0 means "no tag" in an entry's tag list.
    hasher.finish().max(1)
}

/// Every entry of a site.
pub fn site_tag(site: &str) -> Tag {
    tag_of(&["site", site])
}

/// Every entry of a doctype on a site (doctype lower-cased: Frappe matches it so).
pub fn doctype_tag(site: &str, doctype: &str) -> Tag {
    tag_of(&["doctype", site, &doctype.to_lowercase()])
}

/// One document's entries. The name is matched as Frappe's MariaDB matches it: `_ci`
/// collations ignore case and `PAD SPACE` ignores trailing spaces, so `3VV9MRATU5` and
/// `3vv9mratu5 ` are one document. (Accent folding of `utf8mb4_unicode_ci` is not mirrored;
/// names with accents are purged by their doctype's lists and TTL.)
pub fn document_tag(site: &str, doctype: &str, name: &str) -> Tag {
    let name = name.trim_end_matches(' ').to_lowercase();
    tag_of(&["document", site, &doctype.to_lowercase(), &name])
}

/// The list and method entries of a doctype: anything a change to one document may alter.
pub fn lists_tag(site: &str, doctype: &str) -> Tag {
    tag_of(&["lists", site, &doctype.to_lowercase()])
}

/// The generation clock and the marks.
pub struct Invalidations {
    /// Shared with the marks' eviction listener.
    clock: Arc<AtomicU64>,
    /// The generation of the last invalidation of everything.
    all: Arc<AtomicU64>,
    marks: moka::sync::Cache<Tag, u64>,
}

impl std::fmt::Debug for Invalidations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidations")
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl Invalidations {
    /// Marks kept for `longest_life`, the longest an entry can live.
    pub fn new(longest_life: Duration) -> Self {
        let clock = Arc::new(AtomicU64::new(0));
        let all = Arc::new(AtomicU64::new(0));
        let (listener_clock, listener_all) = (clock.clone(), all.clone());
        let marks = moka::sync::Cache::builder()
            .max_capacity(MAX_MARKS)
            .time_to_live(longest_life.max(Duration::from_secs(1)))
            .eviction_listener(move |_tag, _mark, cause| {
                // A mark lost to the size bound: invalidate everything rather than nothing.
                if cause == moka::notification::RemovalCause::Size {
                    let now = listener_clock.fetch_add(1, Ordering::AcqRel) + 1;
                    listener_all.fetch_max(now, Ordering::AcqRel);
                }
            })
            .build();
        Self { clock, all, marks }
    }

    /// The generation a request starting now is born in.
    pub fn now(&self) -> u64 {
        self.clock.load(Ordering::Acquire)
    }

    fn next(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Invalidates every entry carrying `tag`.
    pub fn invalidate(&self, tag: Tag) {
        let generation = self.next();
        self.marks.insert(tag, generation);
    }

    /// Invalidates everything.
    pub fn invalidate_all(&self) {
        let generation = self.next();
        self.all.fetch_max(generation, Ordering::AcqRel);
    }

    /// True while no tag of an entry born at `born` was invalidated since.
    pub fn valid(&self, born: u64, tags: &[Tag]) -> bool {
        self.all.load(Ordering::Acquire) <= born
            && tags
                .iter()
                .filter(|t| **t != 0)
                .all(|t| self.marks.get(t).is_none_or(|mark| mark <= born))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_started_before_an_invalidation_is_invalid_after_it() {
        let marks = Invalidations::new(Duration::from_secs(60));
        let item = doctype_tag("erp", "Item");
        let before = marks.now();
        marks.invalidate(item);
        let after = marks.now();
        assert!(!marks.valid(before, &[item]));
        assert!(marks.valid(after, &[item]));
        // Other tags are untouched; doctype case does not matter.
        assert!(marks.valid(before, &[doctype_tag("erp", "ToDo")]));
        assert_eq!(item, doctype_tag("erp", "ITEM"));
        assert!(marks.valid(before, &[0]));
        marks.invalidate_all();
        assert!(!marks.valid(after, &[doctype_tag("erp", "ToDo")]));
        assert!(marks.valid(marks.now(), &[item]));
    }
}
