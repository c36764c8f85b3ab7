//! The room's two cookies, signed so that no gateway needs to remember
//! them and no client can make or change one:
//!
//! - the **ticket** (`flashgate_wr_<room>`), a place in line:
//!   `v1.<number>.<joined_ms>.<expiry_s>.<binding>.<sig>`;
//! - the **session** (`flashgate_ws_<room>`), an admitted visitor:
//!   `v1.<number>.<expiry_s>.<binding>.<sig>`.
//!
//! The signature is HMAC-SHA256 over the kind, the room and every field,
//! so an altered number, time or room fails. `<binding>` is a tag of the
//! client's network (/24, /64) and user-agent hash
//! ([`challenge::Binding`], the challenge's own): a cookie copied to
//! another network or browser is refused as `moved` (it is in clear so
//! the refusal can say why; the signature covers it). A ticket expires
//! `grace` after it was last given out (each poll renews it), a session
//! `session` after.
//!
//! Keys: `key_file` holds one per line; the first signs, all verify, so a
//! key is rotated by putting the new one first. ring does the HMAC, as it
//! does for the challenge: it is already in the build for rustls, and
//! `hmac::verify` compares in constant time.

use std::path::Path;
use std::time::SystemTime;

use http::HeaderValue;
use ring::hmac;

use crate::config::ConfigError;
use crate::pipeline::admission::challenge::{self, hex, unhex, Binding};

/// Why a cookie was refused (the `reason` of
/// `flashgate_waiting_room_tickets_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Malformed,
    BadSignature,
    Expired,
    Moved,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Malformed => "malformed",
            Refused::BadSignature => "bad_signature",
            Refused::Expired => "expired",
            Refused::Moved => "moved",
        }
    }
}

/// A verified ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub number: u64,
    pub joined_ms: u64,
    /// Unix seconds after which the ticket no longer verifies.
    pub expiry_s: u64,
}

/// A verified session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub number: u64,
    pub expiry_s: u64,
}

/// The signing key and the keys that verify.
pub struct Keys {
    keys: Vec<hmac::Key>,
}

impl Keys {
    /// From `key_file` (one key per line, each at least 32 bytes), or
    /// this process's own key. `p` is the room's key path.
    pub fn load(file: Option<&Path>, p: &str) -> Result<Keys, ConfigError> {
        let Some(path) = file else {
            return Ok(Keys {
                keys: vec![hmac::Key::new(hmac::HMAC_SHA256, challenge::process_key())],
            });
        };
        let at = |m: String| ConfigError::at(format!("{p}.key_file"), m);
        let text =
            std::fs::read(path).map_err(|e| at(format!("cannot read {}: {e}", path.display())))?;
        let mut keys = Vec::new();
        for (i, line) in text.split(|b| *b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            if line.len() < 32 {
                return Err(at(format!(
                    "{} line {}: a key must be at least 32 bytes",
                    path.display(),
                    i + 1
                )));
            }
            keys.push(hmac::Key::new(hmac::HMAC_SHA256, line));
        }
        if keys.is_empty() {
            return Err(at(format!("{}: no key in the file", path.display())));
        }
        Ok(Keys { keys })
    }

    fn sign(&self, text: &str) -> String {
        hex(hmac::sign(&self.keys[0], text.as_bytes()).as_ref())
    }

    fn verify(&self, text: &str, sig: &str) -> bool {
        let Some(given) = unhex(sig) else {
            return false;
        };
        self.keys
            .iter()
            .any(|k| hmac::verify(k, text.as_bytes(), &given).is_ok())
    }

    /// A ticket's cookie value.
    pub fn ticket(&self, room: &str, t: Ticket, binding: &Binding) -> String {
        let head = format!(
            "v1.{}.{}.{}.{}",
            t.number,
            t.joined_ms,
            t.expiry_s,
            binding.tag()
        );
        let sig = self.sign(&format!("flashgate/wr-ticket|{room}|{head}"));
        format!("{head}.{sig}")
    }

    pub fn check_ticket(
        &self,
        room: &str,
        value: &str,
        binding: &Binding,
        now: SystemTime,
    ) -> Result<Ticket, Refused> {
        let (head, sig) = value.rsplit_once('.').ok_or(Refused::Malformed)?;
        let f: Vec<&str> = head.split('.').collect();
        let [v, number, joined, expiry, tag] = f[..] else {
            return Err(Refused::Malformed);
        };
        let parse = |s: &str| s.parse::<u64>().map_err(|_| Refused::Malformed);
        let (number, joined_ms, expiry) = (parse(number)?, parse(joined)?, parse(expiry)?);
        if v != "v1" {
            return Err(Refused::Malformed);
        }
        if !self.verify(&format!("flashgate/wr-ticket|{room}|{head}"), sig) {
            return Err(Refused::BadSignature);
        }
        if tag != binding.tag() {
            return Err(Refused::Moved);
        }
        if challenge::unix(now) > expiry {
            return Err(Refused::Expired);
        }
        Ok(Ticket {
            number,
            joined_ms,
            expiry_s: expiry,
        })
    }

