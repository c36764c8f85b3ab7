//! Client limits and malformed requests, with raw TCP clients where a real
//! client would refuse to send the request: each limit answers with its
//! status code, and nothing refused ever reaches the upstream.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flashgate_tests::{
    edge, gateway, h2_client, metric, raw, reply, send_with, wait_until, Upstream,
};
use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

const KEEP_ALIVE_GET: &[u8] = b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n";

/// An upstream that answers `ok`, after 1.5 s for paths under `/slow`.
async fn slow_on_request() -> Upstream {
    Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        if req.uri().path().starts_with("/slow") {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        reply(200, "ok")
    })
    .await
}

/// Sends `req` on a kept-alive connection and returns the status.
async fn request_on(s: &mut TcpStream, req: &[u8]) -> Option<u16> {
    s.write_all(req).await.ok()?;
    let text = raw::read_response(s, Duration::from_secs(10)).await?;
    raw::status(&text)
}

/// Writes one byte of a never-ending head every 200 ms until the server
/// closes; returns how long that took (`None`: still open after `within`).
async fn drip_until_closed(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    if s.write_all(b"GET / HTTP/1.1\r\nx-slow: ").await.is_err() {
        return Some(start.elapsed());
    }
    while start.elapsed() < within {
        if s.write_all(b"a").await.is_err()
            || raw::closed_within(s, Duration::from_millis(200)).await
        {
            return Some(start.elapsed());
        }
    }
    None
}

fn get_with_headers(n: usize, value_len: usize) -> Vec<u8> {
    let mut r = b"GET / HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n".to_vec();
    for i in 0..n {
        r.extend_from_slice(format!("x-h{i}: {}\r\n", "v".repeat(value_len)).as_bytes());
    }
    r.extend_from_slice(b"\r\n");
    r
}

#[tokio::test]
async fn header_count_header_bytes_and_uri_length() {
    let up = Upstream::fixed("ok").await;
    let gw = gateway(&edge::config(
        up.addr,
        "max_headers = 20\nmax_header_bytes = \"8KiB\"\nmax_uri_bytes = \"512B\"",
        "",
    ))
    .await;
    let addr = gw.addr("public").unwrap();
    // Within every limit.
    assert_eq!(
        raw::status(&raw::exchange(addr, &get_with_headers(10, 10)).await),
        Some(200)
    );
    // 30 fields: more than max_headers.
    let text = raw::exchange(addr, &get_with_headers(30, 10)).await;
    assert_eq!(raw::status(&text), Some(431), "{text}");
    // 10 fields of 1 KiB: a head above max_header_bytes.
    let text = raw::exchange(addr, &get_with_headers(10, 1024)).await;
    assert_eq!(raw::status(&text), Some(431), "{text}");
    // A 600-byte target: above max_uri_bytes.
    let long = format!(
        "GET /{} HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
        "a".repeat(600)
    );
    let text = raw::exchange(addr, long.as_bytes()).await;
    assert_eq!(raw::status(&text), Some(414), "{text}");
    assert!(text.contains("uri_too_long"), "{text}");
    assert_eq!(up.hits(), 1, "only the request within the limits went up");
}

