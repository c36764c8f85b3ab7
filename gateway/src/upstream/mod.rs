//! Upstream clusters: endpoints, load balancing, keep-alive pools, active
//! health checks and passive outlier ejection.
//!
//! Each endpoint has its own pool of keep-alive connections ([`pool`]) and
//! the state that load balancing reads. Choosing
//! an endpoint only reads atomics, so it never blocks under load.

pub mod connect;
mod health;
pub mod pool;
pub mod share;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use prometheus::{Histogram, IntCounter, IntGauge};
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{LbPolicy, OutlierConfig, UpstreamConfig};
use crate::observe::metrics::Metrics;

/// The body sent upstream: the client's streaming body, or a complete one
/// (empty on retries, or produced by a filter).
/// What goes upstream: the client's body as it is (with `max_body`
/// enforced), a complete body (retries, callouts), or the client's body
/// through the route's body filters (boxed: several times the size of
/// the others, and every request moves this type several times, into
/// hyper's dispatch channel and back).
pub type UpstreamBody = Either<
    crate::edge::request_body::LimitedBody,
    Either<
        Full<Bytes>,
        Either<
            Box<filters::FilteredBody<crate::edge::request_body::LimitedBody>>,
            crate::spool::SpoolReader,
        >,
    >,
>;

/// One `host:port` of a cluster and what load balancing knows about it.
pub struct Endpoint {
    pub addr: String,
    /// `addr` parsed once, so building a request URI does not re-parse it.
    pub authority: http::uri::Authority,
    in_flight: AtomicUsize,
    /// Set by active health checks (true when none are configured).
    healthy: AtomicBool,
    /// Milliseconds since the cluster's epoch until which the endpoint is
    /// ejected by outlier detection; 0 = not ejected.
    ejected_until: AtomicU64,
    consecutive_failures: AtomicU32,
    /// Ejections in a row, for the growing backoff.
    ejection_streak: AtomicU32,
    last_ejection_end: AtomicU64,
    requests: IntCounter,
    healthy_gauge: IntGauge,
    ejected_gauge: IntGauge,
    ejections: IntCounter,
    /// Idle keep-alive connections to this endpoint.
    idle: pool::Idle,
}

impl Endpoint {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// A named group of endpoints with its pool and policies.
pub struct Cluster {
    pub name: Arc<str>,
    /// What it was built from; a reload keeps the cluster when this is equal.
    pub config: UpstreamConfig,
    pub endpoints: Arc<[Arc<Endpoint>]>,
    connect_timeout: Duration,
    /// New connections opened (pool misses).
    opened: IntCounter,
    /// WebSocket tunnels open to this cluster (`upgrade.rs`).
    pub tunnels: IntGauge,
    pub request_timeout: Duration,
    pub retries: u32,
    lb: LbPolicy,
    rr: AtomicUsize,
    limiter: Arc<Semaphore>,
    /// Each client's share of the slots for streaming requests.
    pub shares: Arc<share::ClientShares>,
    outlier: OutlierConfig,
    epoch: Instant,
    pub duration: Histogram,
    pub metrics: Arc<Metrics>,
    health_task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A reload replaces clusters; their health checks stop with them.
        if let Some(t) = &self.health_task {
            t.abort();
        }
    }
}

/// Held while a request to an endpoint is in flight (until the response
/// body ends or is dropped): counts for least-request and the cluster's
/// concurrency limit.
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    permit: Option<OwnedSemaphorePermit>,
    /// The connection the response arrives on. It goes back to the pool
    /// only after a complete response ([`InFlight::complete`]); dropped
    /// earlier (client gone, body error) it is closed, since unread
    /// response bytes would corrupt the next request on it.
    conn: Option<pool::Sender>,
}

impl InFlight {
    /// Keeps the cluster slot and the connection until the response is done.
    pub fn hold(mut self, permit: OwnedSemaphorePermit, conn: pool::Sender) -> InFlight {
        self.permit = Some(permit);
        self.conn = Some(conn);
        self
    }

