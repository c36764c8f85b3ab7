//! WebSocket through the gateway: a real handshake and frames both ways
//! on a route with `websocket = true`; refused elsewhere.

use std::time::Duration;

use flashgate_tests::{edge, gateway, metric, raw, wait_until, ws};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn handshake(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: shop.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// Reads a response head (up to the blank line), byte by byte so nothing
/// after it is consumed.
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !head.ends_with(b"\r\n\r\n") {
            let b = s.read_u8().await.expect("head byte");
            head.push(b);
        }
    })
    .await
    .expect("a response head in time");
    String::from_utf8_lossy(&head).into_owned()
}

/// Opens a WebSocket through the gateway at `addr` and checks one echo.
async fn open_tunnel(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&handshake("/ws")).await.unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(raw::status(&head), Some(101), "{head}");
    echo(&mut s, b"ping").await;
    s
}

async fn echo(s: &mut TcpStream, payload: &[u8]) {
    ws::write_frame(s, 1, payload, Some([9, 8, 7, 6]))
        .await
        .expect("frame out");
    let (op, back) = tokio::time::timeout(Duration::from_secs(10), ws::read_frame(s))
        .await
        .expect("echo in time")
        .expect("frame back");
    assert_eq!((op, back.as_slice()), (1, payload));
}

/// Closes a tunnel the way a browser does: close frame, its echo, FIN.
async fn close_tunnel(mut s: TcpStream) {
    ws::write_frame(&mut s, 8, &[0x03, 0xe8], Some([1, 2, 3, 4]))
        .await
        .unwrap();
    let (op, _) = ws::read_frame(&mut s).await.unwrap();
    assert_eq!(op, 8, "close echoed");
}

#[tokio::test]
async fn websocket_echo_through_the_gateway() {
    let (upstream, _task) = ws::echo_server().await;
    let gw = gateway(&edge::config(upstream, "", "websocket = true")).await;
    let addr = gw.addr("public").unwrap();
    assert_eq!(
        ws::accept_key(KEY),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
        "RFC 6455 example"
    );

    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&handshake("/ws")).await.unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(raw::status(&head), Some(101), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(
        lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );

    let mask = Some([1, 2, 3, 4]);
    let big = vec![b'z'; 70_000];
    for (op, payload) in [
        (1u8, &b"hello"[..]),
        (2, &[0u8, 1, 2, 255][..]),
        (1, &big[..]),
    ] {
        ws::write_frame(&mut s, op, payload, mask).await.unwrap();
        let (rop, back) = tokio::time::timeout(Duration::from_secs(30), ws::read_frame(&mut s))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!((rop, back.as_slice()), (op, payload));
    }
    ws::write_frame(&mut s, 8, &[0x03, 0xe8], mask)
        .await
        .unwrap();
    let (op, _) = ws::read_frame(&mut s).await.unwrap();
    assert_eq!(op, 8, "close echoed");
}

#[tokio::test]
async fn upgrades_are_not_passed_on_routes_without_websocket() {
    let (upstream, _task) = ws::echo_server().await;
    let gw = gateway(&edge::config(upstream, "", "")).await;
    let addr = gw.addr("public").unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&handshake("/ws")).await.unwrap();
    let head = read_head(&mut s).await;
    // The upstream saw a plain request (Upgrade is hop-by-hop) and said so.
    assert_eq!(raw::status(&head), Some(426), "{head}");
}

const TUNNELS: &str = "flashgate_websocket_tunnels_active{cluster=\"origin\"}";

