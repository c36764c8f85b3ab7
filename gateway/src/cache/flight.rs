//! In-process single flight: concurrent misses of one key in this gateway
//! wait on the one fill in progress instead of each asking the origin.
//!
//! A flight is a `watch` channel in a map. The first request for a key
//! starts the fill (a spawned task, so a client that goes away does not
//! cancel the fill others wait on) and everyone, itself included, reads
//! the outcome from the channel. The task's guard takes the flight out of
//! the map when it ends, however it ends; a waiter whose flight ended
//! without an outcome (the task panicked) sees the channel closed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{watch, Notify};

use super::Outcome;

pub type Receiver = watch::Receiver<Option<Outcome>>;

#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<Bytes, Receiver>>,
}

/// Held by the fill task: sends the outcome, and ends the flight on drop.
pub struct Leader {
    flights: Arc<Flights>,
    key: Bytes,
    tx: watch::Sender<Option<Outcome>>,
}

pub enum Joined {
    /// No fill was running: the caller must start one with this guard.
    Lead(Leader, Receiver),
    Follow(Receiver),
}

impl Flights {
    pub fn join(self: &Arc<Self>, key: &Bytes) -> Joined {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = map.get(key) {
            return Joined::Follow(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key.clone(), rx.clone());
        Joined::Lead(
            Leader {
                flights: self.clone(),
                key: key.clone(),
                tx,
            },
            rx,
        )
    }

    /// Is a fill for `key` running here?
    pub fn running(&self, key: &[u8]) -> bool {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(key)
    }
}

impl Leader {
    pub fn key(&self) -> &Bytes {
        &self.key
    }

    /// Hands the outcome to every waiter. Later joiners of this flight
    /// (until the guard drops) get it at once.
    pub fn finish(&self, outcome: Outcome) {
        self.tx.send_replace(Some(outcome));
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.flights
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// Waiters for another gateway's fill, woken by the pub/sub listener.
#[derive(Default)]
pub struct Waiters {
    map: Mutex<HashMap<Bytes, (Arc<Notify>, usize)>>,
}

/// A registration; unregisters on drop.
pub struct Waiting<'a> {
    waiters: &'a Waiters,
    key: Bytes,
    pub notify: Arc<Notify>,
}

impl Waiters {
    pub fn register(&self, key: &Bytes) -> Waiting<'_> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let slot = map
            .entry(key.clone())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        slot.1 += 1;
        Waiting {
            waiters: self,
            key: key.clone(),
            notify: slot.0.clone(),
        }
    }

    /// A fill of `key` finished somewhere in the fleet.
    pub fn wake(&self, key: &[u8]) {
        let notify = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .map(|(n, _)| n.clone());
        if let Some(n) = notify {
            n.notify_waiters();
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut map = self.waiters.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = map.get_mut(&self.key) {
            slot.1 -= 1;
            if slot.1 == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_leader_per_key_until_it_ends() {
        let f = Arc::new(Flights::default());
        let k = Bytes::from_static(b"k");
        let Joined::Lead(leader, _) = f.join(&k) else {
            panic!("first joiner leads")
        };
        assert!(matches!(f.join(&k), Joined::Follow(_)));
        assert!(matches!(
            f.join(&Bytes::from_static(b"other")),
            Joined::Lead(..)
        ));
        assert!(f.running(b"k"));
        drop(leader);
        assert!(!f.running(b"k"));
        assert!(matches!(f.join(&k), Joined::Lead(..)));
    }

    #[tokio::test]
    async fn followers_see_a_dropped_leader_as_closed() {
        let f = Arc::new(Flights::default());
        let k = Bytes::from_static(b"k");
        let Joined::Lead(leader, _) = f.join(&k) else {
            panic!()
        };
        let Joined::Follow(mut rx) = f.join(&k) else {
            panic!()
        };
        drop(leader);
        assert!(rx.wait_for(|o| o.is_some()).await.is_err());
    }

    #[tokio::test]
    async fn waiters_wake_and_unregister() {
        let w = Waiters::default();
        let k = Bytes::from_static(b"k");
        let reg = w.register(&k);
        {
            let notified = reg.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            w.wake(b"k");
            tokio::time::timeout(std::time::Duration::from_secs(1), notified)
                .await
                .expect("woken");
        }
        drop(reg);
        assert!(w.map.lock().unwrap().is_empty());
    }
}
