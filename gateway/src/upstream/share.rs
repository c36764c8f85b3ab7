//! Each client's share of a cluster's slots for requests that must
//! stream (routes with `buffer_requests = false` or
//! `buffer_responses = false`). Buffered requests hold a slot only at
//! the upstream's pace, whatever the client does; a streaming one holds
//! it at the client's, so one slow client (by its resolved address, also
//! behind a load balancer with trusted `x-forwarded-for`) could otherwise
//! hold them all. nginx's `limit_conn` does the same per key.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Streaming requests in flight to one cluster, by client address.
pub struct ClientShares {
    per_client: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

impl ClientShares {
    pub fn new(per_client: usize) -> Arc<ClientShares> {
        Arc::new(ClientShares {
            per_client: per_client.max(1),
            held: Mutex::new(HashMap::new()),
        })
    }

    /// One more streaming request for `ip`, unless it holds its share.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<ShareGuard> {
        let mut held = self.held.lock().expect("shares lock");
        let n = held.entry(ip).or_insert(0);
        if *n >= self.per_client {
            return None;
        }
        *n += 1;
        Some(ShareGuard {
            shares: self.clone(),
            ip,
        })
    }

    #[cfg(test)]
    fn clients(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

/// One streaming request's place in its client's share, given back when
/// dropped (with the response, or when the request fails).
pub struct ShareGuard {
    shares: Arc<ClientShares>,
    ip: IpAddr,
}

impl Drop for ShareGuard {
    fn drop(&mut self) {
        let mut held = self.shares.held.lock().expect("shares lock");
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_holds_its_share_and_no_more() {
        let shares = ClientShares::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let one = shares.take(a).unwrap();
        let _two = shares.take(a).unwrap();
        assert!(shares.take(a).is_none());
        let other = shares.take(b).unwrap();
        drop(one);
        assert!(shares.take(a).is_some());
        drop(other);
        assert_eq!(
            shares.clients(),
            1,
            "a client with nothing held is forgotten"
        );
    }
}
