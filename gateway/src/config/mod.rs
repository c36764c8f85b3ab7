//! Configuration: one TOML file -> typed structs -> validated as a whole.
//!
//! Parsing and validation are two steps, like sozu's and Pingora's: serde
//! (with `deny_unknown_fields` everywhere) catches typos and bad values at
//! their key path, then [`Config::validate`] checks what only the whole file
//! can tell (names that must exist, listeners that overlap). Either way the
//! first error comes back with its key path, e.g.
//! `routes[2].upstream: unknown upstream "catalgo"`. Nothing listens until
//! the whole file is valid, and a reload with an invalid file changes nothing.
//!
//! One file per section, each with the `validate` of its own keys; this
//! module adds the checks across sections. The module is a leaf: it knows
//! the text, not what is built from it.
//!
//! Validation reads no file but the config itself. Certificate pairs, the
//! JWT key file and Wasm modules are loaded once, by whoever builds from
//! them (`pipeline::runtime::Runtime::build`, and `edge::tls::Certs` for a
//! listener's certificates), with errors at the same key paths
//! (`filters[0].wasm`, `listeners[0].tls.certs[1]`, `jwt.public_key`).
//! `Runtime::check` builds all of them without starting anything, which is
//! what `flashgate check` runs after [`Config::load`].
//!
//! Every key and its default is documented in `docs/config.md`.

pub mod admin;
pub mod bot;
pub mod buffering;
pub mod cache;
pub mod filter;
pub mod jwt;
pub mod listener;
pub mod otlp;
pub mod overload;
pub mod rate_limit;
pub mod route;
mod summary;
pub mod units;
pub mod upstream;
pub mod waiting_room;

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;

pub use admin::{AdminConfig, LogConfig, LogFormat, ShutdownConfig};
pub use bot::{BotAction, BotRuleConfig, ChallengeConfig, ShapeConfig};
pub use buffering::BufferingConfig;
pub use cache::{CacheConfig, RedisConfig, RouteCacheConfig};
pub use filter::FilterConfig;
pub use jwt::{JwtConfig, JwtKey, DEFAULT_USER_HEADER};
pub use listener::{CertPair, ListenerConfig, TlsConfig};
pub use otlp::TracingConfig;
pub use overload::{AdaptiveConfig, BreakerConfig, FallbackConfig, OverloadConfig};
pub use rate_limit::{
    HeaderLimit, HotLimit, HotSource, LimitHeaders, LimitSpec, RateLimitConfig, RedisDown,
    RouteRateLimit, Scope,
};
pub use route::{CheckoutRouteConfig, EscapedSlashes, RouteConfig};
pub use units::{Dur, Rate, Size};
pub use upstream::{HealthConfig, LbPolicy, OutlierConfig, UpstreamConfig};
pub use waiting_room::{EventConfig, Queueing, RoomRedisDown, UtcTime, WaitingRoomConfig};

/// A config error: where (key path) and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// Dotted key path such as `upstreams[0].health.interval`; `line N` when
    /// the TOML itself does not parse.
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub filters: Vec<FilterConfig>,
    /// Client identity from JWTs (see `pipeline::identity::jwt`).
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// The response cache (used by routes with `cache = {...}`).
    #[serde(default)]
    pub cache: CacheConfig,
    /// The cache's shared L2; without it each gateway caches on its own.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// OpenTelemetry span export (OTLP/HTTP); absent = none.
    #[serde(default)]
    pub tracing: Option<TracingConfig>,
    /// Request and response bodies held between client and upstream.
    #[serde(default)]
    pub buffering: BufferingConfig,
    /// Load level, shedding and adaptive concurrency (on by default).
    #[serde(default)]
    pub overload: OverloadConfig,
    /// Rate limits' shared settings (key cap, fleet mode).
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    /// Bot rules, in the order they are tried (see `docs/bot-rules.md`).
    #[serde(default)]
    pub bot_rules: Vec<BotRuleConfig>,
    /// The proof-of-work challenge of `action = "challenge"` rules.
    #[serde(default)]
    pub challenge: ChallengeConfig,
    /// Virtual waiting rooms that routes name (see `docs/waiting-room.md`).
    #[serde(default)]
    pub waiting_rooms: Vec<WaitingRoomConfig>,
}

