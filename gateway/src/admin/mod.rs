//! The admin listener: health, readiness, metrics, status and the mutating
//! calls. It is a separate port, on loopback by default, so that neither the
//! public internet nor the proxy's own load can reach or starve it.
//! Mutating calls need `authorization: Bearer <admin.token>`; the
//! dashboard's data (`/admin/ui/data`) needs it too unless the caller is on
//! loopback.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::Shared;

mod load_level;
pub mod traffic;
mod ui;
mod waiting_rooms;

use traffic::Traffic;

type AdminResponse = Response<Full<Bytes>>;

pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let traffic = Arc::new(Traffic::default());
    {
        let (shared, traffic, mut shutdown) = (shared.clone(), traffic.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(traffic::INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => traffic.sample(&shared),
                    _ = shutdown.changed() => return,
                }
            }
        });
    }
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let shared = shared.clone();
        let traffic = traffic.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(shared.clone(), traffic.clone(), peer, req));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> AdminResponse {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn json_reply(status: StatusCode, value: serde_json::Value) -> AdminResponse {
    reply(status, "application/json", value.to_string())
}

/// Constant-time comparison, so the token cannot be guessed byte by byte
/// from response times.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// `None` when the request carries the admin token; otherwise the refusal.
fn refusal(shared: &Shared, req: &Request<Incoming>) -> Option<AdminResponse> {
    let runtime = shared.runtime.load();
    let Some(expected) = runtime.config.admin.token.as_deref() else {
        return Some(json_reply(
            StatusCode::FORBIDDEN,
            json!({"error": "mutating admin calls are disabled: set admin.token"}),
        ));
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if token_matches(given.as_bytes(), expected.as_bytes()) {
        None
    } else {
        let mut resp = json_reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": "missing or wrong bearer token"}),
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        Some(resp)
    }
}

/// `None` when the caller may read the dashboard: on loopback, or with the
/// admin token; otherwise the refusal.
fn view_refusal(
    shared: &Shared,
    peer: SocketAddr,
    req: &Request<Incoming>,
) -> Option<AdminResponse> {
    if peer.ip().to_canonical().is_loopback() {
        None
    } else {
        refusal(shared, req)
    }
}

async fn handle(
    shared: Arc<Shared>,
    traffic: Arc<Traffic>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<AdminResponse, Infallible> {
    let path = req.uri().path().to_string();
    let resp = match (req.method(), path.as_str()) {
        // Liveness: answering at all is the signal; it never fails for
        // slowness, so a busy gateway is not restarted into a worse state.
        (&Method::GET, "/healthz") => reply(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => {
            if shared.draining.load(Ordering::Relaxed) {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            } else if !shared.overload.ready() {
                // Critical for `overload.unready_after`: the balancer sends
                // new clients elsewhere; liveness stays up.
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "overloaded\n",
                )
            } else {
                reply(StatusCode::OK, "text/plain", "ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            let runtime = shared.runtime.load();
            for c in &runtime.clusters {
                c.refresh_gauges();
            }
            let mut text = shared.metrics.render();
            text.extend_from_slice(crate::observe::metrics::render_wasm(&runtime.wasm).as_bytes());
            reply(StatusCode::OK, "text/plain; version=0.0.4", text)
        }
        (&Method::GET, "/admin/status") => {
            waiting_rooms::refresh(&shared).await;
            json_reply(StatusCode::OK, status(&shared, &traffic))
        }
        // The page holds no data (it is the same for everyone); the data
        // it polls is the status above.
        (&Method::GET, "/admin/ui") => ui::page(),
        (&Method::GET, "/admin/ui/data") => match view_refusal(&shared, peer, &req) {
            Some(resp) => resp,
            None => {
                waiting_rooms::refresh(&shared).await;
                json_reply(StatusCode::OK, status(&shared, &traffic))
            }
        },
        (&Method::POST, "/admin/reload") => match refusal(&shared, &req) {
            Some(resp) => resp,
            None => match shared.reload().await {
                Ok(outcome) => json_reply(
                    StatusCode::OK,
                    json!({"reloaded": true, "restart_required": outcome.restart_required, "tls_errors": outcome.tls_errors}),
                ),
                Err(e) => json_reply(
                    StatusCode::BAD_REQUEST,
                    json!({"reloaded": false, "error": e}),
                ),
            },
        },
        (&Method::POST, "/admin/cache/purge") => match refusal(&shared, &req) {
            Some(resp) => resp,
            None => cache_purge(&shared, req).await,
        },
        (&Method::POST, "/admin/load-level") => match refusal(&shared, &req) {
            Some(resp) => resp,
            None => load_level::force(&shared, req).await,
        },
        (&Method::POST, p) if p.starts_with(waiting_rooms::PREFIX) => {
            match refusal(&shared, &req) {
                Some(resp) => resp,
                None => {
                    let name = p[waiting_rooms::PREFIX.len()..].to_string();
                    waiting_rooms::set(&shared, &name, req).await
                }
            }
        }
        (
            _,
            "/healthz" | "/readyz" | "/metrics" | "/admin/status" | "/admin/reload"
            | "/admin/cache/purge" | "/admin/load-level" | "/admin/ui" | "/admin/ui/data",
        ) => json_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "method not allowed"}),
        ),
        _ => json_reply(StatusCode::NOT_FOUND, json!({"error": "not found"})),
    };
    Ok(resp)
}

/// `POST /admin/cache/purge` with `{"key": "host/path?query"}` (that key
/// and its variants) or `{"prefix": "host/products/"}`: dropped from this
/// gateway's L1 and from Redis, and every other gateway drops its L1 copies
/// on the pub/sub message.
async fn cache_purge(shared: &Shared, req: Request<Incoming>) -> AdminResponse {
    use http_body_util::BodyExt;
    let body = match http_body_util::Limited::new(req.into_body(), 64 * 1024)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return json_reply(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("cannot read the request body: {e}")}),
            )
        }
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PurgeRequest {
        key: Option<String>,
        prefix: Option<String>,
    }
    let purge = match serde_json::from_slice::<PurgeRequest>(&body) {
        Ok(PurgeRequest {
            key: Some(k),
            prefix: None,
        }) if !k.is_empty() => crate::cache::Purge::Key(k.into_bytes().into()),
        Ok(PurgeRequest {
            key: None,
            prefix: Some(p),
        }) if !p.is_empty() => crate::cache::Purge::Prefix(p.into_bytes().into()),
        Ok(_) => {
            return json_reply(
                StatusCode::BAD_REQUEST,
                json!({"error": "send exactly one of {\"key\": \"host/path?query\"} or {\"prefix\": \"host/path\"}, not empty"}),
            )
        }
        Err(e) => {
            return json_reply(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("invalid JSON body: {e}")}),
            )
        }
    };
    let cache = shared.runtime.load().cache.clone();
    let (l1, l2) = cache.purge(purge).await;
    json_reply(
        StatusCode::OK,
        json!({"purged": {"l1": l1, "l2": l2}, "l2_reached": l2.is_some()}),
    )
}

