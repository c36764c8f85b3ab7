//! Wasm filters through the real gateway: guests built with the public
//! `proxy-wasm` SDK from `wasm-plugins/`, real HTTP clients and upstreams.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flashgate_tests::*;
use http::Request;
use http_body_util::channel::Channel;
use http_body_util::BodyExt;
use tokio::sync::mpsc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A config with one Wasm filter `f` on the catch-all route.
fn with_filter(
    upstream: std::net::SocketAddr,
    plugin: &str,
    plugin_config: &str,
    extra: &str,
) -> String {
    // A generous guest deadline unless the test is about the deadline:
    // the default (5 ms) is meant for production boxes, and a test box
    // running the whole suite on 2 cores can stall a guest call that long,
    // which would fail the filter open and the test by chance.
    let deadline = if extra.contains("timeout =") {
        ""
    } else {
        "timeout = \"2s\"\n"
    };
    Cfg::new(&[upstream])
        .route("filters = [\"f\"]")
        .section(format!(
            "[[filters]]\nname = \"f\"\nwasm = \"{}\"\n\
             config = '{plugin_config}'\n{deadline}{extra}\n",
            wasm_plugin(plugin).display()
        ))
        .build()
}

#[tokio::test]
async fn add_headers_edits_both_directions() {
    let echo = Upstream::echo().await;
    let gw = gateway(&with_filter(
        echo.addr,
        "add_headers",
        r#"{"request_set": [["x-edge", "flashgate"]], "request_remove": ["x-debug"], "response_set": [["x-frame-options", "DENY"]]}"#,
        "",
    ))
    .await;
    let got = send(
        Request::get(format!("http://{}/p", gw.addr("public").unwrap()))
            .header("x-debug", "1")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-frame-options"), Some("DENY"));
    let seen = got.json();
    assert_eq!(seen["headers"]["x-edge"], "flashgate");
    assert!(seen["headers"].get("x-debug").is_none());
    let metrics = get(&format!("http://{}/metrics", gw.admin_addr()))
        .await
        .text();
    assert!(
        metrics.contains("flashgate_wasm_calls_total{filter=\"f\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn degrade_recommendations_answers_locally_at_its_level() {
    let origin = Upstream::fixed("real recommendations").await;
    // The load level is 0 until overload control lands: min_level 0 means
    // "always degraded", min_level 1 means "never yet".
    let gw = gateway(&with_filter(
        origin.addr,
        "degrade_recommendations",
        r#"{"min_level": 0, "placeholder": {"items": []}}"#,
        "",
    ))
    .await;
    let got = get(&format!(
        "http://{}/recommendations",
        gw.addr("public").unwrap()
    ))
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-degraded"), Some("1"));
    assert_eq!(got.json()["items"], serde_json::json!([]));
    assert_eq!(origin.hits(), 0, "answered at the edge");

    let gw = gateway(&with_filter(
        origin.addr,
        "degrade_recommendations",
        r#"{"min_level": 1}"#,
        "",
    ))
    .await;
    let got = get(&format!(
        "http://{}/recommendations",
        gw.addr("public").unwrap()
    ))
    .await;
    assert_eq!(got.text(), "real recommendations");
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn bot_score_reaches_the_upstream_and_metrics() {
    // The host's score (`flashgate.bot_score`): curl matches a bot rule
    // (log, score 50), the browser none (99).
    let echo = Upstream::echo().await;
    let gw = gateway(&with_filter(
        echo.addr,
        "bot_score",
        "",
        "[[bot_rules]]\nname = \"curl\"\nuser_agent = [\"^curl/\"]\naction = \"log\"",
    ))
    .await;
    let base = format!("http://{}", gw.addr("public").unwrap());
    let browser = send(
        Request::get(format!("{base}/"))
            .header("user-agent", "Mozilla/5.0 (X11; Linux x86_64)")
            .header("accept-language", "en")
            .header("accept", "text/html")
            .header("x-bot-score", "1")
            .body(empty())
            .unwrap(),
    )
    .await
    .json();
    let bot = send(
        Request::get(format!("{base}/"))
            .header("user-agent", "curl/8.0")
            .header("x-bot-score", "99")
            .body(empty())
            .unwrap(),
    )
    .await
    .json();
    assert_eq!(browser["headers"]["x-bot-score"], "99");
    assert_eq!(bot["headers"]["x-bot-score"], "50");
    let metrics = get(&format!("http://{}/metrics", gw.admin_addr()))
        .await
        .text();
    assert!(
        metrics.contains("flashgate_wasm_guest_"),
        "guest metrics exported: {metrics}"
    );
}

#[tokio::test]
async fn a_looping_filter_fails_closed_or_open_as_configured() {
    let up = Upstream::fixed("origin").await;
    let closed = gateway(&with_filter(
        up.addr,
        "test_trap",
        "loop",
        "fail = \"closed\"\ntimeout = \"5ms\"",
    ))
    .await;
    let trap = |gw: &Gateway| {
        Request::get(format!("http://{}/", gw.addr("public").unwrap()))
            .header("x-trap", "1")
            .body(empty())
            .unwrap()
    };
    let got = send(trap(&closed)).await;
    // Envoy's answer for a failed Wasm filter (`wasm_fail_stream`).
    assert_eq!(got.status, 503);
    assert_eq!(up.hits(), 0);
    // Refused on the filter's account: the gateway's own answer shape.
    assert_eq!(got.header("x-flashgate-error"), Some("filter_failed"));
    let body = got.json();
    assert_eq!(body["error"], "filter_failed");
    assert_eq!(
        body["request_id"].as_str(),
        got.header("x-request-id"),
        "the body names the request"
    );

    let open = gateway(&with_filter(
        up.addr,
        "test_trap",
        "panic",
        "fail = \"open\"",
    ))
    .await;
    let got = send(trap(&open)).await;
    assert_eq!((got.status, got.text().as_str()), (200, "origin"));
    // The gateway is still healthy and the failure is counted.
    let got = send(trap(&open)).await;
    assert_eq!(got.status, 200);
    let admin = open.admin_addr();
    assert!(metric(admin, "flashgate_wasm_failed_open_total{filter=\"f\"}").await >= 2.0);
    assert!(metric(admin, "flashgate_wasm_traps_total{filter=\"f\"}").await >= 2.0);
    assert!(
        metric(
            closed.admin_addr(),
            "flashgate_wasm_timeouts_total{filter=\"f\"}"
        )
        .await
            >= 1.0
    );
}

/// What `flashgate check` reports for config text: validation, then
/// building what the file names (`Runtime::check`).
fn check(text: &str) -> Result<(), gateway::ConfigError> {
    gateway::pipeline::runtime::Runtime::check(&Config::parse(text)?)
}

#[test]
fn bad_modules_are_config_errors_with_key_paths() {
    let up: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let cfg = with_filter(up, "no_abi", "", "");
    let e = check(&cfg).unwrap_err();
    assert_eq!(e.path, "filters[0].wasm", "{e}");
    let cfg = with_filter(up, "add_headers", "{not json", "");
    let e = check(&cfg).unwrap_err();
    assert_eq!(e.path, "filters[0].config", "{e}");
    let cfg = Cfg::new(&[up])
        .section(
            "[[filters]]
name = \"f\"
wasm = \"/nonexistent.wasm\"
",
        )
        .build();
    assert_eq!(check(&cfg).unwrap_err().path, "filters[0].wasm");
    // Parsing alone reads no module: it is compiled once, when built.
    Config::parse(&cfg).unwrap();
}

/// An upstream that answers with the request body it received, and the
/// content-length it was told in `x-got-length`.
async fn body_echo() -> Upstream {
    Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        let length = req
            .headers()
            .get("content-length")
            .map(|v| v.to_str().unwrap_or("").to_string())
            .unwrap_or_else(|| "none".into());
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let mut r = reply(200, body);
        r.headers_mut()
            .insert("x-got-length", length.parse().unwrap());
        r
    })
    .await
}

fn post(gw: &Gateway, test: &str, body: impl Into<Bytes>) -> Request<Body> {
    Request::post(format!("http://{}/upload", gw.addr("public").unwrap()))
        .header("x-test", test)
        .body(full(body))
        .unwrap()
}

#[tokio::test]
async fn large_request_body_held_then_rewritten_and_bounded() {
    let up = body_echo().await;
    // The deadline covers the call that gets the whole held body: a
    // filter rewriting megabytes needs more than the 5 ms default.
    let gw = gateway(&with_filter(
        up.addr,
        "test_host",
        "",
        "body_limit = \"8MiB\"\ntimeout = \"1s\"",
    ))
    .await;
    // 4 MiB: held to its end, rewritten, sent with its new exact length.
    let data: Vec<u8> = (0..4 << 20).map(|i| b"abcdefgh"[i % 8]).collect();
    let got = send(post(&gw, "body", data.clone())).await;
    let admin = gw.admin_addr();
    assert_eq!(
        got.status,
        200,
        "timeouts {} traps {} oom {}",
        metric(admin, "flashgate_wasm_timeouts_total").await,
        metric(admin, "flashgate_wasm_traps_total").await,
        metric(admin, "flashgate_wasm_out_of_memory_total").await
    );
    let mut expected = data.to_ascii_uppercase();
    expected.extend_from_slice(b"|wasm");
    assert_eq!(
        got.header("x-got-length"),
        Some(&*expected.len().to_string())
    );
    assert!(got.body == expected, "rewritten body differs");
    // Past the bound: 413, nothing reaches the upstream.
    let hits = up.hits();
    let got = send(post(&gw, "body", vec![b'x'; 9 << 20])).await;
    assert_eq!(got.status, 413);
    assert_eq!(got.header("x-flashgate-error"), Some("body_too_large"));
    assert_eq!(up.hits(), hits);
}

/// Header callbacks learn from the body whether one follows
/// (`end_of_stream`): a GET without a body and its empty answer say so, a
/// POST with a body and its echoed answer do not.
#[tokio::test]
async fn header_callbacks_get_end_of_stream_from_the_body() {
    let up = body_echo().await;
    let gw = gateway(&with_filter(up.addr, "test_host", "", "bodies = false")).await;
    let get = Request::get(format!("http://{}/upload", gw.addr("public").unwrap()))
        .header("x-test", "eos")
        .body(full(Bytes::new()))
        .unwrap();
    let got = send(get).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-req-eos"), Some("true"));
    assert_eq!(got.header("x-resp-eos"), Some("true"));
    let got = send(post(&gw, "eos", "abc")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "abc");
    assert_eq!(got.header("x-req-eos"), Some("false"));
    assert_eq!(got.header("x-resp-eos"), Some("false"));
}

/// `bodies = false`: a header-only filter gets no body callbacks, so the
/// body goes through as the client sent it.
#[tokio::test]
async fn bodies_false_turns_body_callbacks_off() {
    let up = body_echo().await;
    let gw = gateway(&with_filter(up.addr, "test_host", "", "bodies = false")).await;
    let got = send(post(&gw, "body", "unchanged")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "unchanged");
    assert_eq!(got.header("x-got-length"), Some("9"));
}

#[tokio::test]
async fn response_body_held_then_rewritten_and_bounded() {
    let big = Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        let n: usize = req
            .headers()
            .get("x-size")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(10);
        reply(200, vec![b'r'; n])
    })
    .await;
    let gw = gateway(&with_filter(
        big.addr,
        "test_host",
        "",
        "body_limit = \"2MiB\"\ntimeout = \"1s\"",
    ))
    .await;
    let ask = |size: usize| {
        Request::get(format!("http://{}/", gw.addr("public").unwrap()))
            .header("x-test", "resp-body")
            .header("x-size", size.to_string())
            .body(empty())
            .unwrap()
    };
    let got = send(ask(1 << 20)).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body.len(), (1 << 20) + 2);
    assert_eq!(got.body.first(), Some(&b'<'));
    assert_eq!(got.body.last(), Some(&b'>'));
    assert_eq!(
        got.header("content-length"),
        Some(&*((1 << 20) + 2).to_string())
    );
    let got = send(ask(3 << 20)).await;
    // Past a buffering filter's limit: 500, as Envoy answers.
    assert_eq!(got.status, 500);
    assert_eq!(got.header("x-flashgate-error"), Some("response_too_large"));
}

