//! The response body type the gateway hands to hyper: a streamed upstream
//! body or a complete local one, plus what must live exactly as long as the
//! response does (the endpoint's in-flight slot, the filters' stream state).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use filters::ChainStream;
use http_body::{Body, Frame, SizeHint};
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
}

impl ProxyBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ProxyBody {
            inner: Inner::Full(Full::new(bytes.into())),
            in_flight: None,
            chain: None,
        }
    }

    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    pub fn upstream(body: Incoming, in_flight: InFlight) -> Self {
        ProxyBody {
            inner: Inner::Upstream(body),
            in_flight: Some(in_flight),
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
        };
        if let Poll::Ready(None) | Poll::Ready(Some(Err(_))) = polled {
            this.release();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(body) => body.is_end_stream(),
            Inner::Full(full) => full.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(body) => body.size_hint(),
            Inner::Full(full) => full.size_hint(),
        }
    }
}
