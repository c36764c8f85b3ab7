//! A cluster's gate: the slot a request takes before it goes upstream,
//! with the cluster's learned limit ([`adaptive`](super::adaptive)),
//! shares per priority, a queue, and the breaker.
//!
//! - Below the limit any request takes a slot at once (priorities borrow
//!   what the others do not use).
//! - At the limit a priority still below its reserved share
//!   (`[overload.shares]`) takes a slot at once: checkout never waits
//!   behind browsing for capacity that is its own.
//! - Otherwise the request waits in its priority's queue; a freed slot
//!   goes to the highest priority first, and within it to requests that
//!   bot rules did not deprioritize. A queue whose oldest request waited
//!   `lifo_after` serves its newest first (adaptive LIFO); a request that
//!   waited its priority's `max_wait` is answered 503 rather than sent
//!   late (its client has likely given up).
//! - `max_concurrent_requests` stays the hard cap: at it, 503 at once
//!   (`upstream_overflow`, from the cluster itself).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use filters::Priority;
use prometheus::{Histogram, IntGauge};
use tokio::sync::oneshot;

use super::adaptive::{Adaptive, Latencies, Sample};
use super::breaker::{self, Breaker};
use super::level::Tracker;
use crate::config::{OverloadConfig, UpstreamConfig};
use crate::observe::metrics::Metrics;

/// Why the gate answered instead of sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The breaker is open.
    Breaker,
    /// Waited `max_wait` for a slot.
    QueueTimeout,
    /// The queue is full, or the hard cap is reached.
    Full,
}

impl Refused {
    /// The cause of the gateway's 503.
    pub fn error(self) -> crate::error::ProxyError {
        use crate::error::ProxyError;
        match self {
            Refused::Breaker => ProxyError::BreakerOpen,
            Refused::QueueTimeout => ProxyError::QueueTimeout,
            Refused::Full => ProxyError::QueueFull,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Refused::Breaker => "breaker_open",
            Refused::QueueTimeout => "queue_timeout",
            Refused::Full => "queue_full",
        }
    }
}

pub fn index(p: Priority) -> usize {
    match p {
        Priority::Critical => 0,
        Priority::Normal => 1,
        Priority::Sheddable => 2,
    }
}

struct Waiter {
    tx: oneshot::Sender<Permit>,
    since: Instant,
}

/// What the gate saw during one tick.
#[derive(Default, Clone, Copy)]
struct Window {
    arrivals: u64,
    calls: u64,
    failed: u64,
    latencies: Latencies,
    fastest: Option<Duration>,
    max_in_flight: usize,
    max_wait: Duration,
}

struct State {
    in_flight: [usize; 3],
    /// By priority, then deprioritized (1) or not (0).
    queues: [[VecDeque<Waiter>; 2]; 3],
    adaptive: Option<Adaptive>,
    window: Window,
}

impl State {
    fn total(&self) -> usize {
        self.in_flight.iter().sum()
    }
    fn queued(&self) -> usize {
        self.queues.iter().flatten().map(VecDeque::len).sum()
    }
}

pub struct Gate {
    pub cluster: Arc<str>,
    /// What it was built from: a reload keeps the gate (and what it
    /// learned) when both are equal.
    pub built_from: (UpstreamConfig, OverloadConfig),
    hard_cap: usize,
    shares: [f64; 3],
    max_wait: [Duration; 3],
    lifo_after: Duration,
    max_queue: usize,
    state: Mutex<State>,
    pub breaker: Option<Breaker>,
    limit_gauge: IntGauge,
    breaker_gauge: IntGauge,
    queue_time: Histogram,
    /// The cluster's own level, computed from what this gate saw
    /// ([`Gate::step_level`]); read by every request to the cluster.
    own_level: AtomicU8,
    tracker: Mutex<Tracker>,
    /// The level its requests see (own or the process's, the higher, or
    /// forced): `flashgate_cluster_load_level{cluster}`.
    level_gauge: IntGauge,
}

/// One upstream slot, held until the response ends (it rides on the
/// response body). Dropping it frees the slot, hands it to the next
/// waiter, and feeds the latency to the limiter and the breaker.
pub struct Permit {
    gate: Arc<Gate>,
    priority: usize,
    granted: Instant,
    pass: Option<breaker::Pass>,
    failed: bool,
}

impl Permit {
    /// The call failed (a 5xx, a timeout, a reset): counted for the
    /// error ratio and the breaker, and its latency teaches the limiter
    /// nothing.
    pub fn failed(&mut self) {
        self.failed = true;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let took = self.granted.elapsed();
        if let (Some(b), Some(pass)) = (&self.gate.breaker, self.pass) {
            b.record(pass, self.failed, took);
        }
        self.gate.release(self.priority, took, self.failed);
    }
}

