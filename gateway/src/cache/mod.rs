//! The shared response cache: L1 in process, L2 in Redis, and exactly one
//! origin fetch per key for the whole fleet when an entry is missing or
//! expired. `docs/cache.md` is the long version; in short, a request on a
//! caching route goes through:
//!
//! ```text
//! lookup (synchronous, L1 only)
//!   private request (Authorization, cookie, not GET/HEAD, body) -> BYPASS
//!   fresh in L1                     -> HIT (XFetch may start an early refresh)
//!   stale in L1, within SWR         -> STALE now, one background refresh
//!   otherwise                       -> fill
//! fill (in-process single flight: the first request starts a fill task,
//!       the rest wait on its outcome, at most lock_wait)
//!   L2 fresh                        -> HIT
//!   L2 stale within SWR             -> STALE now, the task refreshes
//!   fleet lock (lock.rs)            -> another gateway filled it: HIT
//!                                      we hold it: fetch from the origin
//!   origin answer
//!     storable                      -> stored in L1 and L2 (jittered TTL),
//!                                      MISS for the leader, HIT for waiters
//!     5xx / failure, stale on error -> STALE
//!     not storable but public       -> shared with the waiters, not stored
//!     private (Set-Cookie, private, no-store, no-cache) or too big
//!                                   -> the leader's own answer, streamed;
//!                                      waiters ask the origin themselves
//! ```
//!
//! The cache stores the origin's answer as it came, before the response
//! filters run: filters see every request, hits included, and nothing a
//! filter adds for one client is stored for the next.

mod body;
mod entry;
mod flight;
mod key;
mod l1;
mod l2;
mod lock;
mod policy;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Method, Response};
use prometheus::IntCounter;
use tokio::sync::oneshot;

use crate::body::ProxyBody;
use crate::config::{CacheConfig, RedisConfig, RouteCacheConfig};
use crate::error::ProxyError;

pub use crate::observe::cache_metrics::CacheMetrics;
pub use entry::Entry;
pub use l2::Purge;
pub use policy::RoutePolicy;

use entry::{now_ms, Freshness, Record, VaryRecord};
use flight::{Flights, Joined, Leader, Waiters};
use l1::L1;
use l2::L2;

/// What a fill ended with, handed to everyone who waited on it.
#[derive(Clone, Debug)]
pub enum Outcome {
    Entry {
        entry: Arc<Entry>,
        source: Source,
    },
    Stale(Arc<Entry>),
    Error(ProxyError),
    /// Nothing to share (a private or oversized answer): the leader has its
    /// own response, the others must ask the origin themselves.
    Pass,
}

/// Where a fill's entry came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Fetched from the origin and stored.
    Origin,
    /// Fetched from the origin, not storable, but the same for everyone
    /// who asked at once (an error page).
    Shared,
    L2,
    /// Another gateway filled it while we waited for its lock.
    Fleet,
}

/// A gateway's cache. Built once per `[cache]` + `[redis]` and carried over
/// by reloads that leave those sections alone, so L1 survives reloads.
pub struct Cache {
    inner: Arc<Inner>,
    listener: Option<tokio::task::JoinHandle<()>>,
}

pub(crate) struct Inner {
    pub(crate) config: CacheConfig,
    redis: Option<RedisConfig>,
    l1: L1,
    l2: Option<Arc<L2>>,
    flights: Arc<Flights>,
    pub(crate) waiters: Waiters,
    pub(crate) metrics: CacheMetrics,
}

impl Drop for Cache {
    fn drop(&mut self) {
        if let Some(l) = &self.listener {
            l.abort();
        }
    }
}

