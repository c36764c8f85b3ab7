//! Files a runtime reads when it is built and again whenever they change
//! on disk (a bot rule's `ip_file`, the JWT `jwks_file`): polled every
//! second (modification time and size) by a task that ends when its owner
//! (the built rule or verifier) is dropped with its runtime. A file that
//! stops parsing keeps the last good contents, with a warning.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

/// How often a watched file is looked at.
pub const POLL: Duration = Duration::from_secs(1);

/// Calls `reload(owner, text)` with the file's new text after each change
/// (from a tokio task; nothing without a tokio runtime, as in `flashgate
/// check`). `reload` answers how many entries it took, or why it kept the
/// old ones.
pub fn watch<T: Send + Sync + 'static>(
    owner: &Arc<T>,
    path: PathBuf,
    what: &'static str,
    reload: fn(&T, &str) -> Result<usize, String>,
) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let owner: Weak<T> = Arc::downgrade(owner);
    let mut last = stamp(&path);
    rt.spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(owner) = owner.upgrade() else {
                return;
            };
            let now = stamp(&path);
            if now == last {
                continue;
            }
            last = now;
            let file = path.display();
            match tokio::fs::read_to_string(&path).await {
                Ok(text) => match reload(&owner, &text) {
                    Ok(entries) => tracing::info!(path = %file, entries, "{what} reloaded"),
                    Err(m) => tracing::warn!(path = %file, "{what} not reloaded (the last good one stays): {m}"),
                },
                Err(e) => tracing::warn!(path = %file, "{what} not readable (the last good one stays): {e}"),
            }
        }
    });
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}
