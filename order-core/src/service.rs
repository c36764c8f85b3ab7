//! The checkout state machine, written once over a [`Store`] and a
//! [`Publisher`] so the demo and production answer identically:
//!
//! ```text
//! request -> validate -> precheck (read only: replay? sold out?)
//!         -> half message -> local transaction (Lua) -> commit | rollback
//! ```
//!
//! plus the expiry sweep that cancels unpaid orders.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::error::CoreError;
use crate::model::{
    check_token, new_order_id, new_txn_id, now_ms, CheckoutCmd, Order, Outcome, Sku, StockInfo,
    TxnVerdict,
};
use crate::publish::Publisher;
use crate::store::{Precheck, Released, Store};
use crate::timing::{Phase, Timings};

/// The most [`Limits::max_in_flight`] may be (config validation enforces
/// it): the broker client's listener queue is made at least this deep.
pub const MAX_IN_FLIGHT_CEILING: usize = 1024;

/// Business limits, from config.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most units of one SKU one user may hold (pending + paid).
    pub per_user: u32,
    /// Most units in one checkout.
    pub max_qty: u32,
    /// How long an order may stay unpaid before its stock goes back.
    pub expiry: Duration,
    /// Most transactions (half message + Lua) in flight at once. A sale
    /// sends thousands of buyers at once; past a few dozen concurrent half
    /// messages the broker client's own queues overflow and every extra
    /// buyer costs a broker round trip only to be told "sold out" later.
    /// The rest wait here, and re-check stock before they send.
    pub max_in_flight: usize,
    /// How long a checkout waits for a transaction slot before it is
    /// answered 503 (nothing deducted).
    pub queue_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_user: 1,
            max_qty: 10,
            expiry: Duration::from_secs(15 * 60),
            max_in_flight: 32,
            queue_wait: Duration::from_secs(2),
        }
    }
}

/// When the publisher started a checkout's local transaction and when the
/// script answered (each set once; unset if it never ran).
#[derive(Default)]
struct LocalMarks {
    started: OnceLock<Instant>,
    answered: OnceLock<Instant>,
}

/// A checkout as the HTTP layer hands it over (not yet validated).
#[derive(Clone, Debug)]
pub struct CheckoutRequest {
    pub sku: Sku,
    pub qty: u32,
    pub user: String,
    pub idempotency_key: String,
}

/// The order core: one per process, shared by all requests.
pub struct Core {
    store: Arc<dyn Store>,
    publisher: Arc<dyn Publisher>,
    limits: Limits,
    /// Transaction slots (see [`Limits::max_in_flight`]).
    slots: Arc<tokio::sync::Semaphore>,
    /// Where checkouts spend their time (`GET /admin/timings`).
    timings: Arc<Timings>,
}

impl Core {
    pub fn new(store: Arc<dyn Store>, publisher: Arc<dyn Publisher>, limits: Limits) -> Core {
        Core {
            store,
            publisher,
            slots: Arc::new(tokio::sync::Semaphore::new(limits.max_in_flight.max(1))),
            limits,
            timings: Arc::default(),
        }
    }

    /// The running per-phase totals (see [`crate::timing`]).
    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Whether orders survive a crash (false in the demo).
    pub fn durable(&self) -> bool {
        self.publisher.durable()
    }

    /// One checkout attempt. `Ok` carries the business outcome; `Err` means
    /// nothing was deducted by this call (or, for `Unknown`, that the
    /// check-back settles it and a retry with the same key tells).
    pub async fn checkout(&self, req: CheckoutRequest) -> Result<Outcome, CoreError> {
        check_token("x-user-id", &req.user)?;
        check_token("Idempotency-Key", &req.idempotency_key)?;
        if req.qty == 0 || req.qty > self.limits.max_qty {
            return Err(CoreError::bad_input(format!(
                "qty must be 1-{}",
                self.limits.max_qty
            )));
        }
        let started = Instant::now();
        let outcome = self.checkout_validated(req).await;
        self.timings.record(Phase::Checkout, started.elapsed());
        outcome
    }

