//! Overload protection: the load level ([`level`]), what it sheds
//! ([`shed`]), each cluster's gate with its learned concurrency limit,
//! priority shares and queue ([`gate`], [`adaptive`]), and the circuit
//! breaker ([`breaker`]). The pipeline's admission phase asks [`shed`]
//! what to do with a request at the current level; the upstream phase
//! takes a slot from the route's [`gate::Gate`]; a tick task
//! ([`Overload::tick`], every [`TICK`]) turns what the gates saw into the
//! level and readiness. `docs/overload.md` is the long version.

pub mod adaptive;
pub mod breaker;
pub mod gate;
pub mod level;
pub mod shed;

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, IntGauge};

use crate::config::OverloadConfig;
use crate::observe::metrics::Metrics;
use gate::Gate;

/// How often the level and the learned limits are updated.
pub const TICK: Duration = Duration::from_millis(100);

/// The process's load level and readiness.
pub struct Overload {
    /// The level in effect: forced, or computed.
    level: AtomicU8,
    computed: AtomicU8,
    forced: Mutex<Option<(u8, Instant)>>,
    ready: AtomicBool,
    state: Mutex<TickState>,
    level_gauge: IntGauge,
    /// `flashgate_shed_total{route, priority, reason}`.
    pub shed: IntCounterVec,
}

#[derive(Default)]
struct TickState {
    hysteresis: level::Hysteresis,
    errors: level::ErrorRatio,
    critical_since: Option<Instant>,
    calm_since: Option<Instant>,
}

impl Overload {
    pub fn new(metrics: &Metrics) -> Arc<Overload> {
        Arc::new(Overload {
            level: AtomicU8::new(0),
            computed: AtomicU8::new(0),
            forced: Mutex::new(None),
            ready: AtomicBool::new(true),
            state: Mutex::new(TickState::default()),
            level_gauge: metrics.load_level.clone(),
            shed: metrics.shed.clone(),
        })
    }

    /// The level in effect, 0 (calm) to 3 (critical).
    pub fn level(&self) -> u8 {
        self.level.load(Ordering::Relaxed)
    }

    /// False while the level has been critical for `unready_after`, until
    /// it has been below critical for `ready_after`.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Forces the level for a drill until `for_` has passed; `None`
    /// clears it.
    pub fn force(&self, forced: Option<(u8, Duration)>) {
        let mut f = self.forced.lock().unwrap_or_else(|e| e.into_inner());
        *f = forced.map(|(l, d)| (l.min(3), Instant::now() + d));
        let level = self.effective(&mut f);
        drop(f);
        self.set(level);
    }

    fn effective(&self, forced: &mut Option<(u8, Instant)>) -> u8 {
        match *forced {
            Some((l, until)) if Instant::now() < until => l,
            Some(_) => {
                *forced = None;
                tracing::info!("forced load level expired");
                self.computed.load(Ordering::Relaxed)
            }
            None => self.computed.load(Ordering::Relaxed),
        }
    }

    fn set(&self, level: u8) {
        let old = self.level.swap(level, Ordering::Relaxed);
        if old != level {
            tracing::warn!(from = old, to = level, "load level changed");
        }
        self.level_gauge.set(i64::from(level));
    }

    /// One tick: reads the gates, moves the computed level (with
    /// hysteresis), expires a forced level, updates readiness.
    pub fn tick(&self, cfg: &OverloadConfig, gates: &[Arc<Gate>]) {
        let signals: Vec<_> = gates.iter().map(|g| g.tick(TICK)).collect();
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let errors = st.errors.update(&signals, TICK);
        let target = if cfg.enabled {
            level::target(cfg, &signals, errors)
        } else {
            0
        };
        let computed = st.hysteresis.step(target, cfg.cool_down.0, now);
        self.computed.store(computed, Ordering::Relaxed);
        let level = {
            let mut f = self.forced.lock().unwrap_or_else(|e| e.into_inner());
            self.effective(&mut f)
        };
        self.set(level);
        if level >= 3 {
            st.calm_since = None;
            let since = *st.critical_since.get_or_insert(now);
            if self.ready() && now.duration_since(since) >= cfg.unready_after.0 {
                tracing::warn!("load level critical for unready_after: readiness off");
                self.ready.store(false, Ordering::Relaxed);
            }
        } else {
            st.critical_since = None;
            if !self.ready() {
                let since = *st.calm_since.get_or_insert(now);
                if now.duration_since(since) >= cfg.ready_after.0 {
                    tracing::info!("load level below critical for ready_after: readiness on");
                    self.ready.store(true, Ordering::Relaxed);
                    st.calm_since = None;
                }
            }
        }
    }

    /// For `/admin/status`.
    pub fn status(&self) -> serde_json::Value {
        let forced = *self.forced.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        serde_json::json!({
            "level": self.level(),
            "computed": self.computed.load(Ordering::Relaxed),
            "forced": forced.filter(|(_, until)| *until > now).map(|(l, until)| serde_json::json!({
                "level": l,
                "expires_in_ms": until.duration_since(now).as_millis() as u64,
            })),
            "ready": self.ready(),
        })
    }
}
