"""A Redis Cluster on loopback for the bench scripts (bench/flash-sale
--redis cluster, bench/replicated-ack): 3 masters + 3 replicas, AOF
`appendfsync always`, `cluster-node-timeout 2000`, as in the failover drill
(tests/tests/redis_failover.rs)."""

import socket
import subprocess
import sys
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def free_cluster_port():
    """At most 55535 with port + 10000 (the cluster bus) free too."""
    while True:
        p = free_port()
        if p > 55535:
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p + 10000))
            return p
        except OSError:
            pass
        finally:
            s.close()


def cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                          text=True, timeout=10).stdout


def wait_port(port, what, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


def start_cluster(tmp, spawn):
    """Starts the six nodes with `spawn(args, log_path)` (the caller's, which
    owns the processes), makes the cluster and waits until it is ok and every
    replica is linked. Returns the ports."""
    ports = [free_cluster_port() for _ in range(6)]
    for p in ports:
        d = tmp / f"redis-{p}"
        d.mkdir()
        spawn(["redis-server", "--port", str(p), "--bind", "127.0.0.1", "--save", "",
               "--dir", str(d), "--appendonly", "yes", "--appendfsync", "always",
               "--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
               "--cluster-config-file", str(d / "nodes.conf")], d / "log")
        wait_port(p, "redis-server")
    out = subprocess.run(["redis-cli", "--cluster", "create",
                          *[f"127.0.0.1:{p}" for p in ports],
                          "--cluster-replicas", "1", "--cluster-yes"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        sys.exit("cluster create failed:\n" + out.stdout + out.stderr)
    end = time.time() + 60
    while time.time() < end:
        ok = all("cluster_state:ok" in cli(p, "cluster", "info") for p in ports)
        linked = all("role:slave" not in (i := cli(p, "info", "replication"))
                     or "master_link_status:up" in i for p in ports)
        if ok and linked:
            return ports
        time.sleep(0.1)
    sys.exit("cluster never became ok")


def seeds_toml(ports):
    """The `[redis] cluster = [...]` value."""
    return "[" + ", ".join(f'"redis://127.0.0.1:{p}/"' for p in ports) + "]"


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"
