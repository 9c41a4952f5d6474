//! The configuration types. Their `///` docs are the reference documentation; the defaults
//! they name live here too.

use super::*;

/// The whole gateway configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the public listener (HTTP/1.1 and h2c). Default `0.0.0.0:8080`.
    #[serde(default = "defaults::listen", deserialize_with = "parse_env")]
    pub listen: SocketAddr,
    /// Address of the admin listener serving `/metrics`, `/healthz` and `/readyz`. Keep it off
    /// the public network. Default `127.0.0.1:9090`.
    #[serde(default = "defaults::admin_listen", deserialize_with = "parse_env")]
    pub admin_listen: SocketAddr,
    /// A token state-changing admin endpoints (`POST /cache/purge`) require as
    /// `Authorization: Bearer <token>`; `${ENV}` allowed. Without one they require the header
    /// `X-Erpgate-Admin: 1` instead, which no web page can send cross-origin without a CORS
    /// preflight the admin listener never grants. Default: none.
    #[serde(default, deserialize_with = "parse_env_opt")]
    pub admin_token: Option<AdminToken>,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Request limits and server timeouts.
    #[serde(default)]
    pub limits: Limits,
    /// Request and response buffering between clients and Frappe, as nginx does in front of
    /// gunicorn's sync workers.
    #[serde(default)]
    pub buffering: BufferingConfig,
    /// Peers (IP addresses or CIDR ranges) whose `X-Forwarded-For` is trusted: a load balancer
    /// or ingress in front of erpgate. From any other peer the header is replaced. Default none.
    #[serde(default)]
    pub trusted_proxies: Vec<TrustedProxy>,
    /// How many failed authentications one source address (IPv6: one /64) may make, and one
    /// key id may suffer, before 429. A valid credential is never refused for the failures of
    /// others from its address.
    #[serde(default)]
    pub auth_failures: AuthFailureLimit,
    /// Default request quota of every client without its own. Default 100 per second with a
    /// burst of 200; `null` for none (unlimited).
    #[serde(default = "defaults::rate_limit")]
    pub rate_limit: Option<QuotaConfig>,
    /// Default extra quota for writes (create, update, delete, doc methods, methods not known
    /// read-only) of every client without its own. Default: none.
    #[serde(default)]
    pub write_rate_limit: Option<QuotaConfig>,
    /// Default most requests one client may have in flight; more get 429. Default 64.
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: u32,
    /// `Idempotency-Key` support on POST, PUT, PATCH and DELETE.
    #[serde(default)]
    pub idempotency: IdempotencyConfig,
    /// `/readyz` answers 503 while any site's circuit breaker is open. Useful for a sidecar in
    /// front of one site; leave off for an edge proxy, where one failing site should not take
    /// every gateway replica out of service. Default `false`.
    #[serde(default)]
    pub readyz_requires_closed_breakers: bool,
    /// The Frappe sites behind the gateway, by name.
    pub sites: IndexMap<String, SiteConfig>,
    /// Routes, first match wins. A request no route matches goes to its client's `site`.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// The clients allowed in, by name (the name appears in logs and metrics).
    #[serde(default)]
    pub clients: IndexMap<String, ClientConfig>,
    /// Apps whose users sign in with a site's own OAuth 2.0 provider and call with
    /// `Authorization: Bearer <access token>`, by name (in logs and metrics). Default none.
    #[serde(default)]
    pub oauth_apps: IndexMap<String, OAuthAppConfig>,
    /// Memory for remembered token introspections (keyed by a hash of the token, never the
    /// token). Default `4MiB`.
    #[serde(default = "defaults::oauth_token_cache_bytes")]
    pub oauth_token_cache_bytes: ByteSize,
    /// The response cache. Default: no rules, no caching.
    #[serde(default)]
    pub cache: CacheConfig,
    /// TLS on the public listener (HTTP/2 by ALPN). Default: off, plain HTTP (h2c by prior
    /// knowledge), as a sidecar on localhost wants.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Reloading the configuration while serving (SIGHUP always reloads).
    #[serde(default)]
    pub reload: ReloadConfig,
    /// Threads serving the public listener, each with its own event loop, its own listening
    /// socket (`SO_REUSEPORT`) and its own upstream connection pools, so a request never
    /// wakes another thread. Default: the number of CPUs. Takes effect on restart.
    #[serde(default)]
    pub workers: Option<usize>,
    /// State the replicas of one deployment share: quotas, auth-failure limits,
    /// `Idempotency-Key` records and cache invalidations. Default: none, each process keeps its
    /// own (one replica, or a sidecar).
    #[serde(default)]
    pub shared_state: Option<SharedStateConfig>,
    /// Browser apps calling erpgate from their own origin (CORS). Default: none, off: no
    /// response carries CORS headers and an `OPTIONS` needs a key like any request.
    #[serde(default)]
    pub cors: Option<CorsConfig>,
    /// Response compression (gzip, br, zstd) negotiated from `Accept-Encoding`. Default: on.
    #[serde(default)]
    pub compression: CompressionConfig,
    /// OpenTelemetry traces exported over OTLP. Default: none, off (an incoming `traceparent`
    /// is passed to Frappe as it came).
    #[serde(default)]
    pub tracing: Option<TracingConfig>,
    /// The event relay: webhook deliveries to clients' `subscriptions` and the pull feed
    /// (README "Events"). Default: none, off.
    #[serde(default)]
    pub events: Option<EventsConfig>,
    /// The per-client OpenAPI document at `GET /_erpgate/openapi.json` (README "Describe your
    /// API"). Default: on, no public URL, metadata kept 5m.
    #[serde(default)]
    pub openapi: OpenApiConfig,
}

/// The per-client OpenAPI document.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenApiConfig {
    /// The URL integrators reach erpgate at (`https://api.example.com`): the document's
    /// `servers`. Default: none (`/`, relative to where the document was fetched).
    #[serde(default, deserialize_with = "parse_env_opt")]
    pub public_url: Option<String>,
    /// How long a site's DocType metadata is kept before it is read again (`POST
    /// /openapi/purge` on the admin listener forgets it at once). Default `5m`.
    #[serde(
        default = "defaults::openapi_metadata_ttl",
        deserialize_with = "parse_duration"
    )]
    pub metadata_ttl: Duration,
}

impl Default for OpenApiConfig {
    fn default() -> Self {
        Self {
            public_url: None,
            metadata_ttl: defaults::openapi_metadata_ttl(),
        }
    }
}

impl Config {
    /// The number of serving workers.
    pub fn workers(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
            .clamp(1, 1024)
    }
}

