//! `[[bot_rules]]` and `[challenge]`: which clients the admission phase
//! treats as bots and what it does with them (see
//! `pipeline::admission::bots` and `docs/bot-rules.md`). The shape is
//! checked here, patterns compiled once to report a bad one at its key
//! path; an `ip_file` is read when the runtime is built.

use std::path::PathBuf;
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;
use serde::Deserialize;

use super::{ConfigError, Dur};

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BotAction {
    /// 403 at once.
    Block,
    /// Held for `tarpit_delay`, then 429.
    Tarpit,
    /// The proof-of-work page (JSON 403 for API clients) until the client
    /// holds a clearance cookie.
    Challenge,
    /// Shed first under overload; later rules still run.
    Deprioritize,
    /// A log line and a metric only; later rules still run.
    Log,
}

impl BotAction {
    pub fn as_str(self) -> &'static str {
        match self {
            BotAction::Block => "block",
            BotAction::Tarpit => "tarpit",
            BotAction::Challenge => "challenge",
            BotAction::Deprioritize => "deprioritize",
            BotAction::Log => "log",
        }
    }

    /// Whether a match ends the rule walk (the first such rule wins).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            BotAction::Block | BotAction::Tarpit | BotAction::Challenge
        )
    }

    /// The bot score a match gives when the rule sets none (1 = surely
    /// automated, 99 = surely human; see `docs/bot-rules.md`).
    pub fn default_score(self) -> u8 {
        match self {
            BotAction::Block => 1,
            BotAction::Tarpit => 5,
            BotAction::Challenge => 15,
            BotAction::Deprioritize => 30,
            BotAction::Log => 50,
        }
    }
}

/// One `[[bot_rules]]` entry. Every condition it sets must hold (AND);
/// within a list any entry may match (OR). A rule with no condition is
/// refused: it would match everyone.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotRuleConfig {
    /// In metrics and logs.
    pub name: String,
    /// Regular expressions (the `regex` crate's syntax) on `user-agent`;
    /// a request without one is matched as an empty user agent.
    #[serde(default)]
    pub user_agent: Vec<String>,
    /// Header names: matches when any of them is absent or empty
    /// (`accept-language`, `sec-fetch-site`...).
    #[serde(default)]
    pub missing_headers: Vec<String>,
    /// Matches a user agent that claims Chrome or Edge and sends no
    /// `sec-ch-ua` client hint. Browsers send client hints over HTTPS
    /// only, so this matches only requests that came over TLS (to us, or
    /// to a trusted proxy that said so in `x-forwarded-proto`).
    #[serde(default)]
    pub browser_without_client_hints: bool,
    /// Client addresses (CIDRs, or single addresses).
    #[serde(default)]
    pub ip: Vec<String>,
    /// A file of CIDRs, one per line (`#` comments), read again when it
    /// changes.
    #[serde(default)]
    pub ip_file: Option<PathBuf>,
    /// JA4 TLS fingerprints (`t13d1516h2_8daaf6152771_02713d6af862`).
    #[serde(default)]
    pub ja4: Vec<String>,
    /// Request shape: matches a client address whose recent requests went
    /// (almost) only to one path prefix.
    #[serde(default)]
    pub shape: Option<ShapeConfig>,
    pub action: BotAction,
    /// The bot score a match gives (1-99); default by action.
    #[serde(default)]
    pub score: Option<u8>,
    /// `tarpit`: how long a request is held before its 429.
    #[serde(default = "default_tarpit_delay")]
    pub tarpit_delay: Dur,
    /// `tarpit`: requests held at once by this rule; beyond it the 429
    /// comes at once, so a flood cannot hold our memory and sockets.
    #[serde(default = "default_tarpit_max")]
    pub tarpit_max: usize,
}

fn default_tarpit_delay() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_tarpit_max() -> usize {
    256
}

/// `shape = { path_prefix = "/checkout", min_requests = 5, share = 1.0 }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapeConfig {
    /// The path the client keeps to.
    pub path_prefix: String,
    /// Requests seen from the address in `window` before it can match.
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    /// The smallest share of them on `path_prefix` (1.0 = only ever).
    #[serde(default = "default_share")]
    pub share: f64,
    /// How long an address's counts last before they start again.
    #[serde(default = "default_window")]
    pub window: Dur,
    /// Addresses tracked at once (least recently seen dropped first).
    #[serde(default = "default_track")]
    pub track: usize,
}

fn default_min_requests() -> u32 {
    5
}
fn default_share() -> f64 {
    1.0
}
fn default_window() -> Dur {
    Dur(Duration::from_secs(600))
}
fn default_track() -> usize {
    100_000
}

