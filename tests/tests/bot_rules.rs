//! Bot rules end to end, on a real gateway over loopback: every action
//! (block, tarpit with its cap, challenge, deprioritize, log), each kind
//! of condition (user agent, missing headers, IP lists inline and from a
//! file reloaded on change, request shape, a trusted proxy's JA4), and
//! the proof-of-work challenge solved by this test, with refusals for a
//! wrong nonce and for expired or moved cookies; the JA4 of curl's and
//! python's ClientHello as flashgate computes it against an independent
//! implementation (tests/ja4_reference.py) on the captured bytes.
//!
//! Client addresses other than loopback come through `x-forwarded-for`
//! with loopback as the trusted proxy. No assertion depends on a race:
//! the tarpit's cap is filled before the request that must find it full.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flashgate_tests::*;
use http::Request;

const CHROME: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36";

/// The usual config with loopback as a trusted proxy and `extra` after
/// the route (bot rules, `[challenge]`, `[overload]`).
async fn start(up: &Upstream, extra: &str) -> Gateway {
    let text = Cfg::new(&[up.addr]).section(extra).build().replacen(
        "name = \"public\"",
        "name = \"public\"\ntrusted_proxies = [\"127.0.0.1/32\"]",
        1,
    );
    gateway(&text).await
}

/// `GET path` from client `ip` with `headers`.
async fn get_as(gw: &Gateway, path: &str, ip: &str, headers: &[(&str, &str)]) -> Got {
    let mut req = Request::get(format!("http://{}{path}", gw.addr("public").unwrap()))
        .header("x-forwarded-for", ip);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(req.body(empty()).unwrap()).await
}

async fn decisions(gw: &Gateway, rule: &str, outcome: &str) -> f64 {
    metric(
        gw.admin_addr(),
        &format!("flashgate_bot_decisions_total{{outcome=\"{outcome}\",route=\"default\",rule=\"{rule}\"}}"),
    )
    .await
}

#[tokio::test]
async fn block_refuses_listed_agents_with_a_json_403() {
    let up = Upstream::fixed("shop").await;
    let gw = start(
        &up,
        "[[bot_rules]]\nname = \"scrapers\"\nuser_agent = [\"(?i)python-requests\", \"(?i)scrapy\"]\naction = \"block\"",
    )
    .await;
    let got = get_as(
        &gw,
        "/p",
        "198.51.100.1",
        &[("user-agent", "python-requests/2.32")],
    )
    .await;
    assert_eq!(got.status, 403);
    assert_eq!(got.header("x-flashgate-error"), Some("bot_blocked"));
    assert_eq!(got.json()["error"], "bot_blocked");
    let got = get_as(&gw, "/p", "198.51.100.1", &[("user-agent", CHROME)]).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        up.hits(),
        1,
        "the blocked request never reached the upstream"
    );
    assert_eq!(decisions(&gw, "scrapers", "block").await, 1.0);
}

