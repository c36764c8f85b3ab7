//! The fleet-wide fill lock: one gateway fills a key, the others wait for
//! its entry.
//!
//! ```text
//! loop:
//!   register as a waiter for the key's fill message (before looking, so a
//!   message between the look and the wait is not lost)
//!   SET <key>:l <token> NX PX lock_ttl
//!     taken -> GET the entry once more (someone may have just filled it
//!              and released) -> fresh: release, take it; else: we fill
//!     held by another -> wait for the pub/sub message, at most
//!              poll_interval (a lost message costs one poll, not the
//!              whole wait), at most until lock_wait has passed
//!   GET the entry -> fresh: take it
//!   (no fresh entry: the filler failed, or its lock expired because it
//!   died -> go round: the next SET NX decides who fills now)
//! ```
//!
//! The lock is released by its owner only, with a compare-and-delete Lua
//! script (see `l2.rs`), and expires by itself if the owner dies.

use std::time::Instant;

use bytes::Bytes;
use http::HeaderMap;

use super::entry::{now_ms, Entry, Freshness, Record};
use super::key;
use super::l2::{Unavailable, L2};
use super::Inner;

pub enum Fleet {
    /// We hold the lock: fill, then release with this token.
    Acquired(String),
    /// Another gateway filled the key meanwhile.
    Filled(std::sync::Arc<Entry>),
    /// Waited `lock_wait` in vain.
    TimedOut,
    Unavailable,
}

pub fn token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The fresh entry for `key` in L2 (following a `Vary` record to the
/// request's variant), if there is one.
pub async fn fresh_in_l2(
    l2: &L2,
    base: &[u8],
    key: &[u8],
    headers: &HeaderMap,
) -> Result<Option<std::sync::Arc<Entry>>, Unavailable> {
    Ok(lookup_l2(l2, base, key, headers)
        .await?
        .filter(|e| e.freshness(now_ms()) == Freshness::Fresh))
}

/// The entry for `key` in L2, fresh or not.
pub async fn lookup_l2(
    l2: &L2,
    base: &[u8],
    key: &[u8],
    headers: &HeaderMap,
) -> Result<Option<std::sync::Arc<Entry>>, Unavailable> {
    let entry = match l2.get(key).await? {
        Some(Record::Response(e)) => Some(e),
        Some(Record::Vary(v)) => {
            let variant = key::variant(base, &v.names, headers);
            match l2.get(&variant).await? {
                Some(Record::Response(e)) => Some(e),
                _ => None,
            }
        }
        None => None,
    };
    Ok(entry.filter(|e| e.matches_variant(headers)))
}

pub async fn acquire_or_wait(
    inner: &Inner,
    l2: &L2,
    base: &[u8],
    key: &Bytes,
    headers: &HeaderMap,
) -> Fleet {
    let token = token();
    let lock_ttl = super::entry::ms(inner.config.lock_ttl.0);
    let poll = inner.config.poll_interval.0;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + inner.config.lock_wait.0;
    let mut waited = false;
    let done = |waited: bool, result: &str| {
        if waited {
            inner.metrics.lock_waits.with_label_values(&[result]).inc();
            inner
                .metrics
                .lock_wait_seconds
                .observe(started.elapsed().as_secs_f64());
        }
    };
    loop {
        let registration = inner.waiters.register(key);
        let notified = registration.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        match l2.try_lock(key, &token, lock_ttl).await {
            Err(Unavailable) => {
                done(waited, "unavailable");
                return Fleet::Unavailable;
            }
            Ok(true) => {
                // Double check: a fill may have finished between our last
                // look and the lock.
                return match fresh_in_l2(l2, base, key, headers).await {
                    Ok(Some(e)) => {
                        let _ = l2.unlock(key, &token).await;
                        done(waited, "filled");
                        Fleet::Filled(e)
                    }
                    Ok(None) => {
                        done(waited, "took_over");
                        Fleet::Acquired(token)
                    }
                    Err(Unavailable) => {
                        done(waited, "unavailable");
                        Fleet::Unavailable
                    }
                };
            }
            Ok(false) => {}
        }
        waited = true;
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(poll) => {}
            _ = tokio::time::sleep_until(deadline) => {
                done(waited, "timeout");
                return Fleet::TimedOut;
            }
        }
        match fresh_in_l2(l2, base, key, headers).await {
            Ok(Some(e)) => {
                done(waited, "filled");
                return Fleet::Filled(e);
            }
            Ok(None) => {}
            Err(Unavailable) => {
                done(waited, "unavailable");
                return Fleet::Unavailable;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            done(waited, "timeout");
            return Fleet::TimedOut;
        }
    }
}

/// Releases our lock and tells the fleet the fill is over.
pub async fn release(l2: &L2, key: &[u8], token: &str, stored: bool) {
    let _ = l2.unlock(key, token).await;
    let _ = l2.publish_fill(key, stored).await;
}
