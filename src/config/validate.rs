//! Validation: what serde cannot check (references between sites, routes and clients, secret
//! files, key formats), every problem reported at once with its key path and line.

use super::*;

/// The longest `routes[].timeouts.total`: a request held open longer than this holds a client's
/// in-flight slot, an upstream connection and a gunicorn worker for work that belongs in a
/// background job.
const MAX_ROUTE_TIMEOUT: Duration = Duration::from_secs(3600);

impl Config {
    /// Checks everything serde cannot, collecting every problem.
    pub fn validate(self, lines: &YamlLines) -> Result<LoadedConfig, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut problem = |path: String, message: String| {
            let line = lines.line_of(&path);
            problems.push(Problem {
                path,
                line,
                message,
            });
        };
        let mut secrets = IndexMap::new();
        let mut webhook_secrets = IndexMap::new();

        if self.sites.is_empty() {
            problem("sites".into(), "at least one site is required".into());
        }
        if self.auth_failures.per_minute == 0 || self.auth_failures.burst == 0 {
            problem(
                "auth_failures".into(),
                "per_minute and burst must be at least 1".into(),
            );
        }
        let share = self.buffering.max_client_share;
        if !(share > 0.0 && share <= 1.0) {
            problem(
                "buffering.max_client_share".into(),
                format!(
                    "must be more than 0 and at most 1 (a fraction of the budget), not {share}"
                ),
            );
        }
        if self.limits.max_body_bytes.0 == 0 {
            problem("limits.max_body_bytes".into(), "must be more than 0".into());
        }
        // hyper's read buffer cannot be smaller (it asserts so).
        if !(8 << 10..=1 << 20).contains(&self.limits.max_request_head_bytes.0) {
            problem(
                "limits.max_request_head_bytes".into(),
                "must be 8KiB to 1MiB".into(),
            );
        }
        if self.limits.max_inspected_body_bytes.0 > self.limits.max_body_bytes.0 {
            problem(
                "limits.max_inspected_body_bytes".into(),
                "must not exceed limits.max_body_bytes".into(),
            );
        }

