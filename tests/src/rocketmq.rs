//! A real RocketMQ name server and broker for tests (the Rust
//! implementation: `rocketmq-namesrv-rust` and `rocketmq-broker-rust`,
//! speaking the remoting protocol like Apache RocketMQ's Java broker), on
//! free loopback ports with a throwaway store, killed on drop.
//!
//! Binaries come from `PATH` or `~/.cache/rocketmq/bin` (where `.ci/run`
//! installs them). The broker checks back on transactions left unknown
//! every `CHECK_INTERVAL_MS`, so crash tests settle in seconds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::redis::TempDir;
use crate::Proc;

/// How often the broker looks for transactions left unknown.
pub const CHECK_INTERVAL_MS: u64 = 2000;
/// How old a half message must be before it is checked back. Below about
/// 6 s the Rust broker also checked back transactions already ended
/// (harmless here: the check-back answers from Redis and consumers are
/// idempotent), so keep the shared doc's value.
pub const TRANSACTION_TIMEOUT_MS: u64 = 6000;

/// A running name server and broker.
pub struct RocketMq {
    pub namesrv_port: u16,
    pub broker_port: u16,
    // Processes first: fields drop in order, and the store directory must
    // outlive the processes writing to it.
    namesrv: Option<Proc>,
    broker: Option<Proc>,
    dir: TempDir,
}

/// `name` from PATH, else from `~/.cache/rocketmq/bin`.
pub fn bin(name: &str) -> PathBuf {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = PathBuf::from(home).join(".cache/rocketmq/bin").join(name);
    assert!(
        p.is_file(),
        "{name} not found on PATH or in ~/.cache/rocketmq/bin: run .ci/run (it installs RocketMQ)"
    );
    p
}

/// A port `p` with `p - 2` and `p + 1` also free (a broker may use its
/// listen port's neighbours for the fast channel and HA).
fn free_broker_port() -> u16 {
    loop {
        let p = crate::free_port();
        if !(1100..=65000).contains(&p) {
            continue;
        }
        let free = |port: u16| {
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
                && std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
        };
        if free(p - 2) && free(p + 1) && free(p) {
            return p;
        }
    }
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

impl RocketMq {
    pub fn start() -> RocketMq {
        let mut mq = RocketMq {
            namesrv_port: crate::free_port(),
            broker_port: free_broker_port(),
            namesrv: None,
            broker: None,
            dir: TempDir::new("rocketmq"),
        };
        let log = |name: &str| std::fs::File::create(mq.dir.0.join(name)).expect("create log file");
        let (out, err) = (log("namesrv.log"), log("namesrv.err"));
        mq.namesrv = Some(Proc::spawn(
            Command::new(bin("rocketmq-namesrv-rust"))
                .env("ROCKETMQ_HOME", &mq.dir.0)
                .arg("--listenPort")
                .arg(mq.namesrv_port.to_string())
                .args(["--bindAddress", "127.0.0.1", "--rocketmqHome"])
                .arg(&mq.dir.0)
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err)),
        ));
        wait_port(mq.namesrv_port, "name server", &mq.dir.0);
        mq.start_broker();
        mq
    }

    /// `127.0.0.1:PORT` of the name server.
    pub fn namesrv(&self) -> String {
        format!("127.0.0.1:{}", self.namesrv_port)
    }

    /// Starts (or restarts) the broker on the same port and store.
    pub fn start_broker(&mut self) {
        self.broker = None;
        let store = self.dir.0.join("store");
        let props = format!(
            "brokerClusterName=DefaultCluster\nbrokerName=broker-a\nbrokerId=0\n\
             namesrvAddr={ns}\nbrokerIP1=127.0.0.1\nlistenPort={port}\nhaListenPort={ha}\n\
             storePathRootDir={store}\nstorePathCommitLog={store}/commitlog\n\
             autoCreateTopicEnable=true\nmappedFileSizeCommitLog=67108864\n\
             transactionCheckInterval={check}\ntransactionTimeout={timeout}\n",
            ns = self.namesrv(),
            port = self.broker_port,
            ha = self.broker_port + 1,
            store = store.display(),
            check = CHECK_INTERVAL_MS,
            timeout = TRANSACTION_TIMEOUT_MS,
        );
        let conf = self.dir.0.join("broker.properties");
        std::fs::write(&conf, props).expect("write broker.properties");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.0.join("broker.log"))
            .expect("broker log");
        let err = out.try_clone().expect("broker log");
        self.broker = Some(Proc::spawn(
            Command::new(bin("rocketmq-broker-rust"))
                .env("ROCKETMQ_HOME", &self.dir.0)
                .arg("-c")
                .arg(&conf)
                .arg("-n")
                .arg(self.namesrv())
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err)),
        ));
        wait_port(self.broker_port, "broker", &self.dir.0);
        // Registration with the name server follows the listen by a moment.
        std::thread::sleep(Duration::from_millis(1500));
        // The broker may listen and then roll its start back (its store
        // health check fails on a disk past `diskSpaceCleanForciblyRatio`,
        // 85%, a bound its config clamps): say so here rather than as a
        // failed checkout later.
        let exited = self
            .broker
            .as_mut()
            .and_then(|p| p.0.try_wait().ok().flatten());
        if let Some(status) = exited {
            let log = self.broker_log();
            let tail: String = log.lines().rev().take(15).collect::<Vec<_>>().join("\n");
            let df = Command::new("df")
                .arg("-P")
                .arg(&self.dir.0)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            panic!(
                "the RocketMQ broker exited during start ({status}). It refuses to \
                 run on a disk 85% or more full; the disk:\n{df}\n\
                 last log lines (newest first):\n{tail}"
            );
        }
    }

    /// Kills the broker (SIGKILL: an outage).
    pub fn stop_broker(&mut self) {
        self.broker = None;
    }

    /// The broker's log so far (for assertion messages).
    pub fn broker_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("broker.log")).unwrap_or_default()
    }
}

fn wait_port(port: u16, what: &str, dir: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !listening(port) {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port} within 30s (logs in {})",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
