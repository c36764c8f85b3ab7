//! What a store carries: the host state the host functions reach through
//! `Caller<'_, HostState>`, and the per-stream data that is moved into the
//! store for the length of one guest call.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri, Version};
use wasmtime::{Caller, Memory, ResourceLimiter, TypedFunc};

use super::abi::status;
use super::plugin::Plugin;
use crate::callout::{CalloutError, CalloutFuture, CalloutResponse};
use crate::{LocalResponse, StreamInfo};

/// The request head while a Wasm filter works on it (moved out of the
/// request's `Parts` for the call and moved back after), and a copy of it
/// afterwards so the response phase can still read request headers.
#[derive(Clone)]
pub(crate) struct ReqHead {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
}

/// The response head during the response phase.
pub(crate) struct RespHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

/// One HTTP context's host-side data. Lives in the stream between calls.
pub(crate) struct StreamData {
    pub id: u32,
    pub info: StreamInfo,
    pub req: Option<ReqHead>,
    pub resp: Option<RespHead>,
    /// Properties the guest set with `proxy_set_property`.
    pub props: HashMap<Vec<u8>, Vec<u8>>,
    /// A local response the guest asked for during the current phase.
    pub local: Option<LocalResponse>,
    /// The guest reset the stream (`proxy_close_stream`).
    pub reset: bool,
    /// The guest resumed the stream (`proxy_continue_stream`), from one of
    /// its own callbacks or through `proxy_set_effective_context`.
    pub continued: bool,
    /// Wakes the stream while it is paused without a callout to wait for.
    pub wake: Option<Arc<tokio::sync::Notify>>,
    /// The body buffer of the current body callback: its `BufferType` and
    /// bytes (`proxy_get/set_buffer_bytes`).
    pub body: Option<(u32, Bytes)>,
    /// The trailers of the current trailer callback: `MapType` and map.
    pub trailers: Option<(u32, HeaderMap)>,
    /// Callouts the guest started and the stream has not waited for yet.
    pub calls: Vec<(u32, CalloutFuture)>,
    /// The answer being delivered by `proxy_on_http_call_response`.
    pub call_response: Option<Result<CalloutResponse, CalloutError>>,
}

impl StreamData {
    pub(crate) fn new(id: u32, info: StreamInfo) -> StreamData {
        StreamData {
            id,
            info,
            req: None,
            resp: None,
            props: HashMap::new(),
            local: None,
            reset: false,
            continued: false,
            wake: None,
            body: None,
            trailers: None,
            calls: Vec::new(),
            call_response: None,
        }
    }
}

/// Bounds a store's memory and tables and remembers whether it refused a
/// growth, so that the following trap can be told apart as out-of-memory.
pub(crate) struct Limiter {
    pub memory: usize,
    pub table_elements: usize,
    pub refused: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.memory && maximum.is_none_or(|m| desired <= m);
        if !ok {
            self.refused = true;
        }
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.table_elements && maximum.is_none_or(|m| desired <= m);
        if !ok {
            self.refused = true;
        }
        Ok(ok)
    }

    fn instances(&self) -> usize {
        1
    }
    fn memories(&self) -> usize {
        1
    }
    fn tables(&self) -> usize {
        8
    }
}

/// The data of a store (one instance of a module).
pub(crate) struct HostState {
    pub plugin: Arc<Plugin>,
    pub limiter: Limiter,
    pub memory: Option<Memory>,
    /// `proxy_on_memory_allocate` (or `malloc`): how the host hands the
    /// guest buffers it owns.
    pub alloc: Option<TypedFunc<u32, u32>>,
    pub root_id: u32,
    /// The HTTP context of the current call, if the call is for a stream.
    pub cur: Option<Box<StreamData>>,
    /// The context the guest's host calls act on (`proxy_set_effective_context`).
    pub effective: u32,
    /// Properties set by the root context.
    pub root_props: HashMap<Vec<u8>, Vec<u8>>,
    /// `proxy_set_tick_period_milliseconds`: the root context's tick
    /// period (0 = no ticks), delivered by the pool's ticker thread.
    pub tick_period_ms: u32,
    /// HTTP contexts of this instance that are paused: their data lives
    /// here while they wait, so that another context (a tick, a queue) can
    /// reach them through `proxy_set_effective_context`.
    pub parked: HashMap<u32, Box<StreamData>>,
    /// Where this instance lives in its pool (for queue-ready delivery).
    pub slot: usize,
    pub generation: u64,
    /// `proxy_exit` / WASI `proc_exit` was called.
    pub exited: Option<i32>,
}

