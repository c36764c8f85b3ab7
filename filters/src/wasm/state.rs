//! What a store carries: the host state the host functions reach through
//! `Caller<'_, HostState>`, and the per-stream data that is moved into the
//! store for the length of one guest call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version};
use wasmtime::{Caller, Memory, ResourceLimiter, TypedFunc};

use super::abi::status;
use super::plugin::Plugin;
use crate::callout::{CalloutError, CalloutFuture, CalloutResponse};
use crate::{LocalResponse, StreamInfo};

/// One direction's header map as the host keeps it for a stream.
///
/// During its own phase it is the head's live map, moved in for the guest
/// call and moved back out after it ([`Headers::take_back`]). From then on
/// the host keeps a read-only copy (the response phase and `on_log` may
/// still read request headers): the names and values copied back to back
/// into one buffer, which costs a few short copies instead of a
/// `HeaderMap` clone (allocations, a reference count per name and value)
/// and is reused by the next stream of the instance. A later write, which
/// no longer reaches the stream, first turns the copy back into a map.
#[derive(Default)]
pub(crate) struct Headers {
    map: HeaderMap,
    /// The copy: names and values back to back, in the map's order ...
    bytes: Vec<u8>,
    /// ... and where each entry's name and value end in `bytes`.
    ends: Vec<(usize, usize)>,
    /// The copy holds the content (else `map` does).
    copied: bool,
}

/// A copy's buffers larger than these are not kept for the next stream.
const KEEP_BYTES: usize = 16 << 10;
const KEEP_ENTRIES: usize = 128;

impl Headers {
    /// Moves the head's map `src` in as the live content (leaving an empty
    /// map behind: swapped, so no map is built or dropped).
    pub(crate) fn set_live(&mut self, src: &mut HeaderMap) {
        if !self.map.is_empty() {
            self.map = HeaderMap::new();
        }
        std::mem::swap(&mut self.map, src);
        self.copied = false;
    }

    /// Moves the live content back into the head's `dst` and keeps a copy.
    /// A copy nobody wrote to since it was taken is what `dst` holds
    /// already (nothing else touches the head while the filter has it), so
    /// then there is nothing to do.
    pub(crate) fn take_back(&mut self, dst: &mut HeaderMap) {
        if self.copied {
            return;
        }
        if !dst.is_empty() {
            *dst = HeaderMap::new();
        }
        std::mem::swap(&mut self.map, dst);
        self.bytes.clear();
        self.ends.clear();
        self.ends.reserve(dst.len());
        for (k, v) in dst.iter() {
            self.bytes.extend_from_slice(k.as_str().as_bytes());
            let name_end = self.bytes.len();
            self.bytes.extend_from_slice(v.as_bytes());
            self.ends.push((name_end, self.bytes.len()));
        }
        self.copied = true;
    }

    pub(crate) fn view(&self) -> HeadersRef<'_> {
        if self.copied {
            HeadersRef::Copy(&self.bytes, &self.ends)
        } else {
            HeadersRef::Map(&self.map)
        }
    }

    /// The content as a map, for a write.
    pub(crate) fn map_mut(&mut self) -> &mut HeaderMap {
        if self.copied {
            let mut map = HeaderMap::with_capacity(self.ends.len());
            for (k, v) in HeadersRef::Copy(&self.bytes, &self.ends).iter() {
                // They came out of a map: they parse.
                if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k), HeaderValue::from_bytes(v)) {
                    map.append(k, v);
                }
            }
            self.map = map;
            self.copied = false;
        }
        &mut self.map
    }

    /// Empties it for another stream, keeping the copy's buffers.
    fn clear(&mut self) {
        if self.map.capacity() != 0 {
            self.map = HeaderMap::new();
        }
        if self.bytes.capacity() > KEEP_BYTES || self.ends.capacity() > KEEP_ENTRIES {
            self.bytes = Vec::new();
            self.ends = Vec::new();
        } else {
            self.bytes.clear();
            self.ends.clear();
        }
        self.copied = false;
    }
}

/// Read access to [`Headers`], whichever form they are in: names and
/// values as bytes.
#[derive(Clone, Copy)]
pub(crate) enum HeadersRef<'a> {
    Map(&'a HeaderMap),
    Copy(&'a [u8], &'a [(usize, usize)]),
}

