//! `order-core run --config FILE`: one TOML file, parsed into typed structs
//! (unknown keys are errors, reported with their key path), then checked as
//! a whole before anything connects.
//!
//! ```toml
//! listen = "127.0.0.1:8081"
//! admin_token = "change-me"
//! [redis]
//! url = "redis://127.0.0.1:6379/"      # or cluster = ["redis://...", ...]
//! timeout = "500ms"                    # one attempt
//! retry_budget = "2s"                  # all attempts of one call
//! # replicas_ack = 1                   # default: 1 on a Cluster with replicas
//! replicas_ack_timeout = "200ms"
//! [rocketmq]
//! namesrv = "127.0.0.1:9876"
//! topic = "orders"
//! [limits]
//! per_user = 1
//! max_qty = 10
//! max_in_flight = 32   # transactions at once; the rest queue
//! queue_wait = "2s"    # then 503, nothing deducted
//! [expiry]
//! window = "15m"
//! sweep_every = "1s"
//! [consumer]
//! sink = "orders.jsonl"
//! dlq = "orders-dlq.jsonl"
//! max_attempts = 3
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_token: String,
    pub redis: RedisConfig,
    /// Absent: orders are not published to a broker (the in-process queue
    /// records them and they die with the process). For benchmarks of the
    /// Redis path alone; `run` logs a warning.
    pub rocketmq: Option<MqConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub expiry: ExpiryConfig,
    #[serde(default)]
    pub consumer: ConsumerConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: Option<String>,
    pub cluster: Option<Vec<String>>,
    /// One attempt of one call (connect or reply); then the slot map is
    /// read again and the call retried.
    #[serde(default = "default_redis_timeout")]
    pub timeout: String,
    /// All attempts of one call together; then 503.
    #[serde(default = "default_retry_budget")]
    pub retry_budget: String,
    /// Replicas that must confirm a write (`WAIT`) before it is
    /// acknowledged. Absent: 1 on a Cluster whose every master has a
    /// replica at start, otherwise 0 (off).
    pub replicas_ack: Option<u32>,
    /// How long `WAIT` waits; must leave room within `timeout`.
    #[serde(default = "default_ack_timeout")]
    pub replicas_ack_timeout: String,
}

fn default_redis_timeout() -> String {
    "500ms".into()
}
fn default_retry_budget() -> String {
    "2s".into()
}
fn default_ack_timeout() -> String {
    "200ms".into()
}

/// The most `redis.replicas_ack` may ask for.
pub const MAX_REPLICAS_ACK: u32 = 16;

/// `[redis]`, parsed and checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedisTiming {
    pub timeout: Duration,
    pub retry_budget: Duration,
    pub replicas_ack: Option<u32>,
    pub replicas_ack_timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqConfig {
    pub namesrv: String,
    #[serde(default = "default_topic")]
    pub topic: String,
    #[serde(default = "default_producer_group")]
    pub producer_group: String,
    #[serde(default = "default_consumer_group")]
    pub consumer_group: String,
}

fn default_topic() -> String {
    "orders".into()
}
fn default_producer_group() -> String {
    "order-core".into()
}
fn default_consumer_group() -> String {
    "order-core-consumers".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub per_user: u32,
    pub max_qty: u32,
    pub max_in_flight: usize,
    pub queue_wait: String,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            per_user: 1,
            max_qty: 10,
            max_in_flight: 32,
            queue_wait: "2s".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExpiryConfig {
    pub window: String,
    pub sweep_every: String,
}

impl Default for ExpiryConfig {
    fn default() -> Self {
        ExpiryConfig {
            window: "15m".into(),
            sweep_every: "1s".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    pub sink: PathBuf,
    pub dlq: PathBuf,
    pub max_attempts: u32,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            sink: "orders.jsonl".into(),
            dlq: "orders-dlq.jsonl".into(),
            max_attempts: 3,
        }
    }
}

/// Where Redis is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTarget {
    Single(String),
    Cluster(Vec<String>),
}

impl Config {
    /// Parses and validates; the error names the key.
    pub fn parse(text: &str) -> Result<Config, String> {
        let de = toml::Deserializer::new(text);
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            format!("{path}: {}", e.into_inner().message())
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if self.admin_token.trim().is_empty() {
            return Err("admin_token: must not be empty".into());
        }
        self.redis_target()?;
        self.redis_timing()?;
        if self.rocketmq.as_ref().is_some_and(|m| m.namesrv.is_empty()) {
            return Err("rocketmq.namesrv: must not be empty".into());
        }
        if self.limits.per_user == 0 {
            return Err("limits.per_user: must be at least 1".into());
        }
        if self.limits.max_qty == 0 {
            return Err("limits.max_qty: must be at least 1".into());
        }
        let ceiling = crate::service::MAX_IN_FLIGHT_CEILING;
        if self.limits.max_in_flight == 0 || self.limits.max_in_flight > ceiling {
            return Err(format!("limits.max_in_flight: must be 1-{ceiling}"));
        }
        self.queue_wait()?;
        self.expiry_window()?;
        self.sweep_every()?;
        if self.consumer.max_attempts == 0 {
            return Err("consumer.max_attempts: must be at least 1".into());
        }
        Ok(())
    }

