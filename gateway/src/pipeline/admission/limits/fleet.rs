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

use std::time::Duration;

use flashgate_redis::RedisClient;
use prometheus::IntCounter;

use crate::config::{RedisConfig, RedisDown};
use crate::pipeline::admission::redis_link::{self, Outage};

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
    outage: Outage,
    mode: RedisDown,
    timeouts: IntCounter,
    errors: IntCounter,
}

impl Fleet {
    pub fn new(
        c: &RedisConfig,
        mode: RedisDown,
        metrics: &crate::observe::metrics::Metrics,
    ) -> Result<Fleet, String> {
        let client = redis_link::client(c)?;
        let errors = &metrics.rate_limit_redis_errors;
        Ok(Fleet {
            client,
            script: redis::Script::new(include_str!("gcra.lua")),
            outage: Outage::new(c.retry_interval.0, metrics.rate_limit_redis_up.clone()),
            mode,
            timeouts: errors.with_label_values(&["timeout"]),
            errors: errors.with_label_values(&["error"]),
        })
    }

    /// False while Redis is skipped after a failure.
    pub fn available(&self) -> bool {
        self.outage.available()
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
        if self.outage.failed() {
            tracing::warn!(error = %err, redis_down = ?self.mode, retry_in = ?self.outage.retry_interval(),
                "redis unavailable: fleet rate limits follow rate_limit.redis_down until it answers again");
        }
    }

    fn succeeded(&self) {
        if self.outage.succeeded() {
            tracing::info!("redis is back: fleet rate limits are shared again");
        }
    }
}