/// A filter that does not hold the body lets it stream: the upstream sees
/// the first chunk of an upload while the client still holds the rest.
#[tokio::test]
async fn body_streams_through_a_filter_that_does_not_hold_it() {
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
    let gw = gateway(&with_filter(upload.addr, "test_host", "", "")).await;
    let (mut tx, body) = Channel::<Bytes, BoxError>::new(1);
    let req = Request::post(format!("http://{}/up", gw.addr("public").unwrap()))
        .header("x-test", "body-chunks")
        .body(BodyExt::boxed(body))
        .unwrap();
    let resp = tokio::spawn(async move { send(req).await });
    tx.send_data(Bytes::from(vec![b'a'; 1000])).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), seen_rx.recv())
        .await
        .expect("the upstream saw the first chunk while the upload is open");
    assert_eq!(first, Some(1000));
    for _ in 0..64 {
        tx.send_data(Bytes::from(vec![b'b'; 64 << 10]))
            .await
            .unwrap();
    }
    drop(tx);
    let got = resp.await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), (1000 + 64 * (64 << 10)).to_string());
}

#[tokio::test]
async fn callout_to_a_configured_cluster_pauses_and_resumes() {
    let auth = Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        let seen = format!(
            "{} host={} from={}",
            req.uri().path(),
            req.headers()
                .get("host")
                .map_or("-", |v| v.to_str().unwrap()),
            req.headers()
                .get("x-from")
                .map_or("-", |v| v.to_str().unwrap()),
        );
        let mut r = reply(201, seen);
        r.headers_mut().insert("x-auth", "granted".parse().unwrap());
        r
    })
    .await;
    let echo = Upstream::echo().await;
    let extra = format!(
        "[[upstreams]]\nname = \"auth\"\nendpoints = [\"{}\"]\n",
        auth.addr
    );
    let gw = gateway(&with_filter(echo.addr, "test_host", "", &extra)).await;
    let call = |path: &str, timeout: &str, cluster: &str| {
        Request::get(format!("http://{}/p", gw.addr("public").unwrap()))
            .header("x-test", "callout")
            .header("x-callout-cluster", cluster)
            .header("x-callout-path", path)
            .header("x-callout-timeout", timeout)
            .body(empty())
            .unwrap()
    };
    let got = send(call("/check", "5000", "auth")).await;
    assert_eq!(got.status, 200);
    let seen = got.json();
    assert_eq!(seen["headers"]["x-callout-status"], "201");
    assert_eq!(seen["headers"]["x-callout-header"], "granted");
    assert_eq!(
        seen["headers"]["x-callout-body"],
        "/check host=auth.internal from=wasm"
    );
    assert_eq!(auth.hits(), 1);

    // The guest's timeout: the answer is empty and the request goes on.
    let got = send(call("/slow", "100", "auth")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["headers"]["x-callout-status"], "none");

    // No such cluster: refused at once.
    let got = send(call("/check", "5000", "nope")).await;
    assert_eq!(got.json()["headers"]["x-callout-error"], "BadArgument");
}

