//! `[buffering]`: how bodies are held between a client and an upstream so
//! that a slow client never holds an upstream slot (see `spool`). Routes
//! opt out with `buffer_requests = false` / `buffer_responses = false`.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, Size};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferingConfig {
    /// Bytes of one body held in memory; the rest goes to a temp file.
    /// 32 KiB: nginx's default `proxy_buffers` (8 x 4 KiB) on x86-64.
    /// Each slow reader holds this much: more would make a flood of them
    /// cost more than it does nginx; most API answers still fit whole.
    #[serde(default = "default_memory")]
    pub memory: Size,
    /// Where temp files go (created and unlinked at once, so nothing is
    /// left behind after a crash). Default: the system's temp directory.
    #[serde(default)]
    pub temp_dir: Option<PathBuf>,
    /// Temp file bytes of all bodies together at most. Above it a body is
    /// not read ahead further: it streams at the client's pace, as it
    /// would with buffering off, holding its upstream slot. nginx's
    /// `proxy_max_temp_file_size` is 1 GiB per response; this is a cap for
    /// the whole process, so a flood of slow readers cannot fill the disk.
    #[serde(default = "default_temp_max")]
    pub temp_max: Size,
}

impl Default for BufferingConfig {
    fn default() -> Self {
        BufferingConfig {
            memory: default_memory(),
            temp_dir: None,
            temp_max: default_temp_max(),
        }
    }
}

fn default_memory() -> Size {
    Size(32 << 10)
}

fn default_temp_max() -> Size {
    Size(1 << 30)
}

impl BufferingConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.memory.0 < 4096 || self.memory.0 > 64 << 20 {
            return Err(ConfigError::at(
                "buffering.memory",
                "must be between 4KiB and 64MiB",
            ));
        }
        if let Some(dir) = &self.temp_dir {
            if !dir.is_dir() {
                return Err(ConfigError::at(
                    "buffering.temp_dir",
                    format!("{} is not a directory", dir.display()),
                ));
            }
        }
        Ok(())
    }

    pub fn temp_dir(&self) -> PathBuf {
        self.temp_dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}
