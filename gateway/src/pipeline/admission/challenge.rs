//! The proof-of-work challenge of `action = "challenge"` bot rules, and
//! the clearance cookie it earns. Stateless: everything a gateway needs
//! to check an answer or a cookie is in it, signed (HMAC-SHA256 with the
//! `[challenge] key_file` key), so any gateway of the fleet that has the
//! key verifies what another issued, with no shared store.
//!
//! - A challenge is `expiry.difficulty.random.sig`: the signature covers
//!   those and the client's binding (its IP prefix and user-agent hash),
//!   so it cannot be answered for another client or after it expired.
//! - The answer is a nonce (decimal) such that SHA-256(challenge ‖ nonce)
//!   starts with `difficulty` zero bits: the client tries about
//!   2^difficulty nonces, the gateway checks with one hash.
//! - A good answer is exchanged for the cookie `expiry.sig`, whose
//!   signature covers the expiry and the same binding: a cookie copied to
//!   another network (/24 for IPv4, /64 for IPv6) or another user agent is
//!   worth nothing.
//!
//! Browsers get a small HTML page that does the work in JavaScript and
//! sends the answer back on the same URL in `x-flashgate-challenge` and
//! `x-flashgate-nonce`; API clients (anything that does not accept
//! `text/html`) get the JSON 403 with the challenge in it and answer the
//! same way. ring does the hashing and signing: it is already in the
//! build for rustls, and `hmac::verify` compares in constant time.

use std::net::IpAddr;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{ACCEPT, COOKIE, SET_COOKIE, USER_AGENT};
use http::{HeaderMap, HeaderName, HeaderValue};
use ring::{digest, hmac, rand::SecureRandom};

use crate::config::{ChallengeConfig, ConfigError};
use crate::error::ProxyError;
use crate::respond::Refusal;

/// The request header that carries the challenge being answered.
pub static CHALLENGE_HEADER: HeaderName = HeaderName::from_static("x-flashgate-challenge");
/// The request header that carries the answer's nonce.
pub static NONCE_HEADER: HeaderName = HeaderName::from_static("x-flashgate-nonce");

/// Issues and checks challenges and clearance cookies.
pub struct Challenger {
    key: hmac::Key,
    difficulty: u8,
    challenge_ttl: Duration,
    clearance_ttl: Duration,
    cookie: String,
}

/// Why an answer was not accepted (all answered alike: `challenge_failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Malformed,
    BadSignature,
    Expired,
    NotEnoughWork,
}

