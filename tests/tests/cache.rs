//! The shared response cache, end to end: real gateways (in process and as
//! `flashgate` processes), a real redis-server and a real Redis Cluster,
//! origins that count what reaches them, real HTTP clients on loopback.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flashgate_tests::redis::{RedisCluster, RedisServer, TempDir};
use flashgate_tests::*;
use http::Request;
use hyper::body::Incoming;

/// Every test sends this Host, so gateways on different ports share keys.
const HOST: &str = "shop.test";

/// Origin hits by path (with query).
#[derive(Clone, Default)]
struct Counts(Arc<Mutex<HashMap<String, usize>>>);

impl Counts {
    fn hit(&self, path: &str) -> usize {
        let mut m = self.0.lock().unwrap();
        let n = m.entry(path.to_string()).or_default();
        *n += 1;
        *n
    }
    fn get(&self, path: &str) -> usize {
        self.0.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn path_of(req: &Request<Incoming>) -> String {
    req.uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default()
}

/// An origin that counts requests per path and answers `<path> #<n>`
/// after `delay`, with `Cache-Control: max-age=<max_age(n)>`.
async fn counting_origin(delay: Duration, max_age: fn(usize) -> u64) -> (Upstream, Counts) {
    let counts = Counts::default();
    let c = counts.clone();
    let up = Upstream::start(move |req: Request<Incoming>| {
        let c = c.clone();
        async move {
            let path = path_of(&req);
            let n = c.hit(&path);
            tokio::time::sleep(delay).await;
            let mut r = reply(200, format!("{path} #{n}"));
            r.headers_mut().insert(
                "cache-control",
                format!("public, max-age={}", max_age(n)).parse().unwrap(),
            );
            r
        }
    })
    .await;
    (up, counts)
}

fn url(gw: &Gateway, path: &str) -> String {
    format!("http://{}{path}", gw.addr("public").unwrap())
}

/// `GET` with our Host header and optional extra headers.
async fn fetch(url: &str, headers: &[(&str, &str)]) -> Got {
    let mut b = Request::get(url).header("host", HOST);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    send(b.body(empty()).unwrap()).await
}

async fn purge(admin: std::net::SocketAddr, body: &str) -> Got {
    send(
        Request::post(format!("http://{admin}/admin/cache/purge"))
            .header("authorization", "Bearer test-token")
            .body(full(body.to_string()))
            .unwrap(),
    )
    .await
}

/// `n` concurrent GETs of `path`, spread round-robin over `bases`.
async fn stampede(bases: &[String], path: &str, n: usize) -> Vec<Got> {
    let client = client();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let client = client.clone();
        let url = format!("{}{path}", bases[i % bases.len()]);
        tasks.push(tokio::spawn(async move {
            send_with(
                &client,
                Request::get(url)
                    .header("host", HOST)
                    .body(empty())
                    .unwrap(),
            )
            .await
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("request task"));
    }
    out
}

fn cache_route(settings: &str) -> String {
    format!("cache = {{ {settings} }}\n")
}

#[tokio::test]
async fn miss_then_hit_with_age_and_x_cache() {
    let (up, counts) = counting_origin(Duration::ZERO, |_| 60).await;
    let gw = gateway(
        &Cfg::new(&[up.addr])
            .route(cache_route("ttl = \"60s\""))
            .build(),
    )
    .await;
    let first = fetch(&url(&gw, "/p/1"), &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert_eq!(first.text(), "/p/1 #1");
    let second = fetch(&url(&gw, "/p/1"), &[]).await;
    assert_eq!(second.header("x-cache"), Some("HIT"));
    assert_eq!(second.text(), "/p/1 #1");
    assert_eq!(second.header("age"), Some("0"));
    assert_eq!(second.header("content-length"), Some("7"));
    assert!(second.header("x-request-id").is_some());
    // The query is part of the key.
    assert_eq!(
        fetch(&url(&gw, "/p/1?x=1"), &[]).await.header("x-cache"),
        Some("MISS")
    );
    assert_eq!(counts.get("/p/1"), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let age: u64 = fetch(&url(&gw, "/p/1"), &[])
        .await
        .header("age")
        .unwrap()
        .parse()
        .unwrap();
    assert!(age >= 1, "age counts seconds since the store");
    let admin = gw.admin_addr();
    assert_eq!(
        metric(admin, "flashgate_cache_lookups_total{result=\"hit\"").await,
        2.0
    );
    assert_eq!(
        metric(admin, "flashgate_cache_lookups_total{result=\"miss\"").await,
        2.0
    );
    assert_eq!(
        metric(admin, "flashgate_cache_fills_total{result=\"stored\"").await,
        2.0
    );
    assert!(metric(admin, "flashgate_cache_l1_bytes").await > 0.0);
    assert_eq!(metric(admin, "flashgate_cache_l1_entries").await, 2.0);
}

#[tokio::test]
async fn stampede_in_one_gateway_without_redis_is_one_origin_request() {
    // The first answer lives 1s, the refill 60s (the origin's max-age,
    // honoured), so the whole burst falls on one expiry.
    let (up, counts) =
        counting_origin(Duration::from_millis(200), |n| if n == 1 { 1 } else { 60 }).await;
    let gw = gateway(
        &Cfg::new(&[up.addr])
            .upstream("max_concurrent_requests = 4096")
            .route(cache_route("ttl = \"60s\", honour_origin = true"))
            .build(),
    )
    .await;
    assert_eq!(fetch(&url(&gw, "/hot"), &[]).await.text(), "/hot #1");
    tokio::time::sleep(Duration::from_millis(1050)).await;
    let base = format!("http://{}", gw.addr("public").unwrap());
    let answers = stampede(&[base], "/hot", 1000).await;
    assert!(answers
        .iter()
        .all(|g| g.status == 200 && g.text() == "/hot #2"));
    assert_eq!(
        counts.get("/hot"),
        2,
        "one fill for the first answer, one for the burst"
    );
    let coalesced = metric(
        gw.admin_addr(),
        "flashgate_cache_lookups_total{result=\"coalesced\"",
    )
    .await;
    assert!(coalesced > 0.0, "some requests waited on the fill");
}

/// A config file for one `flashgate` process.
fn process_config(
    port: u16,
    admin: u16,
    origin: std::net::SocketAddr,
    redis: &str,
    route: &str,
) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\ntoken = \"test-token\"\n\
         [log]\nlevel = \"warn\"\naccess_log = false\n\
         [[listeners]]\nname = \"public\"\nlisten = \"127.0.0.1:{port}\"\n\
         [[upstreams]]\nname = \"origin\"\nendpoints = [\"{origin}\"]\nmax_concurrent_requests = 4096\n\
         [[routes]]\nname = \"default\"\npath_prefix = \"/\"\nupstream = \"origin\"\n{route}\n\
         {redis}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stampede_across_three_gateway_processes_is_one_origin_request() {
    let redis = RedisServer::start();
    let (up, counts) =
        counting_origin(Duration::from_millis(200), |n| if n == 1 { 2 } else { 60 }).await;
    let dir = TempDir::new("cache-stampede");
    let mut procs = Vec::new();
    let mut bases = Vec::new();
    let mut admins = Vec::new();
    for i in 0..3 {
        let (port, admin) = (free_port(), free_port());
        let path = dir.0.join(format!("gw{i}.toml"));
        let text = process_config(
            port,
            admin,
            up.addr,
            &format!("[redis]\nurl = \"{}\"\n", redis.url()),
            &cache_route("ttl = \"60s\", honour_origin = true"),
        );
        std::fs::write(&path, text).unwrap();
        procs.push(Proc::spawn(
            std::process::Command::new(flashgate_bin())
                .arg("run")
                .arg("--config")
                .arg(&path),
        ));
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        assert!(
            wait_listening(addr, Duration::from_secs(20)).await,
            "gateway {i} listens"
        );
        bases.push(format!("http://{addr}"));
        admins.push(std::net::SocketAddr::from(([127, 0, 0, 1], admin)));
    }
    // Filled through the first gateway; the others find it in Redis.
    assert_eq!(
        fetch(&format!("{}/sale", bases[0]), &[]).await.text(),
        "/sale #1"
    );
    let filled = Instant::now();
    let second = fetch(&format!("{}/sale", bases[1]), &[]).await;
    assert_eq!(second.text(), "/sale #1");
    assert_eq!(second.header("x-cache"), Some("HIT"));
    // Burst the moment it has expired (max-age=2) in all three.
    tokio::time::sleep(Duration::from_millis(2050).saturating_sub(filled.elapsed())).await;
    let answers = stampede(&bases, "/sale", 1000).await;
    let bad: Vec<_> = answers
        .iter()
        .filter(|g| g.status != 200 || g.text() != "/sale #2")
        .collect();
    assert!(bad.is_empty(), "failed answers: {:?}", bad.first());
    assert_eq!(
        counts.get("/sale"),
        2,
        "the origin saw one request for the first fill and one for the whole fleet's burst"
    );
    // The two gateways that did not fill waited on the Redis lock.
    let mut waits = 0.0;
    for a in &admins {
        waits += metric(*a, "flashgate_cache_lock_waits_total{result=\"filled\"}").await;
    }
    assert!(
        waits >= 1.0,
        "other gateways took the filled entry after a lock wait"
    );
}

#[tokio::test]
async fn jitter_spreads_expiry_over_the_window() {
    let redis = RedisServer::start();
    let (up, _) = counting_origin(Duration::ZERO, |_| 60).await;
    let gw = gateway(
        &Cfg::new(&[up.addr])
            .route(cache_route("ttl = \"100s\", jitter = 0.2"))
            .section(format!("[redis]\nurl = \"{}\"\n", redis.url()))
            .build(),
    )
    .await;
    let base = format!("http://{}", gw.addr("public").unwrap());
    let client = client();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let c = client.clone();
        let u = format!("{base}/j/{i}");
        tasks.push(tokio::spawn(async move {
            send_with(
                &c,
                Request::get(u).header("host", HOST).body(empty()).unwrap(),
            )
            .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 200);
    }
    let mut ttls = Vec::new();
    for i in 0..60 {
        let key = format!("flashgate:cache:{{{HOST}/j/{i}}}:e");
        let mut pttl = -2;
        wait_until(Duration::from_secs(5), &format!("{key} stored"), || {
            pttl = redis
                .cmd(&["PTTL", &key])
                .trim_start_matches(':')
                .parse()
                .unwrap_or(-2);
            async move { pttl > 0 }
        })
        .await;
        ttls.push(pttl as f64 / 1000.0);
    }
    let min = ttls.iter().cloned().fold(f64::MAX, f64::min);
    let max = ttls.iter().cloned().fold(f64::MIN, f64::max);
    // 100s +- 20%: within [80, 120], spread over most of the 40s window.
    assert!(min >= 79.0 && max <= 120.0, "expiries {min}..{max}");
    assert!(max - min >= 20.0, "expiries spread: {min}..{max}");
    let distinct: std::collections::HashSet<u64> = ttls.iter().map(|t| *t as u64 / 5).collect();
    assert!(distinct.len() >= 5, "expiries in many 5s buckets: {ttls:?}");
}

#[tokio::test]
async fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    // The origin's refresh is held until the test lets it go: stale answers
    // that arrive meanwhile cannot have waited for it.
    let counts = Counts::default();
    let gate = Arc::new(tokio::sync::Notify::new());
    let (c, g) = (counts.clone(), gate.clone());
    let up = Upstream::start(move |req: Request<Incoming>| {
        let (c, g) = (c.clone(), g.clone());
        async move {
            let n = c.hit(&path_of(&req));
            if n > 1 {
                g.notified().await;
            }
            reply(200, format!("v{n}"))
        }
    })
    .await;
    let gw = gateway(
        &Cfg::new(&[up.addr])
            .route(cache_route(
                "ttl = \"1s\", stale_while_revalidate = \"60s\"",
            ))
            .build(),
    )
    .await;
    assert_eq!(fetch(&url(&gw, "/swr"), &[]).await.text(), "v1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let base = format!("http://{}", gw.addr("public").unwrap());
    let answers = stampede(&[base], "/swr", 50).await;
    for a in &answers {
        assert_eq!(a.text(), "v1");
        assert_eq!(a.header("x-cache"), Some("STALE"));
    }
    // Exactly one refresh went out, and it is still held.
    wait_until(
        Duration::from_secs(5),
        "one refresh reached the origin",
        || async { counts.get("/swr") == 2 },
    )
    .await;
    gate.notify_waiters();
    wait_until(
        Duration::from_secs(10),
        "the refreshed copy replaces the stale one",
        || async {
            let g = fetch(&url(&gw, "/swr"), &[]).await;
            g.text() == "v2" && g.header("x-cache") == Some("HIT")
        },
    )
    .await;
    assert_eq!(
        counts.get("/swr"),
        2,
        "one refresh for all the stale answers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_refreshes_once_for_the_fleet() {
    let redis = RedisServer::start();
    let counts = Counts::default();
    let gate = Arc::new(tokio::sync::Notify::new());
    let (c, g) = (counts.clone(), gate.clone());
    let up = Upstream::start(move |req: Request<Incoming>| {
        let (c, g) = (c.clone(), g.clone());
        async move {
            let n = c.hit(&path_of(&req));
            if n > 1 {
                g.notified().await;
            }
            reply(200, format!("v{n}"))
        }
    })
    .await;
    let cfg = Cfg::new(&[up.addr])
        .route(cache_route(
            "ttl = \"1s\", stale_while_revalidate = \"60s\"",
        ))
        .section(format!(
            "[cache]\nlock_wait = \"20s\"\n[redis]\nurl = \"{}\"\n",
            redis.url()
        ))
        .build();
    let a = gateway(&cfg).await;
    let b = gateway(&cfg).await;
    assert_eq!(fetch(&url(&a, "/swr"), &[]).await.text(), "v1");
    assert_eq!(
        fetch(&url(&b, "/swr"), &[]).await.header("x-cache"),
        Some("HIT")
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let bases = [
        format!("http://{}", a.addr("public").unwrap()),
        format!("http://{}", b.addr("public").unwrap()),
    ];
    for g in stampede(&bases, "/swr", 40).await {
        assert_eq!(
            (g.text().as_str(), g.header("x-cache")),
            ("v1", Some("STALE"))
        );
    }
    wait_until(
        Duration::from_secs(5),
        "one refresh reached the origin",
        || async { counts.get("/swr") == 2 },
    )
    .await;
    // B's refresh waits on A's lock instead of asking the origin too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(counts.get("/swr"), 2);
    gate.notify_waiters();
    for gw in [&a, &b] {
        wait_until(
            Duration::from_secs(10),
            "both gateways serve the refreshed copy",
            || async {
                let g = fetch(&url(gw, "/swr"), &[]).await;
                g.text() == "v2" && g.header("x-cache") == Some("HIT")
            },
        )
        .await;
    }
    assert_eq!(counts.get("/swr"), 2, "one refresh for the whole fleet");
}

#[tokio::test]
async fn early_refresh_renews_a_hot_key_before_it_expires() {
    // A 200 ms fill with beta 10: XFetch refreshes within the last ~2s of
    // the 1s lifetime, i.e. almost at once; readers never see it expire.
    let (up, counts) = counting_origin(Duration::from_millis(200), |_| 60).await;
    let gw = gateway(
        &Cfg::new(&[up.addr])
            .route(cache_route("ttl = \"1s\", early_refresh = 10.0"))
            .build(),
    )
    .await;
    assert_eq!(
        fetch(&url(&gw, "/hot"), &[]).await.header("x-cache"),
        Some("MISS")
    );
    let answers = Arc::new(Mutex::new(Vec::new()));
    wait_until(Duration::from_secs(10), "a background refresh ran", || {
        let u = url(&gw, "/hot");
        let (counts, answers) = (counts.clone(), answers.clone());
        async move {
            let g = fetch(&u, &[]).await;
            answers
                .lock()
                .unwrap()
                .push(g.header("x-cache").unwrap_or("").to_string());
            counts.get("/hot") >= 2
        }
    })
    .await;
    let answers = answers.lock().unwrap().clone();
    assert!(
        answers.iter().all(|x| x == "HIT"),
        "every reader was served from the cache: {answers:?}"
    );
}

#[tokio::test]
async fn stale_if_error_covers_origin_errors_and_outages_then_ends() {
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    let handler: Handler = Arc::new(move |_req| {
        let f = f.clone();
        Box::pin(async move {
            let mut r = if f.load(Ordering::SeqCst) {
                reply(500, "origin broke")
            } else {
                reply(200, "good copy")
            };
            // No keep-alive: once the origin stops, it is really down.
            r.headers_mut()
                .insert("connection", "close".parse().unwrap());
            r
        })
    });
    let up = Upstream::start_handler(handler.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = up.addr;
    let gw = gateway(
        &Cfg::new(&[addr])
            .upstream("retries = 0\n[upstreams.outlier]\nconsecutive_failures = 0")
            .route(cache_route("ttl = \"1s\", stale_if_error = \"3s\""))
            .build(),
    )
    .await;
    assert_eq!(fetch(&url(&gw, "/s"), &[]).await.text(), "good copy");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Origin answers 500: the stale copy is served.
    failing.store(true, Ordering::SeqCst);
    let g = fetch(&url(&gw, "/s"), &[]).await;
    assert_eq!((g.status, g.text().as_str()), (200, "good copy"));
    assert_eq!(g.header("x-cache"), Some("STALE"));
    // Origin down: still the stale copy.
    up.stop();
    let g = fetch(&url(&gw, "/s"), &[]).await;
    assert_eq!((g.status, g.text().as_str()), (200, "good copy"));
    assert_eq!(g.header("x-cache"), Some("STALE"));
    // Past the window: the failure shows.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let g = fetch(&url(&gw, "/s"), &[]).await;
    assert_eq!(g.status, 502, "{}", g.text());
    // And an origin 500 passes through once there is no stale copy.
    let _up = Upstream::start_handler(handler, addr).await;
    let g = fetch(&url(&gw, "/s"), &[]).await;
    assert_eq!((g.status, g.text().as_str()), (500, "origin broke"));
    assert_eq!(g.header("x-cache"), Some("MISS"));
}

#[tokio::test]
async fn private_answers_are_never_stored_or_shared() {
    let counts = Counts::default();
    let c = counts.clone();
    let up = Upstream::start(move |req: Request<Incoming>| {
        let c = c.clone();
        async move {
            let path = req.uri().path().to_string();
            let n = c.hit(&path);
            let auth = req
                .headers()
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let lang = req
                .headers()
                .get("accept-language")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let mut r = reply(200, format!("{path} #{n} auth={auth} lang={lang}"));
            let h = r.headers_mut();
            match path.as_str() {
                "/cookie" => {
                    h.insert("set-cookie", "sid=secret-of-user-1".parse().unwrap());
                }
                "/private" => {
                    h.insert("cache-control", "private, max-age=60".parse().unwrap());
                }
                "/nostore" => {
                    h.insert("cache-control", "no-store".parse().unwrap());
                }
                "/vary" => {
                    h.insert("vary", "Accept-Language".parse().unwrap());
                }
                _ => {}
            }
            r
        }
    })
    .await;
    let gw = gateway(
        &Cfg::new(&[up.addr])
            .route(cache_route("ttl = \"60s\", ignore_cookies = [\"_ga\"]"))
            .build(),
    )
    .await;
    for path in ["/cookie", "/private", "/nostore"] {
        let user1 = fetch(&url(&gw, path), &[]).await;
        let user2 = fetch(&url(&gw, path), &[]).await;
        assert_eq!(user1.header("x-cache"), Some("MISS"), "{path}");
        assert_eq!(user2.header("x-cache"), Some("MISS"), "{path}");
        assert_ne!(user1.text(), user2.text(), "{path} served to a second user");
        assert_eq!(counts.get(path), 2, "{path}");
    }
    assert_eq!(
        fetch(&url(&gw, "/cookie"), &[]).await.header("set-cookie"),
        Some("sid=secret-of-user-1"),
        "the user still gets their own cookie"
    );
    // A request with Authorization never uses the cache, either way.
    let authed = fetch(&url(&gw, "/acct"), &[("authorization", "Bearer user-1")]).await;
    assert_eq!(authed.header("x-cache"), Some("BYPASS"));
    assert!(authed.text().contains("auth=Bearer user-1"));
    let anon = fetch(&url(&gw, "/acct"), &[]).await;
    assert_eq!(anon.header("x-cache"), Some("MISS"));
    assert!(!anon.text().contains("user-1"));
    let authed_again = fetch(&url(&gw, "/acct"), &[("authorization", "Bearer user-2")]).await;
    assert_eq!(authed_again.header("x-cache"), Some("BYPASS"));
    assert!(authed_again.text().contains("auth=Bearer user-2"));
    // Cookies: only the ignorable ones keep the cache on.
    assert_eq!(
        fetch(&url(&gw, "/acct"), &[("cookie", "_ga=GA1.2")])
            .await
            .header("x-cache"),
        Some("HIT")
    );
    assert_eq!(
        fetch(&url(&gw, "/acct"), &[("cookie", "_ga=GA1.2; session=abc")])
            .await
            .header("x-cache"),
        Some("BYPASS")
    );
    // Vary keeps variants apart.
    let de = fetch(&url(&gw, "/vary"), &[("accept-language", "de")]).await;
    let fr = fetch(&url(&gw, "/vary"), &[("accept-language", "fr")]).await;
    assert!(de.text().ends_with("lang=de"));
    assert!(fr.text().ends_with("lang=fr"), "{}", fr.text());
    assert_eq!(fr.header("x-cache"), Some("MISS"));
    let de2 = fetch(&url(&gw, "/vary"), &[("accept-language", "de")]).await;
    assert_eq!(de2.header("x-cache"), Some("HIT"));
    assert_eq!(de2.text(), de.text());
    let fr2 = fetch(&url(&gw, "/vary"), &[("accept-language", "fr")]).await;
    assert_eq!(fr2.header("x-cache"), Some("HIT"));
    assert_eq!(fr2.text(), fr.text());
    // Non-GET methods are never cached.
    let post = send(
        Request::post(url(&gw, "/acct"))
            .header("host", HOST)
            .body(full("x"))
            .unwrap(),
    )
    .await;
    assert_eq!(post.header("x-cache"), Some("BYPASS"));
}

#[tokio::test]
async fn large_answers_stream_through_uncached() {
    let counts = Counts::default();
    let c = counts.clone();
    let up = Upstream::start(move |req: Request<Incoming>| {
        let c = c.clone();
        async move {
            let path = req.uri().path().to_string();
            c.hit(&path);
            if path == "/chunked" {
                // No content-length: the cache finds out while reading.
                let (mut tx, body) = http_body_util::channel::Channel::<
                    bytes::Bytes,
                    Box<dyn std::error::Error + Send + Sync>,
                >::new(4);
                tokio::spawn(async move {
                    for _ in 0..32 {
                        if tx
                            .send_data(bytes::Bytes::from(vec![b'c'; 8192]))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
                let mut r = http::Response::new(http_body_util::BodyExt::boxed(body));
                *r.status_mut() = http::StatusCode::OK;
                r
            } else {
                reply(200, vec![b'x'; 256 * 1024])
            }
        }
    })
    .await;
    let gw = gateway(
        &Cfg::new(&[up.addr])
            .route(cache_route("ttl = \"60s\""))
            .section("[cache]\nmax_entry_size = \"64KiB\"\n")
            .build(),
    )
    .await;
    for path in ["/big", "/chunked"] {
        for _ in 0..2 {
            let g = fetch(&url(&gw, path), &[]).await;
            assert_eq!(g.status, 200);
            assert_eq!(g.header("x-cache"), Some("MISS"), "{path}");
            // Both are 256 KiB: 4x max_entry_size, all of it delivered.
            assert_eq!(g.body.len(), 256 * 1024, "{path}");
        }
        assert_eq!(counts.get(path), 2, "{path} is never stored");
    }
}

#[tokio::test]
async fn purge_by_key_and_prefix_reaches_a_second_gateway() {
    let redis = RedisServer::start();
    let (up, counts) = counting_origin(Duration::ZERO, |_| 60).await;
    let cfg = Cfg::new(&[up.addr])
        .route(cache_route("ttl = \"60s\""))
        .section(format!("[redis]\nurl = \"{}\"\n", redis.url()))
        .build();
    let a = gateway(&cfg).await;
    let b = gateway(&cfg).await;
    for p in ["/p/1", "/p/2", "/q/1"] {
        assert_eq!(
            fetch(&url(&a, p), &[]).await.header("x-cache"),
            Some("MISS")
        );
        // B finds A's fill in Redis and keeps it in its L1.
        assert_eq!(fetch(&url(&b, p), &[]).await.header("x-cache"), Some("HIT"));
    }
    // Without the token: refused.
    let refused = send(
        Request::post(format!("http://{}/admin/cache/purge", a.admin_addr()))
            .body(full("{\"key\": \"shop.test/p/1\"}"))
            .unwrap(),
    )
    .await;
    assert_eq!(refused.status, 401);
    assert_eq!(purge(a.admin_addr(), "{\"nope\": 1}").await.status, 400);

    let purged = purge(a.admin_addr(), "{\"key\": \"shop.test/p/1\"}").await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    assert_eq!(purged.json()["purged"]["l2"], 1);
    // B dropped its L1 copy on the pub/sub message: its next request refills.
    wait_until(
        Duration::from_secs(5),
        "B dropped its L1 copy on the purge message",
        || async { fetch(&url(&b, "/p/1"), &[]).await.header("x-cache") == Some("MISS") },
    )
    .await;
    assert_eq!(counts.get("/p/1"), 2);
    assert_eq!(
        fetch(&url(&b, "/p/2"), &[]).await.header("x-cache"),
        Some("HIT")
    );

    let purged = purge(b.admin_addr(), "{\"prefix\": \"shop.test/p/\"}").await;
    assert_eq!(purged.status, 200);
    wait_until(
        Duration::from_secs(5),
        "A dropped its L1 copy on the prefix purge message",
        || async { fetch(&url(&a, "/p/2"), &[]).await.header("x-cache") == Some("MISS") },
    )
    .await;
    assert_eq!(counts.get("/p/2"), 2);
    assert_eq!(
        fetch(&url(&a, "/q/1"), &[]).await.header("x-cache"),
        Some("HIT")
    );
    assert_eq!(counts.get("/q/1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_costs_no_request_and_l2_comes_back() {
    let mut redis = RedisServer::start();
    let (up, _) = counting_origin(Duration::ZERO, |_| 60).await;
    let gw = gateway(
        &Cfg::new(&[up.addr])
            .route(cache_route("ttl = \"300ms\""))
            .section(format!(
                "[redis]\nurl = \"{}\"\ntimeout = \"200ms\"\nretry_interval = \"300ms\"\n",
                redis.url()
            ))
            .build(),
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let base = url(&gw, "");
    let mut workers = Vec::new();
    for w in 0..4 {
        let (stop, sent, failed, base) = (stop.clone(), sent.clone(), failed.clone(), base.clone());
        workers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let g = fetch(&format!("{base}/k/{}", (w * 7 + i) % 10), &[]).await;
                sent.fetch_add(1, Ordering::SeqCst);
                if g.status != 200 {
                    failed.lock().unwrap().push((g.status, g.text()));
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart();
    // L2 comes back: new fills land in Redis again.
    wait_until(
        Duration::from_secs(20),
        "fills reach Redis after its restart",
        || async { redis.cmd(&["EXISTS", &format!("flashgate:cache:{{{HOST}/k/3}}:e")]) == ":1" },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    assert!(sent.load(Ordering::SeqCst) > 50);
    assert_eq!(failed.lock().unwrap().as_slice(), &[] as &[(u16, String)]);
    let admin = gw.admin_addr();
    assert!(metric(admin, "flashgate_cache_l2_errors_total").await > 0.0);
    assert_eq!(metric(admin, "flashgate_cache_l2_up").await, 1.0);
}

#[tokio::test]
async fn dead_lock_owner_holds_the_others_only_until_the_lock_expires() {
    let redis = RedisServer::start();
    let (up, counts) = counting_origin(Duration::ZERO, |_| 60).await;
    let gw = gateway(
        &Cfg::new(&[up.addr])
            .route(cache_route("ttl = \"60s\""))
            .section(format!(
                "[cache]\nlock_wait = \"20s\"\nlock_ttl = \"30s\"\n[redis]\nurl = \"{}\"\n",
                redis.url()
            ))
            .build(),
    )
    .await;
    // A gateway that took the lock and died: its lock expires by itself.
    let lock = format!("flashgate:cache:{{{HOST}/orphan}}:l");
    assert_eq!(
        redis.cmd(&["SET", &lock, "dead-gateway", "PX", "1500"]),
        "+OK"
    );
    let started = Instant::now();
    let base = format!("http://{}", gw.addr("public").unwrap());
    let answers = stampede(&[base], "/orphan", 20).await;
    assert!(answers
        .iter()
        .all(|g| g.status == 200 && g.text() == "/orphan #1"));
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "the waiters respected the dead owner's lock until it expired"
    );
    assert_eq!(counts.get("/orphan"), 1);
    assert_eq!(
        metric(
            gw.admin_addr(),
            "flashgate_cache_lock_waits_total{result=\"took_over\"}"
        )
        .await,
        1.0
    );
    // The lock we took was released by us: the fill releases it right
    // after it answered the waiters, so this polls (a busy machine can
    // run the test first); its own 30s TTL would outlast the wait.
    wait_until(
        Duration::from_secs(10),
        "our fill lock released",
        || async { redis.cmd(&["EXISTS", &lock]) == ":0" },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_l2_is_shared_locked_and_purged() {
    let cluster = RedisCluster::start();
    let seeds: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let (up, counts) =
        counting_origin(Duration::from_millis(200), |n| if n == 1 { 1 } else { 60 }).await;
    let cfg = Cfg::new(&[up.addr])
        .upstream("max_concurrent_requests = 4096")
        .route(cache_route("ttl = \"60s\", honour_origin = true"))
        .section(format!(
            "[redis]\ncluster = [{}]\ntimeout = \"1s\"\n",
            seeds.join(", ")
        ))
        .build();
    let a = gateway(&cfg).await;
    let b = gateway(&cfg).await;
    // Keys over several slots.
    for i in 0..6 {
        let p = format!("/c/{i}");
        assert_eq!(
            fetch(&url(&a, &p), &[]).await.header("x-cache"),
            Some("MISS")
        );
        let from_l2 = fetch(&url(&b, &p), &[]).await;
        assert_eq!(
            from_l2.header("x-cache"),
            Some("HIT"),
            "{p} from the cluster"
        );
        assert_eq!(counts.get(&p), 1);
    }
    // Stampede over both gateways as /c/0 expires (max-age=1).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let bases = [
        format!("http://{}", a.addr("public").unwrap()),
        format!("http://{}", b.addr("public").unwrap()),
    ];
    let answers = stampede(&bases, "/c/0", 200).await;
    assert!(answers.iter().all(|g| g.status == 200));
    assert_eq!(counts.get("/c/0"), 2);
    // The others expired too (their first answer said max-age=1): fill
    // them again, for 60s, through A and B's L1.
    for i in 1..6 {
        let p = format!("/c/{i}");
        assert_eq!(
            fetch(&url(&a, &p), &[]).await.header("x-cache"),
            Some("MISS")
        );
        assert_eq!(
            fetch(&url(&b, &p), &[]).await.header("x-cache"),
            Some("HIT")
        );
    }
    // Prefix purge over every master, seen by the other gateway.
    let purged = purge(a.admin_addr(), "{\"prefix\": \"shop.test/c/\"}").await;
    assert_eq!(purged.status, 200);
    assert_eq!(purged.json()["purged"]["l2"], 6, "{}", purged.text());
    wait_until(
        Duration::from_secs(5),
        "B dropped its L1 copies on the prefix purge message",
        || async { fetch(&url(&b, "/c/5"), &[]).await.header("x-cache") == Some("MISS") },
    )
    .await;
}

#[tokio::test]
async fn reload_keeps_the_cache() {
    let (up, counts) = counting_origin(Duration::ZERO, |_| 60).await;
    let dir = TempDir::new("cache-reload");
    let path = dir.0.join("gw.toml");
    let text = Cfg::new(&[up.addr])
        .route(cache_route("ttl = \"60s\""))
        .build();
    std::fs::write(&path, &text).unwrap();
    let gw = Gateway::start(Config::parse(&text).unwrap(), Some(path.clone()))
        .await
        .unwrap();
    assert_eq!(
        fetch(&url(&gw, "/r"), &[]).await.header("x-cache"),
        Some("MISS")
    );
    // A route change (a new route) reloads; the cache section is the same.
    std::fs::write(
        &path,
        format!("{text}\n[[routes]]\nname = \"other\"\npath_prefix = \"/other\"\nupstream = \"origin\"\n"),
    )
    .unwrap();
    let reloaded = send(
        Request::post(format!("http://{}/admin/reload", gw.admin_addr()))
            .header("authorization", "Bearer test-token")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reloaded.status, 200, "{}", reloaded.text());
    assert_eq!(
        fetch(&url(&gw, "/r"), &[]).await.header("x-cache"),
        Some("HIT")
    );
    assert_eq!(counts.get("/r"), 1);
}

#[tokio::test]
async fn demo_config_caches_catalog_pages() {
    let config = gateway::demo::DEMO_CONFIG;
    let parsed = Config::parse(config).expect("demo config valid");
    let cached: Vec<_> = parsed
        .routes
        .iter()
        .filter(|r| r.cache.is_some())
        .map(|r| r.path_prefix.as_str())
        .collect();
    assert!(
        cached.contains(&"/products") && cached.contains(&"/shop"),
        "{cached:?}"
    );
    assert!(parsed.redis.is_none(), "the demo has no Redis: L1 only");
}

#[tokio::test]
async fn head_is_answered_from_the_get_entry_and_never_fills() {
    let (up, counts) = counting_origin(Duration::ZERO, |_| 60).await;
    let gw = gateway(
        &Cfg::new(&[up.addr])
            .route(cache_route("ttl = \"60s\""))
            .build(),
    )
    .await;
    let head = |path: &str| {
        send(
            Request::head(url(&gw, path))
                .header("host", HOST)
                .body(empty())
                .unwrap(),
        )
    };
    // A HEAD miss goes to the origin and stores nothing.
    let miss = head("/h").await;
    assert_eq!(miss.header("x-cache"), Some("MISS"));
    assert_eq!(
        fetch(&url(&gw, "/h"), &[]).await.header("x-cache"),
        Some("MISS")
    );
    assert_eq!(fetch(&url(&gw, "/h"), &[]).await.text(), "/h #2");
    // Once GET stored it, HEAD is a hit with the stored length and no body.
    let hit = head("/h").await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_eq!(hit.header("content-length"), Some("5"));
    assert!(hit.body.is_empty());
    assert_eq!(counts.get("/h"), 2);
}

#[tokio::test]
async fn gateway_starts_and_caches_in_process_while_redis_is_unreachable() {
    let (up, counts) = counting_origin(Duration::ZERO, |_| 60).await;
    let nowhere = closed_port().await;
    let gw = gateway(
        &Cfg::new(&[up.addr])
            .route(cache_route("ttl = \"60s\""))
            .section(format!(
                "[redis]\nurl = \"redis://{nowhere}/\"\ntimeout = \"200ms\"\n"
            ))
            .build(),
    )
    .await;
    assert_eq!(
        fetch(&url(&gw, "/x"), &[]).await.header("x-cache"),
        Some("MISS")
    );
    let hit = fetch(&url(&gw, "/x"), &[]).await;
    assert_eq!((hit.status, hit.header("x-cache")), (200, Some("HIT")));
    assert_eq!(counts.get("/x"), 1);
    let admin = gw.admin_addr();
    assert_eq!(metric(admin, "flashgate_cache_l2_up").await, 0.0);
    assert!(metric(admin, "flashgate_cache_l2_errors_total").await >= 1.0);
    // A purge still works on L1 and says Redis was not reached.
    let purged = purge(admin, "{\"key\": \"shop.test/x\"}").await;
    assert_eq!(purged.status, 200);
    assert_eq!(purged.json()["l2_reached"], false);
    assert_eq!(purged.json()["purged"]["l1"], 1);
}

#[tokio::test]
async fn a_conditional_request_fills_with_the_full_answer() {
    // An origin that honours If-None-Match: a fill started by a client
    // with a validator must still store (and share) the full 200.
    let counts = Counts::default();
    let c = counts.clone();
    let up = Upstream::start(move |req: Request<Incoming>| {
        let c = c.clone();
        async move {
            c.hit(&path_of(&req));
            tokio::time::sleep(Duration::from_millis(100)).await;
            if req.headers().contains_key("if-none-match") || req.headers().contains_key("range") {
                return reply(304, "");
            }
            let mut r = reply(200, "full page");
            r.headers_mut().insert("etag", "\"v1\"".parse().unwrap());
            r
        }
    })
    .await;
    let gw = gateway(
        &Cfg::new(&[up.addr])
            .route(cache_route("ttl = \"60s\""))
            .build(),
    )
    .await;
    let first = fetch(&url(&gw, "/c"), &[("if-none-match", "\"v1\"")]).await;
    assert_eq!((first.status, first.text().as_str()), (200, "full page"));
    let next = fetch(&url(&gw, "/c"), &[]).await;
    assert_eq!((next.status, next.text().as_str()), (200, "full page"));
    assert_eq!(next.header("x-cache"), Some("HIT"));
    let ranged = fetch(&url(&gw, "/c"), &[("range", "bytes=0-3")]).await;
    assert_eq!((ranged.status, ranged.text().as_str()), (200, "full page"));
    assert_eq!(counts.get("/c"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_copy_from_l2_is_not_shared_with_waiters_of_another_variant() {
    // Gateway B has nothing in L1, so a German and a French request both
    // join the fill of the base key; the stale German copy its L2 lookup
    // finds (kept for stale-if-error while the origin fails) answers the
    // German request only.
    let redis = RedisServer::start();
    let counts = Counts::default();
    let c = counts.clone();
    let up = Upstream::start(move |req: Request<Incoming>| {
        let c = c.clone();
        async move {
            let n = c.hit(&path_of(&req));
            let status = if n > 1 {
                // Later fills are slow, and fail: the flight stays open.
                tokio::time::sleep(Duration::from_millis(1000)).await;
                500
            } else {
                200
            };
            let lang = req
                .headers()
                .get("accept-language")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let mut r = reply(status, format!("lang={lang} #{n}"));
            r.headers_mut()
                .insert("vary", "Accept-Language".parse().unwrap());
            r
        }
    })
    .await;
    let cfg = Cfg::new(&[up.addr])
        .route(cache_route("ttl = \"1s\", stale_if_error = \"60s\""))
        .section(format!("[redis]\nurl = \"{}\"\n", redis.url()))
        .build();
    let a = gateway(&cfg).await;
    let b = gateway(&cfg).await;
    let de = fetch(&url(&a, "/v"), &[("accept-language", "de")]).await;
    assert_eq!(de.text(), "lang=de #1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let de_url = url(&b, "/v");
    let de = tokio::spawn(async move { fetch(&de_url, &[("accept-language", "de")]).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let fr = fetch(&url(&b, "/v"), &[("accept-language", "fr")]).await;
    assert!(
        fr.text().starts_with("lang=fr"),
        "the French request got {:?} ({:?})",
        fr.text(),
        fr.header("x-cache")
    );
    let de = de.await.unwrap();
    assert_eq!(de.text(), "lang=de #1");
    assert_eq!(de.header("x-cache"), Some("STALE"));
}

#[tokio::test]
async fn an_origin_age_counts_in_the_age_served_and_in_the_origin_lifetime() {
    // The origin sits behind another cache: its answer is already 100s
    // old, and fresh for one more second.
    let up = Upstream::start(|_req: Request<Incoming>| async move {
        let mut r = reply(200, "aged");
        r.headers_mut()
            .insert("cache-control", "max-age=101".parse().unwrap());
        r.headers_mut().insert("age", "100".parse().unwrap());
        r
    })
    .await;
    let gw = gateway(
        &Cfg::new(&[up.addr])
            .route(cache_route("ttl = \"60s\", honour_origin = true"))
            .build(),
    )
    .await;
    assert_eq!(
        fetch(&url(&gw, "/aged"), &[]).await.header("x-cache"),
        Some("MISS")
    );
    let hit = fetch(&url(&gw, "/aged"), &[]).await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    let age: u64 = hit.header("age").unwrap().parse().unwrap();
    assert!((100..=101).contains(&age), "age {age}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        fetch(&url(&gw, "/aged"), &[]).await.header("x-cache"),
        Some("MISS"),
        "fresh past the origin's max-age"
    );
}

#[tokio::test]
async fn a_client_that_goes_away_does_not_cancel_the_fill() {
    let (up, counts) = counting_origin(Duration::from_millis(500), |_| 60).await;
    let gw = gateway(
        &Cfg::new(&[up.addr])
            .route(cache_route("ttl = \"60s\""))
            .build(),
    )
    .await;
    let u = url(&gw, "/gone");
    let gone = tokio::time::timeout(Duration::from_millis(100), fetch(&u, &[])).await;
    assert!(gone.is_err(), "the client gave up first");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let next = fetch(&url(&gw, "/gone"), &[]).await;
    assert_eq!(
        (next.text().as_str(), next.header("x-cache")),
        ("/gone #1", Some("HIT"))
    );
    assert_eq!(counts.get("/gone"), 1);
}