    /// The response was read to its end: the connection can be reused.
    pub fn complete(mut self) {
        if let Some(conn) = self.conn.take() {
            self.endpoint.idle.put(conn);
        }
    }
}

impl crate::spool::Slot for InFlight {
    fn complete(self) {
        InFlight::complete(self)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Cluster {
    /// Builds a cluster and starts its health checks. Must run inside a
    /// tokio runtime.
    pub fn new(cfg: &UpstreamConfig, metrics: Arc<Metrics>) -> Arc<Cluster> {
        let name: Arc<str> = cfg.name.as_str().into();
        let endpoints: Arc<[Arc<Endpoint>]> = cfg
            .endpoints
            .iter()
            .map(|addr| {
                let labels = [cfg.name.as_str(), addr.as_str()];
                let healthy_gauge = metrics.endpoint_healthy.with_label_values(&labels);
                healthy_gauge.set(1);
                let ejected_gauge = metrics.endpoint_ejected.with_label_values(&labels);
                ejected_gauge.set(0);
                Arc::new(Endpoint {
                    addr: addr.clone(),
                    authority: addr.parse().expect("validated: endpoints are host:port"),
                    in_flight: AtomicUsize::new(0),
                    healthy: AtomicBool::new(true),
                    ejected_until: AtomicU64::new(0),
                    consecutive_failures: AtomicU32::new(0),
                    ejection_streak: AtomicU32::new(0),
                    last_ejection_end: AtomicU64::new(0),
                    requests: metrics.upstream_requests.with_label_values(&labels),
                    healthy_gauge,
                    ejected_gauge,
                    ejections: metrics.endpoint_ejections.with_label_values(&labels),
                    idle: pool::Idle::new(cfg.max_idle_per_endpoint, cfg.idle_timeout.0),
                })
            })
            .collect();
        let health_task = cfg
            .health
            .clone()
            .map(|h| health::spawn(name.clone(), endpoints.clone(), h, cfg.connect_timeout.0));
        Arc::new(Cluster {
            config: cfg.clone(),
            duration: metrics.upstream_duration.with_label_values(&[&cfg.name]),
            name,
            endpoints,
            connect_timeout: cfg.connect_timeout.0,
            opened: metrics.upstream_connections.with_label_values(&[&cfg.name]),
            tunnels: metrics.websocket_tunnels.with_label_values(&[&cfg.name]),
            request_timeout: cfg.request_timeout.0,
            retries: cfg.retries,
            lb: cfg.lb,
            rr: AtomicUsize::new(0),
            limiter: Arc::new(Semaphore::new(cfg.max_concurrent_requests)),
            shares: share::ClientShares::new(cfg.streaming_per_client()),
            outlier: cfg.outlier.clone(),
            epoch: Instant::now(),
            metrics,
            health_task,
        })
    }

    /// Takes one of the cluster's concurrency slots, or `None` when full.
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.limiter.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.metrics
                .upstream_overflow
                .with_label_values(&[&self.name])
                .inc();
        }
        permit
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn available(&self, ep: &Endpoint, now: u64) -> bool {
        ep.is_healthy() && ep.ejected_until.load(Ordering::Relaxed) <= now
    }

    /// Picks an endpoint for an attempt, avoiding those in `tried` when
    /// another is available. When no endpoint is available at all the
    /// cluster is in panic mode and any endpoint may be chosen (Envoy's panic
    /// threshold at 0%): answering from a possibly sick endpoint beats a
    /// certain 503 when health data may be wrong.
    pub fn pick(&self, tried: &[usize]) -> usize {
        let now = self.now_ms();
        let n = self.endpoints.len();
        let usable = |i: usize| !tried.contains(&i) && self.available(&self.endpoints[i], now);
        let any_usable = (0..n).any(usable);
        let candidate = |i: usize| {
            if any_usable {
                usable(i)
            } else {
                !tried.contains(&i) || tried.len() >= n
            }
        };
        if !any_usable && (0..n).all(|i| !self.available(&self.endpoints[i], now)) {
            self.metrics
                .upstream_panic
                .with_label_values(&[&self.name])
                .inc();
        }
        match self.lb {
            LbPolicy::RoundRobin => {
                let start = self.rr.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|k| (start + k) % n)
                    .find(|&i| candidate(i))
                    .unwrap_or(start % n)
            }
            LbPolicy::LeastRequest => {
                let choices: Vec<usize> = (0..n).filter(|&i| candidate(i)).collect();
                match choices.len() {
                    0 => 0,
                    1 => choices[0],
                    len => {
                        // Power of two choices: two distinct random candidates,
                        // the one with fewer requests in flight wins.
                        let mut rng = rand::thread_rng();
                        let a = rng.gen_range(0..len);
                        let mut b = rng.gen_range(0..len - 1);
                        if b >= a {
                            b += 1;
                        }
                        let (a, b) = (choices[a], choices[b]);
                        if self.endpoints[b].in_flight() < self.endpoints[a].in_flight() {
                            b
                        } else {
                            a
                        }
                    }
                }
            }
        }
    }

