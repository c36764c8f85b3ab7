//! The response body type the gateway hands to hyper: a streamed upstream
//! body or a complete local one, plus what must live exactly as long as the
//! response does (the endpoint's in-flight slot, the filters' stream state,
//! the client connection's count of requests in flight).

use std::pin::Pin;
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
            keep: None,
            sent: 0,
            ended: false,
        }
    }

    /// Routes an upstream body through the filters' body callbacks, primed
    /// (see [`FilteredBody::prime`]); returns the body and its length when
    /// known whole. A local body is left as it is.
    pub async fn filter(
        mut self,
        chain: &mut ChainStream,
        info: &StreamInfo,
    ) -> Result<(ProxyBody, Option<u64>), BodyStop> {
        let placeholder = Inner::Full(Full::new(Bytes::new()));
        let body = match std::mem::replace(&mut self.inner, placeholder) {
            Inner::Upstream(body) => body,
            other => {
                self.inner = other;
                return Ok((self, None));
            }
        };
        let mut filtered = chain.response_body(body, info);
        filtered.prime().await?;
        let len = filtered.known_length();
        self.inner = Inner::Filtered(Box::new(filtered));
        // Held whole: the upstream body is read to its end already.
        if self.is_end_stream() {
            self.complete();
        }
        Ok((self, len))
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

    fn release(&mut self) {
        self.in_flight = None;
        self.keep = None;
        self.chain = None;
        self.request = None;
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
            Inner::Upstream(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Inner::Filtered(body) => Pin::new(body.as_mut()).poll_frame(cx).map_err(Into::into),
            Inner::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            Inner::Boxed(body) => Pin::new(body).poll_frame(cx),
        };
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(d) = frame.data_ref() {
                this.sent += d.len() as u64;
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
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(body) => body.size_hint(),
            Inner::Filtered(body) => body.size_hint(),
            Inner::Full(full) => full.size_hint(),
            Inner::Boxed(body) => body.size_hint(),
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