/// An open tunnel is still a client connection: it holds its
/// `max_connections` slot until it closes.
#[tokio::test]
async fn a_tunnel_holds_its_connection_slot() {
    let (upstream, _task) = ws::echo_server().await;
    // A full listener would also raise the process's load level
    // (`overload.connections`) and shed the route: this test is about the
    // slot alone.
    let gw = gateway(&edge::config(
        upstream,
        "max_connections = 1",
        "websocket = true\n[overload]\nconnections = [2.0, 2.0, 2.0]",
    ))
    .await;
    let addr = gw.addr("public").unwrap();
    let admin = gw.admin_addr();
    let mut tunnel = open_tunnel(addr).await;

    // The listener is full: another client is closed at accept, unanswered.
    let plain = b"GET / HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n";
    let text = raw::exchange(addr, plain).await;
    assert_eq!(
        raw::status(&text),
        None,
        "refused while the tunnel is open: {text}"
    );
    wait_until(Duration::from_secs(5), "the tunnel counted", || async {
        metric(admin, TUNNELS).await == 1.0
    })
    .await;
    assert!(
        metric(
            admin,
            "flashgate_connections_refused_total{listener=\"public\",reason=\"max_connections\"}"
        )
        .await
            >= 1.0
    );
    echo(&mut tunnel, b"still here").await;

    // Once it closes, the slot is free again (the echo server answers a
    // plain request with 426).
    close_tunnel(tunnel).await;
    wait_until(
        Duration::from_secs(10),
        "accepted after the tunnel closed",
        || async { raw::status(&raw::exchange(addr, plain).await) == Some(426) },
    )
    .await;
    wait_until(Duration::from_secs(5), "the tunnel is gone", || async {
        metric(admin, TUNNELS).await == 0.0
    })
    .await;
}

/// An upgrade is a request to its cluster: it takes one of the cluster's
/// `max_concurrent_requests` slots (503 when none is free) and keeps it
/// for the tunnel's life.
#[tokio::test]
async fn a_tunnel_holds_a_cluster_slot() {
    let (upstream, _task) = ws::echo_server().await;
    let text = edge::config(upstream, "", "websocket = true").replace(
        "[[upstreams]]\nname = \"origin\"",
        "[[upstreams]]\nname = \"origin\"\nmax_concurrent_requests = 1",
    );
    let gw = gateway(&text).await;
    let addr = gw.addr("public").unwrap();
    let tunnel = open_tunnel(addr).await;

    let mut second = TcpStream::connect(addr).await.unwrap();
    second.write_all(&handshake("/ws")).await.unwrap();
    let head = read_head(&mut second).await;
    assert_eq!(raw::status(&head), Some(503), "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after"), "{head}");
    assert!(
        metric(
            gw.admin_addr(),
            "flashgate_upstream_overflow_total{cluster=\"origin\"}"
        )
        .await
            >= 1.0
    );

    close_tunnel(tunnel).await;
    let mut third = None;
    for _ in 0..100 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&handshake("/ws")).await.unwrap();
        let head = read_head(&mut s).await;
        if raw::status(&head) == Some(101) {
            third = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut third = third.expect("an upgrade succeeds once the first tunnel closed");
    echo(&mut third, b"next").await;
}

/// `websocket_idle_timeout`: a tunnel through which nothing passes in
/// either direction for that long is closed and its slots released; one
/// that keeps talking, even for longer in total, is not.
#[tokio::test]
async fn a_silent_tunnel_is_closed_after_websocket_idle_timeout() {
    let (upstream, _task) = ws::echo_server().await;
    let gw = gateway(&edge::config(
        upstream,
        "websocket_idle_timeout = \"1s\"",
        "websocket = true",
    ))
    .await;
    let addr = gw.addr("public").unwrap();
    let admin = gw.admin_addr();

    let mut talking = open_tunnel(addr).await;
    for i in 0..6u8 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        echo(&mut talking, &[b'a' + i]).await;
    }

    let silent_from = std::time::Instant::now();
    assert!(
        raw::closed_within(&mut talking, Duration::from_secs(10)).await,
        "the silent tunnel was closed"
    );
    let waited = silent_from.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(3000),
        "closed after {waited:?} of silence, websocket_idle_timeout is 1s"
    );
    wait_until(Duration::from_secs(5), "the tunnel is gone", || async {
        metric(admin, TUNNELS).await == 0.0
    })
    .await;
}
