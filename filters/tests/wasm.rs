//! The proxy-wasm host driven through `FilterChain` with the real guest
//! filters from `wasm-plugins/` (built once per test run by
//! `wasm-plugins/build.sh`; needs the `wasm32-wasip1` target).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use filters::wasm::{MetricValue, WasmFilter, WasmLimits};
use filters::{
    BodyStop, FailMode, FilterChain, FilterError, FilterFactory, Priority, StreamInfo, StreamReset,
};
use http::StatusCode;

/// Builds the guests once and returns the directory of the `.wasm` files.
fn guests() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../wasm-plugins");
        let out = std::process::Command::new("bash")
            .arg(root.join("build.sh"))
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_RUSTFLAGS")
            .output()
            .expect("run wasm-plugins/build.sh");
        assert!(
            out.status.success(),
            "wasm-plugins/build.sh failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        root.join("target/wasm32-wasip1/release")
    })
}

fn wasm(name: &str) -> PathBuf {
    guests().join(format!("{name}.wasm"))
}

fn limits() -> WasmLimits {
    // Generous per-call time: tests run in parallel on small machines.
    WasmLimits {
        timeout: Duration::from_millis(100),
        memory: 64 << 20,
        instances: 2,
    }
}

fn load(name: &str, module: &str, config: &str) -> Arc<WasmFilter> {
    load_with(name, module, config, limits(), FailMode::Closed)
}

fn load_with(
    name: &str,
    module: &str,
    config: &str,
    l: WasmLimits,
    fail: FailMode,
) -> Arc<WasmFilter> {
    WasmFilter::load(name, wasm(module), config, l, fail)
        .unwrap_or_else(|e| panic!("load {module}: {e}"))
}

fn info(load_level: u8) -> StreamInfo {
    StreamInfo {
        client_ip: "203.0.113.7".parse().unwrap(),
        route: "products".into(),
        priority: Priority::Sheddable,
        load_level,
        bot_score: 99,
        ja4: None,
        request_id: http::HeaderValue::from_static("req-1"),
        end_of_stream: true,
    }
}

fn chain(f: &Arc<WasmFilter>) -> FilterChain {
    FilterChain::new(vec![f.clone() as Arc<dyn FilterFactory>])
}

fn request(headers: &[(&str, &str)]) -> http::request::Parts {
    request_to("/products/42?color=red", headers)
}

fn request_to(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = http::Request::builder().method("GET").uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn response(headers: &[(&str, &str)]) -> http::response::Parts {
    let mut b = http::Response::builder().status(200);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn h<'a>(headers: &'a http::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or("<absent>")
}

fn counter(f: &WasmFilter, name: &str) -> u64 {
    f.metrics()
        .value(name)
        .unwrap_or_else(|| panic!("metric {name} not defined"))
}

// ---- add-headers -----------------------------------------------------------

#[tokio::test]
async fn add_headers_edits_both_directions() {
    let f = load(
        "add-headers",
        "add_headers",
        r#"{"request_add": [["x-edge", "flashgate"], ["x-multi", "2"]],
            "request_set": [["x-env", "prod"]],
            "request_remove": ["x-debug"],
            "response_add": [["cache-status", "edge"]],
            "response_set": [["x-frame-options", "DENY"]],
            "response_remove": ["server"]}"#,
    );
    assert_eq!(f.abi_version(), "0.2.1");
    let mut req = request(&[("x-debug", "1"), ("x-env", "dev"), ("x-multi", "1")]);
    let mut s = chain(&f).start();
    assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
    assert_eq!(h(&req.headers, "x-edge"), "flashgate");
    assert_eq!(h(&req.headers, "x-env"), "prod");
    assert_eq!(h(&req.headers, "x-debug"), "<absent>");
    let multi: Vec<_> = req.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["1", "2"]);
    // The head that is not headers is untouched.
    assert_eq!(req.uri, "/products/42?color=red");
    assert_eq!(req.method, http::Method::GET);

    let mut resp = response(&[("server", "origin"), ("x-frame-options", "SAMEORIGIN")]);
    assert!(s.on_response(&mut resp, &info(0)).await.unwrap().is_none());
    assert_eq!(h(&resp.headers, "server"), "<absent>");
    assert_eq!(h(&resp.headers, "x-frame-options"), "DENY");
    assert_eq!(h(&resp.headers, "cache-status"), "edge");
    assert_eq!(resp.status, StatusCode::OK);
}

#[test]
fn add_headers_refuses_bad_config() {
    let e = WasmFilter::load(
        "ah",
        wasm("add_headers"),
        r#"{"nope": 1}"#,
        limits(),
        FailMode::Open,
    );
    assert!(matches!(e, Err(FilterError::Config(_))), "{:?}", e.err());
}

// ---- bot-score -------------------------------------------------------------

fn scored(score: u8) -> StreamInfo {
    StreamInfo {
        bot_score: score,
        ja4: Some("t13d1516h2_8daaf6152771_02713d6af862".into()),
        ..info(0)
    }
}

