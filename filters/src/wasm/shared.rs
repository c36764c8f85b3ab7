//! Shared data (key/value with compare-and-swap) and shared queues: state
//! that all instances of a filter see, like Envoy's per-VM-id stores.
//!
//! The store is process-wide and keyed by the filter's VM id (its name), so
//! a config reload that builds the filter anew keeps the data, and two
//! different filters never see each other's keys.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use super::ticker::Signals;

/// Limits that keep a guest from growing host memory without bound.
const MAX_SHARED_BYTES: usize = 64 << 20;
const MAX_QUEUE_ITEMS: usize = 10_000;

/// Why a shared-data write was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SetError {
    CasMismatch,
    TooLarge,
}

#[derive(Default)]
struct Data {
    entries: HashMap<Vec<u8>, (Vec<u8>, u32)>,
    bytes: usize,
}

/// Who hears about new items in a queue: the instance (pool slot and
/// generation) whose root context registered it.
struct Subscriber {
    signals: Weak<Signals>,
    slot: usize,
    generation: u64,
}

#[derive(Default)]
struct Queues {
    by_name: HashMap<Vec<u8>, u32>,
    items: HashMap<u32, VecDeque<Vec<u8>>>,
    subscribers: HashMap<u32, Vec<Subscriber>>,
}

/// One VM id's shared data and queues.
#[derive(Default)]
pub(crate) struct SharedStore {
    data: Mutex<Data>,
    queues: Mutex<Queues>,
}

static STORES: OnceLock<Mutex<HashMap<String, Arc<SharedStore>>>> = OnceLock::new();
/// CAS tokens are unique process-wide and never 0 (0 means "no CAS").
static NEXT_CAS: AtomicU32 = AtomicU32::new(1);
/// Queue ids are unique process-wide so that a stale id never aliases.
static NEXT_QUEUE: AtomicU32 = AtomicU32::new(1);

fn next_cas() -> u32 {
    loop {
        let c = NEXT_CAS.fetch_add(1, Ordering::Relaxed);
        if c != 0 {
            return c;
        }
    }
}

impl SharedStore {
    /// The store of `vm_id`, created on first use.
    pub(crate) fn for_vm(vm_id: &str) -> Arc<SharedStore> {
        let stores = STORES.get_or_init(Default::default);
        let mut stores = stores.lock().unwrap_or_else(|e| e.into_inner());
        stores.entry(vm_id.to_string()).or_default().clone()
    }

    /// The value of `key` and its CAS token.
    pub(crate) fn get(&self, key: &[u8]) -> Option<(Vec<u8>, u32)> {
        let data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        data.entries.get(key).cloned()
    }

    /// Sets `key`. A `cas` of 0 writes unconditionally; otherwise the write
    /// happens only if `cas` is the key's current token (a key that does
    /// not exist has no token, so a non-zero `cas` fails for it).
    pub(crate) fn set(&self, key: &[u8], value: &[u8], cas: u32) -> Result<(), SetError> {
        let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let old = data.entries.get(key);
        if cas != 0 && old.map(|(_, c)| *c) != Some(cas) {
            return Err(SetError::CasMismatch);
        }
        let old_size = old.map_or(0, |(v, _)| key.len() + v.len());
        let bytes = data.bytes - old_size + key.len() + value.len();
        if bytes > MAX_SHARED_BYTES {
            return Err(SetError::TooLarge);
        }
        data.bytes = bytes;
        data.entries
            .insert(key.to_vec(), (value.to_vec(), next_cas()));
        Ok(())
    }

    /// Registers (or finds) the queue `name`; returns its id. The
    /// registering instance (if any) hears of every later enqueue
    /// (`proxy_on_queue_ready`), like Envoy's registering root context.
    pub(crate) fn register_queue(
        &self,
        name: &[u8],
        by: Option<(&Arc<Signals>, usize, u64)>,
    ) -> u32 {
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let id = match q.by_name.get(name) {
            Some(&id) => id,
            None => {
                let id = NEXT_QUEUE.fetch_add(1, Ordering::Relaxed);
                q.by_name.insert(name.to_vec(), id);
                q.items.insert(id, VecDeque::new());
                id
            }
        };
        if let Some((signals, slot, generation)) = by {
            let subs = q.subscribers.entry(id).or_default();
            subs.retain(|s| s.signals.strong_count() > 0);
            let known = subs.iter().any(|s| {
                s.slot == slot
                    && s.generation == generation
                    && std::ptr::eq(s.signals.as_ptr(), Arc::as_ptr(signals))
            });
            if !known {
                subs.push(Subscriber {
                    signals: Arc::downgrade(signals),
                    slot,
                    generation,
                });
            }
        }
        id
    }

    pub(crate) fn resolve_queue(&self, name: &[u8]) -> Option<u32> {
        let q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        q.by_name.get(name).copied()
    }

    /// `Err(false)`: no such queue; `Err(true)`: the queue is full.
    pub(crate) fn enqueue(&self, id: u32, value: &[u8]) -> Result<(), bool> {
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let items = q.items.get_mut(&id).ok_or(false)?;
        if items.len() >= MAX_QUEUE_ITEMS {
            return Err(true);
        }
        items.push_back(value.to_vec());
        if let Some(subs) = q.subscribers.get_mut(&id) {
            subs.retain(|s| match s.signals.upgrade() {
                Some(signals) => {
                    signals.queue_ready(s.slot, s.generation, id);
                    true
                }
                None => false,
            });
        }
        Ok(())
    }

    /// `None`: no such queue; `Some(None)`: empty.
    pub(crate) fn dequeue(&self, id: u32) -> Option<Option<Vec<u8>>> {
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        q.items.get_mut(&id).map(|items| items.pop_front())
    }

    /// The store holding queue `id`, whatever its VM id.
    pub(crate) fn owning_queue(id: u32) -> Option<Arc<SharedStore>> {
        let stores = STORES.get_or_init(Default::default);
        let stores = stores.lock().unwrap_or_else(|e| e.into_inner());
        stores.values().find(|s| s.has_queue(id)).cloned()
    }

    pub(crate) fn has_queue(&self, id: u32) -> bool {
        let q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        q.items.contains_key(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_semantics() {
        let s = SharedStore::default();
        assert_eq!(s.get(b"k"), None);
        assert_eq!(s.set(b"k", b"v", 7), Err(SetError::CasMismatch));
        s.set(b"k", b"v1", 0).unwrap();
        let (v, cas) = s.get(b"k").unwrap();
        assert_eq!(v, b"v1");
        s.set(b"k", b"v2", cas).unwrap();
        assert_eq!(s.set(b"k", b"v3", cas), Err(SetError::CasMismatch));
        let (v, cas2) = s.get(b"k").unwrap();
        assert_eq!(v, b"v2");
        assert_ne!(cas, cas2);
        assert_eq!(
            s.set(b"big", &vec![0; MAX_SHARED_BYTES + 1], 0),
            Err(SetError::TooLarge)
        );
    }

    #[test]
    fn queues() {
        let s = SharedStore::default();
        let id = s.register_queue(b"q", None);
        assert_eq!(s.register_queue(b"q", None), id);
        assert_eq!(s.resolve_queue(b"q"), Some(id));
        assert_eq!(s.dequeue(id), Some(None));
        s.enqueue(id, b"a").unwrap();
        assert_eq!(s.dequeue(id), Some(Some(b"a".to_vec())));
        assert_eq!(s.enqueue(id + 1000, b"a"), Err(false));
    }
}
