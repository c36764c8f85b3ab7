//! The client's request body with the listener's `max_body` enforced as
//! it streams (413), so a chunked body cannot get around the limit, and a
//! verdict that tells a failed upstream attempt whether the body was at
//! fault (the client's 413 or 400, not the upstream's 502).

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::error::ProxyError;

const OK: u8 = 0;
const TOO_LARGE: u8 = 1;
const CLIENT_ERROR: u8 = 2;

/// What happened to a request body, readable after the upstream attempt
/// failed: the failure was the client's (413, 400), not the upstream's.
#[derive(Clone)]
pub struct BodyVerdict(Arc<AtomicU8>);

impl BodyVerdict {
    /// The answer for a failed upstream attempt: the body's fault when it
    /// overran or broke, otherwise `err` as it was.
    pub fn explain(&self, err: ProxyError) -> ProxyError {
        match self.0.load(Ordering::Acquire) {
            TOO_LARGE => ProxyError::BodyTooLarge,
            CLIENT_ERROR => ProxyError::BadBody,
            _ => err,
        }
    }
}

/// A client's request body with `max_body` enforced as it streams.
pub struct LimitedBody {
    inner: Incoming,
    /// A frame read ahead by [`LimitedBody::prefetch`], handed out first.
    pending: Option<Frame<Bytes>>,
    seen: u64,
    max: u64,
    verdict: BodyVerdict,
}

#[derive(Debug)]
struct BodyLimitError(&'static str);

impl std::fmt::Display for BodyLimitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for BodyLimitError {}

impl LimitedBody {
    /// Wraps `inner`; refuses at once (413) when its declared length is
    /// already above `max`.
    pub fn new(inner: Incoming, max: u64) -> Result<(LimitedBody, BodyVerdict), ProxyError> {
        if inner.size_hint().lower() > max {
            return Err(ProxyError::BodyTooLarge);
        }
        let verdict = BodyVerdict(Arc::new(AtomicU8::new(OK)));
        Ok((
            LimitedBody {
                inner,
                pending: None,
                seen: 0,
                max,
                verdict: verdict.clone(),
            },
            verdict,
        ))
    }

    /// For a body of unknown length (chunked), reads its first frame before
    /// anything goes upstream: a malformed chunk or an oversize first chunk
    /// is then refused here and the upstream never sees the request. Bounded
    /// by `within` (408 after it).
    pub async fn prefetch(&mut self, within: Duration) -> Result<(), ProxyError> {
        if self.inner.is_end_stream() || self.inner.size_hint().exact().is_some() {
            return Ok(());
        }
        match tokio::time::timeout(within, self.inner.frame()).await {
            Err(_) => Err(ProxyError::BodyTimeout),
            Ok(None) => Ok(()),
            Ok(Some(Err(_))) => {
                self.verdict.0.store(CLIENT_ERROR, Ordering::Release);
                Err(ProxyError::BadBody)
            }
            Ok(Some(Ok(frame))) => {
                self.count(&frame).map_err(|_| ProxyError::BodyTooLarge)?;
                self.pending = Some(frame);
                Ok(())
            }
        }
    }

    fn count(&mut self, frame: &Frame<Bytes>) -> Result<(), BodyLimitError> {
        if let Some(data) = frame.data_ref() {
            self.seen += data.len() as u64;
            if self.seen > self.max {
                self.verdict.0.store(TOO_LARGE, Ordering::Release);
                return Err(BodyLimitError("the request body is larger than max_body"));
            }
        }
        Ok(())
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(frame) = this.pending.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match this.count(&frame) {
                Ok(()) => Poll::Ready(Some(Ok(frame))),
                Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
            },
            Poll::Ready(Some(Err(e))) => {
                this.verdict.0.store(CLIENT_ERROR, Ordering::Release);
                Poll::Ready(Some(Err(Box::new(e))))
            }
            other => other.map_err(|e| -> Self::Error { Box::new(e) }),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let ahead = self
            .pending
            .as_ref()
            .and_then(|f| f.data_ref())
            .map_or(0, |d| d.len() as u64);
        if ahead == 0 {
            return inner;
        }
        // Never exact after a read-ahead of a chunked body: the upstream
        // request must stay chunked rather than get a guessed length.
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + ahead);
        hint
    }
}
