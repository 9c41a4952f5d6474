//! The tests' own model of how werkzeug 3 splits a multipart body, independent of the parser
//! erpgate uses: a delimiter is `--boundary` at the very start or after `\r\n`, `\n` or `\r`
//! (`sansio/multipart.py`, `LINE_BREAK`); a part with a `filename` goes to `request.files`.

/// The fields (not files) of a multipart body, as `(name, value)`.
pub fn multipart_fields(body: &[u8], boundary: &str) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(body);
    let delimiter = format!("--{boundary}");
    let mut starts = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(&delimiter) {
        let at = from + i;
        if at == 0 || matches!(text.as_bytes()[at - 1], b'\r' | b'\n') {
            starts.push(at);
        }
        from = at + delimiter.len();
    }
    let mut fields = Vec::new();
    for pair in starts.windows(2) {
        let part = &text[pair[0] + delimiter.len()..pair[1]];
        let part = part.trim_start_matches(['\r', '\n']);
        let Some((head, content)) = part
            .split_once("\r\n\r\n")
            .or_else(|| part.split_once("\n\n"))
        else {
            continue;
        };
        // The line break before the next delimiter belongs to it.
        let content = content
            .strip_suffix("\r\n")
            .or_else(|| content.strip_suffix(['\n', '\r']))
            .unwrap_or(content);
        let lower = head.to_lowercase();
        if lower.contains("filename=") {
            continue;
        }
        if let Some(name) = lower
            .split("name=\"")
            .nth(1)
            .and_then(|n| n.split('"').next())
        {
            fields.push((name.to_owned(), content.to_owned()));
        }
    }
    fields
}

/// werkzeug 3.0.6 `http.parse_options_header`, modelled line by line: the mimetype before the
/// first `;`, then each part that starts with `token=` followed by a token or a quoted string
/// (`\\` and `\"` escapes) is kept, whatever follows it up to the next `;`; other parts are
/// skipped. Names are lower-cased; `name*` takes an RFC 2231 `charset'lang'value` (percent-
/// decoded for ASCII, UTF-8 and ISO-8859-1); quoted values are unquoted (`\\`, `\"`, `%22`);
/// `name*N` continues `name`; a repeated name's last value wins.
pub fn parse_options_header(value: &str) -> (String, std::collections::HashMap<String, String>) {
    let token = |c: char| c.is_ascii_alphanumeric() || "_!#$%&'*+-.^`|~".contains(c);
    let py_ws = |c: char| c.is_whitespace();
    let mut options = std::collections::HashMap::new();
    let (mime, rest) = value.split_once(';').unwrap_or((value, ""));
    let (mime, mut rest) = (
        mime.trim_matches(py_ws).to_owned(),
        rest.trim_matches(py_ws),
    );
    if mime.is_empty() || rest.is_empty() {
        return (mime, options);
    }
    let mut parts: Vec<(String, String)> = Vec::new();
    loop {
        let key_len = rest.chars().take_while(|c| token(*c)).count();
        if key_len > 0 && rest[key_len..].starts_with('=') {
            let key = rest[..key_len].to_lowercase();
            rest = &rest[key_len + 1..];
            let value_len = rest.chars().take_while(|c| token(*c)).count();
            if value_len > 0 {
                parts.push((key, rest[..value_len].to_owned()));
            } else if rest.starts_with('"') {
                let bytes = rest.as_bytes();
                let mut pos = 1;
                while pos < bytes.len() {
                    if rest[pos..].starts_with("\\\\") || rest[pos..].starts_with("\\\"") {
                        pos += 2;
                    } else if bytes[pos] == b'"' {
                        parts.push((key, rest[..=pos].to_owned()));
                        rest = &rest[pos + 1..];
                        break;
                    } else {
                        pos += 1;
                    }
                }
            }
        }
        match rest.find(';') {
            None => break,
            Some(end) => rest = rest[end + 1..].trim_start_matches(py_ws),
        }
    }
    // As in werkzeug, `encoding` outlives each part: a part with no charset marker keeps the
    // previous part's, even an unsafe one.
    let mut continued: Option<String> = None;
    let mut encoding: Option<String> = None;
    for (mut key, mut value) in parts {
        if let Some(stripped) = key.strip_suffix('*') {
            key = stripped.to_owned();
            let marker: Vec<&str> = value.splitn(3, '\'').collect();
            let charset_token = |s: &str| s.chars().all(|c| token(c) && c != '\'');
            if let [charset, lang, rest] = marker.as_slice() {
                if charset_token(charset)
                    && charset_token(lang)
                    && !rest.is_empty()
                    && rest.chars().all(token)
                {
                    encoding = Some(charset.to_lowercase());
                    value = (*rest).to_owned();
                }
            }
            if encoding.as_deref().is_none_or(str::is_empty) {
                encoding = continued.clone();
            }
            let safe = ["ascii", "us-ascii", "utf-8", "iso-8859-1"];
            if let Some(e) = encoding.clone().filter(|e| safe.contains(&e.as_str())) {
                continued = Some(e);
                value = percent_decode(&value);
            }
        }
        if value.len() >= 2 && value.starts_with('"') && value.ends_with('"') {
            value = value[1..value.len() - 1]
                .replace("\\\\", "\\")
                .replace("\\\"", "\"")
                .replace("%22", "\"");
        }
        let continuation = key
            .rfind('*')
            .filter(|&i| i + 1 < key.len() && key[i + 1..].chars().all(|c| c.is_ascii_digit()));
        match continuation {
            Some(i) => {
                let base = key[..i].to_owned();
                options
                    .entry(base)
                    .or_insert_with(String::new)
                    .push_str(&value);
            }
            None => {
                options.insert(key, value);
            }
        }
    }
    (mime, options)
}

fn percent_decode(s: &str) -> String {
    let decoded: Vec<u8> =
        form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
            .next()
            .map(|(_, v)| v.into_owned().into_bytes())
            .unwrap_or_default();
    String::from_utf8_lossy(&decoded).into_owned()
}
