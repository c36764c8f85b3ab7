//! The production store: Redis (single server or Cluster), one Lua script
//! per state change. Scripts are `include_str!`-ed from `order-core/lua/`
//! and run with EVALSHA, falling back to EVAL on NOSCRIPT (after a restart
//! or failover), so no step depends on a prior SCRIPT LOAD having survived.
//! Every call goes through [`RedisClient::run`] (timeouts, slot map
//! refresh, retries of these idempotent steps), and with [`Ack`] each
//! write is confirmed on replicas before it counts.
//!
//! Every key of a SKU carries the hash tag `{sku}`: one SKU lives in one
//! slot, so each script touches one node and stays atomic on a Cluster.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;

use super::{BoxFut, Precheck, Released, Store};
use crate::error::CoreError;
use crate::model::{
    sku_of_order, CheckoutCmd, Order, OrderStatus, Outcome, Sku, StockInfo, TxnVerdict,
};
use flashgate_redis::{Conn, Failure, RedisClient, Settings};

/// Where the SKUs with stock are listed, for the expiry sweep. Not tagged:
/// it is read on its own, never inside a script.
const SKUS: &str = "fg:skus";

struct Scripts {
    checkout: Lua,
    check_txn: Lua,
    release: Lua,
    pay: Lua,
}

/// Key names of one SKU.
struct Keys<'a>(&'a str);

impl Keys<'_> {
    fn k(&self, rest: &str) -> String {
        format!("fg:{{{}}}:{rest}", self.0)
    }
    fn stock(&self) -> String {
        self.k("stock")
    }
    fn orders(&self) -> String {
        self.k("orders")
    }
    fn pending(&self) -> String {
        self.k("pending")
    }
    fn order(&self, id: &str) -> String {
        self.k(&format!("order:{id}"))
    }
    fn user(&self, user: &str) -> String {
        self.k(&format!("user:{user}"))
    }
    fn idem(&self, user: &str, key: &str) -> String {
        self.k(&format!("idem:{user}:{key}"))
    }
    fn txn(&self, txn: &str) -> String {
        self.k(&format!("txn:{txn}"))
    }
}

/// Replicated acknowledgement: after each write, `WAIT replicas timeout`
/// on the same connection, and the write counts only if that many
/// replicas have it (see docs/checkout.md, "Acknowledged means
/// replicated").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// Replicas that must have a write before it is acknowledged; 0 = off.
    pub replicas: u32,
    pub timeout: Duration,
}

impl Ack {
    pub const OFF: Ack = Ack {
        replicas: 0,
        timeout: Duration::ZERO,
    };
}

/// See the module docs.
#[derive(Clone)]
pub struct RedisStore {
    client: RedisClient,
    scripts: Arc<Scripts>,
    ack: Ack,
}

/// A store on one redis-server with default settings and no replicated acks.
pub async fn connect_single(url: &str) -> Result<RedisStore, CoreError> {
    let client = RedisClient::single(url, Settings::default())
        .await
        .map_err(|e| CoreError::store(format!("connect to {url}"), e))?;
    Ok(new_store(client, Ack::OFF))
}

/// A store on a Redis Cluster with default settings and `ack`.
pub async fn connect_cluster(urls: &[String], ack: Ack) -> Result<RedisStore, CoreError> {
    let client = RedisClient::cluster(urls, Settings::default())
        .await
        .map_err(|e| CoreError::store(format!("connect to cluster {urls:?}"), e))?;
    Ok(new_store(client, ack))
}

/// A store on one redis-server or a Redis Cluster (see [`RedisClient`]).
pub fn new_store(client: RedisClient, ack: Ack) -> RedisStore {
    RedisStore {
        client,
        scripts: Arc::new(Scripts {
            checkout: Lua::new(include_str!("../../lua/checkout.lua")),
            check_txn: Lua::new(include_str!("../../lua/check_txn.lua")),
            release: Lua::new(include_str!("../../lua/release.lua")),
            pay: Lua::new(include_str!("../../lua/pay.lua")),
        }),
        ack,
    }
}

