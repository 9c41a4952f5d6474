//! The Prometheus registry and every metric erpgate exports. Label values come only from
//! configuration (site and client names) and fixed sets (request kind, status code), never from
//! request text, so cardinality is bounded by the config.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Latency buckets in seconds, from a cached answer to a slow report.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The log writer's count of lines it dropped (its buffer full), when logging goes through it.
static DROPPED_LOG_LINES: std::sync::OnceLock<tracing_appender::non_blocking::ErrorCounter> =
    std::sync::OnceLock::new();

/// Reports `counter` (the non-blocking log writer's) as `erpgate_log_lines_dropped_total`.
pub fn count_dropped_log_lines(counter: tracing_appender::non_blocking::ErrorCounter) {
    let _ = DROPPED_LOG_LINES.set(counter);
}

/// All metric handles.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `erpgate_requests_total{site,client,kind,code}`
    pub requests: IntCounterVec,
    /// `erpgate_request_duration_seconds{site,kind}`: to the response head.
    pub request_duration: HistogramVec,
    /// `erpgate_upstream_duration_seconds{site}`: one upstream exchange, to the response head.
    pub upstream_duration: HistogramVec,
    /// `erpgate_inflight_requests`
    pub inflight: IntGauge,
    /// `erpgate_auth_failures_total{reason}`
    pub auth_failures: IntCounterVec,
    /// `erpgate_rate_limited_total{client,reason}`: reason `rate`, `write_rate`, `concurrency`.
    pub rate_limited: IntCounterVec,
    /// `erpgate_breaker_state{site}`: 0 closed, 1 half-open, 2 open.
    pub breaker_state: IntGaugeVec,
    /// `erpgate_breaker_transitions_total{site,state}`
    pub breaker_transitions: IntCounterVec,
    /// `erpgate_retries_total{site,reason}`: reason `connect`, `timeout`, `reset`, `status`,
    /// or `budget_exhausted` for a retry the budget refused.
    pub retries: IntCounterVec,
    /// `erpgate_cache_events_total{site,result}`: `hit`, `miss`, `collapsed` (waited for another
    /// request's miss), `stale`, `bypass`.
    pub cache_events: IntCounterVec,
    /// `erpgate_cache_invalidations_total{site,reason}`: `write`, `webhook`, `purge`.
    pub cache_invalidations: IntCounterVec,
    /// `erpgate_cache_evictions_total`: entries pushed out by the byte bound.
    pub cache_evictions: IntCounter,
    /// `erpgate_cache_bytes`
    pub cache_bytes: IntGauge,
    /// `erpgate_oauth_introspections_total{site,outcome}`: tokens looked up at a site,
    /// `active`, `inactive` or `error`.
    pub oauth_introspections: IntCounterVec,
    /// `erpgate_trace_exports_total{outcome}`: span batches sent to the collector, `ok` or
    /// `error`.
    pub trace_exports: IntCounterVec,
    /// `erpgate_trace_spans_dropped_total`: spans lost to failed exports.
    pub trace_spans_dropped: IntCounter,
    /// `erpgate_compression_bytes_total{encoding,stage}`: bytes of compressed responses before
    /// (`identity`) and after (`encoded`) compression; the difference is what was saved.
    pub compression_bytes: IntCounterVec,
    /// `erpgate_connections_refused_total`: public connections closed at once, over the cap.
    pub connections_refused: IntCounter,
    /// `erpgate_unparseable_requests_total`: requests the HTTP parser refused before any layer
    /// saw them (answered 400 by the server).
    pub unparseable_requests: IntCounter,
    /// `erpgate_open_connections`: public connections open now.
    pub open_connections: IntGauge,
    /// `erpgate_idempotency_evictions_total{client}`: kept outcomes pushed out by the client's
    /// own byte budget.
    pub idempotency_evictions: IntCounterVec,
    /// `erpgate_cache_entries`
    pub cache_entries: IntGauge,
    /// `erpgate_config_reloads_total{result}`: `success` or `failure`.
    pub config_reloads: IntCounterVec,
    /// `erpgate_config_info{hash}`: 1 for the configuration in force.
    pub config_info: IntGaugeVec,
    /// Shared state (Redis): reachable or not, command latency and errors, fallbacks to
    /// per-replica state, pub/sub traffic.
    pub redis: RedisMetrics,
    /// The event relay.
    pub events: EventMetrics,
    /// `erpgate_log_lines_dropped_total`: log lines the writer dropped, its buffer full.
    pub log_lines_dropped: IntCounter,
    /// `erpgate_buffered_bytes{store}`: bytes of buffered bodies held now, `memory` or `disk`.
    pub buffered_bytes: IntGaugeVec,
    /// `erpgate_buffer_refusals_total{direction,reason}`: bodies the buffering budget could not
    /// hold, `request` (refused) or `response` (passed on unheld); reason `budget` (everyone's
    /// budget full), `client_share` (the client's share full) or `too_large`.
    pub buffer_refusals: IntCounterVec,
}

