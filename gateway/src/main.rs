//! The `flashgate` command: `run`, `check` and `demo`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gateway::config::{Config, LogConfig, LogFormat};
use gateway::pipeline::runtime::Runtime;
use gateway::{demo, Gateway};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "flashgate",
    version,
    about = "An edge-first flash-sale gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway with a config file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Worker threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        /// How the threads serve: `per-core` (an event loop per thread,
        /// each with its own listening socket and upstream pools) or
        /// `work-stealing` (one tokio multi-thread runtime).
        #[arg(long, value_enum, default_value_t = RuntimeModel::PerCore)]
        runtime: RuntimeModel,
    },
    /// Validate config files; prints the first error with its key path.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run the embedded default: the gateway in front of a demo shop.
    Demo {
        /// Public listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin listener.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        /// The demo shop origin.
        #[arg(long, default_value = "127.0.0.1:9080")]
        origin: SocketAddr,
        /// The in-process order core (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        core: SocketAddr,
        /// TLS listener (a self-signed certificate for localhost and
        /// 127.0.0.1, made at start).
        #[arg(long, default_value = "127.0.0.1:8443")]
        tls_listen: SocketAddr,
        /// Serve no TLS listener.
        #[arg(long)]
        no_tls: bool,
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, value_enum, default_value_t = RuntimeModel::PerCore)]
        runtime: RuntimeModel,
    },
}

/// See `gateway::edge::workers` and docs/decisions.md.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RuntimeModel {
    PerCore,
    WorkStealing,
}

/// How a command's gateway runs: the runtime to block on and the number
/// of per-core workers to give [`Gateway::start_workers`].
struct Serving {
    runtime: tokio::runtime::Runtime,
    workers: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { files } => check(&files),
        Command::Run {
            config,
            threads,
            runtime: model,
        } => exit(serving(threads, model).and_then(|s| s.runtime.block_on(run(config, s.workers)))),
        Command::Demo {
            listen,
            admin,
            origin,
            core,
            tls_listen,
            no_tls,
            threads,
            runtime: model,
        } => {
            let tls = (!no_tls).then_some(tls_listen);
            exit(serving(threads, model).and_then(|s| {
                s.runtime
                    .block_on(run_demo(listen, admin, origin, core, tls, s.workers))
            }))
        }
    }
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flashgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Each file is validated, then everything it names is built and dropped
/// (`Runtime::check`), so a file that `check` accepts is one `run` starts
/// with, short of ports being free and Redis being there. A valid file gets
/// one line saying what it sets up (`Config::summary`).
fn check(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for f in files {
        match Config::load(f).and_then(|c| Runtime::check(&c).map(|_| c)) {
            Ok(c) => println!("{}: ok: {}", f.display(), c.summary()),
            Err(e) => {
                eprintln!("{}: {e}", f.display());
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One worker per core by default. Per-core (the default): the main
/// thread's current-thread runtime is worker 0, and the gateway starts the
/// other workers itself (`Gateway::start_workers`). Work-stealing: one
/// tokio multi-thread runtime with `threads` workers; with `--threads 1`
/// that is tokio's current-thread scheduler, the same event loop as one
/// per-core worker.
fn serving(threads: Option<usize>, model: RuntimeModel) -> anyhow::Result<Serving> {
    let n = threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let (mut b, workers) = match model {
        RuntimeModel::PerCore => (tokio::runtime::Builder::new_current_thread(), n),
        RuntimeModel::WorkStealing if n == 1 => (tokio::runtime::Builder::new_current_thread(), 1),
        RuntimeModel::WorkStealing => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            (b, 1)
        }
    };
    let runtime = b
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    Ok(Serving { runtime, workers })
}

fn init_logging(cfg: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(path: PathBuf, workers: usize) -> anyhow::Result<()> {
    let config = Config::load(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    init_logging(&config.log);
    let gw = Gateway::start_workers(config, Some(path), workers).await?;
    for (name, addr) in gw.listeners() {
        tracing::info!(listener = %name, %addr, "listening");
    }
    tracing::info!(addr = %gw.admin_addr(), "admin listening");
    serve_until_signal(gw).await
}

async fn run_demo(
    listen: SocketAddr,
    admin: SocketAddr,
    origin: SocketAddr,
    core: SocketAddr,
    tls: Option<SocketAddr>,
    workers: usize,
) -> anyhow::Result<()> {
    let origin_listener = TcpListener::bind(origin)
        .await
        .with_context(|| format!("cannot listen on {origin} for the demo origin (try --origin)"))?;
    let origin = origin_listener.local_addr()?;
    tokio::spawn(demo::serve_origin(origin_listener));
    let order_core = gateway::demo::checkout::start_core(core)
        .await
        .with_context(|| format!("cannot start the demo order core on {core} (try --core)"))?;
    let mut config = demo::config(origin);
    gateway::demo::checkout::point_at(&mut config, order_core.addr);
    config.listeners[0].listen = listen;
    config.admin.listen = admin;
    if let Some(addr) = tls {
        config
            .listeners
            .push(demo_tls_listener(&config.listeners[0], addr)?);
    }
    let wasm = demo::wasm::install(&mut config, &demo_tmp_dir())?;
    init_logging(&config.log);
    let admin_token = config.admin.token.clone().unwrap_or_default();
    let gw = Gateway::start_workers(config, None, workers).await?;
    let public = gw
        .addr("public")
        .context("demo config has a public listener")?;
    let banner = demo::banner::render(&demo::banner::Addrs {
        public,
        tls: gw.addr("public-tls"),
        admin: gw.admin_addr(),
        origin,
        core: order_core.addr,
        admin_token,
        wasm,
    });
    println!("{banner}");
    let result = serve_until_signal(gw).await;
    let _ = std::fs::remove_dir_all(demo_tmp_dir());
    result
}

/// Where the demo writes its certificate and Wasm module; removed when the
/// demo stops.
fn demo_tmp_dir() -> PathBuf {
    std::env::temp_dir().join(format!("flashgate-demo-{}", std::process::id()))
}

/// The demo's TLS listener: the public listener's settings on `addr`, with
/// a self-signed certificate written to a temporary directory (the
/// certificate store reads PEM files, as in production).
fn demo_tls_listener(
    public: &gateway::config::ListenerConfig,
    addr: SocketAddr,
) -> anyhow::Result<gateway::config::ListenerConfig> {
    use gateway::config::{CertPair, Dur, TlsConfig};
    let dir = demo_tmp_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (cert, key) = gateway::edge::tls::self_signed(&["localhost", "127.0.0.1"])
        .context("generating the demo's self-signed certificate")?;
    let pair = CertPair {
        cert: dir.join("demo-cert.pem"),
        key: dir.join("demo-key.pem"),
    };
    std::fs::write(&pair.cert, cert).context("writing the demo certificate")?;
    std::fs::write(&pair.key, key).context("writing the demo key")?;
    let mut l = public.clone();
    l.name = "public-tls".into();
    l.listen = addr;
    l.tls = Some(TlsConfig {
        certs: vec![pair],
        reload_interval: Dur(std::time::Duration::from_secs(60)),
        handshake_timeout: Dur(std::time::Duration::from_secs(10)),
    });
    Ok(l)
}

/// SIGTERM/SIGINT drain and stop; SIGHUP reloads the config file.
async fn serve_until_signal(gw: Gateway) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => { let _ = gw.shared.reload().await; }
        }
    }
    tracing::info!("shutting down: draining connections");
    gw.shutdown().await;
    Ok(())
}
