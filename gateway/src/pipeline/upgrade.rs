//! HTTP/1.1 `Upgrade` pass-through (WebSocket) on routes with
//! `websocket = true`.
//!
//! An upgrade cannot use the keep-alive pool: once the upstream answers
//! `101 Switching Protocols` the connection is no longer HTTP and never
//! comes back. So the request goes out on a connection of its own; on 101
//! the client gets the upstream's 101 (with its `Upgrade`/`Connection` and
//! `Sec-WebSocket-*` headers) and both raw connections are spliced together
//! until either side closes. Any other answer is passed on as a normal
//! response. Upgrades on other routes are not passed on (`Upgrade` is a
//! hop-by-hop header and is removed like the others), so the upstream sees
//! a plain request.
//!
//! A tunnel is still the client connection it came on, and a request to
//! its cluster: it takes one of the cluster's `max_concurrent_requests`
//! slots (503 when the cluster is full, like any request) and holds it, and
//! the endpoint's in-flight count, until it ends. It runs in the client
//! connection's own task (see [`TunnelSlot`]), so it keeps the listener's
//! connection slots and the drain waits for it (up to `drain_timeout`).
//! A tunnel through which nothing passed for the listener's
//! `websocket_idle_timeout` is closed.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::edge::tunnel::TunnelSlot;
use crate::error::ProxyError;
use crate::upstream::connect::{connect, Use};
use crate::upstream::{Cluster, Endpoint, InFlight};

/// Whether a request asks for a protocol upgrade (HTTP/1.1 `Connection:
/// upgrade` with an `Upgrade` header). HTTP/2 extended CONNECT is not
/// supported.
pub fn is_upgrade(head: &Parts) -> bool {
    head.version == http::Version::HTTP_11
        && head.headers.contains_key(header::UPGRADE)
        && head
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The `Upgrade` and `Connection` headers to put back on the upstream
/// request after hop-by-hop removal.
pub fn upgrade_headers(head: &Parts) -> Option<HeaderValue> {
    head.headers.get(header::UPGRADE).cloned()
}

/// Sends an upgrade request on a fresh connection to one endpoint of the
/// cluster and, on 101, leaves the splice of the client's and the
/// upstream's connections in `tunnel`. `headers` are the upstream request's
/// headers (hop-by-hop already removed); `upgrade` is the client's
/// `Upgrade` value.
#[allow(clippy::too_many_arguments)]
pub async fn pass_through(
    cluster: &Arc<Cluster>,
    client: OnUpgrade,
    tunnel: &TunnelSlot,
    method: http::Method,
    path: http::uri::PathAndQuery,
    mut headers: HeaderMap,
    upgrade: HeaderValue,
    idle_timeout: Duration,
) -> Result<(Response<ProxyBody>, Arc<Endpoint>), ProxyError> {
    // A cluster slot, as for any request; the tunnel keeps it.
    let permit = cluster.try_admit().ok_or(ProxyError::Overflow)?;
    let i = cluster.pick(&[]);
    let endpoint = cluster.endpoints[i].clone();
    let in_flight = cluster.start(i, Some(permit));
    let connect_timeout = cluster.config.connect_timeout.0;
    let mut sender = connect(&endpoint.addr, connect_timeout, Use::Upgrade).await?;

    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, upgrade);
    if !headers.contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::from_str(endpoint.authority.as_str()) {
            headers.insert(header::HOST, v);
        }
    }
    let mut req = Request::new(Either::Right(Either::Left(Full::new(Bytes::new()))));
    *req.method_mut() = method;
    *req.uri_mut() = http::Uri::from(path);
    *req.headers_mut() = headers;
    let mut resp = tokio::time::timeout(cluster.request_timeout, sender.send_request(req))
        .await
        .map_err(|_| ProxyError::Timeout)?
        .map_err(|_| ProxyError::UpstreamReset)?;

    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // Refused (401, 426, ...): an ordinary answer. Its body is small
        // by nature; bounded anyway.
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, 1 << 20)
            .collect()
            .await
            .map_err(|_| ProxyError::UpstreamReset)?
            .to_bytes();
        let mut out = Response::from_parts(parts, ProxyBody::full(body));
        crate::headers::remove_hop_by_hop(out.headers_mut());
        return Ok((out, endpoint));
    }

    let upstream = hyper::upgrade::on(&mut resp);
    let (parts, _) = resp.into_parts();
    tunnel.put(Box::pin(splice(
        cluster.clone(),
        client,
        upstream,
        in_flight,
        idle_timeout,
    )));
    // The 101 goes to the client with the upstream's headers, Upgrade and
    // Connection included: hyper hands over the raw connection after it.
    Ok((Response::from_parts(parts, ProxyBody::empty()), endpoint))
}

/// Copies bytes both ways until either side closes or nothing has passed
/// for `idle_timeout`. `in_flight` (the cluster slot and the endpoint's
/// count) is released when this ends or is dropped (the drain's
/// `drain_timeout` cutting it).
async fn splice(
    cluster: Arc<Cluster>,
    client: OnUpgrade,
    upstream: OnUpgrade,
    in_flight: InFlight,
    idle_timeout: Duration,
) {
    let (client, upstream) = match tokio::join!(client, upstream) {
        (Ok(c), Ok(u)) => (c, u),
        _ => {
            tracing::debug!(cluster = %cluster.name, "upgrade did not complete on both sides");
            return;
        }
    };
    let _open = OpenTunnel::new(&cluster.tunnels);
    // Every byte passes through the client side, both ways.
    let activity = Arc::new(Activity::new());
    let mut client = Watched {
        inner: TokioIo::new(client),
        activity: activity.clone(),
    };
    let mut upstream = TokioIo::new(upstream);
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = copied {
                tracing::debug!(cluster = %cluster.name, error = %e, "upgraded connection ended with an error");
            }
        }
        () = activity.idle_for(idle_timeout) => {
            tracing::debug!(cluster = %cluster.name, ?idle_timeout, "WebSocket tunnel idle; closing");
        }
    }
    drop(in_flight);
}

/// When bytes last passed through a tunnel: milliseconds since it opened.
struct Activity {
    opened: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Completes once nothing has passed for `timeout`. Wakes once per
    /// `timeout` at most, not per byte: it sleeps to the deadline the last
    /// activity it saw allows, and looks again.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let deadline = self.last() + timeout;
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// The client side of a tunnel, stamping [`Activity`] on every byte read
/// or written.
struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            if n > 0 {
                self.activity.touch();
            }
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts in `flashgate_websocket_tunnels_active` while it lives.
struct OpenTunnel(IntGauge);

impl OpenTunnel {
    fn new(gauge: &IntGauge) -> OpenTunnel {
        gauge.inc();
        OpenTunnel(gauge.clone())
    }
}

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.dec();
    }
}