    /// A session's cookie value.
    pub fn session(&self, room: &str, s: Session, binding: &Binding) -> String {
        let head = format!("v1.{}.{}.{}", s.number, s.expiry_s, binding.tag());
        let sig = self.sign(&format!("flashgate/wr-session|{room}|{head}"));
        format!("{head}.{sig}")
    }

    pub fn check_session(
        &self,
        room: &str,
        value: &str,
        binding: &Binding,
        now: SystemTime,
    ) -> Result<Session, Refused> {
        let (head, sig) = value.rsplit_once('.').ok_or(Refused::Malformed)?;
        let f: Vec<&str> = head.split('.').collect();
        let [v, number, expiry, tag] = f[..] else {
            return Err(Refused::Malformed);
        };
        let parse = |s: &str| s.parse::<u64>().map_err(|_| Refused::Malformed);
        let (number, expiry_s) = (parse(number)?, parse(expiry)?);
        if v != "v1" {
            return Err(Refused::Malformed);
        }
        if !self.verify(&format!("flashgate/wr-session|{room}|{head}"), sig) {
            return Err(Refused::BadSignature);
        }
        if tag != binding.tag() {
            return Err(Refused::Moved);
        }
        if challenge::unix(now) > expiry_s {
            return Err(Refused::Expired);
        }
        Ok(Session { number, expiry_s })
    }
}

/// A `set-cookie` value: `name=value` for `max_age` seconds (0 clears it).
pub fn set_cookie(name: &str, value: &str, max_age: u64, secure: bool) -> HeaderValue {
    let text = format!(
        "{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{}",
        if secure { "; Secure" } else { "" }
    );
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::USER_AGENT;
    use http::HeaderMap;
    use std::time::Duration;

    fn binding(ip: &str, ua: &str) -> Binding {
        let mut h = HeaderMap::new();
        h.insert(USER_AGENT, HeaderValue::from_str(ua).unwrap());
        Binding::of(ip.parse().unwrap(), &h)
    }

    fn keys(lines: &str) -> Keys {
        let dir = std::env::temp_dir().join(format!("wr-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // One file per call: the tests run in parallel.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let f = dir.join(format!("k{n}"));
        std::fs::write(&f, lines).unwrap();
        Keys::load(Some(&f), "waiting_rooms[0]").unwrap()
    }

    #[test]
    fn tickets_verify_and_refuse_by_reason() {
        let k = keys(&format!("{}\n", "a".repeat(32)));
        let b = binding("203.0.113.7", "ua");
        let now = SystemTime::now();
        let exp = challenge::unix(now) + 30;
        let t = Ticket {
            number: 42,
            joined_ms: 1000,
            expiry_s: exp,
        };
        let v = k.ticket("drop", t, &b);
        assert_eq!(k.check_ticket("drop", &v, &b, now), Ok(t));
        // Same network, other address: still theirs.
        assert_eq!(
            k.check_ticket("drop", &v, &binding("203.0.113.99", "ua"), now),
            Ok(t)
        );
        assert_eq!(
            k.check_ticket("drop", &v, &binding("198.51.100.7", "ua"), now),
            Err(Refused::Moved)
        );
        assert_eq!(
            k.check_ticket("drop", &v, &binding("203.0.113.7", "other"), now),
            Err(Refused::Moved)
        );
        assert_eq!(
            k.check_ticket("other", &v, &b, now),
            Err(Refused::BadSignature)
        );
        let altered = v.replacen("v1.42.", "v1.41.", 1);
        assert_eq!(
            k.check_ticket("drop", &altered, &b, now),
            Err(Refused::BadSignature)
        );
        assert_eq!(
            k.check_ticket("drop", &v, &b, now + Duration::from_secs(60)),
            Err(Refused::Expired)
        );
        assert_eq!(
            k.check_ticket("drop", "nonsense", &b, now),
            Err(Refused::Malformed)
        );
        // A session is not a ticket.
        let s = k.session(
            "drop",
            Session {
                number: 42,
                expiry_s: exp,
            },
            &b,
        );
        assert!(k.check_ticket("drop", &s, &b, now).is_err());
        assert!(k.check_session("drop", &s, &b, now).is_ok());
    }

    #[test]
    fn rotation_first_key_signs_all_verify() {
        let old = keys(&format!("{}\n", "o".repeat(32)));
        let both = keys(&format!("{}\n{}\n", "n".repeat(32), "o".repeat(32)));
        let new = keys(&format!("{}\n", "n".repeat(32)));
        let b = binding("203.0.113.7", "ua");
        let now = SystemTime::now();
        let t = Ticket {
            number: 1,
            joined_ms: 1,
            expiry_s: challenge::unix(now) + 30,
        };
        let by_old = old.ticket("r", t, &b);
        assert!(both.check_ticket("r", &by_old, &b, now).is_ok());
        let by_both = both.ticket("r", t, &b);
        assert!(new.check_ticket("r", &by_both, &b, now).is_ok());
        assert!(old.check_ticket("r", &by_both, &b, now).is_err());
    }
}
