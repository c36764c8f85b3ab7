//! The runtime: everything built from one config that requests read
//! (routes, clusters, filter chains). It is swapped whole on reload, so a
//! request sees either the old or the new config, never a mix, and requests
//! in flight finish on the runtime they started with.
//!
//! Building is where a config meets the disk and the compiler: filters are
//! built (Wasm modules compiled and started) and the JWT verifier reads its
//! key here, once per config. [`Runtime::check`] builds the same parts, and
//! the listeners' certificates, without starting anything: `flashgate
//! check` runs it after `Config::load`, so a file that parses but does not
//! build is reported with its key path as before.

pub mod file_watch;
pub mod filters;

use std::sync::{Arc, OnceLock};

use ::filters::wasm::WasmFilter;
use ::filters::{FilterChain, FilterFactory, Priority};
use prometheus::{Histogram, IntCounter, IntCounterVec};

use crate::cache::{Cache, RouteCache};
use crate::config::{Config, ConfigError};
use crate::observe::metrics::Metrics;
use crate::overload::gate::Gate;
use crate::pipeline::admission::bots::Bots;
use crate::pipeline::admission::limits::{Limiter, RouteLimits};
use crate::pipeline::admission::waiting_room::{self, Room};
use crate::pipeline::identity::jwt::JwtVerifier;
use crate::pipeline::route::router::{HostMatch, Router};
use crate::respond::Fallback;
use crate::upstream::Cluster;

pub struct Route {
    pub name: Arc<str>,
    pub host: Option<String>,
    pub path_prefix: String,
    pub priority: Priority,
    /// `Upgrade` requests (WebSocket) are passed through.
    pub websocket: bool,
    /// `identity = "required"`: 401 without a verified token.
    pub identity_required: bool,
    /// Paths with `%2F` or `%5C` are forwarded, not refused.
    pub keep_escaped_slashes: bool,
    /// Request bodies are read in before an upstream slot is taken.
    pub buffer_requests: bool,
    /// Responses are read at the upstream's pace (see `crate::spool`).
    pub buffer_responses: bool,
    pub cluster: Arc<Cluster>,
    pub filters: FilterChain,
    /// Set on the checkout route (see `crate::pipeline::admission::checkout`).
    pub checkout: Option<crate::pipeline::admission::checkout::Checkout>,
    /// Set on routes with `cache = {...}`.
    pub cache: Option<Arc<RouteCache>>,
    /// The cluster's overload gate; `None` with `[overload] enabled = false`.
    pub gate: Option<Arc<Gate>>,
    /// What overload answers instead of a 503 (`fallback = {...}`).
    pub fallback: Option<Fallback>,
    /// Set on routes with `rate_limit = {...}`.
    pub limits: Option<Arc<RouteLimits>>,
    /// Set on routes with `waiting_room = "..."`.
    pub waiting_room: Option<Arc<Room>>,
    pub latency: Histogram,
    /// `flashgate_requests_total{route, status}` handles by status code,
    /// resolved on first use: a request does not hash label values.
    by_status: Box<[OnceLock<IntCounter>]>,
    requests: IntCounterVec,
}

impl Route {
    /// Counts one answered request.
    pub fn count(&self, status: http::StatusCode) {
        let code = status.as_u16();
        let counter = match self.by_status.get(code as usize - 100) {
            Some(slot) => slot.get_or_init(|| {
                self.requests
                    .with_label_values(&[&self.name, status.as_str()])
            }),
            None => {
                return self
                    .requests
                    .with_label_values(&[&self.name, status.as_str()])
                    .inc()
            }
        };
        counter.inc();
    }
}

pub struct Runtime {
    pub config: Arc<Config>,
    router: Router<usize>,
    pub routes: Vec<Route>,
    pub clusters: Vec<Arc<Cluster>>,
    /// One overload gate per cluster, in the same order (empty with
    /// `[overload] enabled = false`).
    pub gates: Vec<Arc<Gate>>,
    /// The Wasm filters by name, for their metrics on `/metrics`.
    pub wasm: Vec<(String, Arc<WasmFilter>)>,
    /// The JWT verifier when `[jwt]` is set.
    pub jwt: Option<JwtVerifier>,
    /// The response cache: carried over by reloads that keep `[cache]` and
    /// `[redis]` as they were, so its entries survive the reload.
    pub cache: Arc<Cache>,
    /// Bodies read ahead of a slow side (`[buffering]`).
    pub spooler: Arc<crate::spool::Spooler>,
    /// The rate limits' shared state, when a route has `rate_limit`:
    /// carried over by reloads that keep `[rate_limit]` and `[redis]`.
    pub limiter: Option<Arc<Limiter>>,
    /// `[[bot_rules]]`, built (see `pipeline::admission::bots`).
    pub bots: Bots,
    /// `[[waiting_rooms]]`, built; their lines carried over by reloads
    /// that keep `[redis]`.
    pub rooms: Vec<Arc<Room>>,
}

