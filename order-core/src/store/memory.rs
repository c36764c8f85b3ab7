//! The in-memory store for `demo` and unit tests: the same state machine as
//! the Redis scripts, under one mutex. Not durable: a restart forgets
//! everything.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{BoxFut, Precheck, Released, Store};
use crate::error::CoreError;
use crate::model::{
    sku_of_order, CheckoutCmd, Order, OrderStatus, Outcome, Sku, StockInfo, TxnVerdict,
};

#[derive(Default)]
struct State {
    stock: HashMap<Sku, i64>,
    live_orders: HashMap<Sku, i64>,
    /// (sku, user, key) -> order id
    idem: HashMap<(Sku, String, String), String>,
    /// (sku, user) -> units held
    bought: HashMap<(Sku, String), u32>,
    orders: HashMap<String, Order>,
    /// txn id -> order id, or None when fenced
    txns: HashMap<String, Option<String>>,
    /// (expires_ms, order id) of pending orders
    pending: BTreeSet<(u64, String)>,
}

/// See the module docs. Cheap to clone (shared state).
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied
        // transaction (every step mutates only after all checks), so a
        // poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn checkout_now(&self, cmd: CheckoutCmd) -> Result<Outcome, CoreError> {
        let mut s = self.lock();
        if let Some(None) = s.txns.get(&cmd.txn) {
            return Ok(Outcome::Fenced);
        }
        let idem = (
            cmd.sku.clone(),
            cmd.user.clone(),
            cmd.idempotency_key.clone(),
        );
        if let Some(id) = s.idem.get(&idem) {
            let order = s.orders.get(id).cloned().ok_or_else(|| {
                CoreError::Corrupt(format!("idempotency key points at missing order {id}"))
            })?;
            return Ok(Outcome::Replay(order));
        }
        let stock = s.stock.get(&cmd.sku).copied().unwrap_or(0);
        if stock < i64::from(cmd.qty) {
            return Ok(Outcome::SoldOut);
        }
        let held = s
            .bought
            .get(&(cmd.sku.clone(), cmd.user.clone()))
            .copied()
            .unwrap_or(0);
        if held + cmd.qty > cmd.per_user_limit {
            return Ok(Outcome::OverLimit);
        }
        let order = cmd.order();
        s.stock.insert(cmd.sku.clone(), stock - i64::from(cmd.qty));
        *s.live_orders.entry(cmd.sku.clone()).or_default() += 1;
        s.bought
            .insert((cmd.sku.clone(), cmd.user.clone()), held + cmd.qty);
        s.idem.insert(idem, order.id.clone());
        s.txns.insert(cmd.txn.clone(), Some(order.id.clone()));
        s.pending.insert((order.expires_ms, order.id.clone()));
        s.orders.insert(order.id.clone(), order.clone());
        Ok(Outcome::Created(order))
    }

    fn release_now(&self, id: &str, now_ms: u64, force: bool) -> Released {
        let mut s = self.lock();
        let Some(order) = s.orders.get(id).cloned() else {
            return Released::Nothing;
        };
        if order.status != OrderStatus::Pending || (!force && order.expires_ms > now_ms) {
            return Released::Nothing;
        }
        if let Some(o) = s.orders.get_mut(id) {
            o.status = OrderStatus::Cancelled;
        }
        *s.stock.entry(order.sku.clone()).or_default() += i64::from(order.qty);
        *s.live_orders.entry(order.sku.clone()).or_default() -= 1;
        if let Some(b) = s.bought.get_mut(&(order.sku.clone(), order.user.clone())) {
            *b = b.saturating_sub(order.qty);
        }
        s.pending.remove(&(order.expires_ms, order.id.clone()));
        Released::Returned
    }
}

impl Store for MemoryStore {
    fn set_stock(&self, sku: &Sku, stock: i64) -> BoxFut<'_, Result<(), CoreError>> {
        self.lock().stock.insert(sku.clone(), stock);
        Box::pin(async { Ok(()) })
    }

    fn stock(&self, sku: &Sku) -> BoxFut<'_, Result<StockInfo, CoreError>> {
        let s = self.lock();
        let info = StockInfo {
            stock: s.stock.get(sku).copied().unwrap_or(0),
            orders: s.live_orders.get(sku).copied().unwrap_or(0),
        };
        Box::pin(async move { Ok(info) })
    }

    fn precheck(
        &self,
        sku: &Sku,
        qty: u32,
        user: &str,
        idempotency_key: &str,
    ) -> BoxFut<'_, Result<Precheck, CoreError>> {
        let s = self.lock();
        let idem = (sku.clone(), user.to_string(), idempotency_key.to_string());
        let out = if let Some(order) = s.idem.get(&idem).and_then(|id| s.orders.get(id)) {
            Precheck::Replay(order.clone())
        } else if s.stock.get(sku).copied().unwrap_or(0) < i64::from(qty) {
            Precheck::SoldOut
        } else {
            Precheck::Proceed
        };
        Box::pin(async move { Ok(out) })
    }

    fn checkout(&self, cmd: CheckoutCmd) -> BoxFut<'static, Result<Outcome, CoreError>> {
        let r = self.checkout_now(cmd);
        Box::pin(async move { r })
    }

    fn check_txn(&self, _sku: &Sku, txn: &str) -> BoxFut<'static, Result<TxnVerdict, CoreError>> {
        let mut s = self.lock();
        let verdict = match s.txns.get(txn) {
            Some(Some(_)) => TxnVerdict::Commit,
            Some(None) => TxnVerdict::Rollback,
            None => {
                s.txns.insert(txn.to_string(), None);
                TxnVerdict::Rollback
            }
        };
        Box::pin(async move { Ok(verdict) })
    }

    fn order(&self, id: &str) -> BoxFut<'_, Result<Option<Order>, CoreError>> {
        let o = self.lock().orders.get(id).cloned();
        Box::pin(async move { Ok(o) })
    }

    fn pay(&self, id: &str) -> BoxFut<'_, Result<Option<Order>, CoreError>> {
        let mut s = self.lock();
        let mut out = None;
        let mut unpend = None;
        if let Some(o) = s.orders.get_mut(id) {
            if o.status == OrderStatus::Pending {
                o.status = OrderStatus::Paid;
                unpend = Some((o.expires_ms, o.id.clone()));
            }
            out = Some(o.clone());
        }
        if let Some(k) = unpend {
            s.pending.remove(&k);
        }
        Box::pin(async move { Ok(out) })
    }

    fn release(
        &self,
        id: &str,
        now_ms: u64,
        force: bool,
    ) -> BoxFut<'_, Result<Released, CoreError>> {
        let r = self.release_now(id, now_ms, force);
        Box::pin(async move { Ok(r) })
    }

    fn expired(&self, now_ms: u64, max: usize) -> BoxFut<'_, Result<Vec<String>, CoreError>> {
        let ids = self
            .lock()
            .pending
            .iter()
            .take_while(|(t, _)| *t <= now_ms)
            .take(max)
            .map(|(_, id)| id.clone())
            .filter(|id| sku_of_order(id).is_some())
            .collect();
        Box::pin(async move { Ok(ids) })
    }
}
