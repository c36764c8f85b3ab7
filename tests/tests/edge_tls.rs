//! TLS termination with real rustls clients over loopback: certificates by
//! SNI, the default certificate, protocol versions, ALPN h2, and
//! certificates reloaded from disk while connections stay up.

use std::time::Duration;

use flashgate_tests::tls::{self, ClientOpts};
use flashgate_tests::{empty, gateway, metric, wait_until, Upstream};
use http::Request;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A gateway whose one listener terminates TLS with `certs` (TOML inline
/// tables), in front of `upstream`.
fn tls_config(upstream: std::net::SocketAddr, certs: &str, tls_extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\n[log]\naccess_log = false\n\
         [[listeners]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\n\
         [listeners.tls]\ncerts = [{certs}]\n{tls_extra}\n\
         [[upstreams]]\nname = \"origin\"\nendpoints = [\"{upstream}\"]\n\
         [[routes]]\npath_prefix = \"/\"\nupstream = \"origin\"\n"
    )
}

fn pair(c: &tls::TestCert) -> String {
    format!(
        "{{ cert = \"{}\", key = \"{}\" }}",
        c.cert.display(),
        c.key.display()
    )
}

async fn get_over_h1(
    send: &mut hyper::client::conn::http1::SendRequest<flashgate_tests::Body>,
    path: &str,
) -> (u16, String) {
    let req = Request::get(path)
        .header("host", "shop.test")
        .body(empty())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), send.send_request(req))
        .await
        .expect("answer in time")
        .expect("request succeeds");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn sni_picks_the_certificate_and_no_sni_gets_the_default() {
    let dir = tls::temp_dir("sni");
    let a = tls::write_cert(&dir, "a", &["a.shop.test"]);
    let b = tls::write_cert(&dir, "b", &["*.b.test", "b.test"]);
    let up = Upstream::echo().await;
    let gw = gateway(&tls_config(
        up.addr,
        &format!("{}, {}", pair(&a), pair(&b)),
        "",
    ))
    .await;
    let addr = gw.addr("tls").unwrap();

    let to_a = tls::connect(addr, &ClientOpts::sni("a.shop.test"))
        .await
        .unwrap();
    assert_eq!(tls::served_cert(&to_a), a.der, "exact SAN");
    let to_b = tls::connect(addr, &ClientOpts::sni("shop.b.test"))
        .await
        .unwrap();
    assert_eq!(tls::served_cert(&to_b), b.der, "wildcard SAN");
    let apex = tls::connect(addr, &ClientOpts::sni("b.test"))
        .await
        .unwrap();
    assert_eq!(tls::served_cert(&apex), b.der);
    let mut no_sni = ClientOpts::sni("x");
    no_sni.sni = None;
    let none = tls::connect(addr, &no_sni).await.unwrap();
    assert_eq!(tls::served_cert(&none), a.der, "no SNI: the first pair");
    let unknown = tls::connect(addr, &ClientOpts::sni("other.test"))
        .await
        .unwrap();
    assert_eq!(
        tls::served_cert(&unknown),
        a.der,
        "unknown name: the first pair"
    );

    // HTTP/1.1 over it, and the upstream learns the scheme.
    let mut send = tls::h1(to_b).await;
    let (status, body) = get_over_h1(&mut send, "/hello").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["headers"]["x-forwarded-proto"], "https");
    assert_eq!(json["path"], "/hello");
}

