//! Test hooks: crash and pause points that the end-to-end tests use to
//! stop a real process at an exact step of the transaction. Read from the
//! environment, off unless set, and each fires at most once per process.
//!
//! - `ORDER_CORE_TEST_PAUSE=<point>:<file>`: at `<point>` (`after_half`:
//!   the half message is on the broker, the Lua has not run; `after_local`:
//!   the Lua ran, commit/rollback not sent yet) write `<file>`, then wait
//!   until the test deletes it (or SIGKILLs the process).
//! - `ORDER_CORE_TEST_CRASH_AFTER_SINK=1`: the consumer aborts after its
//!   sink line is on disk, before acknowledging the message.
//! - `ORDER_CORE_TEST_FAIL_SKU=<sku>`: the consumer fails to process orders
//!   of that SKU (a poison message), until restarted without it.
//!
//! Compiled in only with the `test-hooks` feature (off by default; the
//! end-to-end tests turn it on). Without it every hook is an inline no-op:
//! a release binary reads none of these variables, so an environment
//! cannot make production pause, crash or fail orders.

#[cfg(feature = "test-hooks")]
use std::path::Path;
#[cfg(feature = "test-hooks")]
use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(feature = "test-hooks")]
use std::time::Duration;

#[cfg(feature = "test-hooks")]
static PAUSED: AtomicBool = AtomicBool::new(false);

/// Pauses at `point` if `ORDER_CORE_TEST_PAUSE` names it (blocking: only
/// call from a thread that may block, such as the client's blocking lane).
#[cfg(feature = "test-hooks")]
pub fn pause_at(point: &str) {
    let Ok(spec) = std::env::var("ORDER_CORE_TEST_PAUSE") else {
        return;
    };
    let Some((at, file)) = spec.split_once(':') else {
        return;
    };
    if at != point || PAUSED.swap(true, Ordering::SeqCst) {
        return;
    }
    tracing::warn!(point, file, "test hook: pausing");
    if std::fs::write(file, point).is_err() {
        return;
    }
    while Path::new(file).exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!(point, "test hook: resumed");
}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn pause_at(_point: &str) {}

/// Whether the consumer should abort after writing its sink line.
#[cfg(feature = "test-hooks")]
pub fn crash_after_sink() -> bool {
    std::env::var("ORDER_CORE_TEST_CRASH_AFTER_SINK").is_ok_and(|v| v == "1")
}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn crash_after_sink() -> bool {
    false
}

/// Whether processing an order of `sku` must fail (poison simulation).
#[cfg(feature = "test-hooks")]
pub fn fail_sku(sku: &str) -> bool {
    std::env::var("ORDER_CORE_TEST_FAIL_SKU").is_ok_and(|v| !v.is_empty() && v == sku)
}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn fail_sku(_sku: &str) -> bool {
    false
}