impl Cache {
    /// Must run inside a tokio runtime when `redis` is set (the pub/sub
    /// listener starts here).
    pub fn new(
        config: &CacheConfig,
        redis: Option<&RedisConfig>,
        metrics: &CacheMetrics,
    ) -> Result<Cache, String> {
        let l2 = match redis {
            Some(r) => Some(Arc::new(L2::new(
                r,
                metrics.l2_errors.clone(),
                metrics.l2_up.clone(),
            )?)),
            None => {
                metrics.l2_up.set(0);
                None
            }
        };
        let inner = Arc::new(Inner {
            config: config.clone(),
            redis: redis.cloned(),
            l1: L1::new(
                config.l1_size.0,
                metrics.l1_bytes.clone(),
                metrics.l1_entries.clone(),
            ),
            l2: l2.clone(),
            flights: Arc::new(Flights::default()),
            waiters: Waiters::default(),
            metrics: metrics.clone(),
        });
        let listener = l2.map(|l2| {
            let weak = Arc::downgrade(&inner);
            tokio::spawn(l2::listen(l2, move |msg| {
                let Some(inner) = weak.upgrade() else {
                    return false;
                };
                match msg {
                    l2::Message::Filled(key) => inner.waiters.wake(&key),
                    l2::Message::Purged(p) => {
                        inner.metrics.purges.inc();
                        inner.purge_l1(&p);
                    }
                }
                true
            }))
        });
        Ok(Cache { inner, listener })
    }

    /// Whether this cache was built from these sections (a reload keeps it).
    pub fn same_config(&self, config: &CacheConfig, redis: Option<&RedisConfig>) -> bool {
        self.inner.config == *config && self.inner.redis.as_ref() == redis
    }

    /// The cache settings of one route, with its lookup counters resolved.
    pub fn route(&self, name: &str, c: &RouteCacheConfig) -> Arc<RouteCache> {
        let m = &self.inner.metrics.lookups;
        Arc::new(RouteCache {
            policy: Arc::new(RoutePolicy::new(c)),
            hit: m.with_label_values(&[name, "hit"]),
            miss: m.with_label_values(&[name, "miss"]),
            stale: m.with_label_values(&[name, "stale"]),
            bypass: m.with_label_values(&[name, "bypass"]),
            coalesced: m.with_label_values(&[name, "coalesced"]),
        })
    }

    /// Drops a key (and its variants) or a prefix from L1 here and, through
    /// Redis, from L2 and every gateway's L1. Returns (L1 entries dropped
    /// here, L2 entries deleted or `None` without a working Redis).
    pub async fn purge(&self, purge: Purge) -> (usize, Option<u64>) {
        self.inner.metrics.purges.inc();
        let l1 = self.inner.purge_l1(&purge);
        let l2 = match &self.inner.l2 {
            Some(l2) => l2.purge(&purge).await.ok(),
            None => None,
        };
        (l1, l2)
    }

    /// Any copy L1 holds for this request, fresh or stale within its
    /// windows, without going anywhere else: what overload shedding serves
    /// instead of sending the request upstream (`x-cache: HIT` or `STALE`).
    pub fn peek(
        &self,
        rc: &Arc<RouteCache>,
        head: &Parts,
        host: &str,
    ) -> Option<Response<ProxyBody>> {
        if head.method != Method::GET
            || policy::request_bypass(&head.method, &head.headers, false, &rc.policy).is_some()
        {
            return None;
        }
        let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
        let base = key::base(host, path, &rc.policy.key_headers, &head.headers);
        let now = now_ms();
        let mut record = self.inner.l1.get(&base, now);
        if let Some(Record::Vary(v)) = &record {
            let key = key::variant(&base, &v.names, &head.headers);
            record = self.inner.l1.get(&key, now);
        }
        match record {
            Some(Record::Response(e)) if e.matches_variant(&head.headers) => {
                match e.freshness(now) {
                    Freshness::Fresh => Some(respond(&e, "HIT", now)),
                    Freshness::Stale { .. } => {
                        rc.stale.inc();
                        Some(respond(&e, "STALE", now))
                    }
                    Freshness::Dead => None,
                }
            }
            _ => None,
        }
    }

