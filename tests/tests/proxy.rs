//! The proxy path end to end: routing, headers, HTTP/2, streaming.

use std::time::Duration;

use bytes::Bytes;
use flashgate_tests::*;
use http::Request;
use http_body_util::channel::Channel;
use http_body_util::BodyExt;
use tokio::sync::mpsc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::test]
async fn routes_by_host_and_longest_prefix_and_404s() {
    let catalog = Upstream::fixed("catalog").await;
    let special = Upstream::fixed("special").await;
    let api = Upstream::fixed("api").await;
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[log]\naccess_log = false\n\
         [[listeners]]\nname = \"public\"\nlisten = \"127.0.0.1:0\"\n\
         [[upstreams]]\nname = \"catalog\"\nendpoints = [\"{}\"]\n\
         [[upstreams]]\nname = \"special\"\nendpoints = [\"{}\"]\n\
         [[upstreams]]\nname = \"api\"\nendpoints = [\"{}\"]\n\
         [[routes]]\npath_prefix = \"/products\"\nupstream = \"catalog\"\n\
         [[routes]]\npath_prefix = \"/products/special\"\nupstream = \"special\"\n\
         [[routes]]\nhost = \"api.shop.test\"\npath_prefix = \"/products\"\nupstream = \"api\"\n\
         [[routes]]\nhost = \"*.shop.test\"\npath_prefix = \"/v1\"\nupstream = \"api\"\n",
        catalog.addr, special.addr, api.addr
    );
    let gw = gateway(&cfg).await;
    let base = format!("http://{}", gw.addr("public").unwrap());

    assert_eq!(get(&format!("{base}/products/1")).await.text(), "catalog");
    assert_eq!(
        get(&format!("{base}/products/special/1")).await.text(),
        "special"
    );
    assert_eq!(
        get(&format!("{base}/products/specialty")).await.text(),
        "catalog"
    );

    let with_host = |path: &str, host: &str| {
        Request::get(format!("{base}{path}"))
            .header("host", host)
            .body(empty())
            .unwrap()
    };
    assert_eq!(
        send(with_host("/products/1", "api.shop.test")).await.text(),
        "api"
    );
    assert_eq!(
        send(with_host("/products/1", "API.Shop.Test:8080"))
            .await
            .text(),
        "api"
    );
    assert_eq!(send(with_host("/v1/x", "m.shop.test")).await.text(), "api");

    // Nothing matches: a 404 with a small JSON body, from the gateway.
    for (path, host) in [("/other", "x.test"), ("/v1/x", "shop.test")] {
        let got = send(with_host(path, host)).await;
        assert_eq!(got.status, 404, "{path} {host}");
        assert_eq!(got.json()["error"], "no_route");
        assert_eq!(got.header("content-type"), Some("application/json"));
        assert!(got.header("x-request-id").is_some());
    }
    assert_eq!(api.hits(), 3);
}

#[tokio::test]
async fn hop_by_hop_headers_never_cross() {
    let echo = Upstream::echo().await;
    let gw = gateway(&Cfg::new(&[echo.addr]).build()).await;
    let base = format!("http://{}", gw.addr("public").unwrap());
    let got = send(
        Request::get(format!("{base}/h"))
            .header("connection", "keep-alive, x-secret")
            .header("x-secret", "s")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("proxy-authorization", "Basic Zm9vOmJhcg==")
            .header("proxy-connection", "keep-alive")
            .header("x-kept", "k")
            .body(empty())
            .unwrap(),
    )
    .await;
    let seen = got.json();
    let h = &seen["headers"];
    for name in [
        "x-secret",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(h.get(name).is_none(), "{name} reached the upstream: {h}");
    }
    assert_eq!(h["x-kept"], "k");

    // And on the way back.
    let up = Upstream::start(|_| async {
        let mut r = reply(200, "ok");
        r.headers_mut()
            .insert("connection", "x-internal".parse().unwrap());
        r.headers_mut()
            .insert("x-internal", "secret".parse().unwrap());
        r.headers_mut()
            .insert("keep-alive", "timeout=99".parse().unwrap());
        r.headers_mut().insert("x-public", "yes".parse().unwrap());
        r
    })
    .await;
    let gw = gateway(&Cfg::new(&[up.addr]).build()).await;
    let got = get(&format!("http://{}/", gw.addr("public").unwrap())).await;
    assert_eq!(got.header("x-public"), Some("yes"));
    assert!(got.header("x-internal").is_none());
    assert!(got.header("keep-alive").is_none());
}

