//! Instances of a filter's module and the bounded pool they live in.
//!
//! An instance is a wasmtime store with the module instantiated in it and
//! its root context started. It hosts many HTTP contexts: a stream picks a
//! pool slot when its first phase runs and keeps using that instance (the
//! guest keeps per-context state inside it), so the pool size bounds the
//! number of instances no matter how many requests are in flight. Each
//! slot is a mutex: one guest call at a time per instance.
//!
//! A failed call (trap, timeout, out of memory) poisons the instance: the
//! slot drops it, and the next stream that picks the slot builds a fresh
//! one. Streams whose context lived in the dropped instance fail on their
//! next phase according to the filter's fail mode.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use wasmtime::{Instance as WasmInstance, Store, Trap, TypedFunc};

use super::plugin::Plugin;
use super::state::{HostState, StreamData};

/// Why a guest call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailKind {
    /// The epoch deadline passed.
    Timeout,
    /// A memory growth was refused by the cap before the trap.
    OutOfMemory,
    /// Any other trap: panic, `unreachable`, out-of-bounds access, stack
    /// overflow, `proc_exit`.
    Trap,
    /// The guest refused to start (`proxy_on_vm_start` or
    /// `proxy_on_configure` returned false).
    Refused,
    /// The stream's context is gone (its instance was poisoned), or the
    /// guest asked for something the host cannot do yet (pausing).
    Unavailable,
}

impl fmt::Display for FailKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailKind::Timeout => "timeout",
            FailKind::OutOfMemory => "out of memory",
            FailKind::Trap => "trap",
            FailKind::Refused => "refused",
            FailKind::Unavailable => "unavailable",
        })
    }
}

#[derive(Debug)]
pub(crate) struct Failure {
    pub kind: FailKind,
    pub message: String,
}

