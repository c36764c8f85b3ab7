//! Rate limits: a route's `rate_limit = { ... }` and the global
//! `[rate_limit]` section (see `pipeline::admission::limits` and
//! `docs/rate-limits.md`).
//!
//! ```toml
//! [[routes]]
//! rate_limit = { per_ip = "5/s", burst = 10, per_user = "1/s", scope = "fleet" }
//! ```
//!
//! Each limit is a rate string (`"5/s"`, its burst the route's `burst` or
//! else one period's count) or a table `{ rate = "5/s", burst = 10 }`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::{ConfigError, Dur, Rate};

/// One limit: a rate and, optionally, its own burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSpec {
    pub rate: Rate,
    pub burst: Option<u32>,
}

impl LimitSpec {
    /// The burst in effect: the limit's own, else the route's, else one
    /// period's count (`"5/s"` lets 5 through at once).
    pub fn burst_or(&self, route_burst: Option<u32>) -> u32 {
        self.burst.or(route_burst).unwrap_or(self.rate.count)
    }

    fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if self.burst == Some(0) {
            return Err(ConfigError::at(format!("{p}.burst"), "must be at least 1"));
        }
        if self.rate.per.as_secs_f64() / f64::from(self.rate.count) < 1e-6 {
            return Err(ConfigError::at(p, "more than 1000000/s is not a limit"));
        }
        Ok(())
    }
}

/// `"5/s"` or `{ rate = "5/s", burst = 10 }`.
impl<'de> Deserialize<'de> for LimitSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LimitSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rate such as \"5/s\" or a table { rate = \"5/s\", burst = 10 }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<LimitSpec, E> {
                Ok(LimitSpec {
                    rate: v.parse().map_err(E::custom)?,
                    burst: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<LimitSpec, A::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Table {
                    rate: Rate,
                    #[serde(default)]
                    burst: Option<u32>,
                }
                let t = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(LimitSpec {
                    rate: t.rate,
                    burst: t.burst,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// Where a fleet limit's state lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// In this gateway's memory: N gateways admit N times the rate.
    #[default]
    Local,
    /// In Redis (`[redis]`): the gateways together admit the rate.
    Fleet,
}

/// `per_header = { header = "x-api-key", rate = "100/s", burst = 200 }`:
/// one budget per value of a request header; requests without the header
/// are not limited by it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderLimit {
    pub header: String,
    pub rate: Rate,
    #[serde(default)]
    pub burst: Option<u32>,
}

/// Where a hot-item limit takes its value from: exactly one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HotSource {
    /// The N-th path segment, from 0 (`/items/sku-1`: 1 is `sku-1`).
    PathSegment(usize),
    /// A query parameter's value.
    Query(String),
    /// A top-level string field of the checkout's JSON body.
    BodyField(String),
}

/// `hot = { query = "sku", rate = "10/s", burst = 10, overrides = { "sku-1" = "1/s" } }`:
/// one budget per value taken from the request, so one hot item cannot
/// eat the others' budget; `overrides` give chosen values their own rate.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HotLimit {
    #[serde(default)]
    pub path_segment: Option<usize>,
    #[serde(default)]
    pub query: Option<String>,
    #[serde(default)]
    pub body_field: Option<String>,
    pub rate: Rate,
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default)]
    pub overrides: BTreeMap<String, LimitSpec>,
}

impl HotLimit {
    /// The value's source (validated: exactly one is set).
    pub fn source(&self) -> HotSource {
        match (&self.path_segment, &self.query, &self.body_field) {
            (Some(n), _, _) => HotSource::PathSegment(*n),
            (_, Some(q), _) => HotSource::Query(q.clone()),
            (_, _, Some(f)) => HotSource::BodyField(f.clone()),
            _ => HotSource::PathSegment(0),
        }
    }

    pub fn spec(&self) -> LimitSpec {
        LimitSpec {
            rate: self.rate,
            burst: self.burst,
        }
    }
}

