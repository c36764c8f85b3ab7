//! flashgate's one Redis client: one server or a Redis Cluster, with the
//! failover behaviour a sale needs.
//!
//! Its place: every part of the product that talks to Redis goes through
//! this crate, so all of them behave the same when a master dies or hangs
//! and its replica is promoted. Today that is the order core's store
//! (`order-core`, feature `redis`) and the gateway's cache L2
//! (`gateway::cache::l2`); the fleet rate limits and waiting-room counters
//! are meant to use it too. The crate knows nothing of either side: each
//! builds a [`Target`] and [`Settings`] from its own `[redis]` section.
//!
//! The `redis` crate's cluster connection refreshes its slot map on `MOVED`
//! and `READONLY` only. A master that *hangs* (a stalled disk, a long fork,
//! `DEBUG SLEEP`) answers nothing: every call times out against it, the
//! crate retries on the same node, and the slot map keeps naming the frozen
//! node long after its replica was promoted. So every call here goes
//! through [`RedisClient::run`]:
//!
//! - each attempt is bounded by [`Settings::timeout`];
//! - on a timeout, a dropped or refused connection, `MOVED`, `ASK`,
//!   `CLUSTERDOWN`, `TRYAGAIN`, `MASTERDOWN`, `READONLY` or `LOADING` the
//!   connection is rebuilt from the seeds (which reads a fresh slot map),
//!   at most once per [`MIN_REFRESH_INTERVAL`] however many calls fail at
//!   once, and the call is tried again on the new connection;
//! - until [`Settings::budget`] is spent; then the last error is returned,
//!   saying whether an attempt may have run ([`Failure::maybe_ran`]).
//!
//! Retrying is only right for steps that are idempotent; callers pass only
//! such steps to [`RedisClient::run`] (the order core's argument is in
//! docs/checkout.md, "Failover"; the cache's steps are reads, `SET`s of a
//! whole entry, a `SET NX` lock and a compare-and-delete unlock).
//!
//! Calls are spread over a few connections ("lanes") per node: `WAIT`
//! blocks the connection it runs on, so with one multiplexed connection a
//! slow replica would stall every other call of the process behind it.
//!
//! Pub/sub needs a connection of its own: [`subscribe`] keeps one to a
//! seed, pings it, and moves to the next seed when it drops or stops
//! answering (a hung node keeps its sockets open).

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RetryMethod, Value};

/// The slot map is read again at most this often, however many calls fail
/// at once: a refresh opens connections to every node.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(200);

/// Connections per node by default. `WAIT` (replicated acknowledgement)
/// blocks its connection until the replicas answer; lanes let that many
/// wait at once.
const LANES: usize = 16;

/// How calls are bounded.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// One attempt (connect or reply). A checkout script answers in well
    /// under a millisecond; this only has to outlast an fsync on a busy disk.
    pub timeout: Duration,
    /// All attempts of one call together.
    pub budget: Duration,
    /// Multiplexed connections per node (at least 1). Only callers that
    /// send blocking commands (`WAIT`) need more than one.
    pub lanes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            timeout: Duration::from_millis(500),
            budget: Duration::from_secs(2),
            lanes: LANES,
        }
    }
}

/// Counters, for logs and `/healthz`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections rebuilt (slot map read again).
    pub refreshes: AtomicU64,
    /// Attempts after the first.
    pub retries: AtomicU64,
    /// Attempts that timed out.
    pub timeouts: AtomicU64,
}

