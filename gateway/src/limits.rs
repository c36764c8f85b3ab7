//! Client limits: what one client may cost the gateway.
//!
//! Some are enforced by hyper on the connection (head size, header count,
//! header read time, HTTP/2 streams: see `server::http_builders`); the rest
//! live here: connections per listener and per client address (checked at
//! accept, before any byte is read), the request target length (414) and
//! the body size (413), counted as the body streams so a chunked body
//! cannot get around it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::config::{ConfigError, ListenerConfig};
use crate::error::ProxyError;

/// Checks a listener's limit keys (called from `Config::validate`).
pub fn validate_listener(l: &ListenerConfig, p: &str) -> Result<(), ConfigError> {
    let at = |key: &str, msg: &str| Err(ConfigError::at(format!("{p}.{key}"), msg));
    if l.max_headers == 0 || l.max_headers > 10_000 {
        return at("max_headers", "must be between 1 and 10000");
    }
    if l.max_uri_bytes.0 < 256 || l.max_uri_bytes.0 > l.max_header_bytes.0 {
        return at(
            "max_uri_bytes",
            "must be at least 256B and not above max_header_bytes",
        );
    }
    if l.max_connections == 0 {
        return at("max_connections", "must be above zero");
    }
    if l.max_concurrent_streams == 0 {
        return at("max_concurrent_streams", "must be above zero");
    }
    if l.proxy_protocol_timeout.0.is_zero() {
        return at("proxy_protocol_timeout", "must be above zero");
    }
    // The connection clocks add these to instants: keep them sane.
    const DAY: Duration = Duration::from_secs(24 * 3600);
    if l.header_read_timeout.0 > DAY {
        return at("header_read_timeout", "must be at most 24h");
    }
    if l.idle_timeout.0 > DAY {
        return at("idle_timeout", "must be at most 24h");
    }
    Ok(())
}

/// Open connections of one listener, in total and per client address.
pub struct ConnLimits {
    /// Changed by a reload (see `server::Listener::settings`).
    max: AtomicUsize,
    per_ip: AtomicUsize,
    open: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds one of the listener's connection slots until dropped.
pub struct ConnSlot(Arc<ConnLimits>);

/// Holds one of a client address's connection slots until dropped.
pub struct IpSlot(Arc<ConnLimits>, IpAddr);

impl ConnLimits {
    pub fn new(max: usize, per_ip: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            max: AtomicUsize::new(max),
            per_ip: AtomicUsize::new(per_ip),
            open: AtomicUsize::new(0),
            by_ip: Mutex::new(HashMap::new()),
        })
    }

    /// New limits for new connections; open ones keep their slots.
    pub fn set(&self, max: usize, per_ip: usize) {
        self.max.store(max, Ordering::Relaxed);
        self.per_ip.store(per_ip, Ordering::Relaxed);
    }

    /// A slot for a new connection, or `None` at `max_connections`.
    pub fn try_conn(self: &Arc<Self>) -> Option<ConnSlot> {
        let prev = self.open.fetch_add(1, Ordering::AcqRel);
        if prev >= self.max.load(Ordering::Relaxed) {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnSlot(self.clone()))
    }

    /// A slot for `ip`, or `None` at `max_connections_per_ip`. Always
    /// granted when there is no per-address limit.
    pub fn try_ip(self: &Arc<Self>, ip: IpAddr) -> Option<Option<IpSlot>> {
        let per_ip = self.per_ip.load(Ordering::Relaxed);
        if per_ip == 0 {
            return Some(None);
        }
        let mut map = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= per_ip {
            return None;
        }
        *n += 1;
        Some(Some(IpSlot(self.clone(), ip)))
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.0.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

/// The length of the request target as the client sent it (414 above the
/// limit). The authority counts too, for absolute-form and HTTP/2.
pub fn check_uri(uri: &Uri, max: u64) -> Result<(), ProxyError> {
    let len = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    if len as u64 > max {
        Err(ProxyError::UriTooLong)
    } else {
        Ok(())
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_and_ip_slots() {
        let l = ConnLimits::new(2, 1);
        let a = l.try_conn().unwrap();
        let _b = l.try_conn().unwrap();
        assert!(l.try_conn().is_none());
        drop(a);
        assert!(l.try_conn().is_some());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let s = l.try_ip(ip).unwrap();
        assert!(l.try_ip(ip).is_none());
        assert!(l.try_ip("192.0.2.2".parse().unwrap()).is_some());
        drop(s);
        assert!(l.try_ip(ip).is_some());
        assert!(l.by_ip.lock().unwrap().is_empty());
        let unlimited = ConnLimits::new(1, 0);
        assert!(matches!(unlimited.try_ip(ip), Some(None)));
    }

    #[test]
    fn uri_length() {
        let ok: Uri = "/a?b=c".parse().unwrap();
        assert!(check_uri(&ok, 6).is_ok());
        assert_eq!(check_uri(&ok, 5), Err(ProxyError::UriTooLong));
    }
}
