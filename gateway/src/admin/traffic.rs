//! Live traffic for `/admin/status` and the dashboard (`/admin/ui`).
//!
//! Once a second the admin task samples the counters the gateway already
//! keeps (the Prometheus registry and the Wasm host statistics) and keeps
//! the last [`WINDOW`] seconds of samples. Rates, the p99 and the cache hit
//! ratio are taken between the oldest and the newest sample, so they say
//! what happens now, not since the start. Every number of one snapshot
//! comes from the same sample (`seq`), so a reader can tell which moment it
//! shows.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::proto::MetricFamily;
use serde_json::{json, Value};

use crate::Shared;

/// How far back rates and the p99 look.
pub const WINDOW: Duration = Duration::from_secs(10);
/// How often a sample is taken.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Lookups that did not go to the origin for the answer.
const CACHE_SERVED: &[&str] = &["hit", "stale", "coalesced"];

#[derive(Clone, Default)]
struct RouteSample {
    requests: u64,
    errors_5xx: u64,
    /// Cumulative bucket counts of the request duration (upper bound in
    /// seconds, count), and the total count.
    buckets: Vec<(f64, u64)>,
    count: u64,
}

#[derive(Clone)]
struct Sample {
    seq: u64,
    at: Instant,
    load_level: u8,
    routes: BTreeMap<String, RouteSample>,
    cache_served: u64,
    cache_missed: u64,
    shed: BTreeMap<String, u64>,
    ejections: BTreeMap<(String, String), u64>,
    /// Per Wasm filter: calls, traps.
    wasm: BTreeMap<String, (u64, u64)>,
    /// Rate limit decisions per (route, limit): allowed, limited.
    limits: BTreeMap<(String, String), (u64, u64)>,
    /// Bot rule matches per (route, rule, outcome).
    bots: BTreeMap<(String, String, String), u64>,
    /// Proof-of-work challenges by event (issued, passed, failed).
    challenges: BTreeMap<String, u64>,
}

/// The samples of the last [`WINDOW`].
#[derive(Default)]
pub struct Traffic {
    samples: Mutex<VecDeque<Sample>>,
}

fn label<'a>(m: &'a prometheus::proto::Metric, name: &str) -> &'a str {
    m.get_label()
        .iter()
        .find(|l| l.name() == name)
        .map_or("", |l| l.value())
}

fn counter(m: &prometheus::proto::Metric) -> u64 {
    m.get_counter().get_value() as u64
}

