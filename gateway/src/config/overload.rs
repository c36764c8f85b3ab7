//! `[overload]`, a route's `fallback` and a cluster's `adaptive` and
//! `breaker` tables: how the gateway decides what breaks when more
//! arrives than the origins can serve (see `docs/overload.md`). Every key
//! has a default: with only `priority` on routes, overload protection is
//! on.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Dur};

/// `[overload]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverloadConfig {
    /// Off: no load level (always 0), no shedding, no queue; clusters keep
    /// only their `max_concurrent_requests`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How long the computed level must stay below the current one before
    /// it falls one step (it rises at once): falling slowly keeps the
    /// degraded answers steady instead of flapping with each shed burst.
    #[serde(default = "default_cool_down")]
    pub cool_down: Dur,
    /// Demand (arrival rate x no-load latency, Little's law) against the
    /// cluster's learned limit that raises the level to 1, 2, 3.
    #[serde(default = "default_utilization")]
    pub utilization: [f64; 3],
    /// The longest wait for an upstream slot that raises the level to 1,
    /// 2, 3.
    #[serde(default = "default_queue_delay")]
    pub queue_delay: [Dur; 3],
    /// A cluster's latency against its own no-load baseline that raises the
    /// level to 1, 2, 3.
    #[serde(default = "default_latency_ratio")]
    pub latency_ratio: [f64; 3],
    /// The share of failed upstream calls (5xx, timeouts, resets) that
    /// raises the level to 1, 2, 3.
    #[serde(default = "default_error_ratio")]
    pub error_ratio: [f64; 3],
    /// Open client connections over the listener's `max_connections` (the
    /// fullest listener) that raise the process's own level to 1, 2, 3;
    /// above 1, never.
    #[serde(default = "default_near_cap")]
    pub connections: [f64; 3],
    /// Temp-file bytes of spooled bodies over `buffering.temp_max` that
    /// raise the process's own level to 1, 2, 3; above 1, never.
    #[serde(default = "default_near_cap")]
    pub temp_space: [f64; 3],
    /// Shares of each cluster's limit kept for each priority when the
    /// cluster is full; below its limit any priority borrows what the
    /// others do not use.
    #[serde(default)]
    pub shares: Shares,
    /// The longest a request of each priority waits for an upstream slot
    /// before it is answered 503 rather than sent late.
    #[serde(default)]
    pub max_wait: MaxWait,
    /// A queue whose oldest request has waited this long serves its newest
    /// first (adaptive LIFO): the fresh request still has a client waiting.
    #[serde(default = "default_lifo_after")]
    pub lifo_after: Dur,
    /// Requests waiting for a slot per cluster at most; more get 503.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    /// `retry-after` on answers shed for overload.
    #[serde(default = "default_retry_after")]
    pub retry_after: Dur,
    /// `/readyz` fails after the level has been 3 for this long ...
    #[serde(default = "default_unready_after")]
    pub unready_after: Dur,
    /// ... and succeeds again once it has been below 3 for this long.
    #[serde(default = "default_ready_after")]
    pub ready_after: Dur,
    /// Allows `POST /admin/load-level` (with the admin token) for drills.
    #[serde(default)]
    pub allow_forced_level: bool,
    /// A request carrying this header gets `x-flashgate-load-level` on its
    /// answer.
    #[serde(default)]
    pub debug_header: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_cool_down() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_utilization() -> [f64; 3] {
    [0.8, 1.5, 3.0]
}
fn default_queue_delay() -> [Dur; 3] {
    [
        Dur(Duration::from_millis(20)),
        Dur(Duration::from_millis(100)),
        Dur(Duration::from_millis(500)),
    ]
}
fn default_latency_ratio() -> [f64; 3] {
    [2.0, 4.0, 8.0]
}
fn default_error_ratio() -> [f64; 3] {
    [0.1, 0.25, 0.5]
}
fn default_near_cap() -> [f64; 3] {
    [0.8, 0.9, 0.97]
}
fn default_lifo_after() -> Dur {
    Dur(Duration::from_millis(50))
}
fn default_max_queue() -> usize {
    1024
}
fn default_retry_after() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_unready_after() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_ready_after() -> Dur {
    Dur(Duration::from_secs(10))
}

