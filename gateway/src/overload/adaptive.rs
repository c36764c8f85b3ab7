//! A cluster's concurrency limit learned from its latency, gradient style
//! (Netflix concurrency-limits' `Gradient2`): once per tick the limit is
//! multiplied by `tolerance x baseline / latency` (at most 1) and, when
//! the cluster used at least half of it, grows by its square root. It
//! grows at once and falls smoothed (20 % of the way per tick).
//!
//! The tick's latency is its fastest tenth ([`Latencies::low`]), not its
//! mean: a queue at the origin delays every call, the fastest too, while a
//! cluster that serves fast and slow paths at once (a cache hit next to a
//! search) keeps a fast tenth and is not mistaken for a queueing one.
//!
//! The baseline is the fastest call seen over the last one to two
//! `baseline_window`s. Under load some calls still find the origin idle,
//! so the fastest call keeps telling the no-load latency without ever
//! draining the cluster to measure it (Envoy's gradient controller lowers
//! its limit to the minimum for that, which answers bursts of 503s every
//! interval: envoy#8337, #18152). When the origin itself gets slower the
//! old minimum ages out and the limit recovers.

use std::time::{Duration, Instant};

use crate::config::AdaptiveConfig;

/// Latencies below this are never a reason to lower the limit: on a fast
/// (loopback, same-rack) origin the ratio of two sub-millisecond calls is
/// scheduling noise, not queueing.
pub const LATENCY_FLOOR: Duration = Duration::from_millis(5);

/// How fast the limit moves towards its new value per tick.
const SMOOTHING: f64 = 0.2;

pub struct Adaptive {
    limit: f64,
    min: f64,
    max: f64,
    tolerance: f64,
    window: Duration,
    /// Fastest call of the current and the previous window.
    fastest: [Option<Duration>; 2],
    window_start: Instant,
}

/// The latencies of one tick's successful calls, in logarithmic buckets
/// (100 us x 1.25^k, up to about 30 s).
#[derive(Clone, Copy)]
pub struct Latencies {
    counts: [u32; BUCKETS],
    n: u32,
}

const BUCKETS: usize = 56;
/// Calls a tick needs before its latency says anything.
const MIN_CALLS: u32 = 3;

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            counts: [0; BUCKETS],
            n: 0,
        }
    }
}

impl Latencies {
    pub fn add(&mut self, d: Duration) {
        let units = d.as_micros() as f64 / 100.0;
        let k = if units <= 1.0 {
            0
        } else {
            ((units.ln() / 1.25f64.ln()) as usize + 1).min(BUCKETS - 1)
        };
        self.counts[k] += 1;
        self.n += 1;
    }

    /// The upper bound of the bucket holding the fastest tenth's slowest
    /// call; `None` below [`MIN_CALLS`] calls.
    pub fn low(&self) -> Option<Duration> {
        if self.n < MIN_CALLS {
            return None;
        }
        let want = self.n.div_ceil(10);
        let mut seen = 0;
        for (k, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                let us = 100.0 * 1.25f64.powi(k as i32);
                return Some(Duration::from_micros(us as u64));
            }
        }
        None
    }
}

/// What one tick saw of a cluster's calls.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sample {
    /// The tick's latency: its fastest tenth of successful calls.
    pub mean: Option<Duration>,
    pub fastest: Option<Duration>,
    /// Most calls in flight at once during the tick.
    pub max_in_flight: usize,
}