/// A call that gave no answer within its budget.
#[derive(Debug)]
pub struct Failure {
    /// The last attempt's error.
    pub error: RedisError,
    /// Whether some attempt may have run on a server (its reply was lost:
    /// a timeout or a connection dropped after sending). A refusal
    /// (`MOVED`, `CLUSTERDOWN`, connection refused) did not run.
    pub maybe_ran: bool,
    pub attempts: u32,
    /// Whether the last attempt ran out of time (rather than being
    /// refused or dropped): what callers count as a timeout.
    pub timed_out: bool,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (after {} attempts)", self.error, self.attempts)
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// One connection handle; cheap to clone, multiplexed.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

enum Source {
    Single(redis::Client),
    /// Boxed: made once, and much larger than the single-server client.
    Cluster(Box<redis::cluster::ClusterClient>),
}

/// The connections of one generation (rebuilt together on a refresh).
struct Lanes {
    generation: u64,
    conns: Vec<Conn>,
}

/// See the module docs. Clones share the connections.
#[derive(Clone)]
pub struct RedisClient {
    inner: Arc<Inner>,
}

struct Inner {
    source: Source,
    describe: String,
    settings: Settings,
    lanes: Mutex<Arc<Lanes>>,
    next_lane: AtomicUsize,
    /// Single flight for refreshes; holds when the last one started.
    refresh: tokio::sync::Mutex<Option<Instant>>,
    stats: Stats,
    topology: Mutex<Option<Arc<Topology>>>,
}

/// Slot ranges and how many replicas their master has.
struct Topology {
    /// (first slot, last slot, replicas of its master).
    ranges: Vec<(u16, u16, usize)>,
}

impl Topology {
    /// From `CLUSTER NODES`: `id addr flags master-id ping pong epoch link
    /// slot...`. A replica counts for its master whatever its health: a
    /// replica marked failed may still be promoted later (within the
    /// cluster's validity window), so a write it lacks is not safe.
    fn parse(text: &str) -> Topology {
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() >= 8)
            .collect();
        let mut ranges = Vec::new();
        for f in &lines {
            if !f[2].split(',').any(|flag| flag == "master") {
                continue;
            }
            let replicas = lines.iter().filter(|r| r[3] == f[0]).count();
            for s in &f[8..] {
                if s.starts_with('[') {
                    continue; // a slot being migrated
                }
                let range = match s.split_once('-') {
                    Some((a, b)) => a.parse().ok().zip(b.parse().ok()),
                    None => s.parse().ok().map(|x| (x, x)),
                };
                if let Some((a, b)) = range {
                    ranges.push((a, b, replicas));
                }
            }
        }
        Topology { ranges }
    }
}

/// The Redis Cluster hash slot of `key` (CRC16/XMODEM of the hash tag, or
/// of the whole key when it has none), as the server computes it.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &b in tagged {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Where Redis is: one server or the seed nodes of a Cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `redis://host:port/db`.
    Single(String),
    /// Seed node URLs; the client learns the other nodes from them.
    Cluster(Vec<String>),
}

impl Target {
    /// The URLs a dedicated connection (pub/sub) may use, in turn.
    pub fn seeds(&self) -> Vec<String> {
        match self {
            Target::Single(url) => vec![url.clone()],
            Target::Cluster(urls) => urls.clone(),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Single(url) => f.write_str(url),
            Target::Cluster(urls) => write!(f, "cluster {urls:?}"),
        }
    }
}

/// Why a client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redis {target}: {source}")]
    Invalid { target: Target, source: RedisError },
    #[error("connect to redis {target}: {source}")]
    Connect { target: Target, source: RedisError },
}

impl RedisClient {
    /// A client of one redis-server. Fails if it cannot be reached now.
    pub async fn single(url: &str, settings: Settings) -> Result<RedisClient, Error> {
        Self::connect(&Target::Single(url.to_string()), settings).await
    }

    /// A client of a Redis Cluster from seed URLs. Fails if no seed answers.
    pub async fn cluster(urls: &[String], settings: Settings) -> Result<RedisClient, Error> {
        Self::connect(&Target::Cluster(urls.to_vec()), settings).await
    }

    /// A client of `target`, connected now. Fails if Redis cannot be
    /// reached (the order core does not start without its store).
    pub async fn connect(target: &Target, settings: Settings) -> Result<RedisClient, Error> {
        let source = source(target, settings)?;
        let conns = connect_lanes(&source, settings)
            .await
            .map_err(|source| Error::Connect {
                target: target.clone(),
                source,
            })?;
        Ok(Self::with_lanes(source, target, settings, conns))
    }