impl Default for OverloadConfig {
    fn default() -> Self {
        OverloadConfig {
            enabled: true,
            cool_down: default_cool_down(),
            utilization: default_utilization(),
            queue_delay: default_queue_delay(),
            latency_ratio: default_latency_ratio(),
            error_ratio: default_error_ratio(),
            connections: default_near_cap(),
            temp_space: default_near_cap(),
            shares: Shares::default(),
            max_wait: MaxWait::default(),
            lifo_after: default_lifo_after(),
            max_queue: default_max_queue(),
            retry_after: default_retry_after(),
            unready_after: default_unready_after(),
            ready_after: default_ready_after(),
            allow_forced_level: false,
            debug_header: None,
        }
    }
}

/// `[overload.shares]`: fractions of a cluster's limit, summing to at most 1.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shares {
    #[serde(default = "share_critical")]
    pub critical: f64,
    #[serde(default = "share_normal")]
    pub normal: f64,
    #[serde(default = "share_sheddable")]
    pub sheddable: f64,
}
fn share_critical() -> f64 {
    0.5
}
fn share_normal() -> f64 {
    0.35
}
fn share_sheddable() -> f64 {
    0.15
}
impl Default for Shares {
    fn default() -> Self {
        Shares {
            critical: share_critical(),
            normal: share_normal(),
            sheddable: share_sheddable(),
        }
    }
}

/// `[overload.max_wait]`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaxWait {
    #[serde(default = "wait_critical")]
    pub critical: Dur,
    #[serde(default = "wait_normal")]
    pub normal: Dur,
    #[serde(default = "wait_sheddable")]
    pub sheddable: Dur,
}
fn wait_critical() -> Dur {
    Dur(Duration::from_secs(2))
}
fn wait_normal() -> Dur {
    Dur(Duration::from_millis(500))
}
fn wait_sheddable() -> Dur {
    Dur(Duration::from_millis(100))
}
impl Default for MaxWait {
    fn default() -> Self {
        MaxWait {
            critical: wait_critical(),
            normal: wait_normal(),
            sheddable: wait_sheddable(),
        }
    }
}

impl OverloadConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let p = "overload";
        for (key, t) in [
            ("utilization", self.utilization),
            ("latency_ratio", self.latency_ratio),
            ("error_ratio", self.error_ratio),
            ("connections", self.connections),
            ("temp_space", self.temp_space),
        ] {
            if !(t[0] > 0.0 && t[0] <= t[1] && t[1] <= t[2] && t[2].is_finite()) {
                return Err(ConfigError::at(
                    format!("{p}.{key}"),
                    "three thresholds above zero, in rising order",
                ));
            }
        }
        let q = self.queue_delay;
        if q[0].0.is_zero() || q[0] > q[1] || q[1] > q[2] {
            return Err(ConfigError::at(
                format!("{p}.queue_delay"),
                "three durations above zero, in rising order",
            ));
        }
        let s = self.shares;
        for (key, v) in [
            ("critical", s.critical),
            ("normal", s.normal),
            ("sheddable", s.sheddable),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(ConfigError::at(
                    format!("{p}.shares.{key}"),
                    "must be between 0 and 1",
                ));
            }
        }
        if s.critical + s.normal + s.sheddable > 1.0 + 1e-9 {
            return Err(ConfigError::at(
                format!("{p}.shares"),
                "the shares add up to more than 1",
            ));
        }
        for (key, d) in [
            ("cool_down", self.cool_down),
            ("max_wait.critical", self.max_wait.critical),
            ("max_wait.normal", self.max_wait.normal),
            ("max_wait.sheddable", self.max_wait.sheddable),
            ("lifo_after", self.lifo_after),
            ("retry_after", self.retry_after),
            ("unready_after", self.unready_after),
            ("ready_after", self.ready_after),
        ] {
            if d.0.is_zero() || d.0 > Duration::from_secs(3600) {
                return Err(ConfigError::at(
                    format!("{p}.{key}"),
                    "must be above zero and at most 1h",
                ));
            }
        }
        if self.max_queue == 0 {
            return Err(ConfigError::at(
                format!("{p}.max_queue"),
                "must be above zero",
            ));
        }
        if let Some(h) = &self.debug_header {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(ConfigError::at(
                    format!("{p}.debug_header"),
                    format!("{h:?} is not a header name"),
                ));
            }
        }
        Ok(())
    }
}

