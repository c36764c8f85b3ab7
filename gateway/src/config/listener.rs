//! `[[listeners]]` and `[listeners.tls]`: where clients connect and what
//! one client may cost. Only the shape is checked here; the certificate
//! files are loaded where they are served (`edge::tls`), so `flashgate
//! check` and a reload load them once, with the key paths given here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Dur, Size};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// HTTP/1.1: time from the first byte of a request head to its end
    /// (for a new connection: from the start of HTTP, so also the time to
    /// its first bytes). A client that dribbles a head is cut off
    /// (slowloris); an idle keep-alive connection is not affected.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: Dur,
    /// A connection with no request in flight (HTTP/1.1 between keep-alive
    /// requests, HTTP/2 with no open stream) for this long is closed
    /// gracefully (HTTP/2: GOAWAY). The default, 75s, is above an ALB's
    /// 60s idle timeout: behind a load balancer the balancer must close
    /// idle connections first, or it will now and then send a request on a
    /// connection we are closing and answer 502.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Dur,
    /// A connection whose writes wait this long for the client to take a
    /// byte (its receive window stays shut) is dropped, whatever is in
    /// flight: a client that never reads cannot hold a response, its
    /// buffers and its upstream leg. nginx's `send_timeout` is 60s;
    /// Envoy's stream idle timeout 5 minutes. 60s (nginx's): a phone
    /// that loses signal for less keeps its download.
    #[serde(default = "default_send_timeout")]
    pub send_timeout: Dur,
    /// A request body being read in (routes with `buffer_requests`, the
    /// default) that brings no byte for this long gets 408 and the
    /// connection is closed. nginx's `client_body_timeout` is 60s; so is
    /// this.
    #[serde(default = "default_send_timeout")]
    pub body_read_timeout: Dur,
    /// An HTTP/2 stream whose response has made no progress (no frame
    /// taken by the client's window) for this long is reset, so a client
    /// that never opens its streams' windows holds their buffers no
    /// longer. Envoy's stream idle timeout is 5 minutes; 60s here, as
    /// `send_timeout`, since a stream with a shut window is the same
    /// stalled reader. Server-sent events need a heartbeat under it.
    #[serde(default = "default_send_timeout")]
    pub stream_idle_timeout: Dur,
    /// An HTTP/1.1 keep-alive connection idle this long is parked: its
    /// HTTP state and buffers (about 16 KiB) are freed and only the socket
    /// (and TLS session) is kept until the client sends again. Parking and
    /// waking cost a little CPU, so connections busy with back-to-back
    /// requests are left alone. `0s`: park as soon as a connection is idle.
    #[serde(default = "default_park_idle_after")]
    pub park_idle_after: Dur,
    /// A WebSocket (upgraded) tunnel through which no byte has passed in
    /// either direction for this long is closed (both sides), releasing
    /// its cluster slot. The default, 5 minutes, is Envoy's idle timeout
    /// for upgraded streams; applications that ping (every 30-60s, as
    /// most do) never meet it, while tunnels to clients that vanished
    /// without a FIN do not hold slots forever.
    #[serde(default = "default_websocket_idle_timeout")]
    pub websocket_idle_timeout: Dur,
    /// Largest request head (request line + headers) accepted, HTTP/1.1 and
    /// HTTP/2 alike. Larger heads get 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: Size,
    /// TLS termination; absent = plain HTTP/1.1 and h2c.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Every connection starts with a PROXY protocol v1 or v2 header (an
    /// NLB in front); a connection without a valid one is closed.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Time a connection has to send its whole PROXY header.
    #[serde(default = "default_proxy_protocol_timeout")]
    pub proxy_protocol_timeout: Dur,
    /// Peers (load balancers, CDNs) whose `x-forwarded-for` is believed.
    #[serde(default)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Most request header fields (HTTP/1.1; 431 above).
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Longest request target (path and query); 414 above.
    #[serde(default = "default_max_uri_bytes")]
    pub max_uri_bytes: Size,
    /// Largest request body; 413 above, counted as it streams.
    #[serde(default = "default_max_body")]
    pub max_body: Size,
    /// Open client connections at most; more are closed at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Open connections per client address at most (0 = no limit).
    #[serde(default)]
    pub max_connections_per_ip: usize,
    /// HTTP/2 streams per connection at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
}

