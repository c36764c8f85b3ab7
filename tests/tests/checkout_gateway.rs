//! The gateway's side of checkout: JWT identity forwarded as `x-user-id`
//! (and a forged one never passing), the edge's sold-out flag, retries only
//! when an Idempotency-Key makes them safe, and `flashgate demo` selling a
//! demo sneaker through the in-process order core.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flashgate_tests::{client, full, gateway, reply, send, Demo, Got, Upstream};
use http::Request;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "checkout-test-secret-0123";

fn token(sub: &str, secret: &str, exp_in: i64) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + exp_in;
    encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": sub, "exp": exp}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn config(upstream: &[SocketAddr], retries: u32) -> String {
    let eps: Vec<String> = upstream.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\n[log]\naccess_log = false\n\
         [[listeners]]\nname = \"public\"\nlisten = \"127.0.0.1:0\"\n\
         [[upstreams]]\nname = \"core\"\nendpoints = [{}]\nretries = {retries}\n\
         [upstreams.outlier]\nconsecutive_failures = 0\n\
         [[routes]]\nname = \"checkout\"\npath_prefix = \"/checkout\"\nupstream = \"core\"\n\
         priority = \"critical\"\ncheckout = {{ sold_out_ttl = \"30s\" }}\n\
         [[routes]]\nname = \"other\"\npath_prefix = \"/\"\nupstream = \"core\"\n\
         [jwt]\nalgorithm = \"HS256\"\nsecret = \"{SECRET}\"\n",
        eps.join(", ")
    )
}

async fn post(base: SocketAddr, path: &str, headers: &[(&str, String)], body: &str) -> Got {
    let mut b = Request::post(format!("http://{base}{path}"));
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    send(b.body(full(body.to_string())).unwrap()).await
}

#[tokio::test]
async fn the_verified_subject_is_the_user_and_a_forged_one_never_passes() {
    let echo = Upstream::echo().await;
    let gw = gateway(&config(&[echo.addr], 1)).await;
    let base = gw.addr("public").unwrap();
    let body = r#"{"sku":"a","qty":1}"#;

    let got = post(
        base,
        "/checkout",
        &[
            (
                "authorization",
                format!("Bearer {}", token("alice", SECRET, 60)),
            ),
            ("x-user-id", "mallory".into()),
        ],
        body,
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["headers"]["x-user-id"], "alice");
    assert_eq!(got.json()["body_len"], body.len());

    // No token, a forged header: 401 at the edge, the core never sees it.
    let hits = echo.hits();
    for auth in [
        None,
        Some(token("alice", "another-secret-0123456", 60)),
        Some(token("alice", SECRET, -600)),
    ] {
        let mut h = vec![("x-user-id", "mallory".to_string())];
        if let Some(t) = auth {
            h.push(("authorization", format!("Bearer {t}")));
        }
        let got = post(base, "/checkout", &h, body).await;
        assert_eq!(got.status, 401, "{}", got.text());
        let challenge = if h.len() == 1 {
            "Bearer"
        } else {
            "Bearer error=\"invalid_token\""
        };
        assert_eq!(got.header("www-authenticate"), Some(challenge));
    }
    assert_eq!(echo.hits(), hits);

    // Other routes: the forged header is stripped too.
    let got = post(base, "/elsewhere", &[("x-user-id", "mallory".into())], "").await;
    assert!(
        got.json()["headers"].get("x-user-id").is_none(),
        "{}",
        got.text()
    );
}

