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
