//! The embedded default: a demo shop origin and the config that puts the
//! gateway in front of it, so `flashgate demo` shows the whole product
//! without installing anything.
//!
//! The origin is deliberately simple but shaped like a shop: a catalog of a
//! few hundred products as JSON and HTML, a slow recommendations endpoint
//! (the kind of feature a sale degrades first), static assets and a health
//! path.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;

pub mod banner;
pub mod checkout;
pub mod shop;
pub mod wasm;

use crate::config::Config;

/// The demo config, also shipped as `config/demo.toml`.
pub const DEMO_CONFIG: &str = include_str!("../../../config/demo.toml");

/// How many products the demo catalog has.
pub const PRODUCTS: u32 = 300;

/// How long the recommendations endpoint takes, on purpose.
pub const RECOMMENDATION_DELAY: Duration = Duration::from_millis(250);

/// Recommendations served at once (the rest wait): 32 per second at most.
pub const RECOMMENDATION_SLOTS: usize = 8;

/// The demo config with the shop upstream pointed at `origin`.
pub fn config(origin: SocketAddr) -> Config {
    let mut config = Config::parse(DEMO_CONFIG).expect("the embedded demo config is valid");
    for u in &mut config.upstreams {
        if u.name == "shop" {
            u.endpoints = vec![origin.to_string()];
        }
    }
    config
}

const ADJECTIVES: &[&str] = &[
    "Swift", "Cloud", "Retro", "Urban", "Trail", "Court", "Street", "Limited",
];
const NOUNS: &[&str] = &[
    "Sneaker",
    "Runner",
    "Hoodie",
    "Cap",
    "Backpack",
    "Jacket",
    "Sock Pack",
    "Tee",
];

fn product(id: u32) -> serde_json::Value {
    let i = id as usize;
    json!({
        "id": id,
        "sku": format!("sku-{id:05}"),
        "name": format!("{} {}", ADJECTIVES[i % ADJECTIVES.len()], NOUNS[(i / ADJECTIVES.len()) % NOUNS.len()]),
        "price_cents": 1999 + (id * 3700) % 19000,
        "in_stock": !id.is_multiple_of(17),
    })
}

/// Pre-rendered responses: the origin should cost little, so benchmarks and
/// the demo measure the gateway, not JSON encoding.
struct Catalog {
    products: Vec<Bytes>,
    pages: Vec<Bytes>,
    home: Bytes,
}

/// The products `/` shows.
const HOME_PRODUCTS: u32 = 24;

fn card(p: &serde_json::Value) -> shop::Card<'_> {
    shop::Card {
        id: p["id"].as_u64().unwrap_or(0) as u32,
        name: p["name"].as_str().unwrap_or(""),
        price_cents: p["price_cents"].as_u64().unwrap_or(0),
        in_stock: p["in_stock"].as_bool() == Some(true),
    }
}

impl Catalog {
    fn new() -> Catalog {
        let all: Vec<serde_json::Value> = (1..=PRODUCTS).map(product).collect();
        let home_cards: Vec<shop::Card<'_>> =
            all.iter().take(HOME_PRODUCTS as usize).map(card).collect();
        Catalog {
            products: all.iter().map(|p| Bytes::from(p.to_string())).collect(),
            pages: all
                .iter()
                .map(|p| Bytes::from(shop::product(&card(p))))
                .collect(),
            home: Bytes::from(shop::home(&home_cards)),
        }
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

async fn origin(
    catalog: Arc<Catalog>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "application/json",
            r#"{"error":"method not allowed"}"#,
        ));
    }
    let path = req.uri().path();
    let query = req.uri().query();
    let lookup = |id: &str| {
        id.parse::<u32>()
            .ok()
            .filter(|id| (1..=PRODUCTS).contains(id))
    };
    let resp = match path {
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/" => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            catalog.home.clone(),
        ),
        "/drop/demo-sneaker" => {
            // A buyer of its own per page: each visitor can buy one pair.
            static BUYERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            let n = BUYERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                shop::drop_page(&format!("web-buyer-{n}")),
            )
        }
        "/products" => {
            let page: u32 = query_param(query, "page")
                .and_then(|p| p.parse().ok())
                .unwrap_or(1)
                .max(1);
            let per_page: u32 = query_param(query, "per_page")
                .and_then(|p| p.parse().ok())
                .unwrap_or(50)
                .clamp(1, 100);
            let first = (page - 1).saturating_mul(per_page) + 1;
            let items: Vec<_> = (first..first.saturating_add(per_page))
                .filter(|id| *id <= PRODUCTS)
                .map(product)
                .collect();
            respond(
                StatusCode::OK,
                "application/json",
                json!({"page": page, "total": PRODUCTS, "items": items}).to_string(),
            )
        }
        "/recommendations" => {
            // The recommendation service serves a few at a time: under a
            // flood its line grows, and the gateway's load level with it.
            static SLOTS: tokio::sync::Semaphore =
                tokio::sync::Semaphore::const_new(RECOMMENDATION_SLOTS);
            let _slot = SLOTS.acquire().await;
            tokio::time::sleep(RECOMMENDATION_DELAY).await;
            let seed = query_param(query, "product").and_then(lookup).unwrap_or(1);
            let items: Vec<_> = (1..=4)
                .map(|k| product((seed + k * 7) % PRODUCTS + 1))
                .collect();
            respond(
                StatusCode::OK,
                "application/json",
                json!({"items": items}).to_string(),
            )
        }
        "/static/app.css" => respond(StatusCode::OK, "text/css", shop::APP_CSS),
        "/static/app.js" => respond(StatusCode::OK, "application/javascript", shop::APP_JS),
        _ => {
            if let Some(id) = path.strip_prefix("/products/").and_then(lookup) {
                respond(
                    StatusCode::OK,
                    "application/json",
                    catalog.products[id as usize - 1].clone(),
                )
            } else if let Some(id) = path.strip_prefix("/shop/").and_then(lookup) {
                respond(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    catalog.pages[id as usize - 1].clone(),
                )
            } else {
                respond(
                    StatusCode::NOT_FOUND,
                    "application/json",
                    r#"{"error":"not found"}"#,
                )
            }
        }
    };
    let mut resp = resp;
    if path.starts_with("/static/") {
        resp.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("public, max-age=3600"),
        );
    } else if path.starts_with("/products") || path.starts_with("/shop/") {
        resp.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("public, max-age=30"),
        );
    }
    Ok(resp)
}

/// Serves the demo origin on `listener` until the task is dropped.
pub async fn serve_origin(listener: TcpListener) {
    let catalog = Arc::new(Catalog::new());
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let catalog = catalog.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| origin(catalog.clone(), req));
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn demo_config_is_valid() {
        let c = super::config("127.0.0.1:1234".parse().unwrap());
        assert_eq!(c.upstreams[0].endpoints, ["127.0.0.1:1234"]);
        // Its filters build too, as `flashgate check` would find.
        crate::pipeline::runtime::Runtime::check(&c).unwrap();
    }

    #[test]
    fn products_are_stable() {
        assert_eq!(super::product(1)["sku"], "sku-00001");
        assert_eq!(super::product(1), super::product(1));
    }
}
