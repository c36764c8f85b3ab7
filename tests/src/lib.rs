//! Test support for flashgate's end-to-end tests: real upstream servers,
//! the real gateway (in process or as the `flashgate` binary) and real HTTP
//! clients, all on loopback with ports chosen by the OS.
//!
//! Everything started here is stopped when its handle drops: servers by
//! aborting their task, processes by killing their own pid.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub use gateway::{Config, Gateway};

pub mod edge;
pub mod order;
pub mod raw;
pub mod redis;
pub mod rocketmq;
pub mod tls;
pub mod ws;

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;
pub type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

/// A complete body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A response with a status and body.
pub fn reply(status: u16, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::from_u16(status).expect("valid status");
    r
}

/// A real HTTP server (HTTP/1.1 and h2c) on 127.0.0.1:0 that counts the
/// requests it answers.
pub struct Upstream {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start<F, Fut>(handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
        Self::start_handler(handler, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on a given address (to bring a stopped upstream back).
    pub async fn start_handler(handler: Handler, addr: SocketAddr) -> Upstream {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream { addr, hits, task }
    }

    /// An upstream that answers `200` with `body`.
    pub async fn fixed(body: &'static str) -> Upstream {
        Upstream::start(move |_| async move { reply(200, body) }).await
    }

    /// An upstream that answers with a JSON echo of what it received:
    /// method, path (with query), headers (lower-case names, values joined
    /// by ", " when repeated) and body length.
    pub async fn echo() -> Upstream {
        Upstream::start(|req: Request<Incoming>| async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let mut headers = serde_json::Map::new();
            for name in parts.headers.keys() {
                let values: Vec<_> = parts
                    .headers
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                headers.insert(name.as_str().to_string(), values.join(", ").into());
            }
            let json = serde_json::json!({
                "method": parts.method.as_str(),
                "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
                "headers": headers,
                "body_len": body.len(),
            });
            let mut r = reply(200, json.to_string());
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            r
        })
        .await
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Stops accepting; open connections end as their tasks notice.
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback address that nothing listens on (bound, then released).
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Starts the gateway in process from config text. Listeners and admin in
/// the text should use port 0; read the bound ports from the handle.
pub async fn gateway(toml: &str) -> Gateway {
    let config = Config::parse(toml).unwrap_or_else(|e| panic!("test config invalid: {e}\n{toml}"));
    Gateway::start(config, None).await.expect("gateway starts")
}

/// The config most tests start from: admin and one listener on port 0, an
/// upstream `origin` with the given endpoints and a catch-all route
/// `default` to it. A test adds only the TOML its case is about, named by
/// where it goes rather than by argument position:
///
/// ```ignore
/// let text = Cfg::new(&[up.addr])
///     .upstream("retries = 0")
///     .route("cache = { ttl = \"60s\" }")
///     .section("[redis]\nurl = \"redis://127.0.0.1:6379/\"")
///     .build();
/// ```
///
/// Pieces are pasted in as written (joined by newlines), not parsed. The
/// layout of the text is relied on: tests `.replace()` lines of it (the
/// admin token, the route's `upstream = "origin"`, `name = "public"`) and
/// [`with_fixed_ports`] takes the first `listen` for admin and the second
/// for the listener.
#[derive(Clone, Debug)]
#[must_use = "call .build() for the config text"]
pub struct Cfg {
    endpoints: Vec<SocketAddr>,
    upstream: Vec<String>,
    route: Vec<String>,
    sections: Vec<String>,
}

impl Cfg {
    pub fn new(endpoints: &[SocketAddr]) -> Cfg {
        Cfg {
            endpoints: endpoints.to_vec(),
            upstream: Vec::new(),
            route: Vec::new(),
            sections: Vec::new(),
        }
    }

    /// Keys of the `origin` upstream. May end with its sub-tables
    /// (`[upstreams.health]`, `[upstreams.outlier]`), after which further
    /// keys would land in the sub-table.
    pub fn upstream(mut self, toml: impl Into<String>) -> Cfg {
        self.upstream.push(toml.into());
        self
    }

    /// Keys of the catch-all route (`cache = { .. }`, `filters = [..]`).
    /// Always written before any [`Cfg::section`], so they stay in the
    /// route's table whatever order the calls come in.
    pub fn route(mut self, toml: impl Into<String>) -> Cfg {
        self.route.push(toml.into());
        self
    }

    /// Tables after the route: more `[[upstreams]]` and `[[routes]]`,
    /// `[[filters]]`, `[cache]`, `[redis]`, `[tracing]`...
    pub fn section(mut self, toml: impl Into<String>) -> Cfg {
        self.sections.push(toml.into());
        self
    }

    pub fn build(&self) -> String {
        let endpoints: Vec<String> = self.endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        let endpoints = endpoints.join(", ");
        let upstream = self.upstream.join("\n");
        let rest: Vec<&str> = self
            .route
            .iter()
            .chain(&self.sections)
            .map(String::as_str)
            .collect();
        let rest = rest.join("\n");
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"test-token\"\n\
             [log]\naccess_log = false\n\
             [[listeners]]\nname = \"public\"\nlisten = \"127.0.0.1:0\"\n\
             [[upstreams]]\nname = \"origin\"\nendpoints = [{endpoints}]\n{upstream}\n\
             [[routes]]\nname = \"default\"\npath_prefix = \"/\"\nupstream = \"origin\"\n{rest}\n"
        )
    }
}

/// The client type the helpers take.
pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

/// An HTTP/1.1 client with keep-alive.
pub fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Body> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A collected response.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends a request and collects the whole response.
pub async fn send(req: Request<Body>) -> Got {
    send_with(&client(), req).await
}

pub async fn send_with(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Body>,
    req: Request<Body>,
) -> Got {
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("response within 30s")
        .expect("request succeeds at the HTTP level");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// `GET url`.
pub async fn get(url: &str) -> Got {
    send(Request::get(url).body(empty()).unwrap()).await
}

/// Polls `check` every 20 ms until it holds or `within` passes, and says
/// whether it held. A wait whose answer is dropped checks nothing, hence
/// `#[must_use]`: assert the answer (when the failure message needs state
/// read at that moment, such as a process log), or call [`wait_until`],
/// which asserts by itself. A caller that may tolerate the timeout writes
/// `let _ = eventually(..)` and says why.
#[must_use = "assert the outcome, or call wait_until"]
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits like [`eventually`] and panics unless `check` held within
/// `within`; `what` says what was expected, for the failure message.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert!(
        eventually(within, check).await,
        "not within {within:?}: {what}"
    );
}

/// Reads one sample from the gateway's /metrics: the value of the line
/// whose name and labels start with `prefix`, summed over matches.
pub async fn metric(admin: SocketAddr, prefix: &str) -> f64 {
    let text = get(&format!("http://{admin}/metrics")).await.text();
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The `flashgate` binary next to this test binary
/// (`target/<profile>/flashgate`). `tests/run.sh` builds it first.
pub fn flashgate_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let bin = dir.join("flashgate");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p gateway`, as tests/run.sh does)",
        bin.display()
    );
    bin
}

/// The repository root (for config/ and other fixtures).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A child process killed by its own pid when dropped.
pub struct Proc(pub Child);

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        Proc(
            cmd.stdin(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")),
        )
    }
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
    /// Sends a signal by pid.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{sig} {}", self.pid());
    }
    /// Waits for exit up to `within`; `None` if still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(s) = self.0.try_wait().expect("try_wait") {
                return Some(s);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like [`Proc::wait_exit`], but lets the test's runtime run meanwhile
    /// (in-process upstreams keep serving the process while it drains).
    pub async fn exited(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(s) = self.0.try_wait().expect("try_wait") {
                return Some(s);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Peak resident memory (VmHWM) in KiB, from /proc.
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("VmHWM line")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until something accepts TCP connections on `addr`; `false` if
/// nothing did within `within` (callers assert it, with their own logs).
#[must_use = "assert that it listens"]
pub async fn wait_listening(addr: SocketAddr, within: Duration) -> bool {
    eventually(within, || async move {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await
}

/// Gives a test config's admin and public listeners (the first and second
/// `listen = "127.0.0.1:0"`, as [`Cfg`] writes them) fixed free ports,
/// for tests that run the `flashgate` binary and must know where it
/// listens. Returns the config, the public address and the admin address.
pub fn with_fixed_ports(text: &str) -> (String, SocketAddr, SocketAddr) {
    let public = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let any = "listen = \"127.0.0.1:0\"";
    let text = text
        .replacen(any, &format!("listen = \"{admin}\""), 1)
        .replacen(any, &format!("listen = \"{public}\""), 1);
    (text, public, admin)
}

/// A free loopback port (bound then released; fine for tests that start a
/// process which binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The path of a guest filter built from `wasm-plugins/` (crate name with
/// underscores, e.g. `add_headers`). Builds them all once per test binary
/// with `wasm-plugins/build.sh` (cargo skips what is up to date).
pub fn wasm_plugin(crate_name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = repo_root().join("wasm-plugins");
        let out = Command::new("bash")
            .arg(root.join("build.sh"))
            .output()
            .expect("run wasm-plugins/build.sh");
        assert!(
            out.status.success(),
            "wasm-plugins/build.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        root.join("target/wasm32-wasip1/release")
    });
    let path = dir.join(format!("{crate_name}.wasm"));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A system tool the tests drive (`chromium`, `promtool`), found on `PATH`
/// or in `/usr/bin`, else installed with apt when running as root (as
/// tests/run.sh installs redis). `None`, after a loud message, when it is
/// missing and cannot be installed: the caller skips its check.
pub fn system_tool(names: &[&str], package: &str) -> Option<PathBuf> {
    static APT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let find = || {
        names.iter().find_map(|n| {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
                .map(|d| d.join(n))
                .find(|p| p.is_file())
        })
    };
    if let Some(p) = find() {
        return Some(p);
    }
    let _one_at_a_time = APT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = find() {
        return Some(p);
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let installed = root
        && Command::new("apt-get")
            .args(["install", "-y", "-qq", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    match find() {
        Some(p) if installed => Some(p),
        _ => {
            eprintln!(
                "\n!!! SKIPPED: {} is missing and `apt-get install {package}` {} !!!\n",
                names[0],
                if root { "failed" } else { "needs root" }
            );
            None
        }
    }
}

/// Runs the built `flashgate check` on each config text of `cases` and
/// asserts that it refuses it (exit code 1) with the expected text (the
/// key path, and maybe the message) on stderr. The files are
/// `bad{i}.toml` in a fresh temp dir named after `name`, returned so that
/// a test may reuse one; the caller removes it.
pub fn check_refuses(name: &str, cases: &[(String, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flashgate-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for (i, (text, expected)) in cases.iter().enumerate() {
        let file = dir.join(format!("bad{i}.toml"));
        std::fs::write(&file, text).expect("writing the config");
        let out = Command::new(flashgate_bin())
            .arg("check")
            .arg(&file)
            .output()
            .expect("running flashgate check");
        assert_eq!(out.status.code(), Some(1), "{expected:?}: exit code");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in {stderr:?}"
        );
    }
    dir
}

/// The leading zero bits of SHA-256(challenge ‖ nonce): what the
/// gateway's proof-of-work challenge counts.
pub fn challenge_bits(challenge: &str, nonce: &str) -> u32 {
    let mut c = ring::digest::Context::new(&ring::digest::SHA256);
    c.update(challenge.as_bytes());
    c.update(nonce.as_bytes());
    let mut bits = 0;
    for &b in c.finish().as_ref() {
        if b != 0 {
            return bits + b.leading_zeros();
        }
        bits += 8;
    }
    bits
}

/// Finds the proof-of-work nonce as the challenge page's script does.
pub fn solve_challenge(challenge: &str, difficulty: u32) -> String {
    (0u64..)
        .map(|n| n.to_string())
        .find(|n| challenge_bits(challenge, n) >= difficulty)
        .expect("some nonce has enough zero bits")
}

/// The cargo target dir this test binary was built in (for artifacts such
/// as screenshots).
pub fn target_dir() -> PathBuf {
    flashgate_bin()
        .parent()
        .and_then(|p| p.parent())
        .expect("target/<profile>/flashgate")
        .to_path_buf()
}

/// `flashgate demo` started as a new user would (on free ports, without
/// TLS), with its banner.
pub struct Demo {
    pub proc: Proc,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub banner: Vec<String>,
}

impl Demo {
    /// Starts the demo with its admin listener on `admin` (e.g.
    /// `127.0.0.1:0`) and the further arguments `extra` (`--no-tls`,
    /// `--core 127.0.0.1:0`, ...), and waits for its banner.
    pub async fn start(admin: &str, extra: &[&str]) -> Demo {
        use std::io::{BufRead, BufReader};
        let mut proc = Proc::spawn(
            Command::new(flashgate_bin())
                .args([
                    "demo",
                    "--listen",
                    "127.0.0.1:0",
                    "--admin",
                    admin,
                    "--origin",
                    "127.0.0.1:0",
                ])
                .args(extra)
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        );
        let stdout = proc.0.stdout.take().expect("piped stdout");
        let banner = tokio::task::spawn_blocking(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .take_while(|l| !l.contains("Ctrl-C"))
                .collect::<Vec<_>>()
        })
        .await
        .expect("reading the banner");
        let addr_of = |label: &str| -> SocketAddr {
            banner
                .iter()
                .find(|l| l.contains(label))
                .and_then(|l| l.split_whitespace().find(|w| w.starts_with("http://")))
                .and_then(|u| u.trim_start_matches("http://").split('/').next())
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no {label} address in {banner:?}"))
        };
        let (public, admin) = (addr_of("a product (JSON)"), addr_of("live dashboard"));
        Demo {
            proc,
            public,
            admin,
            banner,
        }
    }
}