impl Config {
    /// Reads and validates a config file (the shape only: see the module
    /// documentation for what is checked when it is built).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::at(path.display().to_string(), format!("cannot read: {e}"))
        })?;
        Config::parse(&text)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            let path = if path == "." || path.is_empty() {
                line.map_or_else(|| "config".to_string(), |l| format!("line {l}"))
            } else {
                path
            };
            ConfigError::at(path, inner.message().trim().to_string())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: each section's own keys (its `validate`),
    /// then what only the whole file can tell: names that must be unique or
    /// must exist, listeners that overlap. Upstreams and filters come
    /// before the routes that name them; the order is in `docs/config.md`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.admin.validate()?;
        self.log.validate()?;
        self.buffering.validate()?;

        if self.listeners.is_empty() {
            return Err(ConfigError::at(
                "listeners",
                "at least one [[listeners]] entry is required",
            ));
        }
        let mut names = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let p = format!("listeners[{i}]");
            l.validate(&p)?;
            if !names.insert(l.name.as_str()) {
                return Err(ConfigError::at(
                    format!("{p}.name"),
                    format!("duplicate listener name {:?}", l.name),
                ));
            }
            let admin = self.admin.listen;
            if listener::overlaps(l.listen, admin) {
                return Err(ConfigError::at(
                    format!("{p}.listen"),
                    format!("{} overlaps admin.listen {admin}", l.listen),
                ));
            }
            for (j, other) in self.listeners[..i].iter().enumerate() {
                if listener::overlaps(l.listen, other.listen) {
                    return Err(ConfigError::at(
                        format!("{p}.listen"),
                        format!("{} overlaps listeners[{j}] ({})", l.listen, other.listen),
                    ));
                }
            }
        }

        self.shutdown.validate()?;

        let mut upstreams = HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let p = format!("upstreams[{i}]");
            u.validate(&p)?;
            if !upstreams.insert(u.name.as_str()) {
                return Err(ConfigError::at(
                    format!("{p}.name"),
                    format!("duplicate upstream name {:?}", u.name),
                ));
            }
        }

        let mut filter_names = HashSet::new();
        for (i, f) in self.filters.iter().enumerate() {
            let p = format!("filters[{i}]");
            f.validate(&p)?;
            if !filter_names.insert(f.name.as_str()) {
                return Err(ConfigError::at(
                    format!("{p}.name"),
                    format!("duplicate filter name {:?}", f.name),
                ));
            }
        }

        let mut room_names = HashSet::new();
        for (i, w) in self.waiting_rooms.iter().enumerate() {
            let p = format!("waiting_rooms[{i}]");
            w.validate(&p)?;
            if !room_names.insert(w.name.as_str()) {
                return Err(ConfigError::at(
                    format!("{p}.name"),
                    format!("duplicate waiting room name {:?}", w.name),
                ));
            }
            // Every gateway of the fleet must verify the others' tickets.
            if self.redis.is_some() && w.key_file.is_none() {
                return Err(ConfigError::at(
                    format!("{p}.key_file"),
                    "required with [redis]: every gateway must sign tickets with the same key",
                ));
            }
            if w.require_challenge && self.challenge.key_file.is_none() && self.redis.is_some() {
                return Err(ConfigError::at(
                    format!("{p}.require_challenge"),
                    "with [redis], needs challenge.key_file (the fleet's clearance cookies)",
                ));
            }
        }

        let mut route_names = HashSet::new();
        let mut matches = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let p = format!("routes[{i}]");
            if !route_names.insert(r.display_name()) {
                return Err(ConfigError::at(
                    format!("{p}.name"),
                    format!("duplicate route name {:?}", r.display_name()),
                ));
            }
            r.validate(&p)?;
            let key = (
                r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                r.path_prefix.clone(),
            );
            if !matches.insert(key) {
                return Err(ConfigError::at(
                    format!("{p}.path_prefix"),
                    "another route already has the same host and path_prefix",
                ));
            }
            if !upstreams.contains(r.upstream.as_str()) {
                return Err(ConfigError::at(
                    format!("{p}.upstream"),
                    format!("unknown upstream {:?}", r.upstream),
                ));
            }
            if let Some(room) = &r.waiting_room {
                if !room_names.contains(room.as_str()) {
                    return Err(ConfigError::at(
                        format!("{p}.waiting_room"),
                        format!("unknown waiting room {room:?}"),
                    ));
                }
            }
            for (j, f) in r.filters.iter().enumerate() {
                if !filter_names.contains(f.as_str()) {
                    return Err(ConfigError::at(
                        format!("{p}.filters[{j}]"),
                        format!("unknown filter {f:?}"),
                    ));
                }
            }
            // A fleet limit's state lives in Redis.
            if r.rate_limit
                .as_ref()
                .is_some_and(|l| l.scope == Scope::Fleet)
                && self.redis.is_none()
            {
                return Err(ConfigError::at(
                    format!("{p}.rate_limit.scope"),
                    "\"fleet\" needs a [redis] section (the fleet's shared state)",
                ));
            }
            if r.identity == route::Identity::Required && self.jwt.is_none() {
                return Err(ConfigError::at(
                    format!("{p}.identity"),
                    "\"required\" needs a [jwt] section to verify tokens with",
                ));
            }
            // The checkout's user comes only from a verified subject.
            if r.checkout.is_some() && self.jwt.is_none() {
                return Err(ConfigError::at(
                    format!("{p}.checkout"),
                    "needs a [jwt] section: the user comes from the verified token subject",
                ));
            }
        }
        if let Some(jwt) = &self.jwt {
            jwt.validate()?;
        }
        self.cache.validate()?;
        if let Some(r) = &self.redis {
            r.validate()?;
        }
        if let Some(t) = &self.tracing {
            t.validate()?;
        }
        self.overload.validate()?;
        self.rate_limit.validate()?;
        let mut rule_names = HashSet::new();
        for (i, r) in self.bot_rules.iter().enumerate() {
            let p = format!("bot_rules[{i}]");
            r.validate(&p)?;
            if !rule_names.insert(r.name.as_str()) {
                return Err(ConfigError::at(
                    format!("{p}.name"),
                    format!("duplicate bot rule name {:?}", r.name),
                ));
            }
        }
        self.challenge.validate()?;
        Ok(())
    }
}

