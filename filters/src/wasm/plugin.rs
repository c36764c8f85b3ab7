//! What all instances of one configured Wasm filter share: its name and
//! configuration, limits, the compiled and pre-linked module, metrics and
//! shared data.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::InstancePre;

use super::metrics::WasmMetrics;
use super::shared::SharedStore;
use super::state::HostState;
use super::ticker::Signals;
use crate::FailMode;

pub(crate) struct Limits {
    pub timeout: Duration,
    pub memory: usize,
    pub instances: usize,
}

pub(crate) struct Plugin {
    pub name: String,
    /// Shared data and queues are scoped by this id (the filter's name).
    pub vm_id: String,
    /// `plugin_root_id` (Envoy's `root_id`).
    pub root_id: String,
    pub config: Vec<u8>,
    pub limits: Limits,
    pub fail: FailMode,
    /// `"0.2.1"` or `"0.2.0"`.
    pub abi: &'static str,
    pub metrics: Arc<WasmMetrics>,
    pub shared: Arc<SharedStore>,
    /// Epoch ticks for one guest call, and for start-up (instantiation,
    /// `_initialize`, `proxy_on_vm_start`, `proxy_on_configure`).
    pub call_ticks: u64,
    pub start_ticks: u64,
    /// Context ids are unique across all instances of the filter.
    next_context: AtomicU32,
    /// Callout tokens, unique across all instances of the filter.
    next_token: AtomicU32,
    pub pre: InstancePre<HostState>,
    /// Wakes the pool's ticker thread (ticks, queue-ready).
    pub signals: Arc<Signals>,
    /// The module exports body or trailer callbacks.
    pub bodies: bool,
    /// The module creates HTTP contexts. False for a background service
    /// (the SDK's `hello_world`: a root context with ticks and no HTTP
    /// context type), found at load: streams then skip the filter while
    /// its root contexts keep running.
    pub http_contexts: AtomicBool,
}

impl Plugin {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: &str,
        root_id: &str,
        config: &str,
        limits: Limits,
        fail: FailMode,
        abi: &'static str,
        pre: InstancePre<HostState>,
        metrics: Arc<WasmMetrics>,
        bodies: bool,
    ) -> Plugin {
        let call_ticks = super::engine::deadline_ticks(limits.timeout);
        // Start-up parses configuration and fills tables: allow it more.
        let start = (limits.timeout * 20).max(Duration::from_millis(500));
        Plugin {
            name: name.to_string(),
            vm_id: name.to_string(),
            root_id: root_id.to_string(),
            config: config.as_bytes().to_vec(),
            fail,
            abi,
            metrics,
            shared: SharedStore::for_vm(name),
            call_ticks,
            start_ticks: super::engine::deadline_ticks(start),
            next_context: AtomicU32::new(1),
            next_token: AtomicU32::new(1),
            limits,
            pre,
            signals: Arc::new(Signals::default()),
            bodies,
            http_contexts: AtomicBool::new(true),
        }
    }

    /// A fresh callout token (never 0).
    pub(crate) fn next_token(&self) -> u32 {
        loop {
            let t = self.next_token.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }

    /// A fresh context id (never 0, which means "no parent").
    pub(crate) fn next_context_id(&self) -> u32 {
        loop {
            let id = self.next_context.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }
}
