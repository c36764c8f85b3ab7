//! Upgraded connections (WebSocket): the tunnel a request leaves for its
//! client connection's task (see [`TunnelSlot`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

pub type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where a request that upgraded its connection leaves the tunnel for the
/// connection's task, which runs it once hyper has handed the connection
/// over (after the 101 went out). Running it there, rather than in a task
/// of its own, keeps everything the connection holds (its `max_connections`
/// slots, the drain's count) held for as long as the tunnel is open.
#[derive(Default)]
pub struct TunnelSlot(Mutex<Option<Tunnel>>);

impl TunnelSlot {
    /// Leaves `tunnel` for the connection's task to run.
    pub fn put(&self, tunnel: Tunnel) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(tunnel);
    }

    /// The tunnel left by the connection's last request, if it upgraded.
    pub fn take(&self) -> Option<Tunnel> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}
