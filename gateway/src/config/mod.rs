//! Configuration: one TOML file -> typed structs -> validated as a whole.
//!
//! Parsing and validation are two steps, like sozu's and Pingora's: serde
//! (with `deny_unknown_fields` everywhere) catches typos and bad values at
//! their key path, then [`Config::validate`] checks what only the whole file
//! can tell (names that must exist, listeners that overlap). Either way the
//! first error comes back with its key path, e.g.
//! `routes[2].upstream: unknown upstream "catalgo"`. Nothing listens until
//! the whole file is valid, and a reload with an invalid file changes nothing.
//!
//! Every key and its default is documented in `docs/config.md`.

pub mod cache;
pub mod otlp;
pub mod units;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use filters::{FailMode, Priority};
use serde::Deserialize;

pub use cache::{CacheConfig, RedisConfig, RouteCacheConfig};
pub use otlp::TracingConfig;
pub use units::{Dur, Rate, Size};

/// A config error: where (key path) and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// Dotted key path such as `upstreams[0].health.interval`; `line N` when
    /// the TOML itself does not parse.
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub filters: Vec<FilterConfig>,
    /// Client identity from JWTs (see `crate::pipeline::identity::jwt`).
    #[serde(default)]
    pub jwt: Option<crate::pipeline::identity::jwt::JwtConfig>,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// The response cache (used by routes with `cache = {...}`).
    #[serde(default)]
    pub cache: CacheConfig,
    /// The cache's shared L2; without it each gateway caches on its own.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// OpenTelemetry span export (OTLP/HTTP); absent = none.
    #[serde(default)]
    pub tracing: Option<TracingConfig>,
}

/// What SIGTERM does (see `Gateway::shutdown`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After SIGTERM `/readyz` answers 503 at once, but the listeners keep
    /// accepting and serving this long, so the load balancer sees the pod
    /// leave rotation before connections are refused.
    #[serde(default = "default_drain_delay")]
    pub drain_delay: Dur,
    /// Then the listeners stop accepting and open connections get this long
    /// to finish their in-flight requests.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Dur,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_delay: default_drain_delay(),
            drain_timeout: default_drain_timeout(),
        }
    }
}

fn default_drain_delay() -> Dur {
    Dur(std::time::Duration::ZERO)
}

fn default_drain_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(30))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Loopback by default: the admin port can reload config and purge caches.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// Bearer token for mutating calls. Without one, mutating calls are
    /// refused; a non-loopback admin listener requires one.
    #[serde(default)]
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            token: None,
        }
    }
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter directive (`info`, `gateway=debug,warn`). The
    /// `RUST_LOG` environment variable overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
    /// One line per request (route, upstream, status, latency).
    #[serde(default = "yes")]
    pub access_log: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            format: LogFormat::Text,
            access_log: true,
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

fn yes() -> bool {
    true
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    /// Power of two random choices by in-flight requests.
    LeastRequest,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// `host:port` of each endpoint; host names are resolved per connection.
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub lb: LbPolicy,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Time from picking an endpoint to its response head, connect included
    /// (504). Must be above `connect_timeout`.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: Dur,
    /// Extra attempts for idempotent requests without a body after a connect
    /// failure or a connection reset before any response (on another
    /// endpoint when there is one).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Requests in flight to this cluster at most; more get 503 at once.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_requests: usize,
    /// Idle keep-alive connections kept per endpoint.
    #[serde(default = "default_max_idle")]
    pub max_idle_per_endpoint: usize,
    /// An idle pooled connection is closed after this long.
    #[serde(default = "default_pool_idle_timeout")]
    pub idle_timeout: Dur,
    #[serde(default)]
    pub health: Option<HealthConfig>,
    #[serde(default)]
    pub outlier: OutlierConfig,
}

fn default_connect_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(1))
}
fn default_request_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(15))
}
fn default_retries() -> u32 {
    1
}
fn default_max_concurrent() -> usize {
    1024
}
fn default_max_idle() -> usize {
    256
}
fn default_pool_idle_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(60))
}

/// Active health checking: `GET path` on every endpoint every `interval`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "default_health_interval")]
    pub interval: Dur,
    #[serde(default = "default_health_timeout")]
    pub timeout: Dur,
    /// Consecutive passes that bring an unhealthy endpoint back.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures that take an endpoint out.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
}