    /// Marks a request to endpoint `i` as started.
    pub fn start(&self, i: usize, permit: Option<OwnedSemaphorePermit>) -> InFlight {
        let endpoint = self.endpoints[i].clone();
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        endpoint.requests.inc();
        InFlight {
            endpoint,
            permit,
            conn: None,
        }
    }

    /// A connection to endpoint `i`: an idle pooled one, or a new one.
    /// Errors are connect errors: nothing of the request was sent.
    pub async fn connection(&self, i: usize) -> Result<pool::Sender, crate::error::ProxyError> {
        let ep = &self.endpoints[i];
        if let Some(conn) = ep.idle.take().await {
            return Ok(conn);
        }
        let conn = connect::connect(&ep.addr, self.connect_timeout, connect::Use::Pooled).await?;
        self.opened.inc();
        Ok(conn)
    }

    pub fn record_error(&self, cause: &str) {
        self.metrics
            .upstream_errors
            .with_label_values(&[&self.name, cause])
            .inc();
    }

    /// Passive outlier detection: feeds the result of one attempt.
    pub fn observe(&self, i: usize, failed: bool) {
        let ep = &self.endpoints[i];
        if !failed {
            ep.consecutive_failures.store(0, Ordering::Relaxed);
            return;
        }
        let threshold = self.outlier.consecutive_failures;
        if threshold == 0 {
            return;
        }
        let failures = ep.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < threshold {
            return;
        }
        let now = self.now_ms();
        if ep.ejected_until.load(Ordering::Relaxed) > now {
            return;
        }
        let ejected = self
            .endpoints
            .iter()
            .filter(|e| e.ejected_until.load(Ordering::Relaxed) > now)
            .count();
        let allowed =
            (self.endpoints.len() * self.outlier.max_ejection_percent as usize / 100).max(1);
        if ejected >= allowed {
            return;
        }
        // The backoff grows with each ejection in a row and starts over once
        // the endpoint stayed in for max_ejection.
        let base = self.outlier.base_ejection.0.as_millis() as u64;
        let max = self.outlier.max_ejection.0.as_millis() as u64;
        let quiet = now.saturating_sub(ep.last_ejection_end.load(Ordering::Relaxed));
        let streak = if quiet > max {
            ep.ejection_streak.store(1, Ordering::Relaxed);
            1
        } else {
            ep.ejection_streak.fetch_add(1, Ordering::Relaxed) + 1
        };
        let duration = (base.saturating_mul(streak as u64)).min(max);
        let until = now + duration;
        ep.ejected_until.store(until.max(1), Ordering::Relaxed);
        ep.last_ejection_end.store(until, Ordering::Relaxed);
        ep.consecutive_failures.store(0, Ordering::Relaxed);
        ep.ejections.inc();
        ep.ejected_gauge.set(1);
        tracing::warn!(cluster = %self.name, endpoint = %ep.addr, failures, ejection_ms = duration, "endpoint ejected");
    }

