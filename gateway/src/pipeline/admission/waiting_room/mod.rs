//! The virtual waiting room: an admission step for the routes that name
//! a `[[waiting_rooms]]` entry (see `docs/waiting-room.md`).
//!
//! A visitor without an admitted session gets a signed ticket ([`ticket`])
//! holding their number in line and waits on the room's page ([`page`])
//! or polls its JSON; the line ([`store`]: in memory, or one Lua script
//! in Redis for the fleet) admits the lowest numbers at `new_users` while
//! fewer than `active_users` sessions are in. An admitted visitor's
//! request goes on with a session cookie; each request renews it; the
//! origin ends it with `flashgate-waiting-room: release`.
//!
//! Place in admission: after bot rules (a bot never takes a place or
//! solves its way into the line: `require_challenge` reuses their
//! challenge) and after rate limits (a flood of polls is cut by the
//! in-memory limits before it costs a Redis round trip); before
//! shedding, so that a waiting visitor's poll, answered here, is never
//! shed and never reaches the origin.
//!
//! An admitted session is checked by its signature alone while more than
//! half its life is left: the store is asked (and the session renewed
//! there) at most once per half `session`, so an admitted visitor's
//! requests cost no Redis round trip in between.

pub mod page;
pub mod redis_store;
pub mod store;
pub mod ticket;

use std::ops::ControlFlow::{self, Break, Continue};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::header::SET_COOKIE;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Response};
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};

use self::page::{Page, View};
use self::store::{Ask, Live, LocalStore, Outcome, Params, Store, Verdict};
use self::ticket::{Keys, Session, Ticket};
use super::bots::forwarded_https;
use super::challenge::{self, Binding};
use crate::body::ProxyBody;
use crate::config::{ConfigError, Queueing, RedisConfig, RoomRedisDown, WaitingRoomConfig};
use crate::error::ProxyError;
use crate::observe::metrics::Metrics;
use crate::pipeline::{RequestCtx, Stop};
use crate::respond::Refusal;

/// The response header with which the origin ends the visitor's session
/// (`release`); never passed on to the client.
pub static COMMAND: HeaderName = HeaderName::from_static("flashgate-waiting-room");

/// One room, built from its config entry. Its line (the store) is kept
/// across reloads while `[redis]` stays the same.
pub struct Room {
    pub name: Arc<str>,
    pub config: WaitingRoomConfig,
    redis: Option<RedisConfig>,
    keys: Keys,
    page: Page,
    store: Arc<dyn Store>,
    ticket_cookie: String,
    session_cookie: String,
    m: RoomMetrics,
    /// The latest numbers, for `/admin/status`.
    snapshot: Mutex<Snapshot>,
}

struct RoomMetrics {
    queue: IntGauge,
    active: IntGauge,
    admitted: IntCounter,
    wait: Histogram,
    tickets: IntCounter,
    refused: IntCounterVec,
    redis_up: IntGauge,
}

#[derive(Default)]
struct Snapshot {
    last: Option<Outcome>,
    /// (when, admitted then) of the previous status sample, for the rate.
    sample: Option<(Instant, u64)>,
    admitted_per_s: f64,
}

/// What an admitted request carries to its response: the session's number
/// (for a release) and the cookies to set.
pub struct Admitted {
    number: u64,
    cookies: Vec<HeaderValue>,
    secure: bool,
}

impl Room {
    /// Reads what the entry names (key file, template): what `flashgate
    /// check` runs. `p` is the entry's key path.
    pub fn check(c: &WaitingRoomConfig, p: &str) -> Result<(), ConfigError> {
        Keys::load(c.key_file.as_deref(), p)?;
        Page::new(
            &c.name,
            c.status,
            c.refresh.0.as_secs(),
            c.template.as_deref(),
            p,
        )?;
        Ok(())
    }