#[tokio::test]
async fn a_409_from_the_core_is_answered_at_the_edge_until_the_flag_expires() {
    let up = Upstream::start(|_| async { reply(409, r#"{"error":"sold_out"}"#) }).await;
    let gw = gateway(&config(&[up.addr], 1)).await;
    let base = gw.addr("public").unwrap();
    let auth = (
        "authorization",
        format!("Bearer {}", token("bob", SECRET, 60)),
    );
    let first = post(
        base,
        "/checkout",
        std::slice::from_ref(&auth),
        r#"{"sku":"gone","qty":1}"#,
    )
    .await;
    assert_eq!(first.status, 409);
    assert_eq!(up.hits(), 1);
    for _ in 0..5 {
        let again = post(
            base,
            "/checkout",
            std::slice::from_ref(&auth),
            r#"{"sku":"gone","qty":1}"#,
        )
        .await;
        assert_eq!(again.status, 409);
        assert_eq!(again.header("x-flashgate-sold-out"), Some("edge"));
    }
    assert_eq!(up.hits(), 1, "the edge answered the losers");
    // Another SKU still goes through.
    post(
        base,
        "/checkout",
        std::slice::from_ref(&auth),
        r#"{"sku":"other","qty":1}"#,
    )
    .await;
    assert_eq!(up.hits(), 2);
}

/// A raw upstream that resets its first `resets` connections after reading
/// the request, then answers 201; counts connections.
async fn flaky(resets: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let i = count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                if i < resets {
                    // Closed before any answer: a reset as the proxy sees it.
                    return;
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                    )
                    .await;
            });
        }
    });
    (addr, n)
}

