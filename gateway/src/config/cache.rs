//! The cache's config: `[cache]` (the shared L1 and the fill protocol),
//! `[redis]` (the L2 shared by every gateway) and a route's `cache = {...}`.
//! Every key and its default is in `docs/config.md`.

use serde::Deserialize;

use super::{ConfigError, Dur, Size};

/// `[cache]`: settings of the one cache a gateway process has. Routes opt
/// in with their own `cache = { ttl = ... }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes the in-process L1 may hold (bodies, headers and keys).
    #[serde(default = "default_l1_size")]
    pub l1_size: Size,
    /// Larger responses are never stored: they stream through uncached, so
    /// the gateway never buffers more than this per response.
    #[serde(default = "default_max_entry_size")]
    pub max_entry_size: Size,
    /// The fleet-wide fill lock expires after this long, so a gateway that
    /// dies while filling holds the others up at most this long.
    #[serde(default = "default_lock_ttl")]
    pub lock_ttl: Dur,
    /// Longest a request waits for another request's (or gateway's) fill;
    /// then it serves stale if it can, else asks the origin itself.
    #[serde(default = "default_lock_wait")]
    pub lock_wait: Dur,
    /// Waiters for another gateway's fill wake on its pub/sub message; this
    /// poll only covers a lost message.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: Dur,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            l1_size: default_l1_size(),
            max_entry_size: default_max_entry_size(),
            lock_ttl: default_lock_ttl(),
            lock_wait: default_lock_wait(),
            poll_interval: default_poll_interval(),
        }
    }
}

fn default_l1_size() -> Size {
    Size(64 << 20)
}
fn default_max_entry_size() -> Size {
    Size(1 << 20)
}
fn default_lock_ttl() -> Dur {
    Dur(std::time::Duration::from_secs(5))
}
fn default_lock_wait() -> Dur {
    Dur(std::time::Duration::from_secs(5))
}
fn default_poll_interval() -> Dur {
    Dur(std::time::Duration::from_millis(50))
}

/// `[redis]`: the shared L2. Either one server (`url`) or a Redis Cluster
/// (`cluster`, seed node URLs).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub cluster: Vec<String>,
    /// Bound on one Redis operation: a slow or unreachable Redis costs a
    /// request at most this much before the cache goes on without L2.
    #[serde(default = "default_redis_timeout")]
    pub timeout: Dur,
    /// All attempts of one operation together (after a timeout or a moved
    /// slot the client reads the slot map again and retries). Absent: the
    /// same as `timeout`, one attempt; the refresh then runs in the
    /// background for the next operation.
    #[serde(default)]
    pub retry_budget: Option<Dur>,
    /// After a failed operation L2 is skipped this long, so an outage does
    /// not cost every request a timeout; then the next request probes it.
    #[serde(default = "default_retry_interval")]
    pub retry_interval: Dur,
    /// Prefix of every key and channel the cache uses, so several
    /// environments can share one Redis.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
}

fn default_redis_timeout() -> Dur {
    Dur(std::time::Duration::from_millis(250))
}
fn default_retry_interval() -> Dur {
    Dur(std::time::Duration::from_secs(1))
}
fn default_key_prefix() -> String {
    "flashgate:cache:".into()
}

/// A route's `cache = { ttl = "30s", jitter = 0.1, ... }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheConfig {
    /// How long a stored response is fresh.
    pub ttl: Dur,
    /// Fraction of `ttl` added or removed at random per entry (0 to 0.5),
    /// so entries filled together do not expire together.
    #[serde(default)]
    pub jitter: f64,
    /// After expiry, serve the stale copy at once while one background
    /// refresh runs, for this long.
    #[serde(default)]
    pub stale_while_revalidate: Option<Dur>,
    /// After expiry, serve the stale copy when the origin fails (5xx,
    /// refused, timed out), for this long.
    #[serde(default)]
    pub stale_if_error: Option<Dur>,
    /// Request headers whose values are part of the key (besides the
    /// origin's `Vary`, which is always honoured).
    #[serde(default)]
    pub key_headers: Vec<String>,
    /// Cookie names that do not make a request private (analytics cookies).
    /// A request with any other cookie bypasses the cache.
    #[serde(default)]
    pub ignore_cookies: Vec<String>,
    /// Take the fresh lifetime from the origin's `s-maxage`/`max-age` when
    /// it sends one, instead of `ttl`.
    #[serde(default)]
    pub honour_origin: bool,
    /// XFetch's beta: above 0, hot entries are refreshed in the background
    /// shortly before they expire (1.0 is the paper's default).
    #[serde(default)]
    pub early_refresh: f64,
}