/// A client that goes away while its request is paused (waiting for a
/// slow callout) still ends the filter's context: on_done, on_log.
#[tokio::test]
async fn client_abort_while_paused_still_ends_the_context() {
    let slow = Upstream::start(|_| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        reply(200, "late")
    })
    .await;
    let echo = Upstream::echo().await;
    let extra = format!(
        "[[upstreams]]\nname = \"slow\"\nendpoints = [\"{}\"]\n",
        slow.addr
    );
    let gw = gateway(&with_filter(echo.addr, "test_host", "", &extra)).await;
    let admin = gw.admin_addr();
    let on_log = "flashgate_wasm_guest_counter{filter=\"f\",name=\"test_on_log_total\"}";
    let req = Request::get(format!("http://{}/p", gw.addr("public").unwrap()))
        .header("x-test", "callout")
        .header("x-callout-cluster", "slow")
        .header("x-callout-timeout", "60000")
        .body(empty())
        .unwrap();
    let c = client();
    let waited = tokio::time::timeout(Duration::from_millis(300), c.request(req)).await;
    assert!(
        waited.is_err(),
        "still paused on the slow callout, but got {:?}",
        waited.map(|r| r.map(|r| r.status()))
    );
    drop(c); // the client goes away
    wait_until(
        Duration::from_secs(10),
        "on_log ran for the aborted stream",
        || async { metric(admin, on_log).await >= 1.0 },
    )
    .await;
    assert_eq!(echo.hits(), 0);
}