/// A route's `fallback = { status = 200, headers = {...}, body = "..." }`:
/// the answer a shed request of the route gets instead of a 503.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    #[serde(default = "default_fallback_status")]
    pub status: u16,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: String,
}
fn default_fallback_status() -> u16 {
    200
}

impl FallbackConfig {
    pub(super) fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if !(200..600).contains(&self.status) {
            return Err(ConfigError::at(
                format!("{p}.status"),
                "must be between 200 and 599",
            ));
        }
        for (name, value) in &self.headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || http::HeaderValue::from_str(value).is_err()
            {
                return Err(ConfigError::at(
                    format!("{p}.headers.{name}"),
                    "not a valid header name and value",
                ));
            }
        }
        Ok(())
    }
}

/// A cluster's `adaptive` table: its concurrency limit learned from
/// latency (gradient), under `max_concurrent_requests` as the hard cap.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The limit it starts from (and returns to after a reload changes the
    /// cluster).
    #[serde(default = "default_initial_limit")]
    pub initial_limit: usize,
    #[serde(default = "default_min_limit")]
    pub min_limit: usize,
    /// Latency up to this multiple of the baseline is not a reason to lower
    /// the limit.
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// The no-load latency is the fastest call of the last one to two
    /// windows: it follows a slower origin after this long, with no probe
    /// that drains the cluster to measure it.
    #[serde(default = "default_baseline_window")]
    pub baseline_window: Dur,
}
fn default_initial_limit() -> usize {
    20
}
fn default_min_limit() -> usize {
    4
}
fn default_tolerance() -> f64 {
    1.5
}
fn default_baseline_window() -> Dur {
    Dur(Duration::from_secs(10))
}
impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig {
            enabled: true,
            initial_limit: default_initial_limit(),
            min_limit: default_min_limit(),
            tolerance: default_tolerance(),
            baseline_window: default_baseline_window(),
        }
    }
}

impl AdaptiveConfig {
    /// Both limits are clamped to `max_concurrent_requests` when the
    /// cluster is built, so a small hard cap needs no `adaptive` table.
    pub(super) fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if self.min_limit == 0 {
            return Err(ConfigError::at(
                format!("{p}.min_limit"),
                "must be at least 1",
            ));
        }
        if self.initial_limit < self.min_limit {
            return Err(ConfigError::at(
                format!("{p}.initial_limit"),
                "must not be below min_limit",
            ));
        }
        if !(1.0..=10.0).contains(&self.tolerance) {
            return Err(ConfigError::at(
                format!("{p}.tolerance"),
                "must be between 1 and 10",
            ));
        }
        if self.baseline_window.0 < Duration::from_secs(1)
            || self.baseline_window.0 > Duration::from_secs(3600)
        {
            return Err(ConfigError::at(
                format!("{p}.baseline_window"),
                "must be between 1s and 1h",
            ));
        }
        Ok(())
    }
}

/// A cluster's `breaker` table (absent: no breaker): opens on the share of
/// slow or failed calls over a sliding window (Sentinel's `DegradeRule`,
/// resilience4j's `CircuitBreaker`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// The sliding window the ratios are measured over.
    #[serde(default = "default_breaker_window")]
    pub window: Dur,
    /// Calls in the window before the ratios count.
    #[serde(default = "default_min_calls")]
    pub min_calls: u32,
    /// Share of failed calls (5xx, timeouts, resets) that opens it.
    #[serde(default = "default_breaker_error_ratio")]
    pub error_ratio: f64,
    /// A call slower than this is slow ...
    #[serde(default = "default_slow_call")]
    pub slow_call: Dur,
    /// ... and this share of slow calls opens it.
    #[serde(default = "default_slow_call_ratio")]
    pub slow_call_ratio: f64,
    /// How long it stays open (answering the fallback or 503 at once).
    #[serde(default = "default_open_for")]
    pub open_for: Dur,
    /// Calls let through when half open; all must succeed to close it.
    #[serde(default = "default_probes")]
    pub half_open_probes: u32,
}
fn default_breaker_window() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_min_calls() -> u32 {
    20
}
fn default_breaker_error_ratio() -> f64 {
    0.5
}
fn default_slow_call() -> Dur {
    Dur(Duration::from_secs(2))
}
fn default_slow_call_ratio() -> f64 {
    1.0
}
fn default_open_for() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_probes() -> u32 {
    3
}

