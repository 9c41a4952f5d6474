//! Line numbers for key paths in a YAML document, so that problems found after parsing (a client
//! naming a missing site, an unreadable secret file) can say where they are.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Maps key paths such as `sites.erp.backends[0]` to 1-based line numbers.
#[derive(Debug, Default)]
pub struct YamlLines {
    lines: HashMap<String, usize>,
}

impl YamlLines {
    /// Indexes a document; an unparsable one gives an empty index (serde reports the error).
    pub fn index(text: &str) -> Self {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut builder, false).is_err() {
            return Self::default();
        }
        Self {
            lines: builder.lines,
        }
    }

    /// The line of `path`, or of its nearest indexed ancestor.
    pub fn line_of(&self, path: &str) -> Option<usize> {
        let mut path = path;
        loop {
            if let Some(line) = self.lines.get(path) {
                return Some(*line);
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }
}

enum Frame {
    /// In a mapping; `Some(key)` once a key has been read and its value is awaited.
    Map {
        path: String,
        key: Option<(String, usize)>,
    },
    Seq {
        path: String,
        next: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    lines: HashMap<String, usize>,
}

impl Builder {
    /// The path of the node about to start, and records its line. Returns `None` when the node
    /// is a mapping key rather than a value.
    fn enter_value(&mut self, mark: Marker, scalar: Option<&str>) -> Option<String> {
        // A value under a key is reported at the key's line, where a reader looks for it.
        let (path, line) = match self.stack.last_mut() {
            None => (String::new(), mark.line()),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                (p, mark.line())
            }
            Some(Frame::Map { path, key }) => match key.take() {
                Some((k, line)) if path.is_empty() => (k, line),
                Some((k, line)) => (format!("{path}.{k}"), line),
                None => {
                    *key = Some((scalar.unwrap_or_default().to_owned(), mark.line()));
                    return None;
                }
            },
        };
        self.lines.insert(path.clone(), line);
        Some(path)
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        match event {
            Event::Scalar(value, ..) => {
                self.enter_value(mark, Some(&value));
            }
            Event::MappingStart(..) => {
                let path = self.enter_value(mark, None).unwrap_or_default();
                self.stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.enter_value(mark, None).unwrap_or_default();
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_have_lines() {
        let y = "listen: x\nsites:\n  erp:\n    backends:\n      - http://a\n      - http://b\nroutes:\n  - { host: h, site: erp }\n";
        let idx = YamlLines::index(y);
        assert_eq!(idx.line_of("listen"), Some(1));
        assert_eq!(idx.line_of("sites.erp"), Some(3));
        assert_eq!(idx.line_of("sites.erp.backends[1]"), Some(6));
        assert_eq!(idx.line_of("routes[0].site"), Some(8));
        assert_eq!(idx.line_of("sites.erp.nothing.here"), Some(3));
    }
}
