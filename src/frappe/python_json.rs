//! JSON as Frappe reads it: Python's `json.loads`.
//!
//! `frappe/app.py` `make_form_dict` turns a JSON body into `form_dict` with
//! `json.loads(request.get_data(as_text=True))`, and Frappe's query layer `json.loads` the string
//! values of `fields` and `filters` (`frappe/model/db_query.py` `DatabaseQuery.parse_args`).
//! Python's decoder (CPython `Modules/_json.c`, the C scanner `json.loads` uses) is not RFC 8259:
//! it accepts `NaN`, `Infinity` and `-Infinity`, keeps lone surrogate escapes, and lets a repeated
//! key's last value win. A strict JSON parser would refuse requests Frappe accepts, or read them
//! differently, so this module mirrors that decoder:
//!
//! - whitespace is exactly `' '`, `'\t'`, `'\n'`, `'\r'` (`WHITESPACE` in `json/decoder.py`);
//! - numbers match `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?` (`_match_number_unicode`);
//! - strings refuse raw control characters (`strict=True`) and accept the escapes
//!   `\" \\ \/ \b \f \n \r \t \uXXXX` with exactly four hex digits (`scanstring_unicode`);
//!   a lone surrogate becomes U+FFFD here (it can never spell a key or method erpgate acts on);
//! - `NaN`, `Infinity`, `-Infinity`, `null`, `true`, `false` are the only bare words;
//! - anything after the value but whitespace is an error ("Extra data"), and a leading BOM is an
//!   error ("Unexpected UTF-8 BOM").
//!
//! Nesting is capped at [`MAX_DEPTH`]: CPython raises `RecursionError` somewhere near 1,000; a
//! body nested deeper than the cap is refused rather than guessed at.

/// Deepest nesting accepted; deeper bodies are refused.
pub const MAX_DEPTH: usize = 128;

/// A JSON value as Python holds it after `json.loads`.
#[derive(Debug, Clone, PartialEq)]
pub enum PyJson {
    /// `null` → `None`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// A number (or `NaN`, `Infinity`, `-Infinity`), as written.
    Number(String),
    /// A string, escapes decoded.
    Str(String),
    /// A list.
    Array(Vec<PyJson>),
    /// A dict: every member in order, repeats included (the last one is what Python keeps).
    Object(Vec<Member>),
}

/// One member of an object, with the span of its text in the source.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The decoded key.
    pub key: String,
    /// The value.
    pub value: PyJson,
    /// Byte range of `"key": value` in the source text.
    pub span: (usize, usize),
}

impl PyJson {
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A scalar: what Frappe escapes as an SQL literal.
    pub fn is_scalar(&self) -> bool {
        matches!(
            self,
            Self::Null | Self::Bool(_) | Self::Number(_) | Self::Str(_)
        )
    }
}

/// Why text is not JSON to Python.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} at byte {at}")]
pub struct PyJsonError {
    /// What went wrong.
    pub what: &'static str,
    /// Where.
    pub at: usize,
}

impl PyJsonError {
    /// Whether the text was refused only for its depth: CPython might still read it (its limit
    /// is the interpreter's recursion limit, not a fixed depth), so erpgate cannot say what
    /// Frappe would make of it and must refuse, never treat it as "not JSON".
    pub fn too_deep(&self) -> bool {
        self.what == TOO_DEEP
    }
}

const TOO_DEEP: &str = "nested too deeply";

/// Parses `text` as `json.loads(text)` would.
pub fn loads(text: &str) -> Result<PyJson, PyJsonError> {
    if text.starts_with('\u{feff}') {
        return Err(PyJsonError {
            what: "unexpected UTF-8 BOM",
            at: 0,
        });
    }
    let mut parser = Parser {
        src: text.as_bytes(),
        text,
        pos: 0,
        depth: 0,
    };
    parser.skip_ws();
    let value = parser.value()?;
    parser.skip_ws();
    if parser.pos != parser.src.len() {
        return Err(parser.err("extra data"));
    }
    Ok(value)
}

