//! Building `[[filters]]` entries into filters. This is where a filter's
//! `config` meets the filter and a Wasm module is compiled and started, so
//! it happens once per config, when the runtime is built (or checked), and
//! its errors carry the entry's key path like validation errors do.

use std::sync::Arc;

use filters::wasm::{WasmFilter, WasmLimits};
use filters::{FilterError, FilterFactory};

use crate::config::{Config, ConfigError, FilterConfig};

/// A filter built from its config entry.
pub struct Built {
    pub name: String,
    pub factory: Arc<dyn FilterFactory>,
    /// Set for Wasm filters, whose metrics the admin listener renders.
    pub wasm: Option<Arc<WasmFilter>>,
}

/// The running config and its Wasm filters by name (what a reload may
/// keep).
pub type Running<'a> = (&'a Config, &'a [(String, Arc<WasmFilter>)]);

/// Whether built Wasm filters poll their module files for hot reload.
/// `flashgate check` builds to find errors and must leave nothing behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    AsConfigured,
    Never,
}

/// Builds every filter of `config` in order; the first failure is the
/// error, at `filters[N].native`, `.config` or `.wasm`.
///
/// A Wasm filter of `previous` (the running config's, on a reload) whose
/// entry is the same and whose module file did not change is kept as it
/// is, instances and all: as in Envoy, an unchanged VM is not started
/// again (`on_vm_start` runs once), and its state and ticks go on.
pub fn build_all(
    config: &Config,
    watch: Watch,
    previous: Option<Running<'_>>,
) -> Result<Vec<Built>, ConfigError> {
    config
        .filters
        .iter()
        .enumerate()
        .map(|(i, f)| match previous.and_then(|p| unchanged(f, p)) {
            Some(wasm) => Ok(Built {
                name: f.name.clone(),
                factory: wasm.clone(),
                wasm: Some(wasm),
            }),
            None => build(f, &format!("filters[{i}]"), watch),
        })
        .collect()
}

/// The running filter for `f`, if its entry and module file are as they
/// were.
fn unchanged(f: &FilterConfig, (config, running): Running<'_>) -> Option<Arc<WasmFilter>> {
    f.wasm.as_ref()?;
    config.filters.iter().find(|old| *old == f)?;
    let (_, wasm) = running.iter().find(|(name, _)| *name == f.name)?;
    wasm.file_unchanged().then(|| wasm.clone())
}

/// Builds one entry; `p` is its key path. Loading a Wasm module compiles
/// it (once per distinct module, cached by content), starts an instance
/// and hands it its config, so a module that does not load or refuses its
/// config is a config error.
pub fn build(f: &FilterConfig, p: &str, watch: Watch) -> Result<Built, ConfigError> {
    match (&f.native, &f.wasm) {
        (Some(kind), None) => filters::native::build(kind, &f.name, &f.config)
            .map(|factory| Built {
                name: f.name.clone(),
                factory,
                wasm: None,
            })
            .map_err(|e| {
                let key = if matches!(e, FilterError::UnknownNative(_)) {
                    "native"
                } else {
                    "config"
                };
                ConfigError::at(format!("{p}.{key}"), e.to_string())
            }),
        (None, Some(path)) => {
            let wasm = WasmFilter::load_with_root_id(
                &f.name,
                &f.root_id,
                path,
                &f.config,
                limits(f),
                f.fail,
            )
            .map_err(|e| {
                let key = if matches!(e, FilterError::Config(_)) {
                    "config"
                } else {
                    "wasm"
                };
                ConfigError::at(format!("{p}.{key}"), e.to_string())
            })?;
            let limit = usize::try_from(f.body_limit.0).unwrap_or(usize::MAX);
            let mut wasm = wasm.with_body_limit(limit);
            if !f.bodies {
                wasm = wasm.without_bodies();
            }
            if watch == Watch::AsConfigured && !f.watch.0.is_zero() {
                wasm.watch(f.watch.0);
            }
            Ok(Built {
                name: f.name.clone(),
                factory: wasm.clone(),
                wasm: Some(wasm),
            })
        }
        // Validation refuses both and neither; kept an error, not a panic,
        // for a config built in code.
        _ => Err(ConfigError::at(p, "set exactly one of `native` or `wasm`")),
    }
}

/// The Wasm limits an entry asks for.
fn limits(f: &FilterConfig) -> WasmLimits {
    WasmLimits {
        timeout: f.timeout.0,
        memory: f.memory.0,
        instances: f.instances.unwrap_or(WasmLimits::default().instances),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = crate::config::TEST_BASE;

    fn built(extra: &str) -> Result<Vec<Built>, ConfigError> {
        let c = Config::parse(&format!("{BASE}{extra}")).expect("valid shape");
        build_all(&c, Watch::Never, None)
    }

    #[test]
    fn a_filter_that_refuses_its_config_is_an_error_at_its_config() {
        let e =
            built("[[filters]]\nname = \"h\"\nnative = \"headers\"\nconfig = '{\"bogus\": 1}'\n")
                .err()
                .unwrap();
        assert_eq!(e.path, "filters[0].config");
        let ok = built("[[filters]]\nname = \"h\"\nnative = \"headers\"\n").unwrap();
        assert_eq!(ok[0].name, "h");
        assert!(ok[0].wasm.is_none());
    }

    #[test]
    fn a_module_that_does_not_load_is_an_error_at_its_wasm() {
        let e = built("[[filters]]\nname = \"w\"\nwasm = \"/nonexistent.wasm\"\n")
            .err()
            .unwrap();
        assert_eq!(e.path, "filters[0].wasm");
    }
}
