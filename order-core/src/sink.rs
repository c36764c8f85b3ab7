//! The consumer's durable side: the order sink (an append-only JSON Lines
//! file, one order per line, fsync before the message is acknowledged) and
//! the dead-letter file for messages that failed `max_attempts` times.
//!
//! The sink is also the consumer's idempotency record: on open it reads the
//! order ids already written, so a redelivery (RocketMQ is at-least-once)
//! changes nothing.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::OrderEvent;

/// See the module docs.
pub struct Sink {
    path: PathBuf,
    file: File,
    seen: HashSet<String>,
}

impl Sink {
    pub fn open(path: &Path) -> Result<Sink> {
        let mut seen = HashSet::new();
        if path.exists() {
            let f = File::open(path).with_context(|| format!("read sink {}", path.display()))?;
            for (n, line) in BufReader::new(f).lines().enumerate() {
                let line = line.with_context(|| format!("read sink {}", path.display()))?;
                if line.trim().is_empty() {
                    continue;
                }
                let ev: OrderEvent = serde_json::from_str(&line)
                    .with_context(|| format!("sink {} line {}", path.display(), n + 1))?;
                seen.insert(ev.order_id);
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("open sink {}", path.display()))?;
        Ok(Sink {
            path: path.to_path_buf(),
            file,
            seen,
        })
    }

    /// Writes the order once. `Ok(false)`: it was already there.
    pub fn record(&mut self, ev: &OrderEvent) -> Result<bool> {
        if self.seen.contains(&ev.order_id) {
            return Ok(false);
        }
        let mut line = serde_json::to_vec(ev).context("encode order")?;
        line.push(b'\n');
        // One write call per line: with O_APPEND a crash leaves at most a
        // torn last line, never an interleaved one.
        self.file
            .write_all(&line)
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("append to sink {}", self.path.display()))?;
        self.seen.insert(ev.order_id.clone());
        Ok(true)
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// One dead letter: the raw message and why it failed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadLetter {
    pub msg_id: String,
    pub key: Option<String>,
    /// The message body (lossy UTF-8: order events are JSON).
    pub body: String,
    pub error: String,
    pub attempts: u32,
    pub at_ms: u64,
}

/// The dead-letter file (JSON Lines, fsynced).
pub struct DeadLetters {
    path: PathBuf,
}

impl DeadLetters {
    pub fn new(path: &Path) -> DeadLetters {
        DeadLetters {
            path: path.to_path_buf(),
        }
    }

    pub fn append(&self, dl: &DeadLetter) -> Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("open DLQ {}", self.path.display()))?;
        let mut line = serde_json::to_vec(dl).context("encode dead letter")?;
        line.push(b'\n');
        f.write_all(&line)
            .and_then(|()| f.sync_data())
            .with_context(|| format!("append to DLQ {}", self.path.display()))
    }

    pub fn list(&self) -> Result<Vec<DeadLetter>> {
        if !self.path.exists() {
            return Ok(Vec::new());
        }
        let f =
            File::open(&self.path).with_context(|| format!("read DLQ {}", self.path.display()))?;
        let mut out = Vec::new();
        for (n, line) in BufReader::new(f).lines().enumerate() {
            let line = line.with_context(|| format!("read DLQ {}", self.path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            out.push(
                serde_json::from_str(&line)
                    .with_context(|| format!("DLQ {} line {}", self.path.display(), n + 1))?,
            );
        }
        Ok(out)
    }

    /// Replaces the file's content with `keep` (atomically: temp file,
    /// fsync, rename).
    pub fn rewrite(&self, keep: &[DeadLetter]) -> Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut f = File::create(&tmp).with_context(|| format!("write {}", tmp.display()))?;
        for dl in keep {
            let mut line = serde_json::to_vec(dl).context("encode dead letter")?;
            line.push(b'\n');
            f.write_all(&line)
                .with_context(|| format!("write {}", tmp.display()))?;
        }
        f.sync_all()
            .with_context(|| format!("fsync {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("replace {}", self.path.display()))
    }
}
