use super::*;

const HASH: &str = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b";

fn valid() -> String {
    format!(
        r#"
listen: 127.0.0.1:8080
sites:
  erp:
    backends: [http://127.0.0.1:8000]
    site_name: erp.localhost
    service_accounts:
      sync: {{ api_key: k1, api_secret: s1 }}
    timeouts: {{ connect: 500ms, request: 5s }}
  staging:
    backends: [http://127.0.0.1:8001, https://erp.example.com:8443]
    site_name: staging.localhost
    host: staging.example.com
    service_accounts:
      sync: {{ api_key: k2, api_secret: s2 }}
routes:
  - {{ host: staging.gw.example.com, site: staging }}
  - {{ path_prefix: /staging, strip_prefix: true, site: staging }}
clients:
  shop:
    key_id: ek_shop
    secret_sha256: "{HASH}"
    site: erp
    service_account: sync
    extra_sites: {{ staging: sync }}
    allow:
      resources: {{ ToDo: [read, write], "Sales Order": [all] }}
      methods: [frappe.client.get_list, "myapp.api.*"]
"#
    )
}

/// `valid()` with `lines` added to the `erp` site.
fn with_site_lines(lines: &str) -> String {
    valid().replace(
        "    timeouts: { connect: 500ms, request: 5s }\n",
        &format!("    timeouts: {{ connect: 500ms, request: 5s }}\n{lines}"),
    )
}

fn problems(yaml: &str) -> Vec<Problem> {
    match Config::from_yaml(yaml, "test.yaml") {
        Ok(_) => panic!("expected the config to be rejected"),
        Err(e) => e.problems,
    }
}

#[test]
fn a_full_config_loads() {
    let loaded = Config::from_yaml(&valid(), "t").unwrap();
    let c = &loaded.config;
    assert_eq!(c.listen.port(), 8080);
    assert_eq!(c.admin_listen, "127.0.0.1:9090".parse().unwrap());
    assert_eq!(c.sites["erp"].timeouts.connect, Duration::from_millis(500));
    assert_eq!(c.sites["staging"].timeouts.request, Duration::from_secs(30));
    assert_eq!(c.limits.max_body_bytes, ByteSize(100 << 20));
    assert_eq!(
        loaded.secrets[&("erp".to_owned(), "sync".to_owned())].0,
        "s1"
    );
    assert_eq!(c.routes.len(), 2);
}

#[test]
fn unknown_keys_are_errors_with_path_and_line() {
    let yaml = valid().replace(
        "    site_name: erp.localhost\n",
        "    site_name: erp.localhost\n    sitename: typo\n",
    );
    let p = problems(&yaml);
    assert_eq!(p.len(), 1);
    assert!(
        p[0].message.contains("unknown field `sitename`"),
        "{}",
        p[0]
    );
    assert_eq!(p[0].path, "sites.erp");
    assert_eq!(p[0].line, Some(7));
}

#[test]
fn broken_yaml_is_an_error_with_a_line() {
    let p = problems("sites:\n  erp: [unclosed\n");
    assert!(p[0].line.is_some(), "{:?}", p[0]);
}

#[test]
fn env_vars_expand_and_missing_ones_are_named() {
    std::env::set_var("ERPGATE_TEST_SECRET", "from-env");
    let yaml = valid().replace("api_secret: s1", "api_secret: \"${ERPGATE_TEST_SECRET}\"");
    let loaded = Config::from_yaml(&yaml, "t").unwrap();
    assert_eq!(loaded.secrets[&("erp".into(), "sync".into())].0, "from-env");

    let yaml = valid().replace(
        "api_secret: s1",
        "api_secret: \"${ERPGATE_TEST_UNSET_VAR}\"",
    );
    let p = problems(&yaml);
    assert!(
        p[0].message.contains("ERPGATE_TEST_UNSET_VAR is not set"),
        "{}",
        p[0]
    );
}

#[test]
fn secret_files_are_read() {
    let dir = std::env::temp_dir().join(format!("erpgate-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("secret");
    std::fs::write(&file, "file-secret\n").unwrap();
    let yaml = valid().replace(
        "api_secret: s1",
        &format!("api_secret_file: {}", file.display()),
    );
    let loaded = Config::from_yaml(&yaml, "t").unwrap();
    assert_eq!(
        loaded.secrets[&("erp".into(), "sync".into())].0,
        "file-secret"
    );

    let yaml = valid().replace("api_secret: s1", "api_secret_file: /nonexistent/erpgate");
    let p = problems(&yaml);
    assert_eq!(p[0].path, "sites.erp.service_accounts.sync.api_secret_file");
}

#[test]
fn every_dangling_reference_is_reported_with_its_line() {
    let yaml = valid()
        .replace(
            "site: erp\n    service_account: sync",
            "site: nowhere\n    service_account: sync",
        )
        .replace(
            "- { host: staging.gw.example.com, site: staging }",
            "- { host: staging.gw.example.com, site: gone }",
        )
        .replace(
            "extra_sites: { staging: sync }",
            "extra_sites: { staging: nobody }",
        );
    let p = problems(&yaml);
    let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "routes[0].site",
            "clients.shop.service_account",
            "clients.shop.extra_sites.staging"
        ],
        "{p:?}"
    );
    assert!(p[0].message.contains("no site named 'gone'"));
    assert_eq!(p[0].line, Some(17));
    assert!(p[1].message.contains("no site named 'nowhere'"));
    assert!(p[2].message.contains("no service account named 'nobody'"));
}

#[test]
fn bad_values_are_rejected() {
    let cases = [
        (
            "http://127.0.0.1:8000]",
            "http://127.0.0.1:8000/api]",
            "no path",
        ),
        (
            "timeouts: { connect: 500ms",
            "timeouts: { connect: soon",
            "not a duration",
        ),
        (HASH, "abc", "64 hex digits"),
        ("key_id: ek_shop", "key_id: \"ek:shop\"", "without ':'"),
        ("[read, write]", "[read, wrte]", "unknown operation 'wrte'"),
        ("\"myapp.api.*\"", "\"myapp.*.x\"", "is not a method name"),
        (
            "path_prefix: /staging,",
            "path_prefix: /,",
            "matches everything",
        ),
        (
            "listen: 127.0.0.1:8080",
            "listen: nowhere",
            "invalid socket address",
        ),
    ];
    for (from, to, want) in cases {
        let yaml = valid().replace(from, to);
        assert_ne!(yaml, valid(), "{from} not found");
        let p = problems(&yaml);
        assert!(p.iter().any(|p| p.message.contains(want)), "{to}: {p:?}");
    }
}

#[test]
fn sizes() {
    assert_eq!(parse_size("512KiB"), Some(512 * 1024));
    assert_eq!(parse_size("10MB"), Some(10_000_000));
    assert_eq!(parse_size("42"), Some(42));
    assert_eq!(parse_size("1 GiB"), Some(1 << 30));
    assert_eq!(parse_size("lots"), None);
}

#[test]
fn env_expansion() {
    std::env::set_var("ERPGATE_TEST_X", "x");
    assert_eq!(expand_env("a${ERPGATE_TEST_X}b$$c$d").unwrap(), "axb$c$d");
    assert!(expand_env("${ERPGATE_TEST_X").is_err());
}

#[test]
fn the_shipped_gateway_yaml_is_valid() {
    std::env::set_var("ERP_SYNC_API_KEY", "k");
    std::env::set_var("ERP_SYNC_API_SECRET", "s");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.yaml");
    if let Err(e) = Config::load(&path) {
        panic!("{e}");
    }
}

#[test]
fn the_upstream_protocol_is_http1_unless_a_site_asks_for_http2() {
    let loaded = Config::from_yaml(&valid(), "t").unwrap();
    assert_eq!(
        loaded.config.sites["erp"].upstream_protocol,
        UpstreamProtocol::Http1
    );
    let loaded =
        Config::from_yaml(&with_site_lines("    upstream_protocol: http2\n"), "t").unwrap();
    assert_eq!(
        loaded.config.sites["erp"].upstream_protocol,
        UpstreamProtocol::Http2
    );
    assert_eq!(
        loaded.config.sites["staging"].upstream_protocol,
        UpstreamProtocol::Http1
    );
    let p = problems(&with_site_lines("    upstream_protocol: h2\n"));
    assert!(
        p.iter()
            .any(|p| p.path.starts_with("sites.erp") && p.message.contains("unknown variant `h2`")),
        "{p:?}"
    );
}

#[test]
fn resilience_settings_load_with_defaults_and_bad_ones_are_rejected() {
    let loaded = Config::from_yaml(&valid(), "t").unwrap();
    let c = &loaded.config;
    let erp = &c.sites["erp"];
    assert!(erp.breaker.enabled);
    assert_eq!(erp.breaker.consecutive_failures, 5);
    assert_eq!(erp.retry.max_retries, 2);
    assert_eq!(erp.timeouts.total, Duration::from_secs(60));
    assert!(erp
        .retry
        .read_only_methods
        .contains(&"frappe.client.get_list".to_owned()));
    assert_eq!(c.max_in_flight, 64);
    let quota = c.rate_limit.as_ref().expect("a default quota");
    assert_eq!((quota.per_second, quota.burst), (Some(100), Some(200)));
    let unlimited = Config::from_yaml(&format!("rate_limit: null\n{}", valid()), "t").unwrap();
    assert!(unlimited.config.rate_limit.is_none());
    assert_eq!(c.idempotency.ttl, Duration::from_secs(24 * 3600));

    let with = with_site_lines;
    let good = with("    breaker: { consecutive_failures: 3, open_base: 1s, open_max: 10s }\n    retry: { max_retries: 1 }\n");
    assert_ne!(good, valid());
    let loaded = Config::from_yaml(&good, "t").unwrap();
    assert_eq!(
        loaded.config.sites["erp"].breaker.open_max,
        Duration::from_secs(10)
    );

    let cases = [
        (
            with("    breaker: { open_base: 10s, open_max: 1s }\n"),
            "sites.erp.breaker",
            "at most open_max",
        ),
        (
            with("    breaker: { failure_rate: { threshold: 1.5 } }\n"),
            "sites.erp.breaker.failure_rate",
            "threshold must be in (0, 1]",
        ),
        (
            with("    retry: { backoff_base: 0ms }\n"),
            "sites.erp.retry",
            "backoff_base must be more than 0",
        ),
        (
            with("    retry: { max_retriez: 1 }\n"),
            "sites.erp.retry",
            "unknown field",
        ),
        (
            format!(
                "rate_limit: {{ per_second: 5, per_minute: 5 }}\n{}",
                valid()
            ),
            "rate_limit",
            "exactly one of per_second and per_minute",
        ),
        (
            valid().replace(
                "    service_account: sync\n    extra_sites",
                "    service_account: sync\n    rate_limit: { per_second: 0 }\n    extra_sites",
            ),
            "clients.shop.rate_limit",
            "at least 1",
        ),
        (
            format!("max_in_flight: 0\n{}", valid()),
            "max_in_flight",
            "at least 1",
        ),
    ];
    for (yaml, path, want) in cases {
        assert_ne!(yaml, valid());
        let p = problems(&yaml);
        assert!(
            p.iter()
                .any(|p| p.path.starts_with(path) && p.message.contains(want)),
            "{path}: {p:?}"
        );
    }
}

#[test]
fn cache_and_webhook_settings_load_and_bad_ones_are_rejected() {
    let cache = "cache:\n  max_bytes: 64MiB\n  rules:\n    - { doctype: Item, reads: [list], ttl: 60s, stale_if_error: 5m }\n    - { method: frappe.client.get_count, ttl: 30s, sites: [erp] }\n";
    let webhook = "    webhook: { secret: whs }\n";
    let with = |cache: &str, webhook: &str| with_site_lines(webhook) + cache;
    let loaded = Config::from_yaml(&with(cache, webhook), "t").unwrap();
    let c = &loaded.config.cache;
    assert_eq!(c.max_bytes, ByteSize(64 << 20));
    assert_eq!(c.max_entry_bytes, ByteSize(1 << 20));
    assert_eq!(c.rules[0].reads, vec![CacheReads::List]);
    assert_eq!(c.rules[0].stale_if_error, Duration::from_secs(300));
    assert_eq!(
        c.rules[1].reads,
        vec![CacheReads::List, CacheReads::Document]
    );
    assert_eq!(loaded.webhook_secrets["erp"].0, "whs");
    // The secret never prints.
    let debug = format!("{:?}", loaded.config.sites["erp"].webhook);
    assert!(!debug.contains("whs"), "{debug}");
    // No cache section: no rules.
    assert!(Config::from_yaml(&valid(), "t")
        .unwrap()
        .config
        .cache
        .rules
        .is_empty());

    let cases = [
        (
            with("cache:\n  rules:\n    - { ttl: 60s }\n", ""),
            "cache.rules[0]",
            "exactly one of doctype and method",
        ),
        (
            with(
                "cache:\n  rules:\n    - { doctype: Item, method: x.y, ttl: 60s }\n",
                "",
            ),
            "cache.rules[0]",
            "exactly one",
        ),
        (
            with("cache:\n  rules:\n    - { doctype: Item, ttl: 0s }\n", ""),
            "cache.rules[0].ttl",
            "more than 0",
        ),
        (
            with(
                "cache:\n  rules:\n    - { doctype: Item, ttl: 1s, sites: [nope] }\n",
                "",
            ),
            "cache.rules[0].sites",
            "unknown site 'nope'",
        ),
        (
            with(
                "cache:\n  rules:\n    - { method: \"x..y\", ttl: 1s }\n",
                "",
            ),
            "cache.rules[0].method",
            "not a method name",
        ),
        (
            with(
                "cache:\n  rules:\n    - { doctype: Item, ttl: 1s, reads: [all] }\n",
                "",
            ),
            "cache.rules[0]",
            "unknown variant",
        ),
        (
            with("cache:\n  max_bytes: 1MiB\n  max_entry_bytes: 2MiB\n", ""),
            "cache.max_entry_bytes",
            "at most cache.max_bytes",
        ),
        (
            with("", "    webhook: { secret: a, secret_file: /x }\n"),
            "sites.erp.webhook",
            "exactly one of secret and secret_file",
        ),
        (
            with("", "    webhook: { secret: \"\" }\n"),
            "sites.erp.webhook",
            "empty",
        ),
    ];
    for (yaml, path, want) in cases {
        let p = problems(&yaml);
        assert!(
            p.iter()
                .any(|p| p.path.starts_with(path) && p.message.contains(want)),
            "{path}: {p:?}"
        );
    }
}

#[test]
fn operations_settings_load_and_bad_ones_are_rejected() {
    let c = Config::from_yaml(&valid(), "t").unwrap().config;
    assert!(c.tls.is_none());
    assert!(!c.reload.watch);
    assert_eq!(c.reload.interval, Duration::from_secs(2));
    assert_eq!(c.limits.drain_delay, Duration::ZERO);
    let yaml = format!(
        "reload: {{ watch: true, interval: 500ms }}\nlimits: {{ drain_delay: 5s }}\n{}",
        valid()
    );
    let loaded = Config::from_yaml(&yaml, "t").unwrap();
    assert!(loaded.config.reload.watch);
    assert_eq!(loaded.config.limits.drain_delay, Duration::from_secs(5));
    // The hash follows the text.
    assert_eq!(loaded.hash.len(), 16);
    assert_ne!(loaded.hash, Config::from_yaml(&valid(), "t").unwrap().hash);

    let p = problems(&format!(
        "tls: {{ cert_file: /nonexistent/cert.pem, key_file: /nonexistent/key.pem }}\n{}",
        valid()
    ));
    assert!(p.iter().any(|p| p.path == "tls.cert_file"), "{p:?}");
    assert!(p.iter().any(|p| p.path == "tls.key_file"), "{p:?}");
    let p = problems(&format!(
        "reload: {{ watch: true, every: 1s }}\n{}",
        valid()
    ));
    assert!(
        p.iter().any(|p| p.message.contains("unknown field")),
        "{p:?}"
    );
}

#[test]
fn query_argument_checks_are_on_unless_a_client_turns_them_off() {
    let loaded = Config::from_yaml(&valid(), "t").unwrap();
    let allow = loaded.config.clients["shop"].allow.as_ref().unwrap();
    assert!(allow.check_query_arguments);
    let off = valid().replace(
        "      methods: [frappe.client.get_list, \"myapp.api.*\"]\n",
        "      methods: [frappe.client.get_list, \"myapp.api.*\"]\n      check_query_arguments: false\n",
    );
    let loaded = Config::from_yaml(&off, "t").unwrap();
    assert!(
        !loaded.config.clients["shop"]
            .allow
            .as_ref()
            .unwrap()
            .check_query_arguments
    );
    let bad = off.replace(
        "check_query_arguments: false",
        "check_query_arguments: maybe",
    );
    assert!(!problems(&bad).is_empty());
}

#[test]
fn connection_limits_and_the_admin_token_load_with_defaults() {
    let loaded = Config::from_yaml(&valid(), "t").unwrap();
    let limits = &loaded.config.limits;
    assert_eq!(limits.max_connections, 10_000);
    assert_eq!(limits.idle_timeout, Duration::from_secs(60));
    assert_eq!(limits.http2_max_concurrent_streams, 100);
    assert!(loaded.config.admin_token.is_none());
    let set = format!(
        "admin_token: tok\nlimits: {{ max_connections: 5, idle_timeout: 2s }}\n{}",
        valid()
    );
    let loaded = Config::from_yaml(&set, "t").unwrap();
    assert_eq!(loaded.config.limits.max_connections, 5);
    assert_eq!(loaded.config.admin_token.as_ref().unwrap().0, "tok");
    assert!(!format!("{:?}", loaded.config.admin_token).contains("tok"));
    assert!(!problems(&format!("limits: {{ max_connections: lots }}\n{}", valid())).is_empty());
}

#[test]
fn shared_state_settings_load_with_defaults_and_bad_ones_are_rejected() {
    assert!(Config::from_yaml(&valid(), "t")
        .unwrap()
        .config
        .shared_state
        .is_none());
    let dir = std::env::temp_dir().join(format!("erpgate-redis-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("password");
    std::fs::write(&file, "from-a-file\n").unwrap();
    let yaml = format!(
        "shared_state:\n  redis: {{ url: \"rediss://redis.example:6380/2\", username: gw, password_file: {} }}\n{}",
        file.display(),
        valid()
    );
    let loaded = Config::from_yaml(&yaml, "t").unwrap();
    let redis = &loaded.config.shared_state.as_ref().unwrap().redis;
    assert_eq!(redis.key_prefix, "erpgate:");
    assert_eq!(redis.command_timeout, Duration::from_millis(250));
    assert_eq!(redis.connect_timeout, Duration::from_secs(1));
    assert_eq!(redis.idempotency_when_unavailable, WhenUnavailable::Refuse);
    assert!(!redis.readyz_requires_redis);
    assert_eq!(loaded.config.shared_state.as_ref().unwrap().quota_batch, 1);
    assert_eq!(loaded.redis_password.as_ref().unwrap().0, "from-a-file");
    // The password never prints.
    assert!(!format!("{loaded:?}").contains("from-a-file"));

    for (redis, expect) in [
        ("{ url: \"http://redis:6379\" }", "redis:// or rediss://"),
        (
            "{ url: \"redis://user:pw@redis:6379\" }",
            "must not carry credentials",
        ),
        ("{ url: \"redis://\" }", "has no host"),
        ("{ url: \"redis://r\", db: 2 }", "unknown field"),
        (
            "{ url: \"redis://r\", idempotency_when_unavailable: maybe }",
            "unknown variant",
        ),
    ] {
        let p = problems(&format!("shared_state:\n  redis: {redis}\n{}", valid()));
        assert!(
            p.iter().any(|p| p.message.contains(expect)),
            "{redis}: {p:?}"
        );
    }
    for (redis, path) in [
        (
            "{ url: \"redis://r\", password: a, password_file: /x }".to_owned(),
            "shared_state.redis",
        ),
        (
            "{ url: \"redis://r\", password_file: /nonexistent/pw }".to_owned(),
            "shared_state.redis.password_file",
        ),
        (
            "{ url: \"redis://r\", key_prefix: \"\" }".to_owned(),
            "shared_state.redis.key_prefix",
        ),
        (
            "{ url: \"redis://r\", command_timeout: 0s }".to_owned(),
            "shared_state.redis.command_timeout",
        ),
    ] {
        let p = problems(&format!("shared_state:\n  redis: {redis}\n{}", valid()));
        assert!(p.iter().any(|p| p.path == path), "{redis}: {p:?}");
    }
    for batch in [0, 1001] {
        let p = problems(&format!(
            "shared_state:\n  quota_batch: {batch}\n  redis: {{ url: \"redis://r\" }}\n{}",
            valid()
        ));
        assert!(
            p.iter().any(|p| p.path == "shared_state.quota_batch"),
            "{batch}: {p:?}"
        );
    }
}

#[test]
fn cors_is_off_by_default_and_its_origins_and_headers_are_checked() {
    let loaded = Config::from_yaml(&valid(), "t").unwrap();
    assert!(loaded.config.cors.is_none());
    let yaml = format!(
        "cors: {{ allowed_origins: [\"https://app.example\"] }}\n{}",
        valid()
    );
    let cors = Config::from_yaml(&yaml, "t").unwrap().config.cors.unwrap();
    assert_eq!(cors.max_age, Duration::from_secs(600));
    assert!(cors.allow_credentials);
    assert!(cors.allowed_headers.iter().any(|h| h == "idempotency-key"));
    assert!(cors
        .exposed_headers
        .iter()
        .any(|h| h == "x-ratelimit-remaining"));

    for (cors, path, expect) in [
        (
            "{ allowed_origins: [\"*\"] }",
            "cors.allowed_origins",
            "wildcards",
        ),
        (
            "{ allowed_origins: [\"https://a.example/\"] }",
            "cors.allowed_origins",
            "without a path",
        ),
        (
            "{ allowed_origins: [\"a.example\"] }",
            "cors.allowed_origins",
            "https://",
        ),
        (
            "{ allowed_headers: [\"*\"] }",
            "cors.allowed_headers",
            "no wildcards",
        ),
        (
            "{ exposed_headers: [\"bad header\"] }",
            "cors.exposed_headers",
            "not a header",
        ),
        ("{ preflight_burst: 0 }", "cors", "at least 1"),
        ("{ max_age: 2d }", "cors.max_age", "at most 24h"),
    ] {
        let p = problems(&format!("cors: {cors}\n{}", valid()));
        assert!(
            p.iter()
                .any(|p| p.path == path && p.message.contains(expect)),
            "{cors}: {p:?}"
        );
    }
    // A client's own origins need the section, and are checked like the default ones.
    let with_origins = valid().replace(
        "    service_account: sync\n",
        "    service_account: sync\n    allowed_origins: [\"https://*.example\"]\n",
    );
    let p = problems(&with_origins);
    assert!(
        p.iter()
            .any(|p| p.message.contains("needs the top-level cors")),
        "{p:?}"
    );
    let p = problems(&format!("cors: {{}}\n{with_origins}"));
    assert!(p.iter().any(|p| p.message.contains("wildcards")), "{p:?}");
}

#[test]
fn compression_is_on_by_default_and_its_settings_are_checked() {
    let c = Config::from_yaml(&valid(), "t").unwrap().config.compression;
    assert!(c.enabled);
    assert_eq!(
        c.encodings,
        vec![ContentCoding::Zstd, ContentCoding::Br, ContentCoding::Gzip]
    );
    assert_eq!(c.min_bytes, ByteSize(1024));
    for (compression, expect) in [
        ("{ encodings: [] }", "at least one encoding"),
        ("{ encodings: [deflate] }", "unknown variant"),
        ("{ types: [\"json\"] }", "not a media type"),
        ("{ types: [\"*/*\"] }", "not a media type"),
        ("{ level: 11 }", "expected one of `fastest`"),
    ] {
        let p = problems(&format!("compression: {compression}\n{}", valid()));
        assert!(
            p.iter().any(|p| p.message.contains(expect)),
            "{compression}: {p:?}"
        );
    }
}

#[test]
fn tracing_is_off_by_default_and_its_settings_are_checked() {
    assert!(Config::from_yaml(&valid(), "t")
        .unwrap()
        .config
        .tracing
        .is_none());
    std::env::set_var("ERPGATE_TEST_OTLP_KEY", "key-from-env");
    let yaml = format!(
        "tracing: {{ endpoint: \"http://collector:4318\", headers: {{ x-api-key: \"${{ERPGATE_TEST_OTLP_KEY}}\" }} }}\n{}",
        valid()
    );
    let loaded = Config::from_yaml(&yaml, "t").unwrap();
    let tracing = loaded.config.tracing.as_ref().unwrap();
    assert_eq!(tracing.sample_ratio, 1.0);
    assert_eq!(tracing.service_name, "erpgate");
    assert_eq!(tracing.export_interval, Duration::from_secs(5));
    assert_eq!(tracing.max_queue_size, 2048);
    assert_eq!(tracing.headers["x-api-key"].0, "key-from-env");
    // Header values may be credentials: they never print.
    assert!(!format!("{loaded:?}").contains("key-from-env"));
    for (tracing, path) in [
        ("{ endpoint: \"collector:4318\" }", "tracing.endpoint"),
        ("{ endpoint: \"ftp://c\" }", "tracing.endpoint"),
        (
            "{ endpoint: \"http://c\", sample_ratio: 1.5 }",
            "tracing.sample_ratio",
        ),
        (
            "{ endpoint: \"http://c\", max_queue_size: 0 }",
            "tracing.max_queue_size",
        ),
        ("{ endpoint: \"http://c\", export_interval: 0s }", "tracing"),
        (
            "{ endpoint: \"http://c\", headers: { \"bad name\": x } }",
            "tracing.headers.bad name",
        ),
    ] {
        let p = problems(&format!("tracing: {tracing}\n{}", valid()));
        assert!(p.iter().any(|p| p.path == path), "{tracing}: {p:?}");
    }
    let p = problems(&format!(
        "tracing: {{ endpoint: \"http://c\", protocol: grpc }}\n{}",
        valid()
    ));
    assert!(
        p.iter().any(|p| p.message.contains("unknown field")),
        "{p:?}"
    );
}

#[test]
fn oauth_apps_and_public_routes_are_checked() {
    let yaml = format!(
        "{}oauth_apps:\n  mobile: {{ site: erp, client_id: abc123 }}\n",
        valid()
    );
    let loaded = Config::from_yaml(&yaml, "t").unwrap();
    let app = &loaded.config.oauth_apps["mobile"];
    assert_eq!(app.introspection_ttl, Duration::from_secs(30));
    assert!(app.per_user_rate_limit.is_none());
    assert_eq!(loaded.config.oauth_token_cache_bytes, ByteSize(4 << 20));

    for (apps, path) in [
        (
            "  a: { site: nowhere, client_id: x }\n",
            "oauth_apps.a.site",
        ),
        (
            "  a: { site: erp, client_id: \"\" }\n",
            "oauth_apps.a.client_id",
        ),
        (
            "  a: { site: erp, client_id: x }\n  b: { site: erp, client_id: x }\n",
            "oauth_apps.b.client_id",
        ),
        ("  shop: { site: erp, client_id: x }\n", "oauth_apps.shop"),
        (
            "  a: { site: erp, client_id: x, introspection_ttl: 2h }\n",
            "oauth_apps.a.introspection_ttl",
        ),
        (
            "  a: { site: erp, client_id: x, max_in_flight: 0 }\n",
            "oauth_apps.a.max_in_flight",
        ),
        (
            "  a: { site: erp, client_id: x, allow: { resources: { ToDo: [fly] } } }\n",
            "oauth_apps.a.allow.resources.ToDo",
        ),
    ] {
        let p = problems(&format!("{}oauth_apps:\n{apps}", valid()));
        assert!(p.iter().any(|p| p.path == path), "{apps}: {p:?}");
    }
    let public = |section: &str| {
        valid().replace(
            "    timeouts: {{ connect: 500ms, request: 5s }}\n"
                .replace("{{", "{")
                .replace("}}", "}")
                .as_str(),
            &format!("    timeouts: {{ connect: 500ms, request: 5s }}\n    public: {section}\n"),
        )
    };
    let ok = Config::from_yaml(
        &public("{ methods: [frappe.integrations.oauth2.get_token], paths: [/.well-known/openid-configuration] }"),
        "t",
    )
    .unwrap();
    assert_eq!(
        ok.config.sites["erp"].public.as_ref().unwrap().per_minute,
        120
    );
    for (section, expect) in [
        ("{ methods: [\"frappe.*\"] }", "exact method name"),
        ("{ paths: [\"/a//b\"] }", "canonical path"),
        ("{ burst: 0 }", "at least 1"),
    ] {
        let p = problems(&public(section));
        assert!(
            p.iter().any(|p| p.message.contains(expect)),
            "{section}: {p:?}"
        );
    }
}

/// `valid()` with a subscription on the `shop` client and `events` appended.
fn with_subscription(subscription: &str, events: &str) -> String {
    valid().replace(
        "    extra_sites: { staging: sync }\n",
        &format!("    extra_sites: {{ staging: sync }}\n    subscriptions:\n      orders: {subscription}\n"),
    ) + events
}

#[test]
fn subscriptions_and_the_event_relay_are_checked() {
    let good = "{ url: \"https://hooks.example.com/erp\", doctypes: [ToDo], events: [on_update], secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw }";
    let loaded = Config::from_yaml(
        &with_subscription(good, "events: { directory: /tmp/erpgate-events-test }\n"),
        "t",
    )
    .unwrap();
    let events = loaded.config.events.as_ref().unwrap();
    assert_eq!(events.retry_for, Duration::from_secs(24 * 3600));
    assert_eq!(events.max_pending_per_subscription, 10_000);
    assert_eq!(
        loaded.config.clients["shop"].subscriptions["orders"].timeout,
        Duration::from_secs(10)
    );
    assert!(loaded
        .subscription_secrets
        .contains_key(&("shop".to_owned(), "orders".to_owned())));

    let cases = [
        // Subscriptions without the relay, and the relay without a store.
        (
            with_subscription(good, ""),
            "clients.shop.subscriptions.orders",
        ),
        (with_subscription(good, "events: {}\n"), "events.directory"),
        // A secret that is not a Standard Webhooks secret.
        (
            with_subscription(
                "{ url: \"https://h.example.com/\", doctypes: [ToDo], secret: plain-text }",
                "events: { directory: /tmp/x }\n",
            ),
            "clients.shop.subscriptions.orders.secret",
        ),
        // An event Frappe has not.
        (
            with_subscription(
                &good.replace("on_update", "on_save"),
                "events: { directory: /tmp/x }\n",
            ),
            "clients.shop.subscriptions.orders.events",
        ),
        // Not an http(s) URL.
        (
            with_subscription(
                &good.replace("https://hooks.example.com/erp", "ftp://x/"),
                "events: { directory: /tmp/x }\n",
            ),
            "clients.shop.subscriptions.orders.url",
        ),
        (
            with_subscription(
                &good.replace("[ToDo]", "[]"),
                "events: { directory: /tmp/x }\n",
            ),
            "clients.shop.subscriptions.orders.doctypes",
        ),
    ];
    // A client without allow rules: erpgate could not know what it may read.
    let unrestricted = with_subscription(good, "events: { directory: /tmp/x }\n").replace(
        "    allow:\n      resources: { ToDo: [read, write], \"Sales Order\": [all] }\n      methods: [frappe.client.get_list, \"myapp.api.*\"]\n",
        "",
    );
    assert!(!unrestricted.contains("allow:"));
    let cases = cases
        .into_iter()
        .chain([(unrestricted, "clients.shop.subscriptions.orders")]);
    for (yaml, path) in cases {
        let found = problems(&yaml);
        assert!(
            found.iter().any(|p| p.path == path),
            "{path} not reported: {found:?}"
        );
    }
    // Unknown keys are refused.
    let typo = with_subscription(
        &good.replace("doctypes", "doctype"),
        "events: { directory: /tmp/x }\n",
    );
    assert!(Config::from_yaml(&typo, "t").is_err());
    let typo = with_subscription(good, "events: { directroy: /tmp/x }\n");
    assert!(Config::from_yaml(&typo, "t").is_err());
}

#[test]
fn the_request_head_limit_is_8kib_to_1mib() {
    let loaded = Config::from_yaml(&valid(), "t").unwrap();
    assert_eq!(loaded.config.limits.max_request_head_bytes.0, 8 << 10);
    for size in ["4KiB", "2MiB"] {
        let yaml = format!("{}limits: {{ max_request_head_bytes: {size} }}\n", valid());
        let found = problems(&yaml);
        assert!(
            found
                .iter()
                .any(|p| p.path == "limits.max_request_head_bytes"),
            "{size}: {found:?}"
        );
    }
}

#[test]
fn a_backend_url_with_credentials_is_refused_without_echoing_them() {
    let yaml = valid().replace(
        "backends: [http://127.0.0.1:8000]",
        "backends: [\"https://admin:hunter2@erp.example.com\"]",
    );
    let found = problems(&yaml);
    let problem = found
        .iter()
        .find(|p| p.message.contains("credentials"))
        .unwrap_or_else(|| panic!("{found:?}"));
    assert!(!problem.message.contains("hunter2"), "{}", problem.message);
}

#[test]
fn the_buffering_budget_has_defaults_and_takes_sizes_and_a_share() {
    let loaded = Config::from_yaml(&valid(), "t").unwrap();
    let b = &loaded.config.buffering;
    assert_eq!(b.max_memory, ByteSize(256 << 20));
    assert_eq!(b.max_disk, ByteSize(4 << 30));
    assert_eq!(b.max_client_share, 0.25);

    let yaml = valid() + "buffering: { max_memory: 64KiB, max_disk: 1GB, max_client_share: 1 }\n";
    let loaded = Config::from_yaml(&yaml, "t").unwrap();
    let b = &loaded.config.buffering;
    assert_eq!(b.max_memory, ByteSize(64 << 10));
    assert_eq!(b.max_disk, ByteSize(1_000_000_000));
    assert_eq!(b.max_client_share, 1.0);
}

#[test]
fn a_buffering_share_outside_0_to_1_or_a_bad_size_is_refused() {
    for share in ["0", "-0.5", "1.5", ".nan"] {
        let p = problems(&(valid() + &format!("buffering: {{ max_client_share: {share} }}\n")));
        assert_eq!(p.len(), 1, "{share}: {p:?}");
        assert_eq!(p[0].path, "buffering.max_client_share", "{share}");
        assert!(p[0].message.contains("at most 1"), "{}", p[0].message);
    }
    let p = problems(&(valid() + "buffering: { max_disk: lots }\n"));
    assert!(p[0].message.contains("not a size"), "{}", p[0].message);
    let p = problems(&(valid() + "buffering: { max_share: 0.5 }\n"));
    assert!(
        p[0].message.contains("unknown field `max_share`"),
        "{}",
        p[0].message
    );
}

/// Every setting that names a file, a directory, a URL or an address expands `${ENV}` as the
/// others do: this walks the config types' source, so a new such setting without expansion
/// fails here (a `Backend` expands in its own `Deserialize`).
#[test]
fn every_path_and_url_setting_expands_env() {
    let source = include_str!("types.rs");
    let lines: Vec<&str> = source.lines().collect();
    let mut unexpanded = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let line = line.trim();
        let Some(field) = line.strip_prefix("pub ") else {
            continue;
        };
        let Some((name, ty)) = field.split_once(": ") else {
            continue;
        };
        let path_like = ty.contains("PathBuf")
            || ty.contains("SocketAddr")
            || ty.contains("RedisUrl")
            || name.ends_with("_file")
            || name.ends_with("directory")
            || name == "url"
            || name == "endpoint"
            || name == "public_url";
        if !path_like || ty.contains("Backend") || ty.trim_end_matches(',').ends_with(" {") {
            continue;
        }
        // The attribute lines above the field (doc comments in between).
        let attributes: Vec<&str> = lines[..i]
            .iter()
            .rev()
            .map(|l| l.trim())
            .take_while(|l| {
                l.starts_with("#[") || l.starts_with("///") || l.ends_with(')') || l.ends_with(',')
            })
            .collect();
        if !attributes.iter().any(|a| a.contains("parse_env")) {
            unexpanded.push(format!("types.rs:{}: {name}", i + 1));
        }
    }
    assert!(
        unexpanded.is_empty(),
        "settings without ${{ENV}}: {unexpanded:?}"
    );

    std::env::set_var("ERPGATE_TEST_SPOOL", "/tmp/erpgate-test-spool");
    let yaml = valid().replace(
        "listen: 127.0.0.1:8080\n",
        "listen: 127.0.0.1:8080\nbuffering: { directory: \"${ERPGATE_TEST_SPOOL}/buffers\" }\nevents: { directory: \"${ERPGATE_TEST_SPOOL}/events\" }\n",
    );
    let config: Config = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(
        config.buffering.directory.as_deref(),
        Some(std::path::Path::new("/tmp/erpgate-test-spool/buffers"))
    );
    assert_eq!(
        config.events.as_ref().and_then(|e| e.directory.as_deref()),
        Some(std::path::Path::new("/tmp/erpgate-test-spool/events"))
    );
}

#[test]
fn route_timeouts_and_method_matchers_load_and_bad_ones_are_rejected() {
    let with_route = |route: &str| valid().replace("clients:\n", &format!("{route}clients:\n"));
    let good = with_route(
        "  - methods: [frappe.desk.query_report.run]\n    site: erp\n    timeouts: { request: 2m, total: 150s }\n    retry: { max_retries: 1 }\n",
    );
    let loaded = Config::from_yaml(&good, "t").unwrap();
    let route = &loaded.config.routes[2];
    let timeouts = route.timeouts.as_ref().unwrap();
    assert_eq!(timeouts.request, Some(Duration::from_secs(120)));
    assert_eq!(timeouts.total, Some(Duration::from_secs(150)));
    assert_eq!(route.retry.as_ref().unwrap().max_retries, 1);
    // A total shorter than the site's request timeout caps it; both given must agree.
    Config::from_yaml(
        &with_route("  - { path_prefix: /api/method/x, site: erp, timeouts: { total: 1s } }\n"),
        "t",
    )
    .unwrap();

    let cases = [
        (
            with_route("  - { methods: [a.b], site: erp, timeouts: { requests: 1s } }\n"),
            "routes[2].timeouts",
            "unknown field `requests`",
        ),
        (
            with_route("  - { methods: [a.b], site: erp, retry: { max_retries: 1, backoff_base: 1s } }\n"),
            "routes[2].retry",
            "unknown field `backoff_base`",
        ),
        (
            with_route("  - { methods: [a.b], site: erp, timeouts: { total: soon } }\n"),
            "routes[2].timeouts",
            "is not a duration",
        ),
        (
            with_route("  - { methods: [a.b], site: erp, timeouts: { request: 3m, total: 2m } }\n"),
            "routes[2].timeouts",
            "longer than total",
        ),
        (
            with_route("  - { methods: [a.b], site: erp, timeouts: { total: 0s } }\n"),
            "routes[2].timeouts",
            "more than 0",
        ),
        (
            with_route("  - { methods: [a.b], site: erp, timeouts: { total: 2h } }\n"),
            "routes[2].timeouts.total",
            "at most 1h",
        ),
        (
            with_route("  - { methods: [], site: erp }\n"),
            "routes[2].methods",
            "at least one method",
        ),
        (
            with_route("  - { methods: [\"a.*\"], site: erp }\n"),
            "routes[2].methods",
            "not a method name",
        ),
        (
            with_route("  - { path_prefix: /x, strip_prefix: true, methods: [a.b], site: erp }\n"),
            "routes[2].strip_prefix",
            "cannot strip",
        ),
        (
            with_route("  - { methods: [a.b], site: erp }\n  - { path_prefix: /x, strip_prefix: true, site: erp }\n"),
            "routes[3].strip_prefix",
            "must come before every route with methods (routes[2]",
        ),
    ];
    for (yaml, path, want) in cases {
        let p = problems(&yaml);
        assert!(
            p.iter()
                .any(|p| p.path.starts_with(path) && p.message.contains(want)),
            "{path}: {p:?}"
        );
    }
}

#[test]
fn openapi_public_url_is_an_absolute_url_and_the_ttl_positive() {
    let found = problems(&format!(
        "{}openapi: {{ public_url: \"api.example.com\", metadata_ttl: 0s }}\n",
        valid()
    ));
    let keys: Vec<&str> = found.iter().map(|p| p.path.as_str()).collect();
    assert!(keys.contains(&"openapi.public_url"), "{keys:?}");
    assert!(keys.contains(&"openapi.metadata_ttl"), "{keys:?}");
    let loaded = Config::from_yaml(
        &format!(
            "{}openapi: {{ public_url: \"https://api.example.com\" }}\n",
            valid()
        ),
        "t",
    )
    .unwrap();
    assert_eq!(
        loaded.config.openapi.public_url.as_deref(),
        Some("https://api.example.com")
    );
}