    /// A client of `target` that connects on its first call (and again on
    /// any later call while it cannot), so a caller that can go on without
    /// Redis (the cache) starts while Redis is down. Fails only on a URL
    /// that does not parse.
    pub fn lazy(target: &Target, settings: Settings) -> Result<RedisClient, Error> {
        let source = source(target, settings)?;
        Ok(Self::with_lanes(source, target, settings, Vec::new()))
    }

    fn with_lanes(
        source: Source,
        target: &Target,
        settings: Settings,
        conns: Vec<Conn>,
    ) -> RedisClient {
        RedisClient {
            inner: Arc::new(Inner {
                source,
                describe: target.to_string(),
                settings,
                lanes: Mutex::new(Arc::new(Lanes {
                    generation: 0,
                    conns,
                })),
                next_lane: AtomicUsize::new(0),
                refresh: tokio::sync::Mutex::new(None),
                stats: Stats::default(),
                topology: Mutex::new(None),
            }),
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.source, Source::Cluster(_))
    }

    pub fn settings(&self) -> Settings {
        self.inner.settings
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// Reads the cluster's shape (`CLUSTER NODES`): which master serves
    /// which slots and how many replicas it has. No-op on a single server.
    pub async fn read_topology(&self) -> Result<(), Failure> {
        if !self.is_cluster() {
            return Ok(());
        }
        let text: String = self
            .run(
                |mut c| async move { redis::cmd("CLUSTER").arg("NODES").query_async(&mut c).await },
            )
            .await?;
        let map = Topology::parse(&text);
        *self
            .inner
            .topology
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(map));
        Ok(())
    }

    /// The fewest replicas any master has, from the last
    /// [`RedisClient::read_topology`]; `None` on a single server or before.
    pub fn min_replicas(&self) -> Option<usize> {
        let t = self
            .inner
            .topology
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        t.ranges.iter().map(|r| r.2).min()
    }

    /// Replicas (healthy or not) of the master serving `key`'s slot, from
    /// the last topology read; `None` when unknown.
    pub fn replicas_of(&self, key: &[u8]) -> Option<usize> {
        let t = self
            .inner
            .topology
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let slot = key_slot(key);
        t.ranges
            .iter()
            .find(|r| r.0 <= slot && slot <= r.1)
            .map(|r| r.2)
    }