impl CacheConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_entry_size.0 == 0 {
            return Err(ConfigError::at(
                "cache.max_entry_size",
                "must be above zero",
            ));
        }
        if self.max_entry_size.0 > 256 << 20 {
            return Err(ConfigError::at("cache.max_entry_size", "at most 256MiB"));
        }
        if self.l1_size < self.max_entry_size {
            return Err(ConfigError::at(
                "cache.l1_size",
                format!(
                    "must be at least max_entry_size ({} bytes)",
                    self.max_entry_size.0
                ),
            ));
        }
        for (key, d) in [
            ("lock_ttl", self.lock_ttl),
            ("lock_wait", self.lock_wait),
            ("poll_interval", self.poll_interval),
        ] {
            if d.0.is_zero() {
                return Err(ConfigError::at(
                    format!("cache.{key}"),
                    "must be above zero",
                ));
            }
        }
        if self.poll_interval > self.lock_wait {
            return Err(ConfigError::at(
                "cache.poll_interval",
                "must not be above lock_wait",
            ));
        }
        Ok(())
    }
}

impl RedisConfig {
    /// `retry_budget`, or `timeout` when it is not set.
    pub fn retry_budget(&self) -> std::time::Duration {
        self.retry_budget.map_or(self.timeout.0, |b| b.0)
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        match (&self.url, self.cluster.is_empty()) {
            (Some(_), false) => {
                return Err(ConfigError::at(
                    "redis",
                    "set either `url` or `cluster`, not both",
                ))
            }
            (None, true) => {
                return Err(ConfigError::at(
                    "redis",
                    "set `url` (one server) or `cluster` (seed nodes)",
                ))
            }
            _ => {}
        }
        let urls: Vec<(String, &String)> = match &self.url {
            Some(u) => vec![("redis.url".into(), u)],
            None => self
                .cluster
                .iter()
                .enumerate()
                .map(|(i, u)| (format!("redis.cluster[{i}]"), u))
                .collect(),
        };
        for (path, u) in urls {
            if let Err(e) = redis::Client::open(u.as_str()) {
                return Err(ConfigError::at(path, format!("invalid Redis URL: {e}")));
            }
        }
        if self.timeout.0.is_zero() {
            return Err(ConfigError::at("redis.timeout", "must be above zero"));
        }
        if self.retry_budget() < self.timeout.0 {
            return Err(ConfigError::at(
                "redis.retry_budget",
                "must be at least `timeout` (one attempt)",
            ));
        }
        if self.retry_interval.0.is_zero() {
            return Err(ConfigError::at(
                "redis.retry_interval",
                "must be above zero",
            ));
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(['{', '}', '*', '?', '[', ']']) {
            return Err(ConfigError::at(
                "redis.key_prefix",
                "must be non-empty and free of {}*?[]",
            ));
        }
        Ok(())
    }
}

impl RouteCacheConfig {
    pub(super) fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if self.ttl.0.is_zero() {
            return Err(ConfigError::at(
                format!("{p}.cache.ttl"),
                "must be above zero",
            ));
        }
        if !(0.0..=0.5).contains(&self.jitter) {
            return Err(ConfigError::at(
                format!("{p}.cache.jitter"),
                "must be between 0 and 0.5 (a fraction of ttl)",
            ));
        }
        if !(0.0..=10.0).contains(&self.early_refresh) {
            return Err(ConfigError::at(
                format!("{p}.cache.early_refresh"),
                "must be between 0 (off) and 10",
            ));
        }
        for (j, h) in self.key_headers.iter().enumerate() {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(ConfigError::at(
                    format!("{p}.cache.key_headers[{j}]"),
                    format!("invalid header name {h:?}"),
                ));
            }
            let lower = h.to_ascii_lowercase();
            if lower == "authorization" || lower == "cookie" {
                return Err(ConfigError::at(
                    format!("{p}.cache.key_headers[{j}]"),
                    "requests with this header are never cached (they are private)",
                ));
            }
        }
        for (j, c) in self.ignore_cookies.iter().enumerate() {
            if c.is_empty() || c.contains([';', '=', ' ']) {
                return Err(ConfigError::at(
                    format!("{p}.cache.ignore_cookies[{j}]"),
                    format!("invalid cookie name {c:?}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BASE: &str = "[[listeners]]\nname = \"public\"\nlisten = \"127.0.0.1:8080\"\n\
        [[upstreams]]\nname = \"catalog\"\nendpoints = [\"127.0.0.1:9000\"]\n\
        [[routes]]\npath_prefix = \"/\"\nupstream = \"catalog\"\n";

    fn path_of_error(extra: &str) -> String {
        Config::parse(&format!("{BASE}{extra}"))
            .expect_err("config should be refused")
            .path
    }

    #[test]
    fn route_cache_parses_with_defaults() {
        let c = Config::parse(&format!(
            "{BASE}cache = {{ ttl = \"30s\", jitter = 0.1 }}\n"
        ))
        .unwrap();
        let rc = c.routes[0].cache.as_ref().unwrap();
        assert_eq!(rc.ttl.0, std::time::Duration::from_secs(30));
        assert_eq!(rc.stale_while_revalidate, None);
        assert!(!rc.honour_origin);
        assert_eq!(c.cache.max_entry_size.0, 1 << 20);
        assert!(c.redis.is_none());
    }

    #[test]
    fn bad_cache_settings_have_their_paths() {
        assert_eq!(
            path_of_error("cache = { ttl = \"0s\" }\n"),
            "routes[0].cache.ttl"
        );
        assert_eq!(
            path_of_error("cache = { ttl = \"1s\", jitter = 0.9 }\n"),
            "routes[0].cache.jitter"
        );
        assert_eq!(
            path_of_error("cache = { ttl = \"1s\", ttl_typo = 1 }\n"),
            "routes[0].cache.ttl_typo"
        );
        assert_eq!(
            path_of_error("cache = { ttl = \"1s\", key_headers = [\"Authorization\"] }\n"),
            "routes[0].cache.key_headers[0]"
        );
        assert_eq!(
            path_of_error("cache = { ttl = \"1s\", ignore_cookies = [\"a=b\"] }\n"),
            "routes[0].cache.ignore_cookies[0]"
        );
        assert_eq!(
            path_of_error("[cache]\nl1_size = \"1KiB\"\n"),
            "cache.l1_size"
        );
        assert_eq!(
            path_of_error("[cache]\npoll_interval = \"10s\"\n"),
            "cache.poll_interval"
        );
        assert_eq!(path_of_error("[redis]\ntimeout = \"1s\"\n"), "redis");
        assert_eq!(
            path_of_error("[redis]\nurl = \"redis://a:1/\"\ncluster = [\"redis://b:1/\"]\n"),
            "redis"
        );
        assert_eq!(
            path_of_error("[redis]\nurl = \"http://nope\"\n"),
            "redis.url"
        );
        assert_eq!(
            path_of_error("[redis]\ncluster = [\"redis://a:1/\", \"bogus\"]\n"),
            "redis.cluster[1]"
        );
        assert_eq!(
            path_of_error("[redis]\nurl = \"redis://a:1/\"\nkey_prefix = \"x{y}\"\n"),
            "redis.key_prefix"
        );
        assert_eq!(
            path_of_error(
                "[redis]\nurl = \"redis://a:1/\"\ntimeout = \"300ms\"\nretry_budget = \"100ms\"\n"
            ),
            "redis.retry_budget"
        );
    }
}
