//! Everything erpgate knows about Frappe: how it reads paths and `form_dict`, what a request
//! does, its auth header formats, its error envelopes, and the headers that must not reach it.
//! Nothing outside this module hard-codes a Frappe route or field name.

pub mod acl;
pub mod auth_header;
pub mod call;
pub mod catalog;
pub mod classify;
pub mod envelope;
pub mod form_dict;
pub mod headers;
pub mod meta;
pub mod multipart;
pub mod oauth;
pub mod openapi;
pub mod path;
pub mod probe;
pub mod python_json;
pub mod query_args;
pub mod webhook;
pub mod writes;

pub use acl::{AccessRules, Denied};
pub use classify::{ApiVersion, FrappeRequest, MethodName, MethodSet, Operation, RequestKind};
pub use path::CanonicalPath;
