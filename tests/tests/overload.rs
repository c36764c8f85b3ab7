//! Overload protection end to end: the load level (forced for drills, or
//! driven by a saturated origin), shedding by priority (stale copy,
//! fallback, 503), checkout's reserved share, levels per cluster and the
//! process's own, readiness coupling, the adaptive limit, the breaker,
//! and the load level as filters see it.
//!
//! No assertion here depends on timing a race could win: levels are
//! forced or driven by a deliberately slow origin and polled with
//! generous deadlines.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flashgate_tests::*;
use http::Request;
use tokio::sync::Semaphore;

fn url(gw: &Gateway, path: &str) -> String {
    format!("http://{}{path}", gw.addr("public").unwrap())
}

async fn status(gw: &Gateway) -> serde_json::Value {
    get(&format!("http://{}/admin/status", gw.admin_addr()))
        .await
        .json()
}

async fn level(gw: &Gateway) -> u64 {
    status(gw).await["load_level"].as_u64().unwrap()
}

/// `POST /admin/load-level` with `body`, with or without the token.
async fn force(gw: &Gateway, body: &str, token: bool) -> Got {
    let mut req = Request::post(format!("http://{}/admin/load-level", gw.admin_addr()));
    if token {
        req = req.header("authorization", "Bearer test-token");
    }
    send(req.body(full(body.to_string())).unwrap()).await
}

/// An origin with `slots` requests served at once, each taking `delay_ms`
/// (changeable); the rest wait in its own line, as a real origin's do.
struct Origin {
    up: Upstream,
    delay_ms: Arc<AtomicU64>,
    failing: Arc<AtomicBool>,
}

async fn origin(slots: usize, delay_ms: u64) -> Origin {
    let sem = Arc::new(Semaphore::new(slots));
    let delay = Arc::new(AtomicU64::new(delay_ms));
    let failing = Arc::new(AtomicBool::new(false));
    let (s, d, f) = (sem.clone(), delay.clone(), failing.clone());
    let up = Upstream::start(move |req: http::Request<hyper::body::Incoming>| {
        let (s, d, f) = (s.clone(), d.clone(), f.clone());
        async move {
            let _slot = s.acquire().await.unwrap();
            tokio::time::sleep(Duration::from_millis(d.load(Ordering::SeqCst))).await;
            if f.load(Ordering::SeqCst) {
                return reply(500, "broken");
            }
            let mut r = reply(200, format!("origin {}", req.uri().path()));
            r.headers_mut()
                .insert("cache-control", "public, max-age=1".parse().unwrap());
            r
        }
    })
    .await;
    Origin {
        up,
        delay_ms: delay,
        failing,
    }
}

/// Routes of every priority on one origin; `/reco` has a fallback and
/// `/cached` a cache with a long stale window.
fn shop(addr: SocketAddr, overload: &str) -> String {
    Cfg::new(&[addr])
        .route("priority = \"normal\"")
        .section(
            "[[routes]]\nname = \"cached\"\npath_prefix = \"/cached\"\nupstream = \"origin\"\n\
             priority = \"sheddable\"\ncache = { ttl = \"100ms\", stale_if_error = \"10m\" }\n\
             [[routes]]\nname = \"reco\"\npath_prefix = \"/reco\"\nupstream = \"origin\"\n\
             priority = \"sheddable\"\n\
             fallback = { status = 200, headers = { \"content-type\" = \"application/json\" }, body = '{\"items\":[]}' }\n\
             [[routes]]\nname = \"browse\"\npath_prefix = \"/browse\"\nupstream = \"origin\"\n\
             priority = \"sheddable\"\n\
             [[routes]]\nname = \"checkout\"\npath_prefix = \"/checkout\"\nupstream = \"origin\"\n\
             priority = \"critical\"\n",
        )
        .section(format!("[overload]\n{overload}"))
        .build()
}

