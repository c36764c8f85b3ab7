//! Bot rules: the first step of admission, before rate limits and
//! shedding (a bot's request should not use a rate budget or count as
//! demand). `[[bot_rules]]` are tried in the order of the file:
//!
//! - every condition a rule sets must hold (AND); inside a list (user
//!   agents, IPs, fingerprints) any entry may match (OR);
//! - `log` and `deprioritize` are applied and the walk goes on;
//! - the first matching rule with `block`, `tarpit` or `challenge` ends
//!   it (a `challenge` rule the client has a valid clearance cookie for
//!   is passed over, as if it had not matched);
//! - the request's bot score is the lowest score of the rules applied
//!   (99 when none was): see `docs/bot-rules.md`.
//!
//! A challenge answer (`x-flashgate-challenge` + `x-flashgate-nonce`) is
//! checked before the walk and answered by the gateway itself: 204 with
//! the clearance cookie, or 403 `challenge_failed`.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::ops::ControlFlow::{self, Break, Continue};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use http::header::USER_AGENT;
use http::request::Parts;
use http::{HeaderMap, HeaderName, StatusCode};
use ipnet::IpNet;
use lru::LruCache;
use regex::RegexSet;
use tokio::sync::Semaphore;

use super::challenge::{self, Binding, Challenger};
use crate::config::{BotAction, BotRuleConfig, Config, ConfigError, ShapeConfig};
use crate::error::ProxyError;
use crate::pipeline::runtime::{file_watch, Route};
use crate::pipeline::{RequestCtx, Stop};
use crate::respond::{self, Refusal};

/// The bot score of a request no rule applied to.
pub const HUMAN: u8 = 99;

/// The rules of one config, built.
pub struct Bots {
    rules: Vec<Rule>,
    /// Set when a rule challenges.
    challenger: Option<Challenger>,
    /// Some rule has a `shape` condition.
    shapes: bool,
}

struct Rule {
    name: Arc<str>,
    action: BotAction,
    score: u8,
    user_agent: Option<RegexSet>,
    missing: Vec<HeaderName>,
    hints: bool,
    ips: Vec<IpNet>,
    ip_file: Option<Arc<IpFile>>,
    ja4: Vec<Box<str>>,
    shape: Option<Shape>,
    tarpit_delay: Duration,
    /// Room for requests held by `tarpit` at once.
    tarpit_room: Arc<Semaphore>,
}

