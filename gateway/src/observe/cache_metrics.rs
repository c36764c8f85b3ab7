//! The cache's Prometheus metrics (registered with the gateway's others,
//! so they share the `flashgate_` prefix and `/metrics`).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Lock waits take from a few ms (woken by pub/sub) to `lock_wait`.
const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone)]
pub struct CacheMetrics {
    /// By route and result: hit, miss, stale, bypass, coalesced.
    pub lookups: IntCounterVec,
    /// Origin fetches made to fill the cache, by result: stored,
    /// not_stored (private, too big, not cacheable), error.
    pub fills: IntCounterVec,
    /// Waits for another gateway's fill, by how they ended: filled (took
    /// its entry), took_over (the lock was free: we fill), timeout,
    /// unavailable (Redis failed meanwhile).
    pub lock_waits: IntCounterVec,
    pub lock_wait_seconds: Histogram,
    pub l1_bytes: IntGauge,
    pub l1_entries: IntGauge,
    /// Failed Redis operations, by operation.
    pub l2_errors: IntCounterVec,
    /// 1 while Redis answers (or none is configured), 0 while the cache
    /// runs without L2.
    pub l2_up: IntGauge,
    pub purges: IntCounter,
}

impl CacheMetrics {
    pub fn register(r: &Registry) -> CacheMetrics {
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        CacheMetrics {
            lookups: counter(
                "cache_lookups_total",
                "Cache lookups on caching routes, by result (hit, miss, stale, bypass, coalesced).",
                &["route", "result"],
            ),
            fills: counter(
                "cache_fills_total",
                "Origin fetches made to fill the cache, by result.",
                &["result"],
            ),
            lock_waits: counter(
                "cache_lock_waits_total",
                "Waits for another gateway's fill (the Redis lock), by how they ended.",
                &["result"],
            ),
            lock_wait_seconds: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "cache_lock_wait_seconds",
                        "Time spent waiting for another gateway's fill.",
                    )
                    .buckets(WAIT_BUCKETS.to_vec()),
                )
                .expect("valid metric"),
            ),
            l1_bytes: reg(
                r,
                IntGauge::new("cache_l1_bytes", "Bytes held by the in-process cache.")
                    .expect("valid metric"),
            ),
            l1_entries: reg(
                r,
                IntGauge::new("cache_l1_entries", "Entries held by the in-process cache.")
                    .expect("valid metric"),
            ),
            l2_errors: counter(
                "cache_l2_errors_total",
                "Failed Redis operations of the cache, by operation.",
                &["op"],
            ),
            l2_up: reg(
                r,
                IntGauge::new(
                    "cache_l2_up",
                    "1 while the cache's Redis answers, 0 while it runs without it.",
                )
                .expect("valid metric"),
            ),
            purges: reg(
                r,
                IntCounter::new(
                    "cache_purges_total",
                    "Purges received (admin calls and pub/sub).",
                )
                .expect("valid metric"),
            ),
        }
    }
}
