//! proxy-wasm conformance: the public SDKs' own examples, built as they
//! are, through the real `flashgate` binary over loopback, checked against
//! what each example's README says Envoy does (answers, headers, the
//! guest's log lines). The Rust SDK's examples are vendored at a pinned
//! release in `wasm-plugins/conformance/rust-sdk/` (see its README); the
//! AssemblyScript filter in `wasm-plugins/conformance/assemblyscript/` is
//! built with the npm packages when npm is there. docs/filters.md has the
//! table of what is checked where.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use flashgate_tests::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

/// An example of the Rust SDK, built (once per test binary) by
/// `wasm-plugins/conformance/rust-sdk/build.sh`.
fn rust_example(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = repo_root().join("wasm-plugins/conformance/rust-sdk");
        let out = Command::new("bash")
            .arg(root.join("build.sh"))
            .output()
            .expect("run wasm-plugins/conformance/rust-sdk/build.sh");
        assert!(
            out.status.success(),
            "conformance build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        root.join("target/wasm32-wasip1/release")
    });
    let path = dir.join(format!("proxy_wasm_example_{name}.wasm"));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// The AssemblyScript filter, or `None` when node/npm are missing (the
/// build script exits 3 then).
fn assemblyscript_filter() -> Option<PathBuf> {
    static BUILT: OnceLock<Option<PathBuf>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = repo_root().join("wasm-plugins/conformance/assemblyscript");
            let out = Command::new("bash")
                .arg(root.join("build.sh"))
                .output()
                .expect("run the AssemblyScript build");
            if out.status.code() == Some(3) {
                eprintln!("skipping the AssemblyScript filter: node/npm not installed");
                return None;
            }
            assert!(
                out.status.success(),
                "AssemblyScript build failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            Some(root.join("build/add_header.wasm"))
        })
        .clone()
}

/// The real binary with a config, its log (stderr) in a file.
struct Running {
    proc: Proc,
    public: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl Running {
    async fn start(name: &str, cfg: &Cfg) -> Running {
        let (text, public, admin) = with_fixed_ports(&cfg.build());
        let dir = flashgate_tests::tls::temp_dir(name);
        let path = dir.join("gw.toml");
        std::fs::write(&path, text).unwrap();
        let log = dir.join("stderr.log");
        let file = std::fs::File::create(&log).unwrap();
        let proc = Proc::spawn(
            Command::new(flashgate_bin())
                .args(["run", "--config"])
                .arg(&path)
                .env_remove("RUST_LOG")
                .stderr(Stdio::from(file)),
        );
        let running = Running {
            proc,
            public,
            admin,
            log,
        };
        assert!(
            wait_listening(public, Duration::from_secs(30)).await,
            "gateway did not start:\n{}",
            running.log_text()
        );
        running
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.public)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The guest's log lines (the `flashgate::wasm` target).
    fn guest_lines(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("flashgate::wasm"))
            .map(str::to_string)
            .collect()
    }

