//! `[[filters]]`: named filters (built-in or proxy-wasm modules) that
//! routes refer to. Only the entry's shape is checked here: a filter's
//! `config` is for the filter to judge and a module is compiled to be
//! judged, both when the runtime builds the filter (`pipeline::runtime`),
//! once per config.

use std::path::PathBuf;

use filters::FailMode;
use serde::Deserialize;

use super::{ConfigError, Dur, Size};

#[derive(Debug, Clone, PartialEq, Deserialize)]
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
    /// Wasm: the root id the guest reads as `plugin_root_id` (Envoy's
    /// `root_id`). SDKs that register root contexts by name (the
    /// AssemblyScript SDK's `registerRootContext(..., "name")`) need it.
    #[serde(default)]
    pub root_id: String,
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
    /// Checks this entry's own keys; `p` is its key path (`filters[N]`).
    pub(super) fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(ConfigError::at(format!("{p}.name"), "must not be empty"));
        }
        if self.timeout.0.is_zero() {
            return Err(ConfigError::at(
                format!("{p}.timeout"),
                "must be above zero",
            ));
        }
        if self.memory.0 < 64 * 1024 {
            return Err(ConfigError::at(
                format!("{p}.memory"),
                "must be at least 64KiB (one Wasm page)",
            ));
        }
        if matches!(self.instances, Some(n) if n == 0 || n > 256) {
            return Err(ConfigError::at(
                format!("{p}.instances"),
                "must be between 1 and 256",
            ));
        }
        if !self.root_id.is_empty() && self.wasm.is_none() {
            return Err(ConfigError::at(
                format!("{p}.root_id"),
                "only Wasm filters have a root id",
            ));
        }
        if self.root_id.chars().any(char::is_control) {
            return Err(ConfigError::at(
                format!("{p}.root_id"),
                "must not contain control characters",
            ));
        }
        match (&self.native, &self.wasm) {
            (Some(kind), None) if !filters::native::KNOWN.contains(&kind.as_str()) => {
                Err(ConfigError::at(
                    format!("{p}.native"),
                    filters::FilterError::UnknownNative(kind.clone()).to_string(),
                ))
            }
            (Some(_), None) | (None, Some(_)) => Ok(()),
            _ => Err(ConfigError::at(p, "set exactly one of `native` or `wasm`")),
        }
    }
}
