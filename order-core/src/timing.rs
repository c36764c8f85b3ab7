//! Where a checkout's time goes, phase by phase, for sizing and for the
//! flash-sale benchmark's breakdown (`GET /admin/timings`).
//!
//! A durable checkout waits on several parties in turn (Redis for the
//! precheck, the core's own transaction slots, the broker for the half
//! message, the broker client's listener lane, Redis again for the Lua) and
//! its throughput is set by the slowest of them. The phases are measured by
//! the core around the publisher, so they need no hook in the broker client:
//!
//! | phase | from | to |
//! |---|---|---|
//! | `precheck` | the read-only `MGET` sent | its answer |
//! | `slot_wait` | a transaction slot asked for | granted (0 when free) |
//! | `half` | the publisher called | the local transaction starts (half message round trip + the client's listener lane) |
//! | `local` | the local transaction starts | the checkout script answered (task hand-off + `EVALSHA`) |
//! | `end` | the script answered | the publisher returns (the listener wakes, commit/rollback sent) |
//! | `transaction` | the publisher called | it returns (`half` + `local` + `end`) |
//! | `checkout` | the request validated | its outcome known (all of the above) |
//!
//! Counters only ever grow, so a reader takes a snapshot before and after a
//! run and subtracts ([`Snapshot::since`]); nothing is reset. Recording is
//! a few relaxed atomic adds: cheap enough to stay on in production.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// The phases, in the order a checkout passes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Precheck,
    SlotWait,
    Half,
    Local,
    End,
    Transaction,
    Checkout,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Precheck,
        Phase::SlotWait,
        Phase::Half,
        Phase::Local,
        Phase::End,
        Phase::Transaction,
        Phase::Checkout,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Precheck => "precheck",
            Phase::SlotWait => "slot_wait",
            Phase::Half => "half",
            Phase::Local => "local",
            Phase::End => "end",
            Phase::Transaction => "transaction",
            Phase::Checkout => "checkout",
        }
    }
}

/// Buckets of a phase's histogram: bucket `i` counts durations below
/// `2^i` microseconds (the last one everything longer), 1 us to ~8.4 s.
const BUCKETS: usize = 24;

#[derive(Default)]
struct Stat {
    count: AtomicU64,
    total_us: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

/// The running totals of every phase (one per core process).
#[derive(Default)]
pub struct Timings {
    stats: [Stat; Phase::ALL.len()],
}

impl Timings {
    pub fn record(&self, phase: Phase, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let stat = &self.stats[phase as usize];
        stat.count.fetch_add(1, Ordering::Relaxed);
        stat.total_us.fetch_add(us, Ordering::Relaxed);
        // Smallest i with us < 2^i.
        let bucket = (u64::BITS - us.leading_zeros()) as usize;
        stat.buckets[bucket.min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            phases: Phase::ALL
                .iter()
                .map(|&p| {
                    let s = &self.stats[p as usize];
                    PhaseSnapshot {
                        phase: p.name(),
                        count: s.count.load(Ordering::Relaxed),
                        total_us: s.total_us.load(Ordering::Relaxed),
                        buckets: s
                            .buckets
                            .iter()
                            .map(|b| b.load(Ordering::Relaxed))
                            .collect(),
                    }
                })
                .collect(),
        }
    }
}

/// The totals at one moment, as `GET /admin/timings` answers them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Snapshot {
    pub phases: Vec<PhaseSnapshot>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PhaseSnapshot {
    pub phase: &'static str,
    pub count: u64,
    pub total_us: u64,
    /// `buckets[i]`: durations below `2^i` us (and at least `2^(i-1)`).
    pub buckets: Vec<u64>,
}

impl PhaseSnapshot {
    pub fn mean_us(&self) -> Option<f64> {
        (self.count > 0).then(|| self.total_us as f64 / self.count as f64)
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1), in us: a
    /// power of two, so at most twice the true value.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(1u64 << i);
            }
        }
        Some(1u64 << (BUCKETS - 1))
    }
}

impl Snapshot {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            phases: self
                .phases
                .iter()
                .zip(&earlier.phases)
                .map(|(now, then)| PhaseSnapshot {
                    phase: now.phase,
                    count: now.count.saturating_sub(then.count),
                    total_us: now.total_us.saturating_sub(then.total_us),
                    buckets: now
                        .buckets
                        .iter()
                        .zip(&then.buckets)
                        .map(|(a, b)| a.saturating_sub(*b))
                        .collect(),
                })
                .collect(),
        }
    }

    pub fn phase(&self, phase: Phase) -> &PhaseSnapshot {
        &self.phases[phase as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_counts_means_and_bucketed_quantiles() {
        let t = Timings::default();
        for us in [0, 1, 3, 900, 1000, 1100] {
            t.record(Phase::Half, Duration::from_micros(us));
        }
        t.record(Phase::Local, Duration::from_secs(3600));
        let s = t.snapshot();
        let half = s.phase(Phase::Half);
        assert_eq!(half.phase, "half");
        assert_eq!(half.count, 6);
        assert_eq!(half.total_us, 3004);
        // 0 -> bucket 0, 1 -> 1, 3 -> 2, 900/1000 -> 10 (< 1024), 1100 -> 11.
        assert_eq!(half.buckets[0], 1);
        assert_eq!(half.buckets[10], 2);
        assert_eq!(half.buckets[11], 1);
        assert_eq!(half.quantile_us(0.5), Some(4));
        assert_eq!(half.quantile_us(0.99), Some(2048));
        // An hour lands in the last bucket, not out of range.
        assert_eq!(s.phase(Phase::Local).buckets[BUCKETS - 1], 1);
        assert_eq!(s.phase(Phase::End).quantile_us(0.5), None);
    }

    #[test]
    fn since_subtracts_an_earlier_snapshot() {
        let t = Timings::default();
        t.record(Phase::Checkout, Duration::from_micros(10));
        let before = t.snapshot();
        t.record(Phase::Checkout, Duration::from_micros(30));
        let d = t.snapshot().since(&before);
        assert_eq!(d.phase(Phase::Checkout).count, 1);
        assert_eq!(d.phase(Phase::Checkout).mean_us(), Some(30.0));
        assert_eq!(d.phase(Phase::Precheck).count, 0);
    }
}