#[tokio::test]
async fn a_checkout_is_retried_after_a_reset_only_with_an_idempotency_key() {
    let auth = (
        "authorization",
        format!("Bearer {}", token("carol", SECRET, 60)),
    );
    let body = r#"{"sku":"s","qty":1}"#;

    let (addr, conns) = flaky(1).await;
    let gw = gateway(&config(&[addr], 1)).await;
    let base = gw.addr("public").unwrap();
    let got = post(
        base,
        "/checkout",
        &[auth.clone(), ("idempotency-key", "k1".into())],
        body,
    )
    .await;
    assert_eq!(got.status, 201, "retried after the reset: {}", got.text());
    assert_eq!(conns.load(Ordering::SeqCst), 2);

    let (addr, conns) = flaky(1).await;
    let gw = gateway(&config(&[addr], 1)).await;
    let base = gw.addr("public").unwrap();
    let got = post(base, "/checkout", std::slice::from_ref(&auth), body).await;
    assert_eq!(
        got.status,
        502,
        "a POST without a key is not retried: {}",
        got.text()
    );
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

/// `flashgate demo` as a new user runs it: the printed curl buys a demo
/// sneaker and the stock falls.
#[tokio::test]
async fn demo_sells_a_sneaker_through_the_in_process_core() {
    let Demo {
        proc: mut child,
        banner: lines,
        ..
    } = Demo::start("127.0.0.1:0", &["--core", "127.0.0.1:0"]).await;
    let curl = lines
        .iter()
        .find(|l| l.contains("curl -i -X POST"))
        .unwrap_or_else(|| panic!("no checkout curl in {lines:?}"));
    let word_after = |line: &str, marker: &str| -> String {
        line.split(marker)
            .nth(1)
            .unwrap()
            .split(['\'', ' '])
            .next()
            .unwrap()
            .to_string()
    };
    let url = curl
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();
    let token = word_after(curl, "Bearer ");
    let stock_line = lines.iter().find(|l| l.contains("/admin/stock/")).unwrap();
    let stock_url = stock_line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();
    let stock = || async {
        let req = Request::get(&stock_url)
            .header("authorization", "Bearer demo-token")
            .body(flashgate_tests::empty())
            .unwrap();
        send(req).await.json()["stock"].as_i64().unwrap()
    };
    assert_eq!(stock().await, 100);

    let buy = |key: &'static str| {
        let (url, token) = (url.clone(), token.clone());
        async move {
            let req = Request::post(url)
                .header("authorization", format!("Bearer {token}"))
                .header("idempotency-key", key)
                .header("content-type", "application/json")
                .body(full(r#"{"sku":"demo-sneaker","qty":1}"#))
                .unwrap();
            flashgate_tests::send_with(&client(), req).await
        }
    };
    let first = buy("buy-1").await;
    assert_eq!(first.status, 201, "{}", first.text());
    let again = buy("buy-1").await;
    assert_eq!(again.status, 200, "replay");
    assert_eq!(again.json()["order"]["id"], first.json()["order"]["id"]);
    assert_eq!(buy("buy-2").await.status, 429, "one per user by default");
    assert_eq!(stock().await, 99);
    child.signal("TERM");
    assert!(child.wait_exit(Duration::from_secs(10)).is_some());
}

/// A client that sends the checkout head and then dribbles its body gets
/// 408 after `body_timeout` (and the connection closes); nothing reaches
/// the core.
#[tokio::test]
async fn a_dribbled_checkout_body_gets_408_after_body_timeout() {
    let up = Upstream::echo().await;
    let cfg = config(&[up.addr], 0).replace(
        "checkout = { sold_out_ttl = \"30s\" }",
        "checkout = { sold_out_ttl = \"30s\", body_timeout = \"300ms\" }",
    );
    let gw = gateway(&cfg).await;
    let base = gw.addr("public").unwrap();
    let mut s = tokio::net::TcpStream::connect(base).await.unwrap();
    let head = format!(
        "POST /checkout HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: 26\r\n\r\n{{\"sku\":",
        token("eve", SECRET, 60)
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let answer = flashgate_tests::raw::read_to_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!(flashgate_tests::raw::status(&answer), Some(408), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert_eq!(up.hits(), 0);
}

/// A core that answers `503 {"error": code}` to the first `failures`
/// checkouts, then 201.
async fn failing_core(code: &'static str, failures: usize) -> Upstream {
    let n = Arc::new(AtomicUsize::new(0));
    Upstream::start(move |_| {
        let n = n.clone();
        async move {
            if n.fetch_add(1, Ordering::SeqCst) < failures {
                let mut r = reply(503, format!(r#"{{"error":"{code}","detail":"x"}}"#));
                r.headers_mut()
                    .insert("retry-after", http::HeaderValue::from_static("1"));
                r
            } else {
                reply(201, r#"{"order":{"id":"a.1"}}"#)
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_checkout_the_core_answers_unavailable_is_retried_within_the_budget() {
    let auth = (
        "authorization",
        format!("Bearer {}", token("erin", SECRET, 60)),
    );
    let key = ("idempotency-key", "k-erin".to_string());
    let body = r#"{"sku":"a","qty":1}"#;

    // Two 503s (a failover's detection window), then the order: the buyer
    // sees only the order.
    let core = failing_core("unavailable", 2).await;
    let gw = gateway(&config(&[core.addr], 1)).await;
    let base = gw.addr("public").unwrap();
    let got = post(base, "/checkout", &[auth.clone(), key.clone()], body).await;
    assert_eq!(got.status, 201, "{}", got.text());
    assert_eq!(core.hits(), 3);
    let metrics = send(
        Request::get(format!("http://{}/metrics", gw.admin_addr()))
            .body(flashgate_tests::empty())
            .unwrap(),
    )
    .await
    .text();
    assert!(
        metrics.contains(
            "flashgate_checkout_unavailable_retries_total{outcome=\"retried\",route=\"checkout\"} 2"
        ) && metrics.contains(
            "flashgate_checkout_unavailable_retries_total{outcome=\"recovered\",route=\"checkout\"} 1"
        ),
        "{metrics}"
    );

    // Without a key: never repeated.
    let core = failing_core("unavailable", 1).await;
    let gw = gateway(&config(&[core.addr], 1)).await;
    let base = gw.addr("public").unwrap();
    let got = post(base, "/checkout", std::slice::from_ref(&auth), body).await;
    assert_eq!(got.status, 503);
    assert_eq!(core.hits(), 1);

    // `busy` is the core shedding load: not repeated either, and the
    // core's answer reaches the buyer as it was.
    let core = failing_core("busy", 1).await;
    let gw = gateway(&config(&[core.addr], 1)).await;
    let base = gw.addr("public").unwrap();
    let got = post(base, "/checkout", &[auth.clone(), key.clone()], body).await;
    assert_eq!(got.status, 503);
    assert_eq!(got.json()["error"], "busy");
    assert_eq!(got.header("retry-after"), Some("1"));
    assert_eq!(core.hits(), 1);

    // Still down when the budget (1.5 s: 100 + 200 + 400 ms of waits fit,
    // the next 800 would not) is spent: the 503 goes to the buyer.
    let core = failing_core("unavailable", usize::MAX).await;
    let gw = gateway(&config(&[core.addr], 1)).await;
    let base = gw.addr("public").unwrap();
    let got = post(base, "/checkout", &[auth, key], body).await;
    assert_eq!(got.status, 503);
    assert_eq!(got.json()["error"], "unavailable");
    assert_eq!(core.hits(), 4);
}