impl Adaptive {
    pub fn new(cfg: &AdaptiveConfig, hard_cap: usize) -> Adaptive {
        let max = hard_cap.max(1) as f64;
        let min = (cfg.min_limit as f64).min(max);
        Adaptive {
            limit: (cfg.initial_limit as f64).clamp(min, max),
            min,
            max,
            tolerance: cfg.tolerance,
            window: cfg.baseline_window.0,
            fastest: [None, None],
            window_start: Instant::now(),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit as usize
    }

    /// The no-load latency as far as it is known (never below the floor).
    pub fn baseline(&self) -> Option<Duration> {
        Some(self.fastest()?.max(LATENCY_FLOOR))
    }

    /// The fastest call of the last one to two windows, as measured.
    pub fn fastest(&self) -> Option<Duration> {
        match self.fastest {
            [Some(a), Some(b)] => Some(a.min(b)),
            [a, b] => a.or(b),
        }
    }

    /// One tick's update.
    pub fn update(&mut self, s: Sample, now: Instant) {
        let elapsed = now.duration_since(self.window_start);
        if elapsed >= self.window * 2 {
            self.fastest = [None, None];
            self.window_start = now;
        } else if elapsed >= self.window {
            self.fastest = [None, self.fastest[0]];
            self.window_start = now;
        }
        if let Some(f) = s.fastest {
            self.fastest[0] = Some(self.fastest[0].map_or(f, |m| m.min(f)));
        }
        let (Some(mean), Some(baseline)) = (s.mean, self.baseline()) else {
            return;
        };
        let mean = mean.max(LATENCY_FLOOR).as_secs_f64();
        let gradient = (self.tolerance * baseline.as_secs_f64() / mean).clamp(0.5, 1.0);
        // Grow only when the limit is what holds the cluster back: an idle
        // cluster would otherwise learn a limit it never tried.
        let grow = if s.max_in_flight as f64 * 2.0 >= self.limit {
            self.limit.sqrt()
        } else {
            0.0
        };
        // Up at once while latency is fine (a fast origin behind a cold
        // limit must not queue for seconds), down smoothed.
        self.limit = if gradient >= 1.0 {
            self.limit + grow
        } else {
            let target = self.limit * gradient + grow;
            self.limit * (1.0 - SMOOTHING) + target * SMOOTHING
        }
        .clamp(self.min, self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AdaptiveConfig {
        AdaptiveConfig {
            initial_limit: 20,
            min_limit: 2,
            ..AdaptiveConfig::default()
        }
    }

    fn tick(a: &mut Adaptive, ms: u64, busy: bool, now: Instant) {
        let d = Duration::from_millis(ms);
        a.update(
            Sample {
                mean: Some(d),
                fastest: Some(d),
                max_in_flight: if busy { a.limit() } else { 0 },
            },
            now,
        );
    }

    #[test]
    fn follows_a_step_in_latency_both_ways() {
        let mut a = Adaptive::new(&cfg(), 1_000_000);
        let mut now = Instant::now();
        for _ in 0..50 {
            tick(&mut a, 20, true, now);
        }
        let calm = a.limit();
        assert!(calm > 40, "grows while used and fast: {calm}");
        // The origin slows down fivefold: the limit falls at once ...
        for _ in 0..20 {
            tick(&mut a, 100, true, now);
        }
        let slow = a.limit();
        assert!(slow < calm / 2, "{slow} vs {calm}");
        // ... and once the old baseline aged out it grows again.
        now += Duration::from_secs(25);
        for _ in 0..50 {
            now += Duration::from_millis(100);
            tick(&mut a, 100, true, now);
        }
        assert!(a.limit() > slow, "{} vs {slow}", a.limit());
        // Back to fast: it keeps growing.
        let before = a.limit();
        for _ in 0..20 {
            tick(&mut a, 20, true, now);
        }
        assert!(a.limit() > before);
    }

    #[test]
    fn the_fast_tenth_ignores_slow_paths_but_not_a_queue() {
        let mut mixed = Latencies::default();
        for i in 0..100 {
            mixed.add(Duration::from_millis(if i % 2 == 0 { 1 } else { 300 }));
        }
        let low = mixed.low().unwrap();
        assert!(low <= Duration::from_micros(1300), "{low:?}");
        let mut queued = Latencies::default();
        for i in 0..100 {
            queued.add(Duration::from_millis(60 + i));
        }
        let low = queued.low().unwrap();
        assert!(
            low >= Duration::from_millis(60) && low <= Duration::from_millis(90),
            "{low:?}"
        );
        let mut few = Latencies::default();
        few.add(Duration::from_millis(1));
        assert_eq!(few.low(), None);
    }

    #[test]
    fn idle_clusters_do_not_grow_and_limits_stay_in_bounds() {
        let mut a = Adaptive::new(&cfg(), 30);
        let now = Instant::now();
        for _ in 0..50 {
            tick(&mut a, 1, false, now);
        }
        assert_eq!(a.limit(), 20);
        for _ in 0..50 {
            tick(&mut a, 1, true, now);
        }
        assert_eq!(a.limit(), 30);
        // Far slower than the baseline: down to where the halving meets
        // the growth (sqrt), near min_limit.
        for _ in 0..200 {
            tick(&mut a, 10_000, true, now);
        }
        assert!(a.limit() <= 4, "{}", a.limit());
    }
}
