//! The order publisher: how an order leaves the core. One trait, two
//! implementations: [`local::LocalQueue`] (the demo's in-process queue, not
//! durable) and `rocketmq::RocketMqPublisher` (a RocketMQ transactional
//! message: half message, local transaction, commit or rollback).
//!
//! The publisher drives the local transaction because the order matters:
//! the half message must be on the broker before stock moves, so a crash
//! between the two is settled by the broker's check-back.

use crate::error::CoreError;
use crate::model::{OrderEvent, Outcome};
use crate::store::BoxFut;

pub mod local;
#[cfg(feature = "rocketmq")]
pub mod rocketmq;

/// The local transaction: runs the checkout script once.
pub type LocalTxn = Box<dyn FnOnce() -> BoxFut<'static, Result<Outcome, CoreError>> + Send>;

pub trait Publisher: Send + Sync + 'static {
    /// Publishes `event` if and only if `local` creates the order
    /// ([`Outcome::commits`]); returns what `local` decided. An error means
    /// the order was not created by this call (see [`CoreError`] for the
    /// one ambiguous case, `Unknown`, which the check-back settles).
    fn transact(
        &self,
        event: OrderEvent,
        local: LocalTxn,
    ) -> BoxFut<'_, Result<Outcome, CoreError>>;

    /// Whether a published order survives a crash of this process.
    fn durable(&self) -> bool;
}
