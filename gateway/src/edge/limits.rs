//! Connection limits: what one client may cost the gateway in open
//! connections, per listener and per client address, checked at accept
//! before any byte is read.
//!
//! The other client limits: hyper enforces head size, header count and
//! HTTP/2 streams on the connection (`server::http_builders`); the body
//! size is counted as it streams (`request_body`); the target length is
//! the pipeline's request-limits phase. The keys' bounds are checked with
//! the rest of a listener's config (`config::ListenerConfig`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Open connections of one listener, in total and per client address.
pub struct ConnLimits {
    /// Changed by a reload (see `server::Listener::settings`).
    max: AtomicUsize,
    per_ip: AtomicUsize,
    open: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds one of the listener's connection slots until dropped.
pub struct ConnSlot(Arc<ConnLimits>);

/// Holds one of a client address's connection slots until dropped.
pub struct IpSlot(Arc<ConnLimits>, IpAddr);

impl ConnLimits {
    pub fn new(max: usize, per_ip: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            max: AtomicUsize::new(max),
            per_ip: AtomicUsize::new(per_ip),
            open: AtomicUsize::new(0),
            by_ip: Mutex::new(HashMap::new()),
        })
    }

    /// New limits for new connections; open ones keep their slots.
    pub fn set(&self, max: usize, per_ip: usize) {
        self.max.store(max, Ordering::Relaxed);
        self.per_ip.store(per_ip, Ordering::Relaxed);
    }

    /// A slot for a new connection, or `None` at `max_connections`.
    pub fn try_conn(self: &Arc<Self>) -> Option<ConnSlot> {
        let prev = self.open.fetch_add(1, Ordering::AcqRel);
        if prev >= self.max.load(Ordering::Relaxed) {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnSlot(self.clone()))
    }

    /// A slot for `ip`, or `None` at `max_connections_per_ip`. Always
    /// granted when there is no per-address limit.
    pub fn try_ip(self: &Arc<Self>, ip: IpAddr) -> Option<Option<IpSlot>> {
        let per_ip = self.per_ip.load(Ordering::Relaxed);
        if per_ip == 0 {
            return Some(None);
        }
        let mut map = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= per_ip {
            return None;
        }
        *n += 1;
        Some(Some(IpSlot(self.clone(), ip)))
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.0.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_and_ip_slots() {
        let l = ConnLimits::new(2, 1);
        let a = l.try_conn().unwrap();
        let _b = l.try_conn().unwrap();
        assert!(l.try_conn().is_none());
        drop(a);
        assert!(l.try_conn().is_some());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let s = l.try_ip(ip).unwrap();
        assert!(l.try_ip(ip).is_none());
        assert!(l.try_ip("192.0.2.2".parse().unwrap()).is_some());
        drop(s);
        assert!(l.try_ip(ip).is_some());
        assert!(l.by_ip.lock().unwrap().is_empty());
        let unlimited = ConnLimits::new(1, 0);
        assert!(matches!(unlimited.try_ip(ip), Some(None)));
    }
}