        for (site_name, site) in &self.sites {
            let at = format!("sites.{site_name}");
            if site.backends.is_empty() {
                problem(
                    format!("{at}.backends"),
                    "at least one backend is required".into(),
                );
            }
            if site.site_name.0.is_empty()
                || http::HeaderValue::try_from(&site.site_name.0).is_err()
            {
                problem(
                    format!("{at}.site_name"),
                    "must be a non-empty header-safe name".into(),
                );
            }
            if let Some(host) = &site.host {
                if host.0.is_empty() || http::HeaderValue::try_from(&host.0).is_err() {
                    problem(
                        format!("{at}.host"),
                        "must be a non-empty header-safe host".into(),
                    );
                }
            }
            if let Some(public) = &site.public {
                for method in &public.methods {
                    let valid = !method.is_empty()
                        && method
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
                    if !valid {
                        problem(
                            format!("{at}.public.methods"),
                            format!("'{method}' is not an exact method name"),
                        );
                    }
                }
                for path in &public.paths {
                    let canonical = CanonicalPath::parse(path).map(|p| p.encode());
                    if canonical.as_deref() != Ok(path.as_str()) {
                        problem(
                            format!("{at}.public.paths"),
                            format!("'{path}' is not an exact, canonical path"),
                        );
                    }
                }
                if public.per_minute == 0 || public.burst == 0 {
                    problem(
                        format!("{at}.public"),
                        "per_minute and burst must be at least 1".into(),
                    );
                }
            }
            let t = &site.timeouts;
            if t.connect.is_zero() || t.request.is_zero() || t.total.is_zero() {
                problem(
                    format!("{at}.timeouts"),
                    "timeouts must be more than 0".into(),
                );
            }
            let b = &site.breaker;
            if b.open_base.is_zero() || b.open_max < b.open_base {
                problem(
                    format!("{at}.breaker"),
                    "open_base must be more than 0 and at most open_max".into(),
                );
            }
            if let Some(rate) = &b.failure_rate {
                let ok = rate.threshold > 0.0
                    && rate.threshold <= 1.0
                    && rate.window.as_secs() > 0
                    && rate.min_requests > 0;
                if !ok {
                    problem(
                        format!("{at}.breaker.failure_rate"),
                        "threshold must be in (0, 1], window at least 1s, min_requests at least 1"
                            .into(),
                    );
                }
            }
            let r = &site.retry;
            if r.backoff_base.is_zero() || r.backoff_max < r.backoff_base {
                problem(
                    format!("{at}.retry"),
                    "backoff_base must be more than 0 and at most backoff_max".into(),
                );
            }
            if r.budget_percent > 1000 {
                problem(
                    format!("{at}.retry.budget_percent"),
                    "must be at most 1000".into(),
                );
            }
            if let Some(ca) = &site.ca_file {
                if let Err(e) = std::fs::read(ca) {
                    problem(
                        format!("{at}.ca_file"),
                        format!("cannot read {}: {e}", ca.display()),
                    );
                }
            }
            if site.service_accounts.is_empty() {
                problem(
                    format!("{at}.service_accounts"),
                    "at least one service account is required".into(),
                );
            }
            for (account_name, account) in &site.service_accounts {
                let at = format!("{at}.service_accounts.{account_name}");
                let secret = inline_or_file(
                    &at,
                    ("api_secret", account.api_secret.as_ref()),
                    ("api_secret_file", account.api_secret_file.as_deref()),
                );
                let secret = match secret {
                    Ok(secret) => secret,
                    Err((path, message)) => {
                        problem(path, message);
                        continue;
                    }
                };
                let key_ok =
                    !account.api_key.0.is_empty() && !account.api_key.0.contains([':', ' ']);
                if !key_ok {
                    problem(
                        format!("{at}.api_key"),
                        "must be non-empty, without ':' or spaces".into(),
                    );
                } else if secret.is_empty()
                    || crate::frappe::auth_header::token_header(&account.api_key.0, &secret)
                        .is_err()
                {
                    // The secret itself is never echoed.
                    problem(
                        format!("{at}.api_secret"),
                        "is empty or has characters a header cannot carry".into(),
                    );
                } else {
                    secrets.insert((site_name.clone(), account_name.clone()), Secret(secret));
                }
            }
            if let Some(webhook) = &site.webhook {
                let at = format!("{at}.webhook");
                let secret = inline_or_file(
                    &at,
                    ("secret", webhook.secret.as_ref()),
                    ("secret_file", webhook.secret_file.as_deref()),
                );
                match secret {
                    Ok(s) if s.is_empty() => problem(at, "the secret is empty".into()),
                    Ok(s) => {
                        webhook_secrets.insert(site_name.clone(), Secret(s));
                    }
                    Err((path, message)) => problem(path, message),
                }
            }
        }

        if let Some(tls) = &self.tls {
            for (key, file) in [("cert_file", &tls.cert_file), ("key_file", &tls.key_file)] {
                if let Err(e) = std::fs::metadata(file) {
                    problem(
                        format!("tls.{key}"),
                        format!("cannot read {}: {e}", file.display()),
                    );
                }
            }
        }
        let cache = &self.cache;
        if cache.max_entry_bytes.0 == 0 || cache.max_entry_bytes.0 > cache.max_bytes.0 {
            problem(
                "cache.max_entry_bytes".into(),
                "must be more than 0 and at most cache.max_bytes".into(),
            );
        }
        for (i, rule) in cache.rules.iter().enumerate() {
            let at = format!("cache.rules[{i}]");
            match (&rule.doctype, &rule.method) {
                (Some(d), None) if d.trim().is_empty() => {
                    problem(format!("{at}.doctype"), "is empty".into())
                }
                (Some(_), None) => {}
                (None, Some(m)) => {
                    let ok = !m.is_empty()
                        && m.split('.').all(|part| {
                            !part.is_empty()
                                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        });
                    if !ok {
                        problem(
                            format!("{at}.method"),
                            format!("'{m}' is not a method name"),
                        );
                    }
                }
                _ => problem(at.clone(), "needs exactly one of doctype and method".into()),
            }
            if rule.ttl.is_zero() {
                problem(format!("{at}.ttl"), "must be more than 0".into());
            }
            if rule.reads.is_empty() {
                problem(
                    format!("{at}.reads"),
                    "must name list, document or both".into(),
                );
            }
            for site in &rule.sites {
                if !self.sites.contains_key(site) {
                    problem(format!("{at}.sites"), format!("unknown site '{site}'"));
                }
            }
        }