impl Failure {
    pub(crate) fn new(kind: FailKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

/// The guest's exported callbacks the host calls. Optional ones the guest
/// does not export behave as their defaults (continue, nothing to do).
struct Exports {
    context_create: TypedFunc<(u32, u32), ()>,
    vm_start: Option<TypedFunc<(u32, u32), u32>>,
    configure: Option<TypedFunc<(u32, u32), u32>>,
    request_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    response_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    done: Option<TypedFunc<u32, u32>>,
    log: Option<TypedFunc<u32, ()>>,
    delete: Option<TypedFunc<u32, ()>>,
}

fn typed<P, R>(
    inst: &WasmInstance,
    store: &mut Store<HostState>,
    name: &str,
) -> Result<Option<TypedFunc<P, R>>, Failure>
where
    P: wasmtime::WasmParams,
    R: wasmtime::WasmResults,
{
    match inst.get_func(&mut *store, name) {
        None => Ok(None),
        Some(f) => f.typed(&*store).map(Some).map_err(|e| {
            Failure::new(
                FailKind::Refused,
                format!("export {name} has the wrong type: {e}"),
            )
        }),
    }
}

/// One instance of the module with its root context started.
pub(crate) struct Instance {
    store: Store<HostState>,
    f: Exports,
}

impl Instance {
    /// Instantiates the module and starts the root context:
    /// `_initialize`, `proxy_on_context_create(root, 0)`,
    /// `proxy_on_vm_start`, `proxy_on_configure`.
    pub(crate) fn start(plugin: &Arc<Plugin>) -> Result<Instance, Failure> {
        let engine = super::engine::engine().map_err(|e| Failure::new(FailKind::Refused, e))?;
        let mut store = Store::new(engine, HostState::new(plugin.clone()));
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(plugin.start_ticks);
        let inst = plugin
            .pre
            .instantiate(&mut store)
            .map_err(|e| classify(&store, e))?;
        let memory = inst.get_memory(&mut store, "memory");
        let alloc = match typed::<u32, u32>(&inst, &mut store, "proxy_on_memory_allocate")? {
            Some(f) => Some(f),
            None => typed::<u32, u32>(&inst, &mut store, "malloc")?,
        };
        if memory.is_none() || alloc.is_none() {
            return Err(Failure::new(
                FailKind::Refused,
                "the module must export `memory` and `proxy_on_memory_allocate` (or `malloc`)",
            ));
        }
        let context_create =
            typed(&inst, &mut store, "proxy_on_context_create")?.ok_or_else(|| {
                Failure::new(FailKind::Refused, "missing export proxy_on_context_create")
            })?;
        let f = Exports {
            context_create,
            vm_start: typed(&inst, &mut store, "proxy_on_vm_start")?,
            configure: typed(&inst, &mut store, "proxy_on_configure")?,
            request_headers: typed(&inst, &mut store, "proxy_on_request_headers")?,
            response_headers: typed(&inst, &mut store, "proxy_on_response_headers")?,
            done: typed(&inst, &mut store, "proxy_on_done")?,
            log: typed(&inst, &mut store, "proxy_on_log")?,
            delete: typed(&inst, &mut store, "proxy_on_delete")?,
        };
        let init = typed::<(), ()>(&inst, &mut store, "_initialize")?;
        let root = plugin.next_context_id();
        {
            let s = store.data_mut();
            s.memory = memory;
            s.alloc = alloc;
            s.root_id = root;
            s.effective = root;
        }
        let mut me = Instance { store, f };
        let ticks = plugin.start_ticks;
        if let Some(init) = init {
            me.call_with(ticks, |s, _| init.call(s, ()))?;
        }
        me.call_with(ticks, |s, f| f.context_create.call(s, (root, 0)))?;
        let vm_config_len = 0;
        let started = me.call_with(ticks, |s, f| match &f.vm_start {
            Some(vm_start) => vm_start.call(s, (root, vm_config_len)),
            None => Ok(1),
        })?;
        if started == 0 {
            return Err(Failure::new(
                FailKind::Refused,
                "proxy_on_vm_start returned false",
            ));
        }
        let config_len = plugin.config.len() as u32;
        let configured = me.call_with(ticks, |s, f| match &f.configure {
            Some(configure) => configure.call(s, (root, config_len)),
            None => Ok(1),
        })?;
        if configured == 0 {
            return Err(Failure::new(
                FailKind::Refused,
                "the filter refused its configuration (proxy_on_configure returned false)",
            ));
        }
        Ok(me)
    }

    /// Runs one guest call under the epoch deadline `ticks`, counting it.
    fn call_with<R>(
        &mut self,
        ticks: u64,
        call: impl FnOnce(&mut Store<HostState>, &Exports) -> wasmtime::Result<R>,
    ) -> Result<R, Failure> {
        self.store.set_epoch_deadline(ticks);
        self.store.data_mut().limiter.refused = false;
        let started = Instant::now();
        let r = call(&mut self.store, &self.f);
        let host = &self.store.data().plugin.metrics.host;
        host.calls.fetch_add(1, Ordering::Relaxed);
        host.call_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r.map_err(|e| classify(&self.store, e))
    }

    fn call<R>(
        &mut self,
        call: impl FnOnce(&mut Store<HostState>, &Exports) -> wasmtime::Result<R>,
    ) -> Result<R, Failure> {
        let ticks = self.store.data().plugin.call_ticks;
        self.call_with(ticks, call)
    }

    /// Runs `call` with the stream's data in the store as the current and
    /// effective context, and takes the data back afterwards, whatever
    /// happened.
    fn with_stream<R>(
        &mut self,
        data: &mut Option<Box<StreamData>>,
        call: impl FnOnce(&mut Store<HostState>, &Exports, u32) -> wasmtime::Result<R>,
    ) -> Result<R, Failure> {
        let Some(d) = data.take() else {
            return Err(Failure::new(FailKind::Unavailable, "stream data missing"));
        };
        let id = d.id;
        {
            let s = self.store.data_mut();
            s.cur = Some(d);
            s.effective = id;
        }
        let r = self.call(|s, f| call(s, f, id));
        let s = self.store.data_mut();
        *data = s.cur.take();
        s.effective = s.root_id;
        r
    }

    /// `proxy_on_context_create(id, root)` for a new HTTP context.
    pub(crate) fn create_context(
        &mut self,
        data: &mut Option<Box<StreamData>>,
    ) -> Result<(), Failure> {
        let root = self.store.data().root_id;
        self.with_stream(data, |s, f, id| f.context_create.call(s, (id, root)))
    }

    /// `proxy_on_request_headers`; returns the guest's action.
    pub(crate) fn request_headers(
        &mut self,
        data: &mut Option<Box<StreamData>>,
        count: u32,
        end_of_stream: bool,
    ) -> Result<u32, Failure> {
        self.with_stream(data, |s, f, id| match &f.request_headers {
            Some(cb) => cb.call(s, (id, count, u32::from(end_of_stream))),
            None => Ok(super::abi::action::CONTINUE),
        })
    }

    /// `proxy_on_response_headers`; returns the guest's action.
    pub(crate) fn response_headers(
        &mut self,
        data: &mut Option<Box<StreamData>>,
        count: u32,
        end_of_stream: bool,
    ) -> Result<u32, Failure> {
        self.with_stream(data, |s, f, id| match &f.response_headers {
            Some(cb) => cb.call(s, (id, count, u32::from(end_of_stream))),
            None => Ok(super::abi::action::CONTINUE),
        })
    }

    /// Ends an HTTP context: `proxy_on_done`, `proxy_on_log`,
    /// `proxy_on_delete`, in that order. The first failure stops the rest.
    pub(crate) fn end_context(
        &mut self,
        data: &mut Option<Box<StreamData>>,
    ) -> Result<(), Failure> {
        // on_done's answer ("may I be deleted now?") matters for root
        // contexts only; an HTTP stream is over either way.
        self.with_stream(data, |s, f, id| match &f.done {
            Some(cb) => cb.call(s, id).map(drop),
            None => Ok(()),
        })?;
        self.with_stream(data, |s, f, id| match &f.log {
            Some(cb) => cb.call(s, id),
            None => Ok(()),
        })?;
        self.with_stream(data, |s, f, id| match &f.delete {
            Some(cb) => cb.call(s, id),
            None => Ok(()),
        })
    }
}

fn classify(store: &Store<HostState>, e: wasmtime::Error) -> Failure {
    let kind = if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        FailKind::Timeout
    } else if store.data().limiter.refused {
        FailKind::OutOfMemory
    } else {
        FailKind::Trap
    };
    let host = &store.data().plugin.metrics.host;
    match kind {
        FailKind::Timeout => host.timeouts.fetch_add(1, Ordering::Relaxed),
        FailKind::OutOfMemory => host.out_of_memory.fetch_add(1, Ordering::Relaxed),
        _ => host.traps.fetch_add(1, Ordering::Relaxed),
    };
    // `{:#}` keeps the trap's cause (the guest's panic message is in the
    // log already, written through fd_write).
    Failure::new(kind, format!("{e:#}"))
}

/// A pool slot: at most one live instance, replaced after a failure.
pub(crate) struct Slot {
    pub inst: Option<Instance>,
    /// Bumped whenever a new instance moves in; a stream remembers the
    /// generation its context was created in.
    pub generation: u64,
    /// After a failed start, don't try again before this (a module that
    /// cannot start would otherwise be instantiated on every request).
    retry_at: Option<Instant>,
}

/// How long a slot waits before starting an instance again after a start
/// failed.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);

pub(crate) struct Pool {
    pub plugin: Arc<Plugin>,
    slots: Box<[Mutex<Slot>]>,
    next: AtomicUsize,
    /// Instances alive now.
    pub live: AtomicU64,
    /// The "pausing is not supported" warning was logged.
    pub pause_warned: AtomicBool,
}

impl Pool {
    pub(crate) fn new(plugin: Arc<Plugin>) -> Pool {
        let n = plugin.limits.instances.max(1);
        Pool {
            plugin,
            slots: (0..n)
                .map(|_| {
                    Mutex::new(Slot {
                        inst: None,
                        generation: 0,
                        retry_at: None,
                    })
                })
                .collect(),
            next: AtomicUsize::new(0),
            live: AtomicU64::new(0),
            pause_warned: AtomicBool::new(false),
        }
    }