/// One of the scripts: run with EVALSHA, and with EVAL (which also caches
/// it) when the server answers NOSCRIPT (after a restart, a failover, or
/// `SCRIPT FLUSH`). Hand-built rather than the crate's `Script` because the
/// call goes into a pipeline with `WAIT` behind it.
struct Lua {
    src: &'static str,
    sha: String,
}

impl Lua {
    fn new(src: &'static str) -> Lua {
        Lua {
            src,
            sha: redis::Script::new(src).get_hash().to_string(),
        }
    }

    fn cmd(&self, eval: bool, keys: &[String], args: &[String]) -> redis::Cmd {
        let mut c = if eval {
            let mut c = redis::cmd("EVAL");
            c.arg(self.src);
            c
        } else {
            let mut c = redis::cmd("EVALSHA");
            c.arg(&self.sha);
            c
        };
        c.arg(keys.len()).arg(keys).arg(args);
        c
    }
}

/// Sends `cmd` and, when acks are on, `WAIT` right behind it on the same
/// connection (a pipeline goes to one node: the one of `cmd`'s keys; WAIT
/// has none). Returns the reply and whether the replicas confirmed it.
async fn with_ack<T: redis::FromRedisValue>(
    conn: &mut Conn,
    cmd: redis::Cmd,
    ack: Ack,
) -> redis::RedisResult<(T, bool)> {
    if ack.replicas == 0 {
        let v: T = cmd.query_async(conn).await?;
        return Ok((v, true));
    }
    let mut pipe = redis::pipe();
    pipe.add_command(cmd)
        .cmd("WAIT")
        .arg(ack.replicas)
        .arg(ack.timeout.as_millis() as u64);
    let (v, acked): (T, i64) = pipe.query_async(conn).await?;
    Ok((v, acked >= i64::from(ack.replicas)))
}

/// Runs `lua` with `with_ack`, loading it on NOSCRIPT.
async fn run_lua<T: redis::FromRedisValue>(
    mut conn: Conn,
    lua: &Lua,
    keys: &[String],
    args: &[String],
    ack: Ack,
) -> redis::RedisResult<(T, bool)> {
    match with_ack(&mut conn, lua.cmd(false, keys, args), ack).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            with_ack(&mut conn, lua.cmd(true, keys, args), ack).await
        }
        other => other,
    }
}

/// A failed call as the core's error: 503, and `Unknown` when the call may
/// have run (its reply was lost), which the check-back settles.
fn failed(ctx: String, f: Failure) -> CoreError {
    if f.maybe_ran {
        CoreError::Unknown(format!("{ctx}: {f}"))
    } else {
        CoreError::store(ctx, f)
    }
}

/// A write whose replication was not confirmed in time.
fn unconfirmed(ctx: String, ack: Ack) -> CoreError {
    CoreError::Unknown(format!(
        "{ctx}: written, but fewer than {} replica(s) confirmed it within {:?}",
        ack.replicas, ack.timeout
    ))
}

impl RedisStore {
    pub fn client(&self) -> &RedisClient {
        &self.client
    }

    pub fn ack(&self) -> Ack {
        self.ack
    }

    /// The acknowledgement a write on `sku`'s slot needs: the configured
    /// count, capped by the replicas its master has in the last topology
    /// read. A master without any replica (right after a failover, until
    /// the old master rejoins as its replica) cannot lose a write to a
    /// failover, since there is nothing to promote: its writes are
    /// acknowledged on its own (AOF) rather than refused until a replica
    /// returns. See docs/checkout.md, "Acknowledged means replicated".
    fn ack_for(&self, sku: &Sku) -> Ack {
        if self.ack.replicas == 0 {
            return Ack::OFF;
        }
        match self
            .client
            .replicas_of(Keys(sku.as_str()).stock().as_bytes())
        {
            Some(n) => Ack {
                replicas: self.ack.replicas.min(n as u32),
                ..self.ack
            },
            None => self.ack,
        }
    }