#[tokio::test]
async fn bot_score_passes_the_hosts_score_on_and_counts() {
    let f = load("bot-score", "bot_score", "");
    let c = chain(&f);
    // (host score, what the client sent) -> what the upstream gets: the
    // host's, never the client's.
    type Case<'a> = (u8, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (99, &[("user-agent", "Mozilla/5.0")], "99"),
        (1, &[("user-agent", "curl/8.0")], "1"),
        (15, &[("x-bot-score", "99")], "15"),
    ];
    for (score, headers, want) in cases {
        let mut req = request(headers);
        let mut s = c.start();
        assert!(s
            .on_request(&mut req, &scored(*score))
            .await
            .unwrap()
            .is_none());
        assert_eq!(h(&req.headers, "x-bot-score"), *want, "{headers:?}");
        assert_eq!(req.headers.get_all("x-bot-score").iter().count(), 1);
    }
    assert_eq!(counter(&f, "bot_score_scored_total"), 3);
    assert_eq!(counter(&f, "bot_score_bots_total"), 2, "below 30");
    let hist = f
        .metrics()
        .snapshot()
        .into_iter()
        .find(|m| m.name == "bot_score_score")
        .unwrap();
    let MetricValue::Histogram { count, sum, .. } = hist.value else {
        panic!("histogram expected")
    };
    assert_eq!((count, sum), (3, 115));
}

#[tokio::test]
async fn bot_score_blocks_below_its_threshold() {
    let f = load("bot-score-block", "bot_score", r#"{"block_below": 30}"#);
    let mut req = request(&[("user-agent", "python-requests/2.31")]);
    let mut s = chain(&f).start();
    let local = s
        .on_request(&mut req, &scored(5))
        .await
        .unwrap()
        .expect("blocked");
    assert_eq!(local.status, StatusCode::FORBIDDEN);
    assert_eq!(h(&local.headers, "x-bot-score"), "5");
    assert_eq!(&local.body[..], b"automated traffic is not allowed\n");
    let mut req = request(&[("user-agent", "python-requests/2.31")]);
    let mut s = chain(&f).start();
    assert!(s.on_request(&mut req, &scored(50)).await.unwrap().is_none());
}

// ---- degrade-recommendations ----------------------------------------------

#[tokio::test]
async fn degrade_answers_locally_under_load() {
    let f = load(
        "degrade-reco",
        "degrade_recommendations",
        r#"{"min_level": 2, "placeholder": {"items": [], "fallback": true}}"#,
    );
    let c = chain(&f);
    for level in [0, 1] {
        let mut req = request(&[]);
        let mut s = c.start();
        assert!(
            s.on_request(&mut req, &info(level))
                .await
                .unwrap()
                .is_none(),
            "level {level}"
        );
    }
    for level in [2, 5] {
        let mut req = request(&[]);
        let mut s = c.start();
        let local = s
            .on_request(&mut req, &info(level))
            .await
            .unwrap()
            .expect("degraded");
        assert_eq!(local.status, StatusCode::OK);
        assert_eq!(h(&local.headers, "content-type"), "application/json");
        assert_eq!(h(&local.headers, "x-degraded"), "1");
        let body: serde_json::Value = serde_json::from_slice(&local.body).unwrap();
        assert_eq!(body, serde_json::json!({"items": [], "fallback": true}));
    }
}

#[test]
fn degrade_refuses_bad_status() {
    let e = WasmFilter::load(
        "degrade-bad",
        wasm("degrade_recommendations"),
        r#"{"status": 42}"#,
        limits(),
        FailMode::Open,
    );
    assert!(matches!(e, Err(FilterError::Config(_))));
}

// ---- test-host: the ABI surface --------------------------------------------

#[tokio::test]
async fn properties() {
    let f = load("props-filter", "test_host", "");
    let mut req = request(&[("x-test", "props"), ("user-agent", "UA/1")]);
    let mut s = chain(&f).start();
    assert!(s.on_request(&mut req, &info(3)).await.unwrap().is_none());
    let hs = &req.headers;
    assert_eq!(h(hs, "x-prop-path"), "/products/42?color=red");
    assert_eq!(h(hs, "x-prop-method"), "GET");
    assert_eq!(h(hs, "x-prop-source"), "203.0.113.7");
    assert_eq!(h(hs, "x-prop-plugin"), "props-filter");
    assert_eq!(h(hs, "x-prop-route"), "products");
    assert_eq!(h(hs, "x-prop-priority"), "sheddable");
    assert_eq!(h(hs, "x-prop-load"), "3");
    assert_eq!(h(hs, "x-prop-ua"), "UA/1");
    assert_eq!(h(hs, "x-prop-missing"), "<none>");
    // x-test, user-agent, and the 9 x-prop-* headers the guest set before.
    assert_eq!(h(hs, "x-prop-headers"), "Some(11)");
    assert_eq!(h(hs, "x-prop-custom"), "v1");
    assert_eq!(h(hs, "x-pseudo-path"), "/products/42?color=red");
    assert_eq!(h(hs, "x-pseudo-method"), "GET");
    // The bot rules' score and the JA4 fingerprint (absent: `<none>`).
    assert_eq!(h(hs, "x-prop-bot-score"), "99");
    assert_eq!(h(hs, "x-prop-ja4"), "<none>");
    let mut req = request(&[("x-test", "props")]);
    let mut s = chain(&f).start();
    assert!(s.on_request(&mut req, &scored(7)).await.unwrap().is_none());
    assert_eq!(h(&req.headers, "x-prop-bot-score"), "7");
    assert_eq!(
        h(&req.headers, "x-prop-ja4"),
        "t13d1516h2_8daaf6152771_02713d6af862"
    );
}

#[tokio::test]
async fn headers_add_replace_remove_both_ways() {
    let f = load("hdr-filter", "test_host", "");
    let mut req = request(&[
        ("x-test", "headers"),
        ("x-replace", "old"),
        ("x-remove", "bye"),
        ("x-multi", "one"),
        ("x-new-path", "/elsewhere?q=1"),
    ]);
    let mut s = chain(&f).start();
    assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
    let hs = &req.headers;
    assert_eq!(h(hs, "x-replace"), "new");
    assert_eq!(h(hs, "x-remove"), "<absent>");
    assert_eq!(h(hs, "x-added"), "1");
    let multi: Vec<_> = hs.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["one", "two"]);
    // :path, :method, :scheme (no :authority: neither Host nor an absolute
    // URI) + x-test, x-replace, x-multi x2, x-new-path, x-added
    assert_eq!(h(hs, "x-count"), "9");
    assert_eq!(req.uri, "/elsewhere?q=1");

    let mut resp = response(&[("server", "origin"), ("x-resp-replace", "old")]);
    assert!(s.on_response(&mut resp, &info(0)).await.unwrap().is_none());
    let hs = &resp.headers;
    assert_eq!(h(hs, "server"), "<absent>");
    assert_eq!(h(hs, "x-resp-replace"), "new");
    assert_eq!(h(hs, "x-resp-added"), "1");
    assert_eq!(h(hs, "x-req-seen"), "new"); // request headers readable later
    assert_eq!(h(hs, "x-status-seen"), "200");
}

