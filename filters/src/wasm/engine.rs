//! The process-wide wasmtime engine, the thread that ticks its epoch, and
//! the cache of compiled modules.
//!
//! One engine serves every Wasm filter: compiled code and the epoch clock
//! are shared, stores (instances) are not. Compiling is the expensive step
//! (tens to hundreds of milliseconds), so a module is compiled once per
//! distinct content and reused by every filter and every reload that names
//! the same bytes.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use wasmtime::{Config, Engine, Module, OptLevel};

/// How often the background thread advances the engine's epoch. Deadlines
/// are counted in these ticks, so a call is interrupted after its timeout
/// and less than two ticks more. Each tick wakes a thread, and a wake-up
/// is not free on a busy core (a timer interrupt, two context switches, a colder
/// cache; more in a VM): at 1 ms that thread alone took 0.7% of a core on
/// the bench box, before what it cost the worker it preempted. The ticks
/// are a safety net for runaway guests, not a latency bound, so they are
/// coarse.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(5);

static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();

/// The shared engine; the first call starts the epoch thread.
pub(crate) fn engine() -> Result<&'static Engine, String> {
    ENGINE
        .get_or_init(|| {
            let mut config = Config::new();
            // Wall-clock deadlines for every guest call (cheaper than fuel).
            config.epoch_interruption(true);
            config.cranelift_opt_level(OptLevel::Speed);
            // A guest that recurses without end traps instead of using the
            // host thread's stack.
            config.max_wasm_stack(512 << 10);
            let engine = Engine::new(&config).map_err(|e| e.to_string())?;
            let ticker = engine.clone();
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || loop {
                    std::thread::sleep(EPOCH_TICK);
                    ticker.increment_epoch();
                })
                .map_err(|e| format!("cannot start the epoch thread: {e}"))?;
            Ok(engine)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Epoch ticks that cover `timeout`, plus one for the tick in progress.
pub(crate) fn deadline_ticks(timeout: Duration) -> u64 {
    let tick = EPOCH_TICK.as_nanos().max(1);
    (timeout.as_nanos().div_ceil(tick) as u64).max(1) + 1
}

type Key = (usize, u64);
static MODULES: OnceLock<Mutex<HashMap<Key, Module>>> = OnceLock::new();

/// Compiles `bytes`, or returns the module compiled earlier from the same
/// bytes.
pub(crate) fn compile(bytes: &[u8]) -> Result<Module, String> {
    let engine = engine()?;
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    let key = (bytes.len(), h.finish());
    let cache = MODULES.get_or_init(Default::default);
    if let Some(m) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(m.clone());
    }
    // Compile without holding the lock: other filters may load meanwhile.
    let module = compile_with_shims(engine, bytes)?;
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, module.clone());
    Ok(module)
}

/// Compiles `bytes` with the fused entry points added ([`super::shim`]);
/// a module that cannot have them, or does not compile with them, is
/// compiled as it is (and its own errors are the ones reported).
fn compile_with_shims(engine: &Engine, bytes: &[u8]) -> Result<Module, String> {
    if let Some(shimmed) = super::shim::add(bytes) {
        match Module::new(engine, &shimmed) {
            Ok(module) => return Ok(module),
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "wasm module does not compile with fused entry points; compiling it as it is")
            }
        }
    }
    Module::new(engine, bytes).map_err(|e| format!("{e:#}"))
}

/// Number of distinct modules compiled so far (for tests and diagnostics).
pub fn compiled_modules() -> usize {
    MODULES
        .get()
        .map_or(0, |m| m.lock().unwrap_or_else(|e| e.into_inner()).len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_cover_the_timeout() {
        // The timeout in whole ticks, plus one for the tick in progress
        // when the call starts: a call gets at least its timeout and less
        // than two ticks more.
        assert_eq!(deadline_ticks(Duration::from_millis(5)), 2);
        assert_eq!(deadline_ticks(Duration::from_millis(12)), 4);
        assert_eq!(deadline_ticks(Duration::from_micros(1500)), 2);
        assert_eq!(deadline_ticks(Duration::ZERO), 2);
    }

    #[test]
    fn compiles_once_per_content() {
        // The smallest valid module: magic and version.
        let bytes = b"\0asm\x01\0\0\0";
        let a = compile(bytes).unwrap();
        let b = compile(bytes).unwrap();
        assert!(Module::same(&a, &b));
        assert!(compile(b"junk").is_err());
    }
}
