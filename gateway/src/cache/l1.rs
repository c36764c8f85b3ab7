//! L1: the in-process cache, an LRU bounded by the bytes it holds (not by
//! entry count: one product page and one 900 KiB image are not the same
//! cost). Entries above the size limit are never offered to it.
//!
//! One mutex: an LRU `get` reorders the list, so even reads need it; the
//! critical section is a hash lookup and a pointer move. Sharding is the
//! next step if a profile ever shows contention.

use std::sync::Mutex;

use bytes::Bytes;
use lru::LruCache;
use prometheus::IntGauge;

use super::entry::Record;
use super::key;

pub struct L1 {
    inner: Mutex<Inner>,
    max_bytes: usize,
    bytes_gauge: IntGauge,
    entries_gauge: IntGauge,
}

struct Inner {
    lru: LruCache<Bytes, (Record, usize)>,
    bytes: usize,
}

impl L1 {
    pub fn new(max_bytes: u64, bytes_gauge: IntGauge, entries_gauge: IntGauge) -> L1 {
        L1 {
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
            bytes_gauge,
            entries_gauge,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the LRU half-updated
        // in a way that matters more than losing the cache; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The record at `key`, unless it is past every window at `now` (then
    /// it is dropped).
    pub fn get(&self, key: &[u8], now: u64) -> Option<Record> {
        let mut inner = self.lock();
        let (record, _) = inner.lru.get(key)?;
        if !record.is_dead(now) {
            return Some(record.clone());
        }
        if let Some((_, w)) = inner.lru.pop(key) {
            inner.bytes -= w;
        }
        self.publish(&inner);
        None
    }

    pub fn insert(&self, key: Bytes, record: Record) {
        let weight = record.weight() + key.len();
        if weight > self.max_bytes {
            return;
        }
        let mut inner = self.lock();
        if let Some((_, old)) = inner.lru.put(key, (record, weight)) {
            inner.bytes -= old;
        }
        inner.bytes += weight;
        while inner.bytes > self.max_bytes {
            match inner.lru.pop_lru() {
                Some((_, (_, w))) => inner.bytes -= w,
                None => break,
            }
        }
        self.publish(&inner);
    }

    /// Drops `key` and its header variants; returns how many went.
    pub fn purge_key(&self, purged: &[u8]) -> usize {
        self.retain(|k| !key::in_family(k, purged))
    }

    /// Drops every key that starts with `prefix`.
    pub fn purge_prefix(&self, prefix: &[u8]) -> usize {
        self.retain(|k| !k.starts_with(prefix))
    }

    /// A walk over every key: purges are rare admin calls.
    fn retain(&self, keep: impl Fn(&[u8]) -> bool) -> usize {
        let mut inner = self.lock();
        let doomed: Vec<Bytes> = inner
            .lru
            .iter()
            .filter(|(k, _)| !keep(k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &doomed {
            if let Some((_, w)) = inner.lru.pop(k) {
                inner.bytes -= w;
            }
        }
        self.publish(&inner);
        doomed.len()
    }

    fn publish(&self, inner: &Inner) {
        self.bytes_gauge.set(inner.bytes as i64);
        self.entries_gauge.set(inner.lru.len() as i64);
    }

    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::{HeaderMap, StatusCode};

    use super::super::entry::{now_ms, Entry};
    use super::*;

    fn record(body: usize, ttl_ms: u64) -> Record {
        Record::Response(Arc::new(Entry {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![b'x'; body]),
            stored_at_ms: now_ms(),
            ttl_ms,
            swr_ms: 0,
            sie_ms: 0,
            fill_ms: 0,
            vary: vec![],
        }))
    }

    fn l1(max: u64) -> L1 {
        L1::new(
            max,
            IntGauge::new("b", "b").unwrap(),
            IntGauge::new("e", "e").unwrap(),
        )
    }

    #[test]
    fn bounded_by_bytes_evicting_least_recent() {
        let c = l1(10_000);
        for i in 0..5 {
            c.insert(Bytes::from(format!("k{i}")), record(2_000, 60_000));
        }
        assert!(c.bytes() <= 10_000);
        // The oldest went first.
        assert!(c.get(b"k0", now_ms()).is_none());
        assert!(c.get(b"k4", now_ms()).is_some());
        // Reading k1 keeps it over k2 when room is needed.
        assert!(c.get(b"k1", now_ms()).is_some());
        c.insert(Bytes::from_static(b"big"), record(4_000, 60_000));
        assert!(c.bytes() <= 10_000);
        assert!(c.get(b"big", now_ms()).is_some());
        assert!(c.get(b"k1", now_ms()).is_some());
        assert!(c.get(b"k2", now_ms()).is_none());
    }

    #[test]
    fn oversized_entries_are_never_stored() {
        let c = l1(1_000);
        c.insert(Bytes::from_static(b"k"), record(5_000, 60_000));
        assert!(c.get(b"k", now_ms()).is_none());
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn dead_entries_are_dropped_on_read() {
        let c = l1(100_000);
        c.insert(Bytes::from_static(b"k"), record(10, 1));
        assert!(c.get(b"k", now_ms() + 10).is_none());
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn purge_by_key_family_and_prefix() {
        let c = l1(1_000_000);
        for k in [
            "h/p/1",
            "h/p/1\x1fv:accept-encoding=gzip",
            "h/p/10",
            "h/q/1",
        ] {
            c.insert(Bytes::from(k), record(10, 60_000));
        }
        assert_eq!(c.purge_key(b"h/p/1"), 2);
        assert!(c.get(b"h/p/10", now_ms()).is_some());
        assert_eq!(c.purge_prefix(b"h/p/"), 1);
        assert!(c.get(b"h/q/1", now_ms()).is_some());
    }
}
