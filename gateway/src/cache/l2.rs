//! L2: Redis (one server or a Redis Cluster), shared by every gateway.
//!
//! Keys: `<prefix>{<cache key>}:e` holds a record (see `entry.rs`) with
//! `PX` = its whole useful life; `<prefix>{<cache key>}:l` is the fill lock.
//! The braces are a Cluster hash tag: a key's entry and lock live in one
//! slot. Channels: `<prefix>fill:<cache key>` announces a finished fill,
//! `<prefix>purge` carries purges to every gateway's L1.
//!
//! Every operation is bounded by `redis.timeout`; a failure marks L2 down
//! for `redis.retry_interval`, during which the cache goes on without it
//! (L1, in-process single flight, the origin). The connections reconnect
//! by themselves: the single-server client is the crate's
//! `ConnectionManager`, the cluster client is made again after a failure.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prometheus::{IntCounterVec, IntGauge};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue};

use super::entry::{now_ms, Record};
use crate::config::RedisConfig;

/// Deletes the lock only if it still holds our token: a filler that took
/// longer than `lock_ttl` must not release the next filler's lock.
const UNLOCK: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

enum Conn {
    Single(ConnectionManager),
    /// Boxed: built once, and much larger than the single-server handle.
    Cluster(Box<ClusterConn>),
}

struct ClusterConn {
    client: redis::cluster::ClusterClient,
    conn: Mutex<Option<ClusterConnection>>,
}

impl ClusterConn {
    /// The shared cluster connection, made on first use and again after a
    /// failure (it is created eagerly by the crate, which fails while the
    /// cluster is down).
    async fn connection(&self) -> redis::RedisResult<ClusterConnection> {
        let existing = self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match existing {
            Some(c) => Ok(c),
            None => {
                let c = self.client.get_async_connection().await?;
                *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
                Ok(c)
            }
        }
    }
}

/// Why an L2 call did not give an answer (already counted and logged).
#[derive(Debug)]
pub struct Unavailable;

pub struct L2 {
    conn: Conn,
    prefix: String,
    timeout: Duration,
    retry_interval: Duration,
    down_until_ms: AtomicU64,
    up: AtomicBool,
    errors: IntCounterVec,
    up_gauge: IntGauge,
    /// Seed URLs for the pub/sub connection.
    pub(super) pubsub_urls: Vec<String>,
}

impl L2 {
    pub fn new(c: &RedisConfig, errors: IntCounterVec, up_gauge: IntGauge) -> Result<L2, String> {
        let timeout = c.timeout.0;
        let (conn, pubsub_urls) = match &c.url {
            Some(url) => {
                let client =
                    redis::Client::open(url.as_str()).map_err(|e| format!("redis.url: {e}"))?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                let manager = ConnectionManager::new_lazy_with_config(client, config)
                    .map_err(|e| format!("redis.url: {e}"))?;
                (Conn::Single(manager), vec![url.clone()])
            }
            None => {
                let client = redis::cluster::ClusterClient::builder(c.cluster.clone())
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(1)
                    .build()
                    .map_err(|e| format!("redis.cluster: {e}"))?;
                (
                    Conn::Cluster(Box::new(ClusterConn {
                        client,
                        conn: Mutex::new(None),
                    })),
                    c.cluster.clone(),
                )
            }
        };
        up_gauge.set(1);
        Ok(L2 {
            conn,
            prefix: c.key_prefix.clone(),
            timeout,
            retry_interval: c.retry_interval.0,
            down_until_ms: AtomicU64::new(0),
            up: AtomicBool::new(true),
            errors,
            up_gauge,
            pubsub_urls,
        })
    }

    /// False while L2 is marked down after a failure.
    pub fn available(&self) -> bool {
        now_ms() >= self.down_until_ms.load(Ordering::Relaxed)
    }

