//! `[[upstreams]]` with `[upstreams.health]` and `[upstreams.outlier]`: the
//! clusters routes send requests to.

use std::collections::HashSet;

use serde::Deserialize;

use super::{ConfigError, Dur};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    /// Power of two random choices by in-flight requests.
    LeastRequest,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// `host:port` of each endpoint; host names are resolved per connection.
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub lb: LbPolicy,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Time from picking an endpoint to its response head, connect included
    /// (504). Must be above `connect_timeout`.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: Dur,
    /// Extra attempts for idempotent requests without a body after a connect
    /// failure or a connection reset before any response (on another
    /// endpoint when there is one).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Requests in flight to this cluster at most; more get 503 at once.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_requests: usize,
    /// Requests to this cluster that stream (their route opts out of
    /// buffering) one client address may have in flight at once (429
    /// above). Default: a tenth of `max_concurrent_requests`, at least 1.
    #[serde(default)]
    pub max_streaming_per_client: Option<usize>,
    /// Idle keep-alive connections kept per endpoint.
    #[serde(default = "default_max_idle")]
    pub max_idle_per_endpoint: usize,
    /// An idle pooled connection is closed after this long.
    #[serde(default = "default_pool_idle_timeout")]
    pub idle_timeout: Dur,
    #[serde(default)]
    pub health: Option<HealthConfig>,
    #[serde(default)]
    pub outlier: OutlierConfig,
    /// The cluster's concurrency limit learned from latency (on by default).
    #[serde(default)]
    pub adaptive: super::AdaptiveConfig,
    /// A circuit breaker (absent: none).
    #[serde(default)]
    pub breaker: Option<super::BreakerConfig>,
}

fn default_connect_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(1))
}
fn default_request_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(15))
}
fn default_retries() -> u32 {
    1
}
fn default_max_concurrent() -> usize {
    1024
}
fn default_max_idle() -> usize {
    256
}
fn default_pool_idle_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(60))
}

/// Active health checking: `GET path` on every endpoint every `interval`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "default_health_interval")]
    pub interval: Dur,
    #[serde(default = "default_health_timeout")]
    pub timeout: Dur,
    /// Consecutive passes that bring an unhealthy endpoint back.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures that take an endpoint out.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
}

fn default_health_path() -> String {
    "/healthz".into()
}
fn default_health_interval() -> Dur {
    Dur(std::time::Duration::from_secs(5))
}
fn default_health_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(1))
}
fn default_healthy_threshold() -> u32 {
    2
}
fn default_unhealthy_threshold() -> u32 {
    3
}

/// Passive outlier ejection from live traffic.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// Consecutive 5xx answers or connect failures that eject an endpoint;
    /// 0 turns passive ejection off.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// First ejection lasts this long; each further ejection adds as much.
    #[serde(default = "default_base_ejection")]
    pub base_ejection: Dur,
    #[serde(default = "default_max_ejection")]
    pub max_ejection: Dur,
    /// Never eject more than this share of a cluster (at least one endpoint
    /// may always be ejected), so a bad deploy cannot empty a cluster.
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: default_consecutive_failures(),
            base_ejection: default_base_ejection(),
            max_ejection: default_max_ejection(),
            max_ejection_percent: default_max_ejection_percent(),
        }
    }
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_base_ejection() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}
fn default_max_ejection() -> Dur {
    Dur(std::time::Duration::from_secs(300))
}
fn default_max_ejection_percent() -> u32 {
    50
}

impl UpstreamConfig {
    /// `max_streaming_per_client` with its default applied.
    pub fn streaming_per_client(&self) -> usize {
        self.max_streaming_per_client
            .unwrap_or(self.max_concurrent_requests / 10)
            .max(1)
    }
}

