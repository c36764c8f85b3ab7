//! `[admin]`, `[log]` and `[shutdown]`: the process's own settings, fixed
//! at start except the admin token, `log.access_log` and `[shutdown]`.

use std::net::SocketAddr;

use serde::Deserialize;

use super::{ConfigError, Dur};

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

impl AdminConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !self.listen.ip().is_loopback() && self.token.is_none() {
            return Err(ConfigError::at(
                "admin.token",
                "required when admin.listen is not a loopback address",
            ));
        }
        if let Some(t) = &self.token {
            if t.trim().is_empty() {
                return Err(ConfigError::at("admin.token", "must not be empty"));
            }
        }
        Ok(())
    }
}

impl LogConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            return Err(ConfigError::at("log.level", e.to_string()));
        }
        Ok(())
    }
}

impl ShutdownConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.drain_timeout.0.is_zero() {
            return Err(ConfigError::at(
                "shutdown.drain_timeout",
                "must be above zero",
            ));
        }
        Ok(())
    }
}
