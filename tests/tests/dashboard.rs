//! The live dashboard (`GET /admin/ui`) in a real browser: headless
//! Chromium loads it from `flashgate demo` under load, and every number it
//! shows must be what `/admin/status` says for the same sample. A
//! screenshot is kept at `<target dir>/dashboard/admin-ui.png`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flashgate_tests::*;
use serde_json::Value;

async fn demo(admin: &str) -> (Proc, SocketAddr, SocketAddr) {
    let d = Demo::start(admin, &["--no-tls"]).await;
    (d.proc, d.public, d.admin)
}

/// Requests from a few tasks until the flag drops: catalog hits (cache,
/// Wasm filter), recommendations, checkouts past the per-IP limit (429s)
/// and a scripted user agent (the bot rule's challenge).
fn load(public: SocketAddr, stop: Arc<AtomicBool>) {
    for i in 0..6 {
        let stop = stop.clone();
        tokio::spawn(async move {
            let c = client();
            let (method, path, agent) = match i {
                0 => ("GET", "/recommendations?product=1", "curl/8"),
                4 => ("POST", "/checkout", "curl/8"),
                5 => ("GET", "/products/1", "python-requests/2.32"),
                _ => ("GET", "/products/1", "curl/8"),
            };
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::builder()
                    .method(method)
                    .uri(format!("http://{public}{path}"))
                    .header("user-agent", agent)
                    .header("accept", "application/json")
                    .body(empty())
                    .unwrap();
                if let Ok(resp) = c.request(req).await {
                    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                }
            }
        });
    }
}