impl<'a> HeadersRef<'a> {
    /// Every (name, value) in the map's order.
    pub(crate) fn iter(self) -> HeadersIter<'a> {
        match self {
            HeadersRef::Map(m) => HeadersIter::Map(m.iter()),
            HeadersRef::Copy(bytes, ends) => HeadersIter::Copy {
                bytes,
                ends: ends.iter(),
                start: 0,
            },
        }
    }

    /// The values of `name` (lower case), in order.
    pub(crate) fn get_all(self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        let (from_map, from_copy) = match self {
            HeadersRef::Map(m) => (
                Some(m.get_all(name).into_iter().map(|v| v.as_bytes())),
                None,
            ),
            HeadersRef::Copy(..) => (
                None,
                Some(
                    self.iter()
                        .filter(move |(k, _)| *k == name.as_bytes())
                        .map(|(_, v)| v),
                ),
            ),
        };
        from_map
            .into_iter()
            .flatten()
            .chain(from_copy.into_iter().flatten())
    }

    /// The first value of `name` (lower case).
    pub(crate) fn get(self, name: &'a str) -> Option<&'a [u8]> {
        self.get_all(name).next()
    }
}

pub(crate) enum HeadersIter<'a> {
    Map(http::header::Iter<'a, HeaderValue>),
    Copy {
        bytes: &'a [u8],
        ends: std::slice::Iter<'a, (usize, usize)>,
        start: usize,
    },
}

impl<'a> Iterator for HeadersIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            HeadersIter::Map(i) => i.next().map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes())),
            HeadersIter::Copy { bytes, ends, start } => {
                let &(name_end, value_end) = ends.next()?;
                let name = bytes.get(*start..name_end)?;
                let value = bytes.get(name_end..value_end)?;
                *start = value_end;
                Some((name, value))
            }
        }
    }
}

/// The request head: live during the request phase, a copy after it.
#[derive(Default)]
pub(crate) struct ReqHead {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: Headers,
}

/// The response head: live during the response phase, a copy after it.
#[derive(Default)]
pub(crate) struct RespHead {
    pub status: StatusCode,
    pub headers: Headers,
}

/// One HTTP context's host-side data. Lives in the stream between calls;
/// when the stream ends it goes back to its instance for the next stream
/// ([`StreamData::reset`]), so a request allocates none of it.
pub(crate) struct StreamData {
    pub id: u32,
    /// `proxy_on_context_create` ran for `id` (it runs with the stream's
    /// first callback, in the same host round trip).
    pub created: bool,
    pub info: StreamInfo,
    /// The request head, once the request phase began (`has_req`).
    pub req: ReqHead,
    pub has_req: bool,
    /// The response head, once the response phase began (`has_resp`).
    pub resp: RespHead,
    pub has_resp: bool,
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
    /// Tokens among `calls` that are gRPC calls.
    pub grpc_calls: Vec<u32>,
    /// The gRPC answer being delivered (`proxy_on_grpc_receive/close`).
    pub grpc_answer: Option<super::grpc::GrpcAnswer>,
}

impl StreamData {
    pub(crate) fn new(id: u32, info: StreamInfo) -> StreamData {
        StreamData {
            id,
            created: false,
            info,
            req: ReqHead::default(),
            has_req: false,
            resp: RespHead::default(),
            has_resp: false,
            props: HashMap::new(),
            local: None,
            reset: false,
            continued: false,
            wake: None,
            body: None,
            trailers: None,
            calls: Vec::new(),
            call_response: None,
            grpc_calls: Vec::new(),
            grpc_answer: None,
        }
    }

    /// The request head, if the request phase began.
    pub(crate) fn req(&self) -> Option<&ReqHead> {
        self.has_req.then_some(&self.req)
    }

    pub(crate) fn resp(&self) -> Option<&RespHead> {
        self.has_resp.then_some(&self.resp)
    }

    /// Empties ended data for a later stream: everything as
    /// [`StreamData::new`] leaves it (but the id and info, which the next
    /// stream sets), keeping allocations worth keeping. Drops every
    /// reference into the ended stream's buffers.
    pub(crate) fn clear(&mut self) {
        self.created = false;
        self.req.method = Method::GET;
        self.req.uri = Uri::default();
        self.req.version = Version::default();
        self.req.headers.clear();
        self.has_req = false;
        self.resp.status = StatusCode::OK;
        self.resp.headers.clear();
        self.has_resp = false;
        if self.props.capacity() > 16 {
            self.props = HashMap::new();
        } else {
            self.props.clear();
        }
        self.local = None;
        self.reset = false;
        self.continued = false;
        self.wake = None;
        self.body = None;
        self.trailers = None;
        self.calls.clear();
        self.call_response = None;
        self.grpc_calls.clear();
        self.grpc_answer = None;
    }
}