    /// Builds the room; the line of `previous` (same name) is kept when
    /// `[redis]` did not change, so a reload loses no one's place.
    pub fn build(
        c: &WaitingRoomConfig,
        p: &str,
        redis: Option<&RedisConfig>,
        metrics: &Metrics,
        previous: Option<&Arc<Room>>,
    ) -> Result<Room, ConfigError> {
        let keys = Keys::load(c.key_file.as_deref(), p)?;
        if c.key_file.is_none() {
            tracing::warn!(room = %c.name,
                "waiting room without key_file: tickets are signed with this process's own key, \
                 so a restart sends everyone to the end of the line; set key_file");
        }
        let page = Page::new(
            &c.name,
            c.status,
            c.refresh.0.as_secs(),
            c.template.as_deref(),
            p,
        )?;
        let name = c.name.as_str();
        let redis_up = metrics.waiting_room_redis_up.with_label_values(&[name]);
        let store: Arc<dyn Store> = match previous.filter(|r| r.redis.as_ref() == redis) {
            Some(r) => r.store.clone(),
            None => match redis {
                Some(rc) => Arc::new(
                    redis_store::RedisStore::new(rc, name, redis_up.clone())
                        .map_err(|m| ConfigError::at("redis", m))?,
                ),
                None => Arc::new(LocalStore::default()),
            },
        };
        Ok(Room {
            name: name.into(),
            config: c.clone(),
            redis: redis.cloned(),
            keys,
            page,
            store,
            ticket_cookie: format!("flashgate_wr_{name}"),
            session_cookie: format!("flashgate_ws_{name}"),
            m: RoomMetrics {
                queue: metrics.waiting_room_queue.with_label_values(&[name]),
                active: metrics.waiting_room_active.with_label_values(&[name]),
                admitted: metrics.waiting_room_admitted.with_label_values(&[name]),
                wait: metrics.waiting_room_wait.with_label_values(&[name]),
                tickets: metrics.waiting_room_tickets.with_label_values(&[name]),
                refused: metrics.waiting_room_refused.clone(),
                redis_up,
            },
            snapshot: Mutex::new(Snapshot::default()),
        })
    }

    fn refused(&self, reason: &str) {
        self.m
            .refused
            .with_label_values(&[&self.name, reason])
            .inc();
    }

    /// The event is over or the room is switched off: everyone passes.
    fn steps_aside(&self, now_s: u64) -> bool {
        self.config.queueing == Queueing::Passthrough
            || self
                .config
                .event
                .as_ref()
                .and_then(|e| e.end)
                .is_some_and(|end| now_s >= end.0)
    }

    fn params(&self, now: SystemTime) -> Params {
        let c = &self.config;
        let now_ms = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let now_s = now_ms / 1000;
        let event = c.event.as_ref();
        Params {
            now_ms,
            rate_per_s: c.new_users_per_s(),
            active_cap: u64::from(c.active_users),
            session_ms: c.session.0.as_millis() as u64,
            grace_ms: c.grace.0.as_millis() as u64,
            queue_all: c.queue_all,
            prequeue: event.is_some_and(|e| now_s >= e.prequeue.0 && now_s < e.start.0),
            reject: c.queueing == Queueing::Reject,
            random: c.queueing == Queueing::Random,
            score: rand::random::<f64>() * 1e12,
            prefix_cap: c.tickets_per_prefix.map_or(0, u64::from),
            shuffle_at_ms: event.filter(|e| e.shuffle).map_or(0, |e| e.start.0 * 1000),
            seed: u64::from(rand::random::<u32>()),
        }
    }

    fn observe(&self, o: &Outcome) {
        self.m.queue.set(o.waiting as i64);
        self.m.active.set(o.active as i64);
        self.snapshot.lock().unwrap_or_else(|e| e.into_inner()).last = Some(*o);
    }

    /// The estimated wait of `position`, when it can be told: not in a
    /// random line, not while the room holds, not during a lottery.
    fn estimate(&self, p: &Params, o: &Outcome, position: u64) -> Option<u64> {
        let rate = o.live.rate_per_s.unwrap_or(p.rate_per_s);
        let holds = o.live.queue_all.unwrap_or(p.queue_all);
        if p.random || holds || rate <= 0.0 {
            return None;
        }
        let lead = match &self.config.event {
            Some(e) if p.prequeue => {
                if e.shuffle {
                    return None;
                }
                (e.start.0 * 1000).saturating_sub(p.now_ms) / 1000
            }
            _ => 0,
        };
        Some(lead + (position as f64 / rate).ceil() as u64)
    }

