//! Client identity: PROXY protocol v1/v2 (raw bytes, as an NLB sends
//! them), trusted and untrusted x-forwarded-for.

use std::net::SocketAddr;
use std::time::Duration;

use flashgate_tests::tls::{self, ClientOpts};
use flashgate_tests::{edge, gateway, metric, raw, send, wait_until, Upstream};
use http::Request;
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;

const GET: &[u8] = b"GET /who HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n";

#[tokio::test]
async fn proxy_v1_names_the_client() {
    let up = Upstream::echo().await;
    let gw = gateway(&edge::config(up.addr, "proxy_protocol = true", "")).await;
    let addr = gw.addr("public").unwrap();
    let mut req = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 80\r\n".to_vec();
    req.extend_from_slice(GET);
    let text = raw::exchange(addr, &req).await;
    assert_eq!(raw::status(&text), Some(200), "{text}");
    let seen = raw::json_body(&text);
    assert_eq!(seen["headers"]["x-real-ip"], "203.0.113.7");
    assert_eq!(seen["headers"]["x-forwarded-for"], "203.0.113.7");

    // IPv6, and UNKNOWN (the balancer's own health check: the peer stands).
    let mut req = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 80\r\n".to_vec();
    req.extend_from_slice(GET);
    let seen = raw::json_body(&raw::exchange(addr, &req).await);
    assert_eq!(seen["headers"]["x-real-ip"], "2001:db8::7");
    let mut req = b"PROXY UNKNOWN\r\n".to_vec();
    req.extend_from_slice(GET);
    let seen = raw::json_body(&raw::exchange(addr, &req).await);
    assert_eq!(seen["headers"]["x-real-ip"], "127.0.0.1");
}

#[tokio::test]
async fn proxy_v2_with_tlvs_and_tls_behind_it() {
    let dir = tls::temp_dir("ppv2");
    let cert = tls::write_cert(&dir, "a", &["a.test"]);
    let up = Upstream::echo().await;
    let listener = format!(
        "proxy_protocol = true\n[listeners.tls]\ncerts = [{{ cert = \"{}\", key = \"{}\" }}]",
        cert.cert.display(),
        cert.key.display()
    );
    let gw = gateway(&edge::config(up.addr, &listener, "")).await;
    let addr = gw.addr("public").unwrap();
    // An AWS NLB adds a VPC endpoint TLV (type 0xEA); it is skipped.
    let tlv = [0xEA, 0x00, 0x05, 0x01, b'v', b'p', b'c', b'e'];
    let header = raw::proxy_v2_ipv4(
        "198.51.100.20:40000".parse().unwrap(),
        "10.0.0.1:443".parse().unwrap(),
        &tlv,
    );
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&header).await.unwrap();
    // The TLS handshake follows the header on the same connection.
    let s = tls::connect_over(tcp, &ClientOpts::sni("a.test"))
        .await
        .unwrap();
    let mut send = tls::h1(s).await;
    let resp = send
        .send_request(
            Request::get("/who")
                .header("host", "a.test")
                .body(flashgate_tests::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["headers"]["x-real-ip"], "198.51.100.20");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn connections_without_a_valid_proxy_header_are_closed() {
    let up = Upstream::echo().await;
    let gw = gateway(&edge::config(
        up.addr,
        "proxy_protocol = true\nproxy_protocol_timeout = \"300ms\"",
        "",
    ))
    .await;
    let addr = gw.addr("public").unwrap();
    let admin = gw.admin_addr();
    // Plain HTTP where a PROXY header must be.
    let text = raw::exchange(addr, GET).await;
    assert_eq!(text, "", "closed without an answer");
    // A broken v1 line and a v2 header with a bad version.
    let text = raw::exchange(
        addr,
        b"PROXY TCP4 1.2.3.4 nope 1 2\r\nGET / HTTP/1.1\r\n\r\n",
    )
    .await;
    assert_eq!(text, "");
    let mut bad = raw::proxy_v2_ipv4(
        "1.2.3.4:1".parse().unwrap(),
        "5.6.7.8:2".parse().unwrap(),
        &[],
    );
    bad[12] = 0x31;
    assert_eq!(raw::exchange(addr, &bad).await, "");
    // Silence: closed when the header timeout runs out.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(raw::closed_within(&mut s, Duration::from_secs(20)).await);
    // Half a header, then nothing: also closed.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PROXY TCP4 1.2.3.4").await.unwrap();
    assert!(raw::closed_within(&mut s, Duration::from_secs(20)).await);
    assert_eq!(up.hits(), 0, "nothing reached the upstream");
    wait_until(Duration::from_secs(10), "refused PROXY headers and header timeouts counted", || async {
            metric(admin, "flashgate_connections_refused_total{listener=\"public\",reason=\"proxy_protocol\"}").await >= 3.0
                && metric(admin, "flashgate_connections_refused_total{listener=\"public\",reason=\"proxy_protocol_timeout\"}").await >= 2.0
        }).await;
}

async fn seen_through(addr: SocketAddr, xff: &str) -> serde_json::Value {
    let got = send(
        Request::get(format!("http://{addr}/who"))
            .header("x-forwarded-for", xff)
            .header("x-real-ip", "6.6.6.6")
            .body(flashgate_tests::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    got.json()
}

#[tokio::test]
async fn trusted_proxies_resolve_the_rightmost_untrusted_hop() {
    let up = Upstream::echo().await;
    // Loopback (the test client) plays the ALB; 192.168.0.0/16 a CDN tier.
    let gw = gateway(&edge::config(
        up.addr,
        "trusted_proxies = [\"127.0.0.0/8\", \"192.168.0.0/16\"]",
        "",
    ))
    .await;
    let addr = gw.addr("public").unwrap();
    // The client wrote 6.6.6.6 itself; the ALB appended the real address.
    let seen = seen_through(addr, "6.6.6.6, 203.0.113.9").await;
    assert_eq!(seen["headers"]["x-real-ip"], "203.0.113.9");
    // The upstream still gets the whole chain, plus our hop.
    assert_eq!(
        seen["headers"]["x-forwarded-for"],
        "6.6.6.6, 203.0.113.9, 127.0.0.1"
    );
    // Trusted hops are skipped.
    let seen = seen_through(addr, "6.6.6.6, 203.0.113.9, 192.168.4.4").await;
    assert_eq!(seen["headers"]["x-real-ip"], "203.0.113.9");
}

#[tokio::test]
async fn spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing() {
    let up = Upstream::echo().await;
    let gw = gateway(&edge::config(
        up.addr,
        "trusted_proxies = [\"10.0.0.0/8\"]",
        "",
    ))
    .await;
    let addr = gw.addr("public").unwrap();
    let seen = seen_through(addr, "203.0.113.9").await;
    assert_eq!(
        seen["headers"]["x-real-ip"], "127.0.0.1",
        "the peer, not the header"
    );
    // Without trusted_proxies at all, the same.
    let gw = gateway(&edge::config(up.addr, "", "")).await;
    let seen = seen_through(gw.addr("public").unwrap(), "10.1.2.3").await;
    assert_eq!(seen["headers"]["x-real-ip"], "127.0.0.1");
}
