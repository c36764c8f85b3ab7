//! OpenTelemetry span export (`[tracing]`): one server span per request,
//! exported over OTLP/HTTP (protobuf) off the request path.
//!
//! - The span is built with the OpenTelemetry API directly, not through a
//!   `tracing` layer (see docs/decisions.md): [`Otel::start_span`] makes it
//!   when the request arrives, as a child of the client's `traceparent`
//!   (remote parent) or as a new trace's root, and the SDK's parent-based
//!   sampler decides. The span's own context becomes this hop's
//!   [`TraceContext`], which is what goes upstream as `traceparent`: same
//!   trace id, the span's id as `parent-id`, the sampling decision in the
//!   flags. So the upstream's spans are children of the gateway's.
//! - The span ends when the response body has been sent or the client went
//!   away (`ProxyBody`'s drop, like the access log line).
//! - Ended spans go to a bounded queue ([`Queue`]) and the SDK's batch
//!   processor thread exports them ([`Counted`] around the OTLP exporter).
//!   The HTTP request itself runs on the gateway's runtime with its own
//!   hyper client ([`Transport`]). A full queue drops the span at once and
//!   counts it (`flashgate_otlp_spans_dropped_total`): a slow or dead
//!   collector never slows a request.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags,
    TraceId, TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;

use crate::config::TracingConfig;
use crate::headers::{RemoteParent, TraceContext};
use crate::observe::metrics::{Metrics, OtlpMetrics};

/// The exporter of a running gateway: built at start from `[tracing]`,
/// kept until the process stops (a reload does not change it).
pub struct Otel {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    shutdown_timeout: Duration,
    shut_down: AtomicBool,
}

impl std::fmt::Debug for Otel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Otel").finish_non_exhaustive()
    }
}

impl Otel {
    /// Builds the exporter. Must run on the gateway's tokio runtime: export
    /// requests are spawned onto it.
    pub fn start(cfg: &TracingConfig, metrics: &Metrics) -> Result<Otel, String> {
        let url = cfg.traces_url()?;
        let counters = metrics
            .otlp()
            .map_err(|e| format!("registering the exporter's metrics: {e}"))?;
        let transport = Transport {
            runtime: tokio::runtime::Handle::try_current()
                .map_err(|_| "the span exporter needs a tokio runtime".to_string())?,
            client: Client::builder(TokioExecutor::new()).build_http(),
            timeout: cfg.export_timeout.0,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(url.to_string())
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(cfg.export_timeout.0)
            .with_http_client(transport)
            .with_headers(cfg.headers.clone().into_iter().collect())
            .build()
            .map_err(|e| format!("building the OTLP exporter: {e}"))?;
        let queued = Arc::new(AtomicUsize::new(0));
        let exporter = Counted {
            inner: exporter,
            queued: queued.clone(),
            metrics: counters.clone(),
            failing: AtomicBool::new(false),
        };
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(cfg.max_queue_size)
            .with_max_export_batch_size(cfg.max_export_batch_size)
            .with_scheduled_delay(cfg.scheduled_delay.0)
            .build();
        let processor = Queue {
            inner: BatchSpanProcessor::new(exporter, batch),
            queued,
            max: cfg.max_queue_size,
            metrics: counters,
        };
        // Root spans (no decision from the client) are sampled at
        // `sample_ratio` by trace id; a client's decision is kept.
        let root = if cfg.sample_ratio >= 1.0 {
            Sampler::AlwaysOn
        } else if cfg.sample_ratio <= 0.0 {
            Sampler::AlwaysOff
        } else {
            Sampler::TraceIdRatioBased(cfg.sample_ratio)
        };
        let resource = Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(root)))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("flashgate");
        Ok(Otel {
            tracer,
            provider,
            // The last batch may need a whole export, retries included.
            shutdown_timeout: cfg.export_timeout.0 + Duration::from_secs(1),
            shut_down: AtomicBool::new(false),
        })
    }

    /// Starts the request's server span: a child of the client's valid
    /// `traceparent`, else the root of a new trace. Its context is what the
    /// upstream gets as `traceparent`.
    pub fn start_span(&self, head: &http::request::Parts) -> RequestSpan {
        let parent = RemoteParent::from_headers(&head.headers);
        let cx = match parent {
            Some(p) => Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(p.trace_id),
                SpanId::from_bytes(p.span_id),
                TraceFlags::new(p.flags),
                true,
                TraceState::default(),
            )),
            None => Context::new(),
        };
        let builder = SpanBuilder::from_name(match method_name(&head.method) {
            "_OTHER" => "HTTP",
            m => m,
        })
        .with_kind(SpanKind::Server);
        let span = self.tracer.build_with_context(builder, &cx);
        let sc = span.span_context();
        let context = if sc.is_valid() {
            let sampled = u8::from(sc.is_sampled());
            TraceContext {
                trace_id: sc.trace_id().to_bytes(),
                span_id: sc.span_id().to_bytes(),
                // Other flag bits the client set are passed on as they came.
                flags: parent.map_or(0, |p| p.flags & !1) | sampled,
            }
        } else {
            // The provider is shut down (the process is stopping): carry
            // the trace on as without an exporter.
            TraceContext::continue_or_start(&head.headers)
        };
        RequestSpan {
            span,
            context,
            method: method_name(&head.method),
        }
    }

    /// Exports what is queued and stops the exporter, within the export
    /// timeout. At the end of a drain.
    pub async fn shutdown(&self) {
        if self.shut_down.swap(true, Ordering::AcqRel) {
            return;
        }
        let provider = self.provider.clone();
        let timeout = self.shutdown_timeout;
        // Blocking (it waits for the batch thread, whose export runs on
        // this runtime): not on a runtime worker.
        let _ = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout)).await;
    }
}

