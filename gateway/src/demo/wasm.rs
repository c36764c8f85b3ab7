//! The demo's Wasm filters: `wasm-plugins/add-headers` on the catalog and
//! `wasm-plugins/degrade-recommendations` on `/recommendations`, built for
//! `wasm32-wasip1` by `gateway/build.rs` and embedded in the binary, so a
//! plain `cargo run -p gateway -- demo` shows guest filters on the path.
//! Without the target the modules are empty and the demo runs without
//! them: recommendations then degrade through the route's native
//! `fallback` (docs/decisions.md, "The demo's Wasm filter").

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

/// `wasm-plugins/degrade-recommendations`; empty when it could not be built.
pub const DEGRADE_MODULE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo-degrade.wasm"));

/// The degradation filter's name in the demo config.
pub const DEGRADE_FILTER: &str = "degrade-reco";

/// The route it runs on.
pub const DEGRADE_ROUTE: &str = "recommendations";

/// From this load level the filter answers with the placeholder (the
/// level at which the route's native fallback answered before).
pub const DEGRADE_MIN_LEVEL: u8 = 1;

/// The header the filter sets on the placeholder.
pub const DEGRADED_HEADER: &str = "x-degraded";

/// Whether this binary carries the modules.
pub fn available() -> bool {
    !MODULE.is_empty() && !DEGRADE_MODULE.is_empty()
}

/// What the banner says when the module is missing.
pub fn missing_note() -> String {
    format!(
        "off: {BUILD_NOTE}. Add the target and run the demo again (cargo builds the filter): \
         rustup target add wasm32-wasip1"
    )
}

/// Writes the modules into `dir` and declares them: [`FILTER`] on
/// [`ROUTES`] after their native filters, [`DEGRADE_FILTER`] on
/// [`DEGRADE_ROUTE`]. The degradation filter takes over from the route's
/// native `fallback`, which is removed (shedding would answer with it at
/// admission, before any filter runs), and the route becomes `normal`
/// priority, so admission lets it through to the filter up to level 2
/// (at level 3 it is shed with everything but checkout). Does nothing
/// (and returns `false`) when the binary carries no modules.
pub fn install(config: &mut Config, dir: &Path) -> anyhow::Result<bool> {
    if !available() {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("add_headers.wasm");
    std::fs::write(&path, MODULE).with_context(|| format!("writing {}", path.display()))?;
    let degrade_path = dir.join("degrade_recommendations.wasm");
    std::fs::write(&degrade_path, DEGRADE_MODULE)
        .with_context(|| format!("writing {}", degrade_path.display()))?;
    let degrade: FilterConfig = serde_json::from_value(serde_json::json!({
        "name": DEGRADE_FILTER,
        "wasm": degrade_path,
        "config": serde_json::json!({
            "min_level": DEGRADE_MIN_LEVEL,
            "placeholder": {"items": [], "degraded": true},
        })
        .to_string(),
        "bodies": false,
        "watch": "0s",
    }))
    .context("the demo's degradation filter entry")?;
    config.filters.push(degrade);
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
        if route.name.as_deref() == Some(DEGRADE_ROUTE) {
            route.filters.push(DEGRADE_FILTER.to_string());
            route.fallback = None;
            route.priority = filters::Priority::Normal;
        }
    }
    Ok(true)
}