impl Challenger {
    /// From `[challenge]`: the key from `key_file`, or one made for this
    /// process (kept across reloads) when there is none.
    pub fn new(c: &ChallengeConfig) -> Result<Challenger, ConfigError> {
        let secret = match &c.key_file {
            Some(path) => read_key(path)?,
            None => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!(
                        "[challenge] key_file is not set: this process signs challenges and clearance \
                         cookies with a key of its own, so other gateways will not accept them and a \
                         restart invalidates them; set key_file to the same file on every gateway"
                    )
                });
                process_key().to_vec()
            }
        };
        Ok(Challenger {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            difficulty: c.difficulty,
            challenge_ttl: c.challenge_ttl.0,
            clearance_ttl: c.clearance_ttl.0,
            cookie: c.cookie.clone(),
        })
    }

    pub fn difficulty(&self) -> u8 {
        self.difficulty
    }

    /// A new challenge for this client, valid for `challenge_ttl`.
    pub fn issue(&self, binding: &Binding, now: SystemTime) -> String {
        let expiry = unix(now) + self.challenge_ttl.as_secs();
        let mut random = [0u8; 8];
        // SystemRandom fails only without an OS random source; a zero
        // nonce then is still a valid, signed (if less varied) challenge.
        let _ = ring::rand::SystemRandom::new().fill(&mut random);
        let head = format!("{expiry}.{}.{}", self.difficulty, hex(&random));
        let sig = self.sign("challenge", &head, binding);
        format!("{head}.{sig}")
    }

    /// Checks an answer: signed by us for this client, not expired, and
    /// enough leading zero bits in SHA-256(challenge ‖ nonce).
    pub fn check_answer(
        &self,
        challenge: &str,
        nonce: &str,
        binding: &Binding,
        now: SystemTime,
    ) -> Result<(), Failure> {
        let (head, sig) = challenge.rsplit_once('.').ok_or(Failure::Malformed)?;
        let mut parts = head.split('.');
        let (Some(expiry), Some(difficulty), Some(_random), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Failure::Malformed);
        };
        let expiry: u64 = expiry.parse().map_err(|_| Failure::Malformed)?;
        let difficulty: u8 = difficulty.parse().map_err(|_| Failure::Malformed)?;
        let nonce_ok =
            !nonce.is_empty() && nonce.len() <= 20 && nonce.bytes().all(|b| b.is_ascii_digit());
        if !nonce_ok {
            return Err(Failure::Malformed);
        }
        self.verify("challenge", head, binding, sig)?;
        if unix(now) > expiry {
            return Err(Failure::Expired);
        }
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(challenge.as_bytes());
        ctx.update(nonce.as_bytes());
        if leading_zero_bits(ctx.finish().as_ref()) < u32::from(difficulty) {
            return Err(Failure::NotEnoughWork);
        }
        Ok(())
    }

    /// The `set-cookie` value of a clearance for this client.
    pub fn clearance(&self, binding: &Binding, now: SystemTime, secure: bool) -> HeaderValue {
        let expiry = unix(now) + self.clearance_ttl.as_secs();
        let head = expiry.to_string();
        let sig = self.sign("clearance", &head, binding);
        let text = format!(
            "{}={head}.{sig}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{}",
            self.cookie,
            self.clearance_ttl.as_secs(),
            if secure { "; Secure" } else { "" }
        );
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// Whether the request carries an unexpired clearance cookie of this
    /// client.
    pub fn is_cleared(&self, headers: &HeaderMap, binding: &Binding, now: SystemTime) -> bool {
        let Some(value) = cookie(headers, &self.cookie) else {
            return false;
        };
        let Some((head, sig)) = value.split_once('.') else {
            return false;
        };
        let Ok(expiry) = head.parse::<u64>() else {
            return false;
        };
        unix(now) <= expiry && self.verify("clearance", head, binding, sig).is_ok()
    }

    /// The refusal that carries a new challenge: the page for a browser,
    /// the JSON 403 naming it for everyone else.
    pub fn refusal(&self, headers: &HeaderMap, binding: &Binding, now: SystemTime) -> Refusal {
        let challenge = self.issue(binding, now);
        let value =
            HeaderValue::from_str(&challenge).unwrap_or_else(|_| HeaderValue::from_static(""));
        let mut r = Refusal::new(ProxyError::ChallengeRequired)
            .header(CHALLENGE_HEADER.clone(), value)
            .detail(
                "challenge",
                serde_json::json!({
                    "challenge": challenge,
                    "difficulty": self.difficulty,
                    "algorithm": "sha256",
                    "answer": "find a decimal nonce such that sha256(challenge + nonce) starts with `difficulty` zero bits; send the same request with the headers x-flashgate-challenge: <challenge> and x-flashgate-nonce: <nonce>, and keep the cookie it sets",
                }),
            );
        if wants_html(headers) {
            r = r.page(page(&challenge, self.difficulty));
        }
        r
    }

    fn sign(&self, what: &str, head: &str, binding: &Binding) -> String {
        hex(hmac::sign(&self.key, &signed_text(what, head, binding)).as_ref())
    }

    fn verify(&self, what: &str, head: &str, binding: &Binding, sig: &str) -> Result<(), Failure> {
        let given = unhex(sig).ok_or(Failure::Malformed)?;
        // Compares in constant time.
        hmac::verify(&self.key, &signed_text(what, head, binding), &given)
            .map_err(|_| Failure::BadSignature)
    }
}

fn signed_text(what: &str, head: &str, binding: &Binding) -> Vec<u8> {
    format!(
        "flashgate/{what}/v1|{head}|{}|{}",
        binding.prefix, binding.agent
    )
    .into_bytes()
}