#[tokio::test]
async fn local_response_and_config() {
    let f = load("local-filter", "test_host", "hello config");
    let mut req = request(&[("x-test", "local")]);
    let mut s = chain(&f).start();
    let local = s
        .on_request(&mut req, &info(0))
        .await
        .unwrap()
        .expect("local");
    assert_eq!(local.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(h(&local.headers, "x-local"), "1");
    assert_eq!(&local.body[..], b"teapot");

    let mut req = request(&[("x-test", "config")]);
    let mut s = chain(&f).start();
    let local = s
        .on_request(&mut req, &info(0))
        .await
        .unwrap()
        .expect("local");
    assert_eq!(&local.body[..], b"hello config");
}

#[tokio::test]
async fn local_response_in_response_phase_replaces_it() {
    let f = load("resp-local", "test_host", "");
    let mut req = request(&[("x-test", "local-response-phase")]);
    let mut s = chain(&f).start();
    assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
    let mut resp = response(&[]);
    let replaced = s
        .on_response(&mut resp, &info(0))
        .await
        .unwrap()
        .expect("replaced");
    assert_eq!(replaced.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h(&resp.headers, "x-replaced"), "1");
}

#[test]
fn refused_configuration_is_a_config_error() {
    let e = WasmFilter::load(
        "refuse",
        wasm("test_host"),
        "refuse",
        limits(),
        FailMode::Open,
    );
    assert!(matches!(e, Err(FilterError::Config(_))), "{:?}", e.err());
}

#[tokio::test]
async fn metrics_from_the_guest() {
    let f = load("metrics-filter", "test_host", "");
    let c = chain(&f);
    for v in ["3", "9"] {
        let mut req = request(&[("x-test", "metrics"), ("x-value", v)]);
        let mut s = c.start();
        assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
        if v == "9" {
            assert_eq!(h(&req.headers, "x-counter-value"), "Ok(\"2\")");
        }
    }
    assert_eq!(counter(&f, "test_requests_total"), 2);
    assert_eq!(counter(&f, "test_gauge"), 9);
    let snap = f.metrics().snapshot();
    let hist = snap.iter().find(|m| m.name == "test_hist").unwrap();
    let MetricValue::Histogram {
        count,
        sum,
        ref buckets,
    } = hist.value
    else {
        panic!()
    };
    assert_eq!((count, sum), (2, 12));
    assert_eq!(buckets[2], (4, 1)); // 3 <= 4
    assert_eq!(buckets[4], (16, 2)); // 9 <= 16
    let host = f.metrics().host();
    assert!(host.calls > 0 && host.call_nanos > 0);
    assert_eq!(host.traps + host.timeouts + host.out_of_memory, 0);
}

#[tokio::test]
async fn logging_time_and_wasi() {
    let f = load("log-filter", "test_host", "");
    let mut req = request(&[("x-test", "log")]);
    let mut s = chain(&f).start();
    assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
    assert_eq!(h(&req.headers, "x-time-ok"), "1");
}

#[test]
fn shared_data_cas_across_instances_and_threads() {
    let f = load_with(
        "shared-filter",
        "test_host",
        "",
        WasmLimits {
            instances: 3,
            ..limits()
        },
        FailMode::Closed,
    );
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let f = f.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let c = chain(&f);
                    for _ in 0..25 {
                        let mut req = request(&[("x-test", "shared")]);
                        let mut s = c.start();
                        assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
                        assert_eq!(h(&req.headers, "x-cas-stale"), "refused");
                    }
                })
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Every increment landed exactly once, whichever instance made it.
    let mut req = request(&[("x-test", "shared")]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut s = chain(&f).start();
        s.on_request(&mut req, &info(0)).await.unwrap();
    });
    assert_eq!(h(&req.headers, "x-counter"), "101");
    assert_eq!(f.live_instances(), 3);
    assert_eq!(f.metrics().host().instances_created, 3);
}