fn default_health_path() -> String {
    "/healthz".into()
}
fn default_health_interval() -> Dur {
    Dur(std::time::Duration::from_secs(5))
}
fn default_health_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(1))
}
fn default_healthy_threshold() -> u32 {
    2
}
fn default_unhealthy_threshold() -> u32 {
    3
}

/// Passive outlier ejection from live traffic.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// Consecutive 5xx answers or connect failures that eject an endpoint;
    /// 0 turns passive ejection off.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// First ejection lasts this long; each further ejection adds as much.
    #[serde(default = "default_base_ejection")]
    pub base_ejection: Dur,
    #[serde(default = "default_max_ejection")]
    pub max_ejection: Dur,
    /// Never eject more than this share of a cluster (at least one endpoint
    /// may always be ejected), so a bad deploy cannot empty a cluster.
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: default_consecutive_failures(),
            base_ejection: default_base_ejection(),
            max_ejection: default_max_ejection(),
            max_ejection_percent: default_max_ejection_percent(),
        }
    }
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_base_ejection() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}
fn default_max_ejection() -> Dur {
    Dur(std::time::Duration::from_secs(300))
}
fn default_max_ejection_percent() -> u32 {
    50
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Used in metrics and logs; defaults to `host` + `path_prefix`.
    #[serde(default)]
    pub name: Option<String>,
    /// Exact host (`shop.example.com`) or suffix wildcard (`*.example.com`);
    /// absent = any host.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default = "default_prefix")]
    pub path_prefix: String,
    pub upstream: String,
    #[serde(default)]
    pub priority: Priority,
    /// Filter names, run in this order.
    #[serde(default)]
    pub filters: Vec<String>,
    /// Marks the checkout route (see `crate::pipeline::admission::checkout`).
    #[serde(default)]
    pub checkout: Option<crate::pipeline::admission::checkout::CheckoutRouteConfig>,
    /// Pass HTTP/1.1 `Upgrade` requests (WebSocket) through to the upstream.
    #[serde(default)]
    pub websocket: bool,
    /// Cache this route's responses (see `docs/cache.md`).
    #[serde(default)]
    pub cache: Option<RouteCacheConfig>,
}

fn default_prefix() -> String {
    "/".into()
}

impl RouteConfig {
    pub fn display_name(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!(
                "{}{}",
                self.host.as_deref().unwrap_or("*"),
                self.path_prefix
            ),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    pub name: String,
    /// A built-in filter kind (see `filters::native::KNOWN`).
    #[serde(default)]
    pub native: Option<String>,
    /// A proxy-wasm module (`.wasm`), relative to the working directory.
    #[serde(default)]
    pub wasm: Option<PathBuf>,
    /// Handed to the filter as its configuration: JSON for native filters,
    /// the plugin configuration (`proxy_on_configure`) for Wasm filters.
    #[serde(default)]
    pub config: String,
    /// What a failing Wasm filter (trap, timeout, out of memory) does to
    /// the request: `open` skips the filter, `closed` answers 500.
    #[serde(default)]
    pub fail: FailMode,
    /// Wasm: wall-clock budget of one call into the guest.
    #[serde(default = "default_wasm_timeout")]
    pub timeout: Dur,
    /// Wasm: most linear memory one instance may use.
    #[serde(default = "default_wasm_memory")]
    pub memory: Size,
    /// Wasm: instances of the module (each serves many requests, one call
    /// at a time); default one per CPU.
    #[serde(default)]
    pub instances: Option<usize>,
    /// Wasm: most body bytes the filter may hold while it pauses on a
    /// body (past it: 413 for a request, 502 for a response).
    #[serde(default = "default_body_limit")]
    pub body_limit: Size,
    /// Wasm: deliver body and trailer callbacks. `false` for header-only
    /// filters: their routes then stream bodies untouched.
    #[serde(default = "default_bodies")]
    pub bodies: bool,
    /// Wasm: how often the module file is checked for changes (hot
    /// reload); `"0s"` turns watching off.
    #[serde(default = "default_watch")]
    pub watch: Dur,
}

fn default_body_limit() -> Size {
    Size(filters::DEFAULT_BODY_LIMIT as u64)
}

fn default_bodies() -> bool {
    true
}

fn default_watch() -> Dur {
    Dur(std::time::Duration::from_secs(1))
}

fn default_wasm_timeout() -> Dur {
    Dur(std::time::Duration::from_millis(5))
}

fn default_wasm_memory() -> Size {
    Size(64 << 20)
}

impl FilterConfig {
    /// The Wasm limits this entry asks for.
    pub fn wasm_limits(&self) -> filters::wasm::WasmLimits {
        let defaults = filters::wasm::WasmLimits::default();
        filters::wasm::WasmLimits {
            timeout: self.timeout.0,
            memory: self.memory.0,
            instances: self.instances.unwrap_or(defaults.instances),
        }
    }

