//! The per-request side of a Wasm filter: one proxy-wasm HTTP context per
//! stream, mapped onto [`StreamFilter`].
//!
//! Pausing: when a header callback returns `Pause` (and the guest did not
//! answer or resume in the same call), the stream's data is parked in its
//! instance and the chain waits on a [`Pending`](crate::Pending):
//! - for the first callout the guest started, if any; on resume the
//!   answer goes to `proxy_on_http_call_response`, and the stream goes on
//!   if the guest called `proxy_continue_stream` there;
//! - otherwise until another context of the instance (a tick, a queue, a
//!   callout answer of another stream) resumes or closes it through
//!   `proxy_set_effective_context` + `proxy_continue_stream`.
//!
//! A paused stream waits as long as its client does; a client abort drops
//! the wait and ends the context.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http::HeaderMap;

use super::abi::{action, buffer, map};
use super::instance::{FailKind, Failure, Pool, Slot};
use super::state::{refresh_info, StreamData};
use crate::callout::{CalloutError, CalloutResponse};

use crate::{
    BodyFlow, FailMode, Flow, LocalResponse, Refusal, StreamFilter, StreamInfo, StreamReset,
};

/// The guest's `Pause` action.
const PAUSE: u32 = 1;

type CallResult = (u32, Result<CalloutResponse, CalloutError>);

/// What a paused stream waits for.
enum Wait {
    /// A callout; the answer lands here.
    Call(Arc<Mutex<Option<CallResult>>>),
    /// A `proxy_continue_stream` / `proxy_close_stream` from elsewhere.
    Wake,
}

pub(crate) struct WasmStream {
    pool: Arc<Pool>,
    /// Apart from the pool, so that a phase borrows the pool while it
    /// changes the state (no `Arc` clone, two atomic operations, per
    /// phase).
    st: State,
}

struct State {
    /// The pool slot this stream's context lives in, once it has one.
    slot: Option<usize>,
    /// The slot generation the context was created in; 0 = no context yet.
    generation: u64,
    /// The context id (0 until created).
    id: u32,
    /// The stream's data between calls (`None` while parked).
    data: Option<Box<StreamData>>,
    /// Set while paused.
    wait: Option<Wait>,
    /// The context is gone (its instance failed): the guest is not called
    /// again for this stream.
    lost: bool,
    /// The filter's fail mode was applied to this stream already: a
    /// later phase lets it go on (a fail-closed answer goes back through
    /// this filter's response phase, which must not fail it again).
    failed: bool,
    ended: bool,
}

impl WasmStream {
    pub(crate) fn new(pool: Arc<Pool>) -> WasmStream {
        WasmStream {
            pool,
            st: State {
                slot: None,
                generation: 0,
                id: 0,
                data: None,
                wait: None,
                lost: false,
                failed: false,
                ended: false,
            },
        }
    }
}