        // The first route with `methods`: no route from it on may strip a prefix.
        let mut method_route = None;
        for (i, route) in self.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            let site = self.sites.get(&route.site);
            if site.is_none() {
                problem(
                    format!("{at}.site"),
                    format!("no site named '{}'", route.site),
                );
            }
            if route.host.is_none() && route.path_prefix.is_none() && route.methods.is_none() {
                problem(
                    at.clone(),
                    "a route needs host, path_prefix, methods or any of them".into(),
                );
            }
            if let Some(methods) = &route.methods {
                if methods.is_empty() {
                    problem(
                        format!("{at}.methods"),
                        "list at least one method, or leave methods out".into(),
                    );
                }
                for name in methods {
                    if name.is_empty() || name.contains('*') || name.contains(char::is_whitespace) {
                        problem(
                            format!("{at}.methods"),
                            format!("'{name}' is not a method name"),
                        );
                    }
                }
                method_route.get_or_insert(i);
            }
            // What a request runs is judged on the path it is forwarded with: a method route
            // decided after classification must not change that path, and neither may a route
            // it could fall through to.
            match method_route {
                Some(first) if route.strip_prefix && first == i => problem(
                    format!("{at}.strip_prefix"),
                    "a route with methods cannot strip its prefix".into(),
                ),
                Some(first) if route.strip_prefix => problem(
                    format!("{at}.strip_prefix"),
                    format!(
                        "a route that strips its prefix must come before every route with \
                         methods (routes[{first}] has methods)"
                    ),
                ),
                _ => {}
            }
            if let (Some(own), Some(site)) = (&route.timeouts, site) {
                let total = own.total.unwrap_or(site.timeouts.total);
                let request = own.request.unwrap_or(site.timeouts.request.min(total));
                if request.is_zero() || total.is_zero() {
                    problem(
                        format!("{at}.timeouts"),
                        "timeouts must be more than 0".into(),
                    );
                } else if request > total {
                    problem(
                        format!("{at}.timeouts"),
                        format!(
                            "request ({}) is longer than total ({}): one attempt cannot outlast \
                             the whole request",
                            humantime::format_duration(request),
                            humantime::format_duration(total)
                        ),
                    );
                }
                if total > MAX_ROUTE_TIMEOUT {
                    problem(
                        format!("{at}.timeouts.total"),
                        "at most 1h: longer work belongs in a background job (Frappe's \
                         enqueue), not an HTTP request held open"
                            .into(),
                    );
                }
            }
            match &route.path_prefix {
                Some(prefix) => match CanonicalPath::parse(prefix) {
                    Ok(p) if p.segments().is_empty() => problem(
                        format!("{at}.path_prefix"),
                        "'/' matches everything; leave path_prefix out instead".into(),
                    ),
                    Ok(_) => {}
                    Err(e) => problem(format!("{at}.path_prefix"), e.to_string()),
                },
                None if route.strip_prefix => {
                    problem(format!("{at}.strip_prefix"), "needs path_prefix".into())
                }
                None => {}
            }
        }

        let mut check_quota = |path: String, quota: &Option<QuotaConfig>| {
            if let Some(Err(e)) = quota.as_ref().map(QuotaConfig::quota) {
                problem(path, e);
            }
        };
        check_quota("rate_limit".into(), &self.rate_limit);
        check_quota("write_rate_limit".into(), &self.write_rate_limit);
        for (name, client) in &self.clients {
            check_quota(format!("clients.{name}.rate_limit"), &client.rate_limit);
            check_quota(
                format!("clients.{name}.write_rate_limit"),
                &client.write_rate_limit,
            );
        }
        if self.max_in_flight == 0 || self.clients.values().any(|c| c.max_in_flight == Some(0)) {
            problem(
                "max_in_flight".into(),
                "must be at least 1 (here and in every client)".into(),
            );
        }

        let mut key_ids = std::collections::HashMap::new();
        for (client_name, client) in &self.clients {
            let at = format!("clients.{client_name}");
            let key = &client.key_id;
            if key.is_empty() || key.contains(|c: char| c == ':' || c.is_whitespace()) {
                problem(
                    format!("{at}.key_id"),
                    "must be non-empty, without ':' or white space".into(),
                );
            }
            if let Some(other) = key_ids.insert(key.clone(), client_name.clone()) {
                problem(
                    format!("{at}.key_id"),
                    format!("the same key_id as client '{other}'"),
                );
            }
            let hash = &client.secret_sha256.0;
            if hash.len() != 64 || hex::decode(hash).is_err() {
                problem(
                    format!("{at}.secret_sha256"),
                    "must be 64 hex digits (from `erpgate keygen`)".into(),
                );
            }
            let mut site_account =
                |path: String, site: &str, account: &str| match self.sites.get(site) {
                    None => problem(path, format!("no site named '{site}'")),
                    Some(s) if !s.service_accounts.contains_key(account) => problem(
                        path,
                        format!("site '{site}' has no service account named '{account}'"),
                    ),
                    Some(_) => {}
                };
            site_account(
                format!("{at}.service_account"),
                &client.site,
                &client.service_account,
            );
            for (site, account) in &client.extra_sites {
                site_account(format!("{at}.extra_sites.{site}"), site, account);
            }
            if let Some(allow) = &client.allow {
                for (path, message) in allow_problems(&at, allow) {
                    problem(path, message);
                }
            }
        }

        for (name, app) in &self.oauth_apps {
            let at = format!("oauth_apps.{name}");
            if !self.sites.contains_key(&app.site) {
                problem(
                    format!("{at}.site"),
                    format!("no site named '{}'", app.site),
                );
            }
            if app.client_id.is_empty() || app.client_id.contains(char::is_whitespace) {
                problem(
                    format!("{at}.client_id"),
                    "must be the OAuth Client's client_id".into(),
                );
            }
            let same = self
                .oauth_apps
                .iter()
                .find(|(other, a)| *other != name && a.client_id == app.client_id);
            if let Some((other, _)) = same {
                problem(
                    format!("{at}.client_id"),
                    format!("the same client_id as oauth app '{other}'"),
                );
            }
            if self.clients.contains_key(name) {
                problem(at.clone(), "a client has the same name".into());
            }
            for (key, quota) in [
                ("rate_limit", &app.rate_limit),
                ("write_rate_limit", &app.write_rate_limit),
                ("per_user_rate_limit", &app.per_user_rate_limit),
            ] {
                if let Some(Err(e)) = quota.as_ref().map(QuotaConfig::quota) {
                    problem(format!("{at}.{key}"), e);
                }
            }
            if app.max_in_flight == Some(0) {
                problem(format!("{at}.max_in_flight"), "must be at least 1".into());
            }
            if app.introspection_ttl.is_zero() || app.introspection_ttl > Duration::from_secs(3600)
            {
                problem(
                    format!("{at}.introspection_ttl"),
                    "must be more than 0 and at most 1h".into(),
                );
            }
            if let Some(allow) = &app.allow {
                for (path, message) in allow_problems(&at, allow) {
                    problem(path, message);
                }
            }
        }

        let mut redis_password = None;
        if let Some(shared) = &self.shared_state {
            let redis = &shared.redis;
            let at = "shared_state.redis";
            if redis.password.is_some() || redis.password_file.is_some() {
                match inline_or_file(
                    at,
                    ("password", redis.password.as_ref()),
                    ("password_file", redis.password_file.as_deref()),
                ) {
                    Ok(p) => redis_password = Some(Secret(p)),
                    Err((path, message)) => problem(path, message),
                }
            }
            if redis.key_prefix.is_empty() || redis.key_prefix.len() > 64 {
                problem(
                    format!("{at}.key_prefix"),
                    "must be 1 to 64 characters".into(),
                );
            }
            if !(1..=1000).contains(&shared.quota_batch) {
                problem(
                    "shared_state.quota_batch".into(),
                    "must be 1 (exact) to 1000".into(),
                );
            }
            for (key, value) in [
                ("connect_timeout", redis.connect_timeout),
                ("command_timeout", redis.command_timeout),
            ] {
                if value.is_zero() || value > Duration::from_secs(30) {
                    problem(
                        format!("{at}.{key}"),
                        "must be more than 0 and at most 30s".into(),
                    );
                }
            }
        }

        match &self.cors {
            None => {
                let clients = self
                    .clients
                    .iter()
                    .map(|(name, c)| (format!("clients.{name}"), c.allowed_origins.is_some()));
                let apps = self
                    .oauth_apps
                    .iter()
                    .map(|(name, a)| (format!("oauth_apps.{name}"), a.allowed_origins.is_some()));
                for (at, _) in clients.chain(apps).filter(|(_, has)| *has) {
                    problem(
                        format!("{at}.allowed_origins"),
                        "needs the top-level cors section".into(),
                    );
                }
            }
            Some(cors) => {
                let origins = cors.allowed_origins.iter().map(|o| ("cors".to_owned(), o));
                let per_client = self.clients.iter().flat_map(|(name, client)| {
                    client
                        .allowed_origins
                        .iter()
                        .flatten()
                        .map(move |o| (format!("clients.{name}"), o))
                });
                let per_app = self.oauth_apps.iter().flat_map(|(name, app)| {
                    app.allowed_origins
                        .iter()
                        .flatten()
                        .map(move |o| (format!("oauth_apps.{name}"), o))
                });
                let per_client = per_client.chain(per_app);
                for (at, origin) in origins.chain(per_client) {
                    if let Err(why) = crate::layers::cors::check_origin(origin) {
                        problem(format!("{at}.allowed_origins"), format!("{origin}: {why}"));
                    }
                }
                for (key, names) in [
                    ("allowed_headers", &cors.allowed_headers),
                    ("exposed_headers", &cors.exposed_headers),
                ] {
                    for name in names {
                        if name == "*" || http::HeaderName::try_from(name.as_str()).is_err() {
                            problem(
                                format!("cors.{key}"),
                                format!("'{name}' is not a header name (no wildcards)"),
                            );
                        }
                    }
                }
                if cors.preflights_per_minute == 0 || cors.preflight_burst == 0 {
                    problem(
                        "cors".into(),
                        "preflights_per_minute and preflight_burst must be at least 1".into(),
                    );
                }
                if cors.max_age > Duration::from_secs(86_400) {
                    problem("cors.max_age".into(), "must be at most 24h".into());
                }
            }
        }
        if let Some(tracing) = &self.tracing {
            let url = tracing.endpoint.0.parse::<http::Uri>();
            let valid = url.as_ref().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            });
            if !valid {
                problem(
                    "tracing.endpoint".into(),
                    "must be an http:// or https:// URL".into(),
                );
            }
            if !(0.0..=1.0).contains(&tracing.sample_ratio) {
                problem(
                    "tracing.sample_ratio".into(),
                    "must be from 0.0 to 1.0".into(),
                );
            }
            if tracing.max_queue_size == 0 {
                problem("tracing.max_queue_size".into(), "must be at least 1".into());
            }
            if tracing.export_interval.is_zero() || tracing.export_timeout.is_zero() {
                problem(
                    "tracing".into(),
                    "export_interval and export_timeout must be more than 0".into(),
                );
            }
            for (name, value) in &tracing.headers {
                if http::HeaderName::try_from(name.as_str()).is_err()
                    || http::HeaderValue::try_from(value.0.as_str()).is_err()
                {
                    problem(
                        format!("tracing.headers.{name}"),
                        "is not a valid header".into(),
                    );
                }
            }
        }
        let compression = &self.compression;
        if compression.enabled && compression.encodings.is_empty() {
            problem(
                "compression.encodings".into(),
                "at least one encoding, or enabled: false".into(),
            );
        }
        for media_type in &compression.types {
            let valid = media_type
                .split_once('/')
                .is_some_and(|(t, s)| !t.is_empty() && !s.is_empty() && t != "*")
                && !media_type.contains([';', ' ', ','])
                && media_type.is_ascii();
            if !valid {
                problem(
                    "compression.types".into(),
                    format!("'{media_type}' is not a media type or 'type/*'"),
                );
            }
        }

        if let Some(url) = &self.openapi.public_url {
            // The documents' servers: what generated clients call, so a usable absolute URL.
            let usable = url.parse::<http::Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some()
            });
            if !usable {
                problem(
                    "openapi.public_url".into(),
                    "must be an absolute http:// or https:// URL".into(),
                );
            }
        }
        if self.openapi.metadata_ttl.is_zero() {
            problem(
                "openapi.metadata_ttl".into(),
                "must be more than 0 (metadata is read once per document otherwise)".into(),
            );
        }

        let mut subscription_secrets = IndexMap::new();
        if let Some(events) = &self.events {
            if events.directory.is_none() && self.shared_state.is_none() {
                problem(
                    "events.directory".into(),
                    "required without shared_state: where the embedded event store lives".into(),
                );
            }
            if events.initial_backoff.is_zero() || events.max_backoff < events.initial_backoff {
                problem(
                    "events.initial_backoff".into(),
                    "must be more than 0 and at most events.max_backoff".into(),
                );
            }
            if events.retry_for.is_zero() || events.feed_retention.is_zero() {
                problem(
                    "events".into(),
                    "retry_for and feed_retention must be more than 0".into(),
                );
            }
            if events.max_pending_per_subscription == 0 || events.max_feed_events == 0 {
                problem(
                    "events".into(),
                    "max_pending_per_subscription and max_feed_events must be at least 1".into(),
                );
            }
        }
        for (client_name, client) in &self.clients {
            for (name, subscription) in &client.subscriptions {
                let at = format!("clients.{client_name}.subscriptions.{name}");
                if self.events.is_none() {
                    problem(
                        at.clone(),
                        "subscriptions need the top-level events section".into(),
                    );
                }
                if client.allow.is_none() {
                    problem(
                        at.clone(),
                        "subscriptions need the client's allow rules: events go only for \
                         doctypes they grant read on (erpgate cannot know what the service \
                         account may read in Frappe)"
                            .into(),
                    );
                }
                if !is_metric_safe_name(name) {
                    problem(
                        at.clone(),
                        "a subscription name is letters, digits, '_' and '-'".into(),
                    );
                }
                let uri = subscription.url.0.parse::<http::Uri>();
                let usable = uri.as_ref().is_ok_and(|u| {
                    matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some()
                });
                if !usable {
                    problem(
                        format!("{at}.url"),
                        "must be an absolute http:// or https:// URL".into(),
                    );
                }
                if subscription.doctypes.is_empty()
                    || subscription.doctypes.iter().any(|d| d.trim().is_empty())
                {
                    problem(
                        format!("{at}.doctypes"),
                        "list doctypes by name, or \"*\" for all the client may read".into(),
                    );
                }
                for event in &subscription.events {
                    if !crate::frappe::webhook::DOC_EVENTS.contains(&event.as_str()) {
                        problem(
                            format!("{at}.events"),
                            format!(
                                "'{event}' is not a Frappe document event (one of {})",
                                crate::frappe::webhook::DOC_EVENTS.join(", ")
                            ),
                        );
                    }
                }
                if subscription.timeout.is_zero() || subscription.timeout > Duration::from_secs(300)
                {
                    problem(
                        format!("{at}.timeout"),
                        "must be more than 0 and at most 5m".into(),
                    );
                }
                let secret = inline_or_file(
                    &at,
                    ("secret", subscription.secret.as_ref()),
                    ("secret_file", subscription.secret_file.as_deref()),
                );
                match secret {
                    Ok(s) => match crate::events::signature::signing_key(&s) {
                        Ok(_) => {
                            subscription_secrets
                                .insert((client_name.clone(), name.clone()), Secret(s));
                        }
                        Err(why) => problem(format!("{at}.secret"), why.to_owned()),
                    },
                    Err((path, message)) => problem(path, message),
                }
            }
        }

        if problems.is_empty() {
            Ok(LoadedConfig {
                config: self,
                secrets,
                webhook_secrets,
                subscription_secrets,
                redis_password,
                hash: String::new(),
            })
        } else {
            Err(problems)
        }
    }
}

/// Whether `name` may be a metric label value and a Redis key part as it is.
fn is_metric_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// What is wrong in an `allow` block at `at`.
fn allow_problems(at: &str, allow: &AllowConfig) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    for (doctype, ops) in &allow.resources {
        for op in ops {
            if let Err(e) = parse_operations(op) {
                problems.push((format!("{at}.allow.resources.{doctype}"), e.to_string()));
            }
        }
    }
    // What each rule grants is decided where rules compile (`stack::access_rules`, through
    // `AccessRules::allow_method`), so `check` and start-up refuse the same rules.
    let mut rules = crate::frappe::AccessRules::default();
    for (j, method) in allow.methods.iter().enumerate() {
        if let Err(e) = crate::stack::allow_method_rule(&mut rules, method) {
            problems.push((format!("{at}.allow.methods[{j}]"), e));
        }
    }
    problems
}
