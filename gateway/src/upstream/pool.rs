//! Keep-alive connections to one endpoint: a LIFO stack of idle HTTP/1.1
//! connections (hyper's `client::conn::http1` senders), taken for one
//! request and given back when its response body has been read to the end.
//!
//! Why not hyper-util's pooled `Client`: on the proxy's hot path its
//! generality costs (a pool keyed by scheme and authority behind one lock, a
//! boxed connector future, its own retry logic), and it hides what the
//! proxy needs to know: whether a failure happened while connecting (safe
//! to retry for any request, the body was not touched) or after the
//! request was written. Here the connect is a separate step, and a request
//! sent on a pooled connection that turned out to be dead comes back
//! unsent, so it can go out again on a fresh connection without copying it.
//!
//! With per-core serving (`edge::workers`) each worker has a stack of its
//! own: an upstream connection's task runs on the worker that opened it,
//! so a connection taken by another worker would bounce every request and
//! response between two threads.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::client::conn::http1;

use super::UpstreamBody;
use crate::edge::workers;

pub type Sender = http1::SendRequest<UpstreamBody>;

/// Idle connections, most recently used last, with when each was put back.
type Stack = Vec<(Sender, Instant)>;

/// The idle connections of one endpoint: one stack per worker.
pub struct Idle {
    stacks: Box<[Mutex<Stack>]>,
    /// Per stack: `max_idle_per_endpoint` split over the workers.
    max: usize,
    timeout: Duration,
}

impl Idle {
    pub fn new(max: usize, timeout: Duration) -> Idle {
        let workers = workers::count();
        Idle {
            stacks: (0..workers).map(|_| Mutex::new(Vec::new())).collect(),
            max: max.div_ceil(workers),
            timeout,
        }
    }

    /// The calling worker's stack.
    fn stack(&self) -> std::sync::MutexGuard<'_, Stack> {
        self.stacks[workers::current() % self.stacks.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used live connection, ready for a request. LIFO
    /// keeps the hot connections hot and lets the others age out.
    pub async fn take(&self) -> Option<Sender> {
        loop {
            let (mut sender, since) = self.stack().pop()?;
            if since.elapsed() > self.timeout || sender.is_closed() {
                continue;
            }
            if sender.is_ready() {
                return Some(sender);
            }
            // Given back the moment its last response ended: hyper is
            // finishing that message and will be ready right away.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    /// Gives a connection back after a complete response.
    pub fn put(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut stack = self.stack();
        // Expired connections sink to the bottom; drop them as they surface.
        while stack
            .first()
            .is_some_and(|(_, since)| since.elapsed() > self.timeout)
        {
            stack.remove(0);
        }
        if stack.len() < self.max {
            stack.push((sender, Instant::now()));
        }
    }
}
