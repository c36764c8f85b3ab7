//! Fleet limits' Redis calls: one atomic GCRA script (`gcra.lua`) per
//! decision, one round trip, on one key hash-tagged so that Redis Cluster
//! keeps it in one slot. Every gateway of the fleet runs the same script
//! on the same key, so together they admit the configured rate.
//!
//! This is the one place the rate limits talk to Redis, behind one call
//! ([`Fleet::gcra`]); the connection is made as the cache's L2 makes its
//! own (one server through `ConnectionManager`, or a Cluster client made
//! again after a failure), from the same `[redis]` section.
//!
//! Every call is bounded by `redis.timeout`. After a failure Redis is not
//! asked for `redis.retry_interval` (an outage must not cost every request
//! a timeout); meanwhile the limits follow `rate_limit.redis_down`. Each
//! change between reachable and not is logged once and shown by
//! `flashgate_rate_limit_redis_up`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;

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

enum Conn {
    Single(ConnectionManager),
    Cluster {
        client: Box<redis::cluster::ClusterClient>,
        conn: Mutex<Option<ClusterConnection>>,
    },
}

pub struct Fleet {
    conn: Conn,
    script: redis::Script,
    timeout: Duration,
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
        let conn = match &c.url {
            Some(url) => {
                let client =
                    redis::Client::open(url.as_str()).map_err(|e| format!("redis.url: {e}"))?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                Conn::Single(
                    ConnectionManager::new_lazy_with_config(client, config)
                        .map_err(|e| format!("redis.url: {e}"))?,
                )
            }
            None => Conn::Cluster {
                client: Box::new(
                    redis::cluster::ClusterClient::builder(c.cluster.clone())
                        .connection_timeout(timeout)
                        .response_timeout(timeout)
                        .retries(1)
                        .build()
                        .map_err(|e| format!("redis.cluster: {e}"))?,
                ),
                conn: Mutex::new(None),
            },
        };
        let errors = &metrics.rate_limit_redis_errors;
        metrics.rate_limit_redis_up.set(1);
        Ok(Fleet {
            conn,
            script: redis::Script::new(include_str!("gcra.lua")),
            timeout,
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
        let mut invocation = self.script.key(key);
        invocation
            .arg(emission.as_micros().max(1) as u64)
            .arg(burst);
        let run = async {
            match &self.conn {
                Conn::Single(m) => {
                    invocation
                        .invoke_async::<(i64, i64, i64, i64)>(&mut m.clone())
                        .await
                }
                Conn::Cluster { client, conn } => {
                    let existing = conn.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    let mut c = match existing {
                        Some(c) => c,
                        None => {
                            let c = client.get_async_connection().await?;
                            *conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
                            c
                        }
                    };
                    invocation
                        .invoke_async::<(i64, i64, i64, i64)>(&mut c)
                        .await
                }
            }
        };
        match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok((allowed, remaining, retry_us, _reset_us))) => {
                self.succeeded();
                Ok(Gcra {
                    allowed: allowed == 1,
                    remaining: remaining.clamp(0, i64::from(u32::MAX)) as u32,
                    retry_after: Duration::from_micros(retry_us.max(0) as u64),
                })
            }
            Ok(Err(e)) => {
                self.errors.inc();
                self.failed(&e);
                Err(FleetDown)
            }
            Err(_) => {
                self.timeouts.inc();
                self.failed(&format_args!("timed out after {:?}", self.timeout));
                Err(FleetDown)
            }
        }
    }

    fn failed(&self, err: &dyn std::fmt::Display) {
        self.down_until_ms.store(
            self.now_ms() + self.retry_interval.as_millis() as u64,
            Ordering::Relaxed,
        );
        if let Conn::Cluster { conn, .. } = &self.conn {
            // Made again on next use; the old one may be wedged.
            *conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
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
