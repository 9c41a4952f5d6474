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

    /// [`Self::load`], then checks that every directory erpgate writes can be written *here*
    /// (see [`Config::writable_directories`]): start-up and `erpgate check` fail on a spool or
    /// event-store directory that cannot be written, instead of the first large body failing.
    pub fn load_and_probe(path: &Path) -> Result<LoadedConfig, ConfigError> {
        Self::load_probing(path, true)
    }

    /// [`Self::load_and_probe`] that leaves no directory it created (for `erpgate check`).
    pub fn load_and_probe_leaving_nothing(path: &Path) -> Result<LoadedConfig, ConfigError> {
        Self::load_probing(path, false)
    }

    fn load_probing(path: &Path, keep_created: bool) -> Result<LoadedConfig, ConfigError> {
        let loaded = Self::load(path)?;
        let problems: Vec<Problem> = loaded
            .config
            .writable_directories()
            .into_iter()
            .filter_map(|(key, directory)| {
                probe_directory(&directory, keep_created)
                    .err()
                    .map(|e| Problem {
                        path: key.to_owned(),
                        line: None,
                        message: format!(
                            "{} cannot be written: {e} (erpgate creates a probe file there and \
                         removes it; mount a writable volume at this directory)",
                            directory.display()
                        ),
                    })
            })
            .collect();
        if problems.is_empty() {
            Ok(loaded)
        } else {
            Err(ConfigError {
                source_name: path.display().to_string(),
                problems,
            })
        }
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

impl Config {
    /// Every directory erpgate writes, with the key that names it: the buffering spool
    /// (`buffering.directory`, else the system's temporary directory) and the embedded event
    /// store (`events.directory`, when events are kept without Redis).
    pub fn writable_directories(&self) -> Vec<(&'static str, std::path::PathBuf)> {
        let mut out = vec![(
            "buffering.directory",
            self.buffering
                .directory
                .clone()
                .unwrap_or_else(std::env::temp_dir),
        )];
        if let Some(events) = &self.events {
            if let (None, Some(directory)) = (&self.shared_state, &events.directory) {
                out.push(("events.directory", directory.clone()));
            }
        }
        out
    }
}

/// Creates `directory` if need be, then a probe file in it, and removes the file: what the
/// spool and the event store will do. With `keep_created` false (`erpgate check`), the
/// directories it had to create are removed again, so a check leaves nothing behind.
pub fn probe_directory(directory: &Path, keep_created: bool) -> std::io::Result<()> {
    let missing: Vec<&Path> = directory
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    std::fs::create_dir_all(directory)?;
    let probe = directory.join(format!(
        ".erpgate-probe-{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let written = std::fs::write(&probe, b"probe").and_then(|()| std::fs::remove_file(&probe));
    if !keep_created {
        // Deepest first; only directories this probe made, and only if still empty.
        for created in &missing {
            let _ = std::fs::remove_dir(created);
        }
    }
    written
}
