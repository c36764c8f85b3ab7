//! Rate limits at admission: a route's `rate_limit = { ... }` (see
//! `config::rate_limit` and `docs/rate-limits.md`).
//!
//! Decided after routing (limits are per route) and before shedding,
//! filters, the cache and the upstream: a refused request costs a map
//! lookup. The limits of a route are checked in the order per IP, per
//! user, per header, hot item, route, so one client spent on its own limit
//! does not eat the route's budget; the first that refuses answers 429
//! with `retry-after` and the `RateLimit-Policy` / `RateLimit` fields of
//! draft-ietf-httpapi-ratelimit-headers-11 ([`refusal`]). Allowed answers
//! carry no fields (see the docs for why).
//!
//! - [`local`]: governor's GCRA in memory, with the key cap and sweeping.
//! - [`fleet`]: `scope = "fleet"`, one GCRA script in Redis per decision.
//! - [`hot`]: one budget per value taken from the request, in an LRU.
//!
//! State outlives reloads while a route's `rate_limit` and the global
//! `[rate_limit]` / `[redis]` stay the same; a changed limit starts fresh.

pub mod fleet;
pub mod hot;
pub mod local;

use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, HeaderValue};
use prometheus::{IntCounter, IntGauge};

use crate::config::{
    Config, LimitSpec, RateLimitConfig, RedisConfig, RedisDown, RouteRateLimit, Scope,
};
use crate::error::ProxyError;
use crate::observe::metrics::Metrics;
use crate::respond::Refusal;
use fleet::Fleet;
use hot::Hot;
use local::{Decision, Direct, Key, KeyCount, Keyed};

/// Most bytes of a header value used as a `per_header` key.
const MAX_HEADER_KEY: usize = 256;