/// The event relay's metrics.
#[derive(Clone, Debug)]
pub struct EventMetrics {
    /// `erpgate_events_received_total{site}`: events accepted from Frappe (persisted).
    pub received: IntCounterVec,
    /// `erpgate_events_repeated_total{site}`: webhook bodies seen again within minutes (a
    /// Frappe retry, or a replay), acknowledged and not stored again.
    pub repeats: IntCounterVec,
    /// `erpgate_events_refused_total{site,reason}`: signed webhooks sent to a doctype's intake
    /// URL whose body is not an event of that doctype (`other_doctype`, `repeated_key`,
    /// `no_doctype`): refused, nothing stored or purged.
    pub refused: IntCounterVec,
    /// `erpgate_event_deliveries_total{client,subscription,outcome}`: `delivered`, `failed` (an
    /// attempt, retried later), `dead_lettered`, `gone` (ended by a 410), `dropped` (over the
    /// subscription's cap), `forbidden` (the client's rules no longer let it read the doctype).
    pub deliveries: IntCounterVec,
    /// `erpgate_event_backlog{client,subscription}`: deliveries still to make.
    pub backlog: IntGaugeVec,
    /// `erpgate_event_oldest_undelivered_seconds{client,subscription}`.
    pub oldest_undelivered: prometheus::GaugeVec,
    /// `erpgate_event_dead_letters{client,subscription}`.
    pub dead_letters: IntGaugeVec,
}

impl EventMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let labels = &["client", "subscription"];
        let received = IntCounterVec::new(
            Opts::new(
                "erpgate_events_received_total",
                "Events accepted from Frappe webhooks and stored, by site.",
            ),
            &["site"],
        )?;
        let repeats = IntCounterVec::new(
            Opts::new(
                "erpgate_events_repeated_total",
                "Webhook bodies received again within minutes, acknowledged and not stored again.",
            ),
            &["site"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "erpgate_events_refused_total",
                "Signed webhooks refused because their body is not an event of the doctype their \
                 URL names, by site and reason.",
            ),
            &["site", "reason"],
        )?;
        let deliveries = IntCounterVec::new(
            Opts::new(
                "erpgate_event_deliveries_total",
                "Event deliveries by outcome: delivered, failed (retried later), dead_lettered, \
                 gone, dropped, forbidden.",
            ),
            &["client", "subscription", "outcome"],
        )?;
        let backlog = IntGaugeVec::new(
            Opts::new(
                "erpgate_event_backlog",
                "Event deliveries still to make, by subscription.",
            ),
            labels,
        )?;
        let oldest_undelivered = prometheus::GaugeVec::new(
            Opts::new(
                "erpgate_event_oldest_undelivered_seconds",
                "Age of the oldest event not yet delivered, by subscription.",
            ),
            labels,
        )?;
        let dead_letters = IntGaugeVec::new(
            Opts::new(
                "erpgate_event_dead_letters",
                "Deliveries given up on (listable and replayable on the admin listener).",
            ),
            labels,
        )?;
        for collector in [
            Box::new(received.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(repeats.clone()),
            Box::new(refused.clone()),
            Box::new(deliveries.clone()),
            Box::new(backlog.clone()),
            Box::new(oldest_undelivered.clone()),
            Box::new(dead_letters.clone()),
        ] {
            registry.register(collector)?;
        }
        Ok(Self {
            received,
            repeats,
            refused,
            deliveries,
            backlog,
            oldest_undelivered,
            dead_letters,
        })
    }
}

/// The shared-state metrics.
#[derive(Clone, Debug)]
pub struct RedisMetrics {
    /// 1 while Redis answers, 0 while the replica runs on its own state.
    pub up: IntGauge,
    /// Time of one Redis command, by command.
    pub command_duration: HistogramVec,
    /// Redis commands that failed or timed out, by command.
    pub errors: IntCounterVec,
    /// Decisions made without Redis, by what fell back.
    pub fallbacks: IntCounterVec,
    /// Pub/sub messages, by direction (`sent`, `received`).
    pub pubsub_messages: IntCounterVec,
    /// Times the Redis server was found to have restarted (its `run_id` changed).
    pub restarts: IntCounter,
}