    fn failed(&self, op: &'static str, err: &dyn std::fmt::Display) {
        self.errors.with_label_values(&[op]).inc();
        self.down_until_ms.store(
            now_ms() + self.retry_interval.as_millis() as u64,
            Ordering::Relaxed,
        );
        if let Conn::Cluster(c) = &self.conn {
            // Made again on next use; the old one may be wedged.
            *c.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        if self.up.swap(false, Ordering::Relaxed) {
            self.up_gauge.set(0);
            tracing::warn!(op, error = %err, retry_in = ?self.retry_interval, "redis unavailable: the cache goes on without L2 (L1 and in-process single flight stay on)");
        }
    }

    fn succeeded(&self) {
        if !self.up.load(Ordering::Relaxed) && !self.up.swap(true, Ordering::Relaxed) {
            self.up_gauge.set(1);
            tracing::info!("redis is back: the cache uses L2 again");
        }
    }

    /// Runs one command within the timeout, with failure accounting.
    async fn query<T: FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &Cmd,
    ) -> Result<T, Unavailable> {
        let run = async {
            match &self.conn {
                Conn::Single(m) => cmd.query_async::<T>(&mut m.clone()).await,
                Conn::Cluster(cluster) => {
                    let mut c = cluster.connection().await?;
                    cmd.query_async::<T>(&mut c).await
                }
            }
        };
        match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(v)) => {
                self.succeeded();
                Ok(v)
            }
            Ok(Err(e)) => {
                self.failed(op, &e);
                Err(Unavailable)
            }
            Err(_) => {
                self.failed(op, &format_args!("timed out after {:?}", self.timeout));
                Err(Unavailable)
            }
        }
    }

    fn entry_key(&self, key: &[u8]) -> Vec<u8> {
        self.tagged(key, b"e")
    }

    fn lock_key(&self, key: &[u8]) -> Vec<u8> {
        self.tagged(key, b"l")
    }

    fn tagged(&self, key: &[u8], kind: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + key.len() + 4);
        k.extend_from_slice(self.prefix.as_bytes());
        k.push(b'{');
        k.extend_from_slice(key);
        k.extend_from_slice(b"}:");
        k.extend_from_slice(kind);
        k
    }

    pub(super) fn fill_channel_prefix(&self) -> String {
        format!("{}fill:", self.prefix)
    }

    pub(super) fn purge_channel(&self) -> String {
        format!("{}purge", self.prefix)
    }

    pub async fn get(&self, key: &[u8]) -> Result<Option<Record>, Unavailable> {
        let raw: Option<Vec<u8>> = self
            .query("get", redis::cmd("GET").arg(self.entry_key(key)))
            .await?;
        let Some(raw) = raw else { return Ok(None) };
        match Record::decode(Bytes::from(raw)) {
            Some(r) => Ok(Some(r)),
            None => {
                // Written by something else (or an incompatible version):
                // a miss, and the fill overwrites it.
                self.errors.with_label_values(&["decode"]).inc();
                Ok(None)
            }
        }
    }

    pub async fn set(&self, key: &[u8], record: &Record, px: u64) -> Result<(), Unavailable> {
        self.query::<()>(
            "set",
            redis::cmd("SET")
                .arg(self.entry_key(key))
                .arg(record.encode().as_ref())
                .arg("PX")
                .arg(px.max(1)),
        )
        .await
    }

    /// `SET lock token NX PX ttl`: true when we hold the lock now.
    pub async fn try_lock(
        &self,
        key: &[u8],
        token: &str,
        ttl_ms: u64,
    ) -> Result<bool, Unavailable> {
        let r: Option<String> = self
            .query(
                "lock",
                redis::cmd("SET")
                    .arg(self.lock_key(key))
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms.max(1)),
            )
            .await?;
        Ok(r.is_some())
    }

    /// Releases the lock if it is still ours.
    pub async fn unlock(&self, key: &[u8], token: &str) -> Result<(), Unavailable> {
        self.query::<i64>(
            "unlock",
            redis::cmd("EVAL")
                .arg(UNLOCK)
                .arg(1)
                .arg(self.lock_key(key))
                .arg(token),
        )
        .await
        .map(drop)
    }

    /// Tells every gateway waiting for `key` that its fill is over
    /// (`stored`: an entry is there to take).
    pub async fn publish_fill(&self, key: &[u8], stored: bool) -> Result<(), Unavailable> {
        let mut channel = self.fill_channel_prefix().into_bytes();
        channel.extend_from_slice(key);
        self.query::<i64>(
            "publish",
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(if stored { "1" } else { "0" }),
        )
        .await
        .map(drop)
    }

    /// Deletes the entries of a purge from Redis and tells every gateway to
    /// drop them from L1. Returns how many entries Redis had.
    pub async fn purge(&self, purge: &Purge) -> Result<u64, Unavailable> {
        let mut deleted = 0;
        if let Purge::Key(k) = purge {
            deleted += self
                .query::<u64>("purge", redis::cmd("UNLINK").arg(self.entry_key(k)))
                .await?;
        }
        // The key's variants, or everything under the prefix.
        let mut pattern = self.prefix.as_bytes().to_vec();
        pattern.push(b'{');
        match purge {
            Purge::Key(k) => {
                glob_escape(k, &mut pattern);
                pattern.push(super::key::SEP);
            }
            Purge::Prefix(p) => glob_escape(p, &mut pattern),
        }
        pattern.extend_from_slice(b"*}:e");
        for k in self.keys_matching(&pattern).await? {
            deleted += self
                .query::<u64>("purge", redis::cmd("UNLINK").arg(k))
                .await?;
        }
        self.query::<i64>(
            "publish",
            redis::cmd("PUBLISH")
                .arg(self.purge_channel())
                .arg(purge.encode()),
        )
        .await?;
        Ok(deleted)
    }

    /// SCAN on one server; KEYS on every master of a Cluster (the crate
    /// sends KEYS to all masters and joins the answers; SCAN cursors are
    /// per node). Purges are rare admin calls; KEYS blocks each master for
    /// the time it takes to walk its keys.
    async fn keys_matching(&self, pattern: &[u8]) -> Result<Vec<Vec<u8>>, Unavailable> {
        match &self.conn {
            Conn::Single(_) => {
                let mut cursor: u64 = 0;
                let mut out = Vec::new();
                loop {
                    let (next, keys): (u64, Vec<Vec<u8>>) = self
                        .query(
                            "purge",
                            redis::cmd("SCAN")
                                .arg(cursor)
                                .arg("MATCH")
                                .arg(pattern)
                                .arg("COUNT")
                                .arg(1000),
                        )
                        .await?;
                    out.extend(keys);
                    if next == 0 {
                        return Ok(out);
                    }
                    cursor = next;
                }
            }
            Conn::Cluster(cluster) => {
                use redis::cluster_routing::{
                    MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo,
                };
                let run = async {
                    let mut c = cluster.connection().await?;
                    let all_masters = RoutingInfo::MultiNode((
                        MultipleNodeRoutingInfo::AllMasters,
                        Some(ResponsePolicy::CombineArrays),
                    ));
                    let keys = c
                        .route_command(redis::cmd("KEYS").arg(pattern).clone(), all_masters)
                        .await?;
                    Ok::<_, redis::RedisError>(Vec::<Vec<u8>>::from_redis_value(keys)?)
                };
                match tokio::time::timeout(self.timeout * 4, run).await {
                    Ok(Ok(keys)) => Ok(keys),
                    Ok(Err(e)) => {
                        self.failed("purge", &e);
                        Err(Unavailable)
                    }
                    Err(_) => {
                        self.failed("purge", &"timed out");
                        Err(Unavailable)
                    }
                }
            }
        }
    }
}