    fn count(&self, needle: &str) -> usize {
        self.guest_lines()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    async fn wait_log(&self, needle: &str) {
        let found = eventually(Duration::from_secs(30), || async { self.count(needle) > 0 }).await;
        assert!(found, "no guest line with {needle:?}:\n{}", self.log_text());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.proc.signal("TERM");
        let _ = self.proc.wait_exit(Duration::from_secs(20));
    }
}

/// A route with the filter `f` from `wasm`, and `extra` keys for it.
fn with_example(upstream: SocketAddr, wasm: &Path, config: &str, extra: &str) -> Cfg {
    Cfg::new(&[upstream]).route("filters = [\"f\"]").section(format!(
        "[[filters]]\nname = \"f\"\nwasm = \"{}\"\nconfig = '{config}'\ntimeout = \"2s\"\n{extra}\n",
        wasm.display()
    ))
}

/// hello_world (README: logs "Hello, World!" once, then the time and a
/// lucky number every 5 s). Put on a route, requests still go through and
/// the ticks go on; a config reload that changes nothing keeps the VM, so
/// `on_vm_start` does not run again.
#[tokio::test]
async fn hello_world_ticks_and_lets_requests_through() {
    let origin = Upstream::fixed("origin").await;
    let gw = Running::start(
        "conf-hello",
        &with_example(origin.addr, &rust_example("hello_world"), "", ""),
    )
    .await;
    gw.wait_log("Hello, World!").await;
    for _ in 0..5 {
        let got = get(&gw.url("/")).await;
        assert_eq!(got.status, 200, "{}", gw.log_text());
        assert_eq!(got.text(), "origin");
    }
    gw.wait_log("your lucky number is").await;
    let hellos = gw.count("Hello, World!");

    let reload = send(
        Request::post(format!("http://{}/admin/reload", gw.admin))
            .header("authorization", "Bearer test-token")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reload.status, 200, "{}", reload.text());
    let ticks = gw.count("your lucky number is");
    let more = eventually(Duration::from_secs(30), || async {
        gw.count("your lucky number is") > ticks
    })
    .await;
    assert!(more, "ticks stopped after the reload:\n{}", gw.log_text());
    assert_eq!(gw.count("Hello, World!"), hellos, "{}", gw.log_text());
    assert_eq!(get(&gw.url("/")).await.status, 200);
}

/// http_headers: logs every request and response header, answers
/// `/hello` itself; its own response callback sees its local reply.
#[tokio::test]
async fn http_headers_logs_heads_and_answers_hello() {
    let echo = Upstream::echo().await;
    let gw = Running::start(
        "conf-headers",
        &with_example(echo.addr, &rust_example("http_headers"), "", ""),
    )
    .await;
    let got = get(&gw.url("/hello")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "Hello, World!\n");
    assert_eq!(got.header("hello"), Some("World"));
    assert_eq!(got.header("powered-by"), Some("proxy-wasm"));
    assert_eq!(got.header("content-type"), Some("text/plain"));
    assert_eq!(echo.hits(), 0);
    gw.wait_log("completed.").await;
    let authority = format!("-> :authority: {}", gw.public);
    for line in [
        authority.as_str(),
        "-> :path: /hello",
        "-> :method: GET",
        "-> :scheme: http",
        "<- :status: 200",
        "<- hello: World",
        "<- powered-by: proxy-wasm",
        "<- content-type: text/plain",
    ] {
        assert_eq!(gw.count(line), 1, "{line:?} once:\n{}", gw.log_text());
    }
    // Envoy's request map has `:authority` and no `host`.
    assert_eq!(gw.count("-> host:"), 0, "{}", gw.log_text());

    // Other paths reach the origin, which still gets its Host.
    let got = get(&gw.url("/other")).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.json()["headers"]["host"],
        gw.public.to_string().as_str()
    );
    gw.wait_log("<- content-type: application/json").await;
}

/// An origin for http_body: `/secret` has a secret in it.
async fn body_origin() -> Upstream {
    Upstream::start(|req: Request<Incoming>| async move {
        match req.uri().path() {
            "/secret" => reply(200, "Here is a secret message, do not read it!!\n"),
            _ => reply(200, "Everyone may read this message.\n"),
        }
    })
    .await
}

/// http_body: redacts response bodies with "secret" in them.
#[tokio::test]
async fn http_body_redacts_secrets() {
    let origin = body_origin().await;
    let gw = Running::start(
        "conf-body",
        &with_example(origin.addr, &rust_example("http_body"), "", ""),
    )
    .await;
    let got = get(&gw.url("/hello")).await;
    assert_eq!(got.text(), "Everyone may read this message.\n");
    let got = get(&gw.url("/secret")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "Original message body (43 bytes) redacted.\n");
    assert_eq!(got.header("content-length"), Some("43"));
}

/// http_config: the plugin configuration comes back as a response header.
#[tokio::test]
async fn http_config_sets_the_configured_header() {
    let origin = Upstream::fixed("hello").await;
    let secret = "The secret to life is meaningless unless you discover it yourself";
    let gw = Running::start(
        "conf-config",
        &with_example(origin.addr, &rust_example("http_config"), secret, ""),
    )
    .await;
    let got = get(&gw.url("/hello")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("custom-header"), Some(secret));
}

/// An upstream whose answers alternate: the n-th call gets `even(n)`.
struct Alternating {
    up: Upstream,
    calls: Arc<AtomicUsize>,
}

