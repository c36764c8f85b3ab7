//! What the Redis-backed admission steps (fleet rate limits, the waiting
//! room's line) share about talking to Redis: a client that makes one
//! attempt per decision within `redis.timeout`, and a back-off after a
//! failure, so that an outage costs one timeout per `redis.retry_interval`
//! rather than one per request while the step follows its `redis_down`.
//! Each change between reachable and not flips the step's `*_redis_up`
//! gauge; the caller logs it once, in its own words.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flashgate_redis::{RedisClient, Settings, Target};
use prometheus::IntGauge;

use crate::config::RedisConfig;

/// A lazy client (the gateway starts while Redis is down) with one lane
/// and the retry budget equal to the timeout: a decision waits at most
/// `redis.timeout`. The error names the key path of the bad address.
pub fn client(c: &RedisConfig) -> Result<RedisClient, String> {
    let (target, path) = match &c.url {
        Some(url) => (Target::Single(url.clone()), "redis.url"),
        None => (Target::Cluster(c.cluster.clone()), "redis.cluster"),
    };
    let settings = Settings {
        timeout: c.timeout.0,
        budget: c.timeout.0,
        lanes: 1,
    };
    RedisClient::lazy(&target, settings).map_err(|e| format!("{path}: {e}"))
}

/// Whether Redis may be asked now, and the gauge that shows it.
pub struct Outage {
    retry_interval: Duration,
    /// Since `epoch`, in ms: Redis is not asked before then.
    down_until_ms: AtomicU64,
    epoch: Instant,
    up: AtomicBool,
    gauge: IntGauge,
}

impl Outage {
    pub fn new(retry_interval: Duration, gauge: IntGauge) -> Outage {
        gauge.set(1);
        Outage {
            retry_interval,
            down_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            up: AtomicBool::new(true),
            gauge,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// False while Redis is skipped after a failure.
    pub fn available(&self) -> bool {
        self.now_ms() >= self.down_until_ms.load(Ordering::Relaxed)
    }

    /// A call failed: skip Redis for `retry_interval`. True when this
    /// failure ends a reachable period (the caller logs it, once).
    pub fn failed(&self) -> bool {
        self.down_until_ms.store(
            self.now_ms() + self.retry_interval.as_millis() as u64,
            Ordering::Relaxed,
        );
        let was_up = self.up.swap(false, Ordering::Relaxed);
        if was_up {
            self.gauge.set(0);
        }
        was_up
    }

    /// A call succeeded. True when this ends an outage (logged once).
    pub fn succeeded(&self) -> bool {
        let back = !self.up.load(Ordering::Relaxed) && !self.up.swap(true, Ordering::Relaxed);
        if back {
            self.gauge.set(1);
        }
        back
    }

    pub fn retry_interval(&self) -> Duration {
        self.retry_interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_reported_once_and_skips_redis_until_the_interval_passes() {
        let gauge = IntGauge::new("t_up", "t").unwrap();
        let o = Outage::new(Duration::from_secs(3600), gauge.clone());
        assert!(o.available());
        assert_eq!(gauge.get(), 1);
        assert!(o.failed());
        assert!(
            !o.failed(),
            "the second failure of one outage is not reported"
        );
        assert!(!o.available());
        assert_eq!(gauge.get(), 0);
        assert!(o.succeeded());
        assert!(!o.succeeded());
        assert_eq!(gauge.get(), 1);
        let quick = Outage::new(Duration::ZERO, IntGauge::new("t2", "t").unwrap());
        quick.failed();
        assert!(quick.available(), "a zero interval asks again at once");
    }
}