struct Parser<'a> {
    src: &'a [u8],
    text: &'a str,
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn err(&self, what: &'static str) -> PyJsonError {
        PyJsonError { what, at: self.pos }
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, word: &str) -> bool {
        if self.src[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self) -> Result<PyJson, PyJsonError> {
        match self.peek() {
            Some(b'"') => self.string().map(PyJson::Str),
            Some(b'{') => self.nested(Self::object),
            Some(b'[') => self.nested(Self::array),
            Some(b'n') if self.eat("null") => Ok(PyJson::Null),
            Some(b't') if self.eat("true") => Ok(PyJson::Bool(true)),
            Some(b'f') if self.eat("false") => Ok(PyJson::Bool(false)),
            Some(b'N') if self.eat("NaN") => Ok(PyJson::Number("NaN".into())),
            Some(b'I') if self.eat("Infinity") => Ok(PyJson::Number("Infinity".into())),
            Some(b'-') if self.eat("-Infinity") => Ok(PyJson::Number("-Infinity".into())),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(self.err("expecting value")),
        }
    }

    fn nested(
        &mut self,
        inner: fn(&mut Self) -> Result<PyJson, PyJsonError>,
    ) -> Result<PyJson, PyJsonError> {
        if self.depth >= MAX_DEPTH {
            return Err(self.err(TOO_DEEP));
        }
        self.depth += 1;
        let value = inner(self);
        self.depth -= 1;
        value
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<PyJson, PyJsonError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.err("expecting value")),
        }
        // A fraction or exponent without digits is not part of the number: Python stops before
        // it, and the caller then fails on the stray character.
        if self.peek() == Some(b'.') && matches!(self.src.get(self.pos + 1), Some(b'0'..=b'9')) {
            self.pos += 1;
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            let mark = self.pos;
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                self.pos = mark;
            }
        }
        Ok(PyJson::Number(self.text[start..self.pos].to_owned()))
    }

    fn hex4(&mut self) -> Result<u32, PyJsonError> {
        let digits = self
            .src
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| self.err("invalid \\uXXXX escape"))?;
        let mut code = 0u32;
        for &d in digits {
            let v = (d as char)
                .to_digit(16)
                .ok_or_else(|| self.err("invalid \\uXXXX escape"))?;
            code = code * 16 + v;
        }
        self.pos += 4;
        Ok(code)
    }

    fn string(&mut self) -> Result<String, PyJsonError> {
        self.pos += 1; // the opening quote
        let mut out = String::new();
        loop {
            let chunk_start = self.pos;
            while let Some(b) = self.peek() {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.pos += 1;
            }
            out.push_str(&self.text[chunk_start..self.pos]);
            match self.peek() {
                None => return Err(self.err("unterminated string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let escaped = self.peek().ok_or_else(|| self.err("unterminated string"))?;
                    self.pos += 1;
                    match escaped {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let first = self.hex4()?;
                            let code = if (0xd800..0xdc00).contains(&first)
                                && self.src[self.pos..].starts_with(b"\\u")
                            {
                                let mark = self.pos;
                                self.pos += 2;
                                let second = self.hex4()?;
                                if (0xdc00..0xe000).contains(&second) {
                                    0x10000 + ((first - 0xd800) << 10) + (second - 0xdc00)
                                } else {
                                    // Not a pair: the second escape is read on its own.
                                    self.pos = mark;
                                    first
                                }
                            } else {
                                first
                            };
                            out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                        }
                        _ => return Err(self.err("invalid \\escape")),
                    }
                }
                Some(_) => return Err(self.err("invalid control character in string")),
            }
        }
    }

    fn array(&mut self) -> Result<PyJson, PyJsonError> {
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(PyJson::Array(items));
        }
        loop {
            self.skip_ws();
            items.push(self.value()?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(PyJson::Array(items));
                }
                _ => return Err(self.err("expecting ',' delimiter")),
            }
        }
    }

    fn object(&mut self) -> Result<PyJson, PyJsonError> {
        self.pos += 1;
        let mut members = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(PyJson::Object(members));
        }
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(self.err("expecting property name enclosed in double quotes"));
            }
            let start = self.pos;
            let key = self.string()?;
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(self.err("expecting ':' delimiter"));
            }
            self.pos += 1;
            self.skip_ws();
            let value = self.value()?;
            members.push(Member {
                key,
                value,
                span: (start, self.pos),
            });
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(PyJson::Object(members));
                }
                _ => return Err(self.err("expecting ',' delimiter")),
            }
        }
    }
}

/// Rewrites a top-level object without the members `drop` selects, every other member's text
/// kept byte for byte (numbers, `NaN`, escapes and spacing included).
pub fn without_members(text: &str, members: &[Member], drop: impl Fn(&str) -> bool) -> String {
    let mut out = String::with_capacity(text.len());
    out.push('{');
    for member in members.iter().filter(|m| !drop(&m.key)) {
        if out.len() > 1 {
            out.push(',');
        }
        out.push_str(&text[member.span.0..member.span.1]);
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(text: &str) -> Vec<Member> {
        match loads(text).unwrap() {
            PyJson::Object(m) => m,
            other => panic!("not an object: {other:?}"),
        }
    }

    #[test]
    fn python_extensions_are_accepted() {
        let m = obj(r#"{"a": NaN, "b": [Infinity, -Infinity], "c": 1.5e3}"#);
        assert_eq!(m[0].value, PyJson::Number("NaN".into()));
        assert_eq!(
            m[1].value,
            PyJson::Array(vec![
                PyJson::Number("Infinity".into()),
                PyJson::Number("-Infinity".into())
            ])
        );
        assert_eq!(m[2].value, PyJson::Number("1.5e3".into()));
    }

    #[test]
    fn escapes_decode_as_in_python() {
        let m = obj(r#"{"c\u006dd": "a\/b\n", "s": "\ud83d\ude00", "lone": "\ud800x"}"#);
        assert_eq!(m[0].key, "cmd");
        assert_eq!(m[0].value.as_str(), Some("a/b\n"));
        assert_eq!(m[1].value.as_str(), Some("😀"));
        assert_eq!(m[2].value.as_str(), Some("\u{fffd}x"));
    }

    #[test]
    fn what_python_refuses_is_refused() {
        for bad in [
            "",
            "{",
            r#"{"a":1,}"#,
            "[1,]",
            "01",
            "{'a':1}",
            "\u{feff}{}",
            "{\"a\":\"x\ny\"}",
            r#"{"a":"\x"}"#,
            r#"{"a":"\u12"}"#,
            "nan",
            "1 2",
            "{\"a\" 1}",
            "\u{b}{}",
        ] {
            assert!(loads(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(loads(" \t\r\n{} \n").is_ok());
        assert!(loads("1.").is_err());
        assert!(loads("1e").is_err());
        assert_eq!(loads("-0.5E-2").unwrap(), PyJson::Number("-0.5E-2".into()));
    }

    #[test]
    fn depth_is_capped() {
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert!(loads(&deep).is_err());
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(loads(&ok).is_ok());
    }

    #[test]
    fn members_are_dropped_and_the_rest_kept_verbatim() {
        let text = r#"{"b": 1.50, "sid":"x" ,"a":{"z":[NaN]}, "sid": 2}"#;
        let m = obj(text);
        assert_eq!(
            without_members(text, &m, |k| k == "sid"),
            r#"{"b": 1.50,"a":{"z":[NaN]}}"#
        );
    }
}
