//! The store: where stock, orders, idempotency keys and transaction fences
//! live. One trait, two implementations with the same semantics:
//! [`memory::MemoryStore`] (the demo, not durable) and `redis::RedisStore`
//! (production: each step is one Lua script, atomic per SKU).
//!
//! Every method is one atomic step; the service composes them and never
//! holds a lock across an await.

use std::future::Future;
use std::pin::Pin;

use crate::error::CoreError;
use crate::model::{CheckoutCmd, Order, Outcome, Sku, StockInfo, TxnVerdict};

pub mod memory;
#[cfg(feature = "redis")]
pub mod redis;

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a release (expiry) did to one order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Released {
    /// The order was pending and past its window: cancelled, stock returned.
    Returned,
    /// Nothing to do (already paid, cancelled, or not expired yet).
    Nothing,
}

/// What the read-only fast path found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Precheck {
    /// The key was used before: its order.
    Replay(Order),
    SoldOut,
    /// Worth a transaction.
    Proceed,
}

pub trait Store: Send + Sync + 'static {
    /// Sets the units for sale (admin).
    fn set_stock(&self, sku: &Sku, stock: i64) -> BoxFut<'_, Result<(), CoreError>>;

    /// Units left and live orders.
    fn stock(&self, sku: &Sku) -> BoxFut<'_, Result<StockInfo, CoreError>>;

    /// The read-only fast path, before any half message is sent: a replay
    /// of a known idempotency key answers with its order, and a SKU that
    /// cannot sell `qty` more units answers sold out. May be stale by a
    /// moment; the checkout transaction decides for real.
    fn precheck(
        &self,
        sku: &Sku,
        qty: u32,
        user: &str,
        idempotency_key: &str,
    ) -> BoxFut<'_, Result<Precheck, CoreError>>;

    /// The local transaction, atomically: fence check, idempotency check,
    /// stock check and deduction, per-user limit, order record keyed by the
    /// command's transaction id.
    fn checkout(&self, cmd: CheckoutCmd) -> BoxFut<'static, Result<Outcome, CoreError>>;

    /// The broker's check-back, atomically: commit if the transaction's
    /// order exists; otherwise fence the transaction id and roll back.
    fn check_txn(&self, sku: &Sku, txn: &str) -> BoxFut<'static, Result<TxnVerdict, CoreError>>;

    /// One order by id.
    fn order(&self, id: &str) -> BoxFut<'_, Result<Option<Order>, CoreError>>;

    /// Marks a pending order paid (the payment confirmation). `Ok(None)` if
    /// there is no such order; the order as it is after the call otherwise
    /// (a cancelled order stays cancelled).
    fn pay(&self, id: &str) -> BoxFut<'_, Result<Option<Order>, CoreError>>;

    /// Cancels the order if it is still pending and its window passed (or
    /// `force`), returning its stock exactly once however often it runs.
    fn release(
        &self,
        id: &str,
        now_ms: u64,
        force: bool,
    ) -> BoxFut<'_, Result<Released, CoreError>>;

    /// Pending orders whose window ended before `now_ms`, at most `max`.
    fn expired(&self, now_ms: u64, max: usize) -> BoxFut<'_, Result<Vec<String>, CoreError>>;
}
