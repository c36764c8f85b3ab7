//! Metrics of one Wasm filter: the ones its guest defines through the ABI
//! (`proxy_define_metric`) and the host's own counters about the filter
//! (calls, failures, instances). The gateway renders both on `/metrics`
//! from [`WasmMetrics::snapshot`] and [`WasmMetrics::host`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

/// What kind of metric a guest defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    pub(crate) fn from_abi(t: u32) -> Option<MetricKind> {
        match t {
            0 => Some(MetricKind::Counter),
            1 => Some(MetricKind::Gauge),
            2 => Some(MetricKind::Histogram),
            _ => None,
        }
    }
}

/// Upper bounds of the histogram buckets: powers of two up to 2^40. Guests
/// record whatever unit they like (a score, microseconds, bytes), so the
/// buckets are unit-free.
pub const HISTOGRAM_BOUNDS: usize = 41;

/// One metric's value at the time of [`WasmMetrics::snapshot`].
#[derive(Debug, Clone, PartialEq)]
pub enum MetricValue {
    Counter(u64),
    Gauge(u64),
    Histogram {
        count: u64,
        sum: u64,
        /// `(upper bound, cumulative count)`, Prometheus style; the `+Inf`
        /// bucket is `count`.
        buckets: Vec<(u64, u64)>,
    },
}

/// A guest-defined metric and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSample {
    /// The name the guest gave (`proxy_define_metric`).
    pub name: String,
    pub value: MetricValue,
}

struct Metric {
    name: String,
    kind: MetricKind,
    value: AtomicU64,
    sum: AtomicU64,
    buckets: Box<[AtomicU64]>,
}