/// http_auth_random: grants or forbids through an HTTP callout to
/// `httpbin` (`/bytes/1`: an even byte grants).
#[tokio::test]
async fn http_auth_random_grants_and_forbids_by_callout() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let httpbin = Upstream::start(move |req: Request<Incoming>| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            assert_eq!(req.uri().path(), "/bytes/1");
            assert_eq!(req.headers()["host"], "httpbin.org");
            // Even calls grant (byte 2), odd ones forbid (byte 3).
            reply(200, vec![if n.is_multiple_of(2) { 2u8 } else { 3u8 }])
        }
    })
    .await;
    let httpbin = Alternating { up: httpbin, calls };
    let echo = Upstream::echo().await;
    let cfg = with_example(echo.addr, &rust_example("http_auth_random"), "", "").section(format!(
        "[[upstreams]]\nname = \"httpbin\"\nendpoints = [\"{}\"]\n",
        httpbin.up.addr
    ));
    let gw = Running::start("conf-auth", &cfg).await;
    let granted = get(&gw.url("/headers")).await;
    assert_eq!(granted.status, 200, "{}", gw.log_text());
    assert_eq!(granted.header("powered-by"), Some("proxy-wasm"));
    assert!(granted.json()["headers"].is_object());
    let forbidden = get(&gw.url("/headers")).await;
    assert_eq!(forbidden.status, 403);
    assert_eq!(forbidden.text(), "Access forbidden.\n");
    assert_eq!(forbidden.header("powered-by"), Some("proxy-wasm"));
    assert_eq!(forbidden.header("content-type"), Some("text/plain"));
    assert_eq!(httpbin.calls.load(Ordering::SeqCst), 2);
    assert_eq!(echo.hits(), 1);
    gw.wait_log("Access forbidden.").await;
    assert_eq!(gw.count("Access granted."), 1);
}

/// A gRPC server on h2c answering `grpcbin.GRPCBin/RandomError` with the
/// gRPC statuses of `script`, in turn (status in the trailers, as a real
/// server sends it).
async fn grpcbin(script: &'static [u32]) -> Alternating {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let up = Upstream::start(move |req: Request<Incoming>| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let ok = req.version() == http::Version::HTTP_2
                && req.method() == http::Method::POST
                && req.uri().path() == "/grpcbin.GRPCBin/RandomError"
                && req.headers()["content-type"] == "application/grpc"
                && req.headers()["te"] == "trailers";
            let body = req.into_body().collect().await.unwrap().to_bytes();
            // One uncompressed frame with an empty message.
            let status = if ok && body[..] == [0, 0, 0, 0, 0] {
                script[n % script.len()]
            } else {
                3 // INVALID_ARGUMENT: not the call the example makes
            };
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", status.into());
            let frame = Bytes::from_static(&[0, 0, 0, 0, 0]);
            let body = Full::new(frame)
                .map_err(|never| match never {})
                .with_trailers(async move { Some(Ok(trailers)) })
                .boxed();
            let mut resp = Response::new(body);
            resp.headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            resp
        }
    })
    .await;
    Alternating { up, calls }
}

fn grpc_request(url: String) -> Request<Body> {
    Request::post(url)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap()
}

/// grpc_auth_random: non-gRPC clients get 503; gRPC requests are granted
/// or aborted by a real unary gRPC call to `grpcbin` over HTTP/2.
#[tokio::test]
async fn grpc_auth_random_calls_the_grpc_service() {
    // OK grants; 3 (odd) forbids; 10 (even, ABORTED) grants, as the
    // example reads any even status.
    let grpcbin = grpcbin(&[0, 3, 10]).await;
    let echo = Upstream::echo().await;
    let cfg = with_example(echo.addr, &rust_example("grpc_auth_random"), "", "").section(format!(
        "[[upstreams]]\nname = \"grpcbin\"\nendpoints = [\"{}\"]\n",
        grpcbin.up.addr
    ));
    let gw = Running::start("conf-grpc", &cfg).await;
    let plain = get(&gw.url("/hello.HelloService/SayHello")).await;
    assert_eq!(plain.status, 503);
    assert_eq!(plain.text(), "Service accessible only to gRPC clients.\n");
    assert_eq!(grpcbin.calls.load(Ordering::SeqCst), 0);

    let h2 = h2_client();
    let url = gw.url("/hello.HelloService/SayHello");
    let granted = send_with(&h2, grpc_request(url.clone())).await;
    assert_eq!(granted.status, 200, "{}", gw.log_text());
    assert_eq!(granted.json()["path"], "/hello.HelloService/SayHello");
    assert_eq!(granted.header("powered-by"), Some("proxy-wasm"));
    let aborted = send_with(&h2, grpc_request(url.clone())).await;
    assert_eq!(aborted.status, 200);
    assert_eq!(aborted.header("grpc-status"), Some("10"));
    assert_eq!(
        aborted.header("grpc-message"),
        Some("Aborted by Proxy-Wasm!")
    );
    assert_eq!(aborted.header("content-type"), Some("application/grpc"));
    assert_eq!(aborted.header("powered-by"), Some("proxy-wasm"));
    let granted = send_with(&h2, grpc_request(url)).await;
    assert_eq!(granted.status, 200);
    assert_eq!(grpcbin.calls.load(Ordering::SeqCst), 3);
    assert_eq!(echo.hits(), 2);
    gw.wait_log("Access forbidden.").await;
    assert_eq!(gw.count("Access granted."), 2);
}