impl BotRuleConfig {
    /// Checks this entry's own keys; `p` is its key path (`bot_rules[N]`).
    pub(super) fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::at(format!("{p}.name"), "must not be empty"));
        }
        for (i, re) in self.user_agent.iter().enumerate() {
            regex::Regex::new(re).map_err(|e| {
                ConfigError::at(
                    format!("{p}.user_agent[{i}]"),
                    format!("not a valid pattern: {e}"),
                )
            })?;
        }
        for (i, h) in self.missing_headers.iter().enumerate() {
            if HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(ConfigError::at(
                    format!("{p}.missing_headers[{i}]"),
                    "not a valid header name",
                ));
            }
        }
        for (i, n) in self.ip.iter().enumerate() {
            if parse_net(n).is_none() {
                return Err(ConfigError::at(
                    format!("{p}.ip[{i}]"),
                    format!("{n:?} is not a CIDR or an address"),
                ));
            }
        }
        for (i, f) in self.ja4.iter().enumerate() {
            if !is_ja4_shape(f) {
                return Err(ConfigError::at(
                    format!("{p}.ja4[{i}]"),
                    "not a JA4 fingerprint (like t13d1516h2_8daaf6152771_02713d6af862)",
                ));
            }
        }
        if let Some(s) = &self.shape {
            s.validate(&format!("{p}.shape"))?;
        }
        let conditions = !self.user_agent.is_empty()
            || !self.missing_headers.is_empty()
            || self.browser_without_client_hints
            || !self.ip.is_empty()
            || self.ip_file.is_some()
            || !self.ja4.is_empty()
            || self.shape.is_some();
        if !conditions {
            return Err(ConfigError::at(
                p,
                "a bot rule needs at least one condition (user_agent, missing_headers, \
                 browser_without_client_hints, ip, ip_file, ja4, shape)",
            ));
        }
        if let Some(s) = self.score {
            if !(1..=99).contains(&s) {
                return Err(ConfigError::at(
                    format!("{p}.score"),
                    "must be between 1 (automated) and 99 (human)",
                ));
            }
        }
        if self.tarpit_delay.0.is_zero() || self.tarpit_delay.0 > Duration::from_secs(60) {
            return Err(ConfigError::at(
                format!("{p}.tarpit_delay"),
                "must be more than 0 and at most 60s",
            ));
        }
        if self.tarpit_max == 0 || self.tarpit_max > 100_000 {
            return Err(ConfigError::at(
                format!("{p}.tarpit_max"),
                "must be between 1 and 100000",
            ));
        }
        Ok(())
    }

    /// `ip`, parsed (entries that do not parse were refused by
    /// validation).
    pub fn nets(&self) -> Vec<IpNet> {
        self.ip.iter().filter_map(|n| parse_net(n)).collect()
    }

    /// The score a match gives.
    pub fn score(&self) -> u8 {
        self.score.unwrap_or(self.action.default_score())
    }
}

impl ShapeConfig {
    fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if !self.path_prefix.starts_with('/') {
            return Err(ConfigError::at(
                format!("{p}.path_prefix"),
                "must start with '/'",
            ));
        }
        if self.min_requests == 0 {
            return Err(ConfigError::at(
                format!("{p}.min_requests"),
                "must be at least 1",
            ));
        }
        if !(self.share > 0.0 && self.share <= 1.0) {
            return Err(ConfigError::at(
                format!("{p}.share"),
                "must be more than 0 and at most 1",
            ));
        }
        if self.window.0.is_zero() {
            return Err(ConfigError::at(
                format!("{p}.window"),
                "must be more than 0",
            ));
        }
        if self.track == 0 || self.track > 10_000_000 {
            return Err(ConfigError::at(
                format!("{p}.track"),
                "must be between 1 and 10000000",
            ));
        }
        Ok(())
    }
}

/// A CIDR (`203.0.113.0/24`) or a single address (`192.0.2.7`).
pub fn parse_net(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

/// `a_b_c` with a 10-character first part (`t13d1516h2`) and 12 hex
/// characters in each hash part, as JA4 writes them.
pub fn is_ja4_shape(s: &str) -> bool {
    let mut parts = s.split('_');
    let (Some(a), Some(b), Some(c), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let hex12 = |x: &str| x.len() == 12 && x.bytes().all(|c| c.is_ascii_hexdigit());
    a.len() == 10 && a.is_ascii() && hex12(b) && hex12(c)
}

/// `[challenge]`: the proof-of-work page of `action = "challenge"` rules
/// and the clearance cookie it earns.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeConfig {
    /// Leading zero bits the answer's SHA-256 must have (see
    /// `docs/bot-rules.md` for what each costs a phone and a script).
    #[serde(default = "default_difficulty")]
    pub difficulty: u8,
    /// A file holding the HMAC key (at least 32 bytes), the same on every
    /// gateway of the fleet so any of them verifies what another issued.
    /// Without it each process makes its own key (and says so in the log).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// How long a challenge may be answered.
    #[serde(default = "default_challenge_ttl")]
    pub challenge_ttl: Dur,
    /// How long the clearance cookie lets the client through.
    #[serde(default = "default_clearance_ttl")]
    pub clearance_ttl: Dur,
    /// The clearance cookie's name.
    #[serde(default = "default_cookie")]
    pub cookie: String,
}

impl Default for ChallengeConfig {
    fn default() -> Self {
        ChallengeConfig {
            difficulty: default_difficulty(),
            key_file: None,
            challenge_ttl: default_challenge_ttl(),
            clearance_ttl: default_clearance_ttl(),
            cookie: default_cookie(),
        }
    }
}

fn default_difficulty() -> u8 {
    16
}
fn default_challenge_ttl() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_clearance_ttl() -> Dur {
    Dur(Duration::from_secs(3600))
}
fn default_cookie() -> String {
    "flashgate_clearance".into()
}

impl ChallengeConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.difficulty == 0 || self.difficulty > 32 {
            return Err(ConfigError::at(
                "challenge.difficulty",
                "must be between 1 and 32 leading zero bits",
            ));
        }
        if self.challenge_ttl.0 < Duration::from_secs(1)
            || self.challenge_ttl.0 > Duration::from_secs(86_400)
        {
            return Err(ConfigError::at(
                "challenge.challenge_ttl",
                "must be between 1s and 24h",
            ));
        }
        if self.clearance_ttl.0 < Duration::from_secs(1)
            || self.clearance_ttl.0 > Duration::from_secs(30 * 86_400)
        {
            return Err(ConfigError::at(
                "challenge.clearance_ttl",
                "must be between 1s and 30 days",
            ));
        }
        let token = !self.cookie.is_empty()
            && self
                .cookie
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !token {
            return Err(ConfigError::at(
                "challenge.cookie",
                "must be letters, digits, '_' or '-'",
            ));
        }
        Ok(())
    }
}
