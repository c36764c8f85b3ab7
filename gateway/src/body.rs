//! The response body type the gateway hands to hyper: a streamed upstream
//! body or a complete local one, plus what must live exactly as long as the
//! response does (the endpoint's in-flight slot, the filters' stream state).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use filters::ChainStream;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::Full;
use hyper::body::Incoming;

use crate::upstream::InFlight;

pub struct ProxyBody {
    inner: Inner,
    /// Released when the body ends or the client goes away, so
    /// least-request and the cluster limit count whole responses.
    in_flight: Option<InFlight>,
    /// Dropped at the same moment, which ends the stream for filters.
    chain: Option<ChainStream>,
}

enum Inner {
    /// Streams from the upstream frame by frame, never buffered whole.
    Upstream(Incoming),
    Full(Full<Bytes>),
    /// Anything else (the cache's "read part, stream the rest" body).
    Boxed(UnsyncBoxBody<Bytes, hyper::Error>),
}

impl ProxyBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ProxyBody {
            inner: Inner::Full(Full::new(bytes.into())),
            in_flight: None,
            chain: None,
        }
    }

    /// Wraps another body; what it wraps keeps its own in-flight slot.
    pub fn boxed(body: UnsyncBoxBody<Bytes, hyper::Error>) -> Self {
        ProxyBody {
            inner: Inner::Boxed(body),
            in_flight: None,
            chain: None,
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

    /// The response was read to its end: its connection can be reused.
    fn complete(&mut self) {
        if let Some(f) = self.in_flight.take() {
            f.complete();
        }
        self.release();
    }

    fn release(&mut self) {
        self.in_flight = None;
        self.chain = None;
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Inner::Upstream(body) => Pin::new(body).poll_frame(cx),
            Inner::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            Inner::Boxed(body) => Pin::new(body).poll_frame(cx),
        };
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
            Inner::Full(full) => full.is_end_stream(),
            Inner::Boxed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(body) => body.size_hint(),
            Inner::Full(full) => full.size_hint(),
            Inner::Boxed(body) => body.size_hint(),
        }
    }
}
