//! Where a room's line lives: one decision per call ([`Store::decide`]),
//! the same rules in both stores:
//!
//! - [`LocalStore`]: this gateway's memory (no `[redis]`, `flashgate
//!   demo`): the line of one gateway;
//! - [`super::redis_store::RedisStore`]: one Lua script per decision
//!   (`room.lua`), so every gateway of the fleet shares one line.
//!
//! The rules of one decision, in order (the script follows them line by
//! line):
//!
//! 1. **Reap**: a waiting visitor whose last poll is older than `grace`
//!    leaves the line; an admitted session (or a reserved slot) past its
//!    expiry leaves the active set. Quitters never block the line and a
//!    leaked session frees itself.
//! 2. **Shuffle**, once: at an event's start the pre-queue's order is
//!    drawn by lot (a permutation of their places, so later arrivals stay
//!    behind them).
//! 3. **Advance**: unless the room holds (`queue_all`, pre-queue),
//!    admission tokens accrue at `new_users` (at most one second's worth
//!    banked), and while `active < active_users` the lowest places in
//!    line are admitted, one token each: each gets a reserved slot in the
//!    active set that lasts `grace`, claimed by their next poll.
//! 4. **The visitor's own ask**: join, poll, renew a session, release.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use rand::seq::SliceRandom;
use rand::SeedableRng;

/// A store's answer, boxed: the room holds its store as `dyn Store`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The room's settings for one decision (the live ones: admin changes
/// included by the store itself, see [`Live`]).
#[derive(Debug, Clone)]
pub struct Params {
    pub now_ms: u64,
    /// `new_users` per second.
    pub rate_per_s: f64,
    pub active_cap: u64,
    pub session_ms: u64,
    pub grace_ms: u64,
    /// `queue_all` from the config (a live change overrides it).
    pub queue_all: bool,
    /// The event's pre-queue: nobody is admitted from the line.
    pub prequeue: bool,
    /// `queueing = "reject"`: no line.
    pub reject: bool,
    /// `queueing = "random"`: a join's place is `score`, drawn by the
    /// caller.
    pub random: bool,
    pub score: f64,
    /// Tickets waiting at once per client network (0: no cap).
    pub prefix_cap: u64,
    /// The event's start (ms) when it shuffles the pre-queue; 0: none.
    pub shuffle_at_ms: u64,
    /// Seed of the shuffle (one draw, made by whichever gateway shuffles).
    pub seed: u64,
}

/// What the visitor asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// A place in line (or straight in when there is room and no line).
    Join,
    /// "Is it my turn?" with a ticket's number.
    Poll(u64),
    /// Renew the admitted session of this number.
    Session(u64),
    /// The origin released this session.
    Release(u64),
    /// Only the room's numbers (admin).
    Status,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// In line: `position` 1 is next. `rejoined`: a new place was given
    /// (no ticket, or the old place was lost).
    Waiting {
        number: u64,
        position: u64,
        rejoined: bool,
    },
    /// Let in. `fresh`: this call claimed the slot (count it once).
    Admitted { number: u64, fresh: bool },
    /// The session was renewed.
    Renewed,
    /// `tickets_per_prefix` reached for this network.
    PrefixCap,
    /// `queueing = "reject"` and the room is full.
    Full,
    /// Done (release, status).
    Done,
}

/// A decision and the room's numbers after it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    pub verdict: Verdict,
    pub waiting: u64,
    pub active: u64,
    /// Highest number let in so far.
    pub serving: u64,
    /// Last number given out.
    pub issued: u64,
    /// Admitted since the room began (fleet-wide with Redis).
    pub admitted: u64,
    /// Live changes in effect (`POST /admin/waiting-rooms/{name}`).
    pub live: Live,
}

/// Live changes an operator made; `None`: the config's value.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Live {
    pub rate_per_s: Option<f64>,
    pub queue_all: Option<bool>,
}

/// The store did not answer (Redis down); the room follows `redis_down`.
#[derive(Debug)]
pub struct StoreDown;

/// One room's line.
pub trait Store: Send + Sync {
    /// One atomic decision (see the module docs).
    fn decide<'a>(
        &'a self,
        p: &'a Params,
        ask: Ask,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<Outcome, StoreDown>>;

    /// Sets (or, with `None` members, drops) the live changes.
    fn set_live(&self, live: Live) -> BoxFuture<'_, Result<(), StoreDown>>;
}

