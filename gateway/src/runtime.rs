//! The runtime: everything built from one config that requests read
//! (routes, clusters, filter chains). It is swapped whole on reload, so a
//! request sees either the old or the new config, never a mix, and requests
//! in flight finish on the runtime they started with.

use std::sync::Arc;

use filters::{FilterChain, FilterFactory, Priority};
use prometheus::Histogram;

use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::router::{HostMatch, Router};
use crate::upstream::Cluster;

pub struct Route {
    pub name: Arc<str>,
    pub host: Option<String>,
    pub path_prefix: String,
    pub priority: Priority,
    pub cluster: Arc<Cluster>,
    pub filters: FilterChain,
    pub latency: Histogram,
}

pub struct Runtime {
    pub config: Arc<Config>,
    router: Router<usize>,
    pub routes: Vec<Route>,
    pub clusters: Vec<Arc<Cluster>>,
}

impl Runtime {
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
        let mut factories: Vec<(String, Arc<dyn FilterFactory>)> = Vec::new();
        for (i, f) in config.filters.iter().enumerate() {
            let kind = f.native.as_deref().ok_or_else(|| ConfigError {
                path: format!("filters[{i}]"),
                message: "only native filters are available in this build".into(),
            })?;
            let factory =
                filters::native::build(kind, &f.name, &f.config).map_err(|e| ConfigError {
                    path: format!("filters[{i}].config"),
                    message: e.to_string(),
                })?;
            factories.push((f.name.clone(), factory));
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
            routes.push(Route {
                latency: metrics.request_duration.with_label_values(&[&name]),
                name: name.into(),
                host: r.host.clone(),
                path_prefix: r.path_prefix.clone(),
                priority: r.priority,
                cluster,
                filters: FilterChain::new(chain),
            });
        }
        let router = Router::new(routes.iter().enumerate().map(|(i, r)| {
            (
                HostMatch::parse(r.host.as_deref()),
                r.path_prefix.clone(),
                i,
            )
        }));
        Ok(Runtime {
            config: Arc::new(config),
            router,
            routes,
            clusters,
        })
    }

    pub fn route(&self, host: &str, path: &str) -> Option<&Route> {
        self.router.find(host, path).map(|&i| &self.routes[i])
    }
}
