//! Upstream behaviour end to end: load balancing, health checks, outlier
//! ejection, retries, and the 502/503/504 answers with their causes.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flashgate_tests::*;
use http::Request;
use tokio::io::AsyncReadExt;

/// An upstream that counts traffic apart from health probes, answers
/// `/healthz` with 200 or 503 as `sick` says, and everything else with
/// `status` after `delay`.
struct Probed {
    up: Upstream,
    traffic: Arc<AtomicUsize>,
    sick: Arc<AtomicBool>,
}

async fn probed(status: u16, delay: Duration) -> Probed {
    let traffic = Arc::new(AtomicUsize::new(0));
    let sick = Arc::new(AtomicBool::new(false));
    let (t, s) = (traffic.clone(), sick.clone());
    let up = Upstream::start(move |req: http::Request<hyper::body::Incoming>| {
        let (t, s) = (t.clone(), s.clone());
        async move {
            if req.uri().path() == "/healthz" {
                return reply(if s.load(Ordering::SeqCst) { 503 } else { 200 }, "");
            }
            t.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            reply(status, "x")
        }
    })
    .await;
    Probed { up, traffic, sick }
}

impl Probed {
    fn traffic(&self) -> usize {
        self.traffic.load(Ordering::SeqCst)
    }
}

fn url(gw: &Gateway, path: &str) -> String {
    format!("http://{}{path}", gw.addr("public").unwrap())
}

#[tokio::test]
async fn round_robin_spreads_evenly() {
    let ups = [
        Upstream::fixed("a").await,
        Upstream::fixed("b").await,
        Upstream::fixed("c").await,
    ];
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let gw = gateway(&Cfg::new(&addrs).upstream("lb = \"round_robin\"").build()).await;
    for _ in 0..30 {
        assert_eq!(get(&url(&gw, "/")).await.status, 200);
    }
    let hits: Vec<_> = ups.iter().map(|u| u.hits()).collect();
    assert_eq!(hits, [10, 10, 10]);
}

#[tokio::test]
async fn least_request_steers_away_from_a_slow_endpoint() {
    let slow = probed(200, Duration::from_millis(300)).await;
    let fast = probed(200, Duration::ZERO).await;
    let gw = Arc::new(
        gateway(
            &Cfg::new(&[slow.up.addr, fast.up.addr])
                .upstream("lb = \"least_request\"")
                .build(),
        )
        .await,
    );
    // 8 clients, 15 requests each: round robin would send half to `slow`.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let u = url(&gw, "/");
        tasks.push(tokio::spawn(async move {
            for _ in 0..15 {
                assert_eq!(get(&u).await.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (s, f) = (slow.traffic(), fast.traffic());
    assert_eq!(s + f, 120);
    assert!(s * 4 < s + f, "slow endpoint got {s} of {} requests", s + f);
}

#[tokio::test]
async fn health_checks_take_an_endpoint_out_and_bring_it_back() {
    let a = probed(200, Duration::ZERO).await;
    let b = probed(200, Duration::ZERO).await;
    let gw = gateway(
        &Cfg::new(&[a.up.addr, b.up.addr])
            .upstream(
                "[upstreams.health]\npath = \"/healthz\"\ninterval = \"50ms\"\ntimeout = \"200ms\"\n\
                 healthy_threshold = 2\nunhealthy_threshold = 2",
            )
            .build(),
    )
    .await;
    let admin = gw.admin_addr();
    let healthy = |i: usize| async move {
        let s = get(&format!("http://{admin}/admin/status")).await.json();
        s["clusters"][0]["endpoints"][i]["healthy"]
            .as_bool()
            .unwrap()
    };

    a.sick.store(true, Ordering::SeqCst);
    wait_until(Duration::from_secs(5), "a marked unhealthy", || async {
        !healthy(0).await
    })
    .await;
    assert_eq!(
        metric(
            admin,
            &format!(
                "flashgate_upstream_endpoint_healthy{{cluster=\"origin\",endpoint=\"{}\"}}",
                a.up.addr
            )
        )
        .await,
        0.0
    );
    let before = a.traffic();
    for _ in 0..20 {
        assert_eq!(get(&url(&gw, "/")).await.status, 200);
    }
    assert_eq!(a.traffic(), before, "no traffic to an unhealthy endpoint");

    a.sick.store(false, Ordering::SeqCst);
    wait_until(Duration::from_secs(5), "a back", || async {
        healthy(0).await
    })
    .await;
    for _ in 0..20 {
        assert_eq!(get(&url(&gw, "/")).await.status, 200);
    }
    assert_eq!(a.traffic(), before + 10, "round robin again");
}

#[tokio::test]
async fn consecutive_5xx_eject_an_endpoint() {
    let bad = probed(500, Duration::ZERO).await;
    let good = probed(200, Duration::ZERO).await;
    let gw = gateway(
        &Cfg::new(&[bad.up.addr, good.up.addr])
            .upstream("retries = 0")
            .upstream("[upstreams.outlier]\nconsecutive_failures = 3\nbase_ejection = \"30s\"")
            .build(),
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(get(&url(&gw, "/")).await.status);
    }
    // Round robin: bad, good, bad, good, bad -> ejected after its third 500.
    assert_eq!(bad.traffic(), 3);
    assert_eq!(statuses.iter().filter(|&&s| s == 500).count(), 3);
    assert_eq!(good.traffic(), 17);
    let admin = gw.admin_addr();
    assert_eq!(
        metric(admin, "flashgate_upstream_ejections_total").await,
        1.0
    );
    assert_eq!(
        metric(
            admin,
            &format!(
                "flashgate_upstream_endpoint_ejected{{cluster=\"origin\",endpoint=\"{}\"}}",
                bad.up.addr
            )
        )
        .await,
        1.0
    );
    let status = get(&format!("http://{admin}/admin/status")).await.json();
    assert_eq!(status["clusters"][0]["endpoints"][0]["ejected"], true);
}

/// An endpoint that accepts, reads the request, and closes without an
/// answer: a reset before any response.
async fn resetting_endpoint() -> (
    std::net::SocketAddr,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                if let Ok(n) = sock.read(&mut buf).await {
                    if n > 0 {
                        s.fetch_add(1, Ordering::SeqCst);
                    }
                }
                drop(sock);
            });
        }
    });
    (addr, seen, task)
}