impl Drop for Otel {
    /// A gateway dropped without `shutdown` (tests): the provider's own
    /// drop would block the dropping thread, possibly a runtime worker,
    /// while the last export runs on that runtime. Shut it down on a
    /// thread of its own instead.
    fn drop(&mut self) {
        if self.shut_down.swap(true, Ordering::AcqRel) {
            return;
        }
        let provider = self.provider.clone();
        let timeout = self.shutdown_timeout;
        let _ = std::thread::Builder::new()
            .name("flashgate-otel-stop".into())
            .spawn(move || provider.shutdown_with_timeout(timeout));
    }
}

/// `http.request.method` per the semantic conventions: the known methods
/// as they are, anything else `_OTHER`.
fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::CONNECT => "CONNECT",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::PATCH => "PATCH",
        _ => "_OTHER",
    }
}

/// One request's server span, from its arrival to the end of its response
/// body. Attributes follow the OpenTelemetry HTTP semantic conventions;
/// gateway-specific ones are `flashgate.*`.
pub struct RequestSpan {
    span: opentelemetry_sdk::trace::Span,
    /// This hop's trace context: the upstream's `traceparent`.
    pub context: TraceContext,
    method: &'static str,
}

/// What the request looked like when it arrived.
pub struct Arrival<'a> {
    pub head: &'a http::request::Parts,
    pub scheme: &'static str,
    pub listener: &'a Arc<str>,
    pub peer: SocketAddr,
    pub client: IpAddr,
    pub request_id: &'a HeaderValue,
}

/// How the request was answered (when the response head is ready).
pub struct Answer<'a> {
    pub route: &'a Arc<str>,
    /// The routing host; empty for requests refused before routing.
    pub host: &'a str,
    /// The normalized path (without the query).
    pub path: &'a str,
    pub upstream: Option<&'a str>,
    pub status: StatusCode,
    pub headers: &'a HeaderMap,
}

impl RequestSpan {
    /// Whether the span is sampled (recorded and exported).
    pub fn recording(&self) -> bool {
        self.span.is_recording()
    }