/// grpc_auth_random without a `grpcbin` cluster fails closed, as in
/// Envoy (the call is refused, the SDK panics, the filter fails): no
/// request is granted.
#[tokio::test]
async fn grpc_auth_random_without_its_cluster_grants_nothing() {
    let echo = Upstream::echo().await;
    let gw = Running::start(
        "conf-grpc-none",
        &with_example(echo.addr, &rust_example("grpc_auth_random"), "", ""),
    )
    .await;
    let h2 = h2_client();
    for _ in 0..3 {
        let got = send_with(&h2, grpc_request(gw.url("/hello.HelloService/SayHello"))).await;
        assert_eq!(got.status, 503, "{}", got.text());
        assert_eq!(got.header("x-flashgate-error"), Some("filter_failed"));
    }
    assert_eq!(echo.hits(), 0);
    assert_eq!(gw.count("Access granted."), 0);
}

/// envoy_filter_metadata reads `metadata.filter_metadata` set by Envoy's
/// Lua filter. flashgate has no such metadata (docs/filters.md): the
/// example finds none and lets every request through to the origin.
#[tokio::test]
async fn envoy_filter_metadata_passes_without_metadata() {
    let echo = Upstream::echo().await;
    let gw = Running::start(
        "conf-metadata",
        &with_example(echo.addr, &rust_example("envoy_filter_metadata"), "", ""),
    )
    .await;
    let got = send(
        Request::get(gw.url("/"))
            .header("x-custom-metadata", "some-value")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["headers"]["x-custom-metadata"], "some-value");
    assert_eq!(echo.hits(), 1);
}

/// With a Rust-SDK filter on the route (body callbacks on), bodies the
/// filter does not change keep their `content-length` both ways, also
/// when they stream in many chunks (the head leaves after the first).
#[tokio::test]
async fn unchanged_bodies_keep_their_length() {
    const BIG: usize = 1 << 20;
    let origin = Upstream::start(|req: Request<Incoming>| async move {
        let length = req
            .headers()
            .get("content-length")
            .map(|v| v.to_str().unwrap().to_string());
        let chunked = req.headers().contains_key("transfer-encoding");
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let mut r = reply(200, vec![b'r'; BIG]);
        r.headers_mut().insert(
            "x-seen",
            format!("{}:{chunked}:{}", length.unwrap_or_default(), body.len())
                .parse()
                .unwrap(),
        );
        r
    })
    .await;
    let gw = Running::start(
        "conf-length",
        &with_example(origin.addr, &rust_example("http_headers"), "", ""),
    )
    .await;
    let got = send(
        Request::post(gw.url("/upload"))
            .body(full(vec![b'q'; BIG]))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    let seen = format!("{BIG}:false:{BIG}");
    assert_eq!(got.header("x-seen"), Some(seen.as_str()));
    assert_eq!(got.header("content-length"), Some(BIG.to_string().as_str()));
    assert!(got.header("transfer-encoding").is_none());
    assert_eq!(got.body.len(), BIG);
}

/// The AssemblyScript SDK's README filter: registered under a root id,
/// so it needs `root_id`; without it, the load error says what the guest
/// logged and that it exited.
#[tokio::test]
async fn assemblyscript_filter_with_its_root_id() {
    let Some(wasm) = assemblyscript_filter() else {
        return;
    };
    let echo = Upstream::echo().await;
    let cfg = with_example(echo.addr, &wasm, "hi there", "root_id = \"add_header\"");
    let gw = Running::start("conf-as", &cfg).await;
    let got = get(&gw.url("/p")).await;
    assert_eq!(got.status, 200, "{}", gw.log_text());
    assert_eq!(got.header("hello"), Some("hi there"));
    assert_eq!(got.json()["headers"]["x-as-filter"], "seen");
    let forbidden = get(&gw.url("/forbidden")).await;
    assert_eq!(forbidden.status, 403);
    assert_eq!(forbidden.text(), "forbidden by AssemblyScript\n");
    assert_eq!(forbidden.header("content-type"), Some("text/plain"));
    // Its own response callback ran for its own local reply.
    assert_eq!(forbidden.header("hello"), Some("hi there"));
    assert_eq!(echo.hits(), 1);

    // Without the root id: `flashgate check` refuses it and says why.
    let (text, _, _) = with_fixed_ports(&with_example(echo.addr, &wasm, "hi there", "").build());
    let dir = flashgate_tests::tls::temp_dir("conf-as-check");
    let path = dir.join("gw.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(flashgate_bin())
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("filters[0].wasm"), "{err}");
    assert!(
        err.contains("the module exited during start with code 255"),
        "{err}"
    );
    assert!(
        err.contains("Missing root context factory for root id"),
        "{err}"
    );
}
