//! Graceful shutdown of the real binary on SIGTERM, as a rolling deploy or
//! a spot interruption sends it: readiness fails at once, the listener
//! keeps serving for `drain_delay`, then stops accepting; in-flight
//! requests on HTTP/1.1 and HTTP/2 finish, keep-alive connections are told
//! to close, and the process exits 0.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flashgate_tests::{
    edge, eventually, flashgate_bin, get, h2_client, reply, send_with, wait_listening,
    with_fixed_ports, Proc, Upstream,
};
use http::Request;

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
    assert!(
        eventually(Duration::from_secs(1), || async {
            get(&format!("http://{admin}/readyz")).await.status == 503
        })
        .await,
        "readyz is 503 during the drain"
    );
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
    let refused = eventually(Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(public).await.is_err()
    })
    .await;
    assert!(refused, "no new connections after drain_delay");
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
