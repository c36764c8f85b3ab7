//! Graceful shutdown of the real binary on SIGTERM, as a rolling deploy or
//! a spot interruption sends it: readiness fails at once, the listener
//! keeps serving for `drain_delay`, then stops accepting; in-flight
//! requests on HTTP/1.1 and HTTP/2 finish, keep-alive connections are told
//! to close, open WebSocket tunnels are waited for (up to `drain_timeout`),
//! and the process exits 0.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flashgate_tests::{
    edge, flashgate_bin, get, h2_client, raw, reply, send_with, wait_listening, wait_until,
    with_fixed_ports, ws, Proc, Upstream,
};
use http::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn sigterm_waits_drain_delay_then_drains_in_flight_requests() {
    let up = Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        if req.uri().path().starts_with("/slow") {
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
        reply(200, req.uri().path().to_string())
    })
    .await;
    let text = edge::config(up.addr, "", "")
        + "[shutdown]\ndrain_delay = \"1500ms\"\ndrain_timeout = \"20s\"\n";
    let (text, public, admin) = with_fixed_ports(&text);
    let dir = flashgate_tests::tls::temp_dir("drain");
    let path = dir.join("gw.toml");
    std::fs::write(&path, text).unwrap();
    let mut gw = Proc::spawn(
        Command::new(flashgate_bin())
            .args(["run", "--config"])
            .arg(&path)
            .stderr(Stdio::null()),
    );
    assert!(wait_listening(public, Duration::from_secs(20)).await);

    // An HTTP/1.1 keep-alive client and an HTTP/2 client, each with a slow
    // request in flight when SIGTERM lands.
    let h1 = flashgate_tests::client();
    let h2 = h2_client();
    let url = |p: &str| format!("http://{public}{p}");
    let (c1, u1) = (h1.clone(), url("/slow/h1"));
    let slow_h1 = tokio::spawn(async move {
        send_with(
            &c1,
            Request::get(u1).body(flashgate_tests::empty()).unwrap(),
        )
        .await
    });
    let (c2, u2) = (h2.clone(), url("/slow/h2"));
    let slow_h2 = tokio::spawn(async move {
        send_with(
            &c2,
            Request::get(u2).body(flashgate_tests::empty()).unwrap(),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.signal("TERM");
    let term_at = Instant::now();

    // Readiness is off at once...
    wait_until(
        Duration::from_secs(1),
        "readyz is 503 during the drain",
        || async { get(&format!("http://{admin}/readyz")).await.status == 503 },
    )
    .await;
    // ...while new connections are still served during drain_delay.
    let fresh = flashgate_tests::client();
    let got = send_with(
        &fresh,
        Request::get(url("/during"))
            .body(flashgate_tests::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    assert!(
        term_at.elapsed() < Duration::from_millis(1500),
        "served within the delay"
    );

    // After the delay the listener stops accepting.
    wait_until(
        Duration::from_secs(10),
        "no new connections after drain_delay",
        || async { tokio::net::TcpStream::connect(public).await.is_err() },
    )
    .await;
    assert!(term_at.elapsed() >= Duration::from_millis(1400));

    // Both in-flight requests completed; the HTTP/1.1 one was told to close.
    let g1 = slow_h1.await.unwrap();
    assert_eq!((g1.status, g1.text().as_str()), (200, "/slow/h1"));
    assert_eq!(g1.header("connection"), Some("close"));
    let g2 = slow_h2.await.unwrap();
    assert_eq!((g2.status, g2.text().as_str()), (200, "/slow/h2"));

    let exit = gw
        .wait_exit(Duration::from_secs(20))
        .expect("exits after the drain");
    assert!(exit.success(), "exit code 0: {exit:?}");
}

#[tokio::test]
async fn drain_timeout_bounds_the_wait() {
    let up = Upstream::start(|_req: http::Request<hyper::body::Incoming>| async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        reply(200, "late")
    })
    .await;
    let text = edge::config(up.addr, "", "").replace(
        "[[upstreams]]\nname = \"origin\"",
        "[[upstreams]]\nname = \"origin\"\nrequest_timeout = \"120s\"",
    ) + "[shutdown]\ndrain_timeout = \"1s\"\n";
    let (text, public, _admin) = with_fixed_ports(&text);
    let dir = flashgate_tests::tls::temp_dir("drain-timeout");
    let path = dir.join("gw.toml");
    std::fs::write(&path, text).unwrap();
    let mut gw = Proc::spawn(
        Command::new(flashgate_bin())
            .args(["run", "--config"])
            .arg(&path)
            .stderr(Stdio::null()),
    );
    assert!(wait_listening(public, Duration::from_secs(20)).await);
    let stuck = tokio::spawn(async move {
        let _ = flashgate_tests::client()
            .request(
                Request::get(format!("http://{public}/stuck"))
                    .body(flashgate_tests::empty())
                    .unwrap(),
            )
            .await;
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    gw.signal("TERM");
    let exit = gw
        .wait_exit(Duration::from_secs(20))
        .expect("exits after drain_timeout");
    assert!(exit.success(), "{exit:?}");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "did not wait for the 60 s request"
    );
    stuck.abort();
}

/// Starts the binary with a WebSocket route to `upstream` and `shutdown`
/// settings; returns it and its public address.
async fn websocket_gateway(
    upstream: std::net::SocketAddr,
    shutdown: &str,
    dir: &str,
) -> (Proc, std::net::SocketAddr) {
    let text = edge::config(upstream, "", "websocket = true") + "[shutdown]\n" + shutdown;
    let (text, public, _admin) = with_fixed_ports(&text);
    let dir = flashgate_tests::tls::temp_dir(dir);
    let path = dir.join("gw.toml");
    std::fs::write(&path, text).unwrap();
    let gw = Proc::spawn(
        Command::new(flashgate_bin())
            .args(["run", "--config"])
            .arg(&path)
            .stderr(Stdio::null()),
    );
    assert!(wait_listening(public, Duration::from_secs(20)).await);
    (gw, public)
}

/// Opens a WebSocket through the gateway.
async fn open_tunnel(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: shop.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.expect("head byte"));
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert_eq!(raw::status(&head), Some(101), "{head}");
    s
}

/// Whether one frame makes it through the tunnel and back.
async fn echoes(s: &mut TcpStream, payload: &[u8]) -> bool {
    if ws::write_frame(s, 2, payload, Some([5, 6, 7, 8]))
        .await
        .is_err()
    {
        return false;
    }
    matches!(
        tokio::time::timeout(Duration::from_secs(5), ws::read_frame(s)).await,
        Ok(Ok((2, back))) if back == payload
    )
}

#[tokio::test]
async fn sigterm_waits_for_an_open_websocket_tunnel() {
    let (upstream, _task) = ws::echo_server().await;
    let (mut gw, public) = websocket_gateway(
        upstream,
        "drain_delay = \"500ms\"\ndrain_timeout = \"30s\"\n",
        "drain-ws",
    )
    .await;
    let mut tunnel = open_tunnel(public).await;
    assert!(echoes(&mut tunnel, b"before").await);
    gw.signal("TERM");
    // Past drain_delay the listener no longer accepts...
    wait_until(
        Duration::from_secs(10),
        "no new connections after drain_delay",
        || async { TcpStream::connect(public).await.is_err() },
    )
    .await;
    // ...but the tunnel still works, and the process waits for it.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(echoes(&mut tunnel, b"during the drain").await);
    assert!(gw.0.try_wait().unwrap().is_none(), "still draining");

    // The client closes the tunnel: the drain is done.
    ws::write_frame(&mut tunnel, 8, &[0x03, 0xe8], Some([1, 2, 3, 4]))
        .await
        .unwrap();
    let closed_at = Instant::now();
    drop(tunnel);
    // (The echo upstream runs in this test's runtime: wait without
    // blocking it.)
    let exit = gw
        .exited(Duration::from_secs(20))
        .await
        .expect("exits once the tunnel closed");
    assert!(exit.success(), "exit code 0: {exit:?}");
    assert!(closed_at.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn drain_timeout_cuts_open_websocket_tunnels() {
    let (upstream, _task) = ws::echo_server().await;
    let (mut gw, public) =
        websocket_gateway(upstream, "drain_timeout = \"1500ms\"\n", "drain-ws-timeout").await;
    let mut tunnel = open_tunnel(public).await;
    assert!(echoes(&mut tunnel, b"before").await);
    let t = Instant::now();
    gw.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(echoes(&mut tunnel, b"during the drain").await);
    let exit = gw
        .exited(Duration::from_secs(20))
        .await
        .expect("exits after drain_timeout");
    assert!(exit.success(), "exit code 0: {exit:?}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(10),
        "waited for the tunnel up to drain_timeout: {took:?}"
    );
    assert!(
        raw::closed_within(&mut tunnel, Duration::from_secs(5)).await,
        "the tunnel was cut"
    );
}