impl HostState {
    pub(crate) fn new(plugin: Arc<Plugin>) -> HostState {
        HostState {
            limiter: Limiter {
                memory: plugin.limits.memory,
                table_elements: 100_000,
                refused: false,
            },
            plugin,
            memory: None,
            alloc: None,
            root_id: 0,
            cur: None,
            effective: 0,
            root_props: HashMap::new(),
            tick_period_ms: 0,
            parked: HashMap::new(),
            slot: 0,
            generation: 0,
            exited: None,
        }
    }

    /// The stream the host call acts on, if the effective context is one.
    pub(crate) fn stream(&mut self) -> Option<&mut StreamData> {
        let eff = self.effective;
        if self.cur.as_ref().is_some_and(|s| s.id == eff) {
            return self.cur.as_deref_mut();
        }
        self.parked.get_mut(&eff).map(|s| &mut **s)
    }

    /// Is `id` a context the guest may make effective now?
    pub(crate) fn knows(&self, id: u32) -> bool {
        id == self.root_id
            || self.cur.as_ref().is_some_and(|c| c.id == id)
            || self.parked.contains_key(&id)
    }
}

/// A host function's failure: a status for the guest, or a trap that ends
/// the guest call (only when calling back into the guest trapped).
pub(crate) enum HostErr {
    Status(u32),
    Trap(wasmtime::Error),
}

impl From<u32> for HostErr {
    fn from(s: u32) -> HostErr {
        HostErr::Status(s)
    }
}

pub(crate) type HostResult<T = ()> = Result<T, HostErr>;

/// Converts a host function's result into what wasmtime expects: a status
/// for the guest, or an error that traps the call.
pub(crate) fn finish(r: HostResult) -> wasmtime::Result<u32> {
    match r {
        Ok(()) => Ok(status::OK),
        Err(HostErr::Status(s)) => Ok(s),
        Err(HostErr::Trap(e)) => Err(e),
    }
}

/// Largest single read from guest memory (a header value, a body chunk, a
/// log line): far above anything legitimate, small enough to be harmless.
const MAX_READ: usize = 16 << 20;

/// Copies `len` bytes at `ptr` out of the guest's memory.
pub(crate) fn read(caller: &mut Caller<'_, HostState>, ptr: u32, len: u32) -> HostResult<Vec<u8>> {
    let len = len as usize;
    if len == 0 {
        return Ok(Vec::new());
    }
    if len > MAX_READ {
        return Err(status::BAD_ARGUMENT.into());
    }
    let mem = caller.data().memory.ok_or(status::INTERNAL_FAILURE)?;
    let data = mem.data(&caller);
    let start = ptr as usize;
    let bytes = start
        .checked_add(len)
        .and_then(|end| data.get(start..end))
        .ok_or(status::BAD_ARGUMENT)?;
    Ok(bytes.to_vec())
}

/// Writes `bytes` at `ptr` into the guest's memory.
pub(crate) fn write(caller: &mut Caller<'_, HostState>, ptr: u32, bytes: &[u8]) -> HostResult {
    let mem = caller.data().memory.ok_or(status::INTERNAL_FAILURE)?;
    let data = mem.data_mut(caller);
    let start = ptr as usize;
    let slot = start
        .checked_add(bytes.len())
        .and_then(|end| data.get_mut(start..end))
        .ok_or(status::BAD_ARGUMENT)?;
    slot.copy_from_slice(bytes);
    Ok(())
}

pub(crate) fn write_u32(caller: &mut Caller<'_, HostState>, ptr: u32, v: u32) -> HostResult {
    write(caller, ptr, &v.to_le_bytes())
}

pub(crate) fn write_u64(caller: &mut Caller<'_, HostState>, ptr: u32, v: u64) -> HostResult {
    write(caller, ptr, &v.to_le_bytes())
}

/// Hands `bytes` to the guest: allocates a buffer with the guest's own
/// allocator, copies the bytes in, and stores pointer and size at the
/// guest's return slots. An empty value is a null pointer and size 0.
pub(crate) fn give(
    caller: &mut Caller<'_, HostState>,
    bytes: &[u8],
    ptr_slot: u32,
    size_slot: u32,
) -> HostResult {
    // Check the slots first so a bad pointer costs no allocation.
    if bytes.is_empty() {
        write_u32(caller, ptr_slot, 0)?;
        return write_u32(caller, size_slot, 0);
    }
    let len = u32::try_from(bytes.len()).map_err(|_| status::INTERNAL_FAILURE)?;
    let alloc = caller
        .data()
        .alloc
        .clone()
        .ok_or(status::INTERNAL_FAILURE)?;
    let ptr = alloc.call(&mut *caller, len).map_err(HostErr::Trap)?;
    if ptr == 0 {
        return Err(status::INTERNAL_FAILURE.into());
    }
    write(caller, ptr, bytes)?;
    write_u32(caller, ptr_slot, ptr)?;
    write_u32(caller, size_slot, len)
}