/// CORS for browser apps. A preflight (`OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`) is answered by erpgate, 204, without a key, for an origin
/// any client allows, and never forwarded; an actual response carries
/// `Access-Control-Allow-Origin` only when the authenticated client allows its `Origin`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins allowed for every client without its own `allowed_origins`. Default none.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Request headers a page may send. Default `Authorization`, `Content-Type`, `Accept`,
    /// `Idempotency-Key`, `X-Frappe-CSRF-Token`, `X-Request-Id`.
    #[serde(default = "defaults::cors_allowed_headers")]
    pub allowed_headers: Vec<String>,
    /// Response headers a page may read besides the CORS-safelisted ones. Default the
    /// rate-limit headers (`RateLimit`, `RateLimit-Policy`, `X-RateLimit-Limit`,
    /// `X-RateLimit-Remaining`, `X-RateLimit-Reset`), `Retry-After`, `X-Request-Id`, `X-Cache`,
    /// `ETag`.
    #[serde(default = "defaults::cors_exposed_headers")]
    pub exposed_headers: Vec<String>,
    /// How long a browser may keep a preflight's answer (Chromium caps it at 2 h). Default
    /// `10m`.
    #[serde(
        default = "defaults::cors_max_age",
        deserialize_with = "parse_duration"
    )]
    pub max_age: Duration,
    /// `Access-Control-Allow-Credentials: true`, which pages sending `credentials: "include"`
    /// (frappe-js-sdk does) need. erpgate never forwards cookies, so this exposes nothing a
    /// key does not. Default `true`.
    #[serde(default = "defaults::yes")]
    pub allow_credentials: bool,
    /// Preflights one source address may send per minute (they need no key, so they are
    /// bounded by address, not by client); more get 429. Default `600`.
    #[serde(default = "defaults::cors_preflights_per_minute")]
    pub preflights_per_minute: u32,
    /// Preflights one source address may send at once before `preflights_per_minute` applies.
    /// Default `100`.
    #[serde(default = "defaults::cors_preflight_burst")]
    pub preflight_burst: u32,
}

/// Response compression. erpgate takes the place of the bench's nginx, which is what
/// compresses Frappe's responses (gunicorn does not).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    /// Default `true`.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Encodings offered, in the server's order of preference among those a client accepts
    /// with the same q-value. Default `[zstd, br, gzip]`: on Frappe's JSON zstd gives the
    /// smallest answer for the least CPU (BENCHMARKS.md).
    #[serde(default = "defaults::compression_encodings")]
    pub encodings: Vec<ContentCoding>,
    /// Responses smaller than this go as they are: below about a packet the saving is nil and
    /// the CPU is not. Default `1KiB`.
    #[serde(default = "defaults::compression_min_bytes")]
    pub min_bytes: ByteSize,
    /// `fastest`, `default` or `best`. Default `default` (gzip 6, br 4, zstd 3: the nginx /
    /// CDN middle ground; `best` costs many times the CPU for a few percent).
    #[serde(default)]
    pub level: CompressionLevel,
    /// Media types compressed (exact, without parameters, or `type/*`). Default
    /// `application/json`, `text/*`, `application/javascript`, `application/xml`,
    /// `image/svg+xml`.
    #[serde(default = "defaults::compression_types")]
    pub types: Vec<String>,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            encodings: defaults::compression_encodings(),
            min_bytes: defaults::compression_min_bytes(),
            level: CompressionLevel::default(),
            types: defaults::compression_types(),
        }
    }
}

/// OpenTelemetry traces: one server span per request and one client span per attempt sent to
/// a site, exported in batches over OTLP/HTTP (protobuf) from a thread of their own, so export
/// never delays or fails a request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP traces URL, e.g. `http://otel-collector:4318/v1/traces`
    /// (`/v1/traces` is added to a URL without a path). `${ENV}` allowed.
    #[serde(deserialize_with = "parse_env")]
    pub endpoint: EnvString,
    /// Share of new traces recorded, 0.0 to 1.0; a request with a `traceparent` follows its
    /// caller's sampling decision. Default `1.0`.
    #[serde(default = "defaults::sample_ratio")]
    pub sample_ratio: f64,
    /// The `service.name` resource attribute. Default `erpgate`.
    #[serde(default = "defaults::service_name")]
    pub service_name: String,
    /// Headers sent with every export (a hosted collector's API key, say). `${ENV}` allowed in
    /// values; never printed. Default none.
    #[serde(default, deserialize_with = "parse_env_map")]
    pub headers: IndexMap<String, Secret>,
    /// How long finished spans wait to be sent in one batch. Default `5s`.
    #[serde(
        default = "defaults::export_interval",
        deserialize_with = "parse_duration"
    )]
    pub export_interval: Duration,
    /// Time one export may take. Default `10s`.
    #[serde(
        default = "defaults::export_timeout",
        deserialize_with = "parse_duration"
    )]
    pub export_timeout: Duration,
    /// Finished spans held for export at most; more are dropped rather than held or waited
    /// for. Default `2048`.
    #[serde(default = "defaults::max_queue_size")]
    pub max_queue_size: usize,
}

/// A content coding erpgate can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentCoding {
    /// Brotli.
    Br,
    /// Zstandard.
    Zstd,
    /// gzip.
    Gzip,
}

/// Compression effort.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionLevel {
    /// The encoders' fastest.
    Fastest,
    /// A balance.
    #[default]
    Default,
    /// The smallest output.
    Best,
}

/// TLS on the public listener; the files are read again on every reload.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    #[serde(deserialize_with = "parse_env")]
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(deserialize_with = "parse_env")]
    pub key_file: PathBuf,
}

/// Reloading the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    /// Also reload when the file's content changes (polled; works with Kubernetes ConfigMap
    /// mounts, which swap a symlink). Default `false`.
    #[serde(default)]
    pub watch: bool,
    /// How often the file is checked. Default `2s`.
    #[serde(
        default = "defaults::reload_interval",
        deserialize_with = "parse_duration"
    )]
    pub interval: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        Self {
            watch: false,
            interval: defaults::reload_interval(),
        }
    }
}

/// Logging.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `json` (one object per line, for log shippers) or `pretty`. Default `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter such as `info` or `erpgate=debug,info`; `RUST_LOG` overrides it.
    /// Default `info`.
    #[serde(default = "defaults::log_level")]
    pub level: String,
    /// Lines waiting to be written at most: a writer thread drains them to stdout, so a slow
    /// log pipe never holds a request; beyond it lines are dropped and counted
    /// (`erpgate_log_lines_dropped_total`). Default `65536`. Takes effect on restart.
    #[serde(default = "defaults::log_buffer_lines")]
    pub buffer_lines: usize,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable.
    Pretty,
}