/// What a challenge and a cookie are bound to: the client's network (its
/// /24 or /64, so a phone that changes address inside its carrier's
/// block keeps its cookie) and a hash of its user agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    prefix: String,
    agent: String,
}

impl Binding {
    /// The client's network (`203.0.113.0/24`, `2001:db8:1:2::/64`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A short tag of the whole binding (network and user agent), for a
    /// signed value that says whose it was in clear.
    pub fn tag(&self) -> String {
        let text = format!("{}|{}", self.prefix, self.agent);
        hex(&digest::digest(&digest::SHA256, text.as_bytes()).as_ref()[..6])
    }

    pub fn of(ip: IpAddr, headers: &HeaderMap) -> Binding {
        let prefix = match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                format!("{}.{}.{}.0/24", o[0], o[1], o[2])
            }
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => {
                    let o = v4.octets();
                    format!("{}.{}.{}.0/24", o[0], o[1], o[2])
                }
                None => {
                    let s = v6.segments();
                    format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
                }
            },
        };
        let ua = headers.get(USER_AGENT).map_or(&b""[..], |v| v.as_bytes());
        let agent = hex(&digest::digest(&digest::SHA256, ua).as_ref()[..8]);
        Binding { prefix, agent }
    }
}

/// Whether the client takes an HTML page (a browser's `accept`).
pub(crate) fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.contains("text/html")))
}

/// The value of cookie `name` in the request's `cookie` fields.
pub(crate) fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (n, v) = pair.trim().split_once('=')?;
            (n == name).then_some(v)
        })
}

/// The set-cookie header name, for the exchange's answer.
pub fn set_cookie() -> HeaderName {
    SET_COOKIE
}

/// Leading zero bits of a hash.
pub fn leading_zero_bits(hash: &[u8]) -> u32 {
    let mut bits = 0;
    for &b in hash {
        if b == 0 {
            bits += 8;
        } else {
            return bits + b.leading_zeros();
        }
    }
    bits
}