    /// Reads the topology every `every` until the task is dropped, so a
    /// replica that joins or rejoins counts again (no call fails then).
    pub fn spawn_topology_watch(&self, every: Duration) -> Option<tokio::task::JoinHandle<()>> {
        if !self.is_cluster() {
            return None;
        }
        let client = self.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = client.read_topology().await {
                    tracing::debug!(error = %e, "cluster topology read failed; next tick tries again");
                }
            }
        }))
    }

    /// A connection of the current generation, lanes taken in turn;
    /// `None` while a lazy client has not connected yet.
    fn conn(&self) -> (u64, Option<Conn>) {
        let lanes = self
            .inner
            .lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if lanes.conns.is_empty() {
            return (lanes.generation, None);
        }
        let i = self.inner.next_lane.fetch_add(1, Ordering::Relaxed) % lanes.conns.len();
        (lanes.generation, Some(lanes.conns[i].clone()))
    }

    /// Runs `op` (one attempt on the connection it is given) until it
    /// answers, retrying as the module docs say. `op` must be idempotent.
    pub async fn run<T, F, Fut>(&self, mut op: F) -> Result<T, Failure>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let settings = self.inner.settings;
        let deadline = Instant::now() + settings.budget;
        let mut maybe_ran = false;
        let mut attempts = 0u32;
        loop {
            let (generation, conn) = self.conn();
            attempts += 1;
            if attempts > 1 {
                self.inner.stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let limit = settings.timeout.min(left.max(Duration::from_millis(1)));
            let connected = conn.is_some();
            let attempt = async {
                match conn {
                    Some(conn) => op(conn).await,
                    None => Err(RedisError::from((
                        ErrorKind::Io,
                        "not connected",
                        "the last connection attempt failed".to_string(),
                    ))),
                }
            };
            let (error, timed_out) = match tokio::time::timeout(limit, attempt).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => {
                    let t = e.is_timeout();
                    (e, t)
                }
                Err(_) => (
                    RedisError::from((
                        ErrorKind::Io,
                        "redis call timed out",
                        format!("no reply within {limit:?}"),
                    )),
                    true,
                ),
            };
            if timed_out {
                self.inner.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            // Without a connection nothing was sent.
            maybe_ran |= connected && (may_have_run(&error) || timed_out);
            let worth_retrying = timed_out || !connected || retryable(&error);
            if !worth_retrying || Instant::now() >= deadline {
                if worth_retrying {
                    // The budget is spent, but the next call should find
                    // fresh connections (a budget of one attempt would
                    // otherwise never refresh).
                    let client = self.clone();
                    tokio::spawn(async move { client.refresh(generation).await });
                }
                return Err(Failure {
                    error,
                    maybe_ran,
                    attempts,
                    timed_out,
                });
            }
            tracing::debug!(error = %error, attempts, "redis call failed; refreshing and retrying");
            // Bounded by what is left of the budget: a refresh against a
            // hung node can itself take a timeout.
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, self.refresh(generation))
                .await
                .is_err()
            {
                return Err(Failure {
                    error,
                    maybe_ran,
                    attempts,
                    timed_out,
                });
            }
        }
    }

    /// Rebuilds the connections (a new slot map) unless that already
    /// happened since `seen` was current; at most once per
    /// [`MIN_REFRESH_INTERVAL`].
    async fn refresh(&self, seen: u64) {
        let mut last = self.inner.refresh.lock().await;
        let current = self
            .inner
            .lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .generation;
        if current != seen {
            return;
        }
        if let Some(at) = *last {
            let next = at + MIN_REFRESH_INTERVAL;
            if next > Instant::now() {
                tokio::time::sleep_until(next.into()).await;
            }
        }
        *last = Some(Instant::now());
        match connect_lanes(&self.inner.source, self.inner.settings).await {
            Ok(conns) => {
                *self.inner.lanes.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(Lanes {
                    generation: current + 1,
                    conns,
                });
                let n = self.inner.stats.refreshes.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::info!(redis = %self.inner.describe, refreshes = n, "redis connections rebuilt (slot map read again)");
            }
            Err(e) => {
                tracing::warn!(redis = %self.inner.describe, error = %e, "redis refresh failed; the next failing call tries again");
            }
        }
    }
}

/// How often [`subscribe`] checks that its connection still answers.
const PUBSUB_PING_EVERY: Duration = Duration::from_secs(1);

/// What [`subscribe`] listens to.
#[derive(Clone, Debug, Default)]
pub struct Subscription {
    pub channels: Vec<Vec<u8>>,
    pub patterns: Vec<Vec<u8>>,
}

