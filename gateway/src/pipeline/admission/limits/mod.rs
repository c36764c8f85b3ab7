//! Rate limits at admission: a route's `rate_limit = { ... }` (see
//! `config::rate_limit` and `docs/rate-limits.md`).
//!
//! Decided after routing (limits are per route) and before shedding,
//! filters, the cache and the upstream: a refused request costs a map
//! lookup. The limits of a route are checked in the order per IP, per
//! user, per header, hot item, route, so one client spent on its own limit
//! does not eat the route's budget; the first that refuses answers 429
//! with `retry-after` and the `RateLimit-Policy` / `RateLimit` fields of
//! draft-ietf-httpapi-ratelimit-headers-11 ([`refusal`]), an answer built
//! once per limit and `retry-after` second ([`Canned`]). Allowed answers
//! carry the fields only with `headers = "always"` ([`Allowed`]; see the
//! docs for why that is not the default).
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
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, HeaderValue};
use prometheus::{IntCounter, IntGauge};

use crate::config::{
    Config, LimitHeaders, LimitSpec, RateLimitConfig, RedisConfig, RedisDown, RouteRateLimit, Scope,
};
use crate::error::ProxyError;
use crate::observe::metrics::Metrics;
use crate::respond::{Canned, Refusal};
use fleet::Fleet;
use hot::Hot;
use local::{Decision, Direct, Key, KeyCount, Keyed};

/// Most bytes of a header value used as a `per_header` key.
const MAX_HEADER_KEY: usize = 256;

/// The longest `retry-after` (seconds) whose 429 is canned; longer waits
/// (a limit of a few an hour) are rare and built per answer.
const MAX_CANNED_SECS: usize = 3600;

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
    /// The rate's emission interval (one cell) and the burst.
    emission: Duration,
    burst: u32,
    /// The 429 for each `retry-after` second (index 0 unused), built the
    /// first time a client is told to wait that long: up to the longest
    /// wait the limit can give (one emission interval of a spent budget,
    /// as the local GCRA says; a fleet limit's from Redis is the same).
    canned: Box<[OnceLock<Arc<Canned>>]>,
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
        let emission = spec.rate.per / spec.rate.count;
        // A local stand-in divided by the fleet size waits longer: room
        // for a few times the interval, the rest built per answer.
        let longest = (emission.as_secs_f64() * 4.0).ceil() as usize + 1;
        Policy {
            name,
            value: policy_value(name, spec, burst),
            allowed: m.with_label_values(&[route, name, "allowed"]),
            limited: m.with_label_values(&[route, name, "limited"]),
            fleet: (scope == Scope::Fleet).then_some((emission, burst)),
            emission,
            burst,
            canned: (0..=longest.clamp(1, MAX_CANNED_SECS))
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    /// `RateLimit` for an answer this limit let through with `remaining`
    /// cells left: `t` is when the burst is whole again (GCRA earns one
    /// cell back per emission interval), in whole seconds rounded up.
    fn fields(&self, remaining: u32) -> (HeaderValue, HeaderValue) {
        let spent = self.burst.saturating_sub(remaining);
        let t = (self.emission.as_secs_f64() * f64::from(spent)).ceil() as u64;
        let now = HeaderValue::try_from(format!("\"{}\";r={remaining};t={t}", self.name))
            .expect("a token name and numbers");
        (self.value.clone(), now)
    }
}

/// What allowed answers of a route with `headers = "always"` carry: the
/// `RateLimit-Policy` and `RateLimit` of the limit with the fewest cells
/// left (the one a client meets first).
pub struct Allowed {
    pub policy: HeaderValue,
    pub ratelimit: HeaderValue,
}

