//! WebSocket through the gateway: a real handshake and frames both ways
//! on a route with `websocket = true`; refused elsewhere.

use std::time::Duration;

use flashgate_tests::{edge, gateway, raw, ws};
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
