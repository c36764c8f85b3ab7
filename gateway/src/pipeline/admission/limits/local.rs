//! Local limits: governor's GCRA in this gateway's memory.
//!
//! Keyed limits (per IP, user, header value) keep one timestamp per key in
//! a [`CappedStore`]: governor's `DashMap` store with a cap on the keys
//! all keyed limits track together (`rate_limit.max_keys`). A key that is
//! new while the cap is reached is not tracked: it shares the limit's one
//! overflow budget with every other such key, so a flood of random IPs
//! costs no memory beyond the cap and gets one key's rate between them
//! all. Idle keys (whose state is the same as a fresh one) are dropped by
//! [`Keyed::sweep`], which the limits' sweeper runs every
//! `rate_limit.sweep_interval` (governor keeps keys until `retain_recent`
//! runs, governor#171).

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};

use crate::config::LimitSpec;

/// What a limit said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed { remaining: u32 },
    Limited { retry_after: Duration },
}

/// A key of a keyed limit: an IP (IPv6 by its /64, which one client
/// holds whole) or a text (user, header value).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Ip(u128),
    Text(Box<str>),
}

impl Key {
    pub fn ip(ip: IpAddr) -> Key {
        match ip {
            IpAddr::V4(v4) => Key::Ip(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Key::Ip(u128::from(u32::from(v4))),
                // The /64, with a marker bit so it never equals an IPv4.
                None => Key::Ip((u128::from(v6) & !((1u128 << 64) - 1)) | 1),
            },
        }
    }
}

/// The keys all keyed limits track together, and their cap.
#[derive(Debug)]
pub struct KeyCount {
    tracked: AtomicUsize,
    max: usize,
}

impl KeyCount {
    pub fn new(max: usize) -> KeyCount {
        KeyCount {
            tracked: AtomicUsize::new(0),
            max,
        }
    }

    /// Takes room for one more key; false at the cap.
    fn admit(&self) -> bool {
        self.tracked
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn tracked(&self) -> usize {
        self.tracked.load(Ordering::Relaxed)
    }

    /// Sets the count to what the stores hold (after a sweep): between
    /// sweeps it only grows, and may count a key twice that two requests
    /// added at once, which errs on the side of the cap.
    pub fn set(&self, n: usize) {
        self.tracked.store(n, Ordering::Relaxed);
    }
}

/// governor's `DashMap` store with the shared key cap and an overflow
/// budget for keys beyond it.
pub struct CappedStore {
    map: DashMapStateStore<Key>,
    overflow: DashMapStateStore<()>,
    count: std::sync::Arc<KeyCount>,
}

impl StateStore for CappedStore {
    type Key = Key;

    fn measure_and_replace<T, F, E>(&self, key: &Key, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if !self.map.contains_key(key) && !self.count.admit() {
            return self.overflow.measure_and_replace(&(), f);
        }
        self.map.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<Key> for CappedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&self.map, drop_below);
        ShrinkableKeyedStateStore::retain_recent(&self.overflow, drop_below);
    }