impl State {
    /// Locks this stream's slot, creating the HTTP context first if the
    /// stream has none yet, and takes back its data if it was parked.
    fn enter<'p>(
        &mut self,
        pool: &'p Pool,
        info: &StreamInfo,
    ) -> Result<MutexGuard<'p, Slot>, Failure> {
        if self.lost {
            return Err(Failure::new(
                FailKind::Unavailable,
                "the stream's context is gone",
            ));
        }
        let slot_index = *self.slot.get_or_insert_with(|| pool.pick());
        let mut slot = pool.lock(slot_index);
        if self.generation == 0 {
            let inst = match pool.ensure(slot_index, &mut slot) {
                Ok(inst) => inst,
                Err(f) => {
                    self.lost = true;
                    return Err(f);
                }
            };
            // The guest learns of the context with the stream's first
            // callback (`StreamData::created`).
            self.id = pool.plugin.next_context_id();
            self.data = Some(inst.stream_data(self.id, info));
            self.generation = slot.generation;
            // Fresh data: its info is current and nothing waits on it.
            return Ok(slot);
        } else if slot.generation != self.generation || slot.inst.is_none() {
            self.lost = true;
            return Err(Failure::new(
                FailKind::Unavailable,
                "the stream's instance was discarded",
            ));
        }
        if self.data.is_none() {
            self.data = slot.inst.as_mut().and_then(|i| i.unpark(self.id));
        }
        match self.data.as_mut() {
            Some(d) => {
                // Load level and the like may have changed since the last
                // phase.
                refresh_info(&mut d.info, info);
                d.wake = None;
            }
            None => {
                self.lost = true;
                return Err(Failure::new(
                    FailKind::Unavailable,
                    "the stream's context data is gone",
                ));
            }
        }
        Ok(slot)
    }

    /// Starts a phase: a fresh slate for the guest's per-phase requests.
    fn begin_phase(&mut self) {
        if let Some(d) = self.data.as_mut() {
            d.local = None;
            d.reset = false;
            d.continued = false;
        }
    }

    /// After a failed call: poison the instance if the guest misbehaved.
    fn failed(&mut self, pool: &Pool, slot: &mut Slot, f: &Failure) {
        if matches!(
            f.kind,
            FailKind::Timeout | FailKind::OutOfMemory | FailKind::Trap
        ) {
            pool.poison(slot, f);
            self.lost = true;
        }
    }

    /// Turns a header-phase guest call's result into the stream's next
    /// step; a pause parks the stream's data in the instance before the
    /// slot is released.
    fn settle(
        &mut self,
        pool: &Pool,
        mut slot: MutexGuard<'_, Slot>,
        r: Result<u32, Failure>,
    ) -> Flow {
        let action_code = match r {
            Ok(a) => a,
            Err(f) => {
                self.failed(pool, &mut slot, &f);
                drop(slot);
                return self.fail(pool, f);
            }
        };
        pool.succeeded();
        let Some(d) = self.data.as_mut() else {
            return Flow::Continue;
        };
        // A reset wins over a local response asked for in the same call:
        // the stream is gone.
        if d.reset {
            return Flow::Reset;
        }
        if let Some(local) = d.local.take() {
            return Flow::Respond(local);
        }
        if action_code == action::CONTINUE || d.continued {
            d.continued = false;
            return Flow::Continue;
        }
        self.pause(pool, slot)
    }

    /// Parks the stream's data in its instance and returns what the chain
    /// waits on.
    fn pause(&mut self, pool: &Pool, mut slot: MutexGuard<'_, Slot>) -> Flow {
        let (Some(mut d), Some(inst)) = (self.data.take(), slot.inst.as_mut()) else {
            drop(slot);
            return self.fail(pool, Failure::new(FailKind::Unavailable, "no instance"));
        };
        let pending: crate::Pending = if d.calls.is_empty() {
            let notify = Arc::new(tokio::sync::Notify::new());
            d.wake = Some(notify.clone());
            self.wait = Some(Wait::Wake);
            Box::pin(async move { notify.notified().await })
        } else {
            let (token, call) = d.calls.remove(0);
            let cell = Arc::new(Mutex::new(None));
            let landed = cell.clone();
            self.wait = Some(Wait::Call(cell));
            Box::pin(async move {
                let answer = call.await;
                *landed.lock().unwrap_or_else(|e| e.into_inner()) = Some((token, answer));
            })
        };
        inst.park(d);
        drop(slot);
        Flow::Pause(pending)
    }

    /// Resumes a paused header phase: delivers the callout's answer, or
    /// looks at what woke the stream.
    fn resume(&mut self, pool: &Pool, info: &StreamInfo) -> Flow {
        let wait = self.wait.take();
        let mut slot = match self.enter(pool, info) {
            Ok(slot) => slot,
            Err(f) => return self.fail(pool, f),
        };
        let answer = match wait {
            Some(Wait::Call(cell)) => cell.lock().unwrap_or_else(|e| e.into_inner()).take(),
            _ => None,
        };
        let Some((token, answer)) = answer else {
            // Woken by a continue or close from another context.
            return self.settle(pool, slot, Ok(PAUSE));
        };
        self.begin_phase();
        let grpc = self.data.as_mut().and_then(|d| {
            let at = d.grpc_calls.iter().position(|t| *t == token)?;
            d.grpc_calls.swap_remove(at);
            Some(super::grpc::answer(&answer))
        });
        let r = match (slot.inst.as_mut(), grpc) {
            (None, _) => Err(Failure::new(FailKind::Unavailable, "no instance")),
            (Some(inst), Some(g)) => {
                let (status, size) = (g.status, g.body.len() as u32);
                if let Some(d) = self.data.as_mut() {
                    d.grpc_answer = Some(g);
                }
                let r = if status == super::grpc::code::OK {
                    inst.grpc_receive(&mut self.data, token, size)
                } else {
                    inst.grpc_close(&mut self.data, token, status)
                };
                if let Some(d) = self.data.as_mut() {
                    d.grpc_answer = None;
                }
                r
            }
            (Some(inst), None) => {
                let sizes = super::instance::call_response_sizes(&answer);
                if let Some(d) = self.data.as_mut() {
                    d.call_response = Some(answer);
                }
                let r = inst.http_call_response(&mut self.data, token, sizes);
                if let Some(d) = self.data.as_mut() {
                    d.call_response = None;
                }
                r
            }
        };
        self.settle(pool, slot, r.map(|()| PAUSE))
    }

    /// What the stream does when the filter failed: skip the filter (open)
    /// or answer 500 (closed).
    fn fail(&mut self, pool: &Pool, f: Failure) -> Flow {
        if std::mem::replace(&mut self.failed, true) {
            return Flow::Continue;
        }
        let plugin = &pool.plugin;
        tracing::debug!(filter = %plugin.name, kind = %f.kind, error = %f.message, "wasm filter failed for this stream");
        match plugin.fail {
            FailMode::Open => {
                plugin
                    .metrics
                    .host
                    .failed_open
                    .fetch_add(1, Ordering::Relaxed);
                Flow::Continue
            }
            FailMode::Closed => {
                plugin
                    .metrics
                    .host
                    .failed_closed
                    .fetch_add(1, Ordering::Relaxed);
                Flow::Respond(LocalResponse::refused(Refusal::FilterFailed))
            }
        }
    }

    /// Puts the (possibly edited) request head back into `req`, keeping a
    /// copy for the response phase, properties and on_log.
    fn restore_request(&mut self, req: &mut http::request::Parts) {
        if let Some(d) = self.data.as_mut().filter(|d| d.has_req) {
            req.method = d.req.method.clone();
            req.uri = d.req.uri.clone();
            d.req.headers.take_back(&mut req.headers);
        }
    }

    fn restore_response(&mut self, resp: &mut http::response::Parts) {
        if let Some(d) = self.data.as_mut().filter(|d| d.has_resp) {
            resp.status = d.resp.status;
            d.resp.headers.take_back(&mut resp.headers);
        }
    }

    /// One body callback: the body moves into the stream data for the call
    /// and back.
    fn body(
        &mut self,
        pool: &Pool,
        request: bool,
        body: &mut Bytes,
        end_of_stream: bool,
        info: &StreamInfo,
    ) -> BodyFlow {
        let mut slot = match self.enter(pool, info) {
            Ok(slot) => slot,
            Err(f) => return body_flow(self.fail(pool, f)),
        };
        self.begin_phase();
        let kind = if request {
            buffer::REQUEST_BODY
        } else {
            buffer::RESPONSE_BODY
        };
        let len = body.len() as u32;
        if let Some(d) = self.data.as_mut() {
            d.body = Some((kind, std::mem::take(body)));
        }
        let r = match slot.inst.as_mut() {
            Some(inst) => inst.body(&mut self.data, request, len, end_of_stream),
            None => Err(Failure::new(FailKind::Unavailable, "no instance")),
        };
        if let Some((_, b)) = self.data.as_mut().and_then(|d| d.body.take()) {
            *body = b;
        }
        let action_code = match r {
            Ok(a) => a,
            Err(f) => {
                self.failed(pool, &mut slot, &f);
                drop(slot);
                return body_flow(self.fail(pool, f));
            }
        };
        drop(slot);
        pool.succeeded();
        let Some(d) = self.data.as_mut() else {
            return BodyFlow::Continue;
        };
        if d.reset {
            return BodyFlow::Reset;
        }
        if let Some(local) = d.local.take() {
            return BodyFlow::Respond(local);
        }
        if action_code == action::CONTINUE {
            BodyFlow::Continue
        } else {
            BodyFlow::Buffer
        }
    }

    /// One trailer callback; the guest may edit the map, or reset the
    /// stream. A failure follows the instance rules but cannot change the
    /// answer any more.
    fn trailers(
        &mut self,
        pool: &Pool,
        request: bool,
        trailers: &mut HeaderMap,
        info: &StreamInfo,
    ) -> Result<(), StreamReset> {
        let Ok(mut slot) = self.enter(pool, info) else {
            return Ok(());
        };
        self.begin_phase();
        let kind = if request {
            map::REQUEST_TRAILERS
        } else {
            map::RESPONSE_TRAILERS
        };
        let count = trailers.len() as u32;
        if let Some(d) = self.data.as_mut() {
            d.trailers = Some((kind, std::mem::take(trailers)));
        }
        let r = match slot.inst.as_mut() {
            Some(inst) => inst.trailers(&mut self.data, request, count),
            None => Err(Failure::new(FailKind::Unavailable, "no instance")),
        };
        if let Some((_, t)) = self.data.as_mut().and_then(|d| d.trailers.take()) {
            *trailers = t;
        }
        match r {
            Ok(_) => pool.succeeded(),
            Err(f) => self.failed(pool, &mut slot, &f),
        }
        match self.data.as_ref() {
            Some(d) if d.reset => Err(StreamReset),
            _ => Ok(()),
        }
    }

    /// Ends the context exactly once: on_done, on_log, on_delete.
    fn end(&mut self, pool: &Pool) {
        if self.ended {
            return;
        }
        self.ended = true;
        let (Some(slot_index), false, true) = (self.slot, self.lost, self.generation != 0) else {
            return;
        };
        let mut slot = pool.lock(slot_index);
        if slot.generation != self.generation {
            return;
        }
        let Some(inst) = slot.inst.as_mut() else {
            return;
        };
        if self.data.is_none() {
            // Aborted while paused: the data is parked.
            self.data = inst.unpark(self.id);
        }
        if let Some(d) = self.data.as_mut() {
            d.calls.clear();
        }
        match inst.end_context(&mut self.data) {
            Ok(()) => {
                if let Some(d) = self.data.take() {
                    inst.recycle(d);
                }
            }
            Err(f) => self.failed(pool, &mut slot, &f),
        }
    }
}