#[tokio::test]
async fn retries_only_idempotent_bodiless_requests() {
    let (broken, broken_seen, _task) = resetting_endpoint().await;
    let good = probed(200, Duration::ZERO).await;
    let gw = gateway(
        &Cfg::new(&[broken, good.up.addr])
            .upstream("retries = 1\n[upstreams.outlier]\nconsecutive_failures = 0")
            .build(),
    )
    .await;

    // GETs: every one that hit the broken endpoint is retried on the good one.
    for _ in 0..6 {
        assert_eq!(get(&url(&gw, "/")).await.status, 200);
    }
    let gets_on_broken = broken_seen.load(Ordering::SeqCst);
    assert!(
        gets_on_broken >= 3,
        "round robin sent GETs to the broken endpoint: {gets_on_broken}"
    );
    assert_eq!(good.traffic(), 6);
    let admin = gw.admin_addr();
    assert_eq!(
        metric(admin, "flashgate_upstream_retries_total").await as usize,
        gets_on_broken
    );

    // POSTs with a body: never retried; the broken endpoint's share is a 502.
    let mut codes = Vec::new();
    for _ in 0..4 {
        let got = send(
            Request::post(url(&gw, "/order"))
                .body(full("{\"sku\":1}"))
                .unwrap(),
        )
        .await;
        if got.status == 502 {
            assert_eq!(got.header("x-flashgate-error"), Some("upstream_reset"));
            assert_eq!(got.json()["error"], "upstream_reset");
        }
        codes.push(got.status);
    }
    let failed = codes.iter().filter(|&&c| c == 502).count();
    assert_eq!(failed, 2, "{codes:?}");
    assert_eq!(good.traffic(), 6 + 2, "no POST was sent twice");
    assert_eq!(
        metric(admin, "flashgate_upstream_retries_total").await as usize,
        gets_on_broken
    );
}

