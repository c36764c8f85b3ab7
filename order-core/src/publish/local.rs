//! The demo's in-process queue: committed order events go to a bounded
//! channel and a task records them as "delivered". There is no half message
//! to lose in one process, so the transaction is simply "run local, then
//! publish on success". Not durable: events in memory die with the process.

use std::sync::{Arc, Mutex};

use super::{LocalTxn, Publisher};
use crate::error::CoreError;
use crate::model::{OrderEvent, Outcome};
use crate::store::BoxFut;

/// See the module docs.
#[derive(Clone, Default)]
pub struct LocalQueue {
    delivered: Arc<Mutex<Vec<OrderEvent>>>,
}

impl LocalQueue {
    pub fn new() -> LocalQueue {
        LocalQueue::default()
    }

    /// Events delivered so far (what a consumer would have seen).
    pub fn delivered(&self) -> Vec<OrderEvent> {
        self.delivered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Publisher for LocalQueue {
    fn transact(
        &self,
        event: OrderEvent,
        local: LocalTxn,
    ) -> BoxFut<'_, Result<Outcome, CoreError>> {
        Box::pin(async move {
            let outcome = local().await?;
            if outcome.commits() {
                self.delivered
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(event);
            }
            Ok(outcome)
        })
    }

    fn durable(&self) -> bool {
        false
    }
}