    fn shrink_to_fit(&self) {
        self.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

fn quota(spec: LimitSpec, route_burst: Option<u32>, divide_by: u32) -> Quota {
    // Divided for a fleet limit's stand-in while Redis is down: each of
    // `fleet_size` gateways takes its share of rate and burst.
    let divide_by = divide_by.max(1);
    let burst = (spec.burst_or(route_burst) / divide_by).max(1);
    let period = spec.rate.per * divide_by / spec.rate.count;
    Quota::with_period(period.max(Duration::from_nanos(1)))
        .expect("a period above zero")
        .allow_burst(NonZeroU32::new(burst).expect("burst at least 1"))
}

type KeyedLimiter = RateLimiter<Key, CappedStore, DefaultClock, StateInformationMiddleware>;
type DirectLimiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// A keyed local limit.
pub struct Keyed(KeyedLimiter);

impl Keyed {
    pub fn new(
        spec: LimitSpec,
        route_burst: Option<u32>,
        divide_by: u32,
        count: std::sync::Arc<KeyCount>,
    ) -> Keyed {
        let store = CappedStore {
            map: DashMapStateStore::default(),
            overflow: DashMapStateStore::default(),
            count,
        };
        Keyed(KeyedLimiter::new(
            quota(spec, route_burst, divide_by),
            store,
            DefaultClock::default(),
        ))
    }

    pub fn check(&self, key: &Key) -> Decision {
        match self.0.check_key(key) {
            Ok(s) => Decision::Allowed {
                remaining: s.remaining_burst_capacity(),
            },
            Err(n) => Decision::Limited {
                retry_after: n.wait_time_from(self.0.clock().now()),
            },
        }
    }

    /// Drops idle keys; returns the keys left.
    pub fn sweep(&self) -> usize {
        self.0.retain_recent();
        self.0.shrink_to_fit();
        self.0.len()
    }
}

/// One budget (a route's, a hot value's).
pub struct Direct(DirectLimiter);

impl Direct {
    pub fn new(spec: LimitSpec, route_burst: Option<u32>, divide_by: u32) -> Direct {
        Direct(
            RateLimiter::direct_with_clock(
                quota(spec, route_burst, divide_by),
                DefaultClock::default(),
            )
            .with_middleware::<StateInformationMiddleware>(),
        )
    }

    pub fn check(&self) -> Decision {
        match self.0.check() {
            Ok(s) => Decision::Allowed {
                remaining: s.remaining_burst_capacity(),
            },
            Err(n) => Decision::Limited {
                retry_after: n.wait_time_from(self.0.clock().now()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rate;
    use std::sync::Arc;

    fn spec(count: u32, per: u64, burst: u32) -> LimitSpec {
        LimitSpec {
            rate: Rate {
                count,
                per: Duration::from_secs(per),
            },
            burst: Some(burst),
        }
    }

    #[test]
    fn exactly_the_burst_passes_then_retry_after() {
        let k = Keyed::new(spec(1, 60, 5), None, 1, Arc::new(KeyCount::new(10)));
        let a = Key::Text("a".into());
        for i in 0..5 {
            assert_eq!(k.check(&a), Decision::Allowed { remaining: 4 - i });
        }
        match k.check(&a) {
            Decision::Limited { retry_after } => {
                assert!(retry_after > Duration::from_secs(50), "{retry_after:?}")
            }
            d => panic!("{d:?}"),
        }
        assert!(matches!(
            k.check(&Key::Text("b".into())),
            Decision::Allowed { .. }
        ));
    }

    #[test]
    fn beyond_the_cap_new_keys_share_one_overflow_budget() {
        let count = Arc::new(KeyCount::new(3));
        let k = Keyed::new(spec(1, 60, 2), None, 1, count.clone());
        for i in 0..3u128 {
            assert!(matches!(k.check(&Key::Ip(i)), Decision::Allowed { .. }));
        }
        assert_eq!(count.tracked(), 3);
        // Two new keys pass (the overflow's burst), the third does not.
        assert!(matches!(k.check(&Key::Ip(10)), Decision::Allowed { .. }));
        assert!(matches!(k.check(&Key::Ip(11)), Decision::Allowed { .. }));
        assert!(matches!(k.check(&Key::Ip(12)), Decision::Limited { .. }));
        assert_eq!(k.sweep(), 3, "tracked keys stay at the cap");
        // A tracked key keeps its own budget.
        assert!(matches!(k.check(&Key::Ip(0)), Decision::Allowed { .. }));
    }

    #[test]
    fn idle_keys_are_swept() {
        let count = Arc::new(KeyCount::new(100));
        // 1000/s: a key is idle again 1 ms after its one request.
        let k = Keyed::new(
            LimitSpec {
                rate: Rate {
                    count: 1000,
                    per: Duration::from_secs(1),
                },
                burst: Some(1),
            },
            None,
            1,
            count,
        );
        for i in 0..50u128 {
            k.check(&Key::Ip(i));
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(k.sweep(), 0);
    }

    #[test]
    fn ipv6_keys_by_slash_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Key::ip(a), Key::ip(b));
        assert_ne!(Key::ip(a), Key::ip(c));
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(Key::ip(v4), Key::ip(mapped));
    }

    #[test]
    fn divided_for_the_fleet() {
        let d = Direct::new(spec(1, 60, 6), None, 3);
        assert!(matches!(d.check(), Decision::Allowed { .. }));
        assert!(matches!(d.check(), Decision::Allowed { .. }));
        assert!(matches!(d.check(), Decision::Limited { .. }));
    }
}