#[tokio::test]
async fn forced_level_is_off_by_default_needs_the_token_and_expires() {
    let o = origin(16, 0).await;
    let gw = gateway(&shop(o.up.addr, "")).await;
    let r = force(&gw, r#"{"level": 2, "for": "60s"}"#, true).await;
    assert_eq!(r.status, 403, "off by default: {}", r.text());

    let gw = gateway(&shop(o.up.addr, "allow_forced_level = true")).await;
    let r = force(&gw, r#"{"level": 2, "for": "60s"}"#, false).await;
    assert_eq!(r.status, 401);
    assert_eq!(level(&gw).await, 0);
    for bad in [
        r#"{"level": 4, "for": "1s"}"#,
        r#"{"level": 1}"#,
        r#"{"level": 1, "for": "2h"}"#,
        "nope",
    ] {
        assert_eq!(force(&gw, bad, true).await.status, 400, "{bad}");
    }
    let r = force(&gw, r#"{"level": 2, "for": "1500ms"}"#, true).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let s = status(&gw).await;
    assert_eq!(s["load_level"], 2);
    assert_eq!(s["overload"]["forced"]["level"], 2);
    assert_eq!(metric(gw.admin_addr(), "flashgate_load_level").await, 2.0);
    // It expires by itself ...
    wait_until(
        Duration::from_secs(20),
        "the forced level expires",
        || async { level(&gw).await == 0 },
    )
    .await;
    assert!(status(&gw).await["overload"]["forced"].is_null());
    // ... or is cleared.
    force(&gw, r#"{"level": 3, "for": "60s"}"#, true).await;
    assert_eq!(level(&gw).await, 3);
    assert_eq!(force(&gw, r#"{"level": null}"#, true).await.status, 200);
    assert_eq!(level(&gw).await, 0);
}

#[tokio::test]
async fn sheddable_degrades_in_order_stale_fallback_503_and_critical_is_kept() {
    let o = origin(16, 0).await;
    let gw = gateway(&shop(
        o.up.addr,
        "allow_forced_level = true\ndebug_header = \"x-debug-load\"",
    ))
    .await;
    // Calm: everything goes to the origin.
    for path in ["/cached/a", "/reco", "/browse", "/other", "/checkout"] {
        let r = get(&url(&gw, path)).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(r.header("x-flashgate-degraded").is_none(), "{path}");
        assert_eq!(r.text(), format!("origin {path}"));
    }
    let hits = o.up.hits();

    // Level 1: sheddable routes answer from the cache or their fallback
    // where they have one; the rest still go upstream.
    force(&gw, r#"{"level": 1, "for": "60s"}"#, true).await;
    tokio::time::sleep(Duration::from_millis(150)).await; // the cached copy is stale now
    let r = get(&url(&gw, "/cached/a")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-flashgate-degraded"), Some("stale"));
    assert_eq!(r.text(), "origin /cached/a");
    let r = get(&url(&gw, "/reco")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-flashgate-degraded"), Some("fallback"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.text(), r#"{"items":[]}"#);
    assert_eq!(get(&url(&gw, "/browse")).await.status, 200);
    assert_eq!(o.up.hits(), hits + 1, "only /browse reached the origin");

    // Level 2: sheddable without a copy or fallback gets 503; normal
    // still goes upstream.
    force(&gw, r#"{"level": 2, "for": "60s"}"#, true).await;
    let r = get(&url(&gw, "/browse")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-flashgate-error"), Some("overloaded"));
    assert!(r.header("retry-after").is_some());
    assert_eq!(get(&url(&gw, "/other")).await.status, 200);
    // A cached sheddable copy keeps being served.
    assert_eq!(
        get(&url(&gw, "/cached/a"))
            .await
            .header("x-flashgate-degraded"),
        Some("stale")
    );

    // Level 3: normal is shed too; critical still goes through.
    force(&gw, r#"{"level": 3, "for": "60s"}"#, true).await;
    let r = get(&url(&gw, "/other")).await;
    assert_eq!(r.status, 503);
    let r = get(&url(&gw, "/checkout")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "origin /checkout");
    // The debug header shows the level on request.
    let r = send(
        Request::get(url(&gw, "/checkout"))
            .header("x-debug-load", "1")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.header("x-flashgate-load-level"), Some("3"));
    assert!(get(&url(&gw, "/checkout"))
        .await
        .header("x-flashgate-load-level")
        .is_none());

    let admin = gw.admin_addr();
    for (labels, at_least) in [
        (
            "priority=\"sheddable\",reason=\"stale\",route=\"cached\"",
            2.0,
        ),
        (
            "priority=\"sheddable\",reason=\"fallback\",route=\"reco\"",
            1.0,
        ),
        (
            "priority=\"sheddable\",reason=\"level\",route=\"browse\"",
            1.0,
        ),
        (
            "priority=\"normal\",reason=\"level\",route=\"default\"",
            1.0,
        ),
    ] {
        let m = metric(admin, &format!("flashgate_shed_total{{{labels}}}")).await;
        assert!(m >= at_least, "{labels}: {m}");
    }

    // Back to 0: everything is sent again.
    force(&gw, r#"{"level": 0, "for": "60s"}"#, true).await;
    assert_eq!(get(&url(&gw, "/browse")).await.status, 200);
    assert!(get(&url(&gw, "/reco"))
        .await
        .header("x-flashgate-degraded")
        .is_none());
}

/// Sends `path` in a loop from `clients` tasks until `stop`, pausing a
/// little between requests so that instant 503s do not spin the CPU.
fn flood(
    gw: &Gateway,
    path: &str,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|_| {
            let u = url(gw, path);
            let stop = stop.clone();
            tokio::spawn(async move {
                let c = client();
                while !stop.load(Ordering::SeqCst) {
                    let req = Request::get(&u).body(empty()).unwrap();
                    if let Ok(Ok(resp)) =
                        tokio::time::timeout(Duration::from_secs(10), c.request(req)).await
                    {
                        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect()
}

#[tokio::test]
async fn a_saturated_origin_raises_the_level_checkout_keeps_its_share_and_all_recovers() {
    // 2 slots x 50 ms: 40 req/s. Browse offers far more.
    let o = origin(2, 50).await;
    let gw = gateway(&shop(
        o.up.addr,
        "cool_down = \"1s\"\nunready_after = \"1s\"\nready_after = \"1s\"",
    ))
    .await;
    let admin = gw.admin_addr();
    assert_eq!(get(&format!("http://{admin}/readyz")).await.status, 200);
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = flood(&gw, "/browse", 24, stop.clone());
    wait_until(
        Duration::from_secs(20),
        "the level rises to 2 or more",
        || async { level(&gw).await >= 2 },
    )
    .await;
    // Checkout keeps succeeding while browse is shed.
    let mut ok = 0;
    for _ in 0..20 {
        if get(&url(&gw, "/checkout")).await.status == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 20, "checkout answered 200 at its reserved share");
    let browse = get(&url(&gw, "/browse")).await;
    assert_eq!(browse.status, 503, "browse is shed: {}", browse.text());
    // Steady load, steady level: shedding relieves the origin, but the
    // shed requests still count as demand, so the level does not fall back
    // while the flood lasts. (On a busy machine the demand read per tick
    // jitters around a threshold, so the level may move between 2 and 3;
    // what must not happen is a fall below what sheds browse.)
    let mut seen = Vec::new();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen.push(level(&gw).await);
    }
    assert!(
        seen.iter().all(|&l| l >= 2),
        "the level fell under steady load: {seen:?}"
    );
    // A cluster's level leaves readiness alone (the process's own level
    // drives it: see the tests below); liveness never fails for slowness.
    assert_eq!(get(&format!("http://{admin}/readyz")).await.status, 200);
    assert_eq!(get(&format!("http://{admin}/healthz")).await.status, 200);

    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    wait_until(
        Duration::from_secs(30),
        "the level falls back to 0",
        || async { level(&gw).await == 0 },
    )
    .await;
    wait_until(Duration::from_secs(20), "readyz recovers", || async {
        get(&format!("http://{admin}/readyz")).await.status == 200
    })
    .await;
    assert_eq!(get(&url(&gw, "/browse")).await.status, 200);
}

/// The level of one cluster and of another, by `/admin/status`.
async fn cluster_level(gw: &Gateway, cluster: &str) -> (u64, u64) {
    let s = status(gw).await;
    let c = s["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == cluster)
        .unwrap_or_else(|| panic!("no cluster {cluster} in {s}"))
        .clone();
    (
        c["overload"]["own_level"].as_u64().unwrap(),
        c["overload"]["level"].as_u64().unwrap(),
    )
}

/// Levels are per cluster: a saturated origin (2 slots x 50 ms) behind
/// cluster `origin` takes its level to 3 and sheds its own routes, while
/// routes of the same priorities on cluster `other` keep answering 200;
/// the process's own level stays 0, and so does readiness. (Latency is
/// taken out of the level here, `latency_ratio` far up, so that a busy
/// machine's slow calls cannot move `other`: what is tested is which level
/// a route follows.)
#[tokio::test]
async fn one_saturated_cluster_sheds_its_own_routes_and_not_another_clusters() {
    let slow = origin(2, 50).await;
    let fast = Upstream::fixed("fast").await;
    let cfg = Cfg::new(&[slow.up.addr])
        .route("priority = \"normal\"")
        .section(format!(
            "[[routes]]\nname = \"browse\"\npath_prefix = \"/browse\"\nupstream = \"origin\"\n\
             priority = \"sheddable\"\n\
             [[routes]]\nname = \"other-normal\"\npath_prefix = \"/other/n\"\nupstream = \"other\"\n\
             priority = \"normal\"\n\
             [[routes]]\nname = \"other-sheddable\"\npath_prefix = \"/other/s\"\nupstream = \"other\"\n\
             priority = \"sheddable\"\n\
             [[upstreams]]\nname = \"other\"\nendpoints = [\"{}\"]\n\
             [overload]\nunready_after = \"1s\"\nlatency_ratio = [1000.0, 2000.0, 4000.0]\n",
            fast.addr
        ))
        .build();
    let gw = gateway(&cfg).await;
    let admin = gw.admin_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = flood(&gw, "/browse", 24, stop.clone());
    wait_until(
        Duration::from_secs(30),
        "the saturated cluster's level reaches 3",
        || async { cluster_level(&gw, "origin").await.1 == 3 },
    )
    .await;
    for path in ["/other/n", "/other/s"] {
        for i in 0..20 {
            let got = get(&url(&gw, path)).await;
            assert_eq!(
                got.status,
                200,
                "{path} #{i} on the calm cluster: {}",
                got.text()
            );
        }
    }
    assert_eq!(cluster_level(&gw, "other").await, (0, 0));
    let s = status(&gw).await;
    assert_eq!(s["overload"]["process"]["level"], 0, "{s}");
    assert_eq!(s["load_level"], 3, "the highest level anywhere: {s}");
    let shed = get(&url(&gw, "/")).await;
    assert_eq!(
        shed.status,
        503,
        "a normal route at level 3: {}",
        shed.text()
    );
    assert_eq!(shed.header("x-flashgate-error"), Some("overloaded"));
    let m = get(&format!("http://{admin}/metrics")).await.text();
    assert!(
        m.contains("flashgate_cluster_load_level{cluster=\"origin\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("flashgate_cluster_load_level{cluster=\"other\"} 0"),
        "{m}"
    );
    assert!(m.contains("flashgate_load_level 3"), "{m}");
    // Longer than unready_after at 3, but only a cluster: still ready.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(get(&format!("http://{admin}/readyz")).await.status, 200);
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
}

/// The process's own level follows what every cluster shares: client
/// connections near the listener's `max_connections` shed sheddable
/// routes on any cluster, and the level falls once they close.
#[tokio::test]
async fn connections_near_the_cap_raise_the_process_level_for_every_cluster() {
    let up = Upstream::fixed("ok").await;
    let cfg = Cfg::new(&[up.addr])
        .route("priority = \"sheddable\"")
        .section("[overload]\ncool_down = \"1s\"\n")
        .build()
        .replace(
            "name = \"public\"\nlisten = \"127.0.0.1:0\"\n",
            "name = \"public\"\nlisten = \"127.0.0.1:0\"\nmax_connections = 20\n",
        );
    assert!(cfg.contains("max_connections = 20"), "{cfg}");
    let gw = gateway(&cfg).await;
    let addr = gw.addr("public").unwrap();
    // 18 keep-alive connections (0.9 of the cap), each after one answered
    // request.
    let mut held = Vec::new();
    for _ in 0..18 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = raw::read_response(&mut s, Duration::from_secs(10)).await;
        assert!(answer.is_some_and(|a| raw::status(&a) == Some(200)));
        held.push(s);
    }
    wait_until(
        Duration::from_secs(20),
        "the process level rises (18 of 20 connections)",
        || async { status(&gw).await["overload"]["process"]["level"].as_u64() >= Some(2) },
    )
    .await;
    let shed = get(&url(&gw, "/")).await;
    assert_eq!(shed.status, 503, "{}", shed.text());
    let (own, seen) = cluster_level(&gw, "origin").await;
    assert_eq!(own, 0, "the cluster itself is calm");
    assert!(seen >= 2, "its routes see the process's level: {seen}");
    drop(held);
    wait_until(
        Duration::from_secs(30),
        "the process level falls once the connections close",
        || async { status(&gw).await["overload"]["process"]["level"] == 0 },
    )
    .await;
    assert_eq!(get(&url(&gw, "/")).await.status, 200);
}

/// Readiness follows the process's level: a forced critical level (a
/// drill) held for `unready_after` takes it off, and it comes back
/// `ready_after` after the level is cleared.
#[tokio::test]
async fn a_critical_process_level_takes_readiness_off_and_back() {
    let o = origin(4, 0).await;
    let gw = gateway(&shop(
        o.up.addr,
        "allow_forced_level = true\nunready_after = \"1s\"\nready_after = \"1s\"",
    ))
    .await;
    let readyz = format!("http://{}/readyz", gw.admin_addr());
    assert_eq!(get(&readyz).await.status, 200);
    force(&gw, r#"{"level": 3, "for": "60s"}"#, true).await;
    wait_until(Duration::from_secs(20), "readyz fails", || async {
        get(&readyz).await.status == 503
    })
    .await;
    force(&gw, r#"{"level": null}"#, true).await;
    wait_until(Duration::from_secs(20), "readyz recovers", || async {
        get(&readyz).await.status == 200
    })
    .await;
}

#[tokio::test]
async fn the_adaptive_limit_follows_a_step_in_upstream_latency() {
    // No slot limit at the origin: its latency is what the test sets.
    let o = origin(1000, 5).await;
    let text = Cfg::new(&[o.up.addr])
        .upstream(
            // A baseline window of a few seconds: the fall lasts until the
            // slower latency becomes the baseline, long enough to be seen
            // on a busy machine (where the "fast" latency is itself far
            // above 5 ms).
            "max_concurrent_requests = 64\n\
             adaptive = { initial_limit = 16, min_limit = 2, baseline_window = \"4s\" }",
        )
        // Only the limit is under test: the level stays calm.
        .section(
            "[overload]\nmax_wait = { normal = \"5s\" }\nqueue_delay = [\"5s\", \"6s\", \"7s\"]\n\
             latency_ratio = [100.0, 200.0, 300.0]\nutilization = [100.0, 200.0, 300.0]",
        )
        .build();
    let gw = gateway(&text).await;
    let limit = |gw: &Gateway| {
        let admin = gw.admin_addr();
        async move {
            get(&format!("http://{admin}/admin/status")).await.json()["clusters"][0]["overload"]
                ["limit"]
                .as_u64()
                .unwrap()
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = flood(&gw, "/", 32, stop.clone());
    wait_until(
        Duration::from_secs(30),
        "the limit grows while used",
        || async { limit(&gw).await >= 24 },
    )
    .await;
    // Sixty times slower (and well above what a busy machine adds): the
    // limit falls ...
    o.delay_ms.store(300, Ordering::SeqCst);
    wait_until(Duration::from_secs(30), "the limit falls", || async {
        limit(&gw).await <= 12
    })
    .await;
    // ... and once the new latency is the baseline it grows again.
    wait_until(Duration::from_secs(60), "the limit recovers", || async {
        limit(&gw).await >= 20
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        metric(
            gw.admin_addr(),
            "flashgate_adaptive_limit{cluster=\"origin\"}"
        )
        .await
            >= 2.0
    );
}

#[tokio::test]
async fn a_breaker_opens_answers_the_fallback_half_opens_and_closes() {
    let o = origin(16, 0).await;
    let text = Cfg::new(&[o.up.addr])
        .upstream(
            "breaker = { min_calls = 5, error_ratio = 0.5, open_for = \"500ms\", half_open_probes = 2 }",
        )
        .route("fallback = { status = 200, body = \"placeholder\" }")
        .build();
    let gw = gateway(&text).await;
    let breaker = |gw: &Gateway| {
        let admin = gw.admin_addr();
        async move {
            get(&format!("http://{admin}/admin/status")).await.json()["clusters"][0]["overload"]
                ["breaker"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    assert_eq!(breaker(&gw).await, "closed");
    o.failing.store(true, Ordering::SeqCst);
    for _ in 0..5 {
        assert_eq!(get(&url(&gw, "/")).await.status, 500);
    }
    assert_eq!(breaker(&gw).await, "open");
    // Open: the fallback at once, the origin is left alone.
    let hits = o.up.hits();
    let r = get(&url(&gw, "/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "placeholder");
    assert_eq!(r.header("x-flashgate-degraded"), Some("fallback"));
    assert_eq!(o.up.hits(), hits);
    // The origin recovers; after open_for the probes go through and close it.
    o.failing.store(false, Ordering::SeqCst);
    wait_until(Duration::from_secs(10), "the breaker closes", || async {
        let _ = get(&url(&gw, "/")).await;
        breaker(&gw).await == "closed"
    })
    .await;
    let r = get(&url(&gw, "/")).await;
    assert_eq!(r.text(), "origin /");
    assert!(
        metric(
            gw.admin_addr(),
            "flashgate_shed_total{priority=\"normal\",reason=\"fallback\",route=\"default\"}"
        )
        .await
            >= 1.0
    );
}

#[tokio::test]
async fn degrade_recommendations_sees_the_load_level() {
    let o = origin(16, 0).await;
    let wasm = wasm_plugin("degrade_recommendations");
    let text = Cfg::new(&[o.up.addr])
        .route("filters = [\"degrade\"]")
        .section(format!(
            "[[filters]]\nname = \"degrade\"\nwasm = \"{}\"\nconfig = '{{\"min_level\": 2, \"placeholder\": {{\"items\": []}}}}'\n\
             [overload]\nallow_forced_level = true",
            wasm.display()
        ))
        .build();
    let gw = gateway(&text).await;
    let r = get(&url(&gw, "/recommendations")).await;
    assert_eq!(r.text(), "origin /recommendations", "calm: left alone");
    force(&gw, r#"{"level": 1, "for": "60s"}"#, true).await;
    assert_eq!(
        get(&url(&gw, "/recommendations")).await.text(),
        "origin /recommendations"
    );
    force(&gw, r#"{"level": 2, "for": "60s"}"#, true).await;
    let r = get(&url(&gw, "/recommendations")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-degraded"), Some("1"));
    assert_eq!(r.json(), serde_json::json!({"items": []}));
}

#[tokio::test]
async fn strip_heavy_fields_strips_at_its_level_only() {
    let up = Upstream::start(|_req: http::Request<hyper::body::Incoming>| async {
        let mut r = reply(
            200,
            r#"{"id":1,"name":"Runner","reviews":[{"stars":5}],"related":[{"id":2,"reviews":[]}]}"#,
        );
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    })
    .await;
    let wasm = wasm_plugin("strip_heavy_fields");
    let text = Cfg::new(&[up.addr])
        .route("filters = [\"strip\"]")
        .section(format!(
            "[[filters]]\nname = \"strip\"\nwasm = \"{}\"\nconfig = '{{\"min_level\": 1, \"fields\": [\"reviews\"]}}'\n\
             [overload]\nallow_forced_level = true",
            wasm.display()
        ))
        .build();
    let gw = gateway(&text).await;
    let calm = get(&url(&gw, "/products/1")).await;
    assert!(calm.header("x-stripped").is_none());
    assert_eq!(calm.json()["reviews"][0]["stars"], 5, "calm: untouched");
    force(&gw, r#"{"level": 1, "for": "60s"}"#, true).await;
    let r = get(&url(&gw, "/products/1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-stripped"), Some("1"));
    assert_eq!(
        r.json(),
        serde_json::json!({"id": 1, "name": "Runner", "related": [{"id": 2}]})
    );
}

#[tokio::test]
async fn checkout_guard_admits_only_queued_buyers_above_its_level() {
    let o = origin(16, 0).await;
    let wasm = wasm_plugin("checkout_guard");
    let text = Cfg::new(&[o.up.addr])
        .route("priority = \"critical\"\nfilters = [\"guard\"]")
        .section(format!(
            "[[filters]]\nname = \"guard\"\nwasm = \"{}\"\nconfig = '{{\"min_level\": 2, \"session_cookie\": \"fg_room\"}}'\n\
             [overload]\nallow_forced_level = true\n\
             [jwt]\nalgorithm = \"HS256\"\nsecret = \"guard-test-secret-0123\"\n",
            wasm.display()
        ))
        .build();
    let gw = gateway(&text).await;
    let checkout = url(&gw, "/checkout");
    let anonymous = || get(&checkout);
    let queued = || {
        send(
            Request::get(&checkout)
                .header("cookie", "a=1; fg_room=ticket")
                .body(empty())
                .unwrap(),
        )
    };
    assert_eq!(
        anonymous().await.text(),
        "origin /checkout",
        "calm: everyone"
    );
    force(&gw, r#"{"level": 1, "for": "60s"}"#, true).await;
    assert_eq!(anonymous().await.status, 200);
    force(&gw, r#"{"level": 2, "for": "60s"}"#, true).await;
    let r = anonymous().await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-checkout-guard"), Some("1"));
    assert_eq!(r.header("retry-after"), Some("5"));
    let r = queued().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "origin /checkout");
    // A verified JWT lets a buyer through too; a forged identity header
    // (the gateway drops it) does not.
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": "alice", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(b"guard-test-secret-0123"),
    )
    .unwrap();
    let r = send(
        Request::get(&checkout)
            .header("authorization", format!("Bearer {token}"))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "verified: {}", r.text());
    let r = send(
        Request::get(&checkout)
            .header("x-user-id", "mallory")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        r.status, 503,
        "a forged identity header is not a verified JWT"
    );
}
