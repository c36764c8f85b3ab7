//! A cluster's circuit breaker (Sentinel's `DegradeRule`, resilience4j's
//! `CircuitBreaker`): closed, it counts calls, failed calls and slow calls
//! over a sliding window of one-second buckets; once the window holds
//! `min_calls` and either ratio reaches its threshold it opens. Open, every
//! request is answered at once (the route's fallback or 503) for
//! `open_for`; then it half-opens and lets `half_open_probes` calls
//! through: all good closes it, one bad opens it again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::BreakerConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    /// For the `flashgate_breaker_state` gauge and `/admin/status`.
    pub fn code(self) -> i64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

#[derive(Default, Clone, Copy)]
struct Bucket {
    second: u64,
    calls: u32,
    failed: u32,
    slow: u32,
}

struct Inner {
    state: State,
    buckets: Vec<Bucket>,
    opened: Instant,
    /// Probes let through / answered good while half open.
    probes_out: u32,
    probes_ok: u32,
}

pub struct Breaker {
    cfg: BreakerConfig,
    epoch: Instant,
    inner: Mutex<Inner>,
}

/// Whether a call that passed was a half-open probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub probe: bool,
}

impl Breaker {
    pub fn new(cfg: &BreakerConfig) -> Breaker {
        let now = Instant::now();
        Breaker {
            cfg: cfg.clone(),
            epoch: now,
            inner: Mutex::new(Inner {
                state: State::Closed,
                buckets: vec![Bucket::default(); cfg.window.0.as_secs().max(1) as usize],
                opened: now,
                probes_out: 0,
                probes_ok: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> State {
        let mut inner = self.lock();
        self.advance(&mut inner, Instant::now());
        inner.state
    }

    fn advance(&self, inner: &mut Inner, now: Instant) {
        if inner.state == State::Open && now.duration_since(inner.opened) >= self.cfg.open_for.0 {
            inner.state = State::HalfOpen;
            inner.probes_out = 0;
            inner.probes_ok = 0;
        }
    }

    /// May a call go out now? `None`: answer at once.
    pub fn try_pass(&self) -> Option<Pass> {
        let mut inner = self.lock();
        self.advance(&mut inner, Instant::now());
        match inner.state {
            State::Closed => Some(Pass { probe: false }),
            State::Open => None,
            State::HalfOpen if inner.probes_out < self.cfg.half_open_probes => {
                inner.probes_out += 1;
                Some(Pass { probe: true })
            }
            State::HalfOpen => None,
        }
    }

    /// The outcome of a call that passed.
    pub fn record(&self, pass: Pass, failed: bool, took: Duration) {
        let bad = failed || took >= self.cfg.slow_call.0;
        let now = Instant::now();
        let mut inner = self.lock();
        if pass.probe {
            if inner.state != State::HalfOpen {
                return;
            }
            if bad {
                self.open(&mut inner, now);
            } else {
                inner.probes_ok += 1;
                if inner.probes_ok >= self.cfg.half_open_probes {
                    inner.state = State::Closed;
                    inner
                        .buckets
                        .iter_mut()
                        .for_each(|b| *b = Bucket::default());
                    tracing::info!("circuit breaker closed");
                }
            }
            return;
        }
        if inner.state != State::Closed {
            return;
        }
        let second = now.duration_since(self.epoch).as_secs();
        let n = inner.buckets.len();
        let b = &mut inner.buckets[(second as usize) % n];
        if b.second != second {
            *b = Bucket {
                second,
                ..Bucket::default()
            };
        }
        b.calls += 1;
        b.failed += u32::from(failed);
        b.slow += u32::from(took >= self.cfg.slow_call.0);
        let (mut calls, mut failed_n, mut slow) = (0u32, 0u32, 0u32);
        for b in inner
            .buckets
            .iter()
            .filter(|b| second - b.second < n as u64)
        {
            calls += b.calls;
            failed_n += b.failed;
            slow += b.slow;
        }
        if calls >= self.cfg.min_calls {
            let calls = f64::from(calls);
            if f64::from(failed_n) / calls >= self.cfg.error_ratio
                || f64::from(slow) / calls >= self.cfg.slow_call_ratio
            {
                self.open(&mut inner, now);
            }
        }
    }

    fn open(&self, inner: &mut Inner, now: Instant) {
        inner.state = State::Open;
        inner.opened = now;
        tracing::warn!(open_for = ?self.cfg.open_for.0, "circuit breaker opened");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    fn breaker(open_for_ms: u64) -> Breaker {
        Breaker::new(&BreakerConfig {
            window: Dur(Duration::from_secs(10)),
            min_calls: 4,
            error_ratio: 0.5,
            slow_call: Dur(Duration::from_millis(100)),
            slow_call_ratio: 0.75,
            open_for: Dur(Duration::from_millis(open_for_ms)),
            half_open_probes: 2,
        })
    }

    #[test]
    fn opens_on_errors_after_min_calls_then_half_opens_and_closes() {
        let b = breaker(50);
        let ok = Duration::from_millis(1);
        for failed in [true, true, true] {
            b.record(b.try_pass().unwrap(), failed, ok);
        }
        assert_eq!(b.state(), State::Closed, "below min_calls");
        b.record(b.try_pass().unwrap(), false, ok);
        assert_eq!(b.state(), State::Open);
        assert!(b.try_pass().is_none());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.state(), State::HalfOpen);
        let p1 = b.try_pass().unwrap();
        let p2 = b.try_pass().unwrap();
        assert!(p1.probe && p2.probe);
        assert!(b.try_pass().is_none(), "only the probes");
        b.record(p1, false, ok);
        b.record(p2, false, ok);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn slow_calls_open_it_and_a_bad_probe_reopens() {
        let b = breaker(30);
        for _ in 0..4 {
            b.record(b.try_pass().unwrap(), false, Duration::from_millis(150));
        }
        assert_eq!(b.state(), State::Open);
        std::thread::sleep(Duration::from_millis(40));
        let p = b.try_pass().unwrap();
        b.record(p, true, Duration::from_millis(1));
        assert_eq!(b.state(), State::Open);
    }
}
