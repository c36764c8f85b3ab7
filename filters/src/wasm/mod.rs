//! The proxy-wasm host: runs filters written with the public proxy-wasm
//! SDKs (ABI v0.2.1 and v0.2.0) on wasmtime, behind the same
//! [`FilterFactory`] / [`StreamFilter`] traits as native filters.
//!
//! ```text
//! WasmFilter::load ─ read file ─ compile once (engine.rs, cached by content)
//!                  ─ check the ABI marker export
//!                  ─ link host functions (host/) and pre-instantiate
//!                  ─ start one instance: _initialize, root context,
//!                    proxy_on_vm_start, proxy_on_configure (refusal = error)
//! new_stream ────── WasmStream (stream.rs): on its first phase it picks a
//!                   pool slot (instance.rs) and creates an HTTP context
//!                   (unique id, parent = the root context) in that instance
//! on_request_headers / on_response_headers ── one guest call each, with the
//!                   head moved into the store for the call (state.rs)
//! on_done / drop ── proxy_on_done, proxy_on_log, proxy_on_delete, once
//! ```
//!
//! Cost: a module is compiled once; a filter has a bounded pool of
//! instances (`WasmLimits::instances`), each hosting many contexts; a
//! request costs one context, never an instance.
//!
//! Safety: every guest call runs under an epoch deadline
//! (`WasmLimits::timeout`; one background thread ticks the engine's epoch
//! every 5 ms) and within a memory cap (`WasmLimits::memory`). A
//! trap, timeout or out-of-memory poisons the instance (it is dropped and
//! replaced for later streams), counts in [`WasmMetrics`], logs once with
//! the filter's name, and the stream follows the filter's [`FailMode`].
//! A module without the ABI marker is refused at load.
//!
//! See `docs/filters.md` for the guest's view: properties, limits, and
//! what is not implemented yet.

mod abi;
mod engine;
mod grpc;
mod host;
mod instance;
mod metrics;
mod plugin;
mod reload;
mod shared;
mod shim;
mod state;
mod stream;
mod ticker;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use wasmtime::Linker;

pub use engine::compiled_modules;
pub use metrics::{
    HostStats, MetricKind, MetricSample, MetricValue, WasmMetrics, HISTOGRAM_BOUNDS,
};

use instance::{FailKind, Pool};
use plugin::{Limits, Plugin};
use state::HostState;

use crate::{FailMode, FilterError, FilterFactory, StreamFilter};

/// Resource limits of one Wasm filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WasmLimits {
    /// Wall-clock budget of one guest call (a header callback, one
    /// allocation, `on_log`...). Start-up gets 20x this, at least 500 ms.
    pub timeout: Duration,
    /// Most linear memory one instance may have, in bytes.
    pub memory: u64,
    /// Instances of the module for this filter (each serves many streams,
    /// one guest call at a time). Default: the number of CPUs.
    pub instances: usize,
}