/// Sends granted permits; a waiter gone meanwhile drops its permit, which
/// frees the slot again.
fn hand_over(handed: Vec<(oneshot::Sender<Permit>, Permit)>) {
    for (tx, permit) in handed {
        let _ = tx.send(permit);
    }
}

/// What [`Gate::try_acquire`] comes back with.
pub enum Try {
    Granted(Permit),
    Wait(Waiting),
    Refused(Refused),
}

/// A request in a gate's queue.
pub struct Waiting {
    gate: Arc<Gate>,
    rx: oneshot::Receiver<Permit>,
    pass: Option<breaker::Pass>,
    max_wait: Duration,
    since: Instant,
}

impl Waiting {
    /// Waits for a freed slot, at most the priority's `max_wait`.
    pub async fn wait(self) -> Result<Permit, Refused> {
        let waited = tokio::time::timeout(self.max_wait, self.rx).await;
        let wait = self.since.elapsed();
        self.gate.queue_time.observe(wait.as_secs_f64());
        match waited {
            Ok(Ok(mut permit)) => {
                permit.pass = self.pass;
                Ok(permit)
            }
            _ => {
                let mut s = self.gate.lock();
                s.window.max_wait = s.window.max_wait.max(wait);
                Err(Refused::QueueTimeout)
            }
        }
    }
}

/// One tick's summary of a gate, for the load level.
#[derive(Debug, Default, Clone, Copy)]
pub struct Signals {
    /// Arrivals per second x no-load latency, over the limit.
    pub utilization: f64,
    /// The longest wait for a slot (granted, timed out or still waiting).
    pub queue_delay: Duration,
    /// The tick's latency (fastest tenth) over the no-load baseline.
    pub latency_ratio: f64,
    pub calls: u64,
    pub failed: u64,
}

