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
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use wasmtime::{Instance as WasmInstance, Store, Trap, TypedFunc};

use super::plugin::Plugin;
use super::state::{HostState, StreamData};
use crate::callout::{CalloutError, CalloutResponse};

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
    /// The guest called `proc_exit` with this code.
    pub exit_code: Option<i32>,
}

impl Failure {
    pub(crate) fn new(kind: FailKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
            exit_code: None,
        }
    }
}

/// `proxy_on_http_call_response(context, token, headers, body, trailers)`.
type CallResponseFn = TypedFunc<(u32, u32, u32, u32, u32), ()>;

/// The guest's exported callbacks the host calls. Optional ones the guest
/// does not export behave as their defaults (continue, nothing to do).
struct Exports {
    context_create: TypedFunc<(u32, u32), ()>,
    vm_start: Option<TypedFunc<(u32, u32), u32>>,
    configure: Option<TypedFunc<(u32, u32), u32>>,
    request_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    response_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    request_body: Option<TypedFunc<(u32, u32, u32), u32>>,
    response_body: Option<TypedFunc<(u32, u32, u32), u32>>,
    request_trailers: Option<TypedFunc<(u32, u32), u32>>,
    response_trailers: Option<TypedFunc<(u32, u32), u32>>,
    http_call_response: Option<CallResponseFn>,
    grpc_close: Option<TypedFunc<(u32, u32, u32), ()>>,
    grpc_receive: Option<TypedFunc<(u32, u32, u32), ()>>,
    tick: Option<TypedFunc<u32, ()>>,
    queue_ready: Option<TypedFunc<(u32, u32), ()>>,
    done: Option<TypedFunc<u32, u32>>,
    log: Option<TypedFunc<u32, ()>>,
    delete: Option<TypedFunc<u32, ()>>,
    /// The fused entry points the loader added ([`super::shim`]): create
    /// plus request headers, and done + log + delete.
    first_request: Option<TypedFunc<(u32, u32, u32, u32), u32>>,
    end: Option<TypedFunc<u32, ()>>,
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
    /// When the root context's next tick is due (set once it asks).
    next_tick: Option<Instant>,
}

/// Does the module export body or trailer callbacks? (Modules built with
/// the Rust SDK always do.)
pub(crate) fn exports_bodies(module: &wasmtime::Module) -> bool {
    [
        "proxy_on_request_body",
        "proxy_on_response_body",
        "proxy_on_request_trailers",
        "proxy_on_response_trailers",
    ]
    .iter()
    .any(|name| module.get_export(name).is_some())
}

impl Instance {
    /// Instantiates the module and starts the root context:
    /// `_initialize`, `proxy_on_context_create(root, 0)`,
    /// `proxy_on_vm_start`, `proxy_on_configure`.
    ///
    /// A failure says what the guest logged meanwhile (its last lines at
    /// info and above), and a `proc_exit` is reported with its code.
    pub(crate) fn start(
        plugin: &Arc<Plugin>,
        slot: usize,
        generation: u64,
    ) -> Result<Instance, Failure> {
        let log = Arc::new(Mutex::new(Vec::new()));
        match Instance::start_logged(plugin, slot, generation, &log) {
            Ok(mut inst) => {
                inst.store.data_mut().start_log = None;
                Ok(inst)
            }
            Err(mut f) => {
                if let Some(code) = f.exit_code {
                    f.message = format!("the module exited during start with code {code}");
                }
                let log = log.lock().unwrap_or_else(|e| e.into_inner());
                if !log.is_empty() {
                    f.message = format!("{}; the guest logged: {}", f.message, log.join(" | "));
                }
                Err(f)
            }
        }
    }