    /// Refreshes the time-based gauges (ejections expire without an event).
    pub fn refresh_gauges(&self) {
        let now = self.now_ms();
        for ep in self.endpoints.iter() {
            ep.ejected_gauge
                .set((ep.ejected_until.load(Ordering::Relaxed) > now) as i64);
        }
    }

    /// For `/admin/status`: (addr, healthy, ejected, in flight).
    pub fn endpoint_states(&self) -> Vec<(String, bool, bool, usize)> {
        let now = self.now_ms();
        self.endpoints
            .iter()
            .map(|e| {
                (
                    e.addr.clone(),
                    e.is_healthy(),
                    e.ejected_until.load(Ordering::Relaxed) > now,
                    e.in_flight(),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn cluster(extra: &str) -> Arc<Cluster> {
        let text = format!(
            "[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n[[upstreams]]\nname = \"c\"\nendpoints = [\"127.0.0.1:1\", \"127.0.0.1:2\", \"127.0.0.1:3\", \"127.0.0.1:4\"]\n{extra}"
        );
        let cfg = Config::parse(&text).unwrap();
        Cluster::new(&cfg.upstreams[0], Arc::new(Metrics::new()))
    }

    #[tokio::test]
    async fn round_robin_cycles_and_skips_tried() {
        let c = cluster("");
        let picks: Vec<_> = (0..8).map(|_| c.pick(&[])).collect();
        assert_eq!(picks, [0, 1, 2, 3, 0, 1, 2, 3]);
        let p = c.pick(&[1, 2]);
        assert!(p == 0 || p == 3);
    }

    #[tokio::test]
    async fn least_request_prefers_idle() {
        let c = cluster("lb = \"least_request\"");
        let _busy: Vec<_> = [0, 1, 2]
            .iter()
            .flat_map(|&i| (0..5).map(move |_| i))
            .map(|i| c.start(i, None))
            .collect();
        // Endpoint 3 is idle; P2C picks it whenever it is one of the two.
        let hits = (0..400).filter(|_| c.pick(&[]) == 3).count();
        assert!(hits > 150, "idle endpoint picked {hits}/400");
        drop(_busy);
        assert!(c.endpoints.iter().all(|e| e.in_flight() == 0));
    }

    #[tokio::test]
    async fn outlier_ejects_with_cap_and_growing_backoff() {
        let c = cluster("[upstreams.outlier]\nconsecutive_failures = 2\nbase_ejection = \"10s\"\nmax_ejection_percent = 50\n");
        c.observe(0, true);
        assert!(!c.endpoint_states()[0].2);
        c.observe(0, true);
        assert!(c.endpoint_states()[0].2, "ejected after 2 failures");
        for _ in 0..10 {
            assert_ne!(c.pick(&[]), 0);
        }
        // A success resets the count.
        c.observe(1, true);
        c.observe(1, false);
        c.observe(1, true);
        assert!(!c.endpoint_states()[1].2);
        c.observe(1, true);
        assert!(c.endpoint_states()[1].2);
        // 50% of 4 = 2 ejected at most.
        c.observe(2, true);
        c.observe(2, true);
        assert!(!c.endpoint_states()[2].2);
        // Backoff grows: a second ejection of endpoint 0 lasts twice as long.
        c.endpoints[0].ejected_until.store(0, Ordering::Relaxed);
        c.endpoints[1].ejected_until.store(0, Ordering::Relaxed);
        c.observe(0, true);
        c.observe(0, true);
        let until = c.endpoints[0].ejected_until.load(Ordering::Relaxed);
        assert!(
            until >= c.now_ms() + 19_000,
            "second ejection ~20s, got {until}"
        );
    }

    #[tokio::test]
    async fn panic_mode_when_nothing_available() {
        let c = cluster("");
        for ep in c.endpoints.iter() {
            ep.healthy.store(false, Ordering::Relaxed);
        }
        let p = c.pick(&[]);
        assert!(p < 4);
        assert_eq!(c.metrics.upstream_panic.with_label_values(&["c"]).get(), 1);
    }
}