    async fn load_order(&self, id: &str) -> Result<Option<Order>, CoreError> {
        let Some(sku) = sku_of_order(id) else {
            return Ok(None);
        };
        let key = Keys(sku.as_str()).order(id);
        let fields: HashMap<String, String> = self
            .client
            .run(|mut c| {
                let key = key.clone();
                async move { c.hgetall(key).await }
            })
            .await
            .map_err(|e| CoreError::store(format!("read order {id}"), e))?;
        if fields.is_empty() {
            return Ok(None);
        }
        parse_order(&fields).map(Some)
    }

    /// Makes a replay's order as durable as a new one before it is
    /// answered: a write on the SKU's slot (the idempotency key set again
    /// to the same order id) moves this connection's replication offset
    /// past the order's own writes, and `WAIT` then covers them too.
    async fn confirm_replay(&self, sku: &Sku, idem_key: &str, id: &str) -> Result<(), CoreError> {
        let ack = self.ack_for(sku);
        if ack.replicas == 0 {
            return Ok(());
        }
        let (_, confirmed): (Option<String>, bool) = self
            .client
            .run(|mut c| {
                let mut set = redis::cmd("SET");
                set.arg(idem_key).arg(id).arg("XX");
                async move { with_ack(&mut c, set, ack).await }
            })
            .await
            .map_err(|e| failed(format!("confirm replay of order {id}"), e))?;
        if !confirmed {
            return Err(unconfirmed(format!("replay of order {id}"), ack));
        }
        Ok(())
    }
}

fn parse_order(f: &HashMap<String, String>) -> Result<Order, CoreError> {
    let get = |k: &str| {
        f.get(k)
            .cloned()
            .ok_or_else(|| CoreError::Corrupt(format!("order record lacks {k}")))
    };
    let num = |k: &str| -> Result<u64, CoreError> {
        get(k)?
            .parse()
            .map_err(|_| CoreError::Corrupt(format!("order field {k} is not a number")))
    };
    let status = get("status")?;
    Ok(Order {
        id: get("id")?,
        sku: Sku::parse(&get("sku")?).map_err(|e| CoreError::Corrupt(e.to_string()))?,
        user: get("user")?,
        qty: u32::try_from(num("qty")?).map_err(|_| CoreError::Corrupt("qty".into()))?,
        status: OrderStatus::parse(&status)
            .ok_or_else(|| CoreError::Corrupt(format!("status {status}")))?,
        txn: get("txn")?,
        idempotency_key: get("idem")?,
        created_ms: num("created_ms")?,
        expires_ms: num("expires_ms")?,
    })
}