#[tokio::test]
async fn instances_are_reused_and_every_stream_ends_once() {
    let f = load("reuse-filter", "test_host", "");
    // Streams enter the guest through the fused entry points: on_log is
    // counted below through them.
    assert!(f.fused_entries());
    let c = chain(&f);
    for i in 0..200 {
        let mut req = request(&[("x-test", "metrics")]);
        let mut resp = response(&[]);
        let mut s = c.start();
        assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
        if i % 2 == 0 {
            // Half the clients go away before the response.
            s.on_response(&mut resp, &info(0)).await.unwrap();
        }
    }
    // A stream that never reached the filter creates no context.
    drop(c.start());
    // A stream used without a chain still ends when dropped.
    let mut raw = f.new_stream();
    let mut req = request(&[]);
    raw.on_request_headers(&mut req, &info(0));
    drop(raw);
    assert_eq!(f.metrics().host().instances_created, 2);
    assert!(f.live_instances() <= 2);
    assert_eq!(counter(&f, "test_requests_total"), 200);
    assert_eq!(counter(&f, "test_on_log_total"), 201);
}

#[tokio::test]
async fn pause_resumes_from_a_tick_through_the_effective_context() {
    // The guest parks the stream; its root context's tick (every 5 ms)
    // sets a header on it through proxy_set_effective_context and resumes
    // it with proxy_continue_stream.
    let f = load("pause-tick", "test_host", "");
    let mut req = request(&[("x-test", "pause")]);
    let mut s = chain(&f).start();
    let r = tokio::time::timeout(Duration::from_secs(10), s.on_request(&mut req, &info(0)))
        .await
        .expect("the tick resumes the stream");
    assert!(r.unwrap().is_none());
    assert_eq!(h(&req.headers, "x-resumed"), "1");
    assert_eq!(h(&req.headers, "x-test"), "pause", "head kept");
    assert_eq!(req.uri.path(), "/products/42");
    drop(s);
    assert_eq!(counter(&f, "test_on_log_total"), 1);
}

#[tokio::test]
async fn ticks_reach_the_root_context() {
    let f = load("ticks", "test_host", "");
    let ticks = eventually(|| async {
        let mut req = request(&[("x-test", "ticks")]);
        chain(&f)
            .start()
            .on_request(&mut req, &info(0))
            .await
            .unwrap();
        let n: u64 = h(&req.headers, "x-ticks").parse().unwrap_or(0);
        (n >= 3).then_some(n)
    })
    .await;
    assert!(ticks >= 3);
}

/// Puts `value` on the test-host guest's shared queue `events` from a
/// request, which must succeed.
async fn enqueue(f: &Arc<WasmFilter>, value: &str) {
    let mut req = request(&[("x-test", "enqueue"), ("x-value", value)]);
    chain(f)
        .start()
        .on_request(&mut req, &info(0))
        .await
        .unwrap();
    assert_eq!(h(&req.headers, "x-enqueued"), "Ok(())");
}

#[tokio::test]
async fn shared_queue_wakes_the_registering_root_context() {
    let f = load("queue", "test_host", "");
    enqueue(&f, "hello-queue").await;
    // proxy_on_queue_ready runs on the ticker thread: the root context
    // dequeues the item into shared data.
    eventually(|| async {
        let mut req = request(&[("x-test", "queue-seen")]);
        chain(&f)
            .start()
            .on_request(&mut req, &info(0))
            .await
            .unwrap();
        (h(&req.headers, "x-queue-last") == "hello-queue").then_some(())
    })
    .await;
}