impl Gate {
    pub fn new(u: &UpstreamConfig, o: &OverloadConfig, metrics: &Metrics) -> Arc<Gate> {
        let adaptive = u
            .adaptive
            .enabled
            .then(|| Adaptive::new(&u.adaptive, u.max_concurrent_requests));
        let name = u.name.as_str();
        let gate = Gate {
            cluster: name.into(),
            built_from: (u.clone(), o.clone()),
            hard_cap: u.max_concurrent_requests,
            shares: [o.shares.critical, o.shares.normal, o.shares.sheddable],
            max_wait: [
                o.max_wait.critical.0,
                o.max_wait.normal.0,
                o.max_wait.sheddable.0,
            ],
            lifo_after: o.lifo_after.0,
            max_queue: o.max_queue,
            state: Mutex::new(State {
                in_flight: [0; 3],
                queues: Default::default(),
                adaptive,
                window: Window::default(),
            }),
            breaker: u.breaker.as_ref().map(Breaker::new),
            limit_gauge: metrics.adaptive_limit.with_label_values(&[name]),
            breaker_gauge: metrics.breaker_state.with_label_values(&[name]),
            queue_time: metrics.queue_seconds.with_label_values(&[name]),
            own_level: AtomicU8::new(0),
            tracker: Mutex::new(Tracker::default()),
            level_gauge: metrics.cluster_load_level.with_label_values(&[name]),
        };
        gate.limit_gauge.set(gate.limit() as i64);
        gate.breaker_gauge.set(0);
        Arc::new(gate)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The limit in effect: learned, or the hard cap.
    pub fn limit(&self) -> usize {
        self.lock()
            .adaptive
            .as_ref()
            .map_or(self.hard_cap, Adaptive::limit)
    }

    fn limit_of(&self, s: &State) -> usize {
        s.adaptive
            .as_ref()
            .map_or(self.hard_cap, Adaptive::limit)
            .max(1)
    }

    /// Whether priority `p` may take a slot now.
    fn may_take(&self, s: &State, p: usize) -> bool {
        let total = s.total();
        let limit = self.limit_of(s);
        total < limit || (s.in_flight[p] as f64) < (limit as f64 * self.shares[p]).ceil()
    }

    /// Counts a request that wanted this cluster but was answered before
    /// the gate (shed by the load level): demand all the same.
    pub fn arrived(&self) {
        self.lock().window.arrivals += 1;
    }

    /// Takes a slot, waiting for one within the priority's `max_wait`.
    /// The common case (a free slot) is synchronous; only a wait is boxed,
    /// so the future every upstream request carries stays small.
    pub async fn acquire(
        self: &Arc<Gate>,
        priority: Priority,
        deprioritized: bool,
    ) -> Result<Permit, Refused> {
        match self.try_acquire(priority, deprioritized) {
            Try::Granted(p) => Ok(p),
            Try::Refused(r) => Err(r),
            Try::Wait(w) => Box::pin(w.wait()).await,
        }
    }

    /// A slot now, a place in the queue, or a refusal.
    pub fn try_acquire(self: &Arc<Gate>, priority: Priority, deprioritized: bool) -> Try {
        let pass = match &self.breaker {
            Some(b) => match b.try_pass() {
                Some(pass) => Some(pass),
                None => return Try::Refused(Refused::Breaker),
            },
            None => None,
        };
        let p = index(priority);
        let mut s = self.lock();
        s.window.arrivals += 1;
        // Free slots go to those already waiting first (their queue may
        // also hold only requests whose clients left).
        let handed = if s.queued() > 0 && self.may_take(&s, p) {
            self.dispatch(&mut s)
        } else {
            Vec::new()
        };
        let ahead = s.queues[..=p].iter().flatten().any(|q| !q.is_empty());
        // At the hard cap the cluster's own limit answers 503 at once
        // (`upstream_overflow`), as without overload protection.
        let out = if !ahead && self.may_take(&s, p) || s.total() >= self.hard_cap {
            Try::Granted(self.grant(&mut s, p, pass))
        } else if s.queued() >= self.max_queue {
            Try::Refused(Refused::Full)
        } else {
            let (tx, rx) = oneshot::channel();
            let since = Instant::now();
            s.queues[p][usize::from(deprioritized)].push_back(Waiter { tx, since });
            Try::Wait(Waiting {
                gate: self.clone(),
                rx,
                pass,
                max_wait: self.max_wait[p],
                since,
            })
        };
        drop(s);
        if !handed.is_empty() {
            hand_over(handed);
        }
        out
    }

    fn grant(self: &Arc<Gate>, s: &mut State, p: usize, pass: Option<breaker::Pass>) -> Permit {
        s.in_flight[p] += 1;
        s.window.max_in_flight = s.window.max_in_flight.max(s.total());
        Permit {
            gate: self.clone(),
            priority: p,
            granted: Instant::now(),
            pass,
            failed: false,
        }
    }

    fn release(self: &Arc<Gate>, p: usize, took: Duration, failed: bool) {
        let handed = {
            let mut s = self.lock();
            s.in_flight[p] = s.in_flight[p].saturating_sub(1);
            let w = &mut s.window;
            w.calls += 1;
            if failed {
                w.failed += 1;
            } else {
                w.latencies.add(took);
                w.fastest = Some(w.fastest.map_or(took, |f| f.min(took)));
            }
            self.dispatch(&mut s)
        };
        hand_over(handed);
    }

    /// Gives free slots to waiters, highest priority first; waiters whose
    /// clients left are dropped on the way. The permits are sent by
    /// [`hand_over`], outside the lock.
    fn dispatch(self: &Arc<Gate>, s: &mut State) -> Vec<(oneshot::Sender<Permit>, Permit)> {
        let mut handed = Vec::new();
        let now = Instant::now();
        for q in 0..3 {
            for d in 0..2 {
                while !s.queues[q][d].is_empty() && self.may_take(s, q) {
                    let queue = &mut s.queues[q][d];
                    let lifo = queue
                        .front()
                        .is_some_and(|w| now.duration_since(w.since) >= self.lifo_after);
                    let waiter = if lifo {
                        queue.pop_back()
                    } else {
                        queue.pop_front()
                    };
                    let Some(waiter) = waiter else { break };
                    if waiter.tx.is_closed() {
                        continue;
                    }
                    let wait = now.duration_since(waiter.since);
                    s.window.max_wait = s.window.max_wait.max(wait);
                    let permit = self.grant(s, q, None);
                    handed.push((waiter.tx, permit));
                }
            }
        }
        handed
    }

    /// Ends a tick: updates the limit and the gauges, drops waiters whose
    /// clients left, and returns what the load level reads.
    pub fn tick(self: &Arc<Gate>, tick: Duration) -> Signals {
        let now = Instant::now();
        let mut s = self.lock();
        for q in s.queues.iter_mut().flatten() {
            q.retain(|w| !w.tx.is_closed());
        }
        let oldest = s
            .queues
            .iter()
            .flatten()
            .filter_map(|q| q.front())
            .map(|w| now.duration_since(w.since))
            .max()
            .unwrap_or_default();
        let w = std::mem::take(&mut s.window);
        let mean = w.latencies.low();
        if let Some(a) = s.adaptive.as_mut() {
            a.update(
                Sample {
                    mean,
                    fastest: w.fastest,
                    max_in_flight: w.max_in_flight,
                },
                now,
            );
        }
        let limit = self.limit_of(&s);
        let baseline = s
            .adaptive
            .as_ref()
            .and_then(Adaptive::baseline)
            .unwrap_or(super::adaptive::LATENCY_FLOOR);
        let fastest = s
            .adaptive
            .as_ref()
            .and_then(Adaptive::fastest)
            .unwrap_or_default();
        s.window.max_in_flight = s.total();
        // A limit that grew frees slots without a release.
        let handed = self.dispatch(&mut s);
        drop(s);
        hand_over(handed);
        self.limit_gauge.set(limit as i64);
        if let Some(b) = &self.breaker {
            self.breaker_gauge.set(b.state().code());
        }
        let rate = w.arrivals as f64 / tick.as_secs_f64();
        Signals {
            // The measured fastest call, not the floored baseline: the
            // demand of a fast origin is small, and overstating it would
            // shed for nothing.
            utilization: rate * fastest.as_secs_f64() / limit as f64,
            queue_delay: w.max_wait.max(oldest),
            latency_ratio: mean.map_or(0.0, |m| {
                m.max(super::adaptive::LATENCY_FLOOR).as_secs_f64() / baseline.as_secs_f64()
            }),
            calls: w.calls,
            failed: w.failed,
        }
    }

    /// The cluster's own level, 0 (calm) to 3 (critical).
    pub fn own_level(&self) -> u8 {
        self.own_level.load(Ordering::Relaxed)
    }

    /// Moves the cluster's own level by one tick's signals (with its
    /// hysteresis); returns it.
    pub fn step_level(&self, cfg: &OverloadConfig, signals: Signals, tick: Duration) -> u8 {
        let mut t = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
        let level = t.step(cfg, signals, tick, Instant::now());
        self.own_level.store(level, Ordering::Relaxed);
        level
    }

    /// Shows the level this cluster's requests see in its gauge.
    pub fn show_level(&self, in_effect: u8) {
        self.level_gauge.set(i64::from(in_effect));
    }

    /// For `/admin/status`.
    pub fn status(&self) -> serde_json::Value {
        let s = self.lock();
        serde_json::json!({
            "level": self.level_gauge.get(),
            "own_level": self.own_level(),
            "limit": self.limit_of(&s),
            "adaptive": s.adaptive.is_some(),
            "baseline_ms": s.adaptive.as_ref().and_then(Adaptive::baseline).map(|b| b.as_secs_f64() * 1000.0),
            "in_flight": {"critical": s.in_flight[0], "normal": s.in_flight[1], "sheddable": s.in_flight[2]},
            "queued": s.queued(),
            "breaker": self.breaker.as_ref().map(|b| b.state().as_str()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn gate(extra: &str) -> Arc<Gate> {
        let cfg = Config::parse(&format!(
            "{}{extra}",
            crate::config::TEST_BASE.replace(
                "endpoints = [\"127.0.0.1:9000\"]",
                "endpoints = [\"127.0.0.1:9000\"]\nmax_concurrent_requests = 100\nadaptive = { initial_limit = 4, min_limit = 4 }"
            )
        ))
        .unwrap();
        Gate::new(&cfg.upstreams[0], &cfg.overload, &Metrics::new())
    }

    #[tokio::test]
    async fn critical_keeps_its_share_and_goes_first() {
        let g = gate("");
        // Sheddable fills the limit (borrowing) ...
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(g.acquire(Priority::Sheddable, false).await.unwrap());
        }
        // ... critical still gets its reserved half at once ...
        let c1 = g.acquire(Priority::Critical, false).await.unwrap();
        let _c2 = g.acquire(Priority::Critical, false).await.unwrap();
        // ... and beyond that waits, but ahead of the others.
        let g2 = g.clone();
        let shed = tokio::spawn(async move { g2.acquire(Priority::Sheddable, false).await });
        tokio::task::yield_now().await;
        let g3 = g.clone();
        let crit = tokio::spawn(async move { g3.acquire(Priority::Critical, false).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(c1);
        drop(held.pop());
        let crit = crit.await.unwrap();
        assert!(crit.is_ok());
        // The sheddable waiter times out (max_wait 100ms) instead of being sent late.
        assert_eq!(shed.await.unwrap().err(), Some(Refused::QueueTimeout));
    }

    #[tokio::test]
    async fn waiters_get_freed_slots() {
        let g = gate("");
        let held: Vec<_> = futures_join(&g, 4).await;
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.acquire(Priority::Normal, false).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(held);
        assert!(waiter.await.unwrap());
        assert_eq!(g.lock().total(), 0);
    }

    async fn futures_join(g: &Arc<Gate>, n: usize) -> Vec<Permit> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(g.acquire(Priority::Normal, false).await.unwrap());
        }
        v
    }
}
