//! Wasm filters through the real gateway: guests built with the public
//! `proxy-wasm` SDK from `wasm-plugins/`, real HTTP clients and upstreams.

use flashgate_tests::*;
use http::Request;

/// A config with one Wasm filter `f` on the catch-all route.
fn with_filter(
    upstream: std::net::SocketAddr,
    plugin: &str,
    plugin_config: &str,
    extra: &str,
) -> String {
    config(
        &[upstream],
        "",
        &format!(
            "filters = [\"f\"]\n[[filters]]\nname = \"f\"\nwasm = \"{}\"\nconfig = '{plugin_config}'\n{extra}\n",
            wasm_plugin(plugin).display()
        ),
    )
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
    let echo = Upstream::echo().await;
    let gw = gateway(&with_filter(echo.addr, "bot_score", "", "")).await;
    let base = format!("http://{}", gw.addr("public").unwrap());
    let browser = send(
        Request::get(format!("{base}/"))
            .header("user-agent", "Mozilla/5.0 (X11; Linux x86_64)")
            .header("accept-language", "en")
            .header("accept", "text/html")
            .body(empty())
            .unwrap(),
    )
    .await
    .json();
    let bot = send(
        Request::get(format!("{base}/"))
            .header("user-agent", "curl/8.0")
            .body(empty())
            .unwrap(),
    )
    .await
    .json();
    let score = |v: &serde_json::Value| {
        v["headers"]["x-bot-score"]
            .as_str()
            .unwrap()
            .parse::<u32>()
            .unwrap()
    };
    assert!(
        score(&bot) > score(&browser),
        "bot {} vs browser {}",
        score(&bot),
        score(&browser)
    );
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
    assert_eq!(got.status, 500);
    assert_eq!(up.hits(), 0);

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

#[test]
fn bad_modules_are_config_errors_with_key_paths() {
    let up: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let cfg = with_filter(up, "no_abi", "", "");
    let e = Config::parse(&cfg).unwrap_err();
    assert_eq!(e.path, "filters[0].wasm", "{e}");
    let cfg = with_filter(up, "add_headers", "{not json", "");
    let e = Config::parse(&cfg).unwrap_err();
    assert_eq!(e.path, "filters[0].config", "{e}");
    let cfg = config(
        &[up],
        "",
        "[[filters]]\nname = \"f\"\nwasm = \"/nonexistent.wasm\"\n",
    );
    assert_eq!(Config::parse(&cfg).unwrap_err().path, "filters[0].wasm");
}
