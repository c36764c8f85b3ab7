//! The order store's contract, held against every implementation of
//! [`Store`]: the in-process `MemoryStore` (the demo's) and the Redis
//! store's scripts on a real redis-server and a real Redis Cluster. No HTTP,
//! no broker: each atomic step and its refusals.
//!
//! The pattern, for any state kept behind a trait with an in-process and a
//! Redis implementation (a rate limiter's counters or a waiting room's
//! queue would be next): write the contract once, as an async function
//! generic over the trait that takes a constructor (here
//! [`store_contract`]), and give each implementation its own `#[test]`
//! that passes its constructor. Then the memory store used by the demo and
//! unit tests cannot drift from the one production runs, and a contract
//! failure names the implementation by its test's name.

use std::sync::Arc;

use flashgate_tests::redis::{RedisCluster, RedisServer};
use order_core::model::{new_order_id, now_ms, CheckoutCmd, Outcome, Sku, StockInfo, TxnVerdict};
use order_core::store::memory::MemoryStore;
use order_core::store::redis::{connect_cluster, connect_single, Ack};
use order_core::store::{Precheck, Released, Store};

fn cmd(sku: &Sku, user: &str, key: &str, txn: &str, expires_ms: u64) -> CheckoutCmd {
    CheckoutCmd {
        order_id: new_order_id(sku),
        txn: txn.into(),
        sku: sku.clone(),
        user: user.into(),
        qty: 1,
        idempotency_key: key.into(),
        per_user_limit: 1,
        now_ms: now_ms(),
        expires_ms,
    }
}

/// What every [`Store`] must do, step by step on one SKU: the fence, the
/// check-back, idempotent replays (in the script and in the precheck), the
/// per-user limit, sold out, expiry that returns stock exactly once, and
/// paid or cancelled orders staying so.
///
/// `new_store` makes the store under test: each implementation's test says
/// only how to build one (a fresh `MemoryStore`, a connection to its
/// Redis), and a case that needs a store of its own may call it again.
async fn store_contract<S: Store + ?Sized>(new_store: impl AsyncFn() -> Arc<S>) {
    let store = new_store().await;
    let sku = Sku::parse("s-1").unwrap();
    store.set_stock(&sku, 2).await.unwrap();

    // Fence first: a transaction the check-back rolled back never runs.
    assert_eq!(
        store.check_txn(&sku, "t-fenced").await.unwrap(),
        TxnVerdict::Rollback
    );
    let fenced = store
        .checkout(cmd(&sku, "u1", "k", "t-fenced", u64::MAX))
        .await
        .unwrap();
    assert_eq!(fenced, Outcome::Fenced);
    assert_eq!(
        store.stock(&sku).await.unwrap(),
        StockInfo {
            stock: 2,
            orders: 0
        }
    );

    // Created, then the check-back commits it.
    let Outcome::Created(o1) = store.checkout(cmd(&sku, "u1", "k", "t1", 0)).await.unwrap() else {
        panic!("created")
    };
    assert_eq!(
        store.check_txn(&sku, "t1").await.unwrap(),
        TxnVerdict::Commit
    );
    // Replay by key, in the script and in the read-only precheck.
    assert_eq!(
        store.checkout(cmd(&sku, "u1", "k", "t2", 0)).await.unwrap(),
        Outcome::Replay(o1.clone())
    );
    assert_eq!(
        store.precheck(&sku, 1, "u1", "k").await.unwrap(),
        Precheck::Replay(o1.clone())
    );
    // Limit, then sold out.
    assert_eq!(
        store
            .checkout(cmd(&sku, "u1", "k2", "t3", 0))
            .await
            .unwrap(),
        Outcome::OverLimit
    );
    assert!(matches!(
        store
            .checkout(cmd(&sku, "u2", "k", "t4", u64::MAX))
            .await
            .unwrap(),
        Outcome::Created(_)
    ));
    assert_eq!(
        store.checkout(cmd(&sku, "u3", "k", "t5", 0)).await.unwrap(),
        Outcome::SoldOut
    );
    assert_eq!(
        store.precheck(&sku, 1, "u3", "k").await.unwrap(),
        Precheck::SoldOut
    );
    assert_eq!(
        store.stock(&sku).await.unwrap(),
        StockInfo {
            stock: 0,
            orders: 2
        }
    );

    // Expiry: o1's window is over; releasing twice returns stock once.
    let expired = store.expired(now_ms(), 10).await.unwrap();
    assert_eq!(expired, vec![o1.id.clone()]);
    assert_eq!(
        store.release(&o1.id, now_ms(), false).await.unwrap(),
        Released::Returned
    );
    assert_eq!(
        store.release(&o1.id, now_ms(), false).await.unwrap(),
        Released::Nothing
    );
    assert_eq!(
        store.release(&o1.id, now_ms(), true).await.unwrap(),
        Released::Nothing
    );
    assert_eq!(
        store.stock(&sku).await.unwrap(),
        StockInfo {
            stock: 1,
            orders: 1
        }
    );
    let o1_now = store.order(&o1.id).await.unwrap().unwrap();
    assert_eq!(o1_now.status, order_core::model::OrderStatus::Cancelled);
    // The released user may buy again.
    assert!(matches!(
        store
            .checkout(cmd(&sku, "u1", "k3", "t6", u64::MAX))
            .await
            .unwrap(),
        Outcome::Created(_)
    ));
    // A paid order is never released.
    let paid = store.pay(&o1.id).await.unwrap().unwrap();
    assert_eq!(
        paid.status,
        order_core::model::OrderStatus::Cancelled,
        "cancelled stays cancelled"
    );
}

#[tokio::test]
async fn memory_store_keeps_the_contract() {
    store_contract(async || Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn scripts_on_a_single_server_and_after_script_flush() {
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(connect_single(&redis.url()).await.unwrap());
    store_contract(async || store.clone()).await;
    // A restart or failover empties the script cache: EVALSHA gets
    // NOSCRIPT and the script is loaded again, transparently.
    assert_eq!(redis.cmd(&["SCRIPT", "FLUSH"]), "+OK");
    let sku = Sku::parse("s-2").unwrap();
    store.set_stock(&sku, 1).await.unwrap();
    assert!(matches!(
        store.checkout(cmd(&sku, "u", "k", "t", 0)).await.unwrap(),
        Outcome::Created(_)
    ));
}

#[tokio::test]
async fn scripts_on_redis_cluster() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let urls = cluster.urls();
    store_contract(async || Arc::new(connect_cluster(&urls, Ack::OFF).await.unwrap())).await;
}