fn chromium(bin: &Path, profile: &Path, args: &[&str], url: &str) -> std::process::Output {
    Command::new("timeout")
        .arg("90")
        .arg(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--no-first-run",
            // Lets the page's timers run (about three polls) before the
            // dump; virtual time waits for the fetches.
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("running chromium")
}

/// `data-k` -> text of every number the page shows.
fn shown(dom: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for part in dom.split("data-k=\"").skip(1) {
        let Some((key, rest)) = part.split_once('"') else {
            continue;
        };
        let Some(text) = rest.split_once('>').map(|(_, t)| t) else {
            continue;
        };
        let text = text.split('<').next().unwrap_or("");
        out.insert(key.replace("&amp;", "&"), text.to_string());
    }
    out
}

fn close(shown: &str, expected: f64, what: &str) {
    let v: f64 = shown
        .trim_end_matches('%')
        .parse()
        .unwrap_or_else(|_| panic!("{what}: {shown:?} is not a number"));
    assert!(
        (v - expected).abs() < 0.051,
        "{what}: page shows {shown}, status says {expected}"
    );
}

fn opt(shown: &str, expected: &Value, what: &str) {
    match expected.as_f64() {
        Some(e) => close(shown, e, what),
        None => assert_eq!(shown, "-", "{what}: status has no value"),
    }
}

/// Every number on the page against the status document of the same sample.
fn compare(page: &BTreeMap<String, String>, status: &Value) {
    let t = &status["traffic"];
    let g = |k: &str| {
        page.get(k)
            .unwrap_or_else(|| panic!("the page shows no {k}: {page:?}"))
            .as_str()
    };
    close(
        g("load_level"),
        t["load_level"].as_f64().unwrap(),
        "load level",
    );
    close(g("rps"), t["rps"].as_f64().unwrap(), "req/s");
    match t["cache"]["hit_ratio"].as_f64() {
        Some(r) => close(g("hit_ratio"), r * 100.0, "cache hit ratio"),
        None => assert_eq!(g("hit_ratio"), "-"),
    }
    close(
        g("shed_per_s"),
        t["shed"]["per_s"].as_f64().unwrap(),
        "shed/s",
    );
    close(
        g("shed_total"),
        t["shed"]["total"].as_f64().unwrap(),
        "shed",
    );
    let wasm = t["wasm"].as_array().unwrap();
    assert!(!wasm.is_empty(), "the demo runs a Wasm filter");
    let calls: f64 = wasm
        .iter()
        .map(|w| w["calls_per_s"].as_f64().unwrap())
        .sum();
    close(
        g("wasm_calls_per_s"),
        (calls * 10.0).round() / 10.0,
        "Wasm calls/s",
    );
    let traps: f64 = wasm.iter().map(|w| w["traps"].as_f64().unwrap()).sum();
    close(g("wasm_traps"), traps, "Wasm traps");
    for w in wasm {
        let k = format!("wasm:{}:", w["filter"].as_str().unwrap());
        for f in ["calls", "traps", "calls_per_s"] {
            close(
                g(&format!("{k}{f}")),
                w[f].as_f64().unwrap(),
                &format!("{k}{f}"),
            );
        }
    }
    for (k, v) in [
        ("limited_per_s", &t["limited"]["per_s"]),
        ("limited_total", &t["limited"]["total"]),
        ("bot_per_s", &t["bot_matches"]["per_s"]),
        ("bot_total", &t["bot_matches"]["total"]),
    ] {
        close(g(k), v.as_f64().unwrap(), k);
    }
    // Each configured limit, with its decisions in this sample.
    let decided: BTreeMap<(&str, &str), &Value> = t["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                (l["route"].as_str().unwrap(), l["limit"].as_str().unwrap()),
                l,
            )
        })
        .collect();
    let mut limits_shown = 0;
    for r in status["routes"].as_array().unwrap() {
        let name = r["name"].as_str().unwrap();
        let Some(limits) = r["rate_limit"]["limits"].as_object() else {
            continue;
        };
        for (limit, spec) in limits {
            let k = format!("limit:{name}:{limit}:");
            close(g(&format!("{k}burst")), spec["burst"].as_f64().unwrap(), &k);
            let x = decided.get(&(name, limit.as_str()));
            for f in ["limited_per_s", "allowed", "limited"] {
                let want = x.map_or(0.0, |x| x[f].as_f64().unwrap());
                close(g(&format!("{k}{f}")), want, &format!("{k}{f}"));
            }
            limits_shown += 1;
        }
    }
    assert!(limits_shown > 0, "the demo limits checkout");
    for b in t["bots"].as_array().unwrap() {
        let k = format!(
            "bot:{}:{}:{}:",
            b["rule"].as_str().unwrap(),
            b["route"].as_str().unwrap(),
            b["outcome"].as_str().unwrap()
        );
        for f in ["per_s", "total"] {
            close(
                g(&format!("{k}{f}")),
                b[f].as_f64().unwrap(),
                &format!("{k}{f}"),
            );
        }
    }
    let traffic: BTreeMap<&str, &Value> = t["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["route"].as_str().unwrap(), r))
        .collect();
    for r in status["routes"].as_array().unwrap() {
        let name = r["name"].as_str().unwrap();
        let k = format!("route:{name}:");
        match traffic.get(name) {
            Some(x) => {
                for f in ["rps", "requests", "errors_5xx", "shed"] {
                    close(
                        g(&format!("{k}{f}")),
                        x[f].as_f64().unwrap(),
                        &format!("{k}{f}"),
                    );
                }
                opt(
                    g(&format!("{k}p99_ms")),
                    &x["p99_ms"],
                    &format!("{k}p99_ms"),
                );
            }
            None => assert_eq!(g(&format!("{k}requests")), "0", "{name}"),
        }
    }
    let ejections: BTreeMap<(String, String), f64> = t["ejections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                (
                    e["cluster"].as_str().unwrap().to_string(),
                    e["endpoint"].as_str().unwrap().to_string(),
                ),
                e["total"].as_f64().unwrap(),
            )
        })
        .collect();
    // The demo's waiting room (no traffic reaches it here: its numbers
    // hold still between the page's poll and this status).
    for r in status["waiting_rooms"].as_array().unwrap() {
        let k = format!("room:{}:", r["name"].as_str().unwrap());
        for f in [
            "queue_length",
            "active_users",
            "active_users_cap",
            "admitted_total",
        ] {
            close(
                g(&format!("{k}{f}")),
                r[f].as_f64().unwrap(),
                &format!("{k}{f}"),
            );
        }
    }
    for c in status["clusters"].as_array().unwrap() {
        let cluster = c["name"].as_str().unwrap();
        for e in c["endpoints"].as_array().unwrap() {
            let addr = e["address"].as_str().unwrap();
            let k = format!("ep:{cluster}:{addr}:");
            let healthy = if e["healthy"] == true {
                "healthy"
            } else {
                "unhealthy"
            };
            assert_eq!(g(&format!("{k}health")), healthy, "{k}");
            let ejected = if e["ejected"] == true {
                "ejected"
            } else {
                "no"
            };
            assert_eq!(g(&format!("{k}ejected")), ejected, "{k}");
            let n = ejections
                .get(&(cluster.to_string(), addr.to_string()))
                .copied()
                .unwrap_or(0.0);
            close(g(&format!("{k}ejections")), n, &format!("{k}ejections"));
            // In flight is read live, not sampled: a number is enough.
            g(&format!("{k}in_flight")).parse::<u64>().unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_chromium_shows_what_status_says_under_load() {
    let Some(browser) = system_tool(&["chromium", "chromium-browser"], "chromium") else {
        return;
    };
    let (_demo, public, admin) = demo("127.0.0.1:0").await;
    let stop = Arc::new(AtomicBool::new(false));
    load(public, stop.clone());
    let status_url = format!("http://{admin}/admin/status");
    // Traffic in the window, the Wasm filter called.
    wait_until(Duration::from_secs(60), "traffic in the sample", || {
        let url = status_url.clone();
        async move {
            let t = get(&url).await.json()["traffic"].clone();
            t["rps"].as_f64().unwrap_or(0.0) > 0.0
                && t["wasm"][0]["calls"].as_u64().unwrap_or(0) > 0
                && t["limited"]["total"].as_u64().unwrap_or(0) > 0
                && t["bot_matches"]["total"].as_u64().unwrap_or(0) > 0
        }
    })
    .await;
    let dir = target_dir().join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    let profile = dir.join(format!("profile-{}", std::process::id()));
    let ui = format!("http://{admin}/admin/ui");

    // The page samples once a second; a dump and the status fetched right
    // after it usually show the same sample. Try until they do.
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut tries = 0;
    loop {
        tries += 1;
        let (b, p, u) = (browser.clone(), profile.clone(), ui.clone());
        let out = tokio::task::spawn_blocking(move || chromium(&b, &p, &["--dump-dom"], &u))
            .await
            .unwrap();
        let status = get(&status_url).await.json();
        let dom = String::from_utf8_lossy(&out.stdout).to_string();
        let page = shown(&dom);
        let page_seq: u64 = page
            .get("seq")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "the page never drew a sample: {dom}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        let seq = status["traffic"]["seq"].as_u64().unwrap();
        assert!(page_seq <= seq, "the page cannot be ahead of the gateway");
        if page_seq == seq {
            compare(&page, &status);
            let r: f64 = page["route:catalog:rps"].parse().unwrap();
            assert!(r > 0.0, "under load the catalog's req/s shows: {page:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {tries} tries the page and the status never showed the same sample"
        );
    }

    // The screenshot, as a test artifact.
    let shot = dir.join("admin-ui.png");
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
    let (b, p, u) = (browser.clone(), profile.clone(), ui.clone());
    let out = tokio::task::spawn_blocking(move || {
        chromium(&b, &p, &[arg.as_str(), "--window-size=1280,900"], &u)
    })
    .await
    .unwrap();
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "screenshot at {}: {size} bytes; {}",
        shot.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("dashboard screenshot: {}", shot.display());
    stop.store(true, Ordering::Relaxed);
    let _ = std::fs::remove_dir_all(&profile);
}

/// The page is the same for everyone; its data needs no token on loopback
/// and the admin token from anywhere else.
#[tokio::test]
async fn dashboard_data_needs_the_token_off_loopback() {
    let (_demo, _public, admin) = demo("0.0.0.0:0").await;
    let local = |path: &str| format!("http://127.0.0.1:{}{path}", admin.port());
    let page = get(&local("/admin/ui")).await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("/admin/ui/data"));
    assert!(page
        .header("content-security-policy")
        .is_some_and(|c| c.contains("default-src 'none'")));
    let data = get(&local("/admin/ui/data")).await;
    assert_eq!(data.status, 200, "loopback reads without a token");
    assert!(data.json()["traffic"]["seq"].is_u64());
    // A non-loopback address of this machine, if it has one.
    let Some(ip) = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
    else {
        eprintln!("\n!!! SKIPPED the off-loopback half: this machine has no other address !!!\n");
        return;
    };
    let remote = format!("http://{}/admin/ui/data", SocketAddr::new(ip, admin.port()));
    assert_eq!(get(&remote).await.status, 401, "no token off loopback");
    let with_token = send(
        http::Request::get(&remote)
            .header("authorization", "Bearer demo-token")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(with_token.status, 200);
    assert_eq!(
        get(&format!(
            "http://{}/admin/ui",
            SocketAddr::new(ip, admin.port())
        ))
        .await
        .status,
        200,
        "the page itself holds no data"
    );
}