    /// Phase one of a request on a caching route, synchronous and cheap: a
    /// fresh L1 hit is answered here; everything else needs the upstream
    /// request (or may) and continues in [`Pending::resolve`].
    pub fn lookup(&self, rc: &Arc<RouteCache>, head: &Parts, host: &str, has_body: bool) -> Lookup {
        let inner = &self.inner;
        let pending = |kind| {
            Lookup::Pending(Pending {
                inner: inner.clone(),
                rc: rc.clone(),
                kind,
            })
        };
        if let Some(reason) =
            policy::request_bypass(&head.method, &head.headers, has_body, &rc.policy)
        {
            tracing::trace!(reason, "cache bypass");
            return pending(Kind::Bypass);
        }
        let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
        let base = key::base(host, path, &rc.policy.key_headers, &head.headers);
        let now = now_ms();
        let mut key = base.clone();
        let mut record = inner.l1.get(&base, now);
        if let Some(Record::Vary(v)) = &record {
            key = key::variant(&base, &v.names, &head.headers);
            record = inner.l1.get(&key, now);
        }
        let stale = match record {
            Some(Record::Response(e)) if e.matches_variant(&head.headers) => match e.freshness(now)
            {
                Freshness::Fresh => {
                    let early = rc.policy.early_refresh > 0.0
                        && head.method == Method::GET
                        && policy::xfetch_due(
                            now,
                            e.expires_ms(),
                            u64::from(e.fill_ms).max(1),
                            rc.policy.early_refresh,
                            1.0 - rand::random::<f64>(),
                        )
                        && !inner.flights.running(&key);
                    if early {
                        return pending(Kind::Refresh {
                            entry: e,
                            key,
                            base,
                            headers: head.headers.clone(),
                            x_cache: "HIT",
                        });
                    }
                    rc.hit.inc();
                    return Lookup::Hit(respond(&e, "HIT", now));
                }
                Freshness::Stale {
                    revalidate: true, ..
                } if head.method == Method::GET => {
                    return pending(Kind::Refresh {
                        entry: e,
                        key,
                        base,
                        headers: head.headers.clone(),
                        x_cache: "STALE",
                    });
                }
                Freshness::Stale { on_error: true, .. } => Some(e),
                _ => None,
            },
            _ => None,
        };
        if head.method == Method::HEAD {
            // A HEAD answer has no body to store, and a fill for it would
            // store an empty one: forward it, store nothing.
            return pending(Kind::Head);
        }
        pending(Kind::Miss {
            key,
            base,
            stale,
            headers: head.headers.clone(),
        })
    }
}

/// A route's cache settings and its lookup counters.
pub struct RouteCache {
    pub policy: Arc<RoutePolicy>,
    hit: IntCounter,
    miss: IntCounter,
    stale: IntCounter,
    bypass: IntCounter,
    coalesced: IntCounter,
}

pub enum Lookup {
    Hit(Response<ProxyBody>),
    Pending(Pending),
}

/// A lookup that needs more than L1.
pub struct Pending {
    inner: Arc<Inner>,
    rc: Arc<RouteCache>,
    kind: Kind,
}

enum Kind {
    Bypass,
    Head,
    /// Serve `entry` now (stale within SWR, or fresh with an XFetch early
    /// refresh due) and refresh it in the background.
    Refresh {
        entry: Arc<Entry>,
        key: Bytes,
        base: Bytes,
        /// The request's: the refreshed answer is for its variant.
        headers: HeaderMap,
        x_cache: &'static str,
    },
    Miss {
        key: Bytes,
        base: Bytes,
        /// Usable if the origin fails.
        stale: Option<Arc<Entry>>,
        headers: HeaderMap,
    },
}

/// Fetches the request from the upstream (the pipeline's `forward`).
pub trait Fetch: FnOnce() -> Self::Fut + Send + 'static {
    type Fut: Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'static;
}

impl<F, Fut> Fetch for F
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'static,
{
    type Fut = Fut;
}

