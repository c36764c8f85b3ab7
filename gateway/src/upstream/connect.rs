//! Opening a connection to an endpoint. One function for pooled
//! keep-alive connections and for upgrades (WebSocket), so both classify a
//! failure the same way: refused, failed or timed out while connecting is
//! what the retry logic may repeat for any request, since nothing of the
//! request was sent.

use std::time::Duration;

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::pool::Sender;
use crate::error::ProxyError;

/// What the connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Keep-alive requests, given back to the endpoint's pool.
    Pooled,
    /// One upgrade request; after a 101 the connection is handed over
    /// raw and never comes back.
    Upgrade,
}

/// Opens a new HTTP/1.1 connection to `addr` (`host:port`; host names are
/// resolved per connection) and starts its connection task.
pub async fn connect(addr: &str, timeout: Duration, purpose: Use) -> Result<Sender, ProxyError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => return Err(ProxyError::ConnectTimeout),
        Ok(Err(e)) => {
            tracing::debug!(addr, error = %e, "upstream connect failed");
            return Err(if e.kind() == std::io::ErrorKind::ConnectionRefused {
                ProxyError::ConnectRefused
            } else {
                ProxyError::ConnectFailed
            });
        }
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::Builder::new()
        // hyper's default lets the read buffer grow to about 400 KiB, and
        // a connection keeps the largest size it reached while it idles in
        // the pool: after a flood of large answers (slow readers among
        // them) every pooled connection would hold that much. 16 KiB reads
        // still move bodies at memory speed (nginx reads upstreams in
        // 4-8 KiB buffers), and 16 KiB is also the largest response head
        // an upstream may send (nginx's default `proxy_buffer_size`: 4 KiB).
        .max_buf_size(16 << 10)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| {
            tracing::debug!(addr, error = %e, "upstream handshake failed");
            ProxyError::ConnectFailed
        })?;
    match purpose {
        Use::Pooled => tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        }),
        Use::Upgrade => tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upgraded upstream connection ended with an error");
            }
        }),
    };
    Ok(sender)
}