    async fn checkout_validated(&self, req: CheckoutRequest) -> Result<Outcome, CoreError> {
        // Read-only fast path: the losers of a sale and the retries of
        // winners never reach the broker or a write.
        if let Some(done) = self.precheck(&req).await? {
            return done;
        }
        // A slot for the transaction; whoever had to wait looks again,
        // since the buyers ahead may have taken the last unit meanwhile.
        let _slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => {
                self.timings.record(Phase::SlotWait, Duration::ZERO);
                slot
            }
            Err(_) => {
                let asked = Instant::now();
                let slot = tokio::time::timeout(
                    self.limits.queue_wait,
                    self.slots.clone().acquire_owned(),
                )
                .await
                .map_err(|_| {
                    CoreError::Busy(format!(
                        "no transaction slot within {:?}",
                        self.limits.queue_wait
                    ))
                })?
                .map_err(|_| CoreError::Busy("shutting down".into()))?;
                self.timings.record(Phase::SlotWait, asked.elapsed());
                if let Some(done) = self.precheck(&req).await? {
                    return done;
                }
                slot
            }
        };
        let now = now_ms();
        let cmd = CheckoutCmd {
            order_id: new_order_id(&req.sku),
            txn: new_txn_id(),
            sku: req.sku,
            user: req.user,
            qty: req.qty,
            idempotency_key: req.idempotency_key,
            per_user_limit: self.limits.per_user,
            now_ms: now,
            expires_ms: now + self.limits.expiry.as_millis() as u64,
        };
        let event = cmd.event();
        let outcome = self.transact(event, cmd.clone()).await?;
        match outcome {
            Outcome::Replay(order) => self.replay(order, cmd.qty),
            other => Ok(other),
        }
    }

    /// The publisher's transaction around the checkout script, timed
    /// phase by phase (see [`crate::timing`]) from the core's side: when
    /// the publisher starts the script and when the script has answered.
    async fn transact(
        &self,
        event: crate::model::OrderEvent,
        cmd: CheckoutCmd,
    ) -> Result<Outcome, CoreError> {
        let store = self.store.clone();
        let marks = Arc::new(LocalMarks::default());
        let local_marks = marks.clone();
        let started = Instant::now();
        let outcome = self
            .publisher
            .transact(
                event,
                Box::new(move || {
                    let _ = local_marks.started.set(Instant::now());
                    Box::pin(async move {
                        let outcome = store.checkout(cmd).await;
                        let _ = local_marks.answered.set(Instant::now());
                        outcome
                    })
                }),
            )
            .await;
        let done = Instant::now();
        self.timings.record(Phase::Transaction, done - started);
        if let (Some(&local), Some(&answered)) = (marks.started.get(), marks.answered.get()) {
            self.timings.record(Phase::Half, local - started);
            self.timings.record(Phase::Local, answered - local);
            self.timings
                .record(Phase::End, done.saturating_duration_since(answered));
        }
        outcome
    }

    /// The read-only fast path: `Some` when the answer is known without a
    /// transaction (a replay, or sold out).
    async fn precheck(
        &self,
        req: &CheckoutRequest,
    ) -> Result<Option<Result<Outcome, CoreError>>, CoreError> {
        let asked = Instant::now();
        let answer = self
            .store
            .precheck(&req.sku, req.qty, &req.user, &req.idempotency_key)
            .await;
        self.timings.record(Phase::Precheck, asked.elapsed());
        Ok(match answer? {
            Precheck::Replay(order) => Some(self.replay(order, req.qty)),
            Precheck::SoldOut => Some(Ok(Outcome::SoldOut)),
            Precheck::Proceed => None,
        })
    }

    /// A replay must be the same request; a key reused for another
    /// quantity is a client bug, answered 422 rather than a wrong order.
    fn replay(&self, order: Order, qty: u32) -> Result<Outcome, CoreError> {
        if order.qty != qty {
            return Err(CoreError::KeyReuse(order.id));
        }
        Ok(Outcome::Replay(order))
    }

    /// The broker's check-back (see `check_txn.lua`).
    pub async fn check_txn(&self, sku: &Sku, txn: &str) -> Result<TxnVerdict, CoreError> {
        self.store.check_txn(sku, txn).await
    }

    pub async fn order(&self, id: &str) -> Result<Option<Order>, CoreError> {
        self.store.order(id).await
    }

    pub async fn pay(&self, id: &str) -> Result<Option<Order>, CoreError> {
        self.store.pay(id).await
    }

    pub async fn set_stock(&self, sku: &Sku, stock: i64) -> Result<(), CoreError> {
        if stock < 0 {
            return Err(CoreError::bad_input("stock must be >= 0"));
        }
        self.store.set_stock(sku, stock).await
    }

    pub async fn stock(&self, sku: &Sku) -> Result<StockInfo, CoreError> {
        self.store.stock(sku).await
    }

    /// Cancels every pending order whose window ended; returns how many
    /// gave stock back. Safe to run concurrently and repeatedly (on many
    /// instances): release is idempotent per order.
    pub async fn sweep_expired(&self) -> Result<usize, CoreError> {
        let now = now_ms();
        let mut returned = 0;
        loop {
            let ids = self.store.expired(now, 256).await?;
            if ids.is_empty() {
                return Ok(returned);
            }
            let batch = ids.len();
            for id in ids {
                if self.store.release(&id, now, false).await? == Released::Returned {
                    returned += 1;
                }
            }
            if batch < 256 {
                return Ok(returned);
            }
        }
    }

    /// Runs [`Core::sweep_expired`] every `every` until the task is dropped.
    pub fn spawn_expiry(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let core = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match core.sweep_expired().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(released = n, "expired unpaid orders"),
                    Err(e) => tracing::warn!(error = %e, "expiry sweep failed; retrying next tick"),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::local::LocalQueue;
    use crate::store::memory::MemoryStore;

    async fn core(stock: i64) -> (Core, LocalQueue, Sku) {
        let store = Arc::new(MemoryStore::new());
        let queue = LocalQueue::new();
        let core = Core::new(store, Arc::new(queue.clone()), Limits::default());
        let sku = Sku::parse("s1").unwrap();
        core.set_stock(&sku, stock).await.unwrap();
        (core, queue, sku)
    }

    fn req(sku: &Sku, user: &str, key: &str) -> CheckoutRequest {
        CheckoutRequest {
            sku: sku.clone(),
            qty: 1,
            user: user.into(),
            idempotency_key: key.into(),
        }
    }

    #[tokio::test]
    async fn sells_exactly_the_stock_and_publishes_each_order_once() {
        let (core, queue, sku) = core(3).await;
        let mut created = 0;
        for i in 0..10 {
            if let Outcome::Created(_) = core
                .checkout(req(&sku, &format!("u{i}"), "k"))
                .await
                .unwrap()
            {
                created += 1;
            }
        }
        assert_eq!(created, 3);
        assert_eq!(queue.delivered().len(), 3);
        assert_eq!(
            core.stock(&sku).await.unwrap(),
            StockInfo {
                stock: 0,
                orders: 3
            }
        );
    }

    #[tokio::test]
    async fn every_phase_of_a_transaction_is_timed_and_a_sold_out_only_prechecked() {
        use crate::timing::Phase;
        let (core, _, sku) = core(1).await;
        assert!(matches!(
            core.checkout(req(&sku, "a", "ka")).await.unwrap(),
            Outcome::Created(_)
        ));
        assert_eq!(
            core.checkout(req(&sku, "b", "kb")).await.unwrap(),
            Outcome::SoldOut
        );
        let t = core.timings().snapshot();
        let count = |p| t.phase(p).count;
        assert_eq!(count(Phase::Checkout), 2);
        assert_eq!(count(Phase::Precheck), 2);
        for p in [
            Phase::SlotWait,
            Phase::Half,
            Phase::Local,
            Phase::End,
            Phase::Transaction,
        ] {
            assert_eq!(count(p), 1, "{p:?}");
        }
    }

    #[tokio::test]
    async fn replay_and_limit_and_key_reuse() {
        let (core, queue, sku) = core(5).await;
        let Outcome::Created(o) = core.checkout(req(&sku, "u", "k1")).await.unwrap() else {
            panic!("first checkout creates")
        };
        assert_eq!(
            core.checkout(req(&sku, "u", "k1")).await.unwrap(),
            Outcome::Replay(o)
        );
        assert_eq!(
            core.checkout(req(&sku, "u", "k2")).await.unwrap(),
            Outcome::OverLimit
        );
        let mut two = req(&sku, "u", "k1");
        two.qty = 2;
        assert!(matches!(
            core.checkout(two).await,
            Err(CoreError::KeyReuse(_))
        ));
        assert_eq!(queue.delivered().len(), 1);
    }

    #[tokio::test]
    async fn a_fenced_transaction_never_creates_an_order() {
        let (core, _, sku) = core(5).await;
        assert_eq!(
            core.check_txn(&sku, "t1").await.unwrap(),
            TxnVerdict::Rollback
        );
        let mut cmd = CheckoutCmd {
            order_id: new_order_id(&sku),
            txn: "t1".into(),
            sku: sku.clone(),
            user: "u".into(),
            qty: 1,
            idempotency_key: "k".into(),
            per_user_limit: 1,
            now_ms: 0,
            expires_ms: 0,
        };
        assert_eq!(
            core.store().checkout(cmd.clone()).await.unwrap(),
            Outcome::Fenced
        );
        cmd.txn = "t2".into();
        assert!(matches!(
            core.store().checkout(cmd).await.unwrap(),
            Outcome::Created(_)
        ));
        assert_eq!(
            core.check_txn(&sku, "t2").await.unwrap(),
            TxnVerdict::Commit
        );
    }

    #[tokio::test]
    async fn expiry_returns_stock_once() {
        let store = Arc::new(MemoryStore::new());
        let limits = Limits {
            expiry: Duration::ZERO,
            ..Limits::default()
        };
        let core = Core::new(store, Arc::new(LocalQueue::new()), limits);
        let sku = Sku::parse("s1").unwrap();
        core.set_stock(&sku, 1).await.unwrap();
        let Outcome::Created(o) = core.checkout(req(&sku, "u", "k")).await.unwrap() else {
            panic!("creates")
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(core.sweep_expired().await.unwrap(), 1);
        assert_eq!(core.sweep_expired().await.unwrap(), 0);
        assert_eq!(
            core.store().release(&o.id, now_ms(), true).await.unwrap(),
            Released::Nothing
        );
        assert_eq!(
            core.stock(&sku).await.unwrap(),
            StockInfo {
                stock: 1,
                orders: 0
            }
        );
    }

    /// A publisher that holds each transaction until released, and counts
    /// the transactions it was asked for.
    struct Held {
        inner: LocalQueue,
        gate: Arc<tokio::sync::Semaphore>,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl Publisher for Held {
        fn transact(
            &self,
            event: crate::model::OrderEvent,
            local: crate::publish::LocalTxn,
        ) -> crate::store::BoxFut<'_, Result<Outcome, CoreError>> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                let _go = self.gate.acquire().await.unwrap();
                self.inner.transact(event, local).await
            })
        }
        fn durable(&self) -> bool {
            false
        }
    }

    async fn held_core(stock: i64, queue_wait: Duration) -> (Arc<Core>, Arc<Held>, Sku) {
        let held = Arc::new(Held {
            inner: LocalQueue::new(),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            calls: Default::default(),
        });
        let limits = Limits {
            max_in_flight: 1,
            queue_wait,
            ..Limits::default()
        };
        let core = Arc::new(Core::new(
            Arc::new(MemoryStore::new()),
            held.clone(),
            limits,
        ));
        let sku = Sku::parse("s1").unwrap();
        core.set_stock(&sku, stock).await.unwrap();
        (core, held, sku)
    }

    #[tokio::test]
    async fn a_buyer_who_waited_for_a_slot_looks_at_the_stock_again() {
        let (core, held, sku) = held_core(1, Duration::from_secs(10)).await;
        let first = tokio::spawn({
            let (core, sku) = (core.clone(), sku.clone());
            async move { core.checkout(req(&sku, "a", "ka")).await }
        });
        while held.calls.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // Stock is still 1 while the first transaction is held, so the
        // second buyer passes the fast path and queues for the slot.
        let second = tokio::spawn({
            let (core, sku) = (core.clone(), sku.clone());
            async move { core.checkout(req(&sku, "b", "kb")).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        held.gate.add_permits(10);
        assert!(matches!(first.await.unwrap(), Ok(Outcome::Created(_))));
        assert_eq!(second.await.unwrap().unwrap(), Outcome::SoldOut);
        assert_eq!(
            held.calls.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the loser never reached the broker"
        );
    }

    #[tokio::test]
    async fn no_slot_in_time_is_busy_and_deducts_nothing() {
        let (core, held, sku) = held_core(5, Duration::from_millis(30)).await;
        let first = tokio::spawn({
            let (core, sku) = (core.clone(), sku.clone());
            async move { core.checkout(req(&sku, "a", "ka")).await }
        });
        while held.calls.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let second = core.checkout(req(&sku, "b", "kb")).await;
        assert!(
            matches!(&second, Err(e @ CoreError::Busy(_)) if e.is_unavailable()),
            "{second:?}"
        );
        held.gate.add_permits(10);
        assert!(matches!(first.await.unwrap(), Ok(Outcome::Created(_))));
        assert_eq!(
            core.stock(&sku).await.unwrap(),
            StockInfo {
                stock: 4,
                orders: 1
            }
        );
    }
}
