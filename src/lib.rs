//! erpgate: an API gateway for ERPNext / Frappe sites.
//!
//! Clients hold gateway keys; erpgate authenticates them, applies their access rules, routes
//! each request to a Frappe site and signs it with that site's service-account token, so no
//! ERPNext secret ever leaves the gateway. The Tower stack is assembled in [`stack`].

pub mod config;
pub mod frappe;

/// The error type passed between layers; turned into a response only at the edge.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