pub(crate) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// The key of `key_file`: its bytes, at least 32 after trimming a final
/// newline.
fn read_key(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let at = |m: String| ConfigError::at("challenge.key_file", m);
    let mut bytes =
        std::fs::read(path).map_err(|e| at(format!("cannot read {}: {e}", path.display())))?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    if bytes.len() < 32 {
        return Err(at(format!(
            "{}: the key must be at least 32 bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

/// This process's own key when a `key_file` is not set (`[challenge]`,
/// a waiting room): made once, so reloads keep the cookies it signed.
/// Whoever uses it says so in the log.
pub(crate) fn process_key() -> &'static [u8; 32] {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut key = [0u8; 32];
        if ring::rand::SystemRandom::new().fill(&mut key).is_err() {
            // No OS random source: fall back to the time and the address
            // of a stack value (unpredictable enough for one process, and
            // the log says to set a key file).
            let seed = format!("{:?}{:p}", SystemTime::now(), &key);
            key.copy_from_slice(digest::digest(&digest::SHA256, seed.as_bytes()).as_ref());
        }
        key
    })
}

/// The challenge page: self-contained (no script or style from anywhere
/// else), a plain-JS SHA-256 (WebCrypto is missing on plain-HTTP origins
/// and costs a promise per hash), the work in slices so the page stays
/// responsive, then the answer on the same URL and a reload with the
/// cookie.
fn page(challenge: &str, difficulty: u8) -> String {
    PAGE.replace("{{CHALLENGE}}", challenge)
        .replace("{{DIFFICULTY}}", &difficulty.to_string())
}

const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<meta name="robots" content="noindex"><title>One moment</title>
<style>body{font:16px system-ui,sans-serif;max-width:32em;margin:20vh auto;padding:0 1em;text-align:center;color:#222}</style>
</head><body><h1>One moment</h1><p id="s">Checking your browser before the shop opens for you&hellip;</p>
<noscript><p>This check needs JavaScript.</p></noscript>
<script>
(function(){
var C="{{CHALLENGE}}",D={{DIFFICULTY}};
var K=[],p=2,i,j;for(i=0;i<64;p++){for(j=2;j*j<=p&&p%j;j++);if(j*j>p)K[i++]=Math.pow(p,1/3)*4294967296|0}
var W=new Int32Array(64);
function sha256(s){var H=[1779033703,-1150833019,1013904242,-1521486534,1359893119,-1694144372,528734635,1541459225],n=s.length,l=((n+8)>>6)*16+16,b=new Int32Array(l),i,o;for(i=0;i<n;i++)b[i>>2]|=s.charCodeAt(i)<<(24-(i&3)*8);b[n>>2]|=128<<(24-(n&3)*8);b[l-1]=n*8;for(o=0;o<l;o+=16){var A=H[0],B=H[1],G0=H[2],E0=H[3],E=H[4],F=H[5],G=H[6],Z=H[7];for(i=0;i<64;i++){if(i<16)W[i]=b[o+i];else{var x=W[i-15],y=W[i-2];W[i]=((x>>>7|x<<25)^(x>>>18|x<<14)^(x>>>3))+W[i-16]+((y>>>17|y<<15)^(y>>>19|y<<13)^(y>>>10))+W[i-7]|0}var t=Z+((E>>>6|E<<26)^(E>>>11|E<<21)^(E>>>25|E<<7))+(E&F^~E&G)+K[i]+W[i]|0,u=((A>>>2|A<<30)^(A>>>13|A<<19)^(A>>>22|A<<10))+(A&B^A&G0^B&G0)|0;Z=G;G=F;F=E;E=E0+t|0;E0=G0;G0=B;B=A;A=t+u|0}H[0]=H[0]+A|0;H[1]=H[1]+B|0;H[2]=H[2]+G0|0;H[3]=H[3]+E0|0;H[4]=H[4]+E|0;H[5]=H[5]+F|0;H[6]=H[6]+G|0;H[7]=H[7]+Z|0}return H}
function zeros(h){for(var z=0,i=0;i<8;i++){if(h[i]===0){z+=32;continue}return z+Math.clz32(h[i])}return z}
var n=0,s=document.getElementById("s");
function fail(){s.textContent="The check did not pass. Reload the page to try again."}
function work(){for(var end=n+20000;n<end;n++){if(zeros(sha256(C+n))>=D){send(n);return}}setTimeout(work,0)}
function send(nonce){var x=new XMLHttpRequest();x.open("GET",location.href);x.setRequestHeader("x-flashgate-challenge",C);x.setRequestHeader("x-flashgate-nonce",String(nonce));x.setRequestHeader("accept","application/json");x.onload=function(){if(x.status>=200&&x.status<300)location.reload();else fail()};x.onerror=fail;x.send()}
setTimeout(work,0);
})();
</script></body></html>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn challenger(difficulty: u8) -> Challenger {
        let c = ChallengeConfig {
            difficulty,
            ..ChallengeConfig::default()
        };
        Challenger::new(&c).unwrap()
    }

    fn binding(ip: &str, ua: &str) -> Binding {
        let mut h = HeaderMap::new();
        h.insert(USER_AGENT, HeaderValue::from_str(ua).unwrap());
        Binding::of(ip.parse().unwrap(), &h)
    }

    fn solve(challenge: &str, difficulty: u8) -> String {
        (0u64..)
            .map(|n| n.to_string())
            .find(|n| {
                let mut c = digest::Context::new(&digest::SHA256);
                c.update(challenge.as_bytes());
                c.update(n.as_bytes());
                leading_zero_bits(c.finish().as_ref()) >= u32::from(difficulty)
            })
            .unwrap()
    }

    #[test]
    fn an_answer_is_checked_with_one_hash_and_bound_to_its_client() {
        let c = challenger(8);
        let now = SystemTime::now();
        let me = binding("203.0.113.7", "Mozilla/5.0");
        let challenge = c.issue(&me, now);
        let nonce = solve(&challenge, 8);
        assert_eq!(c.check_answer(&challenge, &nonce, &me, now), Ok(()));
        // Same /24, same agent: the same client.
        let neighbour = binding("203.0.113.200", "Mozilla/5.0");
        assert_eq!(c.check_answer(&challenge, &nonce, &neighbour, now), Ok(()));
        let moved = binding("198.51.100.7", "Mozilla/5.0");
        assert_eq!(
            c.check_answer(&challenge, &nonce, &moved, now),
            Err(Failure::BadSignature)
        );
        let other_ua = binding("203.0.113.7", "curl/8");
        assert_eq!(
            c.check_answer(&challenge, &nonce, &other_ua, now),
            Err(Failure::BadSignature)
        );
        let later = now + Duration::from_secs(301);
        assert_eq!(
            c.check_answer(&challenge, &nonce, &me, later),
            Err(Failure::Expired)
        );
        // A nonce without the work (find one that has too few bits).
        let lazy = (0u64..)
            .map(|n| n.to_string())
            .find(|n| c.check_answer(&challenge, n, &me, now).is_err())
            .unwrap();
        assert_eq!(
            c.check_answer(&challenge, &lazy, &me, now),
            Err(Failure::NotEnoughWork)
        );
        // A challenge whose difficulty was lowered by the client.
        let forged = challenge.replacen(".8.", ".1.", 1);
        assert_eq!(
            c.check_answer(&forged, "0", &me, now),
            Err(Failure::BadSignature)
        );
        for junk in ["", ".", "a.b.c.d", "1.2.3.zz", &format!("{challenge}x")] {
            assert!(c.check_answer(junk, &nonce, &me, now).is_err(), "{junk}");
        }
        assert_eq!(
            c.check_answer(&challenge, "12a", &me, now),
            Err(Failure::Malformed)
        );
    }

    #[test]
    fn clearance_cookies_expire_and_do_not_move() {
        let c = challenger(8);
        let now = SystemTime::now();
        let me = binding("2001:db8:1:2:3::9", "Mozilla/5.0");
        let set = c.clearance(&me, now, true);
        let text = set.to_str().unwrap();
        assert!(text.starts_with("flashgate_clearance="), "{text}");
        assert!(
            text.contains("HttpOnly") && text.contains("Secure"),
            "{text}"
        );
        let pair = text.split(';').next().unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            HeaderValue::from_str(&format!("a=b; {pair}")).unwrap(),
        );
        assert!(c.is_cleared(&h, &me, now));
        let same_64 = binding("2001:db8:1:2:ffff::1", "Mozilla/5.0");
        assert!(c.is_cleared(&h, &same_64, now));
        assert!(!c.is_cleared(&h, &binding("2001:db8:1:3::9", "Mozilla/5.0"), now));
        assert!(!c.is_cleared(&h, &binding("2001:db8:1:2:3::9", "Other"), now));
        assert!(!c.is_cleared(&h, &me, now + Duration::from_secs(3601)));
        // Another key (another fleet, or a forged cookie) is refused.
        let other = Challenger {
            key: hmac::Key::new(hmac::HMAC_SHA256, b"another key of at least 32 bytes!"),
            ..challenger(8)
        };
        assert!(!other.is_cleared(&h, &me, now));
        h.insert(
            COOKIE,
            HeaderValue::from_static("flashgate_clearance=99999999999.00"),
        );
        assert!(!c.is_cleared(&h, &me, now));
    }

    #[test]
    fn browsers_get_the_page_and_api_clients_json() {
        let c = challenger(8);
        let me = binding("203.0.113.7", "Mozilla/5.0");
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let r = c.refusal(&h, &me, SystemTime::now());
        assert!(r.page.is_none());
        assert_eq!(r.details.as_ref().unwrap()["challenge"]["difficulty"], 8);
        h.insert(
            ACCEPT,
            HeaderValue::from_static("text/html,application/xhtml+xml"),
        );
        let r = c.refusal(&h, &me, SystemTime::now());
        let page = String::from_utf8(r.page.unwrap().to_vec()).unwrap();
        assert!(page.contains("var C=\"") && page.contains("D=8;"), "{page}");
        assert!(!page.contains("{{"));
    }

    #[test]
    fn zero_bits() {
        assert_eq!(leading_zero_bits(&[0, 0, 0x0f]), 20);
        assert_eq!(leading_zero_bits(&[0x80]), 0);
        assert_eq!(leading_zero_bits(&[0, 0]), 16);
        assert_eq!(unhex("0aff"), Some(vec![10, 255]));
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("abc"), None);
    }
}
