//! What the gateway tells operators: Prometheus metrics, OpenTelemetry
//! spans and the access log. Every phase reports through here; nothing
//! here decides anything about a request.

pub mod access_log;
pub mod cache_metrics;
pub mod metrics;
pub mod otel;