impl Traffic {
    /// Takes a sample now and drops those older than the window.
    pub fn sample(&self, shared: &Shared) {
        let families = shared.metrics.gather();
        let family = |name: &str| -> &[prometheus::proto::Metric] {
            families
                .iter()
                .find(|f: &&MetricFamily| f.name() == name)
                .map_or(&[], |f| f.get_metric())
        };
        let mut routes: BTreeMap<String, RouteSample> = BTreeMap::new();
        for m in family("flashgate_requests_total") {
            let r = routes.entry(label(m, "route").to_string()).or_default();
            r.requests += counter(m);
            if label(m, "status").starts_with('5') {
                r.errors_5xx += counter(m);
            }
        }
        for m in family("flashgate_request_duration_seconds") {
            let r = routes.entry(label(m, "route").to_string()).or_default();
            let h = m.get_histogram();
            r.count = h.get_sample_count();
            r.buckets = h
                .get_bucket()
                .iter()
                .map(|b| (b.upper_bound(), b.cumulative_count()))
                .collect();
        }
        let (mut cache_served, mut cache_missed) = (0, 0);
        for m in family("flashgate_cache_lookups_total") {
            let result = label(m, "result");
            if CACHE_SERVED.contains(&result) {
                cache_served += counter(m);
            } else if result == "miss" {
                cache_missed += counter(m);
            }
        }
        let mut shed = BTreeMap::new();
        for m in family("flashgate_shed_total") {
            *shed.entry(label(m, "route").to_string()).or_default() += counter(m);
        }
        let ejections = family("flashgate_upstream_ejections_total")
            .iter()
            .map(|m| {
                (
                    (
                        label(m, "cluster").to_string(),
                        label(m, "endpoint").to_string(),
                    ),
                    counter(m),
                )
            })
            .collect();
        let mut limits: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
        for m in family("flashgate_rate_limit_decisions_total") {
            let e = limits
                .entry((label(m, "route").to_string(), label(m, "limit").to_string()))
                .or_default();
            match label(m, "outcome") {
                "allowed" => e.0 += counter(m),
                _ => e.1 += counter(m),
            }
        }
        let bots = family("flashgate_bot_decisions_total")
            .iter()
            .map(|m| {
                let key = (
                    label(m, "route").to_string(),
                    label(m, "rule").to_string(),
                    label(m, "outcome").to_string(),
                );
                (key, counter(m))
            })
            .collect();
        let challenges = family("flashgate_challenges_total")
            .iter()
            .map(|m| (label(m, "event").to_string(), counter(m)))
            .collect();
        let wasm = shared
            .runtime
            .load()
            .wasm
            .iter()
            .map(|(name, f)| {
                let h = f.metrics().host();
                (name.clone(), (h.calls, h.traps))
            })
            .collect();
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let seq = samples.back().map_or(1, |s| s.seq + 1);
        let at = Instant::now();
        samples.push_back(Sample {
            seq,
            at,
            load_level: shared.overload.level(),
            routes,
            cache_served,
            cache_missed,
            shed,
            ejections,
            wasm,
            limits,
            bots,
            challenges,
        });
        while samples
            .front()
            .is_some_and(|s| at.duration_since(s.at) > WINDOW + INTERVAL / 2)
        {
            samples.pop_front();
        }
    }

    /// The latest sample and the rates over the window, as JSON; `seq` 0
    /// before the first sample.
    pub fn snapshot(&self) -> Value {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let (Some(old), Some(new)) = (samples.front(), samples.back()) else {
            return json!({"seq": 0, "window_s": 0.0, "routes": [], "wasm": [], "ejections": [],
                          "limits": [], "bots": []});
        };
        let secs = new.at.duration_since(old.at).as_secs_f64();
        let rate = |delta: u64| {
            if secs > 0.0 {
                (delta as f64 / secs * 10.0).round() / 10.0
            } else {
                0.0
            }
        };
        let empty = RouteSample::default();
        let routes: Vec<Value> = new
            .routes
            .iter()
            .map(|(name, r)| {
                let before = old.routes.get(name).unwrap_or(&empty);
                json!({
                    "route": name,
                    "requests": r.requests,
                    "errors_5xx": r.errors_5xx,
                    "rps": rate(r.requests.saturating_sub(before.requests)),
                    "p99_ms": p99_ms(r, before),
                    "shed": new.shed.get(name).copied().unwrap_or(0),
                })
            })
            .collect();
        let served = new.cache_served.saturating_sub(old.cache_served);
        let missed = new.cache_missed.saturating_sub(old.cache_missed);
        let hit_ratio = (served + missed > 0)
            .then(|| (served as f64 / (served + missed) as f64 * 1000.0).round() / 1000.0);
        let shed_total: u64 = new.shed.values().sum();
        let shed_before: u64 = old.shed.values().sum();
        let wasm: Vec<Value> = new
            .wasm
            .iter()
            .map(|(name, (calls, traps))| {
                let (c0, _) = old.wasm.get(name).copied().unwrap_or((0, 0));
                json!({"filter": name, "calls": calls, "traps": traps,
                       "calls_per_s": rate(calls.saturating_sub(c0))})
            })
            .collect();
        let ejections: Vec<Value> = new
            .ejections
            .iter()
            .map(|((cluster, endpoint), n)| json!({"cluster": cluster, "endpoint": endpoint, "total": n}))
            .collect();
        let limits: Vec<Value> = new
            .limits
            .iter()
            .map(|((route, limit), (allowed, limited))| {
                let (_, l0) = old
                    .limits
                    .get(&(route.clone(), limit.clone()))
                    .copied()
                    .unwrap_or((0, 0));
                json!({"route": route, "limit": limit, "allowed": allowed, "limited": limited,
                       "limited_per_s": rate(limited.saturating_sub(l0))})
            })
            .collect();
        let limited_total: u64 = new.limits.values().map(|(_, l)| l).sum();
        let limited_before: u64 = old.limits.values().map(|(_, l)| l).sum();
        let bots: Vec<Value> = new
            .bots
            .iter()
            .map(|(key, n)| {
                let n0 = old.bots.get(key).copied().unwrap_or(0);
                json!({"route": key.0, "rule": key.1, "outcome": key.2, "total": n,
                       "per_s": rate(n.saturating_sub(n0))})
            })
            .collect();
        let bots_total: u64 = new.bots.values().sum();
        let bots_before: u64 = old.bots.values().sum();
        json!({
            "seq": new.seq,
            "window_s": (secs * 10.0).round() / 10.0,
            "load_level": new.load_level,
            "rps": rate(
                new.routes.values().map(|r| r.requests).sum::<u64>()
                    .saturating_sub(old.routes.values().map(|r| r.requests).sum::<u64>())
            ),
            "routes": routes,
            "cache": {"served": new.cache_served, "missed": new.cache_missed, "hit_ratio": hit_ratio},
            "shed": {"total": shed_total, "per_s": rate(shed_total.saturating_sub(shed_before))},
            "wasm": wasm,
            "ejections": ejections,
            "limits": limits,
            "limited": {"total": limited_total, "per_s": rate(limited_total.saturating_sub(limited_before))},
            "bots": bots,
            "bot_matches": {"total": bots_total, "per_s": rate(bots_total.saturating_sub(bots_before))},
            "challenges": new.challenges,
        })
    }
}