impl BreakerConfig {
    pub(super) fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if self.window.0 < Duration::from_secs(1) || self.window.0 > Duration::from_secs(600) {
            return Err(ConfigError::at(
                format!("{p}.window"),
                "must be between 1s and 10m",
            ));
        }
        if self.min_calls == 0 {
            return Err(ConfigError::at(
                format!("{p}.min_calls"),
                "must be at least 1",
            ));
        }
        for (key, v) in [
            ("error_ratio", self.error_ratio),
            ("slow_call_ratio", self.slow_call_ratio),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return Err(ConfigError::at(
                    format!("{p}.{key}"),
                    "must be above 0 and at most 1",
                ));
            }
        }
        for (key, d) in [("slow_call", self.slow_call), ("open_for", self.open_for)] {
            if d.0.is_zero() || d.0 > Duration::from_secs(3600) {
                return Err(ConfigError::at(
                    format!("{p}.{key}"),
                    "must be above zero and at most 1h",
                ));
            }
        }
        if self.half_open_probes == 0 {
            return Err(ConfigError::at(
                format!("{p}.half_open_probes"),
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, TEST_BASE};

    fn err(extra: &str) -> String {
        Config::parse(&format!("{TEST_BASE}{extra}"))
            .expect_err("config should be refused")
            .path
    }

    #[test]
    fn defaults_are_on_and_valid() {
        let c = Config::parse(TEST_BASE).unwrap();
        assert!(c.overload.enabled);
        assert!(!c.overload.allow_forced_level);
        assert!(c.upstreams[0].adaptive.enabled);
        assert!(c.upstreams[0].breaker.is_none());
        assert!(c.routes[0].fallback.is_none());
    }

    #[test]
    fn keys_are_checked_at_their_paths() {
        assert_eq!(
            err("[overload]\nutilization = [1.0, 0.5, 2.0]\n"),
            "overload.utilization"
        );
        assert_eq!(
            err("[overload]\nqueue_delay = [\"0ms\", \"1s\", \"2s\"]\n"),
            "overload.queue_delay"
        );
        assert_eq!(
            err("[overload]\nshares = { critical = 0.9, normal = 0.2 }\n"),
            "overload.shares"
        );
        assert_eq!(
            err("[overload]\nmax_wait = { sheddable = \"0s\" }\n"),
            "overload.max_wait.sheddable"
        );
        assert_eq!(
            err("[overload]\ndebug_header = \"bad header\"\n"),
            "overload.debug_header"
        );
        assert_eq!(err("[overload]\nbogus = 1\n"), "overload.bogus");
        assert_eq!(
            err("[overload]\nconnections = [0.8, 0.9, 0.0]\n"),
            "overload.connections"
        );
        assert_eq!(
            err("[overload]\ntemp_space = [0.9, 0.8, 0.95]\n"),
            "overload.temp_space"
        );
        let route = "[[routes]]\npath_prefix = \"/r\"\nupstream = \"catalog\"\n";
        assert_eq!(
            err(&format!("{route}fallback = {{ status = 100 }}\n")),
            "routes[1].fallback.status"
        );
        assert_eq!(
            err(&format!(
                "{route}fallback = {{ headers = {{ \"bad name\" = \"x\" }} }}\n"
            )),
            "routes[1].fallback.headers.bad name"
        );
        let up = "[[upstreams]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\"]\n";
        assert_eq!(
            err(&format!("{up}adaptive = {{ min_limit = 0 }}\n")),
            "upstreams[1].adaptive.min_limit"
        );
        assert_eq!(
            err(&format!(
                "{up}adaptive = {{ initial_limit = 2, min_limit = 4 }}\n"
            )),
            "upstreams[1].adaptive.initial_limit"
        );
        assert_eq!(
            err(&format!("{up}breaker = {{ error_ratio = 0.0 }}\n")),
            "upstreams[1].breaker.error_ratio"
        );
        assert_eq!(
            err(&format!("{up}breaker = {{ half_open_probes = 0 }}\n")),
            "upstreams[1].breaker.half_open_probes"
        );
    }
}
