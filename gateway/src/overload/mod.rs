//! Overload protection: the load level ([`level`]), what it sheds
//! ([`shed`]), each cluster's gate with its learned concurrency limit,
//! priority shares and queue ([`gate`], [`adaptive`]), and the circuit
//! breaker ([`breaker`]). The pipeline's admission phase asks [`shed`]
//! what to do with a request at the current level; the upstream phase
//! takes a slot from the route's [`gate::Gate`]; a tick task
//! ([`Overload::tick`], every [`TICK`]) turns what each gate saw into its
//! cluster's level, and what the process shares (client connections,
//! temp-file space) into the process's own level and readiness. `docs/overload.md` is the long version.

pub mod adaptive;
pub mod breaker;
pub mod gate;
pub mod level;
pub mod shed;

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec};

use crate::config::Config;
use crate::observe::metrics::Metrics;
use gate::Gate;

/// How often the level and the learned limits are updated.
pub const TICK: Duration = Duration::from_millis(100);

/// No forced level (in [`Overload::forced_now`]).
const NOT_FORCED: u8 = u8::MAX;

/// The load levels and readiness: each cluster's own level lives in its
/// gate; here are the process's own level (client connections, temp-file
/// space), the highest of all, a forced level, and readiness.
pub struct Overload {
    /// The highest level in effect anywhere: forced, or the highest of the
    /// process's and every cluster's (`flashgate_load_level`).
    level: AtomicU8,
    computed: AtomicU8,
    /// The process's own level, from what all clusters share.
    process: AtomicU8,
    forced: Mutex<Option<(u8, Instant)>>,
    /// The forced level while one is in effect, else [`NOT_FORCED`]: read
    /// by every request without the lock.
    forced_now: AtomicU8,
    ready: AtomicBool,
    state: Mutex<TickState>,
    level_gauge: IntGauge,
    connections: IntGaugeVec,
    temp_bytes: IntGauge,
    /// `flashgate_shed_total{route, priority, reason}`.
    pub shed: IntCounterVec,
}

#[derive(Default)]
struct TickState {
    hysteresis: level::Hysteresis,
    signals: level::ProcessSignals,
    critical_since: Option<Instant>,
    calm_since: Option<Instant>,
}

impl Overload {
    pub fn new(metrics: &Metrics) -> Arc<Overload> {
        Arc::new(Overload {
            level: AtomicU8::new(0),
            computed: AtomicU8::new(0),
            process: AtomicU8::new(0),
            forced: Mutex::new(None),
            forced_now: AtomicU8::new(NOT_FORCED),
            ready: AtomicBool::new(true),
            state: Mutex::new(TickState::default()),
            level_gauge: metrics.load_level.clone(),
            connections: metrics.connections_active.clone(),
            temp_bytes: metrics.spool_temp_bytes.clone(),
            shed: metrics.shed.clone(),
        })
    }

    /// The highest level in effect anywhere, 0 (calm) to 3 (critical).
    pub fn level(&self) -> u8 {
        self.level.load(Ordering::Relaxed)
    }

    /// The level a request to `gate`'s cluster sees: the forced level, else
    /// the higher of the cluster's own and the process's. Without a gate
    /// (no cluster, or overload off), the process's.
    pub fn level_for(&self, gate: Option<&Gate>) -> u8 {
        match self.forced_now.load(Ordering::Relaxed) {
            NOT_FORCED => self
                .process
                .load(Ordering::Relaxed)
                .max(gate.map_or(0, Gate::own_level)),
            forced => forced,
        }
    }

    /// False while the process's own level (or a forced one) has been
    /// critical for `unready_after`, until it has been below critical for
    /// `ready_after`. A cluster's level does not count: its origin is
    /// shared by every gateway, so sending clients to another one would
    /// not relieve it.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Forces the level for a drill until `for_` has passed; `None`
    /// clears it.
    pub fn force(&self, forced: Option<(u8, Duration)>) {
        let mut f = self.forced.lock().unwrap_or_else(|e| e.into_inner());
        *f = forced.map(|(l, d)| (l.min(3), Instant::now() + d));
        let forced = self.forced_level(&mut f);
        drop(f);
        self.forced_now
            .store(forced.unwrap_or(NOT_FORCED), Ordering::Relaxed);
        self.set(forced.unwrap_or_else(|| self.computed.load(Ordering::Relaxed)));
    }