/// `[listeners.tls]`: certificates chosen by SNI, reloaded from disk.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain + key PEM files. The first pair is the default
    /// for clients without SNI or with a name no certificate covers.
    pub certs: Vec<CertPair>,
    /// How often the files' modification times are checked.
    #[serde(default = "default_tls_reload_interval")]
    pub reload_interval: Dur,
    /// Time a client has to finish the TLS handshake.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: Dur,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn default_tls_reload_interval() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}
fn default_handshake_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}
fn default_proxy_protocol_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(5))
}
fn default_max_headers() -> usize {
    100
}
fn default_max_uri_bytes() -> Size {
    Size(8 * 1024)
}
fn default_max_body() -> Size {
    Size(16 << 20)
}
fn default_max_connections() -> usize {
    50_000
}
fn default_max_concurrent_streams() -> u32 {
    256
}

fn default_header_read_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}

fn default_send_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(60))
}

fn default_idle_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(75))
}

fn default_websocket_idle_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(300))
}

fn default_park_idle_after() -> Dur {
    Dur(std::time::Duration::from_secs(1))
}

fn default_max_header_bytes() -> Size {
    Size(64 * 1024)
}

impl ListenerConfig {
    /// Checks this entry's own keys; `p` is its key path (`listeners[N]`).
    pub(super) fn validate(&self, p: &str) -> Result<(), ConfigError> {
        let at = |key: &str, msg: &str| Err(ConfigError::at(format!("{p}.{key}"), msg));
        if self.name.trim().is_empty() {
            return at("name", "must not be empty");
        }
        if self.max_header_bytes.0 < 8 * 1024 || self.max_header_bytes.0 > 16 << 20 {
            return at("max_header_bytes", "must be between 8KiB and 16MiB");
        }
        if self.header_read_timeout.0.is_zero() {
            return at("header_read_timeout", "must be above zero");
        }
        if self.idle_timeout.0.is_zero() {
            return at("idle_timeout", "must be above zero");
        }
        if self.send_timeout.0.is_zero() {
            return at("send_timeout", "must be above zero");
        }
        if self.stream_idle_timeout.0.is_zero() {
            return at("stream_idle_timeout", "must be above zero");
        }
        if self.body_read_timeout.0.is_zero() {
            return at("body_read_timeout", "must be above zero");
        }
        if self.websocket_idle_timeout.0.is_zero() {
            return at("websocket_idle_timeout", "must be above zero");
        }
        if self.max_headers == 0 || self.max_headers > 10_000 {
            return at("max_headers", "must be between 1 and 10000");
        }
        if self.max_uri_bytes.0 < 256 || self.max_uri_bytes.0 > self.max_header_bytes.0 {
            return at(
                "max_uri_bytes",
                "must be at least 256B and not above max_header_bytes",
            );
        }
        if self.max_connections == 0 {
            return at("max_connections", "must be above zero");
        }
        if self.max_concurrent_streams == 0 {
            return at("max_concurrent_streams", "must be above zero");
        }
        if self.proxy_protocol_timeout.0.is_zero() {
            return at("proxy_protocol_timeout", "must be above zero");
        }
        // The connection clocks add these to instants: keep them sane.
        const DAY: Duration = Duration::from_secs(24 * 3600);
        if self.header_read_timeout.0 > DAY {
            return at("header_read_timeout", "must be at most 24h");
        }
        if self.idle_timeout.0 > DAY {
            return at("idle_timeout", "must be at most 24h");
        }
        if let Some(tls) = &self.tls {
            tls.validate(&format!("{p}.tls"))?;
        }
        Ok(())
    }
}

impl TlsConfig {
    /// The shape only: at least one pair, and durations the reload poller
    /// and the handshake timer can use. Whether the files load is for
    /// whoever loads them (`edge::tls`).
    pub(super) fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if self.certs.is_empty() {
            return Err(ConfigError::at(
                format!("{p}.certs"),
                "at least one { cert, key } pair is required",
            ));
        }
        for (key, d) in [
            ("reload_interval", self.reload_interval),
            ("handshake_timeout", self.handshake_timeout),
        ] {
            if d.0.is_zero() {
                return Err(ConfigError::at(format!("{p}.{key}"), "must be above zero"));
            }
        }
        Ok(())
    }
}

/// Two listen addresses overlap when they share a port and either binds all
/// interfaces or both bind the same address. Port 0 (any free port) never
/// overlaps.
pub(super) fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}