    fn start_logged(
        plugin: &Arc<Plugin>,
        slot: usize,
        generation: u64,
        log: &Arc<Mutex<Vec<String>>>,
    ) -> Result<Instance, Failure> {
        let engine = super::engine::engine().map_err(|e| Failure::new(FailKind::Refused, e))?;
        let mut state = HostState::new(plugin.clone());
        state.start_log = Some(log.clone());
        state.slot = slot;
        state.generation = generation;
        let mut store = Store::new(engine, state);
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
            request_body: typed(&inst, &mut store, "proxy_on_request_body")?,
            response_body: typed(&inst, &mut store, "proxy_on_response_body")?,
            request_trailers: typed(&inst, &mut store, "proxy_on_request_trailers")?,
            response_trailers: typed(&inst, &mut store, "proxy_on_response_trailers")?,
            http_call_response: typed(&inst, &mut store, "proxy_on_http_call_response")?,
            grpc_close: typed(&inst, &mut store, "proxy_on_grpc_close")?,
            grpc_receive: typed(&inst, &mut store, "proxy_on_grpc_receive")?,
            tick: typed(&inst, &mut store, "proxy_on_tick")?,
            queue_ready: typed(&inst, &mut store, "proxy_on_queue_ready")?,
            done: typed(&inst, &mut store, "proxy_on_done")?,
            log: typed(&inst, &mut store, "proxy_on_log")?,
            delete: typed(&inst, &mut store, "proxy_on_delete")?,
            first_request: typed(&inst, &mut store, super::shim::FIRST_REQUEST)?,
            end: typed(&inst, &mut store, super::shim::END)?,
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
        let mut me = Instance {
            store,
            f,
            next_tick: None,
        };
        let ticks = plugin.start_ticks;
        if let Some(init) = init {
            me.call_with(ticks, 1, |s, _| init.call(s, ()))?;
        }
        me.call_with(ticks, 1, |s, f| f.context_create.call(s, (root, 0)))?;
        let vm_config_len = 0;
        let started = me.call_with(ticks, 1, |s, f| match &f.vm_start {
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
        let configured = me.call_with(ticks, 1, |s, f| match &f.configure {
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

    /// Does the module create HTTP contexts? Creates one context under the
    /// root context and deletes it again (`proxy_on_context_create`,
    /// `proxy_on_delete`: no stream callback, no `on_log`). A module whose
    /// root context has no HTTP context type (the Rust SDK panics on it)
    /// traps here: the caller discards this instance.
    pub(crate) fn probe_http_context(&mut self) -> Result<(), Failure> {
        let plugin = self.store.data().plugin.clone();
        let (root, id) = (self.store.data().root_id, plugin.next_context_id());
        self.call_with(plugin.start_ticks, 2, |s, f| {
            f.context_create.call(&mut *s, (id, root))?;
            if let Some(delete) = &f.delete {
                delete.call(&mut *s, id)?;
            }
            Ok(())
        })
    }

    /// Runs one entry into the guest that makes `callbacks` callbacks (more
    /// than one through a fused entry, [`super::shim`]) under one epoch
    /// deadline of `ticks` per callback, counting them.
    fn call_with<R>(
        &mut self,
        ticks: u64,
        callbacks: u64,
        call: impl FnOnce(&mut Store<HostState>, &Exports) -> wasmtime::Result<R>,
    ) -> Result<R, Failure> {
        self.store
            .set_epoch_deadline(ticks.saturating_mul(callbacks));
        self.store.data_mut().limiter.refused = false;
        // Two clock reads per call were a measurable part of a header-only
        // filter's cost: about one callback in CALL_TIME_SAMPLE is timed.
        // An entry is timed when its callbacks cross a multiple of the
        // sample, so one making n callbacks is timed n times as often, and
        // its time is scaled by CALL_TIME_SAMPLE / n: the total stays an
        // unbiased estimate.
        let host = &self.store.data().plugin.metrics.host;
        let before = host.calls.fetch_add(callbacks, Ordering::Relaxed);
        let timed = before % CALL_TIME_SAMPLE + callbacks > CALL_TIME_SAMPLE
            || before.is_multiple_of(CALL_TIME_SAMPLE);
        let started = timed.then(Instant::now);
        let r = call(&mut self.store, &self.f);
        if let Some(started) = started {
            let nanos = started.elapsed().as_nanos() as u64 * CALL_TIME_SAMPLE / callbacks.max(1);
            let host = &self.store.data().plugin.metrics.host;
            host.call_nanos.fetch_add(nanos, Ordering::Relaxed);
        }
        r.map_err(|e| classify(&self.store, e))
    }

    fn call<R>(
        &mut self,
        call: impl FnOnce(&mut Store<HostState>, &Exports) -> wasmtime::Result<R>,
    ) -> Result<R, Failure> {
        let ticks = self.store.data().plugin.call_ticks;
        self.call_with(ticks, 1, call)
    }

    /// Runs `call` with the stream's data in the store as the current and
    /// effective context, and takes the data back afterwards, whatever
    /// happened. A stream the guest does not know yet gets its
    /// `proxy_on_context_create(id, root)` first, in the same round trip.
    ///
    /// `callbacks` is how many guest callbacks `call` makes; the deadline
    /// covers them and the creation, if any. `call` gets the root context's
    /// id when the context is still to be created, and then creates it
    /// first: through [`create_context`], or a fused entry that does.
    fn with_stream<R>(
        &mut self,
        data: &mut Option<Box<StreamData>>,
        callbacks: u64,
        call: impl FnOnce(&mut Store<HostState>, &Exports, u32, Option<u32>) -> wasmtime::Result<R>,
    ) -> Result<R, Failure> {
        let Some(mut d) = data.take() else {
            return Err(Failure::new(FailKind::Unavailable, "stream data missing"));
        };
        let id = d.id;
        let create = !d.created;
        d.created = true;
        let root = {
            let s = self.store.data_mut();
            s.cur = Some(d);
            s.effective = id;
            s.root_id
        };
        let ticks = self.store.data().plugin.call_ticks;
        let r = self.call_with(ticks, callbacks + u64::from(create), |s, f| {
            call(s, f, id, create.then_some(root))
        });
        let s = self.store.data_mut();
        *data = s.cur.take();
        s.effective = s.root_id;
        r
    }

    /// Data for a new stream of this instance (see [`HostState::stream_data`]).
    pub(crate) fn stream_data(&mut self, id: u32, info: &crate::StreamInfo) -> Box<StreamData> {
        self.store.data_mut().stream_data(id, info)
    }

    /// Takes back an ended stream's data for reuse.
    pub(crate) fn recycle(&mut self, data: Box<StreamData>) {
        self.store.data_mut().recycle(data);
    }

    /// `proxy_on_request_headers`; returns the guest's action.
    pub(crate) fn request_headers(
        &mut self,
        data: &mut Option<Box<StreamData>>,
        count: u32,
        end_of_stream: bool,
    ) -> Result<u32, Failure> {
        let eos = u32::from(end_of_stream);
        self.with_stream(data, 1, |s, f, id, create| {
            // A stream's first callback: one entry for both calls.
            if let (Some(root), Some(fused)) = (create, &f.first_request) {
                return fused.call(s, (id, root, count, eos));
            }
            create_context(s, f, id, create)?;
            match &f.request_headers {
                Some(cb) => cb.call(s, (id, count, eos)),
                None => Ok(super::abi::action::CONTINUE),
            }
        })
    }

    /// `proxy_on_response_headers`; returns the guest's action.
    pub(crate) fn response_headers(
        &mut self,
        data: &mut Option<Box<StreamData>>,
        count: u32,
        end_of_stream: bool,
    ) -> Result<u32, Failure> {
        self.with_stream(data, 1, |s, f, id, create| {
            create_context(s, f, id, create)?;
            match &f.response_headers {
                Some(cb) => cb.call(s, (id, count, u32::from(end_of_stream))),
                None => Ok(super::abi::action::CONTINUE),
            }
        })
    }

    /// `proxy_on_request_body` / `proxy_on_response_body` with the body
    /// already in the stream data; returns the guest's action.
    pub(crate) fn body(
        &mut self,
        data: &mut Option<Box<StreamData>>,
        request: bool,
        len: u32,
        end_of_stream: bool,
    ) -> Result<u32, Failure> {
        self.with_stream(data, 1, |s, f, id, create| {
            create_context(s, f, id, create)?;
            let cb = if request {
                &f.request_body
            } else {
                &f.response_body
            };
            match cb {
                Some(cb) => cb.call(s, (id, len, u32::from(end_of_stream))),
                None => Ok(super::abi::action::CONTINUE),
            }
        })
    }

    /// `proxy_on_request_trailers` / `proxy_on_response_trailers`.
    pub(crate) fn trailers(
        &mut self,
        data: &mut Option<Box<StreamData>>,
        request: bool,
        count: u32,
    ) -> Result<u32, Failure> {
        self.with_stream(data, 1, |s, f, id, create| {
            create_context(s, f, id, create)?;
            let cb = if request {
                &f.request_trailers
            } else {
                &f.response_trailers
            };
            match cb {
                Some(cb) => cb.call(s, (id, count)),
                None => Ok(super::abi::action::CONTINUE),
            }
        })
    }

    /// `proxy_on_http_call_response` with the answer in the stream data.
    pub(crate) fn http_call_response(
        &mut self,
        data: &mut Option<Box<StreamData>>,
        token: u32,
        sizes: (u32, u32, u32),
    ) -> Result<(), Failure> {
        self.with_stream(data, 1, |s, f, id, create| {
            create_context(s, f, id, create)?;
            match &f.http_call_response {
                Some(cb) => cb.call(s, (id, token, sizes.0, sizes.1, sizes.2)),
                None => Ok(()),
            }
        })
    }

    /// `proxy_on_grpc_close(token, status)`.
    pub(crate) fn grpc_close(
        &mut self,
        data: &mut Option<Box<StreamData>>,
        token: u32,
        grpc_status: u32,
    ) -> Result<(), Failure> {
        self.with_stream(data, 1, |s, f, id, create| {
            create_context(s, f, id, create)?;
            match &f.grpc_close {
                Some(cb) => cb.call(s, (id, token, grpc_status)),
                None => Ok(()),
            }
        })
    }

    /// `proxy_on_grpc_receive(token, size)`: a unary call's answer message.
    pub(crate) fn grpc_receive(
        &mut self,
        data: &mut Option<Box<StreamData>>,
        token: u32,
        size: u32,
    ) -> Result<(), Failure> {
        self.with_stream(data, 1, |s, f, id, create| {
            create_context(s, f, id, create)?;
            match &f.grpc_receive {
                Some(cb) => cb.call(s, (id, token, size)),
                None => Ok(()),
            }
        })
    }

    /// Keeps a paused stream's data in the instance, where other contexts
    /// can reach it (`proxy_set_effective_context`).
    pub(crate) fn park(&mut self, data: Box<StreamData>) {
        self.store.data_mut().parked.insert(data.id, data);
    }

    pub(crate) fn unpark(&mut self, id: u32) -> Option<Box<StreamData>> {
        self.store.data_mut().parked.remove(&id)
    }

    /// Runs a root-context callback (tick, queue ready).
    fn root_call(
        &mut self,
        call: impl FnOnce(&mut Store<HostState>, &Exports, u32) -> wasmtime::Result<()>,
    ) -> Result<(), Failure> {
        let root = self.store.data().root_id;
        self.store.data_mut().effective = root;
        let r = self.call(|s, f| call(s, f, root));
        self.store.data_mut().effective = root;
        r
    }

    /// Delivers `proxy_on_tick` if it is due; returns how long until the
    /// next one (`None`: the guest wants no ticks).
    pub(crate) fn tick_if_due(&mut self, now: Instant) -> Result<Option<Duration>, Failure> {
        let period = self.store.data().tick_period_ms;
        if period == 0 || self.f.tick.is_none() {
            self.next_tick = None;
            return Ok(None);
        }
        let period = Duration::from_millis(u64::from(period));
        let due = *self.next_tick.get_or_insert(now + period);
        if now < due {
            return Ok(Some(due - now));
        }
        // No catching up on missed ticks: a slow guest gets fewer ticks.
        self.next_tick = Some(now + period);
        self.root_call(|s, f, root| match &f.tick {
            Some(cb) => cb.call(s, root),
            None => Ok(()),
        })?;
        Ok(Some(period))
    }

    /// Delivers a root context's callout answer through
    /// `proxy_on_http_call_response` (`proxy_on_grpc_close` never: a root
    /// context's gRPC call is refused when it is made).
    pub(crate) fn root_call_response(
        &mut self,
        token: u32,
        answer: Result<CalloutResponse, CalloutError>,
    ) -> Result<(), Failure> {
        let host = self.store.data_mut();
        host.root_calls = host.root_calls.saturating_sub(1);
        let sizes = call_response_sizes(&answer);
        host.root_call_response = Some(answer);
        let r = self.root_call(|s, f, root| match &f.http_call_response {
            Some(cb) => cb.call(s, (root, token, sizes.0, sizes.1, sizes.2)),
            None => Ok(()),
        });
        self.store.data_mut().root_call_response = None;
        r
    }

    /// Ends the root context when its instance is retired (a reload
    /// swapped the module, or the filter left the config):
    /// `proxy_on_done`, then `proxy_on_delete`, each under the call
    /// deadline. A root context answering "not yet" from `on_done` (to
    /// finish its own callouts first, then `proxy_done`) is not waited
    /// for: its instance is going away with everything it started.
    pub(crate) fn end_root(&mut self) -> Result<(), Failure> {
        self.root_call(|s, f, root| {
            if let Some(cb) = &f.done {
                cb.call(&mut *s, root)?;
            }
            if let Some(cb) = &f.delete {
                cb.call(&mut *s, root)?;
            }
            Ok(())
        })
    }

    /// Delivers `proxy_on_queue_ready` for `queue` to the root context.
    pub(crate) fn queue_ready(&mut self, queue: u32) -> Result<(), Failure> {
        self.root_call(|s, f, root| match &f.queue_ready {
            Some(cb) => cb.call(s, (root, queue)),
            None => Ok(()),
        })
    }

    /// Ends an HTTP context: `proxy_on_done`, `proxy_on_log`,
    /// `proxy_on_delete`, in that order. The first failure stops the rest.
    pub(crate) fn end_context(
        &mut self,
        data: &mut Option<Box<StreamData>>,
    ) -> Result<(), Failure> {
        // on_done's answer ("may I be deleted now?") matters for root
        // contexts only; an HTTP stream is over either way. The three run
        // in one host round trip (the stream data moves in once), under
        // one deadline for the three, and in one guest entry when the
        // module has the fused one. A context the guest never saw has
        // nothing to end.
        if data.as_ref().is_some_and(|d| !d.created) {
            return Ok(());
        }
        self.with_stream(data, 3, |s, f, id, _| {
            if let Some(end) = &f.end {
                return end.call(s, id);
            }
            if let Some(cb) = &f.done {
                cb.call(&mut *s, id)?;
            }
            if let Some(cb) = &f.log {
                cb.call(&mut *s, id)?;
            }
            if let Some(cb) = &f.delete {
                cb.call(&mut *s, id)?;
            }
            Ok(())
        })
    }
}

/// `proxy_on_context_create(id, root)` when `create` says the guest does
/// not know the context yet.
fn create_context(
    s: &mut Store<HostState>,
    f: &Exports,
    id: u32,
    create: Option<u32>,
) -> wasmtime::Result<()> {
    match create {
        Some(root) => f.context_create.call(s, (id, root)),
        None => Ok(()),
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
    let mut f = Failure::new(kind, format!("{e:#}"));
    f.exit_code = store.data().exited;
    f
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

/// `flashgate_wasm_call_seconds_total` times one guest call in this many.
const CALL_TIME_SAMPLE: u64 = 8;

/// How long a slot waits before starting an instance again after a start
/// failed.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);

/// Crash-loop backoff: after the second failure in a row (no successful
/// guest call in between), no instance is started for this long, doubling
/// with each further failure up to [`CRASH_BACKOFF_MAX`]. One stray trap
/// costs nothing; a module that traps on every request is not
/// re-instantiated on every request.
pub(crate) const CRASH_BACKOFF_BASE: Duration = Duration::from_millis(100);
pub(crate) const CRASH_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The delay after `streak` failures in a row.
pub(crate) fn crash_backoff(streak: u32) -> Option<Duration> {
    if streak < 2 {
        return None;
    }
    let doublings = (streak - 2).min(16);
    Some((CRASH_BACKOFF_BASE * (1u32 << doublings)).min(CRASH_BACKOFF_MAX))
}

pub(crate) struct Pool {
    pub plugin: Arc<Plugin>,
    slots: Box<[Mutex<Slot>]>,
    next: AtomicUsize,
    /// Instances alive now.
    pub live: AtomicU64,
    /// Failures in a row without a successful guest call between them.
    streak: AtomicU32,
    /// No new instance before this (crash-loop backoff).
    backoff_until: Mutex<Option<Instant>>,
    /// The backoff was logged for the current streak.
    backoff_logged: AtomicBool,
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
            streak: AtomicU32::new(0),
            backoff_until: Mutex::new(None),
            backoff_logged: AtomicBool::new(false),
        }
    }

    /// Makes the pool and starts its ticker thread.
    pub(crate) fn start(plugin: Arc<Plugin>) -> Arc<Pool> {
        let signals = plugin.signals.clone();
        let pool = Arc::new(Pool::new(plugin));
        super::ticker::spawn(Arc::downgrade(&pool), signals);
        pool
    }

    /// A guest call succeeded: the module is not crash-looping.
    pub(crate) fn succeeded(&self) {
        if self.streak.load(Ordering::Relaxed) != 0 {
            self.streak.store(0, Ordering::Relaxed);
            self.backoff_logged.store(false, Ordering::Relaxed);
        }
    }

    /// Delivers queue-ready events and due ticks to every live instance;
    /// returns how long the ticker may sleep.
    pub(crate) fn service(&self, mut events: super::ticker::Events) -> Duration {
        let mut next = super::ticker::IDLE;
        for i in 0..self.slots.len() {
            let mut slot = self.lock(i);
            let generation = slot.generation;
            let Some(inst) = slot.inst.as_mut() else {
                continue;
            };
            let mut r = Ok(None);
            for &(s, g, queue) in &events.queue_ready {
                if s == i && g == generation {
                    if let Err(f) = inst.queue_ready(queue) {
                        r = Err(f);
                        break;
                    }
                }
            }
            // Answers for an instance that is gone (poisoned, replaced)
            // are dropped with it: its root context is gone too.
            let mut k = 0;
            while r.is_ok() && k < events.calls_done.len() {
                let (s, g, _, _) = &events.calls_done[k];
                if *s == i && *g == generation {
                    let (_, _, token, answer) = events.calls_done.swap_remove(k);
                    r = inst.root_call_response(token, answer).map(|()| None);
                } else {
                    k += 1;
                }
            }
            if r.is_ok() {
                r = inst.tick_if_due(Instant::now());
            }
            match r {
                Ok(Some(wait)) => next = next.min(wait),
                Ok(None) => {}
                Err(f) => self.poison(&mut slot, &f),
            }
        }
        next
    }

    /// The slot a new stream will use: round robin.
    pub(crate) fn pick(&self) -> usize {
        // One instance (the default) needs no round robin: no atomic
        // add per stream.
        if self.slots.len() == 1 {
            return 0;
        }
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
    pub(crate) fn ensure<'a>(
        &self,
        index: usize,
        slot: &'a mut Slot,
    ) -> Result<&'a mut Instance, Failure> {
        if slot.inst.is_none() {
            if slot.retry_at.is_some_and(|t| Instant::now() < t) {
                return Err(Failure::new(
                    FailKind::Unavailable,
                    "the instance failed to start recently",
                ));
            }
            let backoff = *self.backoff_until.lock().unwrap_or_else(|e| e.into_inner());
            if backoff.is_some_and(|t| Instant::now() < t) {
                self.plugin
                    .metrics
                    .host
                    .backed_off
                    .fetch_add(1, Ordering::Relaxed);
                return Err(Failure::new(
                    FailKind::Unavailable,
                    "the module keeps failing; new instances are backed off",
                ));
            }
            match Instance::start(&self.plugin, index, slot.generation + 1) {
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

    /// Drops the slot's instance without counting a failure (the load-time
    /// probe's instance, see [`Instance::probe_http_context`]).
    pub(crate) fn discard(&self, slot: &mut Slot) {
        if slot.inst.take().is_some() {
            self.live.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Discards the slot's instance after `f`; logs once for the event.
    /// Failures in a row start the crash-loop backoff.
    pub(crate) fn poison(&self, slot: &mut Slot, f: &Failure) {
        if slot.inst.take().is_some() {
            let streak = self.streak.fetch_add(1, Ordering::Relaxed) + 1;
            if let Some(delay) = crash_backoff(streak) {
                *self.backoff_until.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Instant::now() + delay);
                if !self.backoff_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        filter = %self.plugin.name,
                        failures = streak,
                        "wasm filter keeps failing; backing off new instances (fail mode applies meanwhile)"
                    );
                }
            }
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

impl Drop for Pool {
    fn drop(&mut self) {
        // The last stream of a replaced module ended (streams hold their
        // pool): its root contexts end here, on that stream's thread, each
        // call bounded by the deadline.
        for i in 0..self.slots.len() {
            let inst = self.lock(i).inst.take();
            if let Some(mut inst) = inst {
                if let Err(f) = inst.end_root() {
                    tracing::debug!(filter = %self.plugin.name, kind = %f.kind, error = %f.message, "wasm root context failed to end");
                }
                self.live.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// The sizes `proxy_on_http_call_response` announces: header count (with
/// `:status`), body bytes, trailer count; zeros for a call without an
/// answer.
pub(crate) fn call_response_sizes(
    answer: &Result<CalloutResponse, CalloutError>,
) -> (u32, u32, u32) {
    match answer {
        Ok(r) => (
            (r.headers.len() + 1) as u32,
            r.body.len() as u32,
            r.trailers.len() as u32,
        ),
        Err(_) => (0, 0, 0),
    }
}