#[tokio::test]
async fn body_limit_counts_declared_and_streamed_bytes() {
    let up = Upstream::echo().await;
    let gw = gateway(&edge::config(up.addr, "max_body = \"1KiB\"", "")).await;
    let addr = gw.addr("public").unwrap();
    let post = |headers: &str, body: &[u8]| {
        let mut r =
            format!("POST /upload HTTP/1.1\r\nHost: shop.test\r\n{headers}\r\n").into_bytes();
        r.extend_from_slice(body);
        r
    };
    // Within the limit, chunked.
    let ok = post(
        "Transfer-Encoding: chunked\r\nConnection: close\r\n",
        b"200\r\n"
            .iter()
            .copied()
            .chain(vec![b'a'; 512])
            .chain(*b"\r\n0\r\n\r\n")
            .collect::<Vec<_>>()
            .as_slice(),
    );
    let text = raw::exchange(addr, &ok).await;
    assert_eq!(raw::status(&text), Some(200), "{text}");
    assert_eq!(raw::json_body(&text)["body_len"], 512);
    let hits = up.hits();

    // Declared too large: refused before a byte of the body is read.
    let text = raw::exchange(addr, &post("Content-Length: 5000\r\n", b"")).await;
    assert_eq!(raw::status(&text), Some(413), "{text}");
    assert!(text.contains("body_too_large"));
    // Chunked, the first chunk already too large: refused before the
    // upstream is asked.
    let mut big = b"800\r\n".to_vec();
    big.extend_from_slice(&[b'b'; 0x800]);
    big.extend_from_slice(b"\r\n0\r\n\r\n");
    let text = raw::exchange(addr, &post("Transfer-Encoding: chunked\r\n", &big)).await;
    assert_eq!(raw::status(&text), Some(413), "{text}");
    assert_eq!(up.hits(), hits, "the upstream saw neither");

    // Chunked, over the limit only in its third chunk: counted as it
    // streams, answered 413 (the upstream saw the start of it).
    let mut body = Vec::new();
    for _ in 0..3 {
        body.extend_from_slice(b"200\r\n");
        body.extend_from_slice(&[b'c'; 0x200]);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let text = raw::exchange(addr, &post("Transfer-Encoding: chunked\r\n", &body)).await;
    assert_eq!(raw::status(&text), Some(413), "{text}");
}

#[tokio::test]
async fn malformed_and_smuggling_shapes_are_refused_never_forwarded() {
    let up = Upstream::echo().await;
    let gw = gateway(&edge::config(up.addr, "", "")).await;
    let addr = gw.addr("public").unwrap();
    let refused: &[(&str, &[u8])] = &[
        ("garbage request line", b"HELLO\r\n\r\n"),
        ("space in the target", b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n"),
        (
            "two different Content-Length",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        ),
        (
            "Content-Length not a number",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3x\r\n\r\nabc",
        ),
        (
            "obs-fold",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n  b\r\n\r\n",
        ),
        (
            "Transfer-Encoding other than chunked",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "bad chunk size",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "space before the colon",
            b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
        ),
    ];
    for (what, bytes) in refused {
        let text = raw::exchange(addr, bytes).await;
        assert_eq!(raw::status(&text), Some(400), "{what}: {text:?}");
    }
    assert_eq!(up.hits(), 0, "nothing refused reached the upstream");

    // Content-Length and Transfer-Encoding together, in either order:
    // 400 and closed, as Envoy and nginx answer; hyper alone would have
    // let chunked win. The bytes a smuggler hid behind the body never
    // become a request.
    for smuggle in [
        &b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\ncontent-length: 4\r\n\r\n\
3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let text = raw::exchange(addr, smuggle).await;
        assert_eq!(raw::status(&text), Some(400), "{text}");
        assert_eq!(raw::json_body(&text)["error"], "ambiguous_length", "{text}");
        assert!(!text.contains("/smuggled"), "{text}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(up.hits(), 0, "nothing reached the upstream");

    // On one keep-alive connection, a Content-Length request and then a
    // chunked one: each is judged by its own head.
    let two = b"POST /cl HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc";
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(two).await.unwrap();
    let first = raw::read_response(&mut s, Duration::from_secs(5))
        .await
        .expect("first answer");
    assert_eq!(raw::status(&first), Some(200), "{first}");
    s.write_all(
        b"POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let second = raw::read_response(&mut s, Duration::from_secs(5))
        .await
        .expect("second answer");
    assert_eq!(raw::status(&second), Some(200), "{second}");
    assert_eq!(raw::json_body(&second)["body_len"], 3);
    assert_eq!(up.hits(), 2);
}

/// A `Content-Length` past hyper's largest body (2^64 - 3) gets 400 and
/// a closed connection, like any other unreadable length, not hyper's
/// `431 Request Header Fields Too Large`; also when the value arrives in
/// pieces, and on a keep-alive connection's second request.
#[tokio::test]
async fn an_absurd_content_length_gets_400_not_431() {
    let up = Upstream::echo().await;
    let gw = gateway(&edge::config(up.addr, "", "")).await;
    let addr = gw.addr("public").unwrap();
    for value in [
        "18446744073709551615",
        "18446744073709551614",
        "000018446744073709551614",
    ] {
        let head = format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {value}\r\n\r\nabc");
        let text = raw::exchange(addr, head.as_bytes()).await;
        assert_eq!(raw::status(&text), Some(400), "{value}: {text:?}");
        // In pieces, split inside the value.
        let mut s = TcpStream::connect(addr).await.unwrap();
        let (a, b) = head.split_at(head.find(value).unwrap() + value.len() - 3);
        s.write_all(a.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(b.as_bytes()).await.unwrap();
        let text = raw::read_to_close(&mut s, Duration::from_secs(30)).await;
        assert_eq!(raw::status(&text), Some(400), "{value} in pieces: {text:?}");
    }
    // After a first request on the same connection.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /cl HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        .await
        .unwrap();
    let first = raw::read_response(&mut s, Duration::from_secs(5))
        .await
        .expect("first answer");
    assert_eq!(raw::status(&first), Some(200), "{first}");
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551615\r\n\r\n")
        .await
        .unwrap();
    let second = raw::read_to_close(&mut s, Duration::from_secs(30)).await;
    assert_eq!(raw::status(&second), Some(400), "{second:?}");
    // The largest length hyper reads is a length: the listener's
    // `max_body` refuses it with 413 before a byte of body is read.
    let text = raw::exchange(
        addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551613\r\n\r\n",
    )
    .await;
    assert_eq!(raw::status(&text), Some(413), "{text:?}");
    assert_eq!(up.hits(), 1, "only the first request reached the upstream");
}

#[tokio::test]
async fn slowloris_is_closed_while_others_are_served() {
    let up = Upstream::fixed("ok").await;
    let gw = gateway(&edge::config(up.addr, "header_read_timeout = \"1s\"", "")).await;
    let addr = gw.addr("public").unwrap();
    // 40 slow clients: half send a head one byte every 200 ms, half send
    // nothing at all.
    let mut slow = Vec::new();
    for i in 0..40 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 0 {
            s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        }
        slow.push(s);
    }
    let dripping = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut open = slow;
        while !open.is_empty() && tokio::time::Instant::now() < deadline {
            let mut still = Vec::new();
            for (i, mut s) in open.into_iter().enumerate() {
                let alive = if i % 2 == 0 {
                    s.write_all(b"x").await.is_ok()
                } else {
                    true
                };
                // A closed connection reads EOF at once.
                let closed = raw::closed_within(&mut s, Duration::from_millis(1)).await;
                if alive && !closed {
                    still.push(s);
                }
            }
            open = still;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        open.len()
    });
    // A normal client is served meanwhile.
    let client = flashgate_tests::client();
    for _ in 0..20 {
        let got = send_with(
            &client,
            Request::get(format!("http://{addr}/"))
                .body(flashgate_tests::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = dripping.await.unwrap();
    assert_eq!(left, 0, "every slow connection was closed");
    assert!(metric(gw.admin_addr(), "flashgate_connections_refused_total{listener=\"public\",reason=\"first_bytes_timeout\"}").await >= 20.0);
}

#[tokio::test]
async fn connection_limits_per_listener_and_per_client_address() {
    let up = Upstream::fixed("ok").await;
    // At its cap of 3 the listener would also raise the process's load
    // level (`overload.connections`) and shed the route: this test is
    // about the slots alone.
    let gw = gateway(&edge::config(
        up.addr,
        "max_connections = 3\nproxy_protocol = true\nmax_connections_per_ip = 2",
        "[overload]\nconnections = [2.0, 2.0, 2.0]",
    ))
    .await;
    let addr = gw.addr("public").unwrap();
    let admin = gw.admin_addr();
    let v1 = |ip: &str| format!("PROXY TCP4 {ip} 10.0.0.1 1000 80\r\n").into_bytes();
    let open = |ip: &'static str| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&v1(ip)).await.unwrap();
        s
    };
    // Two from one client address: fine; a third from it: closed.
    let a1 = open("198.51.100.1").await;
    let _a2 = open("198.51.100.1").await;
    let mut a3 = open("198.51.100.1").await;
    assert!(raw::closed_within(&mut a3, Duration::from_secs(20)).await);
    // Another address still gets in, up to the listener's 3.
    let _b1 = open("198.51.100.2").await;
    wait_until(
        Duration::from_secs(10),
        "three connections active",
        || async {
            metric(admin, "flashgate_connections_active{listener=\"public\"}").await == 3.0
        },
    )
    .await;
    let mut over = TcpStream::connect(addr).await.unwrap();
    assert!(raw::closed_within(&mut over, Duration::from_secs(20)).await);
    // A slot frees when a connection ends.
    drop(a1);
    wait_until(
        Duration::from_secs(10),
        "a slot freed: two connections active",
        || async {
            metric(admin, "flashgate_connections_active{listener=\"public\"}").await == 2.0
        },
    )
    .await;
    let mut req = v1("198.51.100.3");
    req.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(raw::status(&raw::exchange(addr, &req).await), Some(200));
    assert!(
        metric(
            admin,
            "flashgate_connections_refused_total{listener=\"public\",reason=\"max_connections\"}"
        )
        .await
            >= 1.0
    );
    assert!(metric(admin, "flashgate_connections_refused_total{listener=\"public\",reason=\"max_connections_per_ip\"}").await >= 1.0);
}

#[tokio::test]
async fn http2_streams_per_connection_are_capped() {
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (n, p) = (now.clone(), peak.clone());
    let up = Upstream::start(move |_| {
        let (n, p) = (n.clone(), p.clone());
        async move {
            let c = n.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(c, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            n.fetch_sub(1, Ordering::SeqCst);
            reply(200, "ok")
        }
    })
    .await;
    let gw = gateway(&edge::config(up.addr, "max_concurrent_streams = 2", "")).await;
    let addr = gw.addr("public").unwrap();
    let client = h2_client();
    // One request first, so the client has our SETTINGS (a client that
    // opens streams before reading them gets REFUSED_STREAM beyond the
    // cap, which is the cap working too); then it queues by itself.
    let warm = send_with(
        &client,
        Request::get(format!("http://{addr}/warm"))
            .body(flashgate_tests::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(warm.status, 200);
    let mut all = Vec::new();
    for i in 0..6 {
        let client = client.clone();
        all.push(tokio::spawn(async move {
            send_with(
                &client,
                Request::get(format!("http://{addr}/{i}"))
                    .body(flashgate_tests::empty())
                    .unwrap(),
            )
            .await
            .status
        }));
    }
    for a in all {
        assert_eq!(a.await.unwrap(), 200);
    }
    assert!(
        peak.load(Ordering::SeqCst) <= 2,
        "peak {}",
        peak.load(Ordering::SeqCst)
    );
}

/// A reload changes limits and trusted proxies for new requests without a
/// restart; moving the listener is reported as needing one.
#[tokio::test]
async fn limits_change_on_reload() {
    let up = Upstream::echo().await;
    let dir = flashgate_tests::tls::temp_dir("limits-reload");
    let path = dir.join("gw.toml");
    let write = |listener_extra: &str| {
        std::fs::write(&path, edge::config(up.addr, listener_extra, "")).unwrap();
    };
    write("max_uri_bytes = \"512B\"");
    let config = flashgate_tests::Config::load(&path).unwrap();
    let gw = flashgate_tests::Gateway::start(config, Some(path.clone()))
        .await
        .unwrap();
    let addr = gw.addr("public").unwrap();
    let long = format!("http://{addr}/{}", "a".repeat(600));
    let client = flashgate_tests::client();
    let get = |url: String, xff: &'static str| {
        let client = client.clone();
        async move {
            send_with(
                &client,
                Request::get(url)
                    .header("x-forwarded-for", xff)
                    .body(flashgate_tests::empty())
                    .unwrap(),
            )
            .await
        }
    };
    assert_eq!(get(long.clone(), "203.0.113.1").await.status, 414);
    let seen = get(format!("http://{addr}/"), "203.0.113.1").await.json();
    assert_eq!(seen["headers"]["x-real-ip"], "127.0.0.1");

    write("max_uri_bytes = \"2KiB\"\ntrusted_proxies = [\"127.0.0.1/32\"]");
    let reload = |gw: &flashgate_tests::Gateway| {
        let admin = gw.admin_addr();
        async move {
            flashgate_tests::send(
                Request::post(format!("http://{admin}/admin/reload"))
                    .header("authorization", "Bearer test-token")
                    .body(flashgate_tests::empty())
                    .unwrap(),
            )
            .await
        }
    };
    let answer = reload(&gw).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["restart_required"], serde_json::json!([]));
    // The same client on its kept-alive connection: new requests get the
    // new limits.
    assert_eq!(get(long.clone(), "203.0.113.1").await.status, 200);
    let seen = get(format!("http://{addr}/"), "203.0.113.1").await.json();
    assert_eq!(seen["headers"]["x-real-ip"], "203.0.113.1");

    // Moving the listener cannot be applied live.
    std::fs::write(
        &path,
        edge::config(up.addr, "max_uri_bytes = \"2KiB\"", "")
            .replacen("listen = \"127.0.0.1:0\"\n[[upstreams]]", "", 0)
            .replace(
                "name = \"public\"\nlisten = \"127.0.0.1:0\"",
                "name = \"public\"\nlisten = \"127.0.0.1:1\"",
            ),
    )
    .unwrap();
    let answer = reload(&gw).await;
    assert_eq!(
        answer.json()["restart_required"],
        serde_json::json!(["listeners"])
    );
    gw.shutdown().await;
}

/// `idle_timeout` closes a keep-alive connection that sends no request;
/// one that keeps sending stays open, and a request that takes longer
/// than `idle_timeout` upstream is not cut (busy is not idle).
#[tokio::test]
async fn idle_keep_alive_connections_close_after_idle_timeout() {
    let up = slow_on_request().await;
    let gw = gateway(&edge::config(up.addr, "idle_timeout = \"1s\"", "")).await;
    let addr = gw.addr("public").unwrap();

    let mut idle = TcpStream::connect(addr).await.unwrap();
    assert_eq!(request_on(&mut idle, KEEP_ALIVE_GET).await, Some(200));
    let idle_from = Instant::now();

    let busy = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        for i in 0..10 {
            assert_eq!(
                request_on(&mut s, KEEP_ALIVE_GET).await,
                Some(200),
                "request {i}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        s
    });
    let slow = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let status = request_on(&mut s, b"GET /slow HTTP/1.1\r\nHost: shop.test\r\n\r\n").await;
        (status, s)
    });

    assert!(
        raw::closed_within(&mut idle, Duration::from_secs(10)).await,
        "the idle connection was closed"
    );
    let waited = idle_from.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "closed after {waited:?}, idle_timeout is 1s"
    );
    // Ten requests 300 ms apart over about 3 s: one connection, all served.
    let mut busy = busy.await.unwrap();
    let (status, mut slow) = slow.await.unwrap();
    assert_eq!(status, Some(200), "a 1.5 s request outlives idle_timeout");
    // Both are closed in turn once they are idle.
    assert!(raw::closed_within(&mut busy, Duration::from_secs(10)).await);
    assert!(raw::closed_within(&mut slow, Duration::from_secs(10)).await);
    let admin = gw.admin_addr();
    wait_until(
        Duration::from_secs(5),
        "three idle timeouts counted",
        || async {
            metric(
                admin,
                "flashgate_connection_timeouts_total{listener=\"public\",timeout=\"idle\"}",
            )
            .await
                >= 3.0
        },
    )
    .await;
}

/// `header_read_timeout` bounds a head from its first byte: a client
/// dribbling its second request's head is cut, while a kept-alive
/// connection that is merely idle for longer survives (it has
/// `idle_timeout`).
#[tokio::test]
async fn slow_head_is_cut_while_an_idle_connection_survives() {
    let up = Upstream::fixed("ok").await;
    let gw = gateway(&edge::config(
        up.addr,
        "header_read_timeout = \"1s\"\nidle_timeout = \"20s\"",
        "",
    ))
    .await;
    let addr = gw.addr("public").unwrap();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    assert_eq!(request_on(&mut idle, KEEP_ALIVE_GET).await, Some(200));
    let mut slow = TcpStream::connect(addr).await.unwrap();
    assert_eq!(request_on(&mut slow, KEEP_ALIVE_GET).await, Some(200));

    let took = drip_until_closed(&mut slow, Duration::from_secs(10))
        .await
        .expect("the dribbling client was cut");
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "cut after {took:?}, header_read_timeout is 1s"
    );
    // The idle connection has been idle for longer than header_read_timeout
    // and still serves.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        request_on(&mut idle, KEEP_ALIVE_GET).await,
        Some(200),
        "the idle keep-alive connection survived"
    );
    // A head sent in pieces, each well within the limit, is fine.
    idle.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        request_on(&mut idle, b"Host: shop.test\r\n\r\n").await,
        Some(200)
    );
    assert!(
        metric(
            gw.admin_addr(),
            "flashgate_connection_timeouts_total{listener=\"public\",timeout=\"header_read\"}"
        )
        .await
            >= 1.0
    );
}

/// An HTTP/2 connection with no open stream for `idle_timeout` gets a
/// GOAWAY and is closed; a stream open for longer is not cut.
#[tokio::test]
async fn http2_connection_without_streams_closes_after_idle_timeout() {
    let up = slow_on_request().await;
    let gw = gateway(&edge::config(up.addr, "idle_timeout = \"1s\"", "")).await;
    let addr = gw.addr("public").unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2c handshake");
    let conn = tokio::spawn(conn);

    let resp = sender
        .send_request(
            Request::get(format!("http://{addr}/slow"))
                .body(flashgate_tests::empty())
                .unwrap(),
        )
        .await
        .expect("the 1.5 s stream is answered");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    let idle_from = Instant::now();

    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the server closed the idle HTTP/2 connection")
        .unwrap();
    assert!(ended.is_ok(), "a clean close (GOAWAY): {ended:?}");
    let waited = idle_from.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "closed after {waited:?}, idle_timeout is 1s"
    );
    assert!(sender.is_closed());
    assert!(
        metric(
            gw.admin_addr(),
            "flashgate_connection_timeouts_total{listener=\"public\",timeout=\"idle\"}"
        )
        .await
            >= 1.0
    );
}