/// The line in this gateway's memory.
#[derive(Default)]
pub struct LocalStore {
    state: Mutex<Line>,
}

/// One room's state: the same pieces the script keeps in Redis. A
/// waiting visitor's position is counted by walking the line ahead of
/// them (`BTreeSet::range`): O(position) per poll, where Redis's
/// `ZCOUNT` is O(log n); a newcomer's in FIFO is the line's length.
#[derive(Default)]
struct Line {
    /// (score, number): the line in order.
    order: BTreeSet<(Score, u64)>,
    /// number -> (score, poll deadline ms, network).
    waiting: HashMap<u64, (Score, u64, String)>,
    /// (poll deadline, number): the waiting by deadline, so a decision
    /// reaps only the expired (as the script's `beats` ZSET).
    beats: BTreeSet<(u64, u64)>,
    /// Tickets waiting per network.
    per_prefix: HashMap<String, u64>,
    /// number -> (expiry ms, claimed): reserved slots and sessions.
    active: HashMap<u64, (u64, bool)>,
    /// (expiry, number) of `active`.
    expiries: BTreeSet<(u64, u64)>,
    issued: u64,
    serving: u64,
    admitted: u64,
    tokens: f64,
    last_ms: Option<u64>,
    shuffled: bool,
    live: Live,
}

/// An `f64` place that sorts (places are finite).
#[derive(Debug, Clone, Copy)]
struct Score(f64);
impl PartialEq for Score {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for Score {}
impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Score {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl Line {
    fn leave(&mut self, number: u64) {
        if let Some((score, deadline, prefix)) = self.waiting.remove(&number) {
            self.order.remove(&(score, number));
            self.beats.remove(&(deadline, number));
            if let Some(c) = self.per_prefix.get_mut(&prefix) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    self.per_prefix.remove(&prefix);
                }
            }
        }
    }

    /// Sets (or adds) an active slot's expiry and whether it is claimed.
    fn set_active(&mut self, number: u64, expiry: u64, claimed: bool) {
        if let Some((old, _)) = self.active.insert(number, (expiry, claimed)) {
            self.expiries.remove(&(old, number));
        }
        self.expiries.insert((expiry, number));
    }

    fn remove_active(&mut self, number: u64) {
        if let Some((old, _)) = self.active.remove(&number) {
            self.expiries.remove(&(old, number));
        }
    }

    /// A waiting visitor polled: their deadline moves on.
    fn beat(&mut self, number: u64, deadline: u64) {
        if let Some(w) = self.waiting.get_mut(&number) {
            self.beats.remove(&(w.1, number));
            w.1 = deadline;
            self.beats.insert((deadline, number));
        }
    }