    /// The forced level while it has not expired.
    fn forced_level(&self, forced: &mut Option<(u8, Instant)>) -> Option<u8> {
        match *forced {
            Some((l, until)) if Instant::now() < until => Some(l),
            Some(_) => {
                *forced = None;
                tracing::info!("forced load level expired");
                None
            }
            None => None,
        }
    }

    fn set(&self, level: u8) {
        let old = self.level.swap(level, Ordering::Relaxed);
        if old != level {
            tracing::warn!(from = old, to = level, "load level changed");
        }
        self.level_gauge.set(i64::from(level));
    }

    /// What the process as a whole is short of now.
    fn process_signals(&self, config: &Config) -> level::ProcessSignals {
        let connections = config
            .listeners
            .iter()
            .map(|l| {
                let open = self.connections.with_label_values(&[&l.name]).get().max(0);
                open as f64 / l.max_connections.max(1) as f64
            })
            .fold(0.0, f64::max);
        let temp_max = config.buffering.temp_max.0.max(1);
        level::ProcessSignals {
            connections,
            temp_space: self.temp_bytes.get().max(0) as f64 / temp_max as f64,
        }
    }

    /// One tick: reads the gates and moves each cluster's level, moves the
    /// process's own level (both with hysteresis), expires a forced level,
    /// updates readiness.
    pub fn tick(&self, config: &Config, gates: &[Arc<Gate>]) {
        let cfg = &config.overload;
        let now = Instant::now();
        let clusters: Vec<u8> = gates
            .iter()
            .map(|g| {
                let signals = g.tick(TICK);
                if cfg.enabled {
                    g.step_level(cfg, signals, TICK)
                } else {
                    0
                }
            })
            .collect();
        let signals = self.process_signals(config);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.signals = signals;
        let target = if cfg.enabled {
            level::process_target(cfg, &signals)
        } else {
            0
        };
        let process = st.hysteresis.step(target, cfg.cool_down.0, now);
        self.process.store(process, Ordering::Relaxed);
        let computed = clusters.iter().copied().fold(process, u8::max);
        self.computed.store(computed, Ordering::Relaxed);
        let forced = {
            let mut f = self.forced.lock().unwrap_or_else(|e| e.into_inner());
            self.forced_level(&mut f)
        };
        self.forced_now
            .store(forced.unwrap_or(NOT_FORCED), Ordering::Relaxed);
        self.set(forced.unwrap_or(computed));
        for (g, own) in gates.iter().zip(clusters) {
            g.show_level(forced.unwrap_or(own.max(process)));
        }
        if forced.unwrap_or(process) >= 3 {
            st.calm_since = None;
            let since = *st.critical_since.get_or_insert(now);
            if self.ready() && now.duration_since(since) >= cfg.unready_after.0 {
                tracing::warn!("process load level critical for unready_after: readiness off");
                self.ready.store(false, Ordering::Relaxed);
            }
        } else {
            st.critical_since = None;
            if !self.ready() {
                let since = *st.calm_since.get_or_insert(now);
                if now.duration_since(since) >= cfg.ready_after.0 {
                    tracing::info!(
                        "process load level below critical for ready_after: readiness on"
                    );
                    self.ready.store(true, Ordering::Relaxed);
                    st.calm_since = None;
                }
            }
        }
    }

    /// For `/admin/status`.
    pub fn status(&self) -> serde_json::Value {
        let forced = *self.forced.lock().unwrap_or_else(|e| e.into_inner());
        let signals = self.state.lock().unwrap_or_else(|e| e.into_inner()).signals;
        let now = Instant::now();
        serde_json::json!({
            "level": self.level(),
            "computed": self.computed.load(Ordering::Relaxed),
            "process": {
                "level": self.process.load(Ordering::Relaxed),
                "connections": signals.connections,
                "temp_space": signals.temp_space,
            },
            "forced": forced.filter(|(_, until)| *until > now).map(|(l, until)| serde_json::json!({
                "level": l,
                "expires_in_ms": until.duration_since(now).as_millis() as u64,
            })),
            "ready": self.ready(),
        })
    }
}