    /// The `[rocketmq]` section, required by `consume` and `dlq`.
    pub fn mq(&self) -> Result<&MqConfig, String> {
        self.rocketmq
            .as_ref()
            .ok_or_else(|| "rocketmq: this command needs a [rocketmq] section".to_string())
    }

    pub fn redis_target(&self) -> Result<RedisTarget, String> {
        match (&self.redis.url, &self.redis.cluster) {
            (Some(u), None) => Ok(RedisTarget::Single(u.clone())),
            (None, Some(c)) if !c.is_empty() => Ok(RedisTarget::Cluster(c.clone())),
            _ => Err("redis: set exactly one of `url` or a non-empty `cluster`".into()),
        }
    }

    pub fn redis_timing(&self) -> Result<RedisTiming, String> {
        let r = &self.redis;
        let timeout = parse_duration(&r.timeout).map_err(|e| format!("redis.timeout: {e}"))?;
        if timeout.is_zero() {
            return Err("redis.timeout: must be more than 0".into());
        }
        let retry_budget =
            parse_duration(&r.retry_budget).map_err(|e| format!("redis.retry_budget: {e}"))?;
        if retry_budget < timeout {
            return Err("redis.retry_budget: must be at least redis.timeout".into());
        }
        if r.replicas_ack.is_some_and(|n| n > MAX_REPLICAS_ACK) {
            return Err(format!("redis.replicas_ack: must be 0-{MAX_REPLICAS_ACK}"));
        }
        let replicas_ack_timeout = parse_duration(&r.replicas_ack_timeout)
            .map_err(|e| format!("redis.replicas_ack_timeout: {e}"))?;
        if replicas_ack_timeout.is_zero() || replicas_ack_timeout >= timeout {
            return Err(
                "redis.replicas_ack_timeout: must be more than 0 and less than redis.timeout"
                    .into(),
            );
        }
        Ok(RedisTiming {
            timeout,
            retry_budget,
            replicas_ack: r.replicas_ack,
            replicas_ack_timeout,
        })
    }

    pub fn queue_wait(&self) -> Result<Duration, String> {
        parse_duration(&self.limits.queue_wait).map_err(|e| format!("limits.queue_wait: {e}"))
    }

    pub fn expiry_window(&self) -> Result<Duration, String> {
        parse_duration(&self.expiry.window).map_err(|e| format!("expiry.window: {e}"))
    }

    pub fn sweep_every(&self) -> Result<Duration, String> {
        let d = parse_duration(&self.expiry.sweep_every)
            .map_err(|e| format!("expiry.sweep_every: {e}"))?;
        if d.is_zero() {
            return Err("expiry.sweep_every: must be more than 0".into());
        }
        Ok(d)
    }
}

/// `"250ms"`, `"10s"`, `"15m"`, `"2h"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{s}` lacks a unit (ms, s, m, h)"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("`{s}` is not a duration"))?;
    let ms = match unit {
        "ms" => n,
        "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        _ => return Err(format!("`{s}`: unit must be ms, s, m or h")),
    };
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "listen = \"127.0.0.1:0\"\nadmin_token = \"t\"\n[redis]\nurl = \"redis://127.0.0.1/\"\n[rocketmq]\nnamesrv = \"127.0.0.1:9876\"\n";

    #[test]
    fn parses_with_defaults() {
        let c = Config::parse(OK).unwrap();
        assert_eq!(c.mq().unwrap().topic, "orders");
        assert_eq!(c.expiry_window().unwrap(), Duration::from_secs(900));
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse(&format!("{OK}[limits]\nper_usr = 2\n")).unwrap_err();
        assert!(e.starts_with("limits"), "{e}");
        let e = Config::parse(&format!("{OK}[expiry]\nwindow = \"5 parsecs\"\n")).unwrap_err();
        assert!(e.starts_with("expiry.window"), "{e}");
        let e = Config::parse(&OK.replace("url", "cluster = []\n#")).unwrap_err();
        assert!(e.starts_with("redis"), "{e}");
    }

    #[test]
    fn redis_timing_defaults_and_errors_name_the_key() {
        let t = Config::parse(OK).unwrap().redis_timing().unwrap();
        assert_eq!(t.timeout, Duration::from_millis(500));
        assert_eq!(t.retry_budget, Duration::from_secs(2));
        assert_eq!(t.replicas_ack, None);
        let with =
            |extra: &str| Config::parse(&OK.replace("[rocketmq]", &format!("{extra}\n[rocketmq]")));
        assert_eq!(
            with("replicas_ack = 1")
                .unwrap()
                .redis_timing()
                .unwrap()
                .replicas_ack,
            Some(1)
        );
        for (extra, key) in [
            ("replicas_ack = 99", "redis.replicas_ack:"),
            ("replicas_ack = -1", "redis.replicas_ack"),
            ("timeout = \"0ms\"", "redis.timeout:"),
            ("retry_budget = \"100ms\"", "redis.retry_budget:"),
            (
                "replicas_ack_timeout = \"1s\"",
                "redis.replicas_ack_timeout:",
            ),
            (
                "replicas_ack_timeout = \"soon\"",
                "redis.replicas_ack_timeout:",
            ),
        ] {
            let e = with(extra).unwrap_err();
            assert!(e.starts_with(key), "{extra}: {e}");
        }
    }
}