/// Request limits and server timeouts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request body accepted; larger gets 413. Bodies stream through, they are not held
    /// in memory. Accepts `100MiB`, `10MB`, `512KiB` or a byte count. Default `100MiB`.
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: ByteSize,
    /// Largest JSON or urlencoded body the gateway reads to find `cmd` and `sid` (Frappe reads
    /// them from bodies too); larger such bodies get 413. Other bodies stream. Default `8MiB`.
    #[serde(default = "defaults::max_inspected_body_bytes")]
    pub max_inspected_body_bytes: ByteSize,
    /// Largest HTTP/1.1 request head (request line and headers); larger gets 431. It is also
    /// the most a connection's read buffer holds, so it sets what an idle keep-alive connection
    /// keeps: 8 KiB (the least allowed, nginx's header line limit) holds 10,000 idle
    /// connections in ~60 MiB less than 16 KiB does. HTTP/2 heads have their own limit (64 KiB
    /// of header list). Default `8KiB`.
    #[serde(default = "defaults::max_request_head_bytes")]
    pub max_request_head_bytes: ByteSize,
    /// Time a client has to send its request headers (slowloris guard). Default `10s`.
    #[serde(
        default = "defaults::header_read_timeout",
        deserialize_with = "parse_duration"
    )]
    pub header_read_timeout: Duration,
    /// On SIGTERM or SIGINT, how long in-flight requests may take to finish before the process
    /// exits anyway. Default `30s`.
    #[serde(
        default = "defaults::shutdown_grace",
        deserialize_with = "parse_duration"
    )]
    pub shutdown_grace: Duration,
    /// On SIGTERM, how long the listener keeps accepting (while `/readyz` already answers 503)
    /// so Kubernetes can take the endpoint out of its Service first. Default `0s`; the shipped
    /// Kubernetes manifests use `5s`.
    #[serde(default, deserialize_with = "parse_duration")]
    pub drain_delay: Duration,
    /// Open public connections at most, over all workers (lowered further to fit the process's
    /// file-descriptor limit, with a reserve for upstream connections, files and the admin
    /// listener). Connections over it are closed at once and counted. Default `10000`.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: u32,
    /// A connection with no request in flight for this long is closed (HTTP/1.1 keep-alive and
    /// HTTP/2 alike); a new connection must send its first request head within
    /// `header_read_timeout`, whatever its protocol. Default `60s`.
    #[serde(
        default = "defaults::idle_timeout",
        deserialize_with = "parse_duration"
    )]
    pub idle_timeout: Duration,
    /// HTTP/2 streams one connection may have open at once. Default `100`.
    #[serde(default = "defaults::http2_max_concurrent_streams")]
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 keep-alive ping interval; a peer that does not answer within it is dropped.
    /// Default `20s`.
    #[serde(
        default = "defaults::http2_keepalive_interval",
        deserialize_with = "parse_duration"
    )]
    pub http2_keepalive_interval: Duration,
}

/// Buffering, so that neither a slow sender nor a slow reader holds one of gunicorn's workers:
/// request bodies are read whole before anything is sent to Frappe, responses are read whole
/// from Frappe before the client gets them — in memory up to `memory`, beyond that in an
/// unlinked temporary file in `directory`. A route with `streaming: true` opts out.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BufferingConfig {
    /// Read request bodies whole before forwarding. Default `true`.
    #[serde(default = "defaults::yes")]
    pub requests: bool,
    /// Read responses whole before answering. Default `true`.
    #[serde(default = "defaults::yes")]
    pub responses: bool,
    /// Bytes of one body held in memory before the rest goes to a temporary file. Default
    /// `1MiB`.
    #[serde(default = "defaults::buffer_memory")]
    pub memory: ByteSize,
    /// Where temporary files go (unlinked as soon as they are made). Default: the system's
    /// temporary directory.
    #[serde(default, deserialize_with = "parse_env_opt")]
    pub directory: Option<std::path::PathBuf>,
    /// Longest pause between two reads of a client's body (nginx's `client_body_timeout`);
    /// longer gets 408, never counted against the site. It bounds every read of a request
    /// body erpgate makes, buffered or not: classification's (JSON, urlencoded, multipart fields
    /// before a file) and idempotency's too, also when `requests` buffering is off. Default
    /// `15s`.
    #[serde(
        default = "defaults::client_body_timeout",
        deserialize_with = "parse_duration"
    )]
    pub client_body_timeout: Duration,
    /// Bytes all buffered bodies together may hold in memory: requests and responses, of every
    /// client and public route. A body that finds it full goes to a temporary file instead.
    /// Default `256MiB`.
    #[serde(default = "defaults::buffer_max_memory")]
    pub max_memory: ByteSize,
    /// Bytes all buffered bodies together may hold in temporary files. A request whose body
    /// would go over it (or over its client's share) gets 503 `InsufficientStorage` with
    /// `Retry-After` — before its body is read when its length is known, otherwise as soon as
    /// it does, and nothing of it reaches the site; a body larger than any budget or share
    /// could ever hold gets 413. A response over it is passed on as it comes instead of being
    /// held (the site has already acted). Default `4GiB`.
    #[serde(default = "defaults::buffer_max_disk")]
    pub max_disk: ByteSize,
    /// The part of `max_memory` and of `max_disk` one client's bodies may hold together, so
    /// that one client's slow uploads cannot take the budget from everyone else; requests
    /// without a client (public routes) share one such part. More than 0, at most 1.
    /// Default `0.25`.
    #[serde(default = "defaults::buffer_max_client_share")]
    pub max_client_share: f64,
}

impl Default for BufferingConfig {
    fn default() -> Self {
        Self {
            requests: true,
            responses: true,
            memory: defaults::buffer_memory(),
            directory: None,
            client_body_timeout: defaults::client_body_timeout(),
            max_memory: defaults::buffer_max_memory(),
            max_disk: defaults::buffer_max_disk(),
            max_client_share: defaults::buffer_max_client_share(),
        }
    }
}

/// Failed-authentication limit per source address and per key id (GCRA quotas).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFailureLimit {
    /// Sustained failures per minute. Default 30.
    #[serde(default = "defaults::auth_failures_per_minute")]
    pub per_minute: u32,
    /// Failures allowed in a burst. Default 10.
    #[serde(default = "defaults::auth_failures_burst")]
    pub burst: u32,
}

/// One Frappe site (one bench site, served by one or more backends).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// Base URLs of the site's gunicorn or nginx endpoints, `http://` or `https://`, no path.
    /// Requests go round-robin; one that refuses connections is skipped for a while.
    pub backends: Vec<Backend>,
    /// The Frappe site name (its folder under `sites/`), sent as `X-Frappe-Site-Name`.
    #[serde(deserialize_with = "parse_env")]
    pub site_name: EnvString,
    /// `Host` header sent upstream. Default: `site_name`.
    #[serde(default, deserialize_with = "parse_env_opt")]
    pub host: Option<EnvString>,
    /// ERPNext users the gateway acts as, by name, each with an API key and secret generated in
    /// ERPNext (User > API Access).
    pub service_accounts: IndexMap<String, ServiceAccountConfig>,
    /// Upstream timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// PEM file of extra CA certificates trusted for `https://` backends, besides the system
    /// roots.
    #[serde(default, deserialize_with = "parse_env_opt")]
    pub ca_file: Option<PathBuf>,
    /// The protocol spoken to the backends. Default `http1`. `http2` needs a backend that
    /// speaks it: for `https://` its ALPN must offer `h2` (e.g. an nginx in front of gunicorn
    /// with `http2 on`), for `http://` HTTP/2 with prior knowledge (h2c). gunicorn itself
    /// speaks HTTP/1.1 only.
    #[serde(default)]
    pub upstream_protocol: UpstreamProtocol,
    /// Pass Frappe's Python tracebacks through to clients. Default `false`: each is replaced
    /// with its one-line summary. It never gives restricted readers (clients with `allow`
    /// rules, OAuth apps' users, public routes' callers) the text of a database error: for
    /// them every summary, traceback or message holding one is replaced by a fixed line with
    /// the request id (the original is logged at `debug`), since MariaDB's messages carry data.
    #[serde(default)]
    pub expose_tracebacks: bool,
    /// The circuit breaker of this site.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Retries to this site.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Frappe webhooks, signed with this secret:
    /// `POST /_erpgate/webhooks/frappe/<site>/<doctype>` (the doctype percent-encoded) purges
    /// the cache and feeds the event relay, refusing a body that names another doctype;
    /// `POST /_erpgate/webhooks/frappe/<site>` only purges the cache. Default: off (the
    /// endpoints answer 404 for this site).
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
    /// Routes forwarded without a gateway key, with the caller's own cookies and
    /// `Authorization`, their `Set-Cookie` and redirects passed back: the site's OAuth 2.0 sign-in
    /// flow (README "OAuth apps"). Default: none.
    #[serde(default)]
    pub public: Option<PublicRoutesConfig>,
}