/// A route's `rate_limit = { ... }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRateLimit {
    /// Per resolved client IP (IPv6 by /64).
    #[serde(default)]
    pub per_ip: Option<LimitSpec>,
    /// Per verified JWT subject; requests without one are not limited by it.
    #[serde(default)]
    pub per_user: Option<LimitSpec>,
    #[serde(default)]
    pub per_header: Option<HeaderLimit>,
    /// One budget for the whole route.
    #[serde(default)]
    pub route: Option<LimitSpec>,
    #[serde(default)]
    pub hot: Option<HotLimit>,
    /// The burst of limits written as a bare rate.
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default)]
    pub scope: Scope,
    /// Whether allowed answers carry `RateLimit-Policy` / `RateLimit` too.
    #[serde(default)]
    pub headers: LimitHeaders,
}

/// `headers = "limited" | "always"`: which answers carry the
/// `RateLimit-Policy` and `RateLimit` fields. 429s always do; allowed
/// answers only when asked, since the fields cost a formatted header per
/// answer and tell a scraper exactly how fast it may go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitHeaders {
    #[default]
    Limited,
    Always,
}

impl RouteRateLimit {
    /// `p` is `routes[N].rate_limit`; `checkout` says whether the route
    /// reads its body (needed by a hot limit on a body field).
    pub(super) fn validate(&self, p: &str, checkout: bool) -> Result<(), ConfigError> {
        if self.per_ip.is_none()
            && self.per_user.is_none()
            && self.per_header.is_none()
            && self.route.is_none()
            && self.hot.is_none()
        {
            return Err(ConfigError::at(
                p,
                "names no limit (per_ip, per_user, per_header, route or hot)",
            ));
        }
        if self.burst == Some(0) {
            return Err(ConfigError::at(format!("{p}.burst"), "must be at least 1"));
        }
        for (name, l) in [
            ("per_ip", &self.per_ip),
            ("per_user", &self.per_user),
            ("route", &self.route),
        ] {
            if let Some(l) = l {
                l.validate(&format!("{p}.{name}"))?;
            }
        }
        if let Some(h) = &self.per_header {
            let hp = format!("{p}.per_header");
            if http::HeaderName::from_bytes(h.header.as_bytes()).is_err() {
                return Err(ConfigError::at(
                    format!("{hp}.header"),
                    format!("{:?} is not a header name", h.header),
                ));
            }
            LimitSpec {
                rate: h.rate,
                burst: h.burst,
            }
            .validate(&hp)?;
        }
        if let Some(h) = &self.hot {
            let hp = format!("{p}.hot");
            let sources = [
                h.path_segment.is_some(),
                h.query.is_some(),
                h.body_field.is_some(),
            ];
            if sources.iter().filter(|s| **s).count() != 1 {
                return Err(ConfigError::at(
                    hp,
                    "needs exactly one of path_segment, query or body_field",
                ));
            }
            if h.body_field.is_some() && !checkout {
                return Err(ConfigError::at(
                    format!("{hp}.body_field"),
                    "only a checkout route reads its body (use path_segment or query)",
                ));
            }
            h.spec().validate(&hp)?;
            for (v, o) in &h.overrides {
                o.validate(&format!("{hp}.overrides.{v}"))?;
            }
        }
        Ok(())
    }
}

/// What a fleet limit does while Redis does not answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisDown {
    /// This gateway's own limit, the fleet's rate divided by `fleet_size`.
    #[default]
    Local,
    /// Everything passes.
    Open,
    /// Everything is refused (503).
    Closed,
}

/// The global `[rate_limit]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Most keys tracked by all keyed local limits together; new keys
    /// beyond it share one overflow budget per limit.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// How often idle keys are dropped (`retain_recent`).
    #[serde(default = "default_sweep_interval")]
    pub sweep_interval: Dur,
    /// Most values a route's hot-item limit tracks (an LRU).
    #[serde(default = "default_hot_values")]
    pub hot_values: usize,
    #[serde(default)]
    pub redis_down: RedisDown,
    /// The gateways sharing fleet limits: with `redis_down = "local"`
    /// each admits the fleet's rate divided by this.
    #[serde(default = "default_fleet_size")]
    pub fleet_size: u32,
    /// Prefix of the fleet limits' Redis keys.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            max_keys: default_max_keys(),
            sweep_interval: default_sweep_interval(),
            hot_values: default_hot_values(),
            redis_down: RedisDown::default(),
            fleet_size: default_fleet_size(),
            key_prefix: default_key_prefix(),
        }
    }
}