/// Retries `probe` for up to 10 s (the ticker thread delivers ticks and
/// queue events asynchronously; the machine may be slow).
async fn eventually<T, F, Fut>(mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "condition not reached in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- bodies ------------------------------------------------------------------

/// A body made of given frames (data chunks, maybe trailers).
struct Frames(std::collections::VecDeque<http_body::Frame<bytes::Bytes>>);

impl http_body::Body for Frames {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

fn chunks(data: &[u8], size: usize) -> Frames {
    Frames(
        data.chunks(size)
            .map(|c| http_body::Frame::data(bytes::Bytes::copy_from_slice(c)))
            .collect(),
    )
}

async fn collect<B: http_body::Body<Data = bytes::Bytes> + Unpin>(
    body: B,
) -> (Vec<u8>, Option<http::HeaderMap>)
where
    B::Error: std::fmt::Debug,
{
    use http_body_util::BodyExt;
    let c = body.collect().await.expect("body");
    let trailers = c.trailers().cloned();
    (c.to_bytes().to_vec(), trailers)
}

#[tokio::test]
async fn request_body_held_to_its_end_then_rewritten() {
    let f = load("body", "test_host", "");
    let c = chain(&f);
    assert!(c.wants_bodies());
    // 900 KiB in 16 KiB chunks: under the 1 MiB default bound.
    let data: Vec<u8> = (0..900 * 1024).map(|i| b"abcdefgh"[i % 8]).collect();
    let mut req = request(&[("x-test", "body"), ("content-length", "921600")]);
    let mut s = c.start();
    assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
    let mut body = s.request_body(chunks(&data, 16 << 10), &info(0));
    body.prime().await.expect("held, then released");
    let mut expected = data.to_ascii_uppercase();
    expected.extend_from_slice(b"|wasm");
    assert_eq!(body.known_length(), Some(expected.len() as u64));
    let (got, _) = collect(body).await;
    assert!(got == expected, "rewritten body differs");
}

#[tokio::test]
async fn request_body_past_the_bound_is_413_and_response_500() {
    let f = load("body-bound", "test_host", "");
    let big = vec![b'x'; 2 << 20];
    let mut req = request(&[("x-test", "body"), ("content-length", "2097152")]);
    let mut s = chain(&f).start();
    assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
    let mut body = s.request_body(chunks(&big, 64 << 10), &info(0));
    let stop = body.prime().await.expect_err("past the bound");
    assert_eq!(
        stop.into_response(true).unwrap().status,
        StatusCode::PAYLOAD_TOO_LARGE
    );

    let mut req = request(&[("x-test", "resp-body")]);
    let mut s = chain(&f).start();
    assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
    let mut resp = response(&[("content-length", "2097152")]);
    assert!(s.on_response(&mut resp, &info(0)).await.unwrap().is_none());
    let mut body = s.response_body(chunks(&big, 64 << 10), &info(0));
    let stop = body.prime().await.expect_err("past the bound");
    assert_eq!(
        stop.into_response(false).unwrap().status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
}

/// `proxy_close_stream` resets the stream in every phase (even when the
/// callback then returns `Continue`), and the context still ends.
#[tokio::test]
async fn close_stream_resets_the_stream_in_every_phase() {
    let f = load("close", "test_host", "");
    let mut req = request(&[("x-test", "close-request")]);
    let mut s = chain(&f).start();
    assert_eq!(
        s.on_request(&mut req, &info(0)).await.unwrap_err(),
        StreamReset
    );
    assert!(s.is_reset());
    drop(s);
    assert_eq!(counter(&f, "test_on_log_total"), 1);

    let mut req = request(&[("x-test", "close-response")]);
    let mut s = chain(&f).start();
    assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
    let mut resp = response(&[]);
    assert_eq!(
        s.on_response(&mut resp, &info(0)).await.unwrap_err(),
        StreamReset
    );
    drop(s);
    assert_eq!(counter(&f, "test_on_log_total"), 2);

    let mut req = request(&[("x-test", "close-resp-body")]);
    let mut s = chain(&f).start();
    assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
    let mut resp = response(&[]);
    assert!(s.on_response(&mut resp, &info(0)).await.unwrap().is_none());
    let mut body = s.response_body(chunks(b"0123456789", 4), &info(0));
    let stop = body
        .prime()
        .await
        .expect_err("reset from the body callback");
    assert!(matches!(stop, BodyStop::Reset), "{stop:?}");
    assert_eq!(stop.into_response(false).unwrap_err(), StreamReset);
    assert!(s.is_reset());
    drop(body);
    drop(s);
    assert_eq!(counter(&f, "test_on_log_total"), 3);
    assert_eq!(f.metrics().host().traps, 0);
}

#[tokio::test]
async fn response_body_rewritten_and_trailers_edited() {
    let f = load("resp-body", "test_host", "");
    let mut req = request(&[("x-test", "resp-body")]);
    let mut s = chain(&f).start();
    assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
    let mut resp = response(&[("content-length", "10")]);
    assert!(s.on_response(&mut resp, &info(0)).await.unwrap().is_none());
    assert_eq!(h(&resp.headers, "content-length"), "<absent>");
    let mut frames = chunks(b"0123456789", 4);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-origin-trailer", "1".parse().unwrap());
    frames.0.push_back(http_body::Frame::trailers(trailers));
    let mut body = s.response_body(frames, &info(0));
    body.prime().await.unwrap();
    let (got, trailers) = collect(body).await;
    assert_eq!(got, b"<0123456789>");
    let trailers = trailers.expect("trailers kept");
    assert_eq!(h(&trailers, "x-origin-trailer"), "1");
    assert_eq!(h(&trailers, "x-wasm-trailer"), "1");
}

/// `Frames` that announce their exact length, as a body with
/// `content-length` does.
struct SizedFrames(Frames, u64);

impl http_body::Body for SizedFrames {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.0).poll_frame(cx)
    }
    fn size_hint(&self) -> http_body::SizeHint {
        let left: u64 = self
            .0
             .0
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        http_body::SizeHint::with_exact(left.min(self.1))
    }
}

#[tokio::test]
async fn content_length_stays_unless_a_filter_resizes_the_body() {
    let f = load("body-length", "test_host", "");
    let sized = || SizedFrames(chunks(b"aaaabbbbcccc", 4), 12);
    let run = |test: &'static str| {
        let f = f.clone();
        async move {
            let mut req = request(&[("x-test", test), ("content-length", "12")]);
            let mut s = chain(&f).start();
            assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
            let mut body = s.request_body(sized(), &info(0));
            body.prime().await.unwrap();
            body.set_length(&mut req.headers);
            let length = req
                .headers
                .get("content-length")
                .map(|v| v.to_str().unwrap().to_string());
            use http_body_util::BodyExt;
            (length, body.collect().await.map(|c| c.to_bytes()))
        }
    };
    // Unchanged: the length stays, the body streams whole.
    let (length, body) = run("body-chunks").await;
    assert_eq!(length.as_deref(), Some("12"));
    assert_eq!(&body.unwrap()[..], b"aaaabbbbcccc");
    // Resized before the head leaves: chunked.
    let (length, body) = run("body-grow").await;
    assert_eq!(length, None);
    assert_eq!(&body.unwrap()[..], b"aaaa+bbbb+cccc+");
    // Resized after the head left with the length: the body is cut.
    let (length, body) = run("body-grow-late").await;
    assert_eq!(length.as_deref(), Some("12"));
    assert!(matches!(body, Err(filters::BodyStop::Resized)));
}

#[tokio::test]
async fn body_streams_when_the_filter_does_not_hold_it() {
    let f = load("body-stream", "test_host", "");
    let mut req = request(&[("x-test", "body-chunks")]);
    let mut s = chain(&f).start();
    assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
    let mut body = s.request_body(chunks(b"aaaabbbbcccc", 4), &info(0));
    body.prime().await.unwrap();
    // Primed with the first chunk only: the rest has not been read.
    assert_eq!(body.known_length(), None);
    let (got, _) = collect(body).await;
    assert_eq!(got, b"aaaabbbbcccc");
    let mut resp = response(&[]);
    s.on_response(&mut resp, &info(0)).await.unwrap();
    // Three chunks and the end of the body.
    assert_eq!(h(&resp.headers, "x-body-calls"), "4");
}