/// A site's public routes: exact whitelisted methods and exact paths, nothing else. Each
/// request is judged on the whole `form_dict` Frappe will read, so a `cmd` naming anything else
/// makes it an ordinary (keyed) request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicRoutesConfig {
    /// Methods, by exact dotted name, e.g. `frappe.integrations.oauth2.get_token`.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Paths, exact, e.g. `/.well-known/openid-configuration`.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Requests one source address (IPv6: /64) may make to them per minute. Default `120`.
    #[serde(default = "defaults::public_per_minute")]
    pub per_minute: u32,
    /// ... at once. Default `30`.
    #[serde(default = "defaults::public_burst")]
    pub burst: u32,
}

/// The secret Frappe signs this site's webhooks with (the Webhook's "Webhook Secret").
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The secret; use `${ENV}`. Exactly one of `secret` and `secret_file` is required.
    #[serde(default, deserialize_with = "parse_env_opt")]
    pub secret: Option<EnvString>,
    /// A file holding the secret; trailing newline ignored.
    #[serde(default, deserialize_with = "parse_env_opt")]
    pub secret_file: Option<PathBuf>,
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_file", &self.secret_file)
            .finish()
    }
}

/// The response cache. Opt-in: without rules nothing is cached.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Memory for all entries (bodies, headers and bookkeeping). Default `256MiB`.
    #[serde(default = "defaults::cache_max_bytes")]
    pub max_bytes: ByteSize,
    /// Largest response body stored; larger answers pass through uncached. Default `1MiB`.
    #[serde(default = "defaults::cache_max_entry_bytes")]
    pub max_entry_bytes: ByteSize,
    /// What is cached: each rule names a doctype or a read-only method.
    #[serde(default)]
    pub rules: Vec<CacheRuleConfig>,
}

/// One cache rule: GET/HEAD reads of a doctype (v1 `/api/resource/..` and v2
/// `/api/v2/document/..`), or GET/HEAD calls of a method.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRuleConfig {
    /// A doctype (matched case-insensitively). Exactly one of `doctype` and `method`.
    #[serde(default)]
    pub doctype: Option<String>,
    /// A method by dotted name, such as `frappe.client.get_count`.
    #[serde(default)]
    pub method: Option<String>,
    /// For a doctype: `list` reads, `document` reads, or both. Default both.
    #[serde(default = "defaults::cache_reads")]
    pub reads: Vec<CacheReads>,
    /// How long an answer is served from the cache.
    #[serde(deserialize_with = "parse_duration")]
    pub ttl: Duration,
    /// After `ttl`, how long an answer may still be served when the site fails (5xx, timeout,
    /// unreachable, breaker open). Default `0s`.
    #[serde(default, deserialize_with = "parse_duration")]
    pub stale_if_error: Duration,
    /// Store answers even when the site says `Cache-Control: no-store` or `private`. Default
    /// `false`.
    #[serde(default)]
    pub override_upstream_cache_control: bool,
    /// Only these sites. Default: every site.
    #[serde(default)]
    pub sites: Vec<String>,
}

/// Which reads of a doctype a rule caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheReads {
    /// `GET /api/resource/<doctype>` (and v2): lists.
    List,
    /// `GET /api/resource/<doctype>/<name>` (and v2): one document.
    Document,
}

/// A GCRA quota: a sustained rate (`per_second` or `per_minute`) and a burst.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// Sustained requests per second.
    #[serde(default)]
    pub per_second: Option<u32>,
    /// Sustained requests per minute (instead of `per_second`).
    #[serde(default)]
    pub per_minute: Option<u32>,
    /// Requests allowed at once after idling. Default: the per-second or per-minute number.
    #[serde(default)]
    pub burst: Option<u32>,
}

/// A site's circuit breaker: trips on connect errors, timeouts and 502/503/504 answers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Default `true`.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Trip after this many failures in a row; 0 turns this trigger off. Default 5.
    #[serde(default = "defaults::consecutive_failures")]
    pub consecutive_failures: u32,
    /// Trip when the failure rate over a window gets too high. Default: off.
    #[serde(default)]
    pub failure_rate: Option<FailureRateConfig>,
    /// First open period; each reopening without a success in between doubles it. Default `5s`.
    #[serde(default = "defaults::open_base", deserialize_with = "parse_duration")]
    pub open_base: Duration,
    /// Longest open period. Default `60s`.
    #[serde(default = "defaults::open_max", deserialize_with = "parse_duration")]
    pub open_max: Duration,
}

/// The failure-rate trigger of a breaker. The rate is a moving average of outcomes weighted by
/// time (the window is its time constant, failsafe's success-rate policy); it is judged once the
/// breaker has been closed for a whole window and at least `min_requests` arrived within it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureRateConfig {
    /// Trip above this fraction of failures, 0 to 1. Default 0.5.
    #[serde(default = "defaults::failure_rate")]
    pub threshold: f64,
    /// ...once at least this many requests were seen in the window. Default 20.
    #[serde(default = "defaults::min_requests")]
    pub min_requests: u32,
    /// The window (whole seconds). Default `30s`.
    #[serde(default = "defaults::rate_window", deserialize_with = "parse_duration")]
    pub window: Duration,
}

/// Retries. A request is retried when it provably never reached the site (connection refused
/// or connect timeout), and a GET, HEAD or read-only method also on timeouts, broken
/// connections and 502/503/504. Never a write that may have reached Frappe, never a 429.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Most retries of one request; 0 turns retries off. Default 2.
    #[serde(default = "defaults::max_retries")]
    pub max_retries: u32,
    /// First backoff; it doubles each retry, with full jitter. Default `50ms`.
    #[serde(
        default = "defaults::retry_backoff_base",
        deserialize_with = "parse_duration"
    )]
    pub backoff_base: Duration,
    /// Longest backoff. Default `1s`.
    #[serde(
        default = "defaults::retry_backoff_max",
        deserialize_with = "parse_duration"
    )]
    pub backoff_max: Duration,
    /// An upstream `Retry-After` up to this is waited for; a longer one is not retried.
    /// Default `2s`.
    #[serde(
        default = "defaults::max_retry_after",
        deserialize_with = "parse_duration"
    )]
    pub max_retry_after: Duration,
    /// Retries may add at most this percentage of recent requests... Default 20.
    #[serde(default = "defaults::budget_percent")]
    pub budget_percent: u32,
    /// ...plus this many per second, so a quiet site can still retry. Default 1.
    #[serde(default = "defaults::budget_min_per_second")]
    pub budget_min_per_second: u32,
    /// Largest request body kept for a retry; bigger requests are not retried. Default `1MiB`.
    #[serde(default = "defaults::retry_max_body_bytes")]
    pub max_body_bytes: ByteSize,
    /// Methods that only read, so are safe to retry whatever their HTTP verb.
    #[serde(default = "defaults::read_only_methods")]
    pub read_only_methods: Vec<String>,
}