    /// The request's attributes, right after it arrived.
    pub fn arrived(&mut self, a: Arrival<'_>) {
        if !self.recording() {
            return;
        }
        let method = self.method;
        let mut attrs = Vec::with_capacity(10);
        attrs.push(KeyValue::new("http.request.method", method));
        if method == "_OTHER" {
            attrs.push(KeyValue::new(
                "http.request.method_original",
                a.head.method.as_str().to_string(),
            ));
        }
        attrs.push(KeyValue::new("url.scheme", a.scheme));
        attrs.push(KeyValue::new("network.protocol.name", "http"));
        let version = match a.head.version {
            Version::HTTP_09 => "0.9",
            Version::HTTP_10 => "1.0",
            Version::HTTP_2 => "2",
            Version::HTTP_3 => "3",
            _ => "1.1",
        };
        attrs.push(KeyValue::new("network.protocol.version", version));
        attrs.push(KeyValue::new(
            "network.peer.address",
            a.peer.ip().to_string(),
        ));
        attrs.push(KeyValue::new("network.peer.port", i64::from(a.peer.port())));
        attrs.push(KeyValue::new("client.address", a.client.to_string()));
        if let Some(ua) = a
            .head
            .headers
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
        {
            attrs.push(KeyValue::new("user_agent.original", ua.to_string()));
        }
        attrs.push(KeyValue::new("flashgate.listener", a.listener.clone()));
        if let Ok(id) = a.request_id.to_str() {
            attrs.push(KeyValue::new("flashgate.request_id", id.to_string()));
        }
        self.span.set_attributes(attrs);
    }

    /// The answer's attributes and the span's final name
    /// (`{method} {route}`); status error on 5xx.
    pub fn answered(&mut self, a: Answer<'_>) {
        if !self.recording() {
            return;
        }
        let mut attrs = Vec::with_capacity(6);
        attrs.push(KeyValue::new("flashgate.route", a.route.clone()));
        if !a.host.is_empty() {
            attrs.push(KeyValue::new("server.address", a.host.to_string()));
        }
        attrs.push(KeyValue::new("url.path", a.path.to_string()));
        if let Some(up) = a.upstream {
            attrs.push(KeyValue::new("flashgate.upstream", up.to_string()));
        }
        attrs.push(KeyValue::new(
            "http.response.status_code",
            i64::from(a.status.as_u16()),
        ));
        if a.status.is_server_error() {
            // The gateway's own cause when it answered itself (502
            // connect_refused, 504 upstream_timeout, ...), else the status.
            let cause = a
                .headers
                .get("x-flashgate-error")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .unwrap_or_else(|| a.status.as_str().to_string());
            attrs.push(KeyValue::new("error.type", cause));
            self.span.set_status(Status::error(""));
        }
        self.span.set_attributes(attrs);
        // `{method} {route}`; `HTTP {route}` for an unknown method.
        let method = match self.method {
            "_OTHER" => "HTTP",
            m => m,
        };
        self.span.update_name(format!("{method} {}", a.route));
    }

    /// Ends the span: the response body is done (`complete`) or the client
    /// went away. `bytes`: body bytes handed to the client connection.
    pub fn finish(mut self, bytes: u64, complete: bool) {
        if self.recording() {
            self.span.set_attributes([
                KeyValue::new(
                    "http.response.body.size",
                    i64::try_from(bytes).unwrap_or(i64::MAX),
                ),
                KeyValue::new("flashgate.response.complete", complete),
            ]);
        }
        self.span.end();
    }
}

/// In front of the batch processor: counts what is queued and drops at
/// once, counted, what would not fit. The SDK's processor drops on a full
/// queue too, but does not say how many; with this count in front its
/// queue never fills (`queued` only falls when the exporter takes a batch,
/// after the batch left the SDK's queue).
#[derive(Debug)]
struct Queue {
    inner: BatchSpanProcessor,
    queued: Arc<AtomicUsize>,
    max: usize,
    metrics: OtlpMetrics,
}