/// The parts of a runtime that can fail to build from a valid config.
struct Fallible {
    filters: Vec<filters::Built>,
    jwt: Option<JwtVerifier>,
    bots: Bots,
}

impl Fallible {
    fn build(
        config: &Config,
        watch: filters::Watch,
        previous: Option<&Runtime>,
    ) -> Result<Fallible, ConfigError> {
        let previous = previous.map(|p| (&*p.config, &p.wasm[..]));
        let filters = filters::build_all(config, watch, previous)?;
        let jwt = config
            .jwt
            .as_ref()
            .map(|j| JwtVerifier::build(j, watch == filters::Watch::AsConfigured))
            .transpose()?;
        let bots = Bots::build(config, watch == filters::Watch::AsConfigured)?;
        for (i, w) in config.waiting_rooms.iter().enumerate() {
            Room::check(w, &format!("waiting_rooms[{i}]"))?;
        }
        Ok(Fallible { filters, jwt, bots })
    }
}

impl Runtime {
    /// Builds, from a valid config, everything that can still fail (the
    /// listeners' certificate pairs, the filters, the JWT verifier) and
    /// drops it: no listener, health check, Redis connection or file
    /// watcher is started, and no tokio runtime is needed. The first error
    /// comes back with its key path; certificates are built first, then
    /// filters, then `[jwt]`, the order of their sections in validation.
    pub fn check(config: &Config) -> Result<(), ConfigError> {
        crate::edge::tls::Certs::load_listeners(config)?;
        Fallible::build(config, filters::Watch::Never, None)?;
        Ok(())
    }