/// `Idempotency-Key` records.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// How long a key's response is kept. Default `24h`.
    #[serde(
        default = "defaults::idempotency_ttl",
        deserialize_with = "parse_duration"
    )]
    pub ttl: Duration,
    /// Memory for *each client's* records: one client's traffic never evicts another's (least
    /// recently used records of the same client go first; requests still running are never
    /// evicted). Default `16MiB`.
    #[serde(default = "defaults::idempotency_max_bytes")]
    pub max_bytes: ByteSize,
    /// Largest response body kept for replay. Default `1MiB`.
    #[serde(default = "defaults::idempotency_max_response_bytes")]
    pub max_response_bytes: ByteSize,
}

/// Where shared state lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedStateConfig {
    /// A Redis server (a bench's own `redis_cache` will do, with a `key_prefix`).
    pub redis: RedisConfig,
    /// Requests a replica may take from a shared quota per Redis round trip. `1` (the default):
    /// exact, one round trip per request. More: approximate; a replica leases up to this many
    /// (never more than a twentieth of the quota's burst) and hands them out locally, so across
    /// all replicas at most `replicas × batch` requests pass beyond the exact quota.
    #[serde(default = "defaults::quota_batch")]
    pub quota_batch: u32,
}

/// A Redis server for shared state.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db` or `rediss://` (TLS, system roots); `${ENV}` allowed. Put no
    /// password here: use `password` / `password_file`.
    #[serde(deserialize_with = "parse_env")]
    pub url: RedisUrl,
    /// ACL user (Redis 6+). Default: none (the `default` user).
    #[serde(default, deserialize_with = "parse_env_opt")]
    pub username: Option<EnvString>,
    /// Password; use `${ENV}`. At most one of `password` and `password_file`.
    #[serde(default, deserialize_with = "parse_env_opt")]
    pub password: Option<EnvString>,
    /// A file holding the password (a Kubernetes Secret mount); trailing newline ignored.
    #[serde(default, deserialize_with = "parse_env_opt")]
    pub password_file: Option<PathBuf>,
    /// Put before every key and channel name, so one Redis serves several deployments (or a
    /// bench) safely. Default `erpgate:`.
    #[serde(default = "defaults::redis_key_prefix")]
    pub key_prefix: String,
    /// Time to open a connection. Default `1s`.
    #[serde(
        default = "defaults::redis_connect_timeout",
        deserialize_with = "parse_duration"
    )]
    pub connect_timeout: Duration,
    /// Longest a request waits for one Redis command; then Redis counts as down. Default
    /// `250ms`.
    #[serde(
        default = "defaults::redis_command_timeout",
        deserialize_with = "parse_duration"
    )]
    pub command_timeout: Duration,
    /// What a request with an `Idempotency-Key` gets while Redis is down: `refuse` (503 with
    /// `Retry-After`: exactly-once cannot be promised) or `unprotected` (it runs, unrecorded).
    /// Default `refuse`.
    #[serde(default)]
    pub idempotency_when_unavailable: WhenUnavailable,
    /// `/readyz` answers 503 while Redis is down. Default `false`: the gateway still serves,
    /// on local quotas.
    #[serde(default)]
    pub readyz_requires_redis: bool,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field(
                "idempotency_when_unavailable",
                &self.idempotency_when_unavailable,
            )
            .field("readyz_requires_redis", &self.readyz_requires_redis)
            .finish()
    }
}

/// A Redis URL without credentials (they have their own keys, so they never print).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl(pub String);

impl std::str::FromStr for RedisUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("redis://")
            .or_else(|| s.strip_prefix("rediss://"))
            .ok_or("must start with redis:// or rediss://")?;
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.contains('@') {
            return Err(
                "must not carry credentials: use username and password / password_file".into(),
            );
        }
        if authority.is_empty() {
            return Err("has no host".into());
        }
        Ok(Self(s.to_owned()))
    }
}

/// The protocol a site's backends are reached with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive: each worker keeps idle connections per backend, one request
    /// on each at a time.
    #[default]
    Http1,
    /// HTTP/2: each worker keeps one connection per backend and multiplexes its requests on it.
    Http2,
}

/// What keyed requests get while shared state is unavailable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenUnavailable {
    /// 503 with `Retry-After`.
    #[default]
    Refuse,
    /// Run without a record.
    Unprotected,
}

/// Credentials of one ERPNext service account.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountConfig {
    /// The API key; `${ENV}` allowed.
    #[serde(deserialize_with = "parse_env")]
    pub api_key: EnvString,
    /// The API secret; use `${ENV}`, never a literal in production. Exactly one of `api_secret`
    /// and `api_secret_file` is required.
    #[serde(default, deserialize_with = "parse_env_opt")]
    pub api_secret: Option<EnvString>,
    /// A file holding the API secret (a Kubernetes Secret mount); trailing newline ignored.
    #[serde(default, deserialize_with = "parse_env_opt")]
    pub api_secret_file: Option<PathBuf>,
}

impl fmt::Debug for ServiceAccountConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccountConfig")
            .field("api_key", &self.api_key)
            .field(
                "api_secret",
                &self.api_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("api_secret_file", &self.api_secret_file)
            .finish()
    }
}

/// Upstream timeouts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// TCP (and TLS) connect. Default `2s`.
    #[serde(
        default = "defaults::connect_timeout",
        deserialize_with = "parse_duration"
    )]
    pub connect: Duration,
    /// One attempt, from sending the request to the response headers. Default `30s`.
    #[serde(
        default = "defaults::request_timeout",
        deserialize_with = "parse_duration"
    )]
    pub request: Duration,
    /// The whole request, all retries and backoffs included; then 504. Default `60s`.
    #[serde(
        default = "defaults::total_timeout",
        deserialize_with = "parse_duration"
    )]
    pub total: Duration,
}

/// A route: match on `host`, `path_prefix`, `methods` or any of them; send to `site`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The request's `Host` (or HTTP/2 authority) without port, case-insensitive.
    #[serde(default)]
    pub host: Option<String>,
    /// A path prefix, matched on whole segments after percent-decoding.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Remove `path_prefix` before forwarding. Default `false`.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Stream request and response bodies through instead of buffering them (for clients that
    /// need it: huge uploads, long downloads). Then a slow client holds a gunicorn worker for
    /// as long as it is slow. Default `false`.
    #[serde(default)]
    pub streaming: bool,
    /// Match only requests that run one of these whitelisted methods, however Frappe is asked
    /// to run them (`/api/method/<name>`, `/api/v2/method/<name>`, a `cmd` in the query or
    /// body) and under any name the catalog knows for them. Such a route cannot strip a prefix,
    /// and no route after it may. Default: any request.
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// Timeouts for the requests this route matches, in place of the site's (longer or
    /// shorter). A route with timeouts is not retried unless it sets `retry`. Default: the
    /// site's.
    #[serde(default)]
    pub timeouts: Option<RouteTimeoutsConfig>,
    /// Retries for the requests this route matches (which requests are safe to retry, the
    /// backoff and the budget stay the site's). Default: none on a route with `timeouts`,
    /// else the site's.
    #[serde(default)]
    pub retry: Option<RouteRetryConfig>,
    /// The site to send matching requests to.
    pub site: String,
}