/// A purge: one key (and its variants) or every key under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purge {
    Key(Bytes),
    Prefix(Bytes),
}

impl Purge {
    /// The pub/sub payload: `k` or `p`, then the key or prefix.
    pub fn encode(&self) -> Vec<u8> {
        let (tag, b) = match self {
            Purge::Key(k) => (b'k', k),
            Purge::Prefix(p) => (b'p', p),
        };
        let mut out = Vec::with_capacity(b.len() + 1);
        out.push(tag);
        out.extend_from_slice(b);
        out
    }

    pub fn decode(payload: &[u8]) -> Option<Purge> {
        let (tag, rest) = payload.split_first()?;
        let rest = Bytes::copy_from_slice(rest);
        match tag {
            b'k' => Some(Purge::Key(rest)),
            b'p' => Some(Purge::Prefix(rest)),
            _ => None,
        }
    }
}

/// Escapes Redis glob specials so a key is matched literally.
fn glob_escape(s: &[u8], out: &mut Vec<u8>) {
    for &b in s {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// What the pub/sub listener hands to the cache.
pub enum Message {
    Filled(Bytes),
    Purged(Purge),
}

/// Keeps one pub/sub connection subscribed to the fill and purge channels,
/// reconnecting (to the next seed for a Cluster) whenever it drops.
/// Ends when `on_message` returns false (the cache is gone).
pub async fn listen(l2: Arc<L2>, on_message: impl Fn(Message) -> bool + Send + 'static) {
    use futures_util::StreamExt;
    let fill_prefix = l2.fill_channel_prefix();
    let fill_pattern = format!("{fill_prefix}*");
    let purge_channel = l2.purge_channel();
    let mut seed = 0;
    loop {
        let url = &l2.pubsub_urls[seed % l2.pubsub_urls.len()];
        seed += 1;
        let connected = async {
            let client = redis::Client::open(url.as_str())?;
            let mut ps = client.get_async_pubsub().await?;
            ps.psubscribe(&fill_pattern).await?;
            ps.subscribe(&purge_channel).await?;
            Ok::<_, redis::RedisError>(ps)
        };
        match tokio::time::timeout(l2.timeout.max(Duration::from_secs(1)), connected).await {
            Ok(Ok(ps)) => {
                tracing::debug!(url, "cache pub/sub subscribed");
                let mut stream = ps.into_on_message();
                while let Some(msg) = stream.next().await {
                    let channel: Vec<u8> = msg.get_channel().unwrap_or_default();
                    let message = if let Some(key) = channel.strip_prefix(fill_prefix.as_bytes()) {
                        Message::Filled(Bytes::copy_from_slice(key))
                    } else if channel == purge_channel.as_bytes() {
                        match Purge::decode(msg.get_payload_bytes()) {
                            Some(p) => Message::Purged(p),
                            None => continue,
                        }
                    } else {
                        continue;
                    };
                    if !on_message(message) {
                        return;
                    }
                }
                tracing::warn!(
                    url,
                    "cache pub/sub connection lost; waiters poll until it is back"
                );
            }
            Ok(Err(e)) => tracing::debug!(url, error = %e, "cache pub/sub connect failed"),
            Err(_) => tracing::debug!(url, "cache pub/sub connect timed out"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_payload_roundtrip() {
        for p in [
            Purge::Key(Bytes::from_static(b"h/p?x=*")),
            Purge::Prefix(Bytes::from_static(b"h/")),
        ] {
            assert_eq!(Purge::decode(&p.encode()), Some(p));
        }
        assert_eq!(Purge::decode(b""), None);
        assert_eq!(Purge::decode(b"zh/"), None);
    }

    #[test]
    fn globs_are_escaped() {
        let mut out = Vec::new();
        glob_escape(b"a*b?[c]\\", &mut out);
        assert_eq!(out, b"a\\*b\\?\\[c\\]\\\\");
    }
}
