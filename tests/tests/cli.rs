//! The `flashgate` binary as operators run it: `check`, `demo`, `run`,
//! signals, and memory while streaming large bodies.

use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use flashgate_tests::*;
use http::Request;
use http_body_util::BodyExt;

#[test]
fn check_accepts_every_shipped_config() {
    let dir = repo_root().join("config");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 2,
        "config/ holds demo.toml and production.toml at least"
    );
    let out = Command::new(flashgate_bin())
        .arg("check")
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.contains(": ok: ")).count(),
        files.len(),
        "{stdout}"
    );
    // One line each, saying what the file sets up.
    let demo = stdout
        .lines()
        .find(|l| l.contains("demo.toml: ok: "))
        .unwrap_or_else(|| panic!("{stdout}"));
    for part in [
        "1 listener (public 127.0.0.1:8080)",
        "6 routes (recommendations, catalog, product-pages, storefront, drop, checkout)",
        "1 waiting room (drop)",
        "1 filter (security-headers native headers)",
        "2 upstreams with 2 endpoints",
        "2 cached routes",
        "1 checkout route",
        "JWT HS256",
    ] {
        assert!(demo.contains(part), "{part:?} in {demo}");
    }
}

#[test]
fn check_prints_the_key_path_of_the_first_error() {
    let cases = [
        (
            Cfg::new(&["127.0.0.1:1".parse().unwrap()])
                .upstream("connect_timeout = \"soon\"")
                .build(),
            "upstreams[0].connect_timeout: invalid duration",
        ),
        (
            Cfg::new(&["127.0.0.1:1".parse().unwrap()])
                .build()
                .replace("upstream = \"origin\"", "upstream = \"catalgo\""),
            "routes[0].upstream: unknown upstream \"catalgo\"",
        ),
        (
            Cfg::new(&["127.0.0.1:1".parse().unwrap()])
                .build()
                .replace("[log]", "[log]\ncolour = true"),
            "log.colour: unknown field",
        ),
        // Valid text naming files that do not build: `check` builds them.
        (
            Cfg::new(&["127.0.0.1:1".parse().unwrap()])
                .section("[[filters]]\nname = \"f\"\nwasm = \"/nonexistent/f.wasm\"\n")
                .build(),
            "filters[0].wasm: wasm module: cannot read /nonexistent/f.wasm",
        ),
        (
            Cfg::new(&["127.0.0.1:1".parse().unwrap()])
                .section("[jwt]\nalgorithm = \"RS256\"\npublic_key = \"/nonexistent/jwt.pem\"\n")
                .build(),
            "jwt.public_key: cannot read /nonexistent/jwt.pem",
        ),
        (
            Cfg::new(&["127.0.0.1:1".parse().unwrap()]).build().replace(
                "[[upstreams]]",
                "[listeners.tls]\ncerts = [{ cert = \"/nonexistent/c.pem\", key = \"/nonexistent/k.pem\" }]\n[[upstreams]]",
            ),
            "listeners[0].tls.certs[0]: cannot read certificates from /nonexistent/c.pem",
        ),
    ];
    let dir = check_refuses("check", &cases);
    // `run` refuses the same file before listening.
    let out = Command::new(flashgate_bin())
        .args(["run", "--config"])
        .arg(dir.join("bad1.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("routes[0].upstream"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `flashgate demo` as a new user runs it (on free ports here): it prints
/// the URLs and, for each capability, a command and what its answer shows;
/// every command runs here (with `sh` and `curl`, as the user would) and
/// its output must contain what the banner says. Then it stops on SIGTERM.
#[tokio::test]
async fn demo_banner_commands_answer_as_printed() {
    let Demo {
        proc: mut child,
        banner: lines,
        ..
    } = Demo::start("127.0.0.1:0", &["--tls-listen", "127.0.0.1:0"]).await;
    let url_of = |label: &str| {
        lines
            .iter()
            .find(|l| l.contains(label))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("http://")))
            .unwrap_or_else(|| panic!("no {label} URL in {lines:?}"))
            .to_string()
    };
    assert!(
        lines.iter().any(|l| l.contains("wrk ")),
        "prints a wrk command: {lines:?}"
    );
    // The commands and what each answer shows, in the banner's order.
    let steps: Vec<(&str, &str)> = lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let cmd = l.strip_prefix("  $ ")?;
            let expect = lines
                .get(i + 1)
                .and_then(|n| n.strip_prefix("  -> "))
                .unwrap_or_else(|| panic!("no `->` line after {l:?}"));
            Some((cmd, expect))
        })
        .collect();
    assert!(steps.len() >= 10, "{lines:?}");
    // This suite installs the wasm32-wasip1 target, so the build embeds
    // the Wasm filter and the banner shows it.
    assert!(
        steps.iter().any(|(_, e)| e.starts_with("x-edge-filter")),
        "the Wasm filter is on: {lines:?}"
    );
    for (cmd, expect) in &steps {
        let line = cmd.to_string();
        let out = tokio::task::spawn_blocking(move || {
            // `timeout`: a hung command fails the test instead of stalling it.
            Command::new("timeout")
                .args(["60", "sh", "-c", &line])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(expect),
            "`{cmd}` should show {expect:?}; got:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The counters agree with what was run: the catalog was proxied and the
    // degradation drill was cleared.
    assert!(get(&url_of("metrics"))
        .await
        .text()
        .contains("flashgate_requests_total{route=\"catalog\",status=\"200\"}"));
    let reco = url_of("slow recommendations");
    wait_until(
        Duration::from_secs(30),
        "recommendations back to normal",
        || {
            let reco = reco.clone();
            async move {
                let got = get(&reco).await;
                // Neither the native fallback nor the Wasm filter's placeholder.
                got.header("x-flashgate-degraded").is_none() && got.header("x-degraded").is_none()
            }
        },
    )
    .await;
    let page = get(&url_of("a product page")).await;
    assert!(page.text().contains("<h1>"));
    child.signal("TERM");
    let exit = child
        .wait_exit(Duration::from_secs(10))
        .expect("demo exits on SIGTERM");
    assert!(exit.success(), "{exit:?}");
}

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("flashgate-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gw.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A config with fixed free ports, for the binary.
fn binary_config(
    upstream: std::net::SocketAddr,
    upstream_extra: &str,
) -> (String, std::net::SocketAddr, std::net::SocketAddr) {
    with_fixed_ports(&Cfg::new(&[upstream]).upstream(upstream_extra).build())
}

/// SIGTERM: readiness fails at once, the in-flight request completes, the
/// process exits 0. SIGHUP reloads the file.
#[tokio::test]
async fn sigterm_drains_and_sighup_reloads() {
    let slow = Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        reply(200, req.uri().path().to_string())
    })
    .await;
    let (text, public, admin) = binary_config(slow.addr, "");
    let path = write_config("drain", &text);
    let mut gw = Proc::spawn(
        Command::new(flashgate_bin())
            .args(["run", "--config"])
            .arg(&path)
            .stderr(Stdio::null()),
    );
    assert!(wait_listening(public, Duration::from_secs(10)).await);
    assert_eq!(get(&format!("http://{public}/a")).await.text(), "/a");

    // SIGHUP with a new route.
    std::fs::write(
        &path,
        text.clone()
            + "[[routes]]\nname = \"new\"\npath_prefix = \"/new\"\nupstream = \"origin\"\n",
    )
    .unwrap();
    gw.signal("HUP");
    wait_until(
        Duration::from_secs(5),
        "SIGHUP reloaded the config",
        || async {
            get(&format!("http://{admin}/admin/status")).await.json()["routes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["name"] == "new")
        },
    )
    .await;

    let in_flight = tokio::spawn(async move { get(&format!("http://{public}/slow")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal("TERM");
    wait_until(
        Duration::from_secs(1),
        "readiness fails during the drain",
        || async { get(&format!("http://{admin}/readyz")).await.status == 503 },
    )
    .await;
    let got = in_flight.await.unwrap();
    assert_eq!(
        (got.status, got.text().as_str()),
        (200, "/slow"),
        "in-flight request completed"
    );
    let exit = gw
        .wait_exit(Duration::from_secs(10))
        .expect("exits after the drain");
    assert!(exit.success(), "{exit:?}");
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

/// 256 MiB up and 256 MiB down through the real binary while its peak
/// memory stays far below the body size: bodies stream, never buffer.
#[tokio::test]
async fn large_bodies_stream_in_bounded_memory() {
    const CHUNK: usize = 256 * 1024;
    const CHUNKS: usize = 1024; // 256 MiB
    let up = Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        if req.method() == http::Method::POST {
            let mut body = req.into_body();
            let mut total = 0usize;
            while let Some(f) = body.frame().await {
                if let Ok(d) = f.unwrap().into_data() {
                    total += d.len();
                }
            }
            return reply(200, total.to_string());
        }
        let (mut tx, body) = http_body_util::channel::Channel::<
            Bytes,
            Box<dyn std::error::Error + Send + Sync>,
        >::new(4);
        tokio::spawn(async move {
            let chunk = Bytes::from(vec![7u8; CHUNK]);
            for _ in 0..CHUNKS {
                if tx.send_data(chunk.clone()).await.is_err() {
                    return;
                }
            }
        });
        http::Response::new(BodyExt::boxed(body))
    })
    .await;
    let (text, public, _admin) = binary_config(up.addr, "request_timeout = \"60s\"");
    // Above the default max_body (16MiB): this test is about streaming.
    let text = text.replacen(
        "name = \"public\"",
        "name = \"public\"\nmax_body = \"1GiB\"",
        1,
    );
    let path = write_config("stream", &text);
    let gw = Proc::spawn(
        Command::new(flashgate_bin())
            .args(["run", "--config"])
            .arg(&path)
            .stderr(Stdio::null()),
    );
    assert!(wait_listening(public, Duration::from_secs(10)).await);

    let (mut tx, body) =
        http_body_util::channel::Channel::<Bytes, Box<dyn std::error::Error + Send + Sync>>::new(4);
    let sender = tokio::spawn(async move {
        let chunk = Bytes::from(vec![1u8; CHUNK]);
        for _ in 0..CHUNKS {
            tx.send_data(chunk.clone()).await.unwrap();
        }
    });
    let got = send(
        Request::post(format!("http://{public}/up"))
            .body(BodyExt::boxed(body))
            .unwrap(),
    )
    .await;
    sender.await.unwrap();
    assert_eq!(got.text(), (CHUNK * CHUNKS).to_string());

    let resp = client()
        .request(
            Request::get(format!("http://{public}/down"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut total = 0usize;
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            total += d.len();
        }
    }
    assert_eq!(total, CHUNK * CHUNKS);
    let peak_kib = gw.peak_rss_kib();
    assert!(
        peak_kib < 64 * 1024,
        "peak RSS {peak_kib} KiB while moving 512 MiB"
    );
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

type Conn = hyper::client::conn::http1::SendRequest<flashgate_tests::Body>;

/// A keep-alive connection of its own to `addr`.
async fn connect(addr: std::net::SocketAddr) -> Result<Conn, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(tx)
}

/// `GET /` for `shop.example` on `tx`, its body read: the status.
async fn get_on(tx: &mut Conn) -> Result<u16, String> {
    let resp = tx
        .send_request(
            Request::get("/")
                .header("host", "shop.example")
                .body(empty())
                .unwrap(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(status)
}

/// One keep-alive connection of its own to `addr`, with `n` `GET /` on it
/// one after the other; the statuses, or the error of the first that
/// failed (a connection the gateway refused).
async fn requests_on_one_connection(
    addr: std::net::SocketAddr,
    n: usize,
) -> Result<Vec<u16>, String> {
    let mut tx = connect(addr).await?;
    let mut statuses = Vec::new();
    for _ in 0..n {
        statuses.push(get_on(&mut tx).await?);
    }
    Ok(statuses)
}

/// The default runtime (per-core: one event loop per thread, a socket
/// per worker with `SO_REUSEPORT`): with `--threads 3` two worker threads
/// join the main one, every connection is answered whichever worker the
/// kernel gives it to, upstream connections are reused (at most one per
/// client connection, whatever the number of requests), the listener's
/// `max_connections` counts the connections of all workers together, and
/// SIGTERM drains every worker.
#[tokio::test]
async fn per_core_workers_serve_share_limits_and_drain() {
    let up = Upstream::fixed("ok").await;
    let (text, public, admin) = binary_config(up.addr, "");
    let path = write_config("per-core", &text);
    let mut gw = Proc::spawn(
        Command::new(flashgate_bin())
            .args(["run", "--threads", "3", "--config"])
            .arg(&path)
            .stderr(Stdio::null()),
    );
    assert!(wait_listening(public, Duration::from_secs(10)).await);
    let workers = std::fs::read_dir(format!("/proc/{}/task", gw.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("flashgate-worke"))
        .count();
    assert_eq!(workers, 2, "two worker threads besides the main one");

    // 24 connections, two waves of 5 requests each.
    const CONNS: usize = 24;
    for _wave in 0..2 {
        let clients: Vec<_> = (0..CONNS)
            .map(|_| tokio::spawn(requests_on_one_connection(public, 5)))
            .collect();
        for c in clients {
            assert_eq!(c.await.unwrap(), Ok(vec![200; 5]));
        }
    }
    let answered = metric(
        admin,
        "flashgate_requests_total{route=\"default\",status=\"200\"}",
    )
    .await;
    assert_eq!(answered, (2 * CONNS * 5) as f64);
    let opened = metric(admin, "flashgate_upstream_connections_total").await;
    assert!(
        (1.0..=(2 * CONNS) as f64).contains(&opened),
        "{opened} upstream connections for {CONNS} client connections in two waves"
    );

    // max_connections = 6 for the whole listener, not per worker: six
    // open connections (each answered once, so each was accepted), then
    // every further one is refused, whichever worker takes it.
    std::fs::write(
        &path,
        text.replacen(
            "name = \"public\"",
            "name = \"public\"\nmax_connections = 6",
            1,
        ),
    )
    .unwrap();
    gw.signal("HUP");
    wait_until(Duration::from_secs(10), "the reload applied", || async {
        metric(admin, "flashgate_config_reloads_total{result=\"ok\"}").await >= 1.0
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut tx = connect(public).await.unwrap();
        assert_eq!(get_on(&mut tx).await.unwrap(), 200);
        held.push(tx);
    }
    for _ in 0..6 {
        let refused = requests_on_one_connection(public, 1).await;
        assert!(refused.is_err(), "a 7th connection was served: {refused:?}");
    }
    let refused = metric(
        admin,
        "flashgate_connections_refused_total{listener=\"public\",reason=\"max_connections\"}",
    )
    .await;
    assert_eq!(refused, 6.0);
    drop(held);

    gw.signal("TERM");
    let exit = gw
        .exited(Duration::from_secs(20))
        .await
        .expect("every worker drains and the process exits");
    assert!(exit.success(), "{exit:?}");
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}