/// A route's own timeouts; each left out is the site's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTimeoutsConfig {
    /// One attempt, from sending the request to the response head (on a streaming route also
    /// the longest wait for more of the answer's body). At most `total`. Default: the site's
    /// `timeouts.request`, or `total` if that is shorter.
    #[serde(default, deserialize_with = "parse_duration_opt")]
    pub request: Option<Duration>,
    /// The whole request, retries and backoffs included; then 504. At most `1h`. Default: the
    /// site's `timeouts.total`.
    #[serde(default, deserialize_with = "parse_duration_opt")]
    pub total: Option<Duration>,
}

/// A route's own retries.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRetryConfig {
    /// Retries per request; 0 = off.
    pub max_retries: u32,
}

/// One client of the gateway.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The key id the client presents (`erpgate keygen` makes one).
    pub key_id: String,
    /// Hex SHA-256 of the client's secret, from `erpgate keygen`; the secret itself is never
    /// stored. `${ENV}` allowed.
    #[serde(deserialize_with = "parse_env")]
    pub secret_sha256: EnvString,
    /// The client's default site, used when no route matches.
    pub site: String,
    /// The service account on `site` the client's requests are signed as.
    pub service_account: String,
    /// Other sites a route may send this client to, each with the service account to use there.
    /// A request routed to any other site gets 403.
    #[serde(default)]
    pub extra_sites: IndexMap<String, String>,
    /// Access rules. Without an `allow` block the client may do whatever its service account may.
    #[serde(default)]
    pub allow: Option<AllowConfig>,
    /// This client's request quota. Default: the top-level `rate_limit`.
    #[serde(default)]
    pub rate_limit: Option<QuotaConfig>,
    /// This client's write quota. Default: the top-level `write_rate_limit`.
    #[serde(default)]
    pub write_rate_limit: Option<QuotaConfig>,
    /// This client's most requests in flight. Default: the top-level `max_in_flight`.
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    /// Origins (`https://app.example.com`, exact, no wildcard) whose pages may call erpgate
    /// with this client's key: their responses carry `Access-Control-Allow-Origin`. Needs the
    /// top-level `cors` section. Default: `cors.allowed_origins`.
    #[serde(default)]
    pub allowed_origins: Option<Vec<String>>,
    /// Webhooks erpgate sends this client when Frappe reports a change (README "Events"), by
    /// name (in logs and metrics). Each gets only events of sites this client may use and
    /// doctypes its `allow` rules let it read. Needs the top-level `events` section.
    /// Default none.
    #[serde(default)]
    pub subscriptions: IndexMap<String, SubscriptionConfig>,
}

/// One webhook subscription of a client: events of its doctypes (and event types) are posted
/// to `url`, signed in the Standard Webhooks format under `secret`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    /// Where deliveries are POSTed (`http://` or `https://`). `${ENV}` allowed.
    #[serde(deserialize_with = "parse_env")]
    pub url: EnvString,
    /// Doctypes relayed, by exact name; `"*"` for every doctype the client may read.
    pub doctypes: Vec<String>,
    /// Frappe document events relayed (`after_insert`, `on_update`, `on_submit`, `on_cancel`,
    /// `on_trash`, `on_update_after_submit`, `on_change`). Default: all.
    #[serde(default)]
    pub events: Vec<String>,
    /// The signing secret in the Standard Webhooks form `whsec_<base64 of 24 to 64 bytes>`;
    /// use `${ENV}`. Exactly one of `secret` and `secret_file` is required.
    #[serde(default, deserialize_with = "parse_env_opt")]
    pub secret: Option<EnvString>,
    /// A file holding the secret; trailing newline ignored.
    #[serde(default, deserialize_with = "parse_env_opt")]
    pub secret_file: Option<PathBuf>,
    /// Time the subscriber has to answer one delivery. Default `10s`.
    #[serde(
        default = "defaults::subscription_timeout",
        deserialize_with = "parse_duration"
    )]
    pub timeout: Duration,
}

impl fmt::Debug for SubscriptionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriptionConfig")
            .field("url", &self.url)
            .field("doctypes", &self.doctypes)
            .field("events", &self.events)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_file", &self.secret_file)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The event relay: Frappe webhooks received on the signed endpoint are kept, delivered to
/// clients' subscriptions and offered on the pull feed `GET /_erpgate/events`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Directory of the embedded event store (crash-safe, one file), used when no
    /// `shared_state` is configured (with it, events live in Redis Streams). Required then.
    #[serde(default, deserialize_with = "parse_env_opt")]
    pub directory: Option<PathBuf>,
    /// How long a delivery is retried before it goes to the dead letters. Default `24h`.
    #[serde(
        default = "defaults::events_retry_for",
        deserialize_with = "parse_duration"
    )]
    pub retry_for: Duration,
    /// Wait before the first retry; doubles per attempt, with jitter. Default `5s`.
    #[serde(
        default = "defaults::events_initial_backoff",
        deserialize_with = "parse_duration"
    )]
    pub initial_backoff: Duration,
    /// Longest wait between retries. Default `1h`.
    #[serde(
        default = "defaults::events_max_backoff",
        deserialize_with = "parse_duration"
    )]
    pub max_backoff: Duration,
    /// Undelivered events kept per subscription; beyond it the oldest are dropped (counted).
    /// Default `10000`.
    #[serde(default = "defaults::events_max_pending")]
    pub max_pending_per_subscription: u64,
    /// How long the pull feed keeps an event. Default `24h`.
    #[serde(
        default = "defaults::events_feed_retention",
        deserialize_with = "parse_duration"
    )]
    pub feed_retention: Duration,
    /// Events the pull feed keeps at most; beyond it the oldest go. Default `100000`.
    #[serde(default = "defaults::events_max_feed")]
    pub max_feed_events: u64,
}

/// An app signing users in with a site's OAuth 2.0 provider (an `OAuth Client` in ERPNext).
/// Its requests go to Frappe with the user's own token, so Frappe applies the user's
/// permissions; erpgate adds the app's rules, quotas and concurrency cap.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthAppConfig {
    /// The site whose OAuth provider issued the app's tokens; they are checked there.
    pub site: String,
    /// The `client_id` of the app's OAuth Client in ERPNext.
    pub client_id: String,
    /// Access rules, as a client's. Without them, whatever the user may.
    #[serde(default)]
    pub allow: Option<AllowConfig>,
    /// The app's request quota, all its users together. Default: the top-level `rate_limit`.
    #[serde(default)]
    pub rate_limit: Option<QuotaConfig>,
    /// The app's write quota. Default: the top-level `write_rate_limit`.
    #[serde(default)]
    pub write_rate_limit: Option<QuotaConfig>,
    /// The app's most requests in flight. Default: the top-level `max_in_flight`.
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    /// Each user's own request quota within the app's (by the token's `sub` when the token has
    /// the `openid` scope, else by the token). Default: none.
    #[serde(default)]
    pub per_user_rate_limit: Option<QuotaConfig>,
    /// Origins whose pages may call with this app's tokens (a single-page app), as a client's
    /// `allowed_origins`. Needs the top-level `cors` section. Default: `cors.allowed_origins`.
    #[serde(default)]
    pub allowed_origins: Option<Vec<String>>,
    /// How long a token's introspection is trusted before it is asked again (never beyond the
    /// token's `exp`): a revoked token stops working within it. Default `30s`.
    #[serde(
        default = "defaults::introspection_ttl",
        deserialize_with = "parse_duration"
    )]
    pub introspection_ttl: Duration,
}

