//! The virtual waiting room end to end: gateways in process over real
//! loopback HTTP, a real redis-server (and a real Redis Cluster) for the
//! fleet's line, headless Chromium for the page.
//!
//! No test asserts on timing a race can win: orders are compared
//! relatively, rates against an upper bound that slowness only makes
//! easier to meet, and every wait is a generous deadline with polling.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flashgate_tests::redis::{RedisCluster, RedisServer, TempDir};
use flashgate_tests::{
    empty, gateway, metric, reply, send, solve_challenge, system_tool, wait_until, Cfg, Gateway,
    Got, Upstream,
};
use http::Request;

const KEY: &str = "0123456789abcdef0123456789abcdef-test-key";

/// One visitor: their own user agent and network, and the cookies they
/// were given (as a browser keeps them).
#[derive(Clone, Debug)]
struct Visitor {
    ua: String,
    ip: String,
    cookies: Vec<(String, String)>,
}

impl Visitor {
    fn new(i: usize) -> Visitor {
        Visitor {
            ua: format!("visitor-{i}"),
            ip: format!("198.51.{}.7", 100 + (i % 100)),
            cookies: Vec::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Keeps the `set-cookie`s of an answer (`Max-Age=0` deletes).
    fn keep(&mut self, got: &Got) {
        for v in got.headers.get_all("set-cookie") {
            let v = v.to_str().unwrap();
            let pair = v.split(';').next().unwrap();
            let (n, val) = pair.split_once('=').unwrap();
            self.cookies.retain(|(name, _)| name != n);
            if !v.contains("Max-Age=0") {
                self.cookies.push((n.to_string(), val.to_string()));
            }
        }
    }

    fn ticket_number(&self) -> Option<u64> {
        let (_, v) = self
            .cookies
            .iter()
            .find(|(n, _)| n.starts_with("flashgate_wr_"))?;
        v.split('.').nth(1)?.parse().ok()
    }

    async fn get(&mut self, gw: SocketAddr, path: &str, json: bool) -> Got {
        let mut req = Request::get(format!("http://{gw}{path}"))
            .header("user-agent", &self.ua)
            .header("x-forwarded-for", &self.ip)
            .header(
                "accept",
                if json {
                    "application/json"
                } else {
                    "text/html"
                },
            );
        if !self.cookies.is_empty() {
            req = req.header("cookie", self.cookie_header());
        }
        let got = send(req.body(empty()).unwrap()).await;
        self.keep(&got);
        got
    }
}

/// The origin: `ok` (and, on `/release`, the room's release header).
async fn origin() -> Upstream {
    Upstream::start(|req: Request<hyper::body::Incoming>| async move {
        let mut r = reply(
            200,
            "<html><body><h1 id=\"product\">Sneaker 42</h1></body></html>",
        );
        r.headers_mut()
            .insert("content-type", "text/html".parse().unwrap());
        if req.uri().path() == "/release" {
            r.headers_mut()
                .insert("flashgate-waiting-room", "release".parse().unwrap());
        }
        r
    })
    .await
}

fn key_file(dir: &TempDir) -> PathBuf {
    let p = dir.0.join("room.key");
    std::fs::write(&p, format!("{KEY}\n")).unwrap();
    p
}

/// A config with the catch-all route behind room `drop` (`room` holds
/// its keys after `name`), the listener trusting loopback's
/// `x-forwarded-for`, and `extra` sections.
fn config(up: &Upstream, room: &str, extra: &str) -> String {
    Cfg::new(&[up.addr])
        .route("waiting_room = \"drop\"")
        .section(format!("[[waiting_rooms]]\nname = \"drop\"\n{room}"))
        .section(extra)
        .build()
        .replace(
            "name = \"public\"",
            "name = \"public\"\ntrusted_proxies = [\"127.0.0.1/32\"]",
        )
}

fn public(gw: &Gateway) -> SocketAddr {
    gw.addr("public").unwrap()
}

fn waiting(got: &Got) -> bool {
    got.status == 200
        && got.header("x-flashgate-error").is_none()
        && !got.text().contains("Sneaker")
}

fn admitted(got: &Got) -> bool {
    got.status == 200 && got.text().contains("Sneaker")
}

/// Polls as `v` (keeping its cookies) until `done` holds for an answer,
/// for at most `within`; whether it did.
async fn poll_until(
    v: &mut Visitor,
    addr: SocketAddr,
    json: bool,
    within: Duration,
    done: impl Fn(&Got) -> bool,
) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if done(&v.get(addr, "/", json).await) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn admin_post(gw: &Gateway, path: &str, body: &str) -> Got {
    send(
        Request::post(format!("http://{}{path}", gw.admin_addr()))
            .header("authorization", "Bearer test-token")
            .body(flashgate_tests::full(body.to_string()))
            .unwrap(),
    )
    .await
}

async fn room_status(gw: &Gateway) -> serde_json::Value {
    let got = send(
        Request::get(format!("http://{}/admin/status", gw.admin_addr()))
            .body(empty())
            .unwrap(),
    )
    .await;
    got.json()["waiting_rooms"][0].clone()
}

/// Polls every visitor not yet in, once per round (visitor `i` at
/// `at(i, round)`), until all are let in (120 s at most); `after_round`
/// sees who is in after each round. The round each visitor got in.
async fn rounds_until_all_in(
    vs: &mut [Visitor],
    at: impl Fn(usize, usize) -> SocketAddr,
    mut after_round: impl FnMut(&[Option<usize>]),
) -> Vec<usize> {
    let mut round_in: Vec<Option<usize>> = vec![None; vs.len()];
    let mut round = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while round_in.iter().any(Option::is_none) {
        assert!(Instant::now() < deadline, "not all admitted: {round_in:?}");
        round += 1;
        for (i, v) in vs.iter_mut().enumerate() {
            if round_in[i].is_some() {
                continue;
            }
            let got = v.get(at(i, round), "/", true).await;
            if admitted(&got) {
                round_in[i] = Some(round);
            } else {
                assert!(waiting(&got), "{}", got.text());
            }
        }
        after_round(&round_in);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    round_in.into_iter().map(Option::unwrap).collect()
}

/// Visitors take tickets alternately at two gateways while the room holds
/// everyone; the line then moves at `new_users`. Their numbers follow
/// their arrival (one counter for the fleet), they are let in in that
/// order, and no more than the documented bound are let in.
async fn fleet_order(redis_section: &str, visitors: usize) {
    let dir = TempDir::new("wr-fleet");
    let up = origin().await;
    let room = format!(
        "new_users = \"4/s\"\nactive_users = 1000\nrefresh = \"1s\"\ngrace = \"60s\"\nqueue_all = true\nkey_file = \"{}\"",
        key_file(&dir).display()
    );
    let text = config(&up, &room, redis_section);
    let gws = [gateway(&text).await, gateway(&text).await];
    let mut vs: Vec<Visitor> = (0..visitors).map(Visitor::new).collect();
    for (i, v) in vs.iter_mut().enumerate() {
        let got = v.get(public(&gws[i % 2]), "/", true).await;
        assert!(waiting(&got), "{}", got.text());
        assert_eq!(got.json()["position"], i as u64 + 1, "{}", got.text());
    }
    let numbers: Vec<u64> = vs.iter().map(|v| v.ticket_number().unwrap()).collect();
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "one counter for the fleet, in arrival order: {numbers:?}"
    );
    // Open the line, fleet-wide, through one gateway's admin.
    let opened = Instant::now();
    let got = admin_post(
        &gws[0],
        "/admin/waiting-rooms/drop",
        r#"{"queue_all": false}"#,
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    // Poll in rounds, each visitor at the other gateway each round.
    let rounds = rounds_until_all_in(
        &mut vs,
        |i, round| public(&gws[(i + round) % 2]),
        |round_in| {
            // Never more than the bound: one second's worth at once, then
            // new_users per second.
            let let_in = round_in.iter().filter(|r| r.is_some()).count() as f64;
            let bound = 4.0 + 4.0 * opened.elapsed().as_secs_f64();
            assert!(let_in <= bound, "{let_in} let in, bound {bound}");
        },
    )
    .await;
    // In arrival order: an earlier visitor is let in no later than one
    // round after a later one (a slot can open between two polls of the
    // same round).
    for i in 0..visitors {
        for j in i + 1..visitors {
            assert!(
                rounds[i] <= rounds[j] + 1,
                "visitor {i} after {j}: {rounds:?}"
            );
        }
    }
    // Both gateways counted their share; together everyone.
    let a = metric(gws[0].admin_addr(), "flashgate_waiting_room_admitted_total").await;
    let b = metric(gws[1].admin_addr(), "flashgate_waiting_room_admitted_total").await;
    assert_eq!(a + b, visitors as f64);
}

#[tokio::test]
async fn order_of_admission_is_order_of_arrival_across_two_gateways() {
    let redis = RedisServer::start();
    fleet_order(&format!("[redis]\nurl = \"{}\"", redis.url()), 12).await;
}

#[tokio::test]
async fn order_of_admission_across_two_gateways_on_redis_cluster() {
    let cluster = RedisCluster::start();
    let seeds: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    fleet_order(
        &format!(
            "[redis]\ncluster = [{}]\ntimeout = \"1s\"",
            seeds.join(", ")
        ),
        6,
    )
    .await;
}

/// `queueing = "random"`: a place in line is a draw, so the wait is not
/// told and a position is only the current draw's, the line is let in in
/// an order other than arrival, and still everyone gets in exactly once.
#[tokio::test]
async fn a_random_line_draws_the_order_and_lets_everyone_in_once() {
    let up = origin().await;
    let gw = gateway(&config(
        &up,
        "new_users = \"8/s\"\nactive_users = 1000\nrefresh = \"1s\"\ngrace = \"60s\"\nqueueing = \"random\"\nqueue_all = true",
        "",
    ))
    .await;
    let addr = public(&gw);
    let visitors = 16;
    let mut vs: Vec<Visitor> = (0..visitors).map(Visitor::new).collect();
    for (i, v) in vs.iter_mut().enumerate() {
        let got = v.get(addr, "/", true).await;
        assert!(waiting(&got), "{}", got.text());
        let position = got.json()["position"].as_u64().unwrap();
        assert!((1..=i as u64 + 1).contains(&position), "{}", got.text());
        assert_eq!(got.json()["wait_known"], false, "{}", got.text());
    }
    let got = admin_post(&gw, "/admin/waiting-rooms/drop", r#"{"queue_all": false}"#).await;
    assert_eq!(got.status, 200, "{}", got.text());
    // Poll in rounds, in arrival order, until everyone is in.
    let rounds = rounds_until_all_in(&mut vs, |_, _| addr, |_| {}).await;
    // Out of arrival order somewhere (a FIFO line never lets a later
    // visitor in more than one round before an earlier one; for 16
    // drawn places that all hold is next to impossible).
    let overtaken = (0..visitors)
        .flat_map(|i| (i + 1..visitors).map(move |j| (i, j)))
        .filter(|&(i, j)| rounds[i] > rounds[j] + 1)
        .count();
    assert!(overtaken > 0, "admitted in arrival order: {rounds:?}");
    let admitted_total = metric(gw.admin_addr(), "flashgate_waiting_room_admitted_total").await;
    assert_eq!(admitted_total, visitors as f64, "each let in once");
}

#[tokio::test]
async fn active_users_frees_on_release_header_and_on_expiry() {
    let up = origin().await;
    let gw = gateway(&config(
        &up,
        "new_users = \"100/s\"\nactive_users = 1\nsession = \"5s\"\nrefresh = \"1s\"\ngrace = \"30s\"",
        "",
    ))
    .await;
    let addr = public(&gw);
    let mut a = Visitor::new(1);
    let mut b = Visitor::new(2);
    let mut c = Visitor::new(3);
    // A walks in (no line, a free slot); B waits: one slot.
    assert!(admitted(&a.get(addr, "/", false).await));
    let got = b.get(addr, "/", false).await;
    assert!(waiting(&got), "{}", got.text());
    assert!(got.text().contains("http-equiv=\"refresh\""));
    // A's checkout ends the session: the header is not passed on, the
    // cookie is cleared, and B gets the slot.
    let got = a.get(addr, "/release", false).await;
    assert!(admitted(&got));
    assert!(got.header("flashgate-waiting-room").is_none());
    assert!(!a
        .cookies
        .iter()
        .any(|(n, _)| n.starts_with("flashgate_ws_")));
    assert!(
        poll_until(&mut b, addr, false, Duration::from_secs(20), admitted).await,
        "B not let in after A's release"
    );
    // C waits behind B; B goes quiet, its session lapses, C gets in.
    let got = c.get(addr, "/", false).await;
    assert!(waiting(&got), "{}", got.text());
    assert!(
        poll_until(&mut c, addr, false, Duration::from_secs(30), admitted).await,
        "C not let in after B's session expired"
    );
}

#[tokio::test]
async fn forged_altered_expired_and_moved_tickets_are_never_admitted() {
    let up = origin().await;
    // The room holds everyone: any visitor let through is a failure.
    let gw = gateway(&config(
        &up,
        "new_users = \"100/s\"\nactive_users = 100\nqueue_all = true\nrefresh = \"1s\"\ngrace = \"2s\"",
        "",
    ))
    .await;
    let addr = public(&gw);
    let mut v = Visitor::new(1);
    let got = v.get(addr, "/", true).await;
    assert!(waiting(&got));
    let ticket = v.cookies.clone();
    let number = v.ticket_number().unwrap();
    let refused = |reason: &'static str| {
        let admin = gw.admin_addr();
        async move {
            metric(
                admin,
                &format!("flashgate_waiting_room_tickets_refused_total{{reason=\"{reason}\",room=\"drop\"}}"),
            )
            .await
        }
    };
    // Forged: a made-up signature.
    let mut forged = Visitor::new(1);
    forged.cookies = vec![(
        "flashgate_wr_drop".into(),
        format!("v1.1.0.9999999999.{}.00ff", "ab".repeat(6)),
    )];
    let got = forged.get(addr, "/", true).await;
    assert!(waiting(&got), "{}", got.text());
    assert!(
        forged.ticket_number().unwrap() > number,
        "a forged ticket is a new place at the end"
    );
    // Altered: a real ticket with a better number.
    let mut altered = v.clone();
    altered.cookies = ticket
        .iter()
        .map(|(n, val)| {
            (
                n.clone(),
                val.replacen(&format!("v1.{number}."), "v1.0.", 1),
            )
        })
        .collect();
    assert!(waiting(&altered.get(addr, "/", true).await));
    // A forged session cookie.
    let mut session = Visitor::new(1);
    session.cookies = vec![(
        "flashgate_ws_drop".into(),
        "v1.1.9999999999.abababababab.00".into(),
    )];
    assert!(waiting(&session.get(addr, "/", true).await));
    assert!(refused("bad_signature").await >= 3.0);
    // Moved: the real ticket from another network.
    let mut moved = v.clone();
    moved.cookies = ticket.clone();
    moved.ip = "203.0.113.9".into();
    assert!(waiting(&moved.get(addr, "/", true).await));
    assert_eq!(refused("moved").await, 1.0);
    // The real ticket still holds its place.
    let mut again = v.clone();
    again.cookies = ticket.clone();
    let got = again.get(addr, "/", true).await;
    assert_eq!(again.ticket_number(), Some(number));
    assert_eq!(got.json()["position"], 1);
    // Expired: the same ticket after its grace (time only moves on).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut expired = v.clone();
    expired.cookies = ticket;
    assert!(waiting(&expired.get(addr, "/", true).await));
    assert_eq!(refused("expired").await, 1.0);
    assert!(expired.ticket_number().unwrap() > number);
    assert_eq!(up.hits(), 0, "nobody reached the origin");
}

#[tokio::test]
async fn refresh_keeps_the_place_and_json_mode() {
    let up = origin().await;
    let gw = gateway(&config(
        &up,
        "new_users = \"2/s\"\nactive_users = 100\nqueue_all = true\nrefresh = \"2s\"\ngrace = \"60s\"",
        "",
    ))
    .await;
    let addr = public(&gw);
    let mut vs: Vec<Visitor> = (0..3).map(Visitor::new).collect();
    for v in vs.iter_mut() {
        assert!(waiting(&v.get(addr, "/", true).await));
    }
    let second = vs[1].ticket_number();
    for _ in 0..3 {
        let got = vs[1].get(addr, "/products/1", true).await;
        assert_eq!(got.header("content-type"), Some("application/json"));
        assert_eq!(got.header("cache-control"), Some("no-store"));
        let j = got.json();
        assert_eq!(j["in_queue"], true);
        assert_eq!(j["position"], 2);
        assert_eq!(j["refresh_seconds"], 2);
        assert_eq!(j["queue_full"], false);
        // The room holds everyone: no estimate.
        assert_eq!(j["wait_known"], false);
        assert!(j["wait_seconds"].is_null());
        assert_eq!(vs[1].ticket_number(), second, "a refresh keeps the number");
    }
    // A browser gets the page, with the same place.
    let got = vs[1].get(addr, "/", false).await;
    assert!(got.text().contains(">2</b>"), "{}", got.text());
    let s = room_status(&gw).await;
    assert_eq!(s["queue_length"], 3);
    assert_eq!(s["queue_all"], true);
    // The operator opens the line and slows it: estimates appear.
    let got = admin_post(
        &gw,
        "/admin/waiting-rooms/drop",
        r#"{"queue_all": false, "new_users": "1/m"}"#,
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json()["queue_all"], false);
    let j = vs[2].get(addr, "/", true).await.json();
    assert_eq!(j["wait_known"], true, "{j}");
    assert!(j["wait_seconds"].as_u64().unwrap() >= 60, "{j}");
    // Without the token nothing changes; an unknown room is 404.
    let got = send(
        Request::post(format!(
            "http://{}/admin/waiting-rooms/drop",
            gw.admin_addr()
        ))
        .body(flashgate_tests::full(r#"{"queue_all": true}"#))
        .unwrap(),
    )
    .await;
    assert_eq!(got.status, 401);
    assert_eq!(
        admin_post(&gw, "/admin/waiting-rooms/nope", "{}")
            .await
            .status,
        404
    );
    assert_eq!(
        admin_post(&gw, "/admin/waiting-rooms/drop", r#"{"new_users": "fast"}"#)
            .await
            .status,
        400
    );
    // The first in line gets in (one token was banked).
    assert!(
        poll_until(&mut vs[0], addr, true, Duration::from_secs(20), admitted).await,
        "the first in line is let in"
    );
}

#[tokio::test]
async fn a_gateway_restarted_mid_queue_loses_no_place() {
    let redis = RedisServer::start();
    let dir = TempDir::new("wr-restart");
    let up = origin().await;
    let room = format!(
        "new_users = \"1/s\"\nactive_users = 10\nqueue_all = true\nrefresh = \"1s\"\ngrace = \"60s\"\nkey_file = \"{}\"",
        key_file(&dir).display()
    );
    let text = config(&up, &room, &format!("[redis]\nurl = \"{}\"", redis.url()));
    let gw = gateway(&text).await;
    let mut vs: Vec<Visitor> = (0..4).map(Visitor::new).collect();
    for v in vs.iter_mut() {
        assert!(waiting(&v.get(public(&gw), "/", true).await));
    }
    let numbers: Vec<_> = vs.iter().map(|v| v.ticket_number()).collect();
    gw.shutdown().await;
    let gw = gateway(&text).await;
    for (i, v) in vs.iter_mut().enumerate() {
        let got = v.get(public(&gw), "/", true).await;
        assert_eq!(got.json()["position"], i as u64 + 1, "{}", got.text());
        assert_eq!(v.ticket_number(), numbers[i]);
    }
}

/// RFC 3339 of a Unix time.
fn rfc3339(secs: u64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Each visitor's position (0: let in), polling at alternate gateways.
async fn positions(gws: &[Gateway; 2], vs: &mut [Visitor], round: usize) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, v) in vs.iter_mut().enumerate() {
        let got = v.get(public(&gws[(i + round) % 2]), "/", true).await;
        out.push(if admitted(&got) {
            0
        } else {
            got.json()["position"].as_u64().unwrap()
        });
    }
    out
}

#[tokio::test]
async fn prequeue_is_shuffled_once_at_the_start_and_later_arrivals_stay_behind() {
    let redis = RedisServer::start();
    let dir = TempDir::new("wr-event");
    let up = origin().await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let start = now + 15;
    let room = format!(
        "new_users = \"1/h\"\nactive_users = 10\nrefresh = \"1s\"\ngrace = \"120s\"\nkey_file = \"{}\"\n\
         event = {{ prequeue = \"{}\", start = \"{}\", shuffle = true }}",
        key_file(&dir).display(),
        rfc3339(now - 60),
        rfc3339(start),
    );
    let text = config(&up, &room, &format!("[redis]\nurl = \"{}\"", redis.url()));
    let gws = [gateway(&text).await, gateway(&text).await];
    let n = 20;
    let mut early: Vec<Visitor> = (0..n).map(Visitor::new).collect();
    for (i, v) in early.iter_mut().enumerate() {
        let got = v.get(public(&gws[i % 2]), "/", true).await;
        assert!(waiting(&got));
        let j = got.json();
        // A lottery is ahead: no estimate.
        assert_eq!(j["wait_known"], false);
    }
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(before < start, "the pre-queue joins took more than 15 s");
    // Past the start (by the wall clock, which only moves on).
    wait_until(Duration::from_secs(30), "the event's start", || async {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            > start
    })
    .await;
    let first = positions(&gws, &mut early, 1).await;
    let second = positions(&gws, &mut early, 2).await;
    // One token was banked at the start: at most one let in.
    assert!(first.iter().filter(|p| **p == 0).count() <= 1, "{first:?}");
    let waiting_order = |ps: &[u64]| {
        let mut idx: Vec<usize> = (0..ps.len()).filter(|i| ps[*i] > 0).collect();
        idx.sort_by_key(|i| ps[*i]);
        idx
    };
    let order = waiting_order(&first);
    assert_ne!(
        order,
        (0..n).filter(|i| first[*i] > 0).collect::<Vec<_>>(),
        "drawn by lot: {first:?}"
    );
    assert_eq!(order, waiting_order(&second), "shuffled once only");
    assert_eq!(
        redis
            .try_bulk(&["HGET", "flashgate:wr:{drop}:meta", "shuffled"])
            .unwrap()
            .trim(),
        "1"
    );
    // Later arrivals queue behind the whole pre-queue, in their order.
    let behind = order.len() as u64;
    for k in 0..3 {
        let mut v = Visitor::new(100 + k);
        let got = v.get(public(&gws[k % 2]), "/", true).await;
        assert_eq!(
            got.json()["position"],
            behind + 1 + k as u64,
            "{}",
            got.text()
        );
    }
}

#[tokio::test]
async fn redis_down_holds_by_default_and_open_lets_through() {
    let mut redis = RedisServer::start();
    let dir = TempDir::new("wr-down");
    let up = origin().await;
    let base = format!(
        "new_users = \"100/s\"\nactive_users = 1\nsession = \"5m\"\nrefresh = \"1s\"\ngrace = \"60s\"\nkey_file = \"{}\"",
        key_file(&dir).display()
    );
    let section = format!("[redis]\nurl = \"{}\"\ntimeout = \"200ms\"", redis.url());
    let hold = gateway(&config(&up, &base, &section)).await;
    let open = gateway(&config(
        &up,
        &format!("{base}\nredis_down = \"open\""),
        &section,
    ))
    .await;
    let mut a = Visitor::new(1);
    let mut b = Visitor::new(2);
    assert!(admitted(&a.get(public(&hold), "/", true).await));
    assert!(waiting(&b.get(public(&hold), "/", true).await));
    let b_number = b.ticket_number();
    redis.stop();
    // hold: the admitted session goes on, the waiting keep their tickets
    // (renewed), newcomers wait without one.
    assert!(admitted(&a.get(public(&hold), "/", true).await));
    let got = b.get(public(&hold), "/", true).await;
    assert!(waiting(&got));
    assert!(got.json()["position"].is_null());
    assert_eq!(got.json()["wait_known"], false);
    assert_eq!(b.ticket_number(), b_number);
    let mut c = Visitor::new(3);
    assert!(waiting(&c.get(public(&hold), "/", true).await));
    assert_eq!(
        metric(
            hold.admin_addr(),
            "flashgate_waiting_room_redis_up{room=\"drop\"}"
        )
        .await,
        0.0
    );
    // open: everyone goes on.
    let mut d = Visitor::new(4);
    assert!(admitted(&d.get(public(&open), "/", true).await));
    // Back: B keeps its number.
    redis.restart();
    // Back (a Redis restarted empty lets B straight in; one with its
    // data gives B its place): either way the room decides again.
    let back = |got: &Got| admitted(got) || (waiting(got) && !got.json()["position"].is_null());
    assert!(
        poll_until(&mut b, public(&hold), true, Duration::from_secs(20), back).await,
        "the room uses Redis again"
    );
    assert_eq!(
        metric(
            hold.admin_addr(),
            "flashgate_waiting_room_redis_up{room=\"drop\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn prefix_cap_and_the_challenge_keep_bots_out_of_the_line() {
    let up = origin().await;
    let gw = gateway(&config(
        &up,
        "new_users = \"10/s\"\nactive_users = 10\nqueue_all = true\ntickets_per_prefix = 2\nrequire_challenge = true",
        "[challenge]\ndifficulty = 4",
    ))
    .await;
    let addr = public(&gw);
    let mut bot = Visitor::new(1);
    let got = bot.get(addr, "/", true).await;
    assert_eq!(got.status, 403);
    assert_eq!(got.json()["error"], "challenge_required");
    // Solve it on the same URL, then take tickets: two per network.
    let mut statuses = Vec::new();
    for i in 0..3 {
        let mut v = Visitor::new(10 + i);
        v.ip = "192.0.2.10".into();
        let got = v.get(addr, "/", true).await;
        let ch = got.json()["challenge"]["challenge"]
            .as_str()
            .unwrap()
            .to_string();
        let nonce = solve_challenge(&ch, 4);
        let got = send(
            Request::get(format!("http://{addr}/"))
                .header("user-agent", &v.ua)
                .header("x-forwarded-for", &v.ip)
                .header("x-flashgate-challenge", &ch)
                .header("x-flashgate-nonce", &nonce)
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 204);
        v.keep(&got);
        let got = v.get(addr, "/", true).await;
        statuses.push((
            got.status,
            got.header("x-flashgate-error").map(str::to_string),
        ));
    }
    assert_eq!(statuses[0], (200, None));
    assert_eq!(statuses[1], (200, None));
    assert_eq!(statuses[2], (429, Some("waiting_room_prefix_cap".into())));
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn waiting_page_in_chromium_ends_on_the_product_page_by_itself() {
    let Some(browser) = system_tool(&["chromium", "chromium-browser"], "chromium") else {
        return;
    };
    let up = origin().await;
    let gw = gateway(&config(
        &up,
        "new_users = \"50/s\"\nactive_users = 1\nsession = \"5m\"\nrefresh = \"1s\"\ngrace = \"30s\"",
        "",
    ))
    .await;
    let addr = public(&gw);
    // Someone else holds the one slot until their checkout releases it.
    let mut holder = Visitor::new(1);
    holder.ip = "127.0.0.1".into();
    assert!(admitted(&holder.get(addr, "/", false).await));
    let profile = TempDir::new("wr-chromium");
    let url = format!("http://{addr}/products/42");
    let (b, p) = (browser.clone(), profile.0.clone());
    // The page reloads itself every (virtual) second; each reload is a
    // real request, so real time passes until the slot is free and the
    // page becomes the product page, which has no timer: the budget then
    // ends at once.
    let browsing = tokio::task::spawn_blocking(move || {
        std::process::Command::new("timeout")
            .arg("120")
            .arg(&b)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--virtual-time-budget=3000000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", p.display()))
            .arg(&url)
            .output()
            .expect("running chromium")
    });
    // The browser is in line (its ticket given out); then the holder's
    // checkout ends their session.
    wait_until(Duration::from_secs(60), "chromium in line", || async {
        metric(
            gw.admin_addr(),
            "flashgate_waiting_room_tickets_issued_total",
        )
        .await
            >= 1.0
    })
    .await;
    assert!(admitted(&holder.get(addr, "/release", false).await));
    let out = browsing.await.unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("Sneaker 42"),
        "ended on: {dom}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It waited on the page first: a ticket was given out.
    assert!(
        metric(
            gw.admin_addr(),
            "flashgate_waiting_room_tickets_issued_total"
        )
        .await
            >= 1.0
    );
    assert_eq!(
        metric(gw.admin_addr(), "flashgate_waiting_room_admitted_total").await,
        2.0
    );
}