#[tokio::test]
async fn tarpit_holds_then_429_and_answers_at_once_beyond_its_cap() {
    let up = Upstream::fixed("shop").await;
    let gw = start(
        &up,
        "[[bot_rules]]\nname = \"slow\"\nuser_agent = [\"^curl/\"]\naction = \"tarpit\"\ntarpit_delay = \"3s\"\ntarpit_max = 1",
    )
    .await;
    let base = gw.addr("public").unwrap();
    let started = Instant::now();
    let held = tokio::spawn(async move {
        let got = send(
            Request::get(format!("http://{base}/p"))
                .header("user-agent", "curl/8.5")
                .body(empty())
                .unwrap(),
        )
        .await;
        (got, started.elapsed())
    });
    wait_until(
        Duration::from_secs(20),
        "the first request is held",
        || async { decisions(&gw, "slow", "tarpit").await >= 1.0 },
    )
    .await;
    // The one slot is taken: the next is answered without the wait.
    let got = get_as(&gw, "/p", "127.0.0.1", &[("user-agent", "curl/8.5")]).await;
    assert_eq!(got.status, 429);
    assert_eq!(got.header("x-flashgate-error"), Some("bot_tarpit"));
    assert_eq!(decisions(&gw, "slow", "tarpit_full").await, 1.0);
    let (got, took) = held.await.unwrap();
    assert_eq!(got.status, 429);
    assert_eq!(got.header("retry-after"), Some("3"));
    assert!(
        took >= Duration::from_secs(3),
        "held for the delay, took {took:?}"
    );
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn deprioritized_requests_are_shed_first_and_log_lets_them_through() {
    let up = Upstream::fixed("shop").await;
    let gw = start(
        &up,
        "[[bot_rules]]\nname = \"no-language\"\nmissing_headers = [\"accept-language\"]\naction = \"log\"\n\
         [[bot_rules]]\nname = \"headless\"\nuser_agent = [\"HeadlessChrome\"]\naction = \"deprioritize\"\n\
         [overload]\nallow_forced_level = true",
    )
    .await;
    let headless = [
        ("user-agent", "Mozilla/5.0 HeadlessChrome/126.0"),
        ("accept-language", "en"),
    ];
    let plain = [("user-agent", CHROME), ("accept-language", "en")];
    // Calm: both pass; `log` lets a request without accept-language pass.
    assert_eq!(get_as(&gw, "/p", "192.0.2.1", &headless).await.status, 200);
    assert_eq!(
        get_as(&gw, "/p", "192.0.2.1", &[("user-agent", CHROME)])
            .await
            .status,
        200
    );
    assert_eq!(decisions(&gw, "no-language", "log").await, 1.0);
    assert_eq!(decisions(&gw, "headless", "deprioritize").await, 1.0);
    // At level 2 a normal route degrades (no cache or fallback here: it
    // is sent) while a deprioritized request of it is shed.
    let forced = send(
        Request::post(format!("http://{}/admin/load-level", gw.admin_addr()))
            .header("authorization", "Bearer test-token")
            .body(full(r#"{"level": 2, "for": "60s"}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(forced.status, 200, "{}", forced.text());
    assert_eq!(get_as(&gw, "/p", "192.0.2.1", &plain).await.status, 200);
    let got = get_as(&gw, "/p", "192.0.2.1", &headless).await;
    assert_eq!(got.status, 503);
    assert_eq!(got.header("x-flashgate-error"), Some("overloaded"));
}

#[tokio::test]
async fn ip_lists_inline_and_from_a_file_that_is_reloaded() {
    let up = Upstream::fixed("shop").await;
    let dir = std::env::temp_dir().join(format!("fg-bots-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ips.txt");
    std::fs::write(&file, "# known scrapers\n198.51.100.0/24\n").unwrap();
    let gw = start(
        &up,
        &format!(
            "[[bot_rules]]\nname = \"listed\"\nip = [\"192.0.2.66\"]\nip_file = \"{}\"\naction = \"block\"",
            file.display()
        ),
    )
    .await;
    assert_eq!(get_as(&gw, "/", "198.51.100.9", &[]).await.status, 403);
    assert_eq!(get_as(&gw, "/", "192.0.2.66", &[]).await.status, 403);
    assert_eq!(get_as(&gw, "/", "203.0.113.5", &[]).await.status, 200);
    // The file changes: the new list applies without a reload.
    std::fs::write(&file, "198.51.100.0/24\n203.0.113.0/24 # added\n").unwrap();
    wait_until(
        Duration::from_secs(20),
        "the ip_file's new entry applies",
        || async { get_as(&gw, "/", "203.0.113.5", &[]).await.status == 403 },
    )
    .await;
    // A broken file keeps the last good list.
    std::fs::write(&file, "not an address\n").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(get_as(&gw, "/", "203.0.113.5", &[]).await.status, 403);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_client_that_only_ever_hits_checkout_has_the_shape() {
    let up = Upstream::fixed("ok").await;
    let gw = start(
        &up,
        "[[bot_rules]]\nname = \"checkout-only\"\nshape = { path_prefix = \"/checkout\", min_requests = 3 }\naction = \"block\"",
    )
    .await;
    let bot = "198.51.100.20";
    assert_eq!(get_as(&gw, "/checkout", bot, &[]).await.status, 200);
    assert_eq!(get_as(&gw, "/checkout", bot, &[]).await.status, 200);
    assert_eq!(get_as(&gw, "/checkout", bot, &[]).await.status, 403);
    // A shopper who looked at the product first is not that client.
    let shopper = "192.0.2.20";
    assert_eq!(get_as(&gw, "/products/1", shopper, &[]).await.status, 200);
    for _ in 0..4 {
        assert_eq!(get_as(&gw, "/checkout", shopper, &[]).await.status, 200);
    }
}

#[tokio::test]
async fn ja4_from_a_trusted_proxy_only() {
    let fp = "t13d1516h2_8daaf6152771_02713d6af862";
    let up = Upstream::echo().await;
    let gw = start(
        &up,
        &format!("[[bot_rules]]\nname = \"bad-tls\"\nja4 = [\"{fp}\"]\naction = \"block\""),
    )
    .await;
    let header = [("cloudfront-viewer-ja4-fingerprint", fp)];
    assert_eq!(get_as(&gw, "/", "192.0.2.1", &header).await.status, 403);
    let other = [(
        "cloudfront-viewer-ja4-fingerprint",
        "t13d1517h2_8daaf6152771_b0da82dd1658",
    )];
    let got = get_as(&gw, "/", "192.0.2.1", &other).await;
    assert_eq!(got.status, 200);
    // Without trusted proxies the header is the client's own: ignored,
    // and never passed on.
    let up2 = Upstream::echo().await;
    let gw2 = gateway(
        &Cfg::new(&[up2.addr])
            .section(format!(
                "[[bot_rules]]\nname = \"bad-tls\"\nja4 = [\"{fp}\"]\naction = \"block\""
            ))
            .build(),
    )
    .await;
    let got = get_as(&gw2, "/", "192.0.2.1", &header).await;
    assert_eq!(got.status, 200);
    assert!(got.json()["headers"]["cloudfront-viewer-ja4-fingerprint"].is_null());
}

/// Asks as an API client, solves, exchanges: the clearance cookie pair.
async fn clear(gw: &Gateway, ip: &str, ua: &str) -> String {
    let got = get_as(
        gw,
        "/p",
        ip,
        &[("user-agent", ua), ("accept", "application/json")],
    )
    .await;
    assert_eq!(got.status, 403, "{}", got.text());
    let body = got.json();
    assert_eq!(body["error"], "challenge_required");
    let challenge = body["challenge"]["challenge"].as_str().unwrap().to_string();
    let difficulty = body["challenge"]["difficulty"].as_u64().unwrap() as u32;
    assert_eq!(
        got.header("x-flashgate-challenge"),
        Some(challenge.as_str())
    );
    let nonce = solve_challenge(&challenge, difficulty);
    let got = get_as(
        gw,
        "/p",
        ip,
        &[
            ("user-agent", ua),
            ("x-flashgate-challenge", &challenge),
            ("x-flashgate-nonce", &nonce),
        ],
    )
    .await;
    assert_eq!(got.status, 204, "{}", got.text());
    let set = got
        .header("set-cookie")
        .expect("a clearance cookie")
        .to_string();
    assert!(set.contains("HttpOnly"), "{set}");
    set.split(';').next().unwrap().to_string()
}

#[tokio::test]
async fn the_challenge_solved_by_a_script_lets_it_through_and_nothing_else_does() {
    let up = Upstream::fixed("shop").await;
    let gw = start(
        &up,
        "[[bot_rules]]\nname = \"suspects\"\nuser_agent = [\"(?i)bot\"]\naction = \"challenge\"\n\
         [challenge]\ndifficulty = 12",
    )
    .await;
    let (ip, ua) = ("198.51.100.7", "shopbot/1.0");
    let cookie = clear(&gw, ip, ua).await;
    let with = |ip: &'static str, ua: &'static str, cookie: String| {
        let gw = &gw;
        async move { get_as(gw, "/p", ip, &[("user-agent", ua), ("cookie", &cookie)]).await }
    };
    assert_eq!(with(ip, ua, cookie.clone()).await.status, 200);
    // Another address in the same /24 is the same client.
    assert_eq!(with("198.51.100.99", ua, cookie.clone()).await.status, 200);
    assert_eq!(up.hits(), 2);
    // Moved: another network, or another user agent.
    let got = with("203.0.113.7", ua, cookie.clone()).await;
    assert_eq!(got.status, 403);
    assert_eq!(got.json()["error"], "challenge_required");
    assert_eq!(with(ip, "otherbot/2", cookie.clone()).await.status, 403);
    // A tampered cookie.
    let (name, value) = cookie.split_once('=').unwrap();
    let (exp, sig) = value.split_once('.').unwrap();
    let longer = format!("{name}={}.{sig}", exp.parse::<u64>().unwrap() + 86_400);
    assert_eq!(with(ip, ua, longer).await.status, 403);

    // A wrong nonce: refused, and no cookie.
    let got = get_as(
        &gw,
        "/p",
        ip,
        &[("user-agent", ua), ("accept", "application/json")],
    )
    .await;
    let challenge = got.json()["challenge"]["challenge"]
        .as_str()
        .unwrap()
        .to_string();
    let good = solve_challenge(&challenge, 12);
    let wrong = (0u64..)
        .map(|n| n.to_string())
        .find(|n| challenge_bits(&challenge, n) < 12)
        .unwrap();
    let got = get_as(
        &gw,
        "/p",
        ip,
        &[
            ("user-agent", ua),
            ("x-flashgate-challenge", &challenge),
            ("x-flashgate-nonce", &wrong),
        ],
    )
    .await;
    assert_eq!(got.status, 403);
    assert_eq!(got.json()["error"], "challenge_failed");
    assert!(got.header("set-cookie").is_none());
    // The right nonce for the challenge, sent from another network.
    let got = get_as(
        &gw,
        "/p",
        "203.0.113.7",
        &[
            ("user-agent", ua),
            ("x-flashgate-challenge", &challenge),
            ("x-flashgate-nonce", &good),
        ],
    )
    .await;
    assert_eq!(got.json()["error"], "challenge_failed");

    // A browser gets the page, with the same challenge in its script.
    let got = get_as(
        &gw,
        "/p",
        ip,
        &[("user-agent", ua), ("accept", "text/html,*/*")],
    )
    .await;
    assert_eq!(got.status, 403);
    assert!(got.header("content-type").unwrap().starts_with("text/html"));
    let page = got.text();
    let issued = got.header("x-flashgate-challenge").unwrap();
    assert!(
        page.contains(&format!("var C=\"{issued}\",D=12;")),
        "{page}"
    );
    assert!(page.contains("x-flashgate-nonce"));
    // A client no rule challenges never sees it.
    assert_eq!(
        get_as(&gw, "/p", ip, &[("user-agent", CHROME)])
            .await
            .status,
        200
    );

    let admin = gw.admin_addr();
    assert!(metric(admin, "flashgate_challenges_total{event=\"issued\"}").await >= 5.0);
    assert_eq!(
        metric(admin, "flashgate_challenges_total{event=\"passed\"}").await,
        1.0
    );
    assert_eq!(
        metric(admin, "flashgate_challenges_total{event=\"failed\"}").await,
        2.0
    );
    assert_eq!(decisions(&gw, "suspects", "cleared").await, 2.0);
}

#[tokio::test]
async fn a_clearance_cookie_expires() {
    let up = Upstream::fixed("shop").await;
    let gw = start(
        &up,
        "[[bot_rules]]\nname = \"all-curl\"\nuser_agent = [\"^curl/\"]\naction = \"challenge\"\n\
         [challenge]\ndifficulty = 8\nclearance_ttl = \"1s\"",
    )
    .await;
    let cookie = clear(&gw, "192.0.2.5", "curl/8").await;
    // Good for at most its second, then refused (polled: the first
    // request may already fall after the expiry on a slow machine).
    wait_until(Duration::from_secs(20), "the cookie expires", || async {
        get_as(
            &gw,
            "/p",
            "192.0.2.5",
            &[("user-agent", "curl/8"), ("cookie", &cookie)],
        )
        .await
        .status
            == 403
    })
    .await;
}

/// A TCP relay in front of `target` that keeps what each client sent
/// (its first 64 KiB): the ClientHello's bytes as they went to the
/// gateway.
async fn relay(target: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let index = {
                    let mut k = kept.lock().unwrap();
                    k.push(Vec::new());
                    k.len() - 1
                };
                let up = async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        {
                            let mut k = kept.lock().unwrap();
                            let mine = &mut k[index];
                            if mine.len() < 64 * 1024 {
                                mine.extend_from_slice(&buf[..n]);
                            }
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                };
                let down = async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    (addr, seen)
}

/// The JA4 of `hello` by the independent reference (tests/ja4_reference.py).
fn reference_ja4(hello: &[u8]) -> String {
    let hex: String = hello.iter().map(|b| format!("{b:02x}")).collect();
    let out = std::process::Command::new("python3")
        .arg(repo_root().join("tests/ja4_reference.py"))
        .arg(hex)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// What the gateway computed for a connection: the test-host guest
/// copies `flashgate.ja4` into `x-prop-ja4`, which the echo upstream
/// sends back.
fn gateway_ja4(echoed: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(echoed).unwrap_or_else(|e| panic!("{e}: {echoed}"));
    v["headers"]["x-prop-ja4"]
        .as_str()
        .unwrap_or("<missing>")
        .to_string()
}

#[tokio::test]
async fn ja4_of_real_tls_clients_matches_the_reference() {
    let dir = flashgate_tests::tls::temp_dir("ja4");
    let cert = flashgate_tests::tls::write_cert(&dir, "a", &["a.test"]);
    let up = Upstream::echo().await;
    let listener = format!(
        "[listeners.tls]\ncerts = [{{ cert = \"{}\", key = \"{}\" }}]",
        cert.cert.display(),
        cert.key.display()
    );
    let route = format!(
        "filters = [\"props\"]\n[[filters]]\nname = \"props\"\nwasm = \"{}\"\ntimeout = \"2s\"",
        wasm_plugin("test_host").display()
    );
    let gw = gateway(&edge::config(up.addr, &listener, &route)).await;
    let (front, seen) = relay(gw.addr("public").unwrap()).await;
    let port = front.port();

    // curl (OpenSSL, ALPN h2 + http/1.1, SNI).
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sk", "--max-time", "20", "--resolve"])
            .arg(format!("a.test:{port}:127.0.0.1"))
            .arg(format!("https://a.test:{port}/who"))
            .args(["-H", "x-test: props"])
            .output()
            .expect("curl runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by_gateway = gateway_ja4(&String::from_utf8_lossy(&out.stdout));
    let hello = seen.lock().unwrap()[0].clone();
    let expected = reference_ja4(&hello);
    assert!(expected.starts_with("t1"), "{expected}");
    println!("curl: JA4 {expected}");
    assert_eq!(by_gateway, expected, "curl");

    // python's ssl module (no ALPN), as a plain HTTP/1.1 client.
    let script = format!(
        "import socket, ssl\n\
         c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE\n\
         s = c.wrap_socket(socket.create_connection(('127.0.0.1', {port})), server_hostname='a.test')\n\
         s.sendall(b'GET /who HTTP/1.1\\r\\nHost: a.test\\r\\nx-test: props\\r\\nConnection: close\\r\\n\\r\\n')\n\
         data = b''\n\
         while True:\n    chunk = s.recv(65536)\n    if not chunk: break\n    data += chunk\n\
         print(data.split(b'\\r\\n\\r\\n', 1)[1].decode())\n"
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by_gateway = gateway_ja4(&String::from_utf8_lossy(&out.stdout));
    let hello = seen.lock().unwrap()[1].clone();
    let expected = reference_ja4(&hello);
    assert!(expected.contains("00_"), "no ALPN: {expected}");
    println!("python ssl: JA4 {expected}");
    assert_eq!(by_gateway, expected, "python ssl");
}

// ---- JWT: ES256, JWKS by kid (reloaded), nbf, identity = "required" ----

fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// A P-256 key: its PKCS#8 PEM (to sign with) and its JWK (to verify).
fn es256_key(kid: &str) -> (rcgen::KeyPair, serde_json::Value) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = kp.public_key_raw();
    assert_eq!(raw.len(), 65, "uncompressed point");
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
        "x": b64url(&raw[1..33]), "y": b64url(&raw[33..]),
    });
    (kp, jwk)
}

fn es256_token(kp: &rcgen::KeyPair, kid: Option<&str>, sub: &str, nbf_in: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = kid.map(String::from);
    jsonwebtoken::encode(
        &header,
        &serde_json::json!({"sub": sub, "exp": now + 600, "nbf": now + nbf_in}),
        &jsonwebtoken::EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap()
}

async fn as_user(gw: &Gateway, token: Option<&str>) -> Got {
    let mut req = Request::get(format!("http://{}/account", gw.addr("public").unwrap()));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    send(req.body(empty()).unwrap()).await
}

#[tokio::test]
async fn es256_tokens_from_a_jwks_that_rotates_with_nbf_on_a_route_that_requires_them() {
    let dir = std::env::temp_dir().join(format!("fg-jwks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jwks = dir.join("jwks.json");
    let (k1, jwk1) = es256_key("k1");
    let (k2, jwk2) = es256_key("k2");
    std::fs::write(&jwks, serde_json::json!({"keys": [jwk1]}).to_string()).unwrap();
    let up = Upstream::echo().await;
    let text = Cfg::new(&[up.addr])
        .route("identity = \"required\"")
        .section(format!(
            "[jwt]\nalgorithm = \"ES256\"\njwks_file = \"{}\"",
            jwks.display()
        ))
        .build();
    let gw = gateway(&text).await;

    let got = as_user(&gw, Some(&es256_token(&k1, Some("k1"), "alice", 0))).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json()["headers"]["x-user-id"], "alice");
    // No token: 401 with the bearer challenge, nothing upstream.
    let hits = up.hits();
    let got = as_user(&gw, None).await;
    assert_eq!(got.status, 401);
    assert_eq!(got.header("www-authenticate"), Some("Bearer"));
    assert_eq!(got.json()["error"], "unauthenticated");
    // Not valid before an hour from now.
    let got = as_user(&gw, Some(&es256_token(&k1, Some("k1"), "alice", 3600))).await;
    assert_eq!(got.status, 401);
    assert_eq!(
        got.header("www-authenticate"),
        Some("Bearer error=\"invalid_token\"")
    );
    // No kid, or a kid the JWKS does not have yet.
    assert_eq!(
        as_user(&gw, Some(&es256_token(&k1, None, "alice", 0)))
            .await
            .status,
        401
    );
    let rotated = es256_token(&k2, Some("k2"), "bob", 0);
    assert_eq!(as_user(&gw, Some(&rotated)).await.status, 401);
    // A key signed by k2 under k1's kid.
    assert_eq!(
        as_user(&gw, Some(&es256_token(&k2, Some("k1"), "bob", 0)))
            .await
            .status,
        401
    );
    assert_eq!(
        up.hits(),
        hits,
        "refused requests never reached the upstream"
    );
    // The issuer rotates: k2 appears in the file, and works without a reload.
    std::fs::write(&jwks, serde_json::json!({"keys": [jwk1, jwk2]}).to_string()).unwrap();
    wait_until(
        Duration::from_secs(20),
        "the JWKS file's new key applies",
        || async { as_user(&gw, Some(&rotated)).await.status == 200 },
    )
    .await;

    // ES256 with one PEM public key.
    let pem = dir.join("es256.pem");
    std::fs::write(&pem, k1.public_key_pem()).unwrap();
    let text = Cfg::new(&[up.addr])
        .route("identity = \"required\"")
        .section(format!(
            "[jwt]\nalgorithm = \"ES256\"\npublic_key = \"{}\"",
            pem.display()
        ))
        .build();
    let gw2 = gateway(&text).await;
    let got = as_user(&gw2, Some(&es256_token(&k1, None, "carol", 0))).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json()["headers"]["x-user-id"], "carol");
    assert_eq!(
        as_user(&gw2, Some(&es256_token(&k2, None, "carol", 0)))
            .await
            .status,
        401
    );
    let _ = std::fs::remove_dir_all(&dir);
}
