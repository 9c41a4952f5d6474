//! `gateway.yaml`: the configuration types (their `///` docs are the reference), `${ENV}` and
//! `*_file` secrets, and validation that reports every problem with its key path and line.
//!
//! Loading has two stages. serde reads the structure: unknown keys, wrong types, unparsable
//! addresses, durations and sizes, and unset environment variables stop it at the first problem,
//! because nothing later can be checked without a structure. [`Config::validate`] then checks
//! what spans the document (references between sites, routes and clients, secret files, key
//! formats) and reports all of it at once.
//!
//! One file per concern: `types` (the structs, their defaults), `expand` (`${ENV}`, `*_file`
//! and the serde helpers applying them), `load` (YAML → serde → validation, and the errors),
//! `validate`, and `yaml_lines` (key paths to line numbers).

mod expand;
pub mod grants;
mod load;
mod types;
mod validate;
mod yaml_lines;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indexmap::IndexMap;
use serde::{de, Deserialize, Deserializer};

pub use expand::expand_env;
use expand::{
    inline_or_file, parse_duration, parse_duration_opt, parse_env, parse_env_map, parse_env_opt,
};
pub use load::{ConfigError, LoadedConfig, Problem, Secret};
pub use types::*;
pub use yaml_lines::YamlLines;

use crate::frappe::acl::parse_operations;
use crate::frappe::CanonicalPath;

#[cfg(test)]
mod tests;
