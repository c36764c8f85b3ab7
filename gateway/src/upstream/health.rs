//! Active health checks: `GET path` on each endpoint every interval. An
//! endpoint leaves rotation after `unhealthy_threshold` failures in a row and
//! comes back after `healthy_threshold` passes in a row, so one lost packet
//! neither ejects nor readmits it. Endpoints start healthy, so a cold start
//! serves at once; outlier ejection covers the first seconds.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::Endpoint;
use crate::config::HealthConfig;

pub fn spawn(
    cluster: Arc<str>,
    endpoints: Arc<[Arc<Endpoint>]>,
    cfg: HealthConfig,
    connect_timeout: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout.min(cfg.timeout.0)));
        // Its own small pool: probes must not count as (or take) traffic
        // connections, but need not open a connection per probe either.
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .pool_timer(TokioTimer::new())
            .build(connector);
        // (passes in a row, failures in a row) per endpoint.
        let mut streaks = vec![(0u32, 0u32); endpoints.len()];
        let mut tick = tokio::time::interval(cfg.interval.0);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let probes = endpoints.iter().map(|ep| {
                let uri = format!("http://{}{}", ep.addr, cfg.path);
                let client = client.clone();
                async move {
                    let Ok(uri) = uri.parse::<http::Uri>() else {
                        return false;
                    };
                    match tokio::time::timeout(cfg.timeout.0, client.get(uri)).await {
                        Ok(Ok(resp)) => resp.status().is_success(),
                        _ => false,
                    }
                }
            });
            let results = futures_join_all(probes).await;
            for ((ep, ok), streak) in endpoints.iter().zip(results).zip(streaks.iter_mut()) {
                if ok {
                    *streak = (streak.0.saturating_add(1), 0);
                } else {
                    *streak = (0, streak.1.saturating_add(1));
                }
                let healthy = ep.healthy.load(Ordering::Relaxed);
                if healthy && streak.1 >= cfg.unhealthy_threshold {
                    ep.healthy.store(false, Ordering::Relaxed);
                    ep.healthy_gauge.set(0);
                    tracing::warn!(%cluster, endpoint = %ep.addr, "endpoint failed health checks, out of rotation");
                } else if !healthy && streak.0 >= cfg.healthy_threshold {
                    ep.healthy.store(true, Ordering::Relaxed);
                    ep.healthy_gauge.set(1);
                    tracing::info!(%cluster, endpoint = %ep.addr, "endpoint passed health checks, back in rotation");
                }
            }
        }
    })
}

/// Runs the probes of one round concurrently, so one slow endpoint does not
/// delay the others' verdicts.
async fn futures_join_all<F: std::future::Future<Output = bool> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<bool> {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap_or(false));
    }
    out
}