    /// Fetches the room's numbers for `/admin/status` (a `Status`
    /// decision: it also reaps and advances the line).
    pub async fn refresh(&self) {
        let p = self.params(SystemTime::now());
        if let Ok(o) = self.store.decide(&p, Ask::Status, "").await {
            self.observe(&o);
        }
    }

    /// The room in `/admin/status`.
    pub fn status(&self) -> serde_json::Value {
        let mut s = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        let c = &self.config;
        let Some(o) = s.last else {
            return serde_json::json!({"name": &*self.name, "reachable": false});
        };
        let now = Instant::now();
        match s.sample {
            Some((t, before)) if now.duration_since(t).as_secs_f64() >= 0.5 => {
                s.admitted_per_s =
                    o.admitted.saturating_sub(before) as f64 / now.duration_since(t).as_secs_f64();
                s.sample = Some((now, o.admitted));
            }
            None => s.sample = Some((now, o.admitted)),
            _ => {}
        }
        let rate = o.live.rate_per_s.unwrap_or(c.new_users_per_s());
        serde_json::json!({
            "name": &*self.name,
            "queueing": c.queueing.as_str(),
            "new_users_per_s": rate,
            "queue_all": o.live.queue_all.unwrap_or(c.queue_all),
            "live": {"new_users_per_s": o.live.rate_per_s, "queue_all": o.live.queue_all},
            "active_users_cap": c.active_users,
            "queue_length": o.waiting,
            "active_users": o.active,
            "serving": o.serving,
            "issued": o.issued,
            "admitted_total": o.admitted,
            "admitted_per_s": (s.admitted_per_s * 100.0).round() / 100.0,
            "estimated_wait_s": if rate > 0.0 { (o.waiting as f64 / rate).ceil() } else { 0.0 },
            "fleet": self.redis.is_some(),
            "redis_up": self.redis.is_none() || self.m.redis_up.get() == 1,
            "reachable": true,
        })
    }

    /// `POST /admin/waiting-rooms/{name}`: live `queue_all` and
    /// `new_users` (for the fleet, in Redis). A member left out keeps its
    /// live value; `null` drops it (back to the config's).
    pub async fn set_live(
        &self,
        queue_all: Option<Option<bool>>,
        new_users_per_s: Option<Option<f64>>,
    ) -> Result<(), ()> {
        self.refresh().await;
        let current = self
            .snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last
            .map(|o| o.live)
            .unwrap_or_default();
        let live = Live {
            rate_per_s: new_users_per_s.unwrap_or(current.rate_per_s),
            queue_all: queue_all.unwrap_or(current.queue_all),
        };
        self.store.set_live(live).await.map_err(|_| ())?;
        self.refresh().await;
        Ok(())
    }
}

