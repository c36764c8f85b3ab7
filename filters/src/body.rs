//! Bodies through the filters' body callbacks.
//!
//! [`FilteredBody`] wraps a request or response body and feeds each chunk
//! to the chain. It streams: a chunk that every filter lets through goes on
//! at once. A filter that answers [`BodyFlow::Buffer`](crate::BodyFlow)
//! holds the body (up to the chain's limit) until it continues or the body
//! ends, and may rewrite it then.
//!
//! The head must not leave before the filters decided about the body's
//! start: [`FilteredBody::prime`] runs the body until the first bytes pass
//! every filter (or the whole body was held and released at its end), so a
//! filter that holds the body from its first chunk can still change the
//! answer (413/502 past the bound, a local response) and the gateway can
//! give a rewritten body its exact length.

use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::chain::{lock, ChainInner};
use crate::{LocalResponse, Refusal, StreamInfo, StreamReset};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    Request,
    Response,
}

/// Why a filtered body stopped.
#[derive(Debug, thiserror::Error)]
pub enum BodyStop {
    /// A filter held more than the chain's body limit (bytes).
    #[error("body held by a filter exceeds {0} bytes")]
    TooLarge(usize),
    /// A filter answered the stream from a body callback.
    #[error("a filter answered the stream from its body callback")]
    Local(Box<LocalResponse>),
    /// The wrapped body failed (client or upstream went away).
    #[error("reading the body: {0}")]
    Read(String),
    /// A filter reset the stream from a body or trailer callback.
    #[error("stream reset by filter")]
    Reset,
    /// A filter changed the size of a body whose head went out with its
    /// `content-length` (see [`FilteredBody::set_length`]): the stream is
    /// cut rather than sent with a wrong length.
    #[error("a filter changed the size of a body sent with its content-length")]
    Resized,
}

impl BodyStop {
    /// The answer for a stream whose request (`request = true`) or
    /// response body stopped: 413 for a request body past the limit, 502
    /// for a response body past it or an upstream body that broke, 400 for
    /// a request body that broke, or the filter's own response; none
    /// (`Err`) when a filter reset the stream.
    pub fn into_response(self, request: bool) -> Result<LocalResponse, StreamReset> {
        Ok(match (self, request) {
            (BodyStop::Reset, _) => return Err(StreamReset),
            (BodyStop::Local(local), _) => *local,
            (BodyStop::TooLarge(_), true) => LocalResponse::refused(Refusal::RequestBodyTooLarge),
            (BodyStop::TooLarge(_), false) => LocalResponse::refused(Refusal::ResponseBodyTooLarge),
            (BodyStop::Read(_) | BodyStop::Resized, true) => {
                LocalResponse::refused(Refusal::RequestBodyBroken)
            }
            (BodyStop::Read(_) | BodyStop::Resized, false) => {
                LocalResponse::refused(Refusal::UpstreamBodyBroken)
            }
        })
    }
}

/// A body whose chunks go through the chain's body callbacks.
pub struct FilteredBody<B> {
    inner: B,
    chain: Arc<Mutex<ChainInner>>,
    dir: Dir,
    info: StreamInfo,
    /// Output ready to hand out (from `prime`, or before trailers).
    ready: Option<Bytes>,
    trailers: Option<HeaderMap>,
    /// The chain saw the end of the body.
    ended: bool,
    /// Nothing is left to hand out after `ready` and `trailers`.
    finished: bool,
    /// Bytes that went into the body callbacks, and that came out.
    bytes_in: u64,
    bytes_out: u64,
    /// The wrapped body's exact length, as it announced it before priming.
    declared: Option<u64>,
    /// What came out differed in size from what went in, at a point where
    /// no filter held anything.
    resized: bool,
    /// The head went out with the body's `content-length`: a later change
    /// of size stops the body ([`BodyStop::Resized`]).
    sized: bool,
}

impl<B> fmt::Debug for FilteredBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FilteredBody")
            .field("dir", &self.dir)
            .field("finished", &self.finished)
            .finish()
    }
}

impl<B> FilteredBody<B> {
    pub(crate) fn new(inner: B, chain: Arc<Mutex<ChainInner>>, dir: Dir, info: StreamInfo) -> Self {
        FilteredBody {
            inner,
            chain,
            dir,
            info,
            ready: None,
            trailers: None,
            ended: false,
            finished: false,
            bytes_in: 0,
            bytes_out: 0,
            declared: None,
            resized: false,
            sized: false,
        }
    }
}