    /// Builds the filter this entry describes; `i` is its index, for the
    /// key path of an error. Loading a Wasm module compiles it (once per
    /// distinct module), starts an instance and hands it its config, so a
    /// module that does not load or refuses its config is a config error.
    pub fn build(&self, i: usize) -> Result<Built, ConfigError> {
        let p = format!("filters[{i}]");
        match (&self.native, &self.wasm) {
            (Some(kind), None) => filters::native::build(kind, &self.name, &self.config)
                .map(|factory| Built {
                    factory,
                    wasm: None,
                })
                .map_err(|e| {
                    let key = if matches!(e, filters::FilterError::UnknownNative(_)) {
                        "native"
                    } else {
                        "config"
                    };
                    ConfigError::at(format!("{p}.{key}"), e.to_string())
                }),
            (None, Some(path)) => {
                let wasm = filters::wasm::WasmFilter::load(
                    &self.name,
                    path,
                    &self.config,
                    self.wasm_limits(),
                    self.fail,
                )
                .map_err(|e| {
                    let key = if matches!(e, filters::FilterError::Config(_)) {
                        "config"
                    } else {
                        "wasm"
                    };
                    ConfigError::at(format!("{p}.{key}"), e.to_string())
                })?;
                let limit = usize::try_from(self.body_limit.0).unwrap_or(usize::MAX);
                let mut wasm = wasm.with_body_limit(limit);
                if !self.bodies {
                    wasm = wasm.without_bodies();
                }
                if !self.watch.0.is_zero() {
                    wasm.watch(self.watch.0);
                }
                Ok(Built {
                    factory: wasm.clone(),
                    wasm: Some(wasm),
                })
            }
            _ => Err(ConfigError::at(p, "set exactly one of `native` or `wasm`")),
        }
    }
}

/// A filter built from its config entry.
pub struct Built {
    pub factory: std::sync::Arc<dyn filters::FilterFactory>,
    /// Set for Wasm filters, whose metrics the admin listener renders.
    pub wasm: Option<std::sync::Arc<filters::wasm::WasmFilter>>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::at(path.display().to_string(), format!("cannot read: {e}"))
        })?;
        Config::parse(&text)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            let path = if path == "." || path.is_empty() {
                line.map_or_else(|| "config".to_string(), |l| format!("line {l}"))
            } else {
                path
            };
            ConfigError::at(path, inner.message().trim().to_string())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: cross references, uniqueness, overlaps.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let admin = &self.admin;
        if !admin.listen.ip().is_loopback() && admin.token.is_none() {
            return Err(ConfigError::at(
                "admin.token",
                "required when admin.listen is not a loopback address",
            ));
        }
        if let Some(t) = &admin.token {
            if t.trim().is_empty() {
                return Err(ConfigError::at("admin.token", "must not be empty"));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::at("log.level", e.to_string()));
        }

        if self.listeners.is_empty() {
            return Err(ConfigError::at(
                "listeners",
                "at least one [[listeners]] entry is required",
            ));
        }
        let mut names = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let p = format!("listeners[{i}]");
            if l.name.trim().is_empty() {
                return Err(ConfigError::at(format!("{p}.name"), "must not be empty"));
            }
            if !names.insert(l.name.as_str()) {
                return Err(ConfigError::at(
                    format!("{p}.name"),
                    format!("duplicate listener name {:?}", l.name),
                ));
            }
            if l.max_header_bytes.0 < 8 * 1024 || l.max_header_bytes.0 > 16 << 20 {
                return Err(ConfigError::at(
                    format!("{p}.max_header_bytes"),
                    "must be between 8KiB and 16MiB",
                ));
            }
            if l.header_read_timeout.0.is_zero() {
                return Err(ConfigError::at(
                    format!("{p}.header_read_timeout"),
                    "must be above zero",
                ));
            }
            if l.idle_timeout.0.is_zero() {
                return Err(ConfigError::at(
                    format!("{p}.idle_timeout"),
                    "must be above zero",
                ));
            }
            if l.websocket_idle_timeout.0.is_zero() {
                return Err(ConfigError::at(
                    format!("{p}.websocket_idle_timeout"),
                    "must be above zero",
                ));
            }
            crate::edge::limits::validate_listener(l, &p)?;
            if let Some(tls) = &l.tls {
                crate::edge::tls::validate(tls, &format!("{p}.tls"))?;
            }
            if overlaps(l.listen, admin.listen) {
                return Err(ConfigError::at(
                    format!("{p}.listen"),
                    format!("{} overlaps admin.listen {}", l.listen, admin.listen),
                ));
            }
            for (j, other) in self.listeners[..i].iter().enumerate() {
                if overlaps(l.listen, other.listen) {
                    return Err(ConfigError::at(
                        format!("{p}.listen"),
                        format!("{} overlaps listeners[{j}] ({})", l.listen, other.listen),
                    ));
                }
            }
        }

        if self.shutdown.drain_timeout.0.is_zero() {
            return Err(ConfigError::at(
                "shutdown.drain_timeout",
                "must be above zero",
            ));
        }

        let mut upstreams = HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let p = format!("upstreams[{i}]");
            if u.name.trim().is_empty() {
                return Err(ConfigError::at(format!("{p}.name"), "must not be empty"));
            }
            if !upstreams.insert(u.name.as_str()) {
                return Err(ConfigError::at(
                    format!("{p}.name"),
                    format!("duplicate upstream name {:?}", u.name),
                ));
            }
            if u.endpoints.is_empty() {
                return Err(ConfigError::at(
                    format!("{p}.endpoints"),
                    "at least one endpoint is required",
                ));
            }
            let mut seen = HashSet::new();
            for (j, e) in u.endpoints.iter().enumerate() {
                if let Err(m) = check_authority(e) {
                    return Err(ConfigError::at(format!("{p}.endpoints[{j}]"), m));
                }
                if !seen.insert(e.as_str()) {
                    return Err(ConfigError::at(
                        format!("{p}.endpoints[{j}]"),
                        format!("duplicate endpoint {e:?}"),
                    ));
                }
            }
            for (key, d) in [
                ("connect_timeout", u.connect_timeout),
                ("request_timeout", u.request_timeout),
                ("idle_timeout", u.idle_timeout),
                ("outlier.base_ejection", u.outlier.base_ejection),
            ] {
                if d.0.is_zero() {
                    return Err(ConfigError::at(format!("{p}.{key}"), "must be above zero"));
                }
            }
            if u.connect_timeout >= u.request_timeout {
                return Err(ConfigError::at(
                    format!("{p}.connect_timeout"),
                    format!(
                        "must be below request_timeout ({}), which includes the connect",
                        u.request_timeout
                    ),
                ));
            }
            if u.max_concurrent_requests == 0 {
                return Err(ConfigError::at(
                    format!("{p}.max_concurrent_requests"),
                    "must be above zero",
                ));
            }
            if u.retries > 5 {
                return Err(ConfigError::at(
                    format!("{p}.retries"),
                    "at most 5 (retries multiply load on a sick cluster)",
                ));
            }
            if let Some(h) = &u.health {
                if !h.path.starts_with('/') {
                    return Err(ConfigError::at(
                        format!("{p}.health.path"),
                        "must start with '/'",
                    ));
                }
                if h.interval.0.is_zero() {
                    return Err(ConfigError::at(
                        format!("{p}.health.interval"),
                        "must be above zero",
                    ));
                }
                if h.timeout.0.is_zero() {
                    return Err(ConfigError::at(
                        format!("{p}.health.timeout"),
                        "must be above zero",
                    ));
                }
                if h.healthy_threshold == 0 {
                    return Err(ConfigError::at(
                        format!("{p}.health.healthy_threshold"),
                        "must be at least 1",
                    ));
                }
                if h.unhealthy_threshold == 0 {
                    return Err(ConfigError::at(
                        format!("{p}.health.unhealthy_threshold"),
                        "must be at least 1",
                    ));
                }
            }
            let o = &u.outlier;
            if o.max_ejection_percent > 100 {
                return Err(ConfigError::at(
                    format!("{p}.outlier.max_ejection_percent"),
                    "must be between 0 and 100",
                ));
            }
            if o.max_ejection < o.base_ejection {
                return Err(ConfigError::at(
                    format!("{p}.outlier.max_ejection"),
                    "must not be below base_ejection",
                ));
            }
        }

        let mut filter_names = HashSet::new();
        for (i, f) in self.filters.iter().enumerate() {
            let p = format!("filters[{i}]");
            if f.name.trim().is_empty() {
                return Err(ConfigError::at(format!("{p}.name"), "must not be empty"));
            }
            if !filter_names.insert(f.name.as_str()) {
                return Err(ConfigError::at(
                    format!("{p}.name"),
                    format!("duplicate filter name {:?}", f.name),
                ));
            }
            if f.timeout.0.is_zero() {
                return Err(ConfigError::at(
                    format!("{p}.timeout"),
                    "must be above zero",
                ));
            }
            if f.memory.0 < 64 * 1024 {
                return Err(ConfigError::at(
                    format!("{p}.memory"),
                    "must be at least 64KiB (one Wasm page)",
                ));
            }
            if matches!(f.instances, Some(n) if n == 0 || n > 256) {
                return Err(ConfigError::at(
                    format!("{p}.instances"),
                    "must be between 1 and 256",
                ));
            }
            f.build(i)?;
        }

        let mut route_names = HashSet::new();
        let mut matches = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let p = format!("routes[{i}]");
            if !route_names.insert(r.display_name()) {
                return Err(ConfigError::at(
                    format!("{p}.name"),
                    format!("duplicate route name {:?}", r.display_name()),
                ));
            }
            if !r.path_prefix.starts_with('/') {
                return Err(ConfigError::at(
                    format!("{p}.path_prefix"),
                    "must start with '/'",
                ));
            }
            if let Some(h) = &r.host {
                if let Err(m) = check_host_pattern(h) {
                    return Err(ConfigError::at(format!("{p}.host"), m));
                }
            }
            let key = (
                r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                r.path_prefix.clone(),
            );
            if !matches.insert(key) {
                return Err(ConfigError::at(
                    format!("{p}.path_prefix"),
                    "another route already has the same host and path_prefix",
                ));
            }
            if !upstreams.contains(r.upstream.as_str()) {
                return Err(ConfigError::at(
                    format!("{p}.upstream"),
                    format!("unknown upstream {:?}", r.upstream),
                ));
            }
            for (j, f) in r.filters.iter().enumerate() {
                if !filter_names.contains(f.as_str()) {
                    return Err(ConfigError::at(
                        format!("{p}.filters[{j}]"),
                        format!("unknown filter {f:?}"),
                    ));
                }
            }
            if r.checkout.is_some() {
                crate::pipeline::admission::checkout::validate_route(r, &p, self.jwt.is_some())?;
            }
            if let Some(c) = &r.cache {
                c.validate(&p)?;
            }
        }
        if let Some(jwt) = &self.jwt {
            crate::pipeline::identity::jwt::JwtVerifier::new(jwt)?;
        }
        self.cache.validate()?;
        if let Some(r) = &self.redis {
            r.validate()?;
        }
        if let Some(t) = &self.tracing {
            t.validate()?;
        }
        Ok(())
    }
}