impl UpstreamConfig {
    /// Checks this entry's own keys; `p` is its key path (`upstreams[N]`).
    pub(super) fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(ConfigError::at(format!("{p}.name"), "must not be empty"));
        }
        if self.endpoints.is_empty() {
            return Err(ConfigError::at(
                format!("{p}.endpoints"),
                "at least one endpoint is required",
            ));
        }
        let mut seen = HashSet::new();
        for (j, e) in self.endpoints.iter().enumerate() {
            if let Err(m) = check_authority(e) {
                return Err(ConfigError::at(format!("{p}.endpoints[{j}]"), m));
            }
            if !seen.insert(e.as_str()) {
                return Err(ConfigError::at(
                    format!("{p}.endpoints[{j}]"),
                    format!("duplicate endpoint {e:?}"),
                ));
            }
        }
        for (key, d) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("idle_timeout", self.idle_timeout),
            ("outlier.base_ejection", self.outlier.base_ejection),
        ] {
            if d.0.is_zero() {
                return Err(ConfigError::at(format!("{p}.{key}"), "must be above zero"));
            }
        }
        if self.connect_timeout >= self.request_timeout {
            return Err(ConfigError::at(
                format!("{p}.connect_timeout"),
                format!(
                    "must be below request_timeout ({}), which includes the connect",
                    self.request_timeout
                ),
            ));
        }
        if self.max_concurrent_requests == 0 {
            return Err(ConfigError::at(
                format!("{p}.max_concurrent_requests"),
                "must be above zero",
            ));
        }
        if self.max_streaming_per_client == Some(0) {
            return Err(ConfigError::at(
                format!("{p}.max_streaming_per_client"),
                "must be above zero",
            ));
        }
        if self.retries > 5 {
            return Err(ConfigError::at(
                format!("{p}.retries"),
                "at most 5 (retries multiply load on a sick cluster)",
            ));
        }
        if let Some(h) = &self.health {
            h.validate(&format!("{p}.health"))?;
        }
        self.adaptive.validate(&format!("{p}.adaptive"))?;
        if let Some(b) = &self.breaker {
            b.validate(&format!("{p}.breaker"))?;
        }
        self.outlier.validate(&format!("{p}.outlier"))
    }
}

impl HealthConfig {
    fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if !self.path.starts_with('/') {
            return Err(ConfigError::at(format!("{p}.path"), "must start with '/'"));
        }
        if self.interval.0.is_zero() {
            return Err(ConfigError::at(
                format!("{p}.interval"),
                "must be above zero",
            ));
        }
        if self.timeout.0.is_zero() {
            return Err(ConfigError::at(
                format!("{p}.timeout"),
                "must be above zero",
            ));
        }
        if self.healthy_threshold == 0 {
            return Err(ConfigError::at(
                format!("{p}.healthy_threshold"),
                "must be at least 1",
            ));
        }
        if self.unhealthy_threshold == 0 {
            return Err(ConfigError::at(
                format!("{p}.unhealthy_threshold"),
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

impl OutlierConfig {
    /// (`base_ejection` above zero is checked with the upstream's other
    /// durations, which come first.)
    fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if self.max_ejection_percent > 100 {
            return Err(ConfigError::at(
                format!("{p}.max_ejection_percent"),
                "must be between 0 and 100",
            ));
        }
        if self.max_ejection < self.base_ejection {
            return Err(ConfigError::at(
                format!("{p}.max_ejection"),
                "must not be below base_ejection",
            ));
        }
        Ok(())
    }
}

/// `host:port` with a non-zero port; IPv6 literals in brackets.
fn check_authority(s: &str) -> Result<(), String> {
    let auth: http::uri::Authority = s
        .parse()
        .map_err(|_| format!("invalid endpoint {s:?}: expected host:port"))?;
    match auth.port_u16() {
        Some(0) | None => Err(format!(
            "invalid endpoint {s:?}: expected host:port with a non-zero port"
        )),
        Some(_) if auth.as_str().contains('@') => Err(format!(
            "invalid endpoint {s:?}: credentials are not allowed"
        )),
        Some(_) => Ok(()),
    }
}
