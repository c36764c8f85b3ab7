//! `[[routes]]`: host + path prefix -> upstream, with the route's filters,
//! cache and checkout settings. Names a route refers to are checked by
//! `Config::validate`, which sees the whole file.

use std::time::Duration;

use filters::Priority;
use serde::Deserialize;

use super::{ConfigError, Dur, RouteCacheConfig};

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
    /// Marks the checkout route (see `pipeline::admission::checkout`).
    #[serde(default)]
    pub checkout: Option<CheckoutRouteConfig>,
    /// Pass HTTP/1.1 `Upgrade` requests (WebSocket) through to the upstream.
    #[serde(default)]
    pub websocket: bool,
    /// Cache this route's responses (see `docs/cache.md`).
    #[serde(default)]
    pub cache: Option<RouteCacheConfig>,
    /// What a path with a percent-encoded slash or backslash (`%2F`,
    /// `%5C`) gets. `"reject"` (the default): 400, since an origin that
    /// decodes `%2F` before resolving dot segments serves
    /// `/a/..%2fadmin` as `/admin`, past every prefix rule here.
    /// `"keep"`: forwarded unchanged, for APIs that put encoded slashes
    /// in identifiers (Envoy's `path_with_escaped_slashes_action`).
    #[serde(default)]
    pub escaped_slashes: EscapedSlashes,
    /// Read the whole request body (memory, then a temp file, up to
    /// `max_body`) before an upstream slot is taken, as nginx's
    /// `proxy_request_buffering`: a client that sends slowly holds only
    /// its own connection. `false` for streaming uploads.
    #[serde(default = "yes")]
    pub buffer_requests: bool,
    /// Read the upstream's response at the upstream's pace (memory, then
    /// a temp file) and give its connection and slot back when it is in,
    /// as nginx's `proxy_buffering`: a client that reads slowly holds only
    /// its own connection. `false` for server-sent events and long polls.
    #[serde(default = "yes")]
    pub buffer_responses: bool,
    /// The answer a request of this route gets when overload sheds it (or
    /// its cluster's breaker is open), instead of a 503.
    #[serde(default)]
    pub fallback: Option<super::FallbackConfig>,
    /// Rate limits (see `config::rate_limit` and `docs/rate-limits.md`).
    #[serde(default)]
    pub rate_limit: Option<super::RouteRateLimit>,
    /// `"required"`: a request without a valid bearer token gets `401`
    /// with `www-authenticate` (needs `[jwt]`). `"optional"` (the
    /// default): a verified subject is forwarded, a missing one is not
    /// refused. Checkout routes always require one.
    #[serde(default)]
    pub identity: Identity,
    /// The `[[waiting_rooms]]` entry (by name) visitors of this route
    /// wait in (see `docs/waiting-room.md`).
    #[serde(default)]
    pub waiting_room: Option<String>,
}

/// `routes[].identity`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Identity {
    Required,
    #[default]
    Optional,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EscapedSlashes {
    #[default]
    Reject,
    Keep,
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

impl RouteConfig {
    /// Checks this entry's own keys; `p` is its key path (`routes[N]`).
    pub(super) fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if !self.path_prefix.starts_with('/') {
            return Err(ConfigError::at(
                format!("{p}.path_prefix"),
                "must start with '/'",
            ));
        }
        if let Some(h) = &self.host {
            if let Err(m) = check_host_pattern(h) {
                return Err(ConfigError::at(format!("{p}.host"), m));
            }
        }
        if let Some(c) = &self.checkout {
            // Overload shedding must never take the checkout's capacity.
            if self.priority != Priority::Critical {
                return Err(ConfigError::at(
                    format!("{p}.priority"),
                    "a checkout route must be \"critical\"",
                ));
            }
            c.validate(&format!("{p}.checkout"))?;
        }
        if let Some(c) = &self.cache {
            c.validate(p)?;
        }
        if let Some(f) = &self.fallback {
            f.validate(&format!("{p}.fallback"))?;
        }
        if let Some(l) = &self.rate_limit {
            l.validate(&format!("{p}.rate_limit"), self.checkout.is_some())?;
        }
        Ok(())
    }
}

/// `checkout = { sold_out_ttl = "1s", max_body_bytes = 16384, body_timeout = "10s" }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRouteConfig {
    /// How long a 409 from the core keeps the SKU sold out at the edge.
    #[serde(default = "default_sold_out_ttl")]
    pub sold_out_ttl: Dur,
    /// Largest checkout body read (413 above).
    #[serde(default = "default_checkout_max_body")]
    pub max_body_bytes: usize,
    /// Time the client has to send the whole (small) checkout body, which
    /// the edge reads before it forwards; a client that dribbles it gets
    /// 408 instead of holding a critical request open.
    #[serde(default = "default_checkout_body_timeout")]
    pub body_timeout: Dur,
    /// How long the gateway keeps retrying a checkout that carries an
    /// `Idempotency-Key` and that the core answered `503 unavailable`
    /// (Redis or the broker failing over; the key makes a repeat return
    /// the same order). `"0s"` turns it off.
    #[serde(default = "default_checkout_retry_budget")]
    pub retry_unavailable: Dur,
}

fn default_checkout_retry_budget() -> Dur {
    Dur(Duration::from_millis(1500))
}

fn default_checkout_body_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_sold_out_ttl() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_checkout_max_body() -> usize {
    16 * 1024
}

impl CheckoutRouteConfig {
    /// The body is read whole into memory: keep it small and its wait
    /// bounded. `p` is `routes[N].checkout`.
    fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if self.max_body_bytes == 0 || self.max_body_bytes > 1 << 20 {
            return Err(ConfigError::at(
                format!("{p}.max_body_bytes"),
                "must be between 1 and 1048576",
            ));
        }
        if self.body_timeout.0.is_zero() || self.body_timeout.0 > Duration::from_secs(3600) {
            return Err(ConfigError::at(
                format!("{p}.body_timeout"),
                "must be more than 0 and at most 1h",
            ));
        }
        if self.retry_unavailable.0 > Duration::from_secs(30) {
            return Err(ConfigError::at(
                format!("{p}.retry_unavailable"),
                "must be at most 30s (the buyer is waiting)",
            ));
        }
        Ok(())
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