#[tokio::test]
async fn a_tick_resumes_a_paused_request() {
    let echo = Upstream::echo().await;
    let gw = gateway(&with_filter(echo.addr, "test_host", "", "")).await;
    let got = send(
        Request::get(format!("http://{}/p", gw.addr("public").unwrap()))
            .header("x-test", "pause")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["headers"]["x-resumed"], "1");
}

/// Hot reload under load: the module file is replaced (picked up by the
/// watcher), the config is reloaded (POST /admin/reload), and a broken
/// module is refused, while clients keep sending; no request fails.
#[tokio::test]
async fn hot_reload_under_load_with_no_failed_request() {
    // The deadline is wall-clock: on a starved test machine (debug build,
    // other compiles) a 5 ms call can be descheduled past it, and a
    // timeout is a failed request. This test is about reloads, so it
    // gives calls room; deadlines have their own tests.
    let dir = redis::TempDir::new("wasm-reload");
    let module = dir.0.join("filter.wasm");
    std::fs::copy(wasm_plugin("test_host"), &module).unwrap();
    let up = Upstream::fixed("origin").await;
    let cfg = Cfg::new(&[up.addr])
        .route("filters = [\"f\"]")
        .section(format!(
            "[[filters]]\nname = \"f\"\nwasm = \"{}\"\n\
             config = '{{\"response_set\": [[\"x-version\", \"2\"]]}}'\nwatch = \"50ms\"\n\
             timeout = \"1s\"\n",
            module.display()
        ))
        .build();
    let cfg_path = dir.0.join("flashgate.toml");
    std::fs::write(&cfg_path, &cfg).unwrap();
    let gw = gateway::Gateway::start(
        gateway::Config::load(&cfg_path).unwrap(),
        Some(cfg_path.clone()),
    )
    .await
    .unwrap();
    let url = format!("http://{}/", gw.addr("public").unwrap());
    let admin = gw.admin_addr();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let why = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let v2 = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, sent, failed, v2, url, why) = (
            stop.clone(),
            sent.clone(),
            failed.clone(),
            v2.clone(),
            url.clone(),
            why.clone(),
        );
        load.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                let req = Request::get(&url).body(empty()).unwrap();
                match c.request(req).await {
                    Ok(resp) => {
                        let status = resp.status();
                        if resp.headers().get("x-version").is_some() {
                            v2.fetch_add(1, Ordering::Relaxed);
                        }
                        let body = resp.into_body().collect().await;
                        if status != 200 || body.is_err() {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let body = body.map(|b| b.to_bytes());
                            why.lock().unwrap().push(format!("{status} {body:?}"));
                        }
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        why.lock().unwrap().push(format!("client error: {e:?}"));
                    }
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    wait_until(
        Duration::from_secs(10),
        "load running: 50 requests sent",
        || async { sent.load(Ordering::Relaxed) > 50 },
    )
    .await;
    assert_eq!(v2.load(Ordering::Relaxed), 0, "test-host sets no x-version");

    // 1. The file changes: the watcher swaps the module in.
    std::fs::copy(wasm_plugin("add_headers"), &module).unwrap();
    let before = v2.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(15), "the new module serves", || async {
        v2.load(Ordering::Relaxed) > before + 50
    })
    .await;
    assert!(metric(admin, "flashgate_wasm_reloads_total{filter=\"f\"}").await >= 1.0);

    // 2. A config reload under load.
    let reloaded = send(
        Request::post(format!("http://{admin}/admin/reload"))
            .header("authorization", "Bearer test-token")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reloaded.status, 200, "{}", reloaded.text());

    // 3. A broken module is refused by the watcher; the old one serves.
    std::fs::write(&module, b"\0asm not really").unwrap();
    let metrics_admin = admin;
    wait_until(
        Duration::from_secs(15),
        "the broken module is refused",
        || async move {
            metric(
                metrics_admin,
                "flashgate_wasm_reload_failures_total{filter=\"f\"}",
            )
            .await
                >= 1.0
        },
    )
    .await;
    let n = sent.load(Ordering::Relaxed);
    wait_until(
        Duration::from_secs(10),
        "the old module keeps serving: 50 more requests sent",
        || async { sent.load(Ordering::Relaxed) > n + 50 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    // Polled: on a machine with both cores burnt, one call can still pass
    // the deadline and fail open (no header); the broken module never
    // sets it at all.
    wait_until(
        Duration::from_secs(10),
        "the last good module serves",
        || async { get(&url).await.header("x-version") == Some("2") },
    )
    .await;
    let why = why.lock().unwrap().clone();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "of {} requests: {:?}; timeouts {}, traps {}, backed off {}",
        sent.load(Ordering::Relaxed),
        why,
        metric(admin, "flashgate_wasm_timeouts_total").await,
        metric(admin, "flashgate_wasm_traps_total").await,
        metric(admin, "flashgate_wasm_backed_off_total").await,
    );
}

