//! The edge's answers to hostile clients, each probe as an attacker sends
//! it (raw sockets, an HTTP/2 client): Host tricks that would poison the
//! cache or reach another origin, transfer codings the gateway cannot
//! decode, encoded slashes that hide a path, oversized HTTP/2 header
//! lists, and clients that read, send or open windows too slowly to ever
//! finish. Each is refused or cut, and the upstream never sees it.

use flashgate_tests::{edge, gateway, h2_client, raw, send_with, Upstream};
use http::Request;

/// Sends `head` (a whole request) on a new connection and returns the
/// status of the answer.
async fn status_of(addr: std::net::SocketAddr, head: &str) -> Option<u16> {
    raw::status(&raw::exchange(addr, head.as_bytes()).await)
}

#[tokio::test]
async fn host_tricks_get_400_and_never_reach_the_origin() {
    let echo = Upstream::echo().await;
    let gw = gateway(&edge::config(echo.addr, "", "")).await;
    let addr = gw.addr("public").unwrap();
    let probes = [
        // Two Hosts: route and cache key would take one, the origin maybe the other.
        "GET / HTTP/1.1\r\nhost: shop.example\r\nhost: evil.example\r\nconnection: close\r\n\r\n",
        // HTTP/1.1 without Host (RFC 9112 section 3.2).
        "GET / HTTP/1.1\r\nconnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nhost:\r\nconnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: a b\r\nconnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: evil.example/x?@probe\r\nconnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: user@shop.example\r\nconnection: close\r\n\r\n",
        // Userinfo in an absolute-form target.
        "GET http://user:pw@shop.example/ HTTP/1.1\r\nhost: shop.example\r\nconnection: close\r\n\r\n",
    ];
    for probe in probes {
        assert_eq!(status_of(addr, probe).await, Some(400), "{probe:?}");
    }
    assert_eq!(echo.hits(), 0, "a refused Host reached the origin");

    // Absolute-form: the target's authority is the Host the origin gets,
    // whatever the Host field said.
    let out = raw::exchange(
        addr,
        b"GET http://shop.example/x HTTP/1.1\r\nhost: other.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw::status(&out), Some(200), "{out}");
    assert_eq!(raw::json_body(&out)["headers"]["host"], "shop.example");
    // HTTP/1.0 may omit Host.
    let out = raw::exchange(addr, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert!(
        out.starts_with("HTTP/1.") && out[9..].starts_with("200"),
        "{out}"
    );
}

#[tokio::test]
async fn http2_host_must_agree_with_authority() {
    let echo = Upstream::echo().await;
    let gw = gateway(&edge::config(echo.addr, "", "")).await;
    let base = format!("http://{}", gw.addr("public").unwrap());
    let h2 = h2_client();
    let got = send_with(
        &h2,
        Request::get(format!("{base}/x"))
            .header("host", "evil.example")
            .body(flashgate_tests::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 400, "{}", got.text());
    assert_eq!(got.json()["error"], "bad_host");
    // Without a conflicting field the origin gets :authority as Host.
    let got = send_with(
        &h2,
        Request::get(format!("{base}/x"))
            .body(flashgate_tests::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        got.json()["headers"]["host"],
        gw.addr("public").unwrap().to_string()
    );
    assert_eq!(echo.hits(), 1);
}

#[tokio::test]
async fn transfer_codings_other_than_chunked_get_501() {
    let echo = Upstream::echo().await;
    let gw = gateway(&edge::config(echo.addr, "", "")).await;
    let addr = gw.addr("public").unwrap();
    let out = raw::exchange(
        addr,
        b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(raw::status(&out), Some(501), "{out}");
    assert!(
        out.contains("unsupported_transfer_coding"),
        "the answer names the cause: {out}"
    );
    // Plain chunked still goes through.
    let out = raw::exchange(
        addr,
        b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(raw::status(&out), Some(200), "{out}");
    assert_eq!(echo.hits(), 1);
}

#[tokio::test]
async fn encoded_slashes_get_400_unless_the_route_keeps_them() {
    let echo = Upstream::echo().await;
    let strict = gateway(&edge::config(echo.addr, "", "")).await;
    let addr = strict.addr("public").unwrap();
    for path in [
        "/products/%2e%2e%2fadmin",
        "/a/..%2fadmin",
        "/a/..%2Fadmin",
        "/a%5c..%5cadmin",
    ] {
        let out = raw::exchange(
            addr,
            format!("GET {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(raw::status(&out), Some(400), "{path}: {out}");
        assert_eq!(raw::json_body(&out)["error"], "escaped_slash", "{path}");
    }
    assert_eq!(echo.hits(), 0);

    let keep = gateway(&edge::config(echo.addr, "", "escaped_slashes = \"keep\"")).await;
    let out = raw::exchange(
        keep.addr("public").unwrap(),
        b"GET /files/a%2Fb HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw::status(&out), Some(200), "{out}");
    assert_eq!(raw::json_body(&out)["path"], "/files/a%2Fb");
}

#[tokio::test]
async fn http2_oversized_header_list_gets_431_not_a_retryable_reset() {
    let echo = Upstream::echo().await;
    let gw = gateway(&edge::config(echo.addr, "max_header_bytes = \"8KiB\"", "")).await;
    let base = format!("http://{}", gw.addr("public").unwrap());
    let got = send_with(
        &h2_client(),
        Request::get(format!("{base}/x"))
            .header("x-big", "a".repeat(10 * 1024))
            .body(flashgate_tests::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 431, "{}", got.text());
    assert_eq!(echo.hits(), 0);
}

/// An origin with one big answer (`/big`, 4 MiB) and a small one.
async fn big_and_small() -> Upstream {
    Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/big" {
            flashgate_tests::reply(200, vec![b'x'; 4 << 20])
        } else {
            flashgate_tests::reply(200, "small")
        }
    })
    .await
}

/// Config with one cluster of `slots` upstream slots, `listener` and
/// `route` keys added.
fn slots_config(origin: std::net::SocketAddr, slots: usize, listener: &str, route: &str) -> String {
    edge::config(origin, listener, route).replace(
        &format!("endpoints = [\"{origin}\"]"),
        &format!("endpoints = [\"{origin}\"]\nmax_concurrent_requests = {slots}"),
    )
}

/// Whether the cluster's endpoint has no request in flight (its slot
/// given back).
async fn upstream_idle(admin: std::net::SocketAddr) -> bool {
    let status = flashgate_tests::get(&format!("http://{admin}/admin/status"))
        .await
        .json();
    status["clusters"][0]["endpoints"][0]["in_flight"] == 0
}

/// Waits until the cluster's slot is back and `n` answers have gone to
/// temp files in all: the attacker's answer is read ahead, not held.
async fn slot_back_and_spooled(admin: std::net::SocketAddr, n: u32) {
    flashgate_tests::wait_until(
        std::time::Duration::from_secs(30),
        "the upstream slot given back",
        || upstream_idle(admin),
    )
    .await;
    flashgate_tests::wait_until(
        std::time::Duration::from_secs(30),
        &format!("answer {n} read ahead into a temp file"),
        || async move {
            flashgate_tests::metric(
                admin,
                "flashgate_bodies_spooled_total{direction=\"response\",to=\"file\"}",
            )
            .await
                >= f64::from(n)
        },
    )
    .await;
}

/// Waits until every temp file of the spools is gone.
async fn temp_bytes_given_back(admin: std::net::SocketAddr) {
    flashgate_tests::wait_until(
        std::time::Duration::from_secs(30),
        "temp bytes given back",
        || async { flashgate_tests::metric(admin, "flashgate_spool_temp_bytes").await == 0.0 },
    )
    .await;
}

/// `n` ordinary requests from another client, every one answered 200.
async fn others_are_served(addr: std::net::SocketAddr, n: usize) {
    let client = flashgate_tests::client();
    for i in 0..n {
        let got = send_with(
            &client,
            Request::get(format!("http://{addr}/small"))
                .body(flashgate_tests::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 200, "request {i}: {}", got.text());
    }
}

/// A client that asks for `path` with a tiny receive buffer and never
/// reads the answer.
async fn never_reads(addr: std::net::SocketAddr, path: &str) -> tokio::net::TcpStream {
    never_reads_with(addr, path, "").await
}

/// [`never_reads`] with extra header lines (each ending in CRLF).
async fn never_reads_with(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &str,
) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        format!("GET {path} HTTP/1.1\r\nhost: a\r\n{headers}\r\n").as_bytes(),
    )
    .await
    .unwrap();
    s
}

/// Slow read: clients that never read a big answer hold no upstream slot
/// (the answer is read into the spool at the upstream's pace), other
/// clients are served meanwhile, and `send_timeout` cuts the readers.
#[tokio::test]
async fn slow_readers_hold_no_upstream_slot_and_are_cut_by_send_timeout() {
    let origin = big_and_small().await;
    let gw = gateway(&slots_config(origin.addr, 2, "send_timeout = \"2s\"", "")).await;
    let addr = gw.addr("public").unwrap();
    let admin = gw.admin_addr();
    // Six readers, one after another, on a cluster of two slots: each
    // answer goes to a temp file (4 MiB is far above the memory bound)
    // and its slot comes back, so every next reader gets a slot too.
    let mut attackers = Vec::new();
    for n in 1..=6 {
        attackers.push(never_reads(addr, "/big").await);
        slot_back_and_spooled(admin, n).await;
    }
    others_are_served(addr, 50).await;
    // The readers are cut once their writes have waited send_timeout
    // (counted first: reading here would let their writes go through).
    flashgate_tests::wait_until(
        std::time::Duration::from_secs(60),
        "send_timeout counted for the readers",
        || async {
            flashgate_tests::metric(
                admin,
                "flashgate_connection_timeouts_total{listener=\"public\",timeout=\"send\"}",
            )
            .await
                >= 6.0
        },
    )
    .await;
    for (i, s) in attackers.iter_mut().enumerate() {
        assert!(
            raw::closed_within(s, std::time::Duration::from_secs(30)).await,
            "attacker {i} still connected after its send timeout"
        );
    }
    temp_bytes_given_back(admin).await;
}

/// Slow request bodies: a client that sends a body slowly holds no
/// upstream slot (the body is read in first), and one that stalls gets
/// 408 after `body_read_timeout`.
#[tokio::test]
async fn slow_request_bodies_hold_no_upstream_slot() {
    let echo = Upstream::echo().await;
    let gw = gateway(&slots_config(
        echo.addr,
        1,
        "body_read_timeout = \"2s\"",
        "",
    ))
    .await;
    let addr = gw.addr("public").unwrap();
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut s,
            b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 1000\r\n\r\nonly-a-little",
        )
        .await
        .unwrap();
        slow.push(s);
    }
    // The single upstream slot stays free for everyone else.
    let client = flashgate_tests::client();
    for i in 0..20 {
        let got = send_with(
            &client,
            Request::post(format!("http://{addr}/ok"))
                .body(flashgate_tests::full("a whole body"))
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 200, "request {i}: {}", got.text());
        assert_eq!(got.json()["body_len"], 12);
    }
    // The stalled bodies get 408 and their connections close.
    for s in &mut slow {
        let answer = raw::read_to_close(s, std::time::Duration::from_secs(30)).await;
        assert_eq!(raw::status(&answer), Some(408), "{answer}");
    }
    assert_eq!(echo.hits(), 20, "no stalled body reached the origin");
}

/// HTTP/2 zero window: streams whose windows the client never opens hold
/// no upstream slot (an HTTP/2 answer is read ahead at once), and are
/// reset after `stream_idle_timeout`.
#[tokio::test]
async fn http2_zero_window_streams_hold_no_slot_and_are_reset() {
    let origin = big_and_small().await;
    let gw = gateway(&slots_config(
        origin.addr,
        2,
        "stream_idle_timeout = \"2s\"",
        "",
    ))
    .await;
    let addr = gw.addr("public").unwrap();
    let admin = gw.admin_addr();
    let shut: flashgate_tests::HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .http2_initial_stream_window_size(0)
            .build_http();
    // Six streams on one connection, one after another, none ever read.
    let mut held = Vec::new();
    for n in 1..=6 {
        let resp = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            shut.request(
                Request::get(format!("http://{addr}/big"))
                    .body(flashgate_tests::empty())
                    .unwrap(),
            ),
        )
        .await
        .expect("head within 30s")
        .expect("a response head");
        assert_eq!(resp.status(), 200);
        held.push(resp);
        slot_back_and_spooled(admin, n).await;
    }
    others_are_served(addr, 50).await;
    flashgate_tests::wait_until(
        std::time::Duration::from_secs(60),
        "the six stalled streams reset by stream_idle_timeout",
        || async {
            flashgate_tests::metric(
                admin,
                "flashgate_connection_timeouts_total{listener=\"public\",timeout=\"stream_idle\"}",
            )
            .await
                >= 6.0
        },
    )
    .await;
    temp_bytes_given_back(admin).await;
    drop(held);
}

/// On a route that streams, one client (by its resolved address, here
/// from a trusted `x-forwarded-for`) holds at most its share of the
/// cluster's slots; others are served.
#[tokio::test]
async fn a_slow_client_gets_only_its_share_of_streaming_slots() {
    let origin = big_and_small().await;
    let cfg = slots_config(
        origin.addr,
        4,
        "trusted_proxies = [\"127.0.0.1/32\"]",
        "buffer_responses = false",
    )
    .replace(
        "max_concurrent_requests = 4",
        "max_concurrent_requests = 4\nmax_streaming_per_client = 2",
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("public").unwrap();
    let attacker = "x-forwarded-for: 192.0.2.66\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(never_reads_with(addr, "/big", attacker).await);
    }
    let admin = gw.admin_addr();
    flashgate_tests::wait_until(
        std::time::Duration::from_secs(30),
        "the two streaming reads hold their slots",
        || async move {
            let status = flashgate_tests::get(&format!("http://{admin}/admin/status"))
                .await
                .json();
            status["clusters"][0]["endpoints"][0]["in_flight"] == 2
        },
    )
    .await;
    // A third from the same client is refused at once.
    let out = raw::exchange(
        addr,
        format!("GET /big HTTP/1.1\r\nhost: a\r\n{attacker}connection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(
        raw::status(&out),
        Some(429),
        "{}",
        &out[..out.len().min(300)]
    );
    assert!(
        out.contains("client_share"),
        "{}",
        &out[..out.len().min(300)]
    );
    // Everyone else gets the remaining slots.
    let client = flashgate_tests::client();
    for i in 0..30 {
        let got = send_with(
            &client,
            Request::get(format!("http://{addr}/small"))
                .header("x-forwarded-for", format!("198.51.100.{}", i % 5 + 1))
                .body(flashgate_tests::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 200, "request {i}: {}", got.text());
    }
    drop(held);
}
