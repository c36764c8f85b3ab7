//! The HTTP/2 stream idle clock (`stream_idle_timeout`): a stream whose
//! response makes no progress for that long is reset, as Envoy's stream
//! idle timeout does. A client that opens streams and never opens their
//! flow-control windows (the zero-window attack) holds each one's
//! buffers for that long at most; the connection-wide `send_timeout`
//! cannot see it, since nothing is ever written for such a stream.
//!
//! hyper runs each HTTP/2 stream as a task it spawns through the
//! connection's executor; [`StreamExec`] wraps those tasks in
//! [`IdleGuard`]. The guard's clock starts once the stream's handler has
//! answered (a slow upstream is bounded by `request_timeout`, not here)
//! and restarts whenever the response body hands hyper a frame, which
//! hyper asks for only when the stream's window has room. Both are told
//! through thread-locals set during the guard's own poll, so no state is
//! shared between the stream and its body.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::time::{Instant, Sleep};

thread_local! {
    /// Set while a guarded stream is being polled: the handler answered.
    static ANSWERED: Cell<bool> = const { Cell::new(false) };
    /// Set while a guarded stream is being polled: a body frame went out.
    static PROGRESS: Cell<bool> = const { Cell::new(false) };
}

/// The handler has its response (called at the end of the service).
pub fn answered() {
    ANSWERED.with(|a| a.set(true));
}

/// A response body produced a frame.
pub fn progressed() {
    PROGRESS.with(|p| p.set(true));
}

/// hyper's executor for HTTP/2 connections: spawns stream tasks under
/// an [`IdleGuard`].
#[derive(Clone)]
pub struct StreamExec {
    pub idle: Duration,
    pub timeouts: IntCounter,
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(IdleGuard {
            fut,
            idle: self.idle,
            last: None,
            sleep: None,
            timeouts: self.timeouts.clone(),
        });
    }
}

pin_project_lite::pin_project! {
    /// One stream's task and its idle clock.
    pub struct IdleGuard<F> {
        #[pin]
        fut: F,
        idle: Duration,
        // Last progress; `None` until the handler has answered.
        last: Option<Instant>,
        // Re-armed lazily: when it fires, the real deadline is computed.
        sleep: Option<Pin<Box<Sleep>>>,
        timeouts: IntCounter,
    }
}

impl<F: Future> Future for IdleGuard<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        ANSWERED.with(|a| a.set(false));
        PROGRESS.with(|p| p.set(false));
        if this.fut.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let answered = ANSWERED.with(|a| a.replace(false));
        let progressed = PROGRESS.with(|p| p.replace(false));
        if answered || (progressed && this.last.is_some()) {
            *this.last = Some(Instant::now());
        }
        let Some(last) = *this.last else {
            return Poll::Pending;
        };
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(last + *this.idle)));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = last + *this.idle;
            if Instant::now() >= due {
                // Dropping the stream's task resets the stream (h2 sends
                // RST_STREAM) and frees what its response held.
                this.timeouts.inc();
                return Poll::Ready(());
            }
            sleep.as_mut().reset(due);
        }
    }
}
