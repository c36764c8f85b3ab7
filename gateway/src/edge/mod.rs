//! The client side of the gateway: listeners, TLS, PROXY protocol, the
//! connection clocks (header-read and idle timeouts, parking), request
//! framing checks, connection limits, the client's request body with its
//! size limit, and upgraded tunnels.
//!
//! The edge knows connections, not routes: it hands each request to an
//! [`App`] (the gateway's pipeline) and serves the response that comes
//! back. That keeps the dependency one way: the pipeline uses the edge's
//! types, the edge never calls into the pipeline by name.

pub mod cert_time;
pub mod conn_clock;
pub mod framing;
pub mod ja4;
pub mod limits;
pub mod proxy_protocol;
pub mod request_body;
pub mod server;
pub mod stream_idle;
pub mod tls;
pub mod tunnel;
pub mod workers;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;

use crate::config::{Config, ListenerConfig};
use crate::observe::metrics::Metrics;
use conn_clock::{ActiveRequest, ConnClock};

/// What serves the requests of the edge's connections.
pub trait App: Send + Sync + 'static {
    /// The response body; it keeps `request` (the connection's count of
    /// requests in flight) until it is done.
    type Body: http_body::Body<Data = Bytes, Error = Box<dyn std::error::Error + Send + Sync>>
        + Send
        + 'static;

    /// The config in effect: listeners re-read their limits from it after
    /// a reload.
    fn config(&self) -> Arc<Config>;

    fn metrics(&self) -> &Metrics;

    /// Answers one request. `Err` aborts the exchange without a response
    /// (HTTP/2 `RST_STREAM`, HTTP/1.1 connection closed).
    fn handle(
        &self,
        request: ActiveRequest,
        req: Request<Incoming>,
    ) -> impl Future<Output = Result<Response<Self::Body>, filters::StreamReset>> + Send;
}

/// What the listener knows about the connection a request came on.
pub struct ConnInfo {
    /// The connection's client address: the TCP peer, or the source in its
    /// PROXY protocol header.
    pub peer: SocketAddr,
    /// The TCP peer (the load balancer) when a PROXY header named another
    /// source.
    pub proxied_by: Option<SocketAddr>,
    pub listener: Arc<str>,
    /// `http` or `https`, for `x-forwarded-proto`.
    pub scheme: &'static str,
    /// The JA4 fingerprint of the client's ClientHello (TLS listeners;
    /// see [`ja4`]).
    pub ja4: Option<Arc<str>>,
    /// The listener's settings: trusted proxies and request limits.
    pub config: Arc<ListenerConfig>,
    /// Requests in flight and the header read / idle clocks.
    pub clock: Arc<ConnClock>,
    /// A WebSocket tunnel to run once hyper hands the connection over.
    pub tunnel: tunnel::TunnelSlot,
}