    fn decide(&mut self, p: &Params, ask: Ask, prefix: &str) -> Outcome {
        let now = p.now_ms;
        // 1. Reap.
        while let Some(&(deadline, n)) = self.beats.first() {
            if deadline >= now {
                break;
            }
            self.leave(n);
        }
        while let Some(&(expiry, n)) = self.expiries.first() {
            if expiry >= now {
                break;
            }
            self.remove_active(n);
        }
        // 2. Shuffle once.
        if p.shuffle_at_ms > 0 && now >= p.shuffle_at_ms && !self.shuffled {
            self.shuffled = true;
            let members: Vec<(Score, u64)> = self.order.iter().copied().collect();
            let mut scores: Vec<Score> = members.iter().map(|m| m.0).collect();
            scores.shuffle(&mut rand::rngs::StdRng::seed_from_u64(p.seed));
            self.order.clear();
            for ((_, n), s) in members.into_iter().zip(scores) {
                self.order.insert((s, n));
                if let Some(w) = self.waiting.get_mut(&n) {
                    w.0 = s;
                }
            }
        }
        // 3. Advance.
        let rate = self.live.rate_per_s.unwrap_or(p.rate_per_s);
        let hold = p.prequeue || self.live.queue_all.unwrap_or(p.queue_all);
        let burst = rate.max(1.0);
        let elapsed = self
            .last_ms
            .map_or(burst / rate * 1000.0, |l| now.saturating_sub(l) as f64);
        self.tokens = (self.tokens + elapsed * rate / 1000.0).min(burst);
        self.last_ms = Some(now);
        if !hold {
            while self.tokens >= 1.0 && (self.active.len() as u64) < p.active_cap {
                let Some(&(s, n)) = self.order.iter().next() else {
                    break;
                };
                self.order.remove(&(s, n));
                self.leave(n);
                self.set_active(n, now + p.grace_ms, false);
                self.tokens -= 1.0;
                self.admitted += 1;
                self.serving = self.serving.max(n);
            }
        }
        // 4. The ask.
        let verdict = match ask {
            Ask::Status => Verdict::Done,
            Ask::Release(n) => {
                self.remove_active(n);
                Verdict::Done
            }
            Ask::Session(n) => match self.active.get(&n) {
                Some(&(_, true)) => {
                    self.set_active(n, now + p.session_ms, true);
                    Verdict::Renewed
                }
                _ => self.join(p, hold, prefix),
            },
            Ask::Poll(n) => {
                if let Some(&(score, _, _)) = self.waiting.get(&n) {
                    self.beat(n, now + p.grace_ms);
                    Verdict::Waiting {
                        number: n,
                        position: self.order.range(..(score, n)).count() as u64 + 1,
                        rejoined: false,
                    }
                } else if let Some(&(_, claimed)) = self.active.get(&n) {
                    self.set_active(n, now + p.session_ms, true);
                    Verdict::Admitted {
                        number: n,
                        fresh: !claimed,
                    }
                } else {
                    self.join(p, hold, prefix)
                }
            }
            Ask::Join => self.join(p, hold, prefix),
        };
        Outcome {
            verdict,
            waiting: self.waiting.len() as u64,
            active: self.active.len() as u64,
            serving: self.serving,
            issued: self.issued,
            admitted: self.admitted,
            live: self.live,
        }
    }

    fn join(&mut self, p: &Params, hold: bool, prefix: &str) -> Verdict {
        let now = p.now_ms;
        if !hold
            && self.order.is_empty()
            && self.tokens >= 1.0
            && (self.active.len() as u64) < p.active_cap
        {
            self.tokens -= 1.0;
            self.issued += 1;
            let n = self.issued;
            self.set_active(n, now + p.session_ms, true);
            self.admitted += 1;
            self.serving = self.serving.max(n);
            return Verdict::Admitted {
                number: n,
                fresh: true,
            };
        }
        if p.reject {
            return Verdict::Full;
        }
        if p.prefix_cap > 0 && self.per_prefix.get(prefix).copied().unwrap_or(0) >= p.prefix_cap {
            return Verdict::PrefixCap;
        }
        self.issued += 1;
        let n = self.issued;
        let score = Score(if p.random { p.score } else { n as f64 });
        self.order.insert((score, n));
        self.waiting
            .insert(n, (score, now + p.grace_ms, prefix.to_string()));
        self.beats.insert((now + p.grace_ms, n));
        *self.per_prefix.entry(prefix.to_string()).or_default() += 1;
        // In FIFO the newcomer is last (counting would walk the line).
        let position = if p.random {
            self.order.range(..(score, n)).count() as u64 + 1
        } else {
            self.order.len() as u64
        };
        Verdict::Waiting {
            number: n,
            position,
            rejoined: true,
        }
    }
}

impl Store for LocalStore {
    fn decide<'a>(
        &'a self,
        p: &'a Params,
        ask: Ask,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<Outcome, StoreDown>> {
        let outcome = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .decide(p, ask, prefix);
        Box::pin(async move { Ok(outcome) })
    }

    fn set_live(&self, live: Live) -> BoxFuture<'_, Result<(), StoreDown>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).live = live;
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(now_ms: u64) -> Params {
        Params {
            now_ms,
            rate_per_s: 2.0,
            active_cap: 3,
            session_ms: 10_000,
            grace_ms: 3_000,
            queue_all: false,
            prequeue: false,
            reject: false,
            random: false,
            score: 0.0,
            prefix_cap: 0,
            shuffle_at_ms: 0,
            seed: 7,
        }
    }

    fn decide(line: &mut Line, p: &Params, ask: Ask) -> Verdict {
        line.decide(p, ask, "10.0.0.0/24").verdict
    }

