//! The order core for tests: `order-core run` and `order-core consume`
//! processes on loopback against real Redis and a real RocketMQ broker,
//! plus small HTTP helpers for checkout and admin calls.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use http::Request;

use crate::redis::TempDir;
use crate::{full, send_with, Got, Proc};

pub const ADMIN_TOKEN: &str = "core-token";

/// The `order-core` binary next to the test binary (tests/run.sh builds it),
/// or `$FLASHGATE_ORDER_CORE_BIN`.
pub fn order_core_bin() -> PathBuf {
    // Another build of the core (a release build for measured drills).
    if let Some(bin) = std::env::var_os("FLASHGATE_ORDER_CORE_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>")
        .join("order-core");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build --workspace --bins`, as tests/run.sh does)",
        bin.display()
    );
    bin
}

/// Where Redis is for a core.
#[derive(Clone, Debug)]
pub enum RedisAt {
    Single(String),
    Cluster(Vec<String>),
}

/// Settings written into an order-core config file.
#[derive(Clone, Debug)]
pub struct CoreSetup {
    pub redis: RedisAt,
    /// Empty: no `[rocketmq]` (orders go to the in-process queue).
    pub namesrv: String,
    /// More `[redis]` keys, as TOML lines.
    pub redis_extra: String,
    pub topic: String,
    pub per_user: u32,
    pub expiry: String,
    pub sweep_every: String,
    pub max_attempts: u32,
}

impl CoreSetup {
    pub fn new(redis: RedisAt, namesrv: String) -> CoreSetup {
        CoreSetup {
            redis,
            namesrv,
            redis_extra: String::new(),
            topic: "orders".into(),
            per_user: 1,
            expiry: "15m".into(),
            sweep_every: "1s".into(),
            max_attempts: 3,
        }
    }
}

/// A directory with one config file, the consumer's sink and its DLQ.
pub struct CoreFiles {
    pub dir: TempDir,
    pub config: PathBuf,
    pub sink: PathBuf,
    pub dlq: PathBuf,
}

impl CoreFiles {
    /// Writes the config with `listen` on `port`.
    pub fn write(setup: &CoreSetup, port: u16) -> CoreFiles {
        let dir = TempDir::new("order-core");
        let sink = dir.0.join("orders.jsonl");
        let dlq = dir.0.join("dlq.jsonl");
        let redis = match &setup.redis {
            RedisAt::Single(u) => format!("url = \"{u}\""),
            RedisAt::Cluster(us) => format!(
                "cluster = [{}]",
                us.iter()
                    .map(|u| format!("\"{u}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let rocketmq = if setup.namesrv.is_empty() {
            String::new()
        } else {
            format!(
                "[rocketmq]\nnamesrv = \"{}\"\ntopic = \"{}\"\n",
                setup.namesrv, setup.topic
            )
        };
        let text = format!(
            "listen = \"127.0.0.1:{port}\"\nadmin_token = \"{ADMIN_TOKEN}\"\n\
             [redis]\n{redis}\n{redis_extra}\n\
             {rocketmq}\
             [limits]\nper_user = {per_user}\n\
             [expiry]\nwindow = \"{expiry}\"\nsweep_every = \"{sweep}\"\n\
             [consumer]\nsink = \"{sink}\"\ndlq = \"{dlq}\"\nmax_attempts = {attempts}\n",
            redis_extra = setup.redis_extra,
            per_user = setup.per_user,
            expiry = setup.expiry,
            sweep = setup.sweep_every,
            sink = sink.display(),
            dlq = dlq.display(),
            attempts = setup.max_attempts,
        );
        let config = dir.0.join("order-core.toml");
        std::fs::write(&config, text).expect("write order-core config");
        CoreFiles {
            dir,
            config,
            sink,
            dlq,
        }
    }

    /// The sink's lines, parsed.
    pub fn sink_lines(&self) -> Vec<serde_json::Value> {
        read_lines(&self.sink)
    }

    /// Sink lines of one SKU.
    pub fn sink_for(&self, sku: &str) -> Vec<serde_json::Value> {
        self.sink_lines()
            .into_iter()
            .filter(|l| l["sku"] == sku)
            .collect()
    }

    pub fn dlq_lines(&self) -> Vec<serde_json::Value> {
        read_lines(&self.dlq)
    }
}

fn read_lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// A running `order-core run`.
pub struct CoreProc {
    pub addr: SocketAddr,
    pub proc: Proc,
}

/// `order-core` with extra environment. A binary built without the
/// `test-hooks` feature ignores the hooks' variables, and the test would
/// only time out waiting for a pause or a crash, so a hook in `env` checks
/// first that the binary has them.
fn order_core_with(env: &[(&str, &str)]) -> Command {
    let bin = order_core_bin();
    if env.iter().any(|(k, _)| k.starts_with("ORDER_CORE_TEST_")) {
        assert!(
            has_test_hooks(&bin),
            "{} has no test hooks: build it with order-core's `test-hooks` feature, \
             as `cargo build --workspace --bins` (tests/run.sh) does",
            bin.display()
        );
    }
    let mut cmd = Command::new(bin);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Whether `bin` holds the hooks' variable names: without the feature they
/// are compiled out. Read in chunks: a debug binary is hundreds of MB.
fn has_test_hooks(bin: &Path) -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        let needle = b"ORDER_CORE_TEST_PAUSE";
        let mut file = std::fs::File::open(bin).expect("open the order-core binary");
        let mut buf = vec![0u8; 1 << 20];
        // The window keeps the last needle.len() - 1 bytes of the previous
        // chunk in front, so a name split across two reads is still found.
        let mut kept = 0;
        loop {
            let n = file
                .read(&mut buf[kept..])
                .expect("read the order-core binary");
            if n == 0 {
                return false;
            }
            let end = kept + n;
            if memchr::memmem::find(&buf[..end], needle).is_some() {
                return true;
            }
            kept = end.min(needle.len() - 1);
            buf.copy_within(end - kept..end, 0);
        }
    })
}

/// Starts `order-core run --config` with extra environment (test hooks)
/// and waits until it listens. stderr goes to `log`.
pub async fn start_core(files: &CoreFiles, port: u16, env: &[(&str, &str)], log: &str) -> CoreProc {
    let mut cmd = order_core_with(env);
    cmd.arg("run").arg("--config").arg(&files.config);
    let err = std::fs::File::create(files.dir.0.join(log)).expect("core log");
    cmd.stdout(Stdio::null()).stderr(Stdio::from(err));
    let proc = Proc::spawn(&mut cmd);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    assert!(
        crate::wait_listening(addr, Duration::from_secs(60)).await,
        "order-core did not listen on {addr}; log:\n{}",
        std::fs::read_to_string(files.dir.0.join(log)).unwrap_or_default()
    );
    CoreProc { addr, proc }
}

/// Starts `order-core consume --config` with extra environment.
pub fn start_consumer(files: &CoreFiles, env: &[(&str, &str)], log: &str) -> Proc {
    let mut cmd = order_core_with(env);
    cmd.arg("consume").arg("--config").arg(&files.config);
    let err = std::fs::File::create(files.dir.0.join(log)).expect("consumer log");
    cmd.stdout(Stdio::null()).stderr(Stdio::from(err));
    Proc::spawn(&mut cmd)
}

/// Runs `order-core dlq <action> --config` and returns its stdout.
pub fn dlq(files: &CoreFiles, action: &str) -> String {
    let out = Command::new(order_core_bin())
        .args(["dlq", action, "--config"])
        .arg(&files.config)
        .output()
        .expect("run order-core dlq");
    assert!(
        out.status.success(),
        "order-core dlq {action} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A log file of the core directory (for assertion messages).
pub fn log(files: &CoreFiles, name: &str) -> String {
    std::fs::read_to_string(files.dir.0.join(name)).unwrap_or_default()
}

/// `POST /checkout` at `base` (core or gateway address).
pub async fn checkout(
    client: &crate::HttpClient,
    base: SocketAddr,
    sku: &str,
    qty: u32,
    user: Option<&str>,
    key: Option<&str>,
) -> Got {
    let mut b =
        Request::post(format!("http://{base}/checkout")).header("content-type", "application/json");
    if let Some(u) = user {
        b = b.header("x-user-id", u);
    }
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    let body = serde_json::json!({"sku": sku, "qty": qty}).to_string();
    send_with(client, b.body(full(body)).unwrap()).await
}

/// `PUT /admin/stock/{sku}`.
pub async fn set_stock(base: SocketAddr, sku: &str, stock: i64) -> Got {
    let req = Request::put(format!("http://{base}/admin/stock/{sku}"))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(full(serde_json::json!({"stock": stock}).to_string()))
        .unwrap();
    crate::send(req).await
}

/// `GET /admin/stock/{sku}` as `(stock, orders)`.
pub async fn stock(base: SocketAddr, sku: &str) -> (i64, i64) {
    let req = Request::get(format!("http://{base}/admin/stock/{sku}"))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(crate::empty())
        .unwrap();
    let got = crate::send(req).await;
    assert_eq!(got.status, 200, "stock of {sku}: {}", got.text());
    let j = got.json();
    (
        j["stock"].as_i64().expect("stock"),
        j["orders"].as_i64().expect("orders"),
    )
}
