//! What may be cached, and for how long. Security by default: the rules
//! that keep one user's page from another hold whatever a route says;
//! routes only choose lifetimes and the key.

use std::time::Duration;

use http::{header, HeaderMap, HeaderName, Method, StatusCode};

use crate::config::RouteCacheConfig;

/// A route's cache settings, resolved once when config loads.
#[derive(Debug)]
pub struct RoutePolicy {
    pub ttl: Duration,
    pub jitter: f64,
    pub swr: Duration,
    pub sie: Duration,
    pub key_headers: Vec<HeaderName>,
    pub ignore_cookies: Vec<String>,
    pub honour_origin: bool,
    pub early_refresh: f64,
}

impl RoutePolicy {
    pub fn new(c: &RouteCacheConfig) -> RoutePolicy {
        RoutePolicy {
            ttl: c.ttl.0,
            jitter: c.jitter,
            swr: c.stale_while_revalidate.map_or(Duration::ZERO, |d| d.0),
            sie: c.stale_if_error.map_or(Duration::ZERO, |d| d.0),
            key_headers: c
                .key_headers
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .collect(),
            ignore_cookies: c.ignore_cookies.clone(),
            honour_origin: c.honour_origin,
            early_refresh: c.early_refresh,
        }
    }
}

/// Why a request skips the cache (both ways: not served from it, its
/// response not stored), or `None` when it may use it.
pub fn request_bypass(
    method: &Method,
    headers: &HeaderMap,
    has_body: bool,
    policy: &RoutePolicy,
) -> Option<&'static str> {
    if method != Method::GET && method != Method::HEAD {
        return Some("method");
    }
    if has_body {
        return Some("request_body");
    }
    if headers.contains_key(header::AUTHORIZATION) {
        return Some("authorization");
    }
    for v in headers.get_all(header::COOKIE) {
        // A cookie we cannot read is treated as private.
        let Ok(v) = v.to_str() else {
            return Some("cookie");
        };
        // `,` too: RFC 2965 allowed it between cookies and some origin
        // frameworks still split on it; a value with a comma then only
        // makes the request private.
        for pair in v.split([';', ',']) {
            let name = pair.split('=').next().unwrap_or("").trim();
            if name.is_empty() {
                continue;
            }
            if !policy.ignore_cookies.iter().any(|c| c == name) {
                return Some("cookie");
            }
        }
    }
    None
}

/// The origin's `Cache-Control`, as far as a shared cache cares.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub must_revalidate: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
}

impl CacheControl {
    pub fn parse(headers: &HeaderMap) -> CacheControl {
        let mut cc = CacheControl::default();
        for v in headers.get_all(header::CACHE_CONTROL) {
            let Ok(v) = v.to_str() else {
                // Unreadable: assume the worst.
                cc.no_store = true;
                continue;
            };
            for directive in v.split(',') {
                let (name, value) = match directive.split_once('=') {
                    Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                    None => (directive.trim(), None),
                };
                let seconds = || {
                    value.and_then(|v| match v.parse::<u64>() {
                        Ok(n) => Some(n),
                        // Too many digits: 2^31 (RFC 9111 1.2.2), not 0.
                        Err(_) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                            Some(2_147_483_648)
                        }
                        Err(_) => None,
                    })
                };
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => cc.no_store = true,
                    // `no-cache="field"` still asks for revalidation; we
                    // treat it like plain no-cache.
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "must-revalidate" | "proxy-revalidate" => cc.must_revalidate = true,
                    // A malformed age is treated as 0 (RFC 9111 4.2.1).
                    "max-age" => cc.max_age = Some(seconds().unwrap_or(0)),
                    "s-maxage" => cc.s_maxage = Some(seconds().unwrap_or(0)),
                    _ => {}
                }
            }
        }
        cc
    }
}

/// Statuses stored by default (RFC 9110 15.1's heuristically cacheable
/// set, without 206 partial content and the 405/414/501 oddities).
pub fn cacheable_status(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 410
    )
}

/// What may happen to an origin response.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Stored for `ttl` (before jitter) with these stale windows.
    Store {
        ttl: Duration,
        swr: Duration,
        sie: Duration,
    },
    /// Not stored, but it is the same answer for everyone who asked for
    /// this key at the same time, so requests waiting on this fill get it
    /// too (an error page during a stampede costs the origin once).
    ShareOnly,
    /// Meant for the one client that asked: never stored, never shared.
    Private,
}