impl Store for RedisStore {
    fn set_stock(&self, sku: &Sku, stock: i64) -> BoxFut<'_, Result<(), CoreError>> {
        let sku = sku.clone();
        Box::pin(async move {
            let key = Keys(sku.as_str()).stock();
            let ack = self.ack_for(&sku);
            let ((), confirmed) = self
                .client
                .run(|mut c| {
                    let mut set = redis::cmd("SET");
                    set.arg(&key).arg(stock);
                    async move { with_ack(&mut c, set, ack).await }
                })
                .await
                .map_err(|e| failed(format!("set stock of {sku}"), e))?;
            if !confirmed {
                return Err(unconfirmed(format!("set stock of {sku}"), ack));
            }
            let _: i64 = self
                .client
                .run(|mut c| {
                    let sku = sku.clone();
                    async move { c.sadd(SKUS, sku.as_str()).await }
                })
                .await
                .map_err(|e| CoreError::store(format!("list sku {sku}"), e))?;
            Ok(())
        })
    }

    fn stock(&self, sku: &Sku) -> BoxFut<'_, Result<StockInfo, CoreError>> {
        let keys = Keys(sku.as_str());
        let (stock_key, orders_key) = (keys.stock(), keys.orders());
        let sku = sku.clone();
        Box::pin(async move {
            let (stock, orders): (Option<i64>, Option<i64>) = self
                .client
                .run(|mut c| {
                    let mut pipe = redis::pipe();
                    pipe.get(&stock_key).get(&orders_key);
                    async move { pipe.query_async(&mut c).await }
                })
                .await
                .map_err(|e| CoreError::store(format!("read stock of {sku}"), e))?;
            Ok(StockInfo {
                stock: stock.unwrap_or(0),
                orders: orders.unwrap_or(0),
            })
        })
    }

    fn precheck(
        &self,
        sku: &Sku,
        qty: u32,
        user: &str,
        idempotency_key: &str,
    ) -> BoxFut<'_, Result<Precheck, CoreError>> {
        let k = Keys(sku.as_str());
        // Both keys carry the SKU's hash tag: one MGET, one node.
        let keys = [k.stock(), k.idem(user, idempotency_key)];
        let sku = sku.clone();
        Box::pin(async move {
            let (stock, idem): (Option<i64>, Option<String>) = self
                .client
                .run(|mut c| {
                    let keys = keys.clone();
                    async move { c.mget(&keys).await }
                })
                .await
                .map_err(|e| CoreError::store(format!("precheck of {sku}"), e))?;
            if let Some(id) = idem {
                if let Some(order) = self.load_order(&id).await? {
                    self.confirm_replay(&sku, &keys[1], &id).await?;
                    return Ok(Precheck::Replay(order));
                }
            }
            Ok(if stock.unwrap_or(0) < i64::from(qty) {
                Precheck::SoldOut
            } else {
                Precheck::Proceed
            })
        })
    }

    fn checkout(&self, cmd: CheckoutCmd) -> BoxFut<'static, Result<Outcome, CoreError>> {
        let store = self.clone();
        Box::pin(async move {
            let ack = store.ack_for(&cmd.sku);
            let k = Keys(cmd.sku.as_str());
            let keys = [
                k.stock(),
                k.orders(),
                k.idem(&cmd.user, &cmd.idempotency_key),
                k.user(&cmd.user),
                k.order(&cmd.order_id),
                k.txn(&cmd.txn),
                k.pending(),
            ];
            let args = [
                cmd.order_id.clone(),
                cmd.sku.as_str().to_string(),
                cmd.user.clone(),
                cmd.qty.to_string(),
                cmd.per_user_limit.to_string(),
                cmd.txn.clone(),
                cmd.now_ms.to_string(),
                cmd.expires_ms.to_string(),
                cmd.idempotency_key.clone(),
                // Under replicated acks a replay writes (the idempotency
                // key again), so WAIT covers the replayed order too.
                if ack.replicas > 0 { "1" } else { "0" }.to_string(),
            ];
            let ctx = || format!("checkout of {} (txn {})", cmd.sku, cmd.txn);
            // Retried on timeouts and failovers: a second run of the same
            // command finds its own idempotency key and answers REPLAY of
            // its own order id, so the script never deducts twice.
            let (reply, confirmed): (Vec<String>, bool) = store
                .client
                .run(|c| run_lua(c, &store.scripts.checkout, &keys, &args, ack))
                .await
                .map_err(|e| failed(ctx(), e))?;
            let outcome = match reply.first().map(String::as_str) {
                Some("CREATED") => Outcome::Created(cmd.order()),
                Some("REPLAY") => {
                    let id = reply
                        .get(1)
                        .ok_or_else(|| CoreError::Corrupt("REPLAY without order id".into()))?;
                    if *id == cmd.order_id {
                        // An earlier attempt of this very call ran (its
                        // reply was lost): the order is ours, new.
                        Outcome::Created(cmd.order())
                    } else {
                        let order = store.load_order(id).await?.ok_or_else(|| {
                            CoreError::Corrupt(format!(
                                "idempotency key points at missing order {id}"
                            ))
                        })?;
                        Outcome::Replay(order)
                    }
                }
                Some("SOLDOUT") => Outcome::SoldOut,
                Some("LIMIT") => Outcome::OverLimit,
                Some("FENCED") => Outcome::Fenced,
                other => {
                    return Err(CoreError::Corrupt(format!(
                        "checkout.lua answered {other:?}"
                    )))
                }
            };
            // Refusals wrote nothing: their answer needs no replica.
            if matches!(outcome, Outcome::Created(_) | Outcome::Replay(_)) && !confirmed {
                return Err(unconfirmed(ctx(), ack));
            }
            Ok(outcome)
        })
    }

    fn check_txn(&self, sku: &Sku, txn: &str) -> BoxFut<'static, Result<TxnVerdict, CoreError>> {
        let store = self.clone();
        let ack = self.ack_for(sku);
        let keys = [Keys(sku.as_str()).txn(txn)];
        let txn = txn.to_string();
        Box::pin(async move {
            let ctx = || format!("check-back of txn {txn}");
            let (v, confirmed): (String, bool) = store
                .client
                .run(|c| run_lua(c, &store.scripts.check_txn, &keys, &[], ack))
                .await
                .map_err(|e| failed(ctx(), e))?;
            // A fence that a failover could lose would let a late checkout
            // create an order whose message was rolled back.
            if !confirmed {
                return Err(unconfirmed(ctx(), ack));
            }
            match v.as_str() {
                "COMMIT" => Ok(TxnVerdict::Commit),
                "ROLLBACK" => Ok(TxnVerdict::Rollback),
                other => Err(CoreError::Corrupt(format!(
                    "check_txn.lua answered {other}"
                ))),
            }
        })
    }

    fn order(&self, id: &str) -> BoxFut<'_, Result<Option<Order>, CoreError>> {
        let id = id.to_string();
        Box::pin(async move { self.load_order(&id).await })
    }

    fn pay(&self, id: &str) -> BoxFut<'_, Result<Option<Order>, CoreError>> {
        let id = id.to_string();
        Box::pin(async move {
            let Some(sku) = sku_of_order(&id) else {
                return Ok(None);
            };
            let k = Keys(sku.as_str());
            let keys = [k.order(&id), k.pending()];
            let args = [id.clone()];
            let ack = self.ack_for(&sku);
            let (st, confirmed): (Option<String>, bool) = self
                .client
                .run(|c| run_lua(c, &self.scripts.pay, &keys, &args, ack))
                .await
                .map_err(|e| failed(format!("pay order {id}"), e))?;
            if st.is_none() {
                return Ok(None);
            }
            if !confirmed {
                return Err(unconfirmed(format!("pay order {id}"), ack));
            }
            self.load_order(&id).await
        })
    }

    fn release(
        &self,
        id: &str,
        now_ms: u64,
        force: bool,
    ) -> BoxFut<'_, Result<Released, CoreError>> {
        let id = id.to_string();
        Box::pin(async move {
            // The user key is named by the order; the script re-checks the
            // status atomically, so reading the order first is only a lookup.
            let Some(order) = self.load_order(&id).await? else {
                return Ok(Released::Nothing);
            };
            let k = Keys(order.sku.as_str());
            let keys = [
                k.order(&id),
                k.stock(),
                k.orders(),
                k.user(&order.user),
                k.pending(),
            ];
            let ack = self.ack_for(&order.sku);
            let args = [
                id.clone(),
                now_ms.to_string(),
                if force { "1" } else { "0" }.to_string(),
            ];
            let (n, confirmed): (i64, bool) = self
                .client
                .run(|c| run_lua(c, &self.scripts.release, &keys, &args, ack))
                .await
                .map_err(|e| failed(format!("release order {id}"), e))?;
            if n == 1 && !confirmed {
                return Err(unconfirmed(format!("release order {id}"), ack));
            }
            Ok(if n == 1 {
                Released::Returned
            } else {
                Released::Nothing
            })
        })
    }

    fn expired(&self, now_ms: u64, max: usize) -> BoxFut<'_, Result<Vec<String>, CoreError>> {
        Box::pin(async move {
            let skus: Vec<String> = self
                .client
                .run(|mut c| async move { c.smembers(SKUS).await })
                .await
                .map_err(|e| CoreError::store("list skus for expiry", e))?;
            let mut out = Vec::new();
            for sku in skus {
                if out.len() >= max {
                    break;
                }
                let key = Keys(&sku).pending();
                let want = (max - out.len()) as isize;
                let ids: Vec<String> = self
                    .client
                    .run(|mut c| {
                        let key = key.clone();
                        async move { c.zrangebyscore_limit(key, "-inf", now_ms, 0, want).await }
                    })
                    .await
                    .map_err(|e| CoreError::store(format!("list expired orders of {sku}"), e))?;
                out.extend(ids);
            }
            Ok(out)
        })
    }
}