impl Metric {
    fn new(name: String, kind: MetricKind) -> Metric {
        let n = if kind == MetricKind::Histogram {
            HISTOGRAM_BOUNDS
        } else {
            0
        };
        Metric {
            name,
            kind,
            value: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            buckets: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// The host's counters about one filter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostStats {
    /// Calls into the guest (every callback, including allocations' callers).
    pub calls: u64,
    /// Calls that ended in a trap (panic, `unreachable`, bad memory access).
    pub traps: u64,
    /// Calls stopped by the epoch deadline.
    pub timeouts: u64,
    /// Calls that failed after the memory cap refused to grow memory.
    pub out_of_memory: u64,
    /// Instances created (the first ones and every replacement of a
    /// poisoned one). Stays small under any number of requests.
    pub instances_created: u64,
    /// Instances discarded after a failure.
    pub instances_poisoned: u64,
    /// Streams failed open (filter skipped) or closed (500).
    pub failed_open: u64,
    pub failed_closed: u64,
    /// Streams that found no instance because the module is backed off
    /// after failing repeatedly.
    pub backed_off: u64,
    /// Module reloads that were swapped in / refused.
    pub reloads: u64,
    pub reload_failures: u64,
    /// Wall time spent in guest calls, nanoseconds.
    pub call_nanos: u64,
}

#[derive(Default)]
pub(crate) struct HostCounters {
    pub calls: AtomicU64,
    pub traps: AtomicU64,
    pub timeouts: AtomicU64,
    pub out_of_memory: AtomicU64,
    pub instances_created: AtomicU64,
    pub instances_poisoned: AtomicU64,
    pub failed_open: AtomicU64,
    pub failed_closed: AtomicU64,
    pub backed_off: AtomicU64,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    pub call_nanos: AtomicU64,
}

/// All metrics of one Wasm filter, shared by its instances.
#[derive(Default)]
pub struct WasmMetrics {
    // Defining is rare (root context start-up); recording is the hot path
    // and only takes the read lock.
    metrics: RwLock<Vec<Metric>>,
    by_name: Mutex<HashMap<String, u32>>,
    pub(crate) host: HostCounters,
}

/// Guests may define at most this many metrics per filter.
const MAX_METRICS: usize = 1024;

impl WasmMetrics {
    /// Defines a metric, or returns the id of the one with the same name
    /// and kind. `None`: a different kind under that name, or too many.
    pub(crate) fn define(&self, kind: MetricKind, name: &str) -> Option<u32> {
        let mut by_name = self.by_name.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&id) = by_name.get(name) {
            let metrics = self.metrics.read().unwrap_or_else(|e| e.into_inner());
            return (metrics.get(id as usize)?.kind == kind).then_some(id);
        }
        let mut metrics = self.metrics.write().unwrap_or_else(|e| e.into_inner());
        if metrics.len() >= MAX_METRICS {
            return None;
        }
        let id = metrics.len() as u32;
        metrics.push(Metric::new(name.to_string(), kind));
        by_name.insert(name.to_string(), id);
        Some(id)
    }

    fn with<R>(&self, id: u32, f: impl FnOnce(&Metric) -> R) -> Option<R> {
        let metrics = self.metrics.read().unwrap_or_else(|e| e.into_inner());
        metrics.get(id as usize).map(f)
    }

    /// `proxy_increment_metric`: counters only go up, gauges both ways.
    /// `Err(())` for a histogram or a negative counter step.
    pub(crate) fn increment(&self, id: u32, delta: i64) -> Option<Result<(), ()>> {
        self.with(id, |m| match m.kind {
            MetricKind::Counter if delta >= 0 => {
                m.value.fetch_add(delta as u64, Ordering::Relaxed);
                Ok(())
            }
            MetricKind::Gauge => {
                m.value.fetch_add(delta as u64, Ordering::Relaxed); // wrapping two's complement
                Ok(())
            }
            _ => Err(()),
        })
    }

    /// `proxy_record_metric`: sets a counter or gauge, observes a histogram.
    pub(crate) fn record(&self, id: u32, value: u64) -> Option<()> {
        self.with(id, |m| match m.kind {
            MetricKind::Counter | MetricKind::Gauge => m.value.store(value, Ordering::Relaxed),
            MetricKind::Histogram => {
                m.value.fetch_add(1, Ordering::Relaxed);
                m.sum.fetch_add(value, Ordering::Relaxed);
                let bucket = (64 - value.saturating_sub(1).leading_zeros()) as usize;
                // Values above the last bound count only in `+Inf`.
                if let Some(b) = m.buckets.get(bucket) {
                    b.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    }

    /// `proxy_get_metric`: the value of a counter or gauge; `Err(())` for a
    /// histogram (the ABI has no way to return one).
    pub(crate) fn get(&self, id: u32) -> Option<Result<u64, ()>> {
        self.with(id, |m| match m.kind {
            MetricKind::Histogram => Err(()),
            _ => Ok(m.value.load(Ordering::Relaxed)),
        })
    }

    /// Every guest-defined metric with its current value, in definition order.
    pub fn snapshot(&self) -> Vec<MetricSample> {
        let metrics = self.metrics.read().unwrap_or_else(|e| e.into_inner());
        metrics
            .iter()
            .map(|m| {
                let value = match m.kind {
                    MetricKind::Counter => MetricValue::Counter(m.value.load(Ordering::Relaxed)),
                    MetricKind::Gauge => MetricValue::Gauge(m.value.load(Ordering::Relaxed)),
                    MetricKind::Histogram => {
                        let mut acc = 0;
                        let buckets = m
                            .buckets
                            .iter()
                            .enumerate()
                            .map(|(i, b)| {
                                acc += b.load(Ordering::Relaxed);
                                (1u64 << i, acc)
                            })
                            .collect();
                        MetricValue::Histogram {
                            count: m.value.load(Ordering::Relaxed),
                            sum: m.sum.load(Ordering::Relaxed),
                            buckets,
                        }
                    }
                };
                MetricSample {
                    name: m.name.clone(),
                    value,
                }
            })
            .collect()
    }

    /// The value of the guest metric `name`, if defined (counters and
    /// gauges; a histogram's count).
    pub fn value(&self, name: &str) -> Option<u64> {
        let id = *self
            .by_name
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)?;
        self.with(id, |m| m.value.load(Ordering::Relaxed))
    }

    /// The host's counters about this filter.
    pub fn host(&self) -> HostStats {
        let h = &self.host;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HostStats {
            calls: l(&h.calls),
            traps: l(&h.traps),
            timeouts: l(&h.timeouts),
            out_of_memory: l(&h.out_of_memory),
            instances_created: l(&h.instances_created),
            instances_poisoned: l(&h.instances_poisoned),
            failed_open: l(&h.failed_open),
            failed_closed: l(&h.failed_closed),
            backed_off: l(&h.backed_off),
            reloads: l(&h.reloads),
            reload_failures: l(&h.reload_failures),
            call_nanos: l(&h.call_nanos),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn define_record_get() {
        let m = WasmMetrics::default();
        let c = m.define(MetricKind::Counter, "c").unwrap();
        assert_eq!(m.define(MetricKind::Counter, "c"), Some(c));
        assert_eq!(m.define(MetricKind::Gauge, "c"), None);
        let g = m.define(MetricKind::Gauge, "g").unwrap();
        let h = m.define(MetricKind::Histogram, "h").unwrap();
        m.increment(c, 2).unwrap().unwrap();
        assert!(m.increment(c, -1).unwrap().is_err());
        m.record(g, 10).unwrap();
        m.increment(g, -3).unwrap().unwrap();
        m.record(h, 0).unwrap();
        m.record(h, 3).unwrap();
        m.record(h, u64::MAX).unwrap();
        assert_eq!(m.get(c), Some(Ok(2)));
        assert_eq!(m.get(g), Some(Ok(7)));
        assert_eq!(m.get(h), Some(Err(())));
        assert_eq!(m.get(99), None);
        let snap = m.snapshot();
        let MetricValue::Histogram { count, buckets, .. } = &snap[2].value else {
            panic!("histogram expected")
        };
        assert_eq!(*count, 3);
        assert_eq!(buckets[0], (1, 1)); // 0 lands in the first bucket
        assert_eq!(buckets[2], (4, 2)); // 3 <= 4
        assert_eq!(buckets.last().unwrap().1, 2); // u64::MAX only in +Inf
    }
}