impl RedisMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let up = IntGauge::new(
            "erpgate_redis_up",
            "1 while the shared-state Redis answers; 0 while this replica runs on its own state.",
        )?;
        let command_duration = HistogramVec::new(
            HistogramOpts::new(
                "erpgate_redis_command_duration_seconds",
                "Time of one shared-state Redis command.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            &["command"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "erpgate_redis_errors_total",
                "Shared-state Redis commands that failed or timed out.",
            ),
            &["command"],
        )?;
        let fallbacks = IntCounterVec::new(
            Opts::new(
                "erpgate_shared_state_fallbacks_total",
                "Decisions made without the shared state: quota and auth_failures (local \
                 limiter), idempotency_refused, idempotency_unprotected, cache_bypass.",
            ),
            &["what"],
        )?;
        let pubsub_messages = IntCounterVec::new(
            Opts::new(
                "erpgate_redis_pubsub_messages_total",
                "Invalidation and block messages exchanged with other replicas.",
            ),
            &["direction"],
        )?;
        let restarts = IntCounter::new(
            "erpgate_redis_restarts_total",
            "Times the shared-state Redis was found restarted (a new run_id): what it did not \
             persist (quota windows, Idempotency-Key records, events) was lost.",
        )?;
        for collector in [
            Box::new(up.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(command_duration.clone()),
            Box::new(errors.clone()),
            Box::new(fallbacks.clone()),
            Box::new(pubsub_messages.clone()),
            Box::new(restarts.clone()),
        ] {
            registry.register(collector)?;
        }
        Ok(Self {
            up,
            command_duration,
            errors,
            fallbacks,
            pubsub_messages,
            restarts,
        })
    }
}

