//! Reading `gateway.yaml`: YAML, then serde, then validation; the errors it reports.

use super::*;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, such as `clients.shop.site`.
    pub path: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.path.is_empty(), self.line) {
            (true, Some(line)) => write!(f, "line {line}: {}", self.message),
            (true, None) => write!(f, "{}", self.message),
            (false, Some(line)) => write!(f, "{} (line {line}): {}", self.path, self.message),
            (false, None) => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// A config file that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
#[error("{} problem(s) in {source_name}:\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    /// The file (or `<inline>`).
    pub source_name: String,
    /// Every problem found.
    pub problems: Vec<Problem>,
}

/// A validated configuration with its secrets resolved.
#[derive(Debug)]
pub struct LoadedConfig {
    /// The configuration.
    pub config: Config,
    /// Service-account secrets by (site, account), read from `api_secret` or `api_secret_file`.
    pub secrets: IndexMap<(String, String), Secret>,
    /// Webhook secrets by site.
    pub webhook_secrets: IndexMap<String, Secret>,
    /// Subscription signing secrets (`whsec_...`, checked) by (client, subscription).
    pub subscription_secrets: IndexMap<(String, String), Secret>,
    /// The shared-state Redis password, read from `password` or `password_file`.
    pub redis_password: Option<Secret>,
    /// SHA-256 (hex, first 16 digits) of the configuration text, exported as a metric label
    /// so that every replica can be seen to run the same configuration.
    pub hash: String,
}

/// A secret that never prints.
#[derive(Clone)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<LoadedConfig, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            problems: vec![Problem {
                path: String::new(),
                line: None,
                message: format!("cannot read the file: {e}"),
            }],
        })?;
        Self::from_yaml(&text, &name)
    }

    /// Parses and validates YAML text; `source_name` names it in errors.
    pub fn from_yaml(text: &str, source_name: &str) -> Result<LoadedConfig, ConfigError> {
        let fail = |problems| ConfigError {
            source_name: source_name.to_owned(),
            problems,
        };
        let config: Config = serde_yaml::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line());
            let message = e.to_string();
            // serde_yaml puts the key path first: "sites.erp: unknown field ...".
            let (path, message) = match message.split_once(": ") {
                Some((p, m)) if !p.contains(' ') => (p.to_owned(), m.to_owned()),
                _ => (String::new(), message),
            };
            let message = match message.rfind(" at line ") {
                Some(at) => message[..at].to_owned(),
                None => message,
            };
            fail(vec![Problem {
                path,
                line,
                message,
            }])
        })?;
        let lines = YamlLines::index(text);
        let mut loaded = config.validate(&lines).map_err(fail)?;
        let digest = <sha2::Sha256 as sha2::Digest>::digest(text.as_bytes());
        loaded.hash = hex::encode(&digest[..8]);
        Ok(loaded)
    }
}
