//! What each `allow.methods` rule grants, in words: `erpgate check` prints it, so an operator
//! sees the function behind an alias, how its arguments are judged, and what a prefix opens.

use super::{AllowConfig, Config, MethodRule};
use crate::frappe::call;
use crate::frappe::catalog::{ArgKind, Catalog, Function};
use crate::frappe::MethodName;

/// One line per method rule of every client and OAuth app with rules.
pub fn describe(config: &Config) -> Vec<String> {
    let mut lines = Vec::new();
    let owners = config
        .clients
        .iter()
        .map(|(name, c)| (format!("clients.{name}"), c.allow.as_ref()))
        .chain(
            config
                .oauth_apps
                .iter()
                .map(|(name, a)| (format!("oauth_apps.{name}"), a.allow.as_ref())),
        );
    for (owner, allow) in owners {
        let Some(allow) = allow else { continue };
        lines.extend(describe_allow(&owner, allow));
    }
    lines
}

fn describe_allow(owner: &str, allow: &AllowConfig) -> Vec<String> {
    allow
        .methods
        .iter()
        .map(|rule| format!("{owner}: {}", describe_rule(rule)))
        .collect()
}

fn describe_rule(rule: &MethodRule) -> String {
    match rule {
        MethodRule::Name(name) if name.ends_with(".*") => {
            let prefix = &name[..name.len() - 1];
            let catalogued: Vec<&str> = Catalog::get()
                .functions()
                .iter()
                .filter(|f| std::iter::once(&f.name).chain(&f.aliases).any(|n| n.starts_with(prefix)))
                .map(|f| f.name.as_str())
                .collect();
            format!(
                "{name} grants every method under {prefix} outside the catalog, each judged only \
                 by its own code (erpgate cannot see that app's source){}",
                if catalogued.is_empty() {
                    String::new()
                } else {
                    format!("; catalogued functions under it: {}", catalogued.join(", "))
                }
            )
        }
        MethodRule::Name(name) => match call::resolve(MethodName::new(name).as_str()) {
            Some(f) => describe_function(name, f),
            None => format!("{name}: not in the catalog (refused)"),
        },
        MethodRule::App(app) => match &app.args {
            Some(args) => format!(
                "{} (outside the catalog) with arguments {}; any other argument is refused",
                app.name,
                args.iter()
                    .map(|(a, k)| format!("{a}: {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => format!(
                "{} (outside the catalog) judged by its own code: erpgate does not judge its arguments",
                app.name
            ),
        },
    }
}

fn describe_function(name: &str, f: &Function) -> String {
    let alias = if f.name == name {
        String::new()
    } else {
        format!(" (is {})", f.name)
    };
    let Some(review) = &f.review else {
        let inferred: Vec<String> = f
            .param_names()
            .map(|p| format!("{p}: {}", ArgKind::inferred(p).spelling()))
            .collect();
        return format!(
            "{name}{alias}: not reviewed; arguments by their names' kinds ({}), any other \
             argument it would receive is refused",
            inferred.join(", ")
        );
    };
    let args: Vec<String> = review
        .args
        .iter()
        .map(|a| format!("{}: {}", a.name, a.kind.spelling()))
        .collect();
    let fixed: Vec<String> = review
        .doctypes
        .iter()
        .map(|(d, ops)| {
            let ops: Vec<&str> = ops.iter().map(|o| o.as_str()).collect();
            format!("{d} ({})", ops.join("+"))
        })
        .collect();
    format!(
        "{name}{alias}: reviewed ({}); arguments {}{}",
        review.source,
        if args.is_empty() {
            "none".into()
        } else {
            args.join(", ")
        },
        if fixed.is_empty() {
            String::new()
        } else {
            format!("; also needs {}", fixed.join(", "))
        }
    )
}