impl Allowed {
    /// Adds both fields to an answer.
    pub fn apply(self, headers: &mut http::HeaderMap) {
        headers.insert(RATELIMIT_POLICY.clone(), self.policy);
        headers.insert(RATELIMIT.clone(), self.ratelimit);
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
    /// `headers = "always"`: allowed answers carry the fields too.
    always: bool,
}

/// What one limit said, fleet or local.
enum Verdict {
    /// Let through, with the cells left when known (not when Redis is
    /// down and `redis_down = "open"`).
    Pass(Option<u32>),
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
            always: c.headers == LimitHeaders::Always,
        }
    }

    /// Checks the request against the route's limits, but a hot limit on
    /// the checkout body (see [`check_body`](Self::check_body)). With
    /// `headers = "always"`, what the allowed answer carries.
    pub async fn check(
        &self,
        client_ip: IpAddr,
        user: Option<&str>,
        head: &Parts,
    ) -> Result<Option<Allowed>, Refusal> {
        // The limit with the fewest cells left, for `headers = "always"`.
        let mut nearest: Option<(&Policy, u32)> = None;
        let always = self.always;
        let mut note = |p, left| nearer(&mut nearest, always, p, left);
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
            note(&k.policy, self.settle(&k.policy, v)?);
        }
        if let Some(h) = &self.hot {
            if let Some(value) = h.value_of(head) {
                let (policy, left) = self.check_hot(h, &value).await?;
                note(policy, left);
            }
        }
        if let Some(w) = &self.whole {
            let v = self
                .decide(&w.policy, &Key::Ip(0), || w.local.check())
                .await;
            note(&w.policy, self.settle(&w.policy, v)?);
        }
        Ok(nearest.map(|(p, left)| {
            let (policy, ratelimit) = p.fields(left);
            Allowed { policy, ratelimit }
        }))
    }

    /// A hot limit on a field of the checkout body, read whole by then.
    pub async fn check_body(&self, body: &Bytes) -> Result<(), Refusal> {
        let Some(h) = &self.hot else { return Ok(()) };
        match h.value_of_body(body) {
            Some(value) => self.check_hot(h, &value).await.map(|_| ()),
            None => Ok(()),
        }
    }

    async fn check_hot<'h>(
        &self,
        h: &'h Hot,
        value: &str,
    ) -> Result<(&'h Policy, Option<u32>), Refusal> {
        let (policy, local) = h.limit_for(value);
        let key = Key::Text(value.into());
        let v = self.decide(policy, &key, || local.check()).await;
        Ok((policy, self.settle(policy, v)?))
    }

    /// The fleet's decision when the limit is a fleet limit and Redis
    /// answers; else the local limit's (a fleet limit's local stand-in is
    /// divided by `fleet_size`), or `redis_down`'s.
    async fn decide(&self, p: &Policy, key: &Key, local: impl Fn() -> Decision) -> Verdict {
        let from_local = |d: Decision| match d {
            Decision::Allowed { remaining } => Verdict::Pass(Some(remaining)),
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
                    Verdict::Pass(Some(g.remaining))
                } else {
                    Verdict::Limited(g.retry_after)
                };
            }
        }
        match self.limiter.config.redis_down {
            RedisDown::Local => from_local(local()),
            RedisDown::Open => Verdict::Pass(None),
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
    fn settle(&self, p: &Policy, v: Verdict) -> Result<Option<u32>, Refusal> {
        match v {
            Verdict::Pass(left) => {
                p.allowed.inc();
                Ok(left)
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

/// Keeps in `nearest` the limit with the fewest cells left (when the
/// fields are wanted and the count is known).
fn nearer<'p>(
    nearest: &mut Option<(&'p Policy, u32)>,
    always: bool,
    p: &'p Policy,
    left: Option<u32>,
) {
    if let Some(left) = left.filter(|_| always) {
        if nearest.is_none_or(|(_, n)| left < n) {
            *nearest = Some((p, left));
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
/// limit's `RateLimit-Policy`, and `RateLimit` with nothing left until
/// then; canned per second ([`Policy::canned`]).
fn refusal(p: &Policy, retry: Duration) -> Refusal {
    let secs = retry.as_secs_f64().ceil().max(1.0).min(f64::from(u32::MAX)) as u32;
    match p.canned.get(secs as usize) {
        Some(slot) => Refusal::canned(
            slot.get_or_init(|| Arc::new(Canned::new(fresh_refusal(p, secs))))
                .clone(),
        ),
        None => fresh_refusal(p, secs),
    }
}

fn fresh_refusal(p: &Policy, secs: u32) -> Refusal {
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
        let id = HeaderValue::from_static("req-1");
        for (retry, t) in [(1200, "2"), (900, "1"), (60_000, "60")] {
            let r = refusal(&p, Duration::from_millis(retry));
            assert!(r.canned.is_some(), "a wait of {retry} ms is canned");
            let a = crate::respond::refusal(r, &id);
            assert_eq!(a.status(), http::StatusCode::TOO_MANY_REQUESTS);
            let h = a.headers();
            assert_eq!(h[http::header::RETRY_AFTER], t);
            assert_eq!(h[&RATELIMIT], format!("\"per_user\";r=0;t={t}").as_str());
            assert_eq!(h[&RATELIMIT_POLICY], "\"per_user\";q=5;w=300");
        }
        // Beyond the canned seconds: built per answer, the same shape.
        let r = refusal(&p, Duration::from_secs(100_000));
        assert!(r.canned.is_none());
        assert_eq!(r.retry_after, Some(100_000));
        assert_eq!(r.headers[&RATELIMIT], "\"per_user\";r=0;t=100000");
    }

    #[test]
    fn allowed_fields_say_what_is_left() {
        let spec = LimitSpec {
            rate: Rate {
                count: 2,
                per: Duration::from_secs(1),
            },
            burst: Some(10),
        };
        let p = Policy::new("per_ip", spec, None, Scope::Local, "r", &Metrics::new());
        let (policy, now) = p.fields(7);
        assert_eq!(policy, "\"per_ip\";q=10;w=5");
        // 3 cells spent, one back every 500 ms: whole again in 1.5 s.
        assert_eq!(now, "\"per_ip\";r=7;t=2");
        assert_eq!(p.fields(10).1, "\"per_ip\";r=10;t=0");
    }

    #[test]
    fn escaped_keys_keep_one_hash_tag() {
        let mut s = String::new();
        push_escaped(&mut s, "a}b{%");
        assert_eq!(s, "a%7Db%7B%25");
    }
}