/// The smallest valid config (one listener, upstream and route), for the
/// unit tests of every module that builds from a config.
#[cfg(test)]
pub(crate) const TEST_BASE: &str = r#"
[[listeners]]
name = "public"
listen = "127.0.0.1:8080"

[[upstreams]]
name = "catalog"
endpoints = ["127.0.0.1:9000"]

[[routes]]
path_prefix = "/"
upstream = "catalog"
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use filters::Priority;

    const BASE: &str = TEST_BASE;

    fn err(extra: &str) -> ConfigError {
        Config::parse(&format!("{BASE}{extra}")).expect_err("config should be refused")
    }

    #[test]
    fn base_is_valid_with_defaults() {
        let c = Config::parse(BASE).unwrap();
        assert_eq!(c.admin.listen, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(c.upstreams[0].lb, LbPolicy::RoundRobin);
        assert_eq!(c.upstreams[0].retries, 1);
        assert_eq!(c.routes[0].priority, Priority::Normal);
        assert_eq!(c.listeners[0].max_header_bytes, Size(65536));
        assert_eq!(
            c.listeners[0].header_read_timeout,
            Dur(std::time::Duration::from_secs(10))
        );
        assert_eq!(
            c.listeners[0].idle_timeout,
            Dur(std::time::Duration::from_secs(75))
        );
    }

    #[test]
    fn edge_defence_keys_default_and_refuse_with_their_paths() {
        let c = Config::parse(BASE).unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.send_timeout, Dur(std::time::Duration::from_secs(60)));
        assert_eq!(l.body_read_timeout, Dur(std::time::Duration::from_secs(60)));
        assert_eq!(
            l.stream_idle_timeout,
            Dur(std::time::Duration::from_secs(60))
        );
        assert!(c.routes[0].buffer_requests && c.routes[0].buffer_responses);
        assert_eq!(c.routes[0].escaped_slashes, EscapedSlashes::Reject);
        assert_eq!(c.buffering.memory, Size(32 << 10));
        assert_eq!(
            err("[buffering]\nmemory = \"1KiB\"\n").path,
            "buffering.memory"
        );
        assert_eq!(
            err("[buffering]\ntemp_dir = \"/nonexistent/flashgate\"\n").path,
            "buffering.temp_dir"
        );
        let e = Config::parse(&BASE.replace(
            "upstream = \"catalog\"",
            "upstream = \"catalog\"\nescaped_slashes = \"decode\"",
        ))
        .unwrap_err();
        assert_eq!(e.path, "routes[0].escaped_slashes");
        let e = Config::parse(&BASE.replacen(
            "[[listeners]]",
            "[[listeners]]\nsend_timeout = \"0s\"",
            1,
        ))
        .unwrap_err();
        assert_eq!(e.path, "listeners[0].send_timeout");
    }

    #[test]
    fn unknown_key_has_its_path() {
        let e = Config::parse(&BASE.replace(
            "upstream = \"catalog\"",
            "upstream = \"catalog\"\nupstrem = 1",
        ))
        .unwrap_err();
        assert_eq!(e.path, "routes[0].upstrem");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn bad_values_have_their_paths() {
        let e = Config::parse(&BASE.replace(
            "endpoints = [\"127.0.0.1:9000\"]",
            "endpoints = [\"127.0.0.1:9000\"]\nconnect_timeout = \"5x\"",
        ))
        .unwrap_err();
        assert_eq!(e.path, "upstreams[0].connect_timeout");
        let e = Config::parse(&BASE.replace(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\nmax_header_bytes = \"lots\"",
        ))
        .unwrap_err();
        assert_eq!(e.path, "listeners[0].max_header_bytes");
        let e = Config::parse(&BASE.replace(
            "upstream = \"catalog\"",
            "upstream = \"catalog\"\npriority = \"urgent\"",
        ))
        .unwrap_err();
        assert_eq!(e.path, "routes[0].priority");
        let e = Config::parse(&BASE.replace(
            "endpoints = [\"127.0.0.1:9000\"]",
            "endpoints = [\"127.0.0.1:9000\"]\nlb = \"random\"",
        ))
        .unwrap_err();
        assert_eq!(e.path, "upstreams[0].lb");
    }

    #[test]
    fn toml_syntax_error_names_the_line() {
        let e = Config::parse("[[listeners]]\nname = \n").unwrap_err();
        assert_eq!(e.path, "line 2", "{e}");
    }

    #[test]
    fn unknown_upstream() {
        let e = err("[[routes]]\npath_prefix = \"/x\"\nupstream = \"catalgo\"\n");
        assert_eq!(e.path, "routes[1].upstream");
        assert!(e.message.contains("catalgo"));
    }

    #[test]
    fn overlapping_listeners() {
        let e = err("[[listeners]]\nname = \"b\"\nlisten = \"0.0.0.0:8080\"\n");
        assert_eq!(e.path, "listeners[1].listen");
        let e = err("[[listeners]]\nname = \"b\"\nlisten = \"127.0.0.1:9901\"\n");
        assert_eq!(e.path, "listeners[1].listen");
        assert!(e.message.contains("admin"));
        // Different ports, and port 0, never overlap.
        Config::parse(&format!(
            "{BASE}[[listeners]]\nname = \"b\"\nlisten = \"0.0.0.0:8081\"\n"
        ))
        .unwrap();
        Config::parse(&format!("{BASE}[[listeners]]\nname = \"b\"\nlisten = \"127.0.0.1:0\"\n[[listeners]]\nname = \"c\"\nlisten = \"127.0.0.1:0\"\n")).unwrap();
    }

    #[test]
    fn duplicates_and_shapes() {
        assert_eq!(
            err("[[upstreams]]\nname = \"catalog\"\nendpoints = [\"a:1\"]\n").path,
            "upstreams[1].name"
        );
        assert_eq!(
            err("[[upstreams]]\nname = \"x\"\nendpoints = [\"nohost\"]\n").path,
            "upstreams[1].endpoints[0]"
        );
        assert_eq!(
            err("[[upstreams]]\nname = \"x\"\nendpoints = []\n").path,
            "upstreams[1].endpoints"
        );
        assert_eq!(
            err("[[routes]]\npath_prefix = \"/\"\nupstream = \"catalog\"\nname = \"other\"\n").path,
            "routes[1].path_prefix"
        );
        assert_eq!(
            err("[[routes]]\npath_prefix = \"nope\"\nupstream = \"catalog\"\n").path,
            "routes[1].path_prefix"
        );
        assert_eq!(
            err("[[routes]]\nhost = \"a.com:80\"\nupstream = \"catalog\"\n").path,
            "routes[1].host"
        );
    }

    #[test]
    fn filters_are_checked() {
        let e = err(
            "[[routes]]\npath_prefix = \"/f\"\nupstream = \"catalog\"\nfilters = [\"missing\"]\n",
        );
        assert_eq!(e.path, "routes[1].filters[0]");
        // A filter's `config` is the filter's to judge, when it is built:
        // see `pipeline::runtime::filters`.
        Config::parse(&format!(
            "{BASE}[[filters]]\nname = \"h\"\nnative = \"headers\"\nconfig = '{{\"bogus\": 1}}'\n"
        ))
        .unwrap();
        let e = err("[[filters]]\nname = \"h\"\nnative = \"nope\"\n");
        assert_eq!(e.path, "filters[0].native");
        let e = err("[[filters]]\nname = \"h\"\n");
        assert_eq!(e.path, "filters[0]");
        let e = err("[[filters]]\nname = \"h\"\nnative = \"headers\"\nfail = \"sometimes\"\n");
        assert_eq!(e.path, "filters[0].fail");
        let e = err("[[filters]]\nname = \"h\"\nnative = \"headers\"\nroot_id = \"r\"\n");
        assert_eq!(e.path, "filters[0].root_id");
        let e = err("[[filters]]\nname = \"w\"\nwasm = \"w.wasm\"\nroot_id = \"a\\nb\"\n");
        assert_eq!(e.path, "filters[0].root_id");
        Config::parse(&format!(
            "{BASE}[[filters]]\nname = \"w\"\nwasm = \"w.wasm\"\nroot_id = \"add_header\"\n"
        ))
        .unwrap();
    }

    #[test]
    fn checkout_routes_are_critical_with_jwt_and_small_bodies() {
        const JWT: &str = "[jwt]\nalgorithm = \"HS256\"\nsecret = \"0123456789abcdef\"\n";
        let route = "[[routes]]\npath_prefix = \"/checkout\"\nupstream = \"catalog\"\n";
        let e = err(&format!("{route}checkout = {{}}\n{JWT}"));
        assert_eq!(e.path, "routes[1].priority");
        let critical = format!("{route}priority = \"critical\"\n");
        let e = err(&format!("{critical}checkout = {{}}\n"));
        assert_eq!(e.path, "routes[1].checkout");
        assert!(e.message.contains("[jwt]"), "{e}");
        let e = err(&format!(
            "{critical}checkout = {{ max_body_bytes = 0 }}\n{JWT}"
        ));
        assert_eq!(e.path, "routes[1].checkout.max_body_bytes");
        let e = err(&format!(
            "{critical}checkout = {{ body_timeout = \"2h\" }}\n{JWT}"
        ));
        assert_eq!(e.path, "routes[1].checkout.body_timeout");
        let c = Config::parse(&format!("{BASE}{critical}checkout = {{}}\n{JWT}")).unwrap();
        let checkout = c.routes[1].checkout.as_ref().unwrap();
        assert_eq!(checkout.max_body_bytes, 16 * 1024);
    }

    #[test]
    fn jwt_shape_is_checked_at_its_keys() {
        let e = err("[jwt]\nalgorithm = \"HS256\"\nsecret = \"short\"\n");
        assert_eq!(e.path, "jwt.secret");
        let e = err("[jwt]\nalgorithm = \"none\"\n");
        assert_eq!(e.path, "jwt.algorithm");
        let e = err("[jwt]\nalgorithm = \"RS256\"\n");
        assert_eq!(e.path, "jwt.public_key");
        let e = err("[jwt]\nalgorithm = \"ES256\"\n");
        assert_eq!(e.path, "jwt.public_key");
        let e =
            err("[jwt]\nalgorithm = \"ES256\"\npublic_key = \"k.pem\"\njwks_file = \"k.json\"\n");
        assert_eq!(e.path, "jwt.jwks_file");
        Config::parse(&format!(
            "{BASE}[jwt]\nalgorithm = \"ES256\"\njwks_file = \"k.json\"\n"
        ))
        .unwrap();
        let e = Config::parse(&BASE.replace(
            "upstream = \"catalog\"",
            "upstream = \"catalog\"\nidentity = \"required\"",
        ))
        .unwrap_err();
        assert_eq!(e.path, "routes[0].identity");
        let e = Config::parse(&BASE.replace(
            "upstream = \"catalog\"",
            "upstream = \"catalog\"\nidentity = \"maybe\"",
        ))
        .unwrap_err();
        assert_eq!(e.path, "routes[0].identity");
        let e = err(
            "[jwt]\nalgorithm = \"HS256\"\nsecret = \"0123456789abcdef\"\nuser_header = \"bad name\"\n",
        );
        assert_eq!(e.path, "jwt.user_header");
    }

    #[test]
    fn admin_off_loopback_needs_token() {
        let e = err("[admin]\nlisten = \"0.0.0.0:9901\"\n");
        assert_eq!(e.path, "admin.token");
        Config::parse(&format!(
            "{BASE}[admin]\nlisten = \"0.0.0.0:9901\"\ntoken = \"t\"\n"
        ))
        .unwrap();
    }

    #[test]
    fn health_and_outlier_bounds() {
        let e = err("[upstreams.health]\npath = \"healthz\"\n");
        assert_eq!(e.path, "upstreams[0].health.path");
        let e = err("[upstreams.health]\nunhealthy_threshold = 0\n");
        assert_eq!(e.path, "upstreams[0].health.unhealthy_threshold");
        let e = err("[upstreams.outlier]\nmax_ejection_percent = 101\n");
        assert_eq!(e.path, "upstreams[0].outlier.max_ejection_percent");
        let e = err("[upstreams.health]\ntimeout = \"0s\"\n");
        assert_eq!(e.path, "upstreams[0].health.timeout");
    }

    #[test]
    fn listener_timeouts_are_bounded() {
        for key in ["header_read_timeout", "idle_timeout"] {
            let e = Config::parse(&BASE.replace(
                "listen = \"127.0.0.1:8080\"",
                &format!("listen = \"127.0.0.1:8080\"\n{key} = \"0s\""),
            ))
            .unwrap_err();
            assert_eq!(e.path, format!("listeners[0].{key}"));
            let e = Config::parse(&BASE.replace(
                "listen = \"127.0.0.1:8080\"",
                &format!("listen = \"127.0.0.1:8080\"\n{key} = \"25h\""),
            ))
            .unwrap_err();
            assert_eq!(e.path, format!("listeners[0].{key}"));
        }
    }

    #[test]
    fn waiting_rooms_are_checked_at_their_keys() {
        let room = "[[waiting_rooms]]\nname = \"drop\"\nnew_users = \"50/s\"\nactive_users = 100\n";
        let c = Config::parse(&format!("{BASE}{room}")).unwrap();
        let w = &c.waiting_rooms[0];
        assert_eq!(w.queueing, Queueing::Fifo);
        assert_eq!(w.status, 200);
        assert_eq!(w.session, Dur(std::time::Duration::from_secs(300)));
        let e = Config::parse(&BASE.replace(
            "upstream = \"catalog\"",
            "upstream = \"catalog\"\nwaiting_room = \"dorp\"",
        ))
        .unwrap_err();
        assert_eq!(e.path, "routes[0].waiting_room");
        assert!(e.message.contains("dorp"), "{e}");
        let ok = Config::parse(&format!("{BASE}{room}").replace(
            "upstream = \"catalog\"",
            "upstream = \"catalog\"\nwaiting_room = \"drop\"",
        ))
        .unwrap();
        assert_eq!(ok.routes[0].waiting_room.as_deref(), Some("drop"));
        for (extra, path) in [
            ("active_users = 0", "waiting_rooms[0].active_users"),
            ("queueing = \"lifo\"", "waiting_rooms[0].queueing"),
            ("status = 302", "waiting_rooms[0].status"),
            ("grace = \"5s\"", "waiting_rooms[0].grace"),
            ("refresh = \"0s\"", "waiting_rooms[0].refresh"),
            ("session = \"2d\"", "waiting_rooms[0].session"),
            (
                "tickets_per_prefix = 0",
                "waiting_rooms[0].tickets_per_prefix",
            ),
            ("colour = 1", "waiting_rooms[0].colour"),
            (
                "event = { prequeue = \"2026-12-04T09:00:00Z\", start = \"2026-12-04T08:00:00Z\" }",
                "waiting_rooms[0].event.start",
            ),
            (
                "event = { prequeue = \"yesterday\", start = \"2026-12-04T08:00:00Z\" }",
                "waiting_rooms[0].event.prequeue",
            ),
        ] {
            let text = if extra.starts_with("active_users") {
                format!("{}{extra}\n", room.replace("active_users = 100\n", ""))
            } else {
                format!("{room}{extra}\n")
            };
            assert_eq!(err(&text).path, path, "{extra}");
        }
        let e = err("[[waiting_rooms]]\nname = \"a b\"\nnew_users = \"5/s\"\nactive_users = 1\n");
        assert_eq!(e.path, "waiting_rooms[0].name");
        assert_eq!(err(&format!("{room}{room}")).path, "waiting_rooms[1].name");
        let e = err(&format!(
            "{room}[redis]\nurl = \"redis://127.0.0.1:6379\"\n"
        ));
        assert_eq!(e.path, "waiting_rooms[0].key_file");
    }

    #[test]
    fn connect_timeout_below_request_timeout() {
        let e = Config::parse(&BASE.replace(
            "endpoints = [\"127.0.0.1:9000\"]",
            "endpoints = [\"127.0.0.1:9000\"]\nconnect_timeout = \"5s\"\nrequest_timeout = \"5s\"",
        ))
        .unwrap_err();
        assert_eq!(e.path, "upstreams[0].connect_timeout");
    }
}
