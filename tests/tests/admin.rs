//! The admin listener: probes, metrics, status, the token, and reload.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flashgate_tests::*;
use http::Request;

fn admin_url(gw: &Gateway, path: &str) -> String {
    format!("http://{}{path}", gw.admin_addr())
}

#[tokio::test]
async fn probes_status_and_metrics() {
    let up = Upstream::fixed("ok").await;
    let gw = gateway(&Cfg::new(&[up.addr]).build()).await;
    assert_eq!(get(&admin_url(&gw, "/healthz")).await.status, 200);
    assert_eq!(get(&admin_url(&gw, "/readyz")).await.status, 200);
    let status = get(&admin_url(&gw, "/admin/status")).await.json();
    assert_eq!(status["routes"][0]["name"], "default");
    assert_eq!(status["routes"][0]["priority"], "normal");
    assert_eq!(status["clusters"][0]["name"], "origin");
    assert_eq!(
        status["clusters"][0]["endpoints"][0]["address"],
        up.addr.to_string()
    );
    assert_eq!(status["clusters"][0]["endpoints"][0]["healthy"], true);
    let metrics = get(&admin_url(&gw, "/metrics")).await;
    assert!(metrics
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    assert!(metrics
        .text()
        .contains("flashgate_upstream_endpoint_healthy"));
    assert_eq!(get(&admin_url(&gw, "/nope")).await.status, 404);
    let post = send(
        Request::post(admin_url(&gw, "/metrics"))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(post.status, 405);
}

#[tokio::test]
async fn mutating_calls_need_the_token() {
    let up = Upstream::fixed("ok").await;
    let gw = gateway(&Cfg::new(&[up.addr]).build()).await;
    let reload = |auth: Option<&str>| {
        let mut b = Request::post(admin_url(&gw, "/admin/reload"));
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(empty()).unwrap()
    };
    let got = send(reload(None)).await;
    assert_eq!(got.status, 401);
    assert_eq!(got.header("www-authenticate"), Some("Bearer"));
    assert_eq!(send(reload(Some("Bearer wrong"))).await.status, 401);
    assert_eq!(
        send(reload(Some("test-token"))).await.status,
        401,
        "scheme required"
    );
    // The right token gets through to the reload itself, which refuses:
    // this gateway was started without a file.
    let got = send(reload(Some("Bearer test-token"))).await;
    assert_eq!(got.status, 400);
    assert!(got.json()["error"]
        .as_str()
        .unwrap()
        .contains("without a config file"));

    // Without a configured token, mutating calls are off altogether.
    let open = gateway(
        &Cfg::new(&[up.addr])
            .build()
            .replace("token = \"test-token\"\n", ""),
    )
    .await;
    let got = send(
        Request::post(format!("http://{}/admin/reload", open.admin_addr()))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 403);
}

/// Reload swaps routes and upstreams while traffic flows: no request fails,
/// an invalid file is refused with its key path and the old config stays.
#[tokio::test]
async fn reload_under_load_without_failures() {
    let blue = Upstream::fixed("blue").await;
    let green = Upstream::fixed("green").await;
    let dir = std::env::temp_dir().join(format!("flashgate-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gw.toml");
    std::fs::write(&path, Cfg::new(&[blue.addr]).build()).unwrap();
    let gw = Gateway::start(Config::load(&path).unwrap(), Some(path.clone()))
        .await
        .unwrap();
    let target = format!("http://{}/", gw.addr("public").unwrap());
    let do_reload = || async {
        send(
            Request::post(admin_url(&gw, "/admin/reload"))
                .header("authorization", "Bearer test-token")
                .body(empty())
                .unwrap(),
        )
        .await
    };

    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, target) = (stop.clone(), target.clone());
        load.push(tokio::spawn(async move {
            let c = client();
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let got = send_with(&c, Request::get(&target).body(empty()).unwrap()).await;
                assert_eq!(
                    got.status,
                    200,
                    "a request failed during reload: {}",
                    got.text()
                );
                seen.push(got.text());
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..10 {
        let to = if i % 2 == 0 { green.addr } else { blue.addr };
        std::fs::write(&path, Cfg::new(&[to]).build()).unwrap();
        let got = do_reload().await;
        assert_eq!(got.status, 200, "{}", got.text());
        assert_eq!(got.json()["restart_required"], serde_json::json!([]));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Last write pointed at blue; now break the file.
    std::fs::write(
        &path,
        Cfg::new(&[green.addr])
            .build()
            .replace("upstream = \"origin\"", "upstream = \"nowhere\""),
    )
    .unwrap();
    let got = do_reload().await;
    assert_eq!(got.status, 400);
    assert_eq!(
        got.json()["error"],
        "routes[0].upstream: unknown upstream \"nowhere\""
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::SeqCst);
    let mut all = Vec::new();
    for t in load {
        all.extend(t.await.unwrap());
    }
    assert!(all.iter().any(|b| b == "green") && all.iter().any(|b| b == "blue"));
    assert_eq!(
        get(&target).await.text(),
        "blue",
        "the refused file changed nothing"
    );
    assert_eq!(
        metric(
            gw.admin_addr(),
            "flashgate_config_reloads_total{result=\"ok\"}"
        )
        .await,
        10.0
    );
    assert_eq!(
        metric(
            gw.admin_addr(),
            "flashgate_config_reloads_total{result=\"error\"}"
        )
        .await,
        1.0
    );

    // A listener change is accepted for the rest and reported.
    std::fs::write(
        &path,
        Cfg::new(&[blue.addr])
            .build()
            .replace("name = \"public\"", "name = \"renamed\""),
    )
    .unwrap();
    let got = do_reload().await;
    assert_eq!(
        got.json()["restart_required"],
        serde_json::json!(["listeners"])
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Unchanged clusters survive a reload with their state: an ejected
/// endpoint stays ejected and the warm pool stays warm.
#[tokio::test]
async fn reload_keeps_unchanged_clusters() {
    let up = Upstream::fixed("ok").await;
    let dir = std::env::temp_dir().join(format!("flashgate-keep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gw.toml");
    std::fs::write(&path, Cfg::new(&[up.addr]).build()).unwrap();
    let gw = Gateway::start(Config::load(&path).unwrap(), Some(path.clone()))
        .await
        .unwrap();
    let c = client();
    let target = format!("http://{}/", gw.addr("public").unwrap());
    send_with(&c, Request::get(&target).body(empty()).unwrap()).await;
    // Same upstream, one more route: the cluster is kept.
    std::fs::write(
        &path,
        Cfg::new(&[up.addr])
            .section(
                "[[routes]]\nname = \"extra\"\npath_prefix = \"/extra\"\nupstream = \"origin\"\n",
            )
            .build(),
    )
    .unwrap();
    gw.shared.reload().await.unwrap();
    for _ in 0..5 {
        send_with(&c, Request::get(&target).body(empty()).unwrap()).await;
    }
    assert_eq!(
        metric(gw.admin_addr(), "flashgate_upstream_connections_total").await,
        1.0,
        "pool kept across reload"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