#[tokio::test]
async fn a_crash_looping_module_is_backed_off() {
    let up = Upstream::fixed("origin").await;
    let gw = gateway(&with_filter(
        up.addr,
        "test_trap",
        "panic",
        "fail = \"open\"\ninstances = 1",
    ))
    .await;
    for _ in 0..40 {
        let got = send(
            Request::get(format!("http://{}/", gw.addr("public").unwrap()))
                .header("x-trap", "1")
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!((got.status, got.text().as_str()), (200, "origin"));
    }
    let admin = gw.admin_addr();
    let created = metric(
        admin,
        "flashgate_wasm_instances_created_total{filter=\"f\"}",
    )
    .await;
    assert!(
        created <= 6.0,
        "{created} instances for 40 crashing requests"
    );
    assert!(metric(admin, "flashgate_wasm_backed_off_total{filter=\"f\"}").await >= 1.0);
}

/// The reset counters on /metrics: requests counted with status 444 and
/// contexts the guest ended (`on_log`).
async fn resets_and_logs(admin: std::net::SocketAddr) -> (f64, f64) {
    let resets = metric(
        admin,
        "flashgate_requests_total{route=\"default\",status=\"444\"}",
    )
    .await;
    let on_log = metric(
        admin,
        "flashgate_wasm_guest_counter{filter=\"f\",name=\"test_on_log_total\"}",
    )
    .await;
    (resets, on_log)
}

/// `proxy_close_stream` over HTTP/1.1: the connection closes without a
/// single byte of response, whether the guest resets in the request phase
/// (nothing reaches the upstream), on the response head, or on the
/// response body before the head went out. Counted as 444; every context
/// still ends.
#[tokio::test]
async fn close_stream_over_http1_closes_the_connection_without_a_response() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = Upstream::echo().await;
    let gw = gateway(&with_filter(echo.addr, "test_host", "", "")).await;
    let addr = gw.addr("public").unwrap();
    for (i, test) in ["close-request", "close-response", "close-resp-body"]
        .into_iter()
        .enumerate()
    {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET /p HTTP/1.1\r\nhost: gw\r\nx-test: {test}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
            .await
            .unwrap_or_else(|_| panic!("{test}: the connection stays open"));
        // Closed: an end of stream (or a reset), and no response at all.
        assert!(
            read.is_ok() || got.is_empty(),
            "{test}: {read:?} after {got:?}"
        );
        assert!(got.is_empty(), "{test}: {}", String::from_utf8_lossy(&got));
        assert_eq!(echo.hits(), i, "{test}: upstream requests");
    }
    let admin = gw.admin_addr();
    assert!(
        eventually(Duration::from_secs(10), || async {
            resets_and_logs(admin).await == (3.0, 3.0)
        })
        .await,
        "three resets counted as 444, three contexts ended: {:?}",
        resets_and_logs(admin).await
    );
    // The gateway still answers new connections.
    let got = get(&format!("http://{addr}/p")).await;
    assert_eq!(got.status, 200);
}

