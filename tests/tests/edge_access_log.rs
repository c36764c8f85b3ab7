//! The JSON access log of the real binary: one object per request with the
//! resolved client, route, endpoint, status, bytes and durations.

use std::process::{Command, Stdio};
use std::time::Duration;

use flashgate_tests::{
    edge, flashgate_bin, send, wait_listening, with_fixed_ports, Proc, Upstream,
};
use http::Request;

#[tokio::test]
async fn json_access_log_lines_have_the_request_fields() {
    let up = Upstream::fixed("twelve bytes").await;
    let text = edge::config(
        up.addr,
        "trusted_proxies = [\"127.0.0.0/8\"]\nmax_uri_bytes = \"1KiB\"",
        "",
    )
    .replace(
        "[log]\naccess_log = false",
        "[log]\nformat = \"json\"\naccess_log = true",
    );
    let (text, public, _admin) = with_fixed_ports(&text);
    let dir = flashgate_tests::tls::temp_dir("access-log");
    let path = dir.join("gw.toml");
    std::fs::write(&path, text).unwrap();
    let log_path = dir.join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut gw = Proc::spawn(
        Command::new(flashgate_bin())
            .args(["run", "--config"])
            .arg(&path)
            .env_remove("RUST_LOG")
            .stderr(Stdio::from(log)),
    );
    assert!(wait_listening(public, Duration::from_secs(20)).await);

    let got = send(
        Request::get(format!("http://{public}/items/7?x=1"))
            .header("x-forwarded-for", "203.0.113.5")
            .header("x-request-id", "req-abc")
            .body(flashgate_tests::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    let refused = send(
        Request::get(format!("http://{public}/{}", "a".repeat(2000)))
            .header("x-request-id", "req-long")
            .body(flashgate_tests::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(refused.status, 414);

    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(20)).is_some());
    let text = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["target"] == "flashgate::access")
        .collect();
    let ok = lines
        .iter()
        .find(|l| l["request_id"] == "req-abc")
        .unwrap_or_else(|| panic!("no access line for req-abc in:\n{text}"));
    assert_eq!(ok["client"], "203.0.113.5", "the resolved client");
    assert_eq!(
        ok["peer"].as_str().unwrap().split(':').next(),
        Some("127.0.0.1")
    );
    assert_eq!(ok["route"], "default");
    assert_eq!(ok["upstream"], up.addr.to_string());
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["bytes"], 12);
    assert_eq!(ok["complete"], true);
    assert_eq!(ok["path"], "/items/7");
    assert_eq!(ok["method"], "GET");
    for f in [
        "ms",
        "total_ms",
        "upstream_connect_ms",
        "upstream_first_byte_ms",
    ] {
        assert!(ok[f].as_f64().is_some_and(|v| v >= 0.0), "{f}: {ok}");
    }
    assert!(ok["total_ms"].as_f64() >= ok["ms"].as_f64());

    let long = lines
        .iter()
        .find(|l| l["request_id"] == "req-long")
        .expect("refused requests are logged too");
    assert_eq!(long["status"], 414);
    assert_eq!(long["route"], "none");
    assert_eq!(long["upstream"], "-");
    assert!(long["upstream_connect_ms"].is_null());
}