#[tokio::test]
async fn connect_refused_is_502() {
    let dead = closed_port().await;
    let gw = gateway(&Cfg::new(&[dead]).build()).await;
    let got = get(&url(&gw, "/")).await;
    assert_eq!(got.status, 502);
    assert_eq!(got.header("x-flashgate-error"), Some("connect_refused"));
    assert_eq!(got.json()["error"], "connect_refused");
    assert!(got.json()["request_id"].as_str().unwrap().len() == 32);
    let admin = gw.admin_addr();
    assert!(
        metric(
            admin,
            "flashgate_upstream_errors_total{cause=\"connect_refused\",cluster=\"origin\"}"
        )
        .await
            >= 1.0
    );
    assert_eq!(
        metric(
            admin,
            "flashgate_requests_total{route=\"default\",status=\"502\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn slow_upstream_is_504_and_not_retried() {
    let slow = probed(200, Duration::from_secs(3)).await;
    let gw = gateway(
        &Cfg::new(&[slow.up.addr])
            .upstream("connect_timeout = \"100ms\"\nrequest_timeout = \"300ms\"\nretries = 2")
            .build(),
    )
    .await;
    let started = std::time::Instant::now();
    let got = get(&url(&gw, "/")).await;
    assert_eq!(got.status, 504);
    assert_eq!(got.header("x-flashgate-error"), Some("upstream_timeout"));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered at the timeout, not after the upstream"
    );
    assert_eq!(slow.traffic(), 1, "a timeout is not retried");
}

#[tokio::test]
async fn cluster_concurrency_limit_is_503_with_retry_after() {
    let slow = probed(200, Duration::from_millis(500)).await;
    let gw = gateway(
        &Cfg::new(&[slow.up.addr])
            .upstream("max_concurrent_requests = 2")
            .build(),
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let u = url(&gw, "/");
        tasks.push(tokio::spawn(async move { get(&u).await }));
    }
    let mut ok = 0;
    let mut overflow = 0;
    for t in tasks {
        let got = t.await.unwrap();
        match got.status {
            200 => ok += 1,
            503 => {
                assert_eq!(got.header("retry-after"), Some("1"));
                assert_eq!(got.header("x-flashgate-error"), Some("upstream_overflow"));
                overflow += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!((ok, overflow), (2, 3));
    assert_eq!(slow.traffic(), 2);
    // The slots come back when the responses are done.
    assert_eq!(get(&url(&gw, "/")).await.status, 200);
    assert_eq!(
        metric(gw.admin_addr(), "flashgate_upstream_overflow_total").await,
        3.0
    );
}

#[tokio::test]
async fn keep_alive_pool_is_reused_and_metrics_move() {
    let up = Upstream::fixed("pooled").await;
    let gw = gateway(&Cfg::new(&[up.addr]).build()).await;
    let c = client();
    for _ in 0..50 {
        let got = send_with(&c, Request::get(url(&gw, "/p")).body(empty()).unwrap()).await;
        assert_eq!(got.status, 200);
    }
    let admin = gw.admin_addr();
    assert_eq!(
        metric(admin, "flashgate_upstream_requests_total").await,
        50.0
    );
    assert_eq!(
        metric(admin, "flashgate_upstream_connections_total").await,
        1.0,
        "one upstream connection, reused"
    );
    assert_eq!(
        metric(
            admin,
            "flashgate_requests_total{route=\"default\",status=\"200\"}"
        )
        .await,
        50.0
    );
    assert_eq!(
        metric(
            admin,
            "flashgate_request_duration_seconds_count{route=\"default\"}"
        )
        .await,
        50.0
    );
    assert_eq!(
        metric(admin, "flashgate_connections_total{listener=\"public\"}").await,
        1.0
    );
}

#[tokio::test]
async fn a_failed_connect_is_retried_for_any_method() {
    let dead = closed_port().await;
    let good = probed(200, Duration::ZERO).await;
    let gw = gateway(
        &Cfg::new(&[dead, good.up.addr])
            .upstream("retries = 1\n[upstreams.outlier]\nconsecutive_failures = 0")
            .build(),
    )
    .await;
    // Nothing of a request is sent before its connect succeeds, so even a
    // POST with a body is safe to send to another endpoint.
    for _ in 0..4 {
        let got = send(
            Request::post(url(&gw, "/order"))
                .body(full("{\"sku\":1}"))
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 200);
    }
    assert_eq!(good.traffic(), 4);
    // Round robin: each retry advances the rotation too, so every request
    // tried the dead endpoint first (outlier ejection, off here, would
    // take it out of rotation).
    assert_eq!(
        metric(gw.admin_addr(), "flashgate_upstream_retries_total").await,
        4.0
    );
    let refused = "flashgate_upstream_errors_total{cause=\"connect_refused\",cluster=\"origin\"}";
    assert_eq!(metric(gw.admin_addr(), refused).await, 4.0);
}

/// An upstream that closes each keep-alive connection shortly after
/// answering (as servers with a short keep-alive timeout do): the next
/// request must not fail on the dead pooled connection.
#[tokio::test]
async fn a_pooled_connection_closed_by_the_upstream_is_not_an_error() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    let _server = tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                if sock.read(&mut buf).await.unwrap_or(0) > 0 {
                    let _ = sock
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // Closed while idle in the gateway's pool.
            });
        }
    });
    let gw = gateway(&Cfg::new(&[addr]).upstream("retries = 0").build()).await;
    for _ in 0..5 {
        let got = get(&url(&gw, "/")).await;
        assert_eq!((got.status, got.text().as_str()), (200, "ok"));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        5,
        "a fresh connection each time"
    );
}
