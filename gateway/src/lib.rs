//! flashgate's gateway: the ingress tier of a shop during a flash sale.
//!
//! It sits behind the cloud load balancer. The folders are its layers,
//! each importing only from the ones listed before it:
//!
//! - [`config`]: the TOML file as typed, validated structs (a leaf), with
//!   [`error`] (why the gateway answered itself) and [`headers`];
//! - [`observe`]: metrics, spans and the access log;
//! - [`edge`]: client connections (listeners, TLS, PROXY protocol,
//!   timeouts, connection and body limits); it knows no routes;
//! - [`upstream`]: clusters, connection pools, health, load balancing;
//! - [`body`] and [`respond`]: the response body and the one builder of
//!   the gateway's own answers;
//! - [`cache`]: the shared response cache;
//! - [`overload`]: the load level, shedding, adaptive concurrency and
//!   circuit breakers;
//! - [`pipeline`]: one request's way through the phases, and the
//!   [`pipeline::runtime::Runtime`] that one config builds;
//! - [`admin`] and [`demo`]: the admin listener and the embedded default.
//!
//! No folder imports from one listed after it; the one exception is this
//! root: [`Shared`] (the runtime in effect, metrics, the span exporter) is
//! what the pipeline and the admin listener read.
//!
//! The library is what the `flashgate` binary and the end-to-end tests use:
//! [`Gateway::start`] binds every listener of a validated [`Config`] and
//! returns the bound addresses.

pub mod admin;
pub mod body;
pub mod cache;
pub mod config;
pub mod demo;
pub mod edge;
pub mod error;
pub mod headers;
pub mod observe;
pub mod overload;
pub mod pipeline;
pub mod respond;
pub mod spool;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{Config, ConfigError};
use observe::metrics::Metrics;
use pipeline::runtime::Runtime;

/// State shared by every connection and the admin listener.
pub struct Shared {
    /// Swapped whole on reload; requests load it once and keep their copy.
    pub runtime: ArcSwap<Runtime>,
    pub metrics: Arc<Metrics>,
    /// Set when shutdown starts: readiness fails so the load balancer stops
    /// sending new connections while in-flight work finishes.
    pub draining: AtomicBool,
    /// Where `reload` reads the config from; `None` for the embedded demo.
    pub config_path: Option<PathBuf>,
    /// The listener and admin settings in effect: bound at start, so a
    /// reload that changes them reports a restart as needed, also after
    /// earlier reloads.
    bound: Bound,
    reload_lock: tokio::sync::Mutex<()>,
    /// The TLS listeners' certificates: a config reload installs the pairs
    /// it loaded (and checked) for the new config.
    pub certs: Vec<Arc<edge::tls::CertStore>>,
    /// The span exporter (`[tracing]`), built at start; `None` without one.
    pub otel: Option<observe::otel::Otel>,
    /// The load level and readiness (`[overload]`); outlives reloads.
    pub overload: Arc<overload::Overload>,
}

/// The settings fixed when the gateway started: a reload that changes
/// them reports that a restart is needed.
struct Bound {
    listeners: Vec<config::ListenerConfig>,
    admin: SocketAddr,
    log: config::LogConfig,
    tracing: Option<config::TracingConfig>,
}

/// What a successful reload could not apply without a restart.
#[derive(Debug, Default)]
pub struct ReloadOutcome {
    pub restart_required: Vec<String>,
    /// Certificate files that failed to load for a listener whose pairs
    /// changed (which needs a restart); it keeps the certificates it had.
    pub tls_errors: Vec<String>,
}

impl Shared {
    /// Re-reads the config file and swaps the runtime. An invalid file is
    /// refused with its first error and the running config stays.
    /// Listener and admin addresses are bound once; changes to them are
    /// reported as needing a restart.
    pub async fn reload(&self) -> Result<ReloadOutcome, String> {
        let _serial = self.reload_lock.lock().await;
        self.precompile_filters().await;
        let result = self.try_reload();
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .config_reloads
            .with_label_values(&[label])
            .inc();
        match &result {
            Ok(o) => tracing::info!(restart_required = ?o.restart_required, "config reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "config reload refused; the running config stays")
            }
        }
        result
    }

