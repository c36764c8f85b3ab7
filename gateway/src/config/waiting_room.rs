//! `[[waiting_rooms]]`: virtual waiting rooms that routes name with
//! `waiting_room = "drop"` (see `pipeline::admission::waiting_room` and
//! `docs/waiting-room.md`). The shape is checked here; the key file and
//! the page template are read when the runtime is built, with errors at
//! the same key paths.
//!
//! ```toml
//! [[waiting_rooms]]
//! name = "drop"
//! new_users = "50/s"
//! active_users = 2000
//! session = "5m"
//! key_file = "secrets/room.key"
//! event = { prequeue = "2026-12-04T08:30:00Z", start = "2026-12-04T09:00:00Z", shuffle = true }
//! ```

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::units::days_from_civil;
use super::{ConfigError, Dur, Rate};

/// How the line moves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Queueing {
    /// First come, first served by ticket number.
    #[default]
    Fifo,
    /// Each admission draws among everyone waiting.
    Random,
    /// The room lets everyone through (kept configured, switched off).
    Passthrough,
    /// No line: a visitor who would wait gets the "full" answer.
    Reject,
}

impl Queueing {
    pub fn as_str(self) -> &'static str {
        match self {
            Queueing::Fifo => "fifo",
            Queueing::Random => "random",
            Queueing::Passthrough => "passthrough",
            Queueing::Reject => "reject",
        }
    }
}

/// What the room does while its Redis does not answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoomRedisDown {
    /// Visitors with a valid session cookie go on; everyone else gets the
    /// waiting page (no new places are given out, none are lost).
    #[default]
    Hold,
    /// Everyone goes on; the route's rate limits and overload shedding
    /// are what is left to protect the origin.
    Open,
}

/// One `[[waiting_rooms]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitingRoomConfig {
    /// Names the room in routes, cookies, Redis keys, metrics and admin
    /// calls: letters, digits, `-` and `_`.
    pub name: String,
    /// Visitors admitted from the line per second (fleet-wide with
    /// `[redis]`).
    pub new_users: Rate,
    /// Admitted sessions at once.
    pub active_users: u32,
    /// How long an admitted visitor stays in without a request (renewed
    /// by each request).
    #[serde(default = "default_session")]
    pub session: Dur,
    #[serde(default)]
    pub queueing: Queueing,
    /// Hold everyone in the line (before a sale, or to pause it).
    #[serde(default)]
    pub queue_all: bool,
    /// HMAC keys of tickets and sessions, one per line (at least 32
    /// bytes each): the first signs, every line verifies, so a new key
    /// goes on the first line and the old one stays below it until the
    /// tickets it signed have expired. Required with `[redis]` (every
    /// gateway of the fleet must verify the others' tickets); without it
    /// the process makes a key of its own.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// An HTML file for the waiting page, with `{{room}}`, `{{position}}`,
    /// `{{wait_seconds}}` and `{{refresh_seconds}}` filled in.
    #[serde(default)]
    pub template: Option<PathBuf>,
    /// The waiting page's status code.
    #[serde(default = "default_status")]
    pub status: u16,
    /// A waiting visitor who has not polled for this long loses their
    /// place (and an admitted one who has not come in, their slot).
    #[serde(default = "default_grace")]
    pub grace: Dur,
    /// How often the waiting page (and a JSON client) polls.
    #[serde(default = "default_refresh")]
    pub refresh: Dur,
    /// Tickets waiting at once from one client network (/24 or /64);
    /// absent = no cap.
    #[serde(default)]
    pub tickets_per_prefix: Option<u32>,
    /// A new ticket needs the bot challenge's clearance cookie first
    /// (`[challenge]`).
    #[serde(default)]
    pub require_challenge: bool,
    /// A scheduled sale: a pre-queue, its lottery, and the sale's end.
    #[serde(default)]
    pub event: Option<EventConfig>,
    /// With `[redis]`: what the room does while Redis does not answer.
    #[serde(default)]
    pub redis_down: RoomRedisDown,
}

/// `event = { prequeue = "...", start = "...", end = "...", shuffle = true }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventConfig {
    /// From here to `start` everyone who arrives waits.
    pub prequeue: UtcTime,
    /// The sale opens: the pre-queue is shuffled once (with `shuffle`)
    /// and admission starts at `new_users`.
    pub start: UtcTime,
    /// After this the room steps aside: everyone passes.
    #[serde(default)]
    pub end: Option<UtcTime>,
    /// Draw the pre-queue's order by lot at `start` (else it stays in
    /// arrival order).
    #[serde(default = "yes")]
    pub shuffle: bool,
}

fn yes() -> bool {
    true
}
fn default_session() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_status() -> u16 {
    200
}
fn default_grace() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_refresh() -> Dur {
    Dur(Duration::from_secs(10))
}

