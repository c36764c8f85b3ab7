//! Hot reload of a filter's module: a changed `.wasm` file is compiled,
//! checked and started off the request path (on the watcher's own thread),
//! then swapped in atomically. New streams take the new module; streams in
//! flight keep the pool they started on until they end. A module that
//! fails to compile, lacks the ABI marker, traps at start or refuses its
//! configuration is refused, and the old one keeps serving.
//!
//! The watcher polls the file's modification time and length (no inotify:
//! it works the same on every filesystem and in containers with mounted
//! volumes), and acts only once the file looked the same on two polls in a
//! row, so a module still being copied in place is not loaded half-written.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use super::{build_pool, WasmFilter};
use crate::FilterError;

/// What identifies one version of the module file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl FileStamp {
    pub(crate) fn of(path: &Path) -> Option<FileStamp> {
        let meta = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            modified: meta.modified().ok(),
            len: meta.len(),
        })
    }
}

impl WasmFilter {
    /// Loads the module file again and swaps it in. On error the running
    /// module stays and the error says why.
    pub fn reload(&self) -> Result<(), FilterError> {
        let path = self.path.as_ref().ok_or_else(|| {
            FilterError::Wasm("the filter was loaded from bytes; there is no file to reload".into())
        })?;
        let stamp = FileStamp::of(path);
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = stamp;
        let result = std::fs::read(path)
            .map_err(|e| FilterError::Wasm(format!("cannot read {}: {e}", path.display())))
            .and_then(|bytes| {
                build_pool(
                    &self.name,
                    &self.root_id,
                    &bytes,
                    &self.config,
                    self.limits,
                    self.fail,
                    self.metrics.clone(),
                )
            });
        let host = &self.metrics.host;
        match result {
            Ok(pool) => {
                self.pool.store(pool);
                host.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(filter = %self.name, path = %path.display(), "wasm module reloaded");
                Ok(())
            }
            Err(e) => {
                host.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(filter = %self.name, path = %path.display(), error = %e, "wasm module reload refused; the running module stays");
                Err(e)
            }
        }
    }

    /// Is the module file still the one this filter runs (same
    /// modification time and length as when it was last loaded)? A config
    /// reload keeps such a filter, running instances and all, when its
    /// entry did not change either, as Envoy keeps a VM whose code and
    /// configuration are the same (`on_vm_start` does not run again).
    pub fn file_unchanged(&self) -> bool {
        let Some(path) = self.path.as_ref() else {
            return false;
        };
        let now = FileStamp::of(path);
        now.is_some() && now == *self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches the module file on a thread of its own, polling every
    /// `interval`, and reloads it when it changed. The thread ends when
    /// the filter is dropped (a config reload built a new one).
    pub fn watch(self: &Arc<Self>, interval: Duration) {
        if self.path.is_none() {
            return;
        }
        let weak: Weak<WasmFilter> = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("wasm-watch".into())
            .spawn(move || {
                let mut observed: Option<FileStamp> = None;
                loop {
                    std::thread::sleep(interval);
                    let Some(filter) = weak.upgrade() else { return };
                    let Some(path) = filter.path.as_ref() else {
                        return;
                    };
                    let now = FileStamp::of(path);
                    let seen = *filter.seen.lock().unwrap_or_else(|e| e.into_inner());
                    if now.is_none() || now == seen {
                        observed = None;
                        continue;
                    }
                    if observed != now {
                        // Changed since the last poll: wait until it settles.
                        observed = now;
                        continue;
                    }
                    observed = None;
                    // Errors are logged and counted by `reload`.
                    let _ = filter.reload();
                }
            });
        if let Err(e) = spawned {
            tracing::error!(filter = %self.name, error = %e, "cannot start the wasm module watcher; the file is not watched");
        }
    }
}