#[tokio::test]
async fn tls12_and_tls13_work_tls11_is_refused() {
    let dir = tls::temp_dir("versions");
    let a = tls::write_cert(&dir, "a", &["a.test"]);
    let up = Upstream::fixed("ok").await;
    let gw = gateway(&tls_config(up.addr, &pair(&a), "")).await;
    let addr = gw.addr("tls").unwrap();
    for v in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut opts = ClientOpts::sni("a.test");
        opts.version = Some(v);
        let s = tls::connect(addr, &opts).await.unwrap();
        assert_eq!(s.get_ref().1.protocol_version(), Some(v.version));
        let mut send = tls::h1(s).await;
        assert_eq!(get_over_h1(&mut send, "/").await.0, 200);
    }

    // rustls clients cannot speak TLS 1.1: send an old client's hello as
    // raw bytes. The answer must be an alert, never a ServerHello.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&tls::tls11_client_hello()).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut reply)).await;
    assert!(!reply.is_empty(), "the server answers with an alert");
    assert_eq!(
        reply[0], 0x15,
        "an alert record, not a handshake: {reply:02x?}"
    );
    // protocol_version(70) or handshake_failure(40): either way refused.
    assert!(
        matches!(reply.get(6), Some(70) | Some(40)),
        "alert {reply:02x?}"
    );
    wait_until(
        Duration::from_secs(10),
        "the refused handshake counted",
        || async {
            metric(
                gw.admin_addr(),
                "flashgate_connections_refused_total{listener=\"tls\",reason=\"tls_handshake\"}",
            )
            .await
                >= 1.0
        },
    )
    .await;
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn alpn_h2_serves_http2() {
    let dir = tls::temp_dir("alpn");
    let a = tls::write_cert(&dir, "a", &["a.test"]);
    let up = Upstream::echo().await;
    let gw = gateway(&tls_config(up.addr, &pair(&a), "")).await;
    let addr = gw.addr("tls").unwrap();

    let mut opts = ClientOpts::sni("a.test");
    opts.alpn = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let s = tls::connect(addr, &opts).await.unwrap();
    assert_eq!(tls::alpn(&s).as_deref(), Some(&b"h2"[..]));
    let mut send = tls::h2(s).await;
    // Several requests multiplexed on the one connection.
    let mut answers = Vec::new();
    for i in 0..5 {
        let req = Request::get(format!("https://a.test/item/{i}"))
            .body(empty())
            .unwrap();
        answers.push(send.send_request(req));
    }
    for (i, a) in answers.into_iter().enumerate() {
        let resp = tokio::time::timeout(Duration::from_secs(30), a)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["path"], format!("/item/{i}"));
        assert_eq!(json["headers"]["host"], "a.test");
    }

    // A client that offers only http/1.1 gets it.
    let s = tls::connect(addr, &ClientOpts::sni("a.test"))
        .await
        .unwrap();
    assert_eq!(tls::alpn(&s).as_deref(), Some(&b"http/1.1"[..]));
}

#[tokio::test]
async fn certificates_reload_from_disk_and_open_connections_stay() {
    let dir = tls::temp_dir("reload");
    let old = tls::write_cert(&dir, "site", &["a.test"]);
    let up = Upstream::fixed("ok").await;
    let gw = gateway(&tls_config(
        up.addr,
        &pair(&old),
        "reload_interval = \"100ms\"",
    ))
    .await;
    let addr = gw.addr("tls").unwrap();
    let admin = gw.admin_addr();
    let before = tls::connect(addr, &ClientOpts::sni("a.test"))
        .await
        .unwrap();
    assert_eq!(tls::served_cert(&before), old.der);
    let mut kept = tls::h1(before).await;
    assert_eq!(get_over_h1(&mut kept, "/").await.0, 200);

    // A new certificate at the same paths is picked up by polling.
    let new = tls::write_cert(&dir, "site", &["a.test"]);
    assert_ne!(new.der, old.der);
    wait_until(
        Duration::from_secs(20),
        "the new certificate is served",
        || async {
            let s = tls::connect(addr, &ClientOpts::sni("a.test"))
                .await
                .unwrap();
            tls::served_cert(&s) == new.der
        },
    )
    .await;
    // The connection opened before is still up and serving.
    assert_eq!(get_over_h1(&mut kept, "/").await.0, 200);
    assert!(
        metric(
            admin,
            "flashgate_tls_cert_reloads_total{listener=\"tls\",result=\"ok\"}"
        )
        .await
            >= 1.0
    );

    // A broken certificate is refused; the last good one keeps serving.
    std::fs::write(
        &new.cert,
        "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    wait_until(
        Duration::from_secs(20),
        "the bad certificate is counted",
        || async {
            metric(
                admin,
                "flashgate_tls_cert_reloads_total{listener=\"tls\",result=\"error\"}",
            )
            .await
                >= 1.0
        },
    )
    .await;
    let s = tls::connect(addr, &ClientOpts::sni("a.test"))
        .await
        .unwrap();
    assert_eq!(tls::served_cert(&s), new.der);
    let mut send = tls::h1(s).await;
    assert_eq!(get_over_h1(&mut send, "/").await.0, 200);
    assert_eq!(get_over_h1(&mut kept, "/").await.0, 200);
}