/// Everything a fill task needs; owned, because the task outlives the
/// request that started it.
struct Job<F> {
    rc: Arc<RouteCache>,
    base: Bytes,
    headers: HeaderMap,
    stale: Option<Arc<Entry>>,
    fetch: F,
    /// The leader's own response when nothing can be shared.
    pass: Option<oneshot::Sender<Response<ProxyBody>>>,
    /// Whether a request waits for this fill (not a background refresh):
    /// then a stale copy from L2 within SWR answers it at once.
    waited_on: bool,
}

impl Pending {
    /// Adjusts the request going upstream. A fill's answer is stored and
    /// shared, so it must be the full answer: a client's conditional or
    /// range headers would get a 304 or 206 meant for that client alone.
    pub fn prepare_upstream(&self, headers: &mut HeaderMap) {
        if matches!(self.kind, Kind::Miss { .. } | Kind::Refresh { .. }) {
            for h in [
                header::IF_NONE_MATCH,
                header::IF_MODIFIED_SINCE,
                header::IF_MATCH,
                header::IF_UNMODIFIED_SINCE,
                header::IF_RANGE,
                header::RANGE,
            ] {
                headers.remove(h);
            }
        }
    }

    /// Phase two: answers from L2, a fill, or the upstream. `fetch` is
    /// called at most once, and only when this request must go upstream.
    pub async fn resolve<F: Fetch>(
        self,
        request_id: &HeaderValue,
        fetch: F,
    ) -> Response<ProxyBody> {
        let Pending { inner, rc, kind } = self;
        match kind {
            Kind::Bypass => {
                rc.bypass.inc();
                let mut resp = fetch()
                    .await
                    .unwrap_or_else(|e| crate::respond::error(e, request_id));
                mark(&mut resp, "BYPASS");
                resp
            }
            Kind::Head => {
                rc.miss.inc();
                let mut resp = fetch()
                    .await
                    .unwrap_or_else(|e| crate::respond::error(e, request_id));
                mark(&mut resp, "MISS");
                resp
            }
            Kind::Refresh {
                entry,
                key,
                base,
                headers,
                x_cache,
            } => {
                if x_cache == "STALE" {
                    rc.stale.inc();
                } else {
                    rc.hit.inc();
                }
                if let Joined::Lead(leader, _) = inner.flights.join(&key) {
                    let job = Job {
                        rc: rc.clone(),
                        base,
                        headers,
                        stale: Some(entry.clone()),
                        fetch,
                        pass: None,
                        waited_on: false,
                    };
                    tokio::spawn(fill(inner.clone(), leader, job));
                }
                respond(&entry, x_cache, now_ms())
            }
            Kind::Miss {
                key,
                base,
                stale,
                headers,
            } => miss(inner, rc, key, base, stale, headers, request_id, fetch).await,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn miss<F: Fetch>(
    inner: Arc<Inner>,
    rc: Arc<RouteCache>,
    mut key: Bytes,
    base: Bytes,
    stale: Option<Arc<Entry>>,
    headers: HeaderMap,
    request_id: &HeaderValue,
    fetch: F,
) -> Response<ProxyBody> {
    // At most twice: a waiter of a fill whose answer turned out to be
    // another variant joins (or starts) the fill of its own variant once.
    for _ in 0..2 {
        match inner.flights.join(&key) {
            Joined::Lead(leader, mut rx) => {
                let (pass_tx, pass_rx) = oneshot::channel();
                let job = Job {
                    rc: rc.clone(),
                    base: base.clone(),
                    headers: headers.clone(),
                    stale: stale.clone(),
                    fetch,
                    pass: Some(pass_tx),
                    waited_on: true,
                };
                tokio::spawn(fill(inner.clone(), leader, job));
                let outcome = match rx.wait_for(Option::is_some).await {
                    Ok(o) => o.clone(),
                    Err(_) => None,
                };
                return match outcome {
                    Some(Outcome::Pass) | None => {
                        rc.miss.inc();
                        match pass_rx.await {
                            Ok(mut resp) => {
                                mark(&mut resp, "MISS");
                                resp
                            }
                            // The task died without an answer.
                            Err(_) => crate::respond::error(ProxyError::UpstreamReset, request_id),
                        }
                    }
                    Some(o) => answer(&rc, o, true, request_id),
                };
            }
            Joined::Follow(mut rx) => {
                let waited =
                    tokio::time::timeout(inner.config.lock_wait.0, rx.wait_for(Option::is_some))
                        .await;
                let outcome = match waited {
                    Ok(Ok(o)) => o.clone(),
                    // Waited too long, or the fill task is gone.
                    _ => None,
                };
                match outcome {
                    // A stale copy too: the leader's L2 lookup or its
                    // stale-if-error copy is for the leader's variant.
                    Some(Outcome::Entry { entry, .. } | Outcome::Stale(entry))
                        if !entry.matches_variant(&headers) =>
                    {
                        let values = key::vary_values(
                            &entry
                                .vary
                                .iter()
                                .map(|(n, _)| n.clone())
                                .collect::<Vec<_>>(),
                            &headers,
                        );
                        key = key::variant_of(&base, &values);
                        continue;
                    }
                    Some(Outcome::Pass) => {}
                    Some(o) => return answer(&rc, o, false, request_id),
                    None => {
                        if let Some(s) = &stale {
                            rc.stale.inc();
                            return respond(s, "STALE", now_ms());
                        }
                    }
                }
                break;
            }
        }
    }
    // Nothing to share: this request asks the origin itself.
    rc.miss.inc();
    let mut resp = fetch()
        .await
        .unwrap_or_else(|e| crate::respond::error(e, request_id));
    mark(&mut resp, "MISS");
    resp
}

/// The response for one request from a fill's outcome.
fn answer(
    rc: &RouteCache,
    outcome: Outcome,
    leader: bool,
    request_id: &HeaderValue,
) -> Response<ProxyBody> {
    let now = now_ms();
    match outcome {
        Outcome::Entry { entry, source } => {
            let (counter, x_cache) = match (leader, source) {
                (_, Source::Shared) => (&rc.miss, "MISS"),
                (true, Source::Origin) => (&rc.miss, "MISS"),
                (true, Source::L2) => (&rc.hit, "HIT"),
                (true, Source::Fleet) | (false, _) => (&rc.coalesced, "HIT"),
            };
            counter.inc();
            respond(&entry, x_cache, now)
        }
        Outcome::Stale(entry) => {
            rc.stale.inc();
            respond(&entry, "STALE", now)
        }
        Outcome::Error(e) => {
            if leader { &rc.miss } else { &rc.coalesced }.inc();
            crate::respond::error(e, request_id)
        }
        // Handled by the callers.
        Outcome::Pass => crate::respond::error(ProxyError::UpstreamReset, request_id),
    }
}

/// The fill task: L2, the fleet lock, the origin, storing; see the module
/// docs for the order.
async fn fill<F: Fetch>(inner: Arc<Inner>, leader: Leader, job: Job<F>) {
    let key = leader.key().clone();
    let Job {
        rc,
        base,
        headers,
        mut stale,
        fetch,
        pass,
        waited_on,
    } = job;
    let policy = rc.policy.clone();
    let mut answered = false;
    let mut lock_token = None;
    let l2 = inner.l2.clone().filter(|l| l.available());

    if let Some(l2) = &l2 {
        // A background refresh goes straight for the lock: its caller
        // already has the stale copy.
        if waited_on {
            if let Ok(Some(e)) = lock::lookup_l2(l2, &base, &key, &headers).await {
                match e.freshness(now_ms()) {
                    Freshness::Fresh => {
                        inner.store_l1(&base, &e);
                        leader.finish(Outcome::Entry {
                            entry: e,
                            source: Source::L2,
                        });
                        return;
                    }
                    Freshness::Stale { revalidate, .. } => {
                        if revalidate {
                            // Everyone gets the stale copy now; this task
                            // goes on to refresh it.
                            inner.store_l1(&base, &e);
                            leader.finish(Outcome::Stale(e.clone()));
                            answered = true;
                        }
                        if stale
                            .as_ref()
                            .is_none_or(|s| s.stored_at_ms < e.stored_at_ms)
                        {
                            stale = Some(e);
                        }
                    }
                    Freshness::Dead => {}
                }
            }
        }
        match lock::acquire_or_wait(&inner, l2, &base, &key, &headers).await {
            lock::Fleet::Acquired(token) => lock_token = Some(token),
            lock::Fleet::Filled(e) => {
                inner.store_l1(&base, &e);
                if !answered {
                    leader.finish(Outcome::Entry {
                        entry: e,
                        source: Source::Fleet,
                    });
                }
                return;
            }
            lock::Fleet::TimedOut => {
                if let Some(s) = stale
                    .clone()
                    .filter(|s| s.freshness(now_ms()) != Freshness::Dead)
                {
                    if !answered {
                        leader.finish(Outcome::Stale(s));
                    }
                    return;
                }
                // Never wait forever: go to the origin ourselves.
            }
            lock::Fleet::Unavailable => {}
        }
    }

    let started = Instant::now();
    let fetched = fetch().await;
    let stale_on_error = stale.clone().filter(|s| {
        matches!(
            s.freshness(now_ms()),
            Freshness::Stale { on_error: true, .. }
        )
    });
    let mut pass_resp = None;
    let mut stored = None;
    let outcome = match fetched {
        Err(e) => {
            inner.metrics.fills.with_label_values(&["error"]).inc();
            match stale_on_error {
                Some(s) => Outcome::Stale(s),
                None => Outcome::Error(e),
            }
        }
        Ok(resp) if resp.status().is_server_error() && stale_on_error.is_some() => {
            inner.metrics.fills.with_label_values(&["error"]).inc();
            drop(resp);
            Outcome::Stale(stale_on_error.clone().expect("checked above"))
        }
        Ok(resp) => match policy::decide(resp.status(), resp.headers(), &policy) {
            policy::Decision::Private => {
                inner.metrics.fills.with_label_values(&["not_stored"]).inc();
                pass_resp = Some(resp);
                Outcome::Pass
            }
            decision => {
                let max = usize::try_from(inner.config.max_entry_size.0).unwrap_or(usize::MAX);
                match body::collect(resp, max, inner.config.lock_ttl.0).await {
                    body::Collected::Whole(parts, bytes) => {
                        let fill_ms = started.elapsed().as_millis().min(u32::MAX as u128) as u32;
                        let vary_names = key::vary_names(&parts.headers).unwrap_or_default();
                        let now = now_ms();
                        let (ttl, swr, sie, source) = match decision {
                            policy::Decision::Store { ttl, swr, sie } => (
                                policy::jittered(ttl, policy.jitter, rand::random::<f64>()),
                                swr,
                                sie,
                                Source::Origin,
                            ),
                            _ => (
                                std::time::Duration::ZERO,
                                Default::default(),
                                Default::default(),
                                Source::Shared,
                            ),
                        };
                        let entry = Arc::new(Entry {
                            status: parts.status,
                            headers: entry::stored_headers(parts.headers, bytes.len()),
                            body: bytes,
                            stored_at_ms: now,
                            ttl_ms: entry::ms(ttl),
                            swr_ms: entry::ms(swr),
                            sie_ms: entry::ms(sie),
                            fill_ms,
                            vary: key::vary_values(&vary_names, &headers),
                        });
                        if source == Source::Origin {
                            inner.metrics.fills.with_label_values(&["stored"]).inc();
                            inner.store_l1(&base, &entry);
                            stored = Some(entry.clone());
                        } else {
                            inner.metrics.fills.with_label_values(&["not_stored"]).inc();
                        }
                        Outcome::Entry { entry, source }
                    }
                    body::Collected::TooBig(resp) => {
                        inner.metrics.fills.with_label_values(&["not_stored"]).inc();
                        pass_resp = Some(resp);
                        Outcome::Pass
                    }
                    body::Collected::Failed => {
                        inner.metrics.fills.with_label_values(&["error"]).inc();
                        match stale_on_error {
                            Some(s) => Outcome::Stale(s),
                            None => Outcome::Error(ProxyError::UpstreamReset),
                        }
                    }
                }
            }
        },
    };
    // In-process waiters first: they need nothing from Redis.
    if !answered {
        leader.finish(outcome);
        if let (Some(tx), Some(resp)) = (pass, pass_resp) {
            let _ = tx.send(resp);
        }
    }
    if let Some(l2) = &l2 {
        if let Some(e) = &stored {
            inner.store_l2(l2, &base, e).await;
        }
        if let Some(token) = lock_token {
            lock::release(l2, &key, &token, stored.is_some()).await;
        }
    }
    drop(leader);
}

impl Inner {
    /// Stores `e` under its key in L1 (with a `Vary` record at `base`
    /// when it is a variant).
    fn store_l1(&self, base: &Bytes, e: &Arc<Entry>) {
        if e.vary.is_empty() {
            self.l1.insert(base.clone(), Record::Response(e.clone()));
        } else {
            self.l1.insert(base.clone(), vary_record(e));
            self.l1
                .insert(key::variant_of(base, &e.vary), Record::Response(e.clone()));
        }
    }

    async fn store_l2(&self, l2: &L2, base: &Bytes, e: &Arc<Entry>) {
        let px = e.lifetime_ms();
        if e.vary.is_empty() {
            let _ = l2.set(base, &Record::Response(e.clone()), px).await;
        } else {
            let _ = l2.set(base, &vary_record(e), px).await;
            let _ = l2
                .set(
                    &key::variant_of(base, &e.vary),
                    &Record::Response(e.clone()),
                    px,
                )
                .await;
        }
    }

    fn purge_l1(&self, p: &Purge) -> usize {
        match p {
            Purge::Key(k) => self.l1.purge_key(k),
            Purge::Prefix(prefix) => self.l1.purge_prefix(prefix),
        }
    }
}

fn vary_record(e: &Entry) -> Record {
    Record::Vary(Arc::new(VaryRecord {
        names: e.vary.iter().map(|(n, _)| n.clone()).collect(),
        expires_at_ms: e.stored_at_ms.saturating_add(e.lifetime_ms()),
    }))
}

/// A response from a stored entry, with `age` and `x-cache`.
fn respond(e: &Entry, x_cache: &'static str, now: u64) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(e.body.clone()));
    *resp.status_mut() = e.status;
    let mut headers = e.headers.clone();
    headers.insert(header::AGE, HeaderValue::from(e.served_age(now)));
    headers.insert(X_CACHE, HeaderValue::from_static(x_cache));
    *resp.headers_mut() = headers;
    resp
}

const X_CACHE: http::HeaderName = http::HeaderName::from_static("x-cache");

fn mark(resp: &mut Response<ProxyBody>, x_cache: &'static str) {
    resp.headers_mut()
        .insert(X_CACHE, HeaderValue::from_static(x_cache));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_from_hostile_redis_bytes_do_not_overflow() {
        // Any u64 may come back from Redis: an L2 entry is stored in L1
        // (with its Vary record) and its lifetime summed.
        let e = Entry {
            status: http::StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            stored_at_ms: u64::MAX - 1,
            ttl_ms: u64::MAX,
            swr_ms: u64::MAX,
            sie_ms: 7,
            fill_ms: 0,
            vary: vec![(http::HeaderName::from_static("accept-language"), None)],
        };
        assert_eq!(e.lifetime_ms(), u64::MAX);
        let Record::Vary(v) = vary_record(&e) else {
            panic!("a vary record")
        };
        assert_eq!(v.expires_at_ms, u64::MAX);
    }
}