/// `proxy_close_stream` over HTTP/2: the stream is reset (`RST_STREAM`),
/// and the same connection goes on serving the next request.
#[tokio::test]
async fn close_stream_over_http2_resets_the_stream_and_keeps_the_connection() {
    let echo = Upstream::echo().await;
    let gw = gateway(&with_filter(echo.addr, "test_host", "", "")).await;
    let addr = gw.addr("public").unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(conn);
    let req = |test: &str| {
        Request::get(format!("http://{addr}/p"))
            .header("x-test", test)
            .body(empty())
            .unwrap()
    };
    for test in ["close-request", "close-response", "close-resp-body"] {
        h2.ready().await.expect("connection still usable");
        let err = tokio::time::timeout(Duration::from_secs(10), h2.send_request(req(test)))
            .await
            .unwrap_or_else(|_| panic!("{test}: no answer and no reset"))
            .expect_err("reset, not answered");
        let text = format!("{err:?}");
        assert!(
            text.contains("Reset") && text.contains("INTERNAL_ERROR"),
            "{test}: a stream reset, not {text}"
        );
        // The next request on the same connection is served.
        h2.ready().await.expect("connection still usable");
        let resp = h2.send_request(req("")).await.expect("answered");
        assert_eq!(resp.status(), 200, "after {test}");
        resp.into_body().collect().await.unwrap();
    }
    assert!(!connection.is_finished(), "the connection stayed open");
    let admin = gw.admin_addr();
    assert!(
        eventually(Duration::from_secs(10), || async {
            resets_and_logs(admin).await == (3.0, 6.0)
        })
        .await,
        "three resets counted as 444, six contexts ended: {:?}",
        resets_and_logs(admin).await
    );
}