/// Seconds since the Unix epoch, now.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn certificate_expiry_is_exported_and_follows_a_reload() {
    let dir = tls::temp_dir("expiry");
    // notAfter 2030-01-01T00:00:00Z, then 2031-06-01T00:00:00Z.
    const FIRST: i64 = 1_893_456_000;
    const SECOND: i64 = 1_938_038_400;
    let first = tls::write_cert_until(&dir, "site", &["expiry.test"], (2030, 1, 1));
    let up = Upstream::fixed("ok").await;
    let gw = gateway(&tls_config(
        up.addr,
        &pair(&first),
        "reload_interval = \"100ms\"",
    ))
    .await;
    let addr = gw.addr("tls").unwrap();
    let admin = gw.admin_addr();
    // Served over real TLS: the certificate the gauge describes.
    let s = tls::connect(addr, &ClientOpts::sni("expiry.test"))
        .await
        .unwrap();
    assert_eq!(tls::served_cert(&s), first.der);
    let series = "flashgate_tls_cert_expiry_seconds{listener=\"tls\",name=\"expiry.test\"}";
    let left = metric(admin, series).await as i64;
    // Set at load and on every check since: within a minute of the truth
    // (generous for a busy machine).
    assert!(
        (left - (FIRST - unix_now())).abs() <= 60,
        "{left} s left, expected about {}",
        FIRST - unix_now()
    );

    // A renewed certificate at the same paths: the gauge follows.
    let second = tls::write_cert_until(&dir, "site", &["expiry.test"], (2031, 6, 1));
    wait_until(
        Duration::from_secs(20),
        "the renewed certificate's expiry is exported",
        || async {
            let left = metric(admin, series).await as i64;
            (left - (SECOND - unix_now())).abs() <= 60
        },
    )
    .await;
    let s = tls::connect(addr, &ClientOpts::sni("expiry.test"))
        .await
        .unwrap();
    assert_eq!(tls::served_cert(&s), second.der);
}

/// What `flashgate check` reports for config text: validation, then
/// building what the file names (`Runtime::check`).
fn check(text: &str) -> Result<(), gateway::ConfigError> {
    gateway::pipeline::runtime::Runtime::check(&flashgate_tests::Config::parse(text)?)
}

#[tokio::test]
async fn bad_certificate_files_are_config_errors_with_their_key() {
    let dir = tls::temp_dir("check");
    let a = tls::write_cert(&dir, "a", &["a.test"]);
    let b = tls::write_cert(&dir, "b", &["b.test"]);
    let up = "127.0.0.1:9".parse().unwrap();
    let mixed = format!(
        "{{ cert = \"{}\", key = \"{}\" }}",
        a.cert.display(),
        b.key.display()
    );
    let e = check(&tls_config(up, &format!("{}, {mixed}", pair(&a)), "")).unwrap_err();
    assert_eq!(e.path, "listeners[0].tls.certs[1]", "{e}");
    let missing = "{ cert = \"/nonexistent/c.pem\", key = \"/nonexistent/k.pem\" }";
    let e = check(&tls_config(up, missing, "")).unwrap_err();
    assert_eq!(e.path, "listeners[0].tls.certs[0]", "{e}");
    assert!(e.message.contains("/nonexistent/c.pem"), "{e}");
    // Starting loads the pairs too, and refuses with the same key path.
    let text = tls_config(up, missing, "");
    let e = flashgate_tests::Gateway::start(flashgate_tests::Config::parse(&text).unwrap(), None)
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("listeners[0].tls.certs[0]"), "{e}");
    let e = flashgate_tests::Config::parse(&tls_config(up, "", "")).unwrap_err();
    assert_eq!(e.path, "listeners[0].tls.certs", "{e}");
}

/// `POST /admin/reload` re-reads the certificate files at once (no wait for
/// the poller); a bad file refuses the reload with its key path.
#[tokio::test]
async fn config_reload_rereads_certificates() {
    let dir = tls::temp_dir("reload-admin");
    let old = tls::write_cert(&dir, "site", &["a.test"]);
    let up = Upstream::fixed("ok").await;
    let path = dir.join("gw.toml");
    std::fs::write(
        &path,
        tls_config(up.addr, &pair(&old), "reload_interval = \"1h\""),
    )
    .unwrap();
    let gw = flashgate_tests::Gateway::start(
        flashgate_tests::Config::load(&path).unwrap(),
        Some(path.clone()),
    )
    .await
    .unwrap();
    let addr = gw.addr("tls").unwrap();
    let reload = || async {
        flashgate_tests::send(
            Request::post(format!("http://{}/admin/reload", gw.admin_addr()))
                .header("authorization", "Bearer t")
                .body(empty())
                .unwrap(),
        )
        .await
    };
    let new = tls::write_cert(&dir, "site", &["a.test"]);
    let answer = reload().await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["tls_errors"], serde_json::json!([]));
    let s = tls::connect(addr, &ClientOpts::sni("a.test"))
        .await
        .unwrap();
    assert_eq!(
        tls::served_cert(&s),
        new.der,
        "served right after the reload"
    );

    // A bad key file refuses the reload (it loads every pair before it
    // swaps anything) with the key path; nothing changes.
    std::fs::write(&new.key, "garbage").unwrap();
    let answer = reload().await;
    assert_eq!(answer.status, 400, "{}", answer.text());
    let error = answer.json()["error"].as_str().unwrap_or("").to_string();
    assert!(
        error.contains("listeners[0].tls.certs[0]") && error.contains("site.key"),
        "{error}"
    );
    let s = tls::connect(addr, &ClientOpts::sni("a.test"))
        .await
        .unwrap();
    assert_eq!(
        tls::served_cert(&s),
        new.der,
        "the last good certificate stays"
    );
}