pub fn decide(status: StatusCode, headers: &HeaderMap, policy: &RoutePolicy) -> Decision {
    let cc = CacheControl::parse(headers);
    if headers.contains_key(header::SET_COOKIE) || cc.private || cc.no_store || cc.no_cache {
        return Decision::Private;
    }
    if crate::cache::key::vary_names(headers).is_none() {
        // `Vary: *` (or unparseable): the answer depends on more than the
        // request says.
        return Decision::Private;
    }
    if matches!(status.as_u16(), 206 | 304) {
        // Answers to one client's range or conditional request.
        return Decision::Private;
    }
    if !cacheable_status(status) {
        return Decision::ShareOnly;
    }
    let ttl = match (policy.honour_origin, cc.s_maxage.or(cc.max_age)) {
        // The origin's lifetime counts from when it made the answer: less
        // the age it already has (RFC 9111 4.2).
        (true, Some(secs)) => Duration::from_secs(
            secs.saturating_sub(crate::cache::entry::origin_age(headers))
                .min(365 * 24 * 3600),
        ),
        _ => policy.ttl,
    };
    if ttl.is_zero() {
        return Decision::ShareOnly;
    }
    let (swr, sie) = if cc.must_revalidate {
        (Duration::ZERO, Duration::ZERO)
    } else {
        (policy.swr, policy.sie)
    };
    Decision::Store { ttl, swr, sie }
}

/// `ttl` moved by up to `jitter` of itself, either way; `r` is uniform in
/// [0, 1). Entries filled in the same instant then expire over a window of
/// `2 * jitter * ttl` instead of all at once.
pub fn jittered(ttl: Duration, jitter: f64, r: f64) -> Duration {
    let factor = 1.0 + jitter * (2.0 * r - 1.0);
    Duration::from_secs_f64((ttl.as_secs_f64() * factor).max(0.001))
}

