//! The production store: Redis (single server or Cluster), one Lua script
//! per state change. Scripts are `include_str!`-ed from `order-core/lua/`
//! and run with EVALSHA; the `redis` crate's `Script` loads them on
//! NOSCRIPT (after a restart or failover), so no step depends on a prior
//! SCRIPT LOAD having survived.
//!
//! Every key of a SKU carries the hash tag `{sku}`: one SKU lives in one
//! slot, so each script touches one node and stays atomic on a Cluster.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{AsyncCommands, Script};

use super::{BoxFut, Precheck, Released, Store};
use crate::error::CoreError;
use crate::model::{
    sku_of_order, CheckoutCmd, Order, OrderStatus, Outcome, Sku, StockInfo, TxnVerdict,
};

/// Where the SKUs with stock are listed, for the expiry sweep. Not tagged:
/// it is read on its own, never inside a script.
const SKUS: &str = "fg:skus";

struct Scripts {
    checkout: Script,
    check_txn: Script,
    release: Script,
    pay: Script,
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

/// See the module docs. `C` is a multiplexed connection that reconnects
/// by itself (`ConnectionManager` or the async cluster connection).
pub struct RedisStore<C> {
    conn: C,
    scripts: Arc<Scripts>,
}

/// How long one Redis call may take before the checkout answers 503.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A store on one redis-server. Connects lazily-resilient: while Redis is
/// down calls fail fast with [`CoreError::Store`], and the manager
/// reconnects when it is back.
pub async fn connect_single(
    url: &str,
) -> Result<RedisStore<redis::aio::ConnectionManager>, CoreError> {
    let client =
        redis::Client::open(url).map_err(|e| CoreError::store(format!("redis url {url}"), e))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    let conn = redis::aio::ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|e| CoreError::store(format!("connect to {url}"), e))?;
    Ok(RedisStore::new(conn))
}