impl Default for WasmLimits {
    fn default() -> Self {
        WasmLimits {
            timeout: Duration::from_millis(5),
            memory: 64 << 20,
            instances: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// A configured proxy-wasm filter: the factory the gateway puts in a
/// route's [`FilterChain`](crate::FilterChain).
///
/// The running module can be replaced while the filter serves (hot
/// reload, [`WasmFilter::reload`]): new streams take the new module's
/// pool, streams in flight finish on the one they started with.
pub struct WasmFilter {
    name: String,
    /// The root id the guest reads as `plugin_root_id` (Envoy's
    /// `root_id`): SDKs that register root contexts by name (the
    /// AssemblyScript one) pick theirs by it. Empty by default.
    root_id: String,
    config: String,
    limits: WasmLimits,
    fail: FailMode,
    /// Where the module was loaded from (`None` for [`WasmFilter::from_bytes`]).
    path: Option<PathBuf>,
    pool: ArcSwap<Pool>,
    /// Shared by every module version, so counters survive a reload.
    metrics: Arc<WasmMetrics>,
    /// The file's identity when it was last loaded (mtime, length).
    seen: Mutex<Option<reload::FileStamp>>,
    body_limit: usize,
    /// Body callbacks are delivered (unless the operator turned them off
    /// for a header-only filter).
    bodies: bool,
}

impl WasmFilter {
    /// Loads the module at `path` as the filter `name`, hands it `config`
    /// (the `[[filters]]` entry's `config` string, given to the guest's
    /// `proxy_on_configure` as its plugin configuration) and starts its
    /// first instance.
    ///
    /// Errors: [`FilterError::Wasm`] when the file cannot be read or
    /// compiled, lacks the proxy-wasm ABI marker, has imports the host
    /// cannot provide, or traps while starting; [`FilterError::Config`]
    /// when the guest refuses its configuration.
    pub fn load(
        name: &str,
        path: impl AsRef<Path>,
        config: &str,
        limits: WasmLimits,
        fail: FailMode,
    ) -> Result<Arc<WasmFilter>, FilterError> {
        WasmFilter::load_with_root_id(name, "", path, config, limits, fail)
    }

    /// Like [`WasmFilter::load`], with the root id the guest sees as
    /// `plugin_root_id` (the `root_id` key of a `[[filters]]` entry).
    pub fn load_with_root_id(
        name: &str,
        root_id: &str,
        path: impl AsRef<Path>,
        config: &str,
        limits: WasmLimits,
        fail: FailMode,
    ) -> Result<Arc<WasmFilter>, FilterError> {
        let path = path.as_ref();
        let stamp = reload::FileStamp::of(path);
        let bytes = std::fs::read(path)
            .map_err(|e| FilterError::Wasm(format!("cannot read {}: {e}", path.display())))?;
        let metrics = Arc::new(WasmMetrics::default());
        let pool = build_pool(name, root_id, &bytes, config, limits, fail, metrics.clone())
            .map_err(|e| match e {
                FilterError::Wasm(m) => FilterError::Wasm(format!("{}: {m}", path.display())),
                other => other,
            })?;
        Ok(Arc::new(WasmFilter {
            name: name.to_string(),
            root_id: root_id.to_string(),
            config: config.to_string(),
            limits,
            fail,
            path: Some(path.to_path_buf()),
            pool: ArcSwap::new(pool),
            metrics,
            seen: Mutex::new(stamp),
            body_limit: crate::DEFAULT_BODY_LIMIT,
            bodies: true,
        }))
    }

    /// Like [`WasmFilter::load`], from the module's bytes.
    pub fn from_bytes(
        name: &str,
        bytes: &[u8],
        config: &str,
        limits: WasmLimits,
        fail: FailMode,
    ) -> Result<Arc<WasmFilter>, FilterError> {
        let metrics = Arc::new(WasmMetrics::default());
        let pool = build_pool(name, "", bytes, config, limits, fail, metrics.clone())?;
        Ok(Arc::new(WasmFilter {
            name: name.to_string(),
            root_id: String::new(),
            config: config.to_string(),
            limits,
            fail,
            path: None,
            pool: ArcSwap::new(pool),
            metrics,
            seen: Mutex::new(None),
            body_limit: crate::DEFAULT_BODY_LIMIT,
            bodies: true,
        }))
    }

    /// The same filter with another bound on the body a filter may hold
    /// (see [`FilterFactory::body_limit`]). For use right after loading.
    pub fn with_body_limit(self: Arc<Self>, limit: usize) -> Arc<Self> {
        match Arc::try_unwrap(self) {
            Ok(mut f) => {
                f.body_limit = limit;
                Arc::new(f)
            }
            Err(shared) => shared,
        }
    }

    /// The same filter without body and trailer callbacks: for header-only
    /// filters (the SDK exports body callbacks whether or not the filter
    /// uses them), so their routes stream bodies untouched. For use right
    /// after loading.
    pub fn without_bodies(self: Arc<Self>) -> Arc<Self> {
        match Arc::try_unwrap(self) {
            Ok(mut f) => {
                f.bodies = false;
                Arc::new(f)
            }
            Err(shared) => shared,
        }
    }

    /// The filter's metrics: guest-defined ones and the host's counters.
    pub fn metrics(&self) -> &WasmMetrics {
        &self.metrics
    }

    /// Instances alive now (at most `WasmLimits::instances`).
    pub fn live_instances(&self) -> u64 {
        self.pool.load().live.load(Ordering::Relaxed)
    }

    /// Does the module run with the fused entry points the loader adds
    /// (one guest entry for a stream's first two callbacks, one for its
    /// last three)? For tests and diagnostics.
    pub fn fused_entries(&self) -> bool {
        let pool = self.pool.load();
        let module = pool.plugin.pre.module();
        module.get_export(shim::FIRST_REQUEST).is_some() && module.get_export(shim::END).is_some()
    }

    /// The proxy-wasm ABI version the module declares (`"0.2.1"`/`"0.2.0"`).
    pub fn abi_version(&self) -> &'static str {
        self.pool.load().plugin.abi
    }

    pub fn fail_mode(&self) -> FailMode {
        self.fail
    }
}

/// Compiles the module at `path` into the cache, if it compiles, so that
/// a later [`WasmFilter::load`] of the same bytes does not compile. For
/// callers that load filters on a latency-sensitive thread.
pub fn precompile_file(path: &Path) {
    if let Ok(bytes) = std::fs::read(path) {
        let _ = engine::compile(&bytes);
    }
}

/// Compiles (or finds compiled) `bytes`, checks and links the module, and
/// starts its first instance in a new pool.
#[allow(clippy::too_many_arguments)]
fn build_pool(
    name: &str,
    root_id: &str,
    bytes: &[u8],
    config: &str,
    limits: WasmLimits,
    fail: FailMode,
    metrics: Arc<WasmMetrics>,
) -> Result<Arc<Pool>, FilterError> {
    if limits.timeout.is_zero() || limits.memory == 0 {
        return Err(FilterError::Config(
            "wasm limits: timeout and memory must be above zero".into(),
        ));
    }
    let engine = engine::engine().map_err(FilterError::Wasm)?;
    let module = engine::compile(bytes).map_err(FilterError::Wasm)?;
    let abi = abi::ABI_MARKERS
        .iter()
        .find(|(export, _)| module.get_export(export).is_some())
        .map(|(_, version)| *version)
        .ok_or_else(|| {
            FilterError::Wasm(
                "not a proxy-wasm module: no proxy_abi_version_0_2_1 (or _0_2_0) export".into(),
            )
        })?;
    let mut linker: Linker<HostState> = Linker::new(engine);
    host::add_to_linker(&mut linker)
        .map_err(|e| FilterError::Wasm(format!("linking host functions: {e:#}")))?;
    let stubbed = host::stub_unknown_imports(&mut linker, &module).map_err(FilterError::Wasm)?;
    if !stubbed.is_empty() {
        tracing::info!(filter = name, imports = ?stubbed, "wasm filter imports functions the host only stubs");
    }
    let bodies = instance::exports_bodies(&module);
    let pre = linker
        .instantiate_pre(&module)
        .map_err(|e| FilterError::Wasm(format!("{e:#}")))?;
    let limits = Limits {
        timeout: limits.timeout,
        memory: usize::try_from(limits.memory).unwrap_or(usize::MAX),
        instances: limits.instances.max(1),
    };
    let plugin = Arc::new(Plugin::new(
        name, root_id, config, limits, fail, abi, pre, metrics, bodies,
    ));
    let pool = Pool::start(plugin);
    // Start the first instance now: a module that traps at start-up or
    // refuses its configuration is a load error, not a runtime surprise.
    // Then see whether it makes HTTP contexts at all (see
    // `Plugin::http_contexts`).
    {
        let mut slot = pool.lock(0);
        let start_error = |f: instance::Failure| match f.kind {
            FailKind::Refused if f.message.contains("configuration") => {
                FilterError::Config(f.message)
            }
            kind => FilterError::Wasm(format!(
                "starting the module failed ({kind}): {}",
                f.message
            )),
        };
        let probe = pool
            .ensure(0, &mut slot)
            .map_err(start_error)?
            .probe_http_context();
        if let Err(f) = probe {
            tracing::info!(
                filter = name,
                error = %f.message,
                "the wasm module creates no HTTP contexts: it runs as a background service (root context, ticks, queues) and streams pass it by"
            );
            pool.plugin.http_contexts.store(false, Ordering::Relaxed);
            // The instance trapped: start a fresh one for the root context.
            pool.discard(&mut slot);
            pool.ensure(0, &mut slot).map_err(start_error)?;
        }
    }
    Ok(pool)
}

impl FilterFactory for WasmFilter {
    fn name(&self) -> &str {
        &self.name
    }

    fn new_stream(&self) -> Box<dyn StreamFilter> {
        let pool = self.pool.load_full();
        if !pool.plugin.http_contexts.load(Ordering::Relaxed) {
            return Box::new(PassBy);
        }
        Box::new(stream::WasmStream::new(pool))
    }

    fn wants_bodies(&self) -> bool {
        let pool = self.pool.load();
        self.bodies && pool.plugin.bodies && pool.plugin.http_contexts.load(Ordering::Relaxed)
    }

    fn body_limit(&self) -> usize {
        self.body_limit
    }
}

/// The stream side of a module without HTTP contexts: every phase goes on.
struct PassBy;

impl StreamFilter for PassBy {}