/// The 99th percentile of the requests answered between `before` and
/// `now`, interpolated inside its bucket as Prometheus'
/// `histogram_quantile` does; `None` without requests in the window.
fn p99_ms(now: &RouteSample, before: &RouteSample) -> Option<f64> {
    let count = now.count.saturating_sub(before.count);
    if count == 0 {
        return None;
    }
    let target = count as f64 * 0.99;
    let mut lower = (0.0, 0u64);
    for (i, (upper, cumulative)) in now.buckets.iter().enumerate() {
        let prior = before.buckets.get(i).map_or(0, |b| b.1);
        let c = cumulative.saturating_sub(prior);
        if c as f64 >= target {
            let in_bucket = (c - lower.1) as f64;
            let frac = if in_bucket > 0.0 {
                (target - lower.1 as f64) / in_bucket
            } else {
                1.0
            };
            let secs = lower.0 + (upper - lower.0) * frac;
            return Some((secs * 1000.0 * 10.0).round() / 10.0);
        }
        lower = (*upper, c);
    }
    // Above the last finite bucket: its bound is the best we know.
    Some((lower.0 * 1000.0 * 10.0).round() / 10.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(buckets: &[(f64, u64)]) -> RouteSample {
        RouteSample {
            count: buckets.last().map_or(0, |b| b.1),
            buckets: buckets.to_vec(),
            ..RouteSample::default()
        }
    }

    #[test]
    fn p99_is_taken_from_the_window_only() {
        // Before: 100 slow requests (all in the 1 s bucket).
        let before = route(&[(0.01, 0), (0.1, 0), (1.0, 100)]);
        // Now: 1000 more, all under 10 ms.
        let now = route(&[(0.01, 1000), (0.1, 1000), (1.0, 1100)]);
        let p = p99_ms(&now, &before).unwrap();
        assert!(p <= 10.0, "{p}");
        assert_eq!(p99_ms(&before, &before), None, "no requests in the window");
    }

    #[test]
    fn p99_interpolates_inside_the_bucket() {
        let now = route(&[(0.1, 0), (0.2, 100)]);
        let p = p99_ms(&now, &RouteSample::default()).unwrap();
        assert!((p - 199.0).abs() < 0.01, "{p}");
    }
}
