//! Prometheus metrics, all prefixed `flashgate_`. Handles that sit on the
//! request path (per-route histograms, per-endpoint counters) are resolved
//! once when config loads, so a request does not hash label values for them.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Latency buckets from 0.5 ms to 10 s: a cache hit and a slow checkout both
/// land in a useful bucket.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Metrics {
    registry: Registry,
    /// Requests answered, by route and status (`route="none"` for 404s).
    pub requests: IntCounterVec,
    /// Time from request head to response head, by route.
    pub request_duration: HistogramVec,
    pub connections_active: IntGaugeVec,
    pub connections_parked: IntGaugeVec,
    pub connections_total: IntCounterVec,
    /// Connections closed by a listener timeout, by listener and timeout
    /// (`header_read`, `idle`).
    pub connection_timeouts: IntCounterVec,
    /// WebSocket tunnels open, by cluster.
    pub websocket_tunnels: IntGaugeVec,
    pub upstream_requests: IntCounterVec,
    /// Failed upstream attempts by cause (the `x-flashgate-error` codes: `connect_refused`, `upstream_timeout`, ...).
    pub upstream_errors: IntCounterVec,
    pub upstream_duration: HistogramVec,
    /// New TCP connections to upstreams; with `upstream_requests` this gives
    /// pool reuse: 1 - connections / requests.
    pub upstream_connections: IntCounterVec,
    pub upstream_retries: IntCounterVec,
    /// Checkouts the core answered 503 `unavailable`, retried with their
    /// `Idempotency-Key`, by route and outcome (`retried`: one more
    /// attempt; `recovered`: a retry got another answer; `exhausted`: the
    /// budget ran out and the 503 went to the buyer).
    pub checkout_retries: IntCounterVec,
    /// Requests refused because the cluster was at `max_concurrent_requests`.
    pub upstream_overflow: IntCounterVec,
    /// Requests routed to all endpoints because none was available.
    pub upstream_panic: IntCounterVec,
    pub endpoint_healthy: IntGaugeVec,
    pub endpoint_ejected: IntGaugeVec,
    pub endpoint_ejections: IntCounterVec,
    pub config_reloads: IntCounterVec,
    /// Connections closed before HTTP, by listener and reason
    /// (`max_connections`, `proxy_protocol`, `tls_handshake`, ...).
    pub connections_refused: IntCounterVec,
    /// Certificate reloads from disk, by listener and result.
    pub tls_cert_reloads: IntCounterVec,
    /// Seconds until each loaded certificate's notAfter, by listener and
    /// name (see `edge::tls`); negative once expired.
    pub tls_cert_expiry: IntGaugeVec,
    /// Bodies read ahead of their reader (see `spool`), by direction
    /// (`request`, `response`) and where they went (`memory`, `file`).
    pub bodies_spooled: IntCounterVec,
    /// Temp file bytes held by spooled bodies now (capped by
    /// `buffering.temp_max`).
    pub spool_temp_bytes: prometheus::IntGauge,
    /// Bodies that stopped being read ahead because the temp cap was
    /// reached (they stream at the reader's pace from then on).
    pub spool_temp_full: IntCounter,
    pub cache: crate::observe::cache_metrics::CacheMetrics,
    /// The load level in effect (0 calm .. 3 critical).
    pub load_level: IntGauge,
    /// The load level requests to each cluster see: the cluster's own or
    /// the process's, the higher (or the forced one).
    pub cluster_load_level: IntGaugeVec,
    /// Requests shed by overload, by route, priority and reason.
    pub shed: IntCounterVec,
    /// Each cluster's concurrency limit in effect (learned or the hard cap).
    pub adaptive_limit: IntGaugeVec,
    /// Each cluster's breaker: 0 closed, 1 open, 2 half open.
    pub breaker_state: IntGaugeVec,
    /// Time requests waited for an upstream slot, by cluster.
    pub queue_seconds: HistogramVec,
    /// Rate limit decisions, by route, limit (`per_ip`, `per_user`,
    /// `per_header`, `route`, `hot`) and outcome (`allowed`, `limited`).
    pub rate_limit_decisions: IntCounterVec,
    /// Keys tracked by the keyed local limits (cap: `rate_limit.max_keys`).
    pub rate_limit_keys: IntGauge,
    /// Fleet limit calls to Redis that failed, by cause (`timeout`, `error`).
    pub rate_limit_redis_errors: IntCounterVec,
    /// 1 while fleet limits reach Redis, 0 while they follow `redis_down`.
    pub rate_limit_redis_up: IntGauge,
    /// Bot rule matches, by route, rule and outcome (the action taken:
    /// `block`, `tarpit`, `tarpit_full`, `challenge`, `cleared`,
    /// `deprioritize`, `log`).
    pub bot_decisions: IntCounterVec,
    /// Proof-of-work challenges by event (`issued`, `passed`, `failed`).
    pub challenges: IntCounterVec,
    /// Waiting rooms: visitors waiting in line, by room (as the store
    /// said at its last decision on this gateway; fleet-wide with Redis).
    pub waiting_room_queue: IntGaugeVec,
    /// Admitted sessions and reserved slots, by room.
    pub waiting_room_active: IntGaugeVec,
    /// Visitors let in by this gateway, by room (`rate()` is admitted/s).
    pub waiting_room_admitted: IntCounterVec,
    /// Time in line of the visitors let in, by room.
    pub waiting_room_wait: HistogramVec,
    /// New tickets given out, by room.
    pub waiting_room_tickets: IntCounterVec,
    /// Tickets and sessions refused, by room and reason.
    pub waiting_room_refused: IntCounterVec,
    /// 1 while the room reaches Redis, 0 while it follows `redis_down`.
    pub waiting_room_redis_up: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("flashgate".into()), None).expect("valid prefix");
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            reg(
                &registry,
                HistogramVec::new(opts, labels).expect("valid metric"),
            )
        };
        Metrics {
            requests: counter("requests_total", "Requests answered, by route and status.", &["route", "status"]),
            request_duration: histogram(
                "request_duration_seconds",
                "Time from request head to response head, by route.",
                &["route"],
            ),
            connections_active: gauge("connections_active", "Open client connections.", &["listener"]),
            connections_parked: gauge(
                "connections_parked",
                "Idle HTTP/1.1 keep-alive connections parked (only the socket and TLS session kept), included in connections_active.",
                &["listener"],
            ),
            connections_total: counter("connections_total", "Accepted client connections.", &["listener"]),
            connection_timeouts: counter(
                "connection_timeouts_total",
                "Client connections closed by a timeout: header_read (a request head too slow; dropped), send (the client took no byte for send_timeout; dropped), stream_idle (an HTTP/2 stream made no progress for stream_idle_timeout; reset), body_read (a request body stalled for body_read_timeout; 408) or idle (no request for idle_timeout; closed gracefully).",
                &["listener", "timeout"],
            ),
            bodies_spooled: counter(
                "bodies_spooled_total",
                "Bodies read ahead of a slow side, by direction (request, response) and where they went (memory, file).",
                &["direction", "to"],
            ),
            spool_temp_bytes: reg(
                &registry,
                prometheus::IntGauge::new(
                    "spool_temp_bytes",
                    "Temp file bytes held by spooled bodies now (cap: buffering.temp_max).",
                )
                .expect("valid metric"),
            ),
            spool_temp_full: reg(
                &registry,
                IntCounter::new(
                    "spool_temp_full_total",
                    "Bodies that could not spill to a temp file (buffering.temp_max reached) and streamed at the reader's pace.",
                )
                .expect("valid metric"),
            ),
            websocket_tunnels: gauge(
                "websocket_tunnels_active",
                "Open WebSocket (upgraded) connections, by upstream cluster.",
                &["cluster"],
            ),
            upstream_requests: counter(
                "upstream_requests_total",
                "Requests sent to upstream endpoints.",
                &["cluster", "endpoint"],
            ),
            upstream_errors: counter(
                "upstream_errors_total",
                "Failed upstream attempts, by cause.",
                &["cluster", "cause"],
            ),
            upstream_duration: histogram(
                "upstream_duration_seconds",
                "Time from sending to an upstream to its response head.",
                &["cluster"],
            ),
            upstream_connections: counter(
                "upstream_connections_total",
                "New TCP connections opened to upstreams (pool misses).",
                &["cluster"],
            ),
            upstream_retries: counter("upstream_retries_total", "Retried upstream attempts.", &["cluster"]),
            checkout_retries: counter(
                "checkout_unavailable_retries_total",
                "Checkouts answered 503 unavailable by the core and retried with their Idempotency-Key, by outcome (retried, recovered, exhausted).",
                &["route", "outcome"],
            ),
            upstream_overflow: counter(
                "upstream_overflow_total",
                "Requests refused with 503 because the cluster was at max_concurrent_requests.",
                &["cluster"],
            ),
            upstream_panic: counter(
                "upstream_panic_total",
                "Upstream attempts sent to an unavailable endpoint because no endpoint was available.",
                &["cluster"],
            ),
            endpoint_healthy: gauge(
                "upstream_endpoint_healthy",
                "1 when the endpoint passes active health checks.",
                &["cluster", "endpoint"],
            ),
            endpoint_ejected: gauge(
                "upstream_endpoint_ejected",
                "1 while the endpoint is ejected by outlier detection.",
                &["cluster", "endpoint"],
            ),
            endpoint_ejections: counter(
                "upstream_ejections_total",
                "Outlier ejections of the endpoint.",
                &["cluster", "endpoint"],
            ),
            config_reloads: counter("config_reloads_total", "Config reloads, by result.", &["result"]),
            connections_refused: counter(
                "connections_refused_total",
                "Client connections closed before HTTP, by reason.",
                &["listener", "reason"],
            ),
            tls_cert_reloads: counter(
                "tls_cert_reloads_total",
                "TLS certificate reloads from disk, by result (error: the old certificates keep serving).",
                &["listener", "result"],
            ),
            tls_cert_expiry: gauge(
                "tls_cert_expiry_seconds",
                "Seconds until the notAfter of each loaded certificate (negative once expired), by listener and name (its first DNS name, else its file); updated on every load and reload check.",
                &["listener", "name"],
            ),
            cache: crate::observe::cache_metrics::CacheMetrics::register(&registry),
            load_level: reg(
                &registry,
                IntGauge::new("load_level", "The load level in effect: 0 calm, 1 elevated, 2 high, 3 critical.")
                    .expect("valid metric"),
            ),
            cluster_load_level: gauge(
                "cluster_load_level",
                "The load level requests to the cluster see: the higher of the cluster's own and the process's (or the forced level).",
                &["cluster"],
            ),
            shed: counter(
                "shed_total",
                "Requests answered by overload protection instead of the upstream, by route, priority and reason (stale, fallback, level, queue_timeout, queue_full, breaker_open).",
                &["route", "priority", "reason"],
            ),
            adaptive_limit: gauge(
                "adaptive_limit",
                "The cluster's concurrency limit in effect (learned from latency, or max_concurrent_requests).",
                &["cluster"],
            ),
            breaker_state: gauge(
                "breaker_state",
                "The cluster's circuit breaker: 0 closed, 1 open, 2 half open.",
                &["cluster"],
            ),
            queue_seconds: histogram(
                "queue_seconds",
                "Time requests waited for an upstream slot in the gateway, by cluster.",
                &["cluster"],
            ),
            rate_limit_decisions: counter(
                "rate_limit_decisions_total",
                "Rate limit decisions, by route, limit (per_ip, per_user, per_header, route, hot) and outcome (allowed, limited).",
                &["route", "limit", "outcome"],
            ),
            rate_limit_keys: reg(
                &registry,
                IntGauge::new(
                    "rate_limit_keys",
                    "Keys tracked by the keyed local rate limits (cap: rate_limit.max_keys; beyond it new keys share an overflow budget).",
                )
                .expect("valid metric"),
            ),
            rate_limit_redis_errors: counter(
                "rate_limit_redis_errors_total",
                "Fleet rate limit calls to Redis that failed, by cause (timeout, error).",
                &["cause"],
            ),
            rate_limit_redis_up: reg(
                &registry,
                IntGauge::new(
                    "rate_limit_redis_up",
                    "1 while fleet rate limits reach Redis, 0 while they follow rate_limit.redis_down.",
                )
                .expect("valid metric"),
            ),
            bot_decisions: counter(
                "bot_decisions_total",
                "Bot rule matches, by route, rule and outcome (block, tarpit, tarpit_full, challenge, cleared, deprioritize, log).",
                &["route", "rule", "outcome"],
            ),
            challenges: counter(
                "challenges_total",
                "Proof-of-work challenges, by event (issued, passed: exchanged for a clearance cookie, failed: a wrong or stale answer).",
                &["event"],
            ),
            waiting_room_queue: gauge(
                "waiting_room_queue_length",
                "Visitors waiting in line, by room (fleet-wide with [redis], as of this gateway's last decision).",
                &["room"],
            ),
            waiting_room_active: gauge(
                "waiting_room_active_users",
                "Admitted sessions and reserved slots, by room (capped by active_users).",
                &["room"],
            ),
            waiting_room_admitted: counter(
                "waiting_room_admitted_total",
                "Visitors let in (a session started) by this gateway, by room.",
                &["room"],
            ),
            waiting_room_wait: {
                let opts = HistogramOpts::new(
                    "waiting_room_wait_seconds",
                    "Time in line of the visitors let in, from their ticket to their session, by room.",
                )
                .buckets(vec![
                    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
                    3600.0,
                ]);
                reg(
                    &registry,
                    HistogramVec::new(opts, &["room"]).expect("valid metric"),
                )
            },
            waiting_room_tickets: counter(
                "waiting_room_tickets_issued_total",
                "New places in line given out by this gateway, by room.",
                &["room"],
            ),
            waiting_room_refused: counter(
                "waiting_room_tickets_refused_total",
                "Tickets and sessions refused, by room and reason (bad_signature, moved, expired, malformed, prefix_cap, full, challenge).",
                &["room", "reason"],
            ),
            waiting_room_redis_up: gauge(
                "waiting_room_redis_up",
                "1 while the room reaches Redis, 0 while it follows its redis_down.",
                &["room"],
            ),
            registry,
        }
    }

    /// Registers the span exporter's counters (`[tracing]`); called once,
    /// when the exporter starts, so a gateway without one shows none.
    pub fn otlp(&self) -> prometheus::Result<OtlpMetrics> {
        let spans = IntCounterVec::new(
            Opts::new(
                "otlp_spans_total",
                "Request spans by what became of them: queued (entered the export queue), exported (the collector accepted them), export_failed (lost: the export failed after its retries). Queue-full drops: otlp_spans_dropped_total.",
            ),
            &["result"],
        )?;
        self.registry.register(Box::new(spans.clone()))?;
        let dropped = IntCounter::with_opts(Opts::new(
            "otlp_spans_dropped_total",
            "Request spans dropped because the export queue was full (collector slow or down).",
        ))?;
        self.registry.register(Box::new(dropped.clone()))?;
        Ok(OtlpMetrics {
            queued: spans.with_label_values(&["queued"]),
            exported: spans.with_label_values(&["exported"]),
            export_failed: spans.with_label_values(&["export_failed"]),
            dropped,
        })
    }

    /// Every metric family, for readers in the process (the admin
    /// dashboard's sampler) that need values rather than text.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        out
    }
}

