//! OpenTelemetry traces: the tracer the span layers use, and the export of finished spans to an
//! OTLP/HTTP collector.
//!
//! Export never touches a request: spans end into the SDK's batch processor, a bounded queue
//! drained by a thread of its own (full queue: the span is dropped, never waited for), which
//! sends batches through [`OtlpClient`] on a small runtime of its own. A failing collector is
//! logged once when it starts failing and once when it recovers, and every lost span is
//! counted (`erpgate_trace_spans_dropped_total`).
//!
//! Sampling is parent-based: a request whose `traceparent` says sampled is recorded, one that
//! says not is not, and a new trace is recorded at `sample_ratio`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry::trace::{SpanKind, TraceContextExt as _, Tracer as _, TracerProvider as _};
use opentelemetry::Context;
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter,
};
use prometheus::{IntCounter, IntCounterVec};

use crate::config::TracingConfig;

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("tracing.endpoint: {0}")]
    Exporter(String),
    #[error("tracing: {0}")]
    Tls(String),
}

/// Export counters, resolved once.
#[derive(Clone, Debug)]
pub struct ExportMetrics {
    /// `erpgate_trace_exports_total{outcome="ok"}`
    pub ok: IntCounter,
    /// `erpgate_trace_exports_total{outcome="error"}`
    pub failed: IntCounter,
    /// `erpgate_trace_spans_dropped_total`: spans of failed exports.
    pub dropped: IntCounter,
}

impl ExportMetrics {
    /// From `erpgate_trace_exports_total` and `erpgate_trace_spans_dropped_total`.
    pub fn new(exports: &IntCounterVec, dropped: &IntCounter) -> Self {
        Self {
            ok: exports.with_label_values(&["ok"]),
            failed: exports.with_label_values(&["error"]),
            dropped: dropped.clone(),
        }
    }
}

/// Starts the spans of the span layers; cheap to clone.
#[derive(Clone, Debug)]
pub struct SpanStarter(Arc<SdkTracer>);

impl SpanStarter {
    /// A span named after the HTTP `method` (the server span renames itself once the request
    /// is classified), of `kind`, under `parent`; the context holding it.
    pub fn start(&self, method: &http::Method, kind: SpanKind, parent: &Context) -> Context {
        let span = self
            .0
            .span_builder(method.as_str().to_owned())
            .with_kind(kind)
            .start_with_context(&*self.0, parent);
        parent.with_span(span)
    }
}

/// The span starter, and the provider it exports through.
pub struct Telemetry {
    /// Starts the spans.
    pub spans: SpanStarter,
    provider: SdkTracerProvider,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Starts exporting as `config` says.
    pub fn start(config: &TracingConfig, metrics: ExportMetrics) -> Result<Self, TelemetryError> {
        let mut endpoint = config.endpoint.0.trim_end_matches('/').to_owned();
        let has_path = endpoint
            .parse::<http::Uri>()
            .is_ok_and(|u| !matches!(u.path(), "" | "/"));
        if !has_path {
            endpoint.push_str("/v1/traces");
        }
        let headers = config
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(OtlpClient::new(config.export_timeout)?)
            .with_endpoint(endpoint)
            .with_timeout(config.export_timeout)
            .with_headers(headers)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let exporter = CountingExporter {
            inner: exporter,
            metrics,
            failing: AtomicBool::new(false),
        };
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(config.max_queue_size)
            .with_scheduled_delay(config.export_interval)
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        let spans = SpanStarter(Arc::new(provider.tracer("erpgate")));
        Ok(Self { spans, provider })
    }
}

impl Drop for Telemetry {
    /// Flushes what is queued and stops the export thread, off the serving threads: shutting
    /// down waits for the last export.
    fn drop(&mut self) {
        let provider = self.provider.clone();
        let _ = std::thread::Builder::new()
            .name("erpgate-otlp-shutdown".into())
            .spawn(move || {
                let _ = provider.shutdown();
            });
    }
}

/// Counts exports and logs a failing collector once, and once again when it recovers.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    metrics: ExportMetrics,
    failing: AtomicBool,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => {
                self.metrics.ok.inc();
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::warn!("trace export works again");
                }
            }
            Err(error) => {
                self.metrics.failed.inc();
                self.metrics.dropped.inc_by(spans);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "trace export failed; spans are dropped until the collector answers");
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The runtime exports run on: one thread, never dropped (a runtime cannot be dropped from
/// async code, and a reload may drop the last exporter anywhere).
fn export_runtime() -> Option<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("erpgate-otlp")
                .enable_all()
                .build()
                .ok()
        })
        .as_ref()
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The HTTP client exports use: hyper on the export runtime, with rustls and the system roots.
#[derive(Debug)]
pub struct OtlpClient {
    client: Client<Connector, Full<Bytes>>,
    timeout: Duration,
}

impl OtlpClient {
    fn new(timeout: Duration) -> Result<Self, TelemetryError> {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| TelemetryError::Tls(e.to_string()))?
        .with_root_certificates(
            crate::upstream::root_store(None).map_err(|e| TelemetryError::Tls(e.to_string()))?,
        )
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpClient {
    async fn send_bytes(
        &self,
        request: Request<Bytes>,
    ) -> Result<Response<Bytes>, opentelemetry_http::HttpError> {
        let runtime = export_runtime().ok_or("the export runtime could not start")?;
        let client = self.client.clone();
        let timeout = self.timeout;
        let exchange = async move {
            let response = client.request(request.map(Full::new)).await?;
            let (parts, body) = response.into_parts();
            // A collector's answer is small; more is not read.
            let body = http_body_util::Limited::new(body, 1 << 20)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(Response::from_parts(parts, body))
        };
        // The export thread is not a tokio one: the exchange runs on the export runtime.
        runtime
            .spawn(async move {
                tokio::time::timeout(timeout, exchange)
                    .await
                    .map_err(|_| -> opentelemetry_http::HttpError { "export timed out".into() })?
            })
            .await
            .map_err(|e| -> opentelemetry_http::HttpError { e.to_string().into() })?
    }
}