fn body_flow(flow: Flow) -> BodyFlow {
    match flow {
        Flow::Respond(local) => BodyFlow::Respond(local),
        Flow::Reset => BodyFlow::Reset,
        Flow::Continue | Flow::Pause(_) => BodyFlow::Continue,
    }
}

impl StreamFilter for WasmStream {
    fn on_request_headers(&mut self, req: &mut http::request::Parts, info: &StreamInfo) -> Flow {
        let (pool, st) = (&*self.pool, &mut self.st);
        let mut slot = match st.enter(pool, info) {
            Ok(slot) => slot,
            Err(f) => return st.fail(pool, f),
        };
        st.begin_phase();
        let count = (req.headers.len() + 4) as u32;
        let eos = info.end_of_stream;
        if let Some(d) = st.data.as_mut() {
            d.req.method = req.method.clone();
            d.req.uri = std::mem::take(&mut req.uri);
            d.req.version = req.version;
            d.req.headers.set_live(&mut req.headers);
            d.has_req = true;
        }
        let r = match slot.inst.as_mut() {
            Some(inst) => inst.request_headers(&mut st.data, count, eos),
            None => Err(Failure::new(FailKind::Unavailable, "no instance")),
        };
        // Put the head back before a pause parks the data: if the stream
        // is lost while paused, it goes on (fail open) with this head.
        st.restore_request(req);
        st.settle(pool, slot, r)
    }