#[tokio::test]
async fn forwarding_headers_request_id_and_trace() {
    let echo = Upstream::echo().await;
    let gw = gateway(&Cfg::new(&[echo.addr]).build()).await;
    let base = format!("http://{}", gw.addr("public").unwrap());

    let got = send(
        Request::get(format!("{base}/p?q=1"))
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-request-id", "client-id-1")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.header("x-request-id"),
        Some("client-id-1"),
        "id echoed to the client"
    );
    let seen = got.json();
    let h = &seen["headers"];
    assert_eq!(seen["path"], "/p?q=1");
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    let fwd = h["forwarded"].as_str().unwrap();
    assert!(
        fwd.starts_with("for=127.0.0.1;proto=http;host=127.0.0.1"),
        "{fwd}"
    );
    assert_eq!(h["x-request-id"], "client-id-1");
    let tp = h["traceparent"].as_str().unwrap();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert!(
        !tp.contains("00f067aa0ba902b7"),
        "a new parent id for our hop: {tp}"
    );
    assert!(h["host"].as_str().unwrap().starts_with("127.0.0.1:"));

    // Without them: generated, and different per request.
    let a = get(&format!("{base}/")).await;
    let b = get(&format!("{base}/")).await;
    let (ja, jb) = (a.json(), b.json());
    let id_a = ja["headers"]["x-request-id"].as_str().unwrap().to_string();
    assert_eq!(id_a.len(), 32);
    assert_eq!(a.header("x-request-id"), Some(id_a.as_str()));
    assert_ne!(id_a, jb["headers"]["x-request-id"].as_str().unwrap());
    let tp = ja["headers"]["traceparent"].as_str().unwrap();
    assert_eq!(tp.len(), 55, "{tp}");
    assert!(tp.starts_with("00-") && tp.ends_with("-01"), "{tp}");
}