/// What a restricted client may do; everything not listed is refused with 403.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowConfig {
    /// Doctype (or `*`) to operations: `read`, `create`, `update`, `delete`, `doc_method`,
    /// `write` (create + update + delete) or `all`.
    #[serde(default)]
    pub resources: IndexMap<String, Vec<String>>,
    /// Whitelisted functions: a catalogued function by any of its dotted names (its arguments
    /// are judged by the catalog), `prefix.*` over a namespace the catalog does not cover, or
    /// an app's own method `{ name, args: { arg: kind } }` / `{ name, judged_by_its_own_code:
    /// true }`. `login` and the catalog's always-refused functions are never allowed.
    #[serde(default)]
    pub methods: Vec<MethodRule>,
    /// File upload and download. Default `false`.
    #[serde(default)]
    pub files: bool,
    /// Paths that are none of the above (desk and website pages). Default `false`.
    #[serde(default)]
    pub other: bool,
    /// Judge `fields`, `filters`, `or_filters`, `order_by`, `group_by` (and `fieldname` of
    /// `frappe.client.get_value`) in every request with a safe grammar: plain columns, columns
    /// of readable doctypes, `count`/`sum`/`avg`/`min`/`max`, aliases, Frappe's filter shapes and
    /// operators; anything else is 403. Default `true`. Turn off only for a client whose own
    /// methods take arguments of those names in other shapes: Frappe's query layer then lets
    /// such arguments read other tables.
    #[serde(default = "defaults::yes")]
    pub check_query_arguments: bool,
}

/// One `allow.methods` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MethodRule {
    /// A catalogued function's dotted name, or `prefix.*`.
    Name(String),
    /// A method outside the catalog, with what it may receive.
    App(AppMethodRule),
}

/// A method of the operator's own app, outside the catalog.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppMethodRule {
    /// Its dotted name.
    pub name: String,
    /// Argument name to kind (`doctype:read`, `docname`, `fields`, `filters`, `doc:create`,
    /// `scalar`, `text`, ...): any other argument is refused.
    #[serde(default)]
    pub args: Option<IndexMap<String, String>>,
    /// Grant it whatever it receives: its own code judges its arguments.
    #[serde(default)]
    pub judged_by_its_own_code: bool,
}

impl MethodRule {
    /// The name (or `prefix.*`) the rule is about.
    pub fn name(&self) -> &str {
        match self {
            Self::Name(name) => name,
            Self::App(app) => &app.name,
        }
    }
}

/// The admin token; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(pub String);

impl std::str::FromStr for AdminToken {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A string after `${ENV}` expansion.
#[derive(Clone, PartialEq, Eq)]
pub struct EnvString(pub String);

impl fmt::Debug for EnvString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::str::FromStr for EnvString {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// A backend base URL.
#[derive(Debug, Clone)]
pub struct Backend(pub http::Uri);

impl<'de> Deserialize<'de> for Backend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = expand_env(&String::deserialize(d)?).map_err(de::Error::custom)?;
        let uri: http::Uri = text
            .parse()
            .map_err(|e| de::Error::custom(format!("'{text}' is not a URL: {e}")))?;
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            // Not echoed: the part before '@' would be a password in the error and the logs.
            return Err(de::Error::custom(
                "a backend URL must not carry credentials (user:password@): erpgate signs \
                 requests with the service account's token",
            ));
        }
        let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
        let path_ok = matches!(uri.path(), "" | "/") && uri.query().is_none();
        if !scheme_ok || uri.authority().is_none() || !path_ok {
            return Err(de::Error::custom(format!(
                "'{text}' must be http:// or https://, a host and optional port, and no path"
            )));
        }
        Ok(Self(uri))
    }
}

/// A trusted proxy address or range.
#[derive(Debug, Clone)]
pub struct TrustedProxy(pub ipnet::IpNet);

impl<'de> Deserialize<'de> for TrustedProxy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if let Ok(net) = text.parse::<ipnet::IpNet>() {
            return Ok(Self(net));
        }
        text.parse::<std::net::IpAddr>()
            .map(|ip| Self(ip.into()))
            .map_err(|_| de::Error::custom(format!("'{text}' is not an IP address or CIDR range")))
    }
}

/// A size in bytes: a count, or a number with `KB`, `MB`, `GB`, `KiB`, `MiB`, `GiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => Ok(Self(n)),
            Raw::Text(t) => parse_size(&t).map(Self).ok_or_else(|| {
                de::Error::custom(format!(
                    "'{t}' is not a size (examples: 1048576, 512KiB, 100MiB)"
                ))
            }),
        }
    }
}

pub(crate) fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(factor)
}

mod defaults {
    use super::*;

    pub fn cors_allowed_headers() -> Vec<String> {
        [
            "authorization",
            "content-type",
            "accept",
            "idempotency-key",
            "x-frappe-csrf-token",
            "x-request-id",
        ]
        .map(String::from)
        .to_vec()
    }

    pub fn cors_exposed_headers() -> Vec<String> {
        [
            "ratelimit",
            "ratelimit-policy",
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
            "retry-after",
            "x-request-id",
            "x-cache",
            "etag",
        ]
        .map(String::from)
        .to_vec()
    }

    pub fn public_per_minute() -> u32 {
        120
    }

    pub fn public_burst() -> u32 {
        30
    }

    pub fn oauth_token_cache_bytes() -> ByteSize {
        ByteSize(4 << 20)
    }

    pub fn introspection_ttl() -> Duration {
        Duration::from_secs(30)
    }

    pub fn log_buffer_lines() -> usize {
        64 * 1024
    }

    pub fn subscription_timeout() -> Duration {
        Duration::from_secs(10)
    }

    pub fn openapi_metadata_ttl() -> Duration {
        Duration::from_secs(300)
    }

    pub fn events_retry_for() -> Duration {
        Duration::from_secs(24 * 3600)
    }

    pub fn events_initial_backoff() -> Duration {
        Duration::from_secs(5)
    }

    pub fn events_max_backoff() -> Duration {
        Duration::from_secs(3600)
    }

    pub fn events_max_pending() -> u64 {
        10_000
    }

    pub fn events_feed_retention() -> Duration {
        Duration::from_secs(24 * 3600)
    }

    pub fn events_max_feed() -> u64 {
        100_000
    }

    pub fn sample_ratio() -> f64 {
        1.0
    }

    pub fn service_name() -> String {
        "erpgate".into()
    }

    pub fn export_interval() -> Duration {
        Duration::from_secs(5)
    }

    pub fn export_timeout() -> Duration {
        Duration::from_secs(10)
    }

    pub fn max_queue_size() -> usize {
        2048
    }

    pub fn cors_max_age() -> Duration {
        Duration::from_secs(600)
    }

    pub fn cors_preflights_per_minute() -> u32 {
        600
    }