impl WaitingRoomConfig {
    /// Checks this entry's own keys; `p` is its key path
    /// (`waiting_rooms[N]`).
    pub(super) fn validate(&self, p: &str) -> Result<(), ConfigError> {
        let ok_name = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok_name {
            return Err(ConfigError::at(
                format!("{p}.name"),
                "1-64 letters, digits, '-' or '_' (it names cookies and Redis keys)",
            ));
        }
        let per_s = f64::from(self.new_users.count) / self.new_users.per.as_secs_f64();
        if per_s > 100_000.0 {
            return Err(ConfigError::at(
                format!("{p}.new_users"),
                "more than 100000/s is not a waiting room",
            ));
        }
        if self.active_users == 0 {
            return Err(ConfigError::at(
                format!("{p}.active_users"),
                "must be at least 1",
            ));
        }
        if self.session.0 < Duration::from_secs(1) || self.session.0 > Duration::from_secs(86400) {
            return Err(ConfigError::at(
                format!("{p}.session"),
                "must be between 1s and 24h",
            ));
        }
        if self.refresh.0 < Duration::from_secs(1) || self.refresh.0 > Duration::from_secs(300) {
            return Err(ConfigError::at(
                format!("{p}.refresh"),
                "must be between 1s and 5m",
            ));
        }
        // A visitor who polls on time must never lose their place: two
        // refreshes fit in the grace.
        if self.grace.0 < self.refresh.0 * 2 || self.grace.0 > Duration::from_secs(3600) {
            return Err(ConfigError::at(
                format!("{p}.grace"),
                format!(
                    "must be at least twice refresh ({}) and at most 1h",
                    self.refresh
                ),
            ));
        }
        if !(200..=599).contains(&self.status) || (300..400).contains(&self.status) {
            return Err(ConfigError::at(
                format!("{p}.status"),
                "must be a 2xx, 4xx or 5xx status",
            ));
        }
        if self.tickets_per_prefix == Some(0) {
            return Err(ConfigError::at(
                format!("{p}.tickets_per_prefix"),
                "must be at least 1 (leave it out for no cap)",
            ));
        }
        if let Some(e) = &self.event {
            if e.start <= e.prequeue {
                return Err(ConfigError::at(
                    format!("{p}.event.start"),
                    "must be after event.prequeue",
                ));
            }
            if e.end.is_some_and(|end| end <= e.start) {
                return Err(ConfigError::at(
                    format!("{p}.event.end"),
                    "must be after event.start",
                ));
            }
        }
        Ok(())
    }

    /// `new_users` as visitors per second.
    pub fn new_users_per_s(&self) -> f64 {
        rate_per_s(self.new_users)
    }
}

/// A rate as a count per second.
pub fn rate_per_s(r: Rate) -> f64 {
    f64::from(r.count) / r.per.as_secs_f64()
}

/// A moment in UTC, written as RFC 3339 (`"2026-12-04T09:00:00Z"`, or
/// with an offset `"2026-12-04T10:00:00+01:00"`), kept as Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct UtcTime(pub u64);

impl FromStr for UtcTime {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid time {s:?}: write it like \"2026-12-04T09:00:00Z\"");
        let b = s.trim().as_bytes();
        if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
            return Err(bad());
        }
        let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
            std::str::from_utf8(&b[r])
                .ok()
                .filter(|t| t.bytes().all(|c| c.is_ascii_digit()))
                .and_then(|t| t.parse().ok())
                .ok_or_else(bad)
        };
        if b[13] != b':' || b[16] != b':' {
            return Err(bad());
        }
        let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
            return Err(bad());
        }
        // Fractions of a second are allowed and dropped.
        let mut i = 19;
        if b.get(i) == Some(&b'.') {
            i += 1;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
        }
        let offset = match &b[i..] {
            [b'Z' | b'z'] => 0,
            [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
                let o = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
                if *sign == b'+' {
                    o
                } else {
                    -o
                }
            }
            _ => return Err(bad()),
        };
        let secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec - offset;
        u64::try_from(secs).map(UtcTime).map_err(|_| bad())
    }
}

impl fmt::Display for UtcTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}", self.0)
    }
}

impl<'de> Deserialize<'de> for UtcTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!("1970-01-01T00:00:00Z".parse::<UtcTime>().unwrap().0, 0);
        assert_eq!(
            "2026-12-04T09:00:00Z".parse::<UtcTime>().unwrap().0,
            1_796_374_800
        );
        assert_eq!(
            "2026-12-04T10:00:00+01:00".parse::<UtcTime>().unwrap().0,
            1_796_374_800
        );
        assert_eq!(
            "2026-12-04T09:00:00.250Z".parse::<UtcTime>().unwrap().0,
            1_796_374_800
        );
        assert!("2026-12-04 09:00".parse::<UtcTime>().is_err());
        assert!("2026-13-04T09:00:00Z".parse::<UtcTime>().is_err());
        assert!("2026-12-04T09:00:00".parse::<UtcTime>().is_err());
    }
}