#[tokio::test]
async fn http2_cleartext_to_http1_upstream() {
    let echo = Upstream::echo().await;
    let gw = gateway(&Cfg::new(&[echo.addr]).build()).await;
    let url = format!("http://{}/h2?x=1", gw.addr("public").unwrap());
    let h2 = h2_client();
    let got = send_with(&h2, Request::post(&url).body(full("hello")).unwrap()).await;
    assert_eq!(got.status, 200);
    let seen = got.json();
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/h2?x=1");
    assert_eq!(seen["body_len"], 5);
    // The HTTP/1.1 upstream gets a Host built from :authority.
    assert_eq!(
        seen["headers"]["host"],
        gw.addr("public").unwrap().to_string()
    );
    // Many concurrent streams on one connection.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let h2 = h2.clone();
        let url = format!("http://{}/s{i}", gw.addr("public").unwrap());
        tasks.push(tokio::spawn(async move {
            send_with(&h2, Request::get(url).body(empty()).unwrap()).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().json()["path"], format!("/s{i}"));
    }
}

/// The route keys of a streaming route.
const STREAMING: &str = "buffer_requests = false\nbuffer_responses = false";

/// By default a request body is read in before it goes upstream, so a
/// chunked upload reaches the origin whole with a `Content-Length` (an
/// origin that reads only `Content-Length` gets the body), and a large
/// download still arrives whole.
#[tokio::test]
async fn buffered_bodies_arrive_whole_with_their_length() {
    let echo = Upstream::echo().await;
    let gw = gateway(&Cfg::new(&[echo.addr]).build()).await;
    let url = format!("http://{}/upload", gw.addr("public").unwrap());
    let (mut body_tx, body) = Channel::<Bytes, BoxError>::new(1);
    let req = Request::post(&url).body(BodyExt::boxed(body)).unwrap();
    let resp = tokio::spawn(async move { send(req).await });
    // 1 MiB in 64 KiB chunks: past the memory bound, so part of it is
    // held in a temp file.
    for _ in 0..16 {
        body_tx
            .send_data(Bytes::from(vec![b'u'; 64 * 1024]))
            .await
            .unwrap();
    }
    drop(body_tx);
    let got = resp.await.unwrap();
    assert_eq!(got.status, 200, "{}", got.text());
    let seen = got.json();
    assert_eq!(seen["body_len"], 1 << 20);
    assert_eq!(seen["headers"]["content-length"], (1 << 20).to_string());
    assert!(seen["headers"].get("transfer-encoding").is_none(), "{seen}");
    assert!(
        metric(
            gw.admin_addr(),
            "flashgate_bodies_spooled_total{direction=\"request\",to=\"file\"}"
        )
        .await
            >= 1.0
    );
}

/// On a route that opts out of buffering (`buffer_requests = false`,
/// `buffer_responses = false`: uploads and server-sent events), bodies
/// stream both ways: the upstream sees the first chunk of an upload
/// before the client has sent the rest, and the client sees the first
/// chunk of a download before the upstream has produced the rest. A proxy
/// that buffered whole bodies would deadlock here (and the test would
/// time out).
#[tokio::test]
async fn bodies_stream_on_routes_that_opt_out_of_buffering() {
    let (seen_tx, mut seen_rx) = mpsc::channel::<usize>(16);
    let upload = Upstream::start(move |req: http::Request<hyper::body::Incoming>| {
        let seen_tx = seen_tx.clone();
        async move {
            let mut body = req.into_body();
            let mut total = 0;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    total += data.len();
                    let _ = seen_tx.try_send(total);
                }
            }
            reply(200, total.to_string())
        }
    })
    .await;
    // 32 MiB goes up: above the default max_body (16MiB).
    let text = Cfg::new(&[upload.addr]).route(STREAMING).build().replacen(
        "name = \"public\"",
        "name = \"public\"\nmax_body = \"64MiB\"",
        1,
    );
    let gw = gateway(&text).await;
    let url = format!("http://{}/upload", gw.addr("public").unwrap());

    let (mut body_tx, body) = Channel::<Bytes, BoxError>::new(1);
    let req = Request::post(&url).body(BodyExt::boxed(body)).unwrap();
    let resp = tokio::spawn(async move { send(req).await });
    body_tx
        .send_data(Bytes::from(vec![b'a'; 1000]))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), seen_rx.recv())
        .await
        .expect("upstream saw the first chunk while the upload is still open");
    assert_eq!(first, Some(1000));
    // Then a large rest: 32 MiB in 64 KiB chunks.
    for _ in 0..512 {
        body_tx
            .send_data(Bytes::from(vec![b'b'; 64 * 1024]))
            .await
            .unwrap();
    }
    drop(body_tx);
    let got = resp.await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), (1000 + 512 * 64 * 1024).to_string());

    // Download: the upstream sends one chunk and waits for our go.
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let download = Upstream::start(move |_| {
        let mut go_rx = go_rx.clone();
        async move {
            let (mut tx, body) = Channel::<Bytes, BoxError>::new(1);
            tokio::spawn(async move {
                tx.send_data(Bytes::from_static(b"first")).await.unwrap();
                let _ = go_rx.wait_for(|go| *go).await;
                for _ in 0..512 {
                    if tx
                        .send_data(Bytes::from(vec![b'z'; 64 * 1024]))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            http::Response::new(BodyExt::boxed(body))
        }
    })
    .await;
    let gw = gateway(&Cfg::new(&[download.addr]).route(STREAMING).build()).await;
    let resp = client()
        .request(
            Request::get(format!("http://{}/dl", gw.addr("public").unwrap()))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("first chunk arrives before the upstream finished")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(&first[..], b"first");
    go_tx.send(true).unwrap();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest.len(), 512 * 64 * 1024);
    assert!(rest.iter().all(|&b| b == b'z'));
}

#[tokio::test]
async fn native_filter_edits_headers_both_ways() {
    let echo = Upstream::echo().await;
    let cfg = Cfg::new(&[echo.addr])
        .route("filters = [\"h\"]")
        .section(
            "[[filters]]\nname = \"h\"\nnative = \"headers\"\n\
             config = '{\"request_set\": [[\"x-from-filter\", \"1\"]], \"request_remove\": [\"x-drop\"], \"response_set\": [[\"x-frame-options\", \"DENY\"]]}'\n",
        )
        .build();
    let gw = gateway(&cfg).await;
    let got = send(
        Request::get(format!("http://{}/", gw.addr("public").unwrap()))
            .header("x-drop", "1")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.header("x-frame-options"), Some("DENY"));
    let h = &got.json()["headers"];
    assert_eq!(h["x-from-filter"], "1");
    assert!(h.get("x-drop").is_none());
}

/// Sends raw bytes on a fresh connection and returns what comes back until
/// the gateway closes it (requests carry `connection: close`).
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("gateway answers and closes")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// `Connection` may not name `Host` or the gateway's own headers: naming
/// `host` used to send the endpoint's address as Host upstream (an answer
/// a cache would then keep under the shop's URL), naming `x-request-id`
/// dropped the client's id.
#[tokio::test]
async fn connection_cannot_strip_host_or_the_request_id() {
    let echo = Upstream::echo().await;
    let gw = gateway(&Cfg::new(&[echo.addr]).build()).await;
    let answer = raw(
        gw.addr("public").unwrap(),
        "GET /h HTTP/1.1\r\nhost: shop.example\r\nx-request-id: req-42\r\n\
         connection: close, host, x-request-id\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let json = &answer[answer.find('{').unwrap()..=answer.rfind('}').unwrap()];
    let seen: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(seen["headers"]["host"], "shop.example", "{seen}");
    assert_eq!(seen["headers"]["x-request-id"], "req-42", "{seen}");
}

#[tokio::test]
async fn dot_segments_are_resolved_before_routing() {
    let echo = Upstream::echo().await;
    let admin_only = Upstream::fixed("admin-backend").await;
    let cfg = Cfg::new(&[echo.addr])
        .section(format!(
            "[[upstreams]]\nname = \"internal\"\nendpoints = [\"{}\"]\n\
             [[routes]]\nname = \"admin\"\npath_prefix = \"/admin\"\nupstream = \"internal\"\n",
            admin_only.addr
        ))
        .build();
    let gw = gateway(&cfg).await;
    let addr = gw.addr("public").unwrap();
    // `/static/../admin/x` is `/admin/x`: routed and forwarded as such.
    let out = raw(
        addr,
        "GET /static/../admin/x HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(out.ends_with("admin-backend"), "{out}");
    let out = raw(
        addr,
        "GET /a/./b/../c?q=1 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(out.contains("\"path\":\"/a/c?q=1\""), "{out}");
    // Above the root, or dot segments hidden behind percent-encoding: 400.
    for path in ["/../etc/passwd", "/static/%2e%2e/admin", "/x/.%2E/admin"] {
        let out = raw(
            addr,
            &format!("GET {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 400"), "{path}: {out}");
        assert!(out.contains("bad_path"), "{out}");
    }
    assert_eq!(admin_only.hits(), 1);
}

#[tokio::test]
async fn absolute_form_target_sets_the_host() {
    let echo = Upstream::echo().await;
    let gw = gateway(&Cfg::new(&[echo.addr]).build()).await;
    let out = raw(
        gw.addr("public").unwrap(),
        "GET http://public.example/x HTTP/1.1\r\nhost: internal.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(out.contains("\"host\":\"public.example\""), "{out}");
    assert!(out.contains("\"path\":\"/x\""), "{out}");
}
