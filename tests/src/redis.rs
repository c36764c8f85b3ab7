//! Real redis-server processes for tests: a single server and a three-node
//! Redis Cluster, each on free loopback ports with a throwaway directory.
//!
//! The servers are the Debian `redis-server` binary (tests/run.sh installs
//! it). Every process is killed when its handle drops, and a server can be
//! stopped and started again on the same port to test outages.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, Proc};

/// How a server keeps its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// No persistence: fastest, for caches.
    None,
    /// AOF with `appendfsync always`: every write is on disk before the
    /// reply (the order core's durable setting).
    AofAlways,
}

/// One redis-server on 127.0.0.1.
pub struct RedisServer {
    pub port: u16,
    dir: TempDir,
    durability: Durability,
    cluster: bool,
    /// `enable-debug-command yes` (for `DEBUG SLEEP`: a hung server).
    debug: bool,
    proc: Option<Proc>,
}

impl RedisServer {
    /// A standalone server without persistence.
    pub fn start() -> RedisServer {
        Self::start_with(Durability::None)
    }

    pub fn start_with(durability: Durability) -> RedisServer {
        Self::spawn(free_port(), durability, false, false)
    }

    fn spawn(port: u16, durability: Durability, cluster: bool, debug: bool) -> RedisServer {
        let mut s = RedisServer {
            port,
            dir: TempDir::new(&format!("redis-{port}")),
            durability,
            cluster,
            debug,
            proc: None,
        };
        s.restart();
        s
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:PORT/`, the form the `redis` crate takes.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (SIGKILL: an outage, not a clean shutdown).
    pub fn stop(&mut self) {
        self.proc = None;
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_some()
    }

    /// Starts the server again on the same port and directory (so AOF data
    /// comes back) and waits until it answers PING.
    pub fn restart(&mut self) {
        self.proc = None;
        let mut cmd = Command::new(redis_server_bin());
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--protected-mode",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match self.durability {
            Durability::None => {
                cmd.args(["--appendonly", "no"]);
            }
            Durability::AofAlways => {
                cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
            }
        }
        if self.debug {
            cmd.args(["--enable-debug-command", "yes"]);
        }
        if self.cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .arg("--cluster-config-file")
                .arg(self.dir.0.join("nodes.conf"));
        }
        self.proc = Some(Proc::spawn(&mut cmd));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !command(self.addr(), &["PING"]).is_ok_and(|r| r == "+PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs one command and returns the raw first reply line (`+OK`, `:3`,
    /// `$5` ...); enough for test assertions without a client library.
    pub fn cmd(&self, args: &[&str]) -> String {
        command(self.addr(), args).unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    /// Like [`RedisServer::cmd`] but the payload of a bulk reply (`INFO`,
    /// `CLUSTER NODES`), and an error instead of a panic (the server may be
    /// down or hung on purpose).
    pub fn try_bulk(&self, args: &[&str]) -> std::io::Result<String> {
        bulk(self.addr(), args)
    }

    /// The process id, for `kill -9` (an outage) or `kill -STOP`.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Sends `DEBUG SLEEP secs` and returns at once: the server hangs (no
    /// replies, no cluster bus) for that long, as a stalled master does.
    /// The reply is awaited on a thread so the command is not cut short.
    pub fn hang_for(&self, secs: u32) {
        let addr = self.addr();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
                let _ = tx.send(false);
                return;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(u64::from(secs) + 30)));
            let sent = s.write_all(&encode(&["DEBUG", "SLEEP", &secs.to_string()]));
            let _ = tx.send(sent.is_ok());
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf);
        });
        assert!(
            rx.recv().unwrap_or(false),
            "could not send DEBUG SLEEP to port {}",
            self.port
        );
        // The command is on the server's socket; give it a moment to be
        // read and start sleeping.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A three-master Redis Cluster (no replicas) made with
/// `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

/// What [`RedisCluster::start_with`] builds.
#[derive(Clone, Copy, Debug)]
pub struct ClusterSpec {
    pub masters: usize,
    /// Replicas per master.
    pub replicas: usize,
    pub durability: Durability,
    /// `enable-debug-command yes` on every node.
    pub debug: bool,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        Self::start_with(ClusterSpec {
            masters: 3,
            replicas: 0,
            durability: Durability::None,
            debug: false,
        })
    }

    /// A cluster of `masters * (1 + replicas)` nodes; returns once every
    /// node says `cluster_state:ok` and every replica's link is up.
    pub fn start_with(spec: ClusterSpec) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..spec.masters * (1 + spec.replicas))
            .map(|_| RedisServer::spawn(free_cluster_port(), spec.durability, true, spec.debug))
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create
            .args([
                "--cluster-replicas",
                &spec.replicas.to_string(),
                "--cluster-yes",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cluster.is_ok() || !cluster.replicas_linked() {
            assert!(
                Instant::now() < deadline,
                "cluster_state never became ok with every replica linked"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    /// Every replica's link to its master is up.
    pub fn replicas_linked(&self) -> bool {
        self.nodes.iter().all(|n| {
            n.try_bulk(&["INFO", "replication"]).is_ok_and(|info| {
                !info.contains("role:slave") || info.contains("master_link_status:up")
            })
        })
    }

    /// The cluster as `CLUSTER NODES` on node `via` describes it.
    pub fn view(&self, via: usize) -> Option<Vec<NodeInfo>> {
        let text = self.nodes[via].try_bulk(&["CLUSTER", "NODES"]).ok()?;
        Some(text.lines().filter_map(NodeInfo::parse).collect())
    }

    /// The index in `nodes` of a node by its port.
    pub fn index_of(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port == port)
    }

    /// The hash slot of `key`.
    pub fn slot_of(&self, key: &str) -> u16 {
        let reply = self.nodes[0].cmd(&["CLUSTER", "KEYSLOT", key]);
        reply
            .trim_start_matches(':')
            .parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {key}: {reply}"))
    }

    /// The master serving `slot` and its replicas, as node `via` sees it
    /// (masters marked failed are skipped).
    pub fn shard_of(&self, slot: u16, via: usize) -> Option<(usize, Vec<usize>)> {
        let view = self.view(via)?;
        let master = view
            .iter()
            .find(|n| n.is_master() && !n.failed() && n.serves(slot))?;
        let replicas = view
            .iter()
            .filter(|n| n.master_id.as_deref() == Some(master.id.as_str()))
            .filter_map(|n| self.index_of(n.port))
            .collect();
        Some((self.index_of(master.port)?, replicas))
    }

    /// `cluster_state:ok` on node `i`.
    pub fn node_ok(&self, i: usize) -> bool {
        self.nodes[i]
            .try_bulk(&["CLUSTER", "INFO"])
            .is_ok_and(|info| info.contains("cluster_state:ok"))
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub id: String,
    pub port: u16,
    pub flags: Vec<String>,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
    /// Slot ranges served (masters).
    pub slots: Vec<(u16, u16)>,
}

impl NodeInfo {
    fn parse(line: &str) -> Option<NodeInfo> {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            return None;
        }
        let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
        let slots = f[8..]
            .iter()
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => s.parse().ok().map(|x| (x, x)),
            })
            .collect();
        Some(NodeInfo {
            id: f[0].to_string(),
            port,
            flags: f[2].split(',').map(str::to_string).collect(),
            master_id: (f[3] != "-").then(|| f[3].to_string()),
            slots,
        })
    }

    pub fn is_master(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }

    pub fn failed(&self) -> bool {
        self.flags.iter().any(|f| f == "fail" || f == "fail?")
    }

    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }
}

