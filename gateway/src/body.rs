//! The response body type the gateway hands to hyper: a streamed upstream
//! body or a complete local one, plus what must live exactly as long as the
//! response does (the endpoint's in-flight slot, the filters' stream state,
//! the client connection's count of requests in flight).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use filters::{BodyStop, ChainStream, FilteredBody, StreamInfo};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::Full;
use hyper::body::Incoming;

use crate::edge::conn_clock::ActiveRequest;
use crate::observe::access_log::AccessRecord;
use crate::observe::otel::RequestSpan;
use crate::spool::{SpoolReader, Spooler};
use crate::upstream::share::ShareGuard;
use crate::upstream::InFlight;

pub struct ProxyBody {
    inner: Inner,
    /// Released when the body ends or the client goes away, so
    /// least-request and the cluster limit count whole responses.
    in_flight: Option<InFlight>,
    /// Dropped at the same moment, which ends the stream for filters.
    chain: Option<ChainStream>,
    /// The request on its client connection: while it is held the
    /// connection is busy, not idle (`conn_clock`).
    request: Option<ActiveRequest>,
    /// The access log line, written when the body is dropped (sent or
    /// abandoned), with the bytes that went out.
    log: Option<Box<AccessRecord>>,
    /// The request's span (`[tracing]`), ended at the same moment.
    span: Option<Box<RequestSpan>>,
    /// Set for an upstream body on a route that buffers responses: past
    /// [`crate::spool::HANDOFF`] bytes the rest is read ahead.
    spooler: Option<Arc<Spooler>>,
    /// The client's share of a streaming route's cluster, held as long as
    /// the upstream body is.
    share: Option<Box<ShareGuard>>,
    /// Anything else that must live exactly as long as the response (the
    /// overload gate's upstream slot).
    keep: Option<Box<dyn Send>>,
    sent: u64,
    ended: bool,
}

enum Inner {
    /// Streams from the upstream frame by frame, never buffered whole.
    Upstream(Incoming),
    /// The upstream's body through the route's body filters (boxed: it is
    /// much larger than the other variants and rare).
    Filtered(Box<FilteredBody<Incoming>>),
    Full(Full<Bytes>),
    /// Anything else (the cache's "read part, stream the rest" body).
    Boxed(UnsyncBoxBody<Bytes, BodyError>),
    /// The rest of an upstream body, read ahead of a slow client (see
    /// [`crate::spool`]); the task reading it holds the in-flight slot.
    Spooled(SpoolReader),
}

/// The error a response body can end with.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl ProxyBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ProxyBody {
            inner: Inner::Full(Full::new(bytes.into())),
            in_flight: None,
            chain: None,
            request: None,
            log: None,
            span: None,
            spooler: None,
            share: None,
            keep: None,
            sent: 0,
            ended: false,
        }
    }

    /// Wraps another body; what it wraps keeps its own in-flight slot.
    pub fn boxed(body: UnsyncBoxBody<Bytes, BodyError>) -> Self {
        ProxyBody {
            inner: Inner::Boxed(body),
            in_flight: None,
            chain: None,
            request: None,
            log: None,
            span: None,
            spooler: None,
            share: None,
            keep: None,
            sent: 0,
            ended: false,
        }
    }

    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    pub fn upstream(body: Incoming, in_flight: InFlight) -> Self {
        // A response without a body (204, 304, HEAD) is complete already;
        // its connection can serve the next request now.
        let in_flight = if body.is_end_stream() {
            in_flight.complete();
            None
        } else {
            Some(in_flight)
        };
        ProxyBody {
            inner: Inner::Upstream(body),
            in_flight,
            chain: None,
            request: None,
            log: None,
            span: None,
            spooler: None,
            share: None,
            keep: None,
            sent: 0,
            ended: false,
        }
    }

    /// Routes an upstream body through the filters' body callbacks, primed
    /// (see [`FilteredBody::prime`]), and sets the head's `content-length`
    /// for what comes out ([`FilteredBody::set_length`]). A local body is
    /// left as it is.
    pub async fn filter(
        mut self,
        chain: &mut ChainStream,
        info: &StreamInfo,
        headers: &mut http::HeaderMap,
    ) -> Result<ProxyBody, BodyStop> {
        let placeholder = Inner::Full(Full::new(Bytes::new()));
        let body = match std::mem::replace(&mut self.inner, placeholder) {
            Inner::Upstream(body) => body,
            other => {
                self.inner = other;
                return Ok(self);
            }
        };
        let mut filtered = chain.response_body(body, info);
        filtered.prime().await?;
        filtered.set_length(headers);
        self.inner = Inner::Filtered(Box::new(filtered));
        // Held whole: the upstream body is read to its end already.
        if self.is_end_stream() {
            self.complete();
        }
        Ok(self)
    }

    /// From here on, an upstream body is read at the upstream's pace, so a
    /// slow client holds no upstream slot ([`crate::spool`]). `at_once`
    /// for HTTP/2 streams. Other bodies are left as they are.
    pub fn spool(mut self, spooler: &Arc<Spooler>, at_once: bool) -> ProxyBody {
        if !matches!(self.inner, Inner::Upstream(_)) || self.in_flight.is_none() {
            return self;
        }
        self.spooler = Some(spooler.clone());
        if at_once {
            self.hand_off();
        }
        self
    }

    /// From now on a task reads the upstream body and holds its slot;
    /// the client reads the spool.
    fn hand_off(&mut self) {
        let (Some(spooler), Some(in_flight)) = (self.spooler.take(), self.in_flight.take()) else {
            return;
        };
        // The overload gate's slot and the client's share go with the
        // upstream leg: a slow client holds neither.
        let leg = UpstreamLeg {
            in_flight,
            _keep: self.keep.take(),
            _share: self.share.take(),
        };
        let placeholder = Inner::Full(Full::new(Bytes::new()));
        if let Inner::Upstream(body) = std::mem::replace(&mut self.inner, placeholder) {
            self.inner = Inner::Spooled(crate::spool::read_ahead(body, leg, spooler));
        }
    }

    /// Keeps the filter chain's stream alive until the body is done.
    pub fn attach(&mut self, chain: ChainStream) {
        if self.is_end_stream() {
            drop(chain);
        } else {
            self.chain = Some(chain);
        }
    }

    /// Keeps the request counted on its connection until this body is done.
    pub fn hold(&mut self, request: ActiveRequest) {
        if !self.ended {
            self.request = Some(request);
        }
    }

    /// Keeps `guard` alive until this body is done.
    pub fn keep(&mut self, guard: Box<dyn Send>) {
        if !self.ended {
            self.keep = Some(guard);
        }
    }

    /// Writes `record` to the access log when this body is done.
    pub fn log_on_end(&mut self, record: Box<AccessRecord>) {
        self.log = Some(record);
    }

    /// Ends `span` when this body is done.
    pub fn span_on_end(&mut self, span: RequestSpan) {
        self.span = Some(Box::new(span));
    }

    /// The response was read to its end: its connection can be reused.
    fn complete(&mut self) {
        self.ended = true;
        if let Some(f) = self.in_flight.take() {
            f.complete();
        }
        self.release();
    }

    /// Keeps `share` until the upstream body is done.
    pub fn hold_share(&mut self, share: ShareGuard) {
        if !self.ended && self.in_flight.is_some() {
            self.share = Some(Box::new(share));
        }
    }

    fn release(&mut self) {
        self.in_flight = None;
        self.share = None;
        self.keep = None;
        self.chain = None;
        self.request = None;
    }
}

