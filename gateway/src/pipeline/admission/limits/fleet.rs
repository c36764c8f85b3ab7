//! Fleet limits' Redis calls: one atomic GCRA script (`gcra.lua`) per
//! decision, one round trip, on one key hash-tagged so that Redis Cluster
//! keeps it in one slot. Every gateway of the fleet runs the same script
//! on the same key, so together they admit the configured rate.
//!
//! This is the one place the rate limits talk to Redis, behind one call
//! ([`Fleet::gcra`]), through the product's one Redis client
//! (`flashgate-redis`, as the cache's L2 and the order core): after a
//! timeout, a dropped connection or `MOVED`/`CLUSTERDOWN`/`TRYAGAIN` it
//! reads the slot map again, so a failover costs the limits about the
//! cluster's promotion time, not the old master's hang.
//!
//! Every call is bounded by `redis.timeout`: one attempt, and a refused
//! one (`MOVED`, `TRYAGAIN`: it did not run) is tried again within it. A
//! timed-out attempt is not retried, since the script may have taken a
//! cell. After a failure Redis is not
//! asked for `redis.retry_interval` (an outage must not cost every request
//! a timeout); meanwhile the limits follow `rate_limit.redis_down`. Each
//! change between reachable and not is logged once and shown by
//! `flashgate_rate_limit_redis_up`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flashgate_redis::{RedisClient, Settings, Target};
use prometheus::{IntCounter, IntGauge};

use crate::config::{RedisConfig, RedisDown};

/// The script's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    pub allowed: bool,
    pub remaining: u32,
    pub retry_after: Duration,
}

/// Redis did not answer (counted and, on a change, logged).
#[derive(Debug)]
pub struct FleetDown;

pub struct Fleet {
    client: RedisClient,
    script: redis::Script,
    retry_interval: Duration,
    /// Since `epoch`, in ms: Redis is not asked before then.
    down_until_ms: AtomicU64,
    epoch: Instant,
    up: AtomicBool,
    mode: RedisDown,
    timeouts: IntCounter,
    errors: IntCounter,
    up_gauge: IntGauge,
}

impl Fleet {
    pub fn new(
        c: &RedisConfig,
        mode: RedisDown,
        metrics: &crate::observe::metrics::Metrics,
    ) -> Result<Fleet, String> {
        let timeout = c.timeout.0;
        let (target, path) = match &c.url {
            Some(url) => (Target::Single(url.clone()), "redis.url"),
            None => (Target::Cluster(c.cluster.clone()), "redis.cluster"),
        };
        let settings = Settings {
            timeout,
            budget: timeout,
            lanes: 1,
        };
        let client = RedisClient::lazy(&target, settings).map_err(|e| format!("{path}: {e}"))?;
        let errors = &metrics.rate_limit_redis_errors;
        metrics.rate_limit_redis_up.set(1);
        Ok(Fleet {
            client,
            script: redis::Script::new(include_str!("gcra.lua")),
            retry_interval: c.retry_interval.0,
            down_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            up: AtomicBool::new(true),
            mode,
            timeouts: errors.with_label_values(&["timeout"]),
            errors: errors.with_label_values(&["error"]),
            up_gauge: metrics.rate_limit_redis_up.clone(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// False while Redis is skipped after a failure.
    pub fn available(&self) -> bool {
        self.now_ms() >= self.down_until_ms.load(Ordering::Relaxed)
    }

    /// One GCRA decision for `key` (already prefixed and hash-tagged):
    /// `emission` is the rate's period / count, `burst` the cells that may
    /// pass at once.
    pub async fn gcra(&self, key: &str, emission: Duration, burst: u32) -> Result<Gcra, FleetDown> {
        let emission_us = emission.as_micros().max(1) as u64;
        let script = &self.script;
        let result = self
            .client
            .run(|mut c| async move {
                script
                    .key(key)
                    .arg(emission_us)
                    .arg(burst)
                    .invoke_async::<(i64, i64, i64, i64)>(&mut c)
                    .await
            })
            .await;
        match result {
            Ok((allowed, remaining, retry_us, _reset_us)) => {
                self.succeeded();
                Ok(Gcra {
                    allowed: allowed == 1,
                    remaining: remaining.clamp(0, i64::from(u32::MAX)) as u32,
                    retry_after: Duration::from_micros(retry_us.max(0) as u64),
                })
            }
            Err(failure) => {
                if failure.timed_out {
                    self.timeouts.inc();
                } else {
                    self.errors.inc();
                }
                self.failed(&failure);
                Err(FleetDown)
            }
        }
    }

    fn failed(&self, err: &dyn std::fmt::Display) {
        self.down_until_ms.store(
            self.now_ms() + self.retry_interval.as_millis() as u64,
            Ordering::Relaxed,
        );
        if self.up.swap(false, Ordering::Relaxed) {
            self.up_gauge.set(0);
            tracing::warn!(error = %err, redis_down = ?self.mode, retry_in = ?self.retry_interval,
                "redis unavailable: fleet rate limits follow rate_limit.redis_down until it answers again");
        }
    }

    fn succeeded(&self) {
        if !self.up.load(Ordering::Relaxed) && !self.up.swap(true, Ordering::Relaxed) {
            self.up_gauge.set(1);
            tracing::info!("redis is back: fleet rate limits are shared again");
        }
    }
}
