//! The access log: one line per request, written when the response body
//! has been sent (or the client went away), so it can say how many bytes
//! went out and how long the whole exchange took, not only the time to the
//! response head.
//!
//! Target `flashgate::access`; with `log.format = "json"` each line is one
//! JSON object with the fields flattened (see docs/config.md).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, StatusCode};

/// Where the upstream part of a request's time went.
#[derive(Debug, Default, Clone, Copy)]
pub struct UpstreamTiming {
    /// Getting a connection to the endpoint: ~0 for a pooled one, the TCP
    /// connect for a new one (last attempt).
    pub connect: Option<Duration>,
    /// From writing the request to the response head (last attempt).
    pub first_byte: Option<Duration>,
}

/// One request's line, kept with its response body until the body ends.
pub struct AccessRecord {
    pub listener: Arc<str>,
    pub client: IpAddr,
    /// The TCP peer (or PROXY source) the request came from.
    pub peer: SocketAddr,
    pub method: Method,
    pub path: String,
    pub route: Arc<str>,
    pub upstream: Option<Arc<str>>,
    pub status: StatusCode,
    pub request_id: HeaderValue,
    pub started: Instant,
    /// Time to the response head.
    pub head: Duration,
    pub timing: UpstreamTiming,
    /// The load level when the request was admitted.
    pub load_level: u8,
    /// The bot rules' score (1 automated .. 99 human).
    pub bot_score: u8,
    /// The client's JA4 fingerprint, when known.
    pub ja4: Option<Arc<str>>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl AccessRecord {
    /// Writes the line. `bytes`: response body bytes handed to the client
    /// connection; `complete`: whether the body was sent to its end.
    pub fn emit(&self, bytes: u64, complete: bool) {
        tracing::info!(
            target: "flashgate::access",
            listener = %self.listener,
            client = %self.client,
            peer = %self.peer,
            method = %self.method,
            path = self.path.as_str(),
            route = &*self.route,
            upstream = self.upstream.as_deref().unwrap_or("-"),
            status = self.status.as_u16(),
            bytes,
            complete,
            ms = ms(self.head),
            total_ms = ms(self.started.elapsed()),
            upstream_connect_ms = self.timing.connect.map(ms),
            upstream_first_byte_ms = self.timing.first_byte.map(ms),
            load_level = self.load_level,
            bot_score = self.bot_score,
            ja4 = self.ja4.as_deref().unwrap_or("-"),
            request_id = self.request_id.to_str().unwrap_or("-"),
        );
    }
}