/// XFetch (Vattani et al., "Optimal Probabilistic Cache Stampede
/// Prevention"): refresh early when `now - delta * beta * ln(r) >= expiry`,
/// `delta` being how long a fill takes and `r` uniform in (0, 1]. The
/// closer the expiry and the slower the fill, the likelier; one hot key's
/// many readers make it near certain that one of them refreshes it in time.
pub fn xfetch_due(now_ms: u64, expires_ms: u64, delta_ms: u64, beta: f64, r: f64) -> bool {
    if beta <= 0.0 || r <= 0.0 {
        return false;
    }
    let early = delta_ms as f64 * beta * -r.ln();
    now_ms as f64 + early >= expires_ms as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RoutePolicy {
        RoutePolicy {
            ttl: Duration::from_secs(30),
            jitter: 0.1,
            swr: Duration::from_secs(5),
            sie: Duration::from_secs(60),
            key_headers: vec![],
            ignore_cookies: vec!["_ga".into()],
            honour_origin: false,
            early_refresh: 0.0,
        }
    }

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (n, v) in pairs {
            m.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    #[test]
    fn private_requests_bypass() {
        let p = policy();
        assert_eq!(request_bypass(&Method::GET, &h(&[]), false, &p), None);
        assert_eq!(request_bypass(&Method::HEAD, &h(&[]), false, &p), None);
        assert_eq!(
            request_bypass(&Method::POST, &h(&[]), false, &p),
            Some("method")
        );
        assert_eq!(
            request_bypass(&Method::GET, &h(&[]), true, &p),
            Some("request_body")
        );
        assert_eq!(
            request_bypass(
                &Method::GET,
                &h(&[("authorization", "Bearer x")]),
                false,
                &p
            ),
            Some("authorization")
        );
        assert_eq!(
            request_bypass(&Method::GET, &h(&[("cookie", "session=abc")]), false, &p),
            Some("cookie")
        );
        // Only ignorable cookies: still cacheable.
        assert_eq!(
            request_bypass(&Method::GET, &h(&[("cookie", "_ga=1")]), false, &p),
            None
        );
        assert_eq!(
            request_bypass(&Method::GET, &h(&[("cookie", "_ga=1; sid=2")]), false, &p),
            Some("cookie")
        );
        assert_eq!(
            request_bypass(&Method::GET, &h(&[("cookie", "_ga=1, sid=2")]), false, &p),
            Some("cookie")
        );
        assert_eq!(
            request_bypass(
                &Method::GET,
                &h(&[("cookie", "_ga=1"), ("cookie", "sid=2")]),
                false,
                &p
            ),
            Some("cookie")
        );
    }

    #[test]
    fn private_responses_are_never_stored_or_shared() {
        let p = policy();
        for headers in [
            h(&[("set-cookie", "sid=1")]),
            h(&[("cache-control", "private")]),
            h(&[("cache-control", "public, no-store")]),
            h(&[("cache-control", "no-cache")]),
            h(&[
                ("cache-control", "max-age=60"),
                ("cache-control", "Private"),
            ]),
            h(&[("vary", "*")]),
        ] {
            assert_eq!(
                decide(StatusCode::OK, &headers, &p),
                Decision::Private,
                "{headers:?}"
            );
        }
    }

    #[test]
    fn statuses_and_origin_lifetimes() {
        let mut p = policy();
        assert!(
            matches!(decide(StatusCode::OK, &h(&[]), &p), Decision::Store { ttl, .. } if ttl == Duration::from_secs(30))
        );
        assert_eq!(
            decide(StatusCode::INTERNAL_SERVER_ERROR, &h(&[]), &p),
            Decision::ShareOnly
        );
        assert_eq!(
            decide(StatusCode::PARTIAL_CONTENT, &h(&[]), &p),
            Decision::Private
        );
        assert_eq!(
            decide(StatusCode::NOT_MODIFIED, &h(&[]), &p),
            Decision::Private
        );
        // The origin's lifetime is ignored unless the route honours it.
        let cc = h(&[("cache-control", "public, max-age=5, s-maxage=7")]);
        assert!(
            matches!(decide(StatusCode::OK, &cc, &p), Decision::Store { ttl, .. } if ttl == Duration::from_secs(30))
        );
        p.honour_origin = true;
        assert!(
            matches!(decide(StatusCode::OK, &cc, &p), Decision::Store { ttl, .. } if ttl == Duration::from_secs(7))
        );
        let cc = h(&[("cache-control", "max-age=0")]);
        assert_eq!(decide(StatusCode::OK, &cc, &p), Decision::ShareOnly);
        // An answer that is already old has that much less to live.
        let cc = h(&[("cache-control", "max-age=10"), ("age", "4")]);
        assert!(
            matches!(decide(StatusCode::OK, &cc, &p), Decision::Store { ttl, .. } if ttl == Duration::from_secs(6))
        );
        let cc = h(&[("cache-control", "max-age=10"), ("age", "10")]);
        assert_eq!(decide(StatusCode::OK, &cc, &p), Decision::ShareOnly);
        let cc = h(&[("cache-control", "max-age=10, must-revalidate")]);
        assert_eq!(
            decide(StatusCode::OK, &cc, &p),
            Decision::Store {
                ttl: Duration::from_secs(10),
                swr: Duration::ZERO,
                sie: Duration::ZERO
            }
        );
    }

    #[test]
    fn cache_control_parsing() {
        let cc = CacheControl::parse(&h(&[(
            "cache-control",
            "Public, MAX-AGE=\"12\", s-maxage=bogus",
        )]));
        assert_eq!(cc.max_age, Some(12));
        assert_eq!(cc.s_maxage, Some(0));
        assert!(!cc.private);
        let cc = CacheControl::parse(&h(&[("cache-control", "max-age=99999999999999999999")]));
        assert_eq!(cc.max_age, Some(2_147_483_648));
    }

    #[test]
    fn jitter_stays_in_its_window_and_spreads() {
        let ttl = Duration::from_secs(100);
        assert_eq!(jittered(ttl, 0.0, 0.7), ttl);
        assert_eq!(jittered(ttl, 0.1, 0.0), Duration::from_secs(90));
        assert_eq!(jittered(ttl, 0.1, 0.5), ttl);
        let samples: Vec<f64> = (0..1000)
            .map(|_| jittered(ttl, 0.1, rand::random::<f64>()).as_secs_f64())
            .collect();
        assert!(samples.iter().all(|s| (90.0..=110.0).contains(s)));
        let min = samples.iter().cloned().fold(f64::MAX, f64::min);
        let max = samples.iter().cloned().fold(f64::MIN, f64::max);
        assert!(min < 92.0 && max > 108.0, "spread {min}..{max}");
    }

    #[test]
    fn xfetch_refreshes_only_near_expiry() {
        // Far from expiry: never.
        assert!(!xfetch_due(0, 100_000, 100, 1.0, 0.5));
        // At expiry: always.
        assert!(xfetch_due(100_000, 100_000, 100, 1.0, 0.99));
        // Just before, with a slow fill: likely for small r.
        assert!(xfetch_due(99_900, 100_000, 200, 1.0, 0.1));
        assert!(!xfetch_due(99_900, 100_000, 200, 0.0, 0.1));
    }
}