/// The room's decision for a request of a route that names it: `Continue`
/// lets it on (with its session cookie noted in `ctx.waiting_room`), or
/// the waiting page, the challenge, a refusal.
pub async fn check(ctx: &mut RequestCtx<'_>, room: &Arc<Room>, head: &Parts) -> ControlFlow<Stop> {
    let now = SystemTime::now();
    let now_s = challenge::unix(now);
    if room.steps_aside(now_s) {
        return Continue(());
    }
    let h = &head.headers;
    let binding = Binding::of(ctx.client_ip, h);
    let secure = ctx.conn.scheme == "https" || forwarded_https(ctx, h);
    let c = &room.config;
    let session_s = c.session.0.as_secs();

    // An admitted visitor: the signature says so; the store is asked once
    // per half session (and renews the slot there).
    let mut ask = Ask::Join;
    if let Some(value) = challenge::cookie(h, &room.session_cookie) {
        match room.keys.check_session(&room.name, value, &binding, now) {
            Ok(s) if s.expiry_s.saturating_sub(now_s) * 2 > session_s => {
                ctx.waiting_room = Some(Admitted {
                    number: s.number,
                    cookies: Vec::new(),
                    secure,
                });
                return Continue(());
            }
            Ok(s) => ask = Ask::Session(s.number),
            Err(why) => room.refused(why.as_str()),
        }
    }
    let mut ticket = None;
    if ask == Ask::Join {
        if let Some(value) = challenge::cookie(h, &room.ticket_cookie) {
            match room.keys.check_ticket(&room.name, value, &binding, now) {
                Ok(t) => {
                    ticket = Some(t);
                    ask = Ask::Poll(t.number);
                }
                Err(why) => room.refused(why.as_str()),
            }
        }
    }
    // A new place in line: the challenge first, when the room asks it.
    if ask == Ask::Join && c.require_challenge {
        if let Some(ch) = ctx.runtime.bots.challenger() {
            if !ch.is_cleared(h, &binding, now) {
                room.refused("challenge");
                ctx.shared
                    .metrics
                    .challenges
                    .with_label_values(&["issued"])
                    .inc();
                return Break(Stop::Refuse(ch.refusal(h, &binding, now)));
            }
        }
    }
    let p = room.params(now);
    let outcome = match room.store.decide(&p, ask, binding.prefix()).await {
        Ok(o) => o,
        Err(_) => return store_down(room, ctx, h, ask, ticket, &binding, now_s, secure),
    };
    room.observe(&outcome);
    let session_cookie = |number: u64| {
        let value = room.keys.session(
            &room.name,
            Session {
                number,
                expiry_s: now_s + session_s,
            },
            &binding,
        );
        ticket::set_cookie(&room.session_cookie, &value, session_s, secure)
    };
    match outcome.verdict {
        Verdict::Renewed => {
            let Ask::Session(number) = ask else {
                return Continue(());
            };
            ctx.waiting_room = Some(Admitted {
                number,
                cookies: vec![session_cookie(number)],
                secure,
            });
            Continue(())
        }
        Verdict::Admitted { number, fresh } => {
            if fresh {
                room.m.admitted.inc();
                let joined = ticket.map_or(p.now_ms, |t| t.joined_ms);
                room.m
                    .wait
                    .observe(p.now_ms.saturating_sub(joined) as f64 / 1000.0);
            }
            let mut cookies = vec![session_cookie(number)];
            if ticket.is_some() {
                cookies.push(ticket::set_cookie(&room.ticket_cookie, "", 0, secure));
            }
            ctx.waiting_room = Some(Admitted {
                number,
                cookies,
                secure,
            });
            Continue(())
        }
        Verdict::Waiting {
            number,
            position,
            rejoined,
        } => {
            if rejoined {
                room.m.tickets.inc();
            }
            let joined_ms = match ticket {
                Some(t) if !rejoined => t.joined_ms,
                _ => p.now_ms,
            };
            let view = View {
                position: Some(position),
                wait_seconds: room.estimate(&p, &outcome, position),
            };
            // The cookie is re-signed only when it is new or past half its
            // grace: most polls answer without an HMAC or a `set-cookie`
            // (a poll every `refresh` keeps it fresh, grace >= 2 refresh).
            let grace_s = c.grace.0.as_secs();
            let fresh_enough = |t: &Ticket| {
                !rejoined && t.number == number && t.expiry_s.saturating_sub(now_s) * 2 > grace_s
            };
            let renew = match ticket {
                Some(t) if fresh_enough(&t) => None,
                _ => Some(Ticket {
                    number,
                    joined_ms,
                    expiry_s: now_s + grace_s,
                }),
            };
            let mut stop = waiting(room, h, view, renew, &binding, now_s, secure);
            // A lapsed session goes back in line: its cookie goes too, or
            // every request would ask for a new place.
            if let (Ask::Session(_), Stop::Answer(resp)) = (ask, &mut stop) {
                resp.headers_mut().append(
                    SET_COOKIE,
                    ticket::set_cookie(&room.session_cookie, "", 0, secure),
                );
            }
            Break(stop)
        }
        Verdict::PrefixCap => {
            room.refused("prefix_cap");
            Break(Stop::Refuse(
                Refusal::new(ProxyError::WaitingRoomPrefixCap)
                    .retry_after(c.refresh.0.as_secs() as u32),
            ))
        }
        Verdict::Full => {
            room.refused("full");
            Break(Stop::Refuse(
                Refusal::new(ProxyError::WaitingRoomFull)
                    .retry_after(c.refresh.0.as_secs() as u32)
                    .detail("queue_full", serde_json::Value::Bool(true)),
            ))
        }
        Verdict::Done => Continue(()),
    }
}

