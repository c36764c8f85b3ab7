//! Checkout in `flashgate demo`: the order core runs in this process (the
//! in-memory store and in-process queue of `order_core::demo`: the same
//! state machine as production, NOT durable), seeded with `demo-sneaker`.
//! The demo config routes `/checkout` to it through a critical checkout
//! route with `[jwt]` HS256 on a demo secret, and the demo prints a token
//! so a new user can buy one with curl.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

use crate::config::Config;

/// The demo's JWT secret (also in `config/demo.toml`). A demo only.
pub const DEMO_JWT_SECRET: &str = "flashgate-demo-secret-not-for-production";
/// The demo SKU and its stock.
pub const DEMO_SKU: &str = "demo-sneaker";
pub const DEMO_STOCK: i64 = 100;
/// The in-process core's admin token.
pub const DEMO_CORE_TOKEN: &str = "demo-token";

/// Starts the in-process order core on `listen`.
pub async fn start_core(listen: SocketAddr) -> anyhow::Result<order_core::demo::DemoCore> {
    order_core::demo::start(
        listen,
        DEMO_CORE_TOKEN,
        order_core::Limits::default(),
        &[(DEMO_SKU, DEMO_STOCK)],
    )
    .await
}

/// Points the demo config's `order-core` upstream at `core`.
pub fn point_at(config: &mut Config, core: SocketAddr) {
    for u in &mut config.upstreams {
        if u.name == "order-core" {
            u.endpoints = vec![core.to_string()];
        }
    }
}

/// A token for `user`, valid for a day, signed with the demo secret.
pub fn demo_token(user: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 24 * 3600;
    encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": user, "exp": exp}),
        &EncodingKey::from_secret(DEMO_JWT_SECRET.as_bytes()),
    )
    .unwrap_or_default()
}

/// The banner's checkout: buys one `demo-sneaker` as `demo-user-1`.
pub fn buy_command(public: SocketAddr) -> String {
    buy(public, "buy-1")
}

/// The same buyer again with a new idempotency key: over the per-user limit.
pub fn buy_again_command(public: SocketAddr) -> String {
    buy(public, "buy-2")
}

fn buy(public: SocketAddr, key: &str) -> String {
    let token = demo_token("demo-user-1");
    format!(
        "curl -i -X POST http://{public}/checkout -H 'authorization: Bearer {token}' \
         -H 'idempotency-key: {key}' -H 'content-type: application/json' \
         -d '{{\"sku\":\"{DEMO_SKU}\",\"qty\":1}}'"
    )
}

/// The banner's stock query on the order core's admin API.
pub fn stock_command(core: SocketAddr) -> String {
    format!(
        "curl -s -H 'authorization: Bearer {DEMO_CORE_TOKEN}' http://{core}/admin/stock/{DEMO_SKU}"
    )
}