impl<B> FilteredBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: fmt::Display,
{
    /// Runs the body until its first bytes passed every filter, or to its
    /// end while a filter holds it. An error is the stream's answer
    /// ([`BodyStop::into_response`]).
    pub async fn prime(&mut self) -> Result<(), BodyStop> {
        self.declared = self.inner.size_hint().exact();
        let first = poll_fn(|cx| self.poll_filtered(cx)).await;
        match first {
            None => {}
            Some(Err(stop)) => return Err(stop),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => self.ready = Some(data),
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        self.trailers = Some(t);
                    }
                }
            },
        }
        Ok(())
    }

    /// The body's total length, when it is known whole after
    /// [`FilteredBody::prime`] (a held and released body): the gateway
    /// sets `content-length` from it.
    pub fn known_length(&self) -> Option<u64> {
        (self.finished && self.trailers.is_none())
            .then(|| self.ready.as_ref().map_or(0, |b| b.len() as u64))
    }

    /// Sets the head's `content-length` for the body after
    /// [`FilteredBody::prime`], as Envoy keeps it:
    /// - a body held whole gets its exact length (a filter may have
    ///   rewritten it);
    /// - a streaming body keeps the head's `content-length` when it is the
    ///   wrapped body's own and no body callback changed the size so far;
    ///   a later change of size cuts the stream ([`BodyStop::Resized`]),
    ///   since the length already went out (a filter that resizes a
    ///   streamed body removes `content-length` in its header callback, as
    ///   the SDK examples do);
    /// - otherwise `content-length` is removed (chunked).
    pub fn set_length(&mut self, headers: &mut HeaderMap) {
        if let Some(n) = self.known_length() {
            headers.insert(http::header::CONTENT_LENGTH, n.into());
            return;
        }
        let head = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if !self.resized && head.is_some() && head == self.declared {
            self.sized = true;
        } else {
            headers.remove(http::header::CONTENT_LENGTH);
        }
    }

    fn step(&mut self, data: Bytes, end: bool) -> Result<Bytes, BodyStop> {
        if end {
            self.ended = true;
        }
        self.bytes_in += data.len() as u64;
        let out = lock(&self.chain).body(self.dir, data, end, &self.info)?;
        self.bytes_out += out.len() as u64;
        // Where something came out (or the body ended) no filter holds
        // anything: unchanged sizes mean equal counts.
        if (end || !out.is_empty()) && self.bytes_out != self.bytes_in {
            self.resized = true;
            if self.sized {
                return Err(BodyStop::Resized);
            }
        }
        Ok(out)
    }

    fn poll_filtered(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyStop>>> {
        if let Some(b) = self.ready.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if let Some(t) = self.trailers.take() {
            self.finished = true;
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        if self.finished {
            return Poll::Ready(None);
        }
        loop {
            let frame = match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    self.finished = true;
                    return Poll::Ready(Some(Err(BodyStop::Read(e.to_string()))));
                }
                None => {
                    self.finished = true;
                    if !self.ended {
                        let out = self.step(Bytes::new(), true)?;
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    return Poll::Ready(None);
                }
            };
            let frame = match frame.into_data() {
                Ok(data) => {
                    let end = self.inner.is_end_stream();
                    let out = self.step(data, end)?;
                    if end {
                        self.finished = true;
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                    if end {
                        return Poll::Ready(None);
                    }
                    continue;
                }
                Err(frame) => frame,
            };
            let Ok(mut trailers) = frame.into_trailers() else {
                continue;
            };
            // Trailers end the body: release what filters hold first.
            let flushed = if self.ended {
                Bytes::new()
            } else {
                self.step(Bytes::new(), true)?
            };
            if lock(&self.chain)
                .trailers(self.dir, &mut trailers, &self.info)
                .is_err()
            {
                self.finished = true;
                return Poll::Ready(Some(Err(BodyStop::Reset)));
            }
            if flushed.is_empty() {
                self.finished = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            self.trailers = Some(trailers);
            return Poll::Ready(Some(Ok(Frame::data(flushed))));
        }
    }
}

impl<B> Body for FilteredBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: fmt::Display,
{
    type Data = Bytes;
    type Error = BodyStop;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyStop>>> {
        self.get_mut().poll_filtered(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.ready.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.known_length() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
