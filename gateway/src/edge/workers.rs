//! Thread-per-core serving: the listeners run on N event loops, one
//! tokio current-thread runtime per thread, each with its own socket per
//! listener (`SO_REUSEPORT`: the kernel spreads new connections over the
//! sockets) and its own upstream keep-alive pools ([`current`] picks them).
//!
//! Why: with tokio's work-stealing runtime one proxied request wakes up to
//! three tasks (the client connection, the upstream connection, and the
//! handler's response channel between them), and any of them may run on
//! the other core, so a request crosses cores several times (cache lines
//! of the task, its channels and the pool move with it). On a worker of
//! its own a connection, its upstream connections and their tasks stay on
//! one thread, as in an nginx worker. Measured in bench/README.md
//! (pass-through, unpinned) and recorded in docs/decisions.md.
//!
//! Worker 0 is the thread that started the gateway: it also runs the admin
//! listener and the background tasks (health checks, overload ticks,
//! certificate and Wasm reloads), which are light. What is shared across
//! workers is what a single runtime shares: the config snapshot, metrics,
//! connection limits, the TLS config (one session-ticket key), the cache,
//! rate limits and the overload gates; only the upstream pools are split.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpSocket};

thread_local! {
    /// The worker this thread is (0 outside per-core serving).
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// How many workers per-core serving started (1 otherwise): the upstream
/// pools are split in this many parts.
static WORKERS: AtomicUsize = AtomicUsize::new(1);

/// The worker the calling thread is: its upstream pools.
pub fn current() -> usize {
    WORKER.with(|w| w.get())
}

/// The number of workers (1 unless per-core serving runs).
pub fn count() -> usize {
    WORKERS.load(Ordering::Relaxed)
}

/// Declares `n` workers; done before anything builds upstream pools.
pub fn set_count(n: usize) {
    WORKERS.store(n.max(1), Ordering::Relaxed);
}

/// Marks the calling thread as worker `i`.
pub fn enter(i: usize) {
    WORKER.with(|w| w.set(i));
}

/// The kernel's accept queue per socket (tokio's own default).
const BACKLOG: u32 = 1024;

/// Binds `n` listening sockets to `addr` with `SO_REUSEPORT`, all on the
/// port the first one got (so `:0` works). The first is registered with
/// the calling runtime; the others are handed out as std sockets for the
/// workers to register with theirs.
pub fn bind_group(
    addr: SocketAddr,
    n: usize,
) -> std::io::Result<(TcpListener, Vec<std::net::TcpListener>)> {
    let first = bind_reuseport(addr)?;
    let bound = first.local_addr()?;
    let mut rest = Vec::with_capacity(n.saturating_sub(1));
    for _ in 1..n {
        rest.push(bind_reuseport(bound)?.into_std()?);
    }
    Ok((first, rest))
}

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Starts worker `i` on a thread of its own running a current-thread
/// runtime: `serve` (given the worker's runtime) runs to its end, then
/// the returned receiver resolves.
pub fn spawn<F, Fut>(i: usize, serve: F) -> std::io::Result<tokio::sync::oneshot::Receiver<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("flashgate-worker-{i}"))
        .spawn(move || {
            enter(i);
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(serve()),
                Err(e) => tracing::error!(worker = i, error = %e, "cannot start a worker runtime"),
            }
            let _ = done.send(());
        })?;
    Ok(finished)
}