    /// The slot a new stream will use: round robin.
    pub(crate) fn pick(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()
    }

    pub(crate) fn lock(&self, i: usize) -> MutexGuard<'_, Slot> {
        // A panic while holding the lock cannot leave a slot half-updated in
        // a way that matters (the worst is a dropped instance), so a
        // poisoned mutex is simply taken over.
        self.slots[i % self.slots.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The slot's instance, started if there is none.
    pub(crate) fn ensure<'a>(&self, slot: &'a mut Slot) -> Result<&'a mut Instance, Failure> {
        if slot.inst.is_none() {
            if slot.retry_at.is_some_and(|t| Instant::now() < t) {
                return Err(Failure::new(
                    FailKind::Unavailable,
                    "the instance failed to start recently",
                ));
            }
            match Instance::start(&self.plugin) {
                Ok(inst) => {
                    slot.inst = Some(inst);
                    slot.generation += 1;
                    slot.retry_at = None;
                    self.plugin
                        .metrics
                        .host
                        .instances_created
                        .fetch_add(1, Ordering::Relaxed);
                    self.live.fetch_add(1, Ordering::Relaxed);
                }
                Err(f) => {
                    slot.retry_at = Some(Instant::now() + RESTART_BACKOFF);
                    tracing::warn!(
                        filter = %self.plugin.name,
                        kind = %f.kind,
                        error = %f.message,
                        "wasm filter instance failed to start"
                    );
                    return Err(f);
                }
            }
        }
        slot.inst
            .as_mut()
            .ok_or_else(|| Failure::new(FailKind::Unavailable, "no instance"))
    }

    /// Discards the slot's instance after `f`; logs once for the event.
    pub(crate) fn poison(&self, slot: &mut Slot, f: &Failure) {
        if slot.inst.take().is_some() {
            self.live.fetch_sub(1, Ordering::Relaxed);
            self.plugin
                .metrics
                .host
                .instances_poisoned
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                filter = %self.plugin.name,
                kind = %f.kind,
                error = %f.message,
                "wasm filter call failed; instance discarded"
            );
        }
    }
}