/// `RateLimit-Policy`: the limit's quota and window.
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`: what is left of it and when it comes back.
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The state every route's limits share: the key cap, the Redis client of
/// fleet limits, the sweeper. Carried over a reload that keeps
/// `[rate_limit]` and `[redis]` as they were.
pub struct Limiter {
    config: RateLimitConfig,
    redis: Option<RedisConfig>,
    keys: Arc<KeyCount>,
    fleet: Option<Fleet>,
    /// Every route's limits built on this limiter, for the sweeper.
    routes: Mutex<Vec<Weak<RouteLimits>>>,
    keys_gauge: IntGauge,
}

impl Limiter {
    /// Builds the shared state and starts its sweeper (which ends when the
    /// limiter is dropped). Needs a tokio runtime.
    pub fn new(config: &Config, metrics: &Metrics) -> Result<Arc<Limiter>, String> {
        let any_fleet = config.routes.iter().any(|r| {
            r.rate_limit
                .as_ref()
                .is_some_and(|l| l.scope == Scope::Fleet)
        });
        let fleet = match (&config.redis, any_fleet) {
            (Some(r), true) => Some(Fleet::new(r, config.rate_limit.redis_down, metrics)?),
            _ => None,
        };
        let limiter = Arc::new(Limiter {
            config: config.rate_limit.clone(),
            redis: config.redis.clone(),
            keys: Arc::new(KeyCount::new(config.rate_limit.max_keys)),
            fleet,
            routes: Mutex::new(Vec::new()),
            keys_gauge: metrics.rate_limit_keys.clone(),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweeper(
                Arc::downgrade(&limiter),
                config.rate_limit.sweep_interval.0,
            ));
        }
        Ok(limiter)
    }

    /// Whether `config` would build the same limiter (so it is kept).
    pub fn same_config(&self, config: &Config) -> bool {
        self.config == config.rate_limit
            && self.redis == config.redis
            && self.fleet.is_some()
                == config.routes.iter().any(|r| {
                    r.rate_limit
                        .as_ref()
                        .is_some_and(|l| l.scope == Scope::Fleet)
                })
    }

    /// The limits of route `name`, or `previous` when it was built from
    /// the same `rate_limit` on this limiter (its state carries over).
    pub fn route(
        self: &Arc<Limiter>,
        name: &str,
        c: &RouteRateLimit,
        metrics: &Metrics,
        previous: Option<&Arc<RouteLimits>>,
    ) -> Arc<RouteLimits> {
        if let Some(p) = previous {
            if p.built_from == *c && Arc::ptr_eq(&p.limiter, self) {
                return p.clone();
            }
        }
        let limits = Arc::new(RouteLimits::new(self.clone(), name, c, metrics));
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes.retain(|w| w.strong_count() > 0);
        routes.push(Arc::downgrade(&limits));
        limits
    }

    /// Drops idle keys of every keyed limit and recounts what is left.
    fn sweep(&self) {
        let routes: Vec<Arc<RouteLimits>> = {
            let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            routes.retain(|w| w.strong_count() > 0);
            routes.iter().filter_map(Weak::upgrade).collect()
        };
        let left: usize = routes
            .iter()
            .flat_map(|r| r.keyed.iter())
            .map(|k| k.local.sweep())
            .sum();
        self.keys.set(left);
        self.keys_gauge.set(left as i64);
        for r in &routes {
            if let Some(h) = &r.hot {
                h.sweep();
            }
        }
    }

    /// Whether fleet limits are answered from Redis now.
    fn fleet_available(&self) -> Option<&Fleet> {
        self.fleet.as_ref().filter(|f| f.available())
    }
}

async fn sweeper(limiter: Weak<Limiter>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(l) = limiter.upgrade() else { return };
        l.sweep();
    }
}

/// How a limit appears in the answer and the metrics.
struct Policy {
    name: &'static str,
    /// `"name";q=..;w=..`, built once.
    value: HeaderValue,
    allowed: IntCounter,
    limited: IntCounter,
    /// In Redis (`scope = "fleet"`): the rate's emission interval and the
    /// burst, for the script.
    fleet: Option<(Duration, u32)>,
}

impl Policy {
    fn new(
        name: &'static str,
        spec: LimitSpec,
        route_burst: Option<u32>,
        scope: Scope,
        route: &str,
        metrics: &Metrics,
    ) -> Policy {
        let burst = spec.burst_or(route_burst);
        let m = &metrics.rate_limit_decisions;
        Policy {
            name,
            value: policy_value(name, spec, burst),
            allowed: m.with_label_values(&[route, name, "allowed"]),
            limited: m.with_label_values(&[route, name, "limited"]),
            fleet: (scope == Scope::Fleet).then(|| (spec.rate.per / spec.rate.count, burst)),
        }
    }
}

/// `"name";q=<burst>;w=<seconds to earn the burst back>`: a GCRA limit
/// lets `burst` through at once and earns it back at the rate, which the
/// draft's quota-per-window says as q = burst, w = burst / rate (whole
/// seconds, at least 1).
fn policy_value(name: &str, spec: LimitSpec, burst: u32) -> HeaderValue {
    let window = (spec.rate.per.as_secs_f64() * f64::from(burst) / f64::from(spec.rate.count))
        .ceil()
        .max(1.0) as u64;
    HeaderValue::from_str(&format!("\"{name}\";q={burst};w={window}"))
        .expect("a token name and numbers")
}

/// Where a keyed limit's key comes from.
enum Source {
    Ip,
    User,
    Header(HeaderName),
}

struct KeyedLimit {
    policy: Policy,
    source: Source,
    local: Keyed,
}

struct RouteLimit {
    policy: Policy,
    local: Direct,
}

/// One route's limits.
pub struct RouteLimits {
    limiter: Arc<Limiter>,
    built_from: RouteRateLimit,
    route: Arc<str>,
    keyed: Vec<KeyedLimit>,
    whole: Option<RouteLimit>,
    hot: Option<Hot>,
}

/// What one limit said, fleet or local.
enum Verdict {
    Pass,
    Limited(Duration),
    /// Redis is down and `redis_down = "closed"`.
    Unavailable,
}

impl RouteLimits {
    fn new(limiter: Arc<Limiter>, route: &str, c: &RouteRateLimit, metrics: &Metrics) -> Self {
        // A fleet limit's local stand-in takes its gateway's share.
        let divide = match c.scope {
            Scope::Fleet => limiter.config.fleet_size,
            Scope::Local => 1,
        };
        let mut keyed = Vec::new();
        let specs = [
            ("per_ip", c.per_ip, Source::Ip),
            ("per_user", c.per_user, Source::User),
        ];
        for (name, spec, source) in specs {
            if let Some(spec) = spec {
                keyed.push(KeyedLimit {
                    policy: Policy::new(name, spec, c.burst, c.scope, route, metrics),
                    source,
                    local: Keyed::new(spec, c.burst, divide, limiter.keys.clone()),
                });
            }
        }
        if let Some(h) = &c.per_header {
            let spec = LimitSpec {
                rate: h.rate,
                burst: h.burst,
            };
            keyed.push(KeyedLimit {
                policy: Policy::new("per_header", spec, c.burst, c.scope, route, metrics),
                source: Source::Header(
                    HeaderName::from_bytes(h.header.as_bytes()).expect("validated header name"),
                ),
                local: Keyed::new(spec, c.burst, divide, limiter.keys.clone()),
            });
        }
        let whole = c.route.map(|spec| RouteLimit {
            policy: Policy::new("route", spec, c.burst, c.scope, route, metrics),
            local: Direct::new(spec, c.burst, divide),
        });
        let hot = c.hot.as_ref().map(|h| {
            Hot::new(
                h,
                c.burst,
                divide,
                c.scope,
                limiter.config.hot_values,
                route,
                metrics,
            )
        });
        RouteLimits {
            built_from: c.clone(),
            route: route.into(),
            keyed,
            whole,
            hot,
            limiter,
        }
    }

    /// Checks the request against the route's limits, but a hot limit on
    /// the checkout body (see [`check_body`](Self::check_body)).
    pub async fn check(
        &self,
        client_ip: IpAddr,
        user: Option<&str>,
        head: &Parts,
    ) -> Result<(), Refusal> {
        for k in &self.keyed {
            let key = match &k.source {
                Source::Ip => Key::ip(client_ip),
                Source::User => match user {
                    Some(u) => Key::Text(u.into()),
                    None => continue,
                },
                // Cut: a key's memory stays small whatever the client sends.
                Source::Header(h) => match head.headers.get(h) {
                    Some(v) => {
                        let v = &v.as_bytes()[..v.len().min(MAX_HEADER_KEY)];
                        Key::Text(String::from_utf8_lossy(v).into())
                    }
                    None => continue,
                },
            };
            let v = self.decide(&k.policy, &key, || k.local.check(&key)).await;
            self.settle(&k.policy, v)?;
        }
        if let Some(h) = &self.hot {
            if let Some(value) = h.value_of(head) {
                self.check_hot(h, &value).await?;
            }
        }
        if let Some(w) = &self.whole {
            let v = self
                .decide(&w.policy, &Key::Ip(0), || w.local.check())
                .await;
            self.settle(&w.policy, v)?;
        }
        Ok(())
    }

    /// A hot limit on a field of the checkout body, read whole by then.
    pub async fn check_body(&self, body: &Bytes) -> Result<(), Refusal> {
        let Some(h) = &self.hot else { return Ok(()) };
        match h.value_of_body(body) {
            Some(value) => self.check_hot(h, &value).await,
            None => Ok(()),
        }
    }

    async fn check_hot(&self, h: &Hot, value: &str) -> Result<(), Refusal> {
        let (policy, local) = h.limit_for(value);
        let key = Key::Text(value.into());
        let v = self.decide(policy, &key, || local.check()).await;
        self.settle(policy, v)
    }

    /// The fleet's decision when the limit is a fleet limit and Redis
    /// answers; else the local limit's (a fleet limit's local stand-in is
    /// divided by `fleet_size`), or `redis_down`'s.
    async fn decide(&self, p: &Policy, key: &Key, local: impl Fn() -> Decision) -> Verdict {
        let from_local = |d: Decision| match d {
            Decision::Allowed { .. } => Verdict::Pass,
            Decision::Limited { retry_after } => Verdict::Limited(retry_after),
        };
        let Some((emission, burst)) = p.fleet else {
            return from_local(local());
        };
        if let Some(fleet) = self.limiter.fleet_available() {
            let redis_key = self.redis_key(p.name, key);
            // Boxed: the Redis call's state stays off the request's future
            // for the routes that never make it.
            if let Ok(g) = Box::pin(fleet.gcra(&redis_key, emission, burst)).await {
                return if g.allowed {
                    Verdict::Pass
                } else {
                    Verdict::Limited(g.retry_after)
                };
            }
        }
        match self.limiter.config.redis_down {
            RedisDown::Local => from_local(local()),
            RedisDown::Open => Verdict::Pass,
            RedisDown::Closed => Verdict::Unavailable,
        }
    }

    /// `<prefix>{<route>|<limit>|<key>}`: the braces are the Cluster hash
    /// tag, so each key has one slot; `{`, `}` and `%` in names and values
    /// are percent-encoded so that they cannot end the tag early.
    fn redis_key(&self, limit: &str, key: &Key) -> String {
        let mut k = String::with_capacity(64);
        k.push_str(&self.limiter.config.key_prefix);
        k.push('{');
        push_escaped(&mut k, &self.route);
        k.push('|');
        k.push_str(limit);
        k.push('|');
        match key {
            Key::Ip(ip) => k.push_str(&format!("{ip:x}")),
            Key::Text(t) => push_escaped(&mut k, t),
        }
        k.push('}');
        k
    }

    /// Counts the verdict; a refusal becomes the 429 (or 503) answer.
    // The refusal is the cold path and goes straight into the answer;
    // boxing it would add an allocation to every 429 of a flood.
    #[allow(clippy::result_large_err)]
    fn settle(&self, p: &Policy, v: Verdict) -> Result<(), Refusal> {
        match v {
            Verdict::Pass => {
                p.allowed.inc();
                Ok(())
            }
            Verdict::Limited(retry) => {
                p.limited.inc();
                Err(refusal(p, retry))
            }
            Verdict::Unavailable => {
                p.limited.inc();
                Err(Refusal::new(ProxyError::RateLimitUnavailable).retry_after(1))
            }
        }
    }
}

fn push_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
}

/// The 429: `retry-after` in whole seconds (rounded up, at least 1), the
/// limit's `RateLimit-Policy`, and `RateLimit` with nothing left until then.
fn refusal(p: &Policy, retry: Duration) -> Refusal {
    let secs = retry.as_secs_f64().ceil().max(1.0).min(f64::from(u32::MAX)) as u32;
    let now = HeaderValue::try_from(format!("\"{}\";r=0;t={secs}", p.name))
        .expect("a token name and numbers");
    Refusal::new(ProxyError::RateLimited)
        .retry_after(secs)
        .header(RATELIMIT_POLICY.clone(), p.value.clone())
        .header(RATELIMIT.clone(), now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rate;

    #[test]
    fn policy_and_refusal_fields() {
        let spec = LimitSpec {
            rate: Rate {
                count: 5,
                per: Duration::from_secs(1),
            },
            burst: None,
        };
        assert_eq!(policy_value("per_ip", spec, 10), "\"per_ip\";q=10;w=2");
        let slow = LimitSpec {
            rate: Rate {
                count: 1,
                per: Duration::from_secs(60),
            },
            burst: Some(5),
        };
        assert_eq!(policy_value("route", slow, 5), "\"route\";q=5;w=300");
        let m = Metrics::new();
        let p = Policy::new("per_user", slow, None, Scope::Local, "r", &m);
        let r = refusal(&p, Duration::from_millis(1200));
        assert_eq!(r.retry_after, Some(2));
        assert_eq!(r.headers[&RATELIMIT], "\"per_user\";r=0;t=2");
        assert_eq!(r.headers[&RATELIMIT_POLICY], "\"per_user\";q=5;w=300");
        assert_eq!(r.error.status(), http::StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn escaped_keys_keep_one_hash_tag() {
        let mut s = String::new();
        push_escaped(&mut s, "a}b{%");
        assert_eq!(s, "a%7Db%7B%25");
    }
}