impl SpanProcessor for Queue {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.metrics.dropped.inc();
            return;
        }
        self.metrics.queued.inc();
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Around the OTLP exporter, on the batch thread: takes exported batches
/// off the queue count, counts results, and logs when export starts or
/// stops failing (not once per batch).
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    queued: Arc<AtomicUsize>,
    metrics: OtlpMetrics,
    failing: AtomicBool,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let n = batch.len();
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                Some(q.saturating_sub(n))
            });
        let export = self.inner.export(batch);
        async move {
            let result = export.await;
            match &result {
                Ok(()) => {
                    self.metrics.exported.inc_by(n as u64);
                    if self.failing.swap(false, Ordering::Relaxed) {
                        tracing::info!("OTLP span export works again");
                    }
                }
                Err(e) => {
                    self.metrics.export_failed.inc_by(n as u64);
                    if !self.failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e, spans = n, "OTLP span export failed; spans are lost until the collector answers (flashgate_otlp_spans_total{{result=\"export_failed\"}})");
                    }
                }
            }
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter's HTTP client: the SDK calls it on its batch thread (no
/// runtime there); the request runs on the gateway's runtime, bounded by
/// the export timeout. Plain HTTP/1.1 (`tracing.endpoint` is `http://`).
#[derive(Debug)]
struct Transport {
    runtime: tokio::runtime::Handle,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

/// Largest collector answer read (an OTLP answer is a few bytes, or a
/// partial-success message).
const MAX_ANSWER: usize = 64 * 1024;

impl HttpClient for Transport {
    fn send_bytes<'life0, 'async_trait>(
        &'life0 self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let client = self.client.clone();
        let timeout = self.timeout;
        // A runtime that is shutting down cancels the task: the export
        // fails, nothing panics.
        let task = self.runtime.spawn(async move {
            let (parts, body) = request.into_parts();
            let request = Request::from_parts(parts, Full::new(body));
            let exchange = async {
                let response = client.request(request).await?;
                let (parts, body) = response.into_parts();
                let body = Limited::new(body, MAX_ANSWER).collect().await?.to_bytes();
                Ok::<_, HttpError>(Response::from_parts(parts, body))
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(result) => result,
                Err(_) => Err(HttpError::from(format!(
                    "no answer from the collector within {timeout:?}"
                ))),
            }
        });
        Box::pin(async move {
            match task.await {
                Ok(result) => result,
                Err(e) => Err(HttpError::from(format!("export task: {e}"))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn otel(ratio: f64) -> Otel {
        let cfg: TracingConfig = toml::from_str(&format!(
            "endpoint = \"http://127.0.0.1:9/v1/traces\"\nsample_ratio = {ratio:?}"
        ))
        .unwrap();
        Otel::start(&cfg, &Metrics::new()).unwrap()
    }

    fn head(traceparent: Option<&str>) -> http::request::Parts {
        let mut b = Request::get("/x");
        if let Some(tp) = traceparent {
            b = b.header("traceparent", tp);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[tokio::test]
    async fn span_continues_the_clients_trace() {
        let o = otel(1.0);
        let s = o.start_span(&head(Some(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )));
        assert!(s.recording());
        assert_eq!(s.context.trace_id[..3], [0x4b, 0xf9, 0x2f]);
        assert_ne!(
            s.context.span_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(s.context.flags, 1);
        let data = s.span.exported_data().unwrap();
        assert_eq!(data.parent_span_id.to_bytes()[..2], [0x00, 0xf0]);
        assert!(data.parent_span_is_remote);
        assert_eq!(data.span_context.span_id().to_bytes(), s.context.span_id);
        o.shutdown().await;
    }

    #[tokio::test]
    async fn sampling_is_parent_based() {
        // The client said "not sampled": not recorded, flags stay 00.
        let o = otel(1.0);
        let s = o.start_span(&head(Some(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )));
        assert!(!s.recording());
        assert_eq!(s.context.flags, 0);
        assert_eq!(s.context.trace_id[..3], [0x4b, 0xf9, 0x2f]);
        // The client said "sampled": honoured even at ratio 0.
        let o = otel(0.0);
        let s = o.start_span(&head(Some(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )));
        assert!(s.recording());
        // No traceparent at ratio 0: a new trace, not sampled.
        let s = o.start_span(&head(None));
        assert!(!s.recording());
        assert_eq!(s.context.flags, 0);
        assert_ne!(s.context.trace_id, [0; 16]);
        o.shutdown().await;
        // After shutdown requests still get a trace context.
        let s = o.start_span(&head(None));
        assert_ne!(s.context.trace_id, [0; 16]);
    }
}