impl Metrics {
    /// Creates and registers every metric, plus process metrics where the platform has them.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "erpgate_requests_total",
                "Requests answered, by site, client, kind and status code.",
            ),
            &["site", "client", "kind", "code"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "erpgate_request_duration_seconds",
                "Time from request to response head.",
            )
            .buckets(BUCKETS.to_vec()),
            &["site", "kind"],
        )?;
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "erpgate_upstream_duration_seconds",
                "Time of one upstream exchange to its response head.",
            )
            .buckets(BUCKETS.to_vec()),
            &["site"],
        )?;
        let inflight = IntGauge::new("erpgate_inflight_requests", "Requests being handled.")?;
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "erpgate_auth_failures_total",
                "Failed gateway authentications, by reason.",
            ),
            &["reason"],
        )?;
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "erpgate_rate_limited_total",
                "Requests refused by a client quota or concurrency cap.",
            ),
            &["client", "reason"],
        )?;
        let breaker_state = IntGaugeVec::new(
            Opts::new(
                "erpgate_breaker_state",
                "Circuit breaker state per site: 0 closed, 1 half-open, 2 open.",
            ),
            &["site"],
        )?;
        let breaker_transitions = IntCounterVec::new(
            Opts::new(
                "erpgate_breaker_transitions_total",
                "Circuit breaker state changes.",
            ),
            &["site", "state"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new("erpgate_retries_total", "Upstream retries, by reason."),
            &["site", "reason"],
        )?;
        let cache_events = IntCounterVec::new(
            Opts::new("erpgate_cache_events_total", "Cache lookups, by result."),
            &["site", "result"],
        )?;
        let cache_invalidations = IntCounterVec::new(
            Opts::new(
                "erpgate_cache_invalidations_total",
                "Cache invalidations, by reason.",
            ),
            &["site", "reason"],
        )?;
        let cache_evictions = IntCounter::new(
            "erpgate_cache_evictions_total",
            "Cache entries evicted by the byte bound.",
        )?;
        let cache_bytes = IntGauge::new("erpgate_cache_bytes", "Bytes held by the cache.")?;
        let oauth_introspections = IntCounterVec::new(
            Opts::new(
                "erpgate_oauth_introspections_total",
                "OAuth access tokens looked up at their site, by outcome.",
            ),
            &["site", "outcome"],
        )?;
        let trace_exports = IntCounterVec::new(
            Opts::new(
                "erpgate_trace_exports_total",
                "Span batches sent to the OTLP collector, by outcome.",
            ),
            &["outcome"],
        )?;
        let trace_spans_dropped = IntCounter::new(
            "erpgate_trace_spans_dropped_total",
            "Spans lost because their export failed.",
        )?;
        let compression_bytes = IntCounterVec::new(
            Opts::new(
                "erpgate_compression_bytes_total",
                "Bytes of compressed responses before (stage=identity) and after (stage=encoded).",
            ),
            &["encoding", "stage"],
        )?;
        let connections_refused = IntCounter::new(
            "erpgate_connections_refused_total",
            "Public connections closed at once because the connection cap was reached.",
        )?;
        let unparseable_requests = IntCounter::new(
            "erpgate_unparseable_requests_total",
            "Requests the HTTP parser refused before erpgate saw them (a request target or \
             header with bytes HTTP does not allow, such as a raw '\"' or space: clients must \
             percent-encode them); the server answered 400 and closed the connection.",
        )?;
        let open_connections =
            IntGauge::new("erpgate_open_connections", "Public connections open now.")?;
        let idempotency_evictions = IntCounterVec::new(
            Opts::new(
                "erpgate_idempotency_evictions_total",
                "Idempotency records evicted by their client's byte budget, by client.",
            ),
            &["client"],
        )?;
        let cache_entries = IntGauge::new("erpgate_cache_entries", "Entries in the cache.")?;
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "erpgate_config_reloads_total",
                "Configuration reloads, by result.",
            ),
            &["result"],
        )?;
        let config_info = IntGaugeVec::new(
            Opts::new(
                "erpgate_config_info",
                "The configuration in force, by the hash of its text.",
            ),
            &["hash"],
        )?;
        for collector in [
            Box::new(config_reloads.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(config_info.clone()),
            Box::new(cache_events.clone()),
            Box::new(cache_invalidations.clone()),
            Box::new(cache_evictions.clone()),
            Box::new(cache_bytes.clone()),
            Box::new(compression_bytes.clone()),
            Box::new(trace_exports.clone()),
            Box::new(oauth_introspections.clone()),
            Box::new(trace_spans_dropped.clone()),
            Box::new(cache_entries.clone()),
            Box::new(idempotency_evictions.clone()),
            Box::new(connections_refused.clone()),
            Box::new(unparseable_requests.clone()),
            Box::new(open_connections.clone()),
        ] {
            registry.register(collector)?;
        }
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(breaker_state.clone()))?;
        registry.register(Box::new(breaker_transitions.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(inflight.clone()))?;
        registry.register(Box::new(auth_failures.clone()))?;
        let redis = RedisMetrics::new(&registry)?;
        let events = EventMetrics::new(&registry)?;
        let log_lines_dropped = IntCounter::new(
            "erpgate_log_lines_dropped_total",
            "Log lines dropped because the log writer's buffer was full (a slow log pipe).",
        )?;
        registry.register(Box::new(log_lines_dropped.clone()))?;
        let buffered_bytes = IntGaugeVec::new(
            Opts::new(
                "erpgate_buffered_bytes",
                "Bytes of request and response bodies held by buffering, by store (memory, disk).",
            ),
            &["store"],
        )?;
        let buffer_refusals = IntCounterVec::new(
            Opts::new(
                "erpgate_buffer_refusals_total",
                "Bodies the buffering budget could not hold: requests refused, responses passed \
                 on unheld; by reason (budget, client_share, too_large).",
            ),
            &["direction", "reason"],
        )?;
        for store in ["memory", "disk"] {
            buffered_bytes.with_label_values(&[store]);
        }
        registry.register(Box::new(buffered_bytes.clone()))?;
        registry.register(Box::new(buffer_refusals.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            registry,
            requests,
            request_duration,
            upstream_duration,
            inflight,
            auth_failures,
            rate_limited,
            breaker_state,
            breaker_transitions,
            retries,
            cache_events,
            cache_invalidations,
            idempotency_evictions,
            connections_refused,
            unparseable_requests,
            open_connections,
            cache_evictions,
            cache_bytes,
            compression_bytes,
            trace_exports,
            trace_spans_dropped,
            oauth_introspections,
            cache_entries,
            config_reloads,
            config_info,
            redis,
            events,
            log_lines_dropped,
            buffered_bytes,
            buffer_refusals,
        })
    }

    /// The text exposition format.
    pub fn encode(&self) -> Vec<u8> {
        if let Some(dropped) = DROPPED_LOG_LINES.get() {
            let (now, counted) = (dropped.dropped_lines() as u64, self.log_lines_dropped.get());
            if now > counted {
                self.log_lines_dropped.inc_by(now - counted);
            }
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a failure would be a bad metric family.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }
}