/// Keeps one pub/sub connection subscribed to `what`, calling
/// `on_message(channel, payload)` for each message, until it returns false.
///
/// In a Redis Cluster a `PUBLISH` reaches every node, so any seed will do.
/// The connection moves to the next seed when it drops (a killed node) or
/// when a `PING` on it gets no answer within `settings.timeout` (at least
/// 1 s): a hung node keeps its sockets open and would deliver nothing
/// until it wakes. Messages published while no connection is up are lost;
/// callers must not depend on them (the cache's waiters poll).
pub async fn subscribe(
    target: &Target,
    what: &Subscription,
    settings: Settings,
    mut on_message: impl FnMut(&[u8], &[u8]) -> bool,
) {
    use futures_util::StreamExt;
    let seeds = target.seeds();
    let patience = settings.timeout.max(Duration::from_secs(1));
    let mut seed = 0;
    loop {
        let url = &seeds[seed % seeds.len()];
        seed += 1;
        let connected = async {
            let client = redis::Client::open(url.as_str())?;
            let (mut sink, stream) = client.get_async_pubsub().await?.split();
            if !what.patterns.is_empty() {
                sink.psubscribe(&what.patterns).await?;
            }
            if !what.channels.is_empty() {
                sink.subscribe(&what.channels).await?;
            }
            Ok::<_, RedisError>((sink, stream))
        };
        match tokio::time::timeout(patience, connected).await {
            Ok(Ok((mut sink, mut stream))) => {
                tracing::debug!(url, "redis pub/sub subscribed");
                let mut ping = tokio::time::interval(PUBSUB_PING_EVERY);
                ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ping.tick().await;
                let why = loop {
                    tokio::select! {
                        msg = stream.next() => {
                            let Some(msg) = msg else { break "connection lost" };
                            let channel: Vec<u8> = msg.get_channel().unwrap_or_default();
                            if !on_message(&channel, msg.get_payload_bytes()) {
                                return;
                            }
                        }
                        _ = ping.tick() => {
                            match tokio::time::timeout(patience, sink.ping::<Value>()).await {
                                Ok(Ok(_)) => {}
                                Ok(Err(_)) => break "ping failed",
                                Err(_) => break "no answer to ping",
                            }
                        }
                    }
                };
                tracing::warn!(
                    url,
                    why,
                    "redis pub/sub connection given up; trying the next seed"
                );
            }
            Ok(Err(e)) => tracing::debug!(url, error = %e, "redis pub/sub connect failed"),
            Err(_) => tracing::debug!(url, "redis pub/sub connect timed out"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a failed attempt may have executed on a server.
fn may_have_run(e: &RedisError) -> bool {
    if e.is_connection_refusal() {
        return false;
    }
    e.is_timeout() || e.is_connection_dropped() || e.kind() == ErrorKind::Io
}

/// Whether trying again (after a refresh) can give another answer.
fn retryable(e: &RedisError) -> bool {
    !matches!(e.retry_method(), RetryMethod::NoRetry) || e.is_connection_refusal()
}

fn source(target: &Target, settings: Settings) -> Result<Source, Error> {
    let invalid = |source| Error::Invalid {
        target: target.clone(),
        source,
    };
    Ok(match target {
        Target::Single(url) => Source::Single(redis::Client::open(url.as_str()).map_err(invalid)?),
        Target::Cluster(urls) => Source::Cluster(Box::new(
            redis::cluster::ClusterClient::builder(urls.clone())
                .connection_timeout(settings.timeout)
                .response_timeout(settings.timeout)
                // Retries are ours (`run`): the crate's would go to the same
                // frozen node without reading the slot map again.
                .retries(0)
                .build()
                .map_err(invalid)?,
        )),
    })
}

async fn connect_lanes(source: &Source, settings: Settings) -> Result<Vec<Conn>, RedisError> {
    futures_util::future::join_all(
        (0..settings.lanes.max(1)).map(|_| connect_one(source, settings)),
    )
    .await
    .into_iter()
    .collect()
}

async fn connect_one(source: &Source, settings: Settings) -> Result<Conn, RedisError> {
    match source {
        Source::Single(client) => {
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(settings.timeout))
                .set_response_timeout(Some(settings.timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(200));
            ConnectionManager::new_with_config(client.clone(), config)
                .await
                .map(Conn::Single)
        }
        Source::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slot_matches_the_server() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // An empty tag is no tag: the whole key is hashed.
        assert_eq!(key_slot(b"{}foo"), 9500);
        // The CRC16/XMODEM check value of "123456789" is 0x31C3 (below 16384).
        assert_eq!(key_slot(b"123456789"), 0x31C3);
    }

    #[test]
    fn topology_counts_replicas_failed_or_not() {
        let text = "\
m1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
m2 127.0.0.1:7001@17001 master,fail - 0 0 2 disconnected
m3 127.0.0.1:7002@17002 master - 0 0 3 connected 5461-10922 [5461->-m1]
r1 127.0.0.1:7003@17003 slave,fail m1 0 0 1 connected
r3 127.0.0.1:7004@17004 slave m3 0 0 3 connected
n4 127.0.0.1:7005@17005 master - 0 0 7 connected 10923-16383
";
        let t = Topology::parse(text);
        assert_eq!(
            t.ranges,
            vec![(0, 5460, 1), (5461, 10922, 1), (10923, 16383, 0)]
        );
    }
}