    #[test]
    fn fifo_at_the_rate_while_slots_are_free() {
        let mut line = Line::default();
        let p = params(1_000);
        // Two tokens banked: the first two go straight in.
        assert!(matches!(
            decide(&mut line, &p, Ask::Join),
            Verdict::Admitted {
                number: 1,
                fresh: true
            }
        ));
        assert!(matches!(
            decide(&mut line, &p, Ask::Join),
            Verdict::Admitted { number: 2, .. }
        ));
        for n in 3..=6 {
            assert!(
                matches!(decide(&mut line, &p, Ask::Join), Verdict::Waiting { number, position, rejoined: true } if number == n && position == n - 2)
            );
        }
        // Half a second later one token: number 3 is reserved, claimed on
        // its poll; 4 moves up.
        let p = params(1_500);
        assert!(matches!(
            decide(&mut line, &p, Ask::Poll(4)),
            Verdict::Waiting { position: 1, .. }
        ));
        assert!(matches!(
            decide(&mut line, &p, Ask::Poll(3)),
            Verdict::Admitted {
                number: 3,
                fresh: true
            }
        ));
        assert!(matches!(
            decide(&mut line, &p, Ask::Poll(3)),
            Verdict::Admitted {
                number: 3,
                fresh: false
            }
        ));
        // Three active: the cap holds 4 however many tokens accrue.
        let p = params(2_900);
        assert!(matches!(
            decide(&mut line, &p, Ask::Poll(4)),
            Verdict::Waiting { .. }
        ));
        // A release frees a slot.
        decide(&mut line, &p, Ask::Release(1));
        assert!(matches!(
            decide(&mut line, &p, Ask::Poll(4)),
            Verdict::Admitted { number: 4, .. }
        ));
    }

    #[test]
    fn quitters_lose_their_place_and_sessions_expire() {
        let mut line = Line::default();
        let mut p = params(0);
        p.queue_all = true;
        decide(&mut line, &p, Ask::Join);
        decide(&mut line, &p, Ask::Join);
        // 1 stops polling; 2 polls in time.
        p.now_ms = 2_000;
        decide(&mut line, &p, Ask::Poll(2));
        p.now_ms = 4_000;
        assert!(matches!(
            decide(&mut line, &p, Ask::Poll(2)),
            Verdict::Waiting { position: 1, .. }
        ));
        // 1 comes back: a new place at the end.
        assert!(matches!(
            decide(&mut line, &p, Ask::Poll(1)),
            Verdict::Waiting {
                number: 3,
                position: 2,
                rejoined: true
            }
        ));
        p.queue_all = false;
        p.now_ms = 5_000;
        assert!(matches!(
            decide(&mut line, &p, Ask::Poll(2)),
            Verdict::Admitted { number: 2, .. }
        ));
        // The session lapses without requests: its slot is free again.
        p.now_ms = 16_000;
        let o = line.decide(&p, Ask::Status, "");
        assert_eq!(o.active, 0);
    }

    #[test]
    fn shuffle_once_and_later_arrivals_behind() {
        let mut line = Line::default();
        let mut p = params(0);
        p.queue_all = true;
        for _ in 0..20 {
            decide(&mut line, &p, Ask::Join);
        }
        p.queue_all = false;
        p.shuffle_at_ms = 1_000;
        p.now_ms = 1_000;
        p.rate_per_s = 0.001;
        line.tokens = 0.0;
        decide(&mut line, &p, Ask::Join);
        let order: Vec<u64> = line.order.iter().map(|(_, n)| *n).collect();
        assert_ne!(order[..20], (1..=20).collect::<Vec<_>>()[..], "shuffled");
        assert_eq!(order[20], 21, "a later arrival is behind the pre-queue");
        // Once only.
        p.now_ms = 2_000;
        decide(&mut line, &p, Ask::Join);
        let again: Vec<u64> = line.order.iter().map(|(_, n)| *n).collect();
        assert_eq!(again[..21], order[..]);
        assert_eq!(again[21], 22);
    }

    #[test]
    fn prefix_cap_and_reject() {
        let mut line = Line::default();
        let mut p = params(0);
        p.queue_all = true;
        p.prefix_cap = 2;
        decide(&mut line, &p, Ask::Join);
        decide(&mut line, &p, Ask::Join);
        assert_eq!(decide(&mut line, &p, Ask::Join), Verdict::PrefixCap);
        assert!(matches!(
            line.decide(&p, Ask::Join, "10.0.1.0/24").verdict,
            Verdict::Waiting { .. }
        ));
        p.reject = true;
        assert_eq!(decide(&mut line, &p, Ask::Join), Verdict::Full);
    }
}