/// A route's `rate_limit` for the status: each limit as `rate` and
/// `burst`, and the scope.
fn rate_limit_view(l: &crate::config::RouteRateLimit) -> serde_json::Value {
    let spec = |s: &crate::config::LimitSpec| {
        let unit = match s.rate.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        json!({"rate": format!("{}/{unit}", s.rate.count), "burst": s.burst_or(l.burst)})
    };
    let mut limits = serde_json::Map::new();
    for (name, s) in [
        ("per_ip", &l.per_ip),
        ("per_user", &l.per_user),
        ("route", &l.route),
    ] {
        if let Some(s) = s {
            limits.insert(name.into(), spec(s));
        }
    }
    if let Some(h) = &l.per_header {
        let s = crate::config::LimitSpec {
            rate: h.rate,
            burst: h.burst,
        };
        limits.insert("per_header".into(), spec(&s));
    }
    if let Some(h) = &l.hot {
        limits.insert("hot".into(), spec(&h.spec()));
    }
    json!({"limits": limits, "scope": if l.scope == crate::config::Scope::Fleet { "fleet" } else { "local" }})
}

/// What `/admin/status` and the dashboard's data answer: the config in
/// effect, the load level, the upstreams' endpoints and, under `traffic`,
/// the latest second's sample with rates over the last ten seconds.
fn status(shared: &Shared, traffic: &Traffic) -> serde_json::Value {
    let runtime = shared.runtime.load();
    // Each route's limits as the config writes them, by route name.
    let limits: std::collections::HashMap<String, serde_json::Value> = runtime
        .config
        .routes
        .iter()
        .filter_map(|r| Some((r.display_name(), rate_limit_view(r.rate_limit.as_ref()?))))
        .collect();
    let routes: Vec<_> = runtime
        .routes
        .iter()
        .map(|r| {
            json!({
                "rate_limit": limits.get(&*r.name),
                "name": &*r.name,
                "host": r.host,
                "path_prefix": r.path_prefix,
                "upstream": &*r.cluster.name,
                "priority": r.priority.as_str(),
                "filters": r.filters.names().collect::<Vec<_>>(),
            })
        })
        .collect();
    let clusters: Vec<_> = runtime
        .clusters
        .iter()
        .map(|c| {
            let endpoints: Vec<_> = c
                .endpoint_states()
                .into_iter()
                .map(|(addr, healthy, ejected, in_flight)| {
                    json!({"address": addr, "healthy": healthy, "ejected": ejected, "in_flight": in_flight})
                })
                .collect();
            let overload = runtime
                .gates
                .iter()
                .find(|g| *g.cluster == *c.name)
                .map(|g| g.status());
            json!({"name": &*c.name, "endpoints": endpoints, "overload": overload})
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "draining": shared.draining.load(Ordering::Relaxed),
        "load_level": shared.overload.level(),
        "overload": shared.overload.status(),
        "config_file": shared.config_path.as_ref().map(|p| p.display().to_string()),
        "routes": routes,
        "clusters": clusters,
        "filters": runtime.config.filters.iter().map(|f| &f.name).collect::<Vec<_>>(),
        "bot_rules": runtime
            .config
            .bot_rules
            .iter()
            .map(|b| json!({"name": b.name, "action": b.action.as_str()}))
            .collect::<Vec<_>>(),
        "waiting_rooms": runtime.rooms.iter().map(|r| r.status()).collect::<Vec<_>>(),
        "traffic": traffic.snapshot(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_compare() {
        assert!(super::token_matches(b"secret", b"secret"));
        assert!(!super::token_matches(b"secreT", b"secret"));
        assert!(!super::token_matches(b"secre", b"secret"));
        assert!(!super::token_matches(b"", b"secret"));
    }
}
