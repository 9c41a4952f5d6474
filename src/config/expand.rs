//! `${ENV}` expansion, `*_file` secrets, and the serde helpers that apply them while the
//! YAML is read.

use super::*;

/// Expands `${NAME}` from the environment; `$$` is a literal `$`.
pub fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(inner) = tail.strip_prefix("${") {
            let end = inner
                .find('}')
                .ok_or_else(|| format!("unclosed '${{' in '{text}'"))?;
            let name = &inner[..end];
            let value = std::env::var(name)
                .map_err(|_| format!("environment variable {name} is not set"))?;
            out.push_str(&value);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

pub(crate) fn parse_env<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    let text = expand_env(&String::deserialize(d)?).map_err(de::Error::custom)?;
    text.parse()
        .map_err(|e| de::Error::custom(format!("'{text}': {e}")))
}

pub(crate) fn parse_env_opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    parse_env(d).map(Some)
}

/// A map of strings, each value `${ENV}`-expanded.
pub(crate) fn parse_env_map<'de, D>(d: D) -> Result<IndexMap<String, Secret>, D::Error>
where
    D: Deserializer<'de>,
{
    IndexMap::<String, String>::deserialize(d)?
        .into_iter()
        .map(|(k, v)| Ok((k, Secret(expand_env(&v).map_err(de::Error::custom)?))))
        .collect()
}

pub(crate) fn parse_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        de::Error::custom(format!(
            "'{text}' is not a duration like 500ms, 2s or 1m: {e}"
        ))
    })
}

/// [`parse_duration`] for an optional key.
pub(crate) fn parse_duration_opt<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    parse_duration(d).map(Some)
}

/// A secret given inline or as a file (trailing newline ignored), exactly one of them, at `at`;
/// else the key path and message of the problem.
pub(crate) fn inline_or_file(
    at: &str,
    (inline_key, inline): (&str, Option<&EnvString>),
    (file_key, file): (&str, Option<&std::path::Path>),
) -> Result<String, (String, String)> {
    let problem = |path: String, message: String| (path, message);
    match (inline, file) {
        (Some(s), None) => Ok(s.0.clone()),
        (None, Some(file)) => std::fs::read_to_string(file)
            .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
            .map_err(|e| {
                problem(
                    format!("{at}.{file_key}"),
                    format!("cannot read {}: {e}", file.display()),
                )
            }),
        _ => Err(problem(
            at.to_owned(),
            format!("exactly one of {inline_key} and {file_key} is required"),
        )),
    }
}
