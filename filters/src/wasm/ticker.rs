//! The ticker thread of a filter's instance pool: it delivers what no
//! request carries, to the root context of each instance:
//! `proxy_on_tick` at the period the guest set,
//! `proxy_on_queue_ready` when a shared queue the instance registered got
//! an item, and `proxy_on_http_call_response` for the callouts a root
//! context started.
//!
//! One plain thread per pool rather than a tokio task: the filters crate
//! must not assume a runtime, and a guest call blocks for up to its
//! deadline, which a runtime worker should not. The thread holds only a
//! weak reference and ends within [`IDLE`] once the pool is dropped (a
//! reload or a removed filter).

use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use super::instance::Pool;
use crate::callout::{CalloutError, CalloutResponse};

/// Longest sleep between two looks at the pool.
pub(crate) const IDLE: Duration = Duration::from_millis(100);

/// A queue-ready event: pool slot, instance generation, queue id.
pub(crate) type QueueReady = (usize, u64, u32);

/// A root context's callout answer: pool slot, instance generation, the
/// call's token, and the answer.
pub(crate) type CallDone = (usize, u64, u32, Result<CalloutResponse, CalloutError>);

/// What woke the ticker thread, for the root contexts.
#[derive(Default)]
pub(crate) struct Events {
    pub queue_ready: Vec<QueueReady>,
    pub calls_done: Vec<CallDone>,
}

#[derive(Default)]
struct SignalState {
    events: Events,
    woken: bool,
}

/// How host calls (and other filters' enqueues) wake the ticker thread.
#[derive(Default)]
pub(crate) struct Signals {
    state: Mutex<SignalState>,
    cv: Condvar,
}

impl Signals {
    /// Something changed (a tick period was set): look again now.
    pub(crate) fn wake(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.woken = true;
        self.cv.notify_all();
    }

    pub(crate) fn queue_ready(&self, slot: usize, generation: u64, queue: u32) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.events.queue_ready.contains(&(slot, generation, queue)) {
            st.events.queue_ready.push((slot, generation, queue));
        }
        st.woken = true;
        self.cv.notify_all();
    }

    pub(crate) fn call_done(&self, done: CallDone) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.events.calls_done.push(done);
        st.woken = true;
        self.cv.notify_all();
    }

    /// Sleeps until woken or `max` passed; returns what happened.
    fn wait(&self, max: Duration) -> Events {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.woken {
            st = self
                .cv
                .wait_timeout(st, max)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.woken = false;
        std::mem::take(&mut st.events)
    }
}

/// Starts the ticker thread of `pool`.
pub(crate) fn spawn(pool: Weak<Pool>, signals: Arc<Signals>) {
    let started = std::thread::Builder::new()
        .name("wasm-ticker".into())
        // Guest calls run on this thread's stack (wasm stack is capped at
        // 512 KiB by the engine).
        .stack_size(4 << 20)
        .spawn(move || {
            let mut ready = Events::default();
            loop {
                let Some(pool) = pool.upgrade() else { return };
                let next = pool.service(std::mem::take(&mut ready));
                drop(pool);
                ready = signals.wait(next.min(IDLE));
            }
        });
    if let Err(e) = started {
        tracing::error!(error = %e, "cannot start a wasm ticker thread; ticks and queue-ready are not delivered");
    }
}
