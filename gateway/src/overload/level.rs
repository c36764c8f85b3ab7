//! The load level, 0 (calm) to 3 (critical): each tick every signal is
//! read against its three thresholds (`[overload]`), the highest level any
//! signal reaches is the target, and the level follows the target with
//! hysteresis: up at once, down one step only after the target stayed
//! below the level for `cool_down`.
//!
//! There is one level per cluster ([`Tracker`], from what its gate saw:
//! utilization, queueing, latency, errors) and one for the process itself
//! ([`process_target`], from what every cluster shares: client
//! connections and temp-file space). A request sees the higher of its
//! cluster's and the process's, so one drowning origin sheds its own
//! routes, not the others'.
//!
//! The utilization signal counts every request that wanted a cluster,
//! including those the level itself shed: shedding does not make the
//! demand go away, so under steady overload the level stays where it is
//! instead of flapping each time the shed traffic relieves the origin.

use std::time::{Duration, Instant};

use super::gate::Signals;
use crate::config::OverloadConfig;

/// Calls per second below which the error ratio is not read: a handful
/// of failures is an origin problem for outlier detection, not overload.
const MIN_CALLS_PER_SECOND: f64 = 20.0;

/// The level `value` reaches against thresholds `t`.
fn reached(value: f64, t: [f64; 3]) -> u8 {
    t.iter().take_while(|&&x| value >= x).count() as u8
}

/// The highest level each signal reaches this tick.
pub fn target(cfg: &OverloadConfig, gates: &[Signals], errors: f64) -> u8 {
    let mut level = 0;
    let mut at = |value: f64, t: [f64; 3]| {
        level = level.max(reached(value, t));
    };
    for s in gates {
        at(s.utilization, cfg.utilization);
        at(
            s.queue_delay.as_secs_f64(),
            cfg.queue_delay.map(|d| d.0.as_secs_f64()),
        );
        at(s.latency_ratio, cfg.latency_ratio);
    }
    at(errors, cfg.error_ratio);
    level
}

/// What the process as a whole is short of, each as a share of its cap.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessSignals {
    /// Open client connections over `max_connections`, the fullest
    /// listener.
    pub connections: f64,
    /// Temp-file bytes of spooled bodies over `buffering.temp_max`.
    pub temp_space: f64,
}

/// The process's own target level: what no cluster's shedding would
/// relieve alone.
pub fn process_target(cfg: &OverloadConfig, s: &ProcessSignals) -> u8 {
    reached(s.connections, cfg.connections).max(reached(s.temp_space, cfg.temp_space))
}

/// One cluster's level as it moves: its hysteresis and its error ratio.
#[derive(Default)]
pub struct Tracker {
    hysteresis: Hysteresis,
    errors: ErrorRatio,
}

impl Tracker {
    /// Reads one tick's signals; returns the level after it.
    pub fn step(&mut self, cfg: &OverloadConfig, s: Signals, tick: Duration, now: Instant) -> u8 {
        let errors = self.errors.update(&[s], tick);
        self.hysteresis
            .step(target(cfg, &[s], errors), cfg.cool_down.0, now)
    }
}

/// The error ratio, smoothed over about a second of calls.
#[derive(Default)]
pub struct ErrorRatio {
    calls: f64,
    failed: f64,
}

impl ErrorRatio {
    pub fn update(&mut self, gates: &[Signals], tick: Duration) -> f64 {
        // An exponential window of ~10 ticks.
        const KEEP: f64 = 0.9;
        let (calls, failed) = gates
            .iter()
            .fold((0, 0), |(c, f), s| (c + s.calls, f + s.failed));
        self.calls = self.calls * KEEP + calls as f64;
        self.failed = self.failed * KEEP + failed as f64;
        // calls per second over the window: sum / (ticks in window)
        let per_second = self.calls * (1.0 - KEEP) / tick.as_secs_f64();
        if per_second < MIN_CALLS_PER_SECOND || self.calls == 0.0 {
            return 0.0;
        }
        self.failed / self.calls
    }
}

/// The level with its hysteresis.
pub struct Hysteresis {
    level: u8,
    below_since: Option<Instant>,
}

impl Hysteresis {
    pub fn new() -> Hysteresis {
        Hysteresis {
            level: 0,
            below_since: None,
        }
    }