/// A store on a Redis Cluster from seed URLs.
pub async fn connect_cluster(
    urls: &[String],
) -> Result<RedisStore<redis::cluster_async::ClusterConnection>, CoreError> {
    let client = redis::cluster::ClusterClient::builder(urls.to_vec())
        .connection_timeout(Duration::from_millis(500))
        .response_timeout(RESPONSE_TIMEOUT)
        .retries(2)
        .build()
        .map_err(|e| CoreError::store(format!("cluster seeds {urls:?}"), e))?;
    let conn = client
        .get_async_connection()
        .await
        .map_err(|e| CoreError::store(format!("connect to cluster {urls:?}"), e))?;
    Ok(RedisStore::new(conn))
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    pub fn new(conn: C) -> RedisStore<C> {
        RedisStore {
            conn,
            scripts: Arc::new(Scripts {
                checkout: Script::new(include_str!("../../lua/checkout.lua")),
                check_txn: Script::new(include_str!("../../lua/check_txn.lua")),
                release: Script::new(include_str!("../../lua/release.lua")),
                pay: Script::new(include_str!("../../lua/pay.lua")),
            }),
        }
    }

    async fn load_order(mut conn: C, id: &str) -> Result<Option<Order>, CoreError> {
        let Some(sku) = sku_of_order(id) else {
            return Ok(None);
        };
        let fields: HashMap<String, String> = conn
            .hgetall(Keys(sku.as_str()).order(id))
            .await
            .map_err(|e| CoreError::store(format!("read order {id}"), e))?;
        if fields.is_empty() {
            return Ok(None);
        }
        parse_order(&fields).map(Some)
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

impl<C> Store for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn set_stock(&self, sku: &Sku, stock: i64) -> BoxFut<'_, Result<(), CoreError>> {
        let mut conn = self.conn.clone();
        let sku = sku.clone();
        Box::pin(async move {
            let ctx = || format!("set stock of {sku}");
            let () = conn
                .set(Keys(sku.as_str()).stock(), stock)
                .await
                .map_err(|e| CoreError::store(ctx(), e))?;
            let _: i64 = conn
                .sadd(SKUS, sku.as_str())
                .await
                .map_err(|e| CoreError::store(ctx(), e))?;
            Ok(())
        })
    }

    fn stock(&self, sku: &Sku) -> BoxFut<'_, Result<StockInfo, CoreError>> {
        let mut conn = self.conn.clone();
        let keys = Keys(sku.as_str());
        let (stock_key, orders_key) = (keys.stock(), keys.orders());
        let sku = sku.clone();
        Box::pin(async move {
            let (stock, orders): (Option<i64>, Option<i64>) = redis::pipe()
                .get(stock_key)
                .get(orders_key)
                .query_async(&mut conn)
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
        let mut conn = self.conn.clone();
        let k = Keys(sku.as_str());
        // Both keys carry the SKU's hash tag: one MGET, one node.
        let keys = [k.stock(), k.idem(user, idempotency_key)];
        let sku = sku.clone();
        Box::pin(async move {
            let (stock, idem): (Option<i64>, Option<String>) = conn
                .mget(&keys)
                .await
                .map_err(|e| CoreError::store(format!("precheck of {sku}"), e))?;
            if let Some(id) = idem {
                if let Some(order) = Self::load_order(conn, &id).await? {
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
        let mut conn = self.conn.clone();
        let scripts = self.scripts.clone();
        Box::pin(async move {
            let k = Keys(cmd.sku.as_str());
            let reply: Vec<String> = scripts
                .checkout
                .key(k.stock())
                .key(k.orders())
                .key(k.idem(&cmd.user, &cmd.idempotency_key))
                .key(k.user(&cmd.user))
                .key(k.order(&cmd.order_id))
                .key(k.txn(&cmd.txn))
                .key(k.pending())
                .arg(&cmd.order_id)
                .arg(cmd.sku.as_str())
                .arg(&cmd.user)
                .arg(cmd.qty)
                .arg(cmd.per_user_limit)
                .arg(&cmd.txn)
                .arg(cmd.now_ms)
                .arg(cmd.expires_ms)
                .arg(&cmd.idempotency_key)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| {
                    let ctx = format!("checkout of {} (txn {})", cmd.sku, cmd.txn);
                    // A timeout or a dropped connection may hide a script
                    // that ran: only the check-back can tell.
                    if e.is_timeout() || e.is_connection_dropped() {
                        CoreError::Unknown(format!("{ctx}: {e}"))
                    } else {
                        CoreError::store(ctx, e)
                    }
                })?;
            match reply.first().map(String::as_str) {
                Some("CREATED") => Ok(Outcome::Created(cmd.order())),
                Some("REPLAY") => {
                    let id = reply
                        .get(1)
                        .ok_or_else(|| CoreError::Corrupt("REPLAY without order id".into()))?;
                    let order = Self::load_order(conn, id).await?.ok_or_else(|| {
                        CoreError::Corrupt(format!("idempotency key points at missing order {id}"))
                    })?;
                    Ok(Outcome::Replay(order))
                }
                Some("SOLDOUT") => Ok(Outcome::SoldOut),
                Some("LIMIT") => Ok(Outcome::OverLimit),
                Some("FENCED") => Ok(Outcome::Fenced),
                other => Err(CoreError::Corrupt(format!(
                    "checkout.lua answered {other:?}"
                ))),
            }
        })
    }

    fn check_txn(&self, sku: &Sku, txn: &str) -> BoxFut<'static, Result<TxnVerdict, CoreError>> {
        let mut conn = self.conn.clone();
        let scripts = self.scripts.clone();
        let key = Keys(sku.as_str()).txn(txn);
        let txn = txn.to_string();
        Box::pin(async move {
            let v: String = scripts
                .check_txn
                .key(key)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| CoreError::store(format!("check-back of txn {txn}"), e))?;
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
        let conn = self.conn.clone();
        let id = id.to_string();
        Box::pin(async move { Self::load_order(conn, &id).await })
    }

    fn pay(&self, id: &str) -> BoxFut<'_, Result<Option<Order>, CoreError>> {
        let mut conn = self.conn.clone();
        let scripts = self.scripts.clone();
        let id = id.to_string();
        Box::pin(async move {
            let Some(sku) = sku_of_order(&id) else {
                return Ok(None);
            };
            let k = Keys(sku.as_str());
            let st: Option<String> = scripts
                .pay
                .key(k.order(&id))
                .key(k.pending())
                .arg(&id)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| CoreError::store(format!("pay order {id}"), e))?;
            if st.is_none() {
                return Ok(None);
            }
            Self::load_order(conn, &id).await
        })
    }

    fn release(
        &self,
        id: &str,
        now_ms: u64,
        force: bool,
    ) -> BoxFut<'_, Result<Released, CoreError>> {
        let mut conn = self.conn.clone();
        let scripts = self.scripts.clone();
        let id = id.to_string();
        Box::pin(async move {
            // The user key is named by the order; the script re-checks the
            // status atomically, so reading the order first is only a lookup.
            let Some(order) = Self::load_order(conn.clone(), &id).await? else {
                return Ok(Released::Nothing);
            };
            let k = Keys(order.sku.as_str());
            let n: i64 = scripts
                .release
                .key(k.order(&id))
                .key(k.stock())
                .key(k.orders())
                .key(k.user(&order.user))
                .key(k.pending())
                .arg(&id)
                .arg(now_ms)
                .arg(if force { "1" } else { "0" })
                .invoke_async(&mut conn)
                .await
                .map_err(|e| CoreError::store(format!("release order {id}"), e))?;
            Ok(if n == 1 {
                Released::Returned
            } else {
                Released::Nothing
            })
        })
    }

    fn expired(&self, now_ms: u64, max: usize) -> BoxFut<'_, Result<Vec<String>, CoreError>> {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let skus: Vec<String> = conn
                .smembers(SKUS)
                .await
                .map_err(|e| CoreError::store("list skus for expiry", e))?;
            let mut out = Vec::new();
            for sku in skus {
                if out.len() >= max {
                    break;
                }
                let ids: Vec<String> = conn
                    .zrangebyscore_limit(
                        Keys(&sku).pending(),
                        "-inf",
                        now_ms,
                        0,
                        (max - out.len()) as isize,
                    )
                    .await
                    .map_err(|e| CoreError::store(format!("list expired orders of {sku}"), e))?;
                out.extend(ids);
            }
            Ok(out)
        })
    }
}