    fn resume_request_headers(
        &mut self,
        req: &mut http::request::Parts,
        info: &StreamInfo,
    ) -> Flow {
        let flow = self.st.resume(&self.pool, info);
        // Edits made while paused (by a tick, a callout answer) apply.
        self.st.restore_request(req);
        flow
    }

    fn on_response_headers(&mut self, resp: &mut http::response::Parts, info: &StreamInfo) -> Flow {
        let (pool, st) = (&*self.pool, &mut self.st);
        let mut slot = match st.enter(pool, info) {
            Ok(slot) => slot,
            Err(f) => return st.fail(pool, f),
        };
        st.begin_phase();
        let count = (resp.headers.len() + 1) as u32;
        let eos = info.end_of_stream;
        if let Some(d) = st.data.as_mut() {
            d.resp.status = resp.status;
            d.resp.headers.set_live(&mut resp.headers);
            d.has_resp = true;
        }
        let r = match slot.inst.as_mut() {
            Some(inst) => inst.response_headers(&mut st.data, count, eos),
            None => Err(Failure::new(FailKind::Unavailable, "no instance")),
        };
        st.restore_response(resp);
        st.settle(pool, slot, r)
    }

    fn resume_response_headers(
        &mut self,
        resp: &mut http::response::Parts,
        info: &StreamInfo,
    ) -> Flow {
        let flow = self.st.resume(&self.pool, info);
        self.st.restore_response(resp);
        flow
    }

    fn on_request_body(
        &mut self,
        body: &mut Bytes,
        end_of_stream: bool,
        info: &StreamInfo,
    ) -> BodyFlow {
        self.st.body(&self.pool, true, body, end_of_stream, info)
    }

    fn on_response_body(
        &mut self,
        body: &mut Bytes,
        end_of_stream: bool,
        info: &StreamInfo,
    ) -> BodyFlow {
        self.st.body(&self.pool, false, body, end_of_stream, info)
    }

    fn on_request_trailers(
        &mut self,
        trailers: &mut HeaderMap,
        info: &StreamInfo,
    ) -> Result<(), StreamReset> {
        self.st.trailers(&self.pool, true, trailers, info)
    }

    fn on_response_trailers(
        &mut self,
        trailers: &mut HeaderMap,
        info: &StreamInfo,
    ) -> Result<(), StreamReset> {
        self.st.trailers(&self.pool, false, trailers, info)
    }

    fn on_done(&mut self) {
        self.st.end(&self.pool);
    }
}

impl Drop for WasmStream {
    fn drop(&mut self) {
        // A stream dropped without on_done (outside a chain) still ends its
        // context; `end` runs at most once.
        self.st.end(&self.pool);
    }
}