    /// Builds the runtime from a validated config. Must run inside a tokio
    /// runtime (clusters start their health checks).
    ///
    /// A cluster whose config did not change is carried over from
    /// `previous` as it is: a reload must not empty warm connection pools,
    /// forget which endpoints are down, or reset the concurrency limit
    /// while the old requests still hold their slots.
    pub fn build(
        config: Config,
        metrics: &Arc<Metrics>,
        previous: Option<&Runtime>,
    ) -> Result<Runtime, ConfigError> {
        // What can fail first, so a refused config starts no health check.
        let Fallible { filters, jwt, bots } =
            Fallible::build(&config, filters::Watch::AsConfigured, previous)?;
        let clusters: Vec<Arc<Cluster>> = config
            .upstreams
            .iter()
            .map(|u| {
                previous
                    .and_then(|p| p.clusters.iter().find(|c| c.config == *u))
                    .cloned()
                    .unwrap_or_else(|| Cluster::new(u, metrics.clone()))
            })
            .collect();
        // Kept over a reload, with what they learned, while neither their
        // cluster nor `[overload]` changed.
        let gates: Vec<Arc<Gate>> = if config.overload.enabled {
            config
                .upstreams
                .iter()
                .map(|u| {
                    previous
                        .and_then(|p| {
                            p.gates
                                .iter()
                                .find(|g| g.built_from.0 == *u && g.built_from.1 == config.overload)
                        })
                        .cloned()
                        .unwrap_or_else(|| Gate::new(u, &config.overload, metrics))
                })
                .collect()
        } else {
            Vec::new()
        };
        let cache = match previous {
            Some(p) if p.cache.same_config(&config.cache, config.redis.as_ref()) => p.cache.clone(),
            _ => Arc::new(
                Cache::new(&config.cache, config.redis.as_ref(), &metrics.cache).map_err(
                    |message| ConfigError {
                        path: "redis".into(),
                        message,
                    },
                )?,
            ),
        };
        let limiter = if config.routes.iter().any(|r| r.rate_limit.is_some()) {
            match previous
                .and_then(|p| p.limiter.clone())
                .filter(|l| l.same_config(&config))
            {
                Some(l) => Some(l),
                None => Some(
                    Limiter::new(&config, metrics).map_err(|message| ConfigError {
                        path: "redis".into(),
                        message,
                    })?,
                ),
            }
        } else {
            None
        };
        let rooms =
            waiting_room::build_all(&config, metrics, previous.map_or(&[][..], |p| &p.rooms[..]))?;
        let mut factories: Vec<(String, Arc<dyn FilterFactory>)> = Vec::new();
        let mut wasm = Vec::new();
        for built in filters {
            if let Some(w) = built.wasm {
                wasm.push((built.name.clone(), w));
            }
            factories.push((built.name, built.factory));
        }
        let mut routes = Vec::with_capacity(config.routes.len());
        for r in &config.routes {
            let cluster = clusters
                .iter()
                .find(|c| *c.name == *r.upstream)
                .expect("validated: route upstreams exist")
                .clone();
            let chain = r
                .filters
                .iter()
                .map(|name| {
                    factories
                        .iter()
                        .find(|(n, _)| n == name)
                        .expect("validated: route filters exist")
                        .1
                        .clone()
                })
                .collect();
            let name = r.display_name();
            let checkout = r.checkout.as_ref().map(|c| {
                crate::pipeline::admission::checkout::Checkout::new(c)
                    .with_retry_metrics(&metrics.checkout_retries, &name)
            });
            let gate = gates.iter().find(|g| *g.cluster == *r.upstream).cloned();
            let limits = match (&limiter, &r.rate_limit) {
                (Some(l), Some(c)) => {
                    let before = previous
                        .and_then(|p| p.routes.iter().find(|pr| *pr.name == *name))
                        .and_then(|pr| pr.limits.as_ref());
                    Some(l.route(&name, c, metrics, before))
                }
                _ => None,
            };
            let waiting_room = r.waiting_room.as_ref().map(|w| {
                rooms
                    .iter()
                    .find(|room| *room.name == **w)
                    .expect("validated: route waiting rooms exist")
                    .clone()
            });
            routes.push(Route {
                waiting_room,
                limits,
                gate,
                fallback: r.fallback.as_ref().map(Fallback::new),
                cache: r.cache.as_ref().map(|c| cache.route(&name, c)),
                latency: metrics.request_duration.with_label_values(&[&name]),
                by_status: (100..600).map(|_| OnceLock::new()).collect(),
                requests: metrics.requests.clone(),
                name: name.into(),
                host: r.host.clone(),
                path_prefix: r.path_prefix.clone(),
                priority: r.priority,
                websocket: r.websocket,
                identity_required: r.identity == crate::config::route::Identity::Required,
                keep_escaped_slashes: r.escaped_slashes == crate::config::EscapedSlashes::Keep,
                buffer_requests: r.buffer_requests,
                buffer_responses: r.buffer_responses,
                cluster,
                filters: FilterChain::new(chain),
                checkout,
            });
        }
        let router = Router::new(routes.iter().enumerate().map(|(i, r)| {
            (
                HostMatch::parse(r.host.as_deref()),
                r.path_prefix.clone(),
                i,
            )
        }));
        let spooler = Arc::new(crate::spool::Spooler::new(&config.buffering, metrics));
        Ok(Runtime {
            rooms,
            limiter,
            spooler,
            bots,
            jwt,
            config: Arc::new(config),
            router,
            routes,
            clusters,
            gates,
            wasm,
            cache,
        })
    }

    pub fn route(&self, host: &str, path: &str) -> Option<&Route> {
        self.router.find(host, path).map(|&i| &self.routes[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = crate::config::TEST_BASE;

    /// A plain test, no tokio runtime: checking builds no cluster, cache
    /// or listener.
    #[test]
    fn check_builds_what_can_fail_with_key_paths() {
        let check = |extra: &str| {
            let c = Config::parse(&format!("{BASE}{extra}")).expect("valid shape");
            Runtime::check(&c)
        };
        check("[[filters]]\nname = \"h\"\nnative = \"headers\"\n[redis]\nurl = \"redis://127.0.0.1:1\"\n")
            .unwrap();
        let e =
            check("[[filters]]\nname = \"h\"\nnative = \"headers\"\nconfig = '{\"bogus\": 1}'\n")
                .unwrap_err();
        assert_eq!(e.path, "filters[0].config");
        let e = check("[jwt]\nalgorithm = \"RS256\"\npublic_key = \"/nonexistent/key.pem\"\n")
            .unwrap_err();
        assert_eq!(e.path, "jwt.public_key");
        assert!(e.message.contains("/nonexistent/key.pem"), "{e}");
        let e = check("[jwt]\nalgorithm = \"ES256\"\njwks_file = \"/nonexistent/jwks.json\"\n")
            .unwrap_err();
        assert_eq!(e.path, "jwt.jwks_file");
        let e = check(
            "[[listeners]]\nname = \"tls\"\nlisten = \"127.0.0.1:8443\"\n\
             [listeners.tls]\ncerts = [{ cert = \"/nonexistent/c.pem\", key = \"/nonexistent/k.pem\" }]\n",
        )
        .unwrap_err();
        assert_eq!(e.path, "listeners[1].tls.certs[0]");
    }
}
