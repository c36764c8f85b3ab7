//! The demo's Wasm filter: `wasm-plugins/add-headers`, built for
//! `wasm32-wasip1` by `gateway/build.rs` and embedded in the binary, so a
//! plain `cargo run -p gateway -- demo` shows a guest filter on the path.
//! Without the target the module is empty and the demo runs without it
//! (docs/decisions.md, "The demo's Wasm filter").

use std::path::Path;

use anyhow::Context;

use crate::config::{Config, FilterConfig};

/// The module bytes; empty when it could not be built.
pub const MODULE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo-filter.wasm"));

/// `built`, or why the module is missing.
pub const BUILD_NOTE: &str = env!("FLASHGATE_DEMO_WASM_NOTE");

/// The filter's name in the demo config.
pub const FILTER: &str = "edge-wasm";

/// The header the filter sets on every answer of its routes.
pub const HEADER: &str = "x-edge-filter";
pub const HEADER_VALUE: &str = "wasm add-headers";

/// The routes that run it.
pub const ROUTES: &[&str] = &["catalog", "product-pages"];

/// Whether this binary carries the module.
pub fn available() -> bool {
    !MODULE.is_empty()
}

/// What the banner says when the module is missing.
pub fn missing_note() -> String {
    format!(
        "off: {BUILD_NOTE}. Add the target and run the demo again (cargo builds the filter): \
         rustup target add wasm32-wasip1"
    )
}

/// Writes the module into `dir`, declares it as the filter [`FILTER`] and
/// puts it on [`ROUTES`] after their native filters. Does nothing (and
/// returns `false`) when the binary carries no module.
pub fn install(config: &mut Config, dir: &Path) -> anyhow::Result<bool> {
    if !available() {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("add_headers.wasm");
    std::fs::write(&path, MODULE).with_context(|| format!("writing {}", path.display()))?;
    let filter: FilterConfig = serde_json::from_value(serde_json::json!({
        "name": FILTER,
        "wasm": path,
        "config": serde_json::json!({"response_set": [[HEADER, HEADER_VALUE]]}).to_string(),
        // Headers only: bodies stream past it untouched.
        "bodies": false,
        // The file is written once: nothing to watch.
        "watch": "0s",
    }))
    .context("the demo's Wasm filter entry")?;
    config.filters.push(filter);
    for route in &mut config.routes {
        if route.name.as_deref().is_some_and(|n| ROUTES.contains(&n)) {
            route.filters.push(FILTER.to_string());
        }
    }
    Ok(true)
}
