use super::*;

#[test]
fn the_catalog_loads_with_every_review() {
    let catalog = Catalog::load(FUNCTIONS, REVIEWS).unwrap_or_else(|e| panic!("{e}"));
    assert!(catalog.functions().len() > 400);
    assert!(catalog.sources.iter().any(|s| s.starts_with("frappe 15.")));
}

#[test]
fn an_alias_reaches_the_function_that_defines_it() {
    let catalog = Catalog::get();
    let set_value = catalog.lookup("frappe.client.set_value").unwrap();
    assert_eq!(
        catalog.lookup("frappe.email.inbox.set_value").unwrap().name,
        set_value.name
    );
    assert_eq!(
        catalog.lookup("upload_file").unwrap().name,
        "frappe.handler.upload_file"
    );
    assert!(catalog.lookup("frappe.client.no_such_function").is_none());
    assert!(catalog.covers("frappe.desk") && catalog.covers("erpnext"));
    assert!(!catalog.covers("myapp.api") && !catalog.covers("test"));
}

#[test]
fn reviews_must_match_the_signature() {
    let functions = r#"{"name": "a.b.f", "app": "a", "file": "a/b.py", "line": 1, "params": [{"name": "doctype", "required": true}, {"name": "x"}], "kwargs": null, "aliases": ["a.c.f"]}"#;
    let ok = "a.b.f:\n  source: a/b.py:1\n  does: x\n  args:\n    doctype: {kind: \"doctype:read\", cite: c}\n    x: {kind: scalar, cite: c}\n";
    let catalog = Catalog::load(functions, &[("t.yaml", ok)]).unwrap();
    let f = catalog.lookup("a.c.f").unwrap();
    let mut inferred = None;
    assert_eq!(f.reach("x", &mut inferred), Reach::Passed(&ArgKind::Scalar));
    assert_eq!(f.reach("y", &mut inferred), Reach::Dropped);
    assert_eq!(f.reach("ignore_permissions", &mut inferred), Reach::Dropped);
    let missing =
        "a.b.f:\n  source: s\n  does: x\n  args:\n    doctype: {kind: \"doctype:read\", cite: c}\n";
    assert!(Catalog::load(functions, &[("t.yaml", missing)]).is_err());
    let by_alias = ok.replace("a.b.f:", "a.c.f:");
    assert!(Catalog::load(functions, &[("t.yaml", &by_alias)]).is_err());
    let bad_kind = ok.replace("scalar", "sql");
    assert!(Catalog::load(functions, &[("t.yaml", &bad_kind)]).is_err());
}

#[test]
fn an_unreviewed_function_infers_only_judged_kinds() {
    let functions = r#"{"name": "a.b.g", "app": "a", "file": "a/b.py", "line": 1, "params": [{"name": "doctype"}, {"name": "txt"}], "kwargs": "kw", "aliases": []}"#;
    let catalog = Catalog::load(functions, &[]).unwrap();
    let g = catalog.lookup("a.b.g").unwrap();
    let mut inferred = None;
    assert!(matches!(
        g.reach("doctype", &mut inferred),
        Reach::Passed(ArgKind::Doctype(_))
    ));
    assert_eq!(
        g.reach("txt", &mut inferred),
        Reach::Passed(&ArgKind::Unreviewed)
    );
    assert_eq!(g.reach("other", &mut inferred), Reach::Unjudged);
}

#[test]
fn a_doctype_method_route_reaches_its_controller_modules_function() {
    let catalog = Catalog::get();
    let keys = catalog.controller_name("User", "generate_keys").unwrap();
    assert_eq!(keys, "frappe.core.doctype.user.user.generate_keys");
    let console = catalog
        .controller_name("System Console", "execute_code")
        .unwrap();
    assert!(console.ends_with("system_console.system_console.execute_code"));
    assert!(catalog.controller_name("ToDo", "no_such_method").is_none());
    assert!(catalog.has_attr("insert") && !catalog.has_attr("sync_orders_from_shop"));
}