/// Brings `dst` up to date with `src` without touching what did not
/// change: a stream's route and request id stay the same, so their
/// reference counts are left alone.
pub(crate) fn refresh_info(dst: &mut StreamInfo, src: &StreamInfo) {
    dst.client_ip = src.client_ip;
    dst.priority = src.priority;
    dst.load_level = src.load_level;
    dst.bot_score = src.bot_score;
    if dst.ja4 != src.ja4 {
        dst.ja4 = src.ja4.clone();
    }
    dst.end_of_stream = src.end_of_stream;
    if !Arc::ptr_eq(&dst.route, &src.route) {
        dst.route = src.route.clone();
    }
    // The same value (a clone of the gateway's) unless a caller passes
    // another: compare where the bytes live before the bytes themselves.
    let (a, b) = (dst.request_id.as_bytes(), src.request_id.as_bytes());
    if !std::ptr::eq(a, b) && a != b {
        dst.request_id = src.request_id.clone();
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
    /// While the instance starts: the guest's log lines, so that a failed
    /// start can say what the guest said about it.
    pub start_log: Option<Arc<Mutex<Vec<String>>>>,
    /// Callouts the root context started that have not answered yet.
    pub root_calls: u32,
    /// The answer being delivered to the root context by
    /// `proxy_on_http_call_response`.
    pub root_call_response: Option<Result<CalloutResponse, CalloutError>>,
    /// Data of ended streams, kept for the next ones. Boxed: a stream
    /// holds its data as a `Box` between calls, and taking one from here
    /// or giving it back moves a pointer, not the data.
    #[allow(clippy::vec_box)]
    spare: Vec<Box<StreamData>>,
    /// Header names the guest set values of, parsed once, with the values
    /// it set last (`proxy_{add,replace}_header_map_value`).
    pub names: Vec<KnownName>,
}

/// A header name the guest used, and the value it set under it last.
///
/// A filter usually sets the same few headers to the same values on every
/// request: a value seen twice in a row is kept as a `HeaderValue`, and
/// from then on setting it again costs a reference count instead of an
/// allocation and a copy. A value that changes every time costs a copy
/// into `last`, which does not allocate once it is large enough.
pub(crate) struct KnownName {
    pub name: HeaderName,
    pub last: Vec<u8>,
    pub value: Option<HeaderValue>,
}

/// Values longer than this are not remembered.
pub(crate) const KNOWN_VALUE_MAX: usize = 256;

/// Ended streams' data an instance keeps for reuse.
const SPARE_STREAMS: usize = 32;
/// Distinct header names an instance remembers.
pub(crate) const KNOWN_NAMES: usize = 32;

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
            root_calls: 0,
            root_call_response: None,
            start_log: None,
            spare: Vec::new(),
            names: Vec::new(),
        }
    }

    /// Data for a new stream: an ended stream's, or fresh.
    pub(crate) fn stream_data(&mut self, id: u32, info: &StreamInfo) -> Box<StreamData> {
        match self.spare.pop() {
            Some(mut d) => {
                d.id = id;
                refresh_info(&mut d.info, info);
                d
            }
            None => Box::new(StreamData::new(id, info.clone())),
        }
    }

    /// Keeps an ended stream's data for a later stream.
    pub(crate) fn recycle(&mut self, mut data: Box<StreamData>) {
        if self.spare.len() < SPARE_STREAMS {
            data.clear();
            self.spare.push(data);
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

    /// The callout answer being delivered to the effective context.
    pub(crate) fn call_response(&mut self) -> Option<&mut Result<CalloutResponse, CalloutError>> {
        if self.effective == self.root_id {
            return self.root_call_response.as_mut();
        }
        self.stream()?.call_response.as_mut()
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

/// Most guest log lines a failed start reports, and bytes of each.
const START_LOG_LINES: usize = 8;
const START_LOG_LINE: usize = 512;

impl HostState {
    /// Keeps a guest log line written while the instance starts (info
    /// and above, stdout and stderr): the last few are shown when the
    /// start fails.
    pub(crate) fn note_start_log(&mut self, level: &str, line: &str) {
        let Some(log) = &self.start_log else {
            return;
        };
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() == START_LOG_LINES {
            log.remove(0);
        }
        let mut line = line.to_string();
        if line.len() > START_LOG_LINE {
            let mut cut = START_LOG_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        log.push(format!("[{level}] {line}"));
    }
}