    /// Compiles the Wasm modules the new config names on a blocking
    /// thread, so that building the runtime finds them compiled (modules
    /// are cached by content) and the request path never waits for
    /// Cranelift. Errors are left for `try_reload` to report.
    async fn precompile_filters(&self) {
        let Some(path) = self.config_path.clone() else {
            return;
        };
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(config) = Config::load(&path) {
                for f in &config.filters {
                    if let Some(wasm) = &f.wasm {
                        filters::wasm::precompile_file(wasm);
                    }
                }
            }
        })
        .await;
    }

    fn try_reload(&self) -> Result<ReloadOutcome, String> {
        let path = self
            .config_path
            .as_ref()
            .ok_or_else(|| "this gateway was started without a config file (as `flashgate demo` is); there is nothing to reload".to_string())?;
        let new = Config::load(path).map_err(|e| e.to_string())?;
        let old = self.runtime.load();
        let mut outcome = ReloadOutcome::default();
        // Limits and trusted proxies apply live (new connections and
        // requests); sockets, certificate paths and PROXY protocol do not.
        let bound = &self.bound;
        let live = bound.listeners.len() == new.listeners.len()
            && bound
                .listeners
                .iter()
                .zip(&new.listeners)
                .all(|(a, b)| edge::server::applies_live(a, b));
        if !live {
            outcome.restart_required.push("listeners".into());
        }
        if bound.admin != new.admin.listen {
            outcome.restart_required.push("admin.listen".into());
        }
        let log = &bound.log;
        if log.level != new.log.level || log.format != new.log.format {
            outcome.restart_required.push("log.level/log.format".into());
        }
        if bound.tracing != new.tracing {
            outcome.restart_required.push("tracing".into());
        }
        // Built once: what the new config loads is what gets served.
        let mut loaded: Vec<edge::tls::Certs> = edge::tls::Certs::load_listeners(&new)
            .map_err(|e| e.to_string())?
            .into_iter()
            .flatten()
            .collect();
        let runtime = Runtime::build(new, &self.metrics, Some(&old)).map_err(|e| e.to_string())?;
        self.runtime.store(Arc::new(runtime));
        for store in &self.certs {
            match loaded.iter().position(|c| store.same_files(c)) {
                Some(i) => store.install(loaded.swap_remove(i)),
                // The listener's pairs changed, which needs a restart: the
                // store re-reads the files it was started with.
                None => {
                    if let Err(e) = store.reload(true) {
                        outcome.tls_errors.push(e.to_string());
                    }
                }
            }
        }
        Ok(outcome)
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("tracing: {0}")]
    Tracing(String),
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        what: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start worker thread {worker}")]
    Worker {
        worker: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Updates the load level and the clusters' learned limits every
/// [`overload::TICK`], as long as the gateway exists.
async fn overload_ticks(shared: std::sync::Weak<Shared>) {
    let mut every = tokio::time::interval(overload::TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let runtime = shared.runtime.load();
        shared.overload.tick(&runtime.config, &runtime.gates);
    }
}

/// A running gateway: its bound addresses and the handle to stop it.
pub struct Gateway {
    pub shared: Arc<Shared>,
    listeners: Vec<(String, SocketAddr)>,
    admin: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Per-core serving: resolves when a worker thread has drained.
    worker_threads: Vec<tokio::sync::oneshot::Receiver<()>>,
    admin_shutdown: watch::Sender<bool>,
    admin_task: tokio::task::JoinHandle<()>,
}

impl Gateway {
    /// Binds every listener and the admin port, then serves on the
    /// calling runtime. Nothing is served unless everything could be bound.
    pub async fn start(
        config: Config,
        config_path: Option<PathBuf>,
    ) -> Result<Gateway, StartError> {
        Gateway::start_workers(config, config_path, 1).await
    }

    /// [`Gateway::start`] with the listeners served by `workers` event
    /// loops (per-core serving, `edge::workers`): the calling runtime is
    /// worker 0 and also runs the admin listener and the background tasks;
    /// each other worker is a thread with a current-thread runtime. With
    /// more than one worker every listener is bound once per worker with
    /// `SO_REUSEPORT`. Call it from a current-thread runtime.
    pub async fn start_workers(
        config: Config,
        config_path: Option<PathBuf>,
        workers: usize,
    ) -> Result<Gateway, StartError> {
        let workers = workers.max(1);
        // Before anything builds upstream pools: one stack per worker.
        edge::workers::set_count(workers);
        let metrics = Arc::new(Metrics::new());
        let bound_config = Bound {
            listeners: config.listeners.clone(),
            admin: config.admin.listen,
            log: config.log.clone(),
            tracing: config.tracing.clone(),
        };
        // Everything that reads files or compiles is built before a socket
        // is bound, once: a bad file is a config error with its key path.
        let loaded = edge::tls::Certs::load_listeners(&config)?;
        let runtime = Runtime::build(config, &metrics, None)?;
        let mut bound = Vec::new();
        for l in &bound_config.listeners {
            let sockets = if workers == 1 {
                TcpListener::bind(l.listen).await.map(|s| (s, Vec::new()))
            } else {
                edge::workers::bind_group(l.listen, workers)
            };
            let (listener, others) = sockets.map_err(|source| StartError::Bind {
                what: format!("listener {:?}", l.name),
                addr: l.listen,
                source,
            })?;
            bound.push((l.clone(), listener, others));
        }
        let admin_listener = TcpListener::bind(bound_config.admin)
            .await
            .map_err(|source| StartError::Bind {
                what: "admin".into(),
                addr: bound_config.admin,
                source,
            })?;
        let admin = admin_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                what: "admin".into(),
                addr: bound_config.admin,
                source,
            })?;
        let mut certs = Vec::new();
        let mut listener_certs = Vec::new();
        for (l, loaded) in bound_config.listeners.iter().zip(loaded) {
            let store = match (&l.tls, loaded) {
                (Some(t), Some(loaded)) => {
                    let store = edge::tls::CertStore::new(
                        &l.name,
                        loaded,
                        metrics.tls_cert_reloads.clone(),
                        metrics.tls_cert_expiry.clone(),
                    );
                    store.watch(t.reload_interval.0);
                    certs.push(store.clone());
                    Some(store)
                }
                _ => None,
            };
            listener_certs.push(store);
        }
        let otel = match &bound_config.tracing {
            Some(t) => Some(observe::otel::Otel::start(t, &metrics).map_err(StartError::Tracing)?),
            None => None,
        };
        let shared = Arc::new(Shared {
            overload: overload::Overload::new(&metrics),
            otel,
            certs,
            bound: bound_config,
            runtime: ArcSwap::from_pointee(runtime),
            metrics,
            draining: AtomicBool::new(false),
            config_path,
            reload_lock: tokio::sync::Mutex::new(()),
        });
        // Filters' HTTP callouts go to this gateway's clusters.
        filters::callout::set_http_callout(Arc::new(pipeline::callout::GatewayCallout {
            shared: Arc::downgrade(&shared),
            runtime: tokio::runtime::Handle::current(),
            h2: Default::default(),
        }));
        tokio::spawn(overload_ticks(Arc::downgrade(&shared)));
        let (shutdown, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut listeners = Vec::new();
        // Per worker 1.., the sockets it serves.
        let mut per_worker: Vec<Vec<_>> = (1..workers).map(|_| Vec::new()).collect();
        for ((cfg, listener, others), certs) in bound.into_iter().zip(listener_certs) {
            let addr = listener.local_addr().map_err(|source| StartError::Bind {
                what: format!("listener {:?}", cfg.name),
                addr: cfg.listen,
                source,
            })?;
            listeners.push((cfg.name.clone(), addr));
            let Some(group) = edge::server::ListenerGroup::new(&cfg, certs) else {
                continue;
            };
            for (socket, sockets) in others.into_iter().zip(per_worker.iter_mut()) {
                sockets.push((socket, cfg.clone(), group.clone()));
            }
            tasks.push(tokio::spawn(edge::server::serve_socket(
                shared.clone(),
                listener,
                cfg,
                rx.clone(),
                group,
            )));
        }
        let mut worker_threads = Vec::new();
        for (i, sockets) in per_worker.into_iter().enumerate() {
            let (shared, rx) = (shared.clone(), rx.clone());
            let serve = move || async move {
                let mut tasks = Vec::new();
                for (socket, cfg, group) in sockets {
                    match TcpListener::from_std(socket) {
                        Ok(l) => tasks.push(tokio::spawn(edge::server::serve_socket(
                            shared.clone(),
                            l,
                            cfg,
                            rx.clone(),
                            group,
                        ))),
                        Err(e) => tracing::error!(error = %e, "a worker cannot serve its socket"),
                    }
                }
                for t in tasks {
                    let _ = t.await;
                }
            };
            let done = edge::workers::spawn(i + 1, serve).map_err(|source| StartError::Worker {
                worker: i + 1,
                source,
            })?;
            worker_threads.push(done);
        }
        let (admin_shutdown, admin_rx) = watch::channel(false);
        let admin_task = tokio::spawn(admin::serve(shared.clone(), admin_listener, admin_rx));
        Ok(Gateway {
            shared,
            listeners,
            admin,
            shutdown,
            tasks,
            worker_threads,
            admin_shutdown,
            admin_task,
        })
    }

    /// The bound address of the listener named `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    pub fn listeners(&self) -> &[(String, SocketAddr)] {
        &self.listeners
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// Graceful stop: readiness fails at once; the listeners keep serving
    /// for `shutdown.drain_delay` (the load balancer needs that long to
    /// notice and deregister us), then stop accepting; open connections
    /// finish (bounded by `shutdown.drain_timeout`), then it returns.
    /// The admin port stays up until the listeners are done, so probes see
    /// `/readyz` answer 503 during the drain rather than a refused connect.
    pub async fn shutdown(self) {
        self.shared.draining.store(true, Ordering::Relaxed);
        let delay = self.shared.runtime.load().config.shutdown.drain_delay.0;
        if !delay.is_zero() {
            tracing::info!(
                ?delay,
                "draining: readiness off, still serving for drain_delay"
            );
            tokio::time::sleep(delay).await;
        }
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        for t in self.worker_threads {
            let _ = t.await;
        }
        let _ = self.admin_shutdown.send(true);
        let _ = self.admin_task.await;
        // The last spans (the drained requests') go out before the exit.
        if let Some(otel) = &self.shared.otel {
            otel.shutdown().await;
        }
    }
}