    pub fn cors_preflight_burst() -> u32 {
        100
    }

    pub fn compression_encodings() -> Vec<ContentCoding> {
        vec![ContentCoding::Zstd, ContentCoding::Br, ContentCoding::Gzip]
    }

    pub fn compression_min_bytes() -> ByteSize {
        ByteSize(1024)
    }

    pub fn compression_types() -> Vec<String> {
        [
            "application/json",
            "text/*",
            "application/javascript",
            "application/xml",
            "image/svg+xml",
        ]
        .map(String::from)
        .to_vec()
    }

    pub fn listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 8080))
    }
    pub fn admin_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9090))
    }
    pub fn log_level() -> String {
        "info".into()
    }
    pub fn max_body_bytes() -> ByteSize {
        ByteSize(100 << 20)
    }
    pub fn max_inspected_body_bytes() -> ByteSize {
        ByteSize(8 << 20)
    }
    pub fn header_read_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_request_head_bytes() -> ByteSize {
        ByteSize(8 << 10)
    }
    pub fn shutdown_grace() -> Duration {
        Duration::from_secs(30)
    }
    pub fn auth_failures_per_minute() -> u32 {
        30
    }
    pub fn auth_failures_burst() -> u32 {
        10
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn total_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn reload_interval() -> Duration {
        Duration::from_secs(2)
    }
    pub fn cache_max_bytes() -> ByteSize {
        ByteSize(256 << 20)
    }
    pub fn cache_max_entry_bytes() -> ByteSize {
        ByteSize(1 << 20)
    }
    pub fn cache_reads() -> Vec<super::CacheReads> {
        vec![super::CacheReads::List, super::CacheReads::Document]
    }
    pub fn rate_limit() -> Option<QuotaConfig> {
        Some(QuotaConfig {
            per_second: Some(100),
            per_minute: None,
            burst: Some(200),
        })
    }
    pub fn max_in_flight() -> u32 {
        64
    }
    pub fn max_connections() -> u32 {
        10_000
    }

    pub fn idle_timeout() -> Duration {
        Duration::from_secs(60)
    }

    pub fn http2_max_concurrent_streams() -> u32 {
        100
    }

    pub fn http2_keepalive_interval() -> Duration {
        Duration::from_secs(20)
    }

    pub fn buffer_memory() -> ByteSize {
        ByteSize(1 << 20)
    }

    pub fn buffer_max_memory() -> ByteSize {
        ByteSize(256 << 20)
    }

    pub fn buffer_max_disk() -> ByteSize {
        ByteSize(4 << 30)
    }

    pub fn buffer_max_client_share() -> f64 {
        0.25
    }

    pub fn client_body_timeout() -> Duration {
        Duration::from_secs(15)
    }

    pub fn yes() -> bool {
        true
    }
    pub fn consecutive_failures() -> u32 {
        5
    }
    pub fn open_base() -> Duration {
        Duration::from_secs(5)
    }
    pub fn open_max() -> Duration {
        Duration::from_secs(60)
    }
    pub fn failure_rate() -> f64 {
        0.5
    }
    pub fn min_requests() -> u32 {
        20
    }
    pub fn rate_window() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_retries() -> u32 {
        2
    }
    pub fn retry_backoff_base() -> Duration {
        Duration::from_millis(50)
    }
    pub fn retry_backoff_max() -> Duration {
        Duration::from_secs(1)
    }
    pub fn max_retry_after() -> Duration {
        Duration::from_secs(2)
    }
    pub fn budget_percent() -> u32 {
        20
    }
    pub fn budget_min_per_second() -> u32 {
        1
    }
    pub fn retry_max_body_bytes() -> ByteSize {
        ByteSize(1 << 20)
    }
    pub fn read_only_methods() -> Vec<String> {
        [
            "frappe.client.get_list",
            "frappe.client.get",
            "frappe.client.get_count",
            "frappe.client.get_value",
            "frappe.client.get_single_value",
            "frappe.desk.search.search_link",
            "frappe.auth.get_logged_user",
            "ping",
        ]
        .map(String::from)
        .to_vec()
    }
    pub fn quota_batch() -> u32 {
        1
    }
    pub fn redis_key_prefix() -> String {
        "erpgate:".into()
    }
    pub fn redis_connect_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn redis_command_timeout() -> Duration {
        Duration::from_millis(250)
    }
    pub fn idempotency_ttl() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn idempotency_max_bytes() -> ByteSize {
        ByteSize(16 << 20)
    }
    pub fn idempotency_max_response_bytes() -> ByteSize {
        ByteSize(1 << 20)
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: defaults::log_level(),
            buffer_lines: defaults::log_buffer_lines(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: defaults::max_body_bytes(),
            max_inspected_body_bytes: defaults::max_inspected_body_bytes(),
            max_request_head_bytes: defaults::max_request_head_bytes(),
            header_read_timeout: defaults::header_read_timeout(),
            shutdown_grace: defaults::shutdown_grace(),
            drain_delay: Duration::ZERO,
            max_connections: defaults::max_connections(),
            idle_timeout: defaults::idle_timeout(),
            http2_max_concurrent_streams: defaults::http2_max_concurrent_streams(),
            http2_keepalive_interval: defaults::http2_keepalive_interval(),
        }
    }
}

impl Default for AuthFailureLimit {
    fn default() -> Self {
        Self {
            per_minute: defaults::auth_failures_per_minute(),
            burst: defaults::auth_failures_burst(),
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: defaults::connect_timeout(),
            request: defaults::request_timeout(),
            total: defaults::total_timeout(),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: defaults::cache_max_bytes(),
            max_entry_bytes: defaults::cache_max_entry_bytes(),
            rules: Vec::new(),
        }
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: defaults::consecutive_failures(),
            failure_rate: None,
            open_base: defaults::open_base(),
            open_max: defaults::open_max(),
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: defaults::max_retries(),
            backoff_base: defaults::retry_backoff_base(),
            backoff_max: defaults::retry_backoff_max(),
            max_retry_after: defaults::max_retry_after(),
            budget_percent: defaults::budget_percent(),
            budget_min_per_second: defaults::budget_min_per_second(),
            max_body_bytes: defaults::retry_max_body_bytes(),
            read_only_methods: defaults::read_only_methods(),
        }
    }
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            ttl: defaults::idempotency_ttl(),
            max_bytes: defaults::idempotency_max_bytes(),
            max_response_bytes: defaults::idempotency_max_response_bytes(),
        }
    }
}

impl QuotaConfig {
    /// The governor quota, or why there is none.
    pub fn quota(&self) -> Result<governor::Quota, String> {
        use std::num::NonZeroU32;
        let (rate, quota) = match (self.per_second, self.per_minute) {
            (Some(n), None) => (n, NonZeroU32::new(n).map(governor::Quota::per_second)),
            (None, Some(n)) => (n, NonZeroU32::new(n).map(governor::Quota::per_minute)),
            _ => return Err("needs exactly one of per_second and per_minute".into()),
        };
        let quota = quota.ok_or("the rate must be at least 1")?;
        let burst =
            NonZeroU32::new(self.burst.unwrap_or(rate)).ok_or("burst must be at least 1")?;
        Ok(quota.allow_burst(burst))
    }
}