impl Bots {
    /// Builds the rules of `config`: patterns compiled, `ip_file`s read
    /// (errors at their key paths), the challenge key read or made.
    /// `watch`: start watching `ip_file`s for changes (needs a tokio
    /// runtime; `flashgate check` builds without).
    pub fn build(config: &Config, watch: bool) -> Result<Bots, ConfigError> {
        let mut rules = Vec::with_capacity(config.bot_rules.len());
        for (i, r) in config.bot_rules.iter().enumerate() {
            rules.push(Rule::build(r, &format!("bot_rules[{i}]"), watch)?);
        }
        // A waiting room that requires the challenge uses the same
        // challenger (and its answer exchange, below).
        let challenger = (rules.iter().any(|r| r.action == BotAction::Challenge)
            || config.waiting_rooms.iter().any(|w| w.require_challenge))
        .then(|| Challenger::new(&config.challenge))
        .transpose()?;
        let shapes = rules.iter().any(|r| r.shape.is_some());
        Ok(Bots {
            rules,
            challenger,
            shapes,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The proof-of-work challenger, when a rule or a waiting room uses it.
    pub fn challenger(&self) -> Option<&Challenger> {
        self.challenger.as_ref()
    }
}

impl Rule {
    fn build(r: &BotRuleConfig, p: &str, watch: bool) -> Result<Rule, ConfigError> {
        let user_agent = if r.user_agent.is_empty() {
            None
        } else {
            Some(
                RegexSet::new(&r.user_agent)
                    .map_err(|e| ConfigError::at(format!("{p}.user_agent"), e.to_string()))?,
            )
        };
        let ip_file = r
            .ip_file
            .as_ref()
            .map(|path| IpFile::open(path.clone(), &format!("{p}.ip_file"), watch))
            .transpose()?;
        Ok(Rule {
            name: r.name.as_str().into(),
            action: r.action,
            score: r.score(),
            user_agent,
            missing: r
                .missing_headers
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .collect(),
            hints: r.browser_without_client_hints,
            ips: r.nets(),
            ip_file,
            ja4: r.ja4.iter().map(|s| s.as_str().into()).collect(),
            shape: r.shape.as_ref().map(Shape::new),
            tarpit_delay: r.tarpit_delay.0,
            tarpit_room: Arc::new(Semaphore::new(r.tarpit_max)),
        })
    }

    /// Whether every condition of the rule holds for the request.
    /// `shaped`: the shape condition's verdict, taken before the walk.
    fn matches(&self, req: &Facts<'_>, shaped: bool) -> bool {
        if self.shape.is_some() && !shaped {
            return false;
        }
        if let Some(set) = &self.user_agent {
            if !set.is_match(req.user_agent) {
                return false;
            }
        }
        if !self.missing.is_empty() && !self.missing.iter().any(|h| absent(req.headers, h)) {
            return false;
        }
        if self.hints && !browser_without_client_hints(req) {
            return false;
        }
        if !self.ips.is_empty() || self.ip_file.is_some() {
            let listed = self.ips.iter().any(|n| n.contains(&req.ip))
                || self
                    .ip_file
                    .as_ref()
                    .is_some_and(|f| f.nets.load().iter().any(|n| n.contains(&req.ip)));
            if !listed {
                return false;
            }
        }
        if !self.ja4.is_empty() {
            let Some(fp) = req.ja4 else {
                return false;
            };
            if !self.ja4.iter().any(|f| f.eq_ignore_ascii_case(fp)) {
                return false;
            }
        }
        true
    }
}

/// What the rules look at, read once per request.
struct Facts<'a> {
    ip: IpAddr,
    headers: &'a HeaderMap,
    user_agent: &'a str,
    ja4: Option<&'a str>,
    /// The request came over TLS (to us, or to a trusted proxy that said
    /// so).
    tls: bool,
}

fn absent(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers
        .get(name)
        .is_none_or(|v| v.as_bytes().iter().all(u8::is_ascii_whitespace))
}

/// A user agent that claims a Chromium browser (Chrome, Edge) and sends
/// no `sec-ch-ua`: Chromium has sent it on every HTTPS request since
/// version 89, so its absence says the agent string is borrowed.
fn browser_without_client_hints(req: &Facts<'_>) -> bool {
    req.tls
        && req.user_agent.contains("Mozilla/")
        && (req.user_agent.contains("Chrome/") || req.user_agent.contains("Edg/"))
        && absent(req.headers, &SEC_CH_UA)
}

static SEC_CH_UA: HeaderName = HeaderName::from_static("sec-ch-ua");

/// Runs the bot rules for a request (see the module docs).
pub async fn check(ctx: &mut RequestCtx<'_>, route: &Route, head: &Parts) -> ControlFlow<Stop> {
    let bots = &ctx.runtime.bots;
    if bots.is_empty() && bots.challenger.is_none() {
        return Continue(());
    }
    let now = SystemTime::now();
    if let Some(c) = &bots.challenger {
        if let Some(answer) = exchange(ctx, c, head, now) {
            return Break(answer);
        }
    }
    let facts = Facts {
        ip: ctx.client_ip,
        headers: &head.headers,
        user_agent: head
            .headers
            .get(USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
        ja4: ctx.ja4.as_deref(),
        tls: ctx.conn.scheme == "https" || forwarded_https(ctx, &head.headers),
    };
    // Every shape rule sees every request, whichever rule ends the walk:
    // its counts are the client's whole recent history.
    let shaped: Vec<bool> = if bots.shapes {
        bots.rules
            .iter()
            .map(|r| {
                r.shape
                    .as_ref()
                    .is_some_and(|s| s.observe(facts.ip, head.uri.path()))
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut decided = None;
    for (i, rule) in bots.rules.iter().enumerate() {
        if !rule.matches(&facts, shaped.get(i).copied().unwrap_or(false)) {
            continue;
        }
        if rule.action == BotAction::Challenge {
            let cleared = bots.challenger.as_ref().is_some_and(|c| {
                c.is_cleared(&head.headers, &Binding::of(facts.ip, &head.headers), now)
            });
            if cleared {
                count(ctx, route, rule, "cleared");
                continue;
            }
        }
        ctx.bot_score = ctx.bot_score.min(rule.score);
        match rule.action {
            BotAction::Log => {
                count(ctx, route, rule, "log");
                tracing::info!(
                    target: "flashgate::bots",
                    rule = &*rule.name,
                    client = %facts.ip,
                    route = &*route.name,
                    path = head.uri.path(),
                    user_agent = facts.user_agent,
                    "bot rule matched"
                );
            }
            BotAction::Deprioritize => {
                count(ctx, route, rule, "deprioritize");
                ctx.deprioritized = true;
            }
            BotAction::Block | BotAction::Tarpit | BotAction::Challenge => {
                decided = Some(rule);
                break;
            }
        }
    }
    let Some(rule) = decided else {
        return Continue(());
    };
    match rule.action {
        BotAction::Block => {
            count(ctx, route, rule, "block");
            Break(Stop::Refuse(Refusal::new(ProxyError::BotBlocked)))
        }
        BotAction::Challenge => {
            count(ctx, route, rule, "challenge");
            let Some(c) = &bots.challenger else {
                return Break(Stop::Refuse(Refusal::new(ProxyError::BotBlocked)));
            };
            ctx.shared
                .metrics
                .challenges
                .with_label_values(&["issued"])
                .inc();
            let binding = Binding::of(facts.ip, &head.headers);
            Break(Stop::Refuse(c.refusal(&head.headers, &binding, now)))
        }
        _ => {
            // Held without the context across the wait: it is not `Sync`.
            let secs = rule.tarpit_delay.as_secs().max(1) as u32;
            let refusal = Refusal::new(ProxyError::BotTarpit).retry_after(secs);
            match rule.tarpit_room.clone().try_acquire_owned() {
                Ok(held) => {
                    count(ctx, route, rule, "tarpit");
                    tokio::time::sleep(rule.tarpit_delay).await;
                    drop(held);
                }
                Err(_) => count(ctx, route, rule, "tarpit_full"),
            }
            Break(Stop::Refuse(refusal))
        }
    }
}

/// A challenge answer on this request: checked and answered here (204
/// with the cookie, or 403). `None` when the request carries none.
fn exchange(ctx: &RequestCtx<'_>, c: &Challenger, head: &Parts, now: SystemTime) -> Option<Stop> {
    let h = &head.headers;
    let (Some(challenge), Some(nonce)) = (
        h.get(&challenge::CHALLENGE_HEADER),
        h.get(&challenge::NONCE_HEADER),
    ) else {
        return None;
    };
    let binding = Binding::of(ctx.client_ip, h);
    let checked = match (challenge.to_str(), nonce.to_str()) {
        (Ok(ch), Ok(n)) => c.check_answer(ch, n, &binding, now),
        _ => Err(challenge::Failure::Malformed),
    };
    let metric = |event: &str| {
        ctx.shared
            .metrics
            .challenges
            .with_label_values(&[event])
            .inc()
    };
    match checked {
        Ok(()) => {
            metric("passed");
            let secure = ctx.conn.scheme == "https" || forwarded_https(ctx, h);
            let mut headers = HeaderMap::new();
            headers.insert(challenge::set_cookie(), c.clearance(&binding, now, secure));
            Some(Stop::Answer(Box::new(respond::empty(
                StatusCode::NO_CONTENT,
                headers,
            ))))
        }
        Err(why) => {
            metric("failed");
            tracing::debug!(target: "flashgate::bots", client = %ctx.client_ip, reason = ?why, "challenge answer refused");
            Some(Stop::Refuse(Refusal::new(ProxyError::ChallengeFailed)))
        }
    }
}

/// `x-forwarded-proto: https` from a trusted proxy (TLS ended there).
pub(crate) fn forwarded_https(ctx: &RequestCtx<'_>, headers: &HeaderMap) -> bool {
    crate::pipeline::identity::client_ip::is_trusted(
        ctx.conn.peer.ip(),
        &ctx.listener.trusted_proxies,
    ) && headers
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
}

fn count(ctx: &RequestCtx<'_>, route: &Route, rule: &Rule, outcome: &str) {
    ctx.shared
        .metrics
        .bot_decisions
        .with_label_values(&[&route.name, &rule.name, outcome])
        .inc();
}

/// The request-shape condition: per client address, how many requests
/// it sent in the current window and how many went to `path_prefix`. An
/// LRU bounded by `track`, so a flood of addresses cannot grow it.
struct Shape {
    path_prefix: String,
    min_requests: u32,
    share: f64,
    window: Duration,
    seen: Mutex<LruCache<IpAddr, Counts>>,
}

#[derive(Clone, Copy)]
struct Counts {
    since: Instant,
    total: u32,
    on_path: u32,
}

impl Shape {
    fn new(c: &ShapeConfig) -> Shape {
        let cap = NonZeroUsize::new(c.track).unwrap_or(NonZeroUsize::MIN);
        Shape {
            path_prefix: c.path_prefix.clone(),
            min_requests: c.min_requests,
            share: c.share,
            window: c.window.0,
            seen: Mutex::new(LruCache::new(cap)),
        }
    }

    /// Counts the request and says whether the client's history now has
    /// the shape.
    fn observe(&self, ip: IpAddr, path: &str) -> bool {
        let now = Instant::now();
        let on_path = path.starts_with(&self.path_prefix);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let counts = seen.get_or_insert_mut(ip, || Counts {
            since: now,
            total: 0,
            on_path: 0,
        });
        if now.duration_since(counts.since) > self.window {
            *counts = Counts {
                since: now,
                total: 0,
                on_path: 0,
            };
        }
        counts.total = counts.total.saturating_add(1);
        counts.on_path = counts.on_path.saturating_add(u32::from(on_path));
        counts.total >= self.min_requests
            && f64::from(counts.on_path) >= self.share * f64::from(counts.total)
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.seen.lock().map_or(0, |s| s.len())
    }
}

/// An `ip_file`: CIDRs read at build time and again whenever the file
/// changes (see `runtime::file_watch`).
struct IpFile {
    nets: ArcSwap<Vec<IpNet>>,
}

impl IpFile {
    fn open(path: PathBuf, key: &str, watch: bool) -> Result<Arc<IpFile>, ConfigError> {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError::at(key, format!("cannot read {}: {e}", path.display())))?;
        let nets = parse_ip_list(&text)
            .map_err(|m| ConfigError::at(key, format!("{}: {m}", path.display())))?;
        let file = Arc::new(IpFile {
            nets: ArcSwap::from_pointee(nets),
        });
        if watch {
            file_watch::watch(&file, path, "bot rule ip_file", |f: &IpFile, text| {
                let nets = parse_ip_list(text)?;
                let n = nets.len();
                f.nets.store(Arc::new(nets));
                Ok(n)
            });
        }
        Ok(file)
    }
}

/// One CIDR or address per line; `#` starts a comment.
fn parse_ip_list(text: &str) -> Result<Vec<IpNet>, String> {
    let mut nets = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        let net = crate::config::bot::parse_net(entry)
            .ok_or_else(|| format!("line {}: {entry:?} is not a CIDR or an address", i + 1))?;
        nets.push(net);
    }
    Ok(nets)
}

/// The header a trusted proxy (CloudFront, or an ALB with AWS WAF) puts
/// the client's JA4 fingerprint in.
pub static JA4_HEADER: HeaderName = HeaderName::from_static("cloudfront-viewer-ja4-fingerprint");

/// The JA4 fingerprint from [`JA4_HEADER`] when `peer` is a trusted
/// proxy; the header is removed either way, so the upstream sees only a
/// fingerprint we vouch for.
pub fn ja4_from_proxy(headers: &mut HeaderMap, trusted: bool) -> Option<Arc<str>> {
    let value = headers.remove(&JA4_HEADER)?;
    if !trusted {
        return None;
    }
    let text = value.to_str().ok()?.trim();
    crate::config::bot::is_ja4_shape(text).then(|| Arc::from(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn facts<'a>(headers: &'a HeaderMap, ip: &str, tls: bool) -> Facts<'a> {
        Facts {
            ip: ip.parse().unwrap(),
            headers,
            user_agent: headers
                .get(USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
            ja4: None,
            tls,
        }
    }

    fn rule(toml: &str) -> Rule {
        let text = format!(
            "{}\n[[bot_rules]]\nname = \"r\"\n{toml}\n",
            crate::config::TEST_BASE
        );
        let c = Config::parse(&text).unwrap();
        Rule::build(&c.bot_rules[0], "bot_rules[0]", false).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn conditions_all_hold_and_lists_any() {
        let r = rule(
            "user_agent = [\"(?i)python-requests\", \"(?i)scrapy\"]\nip = [\"203.0.113.0/24\"]\naction = \"block\"",
        );
        let bot = headers(&[("user-agent", "python-requests/2.31")]);
        assert!(r.matches(&facts(&bot, "203.0.113.9", false), false));
        assert!(!r.matches(&facts(&bot, "198.51.100.9", false), false));
        let human = headers(&[("user-agent", "Mozilla/5.0")]);
        assert!(!r.matches(&facts(&human, "203.0.113.9", false), false));
        let scrapy = headers(&[("user-agent", "Scrapy/2.11")]);
        assert!(r.matches(&facts(&scrapy, "203.0.113.1", false), false));
    }

    #[test]
    fn missing_headers_and_borrowed_browser_agents() {
        let r =
            rule("missing_headers = [\"accept-language\", \"sec-fetch-site\"]\naction = \"log\"");
        let full = headers(&[("accept-language", "en"), ("sec-fetch-site", "none")]);
        assert!(!r.matches(&facts(&full, "192.0.2.1", false), false));
        let part = headers(&[("accept-language", "en"), ("sec-fetch-site", " ")]);
        assert!(r.matches(&facts(&part, "192.0.2.1", false), false));

        let r = rule("browser_without_client_hints = true\naction = \"challenge\"");
        let chrome = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36";
        let borrowed = headers(&[("user-agent", chrome)]);
        assert!(r.matches(&facts(&borrowed, "192.0.2.1", true), false));
        // Plain HTTP: real Chrome sends no client hints there either.
        assert!(!r.matches(&facts(&borrowed, "192.0.2.1", false), false));
        let real = headers(&[
            ("user-agent", chrome),
            ("sec-ch-ua", "\"Chromium\";v=\"126\""),
        ]);
        assert!(!r.matches(&facts(&real, "192.0.2.1", true), false));
        let firefox = headers(&[(
            "user-agent",
            "Mozilla/5.0 (X11; Linux) Gecko/20100101 Firefox/128.0",
        )]);
        assert!(!r.matches(&facts(&firefox, "192.0.2.1", true), false));
    }

    #[test]
    fn shape_counts_per_address_within_its_cap() {
        let s = Shape::new(&ShapeConfig {
            path_prefix: "/checkout".into(),
            min_requests: 3,
            share: 1.0,
            window: crate::config::Dur(Duration::from_secs(60)),
            track: 2,
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(!s.observe(a, "/checkout"));
        assert!(!s.observe(a, "/checkout"));
        assert!(s.observe(a, "/checkout/x"), "three, all on checkout");
        // A shopper who browses first never has the shape.
        assert!(!s.observe(b, "/products"));
        for _ in 0..5 {
            assert!(!s.observe(b, "/checkout"));
        }
        for i in 0..100u8 {
            s.observe(IpAddr::from([10, 0, 0, i]), "/checkout");
        }
        assert_eq!(s.tracked(), 2, "bounded by track");
    }

    #[test]
    fn ip_lists_parse_with_comments_and_refuse_junk() {
        let nets =
            parse_ip_list("# scrapers\n203.0.113.0/24\n\n198.51.100.7 # one\n2001:db8::/32\n")
                .unwrap();
        assert_eq!(nets.len(), 3);
        assert!(nets[1].contains(&"198.51.100.7".parse::<IpAddr>().unwrap()));
        let e = parse_ip_list("10.0.0.0/8\nnope\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn ja4_comes_only_from_trusted_proxies() {
        let fp = "t13d1516h2_8daaf6152771_02713d6af862";
        let mut h = headers(&[("cloudfront-viewer-ja4-fingerprint", fp)]);
        assert_eq!(ja4_from_proxy(&mut h, false), None);
        assert!(h.get(&JA4_HEADER).is_none(), "stripped");
        let mut h = headers(&[("cloudfront-viewer-ja4-fingerprint", fp)]);
        assert_eq!(ja4_from_proxy(&mut h, true).as_deref(), Some(fp));
        let mut h = headers(&[("cloudfront-viewer-ja4-fingerprint", "junk")]);
        assert_eq!(ja4_from_proxy(&mut h, true), None);
    }

    #[test]
    fn config_keys_are_checked_at_their_paths() {
        let err = |toml: &str| {
            let text = format!(
                "{}\n[[bot_rules]]\nname = \"r\"\n{toml}\n",
                crate::config::TEST_BASE
            );
            Config::parse(&text).unwrap_err().path
        };
        assert_eq!(
            err("user_agent = [\"ok\", \"(unclosed\"]\naction = \"block\""),
            "bot_rules[0].user_agent[1]"
        );
        assert_eq!(err("action = \"block\""), "bot_rules[0]");
        assert_eq!(
            err("ip = [\"10.0.0.0/33\"]\naction = \"block\""),
            "bot_rules[0].ip[0]"
        );
        assert_eq!(
            err("ja4 = [\"t13\"]\naction = \"block\""),
            "bot_rules[0].ja4[0]"
        );
        assert_eq!(
            err("ip = [\"10.0.0.0/8\"]\naction = \"ban\""),
            "bot_rules[0].action"
        );
        assert_eq!(
            err("ip = [\"10.0.0.0/8\"]\naction = \"block\"\nscore = 0"),
            "bot_rules[0].score"
        );
        assert_eq!(
            err("ip = [\"10.0.0.0/8\"]\naction = \"tarpit\"\ntarpit_delay = \"2m\""),
            "bot_rules[0].tarpit_delay"
        );
        assert_eq!(
            err("missing_headers = [\"bad name\"]\naction = \"log\""),
            "bot_rules[0].missing_headers[0]"
        );
        assert_eq!(
            err("shape = { path_prefix = \"/c\", share = 1.5 }\naction = \"log\""),
            "bot_rules[0].shape.share"
        );
        assert_eq!(
            err("ip = [\"10.0.0.0/8\"]\naction = \"log\"\n[[bot_rules]]\nname = \"r\"\nip = [\"10.0.0.0/8\"]\naction = \"log\""),
            "bot_rules[1].name"
        );
        assert_eq!(
            err("ip = [\"10.0.0.0/8\"]\naction = \"log\"\n[challenge]\ndifficulty = 40"),
            "challenge.difficulty"
        );
        assert_eq!(
            err("ip = [\"10.0.0.0/8\"]\naction = \"log\"\n[challenge]\ncookie = \"a b\""),
            "challenge.cookie"
        );
        // Files are read when the runtime is built (`flashgate check`).
        let text = format!(
            "{}\n[[bot_rules]]\nname = \"r\"\nip_file = \"/nonexistent/ips\"\naction = \"block\"\n",
            crate::config::TEST_BASE
        );
        let c = Config::parse(&text).unwrap();
        let e = Bots::build(&c, false).err().unwrap();
        assert_eq!(e.path, "bot_rules[0].ip_file");
        let text = format!(
            "{}\n[[bot_rules]]\nname = \"r\"\nip = [\"10.0.0.0/8\"]\naction = \"challenge\"\n[challenge]\nkey_file = \"/nonexistent/key\"\n",
            crate::config::TEST_BASE
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(
            Bots::build(&c, false).err().unwrap().path,
            "challenge.key_file"
        );
    }
}
