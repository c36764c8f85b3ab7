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
    assert!(out.starts_with("HTTP/1.") && out[9..].starts_with("200"), "{out}");
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
