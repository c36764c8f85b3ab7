//! The demo shop as a person walks it: the catalog at `/`, the drop page
//! for `demo-sneaker`, and its Buy button, which posts to the gateway's
//! `/checkout` with the page's own buyer token. Over HTTP as the page's
//! script does, and (where Chromium is installed or installable) by
//! clicking the button in headless Chromium, driven through the DevTools
//! protocol on a pipe.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use flashgate_tests::*;
use http::Request;
use serde_json::{json, Value};

fn attr<'a>(html: &'a str, name: &str) -> &'a str {
    html.split(&format!("{name}=\""))
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no {name} in the page"))
}

async fn buy(public: std::net::SocketAddr, token: &str, sku: &str, key: &str) -> Got {
    send(
        Request::post(format!("http://{public}/checkout"))
            .header("authorization", format!("Bearer {token}"))
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(full(json!({"sku": sku, "qty": 1}).to_string()))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn the_shop_sells_from_its_drop_page() {
    let demo = Demo::start("127.0.0.1:0", &["--no-tls"]).await;
    let p = demo.public;
    let home = get(&format!("http://{p}/")).await;
    assert_eq!(home.status, 200);
    let html = home.text();
    assert!(
        html.contains("href=\"/drop/demo-sneaker\""),
        "the drop is linked"
    );
    assert!(html.contains("/static/app.css"));
    assert!(
        html.matches("class=\"card\"").count() >= 20,
        "a catalog grid"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no asset from elsewhere"
    );
    let css = get(&format!("http://{p}/static/app.css")).await;
    assert_eq!(css.header("content-type"), Some("text/css"));
    // Each drop page is a buyer of its own: one pair each.
    let page = get(&format!("http://{p}/drop/demo-sneaker")).await.text();
    let (token, sku) = (attr(&page, "data-token"), attr(&page, "data-sku"));
    assert_eq!(sku, "demo-sneaker");
    let first = buy(p, token, sku, "page-1").await;
    assert_eq!(first.status, 201, "{}", first.text());
    assert_eq!(first.json()["order"]["sku"], "demo-sneaker");
    let again = buy(p, token, sku, "page-1-again").await;
    assert_eq!(again.status, 429, "one pair per buyer: {}", again.text());
    let other = get(&format!("http://{p}/drop/demo-sneaker")).await.text();
    assert_ne!(attr(&other, "data-token"), token, "another buyer");
    assert_eq!(
        buy(p, attr(&other, "data-token"), sku, "page-2")
            .await
            .status,
        201
    );
}

/// Chromium with the DevTools protocol on fds 3 (commands in) and 4
/// (answers and events out), NUL-separated JSON, wired to two FIFOs by the
/// shell.
struct Browser {
    _proc: Proc,
    to: std::fs::File,
    from: BufReader<std::fs::File>,
    next_id: u64,
}

impl Browser {
    fn start(bin: &std::path::Path, dir: &std::path::Path) -> Browser {
        std::fs::create_dir_all(dir).unwrap();
        let (cmd_in, ev_out) = (dir.join("in"), dir.join("out"));
        for f in [&cmd_in, &ev_out] {
            let _ = std::fs::remove_file(f);
            assert!(Command::new("mkfifo").arg(f).status().unwrap().success());
        }
        let proc = Proc::spawn(
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "exec '{}' --headless --no-sandbox --disable-gpu --disable-dev-shm-usage \
                     --no-first-run --remote-debugging-pipe --user-data-dir='{}' \
                     3<'{}' 4>'{}'",
                    bin.display(),
                    dir.join("profile").display(),
                    cmd_in.display(),
                    ev_out.display()
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        // Opening a FIFO blocks until the other side opens it too.
        let to = std::fs::OpenOptions::new()
            .write(true)
            .open(&cmd_in)
            .unwrap();
        let from = BufReader::new(std::fs::File::open(&ev_out).unwrap());
        Browser {
            _proc: proc,
            to,
            from,
            next_id: 1,
        }
    }

    fn read(&mut self) -> Value {
        let mut buf = Vec::new();
        self.from.read_until(0, &mut buf).unwrap();
        assert!(buf.pop() == Some(0), "the browser closed the pipe");
        serde_json::from_slice(&buf).unwrap()
    }

    /// Sends a command and returns its result, skipping events.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).unwrap();
        loop {
            let m = self.read();
            if m["id"] == id {
                assert!(m["error"].is_null(), "{method}: {m}");
                return m["result"].clone();
            }
        }
    }

    /// Waits for an event of `session`.
    fn event(&mut self, session: &str, method: &str) {
        loop {
            let m = self.read();
            if m["method"] == method && m["sessionId"] == session {
                return;
            }
        }
    }
}

/// Opens the drop page, clicks Buy and returns what the page then says.
fn click_buy(b: &mut Browser, url: &str) -> String {
    let target = b.call(None, "Target.createTarget", json!({"url": "about:blank"}));
    let attached = b.call(
        None,
        "Target.attachToTarget",
        json!({"targetId": target["targetId"], "flatten": true}),
    );
    let s = attached["sessionId"].as_str().unwrap().to_string();
    b.call(Some(&s), "Page.enable", json!({}));
    b.call(Some(&s), "Page.navigate", json!({"url": url}));
    b.event(&s, "Page.loadEventFired");
    let got = b.call(
        Some(&s),
        "Runtime.evaluate",
        json!({
            "expression": "new Promise((done, fail) => { \
                document.getElementById('buy').click(); \
                const until = Date.now() + 30000; \
                const look = () => { \
                    const t = document.getElementById('result').textContent; \
                    if (t && !t.startsWith('Placing')) done(t); \
                    else if (Date.now() > until) fail('no answer: ' + t); \
                    else setTimeout(look, 100); }; \
                look(); })",
            "awaitPromise": true,
            "returnByValue": true,
        }),
    );
    got["result"]["value"]
        .as_str()
        .unwrap_or_else(|| panic!("{got}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_on_buy_in_chromium_places_an_order() {
    let Some(bin) = system_tool(&["chromium", "chromium-browser"], "chromium") else {
        return;
    };
    let demo = Demo::start("127.0.0.1:0", &["--no-tls"]).await;
    let url = format!("http://{}/drop/demo-sneaker", demo.public);
    let dir = target_dir().join(format!("demo-shop-{}", std::process::id()));
    let d = dir.clone();
    let (first, second) = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || {
            let mut b = Browser::start(&bin, &d);
            let first = click_buy(&mut b, &url);
            let second = click_buy(&mut b, &url);
            let _ = b.call(None, "Browser.close", json!({}));
            (first, second)
        }),
    )
    .await
    .expect("the browser answers within 2 minutes")
    .unwrap();
    assert!(first.starts_with("Order placed: demo-sneaker."), "{first}");
    assert!(
        second.starts_with("Order placed: demo-sneaker."),
        "another buyer: {second}"
    );
    assert_ne!(first, second);
    let _ = std::fs::remove_dir_all(&dir);
}