/// What the read-ahead task holds while it reads an upstream body: the
/// endpoint's slot and connection, and what else lives as long as the
/// upstream leg (the overload gate's slot, the client's share).
struct UpstreamLeg {
    in_flight: InFlight,
    _keep: Option<Box<dyn Send>>,
    _share: Option<Box<ShareGuard>>,
}

impl crate::spool::Slot for UpstreamLeg {
    fn complete(self) {
        self.in_flight.complete();
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled: Poll<Option<Result<Frame<Bytes>, BodyError>>> = match &mut this.inner {
            Inner::Upstream(body) => match Pin::new(body).poll_frame(cx) {
                // Before the hand-off, on a route that buffers: a frame is
                // a slice of the upstream connection's read buffer, and a
                // client that reads nothing keeps it queued in its
                // connection's write buffer, holding the whole read buffer
                // long after the connection went back to the pool. A copy
                // of the few KiB before the hand-off holds only itself.
                Poll::Ready(Some(Ok(frame))) if this.spooler.is_some() => {
                    Poll::Ready(Some(Ok(frame.map_data(|d| Bytes::copy_from_slice(&d)))))
                }
                polled => polled.map_err(Into::into),
            },
            Inner::Filtered(body) => Pin::new(body.as_mut()).poll_frame(cx).map_err(Into::into),
            Inner::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            Inner::Boxed(body) => Pin::new(body).poll_frame(cx),
            Inner::Spooled(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        };
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            crate::edge::stream_idle::progressed();
            if let Some(d) = frame.data_ref() {
                this.sent += d.len() as u64;
            }
            if this.spooler.is_some()
                && this.sent > crate::spool::HANDOFF as u64
                && !this.is_end_stream()
            {
                this.hand_off();
            }
        }
        match &polled {
            // hyper stops polling once `is_end_stream` says the body is
            // done (a Content-Length body after its last byte), so the end
            // is noticed after the last frame, not only at `None`.
            Poll::Ready(None) => this.complete(),
            Poll::Ready(Some(Ok(_))) if this.is_end_stream() => this.complete(),
            Poll::Ready(Some(Err(_))) => this.release(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(body) => body.is_end_stream(),
            Inner::Filtered(body) => body.is_end_stream(),
            Inner::Full(full) => full.is_end_stream(),
            Inner::Boxed(body) => body.is_end_stream(),
            Inner::Spooled(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(body) => body.size_hint(),
            Inner::Filtered(body) => body.size_hint(),
            Inner::Full(full) => full.size_hint(),
            Inner::Boxed(body) => body.size_hint(),
            Inner::Spooled(body) => body.size_hint(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if self.log.is_none() && self.span.is_none() {
            return;
        }
        let complete = self.ended || self.is_end_stream();
        if let Some(record) = self.log.take() {
            record.emit(self.sent, complete);
        }
        if let Some(span) = self.span.take() {
            span.finish(self.sent, complete);
        }
    }
}