impl RedisCluster {
    fn is_ok(&self) -> bool {
        self.nodes.iter().all(|n| {
            bulk(n.addr(), &["CLUSTER", "INFO"]).is_ok_and(|info| info.contains("cluster_state:ok"))
        })
    }

    /// Seed URLs, the form the `redis` crate's cluster client takes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// A free port for a cluster node: at most 55535 (the node's cluster bus
/// listens on port + 10000, and redis-server refuses to start otherwise)
/// with its bus port free too.
fn free_cluster_port() -> u16 {
    loop {
        let p = free_port();
        if p <= 55535 && std::net::TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    }
}

/// The redis-server binary (Debian installs it in /usr/bin).
fn redis_server_bin() -> &'static str {
    "redis-server"
}

fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn roundtrip(addr: SocketAddr, args: &[&str]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(&encode(args))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // Read until a full reply has arrived: a line for simple replies, the
    // announced length for a bulk string.
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            if buf[0] != b'$' {
                break;
            }
            let len: i64 = std::str::from_utf8(&buf[1..end])
                .ok()
                .and_then(|l| l.parse().ok())
                .unwrap_or(-1);
            if len < 0 || buf.len() >= end + 2 + len as usize + 2 {
                break;
            }
        }
    }
    Ok(buf)
}

fn command(addr: SocketAddr, args: &[&str]) -> std::io::Result<String> {
    let buf = roundtrip(addr, args)?;
    let text = String::from_utf8_lossy(&buf);
    Ok(text.split("\r\n").next().unwrap_or_default().to_string())
}

/// The payload of a bulk-string reply.
fn bulk(addr: SocketAddr, args: &[&str]) -> std::io::Result<String> {
    let buf = roundtrip(addr, args)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(text
        .split_once("\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(text))
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "flashgate-{tag}-{}-{}",
            std::process::id(),
            next_id()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