/// Two listen addresses overlap when they share a port and either binds all
/// interfaces or both bind the same address. Port 0 (any free port) never
/// overlaps.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// `host:port` with a non-zero port; IPv6 literals in brackets.
fn check_authority(s: &str) -> Result<(), String> {
    let auth: http::uri::Authority = s
        .parse()
        .map_err(|_| format!("invalid endpoint {s:?}: expected host:port"))?;
    match auth.port_u16() {
        Some(0) | None => Err(format!(
            "invalid endpoint {s:?}: expected host:port with a non-zero port"
        )),
        Some(_) if auth.as_str().contains('@') => Err(format!(
            "invalid endpoint {s:?}: credentials are not allowed"
        )),
        Some(_) => Ok(()),
    }
}

fn check_host_pattern(h: &str) -> Result<(), String> {
    let name = h.strip_prefix("*.").unwrap_or(h);
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid host {h:?}: expected a host name or *.suffix (no port)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[[listeners]]
name = "public"
listen = "127.0.0.1:8080"

[[upstreams]]
name = "catalog"
endpoints = ["127.0.0.1:9000"]

[[routes]]
path_prefix = "/"
upstream = "catalog"
"#;

    fn err(extra: &str) -> ConfigError {
        Config::parse(&format!("{BASE}{extra}")).expect_err("config should be refused")
    }

    #[test]
    fn base_is_valid_with_defaults() {
        let c = Config::parse(BASE).unwrap();
        assert_eq!(c.admin.listen, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(c.upstreams[0].lb, LbPolicy::RoundRobin);
        assert_eq!(c.upstreams[0].retries, 1);
        assert_eq!(c.routes[0].priority, Priority::Normal);
        assert_eq!(c.listeners[0].max_header_bytes, Size(65536));
        assert_eq!(
            c.listeners[0].header_read_timeout,
            Dur(std::time::Duration::from_secs(10))
        );
        assert_eq!(
            c.listeners[0].idle_timeout,
            Dur(std::time::Duration::from_secs(75))
        );
    }

    #[test]
    fn unknown_key_has_its_path() {
        let e = Config::parse(&BASE.replace(
            "upstream = \"catalog\"",
            "upstream = \"catalog\"\nupstrem = 1",
        ))
        .unwrap_err();
        assert_eq!(e.path, "routes[0].upstrem");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn bad_values_have_their_paths() {
        let e = Config::parse(&BASE.replace(
            "endpoints = [\"127.0.0.1:9000\"]",
            "endpoints = [\"127.0.0.1:9000\"]\nconnect_timeout = \"5x\"",
        ))
        .unwrap_err();
        assert_eq!(e.path, "upstreams[0].connect_timeout");
        let e = Config::parse(&BASE.replace(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\nmax_header_bytes = \"lots\"",
        ))
        .unwrap_err();
        assert_eq!(e.path, "listeners[0].max_header_bytes");
        let e = Config::parse(&BASE.replace(
            "upstream = \"catalog\"",
            "upstream = \"catalog\"\npriority = \"urgent\"",
        ))
        .unwrap_err();
        assert_eq!(e.path, "routes[0].priority");
        let e = Config::parse(&BASE.replace(
            "endpoints = [\"127.0.0.1:9000\"]",
            "endpoints = [\"127.0.0.1:9000\"]\nlb = \"random\"",
        ))
        .unwrap_err();
        assert_eq!(e.path, "upstreams[0].lb");
    }

    #[test]
    fn toml_syntax_error_names_the_line() {
        let e = Config::parse("[[listeners]]\nname = \n").unwrap_err();
        assert_eq!(e.path, "line 2", "{e}");
    }

    #[test]
    fn unknown_upstream() {
        let e = err("[[routes]]\npath_prefix = \"/x\"\nupstream = \"catalgo\"\n");
        assert_eq!(e.path, "routes[1].upstream");
        assert!(e.message.contains("catalgo"));
    }

    #[test]
    fn overlapping_listeners() {
        let e = err("[[listeners]]\nname = \"b\"\nlisten = \"0.0.0.0:8080\"\n");
        assert_eq!(e.path, "listeners[1].listen");
        let e = err("[[listeners]]\nname = \"b\"\nlisten = \"127.0.0.1:9901\"\n");
        assert_eq!(e.path, "listeners[1].listen");
        assert!(e.message.contains("admin"));
        // Different ports, and port 0, never overlap.
        Config::parse(&format!(
            "{BASE}[[listeners]]\nname = \"b\"\nlisten = \"0.0.0.0:8081\"\n"
        ))
        .unwrap();
        Config::parse(&format!("{BASE}[[listeners]]\nname = \"b\"\nlisten = \"127.0.0.1:0\"\n[[listeners]]\nname = \"c\"\nlisten = \"127.0.0.1:0\"\n")).unwrap();
    }

    #[test]
    fn duplicates_and_shapes() {
        assert_eq!(
            err("[[upstreams]]\nname = \"catalog\"\nendpoints = [\"a:1\"]\n").path,
            "upstreams[1].name"
        );
        assert_eq!(
            err("[[upstreams]]\nname = \"x\"\nendpoints = [\"nohost\"]\n").path,
            "upstreams[1].endpoints[0]"
        );
        assert_eq!(
            err("[[upstreams]]\nname = \"x\"\nendpoints = []\n").path,
            "upstreams[1].endpoints"
        );
        assert_eq!(
            err("[[routes]]\npath_prefix = \"/\"\nupstream = \"catalog\"\nname = \"other\"\n").path,
            "routes[1].path_prefix"
        );
        assert_eq!(
            err("[[routes]]\npath_prefix = \"nope\"\nupstream = \"catalog\"\n").path,
            "routes[1].path_prefix"
        );
        assert_eq!(
            err("[[routes]]\nhost = \"a.com:80\"\nupstream = \"catalog\"\n").path,
            "routes[1].host"
        );
    }

    #[test]
    fn filters_are_checked() {
        let e = err(
            "[[routes]]\npath_prefix = \"/f\"\nupstream = \"catalog\"\nfilters = [\"missing\"]\n",
        );
        assert_eq!(e.path, "routes[1].filters[0]");
        let e = err("[[filters]]\nname = \"h\"\nnative = \"headers\"\nconfig = '{\"bogus\": 1}'\n");
        assert_eq!(e.path, "filters[0].config");
        let e = err("[[filters]]\nname = \"h\"\nnative = \"nope\"\n");
        assert_eq!(e.path, "filters[0].native");
        let e = err("[[filters]]\nname = \"h\"\n");
        assert_eq!(e.path, "filters[0]");
        let e = err("[[filters]]\nname = \"h\"\nnative = \"headers\"\nfail = \"sometimes\"\n");
        assert_eq!(e.path, "filters[0].fail");
    }

    #[test]
    fn admin_off_loopback_needs_token() {
        let e = err("[admin]\nlisten = \"0.0.0.0:9901\"\n");
        assert_eq!(e.path, "admin.token");
        Config::parse(&format!(
            "{BASE}[admin]\nlisten = \"0.0.0.0:9901\"\ntoken = \"t\"\n"
        ))
        .unwrap();
    }

    #[test]
    fn health_and_outlier_bounds() {
        let e = err("[upstreams.health]\npath = \"healthz\"\n");
        assert_eq!(e.path, "upstreams[0].health.path");
        let e = err("[upstreams.health]\nunhealthy_threshold = 0\n");
        assert_eq!(e.path, "upstreams[0].health.unhealthy_threshold");
        let e = err("[upstreams.outlier]\nmax_ejection_percent = 101\n");
        assert_eq!(e.path, "upstreams[0].outlier.max_ejection_percent");
        let e = err("[upstreams.health]\ntimeout = \"0s\"\n");
        assert_eq!(e.path, "upstreams[0].health.timeout");
    }

    #[test]
    fn listener_timeouts_are_bounded() {
        for key in ["header_read_timeout", "idle_timeout"] {
            let e = Config::parse(&BASE.replace(
                "listen = \"127.0.0.1:8080\"",
                &format!("listen = \"127.0.0.1:8080\"\n{key} = \"0s\""),
            ))
            .unwrap_err();
            assert_eq!(e.path, format!("listeners[0].{key}"));
            let e = Config::parse(&BASE.replace(
                "listen = \"127.0.0.1:8080\"",
                &format!("listen = \"127.0.0.1:8080\"\n{key} = \"25h\""),
            ))
            .unwrap_err();
            assert_eq!(e.path, format!("listeners[0].{key}"));
        }
    }

    #[test]
    fn connect_timeout_below_request_timeout() {
        let e = Config::parse(&BASE.replace(
            "endpoints = [\"127.0.0.1:9000\"]",
            "endpoints = [\"127.0.0.1:9000\"]\nconnect_timeout = \"5s\"\nrequest_timeout = \"5s\"",
        ))
        .unwrap_err();
        assert_eq!(e.path, "upstreams[0].connect_timeout");
    }
}