fn default_max_keys() -> usize {
    100_000
}
fn default_sweep_interval() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_hot_values() -> usize {
    10_000
}
fn default_fleet_size() -> u32 {
    1
}
fn default_key_prefix() -> String {
    "flashgate:rl:".into()
}

impl RateLimitConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_keys == 0 || self.max_keys > 100_000_000 {
            return Err(ConfigError::at(
                "rate_limit.max_keys",
                "must be between 1 and 100000000",
            ));
        }
        let s = self.sweep_interval.0;
        if s < Duration::from_millis(100) || s > Duration::from_secs(3600) {
            return Err(ConfigError::at(
                "rate_limit.sweep_interval",
                "must be between 100ms and 1h",
            ));
        }
        if self.hot_values == 0 || self.hot_values > 10_000_000 {
            return Err(ConfigError::at(
                "rate_limit.hot_values",
                "must be between 1 and 10000000",
            ));
        }
        if self.fleet_size == 0 || self.fleet_size > 10_000 {
            return Err(ConfigError::at(
                "rate_limit.fleet_size",
                "must be between 1 and 10000",
            ));
        }
        if self.key_prefix.contains(['{', '}']) {
            return Err(ConfigError::at(
                "rate_limit.key_prefix",
                "must not contain braces (the key's hash tag is added by the gateway)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, TEST_BASE};

    fn err(route: &str, extra: &str) -> crate::config::ConfigError {
        Config::parse(&format!("{TEST_BASE}{route}\n{extra}")).expect_err("refused")
    }

    #[test]
    fn shapes_and_defaults() {
        let c = Config::parse(&format!(
            "{TEST_BASE}rate_limit = {{ per_ip = \"5/s\", burst = 10, per_user = {{ rate = \"1/s\", burst = 2 }}, route = \"100/s\" }}\n"
        ))
        .unwrap();
        let rl = c.routes[0].rate_limit.as_ref().unwrap();
        assert_eq!(rl.per_ip.unwrap().burst_or(rl.burst), 10);
        assert_eq!(rl.per_user.unwrap().burst_or(rl.burst), 2);
        assert_eq!(rl.route.unwrap().rate.count, 100);
        assert_eq!(c.rate_limit.max_keys, 100_000);
    }

    #[test]
    fn refusals_name_their_keys() {
        assert_eq!(err("rate_limit = {}", "").path, "routes[0].rate_limit");
        assert_eq!(
            err("rate_limit = { per_ip = \"5/x\" }", "").path,
            "routes[0].rate_limit.per_ip"
        );
        assert_eq!(
            err(
                "rate_limit = { per_ip = { rate = \"5/s\", burst = 0 } }",
                ""
            )
            .path,
            "routes[0].rate_limit.per_ip.burst"
        );
        assert_eq!(
            err("rate_limit = { per_ip = \"5/s\", scope = \"galaxy\" }", "").path,
            "routes[0].rate_limit.scope"
        );
        assert_eq!(
            err(
                "rate_limit = { per_header = { header = \"bad name\", rate = \"1/s\" } }",
                ""
            )
            .path,
            "routes[0].rate_limit.per_header.header"
        );
        assert_eq!(
            err("rate_limit = { hot = { rate = \"1/s\" } }", "").path,
            "routes[0].rate_limit.hot"
        );
        assert_eq!(
            err(
                "rate_limit = { hot = { body_field = \"sku\", rate = \"1/s\" } }",
                ""
            )
            .path,
            "routes[0].rate_limit.hot.body_field"
        );
        assert_eq!(
            err(
                "rate_limit = { hot = { query = \"sku\", rate = \"1/s\", overrides = { a = \"0/s\" } } }",
                ""
            )
            .path,
            "routes[0].rate_limit.hot.overrides.a"
        );
        assert_eq!(
            err("rate_limit = { per_ip = \"5/s\", scope = \"fleet\" }", "").path,
            "routes[0].rate_limit.scope"
        );
        assert_eq!(
            err("", "[rate_limit]\nmax_keys = 0").path,
            "rate_limit.max_keys"
        );
        assert_eq!(
            err("", "[rate_limit]\nredis_down = \"maybe\"").path,
            "rate_limit.redis_down"
        );
        assert_eq!(
            err("", "[rate_limit]\nkey_prefix = \"{x}\"").path,
            "rate_limit.key_prefix"
        );
    }
}
