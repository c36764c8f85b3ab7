//! The load level, 0 (calm) to 3 (critical): each tick every signal is
//! read against its three thresholds (`[overload]`), the highest level any
//! signal reaches is the target, and the level follows the target with
//! hysteresis: up at once, down one step only after the target stayed
//! below the level for `cool_down`.
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

/// The highest level each signal reaches this tick.
pub fn target(cfg: &OverloadConfig, gates: &[Signals], errors: f64) -> u8 {
    let mut level = 0;
    let mut at = |value: f64, t: [f64; 3]| {
        let l = t.iter().take_while(|&&x| value >= x).count() as u8;
        level = level.max(l);
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
