//! L2: Redis (one server or a Redis Cluster), shared by every gateway.
//!
//! Keys: `<prefix>{<cache key>}:e` holds a record (see `entry.rs`) with
//! `PX` = its whole useful life; `<prefix>{<cache key>}:l` is the fill lock.
//! The braces are a Cluster hash tag: a key's entry and lock live in one
//! slot. Channels: `<prefix>fill:<cache key>` announces a finished fill,
//! `<prefix>purge` carries purges to every gateway's L1.
//!
//! Calls go through the product's one Redis client (`flashgate-redis`), so
//! a failover costs the cache what it costs the checkout: each attempt is
//! bounded by `redis.timeout`, a timeout or a moved slot rebuilds the
//! connections from the seeds (a fresh slot map), and a call is tried
//! again within `redis.retry_budget`. A call that still fails marks L2
//! down for `redis.retry_interval`, during which the cache goes on without
//! it (L1, in-process single flight, the origin): L2 costs cache hits,
//! never answers. The client is lazy, so a gateway starts while Redis is
//! down. Every step here is safe to repeat: `GET`, a `SET` of a whole
//! entry, `SET NX` for the lock, a compare-and-delete unlock, `PUBLISH`
//! (a second fill notice only wakes waiters again), `UNLINK`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flashgate_redis::{Conn, RedisClient, Settings, Subscription, Target};
use prometheus::{IntCounterVec, IntGauge};
use redis::{Cmd, FromRedisValue};

use super::entry::{now_ms, Record};
use crate::config::RedisConfig;

/// Deletes the lock only if it still holds our token: a filler that took
/// longer than `lock_ttl` must not release the next filler's lock.
const UNLOCK: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// Why an L2 call did not give an answer (already counted and logged).
#[derive(Debug)]
pub struct Unavailable;

pub struct L2 {
    client: RedisClient,
    /// Where Redis is, for the pub/sub connection.
    target: Target,
    prefix: String,
    retry_interval: Duration,
    down_until_ms: AtomicU64,
    up: AtomicBool,
    errors: IntCounterVec,
    up_gauge: IntGauge,
}

impl L2 {
    pub fn new(c: &RedisConfig, errors: IntCounterVec, up_gauge: IntGauge) -> Result<L2, String> {
        let (target, path) = match &c.url {
            Some(url) => (Target::Single(url.clone()), "redis.url"),
            None => (Target::Cluster(c.cluster.clone()), "redis.cluster"),
        };
        let client = RedisClient::lazy(&target, settings(c)).map_err(|e| format!("{path}: {e}"))?;
        up_gauge.set(1);
        Ok(L2 {
            client,
            target,
            prefix: c.key_prefix.clone(),
            retry_interval: c.retry_interval.0,
            down_until_ms: AtomicU64::new(0),
            up: AtomicBool::new(true),
            errors,
            up_gauge,
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

    /// Runs one command through the client (timeouts, refresh, retries),
    /// with failure accounting.
    async fn query<T: FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &Cmd,
    ) -> Result<T, Unavailable> {
        let result = self
            .client
            .run(|mut c| async move { cmd.query_async::<T>(&mut c).await })
            .await;
        self.settle(op, result)
    }

    fn settle<T>(
        &self,
        op: &'static str,
        result: Result<T, flashgate_redis::Failure>,
    ) -> Result<T, Unavailable> {
        match result {
            Ok(v) => {
                self.succeeded();
                Ok(v)
            }
            Err(e) => {
                self.failed(op, &e);
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
        if !self.client.is_cluster() {
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
        use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
        let keys = self
            .client
            .run(|c| async move {
                let Conn::Cluster(mut c) = c else {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "KEYS on all masters needs a cluster connection",
                    )));
                };
                let all_masters = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::CombineArrays),
                ));
                let keys = c
                    .route_command(redis::cmd("KEYS").arg(pattern).clone(), all_masters)
                    .await?;
                Vec::<Vec<u8>>::from_redis_value(keys).map_err(redis::RedisError::from)
            })
            .await;
        self.settle("purge", keys)
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

/// Keeps one pub/sub connection subscribed to the fill and purge channels
/// (the shared client's [`flashgate_redis::subscribe`]: it moves to the
/// next seed when its node dies or hangs). Ends when `on_message` returns
/// false (the cache is gone).
pub async fn listen(l2: Arc<L2>, on_message: impl Fn(Message) -> bool + Send + 'static) {
    let fill_prefix = l2.fill_channel_prefix();
    let purge_channel = l2.purge_channel();
    let what = Subscription {
        channels: vec![purge_channel.clone().into_bytes()],
        patterns: vec![format!("{fill_prefix}*").into_bytes()],
    };
    flashgate_redis::subscribe(
        &l2.target,
        &what,
        l2.client.settings(),
        |channel, payload| {
            let message = if let Some(key) = channel.strip_prefix(fill_prefix.as_bytes()) {
                Message::Filled(Bytes::copy_from_slice(key))
            } else if channel == purge_channel.as_bytes() {
                match Purge::decode(payload) {
                    Some(p) => Message::Purged(p),
                    None => return true,
                }
            } else {
                return true;
            };
            on_message(message)
        },
    )
    .await
}

/// The client's bounds from `[redis]`. One lane: the cache sends no
/// blocking command, and one multiplexed connection per node carries it.
fn settings(c: &RedisConfig) -> Settings {
    Settings {
        timeout: c.timeout.0,
        budget: c.retry_budget(),
        lanes: 1,
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
