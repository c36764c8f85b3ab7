//! The per-request side of a Wasm filter: one proxy-wasm HTTP context per
//! stream, mapped onto [`StreamFilter`].

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, StatusCode};

use super::abi::action;
use super::instance::{FailKind, Failure, Pool, Slot};
use super::state::{ReqHead, RespHead, StreamData};
use crate::{FailMode, Flow, LocalResponse, StreamFilter, StreamInfo};

pub(crate) struct WasmStream {
    pool: Arc<Pool>,
    /// The pool slot this stream's context lives in, once it has one.
    slot: Option<usize>,
    /// The slot generation the context was created in; 0 = no context yet.
    generation: u64,
    data: Option<Box<StreamData>>,
    /// The context is gone (its instance failed): the guest is not called
    /// again for this stream.
    lost: bool,
    ended: bool,
}

impl WasmStream {
    pub(crate) fn new(pool: Arc<Pool>) -> WasmStream {
        WasmStream {
            pool,
            slot: None,
            generation: 0,
            data: None,
            lost: false,
            ended: false,
        }
    }

    /// Locks this stream's slot, creating the HTTP context first if the
    /// stream has none yet.
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
            let inst = match pool.ensure(&mut slot) {
                Ok(inst) => inst,
                Err(f) => {
                    self.lost = true;
                    return Err(f);
                }
            };
            self.data = Some(Box::new(StreamData {
                id: pool.plugin.next_context_id(),
                info: info.clone(),
                req: None,
                resp: None,
                props: Default::default(),
                local: None,
                reset: false,
            }));
            if let Err(f) = inst.create_context(&mut self.data) {
                pool.poison(&mut slot, &f);
                self.lost = true;
                return Err(f);
            }
            self.generation = slot.generation;
        } else if slot.generation != self.generation || slot.inst.is_none() {
            self.lost = true;
            return Err(Failure::new(
                FailKind::Unavailable,
                "the stream's instance was discarded",
            ));
        }
        if let Some(d) = self.data.as_mut() {
            // Load level and the like may have changed since the last phase.
            d.info = info.clone();
            d.local = None;
            d.reset = false;
        }
        Ok(slot)
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

    /// What the stream does when the filter failed: skip the filter (open)
    /// or answer 500 (closed).
    /// Turns a guest call's result into the stream's next step, releasing
    /// the slot first (a failure poisons its instance while still locked).
    fn settle(
        &mut self,
        pool: &Pool,
        mut slot: MutexGuard<'_, Slot>,
        r: Result<u32, Failure>,
    ) -> Flow {
        match r {
            Ok(action) => {
                drop(slot);
                self.outcome(action)
            }
            Err(f) => {
                self.failed(pool, &mut slot, &f);
                drop(slot);
                self.fail(f)
            }
        }
    }

    fn fail(&self, f: Failure) -> Flow {
        let plugin = &self.pool.plugin;
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
                Flow::Respond(LocalResponse::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "filter failed\n",
                ))
            }
        }
    }

    /// Maps a header callback's outcome to a [`Flow`].
    fn outcome(&mut self, action_code: u32) -> Flow {
        let Some(d) = self.data.as_mut() else {
            return Flow::Continue;
        };
        if let Some(local) = d.local.take() {
            return Flow::Respond(local);
        }
        if d.reset {
            return Flow::Respond(LocalResponse::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "stream reset by filter\n",
            ));
        }
        if action_code == action::CONTINUE {
            return Flow::Continue;
        }
        // Pause: nothing can resume the stream yet (no callouts or ticks are
        // delivered), so waiting would hang it. Treated as a failure of the
        // filter for this stream, without blaming the instance.
        if !self.pool.pause_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                filter = %self.pool.plugin.name,
                "wasm filter paused a stream; pausing is not supported yet, applying the fail mode"
            );
        }
        self.fail(Failure::new(
            FailKind::Unavailable,
            "pause is not supported yet",
        ))
    }

    /// Ends the context exactly once: on_done, on_log, on_delete.
    fn end(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        let (Some(slot_index), false, true) = (self.slot, self.lost, self.generation != 0) else {
            return;
        };
        let pool = self.pool.clone();
        let mut slot = pool.lock(slot_index);
        if slot.generation != self.generation {
            return;
        }
        let Some(inst) = slot.inst.as_mut() else {
            return;
        };
        if let Err(f) = inst.end_context(&mut self.data) {
            self.failed(&pool, &mut slot, &f);
        }
    }
}

/// Does this head announce no body? (proxy-wasm's `end_of_stream`.) Exact
/// for HTTP/1.1; for HTTP/2 a body without content-length counts as none.
fn no_body(headers: &HeaderMap) -> bool {
    match headers.get(CONTENT_LENGTH) {
        Some(v) => v.as_bytes() == b"0",
        None => !headers.contains_key(TRANSFER_ENCODING),
    }
}

impl StreamFilter for WasmStream {
    fn on_request_headers(&mut self, req: &mut http::request::Parts, info: &StreamInfo) -> Flow {
        let pool = self.pool.clone();
        let mut slot = match self.enter(&pool, info) {
            Ok(slot) => slot,
            Err(f) => return self.fail(f),
        };
        let count = (req.headers.len() + 4) as u32;
        let eos = no_body(&req.headers);
        if let Some(d) = self.data.as_mut() {
            d.req = Some(ReqHead {
                method: req.method.clone(),
                uri: std::mem::take(&mut req.uri),
                version: req.version,
                headers: std::mem::take(&mut req.headers),
            });
        }
        let r = match slot.inst.as_mut() {
            Some(inst) => inst.request_headers(&mut self.data, count, eos),
            None => Err(Failure::new(FailKind::Unavailable, "no instance")),
        };
        // Put the (possibly edited) head back; keep a copy for the
        // response phase and on_log.
        if let Some(h) = self.data.as_ref().and_then(|d| d.req.as_ref()) {
            req.method = h.method.clone();
            req.uri = h.uri.clone();
            req.headers = h.headers.clone();
        }
        self.settle(&pool, slot, r)
    }

    fn on_response_headers(&mut self, resp: &mut http::response::Parts, info: &StreamInfo) -> Flow {
        let pool = self.pool.clone();
        let mut slot = match self.enter(&pool, info) {
            Ok(slot) => slot,
            Err(f) => return self.fail(f),
        };
        let count = (resp.headers.len() + 1) as u32;
        let eos = resp.status.is_informational()
            || resp.status == StatusCode::NO_CONTENT
            || resp.status == StatusCode::NOT_MODIFIED
            || resp
                .headers
                .get(CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() == b"0");
        if let Some(d) = self.data.as_mut() {
            d.resp = Some(RespHead {
                status: resp.status,
                headers: std::mem::take(&mut resp.headers),
            });
        }
        let r = match slot.inst.as_mut() {
            Some(inst) => inst.response_headers(&mut self.data, count, eos),
            None => Err(Failure::new(FailKind::Unavailable, "no instance")),
        };
        if let Some(h) = self.data.as_mut().and_then(|d| d.resp.take()) {
            resp.status = h.status;
            resp.headers = h.headers;
        }
        self.settle(&pool, slot, r)
    }

    fn on_done(&mut self) {
        self.end();
    }
}

impl Drop for WasmStream {
    fn drop(&mut self) {
        // A stream dropped without on_done (outside a chain) still ends its
        // context; `end` runs at most once.
        self.end();
    }
}
