//! Canonical request paths.
//!
//! Frappe runs behind a WSGI server that percent-decodes `PATH_INFO` exactly once, and werkzeug
//! then splits the decoded path on `/`. The gateway does the same here, and then *forwards the
//! canonical form it classified*, so that what the access rules saw is byte for byte what the
//! upstream receives: `%54oDo`, `Sales%20Order`, `//`, trailing slashes and `/api/v1/` cannot
//! make the gateway and Frappe disagree about which doctype or method a request touches.
//! Dot segments are refused outright: no Frappe route uses them and a proxy in between might
//! resolve them differently than we would.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};

/// Characters escaped when a decoded segment is written back into a path. Everything that is
/// not unreserved or a harmless sub-delimiter, so the result parses back to the same segment.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with '/'")]
    NotAbsolute,
    #[error("the path is not valid UTF-8 once percent-decoded")]
    NotUtf8,
    #[error("the path contains a control character")]
    ControlCharacter,
    #[error("the path contains a '.' or '..' segment")]
    DotSegment,
}

/// A decoded, canonical path: no empty, `.` or `..` segments. A trailing slash is remembered and
/// sent on (some Frappe v2 routes are declared with one and werkzeug redirects without it) but
/// never changes how the path is classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalPath {
    segments: Vec<String>,
    trailing_slash: bool,
}

impl CanonicalPath {
    /// Decodes a raw request path (without the query) the way Frappe's WSGI server does.
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        if !raw.starts_with('/') {
            return Err(PathError::NotAbsolute);
        }
        let decoded = percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| PathError::NotUtf8)?;
        if decoded.chars().any(char::is_control) {
            return Err(PathError::ControlCharacter);
        }
        let trailing_slash = decoded.len() > 1 && decoded.ends_with('/');
        let mut segments = Vec::new();
        for segment in decoded.split('/') {
            match segment {
                "" => continue,
                "." | ".." => return Err(PathError::DotSegment),
                s => segments.push(s.to_owned()),
            }
        }
        let trailing_slash = trailing_slash && !segments.is_empty();
        Ok(Self {
            segments,
            trailing_slash,
        })
    }

    /// The decoded segments, in order.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// True when `prefix` (itself canonical) is a whole-segment prefix of this path.
    pub fn starts_with(&self, prefix: &CanonicalPath) -> bool {
        self.segments.starts_with(&prefix.segments)
    }

    /// Removes a whole-segment prefix.
    pub fn strip_prefix(&mut self, prefix: &CanonicalPath) {
        if self.starts_with(prefix) {
            self.segments.drain(..prefix.segments.len());
        }
    }

    /// The path as it is sent upstream: each segment re-encoded, joined with `/`.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(self.segments.iter().map(|s| s.len() + 1).sum());
        for segment in &self.segments {
            out.push('/');
            out.extend(utf8_percent_encode(segment, SEGMENT));
        }
        if out.is_empty() || self.trailing_slash {
            out.push('/');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(raw: &str) -> String {
        CanonicalPath::parse(raw).unwrap().encode()
    }

    #[test]
    fn percent_encoding_maps_to_one_form() {
        assert_eq!(canon("/api/resource/%54oDo"), "/api/resource/ToDo");
        assert_eq!(
            canon("/api/resource/Sales%20Order"),
            "/api/resource/Sales%20Order"
        );
        assert_eq!(
            canon("/api/resource/Sales Order"),
            "/api/resource/Sales%20Order"
        );
    }

    #[test]
    fn slashes_collapse_and_trailing_slash_is_kept() {
        assert_eq!(canon("//api///resource/ToDo"), "/api/resource/ToDo");
        assert_eq!(canon("/api/resource/ToDo//"), "/api/resource/ToDo/");
        let a = CanonicalPath::parse("/api/resource/ToDo/").unwrap();
        let b = CanonicalPath::parse("/api/resource/ToDo").unwrap();
        assert_eq!(a.segments(), b.segments());
        assert_eq!(canon("/"), "/");
        assert_eq!(canon("//"), "/");
    }

    #[test]
    fn encoded_slash_becomes_a_separator_as_in_wsgi() {
        assert_eq!(canon("/api/resource/ToDo/a%2Fb"), "/api/resource/ToDo/a/b");
    }

    #[test]
    fn dot_segments_and_garbage_are_refused() {
        assert_eq!(
            CanonicalPath::parse("/api/resource/ToDo/../User"),
            Err(PathError::DotSegment)
        );
        assert_eq!(
            CanonicalPath::parse("/api/%2e%2e/x"),
            Err(PathError::DotSegment)
        );
        assert_eq!(CanonicalPath::parse("/a%ff"), Err(PathError::NotUtf8));
        assert_eq!(
            CanonicalPath::parse("/a%0Ab"),
            Err(PathError::ControlCharacter)
        );
        assert_eq!(CanonicalPath::parse("api"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn double_encoding_is_decoded_once_like_frappe() {
        assert_eq!(canon("/api/resource/%2554oDo"), "/api/resource/%2554oDo");
    }

    #[test]
    fn prefix_is_whole_segments() {
        let prefix = CanonicalPath::parse("/staging").unwrap();
        let mut p = CanonicalPath::parse("/staging/api/resource/ToDo").unwrap();
        assert!(p.starts_with(&prefix));
        assert!(!CanonicalPath::parse("/stagingx/api")
            .unwrap()
            .starts_with(&prefix));
        p.strip_prefix(&prefix);
        assert_eq!(p.encode(), "/api/resource/ToDo");
    }
}