    pub fn level(&self) -> u8 {
        self.level
    }

    pub fn step(&mut self, target: u8, cool_down: Duration, now: Instant) -> u8 {
        if target >= self.level {
            self.level = target;
            self.below_since = None;
        } else {
            let since = *self.below_since.get_or_insert(now);
            if now.duration_since(since) >= cool_down {
                self.level -= 1;
                self.below_since = (self.level > target).then_some(now);
            }
        }
        self.level
    }
}

impl Default for Hysteresis {
    fn default() -> Self {
        Hysteresis::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rises_at_once_falls_one_step_per_cool_down() {
        let mut h = Hysteresis::new();
        let t0 = Instant::now();
        let cd = Duration::from_secs(5);
        assert_eq!(h.step(3, cd, t0), 3);
        assert_eq!(h.step(0, cd, t0 + Duration::from_secs(1)), 3);
        assert_eq!(h.step(0, cd, t0 + Duration::from_secs(6)), 2);
        assert_eq!(h.step(0, cd, t0 + Duration::from_secs(7)), 2);
        // A short rise of the target back to the level resets the wait.
        assert_eq!(h.step(2, cd, t0 + Duration::from_secs(8)), 2);
        assert_eq!(h.step(0, cd, t0 + Duration::from_secs(12)), 2);
        assert_eq!(h.step(0, cd, t0 + Duration::from_secs(17)), 1);
        assert_eq!(h.step(0, cd, t0 + Duration::from_secs(22)), 0);
    }

    #[test]
    fn the_highest_signal_wins() {
        let cfg = OverloadConfig::default();
        let calm = Signals::default();
        assert_eq!(target(&cfg, &[calm], 0.0), 0);
        let queued = Signals {
            queue_delay: Duration::from_millis(150),
            ..calm
        };
        assert_eq!(target(&cfg, &[calm, queued], 0.0), 2);
        let slow = Signals {
            latency_ratio: 9.0,
            ..calm
        };
        assert_eq!(target(&cfg, &[slow], 0.0), 3);
        assert_eq!(target(&cfg, &[calm], 0.3), 2);
        let busy = Signals {
            utilization: 1.0,
            ..calm
        };
        assert_eq!(target(&cfg, &[busy], 0.0), 1);
    }

    #[test]
    fn the_process_level_reads_its_own_caps() {
        let cfg = OverloadConfig::default();
        let s = |connections, temp_space| ProcessSignals {
            connections,
            temp_space,
        };
        assert_eq!(process_target(&cfg, &s(0.1, 0.0)), 0);
        assert_eq!(process_target(&cfg, &s(0.85, 0.0)), 1);
        assert_eq!(process_target(&cfg, &s(0.85, 0.95)), 2);
        assert_eq!(process_target(&cfg, &s(1.0, 0.0)), 3);
    }

    #[test]
    fn a_tracker_follows_its_own_cluster_only() {
        let cfg = OverloadConfig::default();
        let (mut a, mut b) = (Tracker::default(), Tracker::default());
        let tick = Duration::from_millis(100);
        let t0 = Instant::now();
        let queued = Signals {
            queue_delay: Duration::from_millis(600),
            ..Signals::default()
        };
        assert_eq!(a.step(&cfg, queued, tick, t0), 3);
        assert_eq!(b.step(&cfg, Signals::default(), tick, t0), 0);
        // Down one step per cool_down once the queue is gone.
        assert_eq!(a.step(&cfg, Signals::default(), tick, t0 + tick), 3);
        assert_eq!(
            a.step(&cfg, Signals::default(), tick, t0 + cfg.cool_down.0 + tick),
            2
        );
    }

    #[test]
    fn few_errors_do_not_count() {
        let mut e = ErrorRatio::default();
        let tick = Duration::from_millis(100);
        let few = Signals {
            calls: 1,
            failed: 1,
            ..Signals::default()
        };
        assert_eq!(e.update(&[few], tick), 0.0);
        let many = Signals {
            calls: 10,
            failed: 5,
            ..Signals::default()
        };
        let mut r = 0.0;
        for _ in 0..30 {
            r = e.update(&[many], tick);
        }
        assert!((r - 0.5).abs() < 0.05, "{r}");
    }
}