/// The waiting answer, with `ticket` signed into its cookie when given
/// (a new or renewed place in line).
fn waiting(
    room: &Room,
    h: &HeaderMap,
    view: View,
    ticket: Option<Ticket>,
    binding: &Binding,
    now_s: u64,
    secure: bool,
) -> Stop {
    let mut cookies = HeaderMap::new();
    if let Some(t) = ticket {
        let value = room.keys.ticket(&room.name, t, binding);
        cookies.append(
            SET_COOKIE,
            ticket::set_cookie(
                &room.ticket_cookie,
                &value,
                t.expiry_s.saturating_sub(now_s),
                secure,
            ),
        );
    }
    Stop::Answer(Box::new(room.page.answer(h, view, cookies)))
}

/// Redis did not answer: `hold` keeps admitted sessions in and everyone
/// else waiting (their tickets renewed, so no place is lost); `open` lets
/// everyone on.
#[allow(clippy::too_many_arguments)]
fn store_down(
    room: &Room,
    ctx: &mut RequestCtx<'_>,
    h: &HeaderMap,
    ask: Ask,
    ticket: Option<Ticket>,
    binding: &Binding,
    now_s: u64,
    secure: bool,
) -> ControlFlow<Stop> {
    if let Ask::Session(number) = ask {
        ctx.waiting_room = Some(Admitted {
            number,
            cookies: Vec::new(),
            secure,
        });
        return Continue(());
    }
    match room.config.redis_down {
        RoomRedisDown::Open => Continue(()),
        RoomRedisDown::Hold => {
            let view = View {
                position: None,
                wait_seconds: None,
            };
            // Renewed, so nobody loses a place while Redis is away.
            let renew = ticket.map(|t| Ticket {
                expiry_s: now_s + room.config.grace.0.as_secs(),
                ..t
            });
            Break(waiting(room, h, view, renew, binding, now_s, secure))
        }
    }
}

/// On the upstream's answer to an admitted request: the session cookie
/// set, or, when the origin says `flashgate-waiting-room: release`, the
/// session ended (its slot freed for the next visitor) and its cookie
/// cleared. The header never reaches the client.
pub fn on_response(ctx: &mut RequestCtx<'_>, room: &Arc<Room>, resp: &mut Response<ProxyBody>) {
    let release = resp
        .headers_mut()
        .remove(&COMMAND)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"release"));
    let Some(admitted) = ctx.waiting_room.take() else {
        return;
    };
    let h = resp.headers_mut();
    if release {
        h.append(
            SET_COOKIE,
            ticket::set_cookie(&room.session_cookie, "", 0, admitted.secure),
        );
        let room = room.clone();
        let number = admitted.number;
        tokio::spawn(async move {
            let p = room.params(SystemTime::now());
            if room
                .store
                .decide(&p, Ask::Release(number), "")
                .await
                .is_err()
            {
                tracing::debug!(room = %room.name, number, "release not recorded: the store did not answer");
            }
        });
        return;
    }
    for c in admitted.cookies {
        h.append(SET_COOKIE, c);
    }
}

/// Builds the rooms of a config (the lines of `previous` kept, see
/// [`Room::build`]).
pub fn build_all(
    config: &crate::config::Config,
    metrics: &Metrics,
    previous: &[Arc<Room>],
) -> Result<Vec<Arc<Room>>, ConfigError> {
    config
        .waiting_rooms
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let before = previous.iter().find(|r| *r.name == *c.name);
            Room::build(
                c,
                &format!("waiting_rooms[{i}]"),
                config.redis.as_ref(),
                metrics,
                before,
            )
            .map(Arc::new)
        })
        .collect()
}