// ---- callouts ----------------------------------------------------------------

/// The test binary's callout implementation (the gateway's real one is
/// tested end to end in tests/tests/wasm.rs): cluster `auth` answers 200
/// with a body and a header after 10 ms, `slow` after 30 s.
struct TestCallout;

impl filters::callout::HttpCallout for TestCallout {
    fn call(
        &self,
        req: filters::callout::CalloutRequest,
    ) -> Result<filters::callout::CalloutFuture, filters::callout::CalloutError> {
        use filters::callout::{CalloutError, CalloutResponse};
        let delay = match req.cluster.as_str() {
            "auth" => Duration::from_millis(10),
            "slow" => Duration::from_secs(30),
            other => return Err(CalloutError::UnknownCluster(other.to_string())),
        };
        if req.grpc {
            // A unary gRPC call: OK when it is the framed call test-host
            // makes, INVALID_ARGUMENT otherwise.
            let shaped = req.method == http::Method::POST
                && req.path == "/flashgate.Test/Check"
                && h(&req.headers, "content-type") == "application/grpc"
                && h(&req.headers, "te") == "trailers"
                && h(&req.headers, "grpc-timeout") == "1000m"
                && req.body[..] == [0, 0, 0, 0, 0];
            return Ok(Box::pin(async move {
                let mut trailers = http::HeaderMap::new();
                let status = if shaped { "0" } else { "3" };
                trailers.insert("grpc-status", status.parse().unwrap());
                Ok(CalloutResponse {
                    status: StatusCode::OK,
                    headers: http::HeaderMap::new(),
                    body: bytes::Bytes::from_static(&[0, 0, 0, 0, 1, 42]),
                    trailers,
                })
            }));
        }
        let seen = format!(
            "{} {} host={} from={}",
            req.method,
            req.path,
            h(&req.headers, "host"),
            h(&req.headers, "x-from")
        );
        Ok(Box::pin(async move {
            tokio::time::sleep(delay).await;
            let mut headers = http::HeaderMap::new();
            headers.insert("x-auth", "granted".parse().unwrap());
            Ok(CalloutResponse {
                status: StatusCode::OK,
                headers,
                body: seen.into(),
                trailers: http::HeaderMap::new(),
            })
        }))
    }

    fn spawn(&self, task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) {
        // Each test has its own runtime, which ends with the test: root
        // callouts run on one that lives as long as the binary.
        static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
        RUNTIME
            .get_or_init(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .unwrap()
            })
            .spawn(task);
    }
}

fn callouts() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| filters::callout::set_http_callout(Arc::new(TestCallout)));
}

#[tokio::test]
async fn callout_pauses_and_resumes_with_the_answer() {
    callouts();
    let f = load("callout", "test_host", "");
    let mut req = request(&[("x-test", "callout"), ("x-callout-cluster", "auth")]);
    let mut s = chain(&f).start();
    let r = tokio::time::timeout(Duration::from_secs(10), s.on_request(&mut req, &info(0)))
        .await
        .expect("resumed");
    assert!(r.unwrap().is_none());
    assert_eq!(h(&req.headers, "x-callout-status"), "200");
    assert_eq!(h(&req.headers, "x-callout-header"), "granted");
    assert_eq!(
        h(&req.headers, "x-callout-body"),
        "GET /auth host=auth.internal from=wasm"
    );

    // An unknown cluster is refused at once; the guest goes on.
    let mut req = request(&[("x-test", "callout"), ("x-callout-cluster", "nope")]);
    let mut s = chain(&f).start();
    assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
    assert_eq!(h(&req.headers, "x-callout-error"), "BadArgument");
}

#[tokio::test]
async fn callout_timeout_delivers_an_empty_answer() {
    callouts();
    let f = load("callout-timeout", "test_host", "");
    let mut req = request(&[
        ("x-test", "callout"),
        ("x-callout-cluster", "slow"),
        ("x-callout-timeout", "50"),
    ]);
    let mut s = chain(&f).start();
    let r = tokio::time::timeout(Duration::from_secs(10), s.on_request(&mut req, &info(0)))
        .await
        .expect("the callout's own timeout resumes the stream");
    assert!(r.unwrap().is_none());
    assert_eq!(h(&req.headers, "x-callout-status"), "none");
    assert_eq!(h(&req.headers, "x-callout-body"), "");
}

#[tokio::test]
async fn grpc_calls_go_out_framed_and_answer_through_on_grpc_call_response() {
    callouts();
    let f = load("grpc", "test_host", "");
    let mut req = request(&[("x-test", "grpc")]);
    let mut s = chain(&f).start();
    let r = tokio::time::timeout(Duration::from_secs(10), s.on_request(&mut req, &info(0)))
        .await
        .expect("resumed");
    assert!(r.unwrap().is_none());
    // OK (0): the call had the shape of a unary gRPC call.
    assert_eq!(h(&req.headers, "x-grpc-status"), "0");
}

#[tokio::test]
async fn client_abort_while_paused_ends_the_context() {
    callouts();
    let f = load("abort-paused", "test_host", "");
    let mut req = request(&[
        ("x-test", "callout"),
        ("x-callout-cluster", "slow"),
        ("x-callout-timeout", "60000"),
    ]);
    let mut s = chain(&f).start();
    let waited =
        tokio::time::timeout(Duration::from_millis(100), s.on_request(&mut req, &info(0))).await;
    assert!(waited.is_err(), "still paused on the slow callout");
    assert_eq!(counter(&f, "test_on_log_total"), 0);
    drop(s); // the client went away
    assert_eq!(counter(&f, "test_on_log_total"), 1);
}