/// The span exporter's counters (see `crate::observe::otel`).
#[derive(Clone, Debug)]
pub struct OtlpMetrics {
    /// Sampled spans that entered the export queue.
    pub queued: IntCounter,
    /// Spans the collector accepted (a 2xx answer).
    pub exported: IntCounter,
    /// Spans whose export request failed after its retries (collector down,
    /// refused, timed out): they are lost.
    pub export_failed: IntCounter,
    /// Spans not queued because the queue was full.
    pub dropped: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Renders the Wasm filters' metrics in the Prometheus text format: the
/// host's counters per filter (`flashgate_wasm_*{filter=...}`) and the
/// metrics guests define through the ABI, under one family per kind with
/// the guest's name as a label (guest names are free text, not valid
/// Prometheus names).
pub fn render_wasm(filters: &[(String, std::sync::Arc<filters::wasm::WasmFilter>)]) -> String {
    use filters::wasm::MetricValue;
    use std::fmt::Write;
    let mut out = String::new();
    if filters.is_empty() {
        return out;
    }
    let esc = |s: &str| {
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    let host: Vec<_> = filters
        .iter()
        .map(|(n, f)| (esc(n), f.metrics().host()))
        .collect();
    type Family = (
        &'static str,
        &'static str,
        fn(&filters::wasm::HostStats) -> u64,
    );
    let families: [Family; 11] = [
        ("calls_total", "Calls into Wasm guests.", |h| h.calls),
        ("traps_total", "Guest calls that trapped.", |h| h.traps),
        (
            "timeouts_total",
            "Guest calls stopped by the deadline.",
            |h| h.timeouts,
        ),
        (
            "out_of_memory_total",
            "Guest calls that hit the memory cap.",
            |h| h.out_of_memory,
        ),
        ("instances_created_total", "Wasm instances created.", |h| {
            h.instances_created
        }),
        (
            "instances_poisoned_total",
            "Wasm instances discarded after a failure.",
            |h| h.instances_poisoned,
        ),
        (
            "failed_open_total",
            "Streams that skipped a failing filter (fail = open).",
            |h| h.failed_open,
        ),
        (
            "failed_closed_total",
            "Streams answered 500 by a failing filter (fail = closed).",
            |h| h.failed_closed,
        ),
        (
            "backed_off_total",
            "Streams that found the module backed off after repeated failures.",
            |h| h.backed_off,
        ),
        (
            "reloads_total",
            "Wasm modules reloaded and swapped in.",
            |h| h.reloads,
        ),
        (
            "reload_failures_total",
            "Wasm module reloads refused (the old module kept serving).",
            |h| h.reload_failures,
        ),
    ];
    for (name, help, get) in families {
        let _ = writeln!(
            out,
            "# HELP flashgate_wasm_{name} {help}\n# TYPE flashgate_wasm_{name} counter"
        );
        for (filter, h) in &host {
            let _ = writeln!(
                out,
                "flashgate_wasm_{name}{{filter=\"{filter}\"}} {}",
                get(h)
            );
        }
    }
    let _ = writeln!(out, "# HELP flashgate_wasm_call_seconds_total Time spent in guest calls (one call in 8 timed, scaled).\n# TYPE flashgate_wasm_call_seconds_total counter");
    for (filter, h) in &host {
        let _ = writeln!(
            out,
            "flashgate_wasm_call_seconds_total{{filter=\"{filter}\"}} {}",
            h.call_nanos as f64 / 1e9
        );
    }
    let mut counters = String::new();
    let mut gauges = String::new();
    let mut histograms = String::new();
    for (filter, f) in filters {
        let filter = esc(filter);
        for sample in f.metrics().snapshot() {
            let name = esc(&sample.name);
            match sample.value {
                MetricValue::Counter(v) => {
                    let _ = writeln!(
                        counters,
                        "flashgate_wasm_guest_counter{{filter=\"{filter}\",name=\"{name}\"}} {v}"
                    );
                }
                MetricValue::Gauge(v) => {
                    let _ = writeln!(
                        gauges,
                        "flashgate_wasm_guest_gauge{{filter=\"{filter}\",name=\"{name}\"}} {v}"
                    );
                }
                MetricValue::Histogram {
                    count,
                    sum,
                    buckets,
                } => {
                    for (le, c) in buckets {
                        let _ = writeln!(histograms, "flashgate_wasm_guest_histogram_bucket{{filter=\"{filter}\",name=\"{name}\",le=\"{le}\"}} {c}");
                    }
                    let _ = writeln!(histograms, "flashgate_wasm_guest_histogram_bucket{{filter=\"{filter}\",name=\"{name}\",le=\"+Inf\"}} {count}");
                    let _ = writeln!(histograms, "flashgate_wasm_guest_histogram_sum{{filter=\"{filter}\",name=\"{name}\"}} {sum}");
                    let _ = writeln!(histograms, "flashgate_wasm_guest_histogram_count{{filter=\"{filter}\",name=\"{name}\"}} {count}");
                }
            }
        }
    }
    for (family, kind, body) in [
        ("flashgate_wasm_guest_counter", "counter", counters),
        ("flashgate_wasm_guest_gauge", "gauge", gauges),
        ("flashgate_wasm_guest_histogram", "histogram", histograms),
    ] {
        if !body.is_empty() {
            let _ = writeln!(
                out,
                "# HELP {family} Metrics defined by Wasm filters.\n# TYPE {family} {kind}"
            );
            out.push_str(&body);
        }
    }
    out
}
