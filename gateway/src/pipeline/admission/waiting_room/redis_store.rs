//! The fleet's line in Redis: one Lua script (`room.lua`) per decision,
//! one round trip, through the product's one Redis client
//! (`flashgate-redis`: timeouts, slot map refresh after `MOVED` or a
//! failover). The room's keys share the hash tag `{<room>}` so the script
//! runs on Redis Cluster.
//!
//! Every call is bounded by `redis.timeout`. After a failure Redis is
//! not asked for `redis.retry_interval` (an outage must not cost every
//! visitor a timeout); meanwhile the room follows its `redis_down`. Each
//! change between reachable and not is logged once and shown by
//! `flashgate_waiting_room_redis_up{room}`.

use flashgate_redis::RedisClient;
use prometheus::IntGauge;

use super::store::{Ask, BoxFuture, Live, Outcome, Params, Store, StoreDown, Verdict};
use crate::config::RedisConfig;
use crate::pipeline::admission::redis_link::{self, Outage};

pub struct RedisStore {
    client: RedisClient,
    script: redis::Script,
    keys: [String; 6],
    room: String,
    outage: Outage,
}

/// The script's answer.
type Reply = (i64, i64, i64, i64, i64, i64, i64, i64, i64, String, String);

impl RedisStore {
    pub fn new(c: &RedisConfig, room: &str, up_gauge: IntGauge) -> Result<RedisStore, String> {
        let client: RedisClient = redis_link::client(c)?;
        let key = |what: &str| format!("flashgate:wr:{{{room}}}:{what}");
        Ok(RedisStore {
            client,
            script: redis::Script::new(include_str!("room.lua")),
            keys: [
                key("waiting"),
                key("beats"),
                key("active"),
                key("meta"),
                key("owner"),
                key("pfx"),
            ],
            room: room.to_string(),
            outage: Outage::new(c.retry_interval.0, up_gauge),
        })
    }

    fn failed(&self, err: &dyn std::fmt::Display) {
        if self.outage.failed() {
            tracing::warn!(room = %self.room, error = %err, retry_in = ?self.outage.retry_interval(),
                "redis unavailable: the waiting room follows its redis_down until it answers again");
        }
    }

    fn succeeded(&self) {
        if self.outage.succeeded() {
            tracing::info!(room = %self.room, "redis answers again: the waiting room uses it");
        }
    }

    async fn call(&self, p: &Params, ask: Ask, prefix: &str) -> Result<Outcome, StoreDown> {
        if !self.outage.available() {
            return Err(StoreDown);
        }
        let (kind, number) = match ask {
            Ask::Join => ("join", 0),
            Ask::Poll(n) => ("poll", n),
            Ask::Session(n) => ("session", n),
            Ask::Release(n) => ("release", n),
            Ask::Status => ("status", 0),
        };
        let flag = |b: bool| if b { "1" } else { "0" };
        let script = &self.script;
        let keys = &self.keys;
        let result = self
            .client
            .run(|mut c| async move {
                let mut inv = script.prepare_invoke();
                for k in keys {
                    inv.key(k);
                }
                inv.arg(kind)
                    .arg(number)
                    .arg(prefix)
                    .arg(p.now_ms)
                    .arg(p.rate_per_s)
                    .arg(p.active_cap)
                    .arg(p.session_ms)
                    .arg(p.grace_ms)
                    .arg(flag(p.queue_all))
                    .arg(flag(p.prequeue))
                    .arg(flag(p.reject))
                    .arg(flag(p.random))
                    .arg(p.score)
                    .arg(p.prefix_cap)
                    .arg(p.shuffle_at_ms)
                    .arg(p.seed % (1 << 31));
                inv.invoke_async::<Reply>(&mut c).await
            })
            .await;
        match result {
            Ok(r) => {
                self.succeeded();
                let u = |v: i64| v.max(0) as u64;
                let verdict = match r.0 {
                    1 => Verdict::Waiting {
                        number: u(r.1),
                        position: u(r.2),
                        rejoined: r.3 == 1,
                    },
                    2 => Verdict::Admitted {
                        number: u(r.1),
                        fresh: r.3 == 1,
                    },
                    3 => Verdict::Renewed,
                    4 => Verdict::PrefixCap,
                    5 => Verdict::Full,
                    _ => Verdict::Done,
                };
                Ok(Outcome {
                    verdict,
                    waiting: u(r.4),
                    active: u(r.5),
                    serving: u(r.6),
                    issued: u(r.7),
                    admitted: u(r.8),
                    live: Live {
                        rate_per_s: r.9.parse().ok(),
                        queue_all: match r.10.as_str() {
                            "1" => Some(true),
                            "0" => Some(false),
                            _ => None,
                        },
                    },
                })
            }
            Err(failure) => {
                self.failed(&failure);
                Err(StoreDown)
            }
        }
    }
}

impl Store for RedisStore {
    fn decide<'a>(
        &'a self,
        p: &'a Params,
        ask: Ask,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<Outcome, StoreDown>> {
        Box::pin(self.call(p, ask, prefix))
    }

    fn set_live(&self, live: Live) -> BoxFuture<'_, Result<(), StoreDown>> {
        Box::pin(async move {
            let meta = &self.keys[3];
            let result = self
                .client
                .run(|mut c| async move {
                    let mut pipe = redis::pipe();
                    pipe.atomic();
                    match live.rate_per_s {
                        Some(r) => pipe.hset(meta, "live_rate", r).ignore(),
                        None => pipe.hdel(meta, "live_rate").ignore(),
                    };
                    match live.queue_all {
                        Some(q) => pipe
                            .hset(meta, "live_queue_all", if q { "1" } else { "0" })
                            .ignore(),
                        None => pipe.hdel(meta, "live_queue_all").ignore(),
                    };
                    pipe.query_async::<()>(&mut c).await
                })
                .await;
            result.map_err(|f| {
                self.failed(&f);
                StoreDown
            })
        })
    }
}