/// What the test-host guest's root context stored of its callout's
/// answer, once it is there.
async fn root_call_seen(f: &Arc<WasmFilter>) -> String {
    eventually(|| async {
        let mut req = request(&[("x-test", "root-call-seen")]);
        chain(f)
            .start()
            .on_request(&mut req, &info(0))
            .await
            .unwrap();
        let v = h(&req.headers, "x-root-call").to_string();
        (v != "<none>").then_some(v)
    })
    .await
}

#[tokio::test]
async fn a_root_context_calls_out_and_gets_the_answer() {
    callouts();
    let f = load("rootcall", "test_host", "");
    // The root context calls from `on_queue_ready`: no request waits.
    enqueue(&f, "call:auth").await;
    let seen = root_call_seen(&f).await;
    // Status and body of the answer, read through the call-response
    // header map and buffer from the root context.
    assert_eq!(seen, "200 GET /root-call host=auth from=<absent>");

    // A cluster that does not exist: the call is refused at once.
    let f = load("rootcall-unknown", "test_host", "");
    enqueue(&f, "call:nope").await;
    let seen = root_call_seen(&f).await;
    assert_eq!(seen, "refused");
}

// ---- hot reload --------------------------------------------------------------

#[tokio::test]
async fn a_replaced_module_ends_its_root_contexts() {
    let dir = std::env::temp_dir().join(format!("fg-root-done-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("filter.wasm");
    std::fs::copy(wasm("test_host"), &path).unwrap();
    let f = WasmFilter::load("root-done", &path, "", limits(), FailMode::Closed).unwrap();
    let mut s = chain(&f).start();
    let mut req = request(&[("x-test", "metrics")]);
    assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
    assert_eq!(counter(&f, "test_root_done_total"), 0);

    // The swap keeps the old module for the stream still on it...
    f.reload().unwrap();
    assert_eq!(counter(&f, "test_root_done_total"), 0);
    // ...and its root context ends (on_done) with that stream (or a
    // moment later, when the ticker thread lets go of the old pool).
    drop(s);
    eventually(|| async { (counter(&f, "test_root_done_total") == 1).then_some(()) }).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn hot_reload_swaps_the_module_and_refuses_a_bad_one() {
    let dir = std::env::temp_dir().join(format!("fg-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("filter.wasm");
    std::fs::copy(wasm("test_host"), &path).unwrap();
    // Both modules accept this config: test-host ignores it, add-headers
    // sets x-version on responses.
    let config = r#"{"response_set": [["x-version", "2"]]}"#;
    let f = WasmFilter::load("reload", &path, config, limits(), FailMode::Closed).unwrap();
    f.watch(Duration::from_millis(20));
    let c = chain(&f);

    // A stream that starts on the old module...
    let mut old = c.start();
    let mut req = request(&[]);
    assert!(old.on_request(&mut req, &info(0)).await.unwrap().is_none());

    std::fs::copy(wasm("add_headers"), &path).unwrap();
    eventually(|| async { (f.metrics().host().reloads >= 1).then_some(()) }).await;

    // ...finishes on it; new streams run the new one.
    let mut resp = response(&[]);
    assert!(old
        .on_response(&mut resp, &info(0))
        .await
        .unwrap()
        .is_none());
    assert_eq!(h(&resp.headers, "x-version"), "<absent>");
    let mut s = c.start();
    let mut req = request(&[]);
    assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
    let mut resp = response(&[]);
    assert!(s.on_response(&mut resp, &info(0)).await.unwrap().is_none());
    assert_eq!(h(&resp.headers, "x-version"), "2");

    // A broken file is refused; the running module stays.
    std::fs::write(&path, b"\0asm broken").unwrap();
    eventually(|| async { (f.metrics().host().reload_failures >= 1).then_some(()) }).await;
    assert!(f.reload().is_err());
    let mut s = c.start();
    let mut req = request(&[]);
    assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
    let mut resp = response(&[]);
    assert!(s.on_response(&mut resp, &info(0)).await.unwrap().is_none());
    assert_eq!(h(&resp.headers, "x-version"), "2");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- failures ----------------------------------------------------------------

async fn trap_run(f: &Arc<WasmFilter>) -> (Option<filters::LocalResponse>, http::request::Parts) {
    let mut req = request(&[("x-trap", "1"), ("keep", "me")]);
    let mut s = chain(f).start();
    let r = s.on_request(&mut req, &info(0)).await.expect("not reset");
    (r, req)
}

async fn passes(f: &Arc<WasmFilter>) {
    let mut req = request(&[]);
    let mut s = chain(f).start();
    assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
    assert_eq!(h(&req.headers, "x-trap-passed"), "1");
}

fn trap_limits() -> WasmLimits {
    WasmLimits {
        timeout: Duration::from_millis(20),
        memory: 16 << 20,
        instances: 1,
    }
}

#[tokio::test]
async fn infinite_loop_hits_the_deadline_fail_open() {
    let f = load_with(
        "loop-open",
        "test_trap",
        "loop",
        trap_limits(),
        FailMode::Open,
    );
    passes(&f).await;
    let started = std::time::Instant::now();
    let (r, req) = trap_run(&f).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(r.is_none(), "fail open skips the filter");
    assert_eq!(h(&req.headers, "keep"), "me");
    let host = f.metrics().host();
    assert_eq!(
        (host.timeouts, host.instances_poisoned, host.failed_open),
        (1, 1, 1)
    );
    // The next request gets a fresh instance.
    passes(&f).await;
    assert_eq!(f.metrics().host().instances_created, 2);
}

#[tokio::test]
async fn infinite_loop_fail_closed() {
    let f = load_with(
        "loop-closed",
        "test_trap",
        "loop",
        trap_limits(),
        FailMode::Closed,
    );
    let (r, _) = trap_run(&f).await;
    assert_eq!(r.expect("503").status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(f.metrics().host().timeouts, 1);
    passes(&f).await;
}

#[tokio::test]
async fn panic_fail_open_and_closed() {
    for (mode, name) in [
        (FailMode::Open, "panic-open"),
        (FailMode::Closed, "panic-closed"),
    ] {
        let f = load_with(name, "test_trap", "panic", trap_limits(), mode);
        let (r, req) = trap_run(&f).await;
        match mode {
            FailMode::Open => assert!(r.is_none()),
            FailMode::Closed => assert_eq!(r.unwrap().status, StatusCode::SERVICE_UNAVAILABLE),
        }
        assert_eq!(h(&req.headers, "keep"), "me");
        let host = f.metrics().host();
        assert_eq!((host.traps, host.timeouts, host.out_of_memory), (1, 0, 0));
        passes(&f).await;
    }
}

#[tokio::test]
async fn memory_hog_hits_the_cap() {
    for (mode, name) in [
        (FailMode::Open, "oom-open"),
        (FailMode::Closed, "oom-closed"),
    ] {
        // A generous deadline: filling memory up to the cap must end in
        // out-of-memory, not a timeout, also on a busy machine.
        let l = WasmLimits {
            timeout: Duration::from_secs(2),
            ..trap_limits()
        };
        let f = load_with(name, "test_trap", "oom", l, mode);
        let (r, req) = trap_run(&f).await;
        assert_eq!(h(&req.headers, "x-hog"), "<absent>");
        match mode {
            FailMode::Open => assert!(r.is_none()),
            FailMode::Closed => assert_eq!(r.unwrap().status, StatusCode::SERVICE_UNAVAILABLE),
        }
        assert_eq!(f.metrics().host().out_of_memory, 1);
        passes(&f).await;
    }
}

#[tokio::test]
async fn panic_in_response_phase() {
    let f = load_with(
        "resp-panic",
        "test_trap",
        "response-panic",
        trap_limits(),
        FailMode::Closed,
    );
    let mut req = request(&[("x-trap", "1")]);
    let mut s = chain(&f).start();
    assert!(s.on_request(&mut req, &info(0)).await.unwrap().is_none());
    let mut resp = response(&[("x-origin", "1")]);
    let r = s
        .on_response(&mut resp, &info(0))
        .await
        .unwrap()
        .expect("503");
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    drop(s); // on_done on a discarded instance must not call the guest
    assert_eq!(f.metrics().host().traps, 1);
}

#[test]
fn failing_start_is_a_load_error() {
    for mode in ["configure-panic", "configure-loop"] {
        let e = WasmFilter::load(
            "bad-start",
            wasm("test_trap"),
            mode,
            trap_limits(),
            FailMode::Open,
        );
        assert!(
            matches!(e, Err(FilterError::Wasm(_))),
            "{mode}: {:?}",
            e.err()
        );
    }
}

#[test]
fn module_without_abi_marker_is_refused() {
    let Err(e) = WasmFilter::load("no-abi", wasm("no_abi"), "", limits(), FailMode::Open) else {
        panic!("a module without the ABI marker must be refused")
    };
    assert!(matches!(e, FilterError::Wasm(_)));
    assert!(e.to_string().contains("not a proxy-wasm module"), "{e}");
}

#[test]
fn garbage_and_missing_files_are_refused() {
    let e = WasmFilter::from_bytes("junk", b"not wasm at all", "", limits(), FailMode::Open);
    assert!(matches!(e, Err(FilterError::Wasm(_))));
    let e = WasmFilter::load(
        "missing",
        "/nonexistent/x.wasm",
        "",
        limits(),
        FailMode::Open,
    );
    assert!(matches!(e, Err(FilterError::Wasm(_))));
}

#[tokio::test]
async fn crash_loop_is_backed_off_not_restarted_per_request() {
    let f = load_with(
        "crash-loop",
        "test_trap",
        "panic",
        trap_limits(),
        FailMode::Open,
    );
    // A module that traps on every request: after the second failure in a
    // row, new instances wait (100 ms, then doubling); meanwhile streams
    // follow the fail mode without an instance.
    for _ in 0..50 {
        let (r, req) = trap_run(&f).await;
        assert!(r.is_none(), "fail open");
        assert_eq!(h(&req.headers, "keep"), "me");
    }
    let host = f.metrics().host();
    assert!(
        host.instances_created <= 4,
        "restarted in a loop: {} instances for 50 requests",
        host.instances_created
    );
    assert!(host.backed_off >= 40, "{host:?}");
    assert_eq!(host.failed_open, 50);
    // After the backoff a new instance serves, and a good call ends the
    // streak.
    eventually(|| async {
        let mut req = request(&[]);
        chain(&f)
            .start()
            .on_request(&mut req, &info(0))
            .await
            .unwrap();
        (h(&req.headers, "x-trap-passed") == "1").then_some(())
    })
    .await;
    passes(&f).await;
}
